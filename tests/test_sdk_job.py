"""TrainingJob: the SDK renders the same PyTorchJob as the chart (every stage x profile against
`helm template --set ...`, and every ready manifest in k8s/), refuses bad jobs with a line naming the
field, and `dvgt submit --dry-run` prints exactly the SDK's object."""

import itertools
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from dvgt.cli import main
from dvgt.k8s.catalog import load_catalog
from dvgt.k8s.pytorchjob import load_pytorchjob
from dvgt.k8s.trainjob import load_documents
from dvgt.sdk import InvalidJobError, TrainingJob
from dvgt.sdk.job import default_name, image_values

ROOT = Path(__file__).resolve().parent.parent
HELM = str(Path(sys.executable).parent / "helm")
CATALOG = load_catalog()


def helm_job(release: str, *sets: str) -> dict:
    """The PyTorchJob a user gets from `helm template RELEASE charts/dvgt --set ...` (its template only)."""
    command = [HELM, "template", release, str(ROOT / "charts" / "dvgt"), "--show-only", "templates/pytorchjob.yaml"]
    for item in sets:
        command += ["--set", item]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return load_pytorchjob(result.stdout)


def load_trainjob(path: Path) -> dict:
    return next(d for d in load_documents(path) if d["kind"] == "TrainJob")


def test_every_stage_and_profile_renders_what_helm_template_renders():
    combos = [  # a profile with a device map fits the one model it names
        (stage, profile)
        for stage, profile in itertools.product(CATALOG.stages, CATALOG.profiles)
        if CATALOG.profiles[profile].model in (None, CATALOG.stages[stage].model)
    ]

    def both(combo):
        stage, profile = combo
        sdk = TrainingJob(
            stage=stage,
            profile=profile,
            nodes=2,
            gpus_per_node=4,
            image="registry.example:5000/dvgt:1.0",
            checkpoint_uri="s3://bucket/runs",
            s3_secret="dvgt-s3",
            overrides={"optim.lr": 5e-6, "seed_value": 7},
            name="parity-job",
        ).render()
        helm = helm_job(
            "parity-job",
            f"stage={stage}",
            f"profile={profile}",
            "nodes=2",
            "gpusPerNode=4",
            "image.registry=",
            "image.repository=registry.example:5000/dvgt",
            "image.tag=1.0",
            "checkpoint.uri=s3://bucket/runs",
            "checkpoint.s3Secret=dvgt-s3",
            "overrides[0]=optim.lr=5e-06",
            "overrides[1]=seed_value=7",
        )
        return sdk, helm

    with ThreadPoolExecutor(max_workers=2) as pool:
        pairs = list(pool.map(both, combos))
    assert len(pairs) == len(combos) >= 70
    for (stage, profile), (sdk, helm) in zip(combos, pairs):
        assert sdk == helm, f"{stage} x {profile}"
        assert sdk["metadata"]["labels"]["dvgt.io/profile"] == profile and len(sdk["spec"]["pytorchReplicaSpecs"]) == 2


def test_ready_manifests_are_the_sdk_jobs_with_the_chart_defaults():
    for stage in CATALOG.stages:
        ready = load_pytorchjob(ROOT / "k8s" / f"{stage}.yaml")
        assert TrainingJob(stage=stage, name=stage).render() == ready, stage


def test_fields_become_chart_values():
    job = TrainingJob(
        stage="finetune-nuscenes",
        nodes=2,
        gpus_per_node=8,
        profile="h100-80g",
        image="registry.example/dvgt:1.0",
        checkpoint_uri="s3://bucket/runs/nusc-1",
        s3_secret="dvgt-s3",
        overrides={"optim.lr": 5e-6, "logging.progress": False, "data.train.views": [2, 2]},
        env={"NCCL_DEBUG": "INFO"},
        kueue_queue="team-a",
        values={"rdma": {"enabled": True}, "image": {"pullPolicy": "Always"}},
    )
    assert job.to_values() == {
        "stage": "finetune-nuscenes",
        "profile": "h100-80g",
        "nodes": 2,
        "gpusPerNode": 8,
        "overrides": ["optim.lr=5e-06", "logging.progress=false", "data.train.views=[2, 2]"],
        "image": {"registry": "", "repository": "registry.example/dvgt", "tag": "1.0", "pullPolicy": "Always"},
        "checkpoint": {"uri": "s3://bucket/runs/nusc-1", "s3Secret": "dvgt-s3"},
        "extraEnv": [{"name": "NCCL_DEBUG", "value": "INFO"}],
        "scheduling": {"kueueQueue": "team-a"},
        "rdma": {"enabled": True},
    }
    args = job.render()["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]["args"]
    assert args[-3:] == ["optim.lr=5e-06", "logging.progress=false", "data.train.views=[2, 2]"]
    assert (
        f"checkpoint.uri=s3://bucket/runs/nusc-1/{job.name}" in args and "accum_steps=2" in args
    )  # 48 images, 24 per pass
    assert image_values("localhost:5000/dvgt", "image") == {
        "registry": "",
        "repository": "localhost:5000/dvgt",
        "tag": "",
    }
    names = {default_name("dvgt2-pretrain") for _ in range(20)}
    assert len(names) == 20 and all(n.startswith("dvgt2-pretrain-") and len(n) == 20 for n in names)
    assert TrainingJob(stage="dvgt1-demo").name.startswith("dvgt1-demo-")
    on_s3 = TrainingJob(stage="dvgt1-demo", data_root="s3://team-data/dvgt", data_pvc="")
    assert on_s3.to_values()["data"] == {"root": "s3://team-data/dvgt", "pvc": ""}
    pod = on_s3.render()["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    assert "data.root=s3://team-data/dvgt" in pod["containers"][0]["args"]
    assert {"name": "data-cache", "emptyDir": {"sizeLimit": "20Gi"}} in pod["volumes"]


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"profile": "h100"}, "invalid TrainingJob.profile: 'h100' is not one of ['h20-146g'"),
        ({"stage": "dvgt3"}, "invalid TrainingJob.stage: 'dvgt3' is not one of"),
        ({"gpus_per_node": 0}, "invalid TrainingJob.gpus_per_node: 0 is less than the minimum of 1"),
        ({"nodes": 1.5}, "invalid TrainingJob.nodes: 1.5 is not of type 'integer', 'null'"),
        ({"name": "Nusc_1"}, "TrainingJob.name 'Nusc_1' is not a valid job name: use at most 63 lower-case letters"),
        ({"name": "x" * 64}, "is not a valid job name"),
        ({"api": "tfjob"}, "invalid TrainingJob.api: 'tfjob' is not one of ['pytorchjob', 'trainjob']"),
        ({"api": "trainjob", "nodes": 0}, "invalid TrainingJob.nodes: 0 is less than the minimum of 1"),
        ({"api": "trainjob", "runtime_kind": "Runtime"}, "invalid TrainingJob.runtime_kind: 'Runtime' is not one of"),
        ({"namespace": "Team A"}, "TrainingJob.namespace 'Team A' is not a namespace name"),
        (
            {"image": "dvgt@sha256:abc"},
            "TrainingJob.image 'dvgt@sha256:abc': the chart takes repository:tag, not a digest",
        ),
        (
            {"checkpoint_uri": "s3://key:secret@bucket/x"},
            "invalid TrainingJob.checkpoint_uri: 's3://key:secret@bucket/x' looks like a secret",
        ),
        ({"data_root": "s3://key:secret@bucket/x"}, "invalid TrainingJob.data_root: 's3://key:secret@bucket/x'"),
        ({"env": {"HF_TOKEN": "hf_abc"}}, "invalid TrainingJob.env: "),
        ({"restart_policy": "Sometimes"}, "invalid TrainingJob.restart_policy: 'Sometimes' is not one of"),
        ({"values": {"replicas": 3}}, "invalid chart value '(top level)' (TrainingJob.values): Additional properties"),
        (
            {"values": {"scheduling": {"minAvailable": 0}}},
            "invalid chart value 'scheduling.minAvailable' (TrainingJob.values): 0 is less",
        ),
    ],
)
def test_invalid_jobs_are_refused_naming_the_field(fields, message):
    with pytest.raises(InvalidJobError) as error:
        TrainingJob(**{"stage": "dvgt1-demo", **fields}).render()
    assert message in str(error.value) and "\n" not in str(error.value)


def test_chart_rules_beyond_the_schema_are_refused_too():
    with pytest.raises(
        InvalidJobError, match=r"job j: helm template j failed: .*scheduling.minAvailable \(4\) is more than"
    ):
        TrainingJob(stage="dvgt1-demo", name="j", nodes=2, values={"scheduling": {"minAvailable": 4}}).render()
    with pytest.raises(
        InvalidJobError,
        match=r"job j: helm template j failed: .*scheduling.minAvailable is a PyTorchJob "
        r"setting",
    ):
        TrainingJob(
            stage="dvgt1-demo", name="j", api="trainjob", nodes=2, values={"scheduling": {"minAvailable": 2}}
        ).render()


def helm_objects(release: str, *sets: str) -> dict:
    """kind -> object of what `helm template RELEASE charts/dvgt --set ...` renders for the job."""
    command = [HELM, "template", release, str(ROOT / "charts" / "dvgt")] + [x for s in sets for x in ("--set", s)]
    docs = yaml.safe_load_all(subprocess.run(command, capture_output=True, text=True, check=True).stdout)
    return {d["kind"]: d for d in docs if d and d["kind"] in ("TrainJob", "TrainingRuntime", "ClusterTrainingRuntime")}


def test_every_stage_renders_the_trainjob_and_runtime_helm_template_renders():
    def both(stage):
        sdk = TrainingJob(
            stage=stage,
            api="trainjob",
            profile="h100-80g",
            nodes=2,
            image="registry.example:5000/dvgt:1.0",
            kueue_queue="team-a",
            kueue_priority_class="high",
            name="parity-job",
        ).objects()
        helm = helm_objects(
            "parity-job",
            f"stage={stage}",
            "api=trainjob",
            "profile=h100-80g",
            "nodes=2",
            "image.registry=",
            "image.repository=registry.example:5000/dvgt",
            "image.tag=1.0",
            "scheduling.kueueQueue=team-a",
            "scheduling.kueuePriorityClass=high",
        )
        return sdk, helm

    with ThreadPoolExecutor(max_workers=2) as pool:
        pairs = list(pool.map(both, CATALOG.stages))
    for stage, (sdk, helm) in zip(CATALOG.stages, pairs):
        assert [o["kind"] for o in sdk] == ["TrainingRuntime", "TrainJob"], stage  # the runtime is created first
        assert sdk == [helm["TrainingRuntime"], helm["TrainJob"]], stage
        labels = sdk[1]["metadata"]["labels"]
        assert (labels["kueue.x-k8s.io/queue-name"], labels["kueue.x-k8s.io/priority-class"]) == ("team-a", "high")
    shared = TrainingJob(
        stage="dvgt1-demo", api="trainjob", name="dvgt1-demo", create_runtime=False, runtime_name="dvgt"
    )
    assert shared.objects() == [load_trainjob(ROOT / "k8s" / "trainjob" / "dvgt1-demo.yaml")]  # the ready manifest


def test_cli_dry_run_of_a_trainjob_is_helm_template(capsys):
    with pytest.raises(SystemExit) as code:
        main(["submit", "--stage", "finetune-nuscenes", "--name", "nusc-bar", "--api", "trainjob", "--dry-run"])
    assert code.value.code == 0
    printed = [d for d in yaml.safe_load_all(capsys.readouterr().out) if d]
    helm = helm_objects("nusc-bar", "stage=finetune-nuscenes", "api=trainjob")
    assert printed == [helm["TrainingRuntime"], helm["TrainJob"]]


def test_cli_dry_run_prints_the_sdk_job(capsys):
    with pytest.raises(SystemExit) as code:
        main(
            [
                "submit",
                "--stage",
                "finetune-nuscenes",
                "--nodes",
                "2",
                "--gpus-per-node",
                "8",
                "--profile",
                "h100-80g",
                "--image",
                "registry.example/dvgt:1.0",
                "--checkpoint-uri",
                "s3://bucket/runs/nusc-1",
                "--s3-secret",
                "dvgt-s3",
                "--set",
                "optim.lr=5e-6",
                "--name",
                "nusc-1",
                "--dry-run",
            ]
        )
    assert code.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert (
        printed
        == TrainingJob(
            stage="finetune-nuscenes",
            nodes=2,
            gpus_per_node=8,
            profile="h100-80g",
            image="registry.example/dvgt:1.0",
            checkpoint_uri="s3://bucket/runs/nusc-1",
            s3_secret="dvgt-s3",
            overrides=["optim.lr=5e-6"],
            name="nusc-1",
        ).render()
    )


def test_cli_refuses_an_invalid_job_in_one_line(capsys):
    with pytest.raises(SystemExit) as code:
        main(["submit", "--stage", "dvgt1-demo", "--profile", "h100", "--dry-run"])
    err = capsys.readouterr().err
    assert (
        code.value.code == 2
        and err.startswith("error: invalid TrainingJob.profile: 'h100' is not one of")
        and err.count("\n") == 1
    )
