package test

import (
	"path/filepath"
	"slices"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/util/intstr"
)

// checkClusterAuth: a cluster has exactly one kind of credentials for its
// routes and raft, insecure only when the values ask for it; a single
// node has none, and no Secret or Certificate for them.
func checkClusterAuth(t *testing.T, r *release, cfgMap map[string]any, replicas int) {
	t.Helper()
	cl, _ := cfgMap["cluster"].(map[string]any)
	var kinds []string
	if _, ok := cl["secret_file"]; ok {
		kinds = append(kinds, "secret_file")
	}
	if _, ok := cl["tls"]; ok {
		kinds = append(kinds, "tls")
	}
	if v, ok := cl["insecure"]; ok {
		if v != true {
			t.Errorf("cluster.insecure rendered as %v: only ever true, and only when asked", v)
		}
		kinds = append(kinds, "insecure")
		if get(r.vals, "clusterInsecure") != true {
			t.Errorf("cluster.insecure rendered without clusterInsecure: true in the values")
		}
	}
	switch {
	case replicas > 1 && len(kinds) != 1:
		t.Errorf("a cluster of %d with cluster credentials %v: want exactly one of secret_file, tls, insecure", replicas, kinds)
	case replicas == 1 && len(kinds) != 0:
		t.Errorf("a single node with cluster credentials %v: it has no cluster traffic", kinds)
	}
	if replicas == 1 {
		for name, s := range r.secrets {
			if s.Labels["app.kubernetes.io/component"] == "cluster" {
				t.Errorf("single node: cluster Secret %s rendered", name)
			}
		}
		for name := range r.certs {
			if strings.HasSuffix(name, "-cluster") {
				t.Errorf("single node: cluster Certificate %s rendered", name)
			}
		}
	}
}

// checkNetworkPolicy: when enabled, one policy for mxq's pods only: SMTP
// from anywhere, nothing else from anywhere, the cluster ports from mxq's
// own pods only.
func checkNetworkPolicy(t *testing.T, r *release, ports map[string]int32, podLabels labels.Set, replicas int) {
	t.Helper()
	if get(r.vals, "networkPolicy", "enabled") != true {
		if len(r.netpols) != 0 {
			t.Errorf("networkPolicy.enabled false, %d NetworkPolicies rendered", len(r.netpols))
		}
		return
	}
	if len(r.netpols) != 1 {
		t.Fatalf("%d NetworkPolicies, want 1", len(r.netpols))
	}
	np := r.netpols[0]
	sel, err := metav1.LabelSelectorAsSelector(&np.Spec.PodSelector)
	if err != nil || sel.Empty() || !sel.Matches(podLabels) {
		t.Errorf("NetworkPolicy podSelector %v does not select mxq's pods %v", np.Spec.PodSelector, podLabels)
	}
	for _, tp := range r.testPods {
		if sel.Matches(labels.Set(tp.Labels)) {
			t.Errorf("NetworkPolicy selects the test pod %s: it would stand for a peer", tp.Name)
		}
	}
	if !slices.Contains(np.Spec.PolicyTypes, networkingv1.PolicyTypeIngress) {
		t.Errorf("policyTypes %v without Ingress", np.Spec.PolicyTypes)
	}
	if egress := get(r.vals, "networkPolicy", "egress"); (egress != nil && len(egress.([]any)) > 0) != slices.Contains(np.Spec.PolicyTypes, networkingv1.PolicyTypeEgress) {
		t.Errorf("policyTypes %v, networkPolicy.egress %v: egress is restricted exactly when rules are given", np.Spec.PolicyTypes, egress)
	}
	open := map[int32]bool{}      // from anywhere
	fromPeers := map[int32]bool{} // only from mxq's pods
	for i, rule := range np.Spec.Ingress {
		if len(rule.Ports) == 0 {
			t.Errorf("ingress rule %d opens every port", i)
		}
		onlyPeers := len(rule.From) > 0
		for _, peer := range rule.From {
			if peer.IPBlock != nil || peer.NamespaceSelector != nil || peer.PodSelector == nil {
				onlyPeers = false
				continue
			}
			s, err := metav1.LabelSelectorAsSelector(peer.PodSelector)
			if err != nil || s.Empty() || !s.Matches(podLabels) {
				onlyPeers = false
			}
		}
		for _, p := range rule.Ports {
			if p.Protocol == nil || *p.Protocol != corev1.ProtocolTCP || p.Port == nil {
				t.Errorf("ingress rule %d: port %+v is not one TCP port", i, p)
				continue
			}
			n := resolvePort(t, "NetworkPolicy", *p.Port, ports)
			if len(rule.From) == 0 {
				open[n] = true
			}
			if onlyPeers {
				fromPeers[n] = true
			}
		}
	}
	if !open[ports["smtp"]] {
		t.Errorf("SMTP (%d) is not open to everyone: the MX would refuse mail", ports["smtp"])
	}
	for n := range open {
		if n != ports["smtp"] {
			t.Errorf("port %d is open to everyone; only SMTP may be", n)
		}
	}
	for _, name := range []string{"nats-route", "raft"} {
		if replicas > 1 && !fromPeers[ports[name]] {
			t.Errorf("%s port %d: no rule lets mxq's own pods in", name, ports[name])
		}
	}
	for i, rule := range np.Spec.Ingress {
		for _, p := range rule.Ports {
			if p.Port == nil {
				continue
			}
			n := resolvePort(t, "NetworkPolicy", *p.Port, ports)
			if (n == ports["nats-route"] || n == ports["raft"]) && !fromPeers[n] {
				t.Errorf("ingress rule %d lets others than mxq's pods reach cluster port %d", i, n)
			}
			if replicas == 1 && (n == ports["nats-route"] || n == ports["raft"]) {
				t.Errorf("single node: cluster port %d open", n)
			}
		}
	}
}

// checkTestPod: over HTTPS the CLI trusts the admin certificate's CA from
// a mounted Secret (MXQ_ADMIN_CA); over HTTP it is not given one.
func checkTestPod(t *testing.T, tp *corev1.Pod, adminTLS bool) {
	t.Helper()
	volumes := map[string]corev1.Volume{}
	for _, v := range tp.Spec.Volumes {
		volumes[v.Name] = v
	}
	for _, c := range tp.Spec.Containers {
		if len(c.Args) != 3 || c.Args[0] != "status" || c.Args[1] != "--server" {
			t.Errorf("test container %s: args %q, want status --server URL", c.Name, c.Args)
			continue
		}
		wantPrefix := "http://"
		if adminTLS {
			wantPrefix = "https://"
		}
		if !strings.HasPrefix(c.Args[2], wantPrefix) {
			t.Errorf("test container %s dials %s, want %s...", c.Name, c.Args[2], wantPrefix)
		}
		var ca, token *corev1.EnvVar
		for i := range c.Env {
			switch c.Env[i].Name {
			case "MXQ_ADMIN_CA":
				ca = &c.Env[i]
			case "MXQ_ADMIN_TOKEN":
				token = &c.Env[i]
			}
		}
		if token == nil || token.ValueFrom == nil || token.ValueFrom.SecretKeyRef == nil {
			t.Errorf("test container %s: MXQ_ADMIN_TOKEN not from a Secret", c.Name)
		}
		if !adminTLS {
			if ca != nil {
				t.Errorf("test container %s: MXQ_ADMIN_CA without admin TLS", c.Name)
			}
			continue
		}
		if ca == nil {
			t.Errorf("test container %s: HTTPS without MXQ_ADMIN_CA: the CLI would not trust the private CA", c.Name)
			continue
		}
		var mounted bool
		for _, m := range c.VolumeMounts {
			v := volumes[m.Name]
			if m.MountPath == filepath.Dir(ca.Value) && v.Secret != nil &&
				slices.ContainsFunc(v.Secret.Items, func(k corev1.KeyToPath) bool { return k.Key == "ca.crt" && k.Path == filepath.Base(ca.Value) }) {
				mounted = true
			}
		}
		if !mounted {
			t.Errorf("test container %s: MXQ_ADMIN_CA %s is not the ca.crt of a mounted Secret", c.Name, ca.Value)
		}
	}
}

// port is a TCP NetworkPolicyPort, for expected policies.
func port(n int) networkingv1.NetworkPolicyPort {
	tcp := corev1.ProtocolTCP
	p := intstr.FromInt32(int32(n))
	return networkingv1.NetworkPolicyPort{Protocol: &tcp, Port: &p}
}
