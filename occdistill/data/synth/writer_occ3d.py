"""Occ3D-nuScenes on-disk layout of the street preset (paths relative to the output root)::

    occdistill_infos_train.pkl, occdistill_infos_val.pkl   BEVDet/mmdet3d-v1 info pickles
    samples/CAM_*/<log>__CAM_*__<cam_time>.jpg             RGB images
    semantic/CAM_*/<same stem>.png                          uint8 class ids (17 = free: sky)
    depth/CAM_*/<same stem>.png                             uint16 z-depth in mm (0 = no return)
    samples/LIDAR_TOP/<log>__LIDAR_TOP__<key_time>.pcd.bin  float32 (N, 5) x, y, z, intensity, ring
    gts/<scene>/<token>/labels.npz                          semantics, mask_lidar, mask_camera (uint8)

Every file is written atomically; a frame is complete when all its files exist.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from occdistill.data.classes import OCC3D_NUSCENES
from occdistill.data.synth.scene_street import StreetScene, make_token
from occdistill.data.synth.street_frame import StreetCalib, StreetFrame
from occdistill.geometry.grid import VoxelGrid
from occdistill.io import atomic_save_npz, atomic_write, atomic_write_bytes, atomic_write_pickle

INFO_NAMES = {"train": "occdistill_infos_train.pkl", "val": "occdistill_infos_val.pkl"}


@dataclass(frozen=True)
class StreetPaths:
    """Relative ('/'-separated) paths of one keyframe's files."""

    images: dict[str, str]
    semantic: dict[str, str]
    depth: dict[str, str]
    lidar: str
    occ_dir: str  # gts/<scene>/<token>
    labels: str  # gts/<scene>/<token>/labels.npz

    def all(self) -> list[str]:
        return [*self.images.values(), *self.semantic.values(), *self.depth.values(), self.lidar, self.labels]


def street_paths(scene: StreetScene, token: str, calib: StreetCalib) -> StreetPaths:
    images, semantic, depth = {}, {}, {}
    for cam in calib.cameras:
        stem = f"{scene.log}__{cam.name}__{cam.timestamp}"
        images[cam.name] = f"samples/{cam.name}/{stem}.jpg"
        semantic[cam.name] = f"semantic/{cam.name}/{stem}.png"
        depth[cam.name] = f"depth/{cam.name}/{stem}.png"
    occ_dir = f"gts/{scene.name}/{token}"
    return StreetPaths(images, semantic, depth, f"samples/LIDAR_TOP/{scene.log}__LIDAR_TOP__{calib.timestamp}.pcd.bin",
                       occ_dir, f"{occ_dir}/labels.npz")


def write_image(path: Path, array: np.ndarray, fmt: str, **kwargs) -> None:
    atomic_write(path, lambda f: Image.fromarray(array).save(f, format=fmt, **kwargs))


def write_street_frame(root: Path, paths: StreetPaths, frame: StreetFrame, jpeg_quality: int) -> None:
    """Write the frame's files; the labels go last so that they mark a complete frame."""
    for cam in frame.cameras:
        write_image(root / paths.images[cam.name], cam.rgb, "JPEG", quality=jpeg_quality)
        write_image(root / paths.semantic[cam.name], cam.semantic, "PNG", compress_level=1)
        write_image(root / paths.depth[cam.name], cam.depth_mm, "PNG", compress_level=1)  # uint16 -> 16-bit PNG
    atomic_write_bytes(root / paths.lidar, frame.lidar_points.astype(np.float32).tobytes())
    atomic_save_npz(root / paths.labels, semantics=frame.semantics, mask_lidar=frame.mask_lidar, mask_camera=frame.mask_camera)


def points_in_boxes(points: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """(M,) number of points (N, >=3) inside each box (M, 7) x, y, z, l, w, h, yaw (z = centre)."""
    counts = np.zeros(len(boxes), np.int64)
    for i, (x, y, z, l, w, h, yaw) in enumerate(boxes):
        r = 0.5 * np.hypot(l, w)
        near = np.nonzero((np.abs(points[:, 0] - x) <= r) & (np.abs(points[:, 1] - y) <= r))[0]
        if not len(near):
            continue
        dx, dy, dz = points[near, 0] - x, points[near, 1] - y, points[near, 2] - z
        c, s = np.cos(yaw), np.sin(yaw)
        inside = (np.abs(c * dx + s * dy) <= 0.5 * l) & (np.abs(-s * dx + c * dy) <= 0.5 * w) & (np.abs(dz) <= 0.5 * h)
        counts[i] = int(inside.sum())
    return counts


def street_info(
    scene: StreetScene,
    frame: int,
    token: str,
    prev_token: str,
    next_token: str,
    calib: StreetCalib,
    paths: StreetPaths,
    boxes: tuple[np.ndarray, np.ndarray, np.ndarray],
    lidar_points: np.ndarray,
) -> dict:
    """One sample of a BEVDet / mmdet3d-v1 nuScenes info file (real field names)."""
    cams = {}
    for cam in calib.cameras:
        lidar_from_cam = calib.lidar_from_cam(cam)
        cams[cam.name] = {
            "data_path": paths.images[cam.name],
            "type": cam.name,
            "sample_data_token": make_token(f"{token}-{cam.name}"),
            "sensor2ego_translation": list(cam.sensor2ego.translation),
            "sensor2ego_rotation": list(cam.sensor2ego.rotation),
            "ego2global_translation": list(cam.ego2global.translation),
            "ego2global_rotation": list(cam.ego2global.rotation),
            "timestamp": cam.timestamp,
            "sensor2lidar_rotation": lidar_from_cam[:3, :3].copy(),
            "sensor2lidar_translation": lidar_from_cam[:3, 3].copy(),
            "cam_intrinsic": cam.intrinsic.copy(),
            "semantic_path": paths.semantic[cam.name],
            "depth_path": paths.depth[cam.name],
        }
    gt_boxes, gt_names, gt_velocity = boxes
    npts = points_in_boxes(lidar_points, gt_boxes)
    return {
        "token": token,
        "scene_token": scene.token,
        "scene_name": scene.name,
        "frame_idx": frame,
        "timestamp": calib.timestamp,
        "prev": prev_token,
        "next": next_token,
        "lidar_path": paths.lidar,
        "lidar_token": make_token(f"{token}-LIDAR_TOP"),
        "sweeps": [],
        "lidar2ego_translation": list(calib.lidar2ego.translation),
        "lidar2ego_rotation": list(calib.lidar2ego.rotation),
        "ego2global_translation": list(calib.ego2global.translation),
        "ego2global_rotation": list(calib.ego2global.rotation),
        "cams": cams,
        "occ_path": paths.occ_dir,
        "gt_boxes": gt_boxes,
        "gt_names": gt_names,
        "gt_velocity": gt_velocity,
        "num_lidar_pts": npts,
        "valid_flag": npts > 0,
    }


def street_metadata(grid: VoxelGrid, cameras: tuple[str, ...], split: str) -> dict:
    return {
        "version": "occdistill-synth-street",
        "split": split,
        "occ_range": list(grid.range),
        "voxel_size": list(grid.voxel_size),
        "grid_shape": list(grid.shape),
        "class_names": list(OCC3D_NUSCENES.names),
        "free_index": OCC3D_NUSCENES.free_index,
        "cameras": list(cameras),
    }


def write_infos(root: Path, split: str, infos: list[dict], metadata: dict) -> Path:
    return atomic_write_pickle(root / INFO_NAMES[split], {"infos": infos, "metadata": metadata})
