"""Sensor rigs: nuScenes-like surround cameras and LiDAR on the ego car, and pinhole intrinsics.

Camera frame: OpenCV (x right, y down, z forward). Ego frame: x forward, y left, z up.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from occdistill.data.synth.config import LidarConfig, RigConfig
from occdistill.geometry.transforms import make_transform

# name -> (x, y, z) mount in the ego frame (m), yaw (deg, ccw from ego x). Close to nuScenes.
NUSCENES_MOUNTS: dict[str, tuple[float, float, float, float]] = {
    "CAM_FRONT": (1.70, 0.02, 1.51, 0.0),
    "CAM_FRONT_RIGHT": (1.55, -0.49, 1.50, -55.0),
    "CAM_FRONT_LEFT": (1.52, 0.49, 1.51, 55.0),
    "CAM_BACK": (0.03, 0.0, 1.57, 180.0),
    "CAM_BACK_LEFT": (1.04, 0.48, 1.56, 110.0),
    "CAM_BACK_RIGHT": (1.04, -0.48, 1.56, -110.0),
}
LIDAR_MOUNT = (0.94, 0.0, 1.84)  # nuScenes LIDAR_TOP position; its x axis points to the ego's right
LIDAR_PERIOD_US = 50_000  # 20 Hz spin: cameras fire when the beam sweeps past them
CAMERA_TIME_BASE_US = -20_000  # offset of the first (front) camera from the LiDAR keyframe time


def pinhole_intrinsic(width: int, height: int, hfov_deg: float) -> np.ndarray:
    """(3, 3) square-pixel intrinsics with the principal point at the image centre
    (pixel (c, r) covers [c, c+1) x [r, r+1), so the centre is (W/2, H/2))."""
    f = 0.5 * width / np.tan(np.radians(hfov_deg) / 2)
    return np.array([[f, 0.0, width / 2], [0.0, f, height / 2], [0.0, 0.0, 1.0]])


def ego_from_camera_rotation(yaw: float, pitch: float = 0.0, roll: float = 0.0) -> np.ndarray:
    """(3, 3) rotation of an OpenCV camera looking along ``yaw`` (rad, ccw from ego x), tilted
    down by ``-pitch`` (positive pitch looks up) and rolled by ``roll`` about its optical axis."""
    forward = np.array([np.cos(yaw), np.sin(yaw), 0.0])
    right = np.array([np.sin(yaw), -np.cos(yaw), 0.0])
    down = np.array([0.0, 0.0, -1.0])
    base = np.stack([right, down, forward], axis=1)
    cp, sp = np.cos(pitch), np.sin(pitch)
    cr, sr = np.cos(roll), np.sin(roll)
    # Pitch about the camera x axis (up is -y), then roll about z.
    r_pitch = np.array([[1, 0, 0], [0, cp, -sp], [0, sp, cp]])
    r_roll = np.array([[cr, -sr, 0], [sr, cr, 0], [0, 0, 1]])
    return base @ r_pitch @ r_roll


@dataclass(frozen=True)
class CameraMount:
    name: str
    ego_from_cam: np.ndarray  # (4, 4)
    intrinsic: np.ndarray  # (3, 3)
    width: int
    height: int
    time_offset_us: int  # camera exposure time minus the LiDAR keyframe time


@dataclass(frozen=True)
class LidarMount:
    ego_from_lidar: np.ndarray  # (4, 4)
    elevations: np.ndarray  # (B,) radians, ascending; beam b is ring b
    azimuths: np.ndarray  # (A,) radians, uniform over [-pi, pi)
    max_range: float


def build_rig(cfg: RigConfig, rng: np.random.Generator) -> tuple[CameraMount, ...]:
    """The cameras of one scene ("log"): nuScenes mounts with a small calibration spread."""
    jitter = np.radians(cfg.mount_jitter_deg)
    mounts = []
    for name in cfg.cameras:
        x, y, z, yaw_deg = NUSCENES_MOUNTS[name]
        yaw = np.radians(yaw_deg) + rng.uniform(-jitter, jitter)
        rot = ego_from_camera_rotation(yaw, rng.uniform(-jitter, jitter), rng.uniform(-jitter, jitter))
        fov = cfg.back_hfov_deg if name == "CAM_BACK" else cfg.hfov_deg
        sweep = (-yaw_deg % 360.0) / 360.0  # fraction of the spin from the front to this camera
        mounts.append(CameraMount(
            name=name,
            ego_from_cam=make_transform(rot, (x, y, z)),
            intrinsic=pinhole_intrinsic(cfg.width, cfg.height, fov),
            width=cfg.width,
            height=cfg.height,
            time_offset_us=int(round(CAMERA_TIME_BASE_US + sweep * LIDAR_PERIOD_US)),
        ))
    return tuple(mounts)


def build_lidar(cfg: LidarConfig, rng: np.random.Generator, jitter_deg: float) -> LidarMount:
    """LIDAR_TOP: yaw -90 deg (its x axis to the ego's right, as in nuScenes) plus a small tilt."""
    j = np.radians(jitter_deg) * 0.5
    yaw, pitch, roll = -np.pi / 2 + rng.uniform(-j, j), rng.uniform(-j, j), rng.uniform(-j, j)
    cy, sy, cp, sp, cr, sr = np.cos(yaw), np.sin(yaw), np.cos(pitch), np.sin(pitch), np.cos(roll), np.sin(roll)
    rz = np.array([[cy, -sy, 0], [sy, cy, 0], [0, 0, 1]])
    ry = np.array([[cp, 0, sp], [0, 1, 0], [-sp, 0, cp]])
    rx = np.array([[1, 0, 0], [0, cr, -sr], [0, sr, cr]])
    elevations = np.radians(np.linspace(cfg.min_elevation_deg, cfg.max_elevation_deg, cfg.beams))
    azimuths = -np.pi + np.arange(cfg.azimuths) * (2 * np.pi / cfg.azimuths)
    return LidarMount(make_transform(rz @ ry @ rx, LIDAR_MOUNT), elevations, azimuths, cfg.max_range)
