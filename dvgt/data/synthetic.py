"""Procedural driving scenes written as an official DVGT tree (dataset ``demo``), with exact depth.

A scene is a flat world (ground plane y = 0; the world uses the same OpenCV-style axes as the ego:
y points down, so "up" is -y) with a curved road, buildings, poles and parked cars (boxes with a
yaw). An ego vehicle drives along its lane with varying speed and small yaw changes; a rig of
cameras (``RIG``) on its roof sees the scene. Every pixel is a ray, intersected analytically with
the ground and the boxes (vectorised numpy), so the stored depth is exact up to the 16-bit PNG
quantisation (4 mm), and the image is shaded from the same ray hits: procedural textures (road
markings, pavement tiles, grass, windows, value noise) give the images features to match. Sky and
anything beyond ``MAX_DEPTH`` has no depth (stored as infinite, as the official writer stores sky)
and fades into haze.

The tree is what the official preprocessing writes (dvgt/data/format.py): one parquet per split with
the official columns (camera-from-world extrinsics, world-from-ego poses with RDF ego axes, ego
velocity and acceleration as [right, forward], the NavSim driving-command order of the ``demo``
dataset, frame tokens), JPEG images and log-encoded dense depth PNGs. The rig is the eight
OpenScene cameras of the official ``demo`` dataset, so the official dataset class reads it too.

The ego frame's origin is on the ground under the vehicle, so every surface lies at y <= 0 in
ego coordinates; the tests use that to check the frame conventions.
"""

from __future__ import annotations

import os
import shutil
import uuid
import zlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dvgt.data import format as fmt

MAX_DEPTH = 80.0  # metres; farther hits are invalid and rendered as haze
FRAME_RATE = 2.0  # Hz, as the DVGT annotations
ROAD_HALF_WIDTH = 5.0
SIDEWALK_WIDTH = 3.0
LANE_OFFSET = 1.6  # ego lateral position (to the right of the centre line)
ROAD_BEHIND, ROAD_AHEAD = 60.0, 100.0  # road and objects extend this far around the driven part
NEAR = 0.05

BUILDING, CAR, POLE = 0, 1, 2
SUN = np.array([0.45, -0.8, 0.4]) / np.linalg.norm([0.45, -0.8, 0.4])  # direction towards the sun
HAZE = np.array([0.80, 0.85, 0.92])
ZENITH = np.array([0.35, 0.55, 0.85])


@dataclass(frozen=True)
class CameraMount:
    yaw_deg: float  # about the ego's down axis: positive turns right
    position: tuple[float, float, float]  # in the ego frame (metres; y = -height)
    hfov_deg: float
    principal_offset: tuple[float, float]  # principal point offset from the centre, in image fractions
    pitch_down_deg: float = 3.0


DATASET = "demo"  # the official dataset name whose cameras (OpenScene's) the rig has
RIG = {  # OpenScene's eight cameras, 45 degrees apart; neighbours overlap by about 20 degrees
    "CAM_F0": CameraMount(0.0, (0.0, -1.55, 1.6), 66.0, (0.010, 0.020)),
    "CAM_B0": CameraMount(180.0, (0.0, -1.55, -1.0), 66.0, (0.005, 0.010)),
    "CAM_L0": CameraMount(-45.0, (-0.6, -1.55, 1.3), 66.0, (-0.015, 0.010)),
    "CAM_L1": CameraMount(-90.0, (-0.9, -1.55, 0.3), 66.0, (0.010, -0.010)),
    "CAM_L2": CameraMount(-135.0, (-0.7, -1.55, -0.6), 66.0, (0.000, 0.020)),
    "CAM_R0": CameraMount(45.0, (0.6, -1.55, 1.3), 66.0, (0.020, 0.015)),
    "CAM_R1": CameraMount(90.0, (0.9, -1.55, 0.3), 66.0, (-0.010, 0.005)),
    "CAM_R2": CameraMount(135.0, (0.7, -1.55, -0.6), 66.0, (-0.010, 0.015)),
}
assert list(RIG) == list(fmt.CAMERAS[DATASET])  # the official dataset's cameras, in its order
COMMANDS = fmt.COMMAND_ORDER[DATASET] or ()  # left, forward, right, unknown
COMMAND_LATERAL_M = 2.0  # lateral offset 4 s ahead that counts as a turn (the nuScenes planning convention)


def demo_spec(split: str) -> dict:
    """Generator arguments of the demo dataset: 16 train / 4 val scenes of 12 frames (6 s at 2 Hz), 112x200.

    12 frames hold a clip of up to 4 frames with DVGT-2's 8 future frames (its 4 s planning horizon).
    """
    return dict(num_scenes=16 if split == "train" else 4, num_frames=12, height=112, width=200)


# --------------------------------------------------------------------------------------------
# Small geometry helpers (numpy)
# --------------------------------------------------------------------------------------------


def _rotation_y(angle: np.ndarray | float) -> np.ndarray:
    """Rotation about the down axis (yaw): maps forward (0, 0, 1) to (sin a, 0, cos a)."""
    c, s = np.cos(angle), np.sin(angle)
    zero, one = np.zeros_like(c), np.ones_like(c)
    return np.stack([np.stack([c, zero, s], -1), np.stack([zero, one, zero], -1), np.stack([-s, zero, c], -1)], -2)


def _rotation_x(angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])


def _rigid(rotation: np.ndarray, translation: np.ndarray) -> np.ndarray:
    pose = np.zeros(rotation.shape[:-2] + (4, 4))
    pose[..., :3, :3] = rotation
    pose[..., :3, 3] = translation
    pose[..., 3, 3] = 1.0
    return pose


def camera_intrinsics(mount: CameraMount, height: int, width: int) -> np.ndarray:
    focal = 0.5 * width / np.tan(np.radians(mount.hfov_deg) / 2)
    cx = (width - 1) / 2 + mount.principal_offset[0] * width
    cy = (height - 1) / 2 + mount.principal_offset[1] * height
    return np.array([[focal, 0.0, cx], [0.0, focal, cy], [0.0, 0.0, 1.0]])


def camera_to_ego(mount: CameraMount) -> np.ndarray:
    rotation = _rotation_y(np.radians(mount.yaw_deg)) @ _rotation_x(-np.radians(mount.pitch_down_deg))
    return _rigid(rotation, np.array(mount.position))


# --------------------------------------------------------------------------------------------
# Scene construction
# --------------------------------------------------------------------------------------------


@dataclass
class Boxes:
    """Boxes standing on the ground, each rotated by a yaw about the down axis."""

    centre: np.ndarray  # [M, 3] world
    half_size: np.ndarray  # [M, 3] along the box's local x (across), y (down), z (along)
    rotation: np.ndarray  # [M, 3, 3] local -> world
    colour: np.ndarray  # [M, 3]
    kind: np.ndarray  # [M] BUILDING | CAR | POLE


@dataclass
class Road:
    """The road's centre line, sampled every metre; lateral offsets are positive to the right."""

    s: np.ndarray  # [K] arc length
    xz: np.ndarray  # [K, 2] ground position
    heading: np.ndarray  # [K] yaw of the driving direction

    @staticmethod
    def random(rng: np.random.Generator, length: float) -> Road:
        """Smoothly varying curvature (radius >= about 60 m) from ROAD_BEHIND metres behind the start to ``length``."""
        s = np.arange(-ROAD_BEHIND, length + 1.0)
        curvature = np.zeros_like(s)
        for amplitude, wavelength in ((0.012, rng.uniform(150, 400)), (0.005, rng.uniform(50, 120))):
            curvature += rng.uniform(-amplitude, amplitude) * np.sin(
                2 * np.pi * s / wavelength + rng.uniform(0, 2 * np.pi)
            )
        heading = rng.uniform(-np.pi, np.pi) + np.cumsum(curvature)
        xz = np.cumsum(np.stack([np.sin(heading), np.cos(heading)], -1), axis=0)
        return Road(s, xz - xz[int(ROAD_BEHIND)], heading)  # the start (s = 0) is the world origin

    def point(self, s: np.ndarray, lateral: np.ndarray | float = 0.0) -> tuple[np.ndarray, np.ndarray]:
        """Ground positions [N, 2] (x, z) and road headings at arc lengths s, ``lateral`` metres to the right."""
        theta = np.interp(s, self.s, self.heading)
        centre = np.stack([np.interp(s, self.s, self.xz[:, 0]), np.interp(s, self.s, self.xz[:, 1])], -1)
        right = np.stack([np.cos(theta), -np.sin(theta)], -1)  # the ego's x axis on the ground
        return centre + np.asarray(lateral)[..., None] * right, theta

    def coordinates(self, x: np.ndarray, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(lateral offset, arc length) of ground points: start at the nearest of a few centre-line
        samples, then slide along the road until the offset is perpendicular to it."""
        coarse = slice(None, None, 16)
        squared = (x[:, None] - self.xz[coarse, 0]) ** 2 + (z[:, None] - self.xz[coarse, 1]) ** 2
        along = self.s[coarse][np.argmin(squared, axis=1)]
        for _ in range(3):
            centre, theta = self.point(along)
            dx, dz = x - centre[:, 0], z - centre[:, 1]
            along = np.clip(along + dx * np.sin(theta) + dz * np.cos(theta), self.s[0], self.s[-1])
        return dx * np.cos(theta) - dz * np.sin(theta), along


@dataclass
class SyntheticScene:
    road: Road
    boxes: Boxes
    ego_to_world: np.ndarray  # [F, 4, 4]
    texture_seed: int


def _boxes_along_road(rng, road: Road, kind: int, s_range, gap, along, across, height, lateral, colours, yaw_jitter):
    """Boxes placed on both sides of the road at random spacing; sizes and offsets are (low, high) ranges."""
    placed = []
    for side in (-1.0, 1.0):
        s = s_range[0] + rng.uniform(0, gap[1])
        while s < s_range[1]:
            size = np.array([rng.uniform(*across), rng.uniform(*height), rng.uniform(*along)])
            offset = side * (rng.uniform(*lateral) + (size[0] / 2 if kind == BUILDING else 0.0))
            placed.append((s + size[2] / 2, offset, size, rng.uniform(-yaw_jitter, yaw_jitter)))
            s += size[2] + rng.uniform(*gap)
    s, offset, size, yaw = (np.array(v) for v in zip(*placed))
    xz, theta = road.point(s, offset)
    centre = np.stack([xz[:, 0], -size[:, 1] / 2, xz[:, 1]], -1)
    colour = colours[rng.integers(len(colours), size=len(s))] * rng.uniform(0.8, 1.15, size=(len(s), 1))
    return Boxes(centre, size / 2, _rotation_y(theta + yaw), np.clip(colour, 0, 1), np.full(len(s), kind))


WALL_COLOURS = np.array(
    [
        [0.75, 0.68, 0.55],
        [0.62, 0.40, 0.32],
        [0.82, 0.80, 0.76],
        [0.55, 0.58, 0.62],
        [0.70, 0.55, 0.40],
        [0.45, 0.38, 0.34],
    ]
)
CAR_COLOURS = np.array(
    [
        [0.75, 0.10, 0.10],
        [0.10, 0.20, 0.60],
        [0.90, 0.90, 0.88],
        [0.12, 0.12, 0.12],
        [0.55, 0.57, 0.60],
        [0.85, 0.65, 0.10],
    ]
)
POLE_COLOURS = np.array([[0.45, 0.45, 0.47]])


def build_scene(seed: np.random.SeedSequence, num_frames: int) -> SyntheticScene:
    """Road, objects and the ego trajectory of one scene (deterministic for the seed)."""
    rng = np.random.default_rng(seed)
    times = np.arange(num_frames) / FRAME_RATE
    speed, swing, period, phase = rng.uniform(5, 10), rng.uniform(0, 3), rng.uniform(4, 10), rng.uniform(0, 2 * np.pi)
    # arc length driven: the integral of the speed, speed + swing * sin(2 pi t / period + phase)
    ego_s = speed * times + swing * period / (2 * np.pi) * (np.cos(phase) - np.cos(2 * np.pi * times / period + phase))
    road = Road.random(rng, ego_s[-1] + ROAD_AHEAD)
    s_range = (-ROAD_BEHIND, ego_s[-1] + ROAD_AHEAD)
    curb = ROAD_HALF_WIDTH + SIDEWALK_WIDTH
    groups = [
        _boxes_along_road(
            rng,
            road,
            BUILDING,
            s_range,
            gap=(1, 12),
            along=(6, 18),
            across=(6, 14),
            height=(4, 22),
            lateral=(curb + 0.5, curb + 8),
            colours=WALL_COLOURS,
            yaw_jitter=0.15,
        ),
        _boxes_along_road(
            rng,
            road,
            POLE,
            s_range,
            gap=(10, 25),
            along=(0.25, 0.35),
            across=(0.25, 0.35),
            height=(4, 8),
            lateral=(ROAD_HALF_WIDTH + 0.4, ROAD_HALF_WIDTH + 0.8),
            colours=POLE_COLOURS,
            yaw_jitter=0.0,
        ),
        _boxes_along_road(
            rng,
            road,
            CAR,
            s_range,
            gap=(4, 40),
            along=(3.9, 4.8),
            across=(1.7, 1.9),
            height=(1.4, 1.7),
            lateral=(ROAD_HALF_WIDTH - 1.1, ROAD_HALF_WIDTH - 0.9),
            colours=CAR_COLOURS,
            yaw_jitter=0.05,
        ),
    ]
    boxes = Boxes(*(np.concatenate([getattr(b, f) for b in groups]) for f in Boxes.__dataclass_fields__))

    wobble = rng.uniform(0, 2 * np.pi, size=2)
    lateral = LANE_OFFSET + 0.2 * np.sin(0.8 * times + wobble[0])
    xz, theta = road.point(ego_s, lateral)
    yaw = theta + 0.03 * np.sin(1.3 * times + wobble[1])  # small steering oscillation
    position = np.stack([xz[:, 0], np.zeros(num_frames), xz[:, 1]], -1)
    return SyntheticScene(road, boxes, _rigid(_rotation_y(yaw), position), texture_seed=int(rng.integers(2**31)))


# --------------------------------------------------------------------------------------------
# Ray casting
# --------------------------------------------------------------------------------------------


def _pixel_rays(intrinsics: np.ndarray, height: int, width: int) -> np.ndarray:
    """Camera-frame ray directions [H, W, 3] through pixel centres, scaled so that z = 1 (t = z-depth)."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
    pixels = np.stack([xs, ys, np.ones_like(xs)], -1)
    return pixels @ np.linalg.inv(intrinsics).T


def _box_pixel_window(corners_cam: np.ndarray, intrinsics: np.ndarray, height: int, width: int):
    """Rows/columns slice of the pixels a box can cover, or None if it is behind the camera or off-image."""
    z = corners_cam[:, 2]
    if np.all(z < NEAR):
        return None
    if np.any(z < NEAR):  # straddles the camera plane: test every pixel
        return slice(0, height), slice(0, width)
    uv = corners_cam @ intrinsics.T
    u, v = uv[:, 0] / z, uv[:, 1] / z
    x0, x1 = max(int(np.floor(u.min())), 0), min(int(np.ceil(u.max())) + 1, width)
    y0, y1 = max(int(np.floor(v.min())), 0), min(int(np.ceil(v.max())) + 1, height)
    if x0 >= x1 or y0 >= y1:
        return None
    return slice(y0, y1), slice(x0, x1)


def _ray_box_entry(
    origin: np.ndarray, directions: np.ndarray, centre: np.ndarray, half_size: np.ndarray, rotation: np.ndarray
) -> np.ndarray:
    """Ray parameter where each ray enters the box (slab test), inf if it misses or starts inside.

    ``directions`` is [3, ...] (one plane per axis, which keeps the per-axis arithmetic contiguous).
    """
    local_dirs = np.tensordot(rotation.T, directions, axes=1)  # R^T d
    local_origin = rotation.T @ (origin - centre)
    t_near, t_far = -np.inf, np.inf
    with np.errstate(divide="ignore", invalid="ignore"):
        for axis in range(3):
            inverse = 1.0 / local_dirs[axis]
            t_low = (-half_size[axis] - local_origin[axis]) * inverse
            t_high = (half_size[axis] - local_origin[axis]) * inverse
            t_near = np.maximum(t_near, np.minimum(t_low, t_high))
            t_far = np.minimum(t_far, np.maximum(t_low, t_high))
    return np.where((t_near <= t_far) & (t_near > NEAR), t_near, np.inf)


def cast_rays(scene: SyntheticScene, cam_to_world: np.ndarray, intrinsics: np.ndarray, height: int, width: int):
    """Nearest hit of every pixel ray: (ray directions [H, W, 3] world, t = z-depth [H, W] (inf = none),
    hit id [H, W]: -1 nothing, 0 ground, k + 1 box k)."""
    rays = _pixel_rays(intrinsics, height, width) @ cam_to_world[:3, :3].T
    origin = cam_to_world[:3, 3]
    with np.errstate(divide="ignore", invalid="ignore"):
        depth = np.where(rays[..., 1] > 1e-9, -origin[1] / rays[..., 1], np.inf)  # the ground plane y = 0
    hit = np.where(np.isfinite(depth), 0, -1)

    boxes = scene.boxes
    max_range = MAX_DEPTH * np.linalg.norm(rays, axis=-1).max()  # z-depth MAX_DEPTH at the widest ray
    near_enough = np.linalg.norm(boxes.centre - origin, axis=-1) - np.linalg.norm(boxes.half_size, axis=-1) < max_range
    signs = np.array(np.meshgrid([-1, 1], [-1, 1], [-1, 1])).reshape(3, -1).T  # the 8 corners
    world_to_cam = np.linalg.inv(cam_to_world)
    ray_planes = np.ascontiguousarray(np.moveaxis(rays, -1, 0))
    for k in np.flatnonzero(near_enough):
        corners = boxes.centre[k] + (signs * boxes.half_size[k]) @ boxes.rotation[k].T
        window = _box_pixel_window(corners @ world_to_cam[:3, :3].T + world_to_cam[:3, 3], intrinsics, height, width)
        if window is None:
            continue
        t = _ray_box_entry(
            origin, ray_planes[(slice(None), *window)], boxes.centre[k], boxes.half_size[k], boxes.rotation[k]
        )
        closer = t < depth[window]
        depth[window] = np.where(closer, t, depth[window])
        hit[window] = np.where(closer, k + 1, hit[window])
    return rays, depth, hit


# --------------------------------------------------------------------------------------------
# Shading
# --------------------------------------------------------------------------------------------


def _hash(i: np.ndarray, j: np.ndarray, seed: int) -> np.ndarray:
    """Pseudo-random values in [0, 1) at integer lattice points (multiply / xor-shift integer hash)."""
    h = (i.astype(np.int64) * 0x27D4EB2D + j.astype(np.int64) * 0x165667B1 + seed) & 0xFFFFFFFF
    for multiplier in (0x2C1B3C6D, 0x297A2D39):
        h ^= h >> 15
        h = (h * multiplier) & 0xFFFFFFFF
    return (h ^ (h >> 15)) / 2.0**32


def value_noise(x: np.ndarray, y: np.ndarray, seed: int, octaves: int = 2) -> np.ndarray:
    """Smooth pseudo-random texture in [0, 1] over the plane (hashed lattice values, interpolated)."""
    total, norm = np.zeros_like(x), 0.0
    for octave in range(octaves):
        scale = 2.0**octave
        xs, ys = x * scale, y * scale
        i, j = np.floor(xs), np.floor(ys)
        fx, fy = xs - i, ys - j
        fx, fy = fx * fx * (3 - 2 * fx), fy * fy * (3 - 2 * fy)
        top = _hash(i, j, seed) * (1 - fx) + _hash(i + 1, j, seed) * fx
        bottom = _hash(i, j + 1, seed) * (1 - fx) + _hash(i + 1, j + 1, seed) * fx
        total += (top * (1 - fy) + bottom * fy) / scale
        norm += 1 / scale
    return total / norm


def _ground_albedo(scene: SyntheticScene, x: np.ndarray, z: np.ndarray) -> np.ndarray:
    lateral, along = scene.road.coordinates(x, z)
    seed, side = scene.texture_seed, np.abs(lateral)
    fine = value_noise(x * 3, z * 3, seed)[:, None]
    grass = np.array([0.30, 0.42, 0.20]) * (0.55 + 0.9 * value_noise(x * 0.6, z * 0.6, seed + 1, 3))[:, None]
    tiles = ((along / 1.5) % 1 < 0.05) | ((side / 1.5) % 1 < 0.05)
    sidewalk = np.array([0.62, 0.60, 0.56]) * (0.85 + 0.3 * fine) * np.where(tiles, 0.7, 1.0)[:, None]
    asphalt = np.array([0.33, 0.33, 0.35]) * (0.75 + 0.5 * fine)
    marking = ((side < 0.1) & (along % 6.0 < 3.0)) | (np.abs(side - (ROAD_HALF_WIDTH - 0.25)) < 0.1)
    colour = np.select(
        [side[:, None] < ROAD_HALF_WIDTH, side[:, None] < ROAD_HALF_WIDTH + SIDEWALK_WIDTH], [asphalt, sidewalk], grass
    )
    return np.where(marking[:, None], np.array([0.92, 0.92, 0.86]), colour)


def _box_albedo_and_normal(scene: SyntheticScene, box: np.ndarray, points: np.ndarray):
    """Texture colour and world normal of hits on boxes (``box``: index per hit, ``points``: world hits)."""
    boxes = scene.boxes
    local = np.einsum("nij,ni->nj", boxes.rotation[box], points - boxes.centre[box])  # R^T (p - c)
    half = boxes.half_size[box]
    face = np.argmax(np.abs(local) / half, axis=-1)  # axis of the face that was hit
    normal_local = np.zeros_like(local)
    normal_local[np.arange(len(box)), face] = np.sign(local[np.arange(len(box)), face])
    normal = np.einsum("nij,nj->ni", boxes.rotation[box], normal_local)
    across = np.where(face == 0, local[:, 2], local[:, 0])  # horizontal coordinate on the face
    height = -points[:, 1]  # above the ground
    kind = boxes.kind[box]
    noise = value_noise(across * 2 + box * 13.7, height * 2, scene.texture_seed)[:, None]
    colour = boxes.colour[box] * (0.75 + 0.5 * noise)
    column, storey = (across / 3.0) % 1, (height / 3.2) % 1
    window = (
        (kind == BUILDING)
        & (face != 1)
        & (height > 1.0)
        & (column > 0.3)
        & (column < 0.8)
        & (storey > 0.3)
        & (storey < 0.75)
    )
    car_glass = (kind == CAR) & (height > 1.0) & (height < 1.35) & (face != 1)
    tyres = (kind == CAR) & (height < 0.35)
    dark = np.array([0.12, 0.15, 0.20]) * (0.7 + 0.6 * noise)
    colour = np.where((window | car_glass | tyres)[:, None], dark, colour)
    return colour, normal


def shade(
    scene: SyntheticScene, rays: np.ndarray, origin: np.ndarray, depth: np.ndarray, hit: np.ndarray
) -> np.ndarray:
    """RGB [H, W, 3] in [0, 1]: Lambert-shaded albedo, fading into haze towards MAX_DEPTH; sky elsewhere."""
    shape = rays.shape
    rays, depth, hit = rays.reshape(-1, 3), depth.reshape(-1), hit.reshape(-1)
    elevation = np.clip(-rays[:, 1] / np.linalg.norm(rays, axis=-1) * 2.5, 0, 1)[:, None]
    image = HAZE * (1 - elevation) + ZENITH * elevation
    in_range = depth < MAX_DEPTH
    ground = np.flatnonzero((hit == 0) & in_range)
    points = origin + rays[ground] * depth[ground, None]
    image[ground] = _ground_albedo(scene, points[:, 0], points[:, 2]) * _lambert(np.array([0.0, -1.0, 0.0]))
    on_box = np.flatnonzero((hit > 0) & in_range)
    albedo, normal = _box_albedo_and_normal(scene, hit[on_box] - 1, origin + rays[on_box] * depth[on_box, None])
    image[on_box] = albedo * _lambert(normal)[:, None]
    hazy = np.flatnonzero((hit >= 0) & in_range & (depth > 0.6 * MAX_DEPTH))
    fog = ((depth[hazy] - 0.6 * MAX_DEPTH) / (0.4 * MAX_DEPTH))[:, None]
    image[hazy] = image[hazy] * (1 - fog) + HAZE * fog
    return np.clip(image, 0, 1).reshape(shape)


def _lambert(normal: np.ndarray) -> np.ndarray:
    """Ambient plus diffuse sunlight for unit normals [..., 3]."""
    return 0.55 + 0.5 * np.clip(normal @ SUN, 0, 1)


def render_view(scene: SyntheticScene, cam_to_world: np.ndarray, intrinsics: np.ndarray, height: int, width: int):
    """(RGB uint8 [H, W, 3], exact z-depth in metres [H, W] with 0 where nothing is within MAX_DEPTH)."""
    rays, depth, hit = cast_rays(scene, cam_to_world, intrinsics, height, width)
    rgb = shade(scene, rays, cam_to_world[:3, 3], depth, hit)
    valid = (hit >= 0) & (depth < MAX_DEPTH)
    return np.round(rgb * 255).astype(np.uint8), np.where(valid, depth, 0.0)


# --------------------------------------------------------------------------------------------
# Writing datasets
# --------------------------------------------------------------------------------------------


def scene_seed(seed: int, split: str, index: int) -> np.random.SeedSequence:
    """Independent seed per (seed, split, scene): different splits never share scenes."""
    return np.random.SeedSequence([seed, zlib.crc32(split.encode()), index])


def scene_name(split: str, index: int) -> str:
    return f"synthetic-{split}-{index:04d}"


def ego_status(ego_to_world: np.ndarray) -> dict[str, np.ndarray]:
    """The parquet's ego columns per frame, from the poses: velocity and acceleration in each frame's ego
    axes as [right, forward] (finite differences at FRAME_RATE), and the driving command one-hot in the
    demo dataset's order (left / right when the ego is more than 2 m to that side 4 s later, forward
    otherwise, unknown when the scene ends before)."""
    frames = len(ego_to_world)
    dt = 1.0 / FRAME_RATE
    velocity = np.gradient(ego_to_world[:, :3, 3], dt, axis=0) if frames > 1 else np.zeros((frames, 3))
    acceleration = np.gradient(velocity, dt, axis=0) if frames > 1 else np.zeros((frames, 3))
    horizon = int(4 * FRAME_RATE)
    command = np.zeros((frames, 4))
    for f in range(frames):
        if f + horizon >= frames:
            command[f, COMMANDS.index("unknown")] = 1
            continue
        right = (np.linalg.inv(ego_to_world[f]) @ ego_to_world[f + horizon])[0, 3]
        turn = "right" if right > COMMAND_LATERAL_M else "left" if right < -COMMAND_LATERAL_M else "forward"
        command[f, COMMANDS.index(turn)] = 1
    rotation = ego_to_world[:, :3, :3]
    right_forward = [np.einsum("fji,fj->fi", rotation, v)[:, [0, 2]] for v in (velocity, acceleration)]  # R^T v
    return {"ego_velocity": right_forward[0], "ego_acceleration": right_forward[1], "driving_command": command}


def render_scene(
    root: Path, split: str, index: int, num_frames: int, height: int, width: int, seed: int
) -> dict[str, list]:
    """Render one scene's frames and cameras, write its images and depths; returns its parquet rows."""
    scene = build_scene(scene_seed(seed, split, index), num_frames)
    name = scene_name(split, index)
    tree = fmt.Tree(root, DATASET)
    rng = np.random.default_rng(scene_seed(seed, split, index).spawn(1)[0])
    tokens = [rng.bytes(8).hex() for _ in range(num_frames)]
    status = ego_status(scene.ego_to_world)
    rows: dict[str, list] = {
        key: []
        for key in (
            "scene_id",
            "frame_idx",
            "cam_type",
            "filename",
            "intrinsics",
            "extrinsics",
            "ego_to_world",
            *status,
            "frame_token",
            "use_lidar_proj_depth",
        )
    }
    for frame in range(num_frames):
        for camera, mount in RIG.items():
            intrinsics = camera_intrinsics(mount, height, width)
            cam_to_world = scene.ego_to_world[frame] @ camera_to_ego(mount)
            rgb, depth = render_view(scene, cam_to_world, intrinsics, height, width)
            filename = f"{name}/{camera}/{tokens[frame]}"
            fmt.write_image(tree.image(filename), rgb)
            fmt.write_depth(tree.depth(filename, projected=False), np.where(depth > 0, depth, np.inf))
            values = dict(
                scene_id=name,
                frame_idx=frame,
                cam_type=camera,
                filename=filename,
                intrinsics=intrinsics,
                extrinsics=np.linalg.inv(cam_to_world)[:3],
                ego_to_world=scene.ego_to_world[frame][:3],
                frame_token=tokens[frame],
                use_lidar_proj_depth=False,
                **{key: value[frame] for key, value in status.items()},
            )
            for key, value in values.items():
                rows[key].append(value)
    return rows


def generate_synthetic_dataset(
    root: str | Path,
    split: str = "train",
    num_scenes: int = 16,
    num_frames: int = 12,
    height: int = 112,
    width: int = 200,
    seed: int = 0,
    workers: int | None = None,
) -> Path:
    """Write ``num_scenes`` scenes as the split ``split`` of the ``demo`` dataset of an official tree at
    ``root``; returns the parquet. Scenes render in ``workers`` processes (default: one per CPU core); the
    output depends only on the arguments."""
    root = Path(root)
    jobs = [(root, split, i, num_frames, height, width, seed) for i in range(num_scenes)]
    workers = min(workers or os.cpu_count() or 1, num_scenes)
    if workers <= 1:
        scenes = [render_scene(*job) for job in jobs]
    else:
        with ProcessPoolExecutor(workers) as pool:
            scenes = list(pool.map(render_scene, *zip(*jobs)))
    columns = {key: [value for scene in scenes for value in scene[key]] for key in scenes[0]}
    return fmt.write_table(fmt.Tree(root, DATASET).parquet(split), columns)


def ensure_synthetic_dataset(root: str | Path, split: str = "train", seed: int = 0, **spec) -> Path:
    """Generate the ``split`` of the demo tree at ``root`` (demo defaults, overridden by ``spec``) unless
    its parquet exists; returns the parquet.

    Generation goes to a temporary tree whose files are moved into place at the end, the parquet last,
    so an interrupted run leaves no parquet (which is what marks a split as present), and processes racing
    to generate the same split (several ranks) are safe.
    """
    root = Path(root)
    parquet = fmt.Tree(root, DATASET).parquet(split)
    if parquet.is_file():
        return parquet
    scratch = root / f".tmp-{split}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        written = generate_synthetic_dataset(scratch, split, seed=seed, **{**demo_spec(split), **spec})
        for folder in (fmt.IMAGE_DIR, fmt.ALIGN_DEPTH_DIR):
            source = scratch / folder / DATASET
            for scene in sorted(source.iterdir()):
                target = root / folder / DATASET / scene.name
                target.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.replace(scene, target)
                except OSError:  # a concurrent generator placed the same scene first
                    if not target.exists():
                        raise
        parquet.parent.mkdir(parents=True, exist_ok=True)
        os.replace(written, parquet)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return parquet
