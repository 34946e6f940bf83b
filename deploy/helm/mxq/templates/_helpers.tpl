{{/* Names. */}}
{{- define "mxq.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
The StatefulSet's name, also the prefix of the pods' names (mxq-0, ...).
Kept to 52 characters: a pod name gets "-<ordinal>" and the
controller-revision-hash label adds 11 more.
*/}}
{{- define "mxq.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 52 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 52 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 52 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "mxq.peersService" -}}{{ include "mxq.fullname" . }}-peers{{- end -}}
{{- define "mxq.smtpService" -}}{{ include "mxq.fullname" . }}-smtp{{- end -}}
{{- define "mxq.adminService" -}}{{ include "mxq.fullname" . }}-admin{{- end -}}

{{- define "mxq.adminSecret" -}}
{{- .Values.adminToken.existingSecret | default (printf "%s-admin-token" (include "mxq.fullname" .)) -}}
{{- end -}}
{{- define "mxq.adminSecretKey" -}}
{{- if .Values.adminToken.existingSecret -}}{{ .Values.adminToken.existingSecretKey }}{{- else -}}token{{- end -}}
{{- end -}}

{{/*
The read-only admin token (admin.read_token_file), when enabled: a Secret of
the user's or one the chart generates.
*/}}
{{- define "mxq.adminReadSecret" -}}
{{- .Values.adminReadToken.existingSecret | default (printf "%s-admin-read-token" (include "mxq.fullname" .)) -}}
{{- end -}}
{{- define "mxq.adminReadSecretKey" -}}
{{- if .Values.adminReadToken.existingSecret -}}{{ .Values.adminReadToken.existingSecretKey }}{{- else -}}token{{- end -}}
{{- end -}}

{{/*
HTTPS for the admin API: "true" when a certificate comes from a Secret of
the user's or from cert-manager; mxq.adminTLSSecret names that Secret
(tls.crt, tls.key, ca.crt).
*/}}
{{- define "mxq.adminTLS" -}}
{{- if or .Values.adminTLS.existingSecret .Values.adminTLS.certManager.enabled -}}true{{- end -}}
{{- end -}}
{{- define "mxq.adminTLSSecret" -}}
{{- .Values.adminTLS.existingSecret | default (printf "%s-admin-tls" (include "mxq.fullname" .)) -}}
{{- end -}}
{{- define "mxq.adminScheme" -}}{{ if include "mxq.adminTLS" . }}https{{ else }}http{{ end }}{{- end -}}

{{/*
How the nodes authenticate each other on the NATS routes and raft: "secret"
(a shared secret in a file, the default), "tls" (mutual TLS from a CA),
"insecure" (nothing, only when the values say so), or "" for a single
node, which has no cluster traffic and gets none of this.
*/}}
{{- define "mxq.clusterAuth" -}}
{{- if gt (int .Values.replicas) 1 -}}
{{- if or .Values.clusterTLS.existingSecret .Values.clusterTLS.certManager.enabled -}}tls
{{- else if .Values.clusterInsecure -}}insecure
{{- else -}}secret
{{- end -}}
{{- end -}}
{{- end -}}
{{- define "mxq.clusterSecret" -}}
{{- .Values.clusterSecret.existingSecret | default (printf "%s-cluster-secret" (include "mxq.fullname" .)) -}}
{{- end -}}
{{- define "mxq.clusterSecretKey" -}}
{{- if .Values.clusterSecret.existingSecret -}}{{ .Values.clusterSecret.existingSecretKey }}{{- else -}}secret{{- end -}}
{{- end -}}
{{- define "mxq.clusterTLSSecret" -}}
{{- .Values.clusterTLS.existingSecret | default (printf "%s-cluster-tls" (include "mxq.fullname" .)) -}}
{{- end -}}

{{/*
Values that contradict each other, refused with the keys named. Called
from the StatefulSet, which every render has.
*/}}
{{- define "mxq.validate" -}}
{{- if and .Values.clusterTLS.existingSecret .Values.clusterTLS.certManager.enabled -}}
{{- fail "clusterTLS: set existingSecret or certManager.enabled, not both" -}}
{{- end -}}
{{- if and .Values.clusterTLS.certManager.enabled (not .Values.clusterTLS.certManager.issuerRef.name) -}}
{{- fail "clusterTLS.certManager.enabled needs clusterTLS.certManager.issuerRef.name: the cert-manager Issuer or ClusterIssuer of the cluster's CA" -}}
{{- end -}}
{{- $clusterTLS := or .Values.clusterTLS.existingSecret .Values.clusterTLS.certManager.enabled -}}
{{- if and .Values.clusterSecret.existingSecret $clusterTLS -}}
{{- fail "clusterSecret.existingSecret and clusterTLS: set either the cluster's shared secret or its TLS, not both" -}}
{{- end -}}
{{- if and .Values.clusterInsecure (or .Values.clusterSecret.existingSecret $clusterTLS) -}}
{{- fail "clusterInsecure: true with clusterSecret.existingSecret or clusterTLS: a cluster either has credentials or is explicitly insecure" -}}
{{- end -}}
{{- if and .Values.adminTLS.existingSecret .Values.adminTLS.certManager.enabled -}}
{{- fail "adminTLS: set existingSecret or certManager.enabled, not both" -}}
{{- end -}}
{{- if and .Values.adminTLS.certManager.enabled (not .Values.adminTLS.certManager.issuerRef.name) -}}
{{- fail "adminTLS.certManager.enabled needs adminTLS.certManager.issuerRef.name" -}}
{{- end -}}
{{- if and (not .Values.adminReadToken.enabled) (or .Values.adminReadToken.existingSecret .Values.adminReadToken.value) -}}
{{- fail "adminReadToken.existingSecret or adminReadToken.value is set but adminReadToken.enabled is false" -}}
{{- end -}}
{{- if and .Values.adminReadToken.enabled .Values.adminReadToken.value (eq .Values.adminReadToken.value .Values.adminToken.value) -}}
{{- fail "adminReadToken.value must differ from adminToken.value (the same token would allow changes)" -}}
{{- end -}}
{{- end -}}

{{/*
A cert-manager Certificate's spec for one of the chart's certificates:
dict "ctx" $ "values" (.Values.clusterTLS.certManager) "secretName" ...
"dnsNames" (list ...) "ipAddresses" (list ...) "usages" (list ...).
*/}}
{{- define "mxq.certificateSpec" -}}
{{- $cm := .values -}}
secretName: {{ .secretName }}
dnsNames:
  {{- toYaml .dnsNames | nindent 2 }}
{{- with .ipAddresses }}
ipAddresses:
  {{- toYaml . | nindent 2 }}
{{- end }}
usages:
  {{- toYaml .usages | nindent 2 }}
privateKey:
  algorithm: ECDSA
  size: 256
  rotationPolicy: Always
{{- with $cm.duration }}
duration: {{ . }}
{{- end }}
{{- with $cm.renewBefore }}
renewBefore: {{ . }}
{{- end }}
issuerRef:
  name: {{ $cm.issuerRef.name }}
  kind: {{ $cm.issuerRef.kind }}
  group: {{ $cm.issuerRef.group }}
{{- end -}}

{{- define "mxq.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) -}}
{{- end -}}

{{/* Labels. */}}
{{- define "mxq.selectorLabels" -}}
app.kubernetes.io/name: {{ include "mxq.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/*
The StatefulSet's pods and nothing else (not the helm test pod, which
shares the selector labels): what the NetworkPolicy protects and lets
through on the cluster ports.
*/}}
{{- define "mxq.podSelectorLabels" -}}
{{ include "mxq.selectorLabels" . }}
app.kubernetes.io/component: mxq
{{- end -}}

{{- define "mxq.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "mxq.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: mxq
{{- end -}}

{{/*
The peers: every pod's stable name through the headless Service,
generated from .Values.replicas so the list always agrees with the
StatefulSet. Empty for a single node.
*/}}
{{- define "mxq.peers" -}}
{{- if gt (int .Values.replicas) 1 -}}
{{- include "mxq.podNames" . -}}
{{- else -}}
[]
{{- end -}}
{{- end -}}

{{/*
Every pod's peer name, a list even for a single node (the admin
certificate names them too).
*/}}
{{- define "mxq.podNames" -}}
{{- $names := list -}}
{{- $full := include "mxq.fullname" . -}}
{{- $svc := include "mxq.peersService" . -}}
{{- range $i := until (int .Values.replicas) -}}
{{- $names = append $names (printf "%s-%d.%s.%s.svc.%s" $full $i $svc $.Release.Namespace $.Values.clusterDomain) -}}
{{- end -}}
{{- toJson $names -}}
{{- end -}}
{{- define "mxq.peersWildcard" -}}
{{- printf "*.%s.%s.svc.%s" (include "mxq.peersService" .) .Release.Namespace .Values.clusterDomain -}}
{{- end -}}

{{/* Ports inside the pod: fixed, the config and the probes use the same. */}}
{{- define "mxq.smtpPort" -}}2525{{- end -}}
{{- define "mxq.adminPort" -}}8025{{- end -}}
{{- define "mxq.natsPort" -}}6222{{- end -}}
{{- define "mxq.raftPort" -}}7947{{- end -}}

{{/*
mxq.yaml: the user's config with the keys the chart owns laid over it.
*/}}
{{- define "mxq.config" -}}
{{- $cfg := deepCopy (.Values.config | default dict) -}}
{{- $smtp := dict "listen" (printf "0.0.0.0:%s" (include "mxq.smtpPort" .)) "shutdown_grace" (printf "%ds" (int .Values.shutdownGraceSeconds)) -}}
{{- if .Values.tls.enabled -}}
{{- $_ := set $smtp "tls" (dict "cert_file" "/etc/mxq/tls/tls.crt" "key_file" "/etc/mxq/tls/tls.key") -}}
{{- end -}}
{{- $replicas := int .Values.replicas -}}
{{- $admin := dict "listen" (printf "0.0.0.0:%s" (include "mxq.adminPort" .)) "token_file" "/etc/mxq/admin/token" -}}
{{- if .Values.adminReadToken.enabled -}}
{{- $_ := set $admin "read_token_file" "/etc/mxq/admin-read/token" -}}
{{- end -}}
{{- if include "mxq.adminTLS" . -}}
{{- $_ := set $admin "tls" (dict "cert_file" "/etc/mxq/admin-tls/tls.crt" "key_file" "/etc/mxq/admin-tls/tls.key") -}}
{{- end -}}
{{- $cluster := dict
    "peers" (include "mxq.peers" . | fromJsonArray)
    "bind" "0.0.0.0"
    "raft_port" (int (include "mxq.raftPort" .))
    "nats_port" (int (include "mxq.natsPort" .))
    "name" (include "mxq.fullname" .)
-}}
{{- $auth := include "mxq.clusterAuth" . -}}
{{- if eq $auth "secret" -}}
{{- $_ := set $cluster "secret_file" "/etc/mxq/cluster/secret" -}}
{{- else if eq $auth "tls" -}}
{{- $_ := set $cluster "tls" (dict "ca_file" "/etc/mxq/cluster-tls/ca.crt" "cert_file" "/etc/mxq/cluster-tls/tls.crt" "key_file" "/etc/mxq/cluster-tls/tls.key") -}}
{{- else if eq $auth "insecure" -}}
{{- $_ := set $cluster "insecure" true -}}
{{- end -}}
{{- $owned := dict
    "data_dir" "/var/lib/mxq"
    "smtp" $smtp
    "queue" (dict "replicas" (ternary 3 1 (ge $replicas 3)))
    "admin" $admin
    "cluster" $cluster
-}}
{{- $merged := mergeOverwrite $cfg $owned -}}
# Rendered by the mxq Helm chart from .Values.config; node_name comes from
# the pod's name (MXQ_NODE_NAME).
{{ toYaml $merged }}
{{- end -}}
