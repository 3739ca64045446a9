"""One frame of a room scene: RGB-D image, semantic map and Occ-ScanNet targets.

Grid: ``shape`` voxels of ``voxel_size`` (60x60x36 at 0.08 m) axis-aligned with the world,
indexed [x, y, z] in world axes, voxel (i, j, k) centred at ``voxel_origin + (idx + 0.5) *
voxel_size``. Per frame the grid is placed in front of the camera: its horizontal centre is
half a grid ahead of the camera along the viewing direction (snapped to the voxel lattice), and
its bottom layer holds the floor surface (origin z = -voxel_size, floor at z = 0).

Labels (Occ-ScanNet): 0 empty, 1..11 classes, 255 unknown. Unknown means never observed by the
scan that produced the labels: voxels whose centre is outside this frame's camera frustum (not
in the image, or behind the camera) and voxels outside the room's shell (behind the walls,
above the ceiling). Inside the frustum, occluded voxels keep their true class, as in real
Occ-ScanNet, which is built from the complete scene mesh.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from occdistill.data.classes import OCC_SCANNET
from occdistill.data.synth.config import RoomConfig
from occdistill.data.synth.render import cast, pinhole_rays, pinhole_rects, surface
from occdistill.data.synth.scene_room import RoomScene
from occdistill.data.synth.shading import Lighting, shade
from occdistill.data.synth.voxelize import camera_mask_rays, observed_by_rays, voxelize
from occdistill.geometry.camera import project
from occdistill.geometry.grid import VoxelGrid
from occdistill.geometry.transforms import invert_rigid, transform_points

EMPTY = OCC_SCANNET.free_index
UNKNOWN = OCC_SCANNET.ignore_index


@dataclass(frozen=True)
class RoomFrame:
    cam_pose: np.ndarray  # (4, 4) world_from_cam
    intrinsic: np.ndarray  # (3, 3)
    voxel_origin: np.ndarray  # (3,)
    rgb: np.ndarray  # (H, W, 3) uint8
    semantic: np.ndarray  # (H, W) uint8 Occ-ScanNet class ids
    depth_mm: np.ndarray  # (H, W) uint16 z-depth in mm
    target_1_4: np.ndarray  # (X, Y, Z) uint8
    target_1_16: np.ndarray  # (X/4, Y/4, Z/4) uint8
    mask_camera: np.ndarray  # (X, Y, Z) uint8 0/1, voxels observed by the camera rays


def room_grid(cfg: RoomConfig, cam_pose: np.ndarray) -> VoxelGrid:
    v = cfg.grid.voxel_size
    shape = np.asarray(cfg.grid.shape)
    fwd = cam_pose[:2, 2]
    fwd = fwd / max(np.linalg.norm(fwd), 1e-9)
    center = cam_pose[:2, 3] + fwd * 0.5 * shape[0] * v
    origin_xy = np.round((center - 0.5 * shape[:2] * v) / v) * v
    return VoxelGrid.from_origin((origin_xy[0], origin_xy[1], -v), v, tuple(int(s) for s in shape))


def downsample_labels(target: np.ndarray, factor: int = 4) -> np.ndarray:
    """Coarser SSC target, the MonoScene/SSC convention: a block whose empty + unknown voxels
    exceed 95% becomes empty or unknown, whichever is more frequent; otherwise it takes its most
    frequent class among 1..254 (ties: the lower id)."""
    x, y, z = (s // factor for s in target.shape)
    blocks = target.reshape(x, factor, y, factor, z, factor).transpose(0, 2, 4, 1, 3, 5).reshape(x * y * z, -1)
    n = blocks.shape[1]
    empty = (blocks == EMPTY).sum(axis=1)
    unknown = (blocks == UNKNOWN).sum(axis=1)
    counts = np.stack([(blocks == c).sum(axis=1) for c in range(1, OCC_SCANNET.num_classes)], axis=1)
    out = np.where(empty > unknown, EMPTY, UNKNOWN).astype(np.uint8)
    solid = (empty + unknown) <= 0.95 * n
    out[solid] = (counts[solid].argmax(axis=1) + 1).astype(np.uint8)
    return out.reshape(x, y, z)


def render_room_frame(cfg: RoomConfig, scene: RoomScene, frame: int) -> RoomFrame:
    rng = np.random.default_rng([cfg.seed, 12, scene.index, frame])
    cam = cfg.camera
    world_from_cam = scene.world_from_cam(frame)
    k = scene.intrinsic
    prims = scene.prims
    rays = pinhole_rays(world_from_cam, k, cam.width, cam.height)
    rects = pinhole_rects(prims, invert_rigid(world_from_cam), k, cam.width, cam.height)
    hits = cast(rays, prims, rects, cfg.render.far, ground=False)
    surf = surface(rays, hits, prims, None)
    light = Lighting(
        sun=scene.light, ambient=scene.ambient, diffuse=rng.uniform(0.5, 0.7),
        exposure=rng.uniform(*cfg.render.exposure_range), white_balance=rng.uniform(0.95, 1.05, 3),
        sky_horizon=np.full(3, 0.5), sky_zenith=np.full(3, 0.5), fog_distance=np.inf, point=True,
    )
    rgb = shade(rays, surf, prims, None, light, cfg.render.far, cfg.render.noise_std, rng)
    sem = np.full(cam.height * cam.width, EMPTY, np.uint8)
    sem[surf.flat] = surf.cls
    depth = np.where(np.isfinite(hits.t), np.round(hits.t * 1000.0), 0.0)
    depth = np.where(depth > 65535, 0, depth).astype(np.uint16)

    grid = room_grid(cfg, world_from_cam)
    labels = voxelize(prims, grid, EMPTY)
    centers = grid.centers()
    uv, z = project(transform_points(invert_rigid(world_from_cam), centers), k)
    in_view = (z > 0) & (uv[..., 0] >= 0) & (uv[..., 0] < cam.width) & (uv[..., 1] >= 0) & (uv[..., 1] < cam.height)
    known = in_view & scene.inside_room(centers)
    target = np.where(known, labels, UNKNOWN).astype(np.uint8)
    origin, dirs = camera_mask_rays(world_from_cam, k, cam.width, cam.height, grid, cfg.mask.ray_spacing)
    mask = observed_by_rays(labels != EMPTY, grid, origin, dirs)
    return RoomFrame(
        cam_pose=world_from_cam, intrinsic=k.copy(), voxel_origin=grid.lower.copy(), rgb=rgb,
        semantic=sem.reshape(cam.height, cam.width), depth_mm=depth, target_1_4=target,
        target_1_16=downsample_labels(target), mask_camera=mask.astype(np.uint8),
    )
