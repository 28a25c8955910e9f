{{/*
Pieces shared by the Ray head and GPU worker pod templates: security context, environment,
probes (KubeRay's health-check convention) and volumes (/dev/shm, model weights).
*/}}

{{- define "herd.ray.podSecurityContext" -}}
runAsNonRoot: {{ .Values.raySecurityContext.runAsNonRoot }}
runAsUser: {{ int .Values.raySecurityContext.runAsUser }}
runAsGroup: {{ int .Values.raySecurityContext.runAsGroup }}
fsGroup: {{ int .Values.raySecurityContext.fsGroup }}
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "herd.containerSecurityContext" -}}
allowPrivilegeEscalation: false
capabilities:
  drop: ["ALL"]
{{- end -}}

{{- define "herd.ray.env" -}}
# MoE dispatches (a few MiB of hidden states) travel inline in the task RPC, not via the object store.
- name: RAY_max_direct_call_object_size
  value: "4194304"
{{- if .Values.redis.auth.enabled }}
{{ include "herd.redis.passwordEnv" (dict "root" . "name" "REDIS_PASSWORD") }}
{{- end }}
{{- range $name, $value := .Values.experts.collectiveEnv }}
- name: {{ $name }}
  value: {{ $value | quote }}
{{- end }}
{{- with .Values.rayExtraEnv }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "herd.ray.rayletHealthz" -}}
wget -T 2 -q -O- http://localhost:52365/api/local_raylet_healthz | grep success
{{- end -}}

{{/* Head: raylet and GCS healthy. */}}
{{- define "herd.ray.headProbes" -}}
{{- $check := printf "%s && wget -T 2 -q -O- http://localhost:8265/api/gcs_healthz | grep success" (include "herd.ray.rayletHealthz" .) -}}
readinessProbe:
  exec:
    command: ["bash", "-c", {{ $check | quote }}]
  initialDelaySeconds: 10
  periodSeconds: 5
  timeoutSeconds: 2
  failureThreshold: 10
livenessProbe:
  exec:
    command: ["bash", "-c", {{ $check | quote }}]
  initialDelaySeconds: 30
  periodSeconds: 5
  timeoutSeconds: 2
  failureThreshold: 120
{{- end -}}

{{/*
Worker: ready only while its Serve proxy answers (so Services route only to live proxies);
alive while its raylet is, so an unhealthy application never restarts the pod.
*/}}
{{- define "herd.ray.workerProbes" -}}
{{- $raylet := include "herd.ray.rayletHealthz" . -}}
{{- $serve := printf "%s && wget -T 2 -q -O- http://localhost:%d/-/healthz | grep success" $raylet (int .Values.serve.httpPort) -}}
readinessProbe:
  exec:
    command: ["bash", "-c", {{ $serve | quote }}]
  initialDelaySeconds: 10
  periodSeconds: 5
  timeoutSeconds: 2
  failureThreshold: 1
livenessProbe:
  exec:
    command: ["bash", "-c", {{ $raylet | quote }}]
  initialDelaySeconds: 30
  periodSeconds: 5
  timeoutSeconds: 2
  failureThreshold: 120
{{- end -}}

{{- define "herd.ray.volumeMounts" -}}
- name: dshm
  mountPath: /dev/shm
{{- if .mountModel }}
- name: model
  mountPath: {{ .root.Values.model.mountPath }}
  readOnly: true
{{- end }}
{{- end -}}

{{- define "herd.ray.volumes" -}}
{{- $model := .root.Values.model -}}
- name: dshm
  emptyDir:
    medium: Memory
    sizeLimit: {{ .shmSize }}
{{- if .mountModel }}
- name: model
  {{- if eq $model.source "pvc" }}
  persistentVolumeClaim:
    claimName: {{ required "model.pvc.claimName is required when model.source is pvc" $model.pvc.claimName }}
    readOnly: true
  {{- else }}
  hostPath:
    path: {{ $model.hostPath }}
    type: Directory
  {{- end }}
{{- end }}
{{- end -}}

{{- define "herd.ray.ports" -}}
- {name: serve, containerPort: {{ int .Values.serve.httpPort }}, protocol: TCP}
- {name: grpc, containerPort: {{ int .Values.serve.grpcPort }}, protocol: TCP}
- {name: metrics, containerPort: 8080, protocol: TCP}
{{- end -}}

{{/* rayStartParams values must be strings. */}}
{{- define "herd.ray.startParams" -}}
{{- range $k, $v := . }}
{{ $k }}: {{ toString $v | quote }}
{{- end }}
{{- end -}}
