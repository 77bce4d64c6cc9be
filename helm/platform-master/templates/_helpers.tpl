{{/* Name of the chart, overridable. */}}
{{- define "platform-master.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name of the release's objects (63 characters at most). */}}
{{- define "platform-master.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "platform-master.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The release's name and instance labels, which every selector starts with. */}}
{{- define "platform-master.instanceLabels" -}}
app.kubernetes.io/name: {{ include "platform-master.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "platform-master.selectorLabels" -}}
{{ include "platform-master.instanceLabels" . }}
app.kubernetes.io/component: master
{{- end }}

{{- define "platform-master.labels" -}}
helm.sh/chart: {{ include "platform-master.chart" . }}
{{ include "platform-master.selectorLabels" . }}
{{ include "platform-master.releaseLabels" . }}
{{- end }}

{{/* The edge's objects: the same release, component "edge" (the master's Service and
PodDisruptionBudget select component "master" only). */}}
{{- define "platform-master.edgeSelectorLabels" -}}
{{ include "platform-master.instanceLabels" . }}
app.kubernetes.io/component: edge
{{- end }}

{{- define "platform-master.edgeLabels" -}}
helm.sh/chart: {{ include "platform-master.chart" . }}
{{ include "platform-master.edgeSelectorLabels" . }}
{{ include "platform-master.releaseLabels" . }}
{{- end }}

{{- define "platform-master.releaseLabels" -}}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: platform
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* Name of the edge's objects (Deployment, Service, PodDisruptionBudget). */}}
{{- define "platform-master.edgeName" -}}
{{- printf "%s-edge" (include "platform-master.fullname" . | trunc 58 | trimSuffix "-") }}
{{- end }}

{{/* The masters' gRPC Service as Envoy reaches it (xDS and ext_authz): a fully qualified
name, since Envoy's resolver does not apply the pod's DNS search list. */}}
{{- define "platform-master.grpcAddress" -}}
{{- printf "%s.%s.svc.%s:%v" (include "platform-master.fullname" .) .Release.Namespace .Values.clusterDomain .Values.service.port }}
{{- end }}

{{- define "platform-master.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "platform-master.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* repository:tag@digest; the digest, when given, is what the runtime pulls. */}}
{{- define "platform-master.image" -}}
{{- $tag := .Values.image.tag | default .Chart.AppVersion }}
{{- .Values.image.repository }}:{{ $tag }}
{{- with .Values.image.digest }}@{{ . }}{{ end }}
{{- end }}

{{/* Security context of every pod. */}}
{{- define "platform-master.podSecurity" -}}
runAsNonRoot: true
runAsUser: {{ .Values.securityContext.runAsUser }}
runAsGroup: {{ .Values.securityContext.runAsGroup }}
fsGroup: {{ .Values.securityContext.fsGroup }}
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* A pod's topologySpreadConstraints: the given ones, else (spread) one pod per node as
far as possible, among the pods with the given selector labels of this revision. Empty
when neither. Arguments: a dict with "constraints", "spread" and "labels". */}}
{{- define "platform-master.topologySpread" -}}
{{- if .constraints -}}
topologySpreadConstraints:
  {{- toYaml .constraints | nindent 2 }}
{{- else if .spread -}}
topologySpreadConstraints:
  - maxSkew: 1
    topologyKey: kubernetes.io/hostname
    whenUnsatisfiable: ScheduleAnyway
    labelSelector:
      matchLabels:
        {{- .labels | nindent 8 }}
    matchLabelKeys:
      - pod-template-hash
{{- end }}
{{- end }}

{{/* Security context of every container: non-root, read-only root, nothing more. */}}
{{- define "platform-master.containerSecurity" -}}
runAsNonRoot: true
runAsUser: {{ .Values.securityContext.runAsUser }}
runAsGroup: {{ .Values.securityContext.runAsGroup }}
readOnlyRootFilesystem: true
allowPrivilegeEscalation: false
privileged: false
capabilities:
  drop:
    - ALL
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* True when this chart makes the Secret (some secret value is given inline). */}}
{{- define "platform-master.createSecret" -}}
{{- if or (and .Values.adminToken.value (not .Values.adminToken.existingSecret)) (and .Values.database.url (not .Values.database.existingSecret)) (and .Values.tokenKey.value (not .Values.tokenKey.existingSecret)) (include "platform-master.inlineEdgeToken" .) }}true{{ end }}
{{- end }}

{{/* True when the edge is on and its token is given inline (stored in the chart's Secret). */}}
{{- define "platform-master.inlineEdgeToken" -}}
{{- if and .Values.edge.enabled .Values.edgeToken.value (not .Values.edgeToken.existingSecret) }}true{{ end }}
{{- end }}

{{- define "platform-master.edgeTokenSecretName" -}}
{{- .Values.edgeToken.existingSecret | default (include "platform-master.fullname" .) }}
{{- end }}

{{- define "platform-master.edgeTokenSecretKey" -}}
{{- if .Values.edgeToken.existingSecret }}{{ .Values.edgeToken.existingSecretKey }}{{ else }}edge-token{{ end }}
{{- end }}

{{- define "platform-master.adminTokenSecretName" -}}
{{- .Values.adminToken.existingSecret | default (include "platform-master.fullname" .) }}
{{- end }}

{{- define "platform-master.adminTokenSecretKey" -}}
{{- if .Values.adminToken.existingSecret }}{{ .Values.adminToken.existingSecretKey }}{{ else }}admin-token{{ end }}
{{- end }}

{{- define "platform-master.databaseSecretName" -}}
{{- .Values.database.existingSecret | default (include "platform-master.fullname" .) }}
{{- end }}

{{- define "platform-master.databaseSecretKey" -}}
{{- if .Values.database.existingSecret }}{{ .Values.database.existingSecretKey }}{{ else }}database-url{{ end }}
{{- end }}

{{- define "platform-master.tokenKeySecretName" -}}
{{- .Values.tokenKey.existingSecret | default (include "platform-master.fullname" .) }}
{{- end }}

{{- define "platform-master.tokenKeySecretKey" -}}
{{- if .Values.tokenKey.existingSecret }}{{ .Values.tokenKey.existingSecretKey }}{{ else }}token-key{{ end }}
{{- end }}

{{/*
The [master] table of the configuration file. Values are written with toJson:
JSON strings, numbers, booleans and arrays of strings are valid TOML as well.
*/}}
{{- define "platform-master.configToml" -}}
# Settings of `platform master`. PLATFORM_<SETTING> environment variables
# override this file and command-line flags override both.
[master]
image_allowlist = {{ .Values.imageAllowlist | toJson }}
{{- range $key, $value := .Values.config }}
{{ $key }} = {{ $value | toJson }}
{{- end }}
{{ end }}

{{/* Checks that span several values (the schema checks each value on its own). */}}
{{- define "platform-master.validate" -}}
{{- $grace := .Values.config.shutdown_grace | default 10 | float64 }}
{{- $preStop := .Values.lifecycle.preStopSleepSeconds | float64 }}
{{- if le (.Values.terminationGracePeriodSeconds | float64) (addf $grace $preStop) }}
{{- fail (printf "terminationGracePeriodSeconds (%v) must exceed config.shutdown_grace (%v) plus lifecycle.preStopSleepSeconds (%v), or the kubelet kills the master before in-flight calls finish" .Values.terminationGracePeriodSeconds $grace $preStop) }}
{{- end }}
{{- if .Values.edge.enabled }}
{{- if not (or .Values.edgeToken.value .Values.edgeToken.existingSecret) }}
{{- fail "edgeToken: the edge is enabled, so Envoy authenticates to the masters with the edge token; give edgeToken.value or edgeToken.existingSecret (or set edge.enabled=false)" }}
{{- end }}
{{- if gt (.Values.edge.drain.minSeconds | float64) (.Values.edge.drain.timeoutSeconds | float64) }}
{{- fail (printf "edge.drain.minSeconds (%v) must not exceed edge.drain.timeoutSeconds (%v)" .Values.edge.drain.minSeconds .Values.edge.drain.timeoutSeconds) }}
{{- end }}
{{- if le (.Values.edge.terminationGracePeriodSeconds | float64) (.Values.edge.drain.timeoutSeconds | float64) }}
{{- fail (printf "edge.terminationGracePeriodSeconds (%v) must exceed edge.drain.timeoutSeconds (%v), or the kubelet kills Envoy while its requests drain" .Values.edge.terminationGracePeriodSeconds .Values.edge.drain.timeoutSeconds) }}
{{- end }}
{{- end }}
{{- if and .Values.config.chain (not .Values.hotkey.existingSecret) }}
{{- fail "hotkey.existingSecret: config.chain is set, so the master signs weight vectors; name the Secret holding its hotkey" }}
{{- end }}
{{- $sealing := or (not (hasKey .Values.config "epochs")) .Values.config.epochs }}
{{- if and .Values.config.chain $sealing (eq (.Values.config.epoch_schedule | default "tempo") "interval") (gt (int .Values.replicaCount) 1) }}
{{- fail (printf "config.epoch_schedule: the interval schedule is for a single master (replicaCount is %v, and each replica would seal on its own clock); use tempo" .Values.replicaCount) }}
{{- end }}
{{- end }}

{{/*
Where the Envoy pods mount the edge's TLS Secret (edge.tls.secretName); the masters send
Envoy the certificate's and key's paths under it.
*/}}
{{- define "platform-master.edgeTlsDir" -}}
/etc/platform-edge-tls
{{- end }}
