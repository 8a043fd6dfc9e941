{{/* Names: <release>-crescent unless the release name already says crescent; components add -<role>. */}}
{{- define "crescent.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "crescent.fullname" -}}
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

{{/* Component name; role names are short, so trunc 54 keeps room for "-<role>" within 63. */}}
{{- define "crescent.componentName" -}}
{{- printf "%s-%s" (include "crescent.fullname" .root | trunc 54 | trimSuffix "-") .role }}
{{- end }}

{{- define "crescent.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "crescent.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Selector labels never change after install (a Deployment's selector is immutable). Args: root, role. */}}
{{- define "crescent.selectorLabels" -}}
app.kubernetes.io/name: {{ include "crescent.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .role }}
{{- end }}

{{- define "crescent.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "crescent.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: crescent
{{- end }}

{{/* Image for a component: its own `image` keys over the global ones. Args: root, comp. */}}
{{- define "crescent.image" -}}
{{- $base := deepCopy .root.Values.image }}
{{- if and (has .role (list "gateway" "conductor" "kvstore")) .root.Values.image.frontRepository }}
{{- $_ := set $base "repository" .root.Values.image.frontRepository }}
{{- end }}
{{- $img := merge (deepCopy (default dict .comp.image)) $base }}
{{- printf "%s:%s" $img.repository (default .root.Chart.AppVersion ($img.tag | toString)) }}
{{- end }}

{{/* A setting's value as an env string. Helm reads YAML numbers as float64, which would print 2147483648 as
     2.147483648e+09: whole numbers are printed as integers. */}}
{{- define "crescent.scalar" -}}
{{- if and (kindIs "float64" .) (eq (float64 (int64 .)) .) }}{{ int64 . }}
{{- else if or (kindIs "map" .) (kindIs "slice" .) }}{{ toJson . }}
{{- else }}{{ toString . }}
{{- end }}
{{- end }}

{{/* CRESCENT_MODEL for the gateway and the workers. */}}
{{- define "crescent.modelPath" -}}
{{- $m := .Values.model }}
{{- if eq $m.source "huggingface" }}{{ printf "%s/%s" (trimSuffix "/" $m.mountPath) (include "crescent.hfFolder" .) }}
{{- else if eq $m.name "default" }}default
{{- else if eq $m.source "image" }}
{{- fail "model.name must be \"default\" when model.source is \"image\" (the image holds only the default model); set model.source to pvc or hostPath to serve another folder" }}
{{- else }}{{ printf "%s/%s" (trimSuffix "/" $m.mountPath) $m.name }}
{{- end }}
{{- end }}

{{/* The folder a Hugging Face model downloads into: its id with "/" as "--" (the Hub cache's own spelling). */}}
{{- define "crescent.hfFolder" -}}
{{- required "model.huggingface.id is required when model.source is huggingface (e.g. HuggingFaceTB/SmolLM2-135M-Instruct)" .Values.model.huggingface.id | replace "/" "--" }}
{{- end }}

{{/* The model name clients send: model.servedName, else a Hugging Face model's id, else the services' default. */}}
{{- define "crescent.servedName" -}}
{{- if .Values.model.servedName }}{{ .Values.model.servedName }}
{{- else if eq .Values.model.source "huggingface" }}{{ .Values.model.huggingface.id }}
{{- end }}
{{- end }}

{{- define "crescent.internalTokenSecret" -}}
{{- default (printf "%s-internal-token" (include "crescent.fullname" .)) .Values.internalAuth.existingSecret }}
{{- end }}

{{- define "crescent.redisSecret" -}}
{{- default (printf "%s-redis" (include "crescent.fullname" .)) .Values.redis.auth.existingSecret }}
{{- end }}

{{/* Env read from Secrets: the internal token (every crescent service) and the gateway's API key. Args: root, role. */}}
{{- define "crescent.secretEnv" -}}
{{- if .root.Values.internalAuth.enabled }}
- name: CRESCENT_INTERNAL_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "crescent.internalTokenSecret" .root }}
      key: {{ .root.Values.internalAuth.key }}
{{- end }}
{{- if and (eq .role "gateway") .root.Values.gateway.apiKey.existingSecret }}
- name: CRESCENT_API_KEY
  valueFrom:
    secretKeyRef:
      name: {{ .root.Values.gateway.apiKey.existingSecret }}
      key: {{ .root.Values.gateway.apiKey.key }}
{{- end }}
{{- end }}

{{- define "crescent.modelClaimName" -}}
{{- default (printf "%s-models" (include "crescent.fullname" .)) .Values.model.pvc.existingClaim }}
{{- end }}

{{/* Environment: the chart's settings for the role, then the user's `settings` (which win), sorted by name,
     then the user's raw `env` entries (for valueFrom). Args: root, comp, base (dict of CRESCENT_* -> value). */}}
{{- define "crescent.env" -}}
{{- $all := deepCopy .base }}
{{- range $key, $value := .comp.settings }}
{{- $_ := set $all (printf "CRESCENT_%s" (upper $key)) $value }}
{{- end }}
- name: POD_IP
  valueFrom:
    fieldRef:
      fieldPath: status.podIP
{{- range $name, $value := $all }}
- name: {{ $name }}
  value: {{ include "crescent.scalar" $value | quote }}
{{- end }}
{{- include "crescent.secretEnv" . }}
{{- with .comp.env }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Settings every role shares. Args: root, comp, role. */}}
{{- define "crescent.baseEnv" -}}
{{- $base := dict "CRESCENT_HOST" "0.0.0.0" "CRESCENT_PORT" .comp.port "CRESCENT_LOG_LEVEL" .root.Values.logLevel }}
{{- if .comp.metricsPort }}{{ $_ := set $base "CRESCENT_METRICS_PORT" .comp.metricsPort }}{{ end }}
{{- if ne .role "conductor" }}
{{- $_ := set $base "CRESCENT_CONDUCTOR_ADDRESS" (printf "%s:%v" (include "crescent.componentName" (dict "root" .root "role" "conductor")) .root.Values.conductor.port) }}
{{- end }}
{{- toYaml $base }}
{{- end }}

{{/* Soft anti-affinity spreads a role's replicas over nodes unless the user gives an affinity. Args: root, role. */}}
{{- define "crescent.affinity" -}}
{{- if .comp.affinity }}
{{- toYaml .comp.affinity }}
{{- else }}
podAntiAffinity:
  preferredDuringSchedulingIgnoredDuringExecution:
    - weight: 100
      podAffinityTerm:
        topologyKey: kubernetes.io/hostname
        labelSelector:
          matchLabels:
            {{- include "crescent.selectorLabels" . | nindent 12 }}
{{- end }}
{{- end }}

{{/* GPU workers: the device plugin's resource, and the taint GPU node pools usually carry. Args: comp. */}}
{{- define "crescent.resources" -}}
{{- $res := deepCopy (default dict .comp.resources) }}
{{- if gt (int .comp.gpus) 0 }}
{{- $limits := default dict $res.limits }}
{{- $_ := set $limits "nvidia.com/gpu" (int .comp.gpus) }}
{{- $_ := set $res "limits" $limits }}
{{- end }}
{{- toYaml $res }}
{{- end }}

{{- define "crescent.tolerations" -}}
{{- $tol := default list .comp.tolerations }}
{{- if gt (int (default 0 .comp.gpus)) 0 }}
{{- $tol = append $tol (dict "key" "nvidia.com/gpu" "operator" "Exists" "effect" "NoSchedule") }}
{{- end }}
{{- toYaml $tol }}
{{- end }}

{{/* A quantity like 25Gi or 500M in bytes, or -1 when it is not a whole number with a known suffix. */}}
{{- define "crescent.bytes" -}}
{{- $q := toString . }}
{{- $digits := regexFind "^[0-9]+" $q }}
{{- $units := dict "" 1 "k" 1000 "K" 1000 "M" 1000000 "G" 1000000000 "T" 1000000000000 "Ki" 1024 "Mi" 1048576 "Gi" 1073741824 "Ti" 1099511627776 }}
{{- $unit := trimPrefix $digits $q }}
{{- if and $digits (hasKey $units $unit) }}{{ mul (int64 $digits) (get $units $unit) }}{{ else }}-1{{ end }}
{{- end }}

{{/* Histogram bucket bounds (`le` labels) of crescent_gateway_time_to_first_token_seconds and
     crescent_gateway_inter_token_latency_seconds: LATENCY_BUCKETS and TOKEN_GAP_BUCKETS of
     crescent/services/common/metrics.py (a test keeps them equal). */}}
{{- define "crescent.ttftBuckets" -}}
["0.005", "0.01", "0.025", "0.05", "0.075", "0.1", "0.15", "0.2", "0.3", "0.5", "0.75", "1.0", "1.5", "2.0", "3.0", "5.0", "7.5", "10.0", "20.0", "40.0", "80.0"]
{{- end }}
{{- define "crescent.tbtBuckets" -}}
["0.001", "0.0025", "0.005", "0.01", "0.02", "0.03", "0.05", "0.075", "0.1", "0.15", "0.2", "0.3", "0.5", "0.75", "1.0", "2.5", "5.0"]
{{- end }}

{{/* An SLO in seconds as the `le` label of the bucket the alerts count SLO hits in. prometheus_client writes bounds
     the way Python prints floats ("2.0", not "2"). An SLO between bounds would match no series and the alerts would
     stay silent forever, so it fails. Args: key, value, metric, bounds (list of le strings). */}}
{{- define "crescent.sloBucket" -}}
{{- $le := toString .value }}
{{- if not (regexMatch "[.eE]" $le) }}{{ $le = printf "%s.0" $le }}{{ end }}
{{- if not (has $le .bounds) }}
{{- fail (printf "%s (%v) is not a bucket bound of %s, so the SLO alerts could not count misses: pick one of %s (crescent/services/common/metrics.py), or disable metrics.prometheusRule" .key .value .metric (join ", " .bounds)) }}
{{- end }}
{{- $le }}
{{- end }}
