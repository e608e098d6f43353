"""The cluster backend of TrainJobs (Kubeflow Trainer v2): the Kubeflow SDK's TrainerClient (package
`kubeflow`) where it does the job, the rest by hand over the kubernetes client it holds.

  upstream (TrainerClient)                        by hand (it has no call for these)
  wait_for_job_status: wait                       create a rendered TrainJob and its runtime (read by the
  get_job: phase and node pods of status            typed models of kubeflow-trainer-api first)
  get_job_logs: logs                              check that a referenced runtime exists before submitting
  delete_job: delete                              the TrainJob's own conditions, labels and arguments
                                                  (status, list), pod restarts, the exporter's last step,
                                                  deleting the runtime a job created
"""

from __future__ import annotations

import builtins
from collections.abc import Callable, Iterator
from typing import Any

from dvgt.k8s import trainjob
from dvgt.sdk import errors
from dvgt.sdk.cluster import ClusterBackend, exporter_ports
from dvgt.sdk.job import TrainingJob
from dvgt.sdk.status import Condition, JobStatus, PodStatus, ReplicaStatus, add_checkpoint, checkpoint_uri_of

GROUP, VERSION = "trainer.kubeflow.org", "v1alpha1"
PLURALS = {
    "TrainJob": "trainjobs",
    "TrainingRuntime": "trainingruntimes",
    "ClusterTrainingRuntime": "clustertrainingruntimes",
}
INSTALL_TRAINER = (
    "install Kubeflow Trainer v2.3: kubectl apply --server-side -k "
    '"github.com/kubeflow/trainer.git/manifests/overlays/manager?ref=v2.3.0"'
)
# TrainerClient's statuses -> the SDK's phases, and what wait(until=...) waits for in its terms.
PHASE_OF_STATUS = {"Created": "Created", "Running": "Running", "Complete": "Succeeded", "Failed": "Failed"}
STATUSES_FOR = {
    "Created": {"Created", "Running", "Complete", "Failed"},
    "Running": {"Running", "Complete"},
    "Succeeded": {"Complete"},
    "Failed": {"Failed"},
    "Finished": {"Complete", "Failed"},
}
NO_LIMIT_S = 10**9  # TrainerClient.wait_for_job_status needs a timeout: "wait forever"


class TrainJobBackend(ClusterBackend):
    KIND, RESOURCE, VERSION, INSTALL = "TrainJob", f"trainjobs.{GROUP}", VERSION, INSTALL_TRAINER

    def __init__(
        self,
        namespace: str | None = None,
        kubeconfig: str | None = None,
        context: str | None = None,
        request_timeout_s: int = 30,
    ):
        super().__init__(namespace, kubeconfig, context, request_timeout_s)
        try:
            from kubeflow.common.types import KubernetesBackendConfig
            from kubeflow.trainer import TrainerClient
        except ImportError as error:
            raise errors.SdkError(
                f"TrainJobs need the Kubeflow SDK ({error.name} is missing): pip install 'dvgt[sdk]'"
            ) from None
        self.trainer = TrainerClient(
            KubernetesBackendConfig(namespace=self.namespace, client_configuration=self.configuration)
        )
        self.custom = self.trainer.backend.custom_api

    # -- objects ---------------------------------------------------------------------------------------
    def _call(self, verb: str, kind: str, name: str = "", namespace: str | None = None, **kwargs) -> Any:
        """One request on a trainer.kubeflow.org object (namespaced, or cluster-wide for ClusterTrainingRuntime)."""
        plural = PLURALS[kind]
        scope = "cluster" if kind == "ClusterTrainingRuntime" else "namespaced"
        method = getattr(self.custom, f"{verb}_{scope}_custom_object")
        args = (
            [GROUP, VERSION]
            + ([] if scope == "cluster" else [namespace or self.namespace])
            + [plural]
            + ([name] if name else [])
        )
        try:
            return method(*args, _request_timeout=self.timeout, **kwargs)
        except Exception as error:
            named = name or ((kwargs.get("body") or {}).get("metadata") or {}).get("name", "")
            raise self._translate(error, verb, f"{plural}.{GROUP}", named, namespace) from None

    @staticmethod
    def _typed(body: dict[str, Any]) -> dict[str, Any]:
        """The object, read by kubeflow-trainer-api's model of its kind (the Trainer SDK's types refuse a
        malformed object here, before the API server sees it). The chart's object is what is sent: the
        model's own dump would add the server's defaults (e.g. a port's protocol TCP)."""
        from kubeflow_trainer_api import models

        try:
            getattr(models, f"TrainerV1alpha1{body['kind']}").from_dict(body)
        except ValueError as error:
            raise errors.InvalidJobError(
                f"{body['kind']} {body['metadata']['name']} does not fit Kubeflow Trainer's "
                f"API types: {' '.join(str(error).split())}"
            ) from None
        return body

    def submit(self, job: TrainingJob, replace: bool = False) -> str:
        """Create the job's runtime (when it makes one: replaced if one of its name is there) and TrainJob."""
        *runtimes, body = job.objects()  # validated and rendered before any request
        namespace = job.namespace or self.namespace
        for obj in [*runtimes, body]:
            if obj["kind"] != "ClusterTrainingRuntime":
                obj["metadata"]["namespace"] = namespace
        kind, runtime = trainjob.runtime_ref(body)
        if not runtimes:
            try:
                self._call("get", kind, runtime, namespace)
            except errors.JobNotFoundError:
                where = "in this cluster" if kind == "ClusterTrainingRuntime" else f"in namespace {namespace}"
                raise errors.InvalidJobError(
                    f"TrainJob {job.name} references the {kind} '{runtime}', which does not exist {where}: create it "
                    f"first (kubectl apply -n {namespace} -f k8s/trainjob/runtime.yaml for the TrainingRuntime 'dvgt') "
                    "or let the job create its own (create_runtime=True, the chart's default)"
                ) from None
        for obj in runtimes:
            try:
                self._call("create", obj["kind"], namespace=namespace, body=self._typed(obj))
            except errors.JobExistsError:  # a runtime of that name: this job's definition replaces it
                current = self._call("get", obj["kind"], obj["metadata"]["name"], namespace)
                obj["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
                self._call("replace", obj["kind"], obj["metadata"]["name"], namespace, body=self._typed(obj))
        try:
            self._call("create", "TrainJob", namespace=namespace, body=self._typed(body))
        except errors.JobExistsError:
            if not replace:
                raise
            self.delete(job.name, wait=True, namespace=namespace, runtime=False)
            self._call("create", "TrainJob", namespace=namespace, body=self._typed(body))
        return job.name

    def get(self, name: str, namespace: str | None = None) -> dict[str, Any]:
        return self._call("get", "TrainJob", name, namespace)

    def delete(
        self,
        name: str,
        wait: bool = False,
        timeout_s: float = 120.0,
        namespace: str | None = None,
        runtime: bool = True,
    ) -> None:
        """Delete the TrainJob (its JobSet and pods go with it) and the TrainingRuntime it created for itself."""
        job = self.get(name, namespace)
        try:
            self.trainer.backend.namespace = namespace or self.namespace
            self.trainer.delete_job(name)
        except Exception as error:
            raise self._translate(error, "delete", self.RESOURCE, name, namespace) from None
        finally:
            self.trainer.backend.namespace = self.namespace
        kind, runtime_name = trainjob.runtime_ref(job)
        if runtime and kind == "TrainingRuntime":
            try:
                created = self._call("get", kind, runtime_name, namespace)
                if (created["metadata"].get("labels") or {}).get("app.kubernetes.io/instance") == name:  # its own
                    self._call("delete", kind, runtime_name, namespace)
            except errors.JobNotFoundError:
                pass
        if wait:
            self._wait_gone("TrainJob", name, namespace, timeout_s)

    def list(self) -> builtins.list[JobStatus]:
        items = self._call("list", "TrainJob").get("items") or []
        return [self._status_of(job) for job in items]

    # -- status ----------------------------------------------------------------------------------------
    def _status_of(self, job: dict[str, Any], phase: str | None = None) -> JobStatus:
        state = job.get("status") or {}
        conditions = [
            Condition(
                c["type"],
                c.get("status") == "True",
                c.get("reason") or "",
                c.get("message") or "",
                c.get("lastTransitionTime") or "",
            )
            for c in state.get("conditions") or []
        ]
        replicas = {
            j["name"]: ReplicaStatus(int(j.get("active") or 0), int(j.get("succeeded") or 0), int(j.get("failed") or 0))
            for j in state.get("jobsStatus") or []
        }
        true = {c.type for c in conditions if c.status}
        phase = phase or next(
            (p for c, p in (("Failed", "Failed"), ("Complete", "Succeeded"), ("Suspended", "Suspended")) if c in true),
            "Running" if any(r.active for r in replicas.values()) else "Created",
        )
        if phase not in ("Failed", "Succeeded") and "Suspended" in true:
            phase = "Suspended"  # Kueue holds it until admitted
        metadata = job["metadata"]
        return JobStatus(
            metadata["name"],
            metadata.get("namespace") or self.namespace,
            phase,
            conditions,
            replicas,
            stage=(metadata.get("labels") or {}).get("dvgt.io/stage", ""),
            checkpoint_uri=checkpoint_uri_of(job),
        )

    def status(self, name: str, checkpoint: bool = True) -> JobStatus:
        job = self.get(name)
        try:
            upstream = self.trainer.get_job(name)  # phase and node pods, as the Kubeflow SDK sees them
        except Exception as error:
            raise self._translate(error, "get", self.RESOURCE, name) from None
        status = self._status_of(job, PHASE_OF_STATUS.get(upstream.status))
        pods = {p.metadata.name: p for p in self._node_pods(name)}
        for step in sorted(upstream.steps, key=lambda s: s.name):
            pod = pods.get(step.pod_name)
            restarts = (
                sum(c.restart_count for c in (pod.status.container_statuses or []) if c.name == trainjob.NODE)
                if pod
                else 0
            )
            status.pods.append(PodStatus(step.pod_name, step.status or "Unknown", restarts))
        first = next((s for s in upstream.steps if s.name == f"{trainjob.NODE}-0"), None)
        if first is not None and first.status != "Pending" and first.pod_name in pods:
            spec = self.core.api_client.sanitize_for_serialization(pods[first.pod_name].spec)
            self._read_step(status, first.pod_name, exporter_ports(spec), container=trainjob.NODE)
        if checkpoint:
            add_checkpoint(status, status.checkpoint_uri)
        return status

    def _node_pods(self, name: str) -> builtins.list[Any]:
        try:
            return self.core.list_namespaced_pod(
                self.namespace, label_selector=f"jobset.sigs.k8s.io/jobset-name={name}", _request_timeout=self.timeout
            ).items
        except Exception as error:
            raise self._translate(error, "list", "pods", f"of job {name}") from None

    def wait(
        self,
        name: str,
        until: str,
        timeout: float | None,
        poll_s: float,
        callback: Callable[[JobStatus], None] | None = None,
    ) -> JobStatus:
        """TrainerClient.wait_for_job_status, its errors in the SDK's terms."""

        def report(upstream) -> None:
            if callback is not None:
                callback(
                    JobStatus(
                        name,
                        self.namespace,
                        PHASE_OF_STATUS.get(upstream.status, "Pending"),
                        pods=[PodStatus(s.pod_name, s.status or "Unknown") for s in upstream.steps],
                    )
                )

        try:
            upstream = self.trainer.wait_for_job_status(
                name,
                status=STATUSES_FOR[until],
                polling_interval=poll_s,  # type: ignore[arg-type]  # the SDK annotates int; it divides and sleeps (floats work)
                timeout=NO_LIMIT_S if timeout is None else timeout,  # type: ignore[arg-type]  # (the same)
                callbacks=[report],
            )
        except TimeoutError:
            raise TimeoutError(
                f"job {name} did not reach {until} within {timeout:.0f} s; wait longer (--timeout) or "
                f"look at it (dvgt status {name} --api trainjob)"
            ) from None
        except RuntimeError as error:
            if str(error) != f"TrainJob {name} is Failed":
                raise self._translate(error, "get", self.RESOURCE, name) from None
            failed = next(
                (c for c in self._status_of(self.get(name)).conditions if c.type == "Failed" and c.status), None
            )
            why = f": {failed.reason} {failed.message}".rstrip() if failed else ""
            raise errors.JobFailedError(
                f"job {name} Failed{why} while waiting for {until}; see its logs (dvgt logs {name} --api trainjob)"
            ) from None
        return self._status_of(self.get(name), PHASE_OF_STATUS.get(upstream.status))

    def logs(self, name: str, follow: bool = False, replica: str = "node", index: int = 0) -> Iterator[str]:
        """Lines of the `node` container of node `index` (replica master = node 0, worker i = node i + 1)."""
        node = {"master": 0, "worker": index + 1}.get(replica, index)
        try:
            yield from self.trainer.get_job_logs(name, follow=follow, step=f"{trainjob.NODE}-{node}")
        except Exception as error:
            raise self._translate(error, "get", "pods/log", f"{name}-{trainjob.NODE}-0-{node}") from None
