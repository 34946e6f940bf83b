package main

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/mxq-dev/mxq/config"
	"github.com/mxq-dev/mxq/internal/clustercred"
	"github.com/mxq-dev/mxq/queue/drain"
	"github.com/mxq-dev/mxq/raftstore"
)

// The drain runs on one node of the cluster: the control plane's raft
// leader. drainRunner starts it when this node becomes leader, restoring
// each route's ramp from the replicated state so that a failover does not
// send the store back to the ceiling (nor to the bottom), and stops it when
// leadership is lost; deliveries in flight finish first.
type drainRunner struct {
	rs    *raftstore.Store
	ctl   *controlPlane
	build func() *drain.Drainer
	log   *slog.Logger

	mu     sync.Mutex
	cur    *drain.Drainer
	cancel context.CancelFunc
	done   chan struct{}
}

func (r *drainRunner) run(ctx context.Context) {
	ch, unsubscribe := r.rs.Subscribe()
	defer unsubscribe()
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	for {
		leader := r.rs.IsLeader()
		r.mu.Lock()
		running := r.cur != nil
		r.mu.Unlock()
		switch {
		case leader && !running:
			r.start(ctx)
		case !leader && running:
			r.log.Warn("lost control-plane leadership: stopping the drain")
			r.stop()
		}
		select {
		case <-ctx.Done():
			r.stop()
			return
		case <-ch:
		case <-tick.C:
		}
	}
}

func (r *drainRunner) start(ctx context.Context) {
	d := r.build()
	st := r.rs.State()
	restored := 0
	for route, rc := range st.Routes {
		if rc.Ramp != nil {
			d.Restore(route, rampToDrain(*rc.Ramp))
			restored++
		}
	}
	dctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go r.ctl.follow(dctx, d)
	go func() {
		d.Run(dctx)
		close(done)
	}()
	r.mu.Lock()
	r.cur, r.cancel, r.done = d, cancel, done
	r.mu.Unlock()
	r.log.Info("this node leads the control plane: drain started", "ramps_restored", restored)
}

func (r *drainRunner) stop() {
	r.mu.Lock()
	cancel, done := r.cancel, r.done
	r.cur, r.cancel, r.done = nil, nil, nil
	r.mu.Unlock()
	if cancel != nil {
		cancel()
		<-done
	}
}

func (r *drainRunner) current() *drain.Drainer {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.cur
}

// State implements admin.Drain: live on the node that drains, from the
// replicated state elsewhere.
func (r *drainRunner) State() []drain.RouteState {
	if d := r.current(); d != nil {
		return d.State()
	}
	st := r.rs.State()
	var out []drain.RouteState
	for _, name := range r.ctl.routeNames() {
		rs := drain.RouteState{Route: name}
		if rc := st.Route(name); rc.Ramp != nil {
			rs.Ramp = rampToDrain(*rc.Ramp)
			rs.Circuit = rc.Ramp.Circuit
			rs.LastError = rc.Ramp.LastError
		}
		b := r.ctl.cfg.Backends[name]
		rs.MaxRate, rs.MaxConc = b.Rate, b.Concurrency
		out = append(out, rs)
	}
	return out
}

// Kick implements admin.Drain.
func (r *drainRunner) Kick() {
	if d := r.current(); d != nil {
		d.Kick()
	}
}

// Draining implements admin.Drain.
func (r *drainRunner) Draining() bool { return r.current() != nil }

func rampToDrain(r raftstore.Ramp) drain.RampState {
	return drain.RampState{Rate: r.Rate, Concurrency: r.Concurrency, Phase: r.Phase, SSThresh: r.SSThresh,
		Latency: r.Latency, Baseline: r.Baseline, Updated: r.Updated}
}

func rampFromDrain(s drain.RouteState) raftstore.Ramp {
	r := s.Ramp
	return raftstore.Ramp{Rate: r.Rate, Concurrency: r.Concurrency, Phase: r.Phase, SSThresh: r.SSThresh,
		Latency: r.Latency, Baseline: r.Baseline, Updated: r.Updated.UTC(), Circuit: s.Circuit, LastError: trim(s.LastError, 1000)}
}

func trim(s string, n int) string {
	if len(s) > n {
		return s[:n]
	}
	return s
}

// ctlSubject is where a node answers forwarded control commands; outside
// the queue stream's subjects, which would otherwise store the request.
func ctlSubject(node string) string { return "_MXQ_CTL.apply." + node }

// serveForwarded answers commands forwarded by followers (on the leader,
// raftstore applies them; elsewhere it refuses with ErrNotLeader and the
// sender tries the new leader).
func serveForwarded(nc *nats.Conn, node string, rs *raftstore.Store, log *slog.Logger) (*nats.Subscription, error) {
	return nc.Subscribe(ctlSubject(node), func(m *nats.Msg) {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		reply := "ok"
		if err := rs.ApplyEncoded(ctx, m.Data); err != nil {
			reply = "error: " + err.Error()
			if errors.Is(err, raftstore.ErrNotLeader) {
				reply = "not-leader"
			}
			log.Debug("forwarded control command failed", "err", err)
		}
		_ = m.Respond([]byte(reply))
	})
}

// forwarder sends a follower's command to the leader over NATS.
func forwarder(nc *nats.Conn) func(ctx context.Context, leader string, cmd []byte) error {
	return func(ctx context.Context, leader string, cmd []byte) error {
		resp, err := nc.RequestWithContext(ctx, ctlSubject(leader), cmd)
		if errors.Is(err, nats.ErrNoResponders) {
			// The leader we knew is gone: let raftstore find the next.
			return fmt.Errorf("%w: %s does not answer", raftstore.ErrNotLeader, leader)
		}
		if err != nil {
			return fmt.Errorf("forwarding to %s: %w", leader, err)
		}
		switch s := string(resp.Data); {
		case s == "ok":
			return nil
		case s == "not-leader":
			return fmt.Errorf("%w: %s", raftstore.ErrNotLeader, leader)
		default:
			return errors.New(strings.TrimPrefix(s, "error: "))
		}
	}
}

// clusterPeers returns the raft peers: every node at its raft port.
func clusterPeers(cfg *config.Config) []raftstore.Peer {
	var out []raftstore.Peer
	for _, p := range cfg.Cluster.Peers {
		out = append(out, raftstore.Peer{ID: p, Addr: net.JoinHostPort(p, strconv.Itoa(cfg.Cluster.RaftPort))})
	}
	return out
}

// natsRoutes returns the route URLs of the other nodes.
func natsRoutes(cfg *config.Config) []string {
	var out []string
	for _, p := range cfg.Cluster.Peers {
		if p != cfg.Cluster.Advertise {
			out = append(out, net.JoinHostPort(p, strconv.Itoa(cfg.Cluster.NATSPort)))
		}
	}
	return out
}

// clusterCredentials loads the cluster's mutual TLS material, from the
// secret or the TLS files, nil for a single node or an insecure cluster.
// Its Config secures the NATS routes and raft alike; its Run re-reads the
// files so that a rotation needs no restart.
func clusterCredentials(cfg *config.Config, log *slog.Logger) (*clustercred.Source, error) {
	cl := cfg.Cluster
	if !cfg.Clustered() {
		return nil, nil
	}
	switch {
	case cl.Secret != "":
		m, err := clustercred.FromSecrets([][]byte{[]byte(cl.Secret)}, cl.Advertise, time.Now())
		if err != nil {
			return nil, fmt.Errorf("cluster.secret: %w", err)
		}
		log.Info("cluster ports secured with mutual TLS from cluster.secret", "material", m.Describe)
		return clustercred.Static(m), nil
	case cl.SecretFile != "":
		return clustercred.WatchSecretFile(cl.SecretFile, cl.Advertise, log)
	case cl.HasTLS():
		return clustercred.WatchPEMFiles(cl.TLS.CAFile, cl.TLS.CertFile, cl.TLS.KeyFile, log)
	}
	log.Warn("cluster.insecure: the cluster ports accept anyone who reaches them: they can join the NATS cluster, read and write the queue, and speak raft",
		"nats_routes", net.JoinHostPort(cl.Bind, strconv.Itoa(cl.NATSPort)), "raft", net.JoinHostPort(cl.Bind, strconv.Itoa(cl.RaftPort)))
	return nil, nil
}

// clusterTLS is the TLS configuration of the cluster ports, nil without
// credentials.
func clusterTLS(src *clustercred.Source) *tls.Config {
	if src == nil {
		return nil
	}
	return src.Config()
}

// reconcileMembership keeps the control plane's membership in line with
// cluster.peers, on the leader: that is how a deployment scales (the peer
// list only seeds the first bootstrap).
func reconcileMembership(ctx context.Context, rs *raftstore.Store, cfg *config.Config, log *slog.Logger) {
	t := time.NewTicker(15 * time.Second)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		if err := rs.Reconcile(clusterPeers(cfg), 2*time.Minute); err != nil {
			log.Warn("updating the cluster membership", "err", err)
		}
	}
}
