"""Data: geometry helpers, the synthetic generator's official tree, samples, augmentation, the grouped and
evaluation samplers, and the loaders. Fidelity to the official code is in test_official_data.py."""

import math

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from dvgt.config import DataConfig, DatasetEntry
from dvgt.data import format as fmt
from dvgt.data import synthetic
from dvgt.data.augment import ColorJitter, adjust_hue, grey, to_tensors
from dvgt.data.geometry import (
    absT_quaR_to_pose,
    inverse_pose,
    pose_to_absT_quaR,
    project_points,
    quaternion_to_rotation,
    rotation_to_quaternion,
    transform_points,
)
from dvgt.data.loader import build_eval_loader, build_train_loader, load_clip, open_datasets
from dvgt.data.sampler import EvaluationSampler, GroupedBatchSampler
from dvgt.data.scene_dataset import ALL_TARGETS, DatasetSpec, SampleRequest, SceneDataset

SPEC = dict(num_scenes=3, num_frames=8, height=96, width=192, seed=7)


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    synthetic.generate_synthetic_dataset(root, "train", **SPEC)
    return root


def spec(root, **changes) -> DatasetSpec:
    values = dict(
        root=root,
        parquet=fmt.Tree(root, "demo").parquet("train"),
        clip_split="DVGT1",
        fixed_num_frames=4,
        fixed_aspect_ratio=2.0,
        image_width=128,
        patch_size=16,
    )
    return DatasetSpec(**{**values, **changes})


@pytest.fixture(scope="session")
def evaluation_set(synthetic_root):
    return SceneDataset(spec(synthetic_root))


@pytest.fixture(scope="session")
def training_set(synthetic_root):
    return SceneDataset(
        spec(
            synthetic_root,
            mode="train",
            clip_split="default_train",
            fixed_num_frames=0,
            fixed_aspect_ratio=0.0,
            aug_pixel_aspect_range=(0.8, 1.0),
            aug_safe_scales=(0.8, 1.2),
            random_resize=True,
        )
    )


def data_config(root, **train):
    entry = DatasetEntry(dataset="demo", split="train")
    cfg = OmegaConf.structured(DataConfig(root=str(root)))
    cfg.train.datasets, cfg.val.datasets = [entry], [entry]
    cfg.val.clip_split, cfg.val.fixed_num_frames, cfg.val.fixed_aspect_ratio = "DVGT1", 2, 2.0
    cfg.train.img_width = cfg.val.img_width = 128
    for key, value in train.items():
        OmegaConf.update(cfg.train, key, value)
    return cfg


def train_loader(root, steps=3, num_workers=0, **train):
    cfg = data_config(root, **{"views": [2, 3], **train})
    datasets = open_datasets(cfg, "train", patch_size=16, gt_scale_factor=0.1, targets=ALL_TARGETS)
    return build_train_loader(
        cfg,
        datasets,
        max_img_per_gpu=12,
        seed=3,
        rank=0,
        world_size=1,
        num_workers=num_workers,
        pin_memory=False,
        prefetch_factor=2,
        persistent_workers=num_workers > 0,
        steps_per_epoch=steps,
    )


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
# Synthetic generator: an official tree with exact depth
# --------------------------------------------------------------------------------------------


def test_generator_writes_an_official_tree(synthetic_root):
    tree = fmt.Tree(synthetic_root, "demo")
    table = fmt.read_table(tree.parquet("train"))
    assert table.num_rows == 3 * 8 * 8  # scenes x frames x the 8 OpenScene cameras
    assert sorted(set(table.cam_type.to_pylist())) == sorted(fmt.CAMERAS["demo"])
    filename = table.filename[0].as_py()
    assert fmt.read_image(tree.image(filename)).shape == (96, 192, 3)
    depth = fmt.read_depth(tree.depth(filename, projected=False))
    assert depth.shape == (96, 192) and np.isinf(depth).any()  # the sky is infinite, as the official writer stores it
    assert np.isfinite(depth).mean() > 0.5 and depth[np.isfinite(depth)].max() <= synthetic.MAX_DEPTH
    commands = table.ego["driving_command"]
    assert np.all(commands.sum(-1) == 1) and commands[:, 3].any()  # one-hot, unknown at the end of a scene
    assert not table.use_lidar_proj_depth.any()


def test_generator_is_deterministic_and_splits_differ(tmp_path):
    small = dict(num_scenes=1, num_frames=2, height=32, width=64, seed=1)
    for name, split in (("a", "train"), ("b", "train"), ("c", "val")):
        synthetic.generate_synthetic_dataset(tmp_path / name, split, **small)

    def first(name, split):
        table = fmt.read_table(fmt.Tree(tmp_path / name, "demo").parquet(split))
        return fmt.read_image(fmt.Tree(tmp_path / name, "demo").image(table.filename[0].as_py())), table.ego_to_world

    (image_a, poses_a), (image_b, poses_b), (_, poses_c) = first("a", "train"), first("b", "train"), first("c", "val")
    assert np.array_equal(image_a, image_b) and np.array_equal(poses_a, poses_b)
    assert not np.allclose(poses_a, poses_c)


def test_stored_depth_matches_the_analytic_ray_hits(synthetic_root):
    """The log-encoded PNG holds the exact z-depth of every ray hit (relative error of the 16-bit code)."""
    tree = fmt.Tree(synthetic_root, "demo")
    table = fmt.read_table(tree.parquet("train"))
    scene = synthetic.build_scene(synthetic.scene_seed(SPEC["seed"], "train", 1), SPEC["num_frames"])
    for row in np.flatnonzero(table.scene_id.to_numpy(zero_copy_only=False) == synthetic.scene_name("train", 1))[::13]:
        camera_to_world = inverse_pose(torch.from_numpy(np.vstack([table.extrinsics[row], [0, 0, 0, 1]]))).numpy()
        assert np.allclose(np.vstack([table.ego_to_world[row], [0, 0, 0, 1]]), scene.ego_to_world[table.frame_idx[row]])
        _, exact, hit = synthetic.cast_rays(scene, camera_to_world, table.intrinsics[row], 96, 192)
        valid = (hit >= 0) & (exact < synthetic.MAX_DEPTH) & (exact >= 1)
        stored = fmt.read_depth(tree.depth(table.filename[row].as_py(), projected=False))
        assert np.array_equal(np.isfinite(stored), valid)
        assert np.abs(stored[valid] / exact[valid] - 1).max() < 1e-4


def test_every_surface_is_on_or_above_the_ground(evaluation_set):
    """Ego origin on flat ground, y down: near points are not below y = 0, and a good part of every clip
    is the road at y = 0; the front camera looks forward. (The official depth resize takes the nearest
    pixel by OpenCV's rule, up to half a source pixel away from where the intrinsics place it: on the
    ground within 10 m that moves a point by a few centimetres.)"""
    sample = evaluation_set[0]
    points, mask = sample["points_in_ego_n"], sample["point_masks"]
    near = mask & (sample["ray_depth"] < 10.0)
    assert points[..., 1][near].max() < 0.1
    assert (np.abs(points[..., 1][near]) < 0.1).mean() > 0.3
    front = points[:, 0][mask[:, 0]]
    assert (front[:, 2] > 0).mean() > 0.99


def test_poses_and_points_of_a_sample_agree(evaluation_set):
    """Points in the first frame's ego are the frame's own points moved by ego_n_to_ego_first; the first
    camera's frame by ego_first_to_cam_n; poses chain through ego_past_to_ego_curr."""
    s = {
        k: torch.from_numpy(v).double()
        for k, v in evaluation_set[1].items()
        if isinstance(v, np.ndarray) and v.dtype.kind == "f"
    }
    moved = transform_points(s["ego_n_to_ego_first"][:, None], s["points_in_ego_n"])
    assert torch.allclose(moved, s["points_in_ego_first"], atol=1e-4)
    in_cam0 = transform_points(s["ego_first_to_cam_n"][0, 0], s["points_in_ego_first"])
    assert torch.allclose(in_cam0, s["points_in_cam_first"], atol=1e-4)
    chained = s["ego_n_to_ego_first"][:-1] @ inverse_pose(s["ego_past_to_ego_curr"][1:])
    assert torch.allclose(chained, s["ego_n_to_ego_first"][1:], atol=1e-5)
    assert torch.all(torch.diff(s["ego_n_to_ego_first"][:, 2, 3]) > 1.0)  # driving forward several metres per frame


def test_views_agree_across_time_and_cameras(evaluation_set):
    """Points seen at frame 1 (front) and by the front-left camera at frame 0, projected into the front
    camera at frame 0, land where that camera sees the same depth and the same colour."""
    sample = to_tensors(evaluation_set[0])
    H, W = sample["images"].shape[-2:]
    first_to_cam = sample["ego_first_to_cam_n"][0, 0].double()
    target_depth, target_image = sample["depths"][0, 0], sample["images"][0, 0]
    for t, v in ((1, 0), (0, 2)):
        mask = sample["point_masks"][t, v]
        cam_points = transform_points(first_to_cam, sample["points_in_ego_first"][t, v][mask].double())
        uv, z = project_points(cam_points, sample["intrinsics"][0, 0].double())
        col, row = uv.round().long().unbind(-1)
        inside = (z > 0) & (col >= 0) & (col < W) & (row >= 0) & (row < H)
        assert inside.sum() > 300
        col, row, z = col[inside], row[inside], z[inside]
        agree = (target_depth[row, col].double() - z).abs() < 0.05 * z + 0.1
        assert agree.float().mean() > 0.7
        source_colour = sample["images"][t, v].permute(1, 2, 0)[mask][inside][agree]
        target_colour = target_image.permute(1, 2, 0)[row[agree], col[agree]]
        error = (source_colour - target_colour).abs().mean()
        unrelated = (source_colour - target_colour.roll(len(target_colour) // 2, 0)).abs().mean()
        assert error < unrelated / 2


# --------------------------------------------------------------------------------------------
# Samples
# --------------------------------------------------------------------------------------------


def test_training_draws_come_from_the_request_seed(training_set):
    request = SampleRequest(0, 3, 2, 2.5, seed=11)
    a, b = training_set[request], training_set[request]
    assert all(np.array_equal(a[k], b[k]) for k in a if isinstance(a[k], np.ndarray))
    assert a["images"].shape == (2, 3, 48, 128, 3)  # int(128 / 2.5) = 51 -> 48
    others = [training_set[request._replace(seed=s)] for s in range(12, 20)]
    orders = {tuple(o["cam_types"]) for o in others}
    assert len(orders) > 1 and any(o[0] != "FRONT" for o in orders)  # a random subset in random order
    assert len({o["seq_name"] for o in others}) > 1  # a random scene (inside_random)
    assert len(a["filenames"]) == 6


def test_augmentation_zooms_about_the_principal_point(training_set, synthetic_root):
    """Training crops a random share of each image about its principal point (aug_pixel_aspect_range) and
    resizes with a random margin, so the focal length varies per draw; evaluation's is fixed."""
    focal = [training_set[SampleRequest(0, 2, 2, 2.0, seed=seed)]["intrinsics"][..., 0, 0] for seed in range(12)]
    focal = np.concatenate([f.reshape(-1) for f in focal])
    plain = SceneDataset(spec(synthetic_root, mode="train", clip_split="default_train", fixed_num_frames=0))
    fixed = plain[SampleRequest(0, 2, 2, 2.0, seed=0)]["intrinsics"][..., 0, 0]
    assert focal.std() / focal.mean() > 0.03 and focal.min() >= fixed.min() - 1e-3  # zoom in, never out
    assert np.array_equal(fixed, plain[SampleRequest(0, 2, 2, 2.0, seed=0)]["intrinsics"][..., 0, 0])


def test_fixed_views_take_every_camera_in_order(synthetic_root):
    dataset = SceneDataset(spec(synthetic_root, mode="train", clip_split="default_train", fixed_num_views=8))
    sample = dataset[SampleRequest(0, 2, 2, 2.0, seed=1)]
    assert sample["cam_types"] == list(fmt.CAMERAS["demo"].values())


def test_future_frames_give_the_planning_targets(synthetic_root):
    dataset = SceneDataset(
        spec(synthetic_root, clip_split="DVGT2", fixed_num_frames=2, future_frames=3, gt_scale_factor=0.1)
    )
    assert len(dataset.sequences) == 3 * (8 - 5 + 1)
    sample = dataset[0]
    future = sample["future_ego_n_to_ego_curr"]  # [T, 3, 4, 4]: the next 3 frames of each input frame
    assert future.shape == (2, 3, 4, 4)
    ego = sample["ego_n_to_ego_first"]
    assert np.allclose(future[0, 0], ego[1], atol=1e-5)  # frame 1 seen from frame 0 (frame 0 is the first)
    assert np.all(np.diff(future[:, :, 2, 3], axis=1) > 0.1)  # forward, scaled by 0.1


# --------------------------------------------------------------------------------------------
# Augmentation
# --------------------------------------------------------------------------------------------


def test_colour_jitter_is_seeded_stays_in_range_and_changes_images():
    images = torch.rand(2, 3, 3, 16, 24, generator=torch.Generator().manual_seed(0))
    jitter = ColorJitter()
    a = jitter(images, torch.Generator().manual_seed(5))
    b = jitter(images, torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and a.min() >= 0 and a.max() <= 1
    changed = [not torch.equal(jitter(images, torch.Generator().manual_seed(s)), images) for s in range(20)]
    assert sum(changed) >= 15  # applied with probability 0.9
    always_co = ColorJitter(p=1.0, cojitter_ratio=-1.0, hue=0.0, gray_scale=False, contrast=0.0, saturation=0.0)
    out = always_co(images, torch.Generator().manual_seed(1))  # brightness only, one draw for the clip
    unclipped = (images > 0.05) & (out < 0.99)
    ratio = out[unclipped] / images[unclipped]
    assert torch.allclose(ratio, ratio[0], atol=1e-4) and not torch.allclose(ratio[0], torch.tensor(1.0))


def test_hue_rotation_and_grey():
    red = torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1)
    assert torch.allclose(adjust_hue(red, 1 / 3), torch.tensor([0.0, 1.0, 0.0]).view(3, 1, 1), atol=1e-6)
    images = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(2))
    assert torch.allclose(adjust_hue(adjust_hue(images, 0.2), -0.2), images, atol=1e-5)
    assert torch.allclose(adjust_hue(images, 0.0), images, atol=1e-6)
    assert torch.allclose(grey(torch.ones(3, 2, 2)), torch.full((1, 2, 2), 0.9999), atol=1e-6)


# --------------------------------------------------------------------------------------------
# Samplers
# --------------------------------------------------------------------------------------------


class FakeSource:
    def __init__(self, name="a", cameras=8, max_frames=40, length=100, frame_num_max=99999):
        self.name, self.num_cameras, self.max_frames, self.length = name, cameras, max_frames, length
        self.frame_num_max = frame_num_max

    def __len__(self):
        return self.length


def make_sampler(**overrides):
    kwargs = dict(
        datasets=[FakeSource("a", length=300), FakeSource("b", cameras=2, max_frames=3, length=100)],
        views=[2, 6],
        min_frames=2,
        aspect_ratio=[1.6, 3.3],
        max_img_per_gpu=48,
        steps_per_epoch=20,
        seed=11,
    )
    kwargs.update(overrides)
    return GroupedBatchSampler(kwargs.pop("datasets"), **kwargs)


def test_ranks_share_the_shape_and_get_their_own_samples():
    ranks = [make_sampler(rank=r, world_size=4) for r in range(4)]
    for step in range(30):
        batches = [s.batch(0, step) for s in ranks]
        shapes = {(i.dataset, i.request.views, i.request.frames, i.request.aspect_ratio) for b in batches for i in b}
        assert len(shapes) == 1
        seeds = [i.request.seed for b in batches for i in b]
        assert len(seeds) == len(set(seeds))
        assert [i for b in batches for i in b] == ranks[0].global_batch(0, step)


def test_batch_size_and_shape_rules_follow_the_official_sampler():
    sampler = make_sampler()
    for step in range(300):
        batch = sampler.batch(0, step)
        r = batch[0].request
        cameras, longest = (8, 40) if batch[0].dataset == 0 else (2, 3)
        assert 2 <= r.views <= min(6, cameras)
        assert 2 <= r.frames <= min(48 // r.views, longest)
        assert len(batch) == max(1, 48 // (r.views * r.frames))
        assert 1.6 <= r.aspect_ratio <= 3.3 and round(r.aspect_ratio, 2) == r.aspect_ratio
    fixed = make_sampler(fixed_num_views=3, fixed_num_frames=4, fixed_aspect_ratio=1.77).batch(0, 0)[0].request
    assert (fixed.views, fixed.frames, fixed.aspect_ratio) == (3, 4, 1.77)
    with pytest.raises(ValueError, match="no clip length fits"):
        make_sampler(max_img_per_gpu=6)  # 6 // 6 views = 1 frame < min_frames


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


def test_mixing_follows_the_dataset_lengths():
    sampler = make_sampler(steps_per_epoch=4000)
    share = np.mean([batch[0].dataset == 0 for batch in sampler])
    assert abs(share - 0.75) < 0.03  # lengths 300 and 100, as the official dataset_len weighting


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_evaluation_shares_every_sequence_once_and_evens_out_the_ranks(world_size):
    sizes, limit = [5, 2, 7], 4
    ranks = [list(EvaluationSampler(sizes, limit, rank, world_size)) for rank in range(world_size)]
    assert len({len(r) for r in ranks}) == 1  # the same number of forward passes on every rank
    counted = [(i.dataset, i.sequence) for r in ranks for batch in r for i in batch if i.counted]
    assert sorted(counted) == [(d, s) for d, n in enumerate(sizes) for s in range(min(n, limit))]
    assert list(EvaluationSampler(sizes, None, 0, 1))[-1][0][:2] == (2, 6)  # no limit: all sequences


# --------------------------------------------------------------------------------------------
# Loaders
# --------------------------------------------------------------------------------------------


def test_training_batches_follow_the_sampler(synthetic_root):
    loader = train_loader(synthetic_root, views=[2, 3])
    for step, batch in enumerate(loader):
        indices = loader.batch_sampler.batch(0, step)
        r = indices[0].request
        B = len(indices)
        H = int(128 / r.aspect_ratio) // 16 * 16
        assert batch["images"].shape == (B, r.frames, r.views, 3, H, 128) and batch["images"].dtype == torch.float32
        assert batch["points_in_ego_first"].shape == (B, r.frames, r.views, H, 128, 3)
        assert batch["ego_n_to_ego_first"].shape == (B, r.frames, 4, 4) and batch["dataset"] == ["demo"] * B
        assert batch["images"].min() >= 0 and batch["images"].max() <= 1
    assert step == 2


def test_workers_give_the_same_batches_as_the_main_process(synthetic_root):
    in_process = list(train_loader(synthetic_root, steps=3))
    for expected, batch in zip(in_process, train_loader(synthetic_root, steps=3, num_workers=2), strict=True):
        assert batch.keys() == expected.keys()
        for key in expected:
            assert (
                torch.equal(batch[key], expected[key])
                if isinstance(batch[key], torch.Tensor)
                else batch[key] == expected[key]
            )


def test_training_loader_resumes_mid_epoch(synthetic_root):
    full = train_loader(synthetic_root, steps=4)
    full.batch_sampler.set_epoch(1)
    expected = list(full)
    resumed = train_loader(synthetic_root, steps=4)
    resumed.batch_sampler.load_state_dict({"epoch": 1, "step": 2})
    batches = list(resumed)
    assert len(batches) == 2
    for a, b in zip(expected[2:], batches):
        assert torch.equal(a["images"], b["images"]) and a["seq_name"] == b["seq_name"]


def test_evaluation_loader_and_load_clip(synthetic_root):
    cfg = data_config(synthetic_root)
    datasets = open_datasets(cfg, "val", patch_size=16, gt_scale_factor=0.1, targets=ALL_TARGETS)
    batches = list(build_eval_loader(datasets, limit=3, rank=1, world_size=2))
    assert [b["counted"] for b in batches] == [[True], [False]]  # 3 clips on 2 ranks: rank 1 repeats one
    assert batches[0]["images"].shape == (1, 2, 8, 3, 64, 128)  # every camera, in the dataset's order
    clip = load_clip(datasets[0], 1)
    assert clip["seq_name"] == [datasets[0].sequences[1].name] and torch.equal(clip["images"], batches[0]["images"])
