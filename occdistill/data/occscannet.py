"""Occ-ScanNet dataset (one pickle per frame, ISO layout) -> the same :class:`Sample` as Occ3D.

Pickle keys: ``img`` (image path), ``intrinsic`` (3x3 or 4x4, for the stored image's resolution),
``cam_pose`` (4x4 camera-to-world), ``voxel_origin`` (3,) world position of the grid's minimum
corner, ``target_1_4`` (60, 60, 36) uint8 with 255 = unknown, ``target_1_16``, and a depth PNG path
(``depth_gt`` in ISO; ``depth_path`` or ``depth`` also accepted; uint16 millimetres).

The "ego" frame of a frame (our choice; the format defines none): world axes (ScanNet's z is up),
origin at the bottom centre of the label grid, i.e. ``world = ego + voxel_origin + (X/2, Y/2, 0) * size``.
The grid is then ``(-X/2, -Y/2, 0) .. (X/2, Y/2, Z) * size`` and symmetric about the ego z axis like
the Occ3D grid, so BEV rotation/flip pivot about the grid centre, and ``global_from_ego`` is the grid
pose in the world (a pure translation), which relates frames of one scene. The camera pose is
``keyego_from_cam = ego_from_world @ cam_pose``.

Label axis order: ``target_1_4[i, j, k]`` is the voxel at ``voxel_origin + (i, j, k) * size`` along
world x, y, z -- ISO's reading (its ``vox2pix`` meshgrids the three world axes with
``indexing='ij'``). Public code disagrees: some loaders transpose it (1, 0, 2) first. We decided by
projecting labelled voxels into the images of data whose geometry we know (tests/test_readers.py);
DESIGN.md's centre convention places the voxel centre at ``+ 0.5`` voxel, where ISO's ``vox2pix``
projects the voxel's minimum corner (a 4 cm difference).

Unknown voxels (255) stay 255 in ``semantics``; ``mask_known`` marks the others (ISO protocol:
ignored in training, counted as empty by the metric). A pickle that also stores ``mask_camera``
(X, Y, Z) 0/1 (the synthetic world does; ISO's do not) gets it as ``Sample.mask_camera``.
"""

from __future__ import annotations

import copy
import pickle
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from occdistill.data.augment import BevAugConfig, ImageAugConfig, apply_bev_aug, make_rngs, sample_bev_aug
from occdistill.data.classes import OCC_SCANNET, ClassTable
from occdistill.data.infos import normalize_path, resolve_data_path
from occdistill.data.occ3d import ViewSpec, load_views
from occdistill.data.sample import Sample
from occdistill.errors import DataError
from occdistill.geometry.grid import VoxelGrid
from occdistill.geometry.transforms import check_rigid, invert_rigid, make_transform, transform_points

UNKNOWN = 255
_DEPTH_KEYS = ("depth_gt", "depth_path", "depth")


def scannet_grid(shape: tuple[int, int, int] = (60, 60, 36), voxel_size: float = 0.08) -> VoxelGrid:
    """The label grid in the Occ-ScanNet ego frame defined above (default: Occ-ScanNet's own)."""
    x, y, z = (s * voxel_size for s in shape)
    return VoxelGrid(range=(-x / 2, -y / 2, 0.0, x / 2, y / 2, z), voxel_size=(voxel_size,) * 3)


def scannet_grid_params(grid: VoxelGrid, what: str = "grid") -> tuple[tuple[int, int, int], float]:
    """(shape, voxel size) of ``grid`` when it is a label grid in the Occ-ScanNet ego frame (cubic
    voxels, centred on the ego z axis, bottom at z = 0: what :func:`scannet_grid` builds); a
    :class:`DataError` naming ``what`` otherwise. The frame pickles store ``voxel_origin`` but no
    voxel size, so a reader places its grid this way from the shape and voxel size alone."""
    size = grid.voxel_size[0]
    expected = scannet_grid(grid.shape, size).range
    # Tolerance: a config's 2.4 and the product 24 * 0.1 differ in the last bits.
    if not np.allclose(grid.voxel_size, size, rtol=0, atol=1e-9) or not np.allclose(grid.range, expected, rtol=0,
                                                                                     atol=1e-6):
        raise DataError(f"{what} range {grid.range} voxel size {grid.voxel_size} is not an Occ-ScanNet label grid "
                        f"(cubic voxels, x and y centred on the ego origin, z from 0: range {expected} for "
                        f"{'x'.join(map(str, grid.shape))} voxels of {size} m)")
    return grid.shape, size


def _frame_key(path: Path) -> tuple:
    stem = path.stem
    return (path.parent.name, 0 if stem.isdigit() else 1, int(stem) if stem.isdigit() else 0, stem)


class OccScanNetDataset(Dataset):
    """Occ-ScanNet frames returning :class:`Sample` (N = 1 camera, named ``CAM``).

    Args:
        data_root: dataset root.
        frames: pickle paths (absolute or relative to ``data_root``); default: ``split_file``'s
            lines if given, else every ``<root>/<scene>/<frame>.pkl`` (or under ``gathered_data/``).
        split_file: a text file listing pickle paths relative to ``data_root`` (ISO's lists).
        shape, voxel_size: the label grid (60x60x36 at 0.08 m in Occ-ScanNet).
        image_aug: e.g. ``ImageAugConfig(final_size=(480, 640), keep_aspect=False)`` for ISO's
            1296x968 -> 640x480; None keeps the stored image.
        bev_aug, augment, seed: as for :class:`Occ3DDataset`; BEV augmentation pivots about the
            grid centre and fills voxels from outside with 255 (unknown).
        with_labels: read ``target_1_4``.
        load_depth: read the depth PNG and warp it with the image augmentation (nearest).
        semantic_maps: read a per-pixel class-id PNG from the ``semantic_path`` key (synthetic).
    """

    def __init__(
        self,
        data_root: str | Path,
        frames: Sequence[str | Path] | None = None,
        *,
        split_file: str | Path | None = None,
        shape: tuple[int, int, int] = (60, 60, 36),
        voxel_size: float = 0.08,
        classes: ClassTable = OCC_SCANNET,
        image_aug: ImageAugConfig | None = None,
        bev_aug: BevAugConfig | None = None,
        augment: bool = False,
        seed: int = 0,
        with_labels: bool = True,
        load_depth: bool = False,
        semantic_maps: bool = False,
    ) -> None:
        self.data_root = Path(data_root)
        if frames is None and split_file is not None:
            split_file = Path(split_file)
            if not split_file.is_file():
                raise DataError(f"{split_file}: split file not found")
            frames = [line.strip() for line in split_file.read_text().splitlines() if line.strip()]
        if frames is None:
            paths = sorted(self.data_root.glob("*/*.pkl"), key=_frame_key) or sorted(
                self.data_root.glob("gathered_data/*/*.pkl"), key=_frame_key
            )
        else:
            paths = sorted(
                (p if p.is_absolute() else self.data_root / p for p in map(Path, map(normalize_path, frames))),
                key=_frame_key,
            )
        if not paths:
            raise DataError(f"{self.data_root}: no Occ-ScanNet frame pickles (<scene>/<frame>.pkl) found")
        self.paths: list[Path] = paths
        self.grid = scannet_grid(tuple(shape), voxel_size)
        self.classes = classes
        self.image_aug, self.bev_aug, self.augment, self.seed = image_aug, bev_aug, augment, seed
        self.with_labels, self.load_depth, self.semantic_maps = with_labels, load_depth, semantic_maps
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.paths)

    def set_epoch(self, epoch: int) -> None:
        """New random draws per epoch (call before iterating; see Occ3DDataset.set_epoch)."""
        self.epoch = int(epoch)

    def inputs_only(self) -> "OccScanNetDataset":
        """A view that reads the camera inputs only (no labels, depth or semantic maps), with the
        same augmentation draws: what the earlier keyframes of a temporal sample need."""
        view = copy.copy(self)
        view.with_labels, view.load_depth, view.semantic_maps = False, False, False
        return view

    def scene_name(self, index: int) -> str:
        return self.paths[index].parent.name

    def previous(self, index: int, steps: int = 1) -> int | None:
        """Index of the frame ``steps`` earlier in the same scene (frames sorted by number), or None."""
        j = index - steps
        return j if j >= 0 and self.scene_name(j) == self.scene_name(index) else None

    def _resolve(self, stored: str, pkl: Path) -> Path:
        """Stored paths are often absolute paths of another machine: try them as given, under the
        data root (by their ``posed_images`` tail), then next to the pickle."""
        found = resolve_data_path(self.data_root, stored)
        if found.exists():
            return found
        for candidate in (pkl.parent / normalize_path(stored), pkl.parent / Path(normalize_path(stored)).name):
            if candidate.exists():
                return candidate
        return found

    def read_record(self, index: int) -> dict[str, Any]:
        path = self.paths[index]
        if not path.is_file():
            raise DataError(f"{path}: frame pickle not found")
        try:
            with open(path, "rb") as f:
                rec = pickle.load(f)
        except Exception as exc:  # unpickling errors come in many types
            raise DataError(f"{path}: cannot unpickle ({type(exc).__name__}: {exc})") from exc
        if not isinstance(rec, dict):
            raise DataError(f"{path}: expected a dict, got {type(rec).__name__}")
        missing = [k for k in ("img", "intrinsic", "cam_pose", "voxel_origin") if k not in rec]
        if self.with_labels and "target_1_4" not in rec:
            missing.append("target_1_4")
        if missing:
            raise DataError(f"{path}: missing key(s) {missing} (has {sorted(rec)})")
        return rec

    def label_shape(self, index: int = 0) -> tuple[int, ...]:
        """Shape of frame ``index``'s ``target_1_4`` as stored (the data's own grid, whatever
        this reader was told)."""
        return tuple(np.shape(self.read_record(index)["target_1_4"]))

    def _labels(self, target: Any, where: str) -> np.ndarray:
        sem = np.asarray(target)
        if sem.shape != self.grid.shape:
            raise DataError(f"{where}: target_1_4 has shape {sem.shape}, expected {self.grid.shape}")
        if not np.issubdtype(sem.dtype, np.integer):
            raise DataError(f"{where}: target_1_4 must hold integer class ids, got dtype {sem.dtype}")
        bad = (sem < 0) | ((sem >= self.classes.num_classes) & (sem != UNKNOWN))
        if bad.any():
            raise DataError(
                f"{where}: target_1_4 has labels {np.unique(sem[bad])[:5].tolist()} outside "
                f"0..{self.classes.num_classes - 1} and {UNKNOWN} (unknown)"
            )
        return sem.astype(np.int64)

    def _mask(self, mask: Any, where: str) -> np.ndarray:
        m = np.asarray(mask)
        if m.shape != self.grid.shape:
            raise DataError(f"{where}: mask_camera has shape {m.shape}, expected {self.grid.shape}")
        if m.dtype != np.bool_ and not (np.issubdtype(m.dtype, np.integer) and np.isin(m, (0, 1)).all()):
            raise DataError(f"{where}: mask_camera must hold only 0 and 1 (dtype {m.dtype})")
        return m.astype(bool)

    def __getitem__(self, index: int) -> Sample:
        return self.load(index)

    def load(self, index: int, aug_index: int | None = None) -> Sample:
        """Frame ``index`` with the augmentation draws of ``aug_index`` (default itself)."""
        pkl = self.paths[index]
        where = str(pkl)
        rec = self.read_record(index)
        img_rng, bev_rng = (
            make_rngs(self.seed, self.epoch, index if aug_index is None else aug_index) if self.augment else (None, None)
        )
        k = np.asarray(rec["intrinsic"], dtype=np.float64)
        if k.shape not in ((3, 3), (4, 4)) or not np.all(np.isfinite(k)):
            raise DataError(f"{where}: intrinsic must be a finite 3x3 or 4x4 matrix, got shape {k.shape}")
        world_from_cam = check_rigid(rec["cam_pose"], f"{where} cam_pose")
        origin = np.asarray(rec["voxel_origin"], dtype=np.float64).reshape(-1)
        if origin.shape != (3,) or not np.all(np.isfinite(origin)):
            raise DataError(f"{where}: voxel_origin must be 3 finite numbers, got {rec['voxel_origin']!r}")
        world_from_ego = make_transform(np.eye(3), origin - self.grid.lower)
        keyego_from_cam = invert_rigid(world_from_ego) @ world_from_cam

        depth_key = next((key for key in _DEPTH_KEYS if rec.get(key)), None)
        if self.load_depth and depth_key is None:
            raise DataError(f"{where}: depth requested but none of the keys {list(_DEPTH_KEYS)} is set")
        spec = ViewSpec(
            name="CAM",
            image_path=self._resolve(str(rec["img"]), pkl),
            intrinsic=k[:3, :3],
            keyego_from_cam=keyego_from_cam,
            depth_path=self._resolve(str(rec[depth_key]), pkl) if self.load_depth else None,
            semantic_path=self._resolve(str(rec["semantic_path"]), pkl) if rec.get("semantic_path") else None,
        )
        views = load_views([spec], self.image_aug, img_rng, self.load_depth, self.semantic_maps, where)

        bda = sample_bev_aug(self.bev_aug, bev_rng)
        labels = {}
        if self.with_labels:
            sem = self._labels(rec["target_1_4"], where)
            masks = (sem != UNKNOWN,) + ((self._mask(rec["mask_camera"], where),) if "mask_camera" in rec else ())
            sem, masks = apply_bev_aug(bda, self.grid, sem, masks, UNKNOWN)
            labels = dict(semantics=torch.from_numpy(sem), mask_known=torch.from_numpy(np.ascontiguousarray(masks[0])))
            if len(masks) == 2:
                labels["mask_camera"] = torch.from_numpy(np.ascontiguousarray(masks[1]))
        stem = pkl.stem
        return Sample(
            token=f"{pkl.parent.name}/{stem}",
            scene_name=pkl.parent.name,
            timestamp=int(stem) if stem.isdigit() else index,
            frame_index=index,
            camera_names=("CAM",),
            images=torch.from_numpy(views.images),
            intrinsics=torch.from_numpy(views.intrinsics.astype(np.float32)),
            img_from_raw=torch.from_numpy(views.img_from_raw.astype(np.float32)),
            keyego_from_cam=torch.from_numpy(views.keyego_from_cam.astype(np.float32)),
            bda=torch.from_numpy(bda.astype(np.float32)),
            global_from_ego=torch.from_numpy(world_from_ego),
            lidar_origin=torch.from_numpy(transform_points(bda, keyego_from_cam[:3, 3]).astype(np.float32)),
            depth=None if views.depth is None else torch.from_numpy(views.depth),
            semantic_maps=None if views.semantic_maps is None else torch.from_numpy(views.semantic_maps),
            **labels,
        )
