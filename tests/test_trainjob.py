"""Kubeflow Trainer v2 on this machine: the TrainJob rules of dvgt/k8s/trainjob.py (admission, the node's
pod after runtime patches and trainer fields, the torch plugin's environment) and `dvgt local-run` of a
chart-rendered TrainJob: two nodes of the tiny model, one node's trainer killed after a committed
checkpoint, the job restarted by its Job's restart policy, resumed, finished, with the steps run twice
giving the same losses."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import tiny_overrides
from servers import training_process, wait_for

from dvgt.k8s import trainjob
from dvgt.k8s.local_runner import load_job, plan_trainjob

PY = sys.executable
ROOT = Path(__file__).resolve().parent.parent
HELM = str(Path(PY).parent / "helm")


def helm_docs(release: str, *sets: str) -> list:
    command = [HELM, "template", release, str(ROOT / "charts" / "dvgt")] + [x for s in sets for x in ("--set", s)]
    return [
        d for d in yaml.safe_load_all(subprocess.run(command, capture_output=True, text=True, check=True).stdout) if d
    ]


def test_ready_trainjob_finds_its_runtime_and_gets_the_plugin_environment():
    job, runtime = load_job(str(ROOT / "k8s" / "trainjob" / "dvgt1-demo.yaml"), [])  # runtime.yaml lies beside it
    assert (runtime["kind"], runtime["metadata"]["name"]) == ("TrainingRuntime", "dvgt")
    assert trainjob.admission_errors(job, runtime) == []
    node = trainjob.node_template(job, runtime)
    container = next(c for c in trainjob.pod_spec(node)["containers"] if c["name"] == "node")
    assert (
        container["command"] == job["spec"]["trainer"]["command"]
        and container["args"] == job["spec"]["trainer"]["args"]
    )
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "8"  # resourcesPerNode
    labels = node["template"]["spec"]["template"]["metadata"]["labels"]
    assert labels["app.kubernetes.io/instance"] == "dvgt1-demo"  # the job's runtime patch over the runtime's "dvgt"
    env = trainjob.plugin_env(job, runtime, 1, "127.0.0.1", 4000)
    assert env == {
        "PET_NNODES": "1",
        "PET_NPROC_PER_NODE": "8",
        "PET_NODE_RANK": "1",
        "PET_MASTER_ADDR": "127.0.0.1",
        "PET_MASTER_PORT": "4000",
        "JOB_COMPLETION_INDEX": "1",
    }
    assert trainjob.pod_fields(job, 1)["metadata.labels['jobset.sigs.k8s.io/jobset-name']"] == "dvgt1-demo"
    plan = plan_trainjob(job, runtime, 4000)
    assert [p.name for p in plan.pods] == ["dvgt1-demo-node-0-0"] and plan.backoff_limit == 10
    assert (plan.pods[0].in_place, plan.pods[0].policy) == ("OnFailure", "OnFailure")


def test_restart_policies_map_to_the_job_of_each_node():
    exit_code = dict((d["kind"], d) for d in helm_docs("j", "api=trainjob", "restartPolicy=ExitCode", "nodes=2"))
    plan = plan_trainjob(exit_code["TrainJob"], exit_code["TrainingRuntime"], 1)
    assert [p.name for p in plan.pods] == ["j-node-0-0", "j-node-0-1"]
    assert plan.pods[1].in_place == "" and plan.pods[1].fail_codes == frozenset(range(1, 128))  # 128-255: a new pod
    never = dict((d["kind"], d) for d in helm_docs("j", "api=trainjob", "restartPolicy=Never"))
    assert plan_trainjob(never["TrainJob"], never["TrainingRuntime"], 1).backoff_limit == 0


def test_admission_rules_name_each_problem():
    docs = dict((d["kind"], d) for d in helm_docs("j", "api=trainjob"))
    job, runtime = docs["TrainJob"], docs["TrainingRuntime"]
    assert trainjob.admission_errors(job, runtime) == []
    bad = json.loads(json.dumps(job))
    bad["metadata"]["name"] = "x" * 50
    bad["spec"]["trainer"]["numNodes"] = 0
    bad["spec"]["trainer"]["env"] = [{"name": "PET_NODE_RANK", "value": "3"}]
    problems = " | ".join(trainjob.admission_errors(bad, runtime))
    assert "spec.trainer.numNodes must be at least 1, got 0" in problems
    assert "spec.trainer.env must not set the torch plugin's variables ['PET_NODE_RANK']" in problems
    assert f"metadata.name '{'x' * 50}' is too long: its pods are named" in problems
    assert trainjob.admission_errors(job, None) == [
        "the TrainingRuntime 'j' it references is not there: a TrainJob's runtime must exist before it"
    ]


def test_local_run_without_the_runtime_is_a_clear_error(tmp_path):
    manifest = tmp_path / "job.yaml"
    manifest.write_text((ROOT / "k8s" / "trainjob" / "dvgt1-demo.yaml").read_text())  # nothing beside it
    result = subprocess.run([PY, "-m", "dvgt", "local-run", str(manifest)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert result.stderr.startswith(
        "error: TrainJob dvgt1-demo references the TrainingRuntime 'dvgt', which is neither "
        "in the manifest nor in the YAML files beside it: pass its manifest with --runtime FILE"
    )


def test_two_node_trainjob_survives_a_killed_node_and_resumes_exactly(tiny_data_root, tmp_path):
    """The chart's TrainJob (cpu-test profile) with its runtime, 2 nodes x 1 process, checkpoints every
    2 steps in a folder both nodes share. Once a checkpoint is committed and a later step logged, node 1's
    training process is SIGKILLed: its torchrun exits 1, node 0's loses its peer and exits 1 too, both
    restart in place (pod restartPolicy OnFailure), resume from the newest committed checkpoint and finish.
    The steps after that checkpoint ran twice (before the kill and after the resume), with the same losses."""
    job, steps = f"tj{os.getpid()}", 8
    run, ckpts = tmp_path / "run", tmp_path / "ckpts"
    rendered = subprocess.run(
        [
            HELM,
            "template",
            job,
            str(ROOT / "charts" / "dvgt"),
            "--set",
            "api=trainjob,stage=dvgt1-demo,profile=cpu-test",
            "--set",
            "nodes=2,gpusPerNode=1,data.pvc=,checkpoint.s3Secret=,exporter.enabled=false",
            "--set",
            f"checkpoint.uri={ckpts}",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    manifest = tmp_path / "job.yaml"
    manifest.write_text(rendered.stdout)
    overrides = [
        o
        for o in tiny_overrides(
            tiny_data_root,
            run,
            max_epochs=1,
            limit_train_batches=steps,
            limit_val_batches=0,
            **{"checkpoint.save_every_steps": 2},
        )
        if not o.startswith("checkpoint.uri=")
    ]  # the chart's <uri>/<job> stays
    runner = subprocess.Popen(
        [
            PY,
            "-m",
            "dvgt",
            "local-run",
            str(manifest),
            "--workdir",
            str(tmp_path / "pods"),
            "--restart-delay",
            "1",
            "--env",
            "OMP_NUM_THREADS=1",
            *[item for o in overrides for item in ("--override", o)],
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:

        def logged_after_a_checkpoint():
            records = (
                [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
                if (run / "train_log.jsonl").is_file()
                else []
            )
            saved = [r["step"] for r in records if r["kind"] == "checkpoint"]
            return saved and any(r["kind"] == "train" and r["step"] > saved[0] for r in records)

        wait_for(logged_after_a_checkpoint, 240, "a step logged after the first committed checkpoint")
        os.kill(wait_for(lambda: training_process(job, rank=1), 30, "node 1's training process"), signal.SIGKILL)
        out, _ = runner.communicate(timeout=300)
    finally:
        runner.kill()
    assert runner.returncode == 0, out[-4000:]
    assert "[local-run] node-1: node exited 137; restarting in 1 s" in out  # its killed rank's SIGKILL
    assert "[local-run] node-0: node exited 203; restarting" in out  # its rank lost its peer: temporary
    assert f"[local-run] job {job} Succeeded" in out
    resumed = [line for line in out.splitlines() if line.startswith("[node-0] Resumed from ")]
    assert resumed and resumed[0].startswith(f"[node-0] Resumed from {ckpts / job}/step_")
    losses = {}
    for record in (json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()):
        if record["kind"] == "train":
            losses.setdefault(record["step"], []).append(record["loss/objective"])
    assert sorted(losses) == list(range(1, steps + 1))  # every step, to the last
    twice = {step: values for step, values in losses.items() if len(values) == 2}
    assert twice, f"no step ran both before the kill and after the resume: {losses}"
    for step, (before, after) in twice.items():
        assert after == pytest.approx(before, rel=1e-6, abs=1e-7), f"step {step}"
    assert (ckpts / job / f"step_{steps:08d}" / "manifest.json").is_file()
