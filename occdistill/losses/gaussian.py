"""Losses of the Gaussian teacher: voxel NLL of its probabilities, optional Lovász-softmax, and the
distribution-based initialisation's ray target and loss.

Shapes: B batch, N cameras, D depth bins, h w feature map (one ray per cell), X Y Z voxels, K classes.
All losses are computed in float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from occdistill.data.sample import Batch
from occdistill.geometry.grid import VoxelGrid
from occdistill.losses.lovasz import lovasz_softmax
from occdistill.losses.supervised import labelled_voxels, voxel_cross_entropy
from occdistill.nn.depth_bins import DepthBins


@dataclass(frozen=True)
class GaussianLossConfig:
    camera_mask: bool = True  # CE (and Lovász) over camera-visible voxels only
    ce_weight: float = 1.0  # NLL of the voxel probabilities (GaussianFormer-2: 10 with Lovász 1)
    lovasz_weight: float = 0.5  # Lovász-softmax on the probabilities; 0 = off
    lovasz_ignore_free: bool = True  # GaussianFormer-2 leaves free-labelled voxels out of Lovász
    init_depth_weight: float = 0.5  # CE of the init depth distribution against the first hit
    init_samples_per_bin: int = 4  # GT look-ups per depth bin along each ray

    def __post_init__(self) -> None:
        if min(self.ce_weight, self.lovasz_weight, self.init_depth_weight) < 0:
            raise ValueError("Gaussian loss weights must be >= 0")
        if self.init_samples_per_bin < 1:
            raise ValueError("init_samples_per_bin must be >= 1")


@torch.no_grad()
def init_depth_target(
    origins: torch.Tensor,
    directions: torch.Tensor,
    semantics: torch.Tensor,
    grid: VoxelGrid,
    bins: DepthBins,
    free_index: int,
    ignore_index: int | None = None,
    samples_per_bin: int = 4,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per ray, the depth bin of the first occupied GT voxel (GaussianFormer-2's "occupancy along the
    ray" supervision, reduced to its first hit).

    Args:
        origins: (B, N, 3) ray origins (camera centres) in the labels' (augmented ego) frame.
        directions: (B, N, h, w, 3): the point at z-depth d is ``origin + d * direction``.
        semantics: (B, X, Y, Z) labels on ``grid``.
        bins: D bins; bin k covers z-depth ``[dmin + k step, dmin + (k+1) step)``.
        free_index: label of empty space; ignore_index: label of unknown voxels (or None).
        samples_per_bin: GT look-ups evenly spaced inside each bin (a bin is occupied if any falls
            in an occupied voxel), so that a bin longer than a voxel does not step over a thin wall.

    Returns:
        target (B, N, h, w) int64 in 0..D, D = no occupied voxel along the ray inside the grid
        within [dmin, dmax); valid (B, N, h, w) bool: False where an unknown voxel comes before the
        first hit (or anywhere on a ray without hit), since the true first surface is unknown there.

    The camera mask is not needed: the first occupied voxel along a camera ray is, by the mask's
    construction, visible.
    """
    batch, cams, h, w, _ = directions.shape
    num_bins, steps = bins.num_bins, samples_per_bin
    t = (torch.arange(num_bins * steps, dtype=torch.float32, device=origins.device) + 0.5) / steps
    depth = bins.dmin + t * bins.step  # (D*S,)
    points = origins.float()[:, :, None, None, None] + depth.view(1, 1, 1, 1, -1, 1) * directions.float()[..., None, :]
    idx, inside = grid.point_to_index(points)  # (B, N, h, w, D*S, 3), (B, N, h, w, D*S)
    b = torch.arange(batch, device=origins.device).view(batch, 1, 1, 1, 1)
    labels = semantics[b, idx[..., 0], idx[..., 1], idx[..., 2]]
    occupied = inside & (labels != free_index)
    unknown = torch.zeros_like(occupied)
    if ignore_index is not None:
        occupied &= labels != ignore_index
        unknown = inside & (labels == ignore_index)
    occupied = occupied.view(batch, cams, h, w, num_bins, steps).any(-1)
    unknown = unknown.view(batch, cams, h, w, num_bins, steps).any(-1)
    hit = occupied.any(-1)
    target = torch.where(hit, occupied.long().argmax(-1), torch.full_like(hit, num_bins, dtype=torch.long))
    bin_index = torch.arange(num_bins, device=origins.device)
    before = bin_index < target[..., None]  # bins strictly before the first hit (all bins if none)
    valid = ~(unknown & before).any(-1)
    return target, valid


def init_depth_loss(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the init distribution (B, N, D+1, h, w) logits against the first-hit bin
    (B, N, h, w), mean over valid rays; 0 (with a graph) if none is valid."""
    ce = F.cross_entropy(logits.float().flatten(0, 1), target.flatten(0, 1), reduction="none")  # (B*N, h, w)
    weight = valid.float().flatten(0, 1)
    return (ce * weight).sum() / weight.sum().clamp(min=1.0)


def gaussian_teacher_loss(
    output,
    batch: Batch,
    cfg: GaussianLossConfig,
    class_weights: torch.Tensor | None = None,
    ignore_index: int | None = None,
) -> dict[str, torch.Tensor]:
    """Named float32 loss terms of a :class:`~occdistill.models.gaussian.GaussianOutput` on a batch:
    ``ce`` (NLL of the voxel probabilities = CE on ``voxel_logits``), ``lovasz`` (when weighted in),
    ``init_depth``, and ``total`` = their weighted sum.

    Counted voxels: ``mask_camera`` when ``cfg.camera_mask``, and labels != ``ignore_index``.
    ``class_weights`` (K,) weight the CE as in the dense student's objective.
    """
    if batch.semantics is None:
        raise ValueError("the batch has no labels")
    mask = None
    if cfg.camera_mask:
        if batch.mask_camera is None:
            raise ValueError("loss.camera_mask is on but the batch has no mask_camera")
        mask = batch.mask_camera
    terms: dict[str, torch.Tensor] = {}
    total = output.voxel_logits.new_zeros((), dtype=torch.float32)
    if cfg.ce_weight > 0:
        terms["ce"] = voxel_cross_entropy(output.voxel_logits, batch.semantics, mask, class_weights, ignore_index)
        total = total + cfg.ce_weight * terms["ce"]
    if cfg.lovasz_weight > 0:
        counted = labelled_voxels(batch.semantics, mask, ignore_index,
                                  output.free_index if cfg.lovasz_ignore_free else None)
        terms["lovasz"] = lovasz_softmax(output.voxel_probs, batch.semantics, counted)
        total = total + cfg.lovasz_weight * terms["lovasz"]
    if cfg.init_depth_weight > 0:
        rays = output.init_rays
        target, valid = init_depth_target(
            rays.origins, rays.directions, batch.semantics, output.grid, rays.bins, output.free_index,
            ignore_index, cfg.init_samples_per_bin,
        )
        terms["init_depth"] = init_depth_loss(output.init_depth_logits, target, valid)
        total = total + cfg.init_depth_weight * terms["init_depth"]
    terms["total"] = total
    return terms
