"""Occ3D ``labels.npz`` reading with a schema check, and the ground-layer sanity check.

Schema (DESIGN.md section 5): keys ``semantics``, ``mask_lidar``, ``mask_camera``, each uint8
(X, Y, Z); semantics in 0..K-1; masks 0/1, cast to bool here so that a uint8 mask can never be
used as an index array by mistake.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from occdistill.data.classes import OCC3D_NUSCENES, ClassTable
from occdistill.errors import DataError
from occdistill.geometry.grid import OCC3D_GRID, VoxelGrid


@dataclass(frozen=True)
class OccLabels:
    """GT occupancy of one sample, indexed [x, y, z]."""

    semantics: np.ndarray  # (X, Y, Z) uint8 class ids
    mask_lidar: np.ndarray  # (X, Y, Z) bool
    mask_camera: np.ndarray  # (X, Y, Z) bool


def load_occ3d_labels(
    path: str | Path,
    shape: tuple[int, int, int] | None = None,
    classes: ClassTable = OCC3D_NUSCENES,
) -> OccLabels:
    """Read and validate a ``labels.npz``; any defect is a :class:`DataError` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: labels file not found")
    try:
        with np.load(path) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise DataError(f"{path}: not a readable .npz ({exc})") from exc
    return validate_labels(arrays, str(path), shape, classes)


def validate_labels(
    arrays: dict[str, np.ndarray],
    where: str,
    shape: tuple[int, int, int] | None = None,
    classes: ClassTable = OCC3D_NUSCENES,
) -> OccLabels:
    """Schema check of the three Occ3D arrays; returns them with boolean masks."""
    missing = [k for k in ("semantics", "mask_lidar", "mask_camera") if k not in arrays]
    if missing:
        raise DataError(f"{where}: missing key(s) {missing} (has {sorted(arrays)})")
    sem = arrays["semantics"]
    if sem.ndim != 3:
        raise DataError(f"{where}: semantics must be 3-D (X, Y, Z), got shape {sem.shape}")
    if shape is not None and tuple(sem.shape) != tuple(shape):
        raise DataError(f"{where}: semantics has shape {sem.shape}, expected {tuple(shape)}")
    if not np.issubdtype(sem.dtype, np.integer):
        raise DataError(f"{where}: semantics must hold integer class ids, got dtype {sem.dtype}")
    if sem.size and (sem.min() < 0 or sem.max() >= classes.num_classes):
        raise DataError(
            f"{where}: semantics has labels in [{sem.min()}, {sem.max()}], "
            f"outside 0..{classes.num_classes - 1} of the {classes.name} table"
        )
    masks = {}
    for key in ("mask_lidar", "mask_camera"):
        m = arrays[key]
        if m.shape != sem.shape:
            raise DataError(f"{where}: {key} has shape {m.shape}, semantics has {sem.shape}")
        if m.dtype != np.bool_:
            if not np.issubdtype(m.dtype, np.integer):
                raise DataError(f"{where}: {key} must be 0/1 integers or bool, got dtype {m.dtype}")
            bad = np.unique(m[(m != 0) & (m != 1)])
            if bad.size:
                raise DataError(f"{where}: {key} must hold only 0 and 1, found {bad[:5].tolist()}")
        masks[key] = m.astype(bool)
    return OccLabels(semantics=sem.astype(np.uint8), **masks)


@dataclass(frozen=True)
class GroundCheck:
    """Where the ground classes sit vertically, compared with where the grid expects them."""

    ground_voxels: int
    mode_layer: int | None  # the z-layer holding most ground voxels
    expected_layer: int  # the z-layer containing z = 0 m (ego ground plane)
    ok: bool
    message: str


def check_ground_layer(
    semantics: np.ndarray,
    grid: VoxelGrid = OCC3D_GRID,
    classes: ClassTable = OCC3D_NUSCENES,
    ground_classes: tuple[str, ...] = ("driveable_surface", "other_flat", "sidewalk", "terrain"),
    min_voxels: int = 100,
) -> GroundCheck:
    """Flag labels whose ground is not in the layer containing ego z = 0.

    In the nuScenes ego frame the road is at z ~ 0, which is Occ3D z-layer 2; an early release of
    the Occ3D labels put it in layer 0 (vertically offset by 0.8 m). Such a file trains a model
    that is systematically wrong in height, so it must be caught before training.
    """
    ids = [classes.index(n) for n in ground_classes]
    ground = np.isin(semantics, ids)
    expected = int(np.floor((0.0 - grid.range[2]) / grid.voxel_size[2]))
    n = int(ground.sum())
    if n < min_voxels:
        return GroundCheck(n, None, expected, True, f"only {n} ground voxels: too few to judge, not flagged")
    per_layer = ground.sum(axis=(0, 1))
    mode = int(per_layer.argmax())
    ok = mode == expected
    msg = (
        f"ground mode in z-layer {mode} as expected"
        if ok
        else f"ground mode in z-layer {mode}, expected {expected} (ego z = 0): labels look vertically offset "
        f"by {(mode - expected) * grid.voxel_size[2]:+.1f} m"
    )
    return GroundCheck(n, mode, expected, ok, msg)
