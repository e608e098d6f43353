{{/*
The pod of one replica (Master or Worker): the `pytorch` container runs torchrun (through
dvgt.train.launch, whose exit code tells the restart policy the truth) on the stage's config; the exporter runs beside it as a native sidecar (an init container with restartPolicy
Always, so the pod completes when training ends) and reads the metric files through the shared
emptyDir. The root filesystem is read-only: the trainer writes into emptyDirs at /workspace (its
working directory: logs, TensorBoard), /tmp (HOME, torch's caches) and /dev/shm (data-loader workers).
Pod Security Standard `restricted` holds by default (tests/pss.py checks every render).
Arguments: dict root (the chart context), plan (dvgt.plan), replicaType.
*/}}
{{- define "dvgt.podTemplate" -}}
{{- $v := .root.Values -}}
{{- $plan := .plan -}}
{{- $metricsDir := "/metrics" -}}
{{- $containerSecurity := deepCopy $v.securityContext -}}
{{- if $v.rdma.enabled -}}  {{/* RDMA pins memory: IPC_LOCK (allowed by the `baseline` level, not by `restricted`) */}}
{{- $capabilities := deepCopy ($containerSecurity.capabilities | default dict) -}}
{{- $_ := set $capabilities "add" (append ($capabilities.add | default list) "IPC_LOCK" | uniq) -}}
{{- $_ := set $containerSecurity "capabilities" $capabilities -}}
{{- end -}}
metadata:
  labels:
    {{- include "dvgt.selectorLabels" .root | nindent 4 }}
    app.kubernetes.io/component: {{ .replicaType }}
    {{- with $v.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  annotations:
    # checkov (tests/test_security.py) passes the pods but for these, each a choice:
    # CKV_K8S_8/9 probes: the trainer serves nothing to probe; a liveness kill in a long step or a final
    #   checkpoint would cost a restart. DvgtTrainingStalled watches its progress, the exporter has probes.
    checkov.io/skip1: CKV_K8S_8=the trainer serves nothing; DvgtTrainingStalled watches it
    checkov.io/skip2: CKV_K8S_9=the trainer serves nothing; DvgtTrainingStalled watches it
    # CKV_K8S_15 pullPolicy Always: multi-GB images under immutable release tags; image.digest pins them.
    checkov.io/skip3: CKV_K8S_15=immutable release tags or image.digest; Always re-pulls GBs
    # CKV_K8S_43 digest: image.digest / exporter.image.digest pin one; the default is the release tag.
    checkov.io/skip4: CKV_K8S_43=set image.digest to pin; the default is the signed release tag
    # CKV_K8S_35 secrets as env: boto3 reads the S3 keys from env (checkpoint.s3Secret); with IRSA /
    #   workload identity (serviceAccount.annotations) set checkpoint.s3Secret="" and there is none.
    checkov.io/skip5: CKV_K8S_35=boto3 reads AWS_* env; use serviceAccount.annotations for keyless S3
    {{- with $v.podAnnotations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  terminationGracePeriodSeconds: {{ add $v.checkpoint.preemptionBudgetSeconds $v.checkpoint.terminationMarginSeconds }}
  {{- with include "dvgt.serviceAccountName" .root }}
  serviceAccountName: {{ . }}
  {{- end }}
  automountServiceAccountToken: {{ $v.serviceAccount.automountToken }}
  {{- with $v.priorityClassName }}
  priorityClassName: {{ . }}
  {{- end }}
  {{- with $v.schedulerName }}
  schedulerName: {{ . }}
  {{- end }}
  securityContext:
    {{- toYaml $v.podSecurityContext | nindent 4 }}
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
  {{- with $v.topologySpreadConstraints }}
  topologySpreadConstraints:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- if or $v.data.check.enabled $v.exporter.enabled $v.extraInitContainers }}
  initContainers:
    {{- if $v.data.check.enabled }}
    - name: data-check  # `dvgt data check` of the trees the stage reads, before the trainer starts (docs/data.md)
      image: {{ include "dvgt.image" (merge (dict "appVersion" .root.Chart.AppVersion) $v.image) }}
      imagePullPolicy: {{ $v.image.pullPolicy }}
      command: [dvgt, data, check]
      args:
        {{- toYaml (concat $plan.trainerArgs (ternary (list "--deep") list $v.data.check.deep)) | nindent 8 }}
      workingDir: /workspace
      env:
        - name: HOME
          value: /tmp
        {{- with $v.extraEnv }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- if or $v.checkpoint.s3Secret $v.envFrom }}
      envFrom:
        {{- with $v.checkpoint.s3Secret }}
        - secretRef:
            name: {{ . }}
        {{- end }}
        {{- with $v.envFrom }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- end }}
      resources:
        {{- toYaml $v.data.check.resources | nindent 8 }}
      securityContext:
        {{- toYaml $v.securityContext | nindent 8 }}
      volumeMounts:
        - name: workspace
          mountPath: /workspace
        - name: tmp
          mountPath: /tmp
        {{- if or $v.data.pvc $v.data.hostPath }}
        - name: data
          mountPath: {{ $v.data.mountPath }}
          readOnly: {{ $v.data.readOnly }}
        {{- end }}
        {{- if $plan.dataCacheSize }}
        - name: data-cache  # the check reads the parquets of an s3:// root through the node cache the trainer then reuses
          mountPath: /data-cache
        {{- end }}
        {{- with $v.extraVolumeMounts }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
    {{- end }}
    {{- if $v.exporter.enabled }}
    - name: exporter
      image: {{ include "dvgt.image" (merge (dict "appVersion" .root.Chart.AppVersion) $v.exporter.image) }}
      imagePullPolicy: {{ $v.exporter.image.pullPolicy }}
      restartPolicy: Always
      command: [dvgt, exporter, --host, 0.0.0.0, --port, {{ $v.exporter.port | quote }}, --dir, {{ $metricsDir }}]
      env:
        - name: DVGT_JOB_NAME  # the dvgt_job label of the GPU series
          value: {{ $plan.job }}
        {{- if and $plan.gpus $v.exporter.nvmlAllGpus }}
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
        {{- toYaml $v.securityContext | nindent 8 }}
      volumeMounts:
        - name: metrics
          mountPath: {{ $metricsDir }}
    {{- end }}
    {{- with $v.extraInitContainers }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
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
        - name: HOME  # the root filesystem is read-only: caches (torch, Triton, matplotlib) go to the /tmp emptyDir
          value: /tmp
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
        {{- with $v.extraEnv }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- if or $v.checkpoint.s3Secret $v.envFrom }}
      envFrom:
        {{- with $v.checkpoint.s3Secret }}
        - secretRef:
            name: {{ . }}
        {{- end }}
        {{- with $v.envFrom }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- end }}
      resources:
        {{- toYaml $plan.resources | nindent 8 }}
      securityContext:
        {{- toYaml $containerSecurity | nindent 8 }}
      volumeMounts:
        - name: dshm
          mountPath: /dev/shm
        - name: workspace
          mountPath: /workspace
        - name: tmp
          mountPath: /tmp
        {{- if or $v.data.pvc $v.data.hostPath }}
        - name: data
          mountPath: {{ $v.data.mountPath }}
          readOnly: {{ $v.data.readOnly }}
        {{- end }}
        {{- if $plan.dataCacheSize }}
        - name: data-cache  # data.s3_cache.dir: the files of the s3:// data root, shared by the pod's ranks and loader workers
          mountPath: /data-cache
        {{- end }}
        {{- if $v.exporter.enabled }}
        - name: metrics
          mountPath: {{ $metricsDir }}
        {{- end }}
        - name: spill  # checkpoint.spill_dir: a final checkpoint the store could not take, uploaded at the next start
          mountPath: /spill
        {{- with $v.extraVolumeMounts }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
    {{- with $v.extraContainers }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  volumes:
    - name: dshm
      emptyDir:
        medium: Memory
        sizeLimit: {{ $plan.shmSize }}
    - name: workspace
      emptyDir:
        sizeLimit: {{ $plan.workspaceSize }}
    - name: tmp
      emptyDir:
        sizeLimit: {{ $plan.tmpSize }}
    {{- if $v.data.pvc }}
    - name: data
      persistentVolumeClaim:
        claimName: {{ $v.data.pvc }}
        readOnly: {{ $v.data.readOnly }}
    {{- else if $v.data.hostPath }}
    - name: data  # hostPath: not allowed by the `restricted` or `baseline` Pod Security levels
      hostPath:
        path: {{ $v.data.hostPath }}
        type: Directory
    {{- end }}
    {{- if $plan.dataCacheSize }}
    - name: data-cache
      emptyDir:
        sizeLimit: {{ $plan.dataCacheSize }}
    {{- end }}
    {{- if $v.exporter.enabled }}
    - name: metrics
      emptyDir:
        sizeLimit: 256Mi
    {{- end }}
    - name: spill
      {{- if $v.checkpoint.spillPvc }}
      persistentVolumeClaim:
        claimName: {{ $v.checkpoint.spillPvc }}
      {{- else }}
      emptyDir: {}  # counts against the pod's ephemeral-storage: full-size runs set checkpoint.spillPvc
      {{- end }}
    {{- with $v.extraVolumes }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
{{- end -}}
