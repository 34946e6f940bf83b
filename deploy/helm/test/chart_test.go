// Package test validates the Helm chart in ../mxq without a cluster: helm's
// own linter, then every manifest rendered for each values file in testdata
// decoded strictly into the Kubernetes API types, then the invariants that
// keep mail safe (peers agree with replicas, probes hit real ports, one pod
// down at most, client IPs preserved, mxq accepts the rendered config).
//
// It is a module of its own so helm and k8s.io stay out of mxq's go.mod.
package test

import (
	"bytes"
	"cmp"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"helm.sh/helm/v3/pkg/chart"
	"helm.sh/helm/v3/pkg/chart/loader"
	"helm.sh/helm/v3/pkg/chartutil"
	"helm.sh/helm/v3/pkg/engine"
	"helm.sh/helm/v3/pkg/lint"
	"helm.sh/helm/v3/pkg/lint/support"
	"helm.sh/helm/v3/pkg/releaseutil"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	policyv1 "k8s.io/api/policy/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/util/intstr"
	"sigs.k8s.io/yaml"

	"github.com/mxq-dev/mxq/config"
)

const chartDir = "../mxq"

// cases are the values files, each rendered as a release.
var cases = []struct {
	file      string
	release   string
	namespace string
}{
	{"defaults.yaml", "mxq", "mail"},
	{"five-replicas.yaml", "mxq", "mail"},
	{"tls-existing-secrets.yaml", "mx", "edge"},
	{"loadbalancer-annotations.yaml", "inbound", "mail"},
	{"servicemonitor.yaml", "mxq", "monitoring-test"},
	{"single-replica.yaml", "dev", "default"},
	{"cluster-existing-secret.yaml", "mxq", "mail"},
	{"cert-manager.yaml", "mxq", "mail"},
	{"cluster-insecure.yaml", "mxq", "lab"},
	{"networkpolicy-custom.yaml", "mx", "mail"},
}

func readValues(t *testing.T, file string) map[string]any {
	t.Helper()
	v, err := chartutil.ReadValuesFile(filepath.Join("testdata", file))
	if err != nil {
		t.Fatal(err)
	}
	return v.AsMap()
}

// TestLint is `helm lint --strict` for every values file: errors fail,
// warnings are logged.
func TestLint(t *testing.T) {
	for _, c := range cases {
		t.Run(c.file, func(t *testing.T) {
			l := lint.All(chartDir, readValues(t, c.file), c.namespace, false)
			for _, m := range l.Messages {
				if m.Severity >= support.WarningSev {
					t.Errorf("helm lint: %s", m)
				} else {
					t.Logf("helm lint: %s", m)
				}
			}
		})
	}
}

// render is `helm template`: the chart's manifests, by template file, and
// NOTES.txt.
func render(t *testing.T, ch *chart.Chart, vals map[string]any, release, ns string) (map[string]string, error) {
	t.Helper()
	rv, err := chartutil.ToRenderValues(ch, vals, chartutil.ReleaseOptions{Name: release, Namespace: ns, Revision: 1, IsInstall: true}, chartutil.DefaultCapabilities)
	if err != nil {
		return nil, err
	}
	return engine.Render(ch, rv)
}

// release is a rendered chart, decoded.
type release struct {
	name, ns   string
	vals       map[string]any
	notes      string
	sts        *appsv1.StatefulSet
	services   map[string]*corev1.Service
	configMaps map[string]*corev1.ConfigMap
	secrets    map[string]*corev1.Secret
	pdb        *policyv1.PodDisruptionBudget
	testPods   []*corev1.Pod
	monitors   []*unstructured.Unstructured
	netpols    []*networkingv1.NetworkPolicy
	certs      map[string]*certificate
}

// certificate is a cert-manager.io/v1 Certificate, the fields the chart
// sets: decoded strictly, a misspelt field fails.
type certificate struct {
	APIVersion string `json:"apiVersion"`
	Kind       string `json:"kind"`
	Metadata   struct {
		Name      string            `json:"name"`
		Namespace string            `json:"namespace"`
		Labels    map[string]string `json:"labels"`
	} `json:"metadata"`
	Spec struct {
		SecretName  string   `json:"secretName"`
		DNSNames    []string `json:"dnsNames"`
		IPAddresses []string `json:"ipAddresses"`
		Usages      []string `json:"usages"`
		Duration    string   `json:"duration"`
		RenewBefore string   `json:"renewBefore"`
		PrivateKey  struct {
			Algorithm      string `json:"algorithm"`
			Size           int    `json:"size"`
			RotationPolicy string `json:"rotationPolicy"`
		} `json:"privateKey"`
		IssuerRef struct {
			Name  string `json:"name"`
			Kind  string `json:"kind"`
			Group string `json:"group"`
		} `json:"issuerRef"`
	} `json:"spec"`
}

// decodeStrict turns one YAML document into obj, refusing unknown fields
// and duplicate keys: a typo in a template is an error, not a field the API
// server silently drops.
func decodeStrict(doc []byte, obj any) error {
	j, err := yaml.YAMLToJSONStrict(doc)
	if err != nil {
		return err
	}
	dec := json.NewDecoder(bytes.NewReader(j))
	dec.DisallowUnknownFields()
	if err := dec.Decode(obj); err != nil {
		return err
	}
	if dec.More() {
		return fmt.Errorf("trailing data")
	}
	return nil
}

func decodeRelease(t *testing.T, files map[string]string, name, ns string, vals map[string]any) *release {
	t.Helper()
	r := &release{name: name, ns: ns, vals: vals,
		services: map[string]*corev1.Service{}, configMaps: map[string]*corev1.ConfigMap{}, secrets: map[string]*corev1.Secret{},
		certs: map[string]*certificate{}}
	paths := make([]string, 0, len(files))
	for p := range files {
		paths = append(paths, p)
	}
	sort.Strings(paths)
	for _, p := range paths {
		base := filepath.Base(p)
		if base == "NOTES.txt" {
			r.notes = files[p]
			continue
		}
		if strings.HasPrefix(base, "_") {
			continue
		}
		for _, doc := range releaseutil.SplitManifests(files[p]) {
			if strings.TrimSpace(doc) == "" {
				continue
			}
			var head struct {
				APIVersion string `json:"apiVersion"`
				Kind       string `json:"kind"`
				Metadata   struct {
					Name      string `json:"name"`
					Namespace string `json:"namespace"`
				} `json:"metadata"`
			}
			if err := yaml.Unmarshal([]byte(doc), &head); err != nil {
				t.Fatalf("%s: %v\n%s", p, err, doc)
			}
			if head.Metadata.Namespace != ns {
				t.Errorf("%s %s: namespace %q, want the release's %q", head.Kind, head.Metadata.Name, head.Metadata.Namespace, ns)
			}
			var obj any
			switch head.APIVersion + " " + head.Kind {
			case "apps/v1 StatefulSet":
				if r.sts != nil {
					t.Errorf("%s: a second StatefulSet", p)
				}
				r.sts = &appsv1.StatefulSet{}
				obj = r.sts
			case "v1 Service":
				s := &corev1.Service{}
				r.services[head.Metadata.Name] = s
				obj = s
			case "v1 ConfigMap":
				c := &corev1.ConfigMap{}
				r.configMaps[head.Metadata.Name] = c
				obj = c
			case "v1 Secret":
				s := &corev1.Secret{}
				r.secrets[head.Metadata.Name] = s
				obj = s
			case "policy/v1 PodDisruptionBudget":
				r.pdb = &policyv1.PodDisruptionBudget{}
				obj = r.pdb
			case "v1 Pod":
				pod := &corev1.Pod{}
				r.testPods = append(r.testPods, pod)
				obj = pod
			case "networking.k8s.io/v1 NetworkPolicy":
				np := &networkingv1.NetworkPolicy{}
				r.netpols = append(r.netpols, np)
				obj = np
			case "cert-manager.io/v1 Certificate":
				c := &certificate{}
				r.certs[head.Metadata.Name] = c
				obj = c
			case "monitoring.coreos.com/v1 ServiceMonitor":
				// A CRD: no Go types here, so only its shape is checked.
				u := &unstructured.Unstructured{}
				if err := yaml.Unmarshal([]byte(doc), &u.Object); err != nil {
					t.Fatalf("%s: %v", p, err)
				}
				r.monitors = append(r.monitors, u)
				continue
			default:
				t.Fatalf("%s: unexpected %s %s", p, head.APIVersion, head.Kind)
			}
			if err := decodeStrict([]byte(doc), obj); err != nil {
				t.Fatalf("%s (%s %s): strict decoding: %v\n%s", p, head.Kind, head.Metadata.Name, err, doc)
			}
		}
	}
	if r.sts == nil {
		t.Fatal("no StatefulSet rendered")
	}
	return r
}

func TestRender(t *testing.T) {
	ch, err := loader.Load(chartDir)
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range cases {
		t.Run(c.file, func(t *testing.T) {
			vals := readValues(t, c.file)
			files, err := render(t, ch, vals, c.release, c.namespace)
			if err != nil {
				t.Fatalf("rendering: %v", err)
			}
			r := decodeRelease(t, files, c.release, c.namespace, vals)
			// The values as the templates saw them: the chart's defaults
			// under the file's.
			merged, err := chartutil.CoalesceValues(ch, vals)
			if err != nil {
				t.Fatal(err)
			}
			r.vals = merged
			checkRelease(t, r)
		})
	}
}

// The invariants.
func checkRelease(t *testing.T, r *release) {
	sts := r.sts
	spec := sts.Spec
	pod := spec.Template.Spec
	wantReplicas := toInt(t, r.vals["replicas"])

	// Replicas, policy, names.
	if spec.Replicas == nil || int(*spec.Replicas) != wantReplicas {
		t.Errorf("StatefulSet replicas %v, values say %d", spec.Replicas, wantReplicas)
	}
	if spec.PodManagementPolicy != appsv1.ParallelPodManagement {
		t.Errorf("podManagementPolicy %q, want Parallel (a node is ready only with a quorum: OrderedReady deadlocks)", spec.PodManagementPolicy)
	}
	if spec.UpdateStrategy.Type != appsv1.RollingUpdateStatefulSetStrategyType {
		t.Errorf("updateStrategy %q, want RollingUpdate", spec.UpdateStrategy.Type)
	}
	if ru := spec.UpdateStrategy.RollingUpdate; ru != nil && ru.MaxUnavailable != nil && ru.MaxUnavailable.IntValue() != 1 {
		t.Errorf("rollingUpdate.maxUnavailable %v, want at most one pod down", ru.MaxUnavailable)
	}
	if r := spec.PersistentVolumeClaimRetentionPolicy; r == nil {
		t.Errorf("no persistentVolumeClaimRetentionPolicy")
	}
	podLabels := labels.Set(spec.Template.Labels)
	sel, err := metaSelector(spec.Selector.MatchLabels)
	if err != nil || !sel.Matches(podLabels) {
		t.Errorf("StatefulSet selector %v does not match its pods' labels %v", spec.Selector.MatchLabels, podLabels)
	}

	// The headless Service of the peers.
	peersSvc := r.services[spec.ServiceName]
	if peersSvc == nil {
		t.Fatalf("serviceName %q: no such Service rendered", spec.ServiceName)
	}
	if peersSvc.Spec.ClusterIP != corev1.ClusterIPNone {
		t.Errorf("peers Service %s: clusterIP %q, want None (headless, for per-pod DNS names)", peersSvc.Name, peersSvc.Spec.ClusterIP)
	}
	if !peersSvc.Spec.PublishNotReadyAddresses {
		t.Errorf("peers Service %s: publishNotReadyAddresses false: nodes could not find each other before they are ready, and they are ready only once they have", peersSvc.Name)
	}
	checkSelects(t, peersSvc, podLabels)

	if len(pod.Containers) != 1 {
		t.Fatalf("%d containers, want 1", len(pod.Containers))
	}
	ctr := pod.Containers[0]
	ports := map[string]int32{}
	for _, p := range ctr.Ports {
		ports[p.Name] = p.ContainerPort
	}
	for _, p := range peersSvc.Spec.Ports {
		resolvePort(t, "peers Service port "+p.Name, p.TargetPort, ports)
	}

	// MXQ_NODE_NAME from the pod's name: node_name selects this pod's peer.
	var nodeEnv *corev1.EnvVar
	for i := range ctr.Env {
		if ctr.Env[i].Name == "MXQ_NODE_NAME" {
			nodeEnv = &ctr.Env[i]
		}
	}
	if nodeEnv == nil || nodeEnv.ValueFrom == nil || nodeEnv.ValueFrom.FieldRef == nil || nodeEnv.ValueFrom.FieldRef.FieldPath != "metadata.name" {
		t.Errorf("MXQ_NODE_NAME is not the pod's name (downward API metadata.name): %+v", nodeEnv)
	}
	if pod.EnableServiceLinks == nil || *pod.EnableServiceLinks {
		t.Errorf("enableServiceLinks is not false: Services named mxq-* inject MXQ_* variables into mxq's environment")
	}

	// Volumes and mounts: what is writable, where the config comes from.
	volumes := map[string]corev1.Volume{}
	for _, v := range pod.Volumes {
		volumes[v.Name] = v
	}
	claims := map[string]bool{}
	for _, c := range spec.VolumeClaimTemplates {
		claims[c.Name] = true
		if len(c.Spec.AccessModes) == 0 || c.Spec.Resources.Requests.Storage().IsZero() {
			t.Errorf("volumeClaimTemplate %s: no access mode or size", c.Name)
		}
	}
	mounts := map[string]corev1.VolumeMount{} // by path
	for _, m := range ctr.VolumeMounts {
		mounts[m.MountPath] = m
		_, isVol := volumes[m.Name]
		if !isVol && !claims[m.Name] {
			t.Errorf("mount %s: volume %q is neither a pod volume nor a claim template", m.MountPath, m.Name)
		}
		if !m.ReadOnly {
			switch {
			case claims[m.Name] && m.MountPath == "/var/lib/mxq":
			case m.MountPath == "/dev/shm" || m.MountPath == "/tmp":
				if v := volumes[m.Name]; v.EmptyDir == nil || v.EmptyDir.SizeLimit == nil {
					t.Errorf("%s: want a size-limited emptyDir, got %+v", m.MountPath, v.VolumeSource)
				}
			default:
				t.Errorf("%s is writable: only the data volume, /dev/shm and /tmp may be", m.MountPath)
			}
		}
	}
	if m, ok := mounts["/var/lib/mxq"]; !ok || !claims[m.Name] {
		t.Errorf("/var/lib/mxq is not a PersistentVolumeClaim: mail would live in the container")
	}
	if m, ok := mounts["/dev/shm"]; !ok || volumes[m.Name].EmptyDir == nil || volumes[m.Name].EmptyDir.Medium != corev1.StorageMediumMemory {
		t.Errorf("/dev/shm is not a memory emptyDir: batch staging falls back to disk")
	}
	for _, v := range pod.Volumes {
		switch {
		case v.ConfigMap != nil:
			if r.configMaps[v.ConfigMap.Name] == nil {
				t.Errorf("volume %s: ConfigMap %s is not rendered", v.Name, v.ConfigMap.Name)
			}
		case v.Secret != nil:
			if r.secrets[v.Secret.SecretName] == nil && !slices.Contains(existingSecrets(r), v.Secret.SecretName) {
				t.Errorf("volume %s: Secret %s is neither rendered nor an existing secret from the values", v.Name, v.Secret.SecretName)
			}
		}
	}

	// The rendered mxq.yaml, as mxq reads it, on every pod.
	cfgMount, ok := mounts["/etc/mxq/config"]
	if !ok {
		t.Fatalf("no config mount at /etc/mxq/config")
	}
	if !slices.Equal(ctr.Args, []string{"serve", "--config", "/etc/mxq/config/mxq.yaml"}) {
		t.Errorf("args %q, want serve --config /etc/mxq/config/mxq.yaml", ctr.Args)
	}
	cm := r.configMaps[volumes[cfgMount.Name].ConfigMap.Name]
	raw := cm.Data["mxq.yaml"]
	if raw == "" {
		t.Fatalf("ConfigMap %s has no mxq.yaml", cm.Name)
	}
	var cfgMap map[string]any
	if err := yaml.Unmarshal([]byte(raw), &cfgMap); err != nil {
		t.Fatalf("mxq.yaml: %v", err)
	}
	var wantPeers []string
	if wantReplicas > 1 {
		for i := range wantReplicas {
			wantPeers = append(wantPeers, fmt.Sprintf("%s-%d.%s.%s.svc.cluster.local", sts.Name, i, peersSvc.Name, r.ns))
		}
	}
	wantQueueReplicas := 1
	if wantReplicas >= 3 {
		wantQueueReplicas = 3
	}
	var first *config.Config
	for i := range wantReplicas {
		podName := fmt.Sprintf("%s-%d", sts.Name, i)
		cfg := loadConfig(t, cfgMap, podName, volumes, mounts)
		if cfg == nil {
			return
		}
		if first == nil {
			first = cfg
		}
		if got := cfg.Cluster.Peers; !slices.Equal(got, wantPeers) && !(len(got) == 0 && len(wantPeers) == 0) {
			t.Errorf("cluster.peers %q, want %q (from %d replicas and Service %s)", got, wantPeers, wantReplicas, peersSvc.Name)
		}
		if wantReplicas > 1 && cfg.Cluster.Advertise != wantPeers[i] {
			t.Errorf("pod %s advertises %q, want %q", podName, cfg.Cluster.Advertise, wantPeers[i])
		}
		if cfg.Queue.Replicas != wantQueueReplicas {
			t.Errorf("queue.replicas %d, want %d with %d nodes", cfg.Queue.Replicas, wantQueueReplicas, wantReplicas)
		}
		if cfg.NodeName != podName {
			t.Errorf("node_name %q on pod %s", cfg.NodeName, podName)
		}
	}
	cfg := first
	if got := portOf(t, "smtp.listen", cfg.SMTP.Listen); got != ports["smtp"] {
		t.Errorf("smtp.listen %s, the container port smtp is %d", cfg.SMTP.Listen, ports["smtp"])
	}
	if got := portOf(t, "admin.listen", cfg.Admin.Listen); got != ports["admin"] {
		t.Errorf("admin.listen %s, the container port admin is %d", cfg.Admin.Listen, ports["admin"])
	}
	if wantReplicas > 1 {
		if int32(cfg.Cluster.RaftPort) != ports["raft"] || int32(cfg.Cluster.NATSPort) != ports["nats-route"] {
			t.Errorf("cluster ports raft %d nats %d, container ports %v", cfg.Cluster.RaftPort, cfg.Cluster.NATSPort, ports)
		}
	}
	if cfg.DataDir != "/var/lib/mxq" {
		t.Errorf("data_dir %q is not the volume", cfg.DataDir)
	}
	if cfg.Admin.Token == "" {
		t.Errorf("no admin token: the API would be read-only")
	}

	// Probes: on the admin port, at the right paths, over HTTPS when the
	// API has TLS (the kubelet does not check the certificate).
	adminPort := ports["admin"]
	_, adminTLS := get(cfgMap, "admin", "tls").(map[string]any)
	wantScheme := corev1.URISchemeHTTP
	if adminTLS {
		wantScheme = corev1.URISchemeHTTPS
	}
	for _, p := range []struct {
		name  string
		probe *corev1.Probe
		path  string
	}{{"startup", ctr.StartupProbe, "/healthz"}, {"liveness", ctr.LivenessProbe, "/healthz"}, {"readiness", ctr.ReadinessProbe, "/readyz"}} {
		if p.probe == nil || p.probe.HTTPGet == nil {
			t.Errorf("%s probe: missing or not HTTP", p.name)
			continue
		}
		if p.probe.HTTPGet.Path != p.path {
			t.Errorf("%s probe path %q, want %s", p.name, p.probe.HTTPGet.Path, p.path)
		}
		if got := resolvePort(t, p.name+" probe", p.probe.HTTPGet.Port, ports); got != adminPort {
			t.Errorf("%s probe port %d, mxq serves probes on admin.listen (%d)", p.name, got, adminPort)
		}
		if got := cmp.Or(p.probe.HTTPGet.Scheme, corev1.URISchemeHTTP); got != wantScheme {
			t.Errorf("%s probe scheme %s, the admin API speaks %s", p.name, got, wantScheme)
		}
	}

	checkClusterAuth(t, r, cfgMap, wantReplicas)
	checkNetworkPolicy(t, r, ports, podLabels, wantReplicas)
	if sp := ctr.StartupProbe; sp != nil && sp.PeriodSeconds*sp.FailureThreshold < 120 {
		t.Errorf("startup probe gives up after %ds: a store recovering after a crash is killed in a loop", sp.PeriodSeconds*sp.FailureThreshold)
	}

	// Shutdown: preStop, then SIGTERM and the grace period.
	preStop := time.Duration(0)
	if ctr.Lifecycle == nil || ctr.Lifecycle.PreStop == nil || ctr.Lifecycle.PreStop.Exec == nil {
		t.Errorf("no preStop exec hook")
	} else {
		cmd := ctr.Lifecycle.PreStop.Exec.Command
		if len(cmd) != 3 || cmd[0] != "/usr/local/bin/mxq" || cmd[1] != "sleep" {
			t.Errorf("preStop %q, want /usr/local/bin/mxq sleep DURATION (the image has nothing else)", cmd)
		} else if preStop, err = time.ParseDuration(cmd[2]); err != nil {
			t.Errorf("preStop sleep %q: %v", cmd[2], err)
		}
	}
	if pod.TerminationGracePeriodSeconds == nil {
		t.Errorf("no terminationGracePeriodSeconds")
	} else if tg := time.Duration(*pod.TerminationGracePeriodSeconds) * time.Second; tg <= preStop+cfg.SMTP.ShutdownGrace {
		t.Errorf("terminationGracePeriodSeconds %v <= preStop %v + smtp.shutdown_grace %v: sessions are killed mid-message", tg, preStop, cfg.SMTP.ShutdownGrace)
	}

	// Security context.
	psc := pod.SecurityContext
	if psc == nil || psc.RunAsNonRoot == nil || !*psc.RunAsNonRoot || psc.RunAsUser == nil || *psc.RunAsUser == 0 {
		t.Errorf("pod securityContext does not run as non-root: %+v", psc)
	}
	if psc == nil || psc.FSGroup == nil {
		t.Errorf("no fsGroup: the non-root user cannot write the volume")
	}
	csc := ctr.SecurityContext
	if csc == nil || csc.ReadOnlyRootFilesystem == nil || !*csc.ReadOnlyRootFilesystem {
		t.Errorf("root filesystem is not read-only")
	}
	if csc == nil || csc.AllowPrivilegeEscalation == nil || *csc.AllowPrivilegeEscalation {
		t.Errorf("allowPrivilegeEscalation is not false")
	}
	if csc == nil || csc.Capabilities == nil || !slices.Contains(csc.Capabilities.Drop, "ALL") {
		t.Errorf("capabilities are not dropped")
	}
	if ports["smtp"] < 1024 && (csc == nil || csc.Capabilities == nil || !slices.Contains(csc.Capabilities.Add, "NET_BIND_SERVICE")) {
		t.Errorf("SMTP container port %d < 1024 without NET_BIND_SERVICE", ports["smtp"])
	}
	if pod.AutomountServiceAccountToken == nil || *pod.AutomountServiceAccountToken {
		t.Errorf("the service account token is mounted; mxq never uses the API")
	}

	// Spreading: one node's loss takes one replica.
	if wantReplicas > 1 {
		aa := pod.Affinity
		if aa == nil || aa.PodAntiAffinity == nil {
			t.Errorf("no pod anti-affinity")
		} else {
			var terms []corev1.PodAffinityTerm
			terms = append(terms, aa.PodAntiAffinity.RequiredDuringSchedulingIgnoredDuringExecution...)
			for _, w := range aa.PodAntiAffinity.PreferredDuringSchedulingIgnoredDuringExecution {
				terms = append(terms, w.PodAffinityTerm)
			}
			if !slices.ContainsFunc(terms, func(term corev1.PodAffinityTerm) bool {
				s, err := metaSelector(term.LabelSelector.MatchLabels)
				return term.TopologyKey == "kubernetes.io/hostname" && err == nil && s.Matches(podLabels)
			}) {
				t.Errorf("no anti-affinity on kubernetes.io/hostname selecting mxq's pods")
			}
			if str(r.vals, "podAntiAffinity") == "hard" && len(aa.PodAntiAffinity.RequiredDuringSchedulingIgnoredDuringExecution) == 0 {
				t.Errorf("podAntiAffinity hard, but no required term")
			}
		}
	}

	// PodDisruptionBudget: at most one down.
	if r.pdb == nil {
		t.Fatalf("no PodDisruptionBudget")
	}
	if mu := r.pdb.Spec.MaxUnavailable; mu == nil || mu.Type != intstr.Int || mu.IntVal != 1 || r.pdb.Spec.MinAvailable != nil {
		t.Errorf("PDB maxUnavailable %v minAvailable %v, want maxUnavailable 1", r.pdb.Spec.MaxUnavailable, r.pdb.Spec.MinAvailable)
	}
	if s, err := metaSelector(r.pdb.Spec.Selector.MatchLabels); err != nil || !s.Matches(podLabels) {
		t.Errorf("PDB selector %v does not select mxq's pods", r.pdb.Spec.Selector)
	}

	// The SMTP Service keeps client IPs and reaches the SMTP port.
	smtpSvc := r.services[sts.Name+"-smtp"]
	if smtpSvc == nil {
		t.Fatalf("no SMTP Service %s-smtp", sts.Name)
	}
	checkSelects(t, smtpSvc, podLabels)
	wantType := corev1.ServiceType(str(r.vals, "smtpService", "type"))
	if smtpSvc.Spec.Type != wantType {
		t.Errorf("SMTP Service type %q, values say %q", smtpSvc.Spec.Type, wantType)
	}
	if smtpSvc.Spec.Type != corev1.ServiceTypeClusterIP && smtpSvc.Spec.ExternalTrafficPolicy != corev1.ServiceExternalTrafficPolicyLocal {
		t.Errorf("SMTP Service externalTrafficPolicy %q: client IPs are lost to SNAT", smtpSvc.Spec.ExternalTrafficPolicy)
	}
	if len(smtpSvc.Spec.Ports) != 1 || resolvePort(t, "SMTP Service", smtpSvc.Spec.Ports[0].TargetPort, ports) != ports["smtp"] {
		t.Errorf("SMTP Service ports %+v do not reach the smtp container port", smtpSvc.Spec.Ports)
	}
	if p := smtpSvc.Spec.Ports[0].Port; int(p) != toInt(t, get(r.vals, "smtpService", "port")) {
		t.Errorf("SMTP Service port %d", p)
	}
	if ann, _ := get(r.vals, "smtpService", "annotations").(map[string]any); len(ann) > 0 {
		for k, v := range ann {
			if smtpSvc.Annotations[k] != v {
				t.Errorf("SMTP Service annotation %s = %q, want %q", k, smtpSvc.Annotations[k], v)
			}
		}
	}

	// The admin Service (CLI, metrics): inside the cluster only.
	adminSvc := r.services[sts.Name+"-admin"]
	if adminSvc == nil {
		t.Fatalf("no admin Service")
	}
	checkSelects(t, adminSvc, podLabels)
	if adminSvc.Spec.Type != "" && adminSvc.Spec.Type != corev1.ServiceTypeClusterIP {
		t.Errorf("admin Service type %q: the admin API must not be exposed", adminSvc.Spec.Type)
	}
	for _, p := range adminSvc.Spec.Ports {
		if resolvePort(t, "admin Service", p.TargetPort, ports) != adminPort {
			t.Errorf("admin Service port %s does not reach admin.listen", p.Name)
		}
	}

	// ServiceMonitor: only when enabled, scraping the admin Service's port.
	if want := get(r.vals, "serviceMonitor", "enabled") == true; want != (len(r.monitors) == 1) {
		t.Errorf("serviceMonitor.enabled %v, %d ServiceMonitors rendered", want, len(r.monitors))
	}
	for _, m := range r.monitors {
		eps, _, _ := unstructured.NestedSlice(m.Object, "spec", "endpoints")
		if len(eps) != 1 {
			t.Fatalf("ServiceMonitor endpoints %v", eps)
		}
		ep := eps[0].(map[string]any)
		if ep["path"] != "/metrics" || !slices.ContainsFunc(adminSvc.Spec.Ports, func(p corev1.ServicePort) bool { return p.Name == ep["port"] }) {
			t.Errorf("ServiceMonitor endpoint %v does not scrape the admin Service's /metrics", ep)
		}
		ml, _, _ := unstructured.NestedStringMap(m.Object, "spec", "selector", "matchLabels")
		if s, err := metaSelector(ml); err != nil || !s.Matches(labels.Set(adminSvc.Labels)) {
			t.Errorf("ServiceMonitor selector %v does not select the admin Service %v", ml, adminSvc.Labels)
		}
		for _, s := range r.services {
			if s != adminSvc && labels.SelectorFromSet(ml).Matches(labels.Set(s.Labels)) {
				t.Errorf("ServiceMonitor also selects Service %s", s.Name)
			}
		}
	}

	// helm test: one check per node plus the Service.
	if get(r.vals, "helmTest", "enabled") == true {
		if len(r.testPods) != 1 {
			t.Fatalf("%d test pods", len(r.testPods))
		}
		tp := r.testPods[0]
		if tp.Annotations["helm.sh/hook"] != "test" {
			t.Errorf("test pod without the helm.sh/hook: test annotation")
		}
		if len(tp.Spec.Containers) != wantReplicas+1 {
			t.Errorf("test pod checks %d servers, want %d nodes + the Service", len(tp.Spec.Containers), wantReplicas)
		}
		checkTestPod(t, tp, adminTLS)
	} else if len(r.testPods) != 0 {
		t.Errorf("helmTest disabled, %d test pods rendered", len(r.testPods))
	}

	// NOTES.txt tells where the MX records go and how to run the CLI.
	wantNotes := []string{"MX", smtpSvc.Name, adminSvc.Name, "mxq status --server"}
	if adminTLS {
		wantNotes = append(wantNotes, "MXQ_ADMIN_CA", "--server https://")
	}
	for _, want := range wantNotes {
		if !strings.Contains(r.notes, want) {
			t.Errorf("NOTES.txt does not mention %q", want)
		}
	}
}

// loadConfig runs the rendered mxq.yaml through config.Load as the pod
// podName would: files the pod gets from Secrets are replaced by test files
// at paths under the same mounts.
func loadConfig(t *testing.T, cfgMap map[string]any, podName string, volumes map[string]corev1.Volume, mounts map[string]corev1.VolumeMount) *config.Config {
	t.Helper()
	cfgMap = deepCopy(t, cfgMap)
	dir := t.TempDir()
	// Files the pod gets from Secrets: each must be on a read-only Secret
	// mount, and is replaced by a test file with content mxq accepts.
	cert, key := writeCert(t, dir)
	ca := filepath.Join(dir, "ca.crt")
	copyFile(t, cert, ca)
	files := []struct {
		key, path string
	}{
		{"admin.token_file", writeFile(t, dir, "token", "0123456789abcdef0123456789abcdef\n")},
		{"admin.read_token_file", writeFile(t, dir, "read-token", "fedcba9876543210fedcba9876543210\n")},
		{"admin.tls.cert_file", cert},
		{"admin.tls.key_file", key},
		{"smtp.tls.cert_file", cert},
		{"smtp.tls.key_file", key},
		{"cluster.secret_file", writeFile(t, dir, "cluster-secret", "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKL\n")},
		{"cluster.tls.ca_file", ca},
		{"cluster.tls.cert_file", cert},
		{"cluster.tls.key_file", key},
	}
	for _, f := range files {
		parts := strings.Split(f.key, ".")
		parent, _ := get(cfgMap, parts[:len(parts)-1]...).(map[string]any)
		path, _ := parent[parts[len(parts)-1]].(string)
		if path == "" {
			continue
		}
		checkSecretFile(t, f.key, path, volumes, mounts)
		parent[parts[len(parts)-1]] = f.path
	}
	// Keys of the chart's own sections that this mxq does not know yet
	// (smtp.tls before its branch, cluster.secret_file before the cluster
	// credentials): left out of config.Load here, and named by
	// TestConfigKnowsChartKeys.
	for _, k := range unknownKeys(cfgMap) {
		t.Logf("config has no %s yet: left out of config.Load", k)
		parts := strings.Split(k, ".")
		parent, _ := get(cfgMap, parts[:len(parts)-1]...).(map[string]any)
		delete(parent, parts[len(parts)-1])
	}
	b, err := yaml.Marshal(cfgMap)
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, "mxq.yaml")
	if err := os.WriteFile(path, b, 0o644); err != nil {
		t.Fatal(err)
	}
	// Only the pod's environment: MXQ_NODE_NAME. (viper ignores empty
	// variables, so clearing is enough.)
	for _, kv := range os.Environ() {
		if k, _, _ := strings.Cut(kv, "="); strings.HasPrefix(k, "MXQ_") {
			t.Setenv(k, "")
		}
	}
	t.Setenv("MXQ_NODE_NAME", podName)
	cfg, err := config.Load(path, nil, nil)
	if err != nil {
		t.Errorf("pod %s: mxq refuses the rendered mxq.yaml: %v\n%s", podName, err, b)
		return nil
	}
	return cfg
}

// checkSecretFile checks that path is a file a read-only Secret volume puts
// there (mount path + an item's path, or a key when no items are listed).
func checkSecretFile(t *testing.T, key, path string, volumes map[string]corev1.Volume, mounts map[string]corev1.VolumeMount) {
	t.Helper()
	if path == "" {
		return
	}
	m, ok := mounts[filepath.Dir(path)]
	if !ok {
		t.Errorf("%s %s: nothing is mounted at %s", key, path, filepath.Dir(path))
		return
	}
	v := volumes[m.Name]
	if v.Secret == nil || !m.ReadOnly {
		t.Errorf("%s %s: %s is not a read-only Secret volume", key, path, m.MountPath)
		return
	}
	name := filepath.Base(path)
	if len(v.Secret.Items) > 0 && !slices.ContainsFunc(v.Secret.Items, func(k corev1.KeyToPath) bool { return k.Path == name }) {
		t.Errorf("%s %s: Secret volume %s has no item with path %s", key, path, v.Name, name)
	}
	if mode := v.Secret.DefaultMode; mode != nil && *mode&0o044 == 0 {
		t.Errorf("%s: Secret volume mode %o: the non-root user cannot read it", key, *mode)
	}
}

// unknownKeys lists the keys under the sections the chart writes itself
// (admin, cluster, smtp.tls) that config.Config does not have. The user's
// keys are not looked at: a misspelt one must fail config.Load.
func unknownKeys(cfgMap map[string]any) []string {
	var out []string
	var walk func(prefix string, m map[string]any)
	walk = func(prefix string, m map[string]any) {
		for k, v := range m {
			key := prefix + k
			if !configKnows(key) {
				out = append(out, key)
				continue
			}
			if sub, ok := v.(map[string]any); ok {
				walk(key+".", sub)
			}
		}
	}
	for _, section := range []string{"admin", "cluster"} {
		if m, ok := cfgMap[section].(map[string]any); ok {
			walk(section+".", m)
		}
	}
	if tls, ok := get(cfgMap, "smtp", "tls").(map[string]any); ok {
		if configKnows("smtp.tls") {
			walk("smtp.tls.", tls)
		} else {
			out = append(out, "smtp.tls")
		}
	}
	sort.Strings(out)
	return out
}

func writeFile(t *testing.T, dir, name, content string) string {
	t.Helper()
	p := filepath.Join(dir, name)
	if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

func copyFile(t *testing.T, from, to string) {
	t.Helper()
	b, err := os.ReadFile(from)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(to, b, 0o600); err != nil {
		t.Fatal(err)
	}
}

// configKnows reports whether config.Config has the dotted key.
func configKnows(key string) bool {
	typ := reflect.TypeOf(config.Config{})
	for _, part := range strings.Split(key, ".") {
		found := false
		for i := range typ.NumField() {
			f := typ.Field(i)
			if f.Tag.Get("mapstructure") == part {
				typ, found = f.Type, true
				break
			}
		}
		if !found {
			return false
		}
		for typ.Kind() == reflect.Pointer {
			typ = typ.Elem()
		}
	}
	return true
}

// writeCert writes a self-signed certificate and its key, PEM.
func writeCert(t *testing.T, dir string) (cert, key string) {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1),
		Subject:      pkix.Name{CommonName: "mx.example.com"},
		DNSNames:     []string{"mx.example.com"},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &k.PublicKey, k)
	if err != nil {
		t.Fatal(err)
	}
	kb, err := x509.MarshalPKCS8PrivateKey(k)
	if err != nil {
		t.Fatal(err)
	}
	cert, key = filepath.Join(dir, "tls.crt"), filepath.Join(dir, "tls.key")
	os.WriteFile(cert, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o644)
	os.WriteFile(key, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: kb}), 0o600)
	return cert, key
}

// existingSecrets are the Secrets the pods mount without the chart
// rendering them: the user's, and those cert-manager writes for the
// rendered Certificates.
func existingSecrets(r *release) []string {
	var out []string
	for _, k := range []string{"adminToken", "adminReadToken", "tls", "adminTLS", "clusterSecret", "clusterTLS"} {
		if s := str(r.vals, k, "existingSecret"); s != "" {
			out = append(out, s)
		}
	}
	for _, c := range r.certs {
		out = append(out, c.Spec.SecretName)
	}
	return out
}

// resolvePort turns a named or numbered port into the container's port
// number, failing when the container has no such port.
func resolvePort(t *testing.T, what string, p intstr.IntOrString, ports map[string]int32) int32 {
	t.Helper()
	if p.Type == intstr.String {
		n, ok := ports[p.StrVal]
		if !ok {
			t.Errorf("%s: port %q is not a port of the container (%v)", what, p.StrVal, ports)
		}
		return n
	}
	for _, n := range ports {
		if n == p.IntVal {
			return n
		}
	}
	t.Errorf("%s: port %d is not a port of the container (%v)", what, p.IntVal, ports)
	return p.IntVal
}

func checkSelects(t *testing.T, svc *corev1.Service, podLabels labels.Set) {
	t.Helper()
	if len(svc.Spec.Selector) == 0 || !labels.SelectorFromSet(svc.Spec.Selector).Matches(podLabels) {
		t.Errorf("Service %s selector %v does not select mxq's pods %v", svc.Name, svc.Spec.Selector, podLabels)
	}
}

func metaSelector(m map[string]string) (labels.Selector, error) {
	if len(m) == 0 {
		return nil, fmt.Errorf("empty selector")
	}
	return labels.SelectorFromSet(m), nil
}

func portOf(t *testing.T, key, addr string) int32 {
	t.Helper()
	_, p, err := net.SplitHostPort(addr)
	if err != nil {
		t.Fatalf("%s %q: %v", key, addr, err)
	}
	n, _ := strconv.Atoi(p)
	return int32(n)
}

func get(m map[string]any, path ...string) any {
	var v any = m
	for _, p := range path {
		mm, ok := v.(map[string]any)
		if !ok {
			return nil
		}
		v = mm[p]
	}
	return v
}

func str(m map[string]any, path ...string) string {
	s, _ := get(m, path...).(string)
	return s
}

func toInt(t *testing.T, v any) int {
	t.Helper()
	switch n := v.(type) {
	case int:
		return n
	case int64:
		return int(n)
	case float64:
		return int(n)
	case json.Number:
		i, _ := n.Int64()
		return int(i)
	}
	t.Fatalf("not a number: %#v", v)
	return 0
}

func deepCopy(t *testing.T, m map[string]any) map[string]any {
	b, err := json.Marshal(m)
	if err != nil {
		t.Fatal(err)
	}
	var out map[string]any
	if err := json.Unmarshal(b, &out); err != nil {
		t.Fatal(err)
	}
	return out
}
