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

{{/* Ray containers: also a read-only root filesystem (writes go to the emptyDirs of herd.ray.volumes). */}}
{{- define "herd.ray.containerSecurityContext" -}}
{{ include "herd.containerSecurityContext" . }}
readOnlyRootFilesystem: {{ .Values.raySecurityContext.readOnlyRootFilesystem }}
{{- end -}}

{{- define "herd.ray.env" -}}
# MoE dispatches (a few MiB of hidden states) travel inline in the task RPC, not via the object store.
- name: RAY_max_direct_call_object_size
  value: "4194304"
# Serve's gRPC proxy would read messages up to 2 GiB; the Ingress refuses those above limits.max_body_bytes.
- name: RAY_SERVE_GRPC_MAX_MESSAGE_SIZE
  value: "67108864"
{{- if .Values.raySecurityContext.readOnlyRootFilesystem }}
# JIT caches that default to read-only places under $HOME: into the writable cache emptyDir.
- name: CUDA_CACHE_PATH
  value: /home/ray/.cache/nv
- name: TRITON_CACHE_DIR
  value: /home/ray/.cache/triton
{{- end }}
{{- if .Values.redis.auth.enabled }}
{{ include "herd.redis.passwordEnv" (dict "root" . "name" "REDIS_PASSWORD") }}
{{- end }}
# The shared prefix cache's secret (redis.secret_env in the Serve config).
- name: HERD_CACHE_SECRET
  valueFrom:
    secretKeyRef:
      name: {{ include "herd.cacheSecret.name" . }}
      key: {{ include "herd.cacheSecret.key" . }}
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
- name: tmp
  mountPath: /tmp
- name: cache
  mountPath: /home/ray/.cache
{{- include "herd.auth.volumeMount" .root }}
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
# Ray's session directory (/tmp/ray: sockets, logs, spilled objects) and other scratch files.
- name: tmp
  {{- with .root.Values.raySecurityContext.tmpSizeLimit }}
  emptyDir:
    sizeLimit: {{ . }}
  {{- else }}
  emptyDir: {}
  {{- end }}
- name: cache
  emptyDir: {}
{{- include "herd.auth.volume" .root }}
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
