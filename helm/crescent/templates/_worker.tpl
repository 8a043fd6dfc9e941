{{/* A prefill or decode worker: Deployment, headless Service, and the optional queue-depth autoscaler.
     Workers are reached by pod IP (they advertise it to the conductor), so the Service is headless: it gives
     DNS and scrape targets, not load balancing. Args: root, role. */}}
{{- define "crescent.worker" -}}
{{- $root := .root }}
{{- $comp := index $root.Values .role }}
{{- $ctx := dict "root" $root "role" .role "comp" $comp }}
{{- $name := include "crescent.componentName" $ctx }}
{{- $base := include "crescent.baseEnv" $ctx | fromYaml }}
{{- $_ := set $base "CRESCENT_ADVERTISE_HOST" "$(POD_IP)" }}
{{- $_ := set $base "CRESCENT_MODEL" (include "crescent.modelPath" $root) }}
{{- with include "crescent.servedName" $root }}{{ $_ := set $base "CRESCENT_SERVED_MODEL_NAME" . }}{{ end }}
{{- if gt (int $comp.gpus) 0 }}{{ $_ := set $base "CRESCENT_DEVICE" "cuda" }}{{ end }}
{{- $engine := (($root.Values.worker | default dict).engine | default "crescent") }}
{{- if ne $engine "crescent" }}{{ $_ := set $base "CRESCENT_ENGINE" $engine }}{{ end }}
{{- /* Triton caches compiled kernels under $HOME by default: the root filesystem is read-only, /tmp is not. */}}
{{- $_ := set $base "TRITON_CACHE_DIR" "/tmp/triton" }}
{{- $_ := set $ctx "base" $base }}
{{- $_ := set $ctx "ports" (list (dict "name" "grpc" "port" $comp.port) (dict "name" "metrics" "port" $comp.metricsPort)) }}
{{- $_ := set $ctx "model" true }}
{{- if and $comp.autoscaling.enabled $comp.keda.enabled }}
{{- fail (printf "%s: enable autoscaling (HPA) or keda, not both: two controllers would fight over replicas" .role) }}
{{- end }}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ $name }}
  labels:
    {{- include "crescent.labels" $ctx | nindent 4 }}
spec:
  {{- if not (or $comp.autoscaling.enabled $comp.keda.enabled) }}
  replicas: {{ $comp.replicas }}
  {{- end }}
  selector:
    matchLabels:
      {{- include "crescent.selectorLabels" $ctx | nindent 6 }}
  template:
    {{- include "crescent.podTemplate" $ctx | trim | nindent 4 }}
---
apiVersion: v1
kind: Service
metadata:
  name: {{ $name }}
  labels:
    {{- include "crescent.labels" $ctx | nindent 4 }}
spec:
  clusterIP: None
  selector:
    {{- include "crescent.selectorLabels" $ctx | nindent 4 }}
  ports:
    - name: grpc
      port: {{ $comp.port }}
      targetPort: grpc
      protocol: TCP
      appProtocol: grpc
    - name: metrics
      port: {{ $comp.metricsPort }}
      targetPort: metrics
      protocol: TCP
{{- if $comp.autoscaling.enabled }}
---
# Queue depth per pod, served to the HPA by prometheus-adapter as a Pods metric.
apiVersion: autoscaling/v2
kind: HorizontalPodAutoscaler
metadata:
  name: {{ $name }}
  labels:
    {{- include "crescent.labels" $ctx | nindent 4 }}
spec:
  scaleTargetRef:
    apiVersion: apps/v1
    kind: Deployment
    name: {{ $name }}
  minReplicas: {{ $comp.autoscaling.minReplicas }}
  maxReplicas: {{ $comp.autoscaling.maxReplicas }}
  metrics:
    - type: Pods
      pods:
        metric:
          name: crescent_worker_requests_waiting
        target:
          type: AverageValue
          averageValue: {{ $comp.autoscaling.targetWaitingPerPod | quote }}
  behavior:
    # Scale down slowly: a worker leaving drops its prefix cache.
    scaleDown:
      stabilizationWindowSeconds: 300
{{- end }}
{{- if $comp.keda.enabled }}
---
apiVersion: keda.sh/v1alpha1
kind: ScaledObject
metadata:
  name: {{ $name }}
  labels:
    {{- include "crescent.labels" $ctx | nindent 4 }}
spec:
  scaleTargetRef:
    name: {{ $name }}
  minReplicaCount: {{ $comp.keda.minReplicas }}
  maxReplicaCount: {{ $comp.keda.maxReplicas }}
  cooldownPeriod: 300
  triggers:
    - type: prometheus
      metadata:
        serverAddress: {{ $comp.keda.serverAddress }}
        # Total queue over this release's {{ .role }} pods; KEDA divides by the threshold to get replicas.
        query: sum(crescent_worker_requests_waiting{role="{{ .role }}", namespace="{{ $root.Release.Namespace }}", pod=~"{{ $name }}-.*"})
        threshold: {{ $comp.keda.targetWaitingPerPod | quote }}
{{- end }}
{{- end }}
