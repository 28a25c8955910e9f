{{/*
The Serve config (ray.serve.schema.ServeDeploySchema) for RayService.spec.serveConfigV2.
Secrets never appear here: the Redis password and the shared cache's secret reach the replicas as
the env vars named by redis.password_env and redis.secret_env, set on the Ray pods from secretKeyRefs.
*/}}

{{- define "herd.serve.replicas" -}}
{{- if .autoscaling.enabled -}}
autoscaling_config:
  min_replicas: {{ int .autoscaling.minReplicas }}
  max_replicas: {{ int .autoscaling.maxReplicas }}
  target_ongoing_requests: {{ .autoscaling.targetOngoingRequests }}
{{- else -}}
num_replicas: {{ int .replicas }}
{{- end -}}
{{- end -}}

{{- define "herd.serveConfig" -}}
{{- $v := .Values -}}
proxy_location: EveryNode
http_options:
  host: 0.0.0.0
  port: {{ int $v.serve.httpPort }}
grpc_options:
  port: {{ int $v.serve.grpcPort }}
  grpc_servicer_functions: {{ toJson $v.serve.grpcServicerFunctions }}
logging_config:
  encoding: {{ $v.serve.logEncoding }}
  log_level: {{ $v.serve.logLevel }}
applications:
- name: {{ $v.serve.appName }}
  route_prefix: {{ $v.serve.routePrefix }}
  import_path: {{ $v.serve.importPath }}
  runtime_env:
    env_vars: {{ toJson $v.serve.envVars }}
  args:
    model: {{ $v.model.path | quote }}
    redis:
      url: {{ include "herd.redis.url" . | quote }}
      {{- if $v.redis.auth.enabled }}
      password_env: REDIS_PASSWORD
      {{- end }}
      secret_env: HERD_CACHE_SECRET
      ttl_s: {{ int $v.redis.ttlSeconds }}
    experts:
      mode: {{ $v.experts.mode }}
      num_shards: {{ int $v.experts.numShards }}
      placement_strategy: {{ $v.experts.placementStrategy }}
      num_gpus_per_shard: {{ $v.experts.gpusPerShard }}
      quantization: {{ $v.experts.quantization | default "none" }}
      transport: {{ $v.experts.transport | default "collective" }}
      cpu_group_backend: {{ $v.experts.cpuGroupBackend | default "socket" }}
      micro_batches: {{ int ($v.experts.microBatches | default 1) }}
      group_timeout_s: {{ $v.experts.groupTimeoutSeconds | default 30 }}
    engine:
      max_num_seqs: {{ int $v.limits.maxNumSeqs }}
      max_model_len: {{ int $v.limits.maxModelLen }}
    limits:
      max_images_per_request: {{ int $v.limits.maxImagesPerRequest }}
    auth:
      {{- include "herd.auth.config" . | nindent 6 }}
  deployments:
  - name: Ingress
    num_replicas: {{ int $v.ingress.replicas }}
    ray_actor_options:
      num_cpus: {{ $v.ingress.numCpus }}
  - name: VisionEncoder
    {{- include "herd.serve.replicas" $v.vision | nindent 4 }}
    {{- with $v.vision.maxOngoingRequests }}
    max_ongoing_requests: {{ int . }}
    {{- end }}
    ray_actor_options:
      num_gpus: {{ $v.vision.numGpus }}
  - name: RouterService
    {{- include "herd.serve.replicas" $v.routerService | nindent 4 }}
    max_ongoing_requests: {{ int $v.routerService.maxOngoingRequests }}
    ray_actor_options:
      num_gpus: {{ $v.routerService.numGpus }}
{{- end -}}
