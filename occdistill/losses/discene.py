"""DiScene multi-level distillation terms for sparse-query models (RA-L 2025, getterupper/DiScene).

- encoder level: channel-normalised MSE between student and teacher neck features, per pixel
  and level (a 1x1 adapter on the student side when the channel counts differ);
- query level: per decoder layer, Hungarian matching of student to teacher queries on the L2
  distance of their point-set centres, then L1 on matched centres + normalised MSE on features;
- prior level: the student decodes the teacher's initial query positions as an extra group;
  pairs are index-wise with the teacher's main queries;
- anchor level: both models decode anchors drawn from GT occupied voxels (class-rebalanced);
  pairs are index-wise, only valid anchors count;
- teacher-guided initialisation: copy the teacher's decoder weights into the student.

Per layer, the "coarse feature-based" term of a paired set (DiScene eq. 6-7, as coded) is

    centre  = sum_pairs ||c_s - c_t||_1 / #pairs
    feature = sum_pairs ||f_s/|f_s| - f_t/|f_t|||^2 / #pairs

(DiScene divides by B * Q, which equals #pairs when every query is paired.)

Letters: B batch, N cameras, C channels, Q queries, A anchors, X Y Z voxels, h w feature map.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import nn

from occdistill.geometry.grid import VoxelGrid
from occdistill.models.sparse import LayerOutput, OccClasses, SparseOccStudent, SparseOutput


def normalized_mse(student: torch.Tensor, teacher: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Per vector (along ``dim``), ||s/|s| - t/|t|||^2 = 2 - 2 cos; returned unreduced (dim removed)."""
    s = F.normalize(student.float(), dim=dim)
    t = F.normalize(teacher.float(), dim=dim)
    return (s - t).pow(2).sum(dim=dim)


class EncoderAdapter(nn.Module):
    """Training-only 1x1 convs mapping student neck channels to the teacher's, one per level
    (identity where they already agree). Lives in the distillation wrapper, never in the student."""

    def __init__(self, student_channels: Sequence[int], teacher_channels: Sequence[int]):
        super().__init__()
        if len(student_channels) != len(teacher_channels):
            raise ValueError(f"student has {len(student_channels)} feature levels, teacher {len(teacher_channels)}")
        self.levels = nn.ModuleList(
            nn.Identity() if cs == ct else nn.Conv2d(cs, ct, 1) for cs, ct in zip(student_channels, teacher_channels)
        )

    def forward(self, level: int, x: torch.Tensor) -> torch.Tensor:
        """x (B, N, C_s, h, w) -> (B, N, C_t, h, w)."""
        module = self.levels[level]
        if isinstance(module, nn.Identity):
            return x
        out = module(x.flatten(0, 1))
        return out.view(*x.shape[:2], *out.shape[1:])


def encoder_kd(
    student_feats: Sequence[torch.Tensor],
    teacher_feats: Sequence[torch.Tensor],
    adapter: EncoderAdapter | None = None,
) -> torch.Tensor:
    """Encoder-level feature alignment: sum over levels of the mean over pixels (B, N, h, w) of the
    channel-normalised squared difference. Levels (B, N, C, h, w) must have equal spatial sizes."""
    if len(student_feats) != len(teacher_feats):
        raise ValueError(f"student has {len(student_feats)} feature levels, teacher {len(teacher_feats)}")
    total = student_feats[0].new_zeros((), dtype=torch.float32)
    for i, (s, t) in enumerate(zip(student_feats, teacher_feats)):
        if adapter is not None:
            s = adapter(i, s)
        if s.shape != t.shape:
            raise ValueError(f"level {i}: student features {tuple(s.shape)} vs teacher {tuple(t.shape)}; "
                             "use equal image sizes and strides (and an adapter for the channels)")
        total = total + normalized_mse(s, t.detach(), dim=2).mean()
    return total


def hungarian_match(cost: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimum-cost assignment (Q_s, Q_t) -> (rows, cols), each of length min(Q_s, Q_t), rows sorted
    (scipy ``linear_sum_assignment``, exact; computed on the CPU in float64)."""
    rows, cols = linear_sum_assignment(cost.detach().to("cpu", torch.float64).numpy())
    return torch.as_tensor(rows, dtype=torch.long), torch.as_tensor(cols, dtype=torch.long)


def _pair_terms(centres_s, feats_s, centres_t, feats_t, weight=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Paired (M, 3) centres and (M, C) features -> (centre L1 sum, feature nMSE sum), each summed
    over pairs (weighted by ``weight`` (M,) if given)."""
    centre = (centres_s.float() - centres_t.float()).abs().sum(dim=-1)
    feature = normalized_mse(feats_s, feats_t)
    if weight is not None:
        centre, feature = centre * weight, feature * weight
    return centre.sum(), feature.sum()


def query_kd(student_layers: Sequence[LayerOutput], teacher_layers: Sequence[LayerOutput]
             ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Query level: per layer (centre, feature) terms after Hungarian matching per sample on the
    L2 distance of query centres. Student and teacher may have different query counts."""
    _check_layers(student_layers, teacher_layers)
    out = []
    for s, t in zip(student_layers, teacher_layers):
        batch = s.centres.shape[0]
        centre_sum, feature_sum, pairs = 0.0, 0.0, 0
        for b in range(batch):
            with torch.no_grad():
                rows, cols = hungarian_match(torch.cdist(s.centres[b].float(), t.centres[b].float()))
            rows, cols = rows.to(s.centres.device), cols.to(s.centres.device)
            c, f = _pair_terms(s.centres[b, rows], s.features[b, rows], t.centres[b, cols].detach(),
                               t.features[b, cols].detach())
            centre_sum, feature_sum, pairs = centre_sum + c, feature_sum + f, pairs + rows.numel()
        out.append((centre_sum / max(pairs, 1), feature_sum / max(pairs, 1)))
    return out


def paired_kd(student_layers: Sequence[LayerOutput], teacher_layers: Sequence[LayerOutput],
              valid: torch.Tensor | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Index-wise pairs (query i of the student with query i of the teacher), per layer
    (centre, feature); ``valid`` (B, Q) bool excludes pairs (anchors that are padding)."""
    _check_layers(student_layers, teacher_layers)
    out = []
    for s, t in zip(student_layers, teacher_layers):
        if s.centres.shape[:2] != t.centres.shape[:2]:
            raise ValueError(f"index-wise pairs need equal (B, Q): {tuple(s.centres.shape[:2])} "
                             f"vs {tuple(t.centres.shape[:2])}")
        weight = None if valid is None else valid.flatten().to(s.centres.dtype)
        pairs = s.centres.shape[0] * s.centres.shape[1] if valid is None else int(valid.sum())
        c, f = _pair_terms(s.centres.flatten(0, 1), s.features.flatten(0, 1), t.centres.flatten(0, 1).detach(),
                           t.features.flatten(0, 1).detach(), weight)
        out.append((c / max(pairs, 1), f / max(pairs, 1)))
    return out


def prior_kd(student: SparseOutput, teacher: SparseOutput, group: str = "prior"
             ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Prior level: the student's decoding of the teacher's initial points (extra group ``group``)
    against the teacher's main queries, index-wise."""
    if group not in student.extra:
        raise ValueError(f"the student output has no extra query group {group!r} (decode the teacher's init points)")
    return paired_kd(student.extra[group].layers, teacher.layers)


def anchor_kd(student: SparseOutput, teacher: SparseOutput, valid: torch.Tensor, group: str = "anchor"
              ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Anchor level: both models' decodings of the same anchors (extra group ``group``), index-wise,
    valid anchors only (B, A)."""
    for name, out in (("student", student), ("teacher", teacher)):
        if group not in out.extra:
            raise ValueError(f"the {name} output has no extra query group {group!r} (decode the anchors)")
    return paired_kd(student.extra[group].layers, teacher.extra[group].layers, valid)


def _check_layers(student_layers: Sequence[LayerOutput], teacher_layers: Sequence[LayerOutput]) -> None:
    if len(student_layers) != len(teacher_layers):
        raise ValueError(f"student has {len(student_layers)} decoder layers, teacher {len(teacher_layers)}")
    cs, ct = student_layers[0].features.shape[-1], teacher_layers[0].features.shape[-1]
    if cs != ct:
        raise ValueError(f"query features differ in width (student {cs}, teacher {ct}): use equal embed_dims")


@dataclass
class Anchors:
    """Anchors of one frame, (A, 3) metres / (A,) dataset labels / (A,) bool, or batched (B, A, ...).
    Point i and label i always come from the same drawn voxel; invalid entries are padding (frames
    without occupied voxels) and sit at the grid centre with the free label."""

    points: torch.Tensor
    labels: torch.Tensor
    valid: torch.Tensor


def anchor_class_weights(counts: Sequence[float], offset: float = 0.05) -> torch.Tensor:
    """DiScene's per-class anchor weights from dataset voxel counts: ``1 / ln(n_c) - offset``,
    clipped at 0 (classes above e^(1/offset) ~ 4.9e8 voxels at offset 0.05 are never drawn);
    absent classes get 0 and classes with at most e voxels the weight of n = e."""
    n = np.asarray(counts, dtype=np.float64)
    w = np.zeros_like(n)
    present = n > math.e
    w[present] = np.maximum(1.0 / np.log(n[present]) - offset, 0.0)
    w[(n > 0) & ~present] = 1.0 - offset  # a handful of voxels: weight as for n = e
    return torch.tensor(w, dtype=torch.float32)


def sample_anchors(
    semantics: torch.Tensor,
    grid: VoxelGrid,
    num_anchors: int,
    generator: torch.Generator | None = None,
    class_rebalance: bool = True,
    *,
    classes: OccClasses,
    class_weights: torch.Tensor | None = None,
) -> Anchors:
    """Draw ``num_anchors`` occupied voxel centres of one frame (X, Y, Z) -> :class:`Anchors` (A, ...).

    Voxel weights: ``class_weights[label]`` when given (e.g. :func:`anchor_class_weights` of the
    dataset's counts, DiScene); else, with ``class_rebalance``, 1/sqrt(count of its class in this
    frame) (each class's total chance grows as sqrt of its size instead of linearly); else
    uniform. Without replacement when the frame has at least A candidates; otherwise every
    candidate once plus weighted draws with replacement for the rest (DiScene's sampler raises
    there). A frame without occupied voxels gives A invalid anchors. One index draw selects both
    points and labels. Sampling runs on the CPU with ``generator`` (seeded: reproducible).
    """
    if num_anchors < 1:
        raise ValueError(f"num_anchors must be >= 1, got {num_anchors}")
    if tuple(semantics.shape) != grid.shape:
        raise ValueError(f"labels {tuple(semantics.shape)} do not match the grid {grid.shape}")
    device = semantics.device
    sem = semantics.cpu()
    idx = classes.occupied(sem).nonzero()  # (M, 3)
    labels = sem[idx[:, 0], idx[:, 1], idx[:, 2]]
    if class_weights is not None:
        if class_weights.numel() != classes.num_classes:
            raise ValueError(f"class_weights has {class_weights.numel()} entries, the class table {classes.num_classes}")
        weights = class_weights.cpu().double()[labels]
    elif class_rebalance and labels.numel():
        counts = torch.bincount(labels, minlength=classes.num_classes).double()
        weights = counts[labels].rsqrt()
    else:
        weights = torch.ones(labels.shape, dtype=torch.float64)
    candidates = weights > 0
    idx, labels, weights = idx[candidates], labels[candidates], weights[candidates]
    count = labels.numel()
    if count == 0:
        centre = torch.tensor([(grid.range[a] + grid.range[a + 3]) / 2 for a in range(3)], dtype=torch.float32)
        return Anchors(points=centre.expand(num_anchors, 3).clone().to(device),
                       labels=torch.full((num_anchors,), classes.free_index, dtype=torch.long, device=device),
                       valid=torch.zeros(num_anchors, dtype=torch.bool, device=device))
    if count >= num_anchors:
        draw = torch.multinomial(weights, num_anchors, replacement=False, generator=generator)
    else:
        extra = torch.multinomial(weights, num_anchors - count, replacement=True, generator=generator)
        draw = torch.cat([torch.randperm(count, generator=generator), extra])
    chosen = idx[draw]
    return Anchors(points=grid.index_to_center(chosen).float().to(device), labels=labels[draw].to(device),
                   valid=torch.ones(num_anchors, dtype=torch.bool, device=device))


def sample_anchor_batch(semantics: torch.Tensor, grid: VoxelGrid, num_anchors: int, generator=None,
                        class_rebalance: bool = True, *, classes: OccClasses,
                        class_weights: torch.Tensor | None = None) -> Anchors:
    """:func:`sample_anchors` for every frame of (B, X, Y, Z) -> (B, A, ...)."""
    per = [sample_anchors(s, grid, num_anchors, generator, class_rebalance, classes=classes,
                          class_weights=class_weights) for s in semantics]
    return Anchors(points=torch.stack([a.points for a in per]), labels=torch.stack([a.labels for a in per]),
                   valid=torch.stack([a.valid for a in per]))


@dataclass
class InitReport:
    """What :func:`teacher_guided_init` did: decoder tensor names copied, and those skipped with why."""

    copied: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"teacher-guided init: copied {len(self.copied)} decoder tensors, skipped {len(self.skipped)}"]
        lines += [f"  skipped {name}: {why}" for name, why in self.skipped]
        return "\n".join(lines)


@torch.no_grad()
def teacher_guided_init(student: SparseOccStudent, teacher: SparseOccStudent) -> InitReport:
    """Copy every decoder tensor of the teacher whose name and shape the student's decoder shares
    (DiScene copies the whole transformer; the initial points, backbone and neck stay the
    student's own). With identical decoder configs everything is copied."""
    report = InitReport()
    src = teacher.decoder.state_dict()
    dst = student.decoder.state_dict()
    for name, value in dst.items():
        if name not in src:
            report.skipped.append((name, "not in the teacher's decoder"))
        elif src[name].shape != value.shape:
            report.skipped.append((name, f"shape {tuple(value.shape)} vs teacher {tuple(src[name].shape)}"))
        else:
            value.copy_(src[name])
            report.copied.append(name)
    report.skipped += [(name, "not in the student's decoder") for name in src if name not in dst]
    return report
