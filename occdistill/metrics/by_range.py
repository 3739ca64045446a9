"""Occ3D voxel metrics by distance from the ego: the devkit mIoU, geometry IoU and per-class IoU
restricted to rings of horizontal distance.

One mIoU hides where a model fails. Near voxels are what a robot brakes for, far ones are seen
by few pixels; a class can be learnt at one range and missed at another (a student that confuses
the flat classes next to the ego while getting them right far away has the same mIoU as one that
fails the other way round). Each ring is scored exactly as the whole grid (``Occ3DAccumulator``:
``mask_camera`` voxels, pooled confusion, nanmean over the non-free classes) with the ring ANDed
into the mask, so the rings' confusion matrices add up to the whole grid's.

Distance: from the ego origin (the Occ3D grid is ego-centred) to the voxel centre, in the x-y
plane, in metres; ring i holds ``edges[i-1] <= d < edges[i]`` (first ring from 0, last to
infinity).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from occdistill.data.classes import OCC3D_NUSCENES, ClassTable
from occdistill.geometry.grid import VoxelGrid
from occdistill.metrics.occ3d import Occ3DAccumulator, Occ3DMetrics


@dataclass(frozen=True)
class RangeRing:
    """Horizontal distances ``lo <= d < hi`` in metres (``hi`` may be ``inf``)."""

    lo: float
    hi: float


def range_rings(edges: Sequence[float]) -> tuple[RangeRing, ...]:
    """Rings ``[0, e1), [e1, e2), ..., [en, inf)`` from strictly increasing positive edges."""
    values = [float(e) for e in edges]
    if not values:
        raise ValueError("range edges: give at least one distance in metres, e.g. 10,20")
    if not all(math.isfinite(e) and e > 0 for e in values) or any(b <= a for a, b in zip(values, values[1:])):
        raise ValueError(f"range edges must be finite, positive and strictly increasing, got {values}")
    bounds = [0.0, *values, math.inf]
    return tuple(RangeRing(lo, hi) for lo, hi in zip(bounds, bounds[1:]))


def ring_masks(grid: VoxelGrid, rings: Sequence[RangeRing]) -> np.ndarray:
    """(R, X, Y) bool: which BEV columns of ``grid`` each ring holds (by the column centre)."""
    centres = grid.centers()[:, :, 0, :2]  # (X, Y, Z, 3) -> (X, Y, 2): one centre per column
    dist = np.hypot(centres[..., 0], centres[..., 1])
    return np.stack([(dist >= r.lo) & (dist < r.hi) for r in rings])


@dataclass
class RangeAccumulator:
    """One :class:`Occ3DAccumulator` per ring; ``update`` per sample, ``compute`` at the end."""

    grid: VoxelGrid
    rings: tuple[RangeRing, ...]
    classes: ClassTable = OCC3D_NUSCENES
    device: str | None = None
    _masks: np.ndarray = field(init=False, repr=False)
    _accs: list[Occ3DAccumulator] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._masks = ring_masks(self.grid, self.rings)
        self._accs = [Occ3DAccumulator(classes=self.classes, device=self.device) for _ in self.rings]

    def update(self, pred: np.ndarray, gt: np.ndarray, mask_camera: np.ndarray) -> None:
        """pred, gt, mask_camera: (X, Y, Z) arrays of one sample on ``grid``."""
        if gt.shape != self.grid.shape:
            raise ValueError(f"labels of shape {gt.shape} are not on the {self.grid.shape} grid of the rings")
        camera = np.asarray(mask_camera).astype(bool)
        for ring, acc in zip(self._masks, self._accs):
            # (X, Y) -> (X, Y, 1): a ring takes whole columns
            acc.update(pred, gt, camera & ring[:, :, None])

    def compute(self) -> list[tuple[RangeRing, Occ3DMetrics]]:
        return [(ring, acc.compute()) for ring, acc in zip(self.rings, self._accs)]
