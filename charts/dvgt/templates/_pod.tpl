{{/*
The pod of one replica (Master or Worker): the `pytorch` container runs torchrun on the stage's
config; the exporter runs beside it as a native sidecar (an init container with restartPolicy
Always, so the pod completes when training ends) and reads the metric files through the shared
emptyDir. Arguments: dict root (the chart context), plan (dvgt.plan), replicaType.
*/}}
{{- define "dvgt.podTemplate" -}}
{{- $v := .root.Values -}}
{{- $plan := .plan -}}
{{- $metricsDir := "/metrics" -}}
{{- $devices := dict -}}  {{/* extended resources: requests = limits, quantities as strings */}}
{{- if $plan.gpus }}{{ $_ := set $devices "nvidia.com/gpu" (toString $plan.gpus) }}{{ end -}}
{{- if $v.rdma.enabled }}{{ range $name, $count := $v.rdma.resources }}{{ $_ := set $devices $name (toString $count) }}{{ end }}{{ end -}}
{{- $resources := deepCopy $v.resources -}}
{{- if $devices -}}
{{- $_ := set $resources "limits" (merge (deepCopy $devices) ($resources.limits | default dict)) -}}
{{- $_ := set $resources "requests" (merge (deepCopy $devices) ($resources.requests | default dict)) -}}
{{- end -}}
metadata:
  labels:
    {{- include "dvgt.selectorLabels" .root | nindent 4 }}
    app.kubernetes.io/component: {{ .replicaType }}
    {{- with $v.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with $v.podAnnotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  terminationGracePeriodSeconds: {{ add $v.checkpoint.preemptionBudgetSeconds $v.checkpoint.terminationMarginSeconds }}
  {{- with $v.serviceAccountName }}
  serviceAccountName: {{ . }}
  {{- end }}
  {{- with $v.scheduling.priorityClass }}
  priorityClassName: {{ . }}
  {{- end }}
  securityContext:
    runAsNonRoot: true
    runAsUser: 1000
    runAsGroup: 1000
    fsGroup: 1000
    seccompProfile:
      type: RuntimeDefault
  {{- with $v.imagePullSecrets }}
  imagePullSecrets:
    {{- range . }}
    - name: {{ . }}
    {{- end }}
  {{- end }}
  {{- with $v.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $v.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $v.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- if $v.exporter.enabled }}
  initContainers:
    - name: exporter
      image: {{ include "dvgt.image" (merge (dict "appVersion" .root.Chart.AppVersion) $v.exporter.image) }}
      imagePullPolicy: {{ $v.exporter.image.pullPolicy }}
      restartPolicy: Always
      command: [dvgt, exporter, --host, 0.0.0.0, --port, {{ $v.exporter.port | quote }}, --dir, {{ $metricsDir }}]
      env:
        - name: DVGT_JOB_NAME  # the dvgt_job label of the GPU series
          value: {{ $plan.job }}
        {{- if $plan.gpus }}
        - name: NVIDIA_VISIBLE_DEVICES  # NVML reads the memory of the node's GPUs (no GPU is requested)
          value: all
        - name: NVIDIA_DRIVER_CAPABILITIES
          value: utility
        {{- end }}
      ports:
        - name: metrics
          containerPort: {{ $v.exporter.port }}
      readinessProbe:
        httpGet: {path: /healthz, port: metrics}
        periodSeconds: 10
      livenessProbe:
        httpGet: {path: /healthz, port: metrics}
        periodSeconds: 20
        failureThreshold: 3
      resources:
        {{- toYaml $v.exporter.resources | nindent 8 }}
      securityContext:
        allowPrivilegeEscalation: false
        readOnlyRootFilesystem: true
        capabilities:
          drop: [ALL]
      volumeMounts:
        - name: metrics
          mountPath: {{ $metricsDir }}
  {{- end }}
  containers:
    - name: pytorch
      image: {{ include "dvgt.image" (merge (dict "appVersion" .root.Chart.AppVersion) $v.image) }}
      imagePullPolicy: {{ $v.image.pullPolicy }}
      command: [python, -m, dvgt.train.launch]  # torchrun that exits with what the trainer said (143 on SIGTERM): docs/kubernetes.md
      args:
        {{- toYaml $plan.args | nindent 8 }}
      workingDir: /workspace
      ports:
        - name: pytorchjob-port
          containerPort: 23456
      env:
        - name: DVGT_JOB_NAME
          value: {{ $plan.job }}
        {{- if $v.exporter.enabled }}
        - name: PROMETHEUS_MULTIPROC_DIR
          value: {{ $metricsDir }}
        {{- end }}
        {{- range $name, $value := $v.nccl.env }}
        - name: {{ $name }}
          value: {{ $value | quote }}
        {{- end }}
        {{- if $v.rdma.enabled }}
        {{- range $name, $value := $v.rdma.env }}
        - name: {{ $name }}
          value: {{ $value | quote }}
        {{- end }}
        {{- end }}
        {{- with $v.env }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- with $v.checkpoint.s3Secret }}
      envFrom:
        - secretRef:
            name: {{ . }}
      {{- end }}
      {{- with $resources }}
      resources:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      securityContext:
        allowPrivilegeEscalation: false
        capabilities:
          drop: [ALL]
          {{- if $v.rdma.enabled }}
          add: [IPC_LOCK]
          {{- end }}
      volumeMounts:
        - name: dshm
          mountPath: /dev/shm
        {{- if or $v.data.pvc $v.data.hostPath }}
        - name: data
          mountPath: {{ $v.data.mountPath }}
          readOnly: {{ $v.data.readOnly }}
        {{- end }}
        {{- if $v.exporter.enabled }}
        - name: metrics
          mountPath: {{ $metricsDir }}
        {{- end }}
        - name: spill  # checkpoint.spill_dir: a final checkpoint the store could not take, uploaded at the next start
          mountPath: /spill
  volumes:
    - name: dshm
      emptyDir:
        medium: Memory
        sizeLimit: {{ $v.shmSize }}
    {{- if $v.data.pvc }}
    - name: data
      persistentVolumeClaim:
        claimName: {{ $v.data.pvc }}
        readOnly: {{ $v.data.readOnly }}
    {{- else if $v.data.hostPath }}
    - name: data
      hostPath:
        path: {{ $v.data.hostPath }}
        type: Directory
    {{- end }}
    {{- if $v.exporter.enabled }}
    - name: metrics
      emptyDir: {}
    {{- end }}
    - name: spill
      {{- if $v.checkpoint.spillPvc }}
      persistentVolumeClaim:
        claimName: {{ $v.checkpoint.spillPvc }}
      {{- else }}
      emptyDir: {}
      {{- end }}
{{- end -}}
