"""Run a PyTorchJob, or a TrainJob with its runtime, on this machine, as the Training Operator (or
Kubeflow Trainer v2, JobSet and the Job controller) and the kubelet would on a cluster.

    dvgt local-run k8s/dvgt1-demo.yaml --nproc-per-node 2 --override checkpoint.uri=ckpts
    dvgt local-run k8s/trainjob/dvgt1-demo.yaml    # its runtime from the manifest, --runtime FILE or k8s/trainjob/

Each replica (PyTorchJob: Master 0, Worker i -> node rank i + 1; TrainJob: node i, node rank i) is a
"pod": a folder under --workdir and the processes of its containers. The trainer container (`pytorch`,
or `node`) runs its command and args with the environment the operator adds (pytorchjob.operator_env,
trainjob.plugin_env; 127.0.0.1 as the master's address, a free port) plus its own env; sidecars (init containers with restartPolicy Always, or extra containers) run beside it, with
their declared ports moved to free local ports. Volumes: emptyDirs are folders of the pod,
PVCs / hostPaths come from --volume NAME=PATH, /dev/shm is the host's; container paths in args and
env are rewritten to those folders. Secrets come from --secret NAME=FILE (KEY=VALUE lines) or, when
not given, from this process's environment.

Failures follow the replica's restartPolicy: OnFailure (restart on a non-zero exit) and Always
(restart on any exit) restart the container in its pod after a back-off that doubles, like the
kubelet; ExitCode recreates the pod (fresh emptyDirs) when the exit code is 128-255 (killed by a
signal, e.g. 143 after SIGTERM or 137 after SIGKILL) and fails the job otherwise; Never fails the
job. A TrainJob's pods follow the same rules from their Job: pod restartPolicy OnFailure restarts in
place; Never recreates the pod unless the Job's podFailurePolicy fails the job for that exit code.
Every restart counts against runPolicy.backoffLimit (the Job's backoffLimit). When one pod fails, its
peers are left alone: under torchrun's static rendezvous their collectives fail and they restart by
their own policy, as on a cluster. A PyTorchJob succeeds when the Master's `pytorch` container exits
0, a TrainJob when every node's `node` container has.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from types import FrameType
from typing import Any, NoReturn

from dvgt.k8s import pytorchjob, trainjob
from dvgt.k8s.pytorchjob import CONTAINER, REPLICA_TYPES, operator_env, replica_counts

# Mounts that are this machine's own folders: a memory emptyDir at /dev/shm is the host's /dev/shm, and
# an emptyDir at /tmp (the chart's, for a read-only root filesystem) the host's /tmp, so that paths under
# /tmp in a manifest or an --override (pytest's, mktemp's) keep meaning this machine's.
HOST_DIRS = ("/dev/shm", "/tmp")
MAX_BACKOFF_S = 300.0  # the kubelet's cap on the restart back-off
_print_lock = threading.Lock()


def log(prefix: str, line: str) -> None:
    with _print_lock:
        sys.stdout.write(f"[{prefix}] {line}\n")
        sys.stdout.flush()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines (blank lines and # comments ignored), the format of `kubectl create secret --from-env-file`."""
    values = {}
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if "=" not in line:
            raise ValueError(f"{path}:{number}: expected KEY=VALUE, got '{line.strip()}'")
        key, value = line.split("=", 1)
        values[key.strip()] = value
    return values


@dataclass
class Options:
    workdir: Path  # pod folders go here (kept after the run)
    volumes: dict[str, Path] = field(default_factory=dict)  # volume name -> host folder (PVC, hostPath)
    secrets: dict[str, dict[str, str]] = field(default_factory=dict)  # Secret (or ConfigMap) name -> its keys
    env: dict[str, str] = field(default_factory=dict)  # extra env for every container, applied last
    overrides: list[str] = field(default_factory=list)  # trainer config overrides appended to the trainer's args
    nproc_per_node: int | None = None  # replaces nprocPerNode / numProcPerNode (and torchrun's --nproc-per-node)
    replicas: dict[str, int] = field(
        default_factory=dict
    )  # Master / Worker count (Worker=0: no workers); TrainJob: node=N
    restart_delay_s: float = 10.0  # first back-off of an in-place restart (doubles per restart of a pod)
    targets_file: Path | None = None  # write the sidecars' ports as a Prometheus file_sd target list


# --------------------------------------------------------------------------------------------
# Preparing the job
# --------------------------------------------------------------------------------------------


def set_flags(command: list[str], values: dict[str, Callable[[str], str]]) -> list[str]:
    """The value V of each `--flag V` / `--flag=V` whose flag is in `values` becomes values[flag](V)."""
    out = []
    for i, arg in enumerate(command):
        flag, eq, value = arg.partition("=")
        if eq and flag in values:
            arg = f"{flag}={values[flag](value)}"
        elif i and command[i - 1] in values:
            arg = values[command[i - 1]](arg)
        out.append(arg)
    return out


def set_nproc(args: list[str], nproc: int) -> list[str]:
    """torchrun's --nproc-per-node (either spelling) set to nproc."""
    return set_flags(args, {"--nproc-per-node": lambda _: str(nproc), "--nproc_per_node": lambda _: str(nproc)})


def listen_locally(command: list[str], ports: dict[str, str]) -> list[str]:
    """A sidecar's `--port N` (declared container ports -> their local ports) and `--host H`
    (-> 127.0.0.1): it serves this machine only, beside the other pods' sidecars."""
    return set_flags(command, {"--port": lambda v: ports.get(v, v), "--host": lambda _: "127.0.0.1"})


def local_args(args: list[str], options: Options) -> list[str]:
    return (set_nproc(args, options.nproc_per_node) if options.nproc_per_node else list(args)) + list(options.overrides)


def apply_local_options(job: dict[str, Any], options: Options) -> dict[str, Any]:
    """The job with the command-line changes applied (replica counts, processes per pod, overrides)."""
    job = json.loads(json.dumps(job))  # a copy that shares nothing (YAML anchors may alias the replicas' pods)
    if job.get("kind") == "TrainJob":
        trainer = job["spec"].setdefault("trainer", {})
        for rtype, count in options.replicas.items():
            if rtype.lower() != trainjob.NODE:
                raise ValueError(f"--replicas {rtype}={count}: a TrainJob's replicas are its nodes (--replicas node=N)")
            trainer["numNodes"] = count
        trainer["args"] = local_args([str(a) for a in trainer.get("args") or []], options)
        if options.nproc_per_node:
            trainer["numProcPerNode"] = options.nproc_per_node
        return job
    specs = job["spec"]["pytorchReplicaSpecs"]
    for rtype, count in options.replicas.items():
        if rtype not in REPLICA_TYPES:
            raise ValueError(f"--replicas {rtype}={count}: the replica types are Master and Worker")
        if count == 0 and rtype == "Worker":
            specs.pop("Worker", None)
            continue
        if rtype not in specs:
            specs[rtype] = json.loads(json.dumps(specs["Master"]))
        specs[rtype]["replicas"] = count
    for rspec in specs.values():
        for container in rspec["template"]["spec"]["containers"]:
            if container.get("name") != CONTAINER:
                continue
            container["args"] = local_args(list(container.get("args") or []), options)
    if options.nproc_per_node:
        job["spec"]["nprocPerNode"] = str(options.nproc_per_node)
    return job


# --------------------------------------------------------------------------------------------
# What runs: the pods of a PyTorchJob or of a TrainJob, and when each is retried
# --------------------------------------------------------------------------------------------


@dataclass
class PodPlan:
    name: str  # the pod's name, e.g. job-master-0, job-node-0-1
    label: str  # its log prefix and short name: master-0, worker-0, node-0
    role: str  # master | worker | node (Prometheus target label replica_type)
    index: int  # index within its replica type
    spec: dict[str, Any]  # the pod spec
    main: str  # the trainer container (pytorch | node)
    env: dict[str, str]  # what the operator adds to every container
    fields: dict[str, str]  # downward-API values beyond metadata.name & co (labels, annotations)
    policy: str  # restartPolicy as the manifest says it (messages)
    in_place: str = ""  # "OnFailure" | "Always": the kubelet restarts the container; "": a failed pod is recreated ...
    fail_codes: frozenset[int] = frozenset()  # ... unless its exit code fails the job
    recreate: bool = True  # False: a failed pod fails the job (PyTorchJob Never)
    required: bool = True  # the job succeeds when every required pod has


@dataclass
class JobPlan:
    name: str
    pods: list[PodPlan]
    backoff_limit: int
    deadline_s: float | None
    summary: str  # how the job is laid out (first log line)


def plan_pytorchjob(job: dict[str, Any], port: int) -> JobPlan:
    name, counts = job["metadata"]["name"], replica_counts(job)
    pods = []
    for rtype, count in counts.items():
        rspec = job["spec"]["pytorchReplicaSpecs"][rtype]
        policy = rspec.get("restartPolicy", "Never")
        for index in range(count):
            label = f"{rtype.lower()}-{index}"
            pods.append(
                PodPlan(
                    f"{name}-{label}",
                    label,
                    rtype.lower(),
                    index,
                    rspec["template"]["spec"],
                    CONTAINER,
                    operator_env(job, rtype, index, "127.0.0.1", port),
                    {},
                    policy,
                    in_place=policy if policy in ("OnFailure", "Always") else "",
                    fail_codes=frozenset(range(1, 128)) if policy == "ExitCode" else frozenset(),
                    recreate=policy == "ExitCode",
                    required=rtype == "Master",
                )
            )
    run_policy = job["spec"].get("runPolicy") or {}
    return JobPlan(
        name,
        pods,
        int(run_policy["backoffLimit"] if run_policy.get("backoffLimit") is not None else 6),
        run_policy.get("activeDeadlineSeconds"),
        f"{', '.join(f'{n} {t}' for t, n in counts.items())} x {job['spec'].get('nprocPerNode', 'auto')} process(es)",
    )


def failing_exit_codes(job_spec: dict[str, Any]) -> frozenset[int]:
    """The exit codes of the `node` container that the Job's podFailurePolicy answers with FailJob."""
    codes: set[int] = set()
    for rule in (job_spec.get("podFailurePolicy") or {}).get("rules") or []:
        exits = rule.get("onExitCodes") or {}
        if rule.get("action") != "FailJob" or exits.get("containerName", trainjob.NODE) != trainjob.NODE:
            continue
        values = set(exits.get("values") or [])
        codes |= values if exits.get("operator") == "In" else set(range(1, 256)) - values
    return frozenset(codes)


def plan_trainjob(job: dict[str, Any], runtime: dict[str, Any], port: int) -> JobPlan:
    """Node i of the TrainJob: the runtime's trainer pod with the job's fields, PET_* of the torch plugin
    (PYTHONUNBUFFERED=1 is the trainer image's own, Dockerfile; Trainer does not add it)."""
    name, nodes = job["metadata"]["name"], trainjob.num_nodes(job, runtime)
    replicated = trainjob.node_template(job, runtime)
    job_spec = replicated["template"]["spec"]
    spec = job_spec["template"]["spec"]
    policy = spec.get("restartPolicy", "Never")
    pods = [
        PodPlan(
            f"{name}-{trainjob.NODE}-0-{i}",
            f"{trainjob.NODE}-{i}",
            trainjob.NODE,
            i,
            spec,
            trainjob.NODE,
            {"PYTHONUNBUFFERED": "1", **trainjob.plugin_env(job, runtime, i, "127.0.0.1", port)},
            trainjob.pod_fields(job, i),
            policy
            if policy == "OnFailure" or not job_spec.get("podFailurePolicy")
            else f"{policy} with podFailurePolicy FailJob",
            in_place="OnFailure" if policy == "OnFailure" else "",
            fail_codes=failing_exit_codes(job_spec),
        )
        for i in range(nodes)
    ]
    deadline = job["spec"].get("activeDeadlineSeconds")
    return JobPlan(
        name,
        pods,
        int(job_spec.get("backoffLimit", 6)),
        deadline,
        f"{nodes} node(s) x {pods[0].env['PET_NPROC_PER_NODE']} process(es)",
    )


# --------------------------------------------------------------------------------------------
# One pod: its folders, its volumes, its containers
# --------------------------------------------------------------------------------------------


class ContainerFiles:
    """Where one container's paths live on this machine: each of its volume mounts at the volume's
    folder, every other path under its own root folder (a mount inside that root becomes a link)."""

    def __init__(self, root: Path, mounts: dict[str, Path], pod_root: Path):
        self.root, self.mounts = root, mounts  # mounts: container path -> host folder
        self.pod_root = pod_root  # the pod's folder: its emptyDirs are under it

    def host_path(self, path: str, exclude: str = "") -> Path:
        p = PurePosixPath(path)
        inside = [m for m in self.mounts if m != exclude and (p == PurePosixPath(m) or PurePosixPath(m) in p.parents)]
        if not inside:
            return self.root / str(p).lstrip("/")
        best = max(inside, key=len)
        return self.mounts[best] / p.relative_to(best)

    def create(self) -> None:
        """A fresh root (a container starts from its image) with its mount points linked in."""
        shutil.rmtree(self.root, ignore_errors=True)
        for mount, target in sorted(self.mounts.items()):
            target.mkdir(parents=True, exist_ok=True)
            place = self.host_path(mount, exclude=mount)
            # a mount point in the container's own files, or in an emptyDir of its pod (/workspace/data in /workspace)
            if (self.root in place.parents or self.pod_root in place.parents) and not place.exists():
                place.parent.mkdir(parents=True, exist_ok=True)
                place.symlink_to(target, target_is_directory=True)

    def rewrite(self, value: str, prefixes: list[str]) -> str:
        """Container paths under a mount or the working directory -> host paths, wherever a path can start
        in a value: at its start, or after '=', ':', a space or a quote (key=value overrides, shell scripts)."""

        def swap(match: re.Match[str]) -> str:
            path: str = match.group(2)
            inside = any(path == p or path.startswith(p.rstrip("/") + "/") for p in prefixes)
            return str(match.group(1)) + (str(self.host_path(path)) if inside else path)

        return re.sub(r"(^|[=:\s'\"])(/[^\s=:,;'\"]*)", swap, value)


@dataclass
class Process:
    name: str
    popen: subprocess.Popen[str]
    reader: threading.Thread

    def poll(self) -> int | None:
        """The container's exit code: 128 + signal when a signal ended it, as the kubelet reports."""
        code = self.popen.poll()
        return None if code is None else (128 - code if code < 0 else code)


class Pod:
    def __init__(self, plan: PodPlan, options: Options):
        self.plan, self.options = plan, options
        self.label, self.name, self.spec = plan.label, plan.name, plan.spec
        self.grace_s = float(self.spec.get("terminationGracePeriodSeconds", 30))
        self.base_env = plan.env
        self.main_spec = next(c for c in self.spec["containers"] if c["name"] == plan.main)
        self.sidecar_specs = [c for c in self.spec.get("initContainers") or [] if c.get("restartPolicy") == "Always"]
        self.sidecar_specs += [c for c in self.spec["containers"] if c["name"] != plan.main]
        self.init_specs = [c for c in self.spec.get("initContainers") or [] if c.get("restartPolicy") != "Always"]
        # Declared ports of the sidecars -> free local ports, fixed for the pod's whole life.
        self.ports = {
            (c["name"], int(p["containerPort"])): free_port() for c in self.sidecar_specs for p in c.get("ports") or []
        }
        self.generation = 0  # pod re-creations (restartPolicy ExitCode)
        self.container_restarts = 0  # in-place restarts of the trainer container
        self.main: Process | None = None
        self.sidecars: list[Process] = []
        self.root = options.workdir / self.name  # this pod's folder (a new one when the pod is recreated)
        self.volume_folders: dict[str, Path] = {}
        self.finished = False  # the trainer container succeeded and stays down

    # -- file system ------------------------------------------------------------------------------
    def _volume_folder(self, volume: dict[str, Any]) -> Path:
        name: str = volume["name"]
        if name in self.options.volumes:
            return Path(self.options.volumes[name]).resolve()
        if "emptyDir" in volume:
            return self.root / "volumes" / name
        if "hostPath" in volume:
            path = Path(volume["hostPath"]["path"])
            if not path.is_dir():
                raise ValueError(
                    f"volume '{name}' is hostPath {path}, which is not a folder here; "
                    f"give one with --volume {name}=PATH"
                )
            return path
        if "persistentVolumeClaim" in volume:  # one folder for the whole job, like a shared claim
            folder = self.options.workdir / "volumes" / name
            if not folder.exists():
                log(
                    "local-run",
                    f"volume '{name}' (PVC {volume['persistentVolumeClaim'].get('claimName')}) "
                    f"not given with --volume {name}=PATH: using the empty folder {folder}",
                )
            return folder
        raise ValueError(
            f"volume '{name}' of pod {self.name} has a type the local runner cannot provide "
            f"({', '.join(k for k in volume if k != 'name')}); give a folder with --volume {name}=PATH"
        )

    def _files(self, container: dict[str, Any]) -> ContainerFiles:
        mounts = {}
        for mount in container.get("volumeMounts") or []:
            if mount["mountPath"] in HOST_DIRS:
                continue
            if mount["name"] not in self.volume_folders:
                raise ValueError(
                    f"container {container['name']} mounts volume '{mount['name']}', "
                    f"which pod {self.name} does not declare"
                )
            mounts[mount["mountPath"]] = self.volume_folders[mount["name"]] / mount.get("subPath", "")
        return ContainerFiles(self.root / "containers" / container["name"], mounts, self.root)

    # -- containers ---------------------------------------------------------------------------------
    def _env(self, container: dict[str, Any], files: ContainerFiles) -> dict[str, str]:
        env = dict(os.environ)
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # this Python's tools first
        env.update(self.base_env)
        for source in container.get("envFrom") or []:
            ref = source.get("secretRef") or source.get("configMapRef") or {}
            name = ref.get("name")
            if name in self.options.secrets:
                env.update({source.get("prefix", "") + k: v for k, v in self.options.secrets[name].items()})
            elif not ref.get("optional"):
                log(
                    self.label,
                    f"{container['name']}: Secret/ConfigMap '{name}' not given with --secret "
                    f"{name}=FILE: its keys come from this environment",
                )
        for item in container.get("env") or []:
            env[item["name"]] = self._env_value(container["name"], item, env)
        env.update(self.options.env)
        return {
            k: files.rewrite(v, self._prefixes(container)) if k in self._declared(container) else v
            for k, v in env.items()
        }

    def _declared(self, container: dict[str, Any]) -> set[str]:
        return {item["name"] for item in container.get("env") or []} | set(self.options.env)

    def _env_value(self, container: str, item: dict[str, Any], env: dict[str, str]) -> str:
        if "valueFrom" not in item:
            return str(item.get("value", ""))
        source = item["valueFrom"]
        ref = source.get("secretKeyRef") or source.get("configMapKeyRef")
        if ref:
            values = self.options.secrets.get(ref["name"], {})
            if ref["key"] in values:
                return values[ref["key"]]
            if item["name"] in env:
                return env[item["name"]]
            raise ValueError(
                f"env {item['name']} of container {container} reads key '{ref['key']}' of "
                f"'{ref['name']}': pass --secret {ref['name']}=FILE (KEY=VALUE lines) or export {item['name']}"
            )
        field_path = (source.get("fieldRef") or {}).get("fieldPath", "")
        fields = {
            "metadata.name": self.name,
            "metadata.namespace": "default",
            "status.podIP": "127.0.0.1",
            "spec.nodeName": socket.gethostname(),
            "status.hostIP": "127.0.0.1",
            **self.plan.fields,
        }
        if field_path in fields:
            return fields[field_path]
        raise ValueError(
            f"env {item['name']} of container {container}: valueFrom {source} is not supported locally; "
            f"set it with --env {item['name']}=VALUE"
        )

    def _prefixes(self, container: dict[str, Any]) -> list[str]:
        return [m["mountPath"] for m in container.get("volumeMounts") or [] if m["mountPath"] not in HOST_DIRS] + (
            [container["workingDir"]] if container.get("workingDir") else []
        )

    def _command(self, container: dict[str, Any], files: ContainerFiles) -> list[str]:
        command = list(container.get("command") or []) + [str(a) for a in container.get("args") or []]
        if not command:
            raise ValueError(
                f"container {container['name']} of pod {self.name} has no command: the local runner "
                "cannot run an image's default entrypoint; give command/args in the manifest"
            )
        if container is not self.main_spec:
            ports = {str(port): str(local) for (name, port), local in self.ports.items() if name == container["name"]}
            command = listen_locally(command, ports)
        prefixes = self._prefixes(container)
        return [files.rewrite(a, prefixes) for a in command]

    def _start(self, container: dict[str, Any], label: str) -> Process:
        files = self._files(container)
        files.create()
        cwd = files.host_path(container.get("workingDir", "/"))
        cwd.mkdir(parents=True, exist_ok=True)
        command = self._command(container, files)
        log(label, f"$ {' '.join(command)}")
        popen = subprocess.Popen(
            command,
            cwd=cwd,
            env=self._env(container, files),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            text=True,
            errors="replace",
        )

        def forward() -> None:
            assert popen.stdout is not None  # stdout=PIPE
            for line in popen.stdout:
                log(label, line.rstrip("\n"))

        reader = threading.Thread(target=forward, daemon=True)
        reader.start()
        return Process(container["name"], popen, reader)

    def _wait_ready(self, container: dict[str, Any], process: Process, timeout_s: float = 60.0) -> None:
        """Wait for a sidecar's HTTP readiness probe (the kubelet starts the next container once a
        native sidecar has started)."""
        probe = (container.get("readinessProbe") or container.get("startupProbe") or {}).get("httpGet")
        if not probe:
            return
        named = {p.get("name"): int(p["containerPort"]) for p in container.get("ports") or []}
        port = named.get(probe["port"], probe["port"]) if isinstance(probe["port"], str) else int(probe["port"])
        url = f"http://127.0.0.1:{self.ports[(container['name'], int(port))]}{probe.get('path', '/')}"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and process.poll() is None:
            try:
                with urllib.request.urlopen(url, timeout=1):
                    return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(
            f"sidecar {container['name']} of pod {self.name} did not answer {url} within {timeout_s:.0f} s"
        )

    def start(self) -> None:
        """Create the pod: its folders, init containers (to completion), sidecars (until ready), then pytorch."""
        self.root = self.options.workdir / (self.name if self.generation == 0 else f"{self.name}.{self.generation}")
        shutil.rmtree(self.root, ignore_errors=True)
        self.volume_folders = {v["name"]: self._volume_folder(v) for v in self.spec.get("volumes") or []}
        for container in self.init_specs:
            process = self._start(container, f"{self.label} {container['name']}")
            code = process.popen.wait()
            process.reader.join()
            if code != 0:
                raise RuntimeError(f"init container {container['name']} of pod {self.name} exited {code}")
        self.sidecars = []
        for container in self.sidecar_specs:
            process = self._start(container, f"{self.label} {container['name']}")
            self.sidecars.append(process)
            self._wait_ready(container, process)
        self.start_main()

    def start_main(self) -> None:
        self.main = self._start(self.main_spec, self.label)

    def stop(self) -> None:
        """Delete the pod: SIGTERM to every container, SIGKILL after terminationGracePeriodSeconds."""
        processes = [p for p in [self.main, *self.sidecars] if p is not None]
        for process in processes:
            _signal_group(process.popen, signal.SIGTERM)
        deadline = time.monotonic() + self.grace_s
        for process in processes:
            try:
                process.popen.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(process.popen, signal.SIGKILL)
                process.popen.wait()
            _signal_group(process.popen, signal.SIGKILL)  # whatever the container left behind in its group
            process.reader.join(timeout=5)
        self.sidecars = []

    def targets(self) -> list[dict[str, Any]]:
        return [
            {
                "targets": [f"127.0.0.1:{local}"],
                "labels": {
                    "pod": self.name,
                    "container": name,
                    "replica_type": self.plan.role,
                    "replica_index": str(self.plan.index),
                },
            }
            for (name, _), local in self.ports.items()
        ]


def _signal_group(popen: subprocess.Popen[str], sig: int) -> None:
    try:
        os.killpg(popen.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


# --------------------------------------------------------------------------------------------
# The job
# --------------------------------------------------------------------------------------------


class Interrupted(Exception):
    pass


class JobRun:
    """The replicas' pods and the operator's bookkeeping: restarts, back-off, the job's outcome."""

    def __init__(self, plan: JobPlan, options: Options):
        self.plan, self.options = plan, options
        self.backoff_limit, self.deadline_s = plan.backoff_limit, plan.deadline_s
        self.pods = [Pod(p, options) for p in plan.pods]
        self.restarts = 0
        self.due: dict[str, float] = {}  # pod name -> when its pending restart happens

    def check(self, pod: Pod) -> str | None:
        """Look at one pod: None while the job goes on, else why it ended ("" = it succeeded)."""
        if pod.name in self.due:
            if time.monotonic() >= self.due[pod.name]:
                del self.due[pod.name]
                pod.start_main() if pod.plan.in_place else pod.start()
            return None
        if pod.finished or pod.main is None:
            return None
        code = pod.main.poll()
        if code is None:
            return None
        pod.main.reader.join(timeout=5)
        plan, main = pod.plan, pod.plan.main
        if code == 0 and plan.in_place != "Always":
            pod.finished = True
            log("local-run", f"{pod.label}: {main} exited 0")
            return "" if all(p.finished for p in self.pods if p.plan.required) else None
        retry = plan.in_place or (plan.recreate and code not in plan.fail_codes)
        if not retry:
            return f"{pod.label}: {main} exited {code} (restartPolicy {plan.policy}: not retried)"
        self.restarts += 1
        if self.restarts > self.backoff_limit:
            return f"{pod.label}: {main} exited {code}; backoffLimit {self.backoff_limit} reached"
        if not plan.in_place:  # the operator (or the Job controller) deletes the pod and creates it anew
            pod.stop()
            pod.generation += 1
            delay, how = 0.0, "as a new pod"
        else:  # the kubelet restarts the container in its pod, with a doubling back-off
            delay = min(self.options.restart_delay_s * 2**pod.container_restarts, MAX_BACKOFF_S)
            pod.container_restarts += 1
            how = f"in {delay:.0f} s"
        log(
            "local-run",
            f"{pod.label}: {main} exited {code}; restarting {how} "
            f"(restart {self.restarts}, backoffLimit {self.backoff_limit})",
        )
        self.due[pod.name] = time.monotonic() + delay
        return None

    def run(self, port: int) -> int:
        name = self.plan.name
        self.options.workdir.mkdir(parents=True, exist_ok=True)
        log("local-run", f"job {name}: {self.plan.summary}, master 127.0.0.1:{port}, pods in {self.options.workdir}")
        if self.options.targets_file:
            self.options.targets_file.write_text(json.dumps([t for pod in self.pods for t in pod.targets()], indent=1))

        def interrupt(signum: int, frame: FrameType | None) -> NoReturn:
            raise Interrupted(signum)

        previous = {s: signal.signal(s, interrupt) for s in (signal.SIGINT, signal.SIGTERM)}
        started, code, detail = time.monotonic(), 1, None
        try:
            for pod in self.pods:
                pod.start()
            while detail is None:
                if self.deadline_s and time.monotonic() - started > float(self.deadline_s):
                    detail = f"activeDeadlineSeconds {self.deadline_s} passed"
                for pod in self.pods:
                    detail = self.check(pod) if detail is None else detail
                time.sleep(0.2)
            code = 0 if detail == "" else 1
        except Interrupted as stop:
            signum = int(stop.args[0])
            detail, code = f"stopped by {signal.Signals(signum).name}", 128 + signum
        finally:
            for pod in self.pods:
                pod.stop()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        outcome = "Succeeded" if code == 0 else "Failed"
        log("local-run", f"job {name} {outcome}{': ' + detail if detail else ''} ({self.restarts} restart(s))")
        return code


def run_job(job: dict[str, Any], options: Options, runtime: dict[str, Any] | None = None) -> int:
    """Run every replica until the job succeeds (0) or fails (1; 128 + signal when interrupted).
    A TrainJob runs with `runtime`, the (Cluster)TrainingRuntime it references."""
    check = (
        (lambda j: trainjob.check_admission(j, runtime))
        if job.get("kind") == "TrainJob"
        else pytorchjob.check_admission
    )
    check(job)
    job = apply_local_options(job, options)
    check(job)
    port = free_port()  # the master's port: a free one here, not the declared one
    if job.get("kind") == "TrainJob":
        assert runtime is not None, "check_admission refuses a TrainJob without its runtime"
        plan = plan_trainjob(job, runtime, port)
    else:
        plan = plan_pytorchjob(job, port)
    return JobRun(plan, options).run(port)


def load_job(manifest: str, runtime_files: list[Path]) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(job, runtime) of a manifest ('-': stdin) holding one PyTorchJob or one TrainJob. A TrainJob's
    runtime is looked for in the manifest, then in runtime_files, then in the YAML files beside the
    manifest (k8s/trainjob/runtime.yaml for the ready TrainJobs)."""
    documents = trainjob.load_documents(sys.stdin.read() if manifest == "-" else Path(manifest).read_text())
    jobs = [d for d in documents if d.get("kind") in ("PyTorchJob", "TrainJob")]
    if len(jobs) != 1:
        kinds = ", ".join(sorted({str(d.get("kind")) for d in documents})) or "nothing"
        raise ValueError(
            f"the manifest must hold exactly one PyTorchJob or TrainJob, it holds {len(jobs)} (kinds: {kinds}); "
            "render one stage, e.g. helm template NAME charts/dvgt --set stage=dvgt1-demo"
        )
    job = jobs[0]
    if job["kind"] != "TrainJob":
        return job, None
    beside = sorted(Path(manifest).resolve().parent.glob("*.yaml")) if manifest != "-" else []
    for source in [None, *runtime_files, *beside]:
        runtime = trainjob.find_runtime(job, documents if source is None else trainjob.load_documents(Path(source)))
        if runtime is not None:
            return job, runtime
    kind, name = trainjob.runtime_ref(job)
    raise ValueError(
        f"TrainJob {job['metadata'].get('name')} references the {kind} '{name}', which is neither in the "
        f"manifest nor in {', '.join(map(str, runtime_files)) or 'the YAML files beside it'}: pass its "
        "manifest with --runtime FILE (the ready TrainJobs' is k8s/trainjob/runtime.yaml)"
    )


def run_manifest(manifest: str, options: Options, runtime_files: Sequence[Path] = ()) -> int:
    job, runtime = load_job(manifest, list(runtime_files))
    return run_job(job, options, runtime)
