{{/*
Names, labels and the job plan. The plan is everything the job (PyTorchJob or TrainJob) derives from the values and
files/catalog.yaml (stage, profile, node count, accumulation, trainer arguments), computed once here
so that the templates only place it. dvgt/k8s (Python) documents and tests the same rule.
*/}}

{{/* The job name: the release name, a DNS-1035 label (the admission rule of both PyTorchJob and TrainJob). */}}
{{- define "dvgt.jobName" -}}
{{- if not (regexMatch "^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$" .Release.Name) -}}
{{- fail (printf "release name '%s' is not a valid %s name: use at most 63 lower-case letters, digits and '-', starting with a letter and ending with a letter or digit" .Release.Name (ternary "TrainJob" "PyTorchJob" (eq .Values.api "trainjob"))) -}}
{{- end -}}
{{- .Release.Name -}}
{{- end -}}

{{- define "dvgt.selectorLabels" -}}
app.kubernetes.io/name: dvgt
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "dvgt.labels" -}}
{{ include "dvgt.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
dvgt.io/stage: {{ .Values.stage }}
dvgt.io/profile: {{ .Values.profile }}
{{- end -}}

{{/* The job's labels: the chart's, Kueue's queue and workload priority (either kind), and jobLabels. */}}
{{- define "dvgt.jobLabels" -}}
{{ include "dvgt.labels" . }}
{{- with .Values.jobLabels }}
{{ toYaml . }}
{{- end }}
{{- with .Values.scheduling.kueueQueue }}
kueue.x-k8s.io/queue-name: {{ . }}
{{- end }}
{{- with .Values.scheduling.kueuePriorityClass }}
kueue.x-k8s.io/priority-class: {{ . }}
{{- end }}
{{- end -}}

{{/* An image reference: [registry/]repository, then @digest or :tag (default the chart's appVersion). */}}
{{- define "dvgt.image" -}}
{{- $name := ternary (printf "%s/%s" .registry .repository) .repository (ne (.registry | default "") "") -}}
{{- if .digest -}}
{{- printf "%s@%s" $name .digest -}}
{{- else -}}
{{- printf "%s:%s" $name (.tag | default $.appVersion) -}}
{{- end -}}
{{- end -}}

{{/* The pods' ServiceAccount: the one the chart creates, else the named one ("" = the namespace's default). */}}
{{- define "dvgt.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- .Values.serviceAccount.name | default (include "dvgt.jobName" .) -}}
{{- else -}}
{{- .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* Quantities the sizing rule adds up, in MiB: "64Gi" -> 65536, "512Mi" -> 512 (the schema allows only these units). */}}
{{- define "dvgt.mebibytes" -}}
{{- if hasSuffix "Gi" . }}{{ mul (trimSuffix "Gi" .) 1024 }}{{ else }}{{ trimSuffix "Mi" . }}{{ end -}}
{{- end -}}

{{/* MiB -> a quantity: "64Gi" when whole GiB, else "600Mi". */}}
{{- define "dvgt.quantity" -}}
{{- if eq (mod . 1024) 0 }}{{ div . 1024 }}Gi{{ else }}{{ . }}Mi{{ end -}}
{{- end -}}

{{/*
Volumes: every extra mount names a volume the pod has, and extraVolumes reuse no name of the chart's.
(JSON Schema cannot compare two values, so this check runs first, before anything is rendered.)
*/}}
{{- define "dvgt.volumeChecks" -}}
{{- $chart := list "dshm" "workspace" "tmp" -}}
{{- if or .Values.data.pvc .Values.data.hostPath }}{{ $chart = append $chart "data" }}{{ end -}}
{{- if hasPrefix "s3://" .Values.data.root }}{{ $chart = append $chart "data-cache" }}{{ end -}}
{{- if .Values.exporter.enabled }}{{ $chart = append $chart "metrics" }}{{ end -}}
{{- $volumes := $chart -}}
{{- range $i, $volume := .Values.extraVolumes -}}
{{- if has $volume.name $volumes -}}
{{- fail (printf "extraVolumes[%d]: the volume name '%s' is taken (the chart's volumes: %s); choose another name" $i $volume.name (join ", " $chart)) -}}
{{- end -}}
{{- $volumes = append $volumes $volume.name -}}
{{- end -}}
{{- range $field := list "extraVolumeMounts" "extraContainers" "extraInitContainers" -}}
{{- range $i, $item := get $.Values $field -}}
{{- range $j, $mount := (eq $field "extraVolumeMounts" | ternary (list $item) ($item.volumeMounts | default list)) -}}
{{- if not (has $mount.name $volumes) -}}
{{- $where := eq $field "extraVolumeMounts" | ternary (printf "%s[%d]" $field $i) (printf "%s[%d].volumeMounts[%d]" $field $i $j) -}}
{{- fail (printf "%s mounts the volume '%s', which the pod does not have: add it to extraVolumes (the pod's volumes: %s)" $where $mount.name (join ", " $volumes)) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/*
The plan as JSON (use: include "dvgt.plan" . | fromJson).
  accumSteps = ceil(imagesPerStep / maxImagesPerForward): the trainer splits each optimizer step's
  imagesPerStep images per GPU (config max_img_per_gpu) into accum_steps forward passes.
  processes = gpusPerNode / the profile's gpusPerProcess: torchrun processes per pod (nprocPerNode).
  resources, shmSize, workspaceSize: the sizing rule of files/catalog.yaml (host), under the values that override it.
*/}}
{{- define "dvgt.plan" -}}
{{- $catalog := .Files.Get "files/catalog.yaml" | fromYaml -}}
{{- $stage := get $catalog.stages .Values.stage -}}
{{- $profile := get $catalog.profiles .Values.profile -}}
{{- $job := include "dvgt.jobName" . -}}
{{- $nodes := .Values.nodes | default $stage.nodes | int -}}
{{- $perStep := .Values.imagesPerStep | default $stage.imagesPerStep | int -}}
{{- $perForward := .Values.maxImagesPerForward | default $profile.maxImagesPerForward | int -}}
{{- /* a profile with a device map: each process drives gpusPerProcess GPUs */ -}}
{{- $gpusPerProcess := $profile.gpusPerProcess | default 1 | int -}}
{{- if mod (int .Values.gpusPerNode) $gpusPerProcess -}}
{{- fail (printf "gpusPerNode (%d) is not a multiple of profile %s's gpusPerProcess (%d): set gpusPerNode to a multiple of %d" (int .Values.gpusPerNode) .Values.profile $gpusPerProcess $gpusPerProcess) -}}
{{- end -}}
{{- if and $profile.model (ne $profile.model $stage.model) -}}
{{- fail (printf "profile %s places the parts of a %s model, but stage %s trains %s: pick another profile" .Values.profile $profile.model .Values.stage $stage.model) -}}
{{- end -}}
{{- $processes := div (int .Values.gpusPerNode) $gpusPerProcess -}}
{{- $accum := div (add $perStep $perForward -1) $perForward -}}
{{- $minAvailable := .Values.scheduling.minAvailable | default $nodes | int -}}
{{- if gt $minAvailable $nodes -}}
{{- fail (printf "scheduling.minAvailable (%d) is more than the job's %d pod(s) (nodes): lower it or leave it null" $minAvailable $nodes) -}}
{{- end -}}
{{- include "dvgt.volumeChecks" . -}}
{{- $uri := printf "%s/%s" (trimSuffix "/" .Values.checkpoint.uri) $job -}}
{{- /* torchrun waits --shutdown-timeout for its workers after SIGTERM (default 30 s): give them the checkpoint budget */ -}}
{{- $trainerArgs := list (printf "--config=%s" $stage.config)
      (printf "accum_steps=%d" $accum) (printf "checkpoint.uri=%s" $uri)
      (printf "checkpoint.preemption_budget_s=%d" (int .Values.checkpoint.preemptionBudgetSeconds)) "checkpoint.spill_dir=/spill" -}}
{{- if .Values.imagesPerStep -}}
{{- $trainerArgs = append $trainerArgs (printf "max_img_per_gpu=%d" $perStep) -}}
{{- end -}}
{{- /* an s3:// data root: its files are cached in the data-cache emptyDir, the trainer keeping them within 90% of it */ -}}
{{- $dataCacheMi := 0 -}}
{{- if .Values.data.root -}}
{{- $trainerArgs = append $trainerArgs (printf "data.root=%s" .Values.data.root) -}}
{{- end -}}
{{- if hasPrefix "s3://" .Values.data.root -}}
{{- $dataCacheMi = include "dvgt.mebibytes" .Values.data.s3CacheSize | int -}}
{{- $trainerArgs = concat $trainerArgs (list "data.s3_cache.dir=/data-cache" (printf "data.s3_cache.max_gib=%.2f" (divf (mulf $dataCacheMi 0.9) 1024))) -}}
{{- end -}}
{{- $trainerArgs = concat $trainerArgs $profile.overrides .Values.overrides -}}
{{- $args := concat (list (printf "--nproc-per-node=%d" $processes)
      (printf "--shutdown-timeout=%d" (int .Values.checkpoint.preemptionBudgetSeconds)) "-m" "dvgt.train") $trainerArgs -}}
{{- /* the sizing rule (files/catalog.yaml host): per pod, P processes of I images per forward pass */ -}}
{{- $host := merge (deepCopy ($profile.host | default dict)) $catalog.host -}}
{{- $shmMi := ternary (include "dvgt.mebibytes" (toString .Values.shmSize) | int) (mul $processes $perForward $host.shmMiBPerImage) (not (empty .Values.shmSize)) -}}
{{- $workspaceMi := ternary (include "dvgt.mebibytes" (toString .Values.workspaceSize) | int) (mul $processes $host.workspaceGiBPerProcess 1024) (not (empty .Values.workspaceSize)) -}}
{{- $tmpMi := include "dvgt.mebibytes" .Values.tmpSize | int -}}
{{- $sized := dict "cpu" (toString (mul $processes $host.cpuPerProcess))
      "memory" (include "dvgt.quantity" (add (mul $processes $host.memoryGiBPerProcess 1024) $shmMi | int))
      "ephemeral-storage" (include "dvgt.quantity" (add $workspaceMi $tmpMi $dataCacheMi 1024 | int)) -}}
{{- $devices := dict -}}  {{- /* extended resources: requests = limits, quantities as strings */ -}}
{{- if $profile.gpu }}{{ $_ := set $devices "nvidia.com/gpu" (toString (int .Values.gpusPerNode)) }}{{ end -}}
{{- if .Values.rdma.enabled }}{{ range $name, $count := .Values.rdma.resources }}{{ $_ := set $devices $name (toString $count) }}{{ end }}{{ end -}}
{{- $resources := dict -}}
{{- range $kind := list "requests" "limits" -}}
{{- $given := get $.Values.resources $kind | default dict -}}
{{- $_ := set $resources $kind (merge (deepCopy $devices) (deepCopy $given) (deepCopy $sized)) -}}
{{- end -}}
{{- dict "job" $job "stage" $stage "profile" $profile "nodes" $nodes "accumSteps" $accum "minAvailable" $minAvailable
      "gpus" (ternary (int .Values.gpusPerNode) 0 $profile.gpu) "processes" $processes "checkpointUri" $uri "args" $args "trainerArgs" $trainerArgs "resources" $resources
      "shmSize" (include "dvgt.quantity" $shmMi) "workspaceSize" (include "dvgt.quantity" $workspaceMi)
      "tmpSize" (include "dvgt.quantity" $tmpMi) "dataCacheSize" (ternary (include "dvgt.quantity" $dataCacheMi) "" (gt $dataCacheMi 0)) | toJson -}}
{{- end -}}

{{/* The rules and dashboard: named after the release, or `dvgt` when installed once for all jobs (monitoring.only). */}}
{{- define "dvgt.monitoringName" -}}
{{- if .Values.monitoring.only }}dvgt{{ else }}{{ include "dvgt.jobName" . }}{{ end -}}
{{- end -}}

{{- define "dvgt.monitoringLabels" -}}
{{- if .Values.monitoring.only -}}
{{ include "dvgt.selectorLabels" . }}
app.kubernetes.io/component: monitoring
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- else -}}
{{ include "dvgt.labels" . }}
{{- end -}}
{{- end -}}
