"""OPUS losses of the sparse-query model: two-way nearest-neighbour SmoothL1 (Chamfer-style) on
point positions and a sigmoid focal loss whose target per predicted point is the class of its
nearest ground-truth voxel, applied to every decoder layer (plus the initial points).

GT set per sample: centres of the occupied voxels (label known and not free), at most
``max_gt_points`` (a random subset beyond that, drawn with the caller's generator).
Per layer and sample, with predicted points p (all Q x R points of the main queries) and GT g:

    pts  = sum_g w_g SL1(g - p(g)) / |G|  +  sum_p v_p SL1(p - g(p)) / |P|      (SL1 summed over xyz)
    cls  = sum_{p, c} u_{p,c} focal(logit_{p,c}, [c == label(g(p))]) / |P|

p(g) / g(p) are nearest neighbours (found without gradient; gradients flow through the paired
differences). Weights (OPUS / DiScene): w_g = ``empty_weight`` when ||g - p(g)|| exceeds
``empty_distance`` voxels (a GT voxel no prediction covers), raised to ``rare_weight`` for
``rare_classes``; with the camera mask on, only GT voxels inside it get these weights (OPUS). v_p
(DiScene; OPUS uses 1): the same rule on the predicted side, with the label of g(p). u_{p,c} =
class weight of channel c x (1 + radial xy distance of g(p) from the grid centre / grid xy
diagonal). A frame with no occupied voxel has no point term; its classification target is all
negative. Losses are summed over samples and divided by the batch's point counts, as OPUS does
(mmdet ``avg_factor``), and computed in float32.

Letters: B batch, Q queries, R points per query, K_occ predicted classes, X Y Z voxels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from occdistill.data.sample import Batch
from occdistill.geometry.grid import VoxelGrid
from occdistill.models.sparse import OccClasses, SparseOutput

# DiScene's rare classes on Occ-ScanNet (ceiling, window, bed, tvs, objects) and OPUS's on
# Occ3D-nuScenes (others, bicycle, construction_vehicle, traffic_cone), in dataset labels.
DISCENE_SCANNET_RARE = (1, 4, 6, 9, 11)
OPUS_OCC3D_RARE = (0, 2, 5, 8)

# Elements per chunk of the pairwise distance matrix (64 MiB of float32).
_CDIST_BUDGET = 1 << 24


@dataclass(frozen=True)
class SparseLossConfig:
    """Defaults follow DiScene's Occ-ScanNet setup, with lengths in voxels so that they carry
    over between grids (OPUS: beta 0.2 m and 0.2 m threshold at 0.4 m voxels; DiScene 0.04 m at
    0.08 m: both half a voxel)."""

    points_weight: float = 0.5  # SmoothL1 Chamfer term (OPUS loss_pts weight)
    cls_weight: float = 2.0  # focal term (OPUS loss_cls weight)
    init_weight: float = 1.0  # Chamfer term of the initial points (times points_weight)
    smooth_l1_beta: float = 0.5  # voxels
    empty_distance: float = 0.5  # voxels: a point further than this from its pair is "uncovered"
    empty_weight: float = 5.0
    rare_classes: tuple[int, ...] = ()  # dataset labels, e.g. DISCENE_SCANNET_RARE
    rare_weight: float = 10.0
    weight_pred_side: bool = True  # DiScene: weight the pred->GT term too (OPUS: False)
    class_weights: tuple[float, ...] = ()  # per dataset label (length K, free entry unused); () = 1
    radial_weight: bool = True  # OPUS: classification weight grows to 1.5 at the grid's xy corners
    focal_gamma: float = 2.0
    focal_alpha: float = 0.25
    camera_mask: bool = False  # restrict the GT-side weights to mask_camera (OPUS on Occ3D)
    max_gt_points: int = 32768  # GT voxels per sample beyond this are subsampled

    def __post_init__(self) -> None:
        if min(self.points_weight, self.cls_weight, self.init_weight, self.empty_weight, self.rare_weight) < 0:
            raise ValueError("loss weights must be >= 0")
        if self.smooth_l1_beta <= 0 or self.empty_distance < 0 or self.max_gt_points < 1:
            raise ValueError("smooth_l1_beta must be > 0, empty_distance >= 0, max_gt_points >= 1")
        if any(w < 0 for w in self.class_weights):
            raise ValueError("class_weights must be >= 0")


@torch.no_grad()
def nearest_neighbours(queries: torch.Tensor, references: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each query point (M, 3), the index of its nearest reference point (N, 3) and the distance.

    Exact, via ``torch.cdist`` over row chunks sized so that no chunk exceeds 2^24 distances.
    """
    rows = max(1, _CDIST_BUDGET // max(1, references.shape[0]))
    idx, dist = [], []
    for start in range(0, queries.shape[0], rows):
        d = torch.cdist(queries[start:start + rows], references)
        best = d.min(dim=1)
        idx.append(best.indices)
        dist.append(best.values)
    if not idx:
        return queries.new_zeros(0, dtype=torch.long), queries.new_zeros(0)
    return torch.cat(idx), torch.cat(dist)


@dataclass
class GTPoints:
    """One sample's GT set: centres (G, 3) metres, dataset labels (G,), mask (G,) bool (inside the
    camera mask, or all True)."""

    points: torch.Tensor
    labels: torch.Tensor
    in_mask: torch.Tensor


def gt_points(
    semantics: torch.Tensor,
    grid: VoxelGrid,
    classes: OccClasses,
    mask: torch.Tensor | None = None,
    max_points: int | None = None,
    generator: torch.Generator | None = None,
) -> GTPoints:
    """Occupied voxel centres of one frame (X, Y, Z) -> :class:`GTPoints`; at most ``max_points``
    (a uniform random subset drawn with ``generator``, deterministic for a seeded generator)."""
    occupied = classes.occupied(semantics)
    idx = occupied.nonzero()  # (G, 3)
    if max_points is not None and idx.shape[0] > max_points:
        keep = torch.randperm(idx.shape[0], generator=generator, device="cpu")[:max_points]
        idx = idx[keep.sort().values.to(idx.device)]
    labels = semantics[idx[:, 0], idx[:, 1], idx[:, 2]]
    in_mask = torch.ones_like(labels, dtype=torch.bool) if mask is None else mask[idx[:, 0], idx[:, 1], idx[:, 2]].bool()
    return GTPoints(points=grid.index_to_center(idx).float(), labels=labels, in_mask=in_mask)


def sigmoid_focal_loss(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor, gamma: float,
                       alpha: float) -> torch.Tensor:
    """Sum of the elementwise-weighted sigmoid focal loss (RetinaNet; mmdet ``sigmoid_focal_loss``).

    logits, targets (0/1), weights: (M, K) -> scalar sum.
    """
    p = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    alpha_t = alpha * targets + (1 - alpha) * (1 - targets)
    return (alpha_t * (1 - p_t) ** gamma * ce * weights).sum()


def _side_weights(dist: torch.Tensor, labels: torch.Tensor, in_mask: torch.Tensor, cfg: SparseLossConfig,
                  empty_dist: float) -> torch.Tensor:
    w = torch.ones_like(dist)
    w = torch.where((dist > empty_dist) & in_mask, torch.full_like(w, cfg.empty_weight), w)
    if cfg.rare_classes:
        rare = torch.isin(labels, torch.tensor(cfg.rare_classes, device=labels.device)) & in_mask
        w = torch.where(rare, w.clamp(min=cfg.rare_weight), w)
    return w


def _layer_sums(
    points: torch.Tensor,
    logits: torch.Tensor | None,
    gt: GTPoints,
    cfg: SparseLossConfig,
    grid: VoxelGrid,
    classes: OccClasses,
    class_weights: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One sample, one layer: (sum over GT side, sum over pred side, focal sum). points (M, 3),
    logits (M, K_occ) or None (initial points: no classification)."""
    voxel = min(grid.voxel_size)
    beta, empty_dist = cfg.smooth_l1_beta * voxel, cfg.empty_distance * voxel
    zero = points.sum() * 0.0
    if gt.points.shape[0] == 0:
        if logits is None:
            return zero, zero, zero
        ones = torch.ones_like(logits)
        return zero, zero, sigmoid_focal_loss(logits, torch.zeros_like(logits), ones, cfg.focal_gamma, cfg.focal_alpha)

    gt_pts = gt.points.to(points)
    pred_idx, gt_dist = nearest_neighbours(gt_pts, points.detach())  # for each GT, its nearest prediction
    gt_idx, pred_dist = nearest_neighbours(points.detach(), gt_pts)  # for each prediction, its nearest GT
    gt_w = _side_weights(gt_dist, gt.labels, gt.in_mask, cfg, empty_dist)
    gt_term = (F.smooth_l1_loss(points[pred_idx], gt_pts, beta=beta, reduction="none").sum(-1) * gt_w).sum()
    pred_labels = gt.labels[gt_idx]
    pred_w = torch.ones_like(pred_dist)
    if cfg.weight_pred_side:
        pred_w = _side_weights(pred_dist, pred_labels, gt.in_mask[gt_idx], cfg, empty_dist)
    pred_term = (F.smooth_l1_loss(points, gt_pts[gt_idx], beta=beta, reduction="none").sum(-1) * pred_w).sum()
    if logits is None:
        return gt_term, pred_term, zero

    channels = classes.to_channels(pred_labels)
    targets = F.one_hot(channels, logits.shape[-1]).to(logits.dtype)
    weights = class_weights[None, :].expand_as(logits)
    if cfg.radial_weight:
        lower, upper = torch.tensor(grid.range[:3]), torch.tensor(grid.range[3:])
        centre_xy = ((lower + upper) / 2)[:2].to(points)
        diag = float((upper - lower)[:2].norm())
        radial = 1.0 + (gt_pts[gt_idx][:, :2] - centre_xy).norm(dim=-1) / diag
        weights = weights * radial[:, None]
    return gt_term, pred_term, sigmoid_focal_loss(logits, targets, weights, cfg.focal_gamma, cfg.focal_alpha)


def sparse_loss(
    output: SparseOutput,
    batch: Batch,
    cfg: SparseLossConfig,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """Named loss terms (float32 scalars) of the main queries: ``init.pts``, ``d{l}.pts`` and
    ``d{l}.cls`` for every decoder layer l (unweighted), and ``total`` =
    points_weight * (init_weight * init.pts + sum_l d{l}.pts) + cls_weight * sum_l d{l}.cls.

    Needs ``batch.semantics`` (B, X, Y, Z) on the output's grid and class table; with
    ``cfg.camera_mask`` also ``batch.mask_camera``. ``generator`` draws the GT subsets of frames
    with more than ``cfg.max_gt_points`` occupied voxels.
    """
    if batch.semantics is None:
        raise ValueError("the batch has no labels")
    grid, classes = output.grid, output.classes
    if tuple(batch.semantics.shape[1:]) != grid.shape:
        raise ValueError(f"labels are {tuple(batch.semantics.shape[1:])}, the model's grid is {grid.shape}")
    if cfg.camera_mask and batch.mask_camera is None:
        raise ValueError("loss camera_mask is on but the batch has no mask_camera")
    if cfg.class_weights and len(cfg.class_weights) != classes.num_classes:
        raise ValueError(f"class_weights has {len(cfg.class_weights)} entries, the class table {classes.num_classes}")
    device = output.init_points.device
    if cfg.class_weights:
        class_weights = torch.tensor(cfg.class_weights, dtype=torch.float32, device=device)[classes.channel_labels(device)]
    else:
        class_weights = torch.ones(classes.num_channels, device=device)

    num_b = batch.semantics.shape[0]
    gts = [
        gt_points(batch.semantics[b], grid, classes, batch.mask_camera[b] if cfg.camera_mask else None,
                  cfg.max_gt_points, generator)
        for b in range(num_b)
    ]
    num_gt = sum(g.points.shape[0] for g in gts)

    def chamfer_and_focal(points: torch.Tensor, logits: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        # points (B, M, 3), logits (B, M, K) -> batch-normalised (pts, cls) as OPUS' avg_factor.
        sums = [_layer_sums(points[b].float(), None if logits is None else logits[b].float(), gts[b], cfg, grid,
                            classes, class_weights) for b in range(num_b)]
        num_pred = points.shape[0] * points.shape[1]
        gt_side = torch.stack([s[0] for s in sums]).sum() / max(num_gt, 1)
        pred_side = torch.stack([s[1] for s in sums]).sum() / max(num_pred, 1)
        focal = torch.stack([s[2] for s in sums]).sum() / max(num_pred, 1)
        return gt_side + pred_side, focal

    terms: dict[str, torch.Tensor] = {}
    terms["init.pts"], _ = chamfer_and_focal(output.init_points, None)
    total = cfg.points_weight * cfg.init_weight * terms["init.pts"]
    for i, layer in enumerate(output.layers):
        pts, cls = chamfer_and_focal(layer.points.flatten(1, 2), layer.logits.flatten(1, 2))
        terms[f"d{i}.pts"], terms[f"d{i}.cls"] = pts, cls
        total = total + cfg.points_weight * pts + cfg.cls_weight * cls
    terms["total"] = total
    return terms
