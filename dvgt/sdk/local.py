"""The local backend: the same calls as on a cluster, with each job run on this machine by the local
runner (dvgt/k8s/local_runner.py) in a background process.

A job is a folder $DVGT_HOME/local-jobs/<name> (DVGT_HOME defaults to ~/.dvgt):
    job.yaml      the rendered PyTorchJob          submitted     when it was submitted (RFC 3339)
    runner.pid    the runner process               log.txt       the runner's output, "[master-0] ..." per line
    targets.json  the sidecars' local ports        result.json   {"code": exit code, "finished": time}, at the end
    pods/         the pods' folders (local runner --workdir)
The runner itself is `python -m dvgt.sdk.local FOLDER` (main below)."""

from __future__ import annotations

import builtins
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from dvgt.k8s.pytorchjob import replica_counts
from dvgt.sdk import errors
from dvgt.sdk.job import TrainingJob
from dvgt.sdk.status import (
    Condition,
    JobStatus,
    PodStatus,
    ReplicaStatus,
    add_checkpoint,
    checkpoint_uri_of,
    phase_of,
    step_from_log,
    step_from_metrics,
)


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def default_home() -> Path:
    return Path(os.environ.get("DVGT_HOME") or "~/.dvgt").expanduser()


class LocalBackend:
    def __init__(self, home: Path | None = None, stop_timeout_s: float = 60.0):
        self.root = Path(home or default_home()) / "local-jobs"
        self.stop_timeout_s = stop_timeout_s  # delete(): SIGKILL the runner after this long
        self.namespace = ""
        self._children: dict[str, subprocess.Popen] = {}  # runners started by this process (reaped here)

    def _folder(self, name: str, must_exist: bool = True) -> Path:
        folder = self.root / name
        if must_exist and not (folder / "job.yaml").is_file():
            raise errors.JobNotFoundError(f"no local job {name} in {self.root}; list them with `dvgt list --local`")
        return folder

    def _job(self, name: str) -> dict[str, Any]:
        return yaml.safe_load((self._folder(name) / "job.yaml").read_text())

    def _result(self, name: str) -> dict[str, Any] | None:
        path = self._folder(name) / "result.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def _alive(self, name: str) -> bool:
        if name in self._children:
            return self._children[name].poll() is None
        pid_file = self._folder(name) / "runner.pid"
        if not pid_file.is_file():
            return True  # submitted a moment ago: the runner is being started
        pid = int(pid_file.read_text())
        try:
            os.kill(pid, 0)
        except (ProcessLookupError, PermissionError):
            return False
        stat = Path(f"/proc/{pid}/stat")
        return not (stat.is_file() and stat.read_text().rsplit(")", 1)[-1].split()[0] == "Z")  # a zombie has ended

    # -- jobs -----------------------------------------------------------------------------------------
    def submit(self, job: TrainingJob, replace: bool = False) -> str:
        if job.api == "trainjob":
            raise errors.InvalidJobError(
                "the local backend runs PyTorchJobs; run a TrainJob on this machine with the local "
                "runner: dvgt submit --api trainjob --dry-run ... > job.yaml; dvgt local-run job.yaml"
            )
        manifest = job.render()
        folder = self._folder(job.name, must_exist=False)
        if (folder / "job.yaml").exists():
            if not replace:
                raise errors.JobExistsError(
                    f"local job {job.name} already exists ({folder}): choose another name "
                    "(--name) or replace it (--replace, submit(job, replace=True))"
                )
            self.delete(job.name)
        folder.mkdir(parents=True)
        (folder / "job.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
        (folder / "submitted").write_text(now())
        with open(folder / "log.txt", "wb") as log:
            runner = subprocess.Popen(
                [sys.executable, "-m", "dvgt.sdk.local", str(folder)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=folder,
                start_new_session=True,
            )
        (folder / "runner.pid").write_text(str(runner.pid))
        self._children[job.name] = runner
        return job.name

    def delete(self, name: str) -> None:
        """Stop the job (SIGTERM: the runner stops its pods, SIGKILL after stop_timeout_s) and remove its folder."""
        import shutil

        folder = self._folder(name)
        if self._result(name) is None and self._alive(name):
            pid = int((folder / "runner.pid").read_text())
            os.killpg(pid, signal.SIGTERM)
            deadline = time.monotonic() + self.stop_timeout_s
            while self._alive(name) and time.monotonic() < deadline:
                time.sleep(0.2)
            if self._alive(name):
                os.killpg(pid, signal.SIGKILL)
        child = self._children.pop(name, None)
        if child is not None:
            child.wait()
        shutil.rmtree(folder)

    def list(self) -> builtins.list[JobStatus]:
        names = sorted(p.parent.name for p in self.root.glob("*/job.yaml")) if self.root.is_dir() else []
        return [self.status(name, checkpoint=False, progress=False) for name in names]

    def status(self, name: str, checkpoint: bool = True, progress: bool = True) -> JobStatus:
        folder = self._folder(name)
        job = self._job(name)
        result, alive = self._result(name), self._alive(name)
        conditions = [
            Condition("Created", True, "LocalRunner", f"job folder {folder}", (folder / "submitted").read_text())
        ]
        if result is not None:
            ok = result["code"] == 0
            conditions += [
                Condition("Running", False, "LocalRunner", "", result["finished"]),
                Condition(
                    "Succeeded" if ok else "Failed",
                    True,
                    "LocalRunner",
                    f"the local runner exited {result['code']}",
                    result["finished"],
                ),
            ]
        elif alive:
            conditions.append(Condition("Running", True, "LocalRunner", "", (folder / "submitted").read_text()))
        else:
            conditions.append(
                Condition("Failed", True, "RunnerEnded", f"the runner ended without a result; see {folder / 'log.txt'}")
            )
        phase = phase_of(conditions)
        lines = (folder / "log.txt").read_text(errors="replace").splitlines()
        replicas, pods = {}, []
        for rtype, count in replica_counts(job).items():
            state = {"Running": "active", "Succeeded": "succeeded"}.get(phase, "failed")
            replicas[rtype] = ReplicaStatus(**{state: count})
            for index in range(count):
                label = f"{rtype.lower()}-{index}"
                restarts = sum(
                    1
                    for line in lines
                    if line.startswith(f"[local-run] {label}: pytorch exited") and "restarting" in line
                )
                pods.append(
                    PodStatus(
                        f"{name}-{label}", phase if phase in ("Running", "Succeeded", "Failed") else "Pending", restarts
                    )
                )
        status = JobStatus(
            name,
            "",
            phase,
            conditions,
            replicas,
            pods,
            stage=job["metadata"].get("labels", {}).get("dvgt.io/stage", ""),
        )
        if progress:
            self._add_step(status, folder, lines)
        uri = self._host_uri(job, checkpoint_uri_of(job))
        if checkpoint:
            add_checkpoint(status, uri)
        else:
            status.checkpoint_uri = uri
        return status

    def _add_step(self, status: JobStatus, folder: Path, lines: builtins.list[str]) -> None:
        """The last step from the master's exporter sidecar while it runs, else from its log lines."""
        targets = folder / "targets.json"
        if status.phase == "Running" and targets.is_file():
            ports = [
                t["targets"][0]
                for t in json.loads(targets.read_text())
                if t["labels"]["replica_type"] == "master" and t["labels"]["container"] == "exporter"
            ]
            try:
                with urllib.request.urlopen(f"http://{ports[0]}/metrics", timeout=5) as response:
                    status.last_step, status.last_step_source = step_from_metrics(response.read().decode()), "metrics"
            except (IndexError, OSError):
                pass  # no exporter, or not started yet: the log tells
        if status.last_step is None:
            status.last_step = step_from_log(replica_lines(lines, "master", 0))
            status.last_step_source = "log" if status.last_step is not None else ""

    def _host_uri(self, job: dict[str, Any], uri: str) -> str:
        """A checkpoint location as this machine sees it: a path in the master's container (relative to
        its working directory, or under it) lies in the pod's folder; S3 and other paths are as given."""
        if not uri or "://" in uri:
            return uri
        container = next(
            c
            for c in job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"]
            if c["name"] == "pytorch"
        )
        workdir = container.get("workingDir", "/")
        path = uri if uri.startswith("/") else f"{workdir.rstrip('/')}/{uri}"
        if not (path + "/").startswith(workdir.rstrip("/") + "/"):
            return uri  # the runner leaves such paths alone: the process used this machine's path
        master = f"{job['metadata']['name']}-master-0"
        return str(
            self._folder(job["metadata"]["name"]) / "pods" / master / "containers" / "pytorch" / path.lstrip("/")
        )

    def logs(self, name: str, follow: bool = False, replica: str = "master", index: int = 0) -> Iterator[str]:
        """The pytorch container's lines of one replica's pod (follow: until the job ends)."""
        path = self._folder(name) / "log.txt"
        with open(path, errors="replace") as log:
            pending = ""
            while True:
                chunk = log.read()
                if chunk:
                    pending += chunk
                    *complete, pending = pending.split("\n")
                    yield from replica_lines(complete, replica, index)
                elif follow and self._result(name) is None and self._alive(name):
                    time.sleep(0.2)
                else:
                    chunk = log.read()  # what was written between the last read and the end
                    pending += chunk
                    if not chunk:
                        yield from replica_lines(pending.split("\n"), replica, index)
                        return


def replica_lines(lines, replica: str, index: int) -> Iterator[str]:
    """The runner's lines of one pod's pytorch container, without their "[master-0] " prefix."""
    prefix = f"[{replica.lower()}-{index}] "
    return (line[len(prefix) :] for line in lines if line.startswith(prefix))


def main(folder: str) -> int:
    """The runner of one local job (started by LocalBackend.submit): run it, then record the result."""
    from dvgt.k8s.local_runner import Options, run_job

    root = Path(folder)
    job = yaml.safe_load((root / "job.yaml").read_text())
    try:
        code = run_job(job, Options(workdir=root / "pods", targets_file=root / "targets.json"))
    except Exception as error:
        print(f"[local-run] error: {error}", flush=True)
        code = 1
    (root / "result.json").write_text(json.dumps({"code": code, "finished": now()}))
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
