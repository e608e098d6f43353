#!/usr/bin/env bash
# End-to-end check of the chart on a kind cluster, for users' CI (and .github/workflows/e2e-kind.yaml):
# builds both images (the trainer on the CPU torch build), creates a kind cluster, installs the Training
# Operator v1.9 with the restricted init container (docs/training-operator) or Kubeflow Trainer v2, and
# kube-prometheus-stack; installs the shared alert rules once and the dvgt1-demo stage on the cpu-test
# profile (2 pods) in a namespace that enforces the `restricted` Pod Security level; waits for the job to
# succeed and checks that Prometheus scraped dvgt_ metrics of it.
#   usage: [API=pytorchjob|trainjob] [KEEP_CLUSTER=1] scripts/e2e-kind.sh
# Needs docker, kind, kubectl and helm on PATH and network access to GitHub and the Helm and PyTorch indexes.
set -euo pipefail
cd "$(dirname "$0")/.."

API="${API:-pytorchjob}"
CLUSTER="${CLUSTER:-dvgt-e2e}"
NAMESPACE="dvgt-e2e"
JOB="demo"
REGISTRY="e2e.local/dvgt"
VERSION="$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' charts/dvgt/Chart.yaml)"

for tool in docker kind kubectl helm; do
  command -v "$tool" >/dev/null || { echo "e2e-kind: $tool is not on PATH" >&2; exit 2; }
done
case "$API" in pytorchjob | trainjob) ;; *) echo "e2e-kind: API must be pytorchjob or trainjob, not '$API'" >&2; exit 2 ;; esac

step() { printf '\n== %s\n' "$*"; }
cleanup() {
  if [ "${KEEP_CLUSTER:-0}" != 1 ]; then kind delete cluster --name "$CLUSTER" >/dev/null 2>&1 || true; fi
}
trap cleanup EXIT

step "images $REGISTRY/{trainer,exporter}:$VERSION"
docker build -t "$REGISTRY/trainer:$VERSION" --build-arg CUDA_IMAGE=ubuntu:24.04 \
  --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu .
docker build -t "$REGISTRY/exporter:$VERSION" -f images/exporter/Dockerfile .

step "kind cluster $CLUSTER"
kind create cluster --name "$CLUSTER" --wait 180s
kind load docker-image --name "$CLUSTER" "$REGISTRY/trainer:$VERSION" "$REGISTRY/exporter:$VERSION"

if [ "$API" = trainjob ]; then
  step "Kubeflow Trainer v2"
  kubectl apply --server-side -k "github.com/kubeflow/trainer.git/manifests/overlays/manager?ref=v2.3.0"
  kubectl -n kubeflow-system wait --for=condition=Available deployment --all --timeout=300s
else
  step "Kubeflow Training Operator v1.9 (restricted init container)"
  kubectl apply --server-side -k docs/training-operator
  kubectl -n kubeflow rollout status deployment/training-operator --timeout=300s
fi

step "kube-prometheus-stack (release kps; kube-state-metrics with the pods' app.kubernetes.io labels)"
helm repo add prometheus-community https://prometheus-community.github.io/helm-charts >/dev/null
helm upgrade --install kps prometheus-community/kube-prometheus-stack -n monitoring --create-namespace \
  --wait --timeout 10m --set grafana.enabled=false --set alertmanager.enabled=false \
  --set prometheus.prometheusSpec.scrapeInterval=10s \
  --set 'kube-state-metrics.metricLabelsAllowlist[0]=pods=[app.kubernetes.io/name\,app.kubernetes.io/instance]'

step "namespace $NAMESPACE (Pod Security: restricted, enforced)"
kubectl create namespace "$NAMESPACE"
kubectl label namespace "$NAMESPACE" pod-security.kubernetes.io/enforce=restricted \
  pod-security.kubernetes.io/enforce-version=latest

step "the shared rules and dashboard, then the demo job ($API)"
helm install dvgt-monitoring charts/dvgt -n "$NAMESPACE" --set monitoring.only=true \
  --set monitoring.prometheusRule.labels.release=kps
helm install "$JOB" charts/dvgt -n "$NAMESPACE" --wait --timeout 5m \
  --set api="$API" --set stage=dvgt1-demo --set profile=cpu-test --set nodes=2 --set gpusPerNode=1 \
  --set image.registry= --set image.repository="$REGISTRY/trainer" --set image.pullPolicy=Never \
  --set exporter.image.registry= --set exporter.image.repository="$REGISTRY/exporter" \
  --set exporter.image.pullPolicy=Never --set data.pvc= --set checkpoint.s3Secret= \
  --set checkpoint.uri=/workspace/checkpoints --set monitoring.shared=true \
  --set monitoring.podMonitor.labels.release=kps --set monitoring.podMonitor.interval=5s \
  --set networkPolicy.enabled=true

step "waiting for $JOB to succeed"
if [ "$API" = trainjob ]; then
  kubectl -n "$NAMESPACE" wait "trainjob/$JOB" --for=condition=Complete --timeout=1200s
else
  kubectl -n "$NAMESPACE" wait "pytorchjob/$JOB" --for=condition=Succeeded --timeout=1200s
fi

step "Prometheus scraped dvgt_ metrics of $JOB"
query='max_over_time(dvgt_training_completed{namespace="'"$NAMESPACE"'",dvgt_job="'"$JOB"'"}[1h])'
prometheus="$(kubectl -n monitoring get pods -l app.kubernetes.io/name=prometheus -o name | head -n 1)"
result="$(kubectl -n monitoring exec "$prometheus" -c prometheus -- \
  wget -qO- --post-data="query=${query}" http://127.0.0.1:9090/api/v1/query)"
echo "$result"
case "$result" in
  *'"value":'*'"1"]'*) echo "e2e-kind: OK ($API)" ;;
  *) echo "e2e-kind: Prometheus has no completed dvgt_training_completed series for $JOB" >&2; exit 1 ;;
esac
