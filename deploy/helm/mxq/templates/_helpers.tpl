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

{{- define "mxq.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) -}}
{{- end -}}

{{/* Labels. */}}
{{- define "mxq.selectorLabels" -}}
app.kubernetes.io/name: {{ include "mxq.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
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
{{- $peers := list -}}
{{- if gt (int .Values.replicas) 1 -}}
{{- $full := include "mxq.fullname" . -}}
{{- $svc := include "mxq.peersService" . -}}
{{- range $i := until (int .Values.replicas) -}}
{{- $peers = append $peers (printf "%s-%d.%s.%s.svc.%s" $full $i $svc $.Release.Namespace $.Values.clusterDomain) -}}
{{- end -}}
{{- end -}}
{{- toJson $peers -}}
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
{{- $owned := dict
    "data_dir" "/var/lib/mxq"
    "smtp" $smtp
    "queue" (dict "replicas" (ternary 3 1 (ge $replicas 3)))
    "admin" (dict "listen" (printf "0.0.0.0:%s" (include "mxq.adminPort" .)) "token_file" "/etc/mxq/admin/token")
    "cluster" (dict
        "peers" (include "mxq.peers" . | fromJsonArray)
        "bind" "0.0.0.0"
        "raft_port" (int (include "mxq.raftPort" .))
        "nats_port" (int (include "mxq.natsPort" .))
        "name" (include "mxq.fullname" .))
-}}
{{- $merged := mergeOverwrite $cfg $owned -}}
# Rendered by the mxq Helm chart from .Values.config; node_name comes from
# the pod's name (MXQ_NODE_NAME).
{{ toYaml $merged }}
{{- end -}}
