{{/*
Kubeflow Trainer v2 (api: trainjob). The pods are the PyTorchJob's pods: "dvgt.podTemplate" (_pod.tpl)
renders them for both kinds, and the helpers below only adapt that one pod to Trainer v2's layout:
  - the trainer container is named `node` (the torch plugin sets PET_* and the TrainJob's trainer fields on
    the container `node` of the replicatedJob labelled trainjob-ancestor-step: trainer), and declares no
    port (the plugin adds 29500);
  - the pod is a Job's pod: restartPolicy OnFailure (values OnFailure) or Never (ExitCode, Never);
  - the job's name reaches the pods through the JobSet's pod label (a runtime serves many jobs).
Then TrainJob.spec.trainer carries what its fields are for (image, command, args, env of `extraEnv`, resources,
numNodes, numProcPerNode) and the runtime everything else.
*/}}

{{/* The runtime the TrainJob references. */}}
{{- define "dvgt.runtimeName" -}}
{{- .Values.trainJob.runtime.name | default (include "dvgt.jobName" .) -}}
{{- end -}}

{{/* The runtime's labels: the chart's, without the stage and profile (a runtime serves every stage). */}}
{{- define "dvgt.runtimeLabels" -}}
{{ include "dvgt.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: runtime
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
trainer.kubeflow.org/framework: torch
{{- end -}}

{{/* What a PyTorchJob value cannot mean for a TrainJob: refused with the fix, before anything is rendered. */}}
{{- define "dvgt.trainJobChecks" -}}
{{- $v := .root.Values -}}
{{- if $v.scheduling.minAvailable -}}
{{- fail "scheduling.minAvailable is a PyTorchJob setting; with api=trainjob the gang is every pod: set trainJob.podGroupPolicy (coscheduling or volcano) and leave minAvailable null" -}}
{{- end -}}
{{- if and $v.scheduling.queue (ne $v.trainJob.podGroupPolicy "volcano") -}}
{{- fail "scheduling.queue (a Volcano queue) needs trainJob.podGroupPolicy=volcano with api=trainjob; for Kueue use scheduling.kueueQueue" -}}
{{- end -}}
{{- if and $v.data.check.enabled $v.trainJob.runtime.name -}}
{{- fail "data.check.enabled puts this stage's `dvgt data check` into the runtime, but trainJob.runtime.name shares the runtime between stages: leave trainJob.runtime.name empty (a runtime per job) or data.check.enabled false (the trainer runs the quick check itself)" -}}
{{- end -}}
{{- /* JobSet names the pods <job>-node-0-<index>-<5 characters>, a DNS label of at most 63 [jobset webhook] */ -}}
{{- $longest := add (len .plan.job) (len "-node-0-") (len (toString (sub .plan.nodes 1))) 6 -}}
{{- if gt $longest 63 -}}
{{- fail (printf "TrainJob name '%s' is too long for %d node(s): its pods are named %s-node-0-<index>-<5 characters>, at most 63; use at most %d characters" .plan.job (int .plan.nodes) .plan.job (sub (len .plan.job) (sub $longest 63))) -}}
{{- end -}}
{{- end -}}

{{/* The job's name from the JobSet's pod label (the JobSet is named after the TrainJob). */}}
{{- define "dvgt.jobNameFromPod" -}}
{{- dict "name" "DVGT_JOB_NAME" "valueFrom" (dict "fieldRef" (dict "fieldPath" "metadata.labels['jobset.sigs.k8s.io/jobset-name']")) | toJson -}}
{{- end -}}

{{/* The pod as JSON (use: include "dvgt.trainJobPod" (dict "root" . "plan" $plan) | fromJson). */}}
{{- define "dvgt.trainJobPod" -}}
{{- $pod := include "dvgt.podTemplate" (dict "root" .root "plan" .plan "replicaType" "node") | fromYaml -}}
{{- $_ := set $pod.spec "restartPolicy" (ternary "OnFailure" "Never" (eq .root.Values.restartPolicy "OnFailure")) -}}
{{- range $pod.spec.containers -}}
{{- if eq .name "pytorch" -}}
{{- $_ := set . "name" "node" -}}
{{- $_ := unset . "ports" -}}
{{- end -}}
{{- end -}}
{{- toJson $pod -}}
{{- end -}}
