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

{{/*
True (non-empty) when the admin listener is on: config.admin.listen set and not "none". The
admin container port, the HTTP probes, the metrics Service and the ServiceMonitor depend on it.
A loopback address is refused: the kubelet and Prometheus connect to the pod IP.
*/}}
{{- define "mrp.adminEnabled" -}}
{{- $listen := "" }}
{{- if kindIs "map" .Values.config.admin }}
{{- $listen = toString (default "" .Values.config.admin.listen) }}
{{- end }}
{{- if and $listen (ne $listen "none") }}
{{- if or (hasPrefix "127." $listen) (hasPrefix "[::1]" $listen) (hasPrefix "localhost" $listen) }}
{{- fail (printf "config.admin.listen %s is a loopback address: the probes and Prometheus reach the pod IP. Use e.g. 0.0.0.0:9090, or \"none\" to disable it" $listen) }}
{{- end }}true
{{- end }}
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
The proxy's config.yaml, .Values.config as given (every key spelled out in values.yaml). Helm
deletes keys set to null (`--set key=null`), which means "the proxy's default", so the string
"none" stands for null on the keys that accept it. Keep this list in step with values.yaml;
tests/deploy.rs applies the same rule before parsing values.yaml with the proxy's parser.
*/}}
{{- define "mrp.config" -}}
{{- $c := deepCopy .Values.config }}
{{- $_ := required "config.upstream.url is required: the homeserver's Service URL, e.g. http://conduit:6167" $c.upstream.url }}
{{- $nullable := dict "tokens" (list "refresh_token_lifetime" "session_lifetime") "rate_limit" (list "login" "refresh" "all") "admin" (list "listen") }}
{{- if and .Values.adminApi .Values.adminApi.existingSecret (kindIs "map" $c.admin) }}
{{- $_ := set $c.admin "token_file" "/etc/matrix-refresh-proxy-admin/token" }}
{{- end }}
{{- range $section, $keys := $nullable }}
{{- $s := get $c $section }}
{{- if kindIs "map" $s }}
{{- range $key := $keys }}
{{- if eq (toString (get $s $key)) "none" }}
{{- $_ := set $s $key nil }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- toYaml $c }}
{{- end }}
