"""A teacher made from the labels: soft, teacher-like probabilities computed from a GT volume.

It exercises and measures the target pipeline (dump, codecs, checks, loading) without a trained
model: the benchmark compresses its output, the tests dump it. Its outputs look like a real
occupancy network's: confident in free space and inside objects, uncertain across surfaces
(class fractions of a box neighbourhood), with per-voxel logit noise. It is not a stand-in for a
teacher's accuracy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def label_teacher_logits(
    semantics: torch.Tensor,
    num_classes: int,
    free_index: int,
    *,
    confidence: float = 10.0,
    radius: int = 1,
    noise: float = 0.5,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """(X, Y, Z) class ids -> (X, Y, Z, K) float32 logits.

    logits = ``confidence`` x (fraction of each class in the (2r+1)^3 box around the voxel)
    + N(0, ``noise``^2). Ids outside 0..K-1 (Occ-ScanNet's 255 = unknown) count as free.
    ``generator`` None draws from the global torch RNG (seeded per sample by the dumper).
    """
    sem = semantics.long()
    sem = torch.where((sem >= 0) & (sem < num_classes), sem, torch.full_like(sem, free_index))
    onehot = F.one_hot(sem, num_classes).permute(3, 0, 1, 2).float().unsqueeze(0)  # (1, K, X, Y, Z)
    k = 2 * radius + 1
    frac = F.avg_pool3d(onehot, k, stride=1, padding=radius, count_include_pad=False)[0]  # (K, X, Y, Z)
    logits = confidence * frac.permute(1, 2, 3, 0)
    if noise > 0:
        logits = logits + noise * torch.randn(logits.shape, generator=generator, device=logits.device)
    return logits.contiguous()


def label_teacher_probs(semantics: torch.Tensor, num_classes: int, free_index: int, **kwargs) -> torch.Tensor:
    """Softmax of :func:`label_teacher_logits`: (X, Y, Z, K) float32 probabilities."""
    return label_teacher_logits(semantics, num_classes, free_index, **kwargs).softmax(dim=-1)
