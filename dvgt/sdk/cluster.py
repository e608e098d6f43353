"""The cluster backends: PyTorchJobs through the Kubeflow Training SDK's TrainingClient (create, get,
list, delete, pods) and the kubernetes client it holds (pod logs, the exporter through the API
server's pod proxy); TrainJobs (TrainJobBackend) through the Kubeflow SDK's TrainerClient. Credentials:
a kubeconfig (KUBECONFIG, ~/.kube/config, or the one given), else the pod's service account; the
namespace is the kubeconfig context's.

Every failure becomes one SdkError line saying what to do (see _translate)."""

from __future__ import annotations

import builtins
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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

RESOURCE = "pytorchjobs.kubeflow.org"
SA_FOLDER = Path("/var/run/secrets/kubernetes.io/serviceaccount")
INSTALL_OPERATOR = (
    "install the Kubeflow Training Operator v1.9: kubectl apply --server-side -k "
    '"github.com/kubeflow/training-operator.git/manifests/overlays/standalone?ref=v1.9.2"'
)
LOG_TAIL_LINES = 500  # lines of the master's log read for the last step when the exporter cannot be read


def grant_hint(namespace: str) -> str:
    return (
        "the chart's Role grants what the SDK needs (charts/dvgt/templates/rbac.yaml): "
        f"helm template dvgt charts/dvgt --set rbac.create=true --show-only templates/rbac.yaml | kubectl apply -n {namespace} -f - "
        f"creates Role dvgt-sdk; bind it to yourself with kubectl create rolebinding dvgt-sdk-$USER -n {namespace} "
        "--role dvgt-sdk --user YOUR_USER (or use its ServiceAccount dvgt-sdk)"
    )


class ClusterBackend:
    KIND, RESOURCE, VERSION, INSTALL = (
        "PyTorchJob",
        RESOURCE,
        "v1",
        INSTALL_OPERATOR,
    )  # what this backend submits, and its CRD

    def __init__(
        self,
        namespace: str | None = None,
        kubeconfig: str | None = None,
        context: str | None = None,
        request_timeout_s: int = 30,
    ):
        try:
            from kubeflow.training import TrainingClient
            from kubernetes import client, config
        except ImportError as error:
            raise errors.SdkError(
                f"the cluster backend needs the Kubernetes SDKs ({error.name} is missing): pip install 'dvgt[sdk]'"
            ) from None
        configuration = client.Configuration()
        path = kubeconfig or os.environ.get("KUBECONFIG") or str(Path("~/.kube/config").expanduser())
        have_file = any(Path(p).expanduser().is_file() for p in path.split(os.pathsep) if p)
        try:
            if have_file or kubeconfig:
                config.load_kube_config(
                    config_file=path, context=context, client_configuration=configuration, persist_config=False
                )
                contexts, active = config.list_kube_config_contexts(path)
                chosen = next((c for c in contexts if c["name"] == context), active) if context else active
                self.where = f"the kubeconfig's context '{chosen['name']}'"
                default_namespace = (chosen.get("context") or {}).get("namespace") or "default"
            elif os.environ.get("KUBERNETES_SERVICE_HOST") and (SA_FOLDER / "token").is_file():
                config.load_incluster_config(client_configuration=configuration)
                self.where = "the pod's service account"
                default_namespace = (SA_FOLDER / "namespace").read_text().strip()
            else:
                raise errors.NoClusterConfigError(
                    f"no Kubernetes configuration: the kubeconfig {path} does not exist and this is not a pod with a "
                    "service account; point KUBECONFIG (or --kubeconfig) at your cluster's kubeconfig, "
                    "or run on this machine with the local backend (--local)"
                )
        except config.ConfigException as error:
            raise errors.NoClusterConfigError(
                f"the kubeconfig {path} cannot be used ({error}); fix it or point "
                "KUBECONFIG (or --kubeconfig) at a working one"
            ) from None
        self.host, self.configuration = configuration.host, configuration
        self.namespace = namespace or default_namespace
        self.timeout = request_timeout_s
        self.training = TrainingClient(client_configuration=configuration, namespace=self.namespace)
        self.core = self.training.core_api

    # -- errors ---------------------------------------------------------------------------------------
    def _translate(
        self, error: BaseException, verb: str, resource: str, name: str = "", namespace: str | None = None
    ) -> errors.SdkError:
        """The SdkError for a failed request: the ApiException or connection error behind the
        TrainingClient's RuntimeError (it keeps the original as __cause__ or __context__)."""
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        cause: BaseException | None = error
        while cause is not None and not isinstance(cause, (ApiException, HTTPError, ConnectionError)):
            cause = cause.__cause__ or cause.__context__
        what, namespace = f"{resource} {name}".strip(), namespace or self.namespace
        if isinstance(error, TimeoutError):  # the TrainingClient's own request timeout
            return errors.ClusterUnreachableError(
                f"the Kubernetes API server at {self.host} did not answer within {self.timeout} s ({verb} {what}); "
                "check the cluster and your network (kubectl cluster-info)"
            )
        if cause is None:  # not a request that failed
            return errors.SdkError(f"{verb} {what}: {' '.join(str(error).split())}")
        if not isinstance(cause, ApiException):
            reason = str(getattr(cause, "reason", None) or cause).rsplit(": ", 1)[-1]  # urllib3's innermost reason
            return errors.ClusterUnreachableError(
                f"cannot reach the Kubernetes API server at {self.host} ({' '.join(reason.split())}); check that "
                f"the cluster is up and that {self.where} points at it (kubectl cluster-info)"
            )
        status, body = cause.status, _json(cause.body)
        message = body.get("message") or (cause.body or cause.reason or "").strip()
        if status == 401:
            return errors.UnauthorizedError(
                f"the API server at {self.host} refused the credentials of {self.where} "
                f"(401 Unauthorized); log in again or renew the kubeconfig's token"
            )
        if status == 403:
            return errors.ForbiddenError(
                f"forbidden: you may not {verb} {resource} in namespace {namespace} "
                f"({message}); {grant_hint(namespace)}"
            )
        if status == 409:
            return errors.JobExistsError(
                f"{self.KIND} {name} already exists in namespace {namespace}: choose "
                "another name (--name) or replace it (--replace, submit(job, replace=True))"
            )
        if status == 404:
            details = body.get("details") or {}
            if resource == self.RESOURCE and not (body.get("kind") == "Status" and details.get("name")):
                return errors.OperatorMissingError(
                    f"this cluster has no {self.KIND} resource ({self.RESOURCE}/"
                    f"{self.VERSION} is not served at {self.host}): {self.INSTALL}"
                )
            return errors.JobNotFoundError(
                f"{resource} {name} not found in namespace {namespace}; list the jobs with `dvgt list`"
            )
        return errors.SdkError(f"{verb} {what}: the API server answered {status} {cause.reason}: {message}")

    # -- jobs -----------------------------------------------------------------------------------------
    def submit(self, job: TrainingJob, replace: bool = False) -> str:
        """Create the job's PyTorchJob (replace=True: delete an existing one of that name first)."""
        from kubeflow.training.utils.utils import FakeResponse

        body = job.render()  # validated and rendered before any request
        namespace = body["metadata"]["namespace"] = job.namespace or self.namespace
        model = self.training.api_client.deserialize(FakeResponse(body), "KubeflowOrgV1PyTorchJob")
        try:
            self.training.create_job(job=model, namespace=namespace)
        except Exception as error:
            translated = self._translate(error, "create", RESOURCE, job.name, namespace)
            if not (replace and isinstance(translated, errors.JobExistsError)):
                raise translated from None
            self.delete(job.name, wait=True, namespace=namespace)
            try:
                self.training.create_job(job=model, namespace=namespace)
            except Exception as again:
                raise self._translate(again, "create", RESOURCE, job.name, namespace) from None
        return job.name

    def get(self, name: str, namespace: str | None = None) -> dict[str, Any]:
        """The PyTorchJob as a dict (Kubernetes field names)."""
        try:
            model = self.training.get_job(name, namespace=namespace or self.namespace, timeout=self.timeout)
        except Exception as error:
            raise self._translate(error, "get", RESOURCE, name, namespace) from None
        return self.training.api_client.sanitize_for_serialization(model)

    def delete(self, name: str, wait: bool = False, timeout_s: float = 120.0, namespace: str | None = None) -> None:
        """Delete the PyTorchJob (its pods go with it); wait: until it is gone."""
        try:
            self.training.delete_job(name, namespace=namespace or self.namespace)
        except Exception as error:
            raise self._translate(error, "delete", RESOURCE, name, namespace) from None
        if wait:
            self._wait_gone("PyTorchJob", name, namespace, timeout_s)

    def _wait_gone(self, kind: str, name: str, namespace: str | None, timeout_s: float) -> None:
        """Poll until the deleted job of ``kind`` is gone, or say after ``timeout_s`` what holds it."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self.get(name, namespace)
            except errors.JobNotFoundError:
                return
            if time.monotonic() > deadline:
                raise errors.SdkError(
                    f"{kind} {name} was still there {timeout_s:.0f} s after its deletion; "
                    f"look at its finalizers (kubectl get {kind.lower()} {name} -o yaml)"
                )
            time.sleep(1.0)

    def list(self) -> builtins.list[JobStatus]:
        try:
            models = self.training.list_jobs(namespace=self.namespace, timeout=self.timeout)
        except Exception as error:
            raise self._translate(error, "list", RESOURCE) from None
        return [self._status_of(self.training.api_client.sanitize_for_serialization(m)) for m in models]

    def _pods(self, name: str, replica: str | None = None, index: int | None = None) -> builtins.list[Any]:
        try:
            return self.training.get_job_pods(
                name, namespace=self.namespace, replica_type=replica, replica_index=index, timeout=self.timeout
            )
        except Exception as error:
            raise self._translate(error, "list", "pods", f"of job {name}") from None

    def _status_of(self, job: dict[str, Any]) -> JobStatus:
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
            rtype: ReplicaStatus(int(r.get("active") or 0), int(r.get("succeeded") or 0), int(r.get("failed") or 0))
            for rtype, r in (state.get("replicaStatuses") or {}).items()
        }
        metadata = job["metadata"]
        return JobStatus(
            metadata["name"],
            metadata.get("namespace") or self.namespace,
            phase_of(conditions),
            conditions,
            replicas,
            stage=(metadata.get("labels") or {}).get("dvgt.io/stage", ""),
            checkpoint_uri=checkpoint_uri_of(job),
        )

    def status(self, name: str, checkpoint: bool = True) -> JobStatus:
        job = self.get(name)
        status = self._status_of(job)
        pods = self._pods(name)
        for pod in pods:
            restarts = sum(c.restart_count for c in pod.status.container_statuses or [] if c.name == "pytorch")
            status.pods.append(PodStatus(pod.metadata.name, pod.status.phase or "Unknown", restarts))
        master = next(
            (p for p in pods if (p.metadata.labels or {}).get("training.kubeflow.org/replica-type") == "master"), None
        )
        if master is not None and master.status.phase != "Pending":
            self._add_step(status, job, master.metadata.name)
        if checkpoint:
            add_checkpoint(status, status.checkpoint_uri)
        return status

    def _add_step(self, status: JobStatus, job: dict[str, Any], pod: str) -> None:
        """The last step from the master's exporter (through the API server's pod proxy), else its log."""
        self._read_step(status, pod, exporter_ports(job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]))

    def _read_step(self, status: JobStatus, pod: str, ports: builtins.list[int], container: str = "pytorch") -> None:
        if ports and status.phase in ("Running", "Restarting"):
            try:
                text = self.core.connect_get_namespaced_pod_proxy_with_path(
                    f"{pod}:{ports[0]}", self.namespace, "metrics", _request_timeout=self.timeout
                )
                status.last_step, status.last_step_source = step_from_metrics(text), "metrics"
            except Exception as error:
                status.notes.append(
                    f"the exporter of {pod} could not be read ({self._translate(error, 'get', 'pods/proxy', pod)})"
                )
        if status.last_step is None:
            try:
                text = self.core.read_namespaced_pod_log(
                    pod, self.namespace, container=container, tail_lines=LOG_TAIL_LINES, _request_timeout=self.timeout
                )
                status.last_step, status.last_step_source = step_from_log(text.splitlines()), "log"
            except Exception as error:
                status.notes.append(
                    f"the log of {pod} could not be read ({self._translate(error, 'get', 'pods/log', pod)})"
                )
        if status.last_step is None:
            status.last_step_source = ""

    def logs(self, name: str, follow: bool = False, replica: str = "master", index: int = 0) -> Iterator[str]:
        """Lines of the pytorch container of one replica's pod (follow: until the container ends)."""
        from kubernetes import watch

        pods = self._pods(name, replica, index)
        if not pods:
            self.get(name)  # a missing job is reported as such
            raise errors.SdkError(
                f"job {name} has no {replica}-{index} pod yet; wait for it "
                f"(dvgt wait {name} --for running) and ask again"
            )
        pod = pods[0].metadata.name
        try:
            if not follow:
                text = self.core.read_namespaced_pod_log(
                    pod, self.namespace, container="pytorch", _request_timeout=self.timeout
                )
                yield from text.splitlines()
                return
            yield from watch.Watch().stream(
                self.core.read_namespaced_pod_log, name=pod, namespace=self.namespace, container="pytorch"
            )
        except errors.SdkError:
            raise
        except Exception as error:
            raise self._translate(error, "get", "pods/log", pod) from None


def exporter_ports(pod_spec: dict[str, Any]) -> list[int]:
    """The metrics port of a pod spec's exporter sidecar (none without it)."""
    return [
        p["containerPort"]
        for c in pod_spec.get("initContainers") or []
        if c["name"] == "exporter"
        for p in c.get("ports") or []
        if p.get("name") == "metrics"
    ]


def _json(text: Any) -> dict[str, Any]:
    try:
        value = json.loads(text or "")
    except (TypeError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}
