"""Kubernetes: the Helm chart's catalog of stages and profiles (catalog.py), the generator of what derives
from it (generate.py: the chart's schema enums and accumulation table, the ready manifests in k8s/, the
README tables), what the Training Operator and Trainer v2 do with a job (pytorchjob.py, trainjob.py), and
the local runner that executes a rendered PyTorchJob or TrainJob on this machine (local_runner.py). The chart itself ships inside the package as
``dvgt/k8s/chart`` (a link to charts/dvgt in the source tree)."""
