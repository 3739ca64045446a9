"""The supervised objective of the dense student: batch -> model output -> named loss terms.

Terms are returned unweighted next to the weighted ``total`` (DETR's weight_dict idea), so logs show
both what each loss measures and what it contributes.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from occdistill.data.classes import ClassTable
from occdistill.data.sample import Batch
from occdistill.engine.config import LossConfig
from occdistill.losses.lovasz import lovasz_softmax
from occdistill.losses.supervised import depth_bce_loss, labelled_voxels, voxel_cross_entropy
from occdistill.models.dense import DenseOutput
from occdistill.nn.depth_bins import DepthBins


def forward_batch(model: nn.Module, batch: Batch, prior_depth: torch.Tensor | None = None):
    """Run a model of any kind on the cameras of a batch already on the model's device (its output
    dataclass: ``DenseOutput``, ``GaussianOutput`` or ``SparseOutput``); ``prior_depth``
    (B, N, H, W) for a sparse student with the depth-prior branch."""
    cams = (batch.images, batch.intrinsics, batch.img_from_raw, batch.ego_from_cam)
    return model(*cams) if prior_depth is None else model(*cams, prior_depth=prior_depth)


def class_weights(counts: np.ndarray, mode: str, exponent: float = 0.5) -> torch.Tensor | None:
    """Per-class CE weights (K,) from training-label counts, or None for ``mode == "none"``.

    ``inverse_log``: FlashOcc's ``class_balance``, ``1 / log(count + 0.001)``, with counts below e
    raised to e so that the log stays positive. ``inverse_frequency``: ``frequency ** -exponent``,
    scaled so the classes present average 1 (absent classes get 0: they have no voxels anyway).
    """
    if mode == "none":
        return None
    counts = np.asarray(counts, dtype=np.float64)
    if mode == "inverse_log":
        return torch.tensor(1.0 / np.log(np.maximum(counts, math.e) + 0.001), dtype=torch.float32)
    if mode == "inverse_frequency":
        present = counts > 0
        w = np.zeros_like(counts)
        w[present] = (counts[present] / counts.sum()) ** -exponent
        w[present] /= w[present].mean()
        return torch.tensor(w, dtype=torch.float32)
    raise ValueError(f"unknown class weighting {mode!r}")


def supervised_losses(
    out: DenseOutput,
    batch: Batch,
    cfg: LossConfig,
    classes: ClassTable,
    depth_bins: DepthBins | None = None,
    weights: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Loss terms (float32 scalars): ``ce`` and, when weighted in, ``lovasz`` and ``depth``;
    ``total`` is their weighted sum. Which voxels count: ``mask_camera`` when ``cfg.camera_mask``,
    else every voxel with a known label (Lovász: of those, the occupied ones with
    ``cfg.lovasz_ignore_free``)."""
    if batch.semantics is None:
        raise ValueError("the batch has no labels")
    mask = None
    if cfg.camera_mask:
        if batch.mask_camera is None:
            raise ValueError("loss.camera_mask is on but the dataset provides no mask_camera")
        mask = batch.mask_camera
    terms = {"ce": voxel_cross_entropy(out.voxel_logits, batch.semantics, mask, weights, classes.ignore_index)}
    total = terms["ce"]
    if cfg.lovasz_weight > 0:
        # GaussianFormer-2 leaves free voxels out of Lovász: it shapes which class an occupied voxel
        # gets while the CE keeps deciding free vs occupied
        counted = labelled_voxels(batch.semantics, mask, classes.ignore_index,
                                  classes.free_index if cfg.lovasz_ignore_free else None)
        terms["lovasz"] = lovasz_softmax(out.voxel_logits.float().softmax(dim=-1), batch.semantics, counted)
        total = total + cfg.lovasz_weight * terms["lovasz"]
    if cfg.depth_weight > 0:
        if batch.depth is None or depth_bins is None:
            raise ValueError("loss.depth_weight > 0 needs depth targets (data.depth) and the model's depth bins")
        terms["depth"] = depth_bce_loss(out.depth, batch.depth, depth_bins)
        total = total + cfg.depth_weight * terms["depth"]
    terms["total"] = total
    return terms
