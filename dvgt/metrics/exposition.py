"""The trainer's metric files merged into the Prometheus text format, fast enough for a 64-rank pod
(docs/metrics.md has the numbers).

prometheus-client's MultiProcessCollector re-parses every series' JSON key and rebuilds every
sample on each scrape, and its text writer escapes every label of every sample again: about
80 ms for the 2,500 samples of 64 ranks. The series of a run hardly change from one scrape to the
next, only their values do, so `MetricFiles` parses a key once and renders its sample's text once
(kept while the key is in some file), and a scrape only reads the values (prometheus-client's
MmapedDict) and adds them up with the library's merge rules for the kinds the trainer writes:
counters and histograms summed over processes, gauges in `mostrecent` mode (the newest write
wins). A folder holding any other kind (another gauge mode, a summary) is rendered by the library
itself. tests/test_metrics.py checks both give the same samples.
"""

from __future__ import annotations

import glob
import json
import os
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.mmap_dict import MmapedDict
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.utils import floatToGoString

FAST_KINDS = {"counter", "histogram", "gauge_mostrecent"}  # file name prefixes merged here


def _labels_text(labels: list[tuple[str, str]]) -> str:
    escaped = (value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"") for _, value in labels)
    return ",".join(f'{name}="{value}"' for (name, _), value in zip(labels, escaped))


@dataclass(frozen=True)
class Series:
    """One key of a metric file, parsed: its family, and the text before its value."""

    family: str  # the metric family (HELP/TYPE name without _total)
    kind: str  # counter | histogram | gauge
    help: str
    text: str  # 'name{labels}' of a counter or gauge sample; 'name{labels' (no le, no brace) of a histogram's
    bucket: float | None  # a histogram bucket's upper bound (None: not a bucket)


def parse_series(key: str, kind: str) -> Series:
    family, sample, labels, help_text = json.loads(key)
    labels = sorted(labels.items())
    if kind == "histogram":
        bucket = next((float(value) for name, value in labels if name == "le"), None)
        rest = _labels_text([(n, v) for n, v in labels if n != "le"])
        return Series(
            family,
            kind,
            help_text,
            f"{family}{{{rest}" if sample.endswith("_bucket") else f"{sample}{{{rest}}}" if rest else sample,
            bucket,
        )
    text = _labels_text(labels)
    return Series(family, kind, help_text, f"{sample}{{{text}}}" if text else sample, None)


class MetricFiles:
    """Renders a multiprocess folder's files (see the module docstring); thread-safe, and concurrent
    scrapes share one render: a request waits for a render that started after it arrived, so every
    answer is at least as new as the request, and a burst of scrapes costs about two renders."""

    def __init__(self, folder: str, extra: CollectorRegistry | None = None) -> None:
        self.folder = folder
        self.extra = extra  # other collectors (NVML), rendered by the library after the files
        self._series: dict[tuple[str, str], Series] = {}
        self._lock = threading.Lock()
        self._latest: tuple[float, bytes] = (-1.0, b"")

    def scrape(self) -> bytes:
        asked = time.monotonic()
        with self._lock:
            started, body = self._latest
            if started < asked:
                started = time.monotonic()
                body = self.render()
                self._latest = (started, body)
            return body

    def render(self) -> bytes:
        files = sorted(glob.glob(os.path.join(self.folder, "*.db")))
        kinds = [os.path.basename(path).rsplit("_", 1)[0] for path in files]
        if any(kind not in FAST_KINDS for kind in kinds):  # a kind the trainer does not write: the library's way
            registry = CollectorRegistry()
            MultiProcessCollector(registry, path=self.folder)
            text = generate_latest(registry)
        else:
            text = self._merge(files, kinds).encode()
        return text + (generate_latest(self.extra) if self.extra is not None else b"")

    def _merge(self, files: list[str], kinds: list[str]) -> str:
        series: dict[tuple[str, str], Series] = {}
        sums: dict[Series, float] = defaultdict(float)  # counters, histogram sums and buckets
        newest: dict[str, tuple[float, float]] = {}  # gauge text -> (timestamp, value)
        families: dict[str, Series] = {}  # family -> a series of it (for HELP and TYPE), in order of appearance
        for path, kind in zip(files, kinds):
            try:
                values = MmapedDict.read_all_values_from_file(path)
            except FileNotFoundError:  # a restarted rank removed its predecessor's file meanwhile
                continue
            for key, value, timestamp, _ in values:
                entry = self._series.get((key, kind)) or parse_series(key, kind.split("_")[0])
                series[(key, kind)] = entry
                families.setdefault(entry.family, entry)
                if entry.kind == "gauge":
                    if newest.get(entry.text, (0.0, 0.0))[0] < timestamp:  # (a never-set gauge shows no sample)
                        newest[entry.text] = (timestamp, value)
                else:
                    sums[entry] += value
        self._series = series  # keys no file holds any more are forgotten
        by_family: dict[str, list[Series]] = defaultdict(list)
        for entry in list(sums) + [s for s in series.values() if s.kind == "gauge"]:
            by_family[entry.family].append(entry)
        lines: list[str] = []
        for family, first in families.items():
            name = f"{family}_total" if first.kind == "counter" else family
            help_text = first.help.replace("\\", r"\\").replace("\n", r"\n")
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {first.kind}"]
            if first.kind == "histogram":
                lines += self._histogram(family, by_family[family], sums)
            elif first.kind == "gauge":
                texts = dict.fromkeys(entry.text for entry in by_family[family] if entry.text in newest)
                lines += [f"{text} {floatToGoString(newest[text][1])}" for text in texts]
            else:
                lines += [f"{entry.text} {floatToGoString(sums[entry])}" for entry in by_family[family]]
        return "\n".join(lines) + "\n" if lines else ""

    @staticmethod
    def _histogram(family: str, entries: list[Series], sums: dict[Series, float]) -> list[str]:
        """Cumulative buckets, then _sum and _count, per label set (as the library accumulates them)."""
        buckets: dict[str, dict[float, float]] = defaultdict(lambda: defaultdict(float))
        totals: dict[str, float] = {}
        for entry in entries:
            if entry.bucket is not None:
                buckets[entry.text][entry.bucket] += sums[entry]
            else:
                totals[entry.text] = totals.get(entry.text, 0.0) + sums[entry]
        lines = []
        for prefix, counts in buckets.items():
            labels = prefix[len(family) + 1 :]  # 'a="1",b="2"' (no braces)
            count = 0.0
            for bound in sorted(counts):
                count += counts[bound]
                lines.append(
                    f'{family}_bucket{{{labels}{"," if labels else ""}le="{floatToGoString(bound)}"}} '
                    f"{floatToGoString(count)}"
                )
            braced = f"{{{labels}}}" if labels else ""
            if f"{family}_sum{braced}" in totals:
                lines.append(f"{family}_sum{braced} {floatToGoString(totals[f'{family}_sum{braced}'])}")
            lines.append(f"{family}_count{braced} {floatToGoString(count)}")
        return lines


def wsgi_metrics(files: MetricFiles) -> Callable:
    def app(environ, start_response):
        body = files.scrape()
        start_response(
            "200 OK", [("Content-Type", "text/plain; version=0.0.4; charset=utf-8"), ("Content-Length", str(len(body)))]
        )
        return [body]

    return app
