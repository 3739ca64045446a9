"""Evaluate a model on a dataset with the metrics module: Occ3D voxel mIoU / IoU with
``mask_camera`` + RayIoU, or the Occ-ScanNet ISO metrics. Used by training's periodic evaluation,
``occdistill eval`` and the demo.

Each process evaluates its shard of whole scenes in time order
(:func:`occdistill.engine.data.scene_shard`); the metric counts are summed over processes before the
report is computed, so every rank returns the same report. On Occ3D-layout data the report also holds ``flicker``: the percentage of static
camera-visible voxels whose predicted label changes between consecutive frames
(:mod:`occdistill.metrics.flicker`), and ``flicker_occupied`` over static occupied voxels.

``temporal_filter`` w > 0 (Occ3D, dense or Gaussian models) scores the labels of the streaming
voxel filter (:mod:`occdistill.nn.voxel_filter`, movers taken from the current frame) instead of
each frame's own argmax: every process filters its scenes frame by frame in time order, as a robot
would.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from occdistill.data.build import Dataset
from occdistill.data.occ3d import Occ3DDataset
from occdistill.engine.data import eval_loader
from occdistill.engine.distributed import DistContext, metric_device
from occdistill.engine.tasks import predict_labels, predict_scores, temporal_frames
from occdistill.errors import ConfigError
from occdistill.io import atomic_save_npz
from occdistill.metrics import (
    FlickerAccumulator,
    Occ3DAccumulator,
    OccScanNetAccumulator,
    RayIoUAccumulator,
    lidar_origins,
    occ3d_report,
    occscannet_report,
)
from occdistill.metrics.flicker import OCC3D_DYNAMIC_CLASSES
from occdistill.nn.voxel_filter import VoxelScoreFilter


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: Dataset,
    device: torch.device,
    *,
    ctx: DistContext = DistContext(),
    batch_size: int = 1,
    workers: int = 0,
    rayiou: bool = True,
    amp: str = "off",
    save_pred: Path | None = None,
    progress: bool = False,
    temporal_filter: float = 0.0,
) -> dict[str, Any]:
    """The metrics report (``occ3d_report`` / ``occscannet_report`` layout, values in percent).

    ``save_pred``: also write ``<save_pred>/<token>.npz`` with ``semantics`` (uint8, X, Y, Z), the
    layout ``occdistill score`` reads (Occ-ScanNet tokens are ``<scene>/<frame>``).
    ``temporal_filter``: the history weight w of the streaming voxel filter (0 = per-frame argmax).
    """
    occ3d = isinstance(dataset, Occ3DDataset)
    classes, counts_on = dataset.classes, metric_device(ctx, device)
    voxel_filter = None
    if temporal_filter:
        if not occ3d:
            raise ConfigError("the temporal filter needs ego poses and scene order: Occ3D-layout data only")
        # Movers take the current frame: the classes the flicker metric does not count as static.
        dynamic = [classes.index(name) for name in OCC3D_DYNAMIC_CLASSES]
        voxel_filter = VoxelScoreFilter(grid=dataset.grid, weight=temporal_filter, dynamic=dynamic)
    if occ3d:
        voxel_acc = Occ3DAccumulator(classes=classes, device=counts_on)
        ray_acc = RayIoUAccumulator(classes=classes, grid=dataset.grid, device=counts_on) if rayiou else None
        flicker_acc = FlickerAccumulator(grid=dataset.grid, classes=classes, device=counts_on)
    else:
        scannet_acc = OccScanNetAccumulator(classes=classes, device=counts_on)
    was_training = model.training
    model.eval()
    loader = eval_loader(dataset, ctx, batch_size, workers, temporal_frames(model))
    for item in tqdm(loader, desc="eval", unit="batch", file=sys.stderr, disable=not (progress and ctx.is_main),
                     dynamic_ncols=True, leave=False):
        item = item.to(device)
        batch = item.batch
        if voxel_filter is None:
            pred = predict_labels(model, item, amp).cpu()  # (B, X, Y, Z) uint8
        else:
            # A batch is consecutive frames of the shard's scene order: filter them one by one.
            scores = predict_scores(model, item, amp)  # (B, X, Y, Z, K)
            pred = torch.stack([voxel_filter.step(s, pose, scene).argmax(dim=-1) for s, pose, scene
                                in zip(scores, batch.global_from_ego, batch.scene_names)]).to(torch.uint8).cpu()
        if occ3d:
            voxel_acc.update(pred, batch.semantics, batch.mask_camera)
            flicker_acc.update(pred, batch.semantics, batch.mask_camera, batch.global_from_ego, batch.scene_names)
            if ray_acc is not None:
                frames = [dataset.frame(int(i)) for i in batch.frame_indices]
                origins = [lidar_origins(dataset.infos.scene_frames(f.scene_name), f) for f in frames]
                ray_acc.update(pred, batch.semantics, origins)
        else:
            scannet_acc.update(pred, batch.semantics)
        if save_pred is not None:
            for token, labels in zip(batch.tokens, pred.numpy()):
                atomic_save_npz(save_pred / f"{token}.npz", semantics=labels)
    model.train(was_training)
    if not occ3d:
        scannet_acc.all_reduce()
        return occscannet_report(scannet_acc.compute())
    voxel_acc.all_reduce()
    flicker_acc.all_reduce()
    if ray_acc is not None:
        ray_acc.all_reduce()
    flicker = flicker_acc.compute()
    return {**occ3d_report(voxel_acc.compute(), ray_acc.compute() if ray_acc is not None else None),
            "flicker": _percent(flicker.flicker), "flicker_occupied": _percent(flicker.flicker_occupied),
            "flicker_pairs": flicker.num_pairs}


def _percent(fraction: float) -> float | None:
    """A fraction in percent; None when nothing was counted (NaN is not JSON)."""
    return None if math.isnan(fraction) else 100.0 * fraction
