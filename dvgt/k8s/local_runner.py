"""Run a PyTorchJob on this machine, as the Training Operator and the kubelet would on a cluster.

    dvgt local-run k8s/dvgt1-demo.yaml --nproc-per-node 2 --override checkpoint.uri=ckpts

Each replica (Master 0, Worker i -> node rank i + 1) is a "pod": a folder under --workdir and the
processes of its containers. The `pytorch` container runs its command and args with the operator's
environment (pytorchjob.operator_env, 127.0.0.1 as the master's address, a free port) plus its own
env; sidecars (init containers with restartPolicy Always, or extra containers) run beside it, with
their declared ports moved to free local ports. Volumes: emptyDirs are folders of the pod,
PVCs / hostPaths come from --volume NAME=PATH, /dev/shm is the host's; container paths in args and
env are rewritten to those folders. Secrets come from --secret NAME=FILE (KEY=VALUE lines) or, when
not given, from this process's environment.

Failures follow the replica's restartPolicy: OnFailure (restart on a non-zero exit) and Always
(restart on any exit) restart the container in its pod after a back-off that doubles, like the
kubelet; ExitCode recreates the pod (fresh emptyDirs) when the exit code is 128-255 (killed by a
signal, e.g. 143 after SIGTERM or 137 after SIGKILL) and fails the job otherwise; Never fails the
job. Every restart counts against runPolicy.backoffLimit. When one pod fails, its peers are left
alone: under torchrun's static rendezvous their collectives fail and they restart by their own
policy, as on a cluster. The job succeeds when the Master's `pytorch` container exits 0.
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
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Dict, List, Optional

from dvgt.k8s.pytorchjob import CONTAINER, REPLICA_TYPES, check_admission, load_pytorchjob, operator_env, replica_counts

SHM = "/dev/shm"  # a memory emptyDir there is the host's own /dev/shm
MAX_BACKOFF_S = 300.0  # the kubelet's cap on the restart back-off
_print_lock = threading.Lock()


def log(prefix: str, line: str) -> None:
    with _print_lock:
        sys.stdout.write(f"[{prefix}] {line}\n")
        sys.stdout.flush()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_env_file(path: Path) -> Dict[str, str]:
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
    volumes: Dict[str, Path] = field(default_factory=dict)  # volume name -> host folder (PVC, hostPath)
    secrets: Dict[str, Dict[str, str]] = field(default_factory=dict)  # Secret (or ConfigMap) name -> its keys
    env: Dict[str, str] = field(default_factory=dict)  # extra env for every container, applied last
    overrides: List[str] = field(default_factory=list)  # trainer config overrides appended to the pytorch args
    nproc_per_node: Optional[int] = None  # replaces spec.nprocPerNode (and torchrun's --nproc-per-node)
    replicas: Dict[str, int] = field(default_factory=dict)  # replica type -> count (Worker=0 drops the workers)
    restart_delay_s: float = 10.0  # first back-off of an in-place restart (doubles per restart of a pod)
    targets_file: Optional[Path] = None  # write the sidecars' ports as a Prometheus file_sd target list


# --------------------------------------------------------------------------------------------
# Preparing the job
# --------------------------------------------------------------------------------------------

def set_flags(command: List[str], values: Dict[str, Callable[[str], str]]) -> List[str]:
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


def set_nproc(args: List[str], nproc: int) -> List[str]:
    """torchrun's --nproc-per-node (either spelling) set to nproc."""
    return set_flags(args, {"--nproc-per-node": lambda _: str(nproc), "--nproc_per_node": lambda _: str(nproc)})


def listen_locally(command: List[str], ports: Dict[str, str]) -> List[str]:
    """A sidecar's `--port N` (declared container ports -> their local ports) and `--host H`
    (-> 127.0.0.1): it serves this machine only, beside the other pods' sidecars."""
    return set_flags(command, {"--port": lambda v: ports.get(v, v), "--host": lambda _: "127.0.0.1"})


def apply_local_options(job: Dict[str, Any], options: Options) -> Dict[str, Any]:
    """The job with the command-line changes applied (replica counts, processes per pod, overrides)."""
    job = json.loads(json.dumps(job))  # a copy that shares nothing (YAML anchors may alias the replicas' pods)
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
            args = list(container.get("args") or [])
            if options.nproc_per_node:
                args = set_nproc(args, options.nproc_per_node)
            container["args"] = args + list(options.overrides)
    if options.nproc_per_node:
        job["spec"]["nprocPerNode"] = str(options.nproc_per_node)
    return job


# --------------------------------------------------------------------------------------------
# One pod: its folders, its volumes, its containers
# --------------------------------------------------------------------------------------------

class ContainerFiles:
    """Where one container's paths live on this machine: each of its volume mounts at the volume's
    folder, every other path under its own root folder (a mount inside that root becomes a link)."""

    def __init__(self, root: Path, mounts: Dict[str, Path]):
        self.root, self.mounts = root, mounts  # mounts: container path -> host folder

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
            if self.root in place.parents and not place.exists():
                place.parent.mkdir(parents=True, exist_ok=True)
                place.symlink_to(target, target_is_directory=True)

    def rewrite(self, value: str, prefixes: List[str]) -> str:
        """Container paths under a mount or the working directory -> host paths, wherever a path can start
        in a value: at its start, or after '=', ':', a space or a quote (key=value overrides, shell scripts)."""
        def swap(match: re.Match) -> str:
            path = match.group(2)
            inside = any(path == p or path.startswith(p.rstrip("/") + "/") for p in prefixes)
            return match.group(1) + (str(self.host_path(path)) if inside else path)
        return re.sub(r"(^|[=:\s'\"])(/[^\s=:,;'\"]*)", swap, value)


@dataclass
class Process:
    name: str
    popen: subprocess.Popen
    reader: threading.Thread

    def poll(self) -> Optional[int]:
        """The container's exit code: 128 + signal when a signal ended it, as the kubelet reports."""
        code = self.popen.poll()
        return None if code is None else (128 - code if code < 0 else code)


class Pod:
    def __init__(self, job: Dict[str, Any], rtype: str, index: int, options: Options, port: int):
        self.job_name = job["metadata"]["name"]
        self.rtype, self.index, self.options = rtype, index, options
        self.label = f"{rtype.lower()}-{index}"
        self.name = f"{self.job_name}-{self.label}"
        self.spec = job["spec"]["pytorchReplicaSpecs"][rtype]["template"]["spec"]
        self.restart_policy = job["spec"]["pytorchReplicaSpecs"][rtype].get("restartPolicy", "Never")
        self.grace_s = float(self.spec.get("terminationGracePeriodSeconds", 30))
        self.base_env = operator_env(job, rtype, index, "127.0.0.1", port)
        main = [c for c in self.spec["containers"] if c["name"] == CONTAINER]
        self.main_spec = main[0]
        self.sidecar_specs = [c for c in self.spec.get("initContainers") or [] if c.get("restartPolicy") == "Always"]
        self.sidecar_specs += [c for c in self.spec["containers"] if c["name"] != CONTAINER]
        self.init_specs = [c for c in self.spec.get("initContainers") or [] if c.get("restartPolicy") != "Always"]
        # Declared ports of the sidecars -> free local ports, fixed for the pod's whole life.
        self.ports = {(c["name"], int(p["containerPort"])): free_port()
                      for c in self.sidecar_specs for p in c.get("ports") or []}
        self.generation = 0  # pod re-creations (restartPolicy ExitCode)
        self.container_restarts = 0  # in-place restarts of the pytorch container
        self.main: Optional[Process] = None
        self.sidecars: List[Process] = []
        self.root = options.workdir / self.name  # this pod's folder (a new one when the pod is recreated)
        self.volume_folders: Dict[str, Path] = {}
        self.finished = False  # the pytorch container succeeded and stays down

    # -- file system ------------------------------------------------------------------------------
    def _volume_folder(self, volume: Dict[str, Any]) -> Path:
        name = volume["name"]
        if name in self.options.volumes:
            return Path(self.options.volumes[name]).resolve()
        if "emptyDir" in volume:
            return self.root / "volumes" / name
        if "hostPath" in volume:
            path = Path(volume["hostPath"]["path"])
            if not path.is_dir():
                raise ValueError(f"volume '{name}' is hostPath {path}, which is not a folder here; "
                                 f"give one with --volume {name}=PATH")
            return path
        if "persistentVolumeClaim" in volume:  # one folder for the whole job, like a shared claim
            folder = self.options.workdir / "volumes" / name
            if not folder.exists():
                log("local-run", f"volume '{name}' (PVC {volume['persistentVolumeClaim'].get('claimName')}) "
                                 f"not given with --volume {name}=PATH: using the empty folder {folder}")
            return folder
        raise ValueError(f"volume '{name}' of pod {self.name} has a type the local runner cannot provide "
                         f"({', '.join(k for k in volume if k != 'name')}); give a folder with --volume {name}=PATH")

    def _files(self, container: Dict[str, Any]) -> ContainerFiles:
        mounts = {}
        for mount in container.get("volumeMounts") or []:
            if mount["mountPath"] == SHM:
                continue
            if mount["name"] not in self.volume_folders:
                raise ValueError(f"container {container['name']} mounts volume '{mount['name']}', "
                                 f"which pod {self.name} does not declare")
            mounts[mount["mountPath"]] = self.volume_folders[mount["name"]] / mount.get("subPath", "")
        return ContainerFiles(self.root / "containers" / container["name"], mounts)

    # -- containers ---------------------------------------------------------------------------------
    def _env(self, container: Dict[str, Any], files: ContainerFiles) -> Dict[str, str]:
        env = dict(os.environ)
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # this Python's tools first
        env.update(self.base_env)
        for source in container.get("envFrom") or []:
            ref = source.get("secretRef") or source.get("configMapRef") or {}
            name = ref.get("name")
            if name in self.options.secrets:
                env.update({source.get("prefix", "") + k: v for k, v in self.options.secrets[name].items()})
            elif not ref.get("optional"):
                log(self.label, f"{container['name']}: Secret/ConfigMap '{name}' not given with --secret "
                                f"{name}=FILE: its keys come from this environment")
        for item in container.get("env") or []:
            env[item["name"]] = self._env_value(container["name"], item, env)
        env.update(self.options.env)
        return {k: files.rewrite(v, self._prefixes(container)) if k in self._declared(container) else v
                for k, v in env.items()}

    def _declared(self, container: Dict[str, Any]) -> set:
        return {item["name"] for item in container.get("env") or []} | set(self.options.env)

    def _env_value(self, container: str, item: Dict[str, Any], env: Dict[str, str]) -> str:
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
            raise ValueError(f"env {item['name']} of container {container} reads key '{ref['key']}' of "
                             f"'{ref['name']}': pass --secret {ref['name']}=FILE (KEY=VALUE lines) or export {item['name']}")
        field_path = (source.get("fieldRef") or {}).get("fieldPath", "")
        fields = {"metadata.name": self.name, "metadata.namespace": "default", "status.podIP": "127.0.0.1",
                  "spec.nodeName": socket.gethostname(), "status.hostIP": "127.0.0.1"}
        if field_path in fields:
            return fields[field_path]
        raise ValueError(f"env {item['name']} of container {container}: valueFrom {source} is not supported locally; "
                         f"set it with --env {item['name']}=VALUE")

    def _prefixes(self, container: Dict[str, Any]) -> List[str]:
        return [m["mountPath"] for m in container.get("volumeMounts") or [] if m["mountPath"] != SHM] + \
            ([container["workingDir"]] if container.get("workingDir") else [])

    def _command(self, container: Dict[str, Any], files: ContainerFiles) -> List[str]:
        command = list(container.get("command") or []) + [str(a) for a in container.get("args") or []]
        if not command:
            raise ValueError(f"container {container['name']} of pod {self.name} has no command: the local runner "
                             "cannot run an image's default entrypoint; give command/args in the manifest")
        if container is not self.main_spec:
            ports = {str(port): str(local) for (name, port), local in self.ports.items() if name == container["name"]}
            command = listen_locally(command, ports)
        prefixes = self._prefixes(container)
        return [files.rewrite(a, prefixes) for a in command]

    def _start(self, container: Dict[str, Any], label: str) -> Process:
        files = self._files(container)
        files.create()
        cwd = files.host_path(container.get("workingDir", "/"))
        cwd.mkdir(parents=True, exist_ok=True)
        command = self._command(container, files)
        log(label, f"$ {' '.join(command)}")
        popen = subprocess.Popen(command, cwd=cwd, env=self._env(container, files), stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, start_new_session=True, text=True, errors="replace")

        def forward() -> None:
            for line in popen.stdout:
                log(label, line.rstrip("\n"))
        reader = threading.Thread(target=forward, daemon=True)
        reader.start()
        return Process(container["name"], popen, reader)

    def _wait_ready(self, container: Dict[str, Any], process: Process, timeout_s: float = 60.0) -> None:
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
        raise RuntimeError(f"sidecar {container['name']} of pod {self.name} did not answer {url} within {timeout_s:.0f} s")

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

    def targets(self) -> List[Dict[str, Any]]:
        return [{"targets": [f"127.0.0.1:{local}"],
                 "labels": {"pod": self.name, "container": name, "replica_type": self.rtype.lower(),
                            "replica_index": str(self.index)}}
                for (name, _), local in self.ports.items()]


def _signal_group(popen: subprocess.Popen, sig: int) -> None:
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

    def __init__(self, job: Dict[str, Any], options: Options):
        self.job, self.options = job, options
        run_policy = job["spec"].get("runPolicy") or {}
        self.backoff_limit = int(run_policy.get("backoffLimit") if run_policy.get("backoffLimit") is not None else 6)
        self.deadline_s = run_policy.get("activeDeadlineSeconds")
        self.port = free_port()  # the master's port: a free one here, not the declared pytorchjob-port
        self.counts = replica_counts(job)
        self.pods = [Pod(job, rtype, i, options, self.port) for rtype, n in self.counts.items() for i in range(n)]
        self.restarts = 0
        self.due: Dict[str, float] = {}  # pod name -> when its pending restart happens

    def check(self, pod: Pod) -> Optional[str]:
        """Look at one pod: None while the job goes on, else why it ended ("" = it succeeded)."""
        if pod.name in self.due:
            if time.monotonic() >= self.due[pod.name]:
                del self.due[pod.name]
                pod.start() if pod.restart_policy == "ExitCode" else pod.start_main()
            return None
        code = None if pod.finished else pod.main.poll()
        if code is None:
            return None
        pod.main.reader.join(timeout=5)
        if code == 0 and pod.restart_policy != "Always":
            pod.finished = True
            log("local-run", f"{pod.label}: pytorch exited 0")
            return "" if pod.rtype == "Master" else None
        retry = {"OnFailure": code != 0, "Always": True, "ExitCode": code >= 128}.get(pod.restart_policy, False)
        if not retry:
            return f"{pod.label}: pytorch exited {code} (restartPolicy {pod.restart_policy}: not retried)"
        self.restarts += 1
        if self.restarts > self.backoff_limit:
            return f"{pod.label}: pytorch exited {code}; backoffLimit {self.backoff_limit} reached"
        if pod.restart_policy == "ExitCode":  # the operator deletes the pod and creates it anew
            pod.stop()
            pod.generation += 1
            delay, how = 0.0, "as a new pod"
        else:  # the kubelet restarts the container in its pod, with a doubling back-off
            delay = min(self.options.restart_delay_s * 2 ** pod.container_restarts, MAX_BACKOFF_S)
            pod.container_restarts += 1
            how = f"in {delay:.0f} s"
        log("local-run", f"{pod.label}: pytorch exited {code}; restarting {how} "
                         f"(restart {self.restarts}, backoffLimit {self.backoff_limit})")
        self.due[pod.name] = time.monotonic() + delay
        return None

    def run(self) -> int:
        name = self.job["metadata"]["name"]
        self.options.workdir.mkdir(parents=True, exist_ok=True)
        log("local-run", f"job {name}: {', '.join(f'{n} {t}' for t, n in self.counts.items())} x "
                         f"{self.job['spec'].get('nprocPerNode', 'auto')} process(es), master 127.0.0.1:{self.port}, "
                         f"pods in {self.options.workdir}")
        if self.options.targets_file:
            self.options.targets_file.write_text(json.dumps([t for pod in self.pods for t in pod.targets()], indent=1))

        def interrupt(signum, frame):
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


def run_job(job: Dict[str, Any], options: Options) -> int:
    """Run every replica until the job succeeds (0) or fails (1; 128 + signal when interrupted)."""
    check_admission(job)
    job = apply_local_options(job, options)
    check_admission(job)
    return JobRun(job, options).run()


def run_manifest(manifest: str, options: Options) -> int:
    text = sys.stdin.read() if manifest == "-" else Path(manifest).read_text()
    return run_job(load_pytorchjob(text), options)
