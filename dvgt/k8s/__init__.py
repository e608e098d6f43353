"""Kubernetes: the Helm chart's catalog of stages and profiles (catalog.py), the generator of the
chart's schema enums and the ready manifests in k8s/ (generate.py), and the local runner that executes
a rendered PyTorchJob on this machine (local_runner.py). The chart itself ships inside the package as
``dvgt/k8s/chart`` (a link to charts/dvgt in the source tree)."""
