{{/* Names, labels and Redis wiring shared by the templates. */}}

{{- define "herd.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "herd.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "herd.selectorLabels" -}}
app.kubernetes.io/name: {{ include "herd.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "herd.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "herd.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: herd
{{- end -}}

{{- define "herd.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag }}
{{- end -}}

{{/* Redis */}}

{{- define "herd.redis.fullname" -}}
{{- printf "%s-redis" (include "herd.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "herd.redis.url" -}}
{{- if .Values.redis.deploy -}}
{{- printf "redis://%s:6379/%d" (include "herd.redis.fullname" .) (int .Values.redis.db) -}}
{{- else -}}
{{- .Values.redis.external.url -}}
{{- end -}}
{{- end -}}

{{- define "herd.redis.secretName" -}}
{{- default (include "herd.redis.fullname" .) .Values.redis.auth.existingSecret -}}
{{- end -}}

{{- define "herd.redis.secretKey" -}}
{{- if .Values.redis.auth.existingSecret -}}
{{- .Values.redis.auth.existingSecretKey -}}
{{- else -}}
password
{{- end -}}
{{- end -}}

{{/* The chart makes the password Secret unless an existing one is named. */}}
{{- define "herd.redis.createSecret" -}}
{{- if and .Values.redis.auth.enabled (not .Values.redis.auth.existingSecret) -}}
{{- if and (not .Values.redis.deploy) (not .Values.redis.auth.password) -}}
{{- fail "redis.auth: an external Redis with auth needs redis.auth.existingSecret (or redis.auth.password)" -}}
{{- end -}}
true
{{- end -}}
{{- end -}}

{{/* Environment entry that carries the Redis password from its Secret. */}}
{{- define "herd.redis.passwordEnv" -}}
- name: {{ .name }}
  valueFrom:
    secretKeyRef:
      name: {{ include "herd.redis.secretName" .root }}
      key: {{ include "herd.redis.secretKey" .root }}
{{- end -}}

{{/* The shared prefix cache's secret (HMAC key of Redis keys and values). */}}

{{- define "herd.cacheSecret.name" -}}
{{- default (printf "%s-cache-secret" (include "herd.fullname" .) | trunc 63 | trimSuffix "-") .Values.redis.cacheSecret.existingSecret -}}
{{- end -}}

{{- define "herd.cacheSecret.key" -}}
{{- if .Values.redis.cacheSecret.existingSecret -}}
{{- .Values.redis.cacheSecret.existingSecretKey -}}
{{- else -}}
secret
{{- end -}}
{{- end -}}

{{/* Ray token authentication: the Secret KubeRay reads the token from (key auth_token). */}}
{{- define "herd.rayAuth.secretName" -}}
{{- default (printf "%s-ray-token" (include "herd.fullname" .) | trunc 63 | trimSuffix "-") .Values.rayAuth.existingSecret -}}
{{- end -}}

{{/* Labels of this release's Ray pods (head and workers), for NetworkPolicy selectors. */}}
{{- define "herd.rayPodLabels" -}}
{{ include "herd.selectorLabels" . }}
herd.io/ray-node: "true"
{{- end -}}
