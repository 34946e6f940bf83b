package test

import (
	"fmt"
	"maps"
	"path/filepath"
	"reflect"
	"regexp"
	"slices"
	"testing"

	"helm.sh/helm/v3/pkg/chart"
	"helm.sh/helm/v3/pkg/chart/loader"
	"helm.sh/helm/v3/pkg/chartutil"
	"helm.sh/helm/v3/pkg/engine"
	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/dynamic"
	dynfake "k8s.io/client-go/dynamic/fake"
	"sigs.k8s.io/yaml"
)

// rendered is one release rendered from a values file or inline values,
// with its mxq.yaml as a map.
type rendered struct {
	*release
	cfg     map[string]any
	volumes map[string]corev1.Volume
	mounts  map[string]corev1.VolumeMount // by path
}

func renderValues(t *testing.T, vals map[string]any, name, ns string) *rendered {
	t.Helper()
	ch, err := loader.Load(chartDir)
	if err != nil {
		t.Fatal(err)
	}
	files, err := render(t, ch, vals, name, ns)
	if err != nil {
		t.Fatalf("rendering: %v", err)
	}
	return decodeRendered(t, ch, files, vals, name, ns)
}

func decodeRendered(t *testing.T, ch *chart.Chart, files map[string]string, vals map[string]any, name, ns string) *rendered {
	t.Helper()
	r := decodeRelease(t, files, name, ns, vals)
	merged, err := chartutil.CoalesceValues(ch, vals)
	if err != nil {
		t.Fatal(err)
	}
	r.vals = merged
	out := &rendered{release: r, volumes: map[string]corev1.Volume{}, mounts: map[string]corev1.VolumeMount{}}
	cm := r.configMaps[r.sts.Name+"-config"]
	if cm == nil {
		t.Fatalf("no ConfigMap %s-config", r.sts.Name)
	}
	if err := yaml.Unmarshal([]byte(cm.Data["mxq.yaml"]), &out.cfg); err != nil {
		t.Fatal(err)
	}
	for _, v := range r.sts.Spec.Template.Spec.Volumes {
		out.volumes[v.Name] = v
	}
	for _, m := range r.sts.Spec.Template.Spec.Containers[0].VolumeMounts {
		out.mounts[m.MountPath] = m
	}
	return out
}

func renderFile(t *testing.T, file, name, ns string) *rendered {
	t.Helper()
	return renderValues(t, readValues(t, file), name, ns)
}

func renderYAML(t *testing.T, values, name, ns string) *rendered {
	t.Helper()
	v, err := chartutil.ReadValues([]byte(values))
	if err != nil {
		t.Fatal(err)
	}
	return renderValues(t, v.AsMap(), name, ns)
}

// secretVolume returns the Secret volume mounted at path, failing when
// there is none or it is writable or mounted by subPath (the kubelet does
// not update subPath mounts: a rotation would need a restart).
func (r *rendered) secretVolume(t *testing.T, path string) *corev1.SecretVolumeSource {
	t.Helper()
	m, ok := r.mounts[path]
	if !ok {
		t.Errorf("nothing mounted at %s", path)
		return nil
	}
	if !m.ReadOnly || m.SubPath != "" {
		t.Errorf("%s: readOnly %v subPath %q, want a read-only mount of the whole volume", path, m.ReadOnly, m.SubPath)
	}
	v := r.volumes[m.Name]
	if v.Secret == nil {
		t.Errorf("%s is not a Secret volume: %+v", path, v.VolumeSource)
	}
	return v.Secret
}

func items(s *corev1.SecretVolumeSource) map[string]string {
	out := map[string]string{}
	if s != nil {
		for _, it := range s.Items {
			out[it.Key] = it.Path
		}
	}
	return out
}

var alnum48 = regexp.MustCompile(`^[A-Za-z0-9]{48}$`)

// TestClusterCredentials: what each way of authenticating the cluster
// renders: the Secret or Certificate, its mount, and the config keys.
func TestClusterCredentials(t *testing.T) {
	tlsKeys := map[string]string{"ca.crt": "ca.crt", "tls.crt": "tls.crt", "tls.key": "tls.key"}
	tlsCfg := map[string]any{"ca_file": "/etc/mxq/cluster-tls/ca.crt", "cert_file": "/etc/mxq/cluster-tls/tls.crt", "key_file": "/etc/mxq/cluster-tls/tls.key"}
	for _, c := range []struct {
		name, file, values, release, ns string
		auth                            string // secret, tls, insecure or "" (nothing)
		secretName, secretKey           string
		generated                       bool
	}{
		{name: "default: a generated secret", file: "defaults.yaml", release: "mxq", ns: "mail",
			auth: "secret", secretName: "mxq-cluster-secret", secretKey: "secret", generated: true},
		{name: "five replicas: a generated secret, not insecure", file: "five-replicas.yaml", release: "mxq", ns: "mail",
			auth: "secret", secretName: "mxq-cluster-secret", secretKey: "secret", generated: true},
		{name: "existing secret", file: "cluster-existing-secret.yaml", release: "mxq", ns: "mail",
			auth: "secret", secretName: "mail-cluster", secretKey: "shared-secret"},
		{name: "cert-manager", file: "cert-manager.yaml", release: "mxq", ns: "mail",
			auth: "tls", secretName: "mxq-cluster-tls"},
		{name: "existing TLS secret", file: "tls-existing-secrets.yaml", release: "mx", ns: "edge",
			auth: "tls", secretName: "mxq-cluster-mtls"},
		{name: "insecure when asked", file: "cluster-insecure.yaml", release: "mxq", ns: "lab", auth: "insecure"},
		{name: "single node", file: "single-replica.yaml", release: "dev", ns: "default"},
		{name: "single node, cert-manager asked", release: "dev", ns: "default",
			values: "replicas: 1\nclusterTLS: {certManager: {enabled: true, issuerRef: {name: ca}}}"},
		{name: "single node, insecure asked", release: "dev", ns: "default", values: "replicas: 1\nclusterInsecure: true"},
	} {
		t.Run(c.name, func(t *testing.T) {
			var r *rendered
			if c.file != "" {
				r = renderFile(t, c.file, c.release, c.ns)
			} else {
				r = renderYAML(t, c.values, c.release, c.ns)
			}
			cl, _ := r.cfg["cluster"].(map[string]any)
			wantSecretFile, wantTLS, wantInsecure := any(nil), any(nil), any(nil)
			switch c.auth {
			case "secret":
				wantSecretFile = "/etc/mxq/cluster/secret"
			case "tls":
				wantTLS = tlsCfg
			case "insecure":
				wantInsecure = true
			}
			if got := cl["secret_file"]; got != wantSecretFile {
				t.Errorf("cluster.secret_file %v, want %v", got, wantSecretFile)
			}
			if got := cl["tls"]; !reflect.DeepEqual(got, wantTLS) {
				t.Errorf("cluster.tls %v, want %v", got, wantTLS)
			}
			if got := cl["insecure"]; got != wantInsecure {
				t.Errorf("cluster.insecure %v, want %v", got, wantInsecure)
			}

			// The mount, and nothing of the other kinds.
			switch c.auth {
			case "secret":
				s := r.secretVolume(t, "/etc/mxq/cluster")
				if s != nil && (s.SecretName != c.secretName || !maps.Equal(items(s), map[string]string{c.secretKey: "secret"})) {
					t.Errorf("cluster secret volume %s %v, want %s with %s -> secret", s.SecretName, items(s), c.secretName, c.secretKey)
				}
			case "tls":
				s := r.secretVolume(t, "/etc/mxq/cluster-tls")
				if s != nil && (s.SecretName != c.secretName || !maps.Equal(items(s), tlsKeys)) {
					t.Errorf("cluster TLS volume %s %v, want %s with %v", s.SecretName, items(s), c.secretName, tlsKeys)
				}
			}
			if _, ok := r.mounts["/etc/mxq/cluster"]; ok && c.auth != "secret" {
				t.Errorf("cluster secret mounted with %q", c.auth)
			}
			if _, ok := r.mounts["/etc/mxq/cluster-tls"]; ok && c.auth != "tls" {
				t.Errorf("cluster TLS mounted with %q", c.auth)
			}

			// The generated Secret: 48 random characters, one line.
			gen := r.secrets[r.sts.Name+"-cluster-secret"]
			if c.generated != (gen != nil) {
				t.Fatalf("generated cluster Secret rendered: %v, want %v", gen != nil, c.generated)
			}
			if gen != nil {
				if v := string(gen.Data["secret"]); !alnum48.MatchString(v) {
					t.Errorf("generated cluster secret %q: want 48 random letters and digits", v)
				}
			}

			// The Certificate: every peer's name, both ways.
			cert := r.certs[r.sts.Name+"-cluster"]
			wantCert := c.auth == "tls" && c.file == "cert-manager.yaml"
			if wantCert != (cert != nil) {
				t.Fatalf("cluster Certificate rendered: %v, want %v", cert != nil, wantCert)
			}
			if cert == nil {
				return
			}
			replicas := toInt(t, r.vals["replicas"])
			var want []string
			for i := range replicas {
				want = append(want, fmt.Sprintf("%s-%d.%s-peers.%s.svc.cluster.local", r.sts.Name, i, r.sts.Name, c.ns))
			}
			want = append(want, fmt.Sprintf("*.%s-peers.%s.svc.cluster.local", r.sts.Name, c.ns))
			if !slices.Equal(cert.Spec.DNSNames, want) {
				t.Errorf("Certificate dnsNames %q, want %q", cert.Spec.DNSNames, want)
			}
			for _, u := range []string{"server auth", "client auth"} {
				if !slices.Contains(cert.Spec.Usages, u) {
					t.Errorf("Certificate usages %q lack %q: mutual TLS needs both", cert.Spec.Usages, u)
				}
			}
			checkUsages(t, cert)
			if ir := cert.Spec.IssuerRef; ir.Name != "mail-ca" || ir.Kind != "ClusterIssuer" || ir.Group != "cert-manager.io" {
				t.Errorf("Certificate issuerRef %+v, want mail-ca ClusterIssuer cert-manager.io", ir)
			}
			if cert.Spec.SecretName != c.secretName || cert.Spec.Duration != "2160h" || cert.Spec.RenewBefore != "720h" {
				t.Errorf("Certificate secretName %q duration %q renewBefore %q", cert.Spec.SecretName, cert.Spec.Duration, cert.Spec.RenewBefore)
			}
			if cert.Metadata.Namespace != c.ns {
				t.Errorf("Certificate in namespace %q", cert.Metadata.Namespace)
			}
		})
	}
}

// checkUsages: only key usages cert-manager knows.
func checkUsages(t *testing.T, c *certificate) {
	t.Helper()
	known := []string{"signing", "digital signature", "content commitment", "key encipherment", "key agreement",
		"data encipherment", "cert sign", "crl sign", "encipher only", "decipher only", "any", "server auth",
		"client auth", "code signing", "email protection", "s/mime", "ipsec end system", "ipsec tunnel",
		"ipsec user", "timestamping", "ocsp signing", "microsoft sgc", "netscape sgc"}
	for _, u := range c.Spec.Usages {
		if !slices.Contains(known, u) {
			t.Errorf("Certificate %s: usage %q is not one cert-manager knows", c.Metadata.Name, u)
		}
	}
}

// TestNetworkPolicy: the exact rules for the defaults and the variants.
func TestNetworkPolicy(t *testing.T) {
	tcp, udp := corev1.ProtocolTCP, corev1.ProtocolUDP
	port53 := func(proto *corev1.Protocol) networkingv1.NetworkPolicyPort {
		p := port(53)
		p.Protocol = proto
		return p
	}
	own := func(release string) networkingv1.NetworkPolicyPeer {
		return networkingv1.NetworkPolicyPeer{PodSelector: &metav1.LabelSelector{MatchLabels: map[string]string{
			"app.kubernetes.io/name": "mxq", "app.kubernetes.io/instance": release, "app.kubernetes.io/component": "mxq"}}}
	}
	testPod := func(release string) networkingv1.NetworkPolicyPeer {
		return networkingv1.NetworkPolicyPeer{PodSelector: &metav1.LabelSelector{MatchLabels: map[string]string{
			"app.kubernetes.io/name": "mxq", "app.kubernetes.io/instance": release, "app.kubernetes.io/component": "test"}}}
	}
	namespace := func(ns string) networkingv1.NetworkPolicyPeer {
		return networkingv1.NetworkPolicyPeer{NamespaceSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"kubernetes.io/metadata.name": ns}}}
	}
	everyPod := networkingv1.NetworkPolicyPeer{PodSelector: &metav1.LabelSelector{}}
	smtp := networkingv1.NetworkPolicyIngressRule{Ports: []networkingv1.NetworkPolicyPort{port(2525)}}
	admin := func(from ...networkingv1.NetworkPolicyPeer) networkingv1.NetworkPolicyIngressRule {
		return networkingv1.NetworkPolicyIngressRule{From: from, Ports: []networkingv1.NetworkPolicyPort{port(8025)}}
	}
	clusterPorts := []networkingv1.NetworkPolicyPort{port(6222), port(7947)}
	cluster := func(release string) networkingv1.NetworkPolicyIngressRule {
		return networkingv1.NetworkPolicyIngressRule{From: []networkingv1.NetworkPolicyPeer{own(release)}, Ports: clusterPorts}
	}
	ingressOnly := []networkingv1.PolicyType{networkingv1.PolicyTypeIngress}

	for _, c := range []struct {
		name, file, values, release, ns string
		want                            *networkingv1.NetworkPolicySpec // nil: no NetworkPolicy
	}{
		{name: "defaults", file: "defaults.yaml", release: "mxq", ns: "mail", want: &networkingv1.NetworkPolicySpec{
			PodSelector: *own("mxq").PodSelector,
			PolicyTypes: ingressOnly,
			Ingress:     []networkingv1.NetworkPolicyIngressRule{smtp, admin(everyPod, testPod("mxq")), cluster("mxq")},
		}},
		{name: "admin from one namespace, kubelet CIDRs, egress", file: "networkpolicy-custom.yaml", release: "mx", ns: "mail", want: &networkingv1.NetworkPolicySpec{
			PodSelector: *own("mx").PodSelector,
			PolicyTypes: []networkingv1.PolicyType{networkingv1.PolicyTypeIngress, networkingv1.PolicyTypeEgress},
			Ingress: []networkingv1.NetworkPolicyIngressRule{smtp,
				admin(namespace("mail-ops"), testPod("mx"), networkingv1.NetworkPolicyPeer{IPBlock: &networkingv1.IPBlock{CIDR: "10.0.0.0/16"}}),
				cluster("mx")},
			Egress: []networkingv1.NetworkPolicyEgressRule{
				{To: []networkingv1.NetworkPolicyPeer{own("mx")}, Ports: clusterPorts},
				{To: []networkingv1.NetworkPolicyPeer{{NamespaceSelector: &metav1.LabelSelector{},
					PodSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"k8s-app": "kube-dns"}}}},
					Ports: []networkingv1.NetworkPolicyPort{port53(&udp), port53(&tcp)}},
				{To: []networkingv1.NetworkPolicyPeer{namespace("mail")}, Ports: []networkingv1.NetworkPolicyPort{port(24)}},
			},
		}},
		{name: "single node: no cluster ports", file: "single-replica.yaml", release: "dev", ns: "default", want: &networkingv1.NetworkPolicySpec{
			PodSelector: *own("dev").PodSelector,
			PolicyTypes: ingressOnly,
			Ingress:     []networkingv1.NetworkPolicyIngressRule{smtp, admin(everyPod)},
		}},
		// A rule without peers would admit everybody: no peer, no rule.
		{name: "admin from nobody", values: "networkPolicy: {admin: {from: []}}\nhelmTest: {enabled: false}", release: "mxq", ns: "mail",
			want: &networkingv1.NetworkPolicySpec{
				PodSelector: *own("mxq").PodSelector,
				PolicyTypes: ingressOnly,
				Ingress:     []networkingv1.NetworkPolicyIngressRule{smtp, cluster("mxq")},
			}},
		{name: "disabled", values: "networkPolicy: {enabled: false}", release: "mxq", ns: "mail"},
	} {
		t.Run(c.name, func(t *testing.T) {
			var r *rendered
			if c.file != "" {
				r = renderFile(t, c.file, c.release, c.ns)
			} else {
				r = renderYAML(t, c.values, c.release, c.ns)
			}
			if c.want == nil {
				if len(r.netpols) != 0 {
					t.Fatalf("%d NetworkPolicies rendered, want none", len(r.netpols))
				}
				return
			}
			if len(r.netpols) != 1 {
				t.Fatalf("%d NetworkPolicies rendered, want 1", len(r.netpols))
			}
			got := r.netpols[0].Spec
			if !reflect.DeepEqual(got, *c.want) {
				gy, _ := yaml.Marshal(got)
				wy, _ := yaml.Marshal(c.want)
				t.Errorf("NetworkPolicy spec:\n%s\nwant:\n%s", gy, wy)
			}
		})
	}
}

// TestAdminTLS: HTTPS for the admin API from a Secret or cert-manager:
// probes, mounts, config, the CA for the helm test and Prometheus; and the
// read-only token.
func TestAdminTLS(t *testing.T) {
	t.Run("plain HTTP by default", func(t *testing.T) {
		r := renderFile(t, "defaults.yaml", "mxq", "mail")
		if tls := get(r.cfg, "admin", "tls"); tls != nil {
			t.Errorf("admin.tls %v without adminTLS", tls)
		}
		if rt := get(r.cfg, "admin", "read_token_file"); rt != nil {
			t.Errorf("admin.read_token_file %v without adminReadToken", rt)
		}
		for _, p := range probes(r) {
			if p.HTTPGet.Scheme != corev1.URISchemeHTTP {
				t.Errorf("probe scheme %q, want HTTP", p.HTTPGet.Scheme)
			}
		}
	})
	for _, c := range []struct {
		name, file, release, ns string
		tlsSecret               string
		readSecret, readKey     string
		certManager             bool
	}{
		{"existing secrets", "tls-existing-secrets.yaml", "mx", "edge", "mxq-admin-https", "mail-ops", "mxq-read-token", false},
		{"cert-manager", "cert-manager.yaml", "mxq", "mail", "mxq-admin-tls", "mxq-admin-read-token", "token", true},
	} {
		t.Run(c.name, func(t *testing.T) {
			r := renderFile(t, c.file, c.release, c.ns)
			for _, p := range probes(r) {
				if p.HTTPGet.Scheme != corev1.URISchemeHTTPS {
					t.Errorf("probe %s scheme %q, want HTTPS", p.HTTPGet.Path, p.HTTPGet.Scheme)
				}
			}
			wantTLS := map[string]any{"cert_file": "/etc/mxq/admin-tls/tls.crt", "key_file": "/etc/mxq/admin-tls/tls.key"}
			if got := get(r.cfg, "admin", "tls"); !reflect.DeepEqual(got, wantTLS) {
				t.Errorf("admin.tls %v, want %v", got, wantTLS)
			}
			if s := r.secretVolume(t, "/etc/mxq/admin-tls"); s != nil && s.SecretName != c.tlsSecret {
				t.Errorf("admin TLS volume from %s, want %s", s.SecretName, c.tlsSecret)
			}
			// The read-only token: mounted, in the config, used by the
			// helm test (a status needs no more).
			if got := get(r.cfg, "admin", "read_token_file"); got != "/etc/mxq/admin-read/token" {
				t.Errorf("admin.read_token_file %v", got)
			}
			if s := r.secretVolume(t, "/etc/mxq/admin-read"); s != nil && (s.SecretName != c.readSecret || !maps.Equal(items(s), map[string]string{c.readKey: "token"})) {
				t.Errorf("read token volume %s %v, want %s with %s -> token", s.SecretName, items(s), c.readSecret, c.readKey)
			}
			if len(r.testPods) != 1 {
				t.Fatalf("%d test pods", len(r.testPods))
			}
			tp := r.testPods[0]
			var caVolume string
			for _, v := range tp.Spec.Volumes {
				if v.Secret != nil {
					caVolume = v.Secret.SecretName
				}
			}
			if caVolume != c.tlsSecret {
				t.Errorf("test pod trusts the CA of Secret %q, want %q", caVolume, c.tlsSecret)
			}
			for _, ctr := range tp.Spec.Containers {
				for _, e := range ctr.Env {
					if e.Name == "MXQ_ADMIN_TOKEN" && (e.ValueFrom.SecretKeyRef.Name != c.readSecret || e.ValueFrom.SecretKeyRef.Key != c.readKey) {
						t.Errorf("test container %s: token from %s/%s, want the read-only token %s/%s", ctr.Name,
							e.ValueFrom.SecretKeyRef.Name, e.ValueFrom.SecretKeyRef.Key, c.readSecret, c.readKey)
					}
				}
			}

			cert := r.certs[r.sts.Name+"-admin"]
			if c.certManager != (cert != nil) {
				t.Fatalf("admin Certificate rendered: %v, want %v", cert != nil, c.certManager)
			}
			if cert == nil {
				return
			}
			checkUsages(t, cert)
			if cert.Spec.SecretName != c.tlsSecret || !slices.Contains(cert.Spec.Usages, "server auth") {
				t.Errorf("admin Certificate secretName %q usages %q", cert.Spec.SecretName, cert.Spec.Usages)
			}
			// Every name the CLI, the helm test and Prometheus dial.
			names := []string{"localhost", "mxq-admin", "mxq-admin.mail.svc", "*.mxq-peers.mail.svc.cluster.local"}
			for _, ctr := range tp.Spec.Containers {
				names = append(names, hostOf(t, ctr.Args[len(ctr.Args)-1]))
			}
			for _, n := range names {
				if !slices.Contains(cert.Spec.DNSNames, n) {
					t.Errorf("admin Certificate dnsNames %q lack %q", cert.Spec.DNSNames, n)
				}
			}
			if !slices.Contains(cert.Spec.IPAddresses, "127.0.0.1") {
				t.Errorf("admin Certificate ipAddresses %q lack 127.0.0.1 (kubectl port-forward)", cert.Spec.IPAddresses)
			}
			// Prometheus checks the Service's name against the CA.
			if len(r.monitors) != 1 {
				t.Fatalf("%d ServiceMonitors", len(r.monitors))
			}
			eps, _, _ := unstructured.NestedSlice(r.monitors[0].Object, "spec", "endpoints")
			ep := eps[0].(map[string]any)
			ca, _, _ := unstructured.NestedString(ep, "tlsConfig", "ca", "secret", "name")
			server, _, _ := unstructured.NestedString(ep, "tlsConfig", "serverName")
			if ep["scheme"] != "https" || ca != c.tlsSecret || !slices.Contains(cert.Spec.DNSNames, server) {
				t.Errorf("ServiceMonitor endpoint scheme %v CA %q serverName %q: want https, %s, a name of the certificate", ep["scheme"], ca, server, c.tlsSecret)
			}
			// The generated read-only token differs from the admin token.
			read, adm := r.secrets["mxq-admin-read-token"], r.secrets["mxq-admin-token"]
			if read == nil || adm == nil || len(read.Data["token"]) < 16 || string(read.Data["token"]) == string(adm.Data["token"]) {
				t.Errorf("generated tokens: read %v admin %v", read, adm)
			}
		})
	}
}

func probes(r *rendered) []*corev1.Probe {
	c := r.sts.Spec.Template.Spec.Containers[0]
	return []*corev1.Probe{c.StartupProbe, c.LivenessProbe, c.ReadinessProbe}
}

func hostOf(t *testing.T, url string) string {
	t.Helper()
	m := regexp.MustCompile(`^https?://([^:/]+)`).FindStringSubmatch(url)
	if m == nil {
		t.Fatalf("not a URL: %q", url)
	}
	return m[1]
}

// secretsCluster answers helm's lookup from a fake API server holding
// Secrets.
type secretsCluster struct{ client *dynfake.FakeDynamicClient }

func newSecretsCluster(t *testing.T, secrets ...*corev1.Secret) secretsCluster {
	t.Helper()
	scheme := runtime.NewScheme()
	if err := corev1.AddToScheme(scheme); err != nil {
		t.Fatal(err)
	}
	objs := make([]runtime.Object, len(secrets))
	for i, s := range secrets {
		s = s.DeepCopy()
		s.TypeMeta = metav1.TypeMeta{APIVersion: "v1", Kind: "Secret"}
		objs[i] = s
	}
	return secretsCluster{dynfake.NewSimpleDynamicClient(scheme, objs...)}
}

func (c secretsCluster) GetClientFor(apiVersion, kind string) (dynamic.NamespaceableResourceInterface, bool, error) {
	if apiVersion != "v1" || kind != "Secret" {
		return nil, false, fmt.Errorf("lookup of %s %s: the chart looks up Secrets only", apiVersion, kind)
	}
	return c.client.Resource(schema.GroupVersionResource{Version: "v1", Resource: "secrets"}), true, nil
}

var _ engine.ClientProvider = secretsCluster{}

// TestSecretsKeptAcrossUpgrade: the generated cluster secret and tokens
// are looked up and kept by `helm upgrade`, whole (a rotation's second
// line too), and only generated anew when there is none.
func TestSecretsKeptAcrossUpgrade(t *testing.T) {
	ch, err := loader.Load(chartDir)
	if err != nil {
		t.Fatal(err)
	}
	vals := map[string]any{"adminReadToken": map[string]any{"enabled": true}}
	renderIn := func(cluster secretsCluster, install bool) map[string]*corev1.Secret {
		t.Helper()
		rv, err := chartutil.ToRenderValues(ch, vals, chartutil.ReleaseOptions{Name: "mxq", Namespace: "mail", Revision: 2, IsInstall: install, IsUpgrade: !install}, chartutil.DefaultCapabilities)
		if err != nil {
			t.Fatal(err)
		}
		files, err := engine.RenderWithClientProvider(ch, rv, cluster)
		if err != nil {
			t.Fatalf("rendering: %v", err)
		}
		return decodeRendered(t, ch, files, vals, "mxq", "mail").secrets
	}
	names := []string{"mxq-cluster-secret", "mxq-admin-token", "mxq-admin-read-token"}
	installed := renderIn(newSecretsCluster(t), true)
	var stored []*corev1.Secret
	for _, n := range names {
		if installed[n] == nil {
			t.Fatalf("install rendered no Secret %s", n)
		}
		stored = append(stored, installed[n])
	}
	upgraded := renderIn(newSecretsCluster(t, stored...), false)
	for _, n := range names {
		if !maps.EqualFunc(upgraded[n].Data, installed[n].Data, func(a, b []byte) bool { return string(a) == string(b) }) {
			t.Errorf("upgrade changed Secret %s: %q -> %q", n, installed[n].Data, upgraded[n].Data)
		}
	}
	// An operator rotating: the new secret first, the old one after it.
	rotating := installed["mxq-cluster-secret"].DeepCopy()
	rotating.Data["secret"] = []byte("the-new-secret-of-at-least-thirty-two-bytes\n" + string(installed["mxq-cluster-secret"].Data["secret"]))
	after := renderIn(newSecretsCluster(t, rotating), false)
	if got := string(after["mxq-cluster-secret"].Data["secret"]); got != string(rotating.Data["secret"]) {
		t.Errorf("upgrade during a rotation rewrote the cluster secret to %q, want %q", got, rotating.Data["secret"])
	}
	// Without a stored Secret a new one is made: what kept it above is the
	// lookup, not chance.
	fresh := renderIn(newSecretsCluster(t), true)
	if string(fresh["mxq-cluster-secret"].Data["secret"]) == string(installed["mxq-cluster-secret"].Data["secret"]) {
		t.Errorf("two installs generated the same cluster secret")
	}
}

// TestConfigKnowsChartKeys: every key the chart writes into mxq.yaml's
// own sections (admin, cluster, smtp.tls) is one this mxq's config knows.
// Before the cluster credentials are merged, cluster.secret_file and
// cluster.insecure are unknown here, and this test names them.
func TestConfigKnowsChartKeys(t *testing.T) {
	for _, c := range cases {
		t.Run(c.file, func(t *testing.T) {
			r := renderFile(t, c.file, c.release, c.namespace)
			if unknown := unknownKeys(r.cfg); len(unknown) > 0 {
				t.Errorf("the chart writes keys config.Config does not have: %q", unknown)
			}
		})
	}
}

// The values files are all in cases: a file added to testdata and not
// rendered would be tested by nothing.
func TestEveryValuesFileRendered(t *testing.T) {
	files, err := filepath.Glob("testdata/*.yaml")
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range files {
		if !slices.ContainsFunc(cases, func(c struct{ file, release, namespace string }) bool { return c.file == filepath.Base(f) }) {
			t.Errorf("%s is not in cases", f)
		}
	}
}
