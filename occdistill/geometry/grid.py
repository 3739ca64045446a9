"""Voxel grid spec (DESIGN.md section 3).

``range = (xmin, ymin, zmin, xmax, ymax, zmax)`` in metres, ``voxel_size`` per axis, arrays indexed
``[x, y, z]``; voxel (i, j, k) has its centre at ``min + (idx + 0.5) * size``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, TypeVar

import numpy as np
import torch

Array = TypeVar("Array", np.ndarray, torch.Tensor)


@dataclass(frozen=True)
class VoxelGrid:
    range: tuple[float, float, float, float, float, float]
    voxel_size: tuple[float, float, float]

    def __post_init__(self) -> None:
        if len(self.range) != 6 or len(self.voxel_size) != 3:
            raise ValueError(f"grid range needs 6 values and voxel_size 3, got {self.range}, {self.voxel_size}")
        object.__setattr__(self, "range", tuple(float(v) for v in self.range))
        object.__setattr__(self, "voxel_size", tuple(float(v) for v in self.voxel_size))
        for axis in range(3):
            extent = self.range[axis + 3] - self.range[axis]
            n = extent / self.voxel_size[axis]
            if self.voxel_size[axis] <= 0 or extent <= 0 or abs(n - round(n)) > 1e-6:
                raise ValueError(
                    f"grid axis {'xyz'[axis]}: extent {extent} m is not a positive whole number "
                    f"of voxels of {self.voxel_size[axis]} m"
                )

    @classmethod
    def from_origin(
        cls, origin: Sequence[float], voxel_size: float | Sequence[float], shape: Sequence[int]
    ) -> "VoxelGrid":
        """A grid whose minimum corner is ``origin`` (as Occ-ScanNet's ``voxel_origin``)."""
        size = (float(voxel_size),) * 3 if np.isscalar(voxel_size) else tuple(float(s) for s in voxel_size)
        lo = tuple(float(o) for o in origin)
        hi = tuple(lo[a] + shape[a] * size[a] for a in range(3))
        return cls(range=lo + hi, voxel_size=size)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(round((self.range[a + 3] - self.range[a]) / self.voxel_size[a]) for a in range(3))

    @property
    def lower(self) -> np.ndarray:
        return np.asarray(self.range[:3], dtype=np.float64)

    @property
    def upper(self) -> np.ndarray:
        return np.asarray(self.range[3:], dtype=np.float64)

    @property
    def size(self) -> np.ndarray:
        return np.asarray(self.voxel_size, dtype=np.float64)

    def centers(self) -> np.ndarray:
        """(X, Y, Z, 3) float64 voxel centres."""
        axes = [self.range[a] + (np.arange(n) + 0.5) * self.voxel_size[a] for a, n in enumerate(self.shape)]
        return np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)

    def index_to_center(self, idx: Array) -> Array:
        """Integer indices (..., 3) -> centres (..., 3)."""
        if isinstance(idx, torch.Tensor):
            lo = torch.as_tensor(self.lower, dtype=torch.float64, device=idx.device)
            return lo + (idx.double() + 0.5) * torch.as_tensor(self.size, device=idx.device)
        return self.lower + (np.asarray(idx, dtype=np.float64) + 0.5) * self.size

    def point_to_index(self, points: Array) -> tuple[Array, Array]:
        """Points (..., 3) -> (integer indices (..., 3), inside mask (...)). Indices of outside
        points are clamped into the grid; use the mask."""
        shape = self.shape
        if isinstance(points, torch.Tensor):
            lo = torch.as_tensor(self.lower, dtype=points.dtype, device=points.device)
            sz = torch.as_tensor(self.size, dtype=points.dtype, device=points.device)
            idx = torch.floor((points - lo) / sz).long()
            hi = torch.as_tensor(shape, device=points.device)
            inside = ((idx >= 0) & (idx < hi)).all(dim=-1)
            return torch.minimum(idx.clamp(min=0), hi - 1), inside
        idx = np.floor((np.asarray(points) - self.lower) / self.size).astype(np.int64)
        hi = np.asarray(shape)
        inside = np.all((idx >= 0) & (idx < hi), axis=-1)
        return np.minimum(np.maximum(idx, 0), hi - 1), inside


OCC3D_GRID = VoxelGrid(range=(-40.0, -40.0, -1.0, 40.0, 40.0, 5.4), voxel_size=(0.4, 0.4, 0.4))
