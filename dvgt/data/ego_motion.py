"""What DVGT-2 reads about the ego's motion, derived from a scene's poses and timestamps.

Per annotated frame of a scene (numpy, metres and seconds):

* ``future_trajectory`` [F, 8, 3]: the ego's positions and headings 0.5, 1.0, ..., 4.0 s ahead
  (2 Hz, as the DVGT annotations), in the current ego frame: [right (x), forward (z), heading].
  heading is the yaw of the future ego's forward axis about the down axis, positive to the right
  (atan2 of its x and z components). Future poses are interpolated linearly in time between annotated
  frames, so any annotation rate works.
* ``future_valid`` [F, 8]: False where the scene ends before that time (the last frames of a scene
  have fewer future steps; the last one has none), or where annotated frames around it are more
  than ``MAX_GAP_S`` apart.
* ``velocity``, ``acceleration`` [F, 2]: in the current ego frame as NAVSIM writes its ego status,
  [forward, left]; finite differences of the positions over the timestamps (central inside the scene).
* ``driving_command`` [F] int: the NAVSIM command index (``COMMANDS``): left / straight / right from
  the lateral offset of the last valid future waypoint (beyond ``COMMAND_LATERAL_M`` to either side
  is a turn, the nuScenes planning convention), unknown when no future waypoint is valid.

``ego_status`` packs them in the order of the upstream DVGT-2 model ("vel, acc, command";
``EGO_STATUS_FIELDS``, the same as dvgt.models.dvgt2's): [velocity (2), acceleration (2),
command one-hot (4)].
A scene table may carry measured values instead (optional columns ``ego_velocity``,
``ego_acceleration``, ``driving_command``, see dvgt/data/layout.py): they replace the derived ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np

FUTURE_STEPS = 8  # planning horizon: 8 waypoints ...
FUTURE_DT = 0.5  # ... 0.5 s apart (2 Hz), 4 s in all
MAX_GAP_S = 1.0  # no interpolation across annotation gaps longer than this
COMMANDS = ("left", "straight", "right", "unknown")  # NAVSIM's one-hot order
COMMAND_LATERAL_M = 2.0  # lateral offset of the last future waypoint that counts as a turn
EGO_STATUS_FIELDS = ("velocity_x", "velocity_y", "acceleration_x", "acceleration_y",  # x forward, y left
                     "command_left", "command_straight", "command_right", "command_unknown")


@dataclass
class EgoMotion:
    """Per-frame ego motion of one scene (see the module docstring)."""

    future_trajectory: np.ndarray  # [F, 8, 3] right, forward (m), heading (rad)
    future_valid: np.ndarray  # [F, 8] bool
    velocity: np.ndarray  # [F, 2] forward, left (m/s)
    acceleration: np.ndarray  # [F, 2] forward, left (m/s^2)
    driving_command: np.ndarray  # [F] int index into COMMANDS

    def ego_status(self) -> np.ndarray:
        """[F, 8] = velocity, acceleration, command one-hot (left, straight, right, unknown): EGO_STATUS_FIELDS."""
        one_hot = np.eye(len(COMMANDS))[self.driving_command]
        return np.concatenate([self.velocity, self.acceleration, one_hot], axis=-1)


def scene_ego_motion(ego_to_world: np.ndarray, timestamps: np.ndarray,
                     measured: Mapping[str, np.ndarray] | None = None) -> EgoMotion:
    """Ego motion of every frame of a scene from its poses [F, 4, 4] and timestamps [F] (seconds).

    ``measured`` (a scene table's optional columns ``ego_velocity`` [F, 2], ``ego_acceleration``
    [F, 2], ``driving_command`` [F]) replaces the derived values it holds.
    """
    measured = measured or {}
    trajectory, valid = future_trajectories(ego_to_world, timestamps)
    velocity_world = _derivative(ego_to_world[:, :3, 3], timestamps)  # [F, 3]
    acceleration_world = _derivative(velocity_world, timestamps)
    velocity = measured.get("ego_velocity", _to_forward_left(ego_to_world, velocity_world))
    acceleration = measured.get("ego_acceleration", _to_forward_left(ego_to_world, acceleration_world))
    command = measured.get("driving_command", driving_commands(trajectory, valid))
    return EgoMotion(trajectory, valid, velocity, acceleration, command)


def future_trajectories(ego_to_world: np.ndarray, timestamps: np.ndarray,
                        steps: int = FUTURE_STEPS, dt: float = FUTURE_DT) -> tuple[np.ndarray, np.ndarray]:
    """([F, steps, 3] future [right, forward, heading] in each frame's ego frame, [F, steps] validity)."""
    num_frames = len(timestamps)
    trajectory = np.zeros((num_frames, steps, 3))
    valid = np.zeros((num_frames, steps), dtype=bool)
    for i in range(num_frames):
        later = ego_to_world[i:]  # frame i itself anchors the interpolation at (0, 0, 0)
        relative = np.linalg.inv(ego_to_world[i]) @ later  # later egos in ego_i: [n, 4, 4]
        samples = np.stack([relative[:, 0, 3], relative[:, 2, 3],
                            np.unwrap(np.arctan2(relative[:, 0, 2], relative[:, 2, 2]))], axis=-1)
        times = timestamps[i:] - timestamps[i]
        targets = dt * np.arange(1, steps + 1)
        trajectory[i] = np.stack([np.interp(targets, times, samples[:, k]) for k in range(3)], axis=-1)
        after = np.minimum(np.searchsorted(times, targets - 1e-6), len(times) - 1)  # first frame at/after target
        annotated = np.abs(times[after] - targets) <= 1e-6
        bracket_gap = times[after] - times[np.maximum(after - 1, 0)]
        valid[i] = (targets <= times[-1] + 1e-6) & (annotated | (bracket_gap <= MAX_GAP_S + 1e-6))
    trajectory[..., 2] = (trajectory[..., 2] + np.pi) % (2 * np.pi) - np.pi
    return trajectory * valid[..., None], valid


def driving_commands(trajectory: np.ndarray, valid: np.ndarray, threshold: float = COMMAND_LATERAL_M) -> np.ndarray:
    """[F] command indices from the lateral offset (x, right) of each frame's last valid future waypoint."""
    last = np.where(valid.any(-1), valid.shape[-1] - 1 - np.argmax(valid[:, ::-1], axis=-1), 0)
    lateral = trajectory[np.arange(len(trajectory)), last, 0]
    command = np.where(lateral < -threshold, COMMANDS.index("left"),
                       np.where(lateral > threshold, COMMANDS.index("right"), COMMANDS.index("straight")))
    return np.where(valid.any(-1), command, COMMANDS.index("unknown"))


def _derivative(values: np.ndarray, timestamps: np.ndarray) -> np.ndarray:
    """d values / dt along frames (central differences inside, one-sided at the ends; 0 for one frame)."""
    if len(timestamps) < 2:
        return np.zeros_like(values)
    return np.gradient(values, timestamps, axis=0, edge_order=1)


def _to_forward_left(ego_to_world: np.ndarray, world_vectors: np.ndarray) -> np.ndarray:
    """World vectors [F, 3] -> [F, 2] (forward, left) in each frame's ego axes (x right, y down, z forward)."""
    local = np.einsum("fji,fj->fi", ego_to_world[:, :3, :3], world_vectors)  # R^T v
    return np.stack([local[:, 2], -local[:, 0]], axis=-1)
