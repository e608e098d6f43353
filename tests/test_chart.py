"""The Helm chart, rendered by the real helm binary (.venv/bin, scripts/install-tools.sh): every stage
x profile lints and renders; core objects and the pods validate against the Kubernetes schemas in
strict mode (kubernetes-validate); the PyTorchJob round-trips through the Training Operator's Python
models (kubeflow-training) with no field lost and passes the operator's admission rules; the
trainer's arguments parse against the stage config; every pod meets the Pod Security Standard
`restricted` (tests/pss.py); the pods are sized by the catalog's rule; the schema refuses bad values with
a message that names them; the catalog agrees with the configs; the ready manifests in k8s/ match the chart."""

import functools
import itertools
import json
import math
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import kubernetes_validate
import pss
import pytest
import yaml
from kubeflow.training.api_client import ApiClient

from dvgt.config import CONFIG_ROOT, accum_steps_for, load_config
from dvgt.k8s import generate
from dvgt.k8s.catalog import CHART_DIR, load_catalog
from dvgt.k8s.pytorchjob import CONTAINER, admission_errors, load_pytorchjob

CHART = CHART_DIR.resolve()
REPO = CHART.parent.parent
CATALOG = load_catalog()
STAGES, PROFILES = list(CATALOG.stages), list(CATALOG.profiles)
K8S_VERSION = "1.35.0"  # the helm / kubectl / kubernetes client version the project installs
CORE_GROUPS = ("v1", "rbac.authorization.k8s.io/v1")


def helm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([generate.find_helm(), *args], capture_output=True, text=True, timeout=60)


def set_args(values: dict) -> list:
    return [item for key, value in values.items() for item in ("--set", f"{key}={value}")]


@functools.cache
def render(release: str = "dvgt-test", **values) -> tuple:
    """The chart's documents (rendered once per set of values and reused by the tests)."""
    result = helm("template", release, str(CHART), *set_args(values))
    assert result.returncode == 0, result.stderr
    return tuple(d for d in yaml.safe_load_all(result.stdout) if d)


def job_of(docs) -> dict:
    return next(d for d in docs if d["kind"] == "PyTorchJob")


def pods_of(job: dict) -> dict:
    return {rtype: spec["template"] for rtype, spec in job["spec"]["pytorchReplicaSpecs"].items()}


def trainer(pod: dict) -> dict:
    return next(c for c in pod["spec"]["containers"] if c["name"] == CONTAINER)


def round_trip(job: dict) -> dict:
    """Through kubeflow-training's models, as its SDK reads and writes PyTorchJobs."""
    client = ApiClient()

    class Response:
        data = json.dumps(job)

    return client.sanitize_for_serialization(client.deserialize(Response(), "KubeflowOrgV1PyTorchJob"))


# every stage with every profile that fits its model (a profile with a device map fits one model)
MATRIX = [
    (stage, profile)
    for stage, profile in itertools.product(STAGES, PROFILES)
    if CATALOG.profiles[profile].model in (None, CATALOG.stages[stage].model)
]


@pytest.fixture(scope="module")
def linted_and_rendered():
    """`helm lint --strict` and `helm template` of every stage x profile, once, a few helm processes at a time."""

    def both(stage, profile):
        return (
            helm("lint", "--strict", str(CHART), *set_args({"stage": stage, "profile": profile})),
            render(stage=stage, profile=profile, nodes=2),
        )

    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = {combo: pool.submit(both, *combo) for combo in MATRIX}
    return {combo: future.result() for combo, future in futures.items()}


@pytest.mark.parametrize("stage,profile", MATRIX)
def test_every_stage_and_profile_lints_and_renders_a_valid_job(stage, profile, linted_and_rendered):
    lint, docs = linted_and_rendered[stage, profile]
    assert lint.returncode == 0, lint.stdout + lint.stderr
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == ["ConfigMap", "PodMonitor", "PrometheusRule", "PyTorchJob"]
    for doc in docs:
        if doc["apiVersion"] in CORE_GROUPS:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    job = job_of(docs)
    assert admission_errors(job) == []
    assert round_trip(job) == job
    master, worker = pods_of(job)["Master"], pods_of(job)["Worker"]
    kubernetes_validate.validate(
        {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", **master["metadata"]}, "spec": master["spec"]},
        K8S_VERSION,
        strict=True,
    )  # the pod is a valid Pod
    assert worker["spec"] == master["spec"]  # the replicas differ only by their component label
    assert pss.violations(master["spec"], master["metadata"], "restricted") == []  # Pod Security Standard `restricted`

    # torchrun (through the launcher that keeps the trainer's exit code) on the stage's config; its
    # overrides parse against that config
    container = trainer(pods_of(job)["Master"])
    assert container["command"] == ["python", "-m", "dvgt.train.launch"]
    args = container["args"]
    processes = 8 // CATALOG.profiles[profile].gpus_per_process  # gpusPerNode 8
    assert job["spec"]["nprocPerNode"] == str(processes)
    assert args[:5] == [
        f"--nproc-per-node={processes}",
        "--shutdown-timeout=120",
        "-m",
        "dvgt.train",
        f"--config={CATALOG.stages[stage].config}",
    ]  # torchrun waits the preemption budget
    cfg = load_config(CATALOG.stages[stage].config, args[5:])
    assert cfg.checkpoint.preemption_budget_s == 120
    expected_accum = math.ceil(CATALOG.stages[stage].images_per_step / CATALOG.profiles[profile].max_images_per_forward)
    assert cfg.accum_steps == expected_accum
    assert cfg.max_img_per_gpu == CATALOG.stages[stage].images_per_step  # images per step kept
    assert cfg.checkpoint.uri == "s3://dvgt-checkpoints/dvgt-test"
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pods_of(job)["Master"]["spec"]["volumes"]}
    assert cfg.checkpoint.spill_dir == mounts["spill"] == "/spill" and volumes["spill"] == {
        "name": "spill",
        "emptyDir": {},
    }
    if profile == "cpu-test":
        assert (cfg.device, cfg.distributed.backend, cfg.model.size) == ("cpu", "gloo", "tiny")
        assert "nvidia.com/gpu" not in container["resources"]["limits"]
    else:
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "8"
    assert container["resources"]["requests"] == container["resources"]["limits"]  # with the exporter's: Guaranteed QoS
    assert container["resources"]["limits"] == expected_resources(profile, processes=processes)


def test_catalog_agrees_with_the_stage_configs():
    packaged = {
        str(p.relative_to(Path(str(CONFIG_ROOT))))
        for p in Path(str(CONFIG_ROOT)).rglob("*.yaml")
        if "base" not in p.parts
    }
    assert sorted(s.config for s in CATALOG.stages.values()) == sorted(packaged)
    for stage in CATALOG.stages.values():
        cfg = load_config(stage.config)
        assert cfg.model.name == stage.model, stage.name
        assert cfg.max_img_per_gpu == stage.images_per_step, stage.name
    assert CATALOG.profiles["h20-146g"].max_images_per_forward == 48  # the reference recipe: accum 1
    assert accum_steps_for(48, 48) == 1 and accum_steps_for(48, 32) == 2 and accum_steps_for(12, 8) == 2


def test_generated_files_match_the_chart():
    """values.schema.json's enums and k8s/<stage>.yaml are what `make manifests` writes now."""
    stale = [
        str(path)
        for path, text in generate.expected_files(CHART).items()
        if not path.exists() or path.read_text() != text
    ]
    assert stale == [], f"out of date (run `make manifests`): {stale}"
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert schema["properties"]["stage"]["enum"] == STAGES
    assert schema["properties"]["profile"]["enum"] == PROFILES


def test_generated_tables_follow_the_catalog_and_their_markers(tmp_path):
    """The README tables are the catalog's rows (a hand edit or a removed marker is caught), and the
    accumulation table the templates read is the rule's value for every stage and profile."""
    tables = generate.markdown_tables(CHART)
    for stage in CATALOG.stages.values():
        assert f"| {stage.config} | {stage.images_per_step} | {stage.nodes} |" in tables["stages"]
    accumulation = yaml.safe_load((CHART / "files" / "accumulation.yaml").read_text())["accumSteps"]
    for stage, profile in MATRIX:
        images, per_forward = CATALOG.stages[stage].images_per_step, CATALOG.profiles[profile].max_images_per_forward
        assert accumulation[stage][profile] == math.ceil(images / per_forward)
    readme = (REPO / "README.md").read_text()
    edited = tmp_path / "README.md"
    edited.write_text(readme.replace("| vggt-default |", "| vggt-old |"))  # a hand edit inside the block
    assert generate.filled_markdown(edited, tables, ["stages"]) == readme
    edited.write_text(readme.replace("<!-- end generated -->", ""))
    with pytest.raises(ValueError, match=r"README.md has the generated blocks none, not \['stages'\]"):
        generate.filled_markdown(edited, tables, ["stages"])


def test_a_stale_accumulation_table_fails_the_render_naming_the_fix(tmp_path):
    chart = tmp_path / "dvgt"
    shutil.copytree(CHART, chart)
    table = chart / "files" / "accumulation.yaml"
    table.write_text(table.read_text().replace("  vggt-default:", "  vggt-old:"))
    result = helm("template", "x", str(chart), "--set", "stage=vggt-default")
    assert result.returncode != 0
    assert (
        "no accum_steps for stage vggt-default on profile h20-146g: it is stale, run `make manifests`" in result.stderr
    )


def test_ready_manifests_are_jobs_the_local_runner_reads():
    for stage in STAGES:
        job = load_pytorchjob((REPO / "k8s" / f"{stage}.yaml").read_text())
        assert job["metadata"]["name"] == stage and admission_errors(job) == []
        assert job["metadata"]["labels"]["dvgt.io/stage"] == stage
        workers = job["spec"]["pytorchReplicaSpecs"].get("Worker", {}).get("replicas", 0)
        assert workers + 1 == CATALOG.stages[stage].nodes


def expected_resources(profile: str, processes: int, **given) -> dict:
    """The sizing rule of files/catalog.yaml (host), as charts/dvgt/README.md states it, in MiB."""
    catalog = yaml.safe_load((CHART / "files" / "catalog.yaml").read_text())
    host = {**catalog["host"], **catalog["profiles"][profile].get("host", {})}
    shm = processes * CATALOG.profiles[profile].max_images_per_forward * host["shmMiBPerImage"]
    memory = processes * host["memoryGiBPerProcess"] * 1024 + shm
    storage = processes * host["workspaceGiBPerProcess"] * 1024 + 4 * 1024 + 1024  # /workspace + /tmp (tmpSize) + 1 GiB

    def quantity(mib: int) -> str:
        return f"{mib // 1024}Gi" if mib % 1024 == 0 else f"{mib}Mi"

    sized = {
        "cpu": str(processes * host["cpuPerProcess"]),
        "memory": quantity(memory),
        "ephemeral-storage": quantity(storage),
    }
    if CATALOG.profiles[profile].gpu:
        sized["nvidia.com/gpu"] = str(processes * CATALOG.profiles[profile].gpus_per_process)
    return {**sized, **given}


@pytest.mark.parametrize(
    "values,message",
    [
        ({"stage": "pretrain-dvgt9"}, "at '/stage': value must be one of 'dvgt1-default'"),
        ({"profile": "h100-40g"}, "at '/profile': value must be one of 'h20-146g'"),
        ({"nodes": 0}, "at '/nodes': minimum: got 0, want 1"),
        ({"gpusPerNode": 0}, "at '/gpusPerNode': minimum: got 0, want 1"),
        ({"image.repository": ""}, "at '/image/repository': minLength: got 0, want 1"),
        ({"image.repository": "null"}, "at '/image': missing property 'repository'"),
        ({"exporter.image.repository": ""}, "at '/exporter/image/repository': minLength"),
        ({"checkpoint.awsSecretAccessKey": "abc"}, "invalid propertyName 'awsSecretAccessKey'"),
        ({"password": "hunter2"}, "invalid propertyName 'password'"),
        (
            {"extraEnv[0].name": "AWS_SECRET_ACCESS_KEY", "extraEnv[0].value": "abc"},
            "at '/extraEnv/0': missing property 'valueFrom'",
        ),
        ({"replicas": 3}, "additional properties 'replicas' not allowed"),  # an unknown value
        ({"resources.requests.cpu": "-1"}, "at '/resources/requests/cpu'"),  # a negative request
        ({"resources.limits.memory": "-4Gi"}, "at '/resources/limits/memory'"),
        ({"shmSize": "64GB"}, "at '/shmSize'"),
        ({"podSecurityContext.runAsUser": -1}, "at '/podSecurityContext/runAsUser': minimum: got -1, want 0"),
        ({"extraVolumeMounts[0].name": "datasets"}, "at '/extraVolumeMounts/0': missing property 'mountPath'"),
        ({"extraVolumes[0].name": "datasets"}, "at '/extraVolumes/0': minProperties"),  # a volume without a source
        ({"extraContainers[0].name": "sidecar"}, "at '/extraContainers/0': missing property 'image'"),
        ({"nccl.env.HF_TOKEN": "abc"}, "invalid propertyName 'HF_TOKEN'"),
        ({"checkpoint.uri": "s3://key:secret@host/bucket"}, "at '/checkpoint/uri'"),
        ({"data.root": "s3://key:secret@host/bucket"}, "at '/data/root'"),
        ({"data.s3CacheSize": "20GB"}, "at '/data/s3CacheSize'"),
        ({"restartPolicy": "Sometimes"}, "at '/restartPolicy': value must be one of"),
        (
            {"restartPolicy": "Always"},
            "at '/restartPolicy': value must be one of",
        ),  # a finished pod would restart forever
    ],
)
def test_schema_refuses_bad_values_with_a_message_naming_them(values, message):
    result = helm("template", "x", str(CHART), *set_args(values))
    assert result.returncode != 0
    assert message in result.stderr, result.stderr


def test_schema_accepts_secrets_by_reference():
    docs = render(
        **{
            "extraEnv[0].name": "HF_TOKEN",
            "extraEnv[0].valueFrom.secretKeyRef.name": "hf",
            "extraEnv[0].valueFrom.secretKeyRef.key": "token",
            "checkpoint.s3Secret": "team-s3",
            "envFrom[0].configMapRef.name": "proxy",
        }
    )
    container = trainer(pods_of(job_of(docs))["Master"])
    assert {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}} in container["env"]
    assert container["envFrom"] == [{"secretRef": {"name": "team-s3"}}, {"configMapRef": {"name": "proxy"}}]


def test_release_name_must_be_a_job_name():
    result = helm("template", "dvgt.pretrain", str(CHART))
    assert result.returncode != 0 and "release name 'dvgt.pretrain' is not a valid PyTorchJob name" in result.stderr


def test_pods_are_locked_down_and_secrets_come_from_secrets():
    for values in ({}, {"rdma.enabled": "true"}):
        job = job_of(render(nodes=3, **values))
        for pod in pods_of(job).values():
            spec = pod["spec"]
            assert spec["securityContext"]["runAsNonRoot"] is True
            for container in spec["containers"] + spec.get("initContainers", []):
                context = container["securityContext"]
                assert context["allowPrivilegeEscalation"] is False and context["capabilities"]["drop"] == ["ALL"]
                assert context["capabilities"].get("add", []) == (
                    ["IPC_LOCK"] if values and container["name"] == CONTAINER else []
                )
                for item in container.get("env", []):
                    if any(word in item["name"] for word in ("SECRET", "KEY", "TOKEN", "PASSWORD")):
                        assert "value" not in item, item
    rdma = trainer(
        pods_of(job_of(render(**{"rdma.enabled": "true", "rdma.resources.vpc\\.amazonaws\\.com/efa": 4})))["Master"]
    )
    assert rdma["resources"]["limits"]["vpc.amazonaws.com/efa"] == "4"
    assert {"name": "NCCL_IB_DISABLE", "value": "0"} in rdma["env"]


def test_job_policies_and_placement_reach_the_job():
    docs = render(
        **{
            "nodes": 4,
            "gpusPerNode": 4,
            "profile": "a100-40g",
            "restartPolicy": "ExitCode",
            "backoffLimit": 3,
            "activeDeadlineSeconds": 86400,
            "cleanPodPolicy": "All",
            "ttlSecondsAfterFinished": 60,
            "scheduling.minAvailable": 4,
            "scheduling.queue": "research",
            "priorityClassName": "high",
            "scheduling.kueueQueue": "team-a",
            "nodeSelector.gpu": "a100",
            "tolerations[0].key": "gpu",
            "tolerations[0].operator": "Exists",
            "checkpoint.preemptionBudgetSeconds": 300,
            "checkpoint.terminationMarginSeconds": 20,
            "checkpoint.spillPvc": "spill-claim",
            "data.pvc": "",
            "data.hostPath": "/mnt/dvgt",
            "imagesPerStep": 24,
            "overrides[0]": "optim.lr=1e-5",
            "rbac.create": "true",
        }
    )
    job = job_of(docs)
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    assert job["spec"]["nprocPerNode"] == "4"
    assert job["spec"]["runPolicy"] == {
        "cleanPodPolicy": "All",
        "backoffLimit": 3,
        "ttlSecondsAfterFinished": 60,
        "activeDeadlineSeconds": 86400,
        "schedulingPolicy": {"minAvailable": 4, "queue": "research", "priorityClass": "high"},
    }
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert (replicas["Master"]["replicas"], replicas["Worker"]["replicas"]) == (1, 3)
    assert {r["restartPolicy"] for r in replicas.values()} == {"ExitCode"}
    pod = replicas["Worker"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == 320 and pod["priorityClassName"] == "high"
    assert pod["nodeSelector"] == {"gpu": "a100"} and pod["tolerations"] == [{"key": "gpu", "operator": "Exists"}]
    assert {"name": "data", "hostPath": {"path": "/mnt/dvgt", "type": "Directory"}} in pod["volumes"]
    assert {"name": "spill", "persistentVolumeClaim": {"claimName": "spill-claim"}} in pod[
        "volumes"
    ]  # kept by a new pod
    args = trainer(replicas["Worker"]["template"])["args"]
    assert args[0] == "--nproc-per-node=4"
    assert "checkpoint.preemption_budget_s=300" in args and args[-1] == "optim.lr=1e-5"
    # a custom imagesPerStep: the chart passes the images per step and per forward, the trainer derives accum_steps
    assert "max_img_per_gpu=24" in args and "max_img_per_forward=8" in args
    assert not any(arg.startswith("accum_steps=") for arg in args)
    assert load_config(CATALOG.stages["dvgt2-pretrain"].config, args[5:]).accum_steps == 3  # 24 per step, 8 per forward
    role = next(d for d in docs if d["kind"] == "Role")
    assert {
        "apiGroups": ["kubeflow.org"],
        "resources": ["pytorchjobs", "pytorchjobs/status"],
        "verbs": ["get", "list", "watch", "create", "update", "patch", "delete"],
    } in role["rules"]
    assert {d["kind"] for d in docs} >= {"ServiceAccount", "Role", "RoleBinding"}
    for doc in docs:
        if doc["apiVersion"] in CORE_GROUPS:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    assert round_trip(job) == job and admission_errors(job) == []


def test_data_root_on_s3_gets_a_bounded_cache_and_a_pvc_root_is_mounted_read_only():
    """data.root=s3://...: the trainer reads it through an emptyDir cache of data.s3CacheSize, keeping
    90% of it (data.s3_cache.max_gib), and the pod's ephemeral storage grows by it; the default reads the
    stage config's root on the read-only dataset PVC and renders no cache."""
    pod = pods_of(
        job_of(
            render(
                **{
                    "data.root": "s3://team-data/dvgt",
                    "data.pvc": "",
                    "data.s3CacheSize": "40Gi",
                    "profile": "cpu-test",
                }
            )
        )
    )["Master"]
    container = trainer(pod)
    data_args = [a for a in container["args"] if a.startswith("data.")]
    assert data_args == [
        "data.root=s3://team-data/dvgt",
        "data.s3_cache.dir=/data-cache",
        "data.s3_cache.max_gib=36.00",
    ]
    assert {"name": "data-cache", "mountPath": "/data-cache"} in container["volumeMounts"]
    assert {"name": "data-cache", "emptyDir": {"sizeLimit": "40Gi"}} in pod["spec"]["volumes"]
    assert not any(v["name"] == "data" for v in pod["spec"]["volumes"])
    plain = expected_resources("cpu-test", 8)["ephemeral-storage"]
    assert container["resources"]["requests"]["ephemeral-storage"] == f"{int(plain[:-2]) + 40}Gi"
    assert pss.violations(pod["spec"], pod["metadata"], "restricted") == []
    assert load_config(CONFIG_ROOT / "train/dvgt1/demo.yaml", data_args).data.s3_cache.max_gib == 36.0

    default = pods_of(job_of(render()))["Master"]
    assert {"name": "data", "persistentVolumeClaim": {"claimName": "dvgt-data", "readOnly": True}} in default["spec"][
        "volumes"
    ]
    assert not any(
        "data-cache" in str(v) or a.startswith("data.")
        for v in default["spec"]["volumes"]
        for a in trainer(default)["args"]
    )


def test_exporter_sidecar_shares_the_metrics_folder_and_is_scraped():
    docs = render(nodes=2)
    job = job_of(docs)
    pod = pods_of(job)["Worker"]
    sidecar = pod["spec"]["initContainers"][0]
    assert sidecar["name"] == "exporter" and sidecar["restartPolicy"] == "Always"  # a native sidecar
    assert sidecar["command"] == ["dvgt", "exporter", "--host", "0.0.0.0", "--port", "9400", "--dir", "/metrics"]
    assert sidecar["ports"] == [{"name": "metrics", "containerPort": 9400}]
    assert sidecar["readinessProbe"]["httpGet"]["path"] == sidecar["livenessProbe"]["httpGet"]["path"] == "/healthz"
    env = {e["name"]: e.get("value") for e in trainer(pod)["env"]}
    assert env["PROMETHEUS_MULTIPROC_DIR"] == "/metrics" and env["DVGT_JOB_NAME"] == "dvgt-test"
    mounts = {c["name"]: {m["name"]: m["mountPath"] for m in c["volumeMounts"]} for c in [trainer(pod), sidecar]}
    assert mounts["pytorch"]["metrics"] == mounts["exporter"]["metrics"] == "/metrics"
    assert {"name": "metrics", "emptyDir": {"sizeLimit": "256Mi"}} in pod["spec"]["volumes"]
    assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "36Gi"}} in pod["spec"][
        "volumes"
    ]  # 8 x 48 x 96 MiB

    monitor = next(d for d in docs if d["kind"] == "PodMonitor")
    assert monitor["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    rule = next(d for d in docs if d["kind"] == "PrometheusRule")
    assert rule["spec"]["groups"] == yaml.safe_load((CHART / "files/prometheus/alerts.yaml").read_text())["groups"]
    dashboard = next(d for d in docs if d["kind"] == "ConfigMap")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dashboard["data"]["dvgt-training.json"]) == json.loads(
        (CHART / "files/grafana/dvgt-training.json").read_text()
    )

    quiet = render(
        **{
            "exporter.enabled": "false",
            "monitoring.prometheusRule.enabled": "false",
            "monitoring.dashboard.enabled": "false",
        }
    )
    assert [d["kind"] for d in quiet] == ["PyTorchJob"]
    assert "initContainers" not in pods_of(job_of(quiet))["Master"]["spec"]


def test_every_value_is_documented_in_the_chart_readme():
    readme = (CHART / "README.md").read_text()

    def leaves(node, prefix=""):
        for key, value in node.items():
            if (
                isinstance(value, dict)
                and value
                and key
                not in ("env", "resources", "requests", "limits", "podSecurityContext", "securityContext", "dns")
            ):
                yield from leaves(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}"

    missing = [key for key in leaves(yaml.safe_load((CHART / "values.yaml").read_text())) if f"`{key}`" not in readme]
    assert missing == [], f"values missing from charts/dvgt/README.md: {missing}"


def test_chart_ships_inside_the_package(tmp_path):
    """The wheel holds the chart (through the dvgt/k8s/chart link), so the installed package finds its catalog."""
    subprocess.run(
        [
            __import__("sys").executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            str(REPO),
            "-w",
            str(tmp_path),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    import zipfile

    names = set(zipfile.ZipFile(next(tmp_path.glob("*.whl"))).namelist())
    for path in (
        "Chart.yaml",
        "values.yaml",
        "values.schema.json",
        "files/catalog.yaml",
        "files/accumulation.yaml",
        "templates/_pod.tpl",
        "templates/pytorchjob.yaml",
        ".helmignore",
    ):
        assert f"dvgt/k8s/chart/{path}" in names


def test_notes_tell_how_to_follow_the_job():
    result = helm(
        "install", "nusc", str(CHART), "--dry-run=client", "--set", "stage=finetune-nuscenes", "--set", "nodes=2"
    )
    assert result.returncode == 0, result.stderr
    notes = result.stdout.split("NOTES:", 1)[1]
    assert "stage finetune-nuscenes (train/dvgt2/default_finetune_nuscenes.yaml)" in notes
    assert "2 pod(s) x 8 process(es), accum_steps 1, checkpoints in s3://dvgt-checkpoints/nusc" in notes
    custom = helm("install", "nusc", str(CHART), "--dry-run=client", "--set", "maxImagesPerForward=20")
    assert custom.returncode == 0, custom.stderr
    assert "accum_steps ceil(48 / 20) (the trainer derives it)" in custom.stdout.split("NOTES:", 1)[1]
    for command in (
        "kubectl get pytorchjob nusc",
        "kubectl logs -n default -f nusc-master-0 -c pytorch",
        "kubectl port-forward -n default pod/nusc-master-0 9400:9400",
        "dvgt status nusc",
        "kubectl create secret generic dvgt-s3",
    ):
        assert command in notes


# --------------------------------------------------------------------------------------------
# Both APIs against the upstream CRDs (tests/k8s_crds.py): PyTorchJob, and TrainJob with its runtime
# --------------------------------------------------------------------------------------------


def test_every_render_of_both_apis_is_valid_against_the_upstream_crds(linted_and_rendered):
    import k8s_crds

    from dvgt.k8s import trainjob

    with ThreadPoolExecutor(max_workers=4) as pool:
        trainjobs = dict(
            zip(MATRIX, pool.map(lambda c: render(stage=c[0], profile=c[1], nodes=2, api="trainjob"), MATRIX))
        )
    for combo in MATRIX:
        k8s_crds.check(linted_and_rendered[combo][1])  # the PyTorchJob, PodMonitor, PrometheusRule, ConfigMap
        docs = trainjobs[combo]
        k8s_crds.check(docs)
        assert sorted(d["kind"] for d in docs) == [
            "ConfigMap",
            "PodMonitor",
            "PrometheusRule",
            "TrainJob",
            "TrainingRuntime",
        ]
        job = next(d for d in docs if d["kind"] == "TrainJob")
        runtime = trainjob.find_runtime(job, list(docs))
        assert trainjob.admission_errors(job, runtime) == [], combo
        pytorch = trainer(pods_of(job_of(linted_and_rendered[combo][1]))["Master"])
        node = next(
            c for c in trainjob.pod_spec(trainjob.node_template(job, runtime))["containers"] if c["name"] == "node"
        )
        # one pod template for both kinds: the same command, arguments and resources reach the trainer
        assert (node["command"], node["args"], node.get("resources")) == (
            pytorch["command"],
            pytorch["args"],
            pytorch.get("resources"),
        )
        # the node pod as Trainer admits it (runtime, the job's patches and trainer fields): `restricted`, no workaround
        admitted = trainjob.node_template(job, runtime)["template"]["spec"]["template"]
        assert pss.violations(admitted["spec"], admitted["metadata"], "restricted") == [], combo
        processes = 8 // CATALOG.profiles[combo[1]].gpus_per_process  # gpusPerNode 8
        assert job["spec"]["trainer"]["numNodes"] == 2 and job["spec"]["trainer"]["numProcPerNode"] == processes
    ready = [d for path in sorted((REPO / "k8s").rglob("*.yaml")) for d in yaml.safe_load_all(path.read_text()) if d]
    k8s_crds.check(ready)
    runtime = yaml.safe_load((REPO / "k8s" / "trainjob" / "runtime.yaml").read_text())
    for stage in STAGES:
        for template in pods_of(load_pytorchjob((REPO / "k8s" / f"{stage}.yaml").read_text())).values():
            assert pss.violations(template["spec"], template["metadata"], "restricted") == [], stage
        job = next(
            d
            for d in yaml.safe_load_all((REPO / "k8s" / "trainjob" / f"{stage}.yaml").read_text())
            if d and d["kind"] == "TrainJob"
        )
        assert trainjob.admission_errors(job, runtime) == [] and job["metadata"]["name"] == stage
        assert job["spec"]["trainer"]["numNodes"] == CATALOG.stages[stage].nodes


def test_trainjob_options_render_valid_objects():
    import k8s_crds

    docs = render(
        api="trainjob",
        nodes=4,
        restartPolicy="ExitCode",
        **{
            "trainJob.podGroupPolicy": "volcano",
            "scheduling.queue": "research",
            "scheduling.kueueQueue": "team-a",
            "scheduling.kueuePriorityClass": "high",
            "rdma.enabled": "true",
            "extraEnv[0].name": "HF_HOME",
            "extraEnv[0].value": "/cache",
            "nodeSelector.gpu": "h100",
            "activeDeadlineSeconds": 3600,
        },
    )
    k8s_crds.check(docs)
    job, runtime = (next(d for d in docs if d["kind"] == k) for k in ("TrainJob", "TrainingRuntime"))
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    assert job["metadata"]["labels"]["kueue.x-k8s.io/priority-class"] == "high"
    assert (
        job["spec"]["trainer"]["env"] == [{"name": "HF_HOME", "value": "/cache"}]
        and job["spec"]["activeDeadlineSeconds"] == 3600
    )
    assert runtime["spec"]["podGroupPolicy"] == {"volcano": {}}
    assert runtime["spec"]["template"]["metadata"]["annotations"] == {"scheduling.volcano.sh/queue-name": "research"}
    node_job = runtime["spec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"]
    assert node_job["template"]["spec"]["restartPolicy"] == "Never"  # ExitCode: a failed pod is replaced ...
    assert node_job["podFailurePolicy"]["rules"][0]["onExitCodes"]["values"] == list(range(1, 128))  # ... unless 1-127
    patch = job["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
    assert patch["template"]["spec"]["template"]["spec"]["nodeSelector"] == {"gpu": "h100"}
    cluster = render(
        api="trainjob",
        **{
            "trainJob.runtime.kind": "ClusterTrainingRuntime",
            "trainJob.runtime.name": "dvgt-shared",
            "trainJob.podGroupPolicy": "coscheduling",
        },
    )
    k8s_crds.check(cluster)
    shared = next(d for d in cluster if d["kind"] == "ClusterTrainingRuntime")
    assert (
        shared["metadata"]["name"] == "dvgt-shared"
        and shared["spec"]["podGroupPolicy"]["coscheduling"]["scheduleTimeoutSeconds"] == 60
    )
    assert "annotations" not in shared["metadata"]  # cluster runtimes sort before TrainJobs: no helm hook needed
    assert next(d for d in cluster if d["kind"] == "TrainJob")["spec"]["runtimeRef"] == {
        "apiGroup": "trainer.kubeflow.org",
        "kind": "ClusterTrainingRuntime",
        "name": "dvgt-shared",
    }


@pytest.mark.parametrize(
    "values,message",
    [
        ({"api": "tfjob"}, "at '/api': value must be one of 'pytorchjob', 'trainjob'"),
        ({"api": "trainjob", "nodes": 0}, "at '/nodes': minimum: got 0, want 1"),
        ({"api": "trainjob", "trainJob.runtime.kind": "Runtime"}, "at '/trainJob/runtime/kind': value must be one of"),
        (
            {"api": "trainjob", "restartPolicy": "Always"},
            "at '/restartPolicy': value must be one of 'ExitCode', 'OnFailure', 'Never'",
        ),
        ({"api": "trainjob", "scheduling.minAvailable": 2}, "scheduling.minAvailable is a PyTorchJob setting"),
        (
            {"api": "trainjob", "scheduling.queue": "q"},
            "scheduling.queue (a Volcano queue) needs trainJob.podGroupPolicy=volcano",
        ),
    ],
)
def test_trainjob_bad_values_are_refused_naming_them(values, message):
    result = helm("template", "x", str(CHART), *set_args(values))
    assert result.returncode != 0 and message in result.stderr, result.stderr
    long_name = helm("template", "a" * 50, str(CHART), "--set", "api=trainjob")
    assert long_name.returncode != 0 and f"TrainJob name '{'a' * 50}' is too long for 8 node(s)" in long_name.stderr


def test_the_optional_data_check_runs_the_trainers_config_before_it(tmp_path, capsys):
    """data.check.enabled: every pod's first init container runs `dvgt data check` with the trainer's own
    config and overrides (here run for real, in this process, against the official fixture tree)."""
    import k8s_crds
    from conftest import OFFICIAL_TREE

    from dvgt.cli import main

    overrides = [
        f"data.root={OFFICIAL_TREE}",
        "data.train.datasets=[{dataset: nuscene, split: train}]",
        "data.val.datasets=[{dataset: nuscene, split: val}]",
    ]
    values = tmp_path / "values.yaml"
    values.write_text(
        yaml.safe_dump({"nodes": 2, "overrides": overrides, "data": {"check": {"enabled": True, "deep": True}}})
    )
    result = helm("template", "dvgt-test", str(CHART), "-f", str(values))
    assert result.returncode == 0, result.stderr
    docs = [d for d in yaml.safe_load_all(result.stdout) if d]
    k8s_crds.check(docs)
    for pod in pods_of(job_of(docs)).values():
        check = pod["spec"]["initContainers"][0]
        args = trainer(pod)["args"]
        assert check["name"] == "data-check" and check["command"] == ["dvgt", "data", "check"]
        assert check["args"] == args[args.index("dvgt.train") + 1 :] + ["--deep"]
        assert {"name": "data", "mountPath": "/workspace/data", "readOnly": True} in check["volumeMounts"]
        assert pss.violations(pod["spec"], pod["metadata"], "restricted") == []
    with pytest.raises(SystemExit) as done:
        main(["data", "check", *check["args"]])
    out = capsys.readouterr().out
    assert done.value.code == 0 and "(deep)" in out and out.count("│ nuscene ") == 2, out
    assert all(
        c["name"] != "data-check"
        for pod in pods_of(job_of(render())).values()
        for c in pod["spec"].get("initContainers", [])
    )  # off by default
    on_s3 = render(**{"data.check.enabled": "true", "data.root": "s3://team-data/dvgt", "data.pvc": ""})
    for pod in pods_of(job_of(on_s3)).values():  # an s3:// root: the check reads through the trainer's node cache
        check = pod["spec"]["initContainers"][0]
        assert "data.s3_cache.dir=/data-cache" in check["args"]
        assert {"name": "data-cache", "mountPath": "/data-cache"} in check["volumeMounts"]
    runtime_docs = render(api="trainjob", **{"data.check.enabled": "true"})
    k8s_crds.check(runtime_docs)
    runtime = next(d for d in runtime_docs if d["kind"] == "TrainingRuntime")
    assert "data-check" in json.dumps(runtime["spec"]["template"])
    shared = helm(
        "template",
        "x",
        str(CHART),
        *set_args({"api": "trainjob", "trainJob.runtime.name": "shared", "data.check.enabled": "true"}),
    )
    assert shared.returncode != 0 and "trainJob.runtime.name shares the runtime between stages" in shared.stderr


def test_a_profile_with_a_device_map_runs_fewer_processes_per_pod_and_fits_its_model_only():
    """vggt-a100-40g-x2: 2 GPUs per process, so 8 GPUs per pod run 4 processes with the device map;
    a stage of another model, or a GPU count it does not divide, is refused at render time."""
    profile = CATALOG.profiles["vggt-a100-40g-x2"]
    assert (profile.gpus_per_process, profile.model) == (2, "vggt")
    job = job_of(render(stage="vggt-default", profile="vggt-a100-40g-x2"))
    container = trainer(pods_of(job)["Master"])
    assert job["spec"]["nprocPerNode"] == "4" and container["args"][0] == "--nproc-per-node=4"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "8"
    cfg = load_config(CATALOG.stages["vggt-default"].config, container["args"][5:])
    assert dict(cfg.model.device_map) == {"backbone": 0, "aggregator": 0, "camera_head": 1, "point_head": 1}
    other = helm("template", "t", str(CHART), *set_args({"stage": "dvgt1-default", "profile": "vggt-a100-40g-x2"}))
    assert other.returncode != 0
    assert (
        "profile vggt-a100-40g-x2 places the parts of a vggt model, but stage dvgt1-default trains dvgt1"
        in other.stderr
    )
    odd = helm(
        "template",
        "t",
        str(CHART),
        *set_args({"stage": "vggt-default", "profile": "vggt-a100-40g-x2", "gpusPerNode": 3}),
    )
    assert (
        odd.returncode != 0
        and "gpusPerNode (3) is not a multiple of profile vggt-a100-40g-x2's gpusPerProcess (2)" in odd.stderr
    )
