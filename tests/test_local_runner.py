"""The local runner (dvgt local-run): the operator's admission rules and environment, volumes and
secrets, sidecars, the replica restart policies with backoffLimit, stopping on a signal; and the
end-to-end run of a chart-rendered job (cpu-test profile, 2 pods x 2 processes) with checkpoints
in a real SeaweedFS and metrics scraped by a real Prometheus, surviving a killed worker process.

The small tests run real processes (python / sh one-liners) in place of the trainer image."""

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml
from servers import training_process, wait_for

from dvgt.k8s.local_runner import Options, apply_local_options, listen_locally, run_job, set_nproc
from dvgt.k8s.pytorchjob import admission_errors, load_pytorchjob, operator_env

PY = sys.executable


def make_job(
    command,
    *,
    name="job",
    workers=1,
    restart_policy="OnFailure",
    backoff_limit=3,
    nproc="2",
    sidecars=(),
    env=(),
    env_from=(),
    volumes=(),
    mounts=(),
    working_dir=None,
) -> dict:
    container = {
        "name": "pytorch",
        "image": "dvgt/trainer:test",
        "command": list(command),
        "env": list(env),
        "envFrom": list(env_from),
        "volumeMounts": list(mounts),
    }
    if working_dir:
        container["workingDir"] = working_dir
    pod = {
        "spec": {
            "containers": [container],
            "initContainers": list(sidecars),
            "volumes": list(volumes),
            "terminationGracePeriodSeconds": 5,
        }
    }
    replicas = {"Master": {"replicas": 1, "restartPolicy": restart_policy, "template": pod}}
    if workers:
        replicas["Worker"] = {"replicas": workers, "restartPolicy": restart_policy, "template": pod}
    return {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": {"name": name},
        "spec": {"nprocPerNode": nproc, "runPolicy": {"backoffLimit": backoff_limit}, "pytorchReplicaSpecs": replicas},
    }


def options(tmp_path, **extra) -> Options:
    return Options(workdir=tmp_path / "pods", restart_delay_s=0.0, **extra)


def log_lines(text: str, prefix: str) -> list:
    return [line[len(prefix) + 3 :] for line in text.splitlines() if line.startswith(f"[{prefix}] ")]


def test_admission_rules_name_each_problem():
    good = make_job(["true"])
    assert admission_errors(good) == []
    bad = make_job(["true"], name="Train_Job")
    bad["spec"]["pytorchReplicaSpecs"]["Master"]["replicas"] = 2
    bad["spec"]["pytorchReplicaSpecs"]["Chief"] = bad["spec"]["pytorchReplicaSpecs"]["Worker"]
    worker = json.loads(json.dumps(bad["spec"]["pytorchReplicaSpecs"]["Worker"]))
    worker["template"]["spec"]["containers"][0].update(name="trainer", image="")
    bad["spec"]["pytorchReplicaSpecs"]["Worker"] = worker
    errors = " | ".join(admission_errors(bad))
    assert "metadata.name 'Train_Job' must be a DNS-1035 label" in errors
    assert "spec.pytorchReplicaSpecs[Master].replicas must be 1" in errors
    assert "replica type 'Chief' is not supported" in errors
    assert "spec.pytorchReplicaSpecs[Worker].template.spec.containers[0].image must be specified" in errors
    assert (
        "spec.pytorchReplicaSpecs[Worker].template.spec.containers: there must be a container named 'pytorch'" in errors
    )


def test_cli_refuses_a_bad_manifest_with_one_line(tmp_path):
    manifest = tmp_path / "job.yaml"
    manifest.write_text(yaml.safe_dump(make_job(["true"], name="Bad_Name")))
    result = subprocess.run([PY, "-m", "dvgt", "local-run", str(manifest)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.startswith(
        "error: the PyTorchJob would be refused by the Training Operator: metadata.name 'Bad_Name'"
    )
    result = subprocess.run(
        [PY, "-m", "dvgt", "local-run", "-"],
        input="kind: ConfigMap\n",  # '-': from stdin
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (
        result.returncode == 2
        and "must hold exactly one PyTorchJob or TrainJob, it holds 0 (kinds: ConfigMap)" in result.stderr
    )


def test_operator_env_matches_the_contract():
    job = make_job(["true"], workers=2, nproc="4")
    env = operator_env(job, "Worker", 1, "127.0.0.1", 29500)
    assert env == {
        "PYTHONUNBUFFERED": "1",
        "MASTER_ADDR": "127.0.0.1",
        "PET_MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "29500",
        "PET_MASTER_PORT": "29500",
        "WORLD_SIZE": "12",
        "RANK": "2",
        "PET_NODE_RANK": "2",
        "PET_NPROC_PER_NODE": "4",
        "PET_NNODES": "3",
    }
    assert operator_env(make_job(["true"], nproc="auto"), "Master", 0, "a", 1)["WORLD_SIZE"] == "2"


def test_local_options_change_replicas_processes_and_overrides():
    job = make_job(["torchrun"], workers=3)
    job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["args"] = [
        "--nproc_per_node",
        "8",
        "-m",
        "dvgt.train",
        "lr=1",
    ]
    changed = apply_local_options(
        job, Options(workdir=Path("."), nproc_per_node=2, replicas={"Worker": 1}, overrides=["lr=2"])
    )
    assert changed["spec"]["nprocPerNode"] == "2" and changed["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] == 1
    args = changed["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["args"]
    assert args == ["--nproc_per_node", "2", "-m", "dvgt.train", "lr=1", "lr=2"]
    assert (
        "Worker"
        not in apply_local_options(job, Options(workdir=Path("."), replicas={"Worker": 0}))["spec"][
            "pytorchReplicaSpecs"
        ]
    )
    assert set_nproc(["--nproc-per-node=8", "x"], 1) == ["--nproc-per-node=1", "x"]
    assert listen_locally(
        ["dvgt", "exporter", "--host", "0.0.0.0", "--port", "9400", "--dir=/m"], {"9400": "5123"}
    ) == ["dvgt", "exporter", "--host", "127.0.0.1", "--port", "5123", "--dir=/m"]
    assert listen_locally(["--host=::", "--port=9400", "9400"], {"9400": "7"}) == [
        "--host=127.0.0.1",
        "--port=7",
        "9400",
    ]


def test_replicas_get_the_operator_env_volumes_secrets_and_prefixed_logs(tmp_path, capsys):
    """Each pod prints what it sees: rank variables, a secret from --secret and one from the
    environment, its name, and the host folders behind its mounts (emptyDir per pod, PVC shared,
    nested under the working directory)."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "hello.txt").write_text("from the PVC")
    secrets = tmp_path / "s3.env"
    secrets.write_text("# S3\nAWS_ACCESS_KEY_ID=AKIA-test\nAWS_SECRET_ACCESS_KEY=shh\n")
    script = textwrap.dedent("""
        import json, os, pathlib
        keys = ["RANK", "PET_NODE_RANK", "WORLD_SIZE", "PET_NNODES", "PET_NPROC_PER_NODE", "MASTER_ADDR",
                "PET_MASTER_ADDR", "MASTER_PORT", "PYTHONUNBUFFERED", "AWS_SECRET_ACCESS_KEY", "TOKEN", "POD", "EXTRA"]
        seen = {k: os.environ.get(k) for k in keys}
        pathlib.Path(os.environ["SCRATCH"], "mark").write_text(os.environ["RANK"])
        seen.update(scratch=os.environ["SCRATCH"], marks=sorted(os.listdir(os.environ["SCRATCH"])),
                    cwd=os.getcwd(), data=pathlib.Path("data/hello.txt").read_text())
        print(json.dumps(seen))
    """)
    job = make_job(
        [PY, "-c", script],
        workers=2,
        env=[
            {"name": "SCRATCH", "value": "/scratch"},
            {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}},
            {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        ],
        env_from=[{"secretRef": {"name": "dvgt-s3"}}],
        working_dir="/workspace",
        volumes=[{"name": "scratch", "emptyDir": {}}, {"name": "data", "persistentVolumeClaim": {"claimName": "d"}}],
        mounts=[{"name": "scratch", "mountPath": "/scratch"}, {"name": "data", "mountPath": "/workspace/data"}],
    )
    hf = tmp_path / "hf.env"
    hf.write_text("token=hf_abc\n")
    opts = options(
        tmp_path,
        volumes={"data": data},
        secrets={"dvgt-s3": {"AWS_SECRET_ACCESS_KEY": "shh"}, "hf": {"token": "hf_abc"}},
        env={"EXTRA": "1"},
    )
    assert run_job(job, opts) == 0
    out = capsys.readouterr().out
    seen = {prefix: json.loads(log_lines(out, prefix)[-1]) for prefix in ("master-0", "worker-0", "worker-1")}
    ports = {s["MASTER_PORT"] for s in seen.values()}
    assert len(ports) == 1 and ports != {"23456"}  # one free local port for the whole job
    for prefix, rank in (("master-0", "0"), ("worker-0", "1"), ("worker-1", "2")):
        s = seen[prefix]
        assert (s["RANK"], s["PET_NODE_RANK"], s["WORLD_SIZE"], s["PET_NNODES"], s["PET_NPROC_PER_NODE"]) == (
            rank,
            rank,
            "6",
            "3",
            "2",
        )
        assert s["MASTER_ADDR"] == s["PET_MASTER_ADDR"] == "127.0.0.1" and s["PYTHONUNBUFFERED"] == "1"
        assert (s["AWS_SECRET_ACCESS_KEY"], s["TOKEN"], s["EXTRA"]) == ("shh", "hf_abc", "1")
        assert s["POD"] == f"job-{prefix}"
        assert s["scratch"] == str(opts.workdir / f"job-{prefix}" / "volumes" / "scratch")
        assert s["marks"] == ["mark"]  # an emptyDir belongs to one pod
        assert s["cwd"] == str(opts.workdir / f"job-{prefix}" / "containers" / "pytorch" / "workspace")
        assert s["data"] == "from the PVC"
    assert "job job Succeeded (0 restart(s))" in out


def test_secret_key_missing_everywhere_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("TOKEN", raising=False)
    job = make_job(
        ["true"], workers=0, env=[{"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}}]
    )
    with pytest.raises(ValueError, match="reads key 'token' of 'hf': pass --secret hf=FILE"):
        run_job(job, options(tmp_path))


# A container that fails its first runs: it counts its starts in a shared folder (a PVC).
FLAKY = (
    "n=$(cat /state/count 2>/dev/null || echo 0); echo $((n + 1)) > /state/count; "
    'ls /scratch; touch /scratch/run-$n; [ "$n" -ge {fails} ] && exit 0; exit {code}'
)


def flaky_job(restart_policy, fails, code, backoff_limit=3):
    return make_job(
        ["sh", "-c", FLAKY.format(fails=fails, code=code)],
        workers=0,
        restart_policy=restart_policy,
        backoff_limit=backoff_limit,
        volumes=[{"name": "state", "persistentVolumeClaim": {"claimName": "s"}}, {"name": "scratch", "emptyDir": {}}],
        mounts=[{"name": "state", "mountPath": "/state"}, {"name": "scratch", "mountPath": "/scratch"}],
    )


def test_exit_code_policy_recreates_the_pod_for_signals_only(tmp_path, capsys):
    assert run_job(flaky_job("ExitCode", fails=2, code=137), options(tmp_path)) == 0
    out = capsys.readouterr().out
    assert out.count("pytorch exited 137; restarting as a new pod") == 2
    assert log_lines(out, "master-0").count("run-0") == 0  # a new pod starts with empty emptyDirs
    assert "job job Succeeded (2 restart(s))" in out

    assert run_job(flaky_job("ExitCode", fails=2, code=1), options(tmp_path / "b")) == 1
    assert "master-0: pytorch exited 1 (restartPolicy ExitCode: not retried)" in capsys.readouterr().out


def test_on_failure_never_and_always_policies(tmp_path, capsys):
    assert run_job(flaky_job("OnFailure", fails=2, code=1), options(tmp_path)) == 0
    out = capsys.readouterr().out
    assert "run-0" in log_lines(out, "master-0")  # the same pod: its emptyDir kept the first run's file
    assert "job job Succeeded (2 restart(s))" in out

    assert run_job(flaky_job("OnFailure", fails=5, code=1, backoff_limit=1), options(tmp_path / "b")) == 1
    assert "backoffLimit 1 reached" in capsys.readouterr().out
    assert run_job(flaky_job("Never", fails=1, code=143), options(tmp_path / "c")) == 1
    assert "pytorch exited 143 (restartPolicy Never: not retried)" in capsys.readouterr().out
    assert run_job(flaky_job("Always", fails=0, code=0, backoff_limit=2), options(tmp_path / "d")) == 1
    out = capsys.readouterr().out  # Always restarts a container that succeeded too
    assert out.count("pytorch exited 0; restarting") == 2 and "backoffLimit 2 reached" in out


SIDECAR = textwrap.dedent("""
    import http.server, sys
    port, host = int(sys.argv[sys.argv.index("--port") + 1]), sys.argv[sys.argv.index("--port") - 1].split("=")[1]
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200); self.end_headers(); self.wfile.write(b"ok " + sys.argv[-1].encode())
        def log_message(self, *args): pass
    http.server.HTTPServer((host, port), Handler).serve_forever()
""")


def test_sidecars_start_first_on_their_own_port_and_stop_with_the_pod(tmp_path, capsys):
    sidecar = {
        "name": "exporter",
        "image": "dvgt/exporter:test",
        "restartPolicy": "Always",
        "command": [PY, "-c", SIDECAR, "--host=0.0.0.0", "--port", "9400", "--dir", "/metrics"],
        "ports": [{"name": "metrics", "containerPort": 9400}],
        "readinessProbe": {"httpGet": {"path": "/healthz", "port": "metrics"}},
        "volumeMounts": [{"name": "metrics", "mountPath": "/metrics"}],
    }
    fetch = (
        "import json, urllib.request; t = json.load(open('{targets}')); "
        "print([urllib.request.urlopen('http://' + x['targets'][0]).read().decode() for x in t])"
    )
    targets = tmp_path / "targets.json"
    job = make_job(
        [PY, "-c", fetch.format(targets=targets)],
        sidecars=[sidecar],
        volumes=[{"name": "metrics", "emptyDir": {}}],
        mounts=[{"name": "metrics", "mountPath": "/metrics"}],
    )
    assert run_job(job, options(tmp_path, targets_file=targets)) == 0
    out = capsys.readouterr().out
    listed = json.loads(targets.read_text())
    assert [t["labels"]["pod"] for t in listed] == ["job-master-0", "job-worker-0"]
    assert len({t["targets"][0] for t in listed}) == 2 and all(":9400" not in t["targets"][0] for t in listed)
    answers = eval(log_lines(out, "master-0")[-1])  # each pod's exporter answered on its own port
    assert answers == [
        f"ok {tmp_path / 'pods' / 'job-master-0' / 'volumes' / 'metrics'}",
        f"ok {tmp_path / 'pods' / 'job-worker-0' / 'volumes' / 'metrics'}",
    ]
    assert out.index("[master-0 exporter] $ ") < out.index("[master-0] $ ")  # the sidecar first
    for target in listed:  # stopped with their pods
        with pytest.raises(OSError):
            import urllib.request

            urllib.request.urlopen("http://" + target["targets"][0], timeout=2)


def test_sigterm_stops_every_pod_and_reports_it(tmp_path):
    pids = tmp_path / "pids"
    pids.mkdir()
    manifest = tmp_path / "job.yaml"
    manifest.write_text(yaml.safe_dump(make_job(["sh", "-c", f"echo $$ > {pids}/$RANK; sleep 120"], workers=1)))
    runner = subprocess.Popen(
        [PY, "-m", "dvgt", "local-run", str(manifest), "--workdir", str(tmp_path / "pods")],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while len(list(pids.iterdir())) < 2:
            assert time.monotonic() < deadline and runner.poll() is None
            time.sleep(0.1)
        runner.send_signal(signal.SIGTERM)
        out, _ = runner.communicate(timeout=30)
    finally:
        runner.kill()
    assert runner.returncode == 128 + signal.SIGTERM
    assert "job job Failed: stopped by SIGTERM" in out
    for pid_file in pids.iterdir():
        with pytest.raises(ProcessLookupError):
            os.kill(int(pid_file.read_text()), 0)


def test_ready_demo_manifest_runs_locally_with_overrides(tiny_data_root, tmp_path, capsys):
    """k8s/dvgt1-demo.yaml as it is (8 GPUs, S3 checkpoints, exporter), brought to this machine by the
    runner's options: one pod, one process, a local checkpoint folder, the tiny data."""
    job = load_pytorchjob(Path(__file__).resolve().parent.parent.joinpath("k8s", "dvgt1-demo.yaml"))
    sidecars = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"].pop("initContainers")
    assert sidecars[0]["name"] == "exporter"  # (covered by the end-to-end test; dropped to stay light)
    from conftest import tiny_overrides

    overrides = tiny_overrides(tiny_data_root, tmp_path / "run", max_epochs=1, limit_train_batches=2)
    code = run_job(job, options(tmp_path, nproc_per_node=1, overrides=overrides, env={"OMP_NUM_THREADS": "1"}))
    out = capsys.readouterr().out
    assert code == 0, out[-3000:]
    assert '"finished": true, "step": 2' in out
    assert (tmp_path / "run" / "ckpts" / "step_00000002" / "manifest.json").is_file()


def launcher_process(job: str):
    """The pid of the pytorch container's main process (python -m dvgt.train.launch) of this job."""
    for entry in Path("/proc").iterdir():
        try:
            environ = (entry / "environ").read_text()
            cmdline = (entry / "cmdline").read_text().split("\0")
        except OSError:
            continue
        if f"DVGT_JOB_NAME={job}\0" in environ and cmdline[1:3] == ["-m", "dvgt.train.launch"]:
            return int(entry.name)
    return None


@pytest.mark.parametrize("policy, nproc", [("OnFailure", 2), ("ExitCode", 1), ("Never", 1)])
def test_sigterm_under_each_restart_policy(policy, nproc, tiny_data_root, tmp_path):
    """Preemption as the kubelet does it: SIGTERM to the main process of the chart's pytorch container
    (`python -m dvgt.train.launch`, torchrun underneath). Every rank stops after the same step, a
    final checkpoint is committed and the container exits 143: OnFailure restarts it in its pod and
    ExitCode as a new pod, each restart resumes from that checkpoint and the job succeeds; Never
    fails the job, leaving the checkpoint for a resubmitted job to resume from. (Only the signal is
    simulated; the chart, the launcher, the trainer and the restart policies are the real ones.)"""
    job, steps = f"preempt-{policy.lower()}", 6
    rendered = subprocess.run(
        [
            str(Path(PY).parent / "helm"),
            "template",
            job,
            str(Path(__file__).resolve().parent.parent / "charts" / "dvgt"),
            "--set",
            f"stage=dvgt1-demo,profile=cpu-test,nodes=1,gpusPerNode={nproc},data.pvc=,checkpoint.s3Secret=",
            "--set",
            f"restartPolicy={policy},exporter.enabled=false",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    manifest = tmp_path / "job.yaml"
    manifest.write_text(rendered.stdout)
    from conftest import tiny_overrides

    overrides = tiny_overrides(
        tiny_data_root, tmp_path / "run", max_epochs=1, limit_train_batches=steps, limit_val_batches=0
    )
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
            "0",
            "--env",
            "OMP_NUM_THREADS=1",
            *[item for o in overrides for item in ("--override", o)],
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        log = tmp_path / "run" / "train_log.jsonl"
        wait_for(lambda: log.exists() and '"step": 2,' in log.read_text(), 240, "step 2 in the run's log")
        os.kill(wait_for(lambda: launcher_process(job), 30, "the launcher"), signal.SIGTERM)
        out, _ = runner.communicate(timeout=400)
    finally:
        if runner.poll() is None:
            runner.kill()
            runner.wait()
    committing = re.findall(r"\[master-0\] SIGTERM: committing a final checkpoint at step (\d+)", out)
    assert len(committing) == 1, out[-4000:]
    at = int(committing[0])
    assert at >= 2 and f'"finished": false, "step": {at}' in out  # rank 0; with 2 ranks both stopped there
    assert "master-0: pytorch exited 143" in out
    assert (tmp_path / "run" / "ckpts" / f"step_{at:08d}" / "manifest.json").is_file()
    if policy == "Never":
        assert runner.returncode == 1 and "(restartPolicy Never: not retried)" in out
        return
    assert runner.returncode == 0, out[-4000:]
    assert ("restarting as a new pod" if policy == "ExitCode" else "restarting in 0 s") in out
    assert f"Resumed from {tmp_path / 'run' / 'ckpts' / f'step_{at:08d}'} at step {at}" in out
    assert f'"finished": true, "step": {steps}' in out and f"job {job} Succeeded (1 restart(s))" in out, out[-6000:]


# --------------------------------------------------------------------------------------------
# End to end: the chart's job, two pods x two CPU processes, S3 checkpoints, Prometheus, a kill
# --------------------------------------------------------------------------------------------


def prometheus_query(url: str, expr: str) -> list:
    import urllib.parse
    import urllib.request

    with urllib.request.urlopen(f"{url}/api/v1/query?" + urllib.parse.urlencode({"query": expr}), timeout=10) as r:
        return json.loads(r.read())["data"]["result"]


def test_chart_job_runs_locally_survives_a_killed_worker_and_is_scraped(tiny_data_root, tmp_path, seaweedfs):
    """cpu-test profile, 2 pods x 2 processes, checkpoints every 2 steps to SeaweedFS, each pod's
    exporter scraped by Prometheus; once a checkpoint is committed, worker-0's second process is
    SIGKILLed: both pods restart (worker-0's launcher passes on 137, the master's ranks lose their peer
    and exit 203), resume from the newest committed checkpoint and finish; Prometheus holds step times
    from both nodes."""
    job, steps = f"e2e{os.getpid()}", 12
    bucket = seaweedfs.make_bucket("dvgt-e2e")
    rendered = subprocess.run(
        [
            str(Path(PY).parent / "helm"),
            "template",
            job,
            str(Path(__file__).resolve().parent.parent / "charts" / "dvgt"),
            "--set",
            "stage=dvgt1-demo,profile=cpu-test,nodes=2,gpusPerNode=2,data.pvc=,checkpoint.s3Secret=e2e-s3",
            "--set",
            f"checkpoint.uri=s3://{bucket}",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    manifest, secret, targets = tmp_path / "job.yaml", tmp_path / "s3.env", tmp_path / "targets.json"
    manifest.write_text(rendered.stdout)
    secret.write_text("".join(f"{k}={v}\n" for k, v in seaweedfs.env().items()))
    targets.write_text("[]")

    from conftest import free_port, tiny_overrides

    prometheus_port = free_port()
    config = {
        "global": {"scrape_interval": "1s"},
        "scrape_configs": [
            {"job_name": "dvgt", "file_sd_configs": [{"files": [str(targets)], "refresh_interval": "1s"}]}
        ],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    overrides = [
        o
        for o in tiny_overrides(
            tiny_data_root,
            tmp_path / "run",
            max_epochs=1,
            limit_train_batches=steps,
            limit_val_batches=0,
            **{"checkpoint.save_every_steps": 2},
        )
        if not o.startswith("checkpoint.uri=")
    ]  # the chart's S3 location stays
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}  # S3 settings only from the Secret
    processes = []
    try:
        processes.append(
            subprocess.Popen(
                [
                    "prometheus",
                    f"--config.file={tmp_path / 'prometheus.yml'}",
                    f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{prometheus_port}",
                    "--log.level=warn",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
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
                "--secret",
                f"e2e-s3={secret}",
                "--targets-file",
                str(targets),
                *[item for o in overrides for item in ("--override", o)],
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        processes.append(runner)
        client = seaweedfs.client()

        def committed():
            listing = client.list_objects_v2(Bucket=bucket, Prefix=f"{job}/")
            return sorted(o["Key"] for o in listing.get("Contents", []) if o["Key"].endswith("/manifest.json"))

        first = wait_for(committed, 240, "the first committed checkpoint in S3")
        victim = wait_for(lambda: training_process(job, rank=3), 30, "worker-0's second training process")
        os.kill(victim, signal.SIGKILL)
        out, _ = runner.communicate(timeout=400)
        assert runner.returncode == 0, out[-4000:]

        # worker-0's pod reports its first failed rank (torchrun's first failure, by time): the killed rank's
        # SIGKILL (137) or, when the other rank's error file is stamped before torchrun sees the kill, that
        # rank's lost peer (203, temporary); either way a retryable code, and the pod restarts.
        assert re.search(r"\[local-run\] worker-0: pytorch exited (137|203); restarting", out), out[-4000:]
        assert "[local-run] master-0: pytorch exited 203; restarting" in out  # its ranks lost their peer: temporary
        assert f"[local-run] job {job} Succeeded" in out
        resumed = [line for line in log_lines(out, "master-0") if line.startswith("Resumed from ")]
        assert resumed and resumed[0].startswith(f"Resumed from s3://{bucket}/{job}/step_")
        resumed_step = int(resumed[0].split("step_")[1][:8])
        assert f"{job}/step_{resumed_step:08d}/manifest.json" in committed() and resumed_step >= int(first[0][-22:-14])
        assert f"{job}/step_{steps:08d}/manifest.json" in committed()  # it reached its final step
        assert f'"finished": true, "step": {steps}' in out

        prometheus = f"http://127.0.0.1:{prometheus_port}"
        series = wait_for(
            lambda: prometheus_query(
                prometheus,
                "count by (node_rank, pod) (last_over_time("
                f'dvgt_step_duration_seconds_count{{dvgt_job="{job}"}}[10m]))',
            ),
            30,
            "step times in Prometheus",
        )
        assert {(s["metric"]["node_rank"], s["metric"]["pod"]) for s in series} == {
            ("0", f"{job}-master-0"),
            ("1", f"{job}-worker-0"),
        }
    finally:
        for process in reversed(processes):
            process.terminate()
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
