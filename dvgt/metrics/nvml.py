"""Per-GPU memory used/total and utilisation as the device reports them, read through NVML
(PyPI nvidia-ml-py, `import pynvml`). A machine without the NVML library or without a GPU is not an
error: the collector says so once on stderr and reports `dvgt_exporter_gpus 0`."""

from __future__ import annotations

import sys
from collections.abc import Iterator, Mapping

import pynvml
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector


class NvmlCollector(Collector):
    def __init__(self, labels: Mapping[str, str]) -> None:
        self.labels = dict(labels)  # e.g. dvgt_job, node_rank: the exporter's own identity
        self.handles: list = []
        try:
            pynvml.nvmlInit()
            self.handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        except pynvml.NVMLError as error:  # no NVML library, no driver, no GPU
            print(
                f"dvgt exporter: no GPU metrics from NVML ({error}); dvgt_exporter_gpus is 0",
                file=sys.stderr,
                flush=True,
            )

    def collect(self) -> Iterator[GaugeMetricFamily]:
        names = list(self.labels)
        values = list(self.labels.values())
        count = GaugeMetricFamily(
            "dvgt_exporter_gpus", "GPUs the exporter reads through NVML (0: no NVML or no GPU)", labels=names
        )
        count.add_metric(values, len(self.handles))
        yield count
        if not self.handles:
            return
        used = GaugeMetricFamily(
            "dvgt_gpu_memory_used_bytes", "GPU memory in use, as the device reports it (NVML)", labels=names + ["gpu"]
        )
        total = GaugeMetricFamily("dvgt_gpu_memory_total_bytes", "GPU memory size (NVML)", labels=names + ["gpu"])
        busy = GaugeMetricFamily(
            "dvgt_gpu_utilization_ratio",
            "Share of the last sample period in which a kernel ran on the GPU, 0 to 1 (NVML)",
            labels=names + ["gpu"],
        )
        for index, handle in enumerate(self.handles):
            try:
                memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
                utilization = pynvml.nvmlDeviceGetUtilizationRates(handle)
            except pynvml.NVMLError:  # a GPU that fell off the bus: leave it out of this scrape
                continue
            gpu = values + [str(index)]
            used.add_metric(gpu, memory.used)
            total.add_metric(gpu, memory.total)
            busy.add_metric(gpu, utilization.gpu / 100.0)
        yield from (used, total, busy)
