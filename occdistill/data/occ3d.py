"""Occ3D-nuScenes-style dataset: info pickle + ``gts/<scene>/<token>/labels.npz`` -> :class:`Sample`.

Works on real nuScenes infos (BEVDet / mmdet3d field names, Windows paths, camera-time ego poses)
and on the synthetic street world, whose camera entries may add ``semantic_path`` (uint8 class-id
PNG) and ``depth_path`` (uint16 PNG, millimetres, z-depth).

The shared per-camera loading (:func:`load_views`) is also used by the Occ-ScanNet reader.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from occdistill.data.augment import (
    BevAugConfig,
    ImageAug,
    ImageAugConfig,
    apply_bev_aug,
    make_rngs,
    sample_bev_aug,
    sample_image_aug,
)
from occdistill.data.classes import OCC3D_NUSCENES, ClassTable
from occdistill.data.depth import lidar_depth_maps, load_depth_png, load_lidar_points
from occdistill.data.infos import FrameInfo, InfoSet, grid_from_metadata, load_infos, resolve_data_path
from occdistill.data.labels import load_occ3d_labels
from occdistill.data.sample import Sample
from occdistill.errors import DataError
from occdistill.geometry.grid import OCC3D_GRID, VoxelGrid
from occdistill.geometry.transforms import invert_rigid, transform_points

DepthSource = Literal["none", "auto", "lidar", "rendered"]


def read_rgb(path: Path) -> Image.Image:
    """Open an image as RGB, or raise a :class:`DataError` naming the file."""
    if not path.is_file():
        raise DataError(f"{path}: image not found")
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (OSError, UnidentifiedImageError) as exc:
        raise DataError(f"{path}: cannot read image ({exc})") from exc


def read_label_png(path: Path) -> np.ndarray:
    """Single-channel uint8 class-id PNG -> (H, W) uint8."""
    if not path.is_file():
        raise DataError(f"{path}: semantic map not found")
    try:
        with Image.open(path) as img:
            arr = np.asarray(img)
    except (OSError, UnidentifiedImageError) as exc:
        raise DataError(f"{path}: cannot read semantic map ({exc})") from exc
    if arr.ndim != 2 or arr.dtype != np.uint8:
        raise DataError(f"{path}: semantic map must be a single-channel uint8 PNG, got {arr.dtype} {arr.shape}")
    return arr


def check_intrinsic_fits(k: np.ndarray, size: tuple[int, int], where: str) -> None:
    """The principal point must lie inside the image: catches intrinsics meant for another
    resolution (e.g. Occ-ScanNet's 1296x968 K used with a 640x480 image)."""
    h, w = size
    if not (0 < k[0, 2] < w and 0 < k[1, 2] < h) or k[0, 0] <= 0 or k[1, 1] <= 0:
        raise DataError(
            f"{where}: intrinsics (fx={k[0, 0]:.1f}, fy={k[1, 1]:.1f}, cx={k[0, 2]:.1f}, cy={k[1, 2]:.1f}) "
            f"do not fit a {w}x{h} image"
        )


@dataclass(frozen=True)
class ViewSpec:
    """What a reader knows about one camera of one frame, before loading."""

    name: str
    image_path: Path
    intrinsic: np.ndarray  # (3, 3) raw
    keyego_from_cam: np.ndarray  # (4, 4)
    depth_path: Path | None = None
    semantic_path: Path | None = None


@dataclass(frozen=True)
class Views:
    """Loaded, augmented camera data of one frame (numpy, before conversion to a Sample)."""

    images: np.ndarray  # (N, 3, H, W) float32
    intrinsics: np.ndarray  # (N, 3, 3)
    img_from_raw: np.ndarray  # (N, 3, 3)
    keyego_from_cam: np.ndarray  # (N, 4, 4)
    depth: np.ndarray | None  # (N, H, W) float32, rendered maps only
    semantic_maps: np.ndarray | None  # (N, H, W) int64


def _warped_map(path: Path | None, kind: str, aug: ImageAug, fill: float, where: str) -> np.ndarray:
    """Read a per-pixel map (``depth_path`` PNG in mm, or ``semantic_path`` class ids) and warp it
    with the camera's image augmentation by nearest neighbour."""
    if path is None:
        raise DataError(f"{where}: no {kind} given for it")
    arr = load_depth_png(path) if kind == "depth_path" else read_label_png(path)
    # Another resolution is taken as the same field of view (ScanNet's depth camera); another
    # aspect ratio means the map belongs to another image.
    aspect, raw_aspect = arr.shape[1] / arr.shape[0], aug.raw_size[1] / aug.raw_size[0]
    if abs(aspect - raw_aspect) > 0.02 * raw_aspect:
        raise DataError(
            f"{path}: map is {arr.shape[1]}x{arr.shape[0]}, its image {aug.raw_size[1]}x{aug.raw_size[0]} "
            "has another aspect ratio"
        )
    return aug.warp_nearest(arr, fill=fill)


def load_views(
    specs: Sequence[ViewSpec],
    image_aug: ImageAugConfig | None,
    rng: np.random.Generator | None,
    load_depth: bool,
    load_semantic: bool,
    where: str,
) -> Views:
    """Read and augment every camera; depth/semantic maps go through the same matrix (nearest)."""
    images, augs, depths, sems = [], [], [], []
    for spec in specs:
        img = read_rgb(spec.image_path)
        raw_size = (img.height, img.width)
        cam_where = f"{where} camera {spec.name}"
        check_intrinsic_fits(spec.intrinsic, raw_size, f"{cam_where} ({spec.image_path})")
        aug = ImageAug.identity(raw_size) if image_aug is None else sample_image_aug(image_aug, raw_size, rng)
        images.append(aug.apply_image(img).transpose(2, 0, 1))  # (H, W, 3) -> (3, H, W)
        augs.append(aug)
        if load_depth:
            depths.append(_warped_map(spec.depth_path, "depth_path", aug, 0.0, cam_where))
        if load_semantic:
            sems.append(_warped_map(spec.semantic_path, "semantic_path", aug, 255, cam_where))
    sizes = {im.shape for im in images}
    if len(sizes) > 1:
        raise DataError(f"{where}: cameras give images of different sizes {sorted(sizes)}; set an image_aug final_size")
    return Views(
        images=np.stack(images),
        intrinsics=np.stack([s.intrinsic for s in specs]),
        img_from_raw=np.stack([a.img_from_raw for a in augs]),
        keyego_from_cam=np.stack([s.keyego_from_cam for s in specs]),
        depth=np.stack(depths).astype(np.float32) if load_depth else None,
        semantic_maps=np.stack(sems).astype(np.int64) if load_semantic else None,
    )


def _f32(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))


class Occ3DDataset(Dataset):
    """Occ3D-nuScenes-layout dataset returning :class:`Sample`.

    Args:
        data_root: dataset root; stored paths are resolved under it (:func:`resolve_data_path`).
        infos: info pickle (absolute, or relative to ``data_root``) or a loaded :class:`InfoSet`.
        grid: voxel grid; default from the info metadata, else the Occ3D grid.
        classes: class table the labels must fit (and the metadata ``class_names``, if any).
        image_aug: resize/crop to a network input (and training jitter); None keeps raw images.
        bev_aug: BEV augmentation ranges, used only when ``augment``.
        augment: draw random augmentations (training); False gives the deterministic transform.
        seed: with the epoch (:meth:`set_epoch`) and the index, seeds every random draw.
        with_labels: load ``labels.npz`` (a missing file is then an error).
        depth: "none"; "rendered" (``depth_path`` PNGs); "lidar" (sweep projected into the
            augmented images); "auto" = rendered where every camera has one, else lidar.
        semantic_maps: load per-camera ``semantic_path`` PNGs (synthetic data).
        cameras: camera names in output order; default the order of the first frame.
        lidar_dims: float32 values per LiDAR point in the sweep files.
    """

    def __init__(
        self,
        data_root: str | Path,
        infos: str | Path | InfoSet,
        *,
        grid: VoxelGrid | None = None,
        classes: ClassTable = OCC3D_NUSCENES,
        image_aug: ImageAugConfig | None = None,
        bev_aug: BevAugConfig | None = None,
        augment: bool = False,
        seed: int = 0,
        with_labels: bool = True,
        depth: DepthSource = "none",
        semantic_maps: bool = False,
        cameras: Sequence[str] | None = None,
        lidar_dims: int = 5,
    ) -> None:
        self.data_root = Path(data_root)
        if not isinstance(infos, InfoSet):
            p = Path(infos)
            infos = load_infos(p if p.is_absolute() or p.exists() else self.data_root / p)
        self.infos = infos
        meta_grid = grid_from_metadata(infos.metadata, str(infos.path))
        if grid is not None and meta_grid is not None and grid != meta_grid:
            raise DataError(f"{infos.path}: metadata grid {meta_grid} differs from the requested {grid}")
        self.grid = grid or meta_grid or OCC3D_GRID
        names = infos.metadata.get("class_names")
        if names is not None and tuple(names) != classes.names:
            raise DataError(f"{infos.path}: metadata class_names {list(names)} differ from the {classes.name} table")
        self.classes = classes
        if depth not in ("none", "auto", "lidar", "rendered"):
            raise DataError(f"depth source {depth!r} is not one of none, auto, lidar, rendered")
        self.image_aug, self.bev_aug, self.augment, self.seed = image_aug, bev_aug, augment, seed
        self.with_labels, self.depth, self.semantic_maps, self.lidar_dims = with_labels, depth, semantic_maps, lidar_dims
        self.camera_names = tuple(cameras) if cameras is not None else tuple(c.name for c in infos.frames[0].cameras)
        if not self.camera_names:
            raise DataError(f"{infos.path}: first sample has no cameras")
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.infos)

    def set_epoch(self, epoch: int) -> None:
        """New random draws per epoch. DataLoader workers copy the dataset when they start, so call
        this before iterating; persistent workers would keep the old epoch."""
        self.epoch = int(epoch)

    def inputs_only(self) -> "Occ3DDataset":
        """A view that reads the camera inputs only (no labels, depth or semantic maps), with the
        same augmentation draws: what the earlier keyframes of a temporal sample need."""
        view = copy.copy(self)
        view.with_labels, view.depth, view.semantic_maps = False, "none", False
        return view

    def frame(self, index: int) -> FrameInfo:
        return self.infos.frames[index]

    def previous(self, index: int, steps: int = 1) -> int | None:
        """Dataset index of the keyframe ``steps`` earlier in the same scene, or None."""
        prev = self.infos.previous(self.infos.frames[index], steps)
        return None if prev is None else prev.index

    def label_path(self, frame: FrameInfo) -> Path:
        if frame.occ_path:
            stored = frame.occ_path if frame.occ_path.endswith(".npz") else f"{frame.occ_path}/labels.npz"
            return resolve_data_path(self.data_root, stored)
        return self.data_root / "gts" / frame.scene_name / frame.token / "labels.npz"

    def __getitem__(self, index: int) -> Sample:
        return self.load(index)

    def load(self, index: int, aug_index: int | None = None) -> Sample:
        """Sample ``index``, augmented with the draws of sample ``aug_index`` (default itself):
        temporal models load previous frames with the current frame's augmentation."""
        frame = self.infos.frames[index]
        where = f"sample {frame.token} ({frame.scene_name})"
        img_rng, bev_rng = (
            make_rngs(self.seed, self.epoch, index if aug_index is None else aug_index) if self.augment else (None, None)
        )
        cams = [frame.camera(n) for n in self.camera_names]
        source = self.depth
        if source == "auto":
            source = "rendered" if all(c.depth_path for c in cams) else "lidar"
        specs = [
            ViewSpec(
                name=c.name,
                image_path=resolve_data_path(self.data_root, c.image_path),
                intrinsic=c.intrinsic,
                keyego_from_cam=c.keyego_from_cam,
                depth_path=resolve_data_path(self.data_root, c.depth_path) if c.depth_path else None,
                semantic_path=resolve_data_path(self.data_root, c.semantic_path) if c.semantic_path else None,
            )
            for c in cams
        ]
        views = load_views(specs, self.image_aug, img_rng, source == "rendered", self.semantic_maps, where)
        depth = views.depth
        if source == "lidar":
            if not frame.lidar_path:
                raise DataError(f"{where}: LiDAR depth requested but the info record has no lidar_path")
            pts = load_lidar_points(resolve_data_path(self.data_root, frame.lidar_path), self.lidar_dims)
            depth = lidar_depth_maps(
                transform_points(frame.ego_from_lidar, pts),
                invert_rigid(views.keyego_from_cam),
                views.img_from_raw @ views.intrinsics,
                views.images.shape[-2:],
            )

        bda = sample_bev_aug(self.bev_aug, bev_rng)
        labels = {}
        if self.with_labels:
            occ = load_occ3d_labels(self.label_path(frame), self.grid.shape, self.classes)
            sem, (mask_camera, mask_lidar) = apply_bev_aug(
                bda, self.grid, occ.semantics, (occ.mask_camera, occ.mask_lidar), self.classes.free_index
            )
            labels = dict(
                semantics=torch.from_numpy(sem.astype(np.int64)),
                mask_camera=torch.from_numpy(np.ascontiguousarray(mask_camera)),
                mask_lidar=torch.from_numpy(np.ascontiguousarray(mask_lidar)),
            )
        return Sample(
            token=frame.token,
            scene_name=frame.scene_name,
            timestamp=frame.timestamp,
            frame_index=index,
            camera_names=self.camera_names,
            images=torch.from_numpy(views.images),
            intrinsics=_f32(views.intrinsics),
            img_from_raw=_f32(views.img_from_raw),
            keyego_from_cam=_f32(views.keyego_from_cam),
            bda=_f32(bda),
            global_from_ego=torch.from_numpy(frame.global_from_ego.astype(np.float64)),
            lidar_origin=_f32(transform_points(bda, frame.lidar_origin_ego)),
            depth=None if depth is None else torch.from_numpy(depth),
            semantic_maps=None if views.semantic_maps is None else torch.from_numpy(views.semantic_maps),
            **labels,
        )
