"""Pose and camera helpers on torch tensors with any leading batch dimensions.

Conventions (docs/data.md): cameras and the ego vehicle use OpenCV axes (x right, y down,
z forward); a pose ``a_to_b`` is a 4x4 matrix mapping homogeneous points of frame a into frame b;
quaternions are xyzw (scalar last); the absT_quaR encoding of a pose is [t (3), quaternion (4)];
pixel coordinates follow OpenCV: the centre of pixel column i is at x = i.
"""

from __future__ import annotations

import torch


def inverse_pose(pose: torch.Tensor) -> torch.Tensor:
    """Inverse of rigid transforms [..., 4, 4] (uses R^T instead of a general matrix inverse)."""
    rotation_t = pose[..., :3, :3].transpose(-1, -2)
    inverse = torch.zeros_like(pose)
    inverse[..., :3, :3] = rotation_t
    inverse[..., :3, 3] = -(rotation_t @ pose[..., :3, 3:4])[..., 0]
    inverse[..., 3, 3] = 1
    return inverse


def rotation_to_quaternion(rotation: torch.Tensor) -> torch.Tensor:
    """Rotation matrices [..., 3, 3] -> unit quaternions [..., 4] xyzw with w >= 0.

    Each of the four textbook formulas divides by one of 4w^2, 4x^2, 4y^2, 4z^2; we evaluate all
    four and keep, per matrix, the one whose divisor is largest, which is numerically stable.
    """
    m = rotation
    m00, m11, m22 = m[..., 0, 0], m[..., 1, 1], m[..., 2, 2]
    four_squares = torch.stack(
        [1 + m00 + m11 + m22, 1 + m00 - m11 - m22, 1 - m00 + m11 - m22, 1 - m00 - m11 + m22], dim=-1
    )  # 4w², 4x², 4y², 4z²
    d21, d02, d10 = m[..., 2, 1] - m[..., 1, 2], m[..., 0, 2] - m[..., 2, 0], m[..., 1, 0] - m[..., 0, 1]
    s21, s02, s10 = m[..., 2, 1] + m[..., 1, 2], m[..., 0, 2] + m[..., 2, 0], m[..., 1, 0] + m[..., 0, 1]
    # Row k is 4 * q_k * (x, y, z, w): the quaternion scaled by the k-th component of four_squares.
    candidates = torch.stack(
        [
            torch.stack([d21, d02, d10, four_squares[..., 0]], dim=-1),
            torch.stack([four_squares[..., 1], s10, s02, d21], dim=-1),
            torch.stack([s10, four_squares[..., 2], s21, d02], dim=-1),
            torch.stack([s02, s21, four_squares[..., 3], d10], dim=-1),
        ],
        dim=-2,
    )
    best = four_squares.argmax(dim=-1, keepdim=True)
    quaternion = torch.take_along_dim(candidates, best[..., None], dim=-2)[..., 0, :]
    quaternion = quaternion / quaternion.norm(dim=-1, keepdim=True)
    return torch.where(quaternion[..., 3:] < 0, -quaternion, quaternion)


def quaternion_to_rotation(quaternion: torch.Tensor) -> torch.Tensor:
    """Quaternions [..., 4] xyzw (normalised here) -> rotation matrices [..., 3, 3]."""
    x, y, z, w = (quaternion / quaternion.norm(dim=-1, keepdim=True)).unbind(-1)
    rows = [
        1 - 2 * (y * y + z * z),
        2 * (x * y - z * w),
        2 * (x * z + y * w),
        2 * (x * y + z * w),
        1 - 2 * (x * x + z * z),
        2 * (y * z - x * w),
        2 * (x * z - y * w),
        2 * (y * z + x * w),
        1 - 2 * (x * x + y * y),
    ]
    return torch.stack(rows, dim=-1).reshape(*quaternion.shape[:-1], 3, 3)


def pose_to_absT_quaR(pose: torch.Tensor) -> torch.Tensor:
    """Rigid transforms [..., 4, 4] -> absT_quaR encoding [..., 7] = [t, quaternion xyzw]."""
    return torch.cat([pose[..., :3, 3], rotation_to_quaternion(pose[..., :3, :3])], dim=-1)


def absT_quaR_to_pose(encoding: torch.Tensor) -> torch.Tensor:
    """absT_quaR encoding [..., 7] -> rigid transforms [..., 4, 4]."""
    pose = torch.zeros(*encoding.shape[:-1], 4, 4, dtype=encoding.dtype, device=encoding.device)
    pose[..., :3, :3] = quaternion_to_rotation(encoding[..., 3:])
    pose[..., :3, 3] = encoding[..., :3]
    pose[..., 3, 3] = 1
    return pose


def transform_points(pose: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Apply rigid transforms [..., 4, 4] to points [..., *grid, 3] (grid: any shape, e.g. H, W)."""
    batch = pose.shape[:-2]
    flat = points.reshape(*batch, -1, 3)
    moved = flat @ pose[..., :3, :3].transpose(-1, -2) + pose[..., None, :3, 3]
    return moved.reshape(points.shape)


def pixel_grid(height: int, width: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Homogeneous pixel-centre coordinates [H, W, 3] = (x, y, 1) with x = column, y = row."""
    ys, xs = torch.meshgrid(torch.arange(height, dtype=dtype), torch.arange(width, dtype=dtype), indexing="ij")
    return torch.stack([xs, ys, torch.ones_like(xs)], dim=-1)


def unproject_depth(depth: torch.Tensor, intrinsics: torch.Tensor) -> torch.Tensor:
    """Z-depth maps [..., H, W] and intrinsics [..., 3, 3] -> camera-frame points [..., H, W, 3]."""
    height, width = depth.shape[-2:]
    rays = pixel_grid(height, width, depth.dtype).to(depth.device)  # [H, W, 3]
    rays = rays @ torch.linalg.inv(intrinsics).transpose(-1, -2)[..., None, :, :]  # z component is 1
    return rays * depth[..., None]


def project_points(points: torch.Tensor, intrinsics: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Camera-frame points [..., N, 3] -> (pixel coordinates [..., N, 2], z-depth [..., N])."""
    z = points[..., 2]
    uvw = points @ intrinsics.transpose(-1, -2)
    return uvw[..., :2] / z[..., None], z


def chain_relative_poses(relative: torch.Tensor) -> torch.Tensor:
    """Poses ego_t -> ego_0 [..., T, 4, 4] from relative poses ego_{t-1} -> ego_t [..., T, 4, 4].

    The relative pose of frame 0 is ignored (frame 0 maps to itself).
    """
    chained = [torch.eye(4, dtype=relative.dtype, device=relative.device).expand_as(relative[..., 0, :, :])]
    for t in range(1, relative.shape[-3]):
        chained.append(chained[-1] @ inverse_pose(relative[..., t, :, :]))  # ego_t -> ego_{t-1} -> ego_0
    return torch.stack(chained, dim=-3)


def camera_pose_encoding(extrinsics: torch.Tensor, intrinsics: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """VGGT's absT_quaR_FoV encoding [..., 9] of cameras.

    extrinsics: [..., 4, 4] world -> camera (for VGGT, first camera -> camera); intrinsics: [..., 3, 3]
    of height x width images. The encoding is [t (3), quaternion xyzw (4), fov_h, fov_w] with
    fov_h = 2 atan(height / 2 / fy) and fov_w = 2 atan(width / 2 / fx), in radians.
    """
    fov_h = 2 * torch.atan(height / 2 / intrinsics[..., 1, 1])
    fov_w = 2 * torch.atan(width / 2 / intrinsics[..., 0, 0])
    return torch.cat([pose_to_absT_quaR(extrinsics), fov_h[..., None], fov_w[..., None]], dim=-1)


def pose_to_trajectory_rdf(pose: torch.Tensor) -> torch.Tensor:
    """Relative poses [..., 4, 4] (future ego -> current ego, RDF axes) -> [..., 3] = (right, forward,
    heading), heading = atan2 of the future forward axis' right and forward components (positive to the
    right). The official targets of DVGT-2's planning head (utils/trajectory.py)."""
    heading = torch.atan2(pose[..., 0, 2], pose[..., 2, 2])
    return torch.stack([pose[..., 0, 3], pose[..., 2, 3], heading], dim=-1)


def trajectory_rdf_to_flu(trajectory: torch.Tensor) -> torch.Tensor:
    """(right, forward, heading to the right) [..., 3] -> NAVSIM's (x forward, y left, yaw to the left)."""
    return torch.stack([trajectory[..., 1], -trajectory[..., 0], -trajectory[..., 2]], dim=-1)
