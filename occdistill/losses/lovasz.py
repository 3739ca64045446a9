"""Lovász-softmax (Berman et al. 2018): a convex surrogate of the per-class Jaccard loss, shared by
the Gaussian teacher's objective and, when weighted in, the dense student's.

Shapes: (...) any voxel layout, K classes. Computed in float32.
"""

from __future__ import annotations

import torch


def _lovasz_grad(gt_sorted: torch.Tensor) -> torch.Tensor:
    """Gradient of the Lovász extension of the Jaccard loss w.r.t. sorted errors (Berman et al. 2018)."""
    gts = gt_sorted.sum()
    intersection = gts - gt_sorted.cumsum(0)
    union = gts + (1.0 - gt_sorted).cumsum(0)
    jaccard = 1.0 - intersection / union
    if len(gt_sorted) > 1:
        jaccard = torch.cat([jaccard[:1], jaccard[1:] - jaccard[:-1]])
    return jaccard


def lovasz_softmax(probs: torch.Tensor, labels: torch.Tensor, counted: torch.Tensor | None = None) -> torch.Tensor:
    """Lovász-softmax over the classes present in ``labels``, pooled over the batch.

    probs (..., K) probabilities; labels (...) int64; counted (...) bool voxels that take part.
    Returns the mean over present classes of the Lovász hinge of |onehot - p| (0 if nothing counts).
    """
    num_classes = probs.shape[-1]
    p = probs.reshape(-1, num_classes).float()
    y = labels.reshape(-1)
    if counted is not None:
        keep = counted.reshape(-1)
        p, y = p[keep], y[keep]
    losses = []
    for c in torch.unique(y).tolist():
        fg = (y == c).float()
        errors = (fg - p[:, c]).abs()
        errors_sorted, perm = errors.sort(descending=True)
        losses.append(torch.dot(errors_sorted, _lovasz_grad(fg[perm])))
    if not losses:
        return probs.sum() * 0.0
    return torch.stack(losses).mean()
