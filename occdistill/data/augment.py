"""Geometry-consistent augmentation (DESIGN.md section 3).

Image augmentation is one 3x3 matrix ``img_from_raw`` per camera (resize, crop, flip, rotate in
that order, pixel convention of :mod:`occdistill.geometry.camera`); pixels, nearest-neighbour maps
(semantics, rendered depth) and intrinsics (``img_from_raw @ K``) all go through that one matrix,
so a voxel projected with the augmented intrinsics lands on the same content as before. Colour
jitter touches pixels only.

BEV augmentation is a 4x4 ``bda`` = augmented-ego-from-ego (rotation about +z, uniform scale,
mirror in x and/or y). Labels and masks are resampled through ``inv(bda)`` by nearest neighbour;
the model's camera pose becomes ``bda @ keyego_from_cam``. ``bda`` is a similarity, not always
rigid (scale, mirror): never feed it to :func:`invert_rigid`.

Randomness comes only from ``numpy.random.Generator`` objects made by :func:`make_rngs` from
(seed, epoch, index), so a sample is the same whichever DataLoader worker draws it. Without a
generator (evaluation) the image transform is the deterministic resize + crop and BEV is identity.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from occdistill.geometry.camera import crop_matrix, hflip_matrix, resize_matrix, rotate_matrix
from occdistill.geometry.grid import VoxelGrid
from occdistill.geometry.transforms import transform_points, yaw_transform


def _check_range(name: str, value: tuple[float, float], lo: float | None = None) -> None:
    if len(value) != 2 or value[0] > value[1]:
        raise ValueError(f"{name} must be (low, high) with low <= high, got {value}")
    if lo is not None and value[0] < lo:
        raise ValueError(f"{name} must be >= {lo}, got {value}")


def _check_prob(name: str, p: float) -> None:
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {p}")


@dataclass(frozen=True)
class ImageAugConfig:
    """Image pipeline: resize to the network input size, crop, and (training only) jitter.

    ``keep_aspect``: True scales both axes by ``max(H_f / H, W_f / W)`` and crops the spare
    rows/columns (BEVDet); False scales each axis to the final size exactly (ISO on Occ-ScanNet,
    1296x968 -> 640x480). ``resize_range`` multiplies that base scale in training (1.0 at
    evaluation). ``crop_top_range``: fraction of the spare rows cut above the crop (1 keeps the
    bottom of the image, where nuScenes' content is; 0.5 centres); evaluation uses its mean and
    centres horizontally, training draws both. ``color_jitter`` j draws brightness, contrast and
    saturation factors from [1 - j, 1 + j].
    """

    final_size: tuple[int, int] = (256, 704)  # (H, W)
    keep_aspect: bool = True
    resize_range: tuple[float, float] = (1.0, 1.0)
    crop_top_range: tuple[float, float] = (1.0, 1.0)
    flip_prob: float = 0.0
    rotate_range_deg: tuple[float, float] = (0.0, 0.0)
    color_jitter: float = 0.0

    def __post_init__(self) -> None:
        if len(self.final_size) != 2 or min(self.final_size) < 1:
            raise ValueError(f"final_size must be (H, W) with positive entries, got {self.final_size}")
        _check_range("resize_range", self.resize_range, lo=1e-3)
        _check_range("crop_top_range", self.crop_top_range, lo=0.0)
        if self.crop_top_range[1] > 1.0:
            raise ValueError(f"crop_top_range must lie in [0, 1], got {self.crop_top_range}")
        _check_range("rotate_range_deg", self.rotate_range_deg)
        _check_prob("flip_prob", self.flip_prob)
        if not 0.0 <= self.color_jitter < 1.0:
            raise ValueError(f"color_jitter must be in [0, 1), got {self.color_jitter}")


@dataclass(frozen=True)
class BevAugConfig:
    """BEV augmentation ranges (training only). Rotation is about the ego +z axis."""

    rotate_range_deg: tuple[float, float] = (0.0, 0.0)
    scale_range: tuple[float, float] = (1.0, 1.0)
    flip_x_prob: float = 0.0  # x -> -x
    flip_y_prob: float = 0.0  # y -> -y

    def __post_init__(self) -> None:
        _check_range("rotate_range_deg", self.rotate_range_deg)
        _check_range("scale_range", self.scale_range, lo=1e-3)
        _check_prob("flip_x_prob", self.flip_x_prob)
        _check_prob("flip_y_prob", self.flip_y_prob)


def make_rngs(seed: int, epoch: int, index: int) -> tuple[np.random.Generator, np.random.Generator]:
    """Independent (image, BEV) generators for one sample: changing the number of cameras never
    shifts the BEV draw, and the result does not depend on which worker loads the sample."""
    return tuple(np.random.default_rng([seed, epoch, index, stream]) for stream in (0, 1))  # type: ignore[return-value]


@dataclass(frozen=True)
class ImageAug:
    """One drawn image augmentation for one camera.

    ``img_from_raw`` (3, 3) maps raw pixels to output pixels. ``resize_size`` is the intermediate
    (H, W) of the antialiased resize; the rest of the matrix (crop, flip, rotate) is then applied
    by one affine warp at output resolution.
    """

    img_from_raw: np.ndarray
    raw_size: tuple[int, int]  # (H, W)
    resize_size: tuple[int, int]  # (H, W)
    out_size: tuple[int, int]  # (H, W)
    color: tuple[float, float, float] | None  # brightness, contrast, saturation factors

    @classmethod
    def identity(cls, raw_size: tuple[int, int]) -> "ImageAug":
        return cls(np.eye(3), tuple(raw_size), tuple(raw_size), tuple(raw_size), None)

    def apply_image(self, img: Image.Image) -> np.ndarray:
        """RGB PIL image of ``raw_size`` -> (H, W, 3) float32 in [0, 1]."""
        if (img.height, img.width) != self.raw_size:
            raise ValueError(f"image is {img.height}x{img.width}, augmentation drawn for {self.raw_size}")
        img = img.convert("RGB")
        (rh, rw), (oh, ow) = self.resize_size, self.out_size
        if (rh, rw) != self.raw_size:
            # PIL's resize filters with a support scaled to the reduction (antialiased) and maps
            # pixel centres to centres, i.e. exactly u' = u * rw / W under our convention.
            img = img.resize((rw, rh), Image.BILINEAR)
        sx, sy = rw / self.raw_size[1], rh / self.raw_size[0]
        post = self.img_from_raw @ np.linalg.inv(resize_matrix(sx, sy))
        if (oh, ow) != (rh, rw) or not np.allclose(post, np.eye(3), atol=1e-12):
            # PIL's AFFINE data maps output to input pixels, with the same [c, c+1) convention.
            data = tuple(np.linalg.inv(post)[:2].reshape(6))
            img = img.transform((ow, oh), Image.AFFINE, data, resample=Image.BILINEAR, fillcolor=(0, 0, 0))
        out = np.asarray(img, dtype=np.float32) / 255.0
        if self.color is not None:
            out = _jitter_color(out, *self.color)
        return out

    def warp_nearest(self, arr: np.ndarray, fill: float) -> np.ndarray:
        """(h, w, ...) map -> ``out_size`` by nearest neighbour; ``fill`` outside.

        Each output pixel centre is mapped back through ``inv(img_from_raw)`` and takes the map
        pixel containing that point, so labels and depth are never blended across edges. A map of
        another resolution than the image is taken to cover the same field of view (ScanNet's
        640x480 depth beside 1296x968 colour, as ISO uses it); the caller checks the aspect ratio.
        """
        h, w = arr.shape[:2]
        map_from_raw = resize_matrix(w / self.raw_size[1], h / self.raw_size[0])
        oh, ow = self.out_size
        ys, xs = np.meshgrid(np.arange(oh) + 0.5, np.arange(ow) + 0.5, indexing="ij")
        map_from_img = map_from_raw @ np.linalg.inv(self.img_from_raw)
        src = np.stack([xs, ys, np.ones_like(xs)], axis=-1) @ map_from_img.T  # (oh, ow, 3)
        col = np.floor(src[..., 0] / src[..., 2]).astype(np.int64)
        row = np.floor(src[..., 1] / src[..., 2]).astype(np.int64)
        valid = (col >= 0) & (col < w) & (row >= 0) & (row < h)
        out = np.full((oh, ow) + arr.shape[2:], fill, dtype=arr.dtype)
        out[valid] = arr[row[valid], col[valid]]
        return out


def _jitter_color(img: np.ndarray, brightness: float, contrast: float, saturation: float) -> np.ndarray:
    """(H, W, 3) float in [0, 1] -> same, torchvision-style factors in a fixed order."""
    gray_weights = np.array([0.299, 0.587, 0.114], dtype=np.float32)
    img = img * brightness
    img = (img - (img @ gray_weights).mean()) * contrast + (img @ gray_weights).mean()
    gray = (img @ gray_weights)[..., None]
    img = gray + (img - gray) * saturation
    return np.clip(img, 0.0, 1.0).astype(np.float32)


def sample_image_aug(cfg: ImageAugConfig, raw_size: tuple[int, int], rng: np.random.Generator | None) -> ImageAug:
    """Draw one camera's augmentation; ``rng=None`` gives the deterministic evaluation transform.

    Every draw is made whatever the probabilities are, so changing one setting does not shift the
    random stream of the others.
    """
    h, w = raw_size
    fh, fw = cfg.final_size
    if cfg.keep_aspect:
        sx = sy = max(fh / h, fw / w)
    else:
        sx, sy = fw / w, fh / h
    if rng is None:
        jitter, u, v, flip, angle, color = 1.0, 0.5, float(np.mean(cfg.crop_top_range)), False, 0.0, None
    else:
        jitter = rng.uniform(*cfg.resize_range)
        u = rng.uniform()
        v = rng.uniform(*cfg.crop_top_range)
        flip = bool(rng.uniform() < cfg.flip_prob)
        angle = float(rng.uniform(*cfg.rotate_range_deg))
        factors = tuple(float(f) for f in rng.uniform(1 - cfg.color_jitter, 1 + cfg.color_jitter, size=3))
        color = factors if cfg.color_jitter > 0 else None
    rw, rh = max(1, round(w * sx * jitter)), max(1, round(h * sy * jitter))
    # Integer crop offsets keep the evaluation transform free of interpolation after the resize;
    # negative offsets (image smaller than the output) pad with black.
    x0, y0 = round(u * (rw - fw)), round(v * (rh - fh))
    m = crop_matrix(x0, y0) @ resize_matrix(rw / w, rh / h)
    if flip:
        m = hflip_matrix(fw) @ m
    if angle != 0.0:
        m = rotate_matrix(angle, (fw / 2, fh / 2)) @ m
    return ImageAug(m, (h, w), (rh, rw), (fh, fw), color)


def sample_bev_aug(cfg: BevAugConfig | None, rng: np.random.Generator | None) -> np.ndarray:
    """(4, 4) float64 ``bda`` = augmented-ego-from-ego; identity without config or generator."""
    if cfg is None or rng is None:
        return np.eye(4)
    angle = math.radians(rng.uniform(*cfg.rotate_range_deg))
    scale = rng.uniform(*cfg.scale_range)
    flip_x = rng.uniform() < cfg.flip_x_prob
    flip_y = rng.uniform() < cfg.flip_y_prob
    mirror = np.diag([-1.0 if flip_x else 1.0, -1.0 if flip_y else 1.0, 1.0, 1.0])
    return mirror @ np.diag([scale, scale, scale, 1.0]) @ yaw_transform(angle)


def apply_bev_aug(
    bda: np.ndarray,
    grid: VoxelGrid,
    semantics: np.ndarray,
    masks: tuple[np.ndarray, ...],
    fill_label: int,
) -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
    """Resample (X, Y, Z) labels and boolean masks into the augmented ego frame.

    Every output voxel centre c' takes the voxel containing ``inv(bda) @ c'``; voxels whose source
    lies outside the grid become ``fill_label`` with all masks False (unobserved, never supervised).
    """
    if np.allclose(bda, np.eye(4), atol=1e-12):
        return semantics, masks
    for m in (semantics, *masks):
        if m.shape != grid.shape:
            raise ValueError(f"label array of shape {m.shape} does not match grid {grid.shape}")
    src = transform_points(np.linalg.inv(bda), grid.centers().reshape(-1, 3))  # (X*Y*Z, 3)
    idx, inside = grid.point_to_index(src)
    flat = np.ravel_multi_index(tuple(idx.T), grid.shape)
    sem = np.where(inside, semantics.reshape(-1)[flat], fill_label).astype(semantics.dtype).reshape(grid.shape)
    out_masks = tuple((m.reshape(-1)[flat] & inside).reshape(grid.shape) for m in masks)
    return sem, out_masks
