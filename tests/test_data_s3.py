"""Data roots on S3 (dvgt/data/remote.py) against a real SeaweedFS server (tests/servers.py): the
official fixture tree uploaded under a prefix yields byte-identical samples and the same training
losses as on local disk, the node-local cache stays within its bound while it evicts (several
processes at once), and a missing bucket or rejected credentials is one line naming the fix."""

import json
import multiprocessing
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from conftest import OFFICIAL_OUTPUTS, OFFICIAL_TREE
from omegaconf import OmegaConf
from test_official_data import official_tree_overrides

from dvgt.checkpoint.storage import StorageError
from dvgt.cli import main as cli_main
from dvgt.config import S3CacheConfig, load_config
from dvgt.data import format as fmt
from dvgt.data.dump import dump_samples
from dvgt.data.remote import NodeCache, open_root
from dvgt.train.logger import read_log
from dvgt.train.loop import train

BUCKET, PREFIX = "dvgt-data", "release/official"
ROOT = f"s3://{BUCKET}/{PREFIX}"
# manifest samples that read every kind of file: nuScenes images and dense depth, KITTI at 10 Hz with
# projected LiDAR depth (train split), and NavSim's scene-filter yaml
SAMPLES = ("samples/geometry_000.npz", "samples/kitti_geometry_train_split_000.npz", "samples/navtrain_000.npz")


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def s3_tree(seaweedfs):
    """The official fixture tree under s3://dvgt-data/release/official, and the AWS variables (the
    same ones checkpoints read) pointing at the server for the module."""
    with pytest.MonkeyPatch.context() as patch:
        for key, value in seaweedfs.env().items():
            patch.setenv(key, value)
        client = seaweedfs.client()
        seaweedfs.make_bucket(BUCKET)
        files = [p for p in OFFICIAL_TREE.rglob("*") if p.is_file()]
        with ThreadPoolExecutor(16) as pool:
            list(
                pool.map(
                    lambda p: client.upload_file(str(p), BUCKET, f"{PREFIX}/{p.relative_to(OFFICIAL_TREE)}"), files
                )
            )
        yield seaweedfs


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    """The official manifest cut down to SAMPLES."""
    data = json.loads((OFFICIAL_OUTPUTS / "samples_manifest.txt").read_text())
    data["samples"] = [s for s in data["samples"] if s["file"] in SAMPLES]
    assert len(data["samples"]) == len(SAMPLES)
    path = tmp_path_factory.mktemp("manifest") / "manifest.json"
    path.write_text(json.dumps(data))
    return path


def test_samples_from_s3_are_byte_identical_to_local_under_a_small_cache(s3_tree, manifest, tmp_path):
    """`dvgt data dump` from s3:// equals the dump from the local tree array by array, byte for byte,
    with a cache bound (600 KB) far below what the samples read (~2.5 MB): files are evicted while
    reading and the cache never ends over its bound."""
    cache = S3CacheConfig(dir=str(tmp_path / "cache"), max_gib=600e3 / 2**30)
    local = list(dump_samples(OFFICIAL_TREE, manifest, tmp_path / "local"))
    remote = list(dump_samples(ROOT, manifest, tmp_path / "s3", s3_cache=cache))
    assert len(local) == len(remote) == len(SAMPLES)
    for name in SAMPLES:
        with np.load(tmp_path / "local" / name) as expected, np.load(tmp_path / "s3" / name) as actual:
            assert sorted(actual.files) == sorted(expected.files), name
            for key in expected.files:
                e, a = expected[key], actual[key]
                assert (e.dtype, e.shape) == (a.dtype, a.shape) and e.tobytes() == a.tobytes(), f"{name}: {key}"
    mirror = tmp_path / "cache" / BUCKET / PREFIX
    assert (mirror / "third_party").is_dir()  # the NavSim scene filter came from the bucket too
    assert 0 < folder_bytes(tmp_path / "cache") <= 600e3
    assert NodeCache(tmp_path / "cache", 600e3).usage() == folder_bytes(mirror)  # the counter is exact


def test_two_training_steps_from_s3_match_the_local_run(s3_tree, tmp_path):
    """The README's two debug steps on the official tree (DVGT-1 tiny, nuScenes + KITTI), once from the
    local tree (in the training process) and once from s3:// with two loader workers sharing a 1 MB
    cache: the same losses (every sample draws from its own seed, whichever process loads it)."""
    losses = {}
    for name, root, workers in (("local", OFFICIAL_TREE, 0), ("s3", ROOT, 2)):
        overrides = official_tree_overrides(tmp_path / name) + [
            f"data.root={root}",
            "limit_val_batches=0",
            f"num_workers={workers}",
            "logging.progress=false",
            f"data.s3_cache.dir={tmp_path / 'cache'}",
            f"data.s3_cache.max_gib={1e6 / 2**30}",
        ]
        train(load_config("train/dvgt1/default.yaml", overrides, debug=True))
        losses[name] = [
            (r["step"], r["loss/objective"])
            for r in read_log(tmp_path / name / "train_log.jsonl")
            if r["kind"] == "train"
        ]
    assert [step for step, _ in losses["local"]] == [1, 2] and all(np.isfinite(v) for _, v in losses["local"])
    assert losses["s3"] == losses["local"]
    assert 0 < folder_bytes(tmp_path / "cache") <= 1e6


def _fill(folder: str, first: int, count: int) -> None:
    cache = NodeCache(folder, 20_000)
    for i in range(first, first + count):
        path = cache.folder / "tree" / f"{i:03d}.bin"
        cache.get(path, lambda temporary, i=i: temporary.write_bytes(bytes([i % 256]) * 1000), str(path))
        try:
            assert path.read_bytes() == bytes([i % 256]) * 1000  # whole ...
        except FileNotFoundError:
            pass  # ... or evicted by another process since (between the exists check and the open, too)


def test_the_cache_holds_its_bound_with_processes_racing_and_keeps_the_recently_read(tmp_path):
    """Four processes put 225 files of 1 kB into a 20 kB cache at once (their paths overlap): the
    files left fit the bound, the size counter matches them, and a file read again just before the
    next eviction survives it while older ones go (least recently used first)."""
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_fill, args=(str(tmp_path), 50 * k, 75)) for k in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
        assert worker.exitcode == 0
    cache = NodeCache(tmp_path, 20_000)
    cached = sorted((tmp_path / "tree").iterdir())
    assert 0 < folder_bytes(tmp_path / "tree") <= 20_000 and cache.usage() == folder_bytes(tmp_path / "tree")
    assert not list((tmp_path / ".tmp").iterdir())  # no temporary download left behind

    kept, older = cached[0], cached[1:]
    os.utime(kept, (0, 0))  # make the others as old, then read `kept` through the cache: now the newest
    for path in older:
        os.utime(path, (1, 1))
    cache.get(kept, lambda temporary: pytest.fail("a hit must not download"), str(kept))
    _fill(str(tmp_path), 1000, 5)  # 5 new files: an eviction of the least recently used
    assert kept.exists() and not all(p.exists() for p in older)
    assert folder_bytes(tmp_path / "tree") <= 20_000


def test_an_object_larger_than_the_cache_is_refused_naming_the_setting(tmp_path):
    cache = NodeCache(tmp_path, 1000)
    path = cache.folder / "big.bin"
    with pytest.raises(StorageError, match=r"raise data.s3_cache.max_gib") as error:
        cache.get(path, lambda temporary: temporary.write_bytes(b"x" * 2000), "s3://b/big.bin")
    assert "\n" not in str(error.value) and not path.exists()


@pytest.mark.parametrize(
    "root, env, message",
    [
        (
            "s3://no-such-bucket/x",
            {},
            r"^data root s3://no-such-bucket/x: the bucket does not exist; create it or fix "
            r"data.root$",
        ),
        (
            ROOT,
            {"AWS_SECRET_ACCESS_KEY": "wrong"},
            r"^data root s3://dvgt-data/release/official: the S3 credentials were "
            r"rejected \(SignatureDoesNotMatch\); check AWS_ACCESS_KEY_ID, "
            r"AWS_SECRET_ACCESS_KEY",
        ),
        (f"s3://{BUCKET}/no-such-prefix", {}, r"holds no object; upload the tree there .* or fix data.root$"),
    ],
    ids=["no-bucket", "wrong-credentials", "empty-prefix"],
)
def test_a_bad_s3_root_is_one_line_naming_the_fix(s3_tree, manifest, tmp_path, monkeypatch, capsys, root, env, message):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(StorageError, match=message):
        open_root(root, S3CacheConfig(dir=str(tmp_path / "cache")))
    monkeypatch.setenv("HOME", str(tmp_path))  # the CLI's default cache folder
    with pytest.raises(SystemExit) as exit:
        cli_main(["data", "dump", root, "--manifest", str(manifest), "--out", str(tmp_path / "out")])
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit.value.code == 2 and len(lines) == 1 and lines[0].startswith(f"error: data root {root}"), lines
    assert not (tmp_path / "out").exists()


def test_a_missing_object_names_its_uri(s3_tree, tmp_path):
    """A tree whose parquet lists an image the bucket lacks: the error names the object and the fix."""
    folder, remote = open_root(ROOT, OmegaConf.structured(S3CacheConfig(dir=str(tmp_path / "cache"))))
    with pytest.raises(OSError, match=rf"^{ROOT}/data_annotation/image/x.jpg does not exist; check data.root"):
        remote.fetch(folder / "data_annotation/image/x.jpg")


def test_data_check_of_an_s3_root_lists_it_and_names_a_missing_object(s3_tree, tmp_path, monkeypatch, capsys):
    """`dvgt data check s3://...` counts what the local check counts (one listing per folder, no
    download of the images); with an image deleted from a copy of the tree it fails naming the
    object's s3:// address; `--deep` decodes through the node cache."""
    from dvgt.data import check

    monkeypatch.setenv("HOME", str(tmp_path))  # the default node cache: ~/.cache/dvgt/data
    local = [
        (r.target.dataset, r.target.split, r.scenes, r.frames, r.rows, r.images, r.depths)
        for r in check.check(check.targets_of_tree(OFFICIAL_TREE))
    ]
    remote = check.check(check.targets_of_tree(ROOT))
    assert all(r.ok for r in remote), [r.problems for r in remote]
    assert [(r.target.dataset, r.target.split, r.scenes, r.frames, r.rows, r.images, r.depths) for r in remote] == local
    cached = {p.name for p in (tmp_path / ".cache/dvgt/data").rglob("*") if p.is_file()}
    assert not any(name.endswith(".jpg") for name in cached)  # presence came from listings

    copy = f"{PREFIX}-broken"
    client = s3_tree.client()
    for path in [p for p in OFFICIAL_TREE.rglob("*") if p.is_file() and "nuscene" in p.as_posix()]:
        client.upload_file(str(path), BUCKET, f"{copy}/{path.relative_to(OFFICIAL_TREE)}")
    tree = fmt.Tree(OFFICIAL_TREE, "nuscene")
    image = tree.image(fmt.read_table(tree.parquet("val")).filename[0].as_py())  # an image the val split reads
    client.delete_object(Bucket=BUCKET, Key=f"{copy}/{image.relative_to(OFFICIAL_TREE)}")
    with pytest.raises(SystemExit) as done:
        cli_main(["data", "check", f"s3://{BUCKET}/{copy}", "--dataset", "nuscene", "--split", "val", "--deep"])
    out = capsys.readouterr().out
    assert done.value.code != 0
    assert f"s3://{BUCKET}/{copy}/{image.relative_to(OFFICIAL_TREE)}" in out.replace("\n", ""), out
