package admin

import (
	"context"
	"net/http"
)

// ContinuityReporter is the view of held mail as the admin API shows it
// (package continuity; admin does not depend on it).
type ContinuityReporter interface {
	ContinuityStatus() any
}

// continuity answers GET /api/v1/continuity.
func (s *Server) continuity(w http.ResponseWriter, _ *http.Request) {
	if s.o.Continuity == nil {
		writeJSON(w, http.StatusOK, map[string]any{"enabled": false})
		return
	}
	writeJSON(w, http.StatusOK, s.o.Continuity.ContinuityStatus())
}

// Continuity fetches the continuity view's status into out.
func (c *Client) Continuity(ctx context.Context, out any) error {
	return c.do(ctx, http.MethodGet, "/api/v1/continuity", nil, out)
}
