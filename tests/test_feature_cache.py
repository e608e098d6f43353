"""The frozen-feature cache on official-format demo trees: the items it enumerates are every image and clip
the sampler can draw, losses with the cache equal losses without it, misses fall back to live computation
(counted in the log and the metrics), builds resume and run on several ranks, --verify and `dvgt cache
verify` catch damage, and a cache of other weights, sizes, pixel augmentation, random camera subsets or a
partly frozen part is refused; a cache on S3 (SeaweedFS) serves a training run."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dvgt.checkpoint.storage import open_storage
from dvgt.config import load_config
from dvgt.data.feature_cache import (
    MANIFEST,
    FeatureCache,
    FeatureCacheError,
    cache_items,
    clip_id,
    commit_name,
    image_id,
    shard_name,
)
from dvgt.data.loader import collate, open_datasets, train_sampler
from dvgt.data.sampler import TrainIndex
from dvgt.data.scene_dataset import SampleRequest
from dvgt.data.synthetic import RIG, generate_synthetic_dataset
from dvgt.families import get, sample_targets
from dvgt.train.feature_cache import build_cache, fill_misses
from dvgt.train.logger import read_log
from dvgt.train.loop import Trainer, train

CONFIG = "train/dvgt1/finetune_demo.yaml"  # DVGT-1 with its DINOv3 backbone frozen, no pixel augmentation
HEADS_CONFIG = "train/dvgt1/finetune_heads_demo.yaml"  # DVGT-1 with its whole aggregator frozen
DVGT = [sys.executable, "-m", "dvgt"]
SCENES, FRAMES, CAMERAS = 2, 4, len(RIG)  # the cached split (demo/train); demo/extra is one more scene, never cached
BOTH_SPLITS = "[{dataset: demo, split: train}, {dataset: demo, split: extra}]"
pytestmark = pytest.mark.torch_threads(2)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    """An official tree of the demo dataset: splits train (cached) and extra (not), 48 x 96 images."""
    root = tmp_path_factory.mktemp("demo-tree")
    generate_synthetic_dataset(root, "train", num_scenes=SCENES, num_frames=FRAMES, height=48, width=96, seed=0)
    generate_synthetic_dataset(root, "extra", num_scenes=1, num_frames=FRAMES, height=48, width=96, seed=1)
    return root


def overrides(data_root: Path, run_dir: Path, **extra) -> list:
    """A stage shrunk to the tiny model, 32 x 64 images, a few steps and no evaluation, writing under run_dir."""
    values = {
        "model.size": "tiny",
        "data.root": data_root,
        "max_epochs": 1,
        "limit_train_batches": 3,
        "limit_val_batches": 0,
        "max_img_per_gpu": 8,
        "num_workers": 0,
        "seed_value": 3,
        "data.train.img_width": 64,
        "logging.log_dir": run_dir,
        "logging.log_freq": 1,
        "logging.progress": "false",
        "checkpoint.uri": run_dir / "ckpts",
        "data.persistent_workers": "false",
        **extra,
    }
    return [f"{k}={v}" for k, v in values.items()]


def config(data_root: Path, run_dir: Path, **extra):
    return load_config(CONFIG, overrides(data_root, run_dir, **extra))


def heads_config(data_root: Path, run_dir: Path, **extra):
    """All cameras in order (fixed_num_views), 2 or 3 frames (max_img_per_gpu 24 // 8 cameras): 2 clip lengths."""
    return load_config(
        HEADS_CONFIG,
        overrides(data_root, run_dir, **{"data.train.fixed_num_frames": 0, "max_img_per_gpu": 24, **extra}),
    )


def train_records(run_dir: Path) -> dict:
    return {r["step"]: r for r in read_log(run_dir / "train_log.jsonl") if r["kind"] == "train"}


def shas(uri) -> dict:
    return {s["name"]: s["sha256"] for s in json.loads((Path(uri) / MANIFEST).read_text())["shards"]}


def assert_same_losses(live: Path, cached: Path, steps: int) -> tuple:
    """Each step's loss within a relative 1e-5 (the cached outputs come from other batch compositions than
    the live ones: float32 summation order only); returns (hits, misses) of the cached run."""
    expected, got = train_records(live), train_records(cached)
    assert sorted(got) == sorted(expected) == list(range(1, steps + 1))
    for step in got:
        assert got[step]["loss/objective"] == pytest.approx(expected[step]["loss/objective"], rel=1e-5), step
    assert all(r["cache_hits"] + r["cache_misses"] == r["images"] for r in got.values())
    assert "cache_hits" not in expected[1]
    return sum(r["cache_hits"] for r in got.values()), sum(r["cache_misses"] for r in got.values())


def items_of(cfg, part: str):
    """(datasets, sampler, cache items) of a config's training split."""
    datasets = open_datasets(
        cfg.data,
        "train",
        patch_size=16,
        gt_scale_factor=cfg.gt_scale_factor,
        targets=sample_targets(cfg.model, evaluation=False),
    )
    sampler = train_sampler(cfg.data.train, datasets, max_img_per_gpu=cfg.max_img_per_gpu, steps_per_epoch=12)
    return datasets, sampler, cache_items(part, sampler, cfg.data.train)


# ---- what is cached ------------------------------------------------------------------------------------


def test_items_are_every_image_and_every_clip_the_sampler_can_draw(data_root, tmp_path):
    """Images: every camera of every frame at the target rate, each once although DVGT2 windows overlap.
    Clips: every start of every frame count the sampler allows, future frames kept free, one clip per camera
    with views [1, 1]; and every clip the sampler and dataset actually draw is among them."""
    _, _, images = items_of(
        config(data_root, tmp_path, **{"data.train.clip_split": "DVGT2", "data.train.fixed_num_frames": 2}), "backbone"
    )
    images = {item.id for item in images}  # a list without repeats
    assert len(images) == SCENES * FRAMES * CAMERAS
    _, _, every_other = items_of(config(data_root, tmp_path, **{"data.train.datasets.0.original_fps": 4}), "backbone")
    assert len(every_other) == SCENES * (FRAMES // 2) * CAMERAS  # 4 Hz stored, 2 Hz drawn: every other frame

    _, _, clips = items_of(heads_config(data_root, tmp_path), "aggregator")
    assert len(clips) == SCENES * sum(FRAMES - frames + 1 for frames in (2, 3))
    assert {(item.frames, item.views) for item in clips} == {(2, CAMERAS), (3, CAMERAS)}
    _, _, clips = items_of(heads_config(data_root, tmp_path, **{"data.train.future_frames": 1}), "aggregator")
    assert len(clips) == SCENES * sum(FRAMES - (frames + 1) + 1 for frames in (2, 3))

    single = heads_config(
        data_root, tmp_path, **{"data.train.fixed_num_views": 0, "data.train.views": "[1,1]", "max_img_per_gpu": 3}
    )
    datasets, sampler, clips = items_of(single, "aggregator")
    assert len(clips) == SCENES * sum(FRAMES - frames + 1 for frames in (2, 3)) * CAMERAS
    ids = {item.id for item in clips}
    drawn = [datasets[i.dataset][i.request] for step in range(12) for i in sampler.batch(0, step)]
    assert {len(s["filenames"]) for s in drawn} == {2, 3}  # both frame counts were drawn
    for sample in drawn:
        assert clip_id("demo", "train", sample["filenames"], len(sample["filenames"]), 1) in ids
        assert all(image_id("demo", "train", name) in images for name in sample["filenames"])


# ---- a cache of the backbone: one entry per image ------------------------------------------------------


@pytest.fixture(scope="module")
def cache_dir(data_root, tmp_path_factory) -> Path:
    """A backbone cache of demo/train, in several shards (small --shard-mb)."""
    out = tmp_path_factory.mktemp("cache") / "cache"
    result = build_cache(config(data_root, out.parent / "build"), str(out), shard_mb=0.02)
    assert result["num_shards"] >= 4 and sorted(result["built"]) == list(range(result["num_shards"]))
    return out


def test_losses_with_the_cache_equal_losses_without_it_and_misses_fall_back(data_root, cache_dir, tmp_path):
    """Two datasets: the cached demo/train and demo/extra, which the cache does not hold (every image a miss,
    encoded live). The cached run goes in its own process, so that its metrics folder holds its counters
    alone, and reads the cache in a DataLoader worker."""
    both = {"data.train.datasets": BOTH_SPLITS, "limit_train_batches": 4}
    live, cached = tmp_path / "live", tmp_path / "cached"
    train(config(data_root, live, **both))
    done = subprocess.run(
        [
            *DVGT,
            "train",
            f"--config={CONFIG}",
            *overrides(data_root, cached, **both, **{"data.feature_cache": cache_dir, "num_workers": 1}),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, OMP_NUM_THREADS="2", PROMETHEUS_MULTIPROC_DIR=str(cached / "metrics")),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    hits, misses = assert_same_losses(live, cached, steps=4)
    assert hits > 0 and misses > 0  # both datasets were drawn

    from prometheus_client import CollectorRegistry, multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=str(cached / "metrics"))
    samples = {s.name: s.value for metric in registry.collect() for s in metric.samples}
    assert samples["dvgt_feature_cache_hits_total"] == hits
    assert samples["dvgt_feature_cache_misses_total"] == misses


def test_an_interrupted_build_resumes_and_keeps_committed_shards(data_root, cache_dir, tmp_path):
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
    result = build_cache(config(data_root, tmp_path / "build"), str(out), shard_mb=0.02)
    assert sorted(result["built"]) == [0, 1, 2]
    assert sorted(result["kept"]) == list(range(3, result["num_shards"]))
    assert shas(out) == expected  # the same bytes as an uninterrupted build
    assert build_cache(config(data_root, tmp_path / "build"), str(out), shard_mb=0.02)["built"] == []


def test_two_rank_build_verify_and_a_corrupt_shard_named(data_root, cache_dir, tmp_path):
    """`dvgt cache build --nproc-per-node 2 --verify` (torchrun, gloo): the ranks share the shards and the
    result is byte-identical to a one-process build; `dvgt cache verify` names a corrupted shard."""
    out = tmp_path / "cache"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(
        [
            *DVGT,
            "cache",
            "build",
            f"--config={CONFIG}",
            "--out",
            str(out),
            "--shard-mb=0.02",
            "--nproc-per-node",
            "2",
            "--verify",
            *overrides(data_root, tmp_path / "build"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "verified:" in done.stdout and "entries recomputed" in done.stdout
    assert shas(out) == shas(cache_dir)
    num_shards = len(shas(out))
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["entries"] == manifest["items"] == SCENES * FRAMES * CAMERAS  # one size (aspect 2.0)
    assert manifest["datasets"] == [{"name": "demo", "split": "train", "root": str(data_root), "sizes": [[32, 64]]}]
    assert f"({(num_shards + 1) // 2} built by this process, 0 kept)" in done.stdout  # rank 0 built its half

    damaged = out / shard_name(1)
    data = bytearray(damaged.read_bytes())
    data[-5] ^= 0xFF
    damaged.write_bytes(bytes(data))
    done = subprocess.run([*DVGT, "cache", "verify", str(out)], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 2
    assert f"{shard_name(1)}: corrupt" in done.stderr and "re-run `dvgt cache build`" in done.stderr
    assert shard_name(0) not in done.stderr


def test_a_cache_of_other_weights_or_sizes_is_refused(data_root, cache_dir, tmp_path):
    with pytest.raises(FeatureCacheError, match="built for other weights .*dvgt cache build"):
        Trainer(config(data_root, tmp_path, seed_value=4, **{"data.feature_cache": cache_dir}))  # other init
    with pytest.raises(FeatureCacheError, match=r"no entries of demo/train for image sizes \(H, W\) \[\(48, 96\)\]"):
        Trainer(config(data_root, tmp_path, **{"data.feature_cache": cache_dir, "data.train.img_width": 96}))


def test_pixel_augmentation_or_a_partly_frozen_backbone_is_refused(data_root, cache_dir, tmp_path):
    augmented = {
        "data.train.aug_pixel_aspect_range": "[0.8,1.0]",
        "data.train.random_resize": "true",
        "data.train.color_jitter.enabled": "true",
    }
    with pytest.raises(
        ValueError,
        match=r"pixel augmentation is on in data.train \(data.train.aug_pixel_aspect_range, "
        r"data.train.random_resize, data.train.color_jitter.enabled\).* set "
        r"data.train.aug_pixel_aspect_range=null data.train.random_resize=false "
        r"data.train.color_jitter.enabled=false$",
    ):
        Trainer(config(data_root, tmp_path, **{"data.feature_cache": cache_dir, **augmented}))
    with pytest.raises(ValueError, match=r"\(data.train.random_resize\).* set data.train.random_resize=false$"):
        build_cache(config(data_root, tmp_path, **{"data.train.random_resize": "true"}), str(tmp_path / "c"))
    with pytest.raises(ValueError, match="leaves .* parameters trainable .*aggregator.patch_embed"):
        Trainer(
            config(
                data_root,
                tmp_path,
                **{"data.feature_cache": cache_dir, "optim.frozen_module_names": "[aggregator.patch_embed.blocks.*]"},
            )
        )


def test_cache_on_s3(data_root, cache_dir, s3_env, tmp_path):
    """Built on SeaweedFS, verified there, and read by a training run's data worker (ranged GETs)."""
    uri = "s3://ckpt/feature-cache"
    result = build_cache(config(data_root, tmp_path / "build"), uri, shard_mb=0.02, verify=True)
    assert result["verified"].startswith(f"{result['num_shards']} shards intact")
    manifest = json.loads(open_storage(uri).read_bytes(MANIFEST))
    assert {s["name"]: s["sha256"] for s in manifest["shards"]} == shas(cache_dir)  # the same bytes as on disk
    run = tmp_path / "run"
    train(config(data_root, run, num_workers=1, limit_train_batches=2, **{"data.feature_cache": uri}))
    records = train_records(run)
    assert records and all(r["cache_misses"] == 0 and r["cache_hits"] == r["images"] for r in records.values())


def test_a_dvgt2_stage_builds_its_cache_before_its_anchors_exist(data_root, tmp_path):
    """DVGT-2's planning anchors play no part in the backbone: `dvgt cache build` needs none (training makes
    or reads them)."""
    cfg = load_config(
        "train/dvgt2/finetune_demo.yaml",
        overrides(
            data_root,
            tmp_path / "build",
            **{"model.anchor_dir": tmp_path / "no-anchors", "data.train.future_frames": 0},
        ),
    )
    result = build_cache(cfg, str(tmp_path / "cache"), shard_mb=0.02, verify=True)
    assert not (tmp_path / "no-anchors").exists()
    assert result["items"] == SCENES * FRAMES * CAMERAS and "entries recomputed" in result["verified"]
    assert json.loads((tmp_path / "cache" / MANIFEST).read_text())["fingerprint"]["parts"]["model"] == "dvgt2/tiny"


# ---- a cache of the whole frozen aggregator: one entry per clip ------------------------------------------


@pytest.fixture(scope="module")
def clip_cache_dir(data_root, tmp_path_factory) -> Path:
    """A clip cache of demo/train: every clip of 2 or 3 frames x all 8 cameras, built with --verify."""
    out = tmp_path_factory.mktemp("clip-cache") / "cache"
    result = build_cache(heads_config(data_root, out.parent / "build"), str(out), shard_mb=2, verify=True)
    assert result["num_shards"] >= 2 and "entries recomputed" in result["verified"]
    return out


def test_clip_cache_losses_equal_live_ones_and_misses_fall_back(data_root, clip_cache_dir, tmp_path):
    """As with the backbone: the uncached demo/extra makes whole batches of misses, computed live by the
    frozen aggregator."""
    manifest = json.loads((clip_cache_dir / MANIFEST).read_text())
    assert manifest["part"] == "aggregator" and manifest["layers"] == [0, 1, 2, 3]  # what the tiny model's heads read
    assert manifest["items"] == manifest["entries"] == SCENES * sum(FRAMES - frames + 1 for frames in (2, 3))
    both = {"data.train.datasets": BOTH_SPLITS, "limit_train_batches": 4}
    live, cached = tmp_path / "live", tmp_path / "cached"
    train(heads_config(data_root, live, **both))
    train(heads_config(data_root, cached, **both, **{"data.feature_cache": clip_cache_dir, "num_workers": 1}))
    hits, misses = assert_same_losses(live, cached, steps=4)
    assert hits > 0 and misses > 0


def two_clips(trainer: Trainer, frames: int = 2) -> dict:
    """A batch of two clips of demo/train at 32 x 64 (all cameras), through the trainer's cached dataset."""
    served = trainer.train_loader.dataset
    return collate([served[TrainIndex(0, SampleRequest(0, CAMERAS, frames, 2.0, seed))] for seed in (1, 2)])


def test_clip_cache_fills_the_missing_clips_of_a_batch(data_root, clip_cache_dir, tmp_path):
    trainer = Trainer(heads_config(data_root, tmp_path, **{"data.feature_cache": clip_cache_dir}))
    try:
        batch = two_clips(trainer)
        assert batch["aggregator_tokens"].shape[:2] == (2, 4) and batch["aggregator_tokens_hit"].all()  # [B, L, ...]
        cached = batch["aggregator_tokens"].clone()
        batch["aggregator_tokens"][1] = 0
        batch["aggregator_tokens_hit"][1] = False
        counts = fill_misses(trainer.cached_part, batch)
        assert counts == {"cache_hits": 2 * CAMERAS, "cache_misses": 2 * CAMERAS}
        assert torch.allclose(batch["aggregator_tokens"], cached, rtol=1e-5, atol=1e-5 * float(cached.abs().max()))
        assert torch.equal(batch["aggregator_tokens"][0], cached[0])
    finally:
        trainer.close()


def test_a_bfloat16_clip_cache_is_half_the_size_and_gives_nearly_the_live_loss(data_root, clip_cache_dir, tmp_path):
    """--dtype bfloat16: verify allows its rounding (4e-3 of the max), and the loss on cached outputs is the
    live one within a relative 1e-2."""
    out = tmp_path / "bf16"
    result = build_cache(
        heads_config(data_root, tmp_path / "build"), str(out), dtype="bfloat16", shard_mb=1, verify=True
    )
    assert "entries recomputed" in result["verified"]
    manifest, full = (json.loads((root / MANIFEST).read_text()) for root in (out, clip_cache_dir))
    assert manifest["dtype"] == "BF16" and manifest["entries"] == full["entries"]
    sizes = [sum(s["size"] for s in m["shards"]) for m in (manifest, full)]
    assert 0.45 < sizes[0] / sizes[1] < 0.55
    trainer = Trainer(heads_config(data_root, tmp_path / "run", **{"data.feature_cache": out}))
    try:
        batch = two_clips(trainer, frames=3)
        assert batch["aggregator_tokens"].dtype == torch.bfloat16 and batch["aggregator_tokens_hit"].all()
        live = {k: v for k, v in batch.items() if not k.startswith("aggregator_tokens")}
        with torch.no_grad():
            losses = [trainer.loss(trainer.forward(trainer.model, b), b)["objective"] for b in (batch, live)]
        assert float(losses[0]) == pytest.approx(float(losses[1]), rel=1e-2)
        assert float(losses[0]) != float(losses[1])  # the rounding shows
    finally:
        trainer.close()


def test_clip_cache_refuses_random_camera_subsets_and_a_trainable_aggregator(data_root, clip_cache_dir, tmp_path):
    random_cameras = {"data.train.fixed_num_views": 0, "data.train.views": "[2,3]"}
    with pytest.raises(
        FeatureCacheError,
        match=r"data.train.views=\[2, 3\] with data.train.fixed_num_views=0 draws a "
        r"random subset .*set data.train.fixed_num_views to the rig's camera "
        r"count .* or data.train.views=\[1,1\]",
    ):
        build_cache(heads_config(data_root, tmp_path, **random_cameras), str(tmp_path / "c"))
    with pytest.raises(FeatureCacheError, match="draws a random subset"):
        Trainer(heads_config(data_root, tmp_path, **{"data.feature_cache": clip_cache_dir, **random_cameras}))
    with pytest.raises(
        ValueError,
        match=r"cache of the aggregator stores the output of aggregator, so all of it "
        r"must be frozen.*optim.frozen_module_names=\[aggregator.\*\]",
    ):
        Trainer(
            heads_config(
                data_root,
                tmp_path,
                **{"data.feature_cache": clip_cache_dir, "optim.frozen_module_names": "[aggregator.patch_embed.*]"},
            )
        )


def test_a_backbone_cache_serves_a_run_that_freezes_the_whole_aggregator(data_root, cache_dir, tmp_path):
    """The cache's manifest says which part it holds: a backbone cache skips only the backbone."""
    trainer = Trainer(heads_config(data_root, tmp_path, **{"data.feature_cache": cache_dir}))
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
    from dvgt.models import DVGT1, DVGT2, SIZES, VGGT
    from dvgt.models.aggregator import normalize_images
    from dvgt.train.feature_cache import AGGREGATOR, frozen_part

    torch.manual_seed(0)
    size = dataclasses.replace(SIZES["tiny"], dpt_layers=(1, 2, 2, 3))
    model = {
        "dvgt1": lambda: DVGT1(size),
        "dvgt2_pretrain": lambda: DVGT2(size, planning=False),
        "vggt": lambda: VGGT(size),
    }[name]().eval()
    p = model.patch_size
    images = torch.rand(1, 2, 2, 3, 2 * p, 4 * p)
    part = frozen_part(model, AGGREGATOR, get(name).cacheable_parts)
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
