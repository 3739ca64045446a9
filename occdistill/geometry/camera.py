"""Pinhole camera projection and image-augmentation matrices.

Camera frame: OpenCV / nuScenes (x right, y down, z forward). Depth is z-depth along the optical
axis, as LiDAR depth maps are.

Pixel coordinates are continuous with pixel edges on integers: the pixel in column ``c``, row ``r``
covers ``[c, c+1) x [r, r+1)`` and its centre is ``(c + 0.5, r + 0.5)``. Under this convention an
image resize by ``s`` is exactly ``u' = s u``, a crop is ``u' = u - x0`` and a horizontal flip is
``u' = W - u``, with no half-pixel terms. Every augmentation is a 3x3 matrix ``img_from_raw`` acting
on homogeneous pixels; the augmented intrinsics are ``img_from_raw @ K``.
"""

from __future__ import annotations

import math
from typing import TypeVar

import numpy as np
import torch

Array = TypeVar("Array", np.ndarray, torch.Tensor)


def project(points_cam: Array, intrinsic: Array, eps: float = 1e-6) -> tuple[Array, Array]:
    """Points (..., 3) in the camera frame -> pixels (..., 2) and z-depth (...).

    Points with ``z <= eps`` (behind or on the camera plane) get non-finite-free but meaningless
    pixels: callers must mask them with ``depth > eps``. Differentiable for torch inputs.
    """
    xyz = points_cam @ intrinsic[:3, :3].T
    depth = points_cam[..., 2]
    if isinstance(xyz, torch.Tensor):
        denom = torch.where(depth.abs() > eps, xyz[..., 2], torch.full_like(depth, eps))
    else:
        denom = np.where(np.abs(depth) > eps, xyz[..., 2], eps)
    uv = xyz[..., :2] / denom[..., None]
    return uv, depth


def unproject(uv: Array, depth: Array, intrinsic: Array) -> Array:
    """Pixels (..., 2) with z-depth (...) -> points (..., 3) in the camera frame.

    ``intrinsic`` may be any invertible 3x3 whose last row is (0, 0, 1): augmented intrinsics
    ``img_from_raw @ K`` of a rotated image are not upper-triangular, so the full inverse is used.
    Differentiable for torch inputs.
    """
    k = intrinsic[:3, :3]
    if isinstance(uv, torch.Tensor):
        k_inv = torch.linalg.inv(k)
        rays = uv @ k_inv[:, :2].T + k_inv[:, 2]  # (..., 3), z = 1 for a last row (0, 0, 1)
        return rays * depth[..., None]
    k_inv = np.linalg.inv(k)
    return (uv @ k_inv[:, :2].T + k_inv[:, 2]) * depth[..., None]


def resize_matrix(scale_x: float, scale_y: float | None = None) -> np.ndarray:
    """``img_from_raw`` of a resize by (scale_x, scale_y)."""
    sy = scale_x if scale_y is None else scale_y
    return np.array([[scale_x, 0, 0], [0, sy, 0], [0, 0, 1]], dtype=np.float64)


def crop_matrix(x0: float, y0: float) -> np.ndarray:
    """``img_from_raw`` of a crop whose top-left corner is at (x0, y0) of the input."""
    return np.array([[1, 0, -x0], [0, 1, -y0], [0, 0, 1]], dtype=np.float64)


def hflip_matrix(width: float) -> np.ndarray:
    """``img_from_raw`` of a left-right flip of an image ``width`` pixels wide."""
    return np.array([[-1, 0, width], [0, 1, 0], [0, 0, 1]], dtype=np.float64)


def rotate_matrix(angle_deg: float, center: tuple[float, float]) -> np.ndarray:
    """``img_from_raw`` of a counter-clockwise (as displayed) rotation of the content about ``center``.

    With y pointing down, a CCW rotation by theta maps the offset (dx, dy) from the centre to
    (dx cos + dy sin, -dx sin + dy cos). This matches ``PIL.Image.rotate(angle_deg)``.
    """
    a = math.radians(angle_deg)
    c, s = math.cos(a), math.sin(a)
    cx, cy = center
    rot = np.array([[c, s, 0], [-s, c, 0], [0, 0, 1]], dtype=np.float64)
    return crop_matrix(-cx, -cy) @ rot @ crop_matrix(cx, cy)


def img_from_ego_matrices(
    intrinsics: torch.Tensor, img_from_raw: torch.Tensor, ego_from_cam: torch.Tensor
) -> torch.Tensor:
    """(B, N, 3, 3), (B, N, 3, 3), (B, N, 4, 4) -> (B, N, 3, 4) mapping homogeneous ego points to
    (u z, v z, z) in network pixels; composed in float64 (calibration precision), returned float32."""
    k_aug = img_from_raw.double() @ intrinsics.double()
    cam_from_ego = torch.linalg.inv(ego_from_cam.double())[..., :3, :]
    return (k_aug @ cam_from_ego).float()
