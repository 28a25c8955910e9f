{{/*
API keys (deployments/auth.py). The Ingress reads a key store (JSON of key hashes, never keys) from
a Secret mounted as a directory on every Ray pod, and reads it again when the Secret changes
(kubelet swaps the files: no redeploy). With auth.existingSecret empty the chart makes the Secret
with one generated admin key (kept across upgrades): `admin-key` holds the key, `keys.json` its hash;
only keys.json is mounted.
*/}}

{{- define "herd.auth.mountPath" -}}/etc/herd/auth{{- end -}}

{{- define "herd.auth.secretName" -}}
{{- default (printf "%s-api-keys" (include "herd.fullname" .) | trunc 63 | trimSuffix "-") .Values.auth.existingSecret -}}
{{- end -}}

{{- define "herd.auth.secretKey" -}}
{{- if .Values.auth.existingSecret -}}{{ .Values.auth.existingSecretKey }}{{- else -}}keys.json{{- end -}}
{{- end -}}

{{/* The HerdConfig `auth` section of the Serve config. */}}
{{- define "herd.auth.config" -}}
{{- if .Values.auth.enabled -}}
keys_file: {{ printf "%s/keys.json" (include "herd.auth.mountPath" .) }}
{{- else -}}
enabled: false
shared_anonymous_cache: {{ .Values.auth.sharedAnonymousCache }}
{{- end -}}
{{- end -}}

{{- define "herd.auth.volumeMount" -}}
{{- if .Values.auth.enabled }}
- name: api-keys
  mountPath: {{ include "herd.auth.mountPath" . }}
  readOnly: true
{{- end }}
{{- end -}}

{{- define "herd.auth.volume" -}}
{{- if .Values.auth.enabled }}
- name: api-keys
  secret:
    secretName: {{ include "herd.auth.secretName" . }}
    defaultMode: 0440
    items:
    - key: {{ include "herd.auth.secretKey" . }}
      path: keys.json
{{- end }}
{{- end -}}
