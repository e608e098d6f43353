"""Pod security of what the chart renders, as admitted: the Pod Security Standards evaluator (tests/pss.py)
agrees with the upstream admission library's conformance pods; the chart's pods break `restricted` naming
the rule when a value makes them privileged, mount a hostPath or add RDMA's capability; the Training
Operator's injected init container with and without docs/training-operator (rendered with the real
kubectl kustomize); checkov on the default renders. (Every stage x profile x api passing `restricted`
is in tests/test_chart.py, on the renders it already makes.)"""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pss
import pytest
import yaml
from test_chart import CHART, REPO, helm, job_of, pods_of, render, set_args

PSS_DATA = Path(__file__).resolve().parent / "data" / "pss"
OPERATOR_DOCS = REPO / "docs" / "training-operator"
CHECK_IDS = {**{check.lower(): check for check in pss.RESTRICTED}, "procmount": "procMount_baseline"}


def test_evaluator_agrees_with_the_upstream_conformance_pods():
    """Every pod the upstream library's tests admit at a level passes here, and every pod they refuse
    fails here with the check the fixture is named after (a fixture may fail others too)."""
    counted = {"pass": 0, "fail": 0}
    for level in ("baseline", "restricted"):
        for outcome in ("pass", "fail"):
            for path in sorted((PSS_DATA / level / outcome).glob("*.yaml")):
                pod = yaml.safe_load(path.read_text())
                failed = {check for check, _ in pss.violations(pod["spec"], pod["metadata"], level)}
                if outcome == "pass":
                    assert failed == set(), f"{level}/{path.name}: {failed}"
                else:
                    assert CHECK_IDS[re.sub(r"\d+$", "", path.stem)] in failed, f"{level}/{path.name}: {failed}"
                counted[outcome] += 1
    assert min(counted.values()) > 0  # the corpus is there (tests/data/pss/README.md)
    named = {CHECK_IDS[re.sub(r"\d+$", "", p.stem)] for p in PSS_DATA.glob("restricted/fail/*.yaml")}
    assert named == set(pss.RESTRICTED), "a check of the evaluator has no upstream fixture"


def failed_checks(pod: dict, level: str = "restricted") -> set:
    return {check for check, _ in pss.violations(pod["spec"], pod["metadata"], level)}


@pytest.mark.parametrize(
    "values,level,checks",
    [
        ({"securityContext.privileged": "true"}, "baseline", {"privileged"}),
        (
            {"securityContext.privileged": "true", "securityContext.allowPrivilegeEscalation": "true"},
            "restricted",
            {"privileged", "allowPrivilegeEscalation"},
        ),
        ({"data.pvc": "", "data.hostPath": "/mnt/datasets"}, "baseline", {"hostPathVolumes"}),
        ({"data.pvc": "", "data.hostPath": "/mnt/datasets"}, "restricted", {"hostPathVolumes", "restrictedVolumes"}),
        ({"rdma.enabled": "true"}, "baseline", {"capabilities_baseline"}),  # IPC_LOCK: the `privileged` level
        (
            {"podSecurityContext.runAsUser": 0, "podSecurityContext.runAsNonRoot": "false"},
            "restricted",
            {"runAsUser", "runAsNonRoot"},
        ),
    ],
)
def test_unsafe_values_break_the_level_naming_the_rule(values, level, checks):
    pod = pods_of(job_of(render(**values)))["Master"]
    assert failed_checks(pod, level) == checks


def test_uid_and_gid_are_values_and_stay_restricted():
    pod = pods_of(
        job_of(
            render(
                **{
                    "podSecurityContext.runAsUser": 4242,
                    "podSecurityContext.runAsGroup": 4343,
                    "podSecurityContext.fsGroup": 4343,
                }
            )
        )
    )["Master"]
    assert pod["spec"]["securityContext"]["runAsUser"] == 4242 and pod["spec"]["securityContext"]["fsGroup"] == 4343
    assert failed_checks(pod) == set()


def operator_init_container(template: str, master: str) -> list:
    """The operator's Go template filled in as the Training Operator v1.9 does (initcontainer.go)."""
    filled = template.replace("{{.InitContainerImage}}", "alpine:3.10").replace("{{.MaxTries}}", "100")
    return yaml.safe_load(filled.replace("{{.MasterAddr}}", master))


def test_workers_with_the_operators_init_container_are_restricted_only_with_the_documented_template():
    """The v1.9 operator appends an init container to each Worker; its built-in one (below, as its source
    writes it: no securityContext) is refused by `restricted`, the one of docs/training-operator is admitted."""
    worker = pods_of(job_of(render(nodes=2)))["Worker"]
    builtin = [
        {
            "name": "init-pytorch",
            "image": "alpine:3.10",
            "imagePullPolicy": "IfNotPresent",
            "resources": {"limits": {"cpu": "100m", "memory": "20Mi"}, "requests": {"cpu": "50m", "memory": "10Mi"}},
            "command": ["sh", "-c", "nslookup dvgt-test-master-0"],
        }
    ]
    documented = operator_init_container((OPERATOR_DOCS / "init-container.yaml").read_text(), "dvgt-test-master-0")
    assert documented[0]["name"] == "init-pytorch" and "dvgt-test-master-0" in documented[0]["command"][2]
    for injected, expected in ((builtin, {"allowPrivilegeEscalation", "capabilities_restricted"}), (documented, set())):
        admitted = {
            "metadata": worker["metadata"],
            "spec": {**worker["spec"], "initContainers": worker["spec"]["initContainers"] + injected},
        }
        assert failed_checks(admitted) == expected


def test_operator_overlay_mounts_the_template_where_the_operator_reads_it(tmp_path):
    """kubectl kustomize of docs/training-operator, with the upstream standalone overlay replaced by the
    operator's Deployment (no network here): the ConfigMap holds the template as initContainer.yaml and the
    operator's container mounts it at /etc/config (its --pytorch-init-container-template-file default)."""
    shutil.copy(OPERATOR_DOCS / "init-container.yaml", tmp_path)
    kustomization = yaml.safe_load((OPERATOR_DOCS / "kustomization.yaml").read_text())
    kustomization["resources"] = ["deployment.yaml"]
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    (tmp_path / "deployment.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "metadata": {"name": "training-operator"},
                "spec": {
                    "selector": {"matchLabels": {"app": "op"}},
                    "template": {
                        "metadata": {"labels": {"app": "op"}},
                        "spec": {
                            "containers": [
                                {
                                    "name": "training-operator",
                                    "image": "kubeflow/training-operator",
                                    "command": ["/manager"],
                                }
                            ]
                        },
                    },
                },
            }
        )
    )
    kubectl = str(Path(sys.executable).parent / "kubectl")
    built = subprocess.run([kubectl, "kustomize", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert built.returncode == 0, built.stderr
    docs = {d["kind"]: d for d in yaml.safe_load_all(built.stdout)}
    config = docs["ConfigMap"]
    assert config["data"]["initContainer.yaml"] == (OPERATOR_DOCS / "init-container.yaml").read_text()
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    mount = pod["containers"][0]["volumeMounts"][0]
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    assert mount["mountPath"] == "/etc/config" and volume["configMap"]["name"] == config["metadata"]["name"]
    assert docs["Deployment"]["metadata"]["namespace"] == "kubeflow"


def test_extra_volumes_mounts_and_containers_reach_the_pod_and_a_mount_needs_its_volume():
    docs = render(
        **{
            "extraVolumes[0].name": "datasets",
            "extraVolumes[0].persistentVolumeClaim.claimName": "team-data",
            "extraVolumeMounts[0].name": "datasets",
            "extraVolumeMounts[0].mountPath": "/datasets",
            "extraVolumeMounts[0].readOnly": "true",
            "extraContainers[0].name": "proxy",
            "extraContainers[0].image": "envoyproxy/envoy:v1.31",
            "extraInitContainers[0].name": "fetch",
            "extraInitContainers[0].image": "busybox:1.36",
            "topologySpreadConstraints[0].maxSkew": 1,
            "topologySpreadConstraints[0].topologyKey": "topology.kubernetes.io/zone",
            "topologySpreadConstraints[0].whenUnsatisfiable": "ScheduleAnyway",
            "schedulerName": "volcano",
            "jobAnnotations.team": "perception",
            "jobLabels.cost-center": "ml",
        }
    )
    job = job_of(docs)
    assert job["metadata"]["annotations"] == {"team": "perception"} and job["metadata"]["labels"]["cost-center"] == "ml"
    spec = pods_of(job)["Master"]["spec"]
    assert {"name": "datasets", "persistentVolumeClaim": {"claimName": "team-data"}} in spec["volumes"]
    trainer = next(c for c in spec["containers"] if c["name"] == "pytorch")
    assert {"name": "datasets", "mountPath": "/datasets", "readOnly": True} in trainer["volumeMounts"]
    assert [c["name"] for c in spec["containers"]] == ["pytorch", "proxy"]
    assert [c["name"] for c in spec["initContainers"]] == ["exporter", "fetch"]
    assert spec["schedulerName"] == "volcano" and spec["topologySpreadConstraints"][0]["maxSkew"] == 1
    assert spec["automountServiceAccountToken"] is False and "serviceAccountName" not in spec

    orphan = helm(
        "template",
        "x",
        str(CHART),
        *set_args({"extraVolumeMounts[0].name": "datasets", "extraVolumeMounts[0].mountPath": "/datasets"}),
    )
    assert orphan.returncode != 0 and orphan.stdout == ""
    assert (
        "extraVolumeMounts[0] mounts the volume 'datasets', which the pod does not have: add it to extraVolumes"
        in orphan.stderr
    ), orphan.stderr
    taken = helm(
        "template", "x", str(CHART), *set_args({"extraVolumes[0].name": "tmp", "extraVolumes[0].emptyDir.medium": ""})
    )
    assert taken.returncode != 0 and "extraVolumes[0]: the volume name 'tmp' is taken" in taken.stderr


def test_service_account_network_policy_and_shared_monitoring():
    import k8s_crds

    docs = render(
        **{
            "serviceAccount.create": "true",
            "serviceAccount.annotations.eks\\.amazonaws\\.com/role-arn": "arn:x",
            "networkPolicy.enabled": "true",
            "networkPolicy.s3.cidrs[0]": "10.20.0.0/16",
            "monitoring.podMonitor.labels.release": "kube-prometheus-stack",
        }
    )
    k8s_crds.check(docs)
    account = next(d for d in docs if d["kind"] == "ServiceAccount")
    assert account["metadata"]["name"] == "dvgt-test" and account["automountServiceAccountToken"] is False
    assert pods_of(job_of(docs))["Worker"]["spec"]["serviceAccountName"] == "dvgt-test"
    policy = next(d for d in docs if d["kind"] == "NetworkPolicy")["spec"]
    assert policy["podSelector"]["matchLabels"] == {
        "app.kubernetes.io/name": "dvgt",
        "app.kubernetes.io/instance": "dvgt-test",
    }
    assert {
        "from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}],
        "ports": [{"port": "metrics", "protocol": "TCP"}],
    } in policy["ingress"]
    assert {"ports": [{"port": 443, "protocol": "TCP"}], "to": [{"ipBlock": {"cidr": "10.20.0.0/16"}}]} in policy[
        "egress"
    ]
    monitor = next(d for d in docs if d["kind"] == "PodMonitor")
    assert (
        monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
        and monitor["spec"]["jobLabel"] == "app.kubernetes.io/name"
    )

    # five job releases with monitoring.shared and one monitoring.only release: one rule, one dashboard
    releases = [render(f"job-{i}", **{"monitoring.shared": "true"}) for i in range(5)] + [
        render("dvgt-monitoring", **{"monitoring.only": "true"})
    ]
    shared = [d for docs in releases for d in docs if d["kind"] in ("PrometheusRule", "ConfigMap")]
    assert sorted((d["kind"], d["metadata"]["name"]) for d in shared) == [
        ("ConfigMap", "dvgt-dashboard"),
        ("PrometheusRule", "dvgt"),
    ]
    assert [d["kind"] for d in releases[-1]] == ["ConfigMap", "PrometheusRule"]  # nothing of a job
    assert sum(d["kind"] == "PodMonitor" for docs in releases for d in docs) == 5
    ready = [d for d in yaml.safe_load_all((REPO / "k8s" / "monitoring.yaml").read_text()) if d]
    assert sorted(d["kind"] for d in ready) == ["ConfigMap", "PrometheusRule"]


def test_checkov_passes_the_default_renders(tmp_path):
    """checkov's Kubernetes checks (its own virtualenv, scripts/install-tools.sh) on the default PyTorchJob
    and TrainJob renders. checkov scans core kinds only, so each rendered pod template is written as a Pod,
    with its checkov.io/skip annotations; each skip is justified where the chart sets it (_pod.tpl)."""
    files = []
    for name, docs in (
        ("pytorchjob", render(nodes=2, **{"networkPolicy.enabled": "true", "serviceAccount.create": "true"})),
        ("trainjob", render(api="trainjob", nodes=2)),
    ):
        pods = []
        for doc in docs:
            if doc["kind"] == "PyTorchJob":
                pods += [(f"{name}-{rtype.lower()}", template) for rtype, template in pods_of(doc).items()]
            if doc["kind"] == "TrainingRuntime":
                node = doc["spec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]
                pods.append((f"{name}-node", node))
        for pod_name, template in pods:
            pod = {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {**template["metadata"], "name": pod_name, "namespace": "training"},
                "spec": template["spec"],
            }
            if name == "trainjob":  # the runtime's node container gets its image and resources from the TrainJob
                job = next(d for d in docs if d["kind"] == "TrainJob")
                for container in pod["spec"]["containers"]:
                    if container["name"] == "node":
                        container.update(
                            image=job["spec"]["trainer"]["image"], resources=job["spec"]["trainer"]["resourcesPerNode"]
                        )
            files.append(tmp_path / f"{pod_name}.yaml")
            files[-1].write_text(yaml.safe_dump(pod))
        core = [
            {**d, "metadata": {**d["metadata"], "namespace": "training"}}  # as `helm install -n training` creates them
            for d in docs
            if d["apiVersion"] in ("v1", "networking.k8s.io/v1", "rbac.authorization.k8s.io/v1")
        ]
        (tmp_path / f"{name}-core.yaml").write_text(yaml.safe_dump_all(core))
        files.append(tmp_path / f"{name}-core.yaml")
    checkov = Path(sys.executable).parent / "checkov"
    result = subprocess.run(
        [str(checkov), "--quiet", "--compact", "--framework", "kubernetes", "--output", "json", "-d", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    report = json.loads(result.stdout)
    reports = report if isinstance(report, list) else [report]
    failed = [(c["check_id"], c["resource"]) for r in reports for c in r["results"].get("failed_checks", [])]
    assert failed == [], failed
    summary = {key: sum(r["summary"][key] for r in reports) for key in ("passed", "skipped", "resource_count")}
    assert summary["resource_count"] >= len(files) and summary["passed"] > 100  # it did scan the pods
    pods = len(
        list(tmp_path.glob("*-master.yaml")) + list(tmp_path.glob("*-worker.yaml")) + list(tmp_path.glob("*-node.yaml"))
    )
    assert pods == 3 and summary["skipped"] == 5 * pods and result.returncode == 0  # the 5 justified skips of each pod
