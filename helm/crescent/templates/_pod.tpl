{{/* The pod template every crescent role shares.
     Args: root, role, comp (the role's values), base (dict of CRESCENT_* settings), ports (list of {name, port}),
     http (true: probe HTTP /health, else the gRPC health service), model (true: mount the model volume, and
     download it first when it comes from the Hugging Face Hub), mounts / volumes (extra YAML lists).
     Every pod gets an emptyDir at /tmp: the root filesystem is read-only. */}}
{{- define "crescent.podTemplate" -}}
{{- $root := .root }}
{{- $img := merge (deepCopy (default dict .comp.image)) $root.Values.image }}
{{- $modelVolume := and .model (ne $root.Values.model.source "image") }}
{{- $hf := and $modelVolume (eq $root.Values.model.source "huggingface") }}
{{- $seen := dict }}
{{- range .ports }}
{{- if hasKey $seen (toString .port) }}
{{- fail (printf "%s: port %v is used twice (port, metricsPort and dataPort must differ)" $.role .port) }}
{{- end }}
{{- $_ := set $seen (toString .port) true }}
{{- end }}
metadata:
  labels:
    {{- include "crescent.labels" . | nindent 4 }}
  {{- with .comp.podAnnotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  serviceAccountName: {{ include "crescent.serviceAccountName" $root }}
  automountServiceAccountToken: false
  # Kubernetes would inject CRESCENT_<SERVICE>_PORT=tcp://... for a release named "crescent": those names share
  # the settings' env prefix, so service links are off.
  enableServiceLinks: false
  terminationGracePeriodSeconds: {{ .comp.terminationGracePeriodSeconds }}
  securityContext:
    {{- toYaml $root.Values.podSecurityContext | nindent 4 }}
  {{- with $root.Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .comp.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- $tol := include "crescent.tolerations" . | fromYamlArray }}
  {{- with $tol }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  affinity:
    {{- include "crescent.affinity" . | trim | nindent 4 }}
  {{- if $hf }}
  initContainers:
    {{- include "crescent.hfInitContainer" . | trim | nindent 4 }}
  {{- end }}
  containers:
    - name: {{ .role }}
      image: {{ include "crescent.image" . | quote }}
      imagePullPolicy: {{ $img.pullPolicy }}
      args: ["serve", {{ .role | quote }}]
      env:
        {{- include "crescent.env" . | trim | nindent 8 }}
      ports:
        {{- range .ports }}
        - name: {{ .name }}
          containerPort: {{ .port }}
          protocol: TCP
        {{- end }}
      {{- if .http }}
      # /health answers 503 until ready and while draining: readiness only. Liveness asks whether the process
      # still accepts connections, so a draining gateway is not restarted mid-stream.
      readinessProbe:
        httpGet: {path: /health, port: http}
        periodSeconds: 5
        failureThreshold: 2
      {{- else }}
      # The grpc.health.v1 service says NOT_SERVING until the model/state is loaded and while draining: it gates
      # readiness and startup. Liveness is a TCP check so a draining instance is not restarted mid-request.
      startupProbe:
        grpc: {port: {{ .comp.port }}}
        periodSeconds: 5
        failureThreshold: {{ default 24 .comp.startupFailureThreshold }}
      readinessProbe:
        grpc: {port: {{ .comp.port }}}
        periodSeconds: 5
        failureThreshold: 2
      {{- end }}
      livenessProbe:
        tcpSocket: {port: {{ .comp.port }}}
        initialDelaySeconds: 10
        periodSeconds: 10
        failureThreshold: 6
      resources:
        {{- include "crescent.resources" . | nindent 8 }}
      securityContext:
        {{- toYaml $root.Values.securityContext | nindent 8 }}
      volumeMounts:
        {{- if $modelVolume }}
        - name: models
          mountPath: {{ $root.Values.model.mountPath }}
          readOnly: true
        {{- end }}
        - name: tmp
          mountPath: /tmp
        {{- with .mounts }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
  volumes:
    {{- if $modelVolume }}
    - name: models
      {{- if $hf }}
      emptyDir:
        sizeLimit: {{ $root.Values.model.huggingface.sizeLimit }}
      {{- else if eq $root.Values.model.source "pvc" }}
      persistentVolumeClaim:
        claimName: {{ include "crescent.modelClaimName" $root }}
        readOnly: true
      {{- else }}
      hostPath:
        path: {{ required "model.hostPath.path is required when model.source is hostPath" $root.Values.model.hostPath.path }}
        type: {{ $root.Values.model.hostPath.type }}
      {{- end }}
    {{- end }}
    - name: tmp
      emptyDir:
        sizeLimit: {{ $root.Values.tmp.sizeLimit }}
    {{- if $hf }}
    - name: hf-download
      configMap:
        name: {{ include "crescent.fullname" $root }}-hf-download
    {{- end }}
    {{- with .volumes }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
{{- end }}

{{/* Downloads model.huggingface.id into the pod's models emptyDir before the service starts (files/hf_download.py,
     run by the role's own image's Python). Args: root, comp. */}}
{{- define "crescent.hfInitContainer" -}}
{{- $root := .root }}
{{- $hf := $root.Values.model.huggingface }}
- name: download-model
  image: {{ include "crescent.image" . | quote }}
  imagePullPolicy: {{ (merge (deepCopy (default dict .comp.image)) $root.Values.image).pullPolicy }}
  command: ["python", "/opt/hf-download/hf_download.py"]
  env:
    - name: HF_MODEL_ID
      value: {{ $hf.id | quote }}
    - name: HF_REVISION
      value: {{ $hf.revision | quote }}
    - name: HF_ENDPOINT
      value: {{ $hf.endpoint | quote }}
    - name: HF_FILES
      value: {{ toJson $hf.files | quote }}
    - name: HF_DEST
      value: {{ include "crescent.modelPath" $root | quote }}
    {{- if $hf.tokenSecret.name }}
    - name: HF_TOKEN
      valueFrom:
        secretKeyRef:
          name: {{ $hf.tokenSecret.name }}
          key: {{ $hf.tokenSecret.key }}
    {{- end }}
  resources:
    requests: {cpu: 100m, memory: 256Mi}
    limits: {memory: 512Mi}
  securityContext:
    {{- toYaml $root.Values.securityContext | nindent 4 }}
  volumeMounts:
    - name: tmp
      mountPath: /tmp
    - name: models
      mountPath: {{ $root.Values.model.mountPath }}
    - name: hf-download
      mountPath: /opt/hf-download
      readOnly: true
{{- end }}
