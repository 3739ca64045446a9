"""Projection consistency: do GT-occupied voxels land on image pixels of their own class?

This is the check that catches calibration-chain and augmentation mistakes (a model trained on
misaligned labels "learns" but never generalises). Per camera, using the rendered semantic and
depth maps of the synthetic world:

- a voxel is *seen* when its centre projects inside the image (not onto augmentation padding,
  semantic 255), in front of the camera, and the rendered surface at that pixel lies within
  ``depth_tolerance`` (half a voxel diagonal) of the voxel centre: the voxel is on the visible
  surface, neither hidden behind it nor floating in front of it;
- a seen voxel is *consistent* when the pixel has the voxel's class.

A geometry error shows in two ways, and a check must watch both: voxels that land on content of
another class (the consistent fraction drops), and voxels that no longer meet any surface (the
seen count collapses -- e.g. a vertical offset puts ground voxels under the road, where every
pixel shows road at another depth).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from occdistill.data.classes import ClassTable
from occdistill.data.sample import Sample
from occdistill.geometry.camera import project
from occdistill.geometry.grid import VoxelGrid
from occdistill.geometry.transforms import transform_points

PADDING = 255  # semantic value of pixels outside the raw image after augmentation


@dataclass(frozen=True)
class CameraConsistency:
    camera: str
    seen: int  # occupied voxels on the surface this camera sees
    consistent: int  # of those, voxels whose pixel has the same class

    @property
    def fraction(self) -> float:
        return self.consistent / self.seen if self.seen else float("nan")


@dataclass(frozen=True)
class ConsistencyReport:
    cameras: tuple[CameraConsistency, ...]

    @property
    def seen(self) -> int:
        return sum(c.seen for c in self.cameras)

    @property
    def fraction(self) -> float:
        seen = self.seen
        return sum(c.consistent for c in self.cameras) / seen if seen else float("nan")


def projection_consistency(
    centers: np.ndarray,
    labels: np.ndarray,
    camera_names: list[str],
    cam_from_ego: np.ndarray,
    intrinsics: np.ndarray,
    semantic_maps: np.ndarray,
    depth_maps: np.ndarray,
    depth_tolerance: float,
) -> ConsistencyReport:
    """Per-camera consistency of occupied voxels with rendered semantic and depth maps.

    centers (P, 3) voxel centres in the frame ``cam_from_ego`` expects; labels (P,);
    cam_from_ego (N, 4, 4); intrinsics (N, 3, 3) including image augmentation;
    semantic_maps (N, H, W) class ids (255 = padding); depth_maps (N, H, W) rendered z-depth in
    metres, 0 where nothing was hit.
    """
    results = []
    n_cams, h, w = semantic_maps.shape
    for n in range(n_cams):
        uv, z = project(transform_points(cam_from_ego[n], centers.astype(np.float64)), intrinsics[n])
        col = np.floor(uv[:, 0]).astype(np.int64)
        row = np.floor(uv[:, 1]).astype(np.int64)
        inside = (z > 0.1) & (col >= 0) & (col < w) & (row >= 0) & (row < h)
        col, row, zi, lab = col[inside], row[inside], z[inside], labels[inside]
        d = depth_maps[n, row, col]
        cls = semantic_maps[n, row, col]
        seen = (cls != PADDING) & (d > 0) & (np.abs(d - zi) <= depth_tolerance)
        match = (cls == lab) & seen
        results.append(CameraConsistency(camera_names[n], int(seen.sum()), int(match.sum())))
    return ConsistencyReport(tuple(results))


def occupied_voxels(sample: Sample, grid: VoxelGrid, classes: ClassTable) -> tuple[np.ndarray, np.ndarray]:
    """Centres (P, 3) in the sample's (augmented) ego frame and labels (P,) of its occupied,
    known voxels (free/empty and the ignore label excluded)."""
    if sample.semantics is None:
        raise ValueError(f"sample {sample.token} has no labels to draw")
    sem = sample.semantics.numpy()
    occ = sem != classes.free_index
    if classes.ignore_index is not None:
        occ &= sem != classes.ignore_index
    idx = np.argwhere(occ)
    return grid.index_to_center(idx), sem[occ]


def cam_from_ego(sample: Sample) -> np.ndarray:
    """(N, 4, 4) float64 augmented ego -> camera; a general inverse because BEV augmentation may
    scale or mirror."""
    return np.linalg.inv(sample.ego_from_cam.double().numpy())


def sample_consistency(sample: Sample, grid: VoxelGrid, classes: ClassTable) -> ConsistencyReport:
    """Projection consistency of one sample (needs rendered semantic and depth maps)."""
    if sample.semantic_maps is None or sample.depth is None:
        raise ValueError(f"sample {sample.token}: consistency needs semantic maps and depth maps")
    centers, labels = occupied_voxels(sample, grid, classes)
    bda = sample.bda.double().numpy()
    scale = abs(np.linalg.det(bda[:3, :3])) ** (1.0 / 3.0)
    # Half a voxel diagonal, in camera metres (BEV scaling changes voxel size seen from the camera).
    tolerance = 0.5 * float(np.linalg.norm(grid.size)) / scale
    return projection_consistency(
        centers,
        labels,
        list(sample.camera_names),
        cam_from_ego(sample),
        sample.aug_intrinsics.double().numpy(),
        sample.semantic_maps.numpy(),
        sample.depth.numpy(),
        tolerance,
    )
