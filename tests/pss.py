"""The Pod Security Standards (`baseline` and `restricted`, Kubernetes 1.35) as the API server's
pod-security admission evaluates them, for tests: `violations(pod_spec, metadata, level)` returns one
(check, message) per failed check, named by the upstream check ID (k8s.io/pod-security-admission/policy).

No packaged evaluator of the upstream rules installs here (the admission library is Go, which this project
does not build; Kyverno, kube-linter and Polaris ship no PyPI, Debian or npm package), so this module states
the rules as the standard documents them and is held to the upstream library's own conformance fixtures:
tests/data/pss holds unmodified copies of its test/testdata/{baseline,restricted}/v1.35 pods, and
tests/test_security.py checks that every `pass` pod passes and every `fail` pod fails exactly the check its
file is named after. Feature-gated relaxations (user namespaces for runAsNonRoot) are off, as by default.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

Pod = dict[str, Any]

BASELINE_CAPABILITIES = {
    "AUDIT_WRITE",
    "CHOWN",
    "DAC_OVERRIDE",
    "FOWNER",
    "FSETID",
    "KILL",
    "MKNOD",
    "NET_BIND_SERVICE",
    "SETFCAP",
    "SETGID",
    "SETPCAP",
    "SETUID",
    "SYS_CHROOT",
}
SAFE_SYSCTLS = {
    "kernel.shm_rmid_forced",
    "net.ipv4.ip_local_port_range",
    "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.tcp_syncookies",
    "net.ipv4.ping_group_range",
    "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_keepalive_time",
    "net.ipv4.tcp_fin_timeout",
    "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes",
    "net.ipv4.tcp_rmem",
    "net.ipv4.tcp_wmem",
}
SELINUX_TYPES = {"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"}
RESTRICTED_VOLUMES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
    "image",
}
APPARMOR_ANNOTATION = "container.apparmor.security.beta.kubernetes.io/"


def containers(spec: Pod) -> Iterator[dict[str, Any]]:
    """Every container of the pod: init, regular and ephemeral."""
    for key in ("initContainers", "containers", "ephemeralContainers"):
        yield from spec.get(key) or []


def context(container: dict[str, Any]) -> dict[str, Any]:
    return container.get("securityContext") or {}


def names(items) -> str:
    return ", ".join(sorted(items))


def windows(spec: Pod) -> bool:
    return ((spec.get("os") or {}).get("name")) == "windows"


# -- baseline ---------------------------------------------------------------------------------------


def host_namespaces(spec: Pod, meta: Pod) -> list[str]:
    return [f"{field}=true" for field in ("hostNetwork", "hostPID", "hostIPC") if spec.get(field)]


def privileged(spec: Pod, meta: Pod) -> list[str]:
    return [f"container {c['name']}: privileged=true" for c in containers(spec) if context(c).get("privileged")]


def capabilities_baseline(spec: Pod, meta: Pod) -> list[str]:
    out = []
    for c in containers(spec):
        extra = set((context(c).get("capabilities") or {}).get("add") or []) - BASELINE_CAPABILITIES
        if extra:
            out.append(f"container {c['name']} adds {names(extra)}")
    return out


def host_path_volumes(spec: Pod, meta: Pod) -> list[str]:
    return [f"volume {v['name']} is a hostPath" for v in spec.get("volumes") or [] if "hostPath" in v]


def host_ports(spec: Pod, meta: Pod) -> list[str]:
    return [
        f"container {c['name']} hostPort {p['hostPort']}"
        for c in containers(spec)
        for p in c.get("ports") or []
        if p.get("hostPort")
    ]


def app_armor_profile(spec: Pod, meta: Pod) -> list[str]:
    out = [
        f"annotation {key}={value}"
        for key, value in (meta.get("annotations") or {}).items()
        if key.startswith(APPARMOR_ANNOTATION) and value != "runtime/default" and not value.startswith("localhost/")
    ]
    profiles = [("pod", (spec.get("securityContext") or {}).get("appArmorProfile"))]
    profiles += [(f"container {c['name']}", context(c).get("appArmorProfile")) for c in containers(spec)]
    out += [
        f"{where}: appArmorProfile {p.get('type')}"
        for where, p in profiles
        if p and p.get("type") not in ("RuntimeDefault", "Localhost")
    ]
    return out


def se_linux_options(spec: Pod, meta: Pod) -> list[str]:
    out = []
    options = [("pod", (spec.get("securityContext") or {}).get("seLinuxOptions"))]
    options += [(f"container {c['name']}", context(c).get("seLinuxOptions")) for c in containers(spec)]
    for where, o in options:
        if not o:
            continue
        if o.get("type", "") not in SELINUX_TYPES:
            out.append(f"{where}: seLinuxOptions.type {o['type']}")
        out += [f"{where}: seLinuxOptions.{key} set" for key in ("user", "role") if o.get(key)]
    return out


def proc_mount_baseline(spec: Pod, meta: Pod) -> list[str]:
    if spec.get("hostUsers") is False:  # in a user namespace the unmasked /proc is the pod's own
        return []
    return proc_mount_restricted(spec, meta)


def seccomp_profile_baseline(spec: Pod, meta: Pod) -> list[str]:
    profiles = [("pod", (spec.get("securityContext") or {}).get("seccompProfile"))]
    profiles += [(f"container {c['name']}", context(c).get("seccompProfile")) for c in containers(spec)]
    return [f"{where}: seccompProfile Unconfined" for where, p in profiles if p and p.get("type") == "Unconfined"]


def sysctls(spec: Pod, meta: Pod) -> list[str]:
    unsafe = {s["name"] for s in (spec.get("securityContext") or {}).get("sysctls") or []} - SAFE_SYSCTLS
    return [f"sysctls {names(unsafe)}"] if unsafe else []


def windows_host_process(spec: Pod, meta: Pod) -> list[str]:
    contexts = [("pod", spec.get("securityContext") or {})] + [
        (f"container {c['name']}", context(c)) for c in containers(spec)
    ]
    return [
        f"{where}: windowsOptions.hostProcess=true"
        for where, ctx in contexts
        if (ctx.get("windowsOptions") or {}).get("hostProcess")
    ]


def host_probes_and_host_lifecycle(spec: Pod, meta: Pod) -> list[str]:
    out = []
    for c in containers(spec):
        handlers = [(probe, c.get(probe) or {}) for probe in ("livenessProbe", "readinessProbe", "startupProbe")]
        handlers += [
            (f"lifecycle.{hook}", (c.get("lifecycle") or {}).get(hook) or {}) for hook in ("postStart", "preStop")
        ]
        for where, handler in handlers:
            for action in ("httpGet", "tcpSocket"):
                if (handler.get(action) or {}).get("host"):
                    out.append(f"container {c['name']}: {where}.{action}.host set")
    return out


# -- restricted -------------------------------------------------------------------------------------


def restricted_volumes(spec: Pod, meta: Pod) -> list[str]:
    out = []
    for volume in spec.get("volumes") or []:
        kinds = set(volume) - {"name"}
        if kinds - RESTRICTED_VOLUMES:
            out.append(f"volume {volume['name']} is a {names(kinds - RESTRICTED_VOLUMES)}")
    return out


def allow_privilege_escalation(spec: Pod, meta: Pod) -> list[str]:
    if windows(spec):
        return []
    return [
        f"container {c['name']}: allowPrivilegeEscalation is not false"
        for c in containers(spec)
        if context(c).get("allowPrivilegeEscalation") is not False
    ]


def run_as_non_root(spec: Pod, meta: Pod) -> list[str]:
    pod = (spec.get("securityContext") or {}).get("runAsNonRoot")
    out = ["pod: runAsNonRoot=false"] if pod is False else []
    for c in containers(spec):
        own = context(c).get("runAsNonRoot")
        if own is False:
            out.append(f"container {c['name']}: runAsNonRoot=false")
        elif own is None and pod is not True:
            out.append(f"container {c['name']}: runAsNonRoot not set (neither on the pod)")
    return out


def run_as_user(spec: Pod, meta: Pod) -> list[str]:
    contexts = [("pod", spec.get("securityContext") or {})] + [
        (f"container {c['name']}", context(c)) for c in containers(spec)
    ]
    return [f"{where}: runAsUser=0" for where, ctx in contexts if ctx.get("runAsUser") == 0]


def seccomp_profile_restricted(spec: Pod, meta: Pod) -> list[str]:
    if windows(spec):
        return []
    allowed = ("RuntimeDefault", "Localhost")
    pod = (spec.get("securityContext") or {}).get("seccompProfile") or {}
    out = [f"pod: seccompProfile {pod['type']}"] if pod and pod.get("type") not in allowed else []
    for c in containers(spec):
        own = context(c).get("seccompProfile")
        if own is not None and own.get("type") not in allowed:
            out.append(f"container {c['name']}: seccompProfile {own.get('type')}")
        elif own is None and pod.get("type") not in allowed:
            out.append(f"container {c['name']}: seccompProfile not set (neither on the pod)")
    return out


def capabilities_restricted(spec: Pod, meta: Pod) -> list[str]:
    if windows(spec):
        return []
    out = []
    for c in containers(spec):
        caps = context(c).get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            out.append(f"container {c['name']} does not drop ALL")
        extra = set(caps.get("add") or []) - {"NET_BIND_SERVICE"}
        if extra:
            out.append(f"container {c['name']} adds {names(extra)}")
    return out


def proc_mount_restricted(spec: Pod, meta: Pod) -> list[str]:
    return [
        f"container {c['name']}: procMount {context(c)['procMount']}"
        for c in containers(spec)
        if context(c).get("procMount") not in (None, "Default")
    ]


Check = Callable[[Pod, Pod], list[str]]
BASELINE: dict[str, Check] = {
    "hostNamespaces": host_namespaces,
    "privileged": privileged,
    "capabilities_baseline": capabilities_baseline,
    "hostPathVolumes": host_path_volumes,
    "hostPorts": host_ports,
    "appArmorProfile": app_armor_profile,
    "seLinuxOptions": se_linux_options,
    "procMount_baseline": proc_mount_baseline,
    "seccompProfile_baseline": seccomp_profile_baseline,
    "sysctls": sysctls,
    "windowsHostProcess": windows_host_process,
    "hostProbesAndHostLifecycle": host_probes_and_host_lifecycle,
}
RESTRICTED: dict[str, Check] = {
    **BASELINE,
    "restrictedVolumes": restricted_volumes,
    "allowPrivilegeEscalation": allow_privilege_escalation,
    "runAsNonRoot": run_as_non_root,
    "runAsUser": run_as_user,
    "seccompProfile_restricted": seccomp_profile_restricted,
    "capabilities_restricted": capabilities_restricted,
    "procMount_restricted": proc_mount_restricted,
}
LEVELS = {"baseline": BASELINE, "restricted": RESTRICTED}


def violations(spec: Pod, metadata: Pod = None, level: str = "restricted") -> list[tuple[str, str]]:
    """(check ID, what fails) for every check of `level` the pod fails; [] = the pod is admitted."""
    return [(check, problem) for check, rule in LEVELS[level].items() for problem in rule(spec, metadata or {})]
