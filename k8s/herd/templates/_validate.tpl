{{/*
Cross-field checks that values.schema.json cannot express; `helm template` / `install` fail
with the message.
*/}}
{{- define "herd.validate" -}}
{{- $v := .Values -}}
{{- if not (hasPrefix (printf "%s/" (trimSuffix "/" $v.model.mountPath)) $v.model.path) -}}
{{- fail (printf "model.path %q must lie under model.mountPath %q" $v.model.path $v.model.mountPath) -}}
{{- end -}}
{{- range $w := $v.gpuWorkers -}}
{{- if or (gt (int $w.minReplicas) (int $w.maxReplicas)) (lt (int $w.replicas) (int $w.minReplicas)) (gt (int $w.replicas) (int $w.maxReplicas)) -}}
{{- fail (printf "gpuWorkers %s: need minReplicas <= replicas <= maxReplicas" $w.name) -}}
{{- end -}}
{{- end -}}
{{- range $name := list "vision" "routerService" -}}
{{- $a := (index $v $name).autoscaling -}}
{{- if and $a.enabled (gt (int $a.minReplicas) (int $a.maxReplicas)) -}}
{{- fail (printf "%s.autoscaling: minReplicas > maxReplicas" $name) -}}
{{- end -}}
{{- end -}}
{{- if and $v.monitoring.podMonitor.enabled $v.monitoring.serviceMonitor.enabled -}}
{{- fail "monitoring: enable podMonitor or serviceMonitor, not both (each Ray pod would be scraped twice)" -}}
{{- end -}}
{{- if and $v.networkPolicy.enabled (or $v.monitoring.podMonitor.enabled $v.monitoring.serviceMonitor.enabled) (not $v.networkPolicy.metricsFrom) -}}
{{- fail "monitoring with networkPolicy.enabled: set networkPolicy.metricsFrom to where Prometheus runs (e.g. its namespace), or the NetworkPolicy keeps it off the metrics port" -}}
{{- end -}}
{{- end -}}
