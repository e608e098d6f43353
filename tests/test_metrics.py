"""Metrics end to end: a short training scraped by a real Prometheus (Debian package, on loopback)
through `dvgt exporter`; every dashboard and alert expression evaluated by it; promtool on the
exposition and the rules; a SIGKILLed rank leaves no ghost series; the exporter without torch; the
demo serving its metrics while it trains."""

import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import yaml
from conftest import free_port, tiny_overrides
from prometheus_client.mmap_dict import MmapedDict, mmap_key
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families
from servers import wait_for

from dvgt.metrics.exporter import start_exporter
from dvgt.metrics.labels import rank_labels
from dvgt.metrics.multiproc import file_pid, remove_stale_files
from dvgt.train.logger import read_log

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "charts/dvgt/files/grafana/dvgt-training.json"
ALERTS = ROOT / "charts/dvgt/files/prometheus/alerts.yaml"
ALERT_TESTS = ROOT / "tests/promtool/alerts_test.yaml"
JOB = "e2e"
PEAK_TFLOPS = 0.5  # logging.peak_tflops of the scraped run
# What Grafana substitutes before a query reaches Prometheus.
GRAFANA = {"$__rate_interval": "1m", "$__range": "1h", "$namespace": ".*", "$dvgt_job": JOB}
CLEAN_ENV = {
    k: v
    for k, v in os.environ.items()
    if k
    not in (
        "RANK",
        "LOCAL_RANK",
        "WORLD_SIZE",
        "GROUP_RANK",
        "PET_NODE_RANK",
        "LOCAL_WORLD_SIZE",
        "DVGT_JOB_NAME",
        "PROMETHEUS_MULTIPROC_DIR",
    )
}


def http_get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()


def train_command(data_root: Path, run_dir: Path, **extra) -> list:
    return [
        sys.executable,
        "-m",
        "dvgt",
        "train",
        "--config=train/dvgt1/demo.yaml",
        *tiny_overrides(data_root, run_dir, **{"limit_val_batches": 0, **extra}),
    ]


def train_env(folder: Path, **env) -> dict:
    return {**CLEAN_ENV, "PROMETHEUS_MULTIPROC_DIR": str(folder), "OMP_NUM_THREADS": "1", **env}


def samples(text: str, name: str, **labels) -> list:
    """Values of the exposition's samples called `name` whose labels include `labels`."""
    return [
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name and labels.items() <= s.labels.items()
    ]


def query(prometheus: str, expr: str) -> dict:
    url = f"{prometheus}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        return json.loads(http_get(url))
    except urllib.error.HTTPError as error:  # a PromQL error: 400 with a JSON body naming it
        return json.loads(error.read().decode())


@pytest.fixture(scope="module")
def scraped_run(tiny_data_root, tmp_path_factory):
    """A 4-step training (`dvgt train` in its own process) whose metrics folder is served by `dvgt
    exporter` and scraped every second by Prometheus, which also evaluates the alert rules."""
    tmp = tmp_path_factory.mktemp("scraped")
    folder, run_dir = tmp / "metrics", tmp / "run"
    exporter_port, prometheus_port = free_port(), free_port()
    processes = []
    try:
        processes.append(
            start_exporter(folder, exporter_port, job=JOB, env=train_env(folder), stderr=subprocess.DEVNULL)
        )
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(ALERTS)],
            "scrape_configs": [{"job_name": "dvgt", "static_configs": [{"targets": [f"127.0.0.1:{exporter_port}"]}]}],
        }
        (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
        processes.append(
            subprocess.Popen(
                [
                    "prometheus",
                    f"--config.file={tmp / 'prometheus.yml'}",
                    f"--storage.tsdb.path={tmp / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{prometheus_port}",
                    "--log.level=warn",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        prometheus = f"http://127.0.0.1:{prometheus_port}"
        wait_for(lambda: _ready(prometheus), 60, "Prometheus to be ready")

        started = time.time()
        subprocess.run(
            # a configured peak gives MFU on a CPU too (docs/distributed.md)
            train_command(
                tiny_data_root,
                run_dir,
                max_epochs=2,
                limit_train_batches=2,
                limit_val_batches=1,
                **{"logging.peak_tflops": PEAK_TFLOPS},
            ),
            env=train_env(folder, DVGT_JOB_NAME=JOB),
            check=True,
            timeout=300,
            capture_output=True,
        )
        finished = time.time()
        # The last scrape after the run finished (and so after its last step) has reached Prometheus.
        wait_for(
            lambda: query(prometheus, f'dvgt_training_completed{{dvgt_job="{JOB}"}} == 1')["data"]["result"],
            30,
            "Prometheus to scrape the finished run",
        )
        # rate() and increase() need two samples of a series: wait for a second scrape of the finished run
        # (every series of the run is in every scrape after it finished).
        wait_for(
            lambda: query(prometheus, f'sum_over_time(dvgt_training_completed{{dvgt_job="{JOB}"}}[10m]) >= 2')["data"][
                "result"
            ],
            30,
            "a second scrape of the finished run",
        )
        yield {
            "prometheus": prometheus,
            "exporter": f"http://127.0.0.1:{exporter_port}",
            "run_dir": run_dir,
            "started": started,
            "finished": finished,
        }
    finally:
        for process in processes:
            process.terminate()
            process.wait(timeout=30)


def _ready(prometheus: str) -> bool:
    try:
        http_get(f"{prometheus}/-/ready")
        return True
    except OSError:
        return False


def dashboard_targets():
    """(panel title, PromQL as Grafana sends it) for every query of every panel."""
    dashboard = json.loads(DASHBOARD.read_text())
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for variable, value in GRAFANA.items():
                expr = expr.replace(variable, value)
            yield panel["title"], expr


def test_dashboard_has_the_variables_and_a_panel_for_every_item():
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"namespace", "dvgt_job"} <= variables
    exprs = " ".join(expr for _, expr in dashboard_targets())
    for metric in (
        "dvgt_step_duration_seconds",
        "dvgt_step_last_duration_seconds",
        "dvgt_images_total",
        "dvgt_loss",
        "dvgt_learning_rate",
        "dvgt_grad_norm",
        "dvgt_gpu_allocated_bytes",
        "dvgt_gpu_peak_allocated_bytes",
        "dvgt:gpu_memory_used_bytes",
        "dvgt:gpu_memory_total_bytes",
        "dvgt:gpu_utilization_ratio",
        "dvgt_data_wait_seconds_total",
        "dvgt_checkpoint_blocked_seconds",
        "dvgt_checkpoint_upload_seconds",
        "dvgt_checkpoint_saves_total",
        "dvgt_nonfinite_steps_skipped_total",
        "dvgt_last_step_timestamp_seconds",
        "dvgt_eval_metric",
        "dvgt_mfu_ratio",
        "dvgt_model_flops_total",
    ):
        assert metric in exprs, f"no dashboard panel shows {metric}"
    for _, expr in dashboard_targets():
        assert "$" not in expr, f"unsubstituted Grafana variable in {expr}"


def test_every_dashboard_query_returns_data(scraped_run):
    prometheus = scraped_run["prometheus"]
    no_gpu = (
        not torch.cuda.is_available()
        and query(prometheus, "dvgt_exporter_gpus")["data"]["result"][0]["value"][1] == "0"
    )
    for title, expr in dashboard_targets():
        answer = query(prometheus, expr)
        assert answer["status"] == "success", f"panel '{title}': {expr}: {answer.get('error')}"
        if not answer["data"]["result"]:
            # GPU series come only from a GPU (dcgm-exporter or NVML): on a machine without one these panels are empty.
            assert no_gpu and re.search(r"dvgt[_:]gpu_", expr), f"panel '{title}' has no data: {expr}"
    for variable in json.loads(DASHBOARD.read_text())["templating"]["list"]:
        if variable["type"] == "query":
            selector, label = re.fullmatch(r"label_values\((.+), (\w+)\)", variable["definition"]).groups()
            answer = query(prometheus, f"group by ({label}) ({selector.replace('$namespace', '.*')})")
            assert answer["status"] == "success" and answer["data"]["result"], variable["name"]


def test_every_alert_expression_evaluates(scraped_run):
    prometheus = scraped_run["prometheus"]
    rules = [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]
    alerts = [rule for rule in rules if "alert" in rule]
    assert {rule["alert"] for rule in alerts} == {
        "DvgtTrainingStalled",
        "DvgtLossNonFinite",
        "DvgtGpuMemoryNearLimit",
        "DvgtCheckpointsFailing",
        "DvgtRankStraggler",
        "DvgtCheckpointTooOld",
        "DvgtDataLoaderStalling",
        "DvgtMetricsAbsent",
        "DvgtScrapeTargetDown",
        "DvgtPodPending",
        "DvgtPodRestarting",
    }
    for rule in alerts:
        answer = query(prometheus, rule["expr"])
        assert answer["status"] == "success", f"{rule['alert']}: {answer.get('error')}"
        assert answer["data"]["result"] == [], f"{rule['alert']} fires on a healthy run"
    # The server evaluates every rule too (every second, during and after the run): none errored.
    loaded = [
        r for group in json.loads(http_get(f"{prometheus}/api/v1/rules"))["data"]["groups"] for r in group["rules"]
    ]
    assert {r["name"]: (r["health"], r.get("lastError", "")) for r in loaded} == {
        rule.get("alert") or rule["record"]: ("ok", "") for rule in rules
    }
    # the job's pods as the recording rules join them (the scrape here has no namespace / pod labels: one row)
    assert query(prometheus, "dvgt:pod_job:info")["data"]["result"][0]["metric"]["dvgt_job"] == JOB


def test_exporter_serves_what_the_run_logged_and_passes_promtool(scraped_run):
    text = http_get(scraped_run["exporter"] + "/metrics")
    check = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True)
    assert check.returncode == 0 and not (check.stdout + check.stderr).strip(), check.stdout + check.stderr

    rank = {"dvgt_job": JOB, "stage": "dvgt1-demo", "node_rank": "0", "local_rank": "0"}
    steps = [r for r in read_log(scraped_run["run_dir"] / "train_log.jsonl") if r["kind"] == "train"]
    assert len(steps) == 4
    assert samples(text, "dvgt_step_duration_seconds_count", **rank) == [4]
    assert samples(text, "dvgt_step_duration_seconds_sum", **rank)[0] == pytest.approx(
        sum(r["step_time"] for r in steps)
    )
    assert samples(text, "dvgt_data_wait_seconds_total", **rank)[0] == pytest.approx(sum(r["data_time"] for r in steps))
    assert samples(text, "dvgt_images_total", **rank) == [sum(r["images"] for r in steps)]
    # model FLOPs (dvgt/train/flops.py) of every step, the FLOP/s and MFU of the last against the configured peak
    assert all(r["model_flops"] > 0 for r in steps)
    assert samples(text, "dvgt_model_flops_total", **rank)[0] == pytest.approx(sum(r["model_flops"] for r in steps))
    assert samples(text, "dvgt_model_flops_per_second", **rank)[0] == pytest.approx(
        steps[-1]["model_flops"] / steps[-1]["step_time"]
    )
    assert samples(text, "dvgt_mfu_ratio", **rank)[0] == pytest.approx(steps[-1]["mfu"])
    assert steps[-1]["mfu"] == pytest.approx(steps[-1]["model_flops_per_sec"] / (PEAK_TFLOPS * 1e12))
    assert samples(text, "dvgt_optimizer_step", **rank) == [4]
    assert samples(text, "dvgt_learning_rate", **rank)[0] == pytest.approx(steps[-1]["lr"])
    for key, value in steps[-1].items():
        if key.startswith("loss/"):
            assert samples(text, "dvgt_loss", component=key[5:], **rank)[0] == pytest.approx(value)
        if key.startswith("grad_norm/"):
            assert samples(text, "dvgt_grad_norm", group=key[10:], **rank)[0] == pytest.approx(value)
    assert samples(text, "dvgt_checkpoint_saves_total", outcome="ok", **rank) == [2]  # one per epoch
    assert samples(text, "dvgt_checkpoint_saves_total", outcome="failed", **rank) == [0]
    assert samples(text, "dvgt_checkpoint_blocked_seconds", **rank)[0] > 0
    assert samples(text, "dvgt_nonfinite_steps_skipped_total", **rank) == [0]
    assert samples(text, "dvgt_training_completed", **rank) == [1]
    assert (
        scraped_run["started"] < samples(text, "dvgt_last_step_timestamp_seconds", **rank)[0] < scraped_run["finished"]
    )
    evaluation = [r for r in read_log(scraped_run["run_dir"] / "train_log.jsonl") if r["kind"] == "eval"][-1]
    for key in ("val/demo/ego_first_chamfer", "val/demo/ego_n_δ < 1.25", "val/loss/objective"):
        dataset, metric = key[4:].split("/", 1)  # held-out metrics under their official names
        assert samples(text, "dvgt_eval_metric", dataset=dataset, metric=metric, **rank) == [
            pytest.approx(evaluation[key])
        ]

    documented = set(re.findall(r"`(dvgt_\w+)`", (ROOT / "docs/metrics.md").read_text()))
    served = {s.name for family in text_string_to_metric_families(text) for s in family.samples}
    used = set(re.findall(r"\bdvgt_[a-z_]+", DASHBOARD.read_text() + ALERTS.read_text())) - {"dvgt_job"}
    undocumented = {m for m in served | used if re.sub(r"_(sum|count|bucket)$", "", m) not in documented}
    assert not undocumented, f"metrics missing from docs/metrics.md: {sorted(undocumented)}"


def test_alert_rules_pass_promtool_and_each_alert_fires_and_resolves():
    check = subprocess.run(["promtool", "check", "rules", str(ALERTS)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    unit = subprocess.run(["promtool", "test", "rules", str(ALERT_TESTS)], capture_output=True, text=True)
    assert unit.returncode == 0 and "SUCCESS" in unit.stdout, unit.stdout + unit.stderr
    cases = [
        case for test in yaml.safe_load(ALERT_TESTS.read_text())["tests"] for case in test.get("alert_rule_test", [])
    ]
    alerts = {
        rule["alert"]
        for group in yaml.safe_load(ALERTS.read_text())["groups"]
        for rule in group["rules"]
        if "alert" in rule
    }
    assert {c["alertname"] for c in cases if c["exp_alerts"]} == alerts, "an alert has no firing case"
    for alert in alerts:  # silent before it fires, and resolved: a case after the firing one expects nothing
        times = sorted(
            (int(c["eval_time"].rstrip("m")), bool(c["exp_alerts"])) for c in cases if c["alertname"] == alert
        )
        firing = [t for t, fires in times if fires]
        assert any(t < firing[0] and not fires for t, fires in times), f"{alert} has no silent case before it fires"
        assert any(t > firing[0] and not fires for t, fires in times), f"{alert} has no resolving case"
    records = {
        rule["record"]
        for group in yaml.safe_load(ALERTS.read_text())["groups"]
        for rule in group["rules"]
        if "record" in rule
    }
    tested = {
        re.match(r"[\w:]+", c["expr"]).group(0)
        for test in yaml.safe_load(ALERT_TESTS.read_text())["tests"]
        for c in test.get("promql_expr_test", [])
    }
    assert records - {"dvgt:pod_job:info", "dvgt:kube_pod_job:info"} <= tested, (
        "a GPU recording rule has no promql test"
    )


def test_killed_rank_leaves_no_ghost_series(tiny_data_root, tmp_path):
    """Ranks 1 and 0 are SIGKILLed mid-run; rank 0 restarts alone. The exporter then serves only
    the new process's series: nothing of the dead rank 1, and rank 0's counters start afresh."""
    folder = tmp_path / "metrics"
    long_run = {"max_epochs": 1, "limit_train_batches": 1000, "checkpoint.resume": "never"}
    dead = {
        local_rank: subprocess.Popen(
            train_command(tiny_data_root, tmp_path / f"run{local_rank}", **long_run),
            env=train_env(folder, DVGT_JOB_NAME="ghost", LOCAL_RANK=str(local_rank)),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for local_rank in (0, 1)
    }
    try:

        def steps_done():
            try:
                metrics = MultiProcessCollector.merge([str(p) for p in folder.glob("*.db")], accumulate=False)
            except struct.error:  # a file a rank has just created and not yet written
                return False
            done = {
                s.labels["local_rank"]: s.value for m in metrics for s in m.samples if s.name == "dvgt_optimizer_step"
            }
            return len(done) == 2 and min(done.values()) >= 2

        wait_for(steps_done, 240, "both ranks to complete 2 steps")
    finally:
        for process in dead.values():
            process.send_signal(signal.SIGKILL)
            process.wait()
    assert {file_pid(p) for p in folder.glob("*.db")} == {p.pid for p in dead.values()}

    restarted = subprocess.run(
        train_command(tiny_data_root, tmp_path / "restart", max_epochs=1, limit_train_batches=2),
        env=train_env(folder, DVGT_JOB_NAME="ghost", LOCAL_RANK="0"),
        capture_output=True,
        timeout=300,
    )
    assert restarted.returncode == 0, restarted.stderr.decode()[-2000:]
    port = free_port()
    exporter = start_exporter(folder, port, job="ghost", stderr=subprocess.DEVNULL)
    try:
        text = http_get(f"http://127.0.0.1:{port}/metrics")
    finally:
        exporter.terminate()
        exporter.wait()
    survivors = {file_pid(p) for p in folder.glob("*.db")}
    assert len(survivors) == 1 and not survivors & {p.pid for p in dead.values()}  # only the restarted process's
    assert samples(text, "dvgt_optimizer_step", local_rank="1") == []
    assert samples(text, "dvgt_step_duration_seconds_count", dvgt_job="ghost") == [2]  # the new process's 2 steps only
    assert samples(text, "dvgt_optimizer_step", dvgt_job="ghost") == [2]


def write_metrics_file(path: Path, labels: dict) -> None:
    """A file as prometheus-client's multiprocess mode writes it, holding one gauge sample."""
    db = MmapedDict(str(path))
    db.write_value(
        mmap_key("dvgt_optimizer_step", "dvgt_optimizer_step", list(labels), list(labels.values()), "h"),
        3.0,
        time.time(),
    )
    db.close()


def test_stale_files_are_those_of_dead_pids_reused_pids_and_earlier_lives_of_this_rank(tmp_path):
    me = rank_labels("stage", {"DVGT_JOB_NAME": "j", "GROUP_RANK": "1", "LOCAL_RANK": "2"})
    other = {**me, "local_rank": "3"}
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid, live_pid, my_pid = int(gone.stdout), os.getppid(), os.getpid()
    write_metrics_file(tmp_path / f"gauge_mostrecent_{dead_pid}.db", other)  # a process that is gone
    write_metrics_file(tmp_path / f"counter_{live_pid}.db", other)  # another live rank: kept
    write_metrics_file(tmp_path / f"histogram_{live_pid}.db", me)  # my rank's earlier life, pid now reused
    write_metrics_file(tmp_path / f"gauge_mostrecent_{my_pid}.db", other)  # my pid, written before I started
    removed = remove_stale_files(tmp_path, me, pid=my_pid)
    assert sorted(p.name for p in removed) == sorted(
        [f"gauge_mostrecent_{dead_pid}.db", f"histogram_{live_pid}.db", f"gauge_mostrecent_{my_pid}.db"]
    )
    assert [p.name for p in tmp_path.glob("*.db")] == [f"counter_{live_pid}.db"]


@pytest.mark.parametrize(
    "env, expected",
    [
        ({}, {"dvgt_job": "exp", "stage": "exp", "node_rank": "0", "local_rank": "0"}),
        (
            {"DVGT_JOB_NAME": "pretrain-7", "GROUP_RANK": "3", "PET_NODE_RANK": "9", "RANK": "29", "LOCAL_RANK": "5"},
            {"dvgt_job": "pretrain-7", "stage": "exp", "node_rank": "3", "local_rank": "5"},
        ),  # torchrun under the operator
        ({"PET_NODE_RANK": "2", "RANK": "2"}, {"dvgt_job": "exp", "stage": "exp", "node_rank": "2", "local_rank": "0"}),
        (
            {"RANK": "13", "LOCAL_WORLD_SIZE": "4", "LOCAL_RANK": "1"},
            {"dvgt_job": "exp", "stage": "exp", "node_rank": "3", "local_rank": "1"},
        ),
    ],
)
def test_rank_labels_come_from_the_launch_environment(env, expected):
    assert rank_labels("exp", env) == expected


def test_training_metrics_records_checkpoint_events_of_every_outcome(tmp_path):
    """The API the asynchronous checkpoint saver reports through (records of kind "checkpoint")."""
    script = """
import sys
from dvgt.metrics.training import TrainingMetrics
m = TrainingMetrics(sys.argv[1], {"dvgt_job": "j", "stage": "s", "node_rank": "0", "local_rank": "0"})
m.checkpoint_event({"kind": "checkpoint", "step": 10, "outcome": "ok", "blocked_s": 0.5, "upload_s": 12.0, "bytes": 4096})
m.checkpoint_event({"kind": "checkpoint", "step": 20, "outcome": "skipped"})
m.checkpoint_event({"kind": "checkpoint", "step": 30, "outcome": "failed", "blocked_s": 0.25, "upload_s": None})
m.checkpoint_event({"kind": "checkpoint", "step": 40, "outcome": "spilled", "blocked_s": 0.25, "cost_s": 1.5})
try:
    m.checkpoint_event({"step": 40, "outcome": "lost"})
except ValueError as error:
    print(error)
"""
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path)], env=CLEAN_ENV, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "checkpoint outcome 'lost' is not one of ok, failed, skipped, spilled" in out.stdout
    values = {
        (s.name, s.labels.get("outcome")): s.value
        for m in MultiProcessCollector.merge([str(p) for p in (tmp_path / "metrics").glob("*.db")])
        for s in m.samples
    }
    assert values[("dvgt_checkpoint_saves_total", "ok")] == 1
    assert values[("dvgt_checkpoint_saves_total", "skipped")] == 1
    assert values[("dvgt_checkpoint_saves_total", "failed")] == 1
    assert values[("dvgt_checkpoint_saves_total", "spilled")] == 1
    assert values[("dvgt_checkpoint_cost_seconds", None)] == 1.5
    assert values[("dvgt_checkpoint_blocked_seconds", None)] == 0.25  # the last save's
    assert values[("dvgt_checkpoint_upload_seconds", None)] == 12.0  # the failed save reported none
    assert values[("dvgt_checkpoint_size_bytes", None)] == 4096


def test_mfu_is_exported_only_with_a_peak(tmp_path):
    """A step record without `mfu` (a CPU, or a GPU missing from the peak table) leaves the MFU series
    out; with it, the series has the rank's labels, like the step-time series."""
    script = """
import sys
from dvgt.metrics.training import TrainingMetrics
m = TrainingMetrics(sys.argv[1], {"dvgt_job": "j", "stage": "s", "node_rank": "1", "local_rank": "3"})
step = {"step": 1, "step_time": 2.0, "data_time": 0.1, "images": 8, "lr": 1e-4, "skipped": False,
        "model_flops": 3e12, "model_flops_per_sec": 1.5e12}
m.observe_step(step)
if sys.argv[2] == "peak":
    m.observe_step({**step, "step": 2, "mfu": 0.25})
"""
    found = {}
    for case in ("cpu", "peak"):
        folder = tmp_path / case
        run = subprocess.run([sys.executable, "-c", script, str(folder), case], env=CLEAN_ENV, capture_output=True)
        assert run.returncode == 0, run.stderr
        found[case] = {
            s.name: s.labels
            for m in MultiProcessCollector.merge([str(p) for p in (folder / "metrics").glob("*.db")])
            for s in m.samples
        }
    assert "dvgt_mfu_ratio" not in found["cpu"] and "dvgt_model_flops_per_second" in found["cpu"]
    rank = {"dvgt_job": "j", "stage": "s", "node_rank": "1", "local_rank": "3"}
    assert found["peak"]["dvgt_mfu_ratio"] == found["peak"]["dvgt_step_duration_seconds_count"] == rank


WRITER = """
import sys, time
from dvgt.metrics.training import TrainingMetrics
node, local, step = sys.argv[2], sys.argv[3], int(sys.argv[4])
m = TrainingMetrics(sys.argv[1], {"dvgt_job": "j", "stage": "s", "node_rank": node, "local_rank": local})
for k in range(step):
    m.observe_step({"step": k + 1, "step_time": 0.3 * (k + 1), "data_time": 0.01, "images": 8, "lr": 1e-4 * k,
                    "skipped": k == 2, "loss/objective": 1.0 / (k + 1), "grad_norm/aggregator": 2.0 + k})
m.checkpoint_event({"outcome": "ok", "blocked_s": 0.5, "upload_s": 3.0, "cost_s": 0.7, "bytes": 2 ** 33})
"""


def test_fast_exposition_gives_the_librarys_samples_and_shares_renders_between_concurrent_scrapes(tmp_path):
    """The exporter's merge (dvgt/metrics/exposition.py) against prometheus-client's own on the same
    files: three ranks' writers, and the files of one of them once more under another pid (two processes
    with the same labels: counters and histograms add up, one gauge value wins), then a file of a kind
    only the library merges. Then 16 scrapes at once: every answer
    is complete and current, and they cost far fewer renders than scrapes."""
    from wsgiref.simple_server import WSGIRequestHandler, make_server

    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.exposition import ThreadingWSGIServer

    from dvgt.metrics.exposition import MetricFiles, wsgi_metrics

    folder = tmp_path / "metrics"
    env = {**CLEAN_ENV, "PROMETHEUS_MULTIPROC_DIR": str(folder)}
    writers = [
        subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), node, local, str(steps)], env=env)
        for node, local, steps in (("0", "0", 4), ("0", "1", 2), ("1", "0", 5))
    ]
    assert [writer.wait(timeout=60) for writer in writers] == [0, 0, 0]
    for path in folder.glob(f"*_{writers[2].pid}.db"):
        shutil.copy(path, path.with_name(path.name.replace(str(writers[2].pid), "999999")))

    def library() -> str:
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=str(folder))
        return generate_latest(registry).decode()

    def parsed(text: str) -> tuple:
        families = list(text_string_to_metric_families(text))
        return (
            sorted((f.name, f.type, f.documentation) for f in families),
            sorted((s.name, tuple(sorted(s.labels.items())), s.value) for f in families for s in f.samples),
        )

    files = MetricFiles(str(folder))
    ours = files.render().decode()
    assert parsed(ours) == parsed(library())
    assert samples(ours, "dvgt_images_total", node_rank="1") == [80]  # 2 x 5 steps of 8 images, one series
    assert samples(ours, "dvgt_step_duration_seconds_count", node_rank="1") == [10]
    assert subprocess.run(["promtool", "check", "metrics"], input=ours, capture_output=True, text=True).returncode == 0
    MmapedDict(str(folder / "gauge_all_4242.db")).write_value(
        mmap_key("other_gauge", "other_gauge", ["a"], ["b"], "o"), 2.5, 1.0
    )
    assert parsed(files.render().decode()) == parsed(library())  # a kind it does not merge: the library's way

    renders = []
    render = files.render
    files.render = lambda: (renders.append(1), time.sleep(0.05), render())[-1]  # a slow render, to overlap scrapes
    port = free_port()
    server = make_server(
        "127.0.0.1",
        port,
        wsgi_metrics(files),
        ThreadingWSGIServer,
        handler_class=type("Quiet", (WSGIRequestHandler,), {"log_message": lambda *a: None}),
    )
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with ThreadPoolExecutor(16) as pool:
            bodies = list(pool.map(lambda _: http_get(f"http://127.0.0.1:{port}/metrics"), range(16)))
    finally:
        server.shutdown()
        server.server_close()
    assert all(parsed(body) == parsed(library()) for body in bodies)
    assert len(renders) <= 8, f"{len(renders)} renders for 16 concurrent scrapes"


def test_exporter_starts_without_torch_and_answers_health_and_errors(tmp_path):
    imports = tmp_path / "imports.txt"
    port = free_port()
    with open(imports, "w") as err:
        exporter = start_exporter(
            tmp_path / "metrics", port, env={**CLEAN_ENV, "PYTHONPROFILEIMPORTTIME": "1"}, stderr=err
        )
    try:
        assert http_get(f"http://127.0.0.1:{port}/healthz") == "ok\n"
        with pytest.raises(urllib.error.HTTPError, match="404"):
            http_get(f"http://127.0.0.1:{port}/other")
        assert "dvgt_exporter_gpus" in http_get(f"http://127.0.0.1:{port}/metrics")
    finally:
        exporter.send_signal(signal.SIGTERM)
        assert exporter.wait(timeout=10) == 0  # a clean exit on SIGTERM (pod shutdown)
    modules = {
        line.rsplit("|", 1)[-1].strip() for line in imports.read_text().splitlines() if line.startswith("import time:")
    }
    assert "prometheus_client" in modules and "dvgt.metrics.exporter" in modules
    assert not {m for m in modules if m == "torch" or m.startswith("torch.")}, "dvgt exporter imported torch"

    with socket_bound() as busy:
        taken = subprocess.run(
            [
                sys.executable,
                "-m",
                "dvgt",
                "exporter",
                "--port",
                str(busy),
                "--host",
                "127.0.0.1",
                "--dir",
                str(tmp_path),
            ],
            env=CLEAN_ENV,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert taken.returncode == 2 and f"error: cannot listen on 127.0.0.1:{busy}" in taken.stderr
    no_dir = subprocess.run([sys.executable, "-m", "dvgt", "exporter"], env=CLEAN_ENV, capture_output=True, text=True)
    assert no_dir.returncode == 2 and "pass --dir or set PROMETHEUS_MULTIPROC_DIR" in no_dir.stderr
    from dvgt.cli import build_parser

    assert build_parser().parse_args(["exporter", "--dir", "x"]).host == "127.0.0.1"  # this machine only, unless asked


class socket_bound:
    """A listening socket on a free loopback port (its number is the context value)."""

    def __enter__(self) -> int:
        import socket

        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.socket.listen()
        return self.socket.getsockname()[1]

    def __exit__(self, *exc) -> None:
        self.socket.close()


def test_demo_serves_its_metrics_while_it_trains(tiny_data_root, tmp_path):
    port = free_port()
    out = tmp_path / "demo"
    log = tmp_path / "demo.out"
    overrides = tiny_overrides(tiny_data_root, out, max_epochs=1, limit_train_batches=2)
    with open(log, "w") as stdout:
        demo = subprocess.Popen(
            [sys.executable, "-m", "dvgt", "demo", "--out", str(out), "--metrics-port", str(port), *overrides],
            env=CLEAN_ENV,
            stdout=stdout,
            stderr=subprocess.STDOUT,
        )
        try:
            url = f"http://127.0.0.1:{port}/metrics"
            wait_for(lambda: url in log.read_text(), 240, "the demo to print its metrics URL")

            def step_served():
                try:
                    return samples(http_get(url), "dvgt_optimizer_step", stage="dvgt1-demo")
                except OSError:  # refused: the exporter has stopped, which it may only do when the demo ends
                    assert demo.poll() is None, "the demo finished without serving a training step"
                    return None

            wait_for(step_served, 240, "a training step on the demo's /metrics")
            assert demo.wait(timeout=300) == 0, log.read_text()[-2000:]
        finally:
            if demo.poll() is None:
                demo.kill()
                demo.wait()
    with pytest.raises(OSError):  # the exporter stopped with the demo
        http_get(url)
