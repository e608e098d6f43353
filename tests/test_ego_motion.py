"""DVGT-2 data: future trajectories with validity, ego status, driving commands, measured columns,
local points and relative poses of a clip, and the anchors command."""

import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from dvgt.data import layout
from dvgt.data.anchors import compute_anchors, ensure_anchors, read_anchors
from dvgt.data.dataset import ClipDataset
from dvgt.data.ego_motion import COMMANDS, EGO_STATUS_FIELDS, FUTURE_STEPS, scene_ego_motion
from dvgt.data.geometry import absT_quaR_to_pose, chain_relative_poses, transform_points
from dvgt.data.synthetic import _rigid, _rotation_y, generate_synthetic_dataset
from dvgt.models import dvgt2

torch.set_num_threads(2)


def poses_along(xz: np.ndarray, yaw: np.ndarray) -> np.ndarray:
    """ego_to_world [F, 4, 4] of an ego on the ground at positions xz [F, 2] with yaw [F] (positive = right)."""
    position = np.stack([xz[:, 0], np.zeros(len(xz)), xz[:, 1]], -1)
    return _rigid(_rotation_y(yaw), position)


def test_straight_constant_speed_gives_exact_future_status_and_validity():
    times = np.arange(12) * 0.5
    speed, yaw = 6.0, 0.7  # driving straight along a direction 0.7 rad right of world z
    direction = np.array([np.sin(yaw), np.cos(yaw)])
    motion = scene_ego_motion(poses_along(times[:, None] * speed * direction, np.full(12, yaw)), times)
    expected = np.stack([np.zeros(8), speed * 0.5 * np.arange(1, 9), np.zeros(8)], -1)
    np.testing.assert_allclose(motion.future_trajectory[0], expected, atol=1e-9)
    assert motion.future_valid.sum(-1).tolist() == [8, 8, 8, 8, 7, 6, 5, 4, 3, 2, 1, 0]  # the scene ends
    assert not motion.future_trajectory[~motion.future_valid].any()  # missing steps are zero, and masked
    np.testing.assert_allclose(motion.velocity, [[speed, 0.0]] * 12, atol=1e-9)  # [forward, left]
    np.testing.assert_allclose(motion.acceleration, 0.0, atol=1e-9)
    status = motion.ego_status()
    assert status.shape == (12, 8)
    assert status[0, 4:].tolist() == [0, 1, 0, 0] and status[-1, 4:].tolist() == [0, 0, 0, 1]  # straight; unknown
    np.testing.assert_allclose(status[:, :4], np.concatenate([motion.velocity, motion.acceleration], -1))
    assert EGO_STATUS_FIELDS == dvgt2.EGO_STATUS_FIELDS  # the order the model reads


@pytest.mark.parametrize("turn, command", [(1.0, "right"), (-1.0, "left")])
def test_turns_give_heading_lateral_offset_and_command(turn, command):
    radius, speed, times = 20.0, 5.0, np.arange(10) * 0.5
    angle = speed * times / radius  # an arc turning right (turn = 1) or left (turn = -1), starting along +z
    xz = np.stack([turn * radius * (1 - np.cos(angle)), radius * np.sin(angle)], -1)
    motion = scene_ego_motion(poses_along(xz, turn * angle), times)
    final = motion.future_trajectory[0, -1]
    assert np.sign(final[0]) == turn and abs(final[0]) > 2  # lateral offset towards the turn
    assert final[2] == pytest.approx(turn * angle[8], abs=1e-9)  # heading: the yaw change after 4 s
    assert COMMANDS[motion.driving_command[0]] == command
    assert motion.velocity[3, 0] == pytest.approx(speed, rel=1e-2) and abs(motion.velocity[3, 1]) < 0.1
    centripetal = speed ** 2 / radius  # towards the inside of the turn: left when turning right
    assert motion.acceleration[4, 1] == pytest.approx(-turn * centripetal, rel=0.05)


def test_faster_annotations_are_resampled_at_2hz_and_gaps_are_invalid():
    times = np.arange(41) * 0.1  # 10 Hz, 4 s
    motion = scene_ego_motion(poses_along(np.stack([np.zeros(41), 3.0 * times], -1), np.zeros(41)), times)
    np.testing.assert_allclose(motion.future_trajectory[0, :, 1], 1.5 * np.arange(1, 9), atol=1e-9)
    assert motion.future_valid[0].all() and motion.future_valid[1].sum() == 7
    gap_times = np.array([0.0, 0.5, 1.0, 3.0, 3.5])  # 2 s without annotations
    gapped = scene_ego_motion(poses_along(np.stack([np.zeros(5), gap_times], -1), np.zeros(5)), gap_times)
    assert gapped.future_valid[0].tolist() == [True, True, False, False, False, True, True, False]


def test_measured_columns_replace_derived_status_and_bad_values_are_refused(tmp_path):
    generate_synthetic_dataset(tmp_path, "train", num_scenes=1, num_frames=3, height=16, width=32, seed=0)
    table_path = layout.list_scene_tables(tmp_path, "train")[0]
    scene = layout.read_scene_table(table_path, tmp_path)
    assert scene.measured == {}
    rows = layout.pq.read_table(table_path).to_pylist()
    for row in rows:
        row.update(ego_velocity=[float(row["frame_index"]), 0.5], ego_acceleration=[0.1, 0.2], driving_command=2)
    layout.write_scene_table(tmp_path, "train", scene.name, rows)
    dataset = ClipDataset("synthetic", tmp_path, "train")
    clip = dataset.load_clip(0, 0, views=1, frames=3, height=16, width=32)
    np.testing.assert_allclose(clip["ego_status"].numpy(), [[f, 0.5, 0.1, 0.2, 0, 0, 1, 0] for f in range(3)],
                               atol=1e-6)
    rows[0]["driving_command"] = 7
    layout.write_scene_table(tmp_path, "train", scene.name, rows)
    with pytest.raises(ValueError, match="driving_command must be 0"):
        layout.read_scene_table(table_path, tmp_path)


def test_clip_local_points_relative_poses_and_planning_targets_agree(tiny_data_root):
    dataset = ClipDataset("synthetic", tiny_data_root, "train", frame_stride=2)
    clip = dataset.load_clip(1, 0, views=2, frames=3, height=32, width=64)
    # local points are the first-frame points seen from each frame's own ego frame
    first_to_ego = torch.linalg.inv(clip["ego_to_first"])
    moved = transform_points(first_to_ego[:, None].expand(-1, 2, -1, -1), clip["points"])
    valid = clip["point_masks"]
    torch.testing.assert_close(moved[valid], clip["points_local"][valid], atol=2e-3, rtol=0)
    # relative poses ego_{t-1} -> ego_t (with the clip's stride) chain back to ego_t -> ego_0
    chained = chain_relative_poses(absT_quaR_to_pose(clip["relative_pose"].double()))
    torch.testing.assert_close(chained.float(), clip["ego_to_first"], atol=1e-4, rtol=0)
    assert clip["relative_pose"][0].tolist() == [0, 0, 0, 0, 0, 0, 1]
    # the future trajectory stays at 2 Hz whatever the stride: frame 1 of the clip is 2 annotated frames
    # (1 s) later, so it is the second waypoint of frame 0
    position_1 = clip["ego_to_first"][1, [0, 2], 3]
    torch.testing.assert_close(clip["future_trajectory"][0, 1, :2], position_1, atol=1e-4, rtol=0)
    assert clip["future_valid"].shape == (3, FUTURE_STEPS) and clip["ego_status"].shape == (3, 8)
    assert clip["future_valid"][0].sum() == 5  # scenes of 6 frames: 5 future frames after frame 0
    assert math.isclose(clip["ego_status"][:, 4:].sum(), 3)  # one command per frame


def test_anchors_command_writes_files_within_the_data_range(tmp_path):
    root = tmp_path / "data"
    generate_synthetic_dataset(root, "train", num_scenes=3, num_frames=12, height=16, width=32, seed=2)
    result = subprocess.run([sys.executable, "-m", "dvgt", "anchors", "--data", str(root), "--k", "6"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    anchors = read_anchors(root / "anchors" / "anchors.npz")
    assert anchors["trajectory"].shape == (6, 8, 2) and anchors["pose_translation"].shape == (6, 3)
    assert anchors["trajectory"].dtype == np.float32
    assert (root / "anchors" / "anchors.png").stat().st_size > 10_000
    dataset = ClipDataset("synthetic", root, "train")
    futures = np.concatenate([m.future_trajectory[m.future_valid.all(-1), :, :2] for m in dataset.motion])
    assert len(futures) == 3 * 4  # frames 0..3 of each 12-frame scene have a complete 4 s future
    low, high = futures.min(0), futures.max(0)  # [8, 2]: per waypoint
    assert np.all(anchors["trajectory"] >= low - 1e-4) and np.all(anchors["trajectory"] <= high + 1e-4)
    assert np.all(anchors["pose_translation"][:, 2] < 0)  # the previous ego lies behind the current one
    np.testing.assert_allclose(compute_anchors(root, k=6)["trajectory"], anchors["trajectory"])  # deterministic


def test_anchors_need_enough_complete_futures_and_missing_files_say_how_to_make_them(tiny_data_root, tmp_path):
    result = subprocess.run([sys.executable, "-m", "dvgt", "anchors", "--data", str(tiny_data_root), "--out",
                             str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "20 trajectory anchors need at least 20 samples" in result.stderr
    entry = type("Entry", (), {"name": "nuscenes", "root": str(tmp_path), "split": "train"})()
    with pytest.raises(FileNotFoundError, match="dvgt anchors --data"):
        ensure_anchors(tmp_path / "missing.npz", entry, "model.anchors")
