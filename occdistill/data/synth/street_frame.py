"""One keyframe of a street scene: calibration as stored, camera images, LiDAR sweep, occupancy.

Time model (as nuScenes): the keyframe time is the LiDAR time; every camera fires at its own time
a few to tens of ms away from it (when the spinning LiDAR passes it). The ego pose is evaluated at
each camera's own time and each camera is rendered from that camera-time pose; the camera's
``ego2global`` is that pose. Other agents are evaluated at the keyframe time for every camera
(a simplification: on real data they move a little between camera and LiDAR times), so rendered
images and keyframe occupancy agree exactly.

All poses are first rounded through the stored representation (w,x,y,z quaternion + translation)
and everything is rendered from the matrices rebuilt from those stored values, so a reader that
composes the stored fields gets exactly the geometry of the pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from occdistill.data.classes import OCC3D_NUSCENES
from occdistill.data.synth.config import StreetConfig
from occdistill.data.synth.render import GROUND, cast, pinhole_rays, pinhole_rects, spherical_rays, spherical_rects, surface
from occdistill.data.synth.scene_street import StreetScene, ego_pose_road, primitives_in_ego
from occdistill.data.synth.shading import Lighting, shade
from occdistill.data.synth.voxelize import camera_mask_rays, observed_by_rays, voxelize
from occdistill.geometry.transforms import invert_rigid, rotmat_to_quat, transform_from_quat, yaw_transform

FREE = OCC3D_NUSCENES.free_index
# LiDAR return strength per class (0..1), scaled by the incidence cosine; lane paint is not modelled.
_REFLECTIVITY = np.array([0.3, 0.6, 0.35, 0.4, 0.45, 0.4, 0.4, 0.25, 0.8, 0.4, 0.4, 0.12, 0.18, 0.2, 0.15, 0.3, 0.22, 0.0])


@dataclass(frozen=True)
class Pose:
    """A pose as stored in the info file: translation (x, y, z) and w,x,y,z rotation quaternion."""

    translation: tuple[float, float, float]
    rotation: tuple[float, float, float, float]

    @staticmethod
    def from_matrix(t: np.ndarray) -> "Pose":
        return Pose(tuple(float(x) for x in t[:3, 3]), tuple(float(x) for x in rotmat_to_quat(t[:3, :3])))

    def matrix(self) -> np.ndarray:
        return transform_from_quat(self.rotation, self.translation)


@dataclass(frozen=True)
class CameraCalib:
    name: str
    sensor2ego: Pose
    ego2global: Pose  # at the camera's timestamp
    timestamp: int
    intrinsic: np.ndarray  # (3, 3)
    width: int
    height: int


@dataclass(frozen=True)
class StreetCalib:
    """Poses of one keyframe as written to the info file."""

    timestamp: int  # LiDAR keyframe time, microseconds
    ego2global: Pose  # at the keyframe time
    lidar2ego: Pose
    cameras: tuple[CameraCalib, ...]

    def keyego_from_cam(self, cam: CameraCalib) -> np.ndarray:
        """inv(global_from_ego_keytime) @ global_from_ego_camtime @ ego_from_cam."""
        return invert_rigid(self.ego2global.matrix()) @ cam.ego2global.matrix() @ cam.sensor2ego.matrix()

    def lidar_from_cam(self, cam: CameraCalib) -> np.ndarray:
        """sensor2lidar, exactly as BEVDet's converter composes it."""
        return invert_rigid(self.lidar2ego.matrix()) @ self.keyego_from_cam(cam)


@dataclass(frozen=True)
class CameraRender:
    name: str
    rgb: np.ndarray  # (H, W, 3) uint8
    semantic: np.ndarray  # (H, W) uint8 class ids; FREE where the ray hit nothing (sky)
    depth_mm: np.ndarray  # (H, W) uint16 z-depth in mm; 0 = no return or beyond 65.535 m


@dataclass(frozen=True)
class StreetFrame:
    calib: StreetCalib
    cameras: tuple[CameraRender, ...]
    lidar_points: np.ndarray  # (N, 5) float32 x, y, z, intensity, ring in the LiDAR frame
    semantics: np.ndarray  # (X, Y, Z) uint8
    mask_lidar: np.ndarray  # (X, Y, Z) uint8 0/1
    mask_camera: np.ndarray  # (X, Y, Z) uint8 0/1
    gt_boxes: np.ndarray  # (M, 7) x, y, z (box centre), l, w, h, yaw in the LiDAR frame
    gt_names: np.ndarray  # (M,) str
    gt_velocity: np.ndarray  # (M, 2) vx, vy in the LiDAR frame (m/s)
    num_lidar_pts: np.ndarray  # (M,) int


def frame_rng(cfg: StreetConfig, scene: StreetScene, frame: int) -> np.random.Generator:
    return np.random.default_rng([cfg.seed, 3, scene.index, frame])


def street_calib(cfg: StreetConfig, scene: StreetScene, frame: int) -> StreetCalib:
    """Stored poses of keyframe ``frame``: cheap, no rendering (used to rebuild infos on resume)."""
    rng = frame_rng(cfg, scene, frame)
    key_us = scene.start_us + frame * scene.frame_interval_us
    global_from_road = yaw_transform(scene.road_yaw, *scene.road_offset)

    def global_from_ego(time_us: int) -> np.ndarray:
        u, v, heading = ego_pose_road(scene, time_us)
        return global_from_road @ yaw_transform(heading, u, v)

    cams = []
    for m in scene.cameras:
        ts = key_us + m.time_offset_us + int(rng.integers(-1500, 1501))
        cams.append(CameraCalib(m.name, Pose.from_matrix(m.ego_from_cam), Pose.from_matrix(global_from_ego(ts)), ts,
                                m.intrinsic.copy(), m.width, m.height))
    return StreetCalib(key_us, Pose.from_matrix(global_from_ego(key_us)), Pose.from_matrix(scene.lidar.ego_from_lidar), tuple(cams))


def render_street_frame(cfg: StreetConfig, scene: StreetScene, frame: int) -> StreetFrame:
    calib = street_calib(cfg, scene, frame)
    rng = frame_rng(cfg, scene, frame)
    rng.integers(-1500, 1501, size=len(scene.cameras))  # the draws street_calib used: keep streams aligned
    grid = cfg.grid.voxel_grid()
    far = cfg.render.far
    view = primitives_in_ego(scene, calib.timestamp, far + 5.0)
    prims, ground = view.prims, view.ground
    _, _, heading = ego_pose_road(scene, calib.timestamp)
    c, s = np.cos(heading), np.sin(heading)
    sun = np.array([c * scene.sun_road[0] + s * scene.sun_road[1], -s * scene.sun_road[0] + c * scene.sun_road[1], scene.sun_road[2]])
    exposure = rng.uniform(*cfg.render.exposure_range)

    renders, mask_origins, mask_dirs = [], [], []
    for cam in calib.cameras:
        ref_from_cam = calib.keyego_from_cam(cam)
        rays = pinhole_rays(ref_from_cam, cam.intrinsic, cam.width, cam.height)
        rects = pinhole_rects(prims, invert_rigid(ref_from_cam), cam.intrinsic, cam.width, cam.height)
        hits = cast(rays, prims, rects, far, ground=True)
        surf = surface(rays, hits, prims, ground)
        g = surf.index == GROUND
        light = Lighting(
            sun=sun, ambient=rng.uniform(0.35, 0.5), diffuse=rng.uniform(0.55, 0.75),
            exposure=exposure * rng.uniform(0.93, 1.07), white_balance=rng.uniform(0.96, 1.04, 3),
            sky_horizon=scene.sky[0], sky_zenith=scene.sky[1], fog_distance=rng.uniform(150, 400),
        )
        rgb = shade(rays, surf, prims, ground.albedo(surf.point[g], surf.cls[g]), light, far, cfg.render.noise_std, rng)
        sem = np.full(cam.height * cam.width, FREE, np.uint8)
        sem[surf.flat] = surf.cls
        depth = np.where(np.isfinite(hits.t), np.round(hits.t * 1000.0), 0.0)
        depth = np.where(depth > 65535, 0, depth).astype(np.uint16)
        renders.append(CameraRender(cam.name, rgb, sem.reshape(cam.height, cam.width), depth))
        origin, dirs = camera_mask_rays(ref_from_cam, cam.intrinsic, cam.width, cam.height, grid, cfg.mask.ray_spacing)
        mask_dirs.append(dirs)
        mask_origins.append(np.broadcast_to(origin, dirs.shape))

    # LiDAR sweep at the keyframe time.
    lidar = scene.lidar
    ego_from_lidar = calib.lidar2ego.matrix()
    lrays = spherical_rays(ego_from_lidar, lidar.elevations, lidar.azimuths)
    lrects = spherical_rects(prims, invert_rigid(ego_from_lidar), lidar.elevations, len(lidar.azimuths), lidar.max_range)
    lhits = cast(lrays, prims, lrects, lidar.max_range, ground=True)
    lsurf = surface(lrays, lhits, prims, ground)
    d_sensor = lrays.dirs.reshape(-1, 3) @ ego_from_lidar[:3, :3]  # back to the LiDAR frame
    t = lhits.t.reshape(-1)[lsurf.flat]
    xyz = d_sensor[lsurf.flat] * t[:, None]
    cos_inc = np.abs((lsurf.normal * lrays.dirs.reshape(-1, 3)[lsurf.flat]).sum(axis=-1))
    intensity = np.clip(255.0 * _REFLECTIVITY[lsurf.cls] * (0.3 + 0.7 * cos_inc) + rng.normal(0, 2.0, len(t)), 0, 255)
    ring = (lsurf.flat // len(lidar.azimuths)).astype(np.float32)
    points = np.column_stack([xyz, np.round(intensity), ring]).astype(np.float32)

    # Occupancy: solids + ground surface layer, then visibility.
    centers = grid.centers()
    ground_cls = ground.classify(np.column_stack([centers[:, :, 0, :2].reshape(-1, 2), np.zeros(grid.shape[0] * grid.shape[1])]))
    sem3d = voxelize(prims, grid, FREE, ground_cls.reshape(grid.shape[:2]))
    occupied = sem3d != FREE
    mask_camera = observed_by_rays(occupied, grid, np.concatenate(mask_origins), np.concatenate(mask_dirs))
    # LiDAR rays without a return observe nothing (no range): only rays with a return count.
    mask_lidar = observed_by_rays(occupied, grid, lrays.origin, lrays.dirs.reshape(-1, 3)[lsurf.flat])

    hit_owner = view.owner[lsurf.index[lsurf.index >= 0]]
    per_mover = np.bincount(hit_owner[hit_owner >= 0], minlength=len(scene.movers.names))
    boxes, names, vel = detection_boxes(scene, calib, view.movers)
    npts = per_mover[view.movers].astype(np.int64)
    return StreetFrame(calib, tuple(renders), points, sem3d, mask_lidar.astype(np.uint8), mask_camera.astype(np.uint8),
                       boxes, names, vel, npts)


def detection_boxes(scene: StreetScene, calib: StreetCalib, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Detection boxes of the movers ``idx`` in the LiDAR frame, mmdet3d v1 info layout:
    (M, 7) gravity centre x, y, z, sizes l, w, h along the box's x, y, z, yaw about the LiDAR z
    axis from its x axis; names (M,); velocities (M, 2) vx, vy in the LiDAR frame."""
    mv = scene.movers
    t = (calib.timestamp - scene.start_us) * 1e-6
    u, v = mv.positions(t)
    u, v, heading, speed, size = u[idx], v[idx], mv.heading[idx], mv.speed[idx], mv.size[idx]
    global_from_road = yaw_transform(scene.road_yaw, *scene.road_offset)
    lidar_from_road = invert_rigid(calib.lidar2ego.matrix()) @ invert_rigid(calib.ego2global.matrix()) @ global_from_road
    rot = lidar_from_road[:3, :3]
    centers = np.column_stack([u, v, 0.5 * size[:, 2]]) @ rot.T + lidar_from_road[:3, 3]
    fwd = np.column_stack([np.cos(heading), np.sin(heading), np.zeros(len(idx))]) @ rot.T
    vel = (np.column_stack([speed * np.cos(heading), speed * np.sin(heading), np.zeros(len(idx))]) @ rot.T)[:, :2]
    boxes = np.column_stack([centers, size, np.arctan2(fwd[:, 1], fwd[:, 0])])
    return boxes.astype(np.float64), np.asarray([mv.names[i] for i in idx], dtype=object), vel.astype(np.float64)
