"""The frozen-feature cache: same losses with and without it, live fallback on a miss (counted in the
log and the metrics), resumable and parallel builds, --verify, refusals (fingerprint, colour jitter,
a backbone not wholly frozen), and a cache on S3 (SeaweedFS)."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import tiny_overrides
from dvgt.checkpoint.storage import open_storage
from dvgt.config import load_config
from dvgt.data.feature_cache import MANIFEST, FeatureCache, FeatureCacheError, commit_name, shard_name
from dvgt.train.feature_cache import build_cache, fill_misses
from dvgt.train.logger import read_log
from dvgt.train.losses import compute_loss
from dvgt.train.loop import Trainer, train

CONFIG = "train/dvgt1/finetune_demo.yaml"  # DVGT-1 with its DINOv3 backbone frozen
DVGT = [sys.executable, "-m", "dvgt"]


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)


def config(data_root: Path, run_dir: Path, **extra):
    return load_config(CONFIG, tiny_overrides(data_root, run_dir, **{"data.train.color_jitter": 0.0, **extra}))


def train_records(run_dir: Path) -> dict:
    return {r["step"]: r for r in read_log(run_dir / "train_log.jsonl") if r["kind"] == "train"}


def shas(uri) -> dict:
    return {s["name"]: s["sha256"] for s in json.loads((Path(uri) / MANIFEST).read_text())["shards"]}


@pytest.fixture(scope="module")
def cache_dir(tiny_data_root, tmp_path_factory) -> Path:
    """A cache of the tiny dataset's first entry, in several shards (small --shard-mb)."""
    out = tmp_path_factory.mktemp("cache") / "cache"
    result = build_cache(config(tiny_data_root, out.parent / "build"), str(out), shard_mb=0.06)
    assert result["num_shards"] >= 3 and sorted(result["built"]) == list(range(result["num_shards"]))
    return out


def test_losses_with_the_cache_equal_losses_without_it_and_misses_fall_back(tiny_data_root, cache_dir, tmp_path):
    """Two datasets: the cached one and the same scenes under another name, which the cache does not
    hold (every image a miss, encoded live). Tolerance: relative 1e-5 on each step's loss (the cached
    tokens come from other batch compositions than the live ones: float32 summation order only)."""
    second = {"data.train.datasets": f"[{{name: synthetic, root: {tiny_data_root}, weight: 1.0, split: train}}, "
                                     f"{{name: uncached, root: {tiny_data_root}, weight: 1.0, split: train}}]",
              "max_epochs": 1, "limit_train_batches": 4, "limit_val_batches": 0}
    live, cached = tmp_path / "live", tmp_path / "cached"
    train(config(tiny_data_root, live, **second))
    # the cached run in its own process, so that its metrics folder holds its counters alone
    overrides = tiny_overrides(tiny_data_root, cached, **{"data.train.color_jitter": 0.0, **second,
                                                          "data.feature_cache": cache_dir, "num_workers": 1})
    done = subprocess.run([*DVGT, "train", f"--config={CONFIG}", *overrides], capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, OMP_NUM_THREADS="2",
                                                PROMETHEUS_MULTIPROC_DIR=str(cached / "metrics")))
    assert done.returncode == 0, done.stderr[-3000:]
    expected, got = train_records(live), train_records(cached)
    assert sorted(got) == sorted(expected) == list(range(1, 5))
    for step in got:
        assert got[step]["loss/objective"] == pytest.approx(expected[step]["loss/objective"], rel=1e-5), step
    hits, misses = sum(r["cache_hits"] for r in got.values()), sum(r["cache_misses"] for r in got.values())
    assert hits > 0 and misses > 0  # both datasets were drawn
    assert all(r["cache_hits"] + r["cache_misses"] == r["images"] for r in got.values())
    assert "cache_hits" not in expected[1]

    from prometheus_client import CollectorRegistry, multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=str(cached / "metrics"))
    samples = {s.name: s.value for metric in registry.collect() for s in metric.samples}
    assert samples["dvgt_feature_cache_hits_total"] == hits
    assert samples["dvgt_feature_cache_misses_total"] == misses


def test_an_interrupted_build_resumes_and_keeps_committed_shards(tiny_data_root, cache_dir, tmp_path):
    out = tmp_path / "cache"
    shutil.copytree(cache_dir, out)
    expected = shas(cache_dir)
    (out / MANIFEST).unlink()  # interrupted: no manifest, shard 0 never written, shard 1 written but damaged,
    (out / shard_name(0)).unlink()  # shard 2 written without its commit record, and a temporary file left behind
    (out / commit_name(0)).unlink()
    (out / shard_name(1)).write_bytes((out / shard_name(1)).read_bytes()[:-10])
    (out / commit_name(2)).unlink()
    (out / f"{shard_name(3)}.tmp-0123abcd").write_bytes(b"partial")
    with pytest.raises(FeatureCacheError, match="not a committed feature cache .*dvgt cache build"):
        FeatureCache(str(out))
    result = build_cache(config(tiny_data_root, tmp_path / "build"), str(out), shard_mb=0.06)
    assert sorted(result["built"]) == [0, 1, 2]
    assert sorted(result["kept"]) == list(range(3, result["num_shards"]))
    assert shas(out) == expected  # the same bytes as an uninterrupted build
    again = build_cache(config(tiny_data_root, tmp_path / "build"), str(out), shard_mb=0.06)
    assert again["built"] == []


def test_two_rank_build_verify_and_a_corrupt_shard_named(tiny_data_root, cache_dir, tmp_path):
    """`dvgt cache build --nproc-per-node 2 --verify` (torchrun, gloo): the ranks share the shards and the
    result is byte-identical to a one-process build; `dvgt cache verify` names a corrupted shard."""
    out = tmp_path / "cache"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    overrides = tiny_overrides(tiny_data_root, tmp_path / "build", **{"data.train.color_jitter": 0.0})
    done = subprocess.run([*DVGT, "cache", "build", f"--config={CONFIG}", "--out", str(out), "--shard-mb=0.06",
                           "--nproc-per-node", "2", "--verify", *overrides],
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "verified:" in done.stdout and "entries recomputed" in done.stdout
    assert shas(out) == shas(cache_dir)
    num_shards = len(shas(out))
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["entries"] == manifest["items"] == 72  # 4 scenes x 6 frames x 3 cameras, one size
    assert f"({(num_shards + 1) // 2} built by this process, 0 kept)" in done.stdout  # rank 0 built its half

    damaged = out / shard_name(1)
    data = bytearray(damaged.read_bytes())
    data[-5] ^= 0xFF
    damaged.write_bytes(bytes(data))
    done = subprocess.run([*DVGT, "cache", "verify", str(out)], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 2
    assert f"{shard_name(1)}: corrupt" in done.stderr and "re-run `dvgt cache build`" in done.stderr
    assert shard_name(0) not in done.stderr


def test_a_cache_of_other_weights_is_refused(tiny_data_root, cache_dir, tmp_path):
    with pytest.raises(FeatureCacheError, match="built for other weights .*dvgt cache build"):
        Trainer(config(tiny_data_root, tmp_path, seed_value=4, **{"data.feature_cache": cache_dir}))  # other init
    with pytest.raises(FeatureCacheError, match=r"no entries for image sizes \(H, W\) \[\(48, 96\)\]"):
        Trainer(config(tiny_data_root, tmp_path, **{"data.feature_cache": cache_dir, "data.train.img_width": 96}))


def test_pixel_augmentation_or_a_partly_frozen_backbone_is_refused(tiny_data_root, cache_dir, tmp_path):
    with pytest.raises(ValueError, match="data.train.color_jitter=0.1 changes the pixels.*set data.train.color_jitter=0"):
        Trainer(config(tiny_data_root, tmp_path, **{"data.feature_cache": cache_dir, "data.train.color_jitter": 0.1}))
    with pytest.raises(ValueError, match="leaves .* parameters trainable .*aggregator.patch_embed"):
        Trainer(config(tiny_data_root, tmp_path, **{"data.feature_cache": cache_dir,
                                                   "optim.frozen_module_names": "[aggregator.patch_embed.blocks.*]"}))


def test_cache_on_s3(tiny_data_root, cache_dir, s3_env, tmp_path):
    """Built on SeaweedFS, verified there, and read by a training run's data workers (ranged GETs)."""
    uri = "s3://ckpt/feature-cache"
    result = build_cache(config(tiny_data_root, tmp_path / "build"), uri, shard_mb=0.06, verify=True)
    assert result["verified"].startswith(f"{result['num_shards']} shards intact")
    manifest = json.loads(open_storage(uri).read_bytes(MANIFEST))
    assert {s["name"]: s["sha256"] for s in manifest["shards"]} == shas(cache_dir)  # the same bytes as on disk
    run = tmp_path / "run"
    train(config(tiny_data_root, run, max_epochs=1, num_workers=1, **{"data.feature_cache": uri}))
    records = train_records(run)
    assert all(r["cache_misses"] == 0 and r["cache_hits"] == r["images"] for r in records.values())


# ---- a cache of the whole frozen aggregator: one entry per clip ------------------------------------------

HEADS_CONFIG = "train/dvgt1/finetune_heads_demo.yaml"  # DVGT-1 with its whole aggregator frozen


def heads_config(data_root: Path, run_dir: Path, **extra):
    return load_config(HEADS_CONFIG, tiny_overrides(data_root, run_dir, **{
        "data.train.color_jitter": 0.0, "data.train.views": "[3,3]", "max_img_per_gpu": 18, **extra}))


@pytest.fixture(scope="module")
def clip_cache_dir(tiny_data_root, tmp_path_factory) -> Path:
    """A clip cache of the tiny dataset: every clip of 2 or 3 frames x all 3 cameras, built with --verify."""
    out = tmp_path_factory.mktemp("clip-cache") / "cache"
    result = build_cache(heads_config(tiny_data_root, out.parent / "build"), str(out), shard_mb=2, verify=True)
    assert result["num_shards"] >= 2 and "entries recomputed" in result["verified"]
    return out


def test_clip_cache_losses_equal_live_ones_and_misses_fall_back(tiny_data_root, clip_cache_dir, tmp_path):
    """As with the backbone: a second, uncached dataset makes whole batches of misses, computed live by the
    frozen aggregator. Tolerance: relative 1e-5 on each step's loss (float32 summation order only)."""
    manifest = json.loads((clip_cache_dir / MANIFEST).read_text())
    assert manifest["part"] == "aggregator" and manifest["layers"] == [0, 1, 2, 3]  # what the tiny model's heads read
    assert manifest["items"] == manifest["entries"] == 4 * (5 + 4)  # 4 scenes of 6 frames: clips of 2 and 3 frames
    second = {"data.train.datasets": f"[{{name: synthetic, root: {tiny_data_root}, weight: 1.0, split: train}}, "
                                     f"{{name: uncached, root: {tiny_data_root}, weight: 1.0, split: train}}]",
              "max_epochs": 1, "limit_train_batches": 5, "limit_val_batches": 0}
    live, cached = tmp_path / "live", tmp_path / "cached"
    train(heads_config(tiny_data_root, live, **second))
    train(heads_config(tiny_data_root, cached, **second, **{"data.feature_cache": clip_cache_dir, "num_workers": 1}))
    expected, got = train_records(live), train_records(cached)
    assert sorted(got) == sorted(expected) == list(range(1, 6))
    for step in got:
        assert got[step]["loss/objective"] == pytest.approx(expected[step]["loss/objective"], rel=1e-5), step
    hits, misses = sum(r["cache_hits"] for r in got.values()), sum(r["cache_misses"] for r in got.values())
    assert hits > 0 and misses > 0
    assert all(r["cache_hits"] + r["cache_misses"] == r["images"] for r in got.values())


def test_clip_cache_fills_the_missing_clips_of_a_batch(tiny_data_root, clip_cache_dir, tmp_path):
    trainer = Trainer(heads_config(tiny_data_root, tmp_path, **{"data.feature_cache": clip_cache_dir}))
    try:
        batch = next(iter(trainer.train_loader))
        B, L = batch["aggregator_tokens"].shape[:2]  # [B, L, T, V, N, D]
        assert batch["aggregator_tokens_hit"].all() and B >= 2 and L == 4
        cached = batch["aggregator_tokens"].clone()
        batch["aggregator_tokens"][1] = 0
        batch["aggregator_tokens_hit"][1] = False
        counts = fill_misses(trainer.cached_part, batch)
        T, V = batch["images"].shape[1:3]
        assert counts == {"cache_hits": (B - 1) * T * V, "cache_misses": T * V}
        assert torch.allclose(batch["aggregator_tokens"], cached, rtol=1e-5, atol=1e-5 * float(cached.abs().max()))
        assert torch.equal(batch["aggregator_tokens"][0], cached[0])
    finally:
        trainer.close()


def test_a_bfloat16_clip_cache_is_half_the_size_and_gives_nearly_the_live_loss(tiny_data_root, clip_cache_dir,
                                                                               tmp_path):
    """--dtype bfloat16: verify allows its rounding (4e-3 of the max), and the loss on cached outputs is the
    live one within a relative 1e-2."""
    out = tmp_path / "bf16"
    result = build_cache(heads_config(tiny_data_root, tmp_path / "build"), str(out), dtype="bfloat16", shard_mb=1,
                         verify=True)
    assert "entries recomputed" in result["verified"]
    manifest, full = (json.loads((root / MANIFEST).read_text()) for root in (out, clip_cache_dir))
    assert manifest["dtype"] == "BF16" and manifest["entries"] == full["entries"]
    sizes = [sum(s["size"] for s in m["shards"]) for m in (manifest, full)]
    assert 0.45 < sizes[0] / sizes[1] < 0.55
    trainer = Trainer(heads_config(tiny_data_root, tmp_path / "run", **{"data.feature_cache": out}))
    try:
        batch = next(iter(trainer.train_loader))
        assert batch["aggregator_tokens"].dtype == torch.bfloat16 and batch["aggregator_tokens_hit"].all()
        live = {k: v for k, v in batch.items() if not k.startswith("aggregator_tokens")}
        with torch.no_grad():
            losses = [compute_loss(trainer.forward(trainer.model, b), b, trainer.cfg.loss)["objective"]
                      for b in (batch, live)]
        assert float(losses[0]) == pytest.approx(float(losses[1]), rel=1e-2)
        assert float(losses[0]) != float(losses[1])  # the rounding shows
    finally:
        trainer.close()


def test_clip_cache_refuses_random_camera_subsets_and_a_trainable_aggregator(tiny_data_root, clip_cache_dir,
                                                                             tmp_path):
    with pytest.raises(FeatureCacheError, match=r"draws 2 of the 3 cameras .*set data.train.views to \[1,1\] or to "
                                                r"the rig's camera count \(\[3,3\]\)"):
        build_cache(heads_config(tiny_data_root, tmp_path, **{"data.train.views": "[2,2]"}), str(tmp_path / "c"))
    with pytest.raises(FeatureCacheError, match="draws 2 of the 3 cameras"):
        Trainer(heads_config(tiny_data_root, tmp_path, **{"data.feature_cache": clip_cache_dir,
                                                          "data.train.views": "[2,2]"}))
    with pytest.raises(ValueError, match=r"cache of the aggregator stores the output of aggregator, so all of it "
                                         r"must be frozen.*optim.frozen_module_names=\[aggregator.\*\]"):
        Trainer(heads_config(tiny_data_root, tmp_path, **{"data.feature_cache": clip_cache_dir,
                                                          "optim.frozen_module_names": "[aggregator.patch_embed.*]"}))


def test_a_backbone_cache_serves_a_run_that_freezes_the_whole_aggregator(tiny_data_root, cache_dir, tmp_path):
    """The cache's manifest says which part it holds: a backbone cache skips only the backbone."""
    trainer = Trainer(heads_config(tiny_data_root, tmp_path, **{"data.feature_cache": cache_dir}))
    try:
        assert trainer.cached_part.kind == "backbone" and trainer.frozen_part.kind == "aggregator"
        batch = next(iter(trainer.train_loader))
        record = trainer.train_step(batch)
        assert record["cache_hits"] == batch["images"].shape[:3].numel() and record["cache_misses"] == 0
    finally:
        trainer.close()


@pytest.mark.parametrize("name", ["dvgt1", "dvgt2_pretrain", "vggt"])
def test_models_take_precomputed_backbone_tokens_or_aggregator_outputs(name):
    """model(images, patch_tokens=backbone(images)) and model(images, aggregator_tokens=<the layers the heads
    read, None elsewhere>) give the outputs of model(images); wrong shapes or layer counts are refused. The
    model's DPT head reads layers 1-3 of 4, so the unread layer 0 is None."""
    from dvgt.models import DVGT1, DVGT2, VGGT, SIZES
    from dvgt.models.aggregator import normalize_images
    from dvgt.train.feature_cache import AGGREGATOR, frozen_part

    torch.manual_seed(0)
    size = dataclasses.replace(SIZES["tiny"], dpt_layers=(1, 2, 2, 3))
    model = {"dvgt1": lambda: DVGT1(size), "dvgt2_pretrain": lambda: DVGT2(size, planning=False),
             "vggt": lambda: VGGT(size)}[name]().eval()
    p = model.patch_size
    images = torch.rand(1, 2, 2, 3, 2 * p, 4 * p)
    part = frozen_part(model, AGGREGATOR)
    assert part.layers == (1, 2, 3) and part.depth == 4
    with torch.no_grad():
        tokens = model.aggregator.patch_embed(normalize_images(images.flatten(0, 2)))  # [4, 8, C]
        outputs = part.outputs(images)  # [1, 3, T, V, N, D]
        layers = [None, *outputs.unbind(1)]
        live = model(images)
        from_tokens = model(images, patch_tokens=tokens.view(1, 2, 2, *tokens.shape[1:]))
        from_outputs = model(images, aggregator_tokens=layers)
    assert torch.equal(live["points"], from_tokens["points"])
    assert torch.equal(live["points"], from_outputs["points"])
    pose = next(k for k in live if k.endswith("pose_enc"))
    assert torch.equal(live[pose], from_outputs[pose])
    with pytest.raises(ValueError, match=r"patch_tokens \[1, 2, 2, 4, .*do not fit images"):
        model(images, patch_tokens=tokens[:, :4].reshape(1, 2, 2, 4, -1))
    with pytest.raises(ValueError, match="aggregator_tokens has 3 layers but the aggregator has 4"):
        model(images, aggregator_tokens=layers[1:])
