{{/*
Names, labels and the job plan. The plan is everything the PyTorchJob derives from the values and
files/catalog.yaml (stage, profile, node count, accumulation, trainer arguments), computed once here
so that the templates only place it. dvgt/k8s (Python) documents and tests the same rule.
*/}}

{{/* The job name: the release name, a DNS-1035 label (the Training Operator's admission rule). */}}
{{- define "dvgt.jobName" -}}
{{- if not (regexMatch "^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$" .Release.Name) -}}
{{- fail (printf "release name '%s' is not a valid PyTorchJob name: use at most 63 lower-case letters, digits and '-', starting with a letter and ending with a letter or digit" .Release.Name) -}}
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

{{- define "dvgt.image" -}}
{{- printf "%s:%s" .repository (.tag | default $.appVersion) -}}
{{- end -}}

{{/*
The plan as JSON (use: include "dvgt.plan" . | fromJson).
  accumSteps = ceil(imagesPerStep / maxImagesPerForward): the trainer splits each optimizer step's
  imagesPerStep images per GPU (config max_img_per_gpu) into accum_steps forward passes.
*/}}
{{- define "dvgt.plan" -}}
{{- $catalog := .Files.Get "files/catalog.yaml" | fromYaml -}}
{{- $stage := get $catalog.stages .Values.stage -}}
{{- $profile := get $catalog.profiles .Values.profile -}}
{{- $job := include "dvgt.jobName" . -}}
{{- $nodes := .Values.nodes | default $stage.nodes | int -}}
{{- $perStep := .Values.imagesPerStep | default $stage.imagesPerStep | int -}}
{{- $perForward := .Values.maxImagesPerForward | default $profile.maxImagesPerForward | int -}}
{{- $accum := div (add $perStep $perForward -1) $perForward -}}
{{- $minAvailable := .Values.scheduling.minAvailable | default $nodes | int -}}
{{- if gt $minAvailable $nodes -}}
{{- fail (printf "scheduling.minAvailable (%d) is more than the job's %d pod(s) (nodes): lower it or leave it null" $minAvailable $nodes) -}}
{{- end -}}
{{- $uri := printf "%s/%s" (trimSuffix "/" .Values.checkpoint.uri) $job -}}
{{- /* torchrun waits --shutdown-timeout for its workers after SIGTERM (default 30 s): give them the checkpoint budget */ -}}
{{- $args := list (printf "--nproc-per-node=%d" (int .Values.gpusPerNode))
      (printf "--shutdown-timeout=%d" (int .Values.checkpoint.preemptionBudgetSeconds)) "-m" "dvgt.train" (printf "--config=%s" $stage.config)
      (printf "accum_steps=%d" $accum) (printf "checkpoint.uri=%s" $uri)
      (printf "checkpoint.preemption_budget_s=%d" (int .Values.checkpoint.preemptionBudgetSeconds)) "checkpoint.spill_dir=/spill" -}}
{{- if .Values.imagesPerStep -}}
{{- $args = append $args (printf "max_img_per_gpu=%d" $perStep) -}}
{{- end -}}
{{- $args = concat $args $profile.overrides .Values.overrides -}}
{{- dict "job" $job "stage" $stage "profile" $profile "nodes" $nodes "accumSteps" $accum "minAvailable" $minAvailable
      "gpus" (ternary (int .Values.gpusPerNode) 0 $profile.gpu) "checkpointUri" $uri "args" $args | toJson -}}
{{- end -}}
