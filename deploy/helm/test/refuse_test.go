package test

import (
	"strings"
	"testing"

	"helm.sh/helm/v3/pkg/chart/loader"
	"helm.sh/helm/v3/pkg/chartutil"
)

// TestRefuse: values that would break the cluster or lose mail do not
// render (values.schema.json or a template's fail).
func TestRefuse(t *testing.T) {
	ch, err := loader.Load(chartDir)
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		name, values, want string
	}{
		{"even replicas", "replicas: 2", "replicas"},
		{"four replicas", "replicas: 4", "replicas"},
		{"grace too short", "terminationGracePeriodSeconds: 30", "terminationGracePeriodSeconds"},
		{"tls without secret", "tls: {enabled: true}", "existingSecret"},
		{"chart-owned listen", "config: {smtp: {domains: [a.test], listen: '0.0.0.0:25'}}", "listen"},
		{"chart-owned cluster", "config: {smtp: {domains: [a.test]}, cluster: {peers: [a, b, c]}}", "cluster"},
		{"chart-owned queue.replicas", "config: {smtp: {domains: [a.test]}, queue: {replicas: 1}}", "replicas"},
		{"no domains", "config: {smtp: {domains: []}}", "domains"},
		{"short admin token", "adminToken: {value: short}", "value"},
		{"typo at the top", "replica: 3", "replica"},
		{"traffic policy typo", "smtpService: {externalTrafficPolicy: local}", "externalTrafficPolicy"},
		{"admin exposed", "adminService: {type: LoadBalancer}", "type"},
		{"cluster secret and TLS", "clusterSecret: {existingSecret: s}\nclusterTLS: {existingSecret: t}", "not both"},
		{"cluster secret and cert-manager", "clusterSecret: {existingSecret: s}\nclusterTLS: {certManager: {enabled: true, issuerRef: {name: ca}}}", "not both"},
		{"cluster TLS twice", "clusterTLS: {existingSecret: t, certManager: {enabled: true, issuerRef: {name: ca}}}", "clusterTLS"},
		{"cluster cert-manager without issuer", "clusterTLS: {certManager: {enabled: true}}", "issuerRef.name"},
		{"insecure with a secret", "clusterInsecure: true\nclusterSecret: {existingSecret: s}", "clusterInsecure"},
		{"insecure with TLS", "clusterInsecure: true\nclusterTLS: {existingSecret: t}", "clusterInsecure"},
		{"insecure as a string", "clusterInsecure: 'yes'", "clusterInsecure"},
		{"cluster secret key typo", "clusterSecret: {existingSecretkey: k}", "existingSecretkey"},
		{"admin TLS twice", "adminTLS: {existingSecret: t, certManager: {enabled: true, issuerRef: {name: ca}}}", "adminTLS"},
		{"admin cert-manager without issuer", "adminTLS: {certManager: {enabled: true}}", "issuerRef.name"},
		{"read token not enabled", "adminReadToken: {existingSecret: ro}", "adminReadToken.enabled"},
		{"short read token", "adminReadToken: {enabled: true, value: short}", "value"},
		{"read token same as admin token", "adminToken: {value: 0123456789abcdef}\nadminReadToken: {enabled: true, value: 0123456789abcdef}", "differ"},
		{"network policy peer empty", "networkPolicy: {admin: {from: [{}]}}", "from"},
	} {
		t.Run(c.name, func(t *testing.T) {
			vals, err := chartutil.ReadValues([]byte(c.values))
			if err != nil {
				t.Fatal(err)
			}
			_, err = render(t, ch, vals, "mxq", "mail")
			if err == nil {
				t.Fatalf("rendered %q", c.values)
			}
			if !strings.Contains(err.Error(), c.want) {
				t.Errorf("error does not name %q: %v", c.want, err)
			}
			t.Logf("refused: %v", firstLine(err.Error()))
		})
	}
}

func firstLine(s string) string {
	s, _, _ = strings.Cut(strings.TrimSpace(s), "\n")
	return s
}
