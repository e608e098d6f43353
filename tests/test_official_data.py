"""Fidelity to the official DVGT code: our reader, samples and metrics against what the official code
wrote and returned on a tiny tree (tests/data/official, tolerances of its SPEC.md: atol = rtol = 1e-4),
the synthetic generator's tree through the same reader, training straight from the official tree, and
the errors bad input gets."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import OFFICIAL_OUTPUTS, OFFICIAL_TREE

from dvgt.config import ConfigError, load_config
from dvgt.data import format as fmt
from dvgt.data.dump import dump_samples, score_metric_cases
from dvgt.data.scene_dataset import DatasetSpec, SampleRequest, SceneDataset
from dvgt.data.scenes import Sequence
from dvgt.data.synthetic import generate_synthetic_dataset
from dvgt.train.logger import read_log

ATOL = RTOL = 1e-4  # SPEC.md, "Compare with check_data.py"
MANIFEST = OFFICIAL_OUTPUTS / "samples_manifest.txt"


def assert_same(expected, actual, where: str) -> None:
    """Equal within the SPEC tolerances: same shape, NaN/inf where the official output has them, strings exact."""
    expected, actual = np.asarray(expected), np.asarray(actual)
    assert expected.shape == actual.shape, f"{where}: shape {actual.shape}, expected {expected.shape}"
    if expected.dtype.kind in "USO":
        assert np.array_equal(expected.astype(str), actual.astype(str)), where
        return
    e, a = expected.astype(np.float64), actual.astype(np.float64)
    assert np.array_equal(np.isnan(e), np.isnan(a)) and np.array_equal(np.isinf(e), np.isinf(a)), where
    finite = np.isfinite(e)
    bad = np.abs(e[finite] - a[finite]) > ATOL + RTOL * np.abs(e[finite])
    assert not bad.any(), f"{where}: {bad.sum()} of {bad.size} values differ, max {np.abs(e[finite] - a[finite]).max()}"


@pytest.fixture(scope="module")
def dumped(tmp_path_factory):
    out = tmp_path_factory.mktemp("dump")
    lines = list(dump_samples(OFFICIAL_TREE, MANIFEST, out))
    return out, lines


def test_every_official_sample_is_reproduced(dumped):
    """`dvgt data dump` of the official manifest equals the official dataset's samples, key by key
    (nuScenes geometry and planning clips, a LiDAR-filtered train split, KITTI at 10 Hz, a DVGT-2 window,
    a NavSim navtrain clip, and the evaluation-mode ComposedDataset images)."""
    out, lines = dumped
    entries = json.loads(MANIFEST.read_text())["samples"]
    assert len(lines) == len(entries) == 11
    for entry in entries:
        with np.load(OFFICIAL_OUTPUTS / entry["file"]) as expected, np.load(out / entry["file"]) as actual:
            assert sorted(actual.files) == sorted(expected.files), entry["file"]
            for key in expected.files:
                assert_same(expected[key], actual[key], f"{entry['file']}:{key}")
                if expected[key].dtype.kind not in "USO":
                    assert actual[key].dtype == expected[key].dtype, f"{entry['file']}:{key}"


def test_sequences_match_the_official_lists():
    args = json.loads(MANIFEST.read_text())["constructor_args"]
    for name, config in args.items():
        if "sequence_list" in config:
            dataset = SceneDataset(DatasetSpec.from_official(config, OFFICIAL_TREE))
            assert [s.name for s in dataset.sequences] == config["sequence_list"], name


def test_a_manifest_that_disagrees_with_our_sequences_is_refused(tmp_path):
    manifest = json.loads(MANIFEST.read_text())
    manifest["constructor_args"]["geometry"]["sequence_list"][0] = "nuscene#scene-9999#0#cliplen#4"
    (tmp_path / "manifest.txt").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="manifest config 'geometry': our sequences"):
        list(dump_samples(OFFICIAL_TREE, tmp_path / "manifest.txt", tmp_path / "out"))


def test_every_metric_case_matches_the_official_scores(tmp_path):
    """`dvgt data metrics`: chamfer (per image, exact nearest neighbours), depth AbsRel / delta<1.25 with an
    all-invalid sample (null), pose AUC@5/10/30, trajectory errors with an invalid (-999) prediction."""
    lines = list(score_metric_cases(OFFICIAL_OUTPUTS / "metrics", tmp_path))
    cases = sorted((OFFICIAL_OUTPUTS / "metrics").glob("case_*.json"))
    assert len(lines) == len(cases) == 4
    for case in cases:
        expected, actual = json.loads(case.read_text()), json.loads((tmp_path / case.name).read_text())
        assert sorted(actual) == sorted(expected), case.name
        for key, values in expected.items():
            as_float = [np.nan if v is None else v for v in values]
            assert_same(as_float, [np.nan if v is None else v for v in actual[key]], f"{case.name}:{key}")
        assert (tmp_path / case.with_suffix(".npz").name).is_file()  # the inputs travel with the scores


def test_depth_pngs_decode_as_the_official_reader():
    files = json.loads((OFFICIAL_OUTPUTS / "depth_decode_files.txt").read_text())
    with np.load(OFFICIAL_OUTPUTS / "depth_decode.npz") as expected:
        for key, path in files.items():
            j = key.split("_")[1]
            depth = fmt.read_depth(OFFICIAL_TREE / path)
            assert_same(expected[f"depth_{j}"], depth, path)
            codes, near, far = fmt.encode_depth(depth)  # and our writer gives back the official codes
            assert np.array_equal(codes, expected[f"raw_uint16_{j}"])
            assert (near, far) == pytest.approx((float(expected[f"near_{j}"]), float(expected[f"far_{j}"])), rel=1e-6)


def ego_status_rows():
    """(parquet, scene, frame, camera, expected row) of the official ego-status fixtures."""
    for name in ("ego_status_rows.json", "ego_status_rows_kitti_navtrain.json"):
        for key, row in json.loads((OFFICIAL_OUTPUTS / name).read_text()).items():
            parts = key.split("#")
            parquet, (scene, frame, camera) = ("nuscene_val", parts) if len(parts) == 3 else (parts[0], parts[1:])
            yield parquet, scene, int(frame), camera, row


def test_ego_status_is_built_as_the_official_trainer_feeds_it():
    """[velocity (2), acceleration (2)] x gt_scale_factor, then the dataset's own driving-command one-hot,
    from the first camera's row (nuScenes, KITTI at 10 Hz, NavSim)."""
    datasets = {}
    rows = list(ego_status_rows())
    for parquet, scene, frame, camera, row in rows:
        if parquet not in datasets:
            datasets[parquet] = SceneDataset(
                DatasetSpec(
                    root=OFFICIAL_TREE,
                    parquet=OFFICIAL_TREE / fmt.FILTERED_META_DIR / f"{parquet}.parquet",
                    fixed_aspect_ratio=1.77,
                    image_width=64,
                    gt_scale_factor=0.1,
                    targets=frozenset({"ego_status"}),
                )
            )
        dataset = datasets[parquet]
        assert dataset.cameras[0] == camera  # the first camera supplies the ego status
        clip = Sequence(scene, [s.name for s in dataset.scenes].index(scene), np.array([frame]))
        sample = dataset.build(clip, clip.frames, np.array([]), [0], 1.77, None)
        assert_same(row["ego_status_gt_scale_0.1"], sample["ego_status"][0], f"{parquet}#{scene}#{frame}")
    assert len(rows) == 11 and len(datasets) == 3


def test_a_training_sample_has_the_official_form():
    """Train mode (augmentation on): the same keys, shapes and dtypes as the official train-mode sample of
    the same request; the random draws come from our per-sample seed (SPEC: informative only)."""
    entry = json.loads(MANIFEST.read_text())["informative"][0]
    args = json.loads(MANIFEST.read_text())["constructor_args"][entry["config"]]
    dataset = SceneDataset(DatasetSpec.from_official(args, OFFICIAL_TREE))
    _, views, frames, aspect = entry["index"]
    sample = dataset[SampleRequest(0, views, frames, aspect, seed=1234)]
    with np.load(OFFICIAL_OUTPUTS / entry["file"]) as expected:
        for key in expected.files:
            assert np.asarray(sample[key]).shape == expected[key].shape, key
        again = dataset[SampleRequest(0, views, frames, aspect, seed=1234)]
        assert np.array_equal(sample["images"], again["images"])  # a seed gives the same sample
        assert set(sample) - set(expected.files) == {"filenames"}


def test_the_generator_tree_reads_and_dumps_like_an_official_one(tmp_path):
    """The synthetic tree is in the official format: the reader takes it, and `dvgt data dump` with a
    manifest of the official form gives every official key for it."""
    generate_synthetic_dataset(tmp_path, "val", num_scenes=1, num_frames=6, height=48, width=96)
    table = pq.read_table(tmp_path / fmt.FILTERED_META_DIR / "demo_val.parquet")
    assert set(fmt.REQUIRED_COLUMNS) | set(fmt.OPTIONAL_COLUMNS) == set(table.column_names)
    official = json.loads(MANIFEST.read_text())
    args = {
        **official["constructor_args"]["geometry"],
        "image_width": 64,
        "fixed_num_frames": 3,
        "parquet_path": f"{fmt.FILTERED_META_DIR}/demo_val.parquet",
    }
    for key in ("len", "sequence_list"):
        args.pop(key)
    manifest = {
        "constructor_args": {"demo": args},
        "samples": [
            {"file": "samples/demo_001.npz", "config": "demo", "index": 1, "keys": official["samples"][2]["keys"]}
        ],
    }
    (tmp_path / "manifest.txt").write_text(json.dumps(manifest))
    list(dump_samples(tmp_path, tmp_path / "manifest.txt", tmp_path / "out"))
    with np.load(tmp_path / "out/samples/demo_001.npz") as sample:
        assert sorted(sample.files) == sorted(official["samples"][2]["keys"])
        assert str(sample["seq_name"]) == "demo#synthetic-val-0000#1#cliplen#3"
        assert sample["images"].shape == (3, 8, 32, 64, 3) and list(sample["cam_types"])[0] == "FRONT"
        assert sample["point_masks"].mean() > 0.5  # exact depth: everything but the sky


def test_a_stage_trains_two_debug_steps_on_the_official_tree(tmp_path):
    """The README's command: DVGT-1 (tiny) straight on the official tree, nuScenes and KITTI mixed."""
    command = [
        sys.executable,
        "-m",
        "dvgt",
        "train",
        "--config=train/dvgt1/default.yaml",
        "--debug",
        *official_tree_overrides(tmp_path),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    log = read_log(tmp_path / "train_log.jsonl")
    train = [r for r in log if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2] and all(np.isfinite(r["loss/objective"]) for r in train)
    evaluation = [r for r in log if r["kind"] == "eval"][-1]
    assert 0 < evaluation["val/nuscene/ego_first_chamfer"] < 1000 and "val/nuscene/ego_n_Abs Rel" in evaluation


def official_tree_overrides(run_dir: Path) -> list:
    """What README.md passes to train on the official fixture tree (kept in one place for the tests)."""
    return [
        f"data.root={OFFICIAL_TREE}",
        "model.size=tiny",
        "max_epochs=1",
        "limit_train_batches=2",
        "max_img_per_gpu=12",
        "data.train.views=[2,3]",
        "data.train.img_width=128",
        "data.val.img_width=128",
        "data.val.fixed_num_frames=2",
        "data.train.datasets=[{dataset: nuscene, split: train}, {dataset: kitti, split: train, original_fps: 10}]",
        "data.val.datasets=[{dataset: nuscene, split: val, fixed_aspect_ratio: 1.77}]",
        f"logging.log_dir={run_dir}",
        f"checkpoint.uri={run_dir}/ckpts",
    ]


# --------------------------------------------------------------------------------------------
# Bad input: one line naming the file and the fix
# --------------------------------------------------------------------------------------------


@pytest.fixture
def tree_copy(tmp_path):
    """A copy of the official tree's nuScenes val split (parquet, images, depths) to break."""
    shutil.copytree(OFFICIAL_TREE, tmp_path / "tree", ignore=shutil.ignore_patterns("kitti*", "openscene*", "*navsim*"))
    return tmp_path / "tree"


def nuscene_val(root, **changes) -> SceneDataset:
    spec = DatasetSpec(
        root=root,
        parquet=fmt.Tree(root, "nuscene").parquet("val"),
        clip_split="DVGT1",
        fixed_num_frames=2,
        fixed_aspect_ratio=1.77,
        image_width=96,
        **changes,
    )
    return SceneDataset(spec)


def first_filename(root) -> str:
    return fmt.read_table(fmt.Tree(root, "nuscene").parquet("val")).filename[0].as_py()


def test_a_missing_image_names_the_file(tree_copy):
    fmt.Tree(tree_copy, "nuscene").image(first_filename(tree_copy)).unlink()
    dataset = nuscene_val(tree_copy)
    with pytest.raises(fmt.DataFileError, match=r"image file '.*\.jpg' is missing; restore it"):
        dataset[0]


def test_a_missing_depth_names_the_file(tree_copy):
    dataset = nuscene_val(tree_copy)
    row = int(dataset.scenes[0].rows[0, 0])
    fmt.Tree(tree_copy, "nuscene").depth(dataset.table.filename[row].as_py(), projected=False).unlink()
    with pytest.raises(fmt.DataFileError, match=r"depth file '.*align_depth.*\.png' is missing"):
        dataset[0]


def test_a_depth_png_without_near_far_is_refused(tree_copy):
    from PIL import Image

    dataset = nuscene_val(tree_copy)
    path = fmt.Tree(tree_copy, "nuscene").depth(
        dataset.table.filename[int(dataset.scenes[0].rows[0, 0])].as_py(), projected=False
    )
    Image.fromarray(np.asarray(Image.open(path))).save(path)  # the same codes, the text chunks gone
    with pytest.raises(fmt.DataFileError, match="has no 'near'/'far' text chunks.*regenerate it"):
        dataset[0]


def test_a_truncated_parquet_names_the_file(tree_copy):
    parquet = fmt.Tree(tree_copy, "nuscene").parquet("val")
    parquet.write_bytes(parquet.read_bytes()[:5000])
    with pytest.raises(fmt.DataFileError, match=r"cannot read parquet '.*nuscene_val.parquet'.*truncated"):
        nuscene_val(tree_copy)


def test_a_frame_without_one_of_its_cameras_is_named(tree_copy):
    parquet = fmt.Tree(tree_copy, "nuscene").parquet("val")
    table = pq.read_table(parquet)
    pq.write_table(table.slice(1), parquet)  # drop one row
    with pytest.raises(ValueError, match=r"scene 'scene-\d+' frame \d+ has no row for camera 'CAM_\w+'"):
        nuscene_val(tree_copy)


def test_unknown_dataset_and_missing_split_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="dataset 'nuscenes' is not an official dataset name.*nuscene"):
        load_config("train/dvgt1/demo.yaml", ["data.train.datasets.0.dataset=nuscenes"])
    with pytest.raises(
        FileNotFoundError,
        match=r"parquet '.*nuscene_trian.parquet' does not exist; fix "
        r"data.train.datasets\[0\]",
    ):
        SceneDataset(
            DatasetSpec(root=OFFICIAL_TREE, parquet=fmt.Tree(OFFICIAL_TREE, "nuscene").parquet("trian")),
            config_key="data.train.datasets[0]",
        )


def test_a_root_in_the_former_layout_is_refused(tmp_path):
    """dvgt's former per-scene tables (columns scene, frame_index, camera, image_path) are named as such."""
    parquet = fmt.Tree(tmp_path, "nuscene").parquet("val")
    parquet.parent.mkdir(parents=True)
    pq.write_table(
        pq.read_table(fmt.Tree(OFFICIAL_TREE, "nuscene").parquet("val")).rename_columns(
            [
                "scene",
                "frame_index",
                "camera",
                "image_path",
                *pq.read_table(fmt.Tree(OFFICIAL_TREE, "nuscene").parquet("val")).column_names[4:],
            ]
        ),
        parquet,
    )
    with pytest.raises(ValueError, match="former per-scene layout, which is gone"):
        nuscene_val(tmp_path)


def test_cli_errors_are_one_line(tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "dvgt",
            "data",
            "dump",
            str(tmp_path),
            "--manifest",
            str(MANIFEST),
            "--out",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "does not exist" in done.stderr


def test_ego_status_of_a_mix_with_several_command_orders_is_refused():
    with pytest.raises(ConfigError, match="several orders"):
        load_config(
            "train/dvgt2/default_finetune_nuscenes.yaml",
            ["data.train.datasets=[{dataset: nuscene, split: train}, {dataset: openscene, split: navtrain}]"],
        )


def test_eval_mode_and_training_transforms_agree_on_an_unaugmented_view():
    """A training sample without augmentation is the evaluation sample of the same clip and cameras."""
    spec = DatasetSpec.from_official(json.loads(MANIFEST.read_text())["constructor_args"]["geometry"], OFFICIAL_TREE)
    evaluation = SceneDataset(spec)
    sample = evaluation[0]
    clip = evaluation.sequences[0]
    again = evaluation.build(clip, clip.frames, np.array([]), list(range(6)), 1.77, None)
    assert np.array_equal(sample["images"], again["images"]) and torch.equal(
        torch.from_numpy(sample["points_in_ego_first"]), torch.from_numpy(again["points_in_ego_first"])
    )
