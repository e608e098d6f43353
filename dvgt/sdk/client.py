"""Client: submit and follow training jobs on a cluster (PyTorchJobs of the Kubeflow Training Operator,
or with api="trainjob" TrainJobs of Kubeflow Trainer v2) or on this machine (the local runner), with the
same calls:

    client = Client()                      # kubeconfig or in-cluster; Client(backend="local") runs here
    client.submit(job)                     # -> the job's name
    client.wait(job.name)                  # until it succeeds (600 s at most); until="Running" to see it start
    for line in client.logs(job.name, follow=True): print(line)
    client.status(job.name)                # conditions, replicas, last step, newest committed checkpoint
    client.delete(job.name); client.list()
"""

from __future__ import annotations

import builtins
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from dvgt.sdk import errors
from dvgt.sdk.job import TrainingJob
from dvgt.sdk.status import JobStatus

if TYPE_CHECKING:  # the backends are imported when chosen (the cluster's need the Kubernetes client)
    from dvgt.sdk.cluster import ClusterBackend
    from dvgt.sdk.local import LocalBackend

BACKENDS = ("cluster", "local")
APIS = ("pytorchjob", "trainjob")
# What wait() can wait for: a phase, or "Finished" (Succeeded or Failed).
WAIT_FOR = ("Created", "Running", "Succeeded", "Failed", "Finished")
_REACHED = {
    "Created": ("Created", "Running", "Restarting", "Suspended", "Succeeded", "Failed"),
    "Running": ("Running", "Succeeded"),
    "Succeeded": ("Succeeded",),
    "Failed": ("Failed",),
    "Finished": ("Succeeded", "Failed"),
}


class Client:
    def __init__(
        self,
        backend: str = "cluster",
        namespace: str | None = None,
        kubeconfig: str | None = None,
        context: str | None = None,
        home: Path | None = None,
        api: str = "pytorchjob",
    ):
        """backend "cluster": kubeconfig (KUBECONFIG, ~/.kube/config or `kubeconfig`, its current context or
        `context`) or the pod's service account; namespace: the context's unless given; api: the kind of
        job it submits and follows there, "pytorchjob" or "trainjob".
        backend "local": jobs run on this machine, kept under `home` ($DVGT_HOME or ~/.dvgt)."""
        if api not in APIS:
            raise ValueError(f"api '{api}' is not one of {', '.join(APIS)}")
        self.backend: ClusterBackend | LocalBackend  # TrainJobBackend is a ClusterBackend
        if backend == "cluster" and api == "trainjob":
            from dvgt.sdk.trainjob_cluster import TrainJobBackend

            self.backend = TrainJobBackend(namespace, kubeconfig, context)
        elif backend == "cluster":
            from dvgt.sdk.cluster import ClusterBackend

            self.backend = ClusterBackend(namespace, kubeconfig, context)
        elif backend == "local":
            from dvgt.sdk.local import LocalBackend

            self.backend = LocalBackend(home)
        else:
            raise ValueError(f"backend '{backend}' is not one of {', '.join(BACKENDS)}")
        self.kind, self.api = backend, api

    @property
    def namespace(self) -> str:
        """The namespace jobs go to ("" on the local backend)."""
        return self.backend.namespace

    def submit(self, job: TrainingJob, replace: bool = False) -> str:
        """Validate, render and create the job; its name. replace=True deletes a job of that name first."""
        if self.kind == "cluster" and (job.api or "pytorchjob") != self.api:
            raise errors.InvalidJobError(
                f"TrainingJob.api is '{job.api or 'pytorchjob'}' but this client follows "
                f"{self.api}s: use Client(api='{job.api or 'pytorchjob'}') (--api on the command line)"
            )
        return self.backend.submit(job, replace=replace)

    def status(self, name: str) -> JobStatus:
        return self.backend.status(name)

    def logs(self, name: str, follow: bool = False, replica: str = "master", index: int = 0) -> Iterator[str]:
        """The trainer's output lines of one pod (the Master's by default); follow: until it ends."""
        return self.backend.logs(name, follow=follow, replica=replica, index=index)

    def delete(self, name: str) -> None:
        self.backend.delete(name)

    def list(self) -> builtins.list[JobStatus]:
        """Every job (in the namespace), without progress or checkpoint details."""
        return self.backend.list()

    def wait(
        self,
        name: str,
        until: str = "Succeeded",
        timeout: float | None = 600.0,
        poll_s: float = 2.0,
        callback: Callable[[JobStatus], None] | None = None,
    ) -> JobStatus:
        """Poll the job until it reaches `until` (by default until it succeeds, like the Kubeflow clients;
        Running is reached by a job that already Succeeded); callback(status) after each poll.
        JobFailedError when it fails while waiting for something else; TimeoutError after `timeout`
        seconds (None: no limit). TrainJobs wait through the Kubeflow SDK's TrainerClient."""
        if until not in WAIT_FOR:
            raise ValueError(f"wait until '{until}': choose one of {', '.join(WAIT_FOR)}")
        if hasattr(self.backend, "wait"):
            return self.backend.wait(name, until, timeout, poll_s, callback)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            status = self.backend.status(name, checkpoint=False)
            if callback is not None:
                callback(status)
            if status.phase in _REACHED[until]:
                return status
            if status.finished:
                failed = next((c for c in status.conditions if c.type == status.phase and c.status), None)
                why = f": {failed.reason} {failed.message}".rstrip() if failed else ""
                raise errors.JobFailedError(
                    f"job {name} {status.phase}{why} while waiting for {until}; see its logs (dvgt logs {name})"
                )
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(
                    f"job {name} is still {status.phase} after {timeout:.0f} s waiting for {until}; "
                    f"wait longer (--timeout) or look at it (dvgt status {name})"
                )
            time.sleep(poll_s)
