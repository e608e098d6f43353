"""`dvgt data check` on the official fixture tree and on broken copies of it, and the trainer refusing a
tree that fails the quick check before it builds the model."""

import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import OFFICIAL_TREE
from PIL import Image
from test_official_data import official_tree_overrides

from dvgt.cli import main
from dvgt.config import load_config
from dvgt.data import format as fmt
from dvgt.data.check import DataCheckError, Target, check_target, present, targets_of_tree
from dvgt.train.exit_codes import REFUSED, for_error


def run_check(capsys, *args) -> tuple[int, str]:
    """(exit code, stdout) of `dvgt data check ARGS`, in this process."""
    with pytest.raises(SystemExit) as done:
        main(["data", "check", *map(str, args)])
    return done.value.code, capsys.readouterr().out


@pytest.fixture
def tree(tmp_path):
    """A copy of the official tree's nuScenes splits to break."""
    shutil.copytree(OFFICIAL_TREE, tmp_path / "tree", ignore=shutil.ignore_patterns("kitti*", "openscene*", "*navsim*"))
    return tmp_path / "tree"


def nuscene_val(root) -> fmt.Table:
    return fmt.read_table(fmt.Tree(root, "nuscene").parquet("val"))


def a_dense_depth_row(table: fmt.Table) -> int:
    """A row that reads align_depth (its use_lidar_proj_depth flag is off)."""
    return int(np.flatnonzero(~table.use_lidar_proj_depth)[0])


def test_the_official_tree_passes_with_its_counts(capsys):
    code, out = run_check(capsys, OFFICIAL_TREE)
    assert code == 0, out
    for path in sorted((OFFICIAL_TREE / fmt.FILTERED_META_DIR).glob("*.parquet")):
        raw = pq.read_table(path)
        dataset, split = path.stem.split("_", 1)
        scenes = len(set(raw.column("scene_id").to_pylist()))
        frames = len(set(zip(raw.column("scene_id").to_pylist(), raw.column("frame_idx").to_pylist())))
        cameras = len(fmt.CAMERAS[dataset])
        line = next(line for line in out.splitlines() if f"│ {dataset} " in line and f" {split} " in line)
        cells = [cell.strip() for cell in line.strip("│ ").split("│")]
        # dataset, split, status, scenes, frames, cameras, rows, images present/missing/unreadable, depths ...
        assert cells == [
            dataset,
            split,
            "ok",
            str(scenes),
            str(frames),
            str(cameras),
            str(raw.num_rows),
            str(raw.num_rows),
            "0",
            "-",
            str(raw.num_rows),
            "0",
            "-",
        ], line


def test_deep_check_of_the_official_split_passes(capsys):
    code, out = run_check(capsys, OFFICIAL_TREE, "--dataset", "nuscene", "--split", "val", "--deep", "--jobs", "2")
    assert code == 0, out
    assert "(deep)" in out and "kitti" not in out


def test_a_deleted_image_is_named(tree, capsys):
    filename = nuscene_val(tree).filename[5].as_py()
    fmt.Tree(tree, "nuscene").image(filename).unlink()
    code, out = run_check(capsys, tree)
    assert code == 1
    assert f"image file '{fmt.Tree(tree, 'nuscene').image(filename)}' is missing" in out
    report = check_target(Target(tree, "nuscene", "val"))
    assert (report.images.present, report.images.missing, report.num_problems) == (report.rows - 1, 1, 1)
    assert check_target(Target(tree, "nuscene", "train")).ok  # the other split keeps its files


def test_a_deleted_depth_is_named_where_the_reader_would_read_it(tree):
    table = nuscene_val(tree)
    row = a_dense_depth_row(table)
    path = fmt.Tree(tree, "nuscene").depth(table.filename[row].as_py(), projected=False)
    path.unlink()
    assert check_target(Target(tree, "nuscene", "val")).problems == [f"depth file '{path}' is missing"]
    assert check_target(Target(tree, "nuscene", "val", projected=True)).ok  # evaluation on LiDAR depth only


def test_a_truncated_parquet_is_named(tree, capsys):
    parquet = fmt.Tree(tree, "nuscene").parquet("val")
    parquet.write_bytes(parquet.read_bytes()[:5000])
    code, out = run_check(capsys, tree)
    assert code == 1
    assert f"cannot read parquet '{parquet}'" in out and "truncated" in out


def test_a_nan_extrinsic_is_named_with_its_row(tree, capsys):
    parquet = fmt.Tree(tree, "nuscene").parquet("val")
    raw = pq.read_table(parquet)
    extrinsics = raw.column("extrinsics").to_pylist()
    extrinsics[7][3] = float("nan")
    pq.write_table(
        raw.set_column(
            raw.column_names.index("extrinsics"), "extrinsics", pa.array(extrinsics, pa.list_(pa.float64()))
        ),
        parquet,
    )
    code, out = run_check(capsys, tree, "--split", "val")
    assert code == 1
    assert f"parquet '{parquet}': column 'extrinsics' holds a non-finite value in row 7" in out


def test_a_depth_png_without_near_far_fails_the_deep_check(tree, capsys):
    table = nuscene_val(tree)
    path = fmt.Tree(tree, "nuscene").depth(table.filename[a_dense_depth_row(table)].as_py(), projected=False)
    Image.fromarray(np.asarray(Image.open(path))).save(path)  # the same codes, the text chunks gone
    assert run_check(capsys, tree, "--split", "val")[0] == 0  # present: the quick check does not open files
    code, out = run_check(capsys, tree, "--split", "val", "--deep")
    assert code == 1
    assert f"depth file '{path}' has no 'near'/'far' text chunks" in out
    report = check_target(Target(tree, "nuscene", "val"), deep=True)
    assert (report.depths.unreadable, report.images.unreadable) == (1, 0)


def test_an_undecodable_image_and_a_skewed_rotation_fail_the_deep_check(tree):
    table = nuscene_val(tree)
    image = fmt.Tree(tree, "nuscene").image(table.filename[3].as_py())
    image.write_bytes(image.read_bytes()[:300])
    parquet = fmt.Tree(tree, "nuscene").parquet("val")
    raw = pq.read_table(parquet)
    poses = raw.column("ego_to_world").to_pylist()
    poses[11][0] *= 1.1  # a scaled first rotation row: finite, not orthonormal
    pq.write_table(
        raw.set_column(raw.column_names.index("ego_to_world"), "ego_to_world", pa.array(poses, pa.list_(pa.float64()))),
        parquet,
    )
    assert check_target(Target(tree, "nuscene", "val")).ok  # both pass the quick check
    report = check_target(Target(tree, "nuscene", "val"), deep=True)
    assert report.images.unreadable == 1 and report.num_problems == 2
    assert any(f"cannot decode image file '{image}'" in p for p in report.problems)
    assert any("column 'ego_to_world' in row 11" in p and "not orthonormal" in p for p in report.problems)


def test_presence_by_listing_agrees_with_stat(tmp_path):
    for name in ("a/b/one.jpg", "a/b/two.jpg", "a/three.jpg", "top.jpg", "a/b/c/four.jpg"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).touch()
    names = ["a/b/one.jpg", "a/b/gone.jpg", "a/three.jpg", "top.jpg", "nope/x.jpg", "a/b/c/four.jpg", "a/b"]
    expected = [(tmp_path / n).is_file() or (tmp_path / n).is_dir() for n in names]
    assert present(tmp_path, pa.array(names)).tolist() == expected == [True, False, True, True, False, True, True]


def test_a_root_without_parquets_is_one_line(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match=r"no nuscene_<split>.parquet under '.*moge_pred_filter_parquet'"):
        targets_of_tree(tmp_path, dataset="nuscene")
    with pytest.raises(SystemExit) as done:
        main(["data", "check", str(tmp_path)])
    error = capsys.readouterr().err
    assert done.value.code == 2 and error.count("\n") == 1 and "no <dataset>_<split>.parquet" in error


def test_the_trainer_refuses_a_broken_root_before_building_the_model(tree, tmp_path, monkeypatch, capsys):
    """data.check (on by default) runs the quick check of the stage's parquets first; the model builder
    is replaced by one that fails the test if the trainer gets that far."""
    from dvgt.train import loop

    filename = nuscene_val(tree).filename[0].as_py()
    fmt.Tree(tree, "nuscene").image(filename).unlink()
    overrides = [o for o in official_tree_overrides(tmp_path / "run") if not o.startswith("data.train.datasets")]
    cfg = load_config(
        "train/dvgt1/default.yaml",
        [*overrides, f"data.root={tree}", "data.train.datasets=[{dataset: nuscene, split: train}]"],
    )
    monkeypatch.setattr(loop, "build_model", lambda *_: pytest.fail("the model was built before the data check"))
    with pytest.raises(
        DataCheckError,
        match=rf"data root '{tree}' fails the data check \(1 problem\(s\) in "
        rf"nuscene_val\), first: image file '.*{filename}.jpg' is missing",
    ):
        loop.train(cfg)
    assert for_error(DataCheckError("x")) == REFUSED  # exit code 2: a restart cannot fix the tree
    code, out = run_check(
        capsys,
        "--config",
        "train/dvgt1/default.yaml",
        *overrides,
        f"data.root={tree}",
        "data.train.datasets=[{dataset: nuscene, split: train}]",
    )
    assert code == 1 and "nuscene_val" not in out and f"{filename}.jpg' is missing" in out
