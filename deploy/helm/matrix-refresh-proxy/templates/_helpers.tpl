{{/* Chart name, truncated to the 63 characters of a DNS label. */}}
{{- define "mrp.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Fully qualified app name; the release name alone when it already contains the chart name. */}}
{{- define "mrp.fullname" -}}
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

{{- define "mrp.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "mrp.selectorLabels" -}}
app.kubernetes.io/name: {{ include "mrp.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "mrp.labels" -}}
helm.sh/chart: {{ include "mrp.chart" . }}
{{ include "mrp.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "mrp.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* The port of a "host:port" or "[v6]:port" listen address. */}}
{{- define "mrp.port" -}}
{{- splitList ":" . | last | int }}
{{- end }}

{{- define "mrp.httpPort" -}}
{{- include "mrp.port" .Values.config.listen }}
{{- end }}

{{/* True (non-empty) when the admin listener is configured (UPCOMING: admin branch). */}}
{{- define "mrp.adminEnabled" -}}
{{- if and .Values.config.admin .Values.config.admin.listen }}true{{ end }}
{{- end }}

{{- define "mrp.adminPort" -}}
{{- include "mrp.port" .Values.config.admin.listen }}
{{- end }}

{{/* Secret and key holding the Redis URL. */}}
{{- define "mrp.redisSecretName" -}}
{{- if .Values.redis.existingSecret }}
{{- .Values.redis.existingSecret }}
{{- else if .Values.redis.url }}
{{- printf "%s-redis" (include "mrp.fullname" .) }}
{{- else }}
{{- fail "set redis.url or redis.existingSecret: the proxy keeps its sessions in Redis" }}
{{- end }}
{{- end }}

{{- define "mrp.redisSecretKey" -}}
{{- if .Values.redis.existingSecret }}{{ .Values.redis.existingSecretKey }}{{ else }}url{{ end }}
{{- end }}

{{/*
The proxy's config.yaml. Keys of features not merged yet (admin, rate_limit, trusted_proxies,
shutdown_timeout) are left out while empty, because the proxy rejects unknown keys. "none"
becomes null for the two nullable lifetimes (Helm drops null values).
*/}}
{{- define "mrp.config" -}}
{{- $c := deepCopy .Values.config }}
{{- $_ := required "config.upstream.url is required: the homeserver's Service URL, e.g. http://conduit:6167" $c.upstream.url }}
{{- range $key := list "admin" "rate_limit" "trusted_proxies" "shutdown_timeout" }}
{{- if empty (get $c $key) }}
{{- $_ := unset $c $key }}
{{- end }}
{{- end }}
{{- $tokens := $c.tokens | default dict }}
{{- range $key := list "refresh_token_lifetime" "session_lifetime" }}
{{- if eq (toString (get $tokens $key)) "none" }}
{{- $_ := set $tokens $key nil }}
{{- end }}
{{- end }}
{{- toYaml $c }}
{{- end }}
