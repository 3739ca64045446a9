"""Depth targets: LiDAR points projected into the (augmented) images, or rendered depth PNGs.

Depth is z-depth in metres along the camera's optical axis; 0 means "no target". Image
augmentation changes only the intrinsics, never the camera frame, so z-depth values are invariant
under it: LiDAR depth is projected with the augmented intrinsics directly (no resampling of a
full-resolution map, which would mix foreground and background at edges).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from occdistill.errors import DataError
from occdistill.geometry.camera import project
from occdistill.geometry.transforms import transform_points


def load_lidar_points(path: str | Path, dims: int = 5) -> np.ndarray:
    """nuScenes ``.pcd.bin`` (float32, ``dims`` values per point, x y z first) -> (P, 3) float64
    in the LiDAR frame."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: LiDAR file not found")
    raw = np.fromfile(path, dtype=np.float32)
    if raw.size % dims:
        raise DataError(f"{path}: {raw.size} float32 values is not a whole number of {dims}-value points")
    pts = raw.reshape(-1, dims)[:, :3].astype(np.float64)  # (P, dims) -> (P, 3)
    if not np.all(np.isfinite(pts)):
        raise DataError(f"{path}: LiDAR points contain NaN or inf")
    return pts


def load_depth_png(path: str | Path, scale: float = 1000.0) -> np.ndarray:
    """16-bit depth PNG (millimetres by default, 0 = no depth) -> (H, W) float32 metres."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: depth map not found")
    try:
        with Image.open(path) as img:
            arr = np.asarray(img)
    except (OSError, UnidentifiedImageError) as exc:
        raise DataError(f"{path}: cannot read depth map ({exc})") from exc
    if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.integer):
        raise DataError(f"{path}: depth map must be a single-channel integer PNG, got {arr.dtype} {arr.shape}")
    return (arr.astype(np.float32) / scale).astype(np.float32)


def lidar_depth_maps(
    points_ego: np.ndarray,
    cam_from_ego: np.ndarray,
    intrinsics: np.ndarray,
    image_size: tuple[int, int],
    min_depth: float = 0.1,
    max_depth: float = float("inf"),
) -> np.ndarray:
    """Nearest-point z-depth per pixel.

    points_ego (P, 3) in the key ego frame; cam_from_ego (N, 4, 4); intrinsics (N, 3, 3), already
    augmented (``img_from_raw @ K``); image_size (H, W) of the augmented images.
    Returns (N, H, W) float32 metres, 0 where no point lands. A point at continuous pixel (u, v)
    belongs to pixel (floor(u), floor(v)); when several land in one pixel the nearest wins, because
    the farther ones are hidden behind it from the camera's viewpoint.
    """
    h, w = image_size
    out = np.zeros((len(cam_from_ego), h, w), dtype=np.float32)
    for n, (t, k) in enumerate(zip(cam_from_ego, intrinsics)):
        uv, z = project(transform_points(t, points_ego), k)
        keep = (z > min_depth) & (z < max_depth)
        uv, z = uv[keep], z[keep]
        col, row = np.floor(uv[:, 0]).astype(np.int64), np.floor(uv[:, 1]).astype(np.int64)
        inside = (col >= 0) & (col < w) & (row >= 0) & (row < h)
        flat, z = row[inside] * w + col[inside], z[inside]
        order = np.lexsort((z, flat))  # by pixel, then nearest first
        flat, z = flat[order], z[order]
        first = np.ones(len(flat), dtype=bool)
        first[1:] = flat[1:] != flat[:-1]
        out[n].reshape(-1)[flat[first]] = z[first]
    return out
