"""Image-free reference predictions, scored exactly like a model: the floor a student must clear.

- ``all-free``: every voxel free (empty): 0 mIoU, 0 IoU, 0 RayIoU by construction; the floor of
  a model that has learnt only the class prior (free is ~95% of the camera-visible voxels).
- ``voxel-majority``: every voxel gets its most frequent label over the training split (counted
  inside ``mask_camera`` where the format has one; free where never observed). On a fixed rig it
  learns the road under the car and the layout the scenes share -- what a model can get without
  looking at the images.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from occdistill.data.build import Dataset
from occdistill.data.occ3d import Occ3DDataset
from occdistill.engine.data import iter_labels
from occdistill.metrics import (
    Occ3DAccumulator,
    OccScanNetAccumulator,
    RayIoUAccumulator,
    lidar_origins,
    occ3d_report,
    occscannet_report,
)


def all_free(dataset: Dataset) -> np.ndarray:
    """(X, Y, Z) uint8, free everywhere."""
    return np.full(dataset.grid.shape, dataset.classes.free_index, dtype=np.uint8)


def voxel_majority(train_set: Dataset) -> np.ndarray:
    """(X, Y, Z) uint8: per voxel the most frequent training label (ties: lowest class id)."""
    num_classes = train_set.classes.num_classes
    counts = np.zeros((*train_set.grid.shape, num_classes), dtype=np.int32)  # (X, Y, Z, K)
    for _, sem, mask in iter_labels(train_set):
        seen = (sem < num_classes) if mask is None else mask & (sem < num_classes)
        x, y, z = np.nonzero(seen)
        np.add.at(counts, (x, y, z, sem[seen]), 1)
    majority = counts.argmax(axis=-1).astype(np.uint8)
    majority[counts.sum(axis=-1) == 0] = train_set.classes.free_index
    return majority


def score_fixed(pred: np.ndarray, dataset: Dataset, rayiou: bool = True) -> dict[str, Any]:
    """Report of predicting ``pred`` (X, Y, Z) for every sample of ``dataset``."""
    classes = dataset.classes
    if not isinstance(dataset, Occ3DDataset):
        acc = OccScanNetAccumulator(classes=classes)
        for _, sem, _ in iter_labels(dataset):
            acc.update(pred, sem)
        return occscannet_report(acc.compute())
    voxel = Occ3DAccumulator(classes=classes)
    ray = RayIoUAccumulator(classes=classes, grid=dataset.grid) if rayiou else None
    for i, sem, mask in iter_labels(dataset):
        voxel.update(pred, sem, mask)
        if ray is not None:
            frame = dataset.frame(i)
            ray.update(pred, sem, lidar_origins(dataset.infos.scene_frames(frame.scene_name), frame))
    return occ3d_report(voxel.compute(), ray.compute() if ray is not None else None)


def baseline_reports(train_set: Dataset, val_set: Dataset, rayiou: bool = True) -> dict[str, dict[str, Any]]:
    """{"all-free": report, "voxel-majority": report} on ``val_set``."""
    return {
        "all-free": score_fixed(all_free(val_set), val_set, rayiou),
        "voxel-majority": score_fixed(voxel_majority(train_set), val_set, rayiou),
    }
