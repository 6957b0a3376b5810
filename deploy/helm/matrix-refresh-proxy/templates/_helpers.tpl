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
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
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

{{/* "true" when Redis is reached through Sentinel or Cluster (no URL, no URL Secret). */}}
{{- define "mrp.redisHA" -}}
{{- if or .Values.config.redis.sentinel .Values.config.redis.cluster }}true{{ end }}
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
{{- include "mrp.checkAdminApi" . }}
{{- with .Values.adminApi }}
{{- if .existingSecret }}
{{- $admin := $c.admin }}
{{- $_ := set $admin "token_file" (printf "%s/admin-token" (include "mrp.adminSecretDir" $)) }}
{{- if .upstreamKeySecretKey }}
{{- $_ := set $admin "upstream_key_file" (printf "%s/upstream-key" (include "mrp.adminSecretDir" $)) }}
{{- end }}
{{- if .previousUpstreamKeySecretKey }}
{{- $_ := set $admin "previous_upstream_key_file" (printf "%s/upstream-key.previous" (include "mrp.adminSecretDir" $)) }}
{{- end }}
{{- end }}
{{- end }}
{{- toYaml $c }}
{{- end }}

{{/* Where the adminApi Secret is mounted (read-only). */}}
{{- define "mrp.adminSecretDir" -}}
/run/secrets/matrix-refresh-proxy
{{- end }}

{{/* adminApi needs the admin listener; the upstream keys need the API's Secret. */}}
{{- define "mrp.checkAdminApi" -}}
{{- with .Values.adminApi }}
{{- if and (not .existingSecret) (or .upstreamKeySecretKey .previousUpstreamKeySecretKey) }}
{{- fail "adminApi.upstreamKeySecretKey / previousUpstreamKeySecretKey name keys of adminApi.existingSecret: set it too" }}
{{- end }}
{{- if and .previousUpstreamKeySecretKey (not .upstreamKeySecretKey) }}
{{- fail "adminApi.previousUpstreamKeySecretKey without adminApi.upstreamKeySecretKey: the previous key only opens, the current one seals" }}
{{- end }}
{{- if and .existingSecret (not (include "mrp.adminEnabled" $)) }}
{{- fail "adminApi.existingSecret: the operator API is served on the admin listener, which config.admin.listen \"none\" turns off" }}
{{- end }}
{{- end }}
{{- end }}

{{/* The volume holding the adminApi Secret's files, when set. */}}
{{- define "mrp.adminSecretVolume" -}}
{{- with .Values.adminApi }}
{{- if .existingSecret }}
- name: mrp-admin
  secret:
    secretName: {{ .existingSecret }}
    # The proxy runs as a non-root uid without fsGroup, so the files must be world-readable;
    # only this container mounts the volume.
    defaultMode: 0444
    items:
      - key: {{ .tokenSecretKey }}
        path: admin-token
      {{- if .upstreamKeySecretKey }}
      - key: {{ .upstreamKeySecretKey }}
        path: upstream-key
      {{- end }}
      {{- if .previousUpstreamKeySecretKey }}
      - key: {{ .previousUpstreamKeySecretKey }}
        path: upstream-key.previous
      {{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/*
The proxy's container. In sidecar mode an initContainers entry with restartPolicy: Always.
*/}}
{{- define "mrp.container" -}}
- name: matrix-refresh-proxy
  image: {{ include "mrp.image" . | quote }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  {{- if eq .Values.mode "sidecar" }}
  # A native sidecar (Kubernetes >= 1.29): started before the homeserver's containers,
  # restarted on its own, stopped after them.
  restartPolicy: Always
  {{- end }}
  args: ["--config", "/etc/matrix-refresh-proxy/config.yaml"]
  env:
    {{- if not (include "mrp.redisHA" .) }}
    - name: MRP_REDIS_URL
      valueFrom:
        secretKeyRef:
          name: {{ include "mrp.redisSecretName" . }}
          key: {{ include "mrp.redisSecretKey" . }}
    {{- end }}
    {{- with .Values.extraEnv }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  ports:
    - name: http
      containerPort: {{ include "mrp.httpPort" . }}
      protocol: TCP
    {{- if include "mrp.adminEnabled" . }}
    - name: admin
      containerPort: {{ include "mrp.adminPort" . }}
      protocol: TCP
    {{- end }}
  {{- if include "mrp.adminEnabled" . }}
  readinessProbe:
    httpGet:
      path: /health/ready
      port: admin
    {{- toYaml .Values.readinessProbe | nindent 4 }}
  livenessProbe:
    httpGet:
      path: /health/live
      port: admin
    {{- toYaml .Values.livenessProbe | nindent 4 }}
  {{- else }}
  # Admin listener disabled (config.admin.listen "none"): the client port accepting
  # connections is all there is to check.
  readinessProbe:
    tcpSocket:
      port: http
    {{- toYaml .Values.readinessProbe | nindent 4 }}
  livenessProbe:
    tcpSocket:
      port: http
    {{- toYaml .Values.livenessProbe | nindent 4 }}
  {{- end }}
  {{- if and (gt (int .Values.preStopSleepSeconds) 0) (semverCompare ">=1.30.0-0" .Capabilities.KubeVersion.Version) }}
  lifecycle:
    preStop:
      sleep:
        seconds: {{ int .Values.preStopSleepSeconds }}
  {{- end }}
  resources:
    {{- toYaml .Values.resources | nindent 4 }}
  securityContext:
    {{- toYaml .Values.securityContext | nindent 4 }}
  volumeMounts:
    - name: mrp-config
      mountPath: /etc/matrix-refresh-proxy
      readOnly: true
    {{- if .Values.adminApi.existingSecret }}
    - name: mrp-admin
      mountPath: {{ include "mrp.adminSecretDir" . }}
      readOnly: true
    {{- end }}
    {{- if .Values.redis.passwordSecret }}
    - name: mrp-redis-password
      mountPath: /run/secrets/mrp-redis
      readOnly: true
    {{- end }}
{{- end }}

{{/* The proxy's volumes: the rendered config.yaml, and the adminApi Secret when set. */}}
{{- define "mrp.configVolume" -}}
- name: mrp-config
  configMap:
    name: {{ include "mrp.fullname" . }}
{{- with include "mrp.adminSecretVolume" . }}
{{ trim . }}
{{- end }}
{{- if .Values.redis.passwordSecret }}
- name: mrp-redis-password
  secret:
    secretName: {{ .Values.redis.passwordSecret }}
{{- end }}
{{- end }}

{{/* A humantime duration ("30s", "1m 30s", "90s", "500ms") in whole seconds, rounded up. */}}
{{- define "mrp.seconds" -}}
{{- $total := 0.0 }}
{{- $s := toString . }}
{{- $parts := regexFindAll "[0-9]+ *(ms|s|m|h|d)" $s -1 }}
{{- if ne (regexReplaceAll "[ 0-9]+(ms|s|m|h|d)" $s "" | trim) "" }}
{{- fail (printf "config.shutdown_timeout %q: write it as e.g. 30s, 1m or 1m 30s (units ms, s, m, h, d)" $s) }}
{{- end }}
{{- range $parts }}
{{- $n := float64 (regexFind "[0-9]+" .) }}
{{- $u := regexFind "(ms|s|m|h|d)$" . }}
{{- $mul := get (dict "ms" 0.001 "s" 1.0 "m" 60.0 "h" 3600.0 "d" 86400.0) $u }}
{{- $total = addf $total (mulf $n $mul) }}
{{- end }}
{{- ceil $total | int }}
{{- end }}

{{/*
Fails the render when the SIGTERM drain (config.shutdown_timeout) plus the preStop sleep does
not fit terminationGracePeriodSeconds: the kubelet would SIGKILL pods mid-drain.
*/}}
{{- define "mrp.checkGrace" -}}
{{- $drain := int (include "mrp.seconds" (default "30s" .Values.config.shutdown_timeout)) }}
{{- $pre := 0 }}
{{- if semverCompare ">=1.30.0-0" .Capabilities.KubeVersion.Version }}{{ $pre = int .Values.preStopSleepSeconds }}{{ end }}
{{- $grace := int .Values.terminationGracePeriodSeconds }}
{{- if ge (add $drain $pre) $grace }}
{{- fail (printf "terminationGracePeriodSeconds (%d) must exceed config.shutdown_timeout (%ds) + preStopSleepSeconds (%ds): the kubelet would kill pods mid-drain. Raise it to at least %d." $grace $drain $pre (add $drain $pre 1)) }}
{{- end }}
{{- end }}

{{/* The labels the client and admin Services select pods by. */}}
{{- define "mrp.serviceSelector" -}}
{{- if and (eq .Values.mode "sidecar") .Values.sidecar.serviceSelector }}
{{- toYaml .Values.sidecar.serviceSelector }}
{{- else }}
{{- include "mrp.selectorLabels" . }}
{{- end }}
{{- end }}
