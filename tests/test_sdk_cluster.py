"""The SDK's cluster backend (Kubeflow TrainingClient + kubernetes client) against a fake API server.

No real Kubernetes API server can run on this machine, so FakeApiServer below is a fake: an HTTP
server on 127.0.0.1 that speaks the parts of the Kubernetes API the SDK touches (PyTorchJobs of
kubeflow.org/v1, pods, pod logs, the pod proxy), answers like the API server does (Status objects,
404 "page not found" for an unserved group) and records every request. A kubeconfig written by the
test points the SDK at it. Checked: request paths and bodies, conditions followed to Succeeded and to
Failed, and each error as one line that says what to do."""

import json
import re
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import yaml
from servers import free_port

from dvgt.cli import main
from dvgt.sdk import (
    Client,
    ClusterUnreachableError,
    ForbiddenError,
    InvalidJobError,
    JobExistsError,
    JobFailedError,
    JobNotFoundError,
    NoClusterConfigError,
    OperatorMissingError,
    TrainingJob,
)

TOKEN = "test-token"
JOBS = "/apis/kubeflow.org/v1/namespaces/{ns}/pytorchjobs"


def condition(kind: str, status: bool = True, reason: str = "", message: str = "") -> dict:
    return {
        "type": kind,
        "status": "True" if status else "False",
        "reason": reason or f"PyTorchJob{kind}",
        "message": message,
        "lastTransitionTime": "2025-01-01T00:00:00Z",
    }


def pod(job: str, rtype: str, index: int, phase: str = "Running", restarts: int = 0) -> dict:
    return {
        "metadata": {
            "name": f"{job}-{rtype}-{index}",
            "labels": {
                "training.kubeflow.org/job-name": job,
                "training.kubeflow.org/replica-type": rtype,
                "training.kubeflow.org/replica-index": str(index),
                **({"training.kubeflow.org/job-role": "master"} if rtype == "master" else {}),
            },
        },
        "status": {
            "phase": phase,
            "containerStatuses": [
                {"name": "pytorch", "restartCount": restarts, "ready": True, "image": "dvgt/trainer:1", "imageID": ""}
            ],
        },
    }


class FakeApiServer:
    """See the module docstring. jobs: stored PyTorchJobs by name; statuses[name]: the status each GET
    returns in turn (the last one stays); pods, logs[pod], metrics[pod]; forbid: (verb, resource) pairs
    answered 403; crd_installed False: kubeflow.org answers 404 page not found."""

    def __init__(self, namespace: str = "team-a"):
        self.namespace = namespace
        self.jobs, self.statuses, self.pods, self.logs, self.metrics = {}, {}, [], {}, {}
        self.requests = []  # (method, path with query, body or None, Authorization header)
        self.forbid, self.crd_installed = set(), True
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):
                fake.handle(self, "GET")

            def do_POST(self):
                fake.handle(self, "POST")

            def do_DELETE(self):
                fake.handle(self, "DELETE")

            def do_PUT(self):
                fake.handle(self, "PUT")

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def kubeconfig(self, path, server=None):
        path.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "current-context": "fake",
                    "clusters": [{"name": "fake", "cluster": {"server": server or self.url}}],
                    "users": [{"name": "me", "user": {"token": TOKEN}}],
                    "contexts": [
                        {"name": "fake", "context": {"cluster": "fake", "user": "me", "namespace": self.namespace}}
                    ],
                }
            )
        )
        return path

    # -- answers ----------------------------------------------------------------------------------------
    @staticmethod
    def send(handler, code: int, body, content_type: str = "application/json"):
        data = (json.dumps(body) if not isinstance(body, str) else body).encode()
        handler.send_response(code)
        handler.send_header("Content-Type", content_type)
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)

    def status_error(self, handler, code: int, reason: str, message: str, name: str = "", kind: str = "pytorchjobs"):
        self.send(
            handler,
            code,
            {
                "kind": "Status",
                "apiVersion": "v1",
                "status": "Failure",
                "message": message,
                "reason": reason,
                "code": code,
                "details": {"name": name, "group": "kubeflow.org", "kind": kind},
            },
        )

    def handle(self, handler, method: str):
        url = urllib.parse.urlsplit(handler.path)
        url = url._replace(path=urllib.parse.unquote(url.path))  # the pod proxy's "pod:port" comes as pod%3Aport
        query = dict(urllib.parse.parse_qsl(url.query))
        length = int(handler.headers.get("Content-Length") or 0)
        body = json.loads(handler.rfile.read(length)) if length else None
        self.requests.append((method, handler.path, body, handler.headers.get("Authorization")))
        jobs = JOBS.format(ns=self.namespace)
        resource = "pods" if url.path.startswith("/api/v1/") else "pytorchjobs"
        resource += "/log" if url.path.endswith("/log") else "/proxy" if "/proxy/" in url.path else ""
        verb = {"POST": "create", "DELETE": "delete"}.get(
            method, "get" if url.path.rsplit("/", 1)[-1] not in ("pytorchjobs", "pods") else "list"
        )
        if (verb, resource) in self.forbid:
            return self.status_error(
                handler,
                403,
                "Forbidden",
                f'pytorchjobs.kubeflow.org is forbidden: User "me" cannot {verb} '
                f'resource "{resource}" in API group "kubeflow.org" in the namespace "{self.namespace}"',
            )
        if url.path.startswith("/apis/kubeflow.org/") and not self.crd_installed:
            return self.send(handler, 404, "404 page not found\n", "text/plain")
        if url.path == jobs and method == "POST":
            name = body["metadata"]["name"]
            if name in self.jobs:
                return self.status_error(
                    handler, 409, "AlreadyExists", f'pytorchjobs.kubeflow.org "{name}" already exists', name
                )
            self.jobs[name] = body
            return self.send(handler, 201, body)
        if url.path == jobs:
            return self.send(
                handler,
                200,
                {
                    "apiVersion": "kubeflow.org/v1",
                    "kind": "PyTorchJobList",
                    "metadata": {},
                    "items": [self.job(n) for n in self.jobs],
                },
            )
        if url.path.startswith(jobs + "/"):
            name = url.path[len(jobs) + 1 :]
            if name not in self.jobs:
                return self.status_error(handler, 404, "NotFound", f'pytorchjobs.kubeflow.org "{name}" not found', name)
            if method == "DELETE":
                del self.jobs[name]
                return self.send(handler, 200, {"kind": "Status", "apiVersion": "v1", "status": "Success"})
            return self.send(handler, 200, self.job(name))
        pods = f"/api/v1/namespaces/{self.namespace}/pods"
        if url.path == pods:
            wanted = dict(item.split("=") for item in query.get("labelSelector", "").split(",") if item)
            items = [p for p in self.pods if all(p["metadata"]["labels"].get(k) == v for k, v in wanted.items())]
            return self.send(handler, 200, {"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": items})
        match = re.fullmatch(pods + r"/([^/:]+)(?::(\d+))?/(log|proxy/metrics)", url.path)
        if match and match.group(3) == "log":
            lines = self.logs.get(match.group(1), [])
            lines = lines[-int(query["tailLines"]) :] if "tailLines" in query else lines
            return self.send(handler, 200, "".join(line + "\n" for line in lines), "text/plain")
        if match and match.group(1) in self.metrics:
            return self.send(handler, 200, self.metrics[match.group(1)], "text/plain")
        return self.status_error(handler, 404, "NotFound", f"nothing at {url.path}", kind="")

    def job(self, name: str) -> dict:
        job = dict(self.jobs[name])
        queue = self.statuses.get(name) or [{}]
        job["status"] = queue.pop(0) if len(queue) > 1 else queue[0]
        return job


def serving(server: FakeApiServer, tmp_path, monkeypatch):
    """Start ``server``, point the kubeconfig at it for the test, yield it, stop it."""
    server.thread.start()
    monkeypatch.setenv("KUBECONFIG", str(server.kubeconfig(tmp_path / "kubeconfig")))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    try:
        yield server
    finally:
        server.server.shutdown()
        server.server.server_close()


@pytest.fixture
def api(tmp_path, monkeypatch):
    yield from serving(FakeApiServer(), tmp_path, monkeypatch)


def small_job(**fields) -> TrainingJob:
    return TrainingJob(
        **{
            "stage": "finetune-nuscenes",
            "nodes": 2,
            "gpus_per_node": 8,
            "profile": "h100-80g",
            "image": "registry.example/dvgt:1.0",
            "checkpoint_uri": "s3://bucket/runs/nusc-1",
            "s3_secret": "dvgt-s3",
            "overrides": {"optim.lr": 5e-6},
            "name": "nusc-1",
            **fields,
        }
    )


def test_submit_posts_the_rendered_job_to_the_contexts_namespace(api):
    client = Client()
    assert client.namespace == "team-a"
    job = small_job()
    assert client.submit(job) == "nusc-1"
    method, path, body, auth = api.requests[-1]
    assert (method, path, auth) == ("POST", "/apis/kubeflow.org/v1/namespaces/team-a/pytorchjobs", f"Bearer {TOKEN}")
    expected = job.render()
    expected["metadata"]["namespace"] = "team-a"
    assert body == expected  # the chart's object, unchanged by the Kubeflow models it went through
    with pytest.raises(
        JobExistsError,
        match=r"^PyTorchJob nusc-1 already exists in namespace team-a: choose another name "
        r"\(--name\) or replace it \(--replace, submit\(job, replace=True\)\)$",
    ):
        client.submit(job)
    api.jobs["nusc-1"]["spec"]["runPolicy"]["backoffLimit"] = 99  # the old one
    client.submit(small_job(), replace=True)
    assert [(m, p) for m, p, _, _ in api.requests[-4:]] == [
        ("POST", "/apis/kubeflow.org/v1/namespaces/team-a/pytorchjobs"),
        ("DELETE", "/apis/kubeflow.org/v1/namespaces/team-a/pytorchjobs/nusc-1"),
        ("GET", "/apis/kubeflow.org/v1/namespaces/team-a/pytorchjobs/nusc-1"),  # gone?
        ("POST", "/apis/kubeflow.org/v1/namespaces/team-a/pytorchjobs"),
    ]
    assert api.jobs["nusc-1"]["spec"]["runPolicy"]["backoffLimit"] == 10
    other = Client(namespace="research")
    assert other.namespace == "research"


def test_an_invalid_job_is_refused_before_any_request(api):
    client = Client()
    with pytest.raises(InvalidJobError, match="invalid TrainingJob.profile"):
        client.submit(small_job(profile="h100"))
    assert api.requests == []


def test_wait_follows_the_conditions_to_succeeded_and_status_reports_progress(api):
    client = Client()
    client.submit(small_job())
    running = {
        "conditions": [condition("Created"), condition("Running")],
        "replicaStatuses": {"Master": {"active": 1}, "Worker": {"active": 1}},
    }
    api.statuses["nusc-1"] = [
        {},
        {"conditions": [condition("Created")]},
        running,
        {
            "conditions": [condition("Created"), condition("Running", False), condition("Succeeded")],
            "replicaStatuses": {"Master": {"succeeded": 1}, "Worker": {"succeeded": 1}},
        },
    ]
    api.pods = [pod("nusc-1", "master", 0, restarts=1), pod("nusc-1", "worker", 0), pod("other", "master", 0)]
    api.metrics["nusc-1-master-0"] = (
        "# TYPE dvgt_optimizer_step gauge\n"
        'dvgt_optimizer_step{node_rank="0",local_rank="0"} 120\n'
        'dvgt_optimizer_step{node_rank="0",local_rank="1"} 121\n'
    )
    api.logs["nusc-1-master-0"] = [
        "Training dvgt2 ...",
        "step 100 (epoch 0): loss 1.0",
        '{"finished": true, "step": 150}',
    ]
    seen = []
    final = client.wait("nusc-1", until="Succeeded", poll_s=0.01, callback=lambda s: seen.append(s.phase))
    assert seen == ["Pending", "Created", "Running", "Succeeded"] and final.phase == "Succeeded"
    assert final.replicas["Worker"].succeeded == 1 and final.last_step == 150 and final.last_step_source == "log"
    api.statuses["nusc-1"] = [running]
    status = client.status("nusc-1")  # running: the step from the exporter, through the API server's pod proxy
    assert (status.phase, status.last_step, status.last_step_source) == ("Running", 121, "metrics")
    assert [(p.name, p.phase, p.restarts) for p in status.pods] == [
        ("nusc-1-master-0", "Running", 1),
        ("nusc-1-worker-0", "Running", 0),
    ]
    assert status.checkpoint_uri == "s3://bucket/runs/nusc-1/nusc-1" and status.checkpoint is None
    assert status.stage == "finetune-nuscenes" and "Running" in status.describe()
    paths = [p for _, p, _, _ in api.requests]
    assert "/api/v1/namespaces/team-a/pods?labelSelector=training.kubeflow.org%2Fjob-name%3Dnusc-1" in paths
    assert "/api/v1/namespaces/team-a/pods/nusc-1-master-0%3A9400/proxy/metrics" in paths
    assert [s.name for s in client.list()] == ["nusc-1"]
    assert list(client.logs("nusc-1")) == api.logs["nusc-1-master-0"]
    assert list(client.logs("nusc-1", follow=True)) == api.logs["nusc-1-master-0"]
    assert api.requests[-1][1] == "/api/v1/namespaces/team-a/pods/nusc-1-master-0/log?container=pytorch&follow=True"
    client.delete("nusc-1")
    assert api.requests[-1][:2] == ("DELETE", "/apis/kubeflow.org/v1/namespaces/team-a/pytorchjobs/nusc-1")
    with pytest.raises(
        JobNotFoundError, match=r"^pytorchjobs.kubeflow.org nusc-1 not found in namespace team-a; list the jobs"
    ):
        client.status("nusc-1")


def test_wait_reports_a_failed_job(api):
    client = Client()
    client.submit(small_job())
    api.statuses["nusc-1"] = [
        {"conditions": [condition("Created"), condition("Running")]},
        {
            "conditions": [
                condition("Created"),
                condition("Running", False),
                condition(
                    "Failed",
                    reason="PyTorchJobFailed",
                    message="PyTorchJob nusc-1 has failed because 1 Master replica(s) failed.",
                ),
            ]
        },
    ]
    seen = []
    with pytest.raises(
        JobFailedError,
        match=r"^job nusc-1 Failed: PyTorchJobFailed PyTorchJob nusc-1 has failed because 1 Master "
        r"replica\(s\) failed. while waiting for Succeeded; see its logs \(dvgt logs nusc-1\)$",
    ):
        client.wait("nusc-1", until="Succeeded", poll_s=0.01, callback=lambda s: seen.append(s.phase))
    assert seen == ["Running", "Failed"]
    assert client.wait("nusc-1", until="Finished", poll_s=0.01).phase == "Failed"
    with pytest.raises(TimeoutError, match="job nusc-1 is still Running after 0 s waiting for Succeeded"):
        api.statuses["nusc-1"] = [{"conditions": [condition("Running")]}]
        client.wait("nusc-1", until="Succeeded", timeout=0.05, poll_s=0.01)


def test_forbidden_names_the_verb_the_resource_and_the_role(api):
    api.forbid = {("create", "pytorchjobs")}
    with pytest.raises(ForbiddenError) as error:
        Client().submit(small_job())
    message = str(error.value)
    assert message.startswith(
        "forbidden: you may not create pytorchjobs.kubeflow.org in namespace team-a (pytorchjobs.kubeflow.org is forbidden"
    )
    assert (
        "the chart's Role grants what the SDK needs (charts/dvgt/templates/rbac.yaml): helm template dvgt charts/dvgt --set rbac.create=true"
        in message
    )
    assert "kubectl create rolebinding dvgt-sdk-$USER -n team-a --role dvgt-sdk" in message and "\n" not in message
    api.forbid = {("list", "pods")}
    api.jobs["j"] = small_job(name="j").render()
    with pytest.raises(ForbiddenError, match="^forbidden: you may not list pods in namespace team-a"):
        Client().status("j")


def test_missing_crd_says_how_to_install_the_training_operator(api):
    api.crd_installed = False
    for call in (lambda c: c.submit(small_job()), lambda c: c.status("nusc-1"), lambda c: c.list()):
        with pytest.raises(
            OperatorMissingError,
            match=r"^this cluster has no PyTorchJob resource \(pytorchjobs.kubeflow.org/v1 is not served at "
            r"http://127.0.0.1:\d+\): install the Kubeflow Training Operator v1.9: kubectl apply "
            r'--server-side -k "github.com/kubeflow/training-operator.git/manifests/overlays/standalone\?ref=v1.9.2"$',
        ):
            call(Client())


def test_unreachable_server_and_missing_kubeconfig(tmp_path, monkeypatch, api):
    closed = free_port()  # nothing listens there
    monkeypatch.setenv("KUBECONFIG", str(api.kubeconfig(tmp_path / "closed", server=f"http://127.0.0.1:{closed}")))
    started = time.monotonic()
    with pytest.raises(
        ClusterUnreachableError,
        match=rf"^cannot reach the Kubernetes API server at http://127.0.0.1:{closed} \(\[Errno 111\] Connection refused\); "
        r"check that the cluster is up and that the kubeconfig's context 'fake' points at it",
    ):
        Client().status("nusc-1")
    assert time.monotonic() - started < 30
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    with pytest.raises(
        NoClusterConfigError,
        match=rf"^no Kubernetes configuration: the kubeconfig {tmp_path / 'missing'} does not exist "
        r"and this is not a pod with a service account; point KUBECONFIG",
    ):
        Client()


def test_cli_commands_against_the_fake_server(api, capsys):
    def run(*argv):
        with pytest.raises(SystemExit) as code:
            main(list(argv))
        out, err = capsys.readouterr()
        return code.value.code, out, err

    code, out, _ = run(
        "submit", "--stage", "dvgt1-demo", "--profile", "cpu-test", "--name", "demo-1", "--set", "optim.lr=1e-4"
    )
    assert code == 0 and out.startswith("submitted job demo-1 in namespace team-a (stage dvgt1-demo)")
    assert (
        api.requests[-1][2]["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["args"][-1]
        == "optim.lr=1e-4"
    )
    code, _, err = run("submit", "--stage", "dvgt1-demo", "--name", "demo-1")
    assert (
        code == 2
        and err.startswith("error: PyTorchJob demo-1 already exists in namespace team-a")
        and err.count("\n") == 1
    )
    api.statuses["demo-1"] = [
        {"conditions": [condition("Created")]},
        {"conditions": [condition("Created"), condition("Running")], "replicaStatuses": {"Master": {"active": 1}}},
    ]
    code, out, _ = run("wait", "demo-1", "--until", "Running", "--poll", "0.01")
    lines = out.splitlines()
    assert (
        code == 0
        and lines[0].startswith("demo-1: Created, no pods yet")
        and lines[1].startswith("demo-1: Running, 1/1 pods running")
    )
    assert lines[-1] == "job demo-1 is Running"
    code, out, _ = run("status", "demo-1", "--json")
    assert code == 0 and json.loads(out)["phase"] == "Running"
    code, out, _ = run("list")
    assert out.split() == ["NAME", "PHASE", "STAGE", "PODS", "demo-1", "Running", "dvgt1-demo", "1/1"]
    code, out, _ = run("delete", "demo-1")
    assert code == 0 and out == "deleted job demo-1\n" and "demo-1" not in api.jobs
    api.crd_installed = False
    code, _, err = run("list", "-n", "other")
    assert code == 2 and err.startswith("error: this cluster has no PyTorchJob resource")


# --------------------------------------------------------------------------------------------
# TrainJobs (Kubeflow Trainer v2) through the Kubeflow SDK's TrainerClient
# --------------------------------------------------------------------------------------------

TRAINER = "/apis/trainer.kubeflow.org/v1alpha1"


class FakeTrainerApi(FakeApiServer):
    """FakeApiServer that also serves trainer.kubeflow.org/v1alpha1 (TrainJobs, TrainingRuntimes,
    ClusterTrainingRuntimes: create, get, list, replace, delete), the Trainer's version ConfigMap that
    TrainerClient reads, and JobSet-labelled node pods (tpods) with creation times and pod specs."""

    def __init__(self):
        super().__init__()
        self.objects = {}  # (plural, name) -> object
        self.tpods = []

    def handle(self, handler, method):
        path = urllib.parse.unquote(urllib.parse.urlsplit(handler.path).path)
        if path == "/api/v1/namespaces/kubeflow-system/configmaps/kubeflow-trainer-public":
            return self.send(
                handler,
                200,
                {
                    "kind": "ConfigMap",
                    "apiVersion": "v1",
                    "metadata": {"name": "kubeflow-trainer-public"},
                    "data": {"kubeflow_trainer_version": "v2.3.0"},
                },
            )
        match = re.fullmatch(
            TRAINER
            + r"(?:/namespaces/"
            + self.namespace
            + r")?/(trainjobs|trainingruntimes|clustertrainingruntimes)(?:/([^/]+))?",
            path,
        )
        if path == f"/api/v1/namespaces/{self.namespace}/pods" and "jobset" in handler.path:
            query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(handler.path).query))
            job = re.search(r"jobset.sigs.k8s.io/jobset-name=([^,]+)", query["labelSelector"]).group(1)
            self.requests.append((method, handler.path, None, handler.headers.get("Authorization")))
            items = [p for p in self.tpods if p["metadata"]["labels"]["jobset.sigs.k8s.io/jobset-name"] == job]
            return self.send(handler, 200, {"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": items})
        if not match:
            return super().handle(handler, method)
        length = int(handler.headers.get("Content-Length") or 0)
        body = json.loads(handler.rfile.read(length)) if length else None
        self.requests.append((method, handler.path, body, handler.headers.get("Authorization")))
        if not self.crd_installed:
            return self.send(handler, 404, "404 page not found\n", "text/plain")
        plural, name = match.groups()
        if method == "POST":
            key = (plural, body["metadata"]["name"])
            if key in self.objects:
                return self.status_error(
                    handler,
                    409,
                    "AlreadyExists",
                    f'{plural}.trainer.kubeflow.org "{key[1]}" already exists',
                    key[1],
                    plural,
                )
            self.objects[key] = {
                **body,
                "metadata": {**body["metadata"], "resourceVersion": "1", "creationTimestamp": "2025-01-01T00:00:00Z"},
            }
            return self.send(handler, 201, self.objects[key])
        if name is None:
            items = [self.job(n) if p == "trainjobs" else o for (p, n), o in self.objects.items() if p == plural]
            return self.send(
                handler,
                200,
                {"apiVersion": "trainer.kubeflow.org/v1alpha1", "kind": "List", "metadata": {}, "items": items},
            )
        if (plural, name) not in self.objects:
            return self.status_error(
                handler, 404, "NotFound", f'{plural}.trainer.kubeflow.org "{name}" not found', name, plural
            )
        if method == "DELETE":
            del self.objects[(plural, name)]
            return self.send(handler, 200, {"kind": "Status", "apiVersion": "v1", "status": "Success"})
        if method == "PUT":
            self.objects[(plural, name)] = body
            return self.send(handler, 200, body)
        return self.send(handler, 200, self.job(name) if plural == "trainjobs" else self.objects[(plural, name)])

    def job(self, name):
        job = dict(self.objects[("trainjobs", name)])
        queue = self.statuses.get(name) or [{}]
        job["status"] = queue.pop(0) if len(queue) > 1 else queue[0]
        return job


def node_pod(job: str, index: int, phase: str = "Running", restarts: int = 0) -> dict:
    return {
        "metadata": {
            "name": f"{job}-node-0-{index}-abcde",
            "creationTimestamp": "2025-01-01T00:00:00Z",
            "labels": {
                "jobset.sigs.k8s.io/jobset-name": job,
                "jobset.sigs.k8s.io/replicatedjob-name": "node",
                "batch.kubernetes.io/job-completion-index": str(index),
            },
        },
        "spec": {
            "containers": [{"name": "node", "image": "dvgt/trainer:1"}],
            "initContainers": [
                {
                    "name": "exporter",
                    "image": "dvgt/exporter:1",
                    "restartPolicy": "Always",
                    "ports": [{"name": "metrics", "containerPort": 9400}],
                }
            ],
        },
        "status": {
            "phase": phase,
            "containerStatuses": [
                {"name": "node", "restartCount": restarts, "ready": True, "image": "dvgt/trainer:1", "imageID": ""}
            ],
        },
    }


def node_jobs(active: int = 0, succeeded: int = 0, failed: int = 0) -> list:
    """status.jobsStatus as Trainer writes it (every count present)."""
    return [
        {"name": "node", "active": active, "ready": active, "succeeded": succeeded, "failed": failed, "suspended": 0}
    ]


def tj_condition(kind: str, reason: str = "", message: str = "") -> dict:
    return {
        "type": kind,
        "status": "True",
        "reason": reason or kind,
        "message": message,
        "lastTransitionTime": "2025-01-01T00:00:00Z",
    }


@pytest.fixture
def trainer_api(tmp_path, monkeypatch):
    yield from serving(FakeTrainerApi(), tmp_path, monkeypatch)


def test_trainjob_submit_creates_the_runtime_then_the_job_and_is_followed(trainer_api):
    api = trainer_api
    client = Client(api="trainjob")
    job = small_job(api="trainjob")
    assert client.submit(job) == "nusc-1"
    posts = [(p, b) for m, p, b, _ in api.requests if m == "POST"]
    assert [p for p, _ in posts] == [
        f"{TRAINER}/namespaces/team-a/trainingruntimes",
        f"{TRAINER}/namespaces/team-a/trainjobs",
    ]
    runtime, trainjob_ = job.objects()
    for obj in (runtime, trainjob_):
        obj["metadata"]["namespace"] = "team-a"
    assert [b for _, b in posts] == [runtime, trainjob_]  # the chart's objects, unchanged by the Trainer SDK's models
    with pytest.raises(
        JobExistsError, match=r"^TrainJob nusc-1 already exists in namespace team-a: choose another name"
    ):
        client.submit(job)
    assert [m for m, *_ in api.requests[-3:]] == ["GET", "PUT", "POST"]  # the runtime replaced, the job refused

    running = {"jobsStatus": node_jobs(active=2)}
    api.statuses["nusc-1"] = [running]
    api.tpods = [node_pod("nusc-1", 0, restarts=2), node_pod("nusc-1", 1)]
    api.metrics["nusc-1-node-0-0-abcde"] = 'dvgt_optimizer_step{node_rank="0",local_rank="0"} 42\n'
    api.logs["nusc-1-node-0-0-abcde"] = ["Training dvgt2 ...", "step 40 (epoch 0): loss 1.0"]
    status = client.status("nusc-1")
    assert (status.phase, status.last_step, status.last_step_source) == ("Running", 42, "metrics")
    assert [(p.name, p.phase, p.restarts) for p in status.pods] == [
        ("nusc-1-node-0-0-abcde", "Running", 2),
        ("nusc-1-node-0-1-abcde", "Running", 0),
    ]
    assert status.replicas["node"].active == 2 and status.stage == "finetune-nuscenes"
    assert status.checkpoint_uri == "s3://bucket/runs/nusc-1/nusc-1"
    assert "/api/v1/namespaces/team-a/pods/nusc-1-node-0-0-abcde%3A9400/proxy/metrics" in [
        p for _, p, _, _ in api.requests
    ]
    api.statuses["nusc-1"] = [
        running,
        running,
        {"conditions": [tj_condition("Complete", "JobsCompleted")], "jobsStatus": node_jobs(succeeded=2)},
    ]
    seen = []
    final = client.wait("nusc-1", poll_s=0.01, callback=lambda s: seen.append(s.phase))  # until it succeeds
    assert final.phase == "Succeeded" and seen == ["Running", "Running", "Succeeded"]
    assert list(client.logs("nusc-1")) == api.logs["nusc-1-node-0-0-abcde"]
    assert api.requests[-1][1] == "/api/v1/namespaces/team-a/pods/nusc-1-node-0-0-abcde/log?container=node"
    assert [(s.name, s.phase) for s in client.list()] == [("nusc-1", "Succeeded")]
    client.delete("nusc-1")
    assert ("trainjobs", "nusc-1") not in api.objects and ("trainingruntimes", "nusc-1") not in api.objects
    with pytest.raises(JobNotFoundError, match=r"^trainjobs.trainer.kubeflow.org nusc-1 not found in namespace team-a"):
        client.status("nusc-1")


def test_trainjob_wait_reports_failure_and_timeout(trainer_api):
    client = Client(api="trainjob")
    client.submit(small_job(api="trainjob"))
    trainer_api.statuses["nusc-1"] = [
        {"conditions": [tj_condition("Failed", "JobFailed", "jobset failed: node-0 failed")]}
    ]
    with pytest.raises(
        JobFailedError,
        match=r"^job nusc-1 Failed: JobFailed jobset failed: node-0 failed while waiting for "
        r"Succeeded; see its logs \(dvgt logs nusc-1 --api trainjob\)$",
    ):
        client.wait("nusc-1", poll_s=0.01)
    trainer_api.statuses["nusc-1"] = [{}]
    with pytest.raises(TimeoutError, match=r"^job nusc-1 did not reach Running within 0 s"):
        client.wait("nusc-1", until="Running", timeout=0.05, poll_s=0.01)


def test_trainjob_without_its_runtime_is_refused_before_it_is_sent(trainer_api):
    client = Client(api="trainjob")
    job = small_job(api="trainjob", create_runtime=False, runtime_name="dvgt")
    with pytest.raises(
        InvalidJobError,
        match=r"^TrainJob nusc-1 references the TrainingRuntime 'dvgt', which does not exist "
        r"in namespace team-a: create it first \(kubectl apply -n team-a -f k8s/trainjob/runtime.yaml",
    ):
        client.submit(job)
    assert [m for m, *_ in trainer_api.requests if m != "GET"] == []  # nothing created
    with pytest.raises(InvalidJobError, match=r"TrainingJob.api is 'pytorchjob' but this client follows trainjobs"):
        client.submit(small_job())
    trainer_api.crd_installed = False
    with pytest.raises(
        OperatorMissingError,
        match=r"^this cluster has no TrainJob resource \(trainjobs.trainer.kubeflow.org/v1alpha1 "
        r"is not served at .*install Kubeflow Trainer v2.3",
    ):
        client.list()


def test_cli_trainjob_commands(trainer_api, capsys):
    def run(*argv):
        with pytest.raises(SystemExit) as code:
            main(list(argv))
        out, err = capsys.readouterr()
        return code.value.code, out, err

    code, out, _ = run(
        "submit", "--stage", "dvgt1-demo", "--profile", "cpu-test", "--name", "demo-1", "--api", "trainjob"
    )
    assert code == 0 and out.startswith("submitted TrainJob demo-1 in namespace team-a (stage dvgt1-demo)")
    assert "dvgt wait demo-1 --api trainjob --for running" in out
    trainer_api.statuses["demo-1"] = [{"jobsStatus": node_jobs(active=1)}]
    trainer_api.tpods = [node_pod("demo-1", 0)]
    code, out, _ = run("wait", "demo-1", "--api", "trainjob", "--for", "running", "--poll", "0.01")
    assert code == 0 and out.splitlines()[-1] == "job demo-1 is Running"
    code, out, _ = run("list", "--api", "trainjob")
    assert out.split() == ["NAME", "PHASE", "STAGE", "PODS", "demo-1", "Running", "dvgt1-demo", "1/1"]
    code, out, _ = run("delete", "demo-1", "--api", "trainjob")
    assert code == 0 and ("trainjobs", "demo-1") not in trainer_api.objects
