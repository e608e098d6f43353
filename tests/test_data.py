"""Data: layout reader/writer, synthetic generator geometry, clip dataset, grouped sampler, loader."""

import math
import shutil
from types import SimpleNamespace

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from omegaconf import OmegaConf

from dvgt.config import DataSplitConfig, DatasetEntry
from dvgt.data import layout, synthetic
from dvgt.data.dataset import ClipDataset, ClipRequest, choose_cameras, colour_jitter, open_entry
from dvgt.data.geometry import (absT_quaR_to_pose, inverse_pose, pose_to_absT_quaR, project_points,
                                quaternion_to_rotation, rotation_to_quaternion, transform_points)
from dvgt.data.loader import build_dataloader, load_clip
from dvgt.data.sampler import GroupedBatchSampler

SPEC = dict(num_scenes=3, num_frames=6, cameras=("CAM_FRONT", "CAM_FRONT_LEFT", "CAM_FRONT_RIGHT", "CAM_BACK"),
            height=96, width=192, seed=7)


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    synthetic.generate_synthetic_dataset(root, "train", **SPEC)
    return root


@pytest.fixture(scope="session")
def train_set(synthetic_root):
    return ClipDataset("synthetic", synthetic_root, "train")


def split_config(root, **overrides):
    entry = DatasetEntry(name="synthetic", root=str(root), split="train")
    return OmegaConf.structured(DataSplitConfig(datasets=[entry], **overrides))


def loader_kwargs(**overrides):
    kwargs = dict(patch_size=16, max_img_per_gpu=16, seed=3, rank=0, world_size=1, num_workers=0, pin_memory=False,
                  prefetch_factor=2, persistent_workers=False, steps_per_epoch=3)
    return {**kwargs, **overrides}


# --------------------------------------------------------------------------------------------
# Geometry helpers
# --------------------------------------------------------------------------------------------


def random_rotations(n, seed=0):
    q = torch.randn(n, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return quaternion_to_rotation(q)


def test_quaternion_round_trip_including_half_turns():
    half_turns = torch.diag_embed(torch.tensor([[1.0, -1, -1], [-1, 1, -1], [-1, -1, 1]], dtype=torch.float64))
    rotations = torch.cat([random_rotations(200), half_turns])
    q = rotation_to_quaternion(rotations)
    assert torch.all(q[:, 3] >= 0)
    assert torch.allclose(q.norm(dim=-1), torch.ones(len(q), dtype=torch.float64))
    assert torch.allclose(quaternion_to_rotation(q), rotations, atol=1e-10)
    quarter_turn_about_z = torch.tensor([[0.0, -1, 0], [1, 0, 0], [0, 0, 1]])  # x -> y
    expected = torch.tensor([0, 0, math.sin(math.pi / 4), math.cos(math.pi / 4)])  # xyzw
    assert torch.allclose(rotation_to_quaternion(quarter_turn_about_z), expected, atol=1e-6)


def test_pose_inverse_and_absT_quaR_round_trip():
    poses = torch.eye(4, dtype=torch.float64).repeat(50, 1, 1)
    poses[:, :3, :3] = random_rotations(50, seed=1)
    poses[:, :3, 3] = torch.randn(50, 3, dtype=torch.float64)
    assert torch.allclose(inverse_pose(poses) @ poses, torch.eye(4, dtype=torch.float64).expand(50, 4, 4), atol=1e-12)
    encoding = pose_to_absT_quaR(poses)
    assert encoding.shape == (50, 7) and torch.allclose(encoding[:, :3], poses[:, :3, 3])
    assert torch.allclose(absT_quaR_to_pose(encoding), poses, atol=1e-10)


# --------------------------------------------------------------------------------------------
# Layout and synthetic generator
# --------------------------------------------------------------------------------------------


def test_generator_writes_the_layout_and_the_reader_reads_it_back(synthetic_root):
    scenes = layout.read_split(synthetic_root, "train")
    assert [s.name for s in scenes] == [synthetic.scene_name("train", i) for i in range(3)]
    scene = scenes[0]
    assert scene.cameras == list(SPEC["cameras"])  # rig order, front camera first
    assert scene.num_frames == 6 and np.allclose(np.diff(scene.timestamps), 0.5)  # 2 Hz
    assert scene.intrinsics.shape == (6, 4, 3, 3) and scene.cam_to_ego.shape == (6, 4, 4, 4)
    assert np.allclose(scene.cam_to_ego[0, 0], synthetic.camera_to_ego(synthetic.RIG["CAM_FRONT"]))
    image = layout.read_image(synthetic_root / scene.image_paths[2, 1])
    assert image.size == (192, 96) and tuple(scene.image_sizes[2, 1]) == (192, 96)
    depth = layout.read_depth(synthetic_root / scene.depth_paths[2, 0], scene.depth_scales[2, 0])
    assert depth.dtype == np.float32 and depth.shape == (96, 192)
    assert (depth == 0).any() and (depth > 0).mean() > 0.5  # sky is invalid, most pixels are not
    assert depth.max() <= synthetic.MAX_DEPTH


def test_generator_is_deterministic_and_splits_differ(tmp_path):
    small = dict(num_scenes=1, num_frames=2, cameras=("CAM_FRONT",), height=32, width=64, seed=1)
    for name, split in (("a", "train"), ("b", "train"), ("c", "val")):
        synthetic.generate_synthetic_dataset(tmp_path / name, split, **small)

    def first_image(name, split):
        scene = layout.read_split(tmp_path / name, split)[0]
        return np.asarray(layout.read_image(tmp_path / name / scene.image_paths[0, 0])), scene.ego_to_world

    image_a, poses_a = first_image("a", "train")
    image_b, poses_b = first_image("b", "train")
    image_c, poses_c = first_image("c", "val")
    assert np.array_equal(image_a, image_b) and np.array_equal(poses_a, poses_b)
    assert not np.allclose(poses_a, poses_c)


def test_stored_depth_and_points_match_the_analytic_ray_hits(synthetic_root, train_set):
    """Depth PNG -> metres -> points in the first ego frame -> world equals the generator's exact hits."""
    scene_record = train_set.scenes[1]
    clip = train_set.load_clip(1, 2, views=4, frames=3, height=96, width=192)  # native size: no resampling
    scene = synthetic.build_scene(synthetic.scene_seed(SPEC["seed"], "train", 1), SPEC["num_frames"])
    first_to_world = torch.from_numpy(scene.ego_to_world[2])
    for t, v in ((0, 0), (2, 1), (1, 3)):
        cam_to_world = scene.ego_to_world[2 + t] @ scene_record.cam_to_ego[2 + t, v]
        rays, exact_depth, hit = synthetic.cast_rays(scene, cam_to_world, scene_record.intrinsics[2 + t, v], 96, 192)
        valid = (hit >= 0) & (exact_depth < synthetic.MAX_DEPTH)
        assert torch.equal(clip["point_masks"][t, v], torch.from_numpy(valid))
        step = layout.DEFAULT_DEPTH_SCALE
        assert np.abs(clip["depths"][t, v].numpy() - np.where(valid, exact_depth, 0)).max() <= step / 2 + 1e-4
        exact_points = cam_to_world[:3, 3] + rays[valid] * exact_depth[valid, None]
        points_world = transform_points(first_to_world, clip["points"][t, v][valid].double())
        assert np.abs(points_world.numpy() - exact_points).max() < 0.01


def test_every_surface_is_on_or_above_the_ground_in_the_first_ego_frame(train_set):
    """Ego origin on flat ground, y down: no point below y = 0, and the road is at y = 0."""
    clip = train_set.load_clip(0, 1, views=4, frames=5, height=96, width=192)
    y = clip["points"][..., 1][clip["point_masks"]]
    assert y.max() < 2e-3
    assert (y.abs() < 2e-3).float().mean() > 0.3  # a good part of every view is the ground
    front = clip["points"][:, 0][clip["point_masks"][:, 0]]
    assert (front[:, 2] > 0).float().mean() > 0.99  # the front camera looks forward (+z)


def test_ego_poses_are_relative_to_the_first_frame(train_set):
    clip = train_set.load_clip(2, 1, views=2, frames=4, height=96, width=192)
    scene = train_set.scenes[2]
    world = torch.from_numpy(scene.ego_to_world[1:5])
    expected = inverse_pose(world[:1]) @ world
    assert torch.allclose(clip["ego_to_first"].double(), expected, atol=1e-5)
    assert torch.equal(clip["ego_pose"][0], torch.tensor([0.0, 0, 0, 0, 0, 0, 1]))
    assert torch.allclose(absT_quaR_to_pose(clip["ego_pose"].double()), clip["ego_to_first"].double(), atol=1e-5)
    assert torch.all(torch.diff(clip["ego_pose"][:, 2]) > 1.0)  # driving forward, several metres per frame


def test_views_agree_across_time_and_cameras(train_set):
    """Points seen at frame 1 (front) and by the front-left camera at frame 0, projected into the front
    camera at frame 0, land where that camera sees the same depth and the same colour."""
    clip = train_set.load_clip(0, 0, views=2, frames=2, height=96, width=192)
    first_to_cam = inverse_pose(clip["cam_to_ego"][0, 0].double())  # ego_to_first[0] is the identity
    target_depth, target_image = clip["depths"][0, 0], clip["images"][0, 0]
    for t, v in ((1, 0), (0, 1)):
        mask = clip["point_masks"][t, v]
        cam_points = transform_points(first_to_cam, clip["points"][t, v][mask].double())
        uv, z = project_points(cam_points, clip["intrinsics"][0, 0].double())
        col, row = uv.round().long().unbind(-1)
        inside = (z > 0) & (col >= 0) & (col < 192) & (row >= 0) & (row < 96)
        assert inside.sum() > 1000
        col, row, z = col[inside], row[inside], z[inside]
        seen = target_depth[row, col].double()
        agree = (seen - z).abs() < 0.03 * z + 0.05
        assert agree.float().mean() > 0.8
        source_colour = clip["images"][t, v].permute(1, 2, 0)[mask][inside][agree]
        target_colour = target_image.permute(1, 2, 0)[row[agree], col[agree]]
        error = (source_colour - target_colour).abs().mean()
        unrelated = (source_colour - target_colour.roll(len(target_colour) // 2, 0)).abs().mean()
        assert error < 0.045 and error < unrelated / 3  # JPEG and resampling leave about 0.03


# --------------------------------------------------------------------------------------------
# Clip dataset
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("height,width", [(64, 160), (112, 140), (160, 256)])  # shrink, crop width, enlarge
def test_resize_and_crop_keep_intrinsics_and_depth_consistent(train_set, height, width):
    """Unproject each resized pixel with the new intrinsics, project it with the stored ones: it
    lands on the stored pixel its depth was taken from, and the colours agree."""
    native = train_set.load_clip(0, 3, views=1, frames=1, height=96, width=192)
    resized = train_set.load_clip(0, 3, views=1, frames=1, height=height, width=width)
    ys, xs = torch.meshgrid(torch.arange(height, dtype=torch.float64), torch.arange(width, dtype=torch.float64),
                            indexing="ij")
    rays = torch.stack([xs, ys, torch.ones_like(xs)], -1) @ torch.linalg.inv(resized["intrinsics"][0, 0].double()).T
    uv, _ = project_points(rays.reshape(-1, 3), native["intrinsics"][0, 0].double())
    col, row = uv.round().long().unbind(-1)
    assert col.min() >= 0 and col.max() < 192 and row.min() >= 0 and row.max() < 96
    away_from_ties = ((uv - uv.round()).abs() < 0.45).all(-1)
    stored = native["depths"][0, 0][row, col]
    assert torch.equal(resized["depths"][0, 0].reshape(-1)[away_from_ties], stored[away_from_ties])
    stored_colour = native["images"][0, 0][:, row, col].T
    assert (resized["images"][0, 0].reshape(3, -1).T - stored_colour).abs().mean() < 0.08


def test_clip_shapes_and_dtypes(train_set):
    sample = train_set[ClipRequest(0, 4, views=3, frames=2, height=80, width=160, seed=5)]
    T, V, H, W = 2, 3, 80, 160
    expected = {"images": ((T, V, 3, H, W), torch.float32), "points": ((T, V, H, W, 3), torch.float32),
                "point_masks": ((T, V, H, W), torch.bool), "depths": ((T, V, H, W), torch.float32),
                "intrinsics": ((T, V, 3, 3), torch.float32), "cam_to_ego": ((T, V, 4, 4), torch.float32),
                "ego_to_first": ((T, 4, 4), torch.float32), "ego_pose": ((T, 7), torch.float32)}
    for key, (shape, dtype) in expected.items():
        assert sample[key].shape == shape and sample[key].dtype == dtype, key
    assert 0 <= sample["images"].min() and sample["images"].max() <= 1
    assert sample["scene"] == synthetic.scene_name("train", 0) and sample["dataset"] == "synthetic"
    assert torch.all(sample["points"][~sample["point_masks"]] == 0)


def test_camera_choice_keeps_the_front_camera_first():
    assert choose_cameras(6, 3, None) == [0, 1, 2]
    subsets = {tuple(choose_cameras(6, 3, seed)) for seed in range(40)}
    assert all(s[0] == 0 and len(set(s)) == 3 and list(s[1:]) == sorted(s[1:]) for s in subsets)
    assert len(subsets) > 5 and choose_cameras(6, 3, 11) == choose_cameras(6, 3, 11)
    with pytest.raises(ValueError, match="7 cameras"):
        choose_cameras(6, 7, 0)


def test_colour_jitter_is_seeded_and_stays_in_range():
    images = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    a = colour_jitter(images, 0.4, np.random.default_rng(1))
    assert torch.equal(a, colour_jitter(images, 0.4, np.random.default_rng(1)))
    assert not torch.allclose(a, images) and 0 <= a.min() and a.max() <= 1
    assert torch.allclose(colour_jitter(images, 0.0, np.random.default_rng(1)), images, atol=1e-6)


def test_clips_are_indexed_scene_after_scene(train_set):
    assert train_set.max_frames == 6 and train_set.num_cameras == 4
    assert train_set.num_clips(4) == 3 * 3
    assert train_set.locate_clip(4, 4) == (1, 1)
    strided = ClipDataset("synthetic", train_set.root, "train", frame_stride=2)
    assert strided.max_frames == 3 and strided.num_clips(3) == 3 * 2
    with pytest.raises(IndexError):
        train_set.locate_clip(9, 4)


def copy_scene(source_root, target_root):
    """A one-scene copy of the synthetic split that a test may damage."""
    shutil.copytree(source_root / "train" / synthetic.scene_name("train", 0), target_root / "train" /
                    synthetic.scene_name("train", 0))
    table = layout.scene_table_path(source_root, "train", synthetic.scene_name("train", 0))
    shutil.copy(table, target_root / "train")
    return layout.read_split(target_root, "train")[0]


def test_missing_root_names_the_path_and_the_config_key(tmp_path, synthetic_root):
    config = split_config(synthetic_root)
    config.datasets.append(DatasetEntry(name="nuscenes", root=str(tmp_path / "nowhere"), split="train"))
    with pytest.raises(FileNotFoundError, match=r"nowhere.*data\.val\.datasets\[1\]\.root"):
        build_dataloader(config, **loader_kwargs(), config_key="data.val")
    assert not (tmp_path / "nowhere").exists()  # only entries named "synthetic" are generated


def test_missing_column_names_the_file_and_the_column(tmp_path, synthetic_root):
    copy_scene(synthetic_root, tmp_path)
    table_path = layout.scene_table_path(tmp_path, "train", synthetic.scene_name("train", 0))
    pq.write_table(pq.read_table(table_path).drop_columns(["cam_to_ego"]), table_path)
    with pytest.raises(ValueError, match=r"synthetic-train-0000\.parquet.*missing column 'cam_to_ego'"):
        ClipDataset("synthetic", tmp_path, "train")


def test_unreadable_image_or_depth_names_the_file(tmp_path, synthetic_root):
    scene = copy_scene(synthetic_root, tmp_path)
    broken_image = tmp_path / scene.image_paths[1, 0]
    broken_image.write_bytes(b"not a jpeg")
    dataset = ClipDataset("synthetic", tmp_path, "train")
    with pytest.raises(layout.DataFileError, match=str(broken_image)):
        dataset.load_clip(0, 0, views=1, frames=2, height=96, width=192)
    missing_depth = tmp_path / scene.depth_paths[0, 1]
    missing_depth.unlink()
    with pytest.raises(layout.DataFileError, match=str(missing_depth)):
        dataset.load_clip(0, 0, views=2, frames=1, height=96, width=192)


def test_synthetic_entry_is_generated_on_first_use(tmp_path):
    root = tmp_path / "generated"
    path = synthetic.ensure_synthetic_dataset(root, "val", num_scenes=1, num_frames=2, height=32, width=64)
    table = layout.scene_table_path(root, "val", synthetic.scene_name("val", 0))
    stamp = table.stat().st_mtime_ns
    assert path == root / "val" and sorted(p.name for p in root.iterdir()) == ["val"]  # no scratch left
    dataset = open_entry(SimpleNamespace(name="synthetic", root=str(root), split="val"))  # exists: kept as is
    assert table.stat().st_mtime_ns == stamp and len(dataset.scenes) == 1


# --------------------------------------------------------------------------------------------
# Grouped batch sampler
# --------------------------------------------------------------------------------------------


def fake_source(cameras=6, max_frames=8, clips=1000):
    return SimpleNamespace(num_cameras=cameras, max_frames=max_frames, num_clips=lambda frames: clips)


def make_sampler(**overrides):
    kwargs = dict(datasets=[fake_source(), fake_source(cameras=2, max_frames=3)], weights=[3.0, 1.0],
                  views=[2, 6], frames=[2, 8], aspect_ratio=[1.6, 3.3], img_width=256, patch_size=16,
                  max_img_per_gpu=48, steps_per_epoch=20, seed=11)
    kwargs.update(overrides)
    datasets, weights = kwargs.pop("datasets"), kwargs.pop("weights")
    return GroupedBatchSampler(datasets, weights, **kwargs)


def test_ranks_share_the_shape_and_get_disjoint_clips():
    ranks = [make_sampler(rank=r, world_size=4) for r in range(4)]
    for step in range(30):
        batches = [s.batch(0, step) for s in ranks]
        shapes = {(r.dataset_index, r.views, r.frames, r.height, r.width) for b in batches for r in b}
        assert len(shapes) == 1
        clips = [r.clip_index for b in batches for r in b]
        assert len(clips) == len(set(clips))  # 1000 clips: drawn without replacement
        assert [r for b in batches for r in b] == ranks[0].global_batch(0, step)


def test_batch_size_and_shape_rules():
    sampler = make_sampler()
    for step in range(200):
        batch = sampler.batch(0, step)
        r = batch[0]
        cameras, max_frames = (6, 8) if r.dataset_index == 0 else (2, 3)
        assert 2 <= r.views <= min(6, cameras) and 2 <= r.frames <= min(8, max_frames)
        assert len(batch) == max(1, 48 // (r.views * r.frames))
        assert r.width == 256 and r.height % 16 == 0
        assert 256 / 3.3 - 16 < r.height <= 256 / 1.6
    assert make_sampler(aspect_ratio=[20.0, 30.0]).batch(0, 0)[0].height == 16  # at least one patch
    vggt = make_sampler(img_width=518, patch_size=14).batch(0, 0)[0]
    assert vggt.height % 14 == 0 and vggt.width == 518
    with pytest.raises(ValueError, match="multiple of the patch size"):
        make_sampler(img_width=250)


def test_sampler_is_deterministic_per_seed_and_epoch():
    assert list(make_sampler()) == list(make_sampler())
    assert list(make_sampler()) != list(make_sampler(seed=12))
    other_epoch = make_sampler()
    other_epoch.set_epoch(1)
    assert list(other_epoch) != list(make_sampler())


def test_resuming_at_a_step_yields_the_same_batches():
    uninterrupted = make_sampler()
    uninterrupted.set_epoch(2)
    expected = list(uninterrupted)
    resumed = make_sampler()
    resumed.load_state_dict({"epoch": 2, "step": 7})
    resumed.set_epoch(2)  # what a trainer does at the top of the epoch: keeps the resume point
    assert len(resumed) == 13 and list(resumed) == expected[7:]
    assert resumed.state_dict() == {"epoch": 2, "step": 20}
    assert list(resumed) == expected  # a resume point is used once
    resumed.load_state_dict({"epoch": 2, "step": 20})
    resumed.set_epoch(3)  # saved at the end of epoch 2: epoch 3 starts at step 0
    uninterrupted.set_epoch(3)
    assert list(resumed) == list(uninterrupted)


def test_mixing_follows_the_weights():
    sampler = make_sampler(steps_per_epoch=4000)
    share = np.mean([batch[0].dataset_index == 0 for batch in sampler])
    assert abs(share - 0.75) < 0.03


# --------------------------------------------------------------------------------------------
# DataLoader
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("patch_size,img_width", [(16, 160), (14, 154)])
def test_dataloader_batches_follow_the_sampler(synthetic_root, patch_size, img_width):
    config = split_config(synthetic_root, views=[1, 4], frames=[1, 3], img_width=img_width, color_jitter=0.2)
    loader = build_dataloader(config, **loader_kwargs(patch_size=patch_size))
    for step, batch in enumerate(loader):
        requests = loader.batch_sampler.batch(0, step)
        r = requests[0]
        B, T, V, H, W = len(requests), r.frames, r.views, r.height, r.width
        assert batch["images"].shape == (B, T, V, 3, H, W) and H % patch_size == 0 and W % patch_size == 0
        assert batch["points"].shape == (B, T, V, H, W, 3) and batch["ego_pose"].shape == (B, T, 7)
        assert batch["dataset"] == ["synthetic"] * B and len(batch["scene"]) == B
    assert step == 2


def test_workers_give_the_same_batches_as_the_main_process(synthetic_root):
    config = split_config(synthetic_root, views=[2, 3], frames=[2, 3], img_width=128, color_jitter=0.3)
    in_process = list(build_dataloader(config, **loader_kwargs(steps_per_epoch=3)))
    with_workers = build_dataloader(config, **loader_kwargs(steps_per_epoch=3, num_workers=2,
                                                            persistent_workers=True))
    for expected, batch in zip(in_process, with_workers, strict=True):
        assert batch.keys() == expected.keys()
        for key in expected:
            assert torch.equal(batch[key], expected[key]) if isinstance(batch[key], torch.Tensor) \
                else batch[key] == expected[key]


def test_dataloader_resumes_mid_epoch(synthetic_root):
    config = split_config(synthetic_root, img_width=128)
    full = list(build_dataloader(config, **loader_kwargs(steps_per_epoch=4), epoch=1))
    resumed = list(build_dataloader(config, **loader_kwargs(steps_per_epoch=4), epoch=1, start_step=2))
    assert len(resumed) == 2
    for expected, batch in zip(full[2:], resumed):
        assert torch.equal(expected["images"], batch["images"]) and expected["scene"] == batch["scene"]


def test_load_clip_returns_one_fixed_unaugmented_clip(synthetic_root):
    entry = DatasetEntry(name="synthetic", root=str(synthetic_root), split="train")
    clip = load_clip(entry, 2, views=3, frames=4, height=64, width=128, start_frame=1)
    again = load_clip(entry, 2, views=3, frames=4, height=64, width=128, start_frame=1)
    assert clip["images"].shape == (1, 4, 3, 3, 64, 128) and clip["scene"] == [synthetic.scene_name("train", 2)]
    assert torch.equal(clip["images"], again["images"])
    front = synthetic.camera_to_ego(synthetic.RIG["CAM_FRONT"])
    assert torch.allclose(clip["cam_to_ego"][0, 0, 0].double(), torch.from_numpy(front), atol=1e-6)
