"""Supervised losses of the dense student: voxel cross-entropy and the BEVDepth depth loss.

Shapes: B batch, N cameras, D depth bins, H W image, h w feature map, X Y Z voxels, K classes.
Both losses are computed in float32 whatever the input precision (mixed-precision logits of
~1e6 voxels must not be reduced in fp16).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from occdistill.nn.depth_bins import DepthBins


def labelled_voxels(
    semantics: torch.Tensor,
    mask: torch.Tensor | None = None,
    ignore_index: int | None = None,
    free_index: int | None = None,
) -> torch.Tensor:
    """The voxels a voxel loss counts, (B, X, Y, Z) -> (B, X, Y, Z) bool on ``semantics``' device:
    inside ``mask`` (e.g. Occ3D ``mask_camera``; None = all), label != ``ignore_index`` and, when
    ``free_index`` is given, label != ``free_index`` (the GT-occupied voxels)."""
    counted = torch.ones_like(semantics, dtype=torch.bool)
    if mask is not None:
        if mask.shape != semantics.shape:
            raise ValueError(f"voxel mask {tuple(mask.shape)} must match semantics {tuple(semantics.shape)}")
        counted &= mask.to(semantics.device).bool()
    if ignore_index is not None:
        counted &= semantics != ignore_index
    if free_index is not None:
        counted &= semantics != free_index
    return counted


def voxel_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor | None = None,
    class_weights: torch.Tensor | None = None,
    ignore_index: int | None = 255,
) -> torch.Tensor:
    """Weighted mean cross-entropy over the counted voxels.

    Args:
        logits: (B, X, Y, Z, K) (any shape (..., K)).
        labels: (B, X, Y, Z) integer classes (shape of ``logits`` without K).
        mask: (B, X, Y, Z) bool, voxels to count (Occ3D ``mask_camera``); None counts all voxels.
        class_weights: (K,) per-class weights w_c, or None for w = 1.
        ignore_index: label never counted (Occ-ScanNet 255), or None.

    Normalisation: with m_v = mask_v and label_v != ignore_index,
    ``loss = sum_v m_v w_{y_v} CE_v / sum_v m_v w_{y_v}``. Without class weights this is the plain
    mean over counted voxels, exactly FlashOcc's (mmdet CE with weight = mask_camera and
    avg_factor = mask_camera.sum()); with weights it is the weighted mean, as FlashOcc's
    ``class_balance`` (avg_factor = sum_c count_c w_c). No counted voxel gives 0 (with a graph).
    """
    if labels.shape != logits.shape[:-1]:
        raise ValueError(f"labels {tuple(labels.shape)} must be logits {tuple(logits.shape)} without the class axis")
    if mask is not None and mask.shape != labels.shape:
        raise ValueError(f"mask {tuple(mask.shape)} must match labels {tuple(labels.shape)}")
    num_classes = logits.shape[-1]
    counted = torch.ones_like(labels, dtype=torch.bool) if mask is None else mask.bool()
    if ignore_index is not None:
        counted = counted & (labels != ignore_index)
    target = torch.where(counted, labels, torch.zeros_like(labels)).long()
    if bool(((target < 0) | (target >= num_classes)).any()):
        raise ValueError(f"labels outside 0..{num_classes - 1} (and not ignore_index={ignore_index})")
    ce = F.cross_entropy(logits.reshape(-1, num_classes).float(), target.reshape(-1), reduction="none")
    weight = counted.reshape(-1).float()
    if class_weights is not None:
        weight = weight * class_weights.float().to(logits.device)[target.reshape(-1)]
    return (ce * weight).sum() / weight.sum().clamp(min=torch.finfo(torch.float32).tiny)


def downsample_depth(depth: torch.Tensor, stride: int) -> torch.Tensor:
    """Depth map (B, N, H, W) in metres (0 = no target) -> (B, N, H/s, W/s): per s x s patch the
    nearest valid depth (minimum over pixels > 0), 0 if the patch has none (BEVDepth).

    The minimum keeps the closest surface of the patch, the one the feature cell mostly sees.
    """
    batch, cams, height, width = depth.shape
    if height % stride or width % stride:
        raise ValueError(f"depth map {height}x{width} is not a multiple of the stride {stride}")
    h, w = height // stride, width // stride
    # (B, N, H, W) -> (B, N, h, s, w, s) -> (B, N, h, w, s*s)
    patches = depth.reshape(batch, cams, h, stride, w, stride).permute(0, 1, 2, 4, 3, 5).reshape(batch, cams, h, w, -1)
    inf = torch.full_like(patches, float("inf"))
    nearest = torch.where(patches > 0, patches, inf).amin(dim=-1)
    return torch.where(torch.isinf(nearest), torch.zeros_like(nearest), nearest)


def depth_bce_loss(depth_prob: torch.Tensor, target_depth: torch.Tensor, bins: DepthBins) -> torch.Tensor:
    """BEVDepth depth loss: binary cross-entropy of the predicted bin probabilities against the
    one-hot bin of the target depth, on valid pixels only.

    Args:
        depth_prob: (B, N, D, h, w) softmax over D bins (the view transformer's ``depth``).
        target_depth: (B, N, H, W) metres, 0 = no target; H W = stride * (h w) (stride inferred).
        bins: the :class:`DepthBins` of the view transformer.

    Valid pixels: downsampled target in ``[dmin, dmax)``. Normalisation as BEVDepth:
    ``sum over valid pixels and all D bins of BCE / number of valid pixels``; 0 (with a graph) if
    no pixel is valid. Multiply by the loss weight outside (BEVDepth/FlashOcc-4D use 0.05).
    """
    batch, cams, num_bins, h, w = depth_prob.shape
    if num_bins != bins.num_bins:
        raise ValueError(f"depth_prob has {num_bins} bins, the bin spec {bins} has {bins.num_bins}")
    if target_depth.shape[:2] != (batch, cams) or target_depth.shape[2] % h or target_depth.shape[3] % w:
        raise ValueError(f"target depth {tuple(target_depth.shape)} does not tile the {h}x{w} feature map")
    stride = target_depth.shape[2] // h
    if target_depth.shape[3] // w != stride:
        raise ValueError(f"target depth {tuple(target_depth.shape)} has different strides for h and w")
    target = downsample_depth(target_depth.float(), stride)  # (B, N, h, w)
    idx, valid = bins.index(target)
    # (B, N, D, h, w) -> (B, N, h, w, D) -> (V, D) over valid pixels
    prob = depth_prob.float().permute(0, 1, 3, 4, 2)[valid]
    onehot = F.one_hot(idx[valid], num_bins).float()
    # Written out instead of F.binary_cross_entropy, which autocast refuses; logs clamped at -100
    # as PyTorch's BCE does, so a saturated softmax gives a finite loss.
    log_p = prob.log().clamp(min=-100)
    log_not_p = (1 - prob).log().clamp(min=-100)
    bce = -(onehot * log_p + (1 - onehot) * log_not_p).sum()
    return bce / valid.sum().clamp(min=1)
