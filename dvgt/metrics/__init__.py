"""Prometheus metrics of a training run (see docs/metrics.md).

    labels.py      the labels every series carries (job, stage, node rank, local rank) and why they are named so
    multiproc.py   the folder the trainer's processes share with the exporter, and its stale-file clean-up
    training.py    TrainingMetrics: what the trainer calls once per step and per checkpoint
    nvml.py        per-GPU memory and utilisation read from NVML (exporter side)
    exporter.py    `dvgt exporter`: /metrics and /healthz over HTTP, without importing torch

This package's __init__ imports nothing, so the exporter never pulls in torch.
"""
