"""The SDK's local backend end to end: a tiny chart-rendered job (cpu-test profile, one pod, one
process, the exporter sidecar) runs on this machine through submit / wait / logs / status / delete,
and the same through `dvgt ... --local`; a running job is stopped by delete."""

import time
from pathlib import Path

import pytest
from conftest import tiny_overrides
from servers import wait_for

from dvgt.cli import main
from dvgt.sdk import Client, JobExistsError, JobNotFoundError, TrainingJob


def live_processes(match) -> list:
    """Pids of running (not zombie) processes whose environment satisfies `match`."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            env = dict(item.split("=", 1) for item in (entry / "environ").read_text().split("\0") if "=" in item)
            state = (entry / "stat").read_text().rsplit(")", 1)[-1].split()[0]
        except (OSError, ValueError):
            continue
        if entry.name.isdigit() and state != "Z" and match(env):
            pids.append(int(entry.name))
    return pids


def tiny_job(data_root, tmp_path, name: str, steps: int) -> TrainingJob:
    overrides = [
        o
        for o in tiny_overrides(
            data_root, tmp_path / name, max_epochs=1, limit_train_batches=steps, limit_val_batches=0
        )
        if not o.startswith("checkpoint.uri=")
    ]  # the chart's <checkpoint_uri>/<name>
    return TrainingJob(
        stage="dvgt1-demo",
        profile="cpu-test",
        nodes=1,
        gpus_per_node=1,
        name=name,
        s3_secret="",
        data_pvc="",
        checkpoint_uri=str(tmp_path / "ckpts"),
        overrides=overrides,
        env={"OMP_NUM_THREADS": "1"},
        preemption_budget_s=20,
    )


def test_local_backend_runs_a_tiny_job_end_to_end(tiny_data_root, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DVGT_HOME", str(tmp_path / "home"))
    client = Client(backend="local")
    job = tiny_job(tiny_data_root, tmp_path, "tiny-local", steps=3)
    assert client.submit(job) == "tiny-local" and client.namespace == ""
    with pytest.raises(JobExistsError, match=r"^local job tiny-local already exists \(.*\): choose another name"):
        client.submit(job)
    seen = []
    running = client.wait(
        "tiny-local", until="Running", timeout=60, poll_s=0.2, callback=lambda s: seen.append(s.phase)
    )
    assert running.phase in ("Running", "Succeeded") and seen[-1] == running.phase
    lines = list(client.logs("tiny-local", follow=True))  # until the trainer's container ends
    assert lines[0].startswith("$ ") and "dvgt.train.launch --nproc-per-node=1" in lines[0]
    assert any(line.startswith("Training dvgt1 (tiny) on 1 process(es)") for line in lines)
    assert lines[-1].startswith('{"finished": true, "step": 3')
    final = client.wait("tiny-local", until="Succeeded", timeout=60, poll_s=0.2)
    status = client.status("tiny-local")
    assert final.phase == status.phase == "Succeeded" and status.finished
    assert [c.type for c in status.conditions if c.status] == ["Created", "Succeeded"]
    assert status.replicas["Master"].succeeded == 1 and [p.name for p in status.pods] == ["tiny-local-master-0"]
    assert (status.last_step, status.last_step_source) == (3, "log")
    assert status.checkpoint_uri == str(tmp_path / "ckpts" / "tiny-local")
    assert status.checkpoint.step == 3 and status.checkpoint.uri.endswith("tiny-local/step_00000003")
    assert status.stage == "dvgt1-demo" and [s.name for s in client.list()] == ["tiny-local"]

    with pytest.raises(SystemExit) as code:  # the same from the shell
        main(["status", "tiny-local", "--local"])
    out = capsys.readouterr().out
    assert code.value.code == 0 and "phase      Succeeded" in out and "last step  3 (from the log)" in out
    assert "checkpoint step 3 at " in out
    with pytest.raises(SystemExit):
        main(["logs", "tiny-local", "--local"])
    assert capsys.readouterr().out.splitlines() == lines

    client.delete("tiny-local")
    assert client.list() == [] and (tmp_path / "ckpts" / "tiny-local" / "step_00000003").is_dir()  # checkpoints stay
    with pytest.raises(JobNotFoundError, match="no local job tiny-local in"):
        client.status("tiny-local")


def test_delete_stops_a_running_local_job(tiny_data_root, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DVGT_HOME", str(tmp_path / "home"))
    with pytest.raises(SystemExit) as code:
        main(
            [
                "submit",
                "--local",
                "--stage",
                "dvgt1-demo",
                "--profile",
                "cpu-test",
                "--nodes",
                "1",
                "--gpus-per-node",
                "1",
                "--name",
                "long-local",
                "--s3-secret",
                "",
                "--data-pvc",
                "",
                "--checkpoint-uri",
                str(tmp_path / "ckpts"),
                *[
                    item
                    for o in tiny_job(tiny_data_root, tmp_path, "long-local", steps=10_000).overrides
                    for item in ("--set", o)
                ],
            ]
        )
    assert code.value.code == 0 and "submitted job long-local on this machine" in capsys.readouterr().out
    client = Client(backend="local")
    wait_for(
        lambda: any(line.startswith("Training dvgt1") for line in client.logs("long-local")), 90, "training to start"
    )
    pid = int((tmp_path / "home" / "local-jobs" / "long-local" / "runner.pid").read_text())
    status = wait_for(lambda: (lambda s: s if s.last_step else None)(client.status("long-local")), 60, "a first step")
    assert status.phase == "Running" and status.last_step_source == "metrics"  # the exporter sidecar answers
    started = time.monotonic()
    with pytest.raises(SystemExit) as code:
        main(["delete", "long-local", "--local"])
    assert code.value.code == 0 and capsys.readouterr().out == "deleted job long-local\n"
    assert time.monotonic() - started < 60
    assert live_processes(lambda env: env.get("DVGT_JOB_NAME") == "long-local") == []  # trainer and exporter
    assert pid not in live_processes(lambda env: True)  # the runner
    assert not (tmp_path / "home" / "local-jobs" / "long-local").exists()
