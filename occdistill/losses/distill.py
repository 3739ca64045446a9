"""Dense distillation losses: masked BEV feature distillation (MFD), channel-wise distillation of
the 3D logits (CWD) and classic per-voxel logit KD (Hinton), plus the glue that computes the
weighted terms of seed 000's total loss

    L = L_stu + L_depth + lambda_feat * L_MFD + lambda_logit * L_CWD   (+ lambda_kd * L_KD, baseline)
        (+ lambda_img * L_IMG)

Distill point 1 is the student's BEV feature (:attr:`DenseOutput.bev_feature`), distill point 2
its voxel logits after Channel-to-Height (:attr:`DenseOutput.voxel_logits`). L_IMG, an image-level
point 0 (DiScene's encoder level, :func:`occdistill.losses.discene.encoder_kd`, on the student's
neck features :attr:`DenseOutput.image_features`), needs the teacher's image features and is
computed by the training objective (occdistill/engine/tasks.py), not here.

Conventions shared by every function here:

- Teacher values are detached inside the function: gradients reach only the student (and the
  adapter). A teacher side is either ``"logit"`` (dense teacher) or ``"prob"`` (Gaussian teacher,
  offline dumps); probabilities enter as ``log(p + eps)`` with ``eps = PROB_EPS = 1e-8`` (a log
  floor of -18.4). It guards log(0) and is far below what a compact dump resolves (1/255 steps);
  summed over the 640k voxels of an Occ3D grid it is a mass of 6e-3, which cannot swamp a class's
  spatial distribution in CWD. A logit teacher and its softmax as a probability teacher therefore
  agree except where p < 1e-8, where both give the student no target mass.
- Computed with autocast disabled, fp16/bf16 inputs cast up to float32 (float64 is kept, for
  gradcheck).
- An empty mask gives an exact 0 that is still attached to the student's graph (never NaN), so
  ``loss.backward()`` works on any batch.
- Shapes: B batch, C channels (C_s student, C_t teacher), X Y Z voxels, K classes, V = X*Y*Z.

Adapters (:class:`BEVAdapter`) are training-only modules owned by the training step, outside the
student: they are never part of the exported model. Their parameters must be given to the
optimiser alongside the student's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from torch import nn

from occdistill.losses.supervised import labelled_voxels
from occdistill.targets.collapse import collapse_bev
from occdistill.targets.loader import TargetBatch

if TYPE_CHECKING:
    from occdistill.data.sample import Batch
    from occdistill.models.dense import DenseOutput
    from occdistill.models.gaussian import GaussianOutput

ValueKind = Literal["prob", "logit"]
CWDSpace = Literal["log_prob", "logit"]
MFDTarget = Literal["feature", "bev_prob"]
KDVoxels = Literal["all", "occupied"]

PROB_EPS = 1e-8
# Added to the per-channel std in the normalised MFD, as mmrazor's PKDLoss does.
STD_EPS = 1e-6


# ----------------------------------------------------------------------------- helpers


def _up(x: torch.Tensor) -> torch.Tensor:
    """At least float32 (fp16/bf16 -> float32; float32/float64 kept)."""
    return x.float() if x.dtype.itemsize < 4 or not x.dtype.is_floating_point else x


def _pair(student: torch.Tensor, teacher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Student cast up, teacher detached, both in their common (>= float32) dtype."""
    s, t = _up(student), _up(teacher.detach())
    dtype = torch.promote_types(s.dtype, t.dtype)
    return s.to(dtype), t.to(dtype)


def teacher_scores(teacher: torch.Tensor, kind: ValueKind, eps: float = PROB_EPS) -> torch.Tensor:
    """Teacher values as (detached) logits: logits unchanged, probabilities -> ``log(p + eps)``."""
    if kind == "logit":
        return teacher.detach()
    if kind == "prob":
        return (_up(teacher.detach()) + eps).log()
    raise ValueError(f"teacher value kind must be 'prob' or 'logit', got {kind!r}")


def _zero(like: torch.Tensor) -> torch.Tensor:
    """0 attached to ``like``'s graph (so backward works and gives zero gradients)."""
    return like.sum() * 0.0


def _check_voxels(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None) -> None:
    if student.dim() != 5:
        raise ValueError(f"student logits must be (B, X, Y, Z, K), got {tuple(student.shape)}")
    if teacher.shape != student.shape:
        raise ValueError(f"teacher {tuple(teacher.shape)} must match student logits {tuple(student.shape)}")
    if mask is not None and mask.shape != student.shape[:-1]:
        raise ValueError(f"mask {tuple(mask.shape)} must be the logits' (B, X, Y, Z) {tuple(student.shape[:-1])}")


# ----------------------------------------------------------------------------- masks and adapter


def bev_occupancy_mask(
    semantics: torch.Tensor,
    free_index: int,
    dilation: int = 1,
    ignore_index: int | None = 255,
    voxel_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """BEV cells that are occupied or near-occupied in the GT: (B, X, Y, Z) -> (B, X, Y) bool.

    A cell is occupied when its column holds a voxel whose label is neither ``free_index`` nor
    ``ignore_index`` (and, if ``voxel_mask`` (B, X, Y, Z) is given, where it is True: e.g. only
    camera-visible voxels count). The occupied cells are then dilated by ``dilation`` cells with a
    SQUARE structuring element ((2r+1) x (2r+1), Chebyshev distance <= r, a max-pool), clipped at
    the grid border. ``dilation=0`` keeps the occupied cells only.
    """
    if dilation < 0:
        raise ValueError(f"dilation must be >= 0, got {dilation}")
    if semantics.dim() != 4:
        raise ValueError(f"semantics must be (B, X, Y, Z), got {tuple(semantics.shape)}")
    cells = labelled_voxels(semantics, voxel_mask, ignore_index, free_index).any(dim=-1)  # (B, X, Y)
    if dilation == 0:
        return cells
    size = 2 * dilation + 1
    # max_pool2d pads with -inf, so the border is clipped, not wrapped or extended.
    grown = F.max_pool2d(cells[:, None].float(), size, stride=1, padding=dilation)
    return grown[:, 0] > 0


class BEVAdapter(nn.Module):
    """Training-only channel adapter student BEV (B, C_s, X, Y) -> (B, C_t, X, Y).

    ``project=None`` (default): a 1x1 conv (with bias) when C_s != C_t, the identity otherwise
    (no parameters). ``project=True`` forces the conv even when the counts agree (needed for the
    BEV-probability target: a feature is not a logit vector even if C_s == K).
    """

    def __init__(self, student_channels: int, teacher_channels: int, project: bool | None = None) -> None:
        super().__init__()
        if project is None:
            project = student_channels != teacher_channels
        if not project and student_channels != teacher_channels:
            raise ValueError(f"an identity adapter needs equal channels, got {student_channels} -> {teacher_channels}")
        self.student_channels = student_channels
        self.teacher_channels = teacher_channels
        self.proj = nn.Conv2d(student_channels, teacher_channels, kernel_size=1) if project else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.proj is None else self.proj(x)


# ----------------------------------------------------------------------------- MFD


def _standardise(x: torch.Tensor) -> torch.Tensor:
    """(M, C) -> per channel zero mean, unit (population) std over the M rows."""
    mean = x.mean(dim=0, keepdim=True)
    std = x.var(dim=0, unbiased=False, keepdim=True).sqrt()
    return (x - mean) / (std + STD_EPS)


def mfd_loss(
    student_bev: torch.Tensor,
    teacher: torch.Tensor,
    mask: torch.Tensor | None,
    adapter: nn.Module | None = None,
    normalize: bool = False,
    target: MFDTarget = "feature",
) -> torch.Tensor:
    """Masked BEV feature distillation.

    Args:
        student_bev: (B, C_s, X, Y) student BEV feature.
        teacher: ``target="feature"``: (B, C_t, X, Y) teacher BEV feature;
            ``target="bev_prob"``: (B, X, Y, K) teacher BEV probabilities (the dump layout).
        mask: (B, X, Y) bool cells that count (:func:`bev_occupancy_mask`), None = all cells.
        adapter: applied to the student first (:class:`BEVAdapter`); required when C_s != C_t and
            for the BEV-probability target.
        normalize: False: plain MSE. True: PKD (mmrazor ``PKDLoss``): every channel of student
            and teacher standardised over the masked cells of the whole batch,
            ``(x - mean) / (std + 1e-6)`` with the population std, then MSE / 2, which equals
            ``1 - mean_c r_c`` (Pearson r per channel; PKD uses the unbiased std, which only
            changes the scale by (M-1)/M).
        target: with ``"bev_prob"`` the adapted student is turned into probabilities by a softmax
            over channels (K) and matched to the teacher's probabilities with the same MSE.

    Returns the MSE averaged over masked cells and channels (a scalar); 0 attached to the
    graph when no cell is masked in.
    """
    if student_bev.dim() != 4:
        raise ValueError(f"student BEV feature must be (B, C, X, Y), got {tuple(student_bev.shape)}")
    with torch.autocast(device_type=student_bev.device.type, enabled=False):
        s = _up(student_bev)
        if adapter is not None:
            weight = next(adapter.parameters(), None)
            s = adapter(s if weight is None else s.to(weight.dtype))
        if target == "bev_prob":
            if teacher.dim() != 4:
                raise ValueError(f"teacher BEV probabilities must be (B, X, Y, K), got {tuple(teacher.shape)}")
            teacher = teacher.permute(0, 3, 1, 2)  # (B, X, Y, K) -> (B, K, X, Y)
            s = s.softmax(dim=1)
        elif target != "feature":
            raise ValueError(f"MFD target must be 'feature' or 'bev_prob', got {target!r}")
        if s.shape != teacher.shape:
            raise ValueError(f"student BEV {tuple(s.shape)} (after the adapter) does not match the teacher "
                             f"{tuple(teacher.shape)}: give a BEVAdapter({student_bev.shape[1]}, {teacher.shape[1]})")
        s, t = _pair(s, teacher)
        if mask is None:
            mask = torch.ones(s.shape[0], *s.shape[2:], dtype=torch.bool, device=s.device)
        if mask.shape != (s.shape[0], *s.shape[2:]):
            raise ValueError(f"mask {tuple(mask.shape)} must be (B, X, Y) = {(s.shape[0], *s.shape[2:])}")
        mask = mask.to(s.device).bool()
        if not bool(mask.any()):
            return _zero(s)
        # (B, C, X, Y) -> (B, X, Y, C) -> (M, C) over the masked cells
        s_cells = s.permute(0, 2, 3, 1)[mask]
        t_cells = t.permute(0, 2, 3, 1)[mask]
        if normalize:
            return (_standardise(s_cells) - _standardise(t_cells)).square().mean() / 2
        return (s_cells - t_cells).square().mean()


# ----------------------------------------------------------------------------- CWD and KD


def _masked_log_softmax(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Log-softmax over the last axis restricted to ``keep`` (broadcastable bool); entries
    outside are 0 (finite, with zero gradient). Every row must keep at least one entry."""
    z = x.masked_fill(~keep, float("-inf"))
    return (z - z.logsumexp(dim=-1, keepdim=True)).masked_fill(~keep, 0.0)


def cwd_loss(
    student_logits: torch.Tensor,
    teacher: torch.Tensor,
    teacher_kind: ValueKind,
    tau: float = 1.0,
    mask: torch.Tensor | None = None,
    space: CWDSpace = "log_prob",
    eps: float = PROB_EPS,
    skip_channel: int | None = None,
) -> torch.Tensor:
    """Channel-wise distillation (Shu et al., ICCV 2021) of voxel logits.

    Args:
        student_logits: (B, X, Y, Z, K).
        teacher: (B, X, Y, Z, K) logits or probabilities, per ``teacher_kind``.
        tau: temperature.
        mask: (B, X, Y, Z) bool voxels that take part (camera mask AND target validity), None =
            all. Voxels outside are excluded from the spatial softmax on both sides.
        space: what a class channel is before the spatial softmax.
            ``"log_prob"`` (default): per-voxel log-softmax over K on both sides, i.e. channel k
            is log p_k(v). Logits are defined only up to a per-voxel constant, which the spatial
            softmax of raw logits does NOT cancel; log-probabilities remove it, so a logit teacher
            and the softmax of it as a probability teacher give the same loss (up to eps), and
            student logits equal to log p_teacher + any per-voxel constant give 0.
            ``"logit"``: raw logits as in Shu et al./mmrazor; needs a logit teacher.
        eps: probability floor for a probability teacher (``log(p + eps)``).
        skip_channel: a class channel left out of the sum (and of K in the mean), e.g. free: its
            spatial distribution is the teacher's geometry, which a student may already know
            better (the per-voxel log-softmax still runs over all K).

    Per batch element b and class k: ``p_T = softmax_v(t_bk(v) / tau)``, ``p_S`` likewise over
    the masked voxels v, ``KL_bk = sum_v p_T log(p_T / p_S)``;
    ``loss = tau^2 * sum_{b,k} KL_bk / (B * K)`` -- the normalisation of mmrazor
    ``ChannelWiseDivergence`` and the official ``CriterionCWD`` (norm_type='channel'): sum over
    space, mean over batch and channels. A batch element without any masked voxel contributes 0
    (and still counts in B, as in mmrazor).
    """
    _check_voxels(student_logits, teacher, mask)
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    if space not in ("log_prob", "logit"):
        raise ValueError(f"CWD space must be 'log_prob' or 'logit', got {space!r}")
    if space == "logit" and teacher_kind == "prob":
        raise ValueError("CWD on raw logits needs a logit teacher; a probability teacher has no logits "
                         "(use space='log_prob')")
    batch, num_classes = student_logits.shape[0], student_logits.shape[-1]
    if skip_channel is not None and not 0 <= skip_channel < num_classes:
        raise ValueError(f"skip_channel {skip_channel} is not a class of the {num_classes} logits")
    with torch.autocast(device_type=student_logits.device.type, enabled=False):
        s, t = _pair(student_logits, teacher_scores(teacher, teacher_kind, eps))
        if space == "log_prob":
            s, t = s.log_softmax(dim=-1), t.log_softmax(dim=-1)
        # (B, X, Y, Z, K) -> (B, V, K) -> (B, K, V): one spatial distribution per class channel
        s = s.flatten(1, 3).transpose(1, 2) / tau
        t = t.flatten(1, 3).transpose(1, 2) / tau
        if mask is None:
            keep = torch.ones(batch, 1, s.shape[-1], dtype=torch.bool, device=s.device)
        else:
            keep = mask.to(s.device).bool().flatten(1)[:, None]  # (B, 1, V)
        has_any = keep.any(dim=-1, keepdim=True)  # (B, 1, 1)
        # An element with no kept voxel is computed over all voxels (no all -inf row, no NaN in
        # forward or backward) and then multiplied by 0.
        keep = keep | ~has_any
        log_ps = _masked_log_softmax(s, keep)
        log_pt = _masked_log_softmax(t, keep)
        p_t = log_pt.exp() * keep
        kl = (p_t * (log_pt - log_ps)).sum(dim=-1) * has_any[..., 0]  # (B, K)
        if skip_channel is None:
            return kl.sum() * (tau**2) / (batch * num_classes)
        counted = torch.ones(num_classes, dtype=torch.bool, device=kl.device)
        counted[skip_channel] = False
        return kl[:, counted].sum() * (tau**2) / (batch * (num_classes - 1))


def logit_kd_loss(
    student_logits: torch.Tensor,
    teacher: torch.Tensor,
    teacher_kind: ValueKind,
    tau: float = 1.0,
    mask: torch.Tensor | None = None,
    eps: float = PROB_EPS,
) -> torch.Tensor:
    """Classic logit KD (Hinton et al. 2015) per voxel, the baseline.

    student_logits, teacher: (B, X, Y, Z, K); mask: (B, X, Y, Z) bool or None (all voxels).
    Per voxel ``KL(softmax(t / tau) || softmax(s / tau)) * tau^2`` over the K classes, then the
    mean over masked voxels (not torchdistill/mmrazor's ``batchmean``, which on a voxel grid
    would be a sum over ~640k voxels per sample). The full KL (with the teacher entropy, unlike
    mmrazor ``KLDivergence``'s cross-entropy) so that it is 0 at a perfect match; the gradient is
    the same. 0 attached to the graph when no voxel is masked in.
    """
    _check_voxels(student_logits, teacher, mask)
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    with torch.autocast(device_type=student_logits.device.type, enabled=False):
        s, t = _pair(student_logits, teacher_scores(teacher, teacher_kind, eps))
        log_ps = (s / tau).log_softmax(dim=-1)
        log_pt = (t / tau).log_softmax(dim=-1)
        kl = (log_pt.exp() * (log_pt - log_ps)).sum(dim=-1)  # (B, X, Y, Z)
        if mask is None:
            return kl.mean() * (tau**2)
        keep = mask.to(kl.device).bool()
        total = torch.where(keep, kl, torch.zeros_like(kl)).sum()
        return total * (tau**2) / keep.sum().clamp(min=1)


def occupied_kd_loss(
    student_logits: torch.Tensor,
    teacher: torch.Tensor,
    teacher_kind: ValueKind,
    semantics: torch.Tensor,
    free_index: int,
    tau: float = 1.0,
    mask: torch.Tensor | None = None,
    ignore_index: int | None = 255,
    eps: float = PROB_EPS,
) -> torch.Tensor:
    """Per-voxel KD of the class GIVEN occupancy, on GT-occupied voxels only.

    :func:`logit_kd_loss` over the K-1 semantic classes (the free channel dropped on both sides,
    so each side's softmax is its class distribution conditional on the voxel being occupied) on
    the voxels whose GT label is neither ``free_index`` nor ``ignore_index`` (AND ``mask``).
    Why: a teacher can be better at semantics than at geometry (the Gaussian teacher here has the
    higher mIoU but the lower IoU than its student); this transfers which class an occupied voxel
    is without pulling the student's free/occupied boundary towards the teacher's.

    student_logits, teacher: (B, X, Y, Z, K); semantics: (B, X, Y, Z) GT labels; mask: (B, X, Y,
    Z) bool or None. A probability teacher enters as ``log(p + eps)``, so its conditional is
    ``(p_k + eps) / sum_{j != free} (p_j + eps)``.
    """
    _check_voxels(student_logits, teacher, mask)
    if semantics.shape != student_logits.shape[:-1]:
        raise ValueError(f"semantics {tuple(semantics.shape)} must be the logits' (B, X, Y, Z) "
                         f"{tuple(student_logits.shape[:-1])}")
    num_classes = student_logits.shape[-1]
    if not 0 <= free_index < num_classes:
        raise ValueError(f"free_index {free_index} is not a class of the {num_classes} logits")
    keep = [k for k in range(num_classes) if k != free_index]
    occupied = labelled_voxels(semantics.to(student_logits.device), mask, ignore_index, free_index)
    scores = teacher_scores(teacher, teacher_kind, eps)  # logits: the renormalisation is the softmax's
    return logit_kd_loss(student_logits[..., keep], scores[..., keep], "logit", tau, occupied)


# ----------------------------------------------------------------------------- teacher signals


@dataclass
class TeacherSignals:
    """What a teacher gives the dense distillation losses, offline or online (all detached).

    voxel (B, X, Y, Z, K) logits or probabilities per ``kind``; bev_feature (B, C_t, X, Y) or
    None; bev_probs (B, X, Y, K) BEV probabilities or None; valid (B, X, Y, Z) bool where the
    teacher has a value (False where BEV augmentation pulled voxels from outside the grid) or None
    (everywhere).
    """

    voxel: torch.Tensor
    kind: ValueKind
    bev_feature: torch.Tensor | None = None
    bev_probs: torch.Tensor | None = None
    valid: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("prob", "logit"):
            raise ValueError(f"teacher value kind must be 'prob' or 'logit', got {self.kind!r}")

    @classmethod
    def from_target_batch(cls, tb: TargetBatch) -> "TeacherSignals":
        """Offline dumps (:func:`occdistill.targets.loader.collate_distill`): probabilities."""
        return cls(tb.voxel_probs, "prob", tb.bev_feature, tb.bev_probs, tb.valid)

    @classmethod
    def from_dense_output(cls, out: "DenseOutput", free_index: int | None = None) -> "TeacherSignals":
        """An online dense teacher: voxel logits and its BEV feature. With ``free_index`` the BEV
        probabilities are also collapsed from the voxel softmax by the dump's top-down rule
        (DESIGN.md section 6), so the "bev_prob" target works online as offline."""
        voxel = out.voxel_logits.detach()
        bev_probs = None
        if free_index is not None:
            with torch.no_grad():
                bev_probs = collapse_bev(_up(voxel).softmax(dim=-1), free_index)
        return cls(voxel, "logit", out.bev_feature.detach(), bev_probs, None)

    @classmethod
    def from_gaussian_output(cls, out: "GaussianOutput") -> "TeacherSignals":
        """An online Gaussian teacher: voxel probabilities (the same kind as its dumps, so online
        and offline give the same losses); its ``bev_feature`` (B, K, X, Y) is the top-down BEV
        probability map, used as ``bev_probs`` (B, X, Y, K). It has no BEV feature proper."""
        return cls(out.voxel_probs.detach(), "prob", None, out.bev_feature.detach().permute(0, 2, 3, 1), None)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "TeacherSignals":
        move = lambda t: None if t is None else t.to(device, non_blocking=non_blocking)  # noqa: E731
        return TeacherSignals(move(self.voxel), self.kind, move(self.bev_feature), move(self.bev_probs),
                              move(self.valid))


# ----------------------------------------------------------------------------- config and glue


@dataclass(frozen=True)
class DistillLossConfig:
    """Weights and options of the dense distillation terms; a term with weight 0 is off.

    Defaults are the seed's scheme (MFD + CWD on, Hinton KD off) with untuned unit weights;
    MFD defaults to the BEV-probability target because every dump has BEV probabilities while
    the teacher BEV feature is optional (a GaussianFormer-2 dump has none).
    """

    lambda_feat: float = 1.0  # MFD
    lambda_logit: float = 1.0  # CWD
    lambda_kd: float = 0.0  # Hinton logit KD (baseline)
    # Image level (DiScene's encoder level on the dense student): channel-normalised MSE per pixel
    # between the student's neck features and distill.image_teacher's finest level.
    lambda_img: float = 0.0
    tau_cwd: float = 1.0
    tau_kd: float = 1.0
    kd_voxels: KDVoxels = "all"  # occupied: KD of the class given occupancy on GT-occupied voxels
    cwd_space: CWDSpace = "log_prob"
    cwd_skip_free: bool = False  # leave the free channel (the teacher's geometry) out of CWD
    mfd_target: MFDTarget = "bev_prob"
    mfd_normalize: bool = False
    mfd_dilation: int = 1  # BEV cells, square
    camera_mask: bool = True  # AND Occ3D mask_camera into the CWD/KD voxels and the MFD occupancy
    prob_eps: float = PROB_EPS

    def __post_init__(self) -> None:
        for name in ("lambda_feat", "lambda_logit", "lambda_kd", "lambda_img"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")
        for name in ("tau_cwd", "tau_kd"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.mfd_dilation < 0:
            raise ValueError(f"mfd_dilation must be >= 0, got {self.mfd_dilation}")
        if not 0 < self.prob_eps <= 1e-3:
            raise ValueError(f"prob_eps must be in (0, 1e-3], got {self.prob_eps}")


def build_adapter(cfg: DistillLossConfig, student_channels: int, teacher_channels: int) -> BEVAdapter | None:
    """The MFD adapter for ``cfg`` (None when MFD is off). ``teacher_channels``: C_t of the
    teacher BEV feature, or K for the BEV-probability target (always a 1x1 conv then)."""
    if cfg.lambda_feat == 0:
        return None
    return BEVAdapter(student_channels, teacher_channels, project=True if cfg.mfd_target == "bev_prob" else None)


def distill_losses(
    student_out: "DenseOutput",
    targets: TargetBatch | TeacherSignals,
    batch: "Batch",
    cfg: DistillLossConfig,
    adapter: nn.Module | None = None,
    *,
    free_index: int,
    ignore_index: int | None = 255,
) -> dict[str, torch.Tensor]:
    """The enabled, WEIGHTED dense distillation terms: ``{"mfd": lambda_feat * L_MFD,
    "cwd": lambda_logit * L_CWD, "kd": lambda_kd * L_KD}`` (terms with weight 0 are absent).

    ``targets``: a :class:`TargetBatch` (offline dump, probabilities) or :class:`TeacherSignals`
    (online teacher); moved to the student's device. ``batch``: reads ``semantics`` (B, X, Y, Z)
    and ``mask_camera``. ``free_index``/``ignore_index``: of the class table, for the MFD mask.

    Masks: voxels (CWD, KD) = teacher ``valid`` AND (``mask_camera`` if ``cfg.camera_mask``), for KD AND
    GT-occupied with ``cfg.kd_voxels="occupied"`` (:func:`occupied_kd_loss`).
    BEV cells (MFD) = :func:`bev_occupancy_mask` of the GT counting only camera-visible voxels if
    ``cfg.camera_mask``, dilated by ``cfg.mfd_dilation``, AND columns whose teacher value exists
    (``valid`` of any voxel of the column: augmentation moves whole columns).
    """
    teacher = TeacherSignals.from_target_batch(targets) if isinstance(targets, TargetBatch) else targets
    logits = student_out.voxel_logits
    device = logits.device
    teacher = teacher.to(device)
    voxel_mask = None if teacher.valid is None else teacher.valid.bool()
    camera = None
    if cfg.camera_mask:
        if batch.mask_camera is None:
            raise ValueError("camera_mask is on but the batch has no mask_camera (only Occ3D has one); "
                             "set camera_mask=false")
        camera = batch.mask_camera.to(device).bool()
        voxel_mask = camera if voxel_mask is None else voxel_mask & camera
    out: dict[str, torch.Tensor] = {}
    if cfg.lambda_feat > 0:
        if batch.semantics is None:
            raise ValueError("MFD needs GT semantics for its occupancy mask; the batch has none")
        cells = bev_occupancy_mask(batch.semantics.to(device), free_index, cfg.mfd_dilation, ignore_index, camera)
        if teacher.valid is not None:
            cells &= teacher.valid.bool().any(dim=-1)
        if cfg.mfd_target == "feature":
            if teacher.bev_feature is None:
                raise ValueError("MFD target 'feature' but the teacher gives no BEV feature (dump it with the "
                                 "BEV feature, or set mfd_target=bev_prob)")
            target = teacher.bev_feature
        else:
            if teacher.bev_probs is None:
                raise ValueError("MFD target 'bev_prob' but the teacher gives no BEV probabilities")
            target = teacher.bev_probs
            if adapter is None:
                raise ValueError("MFD target 'bev_prob' needs an adapter to K channels (build_adapter)")
        out["mfd"] = cfg.lambda_feat * mfd_loss(student_out.bev_feature, target, cells, adapter,
                                                cfg.mfd_normalize, cfg.mfd_target)
    if cfg.lambda_logit > 0:
        out["cwd"] = cfg.lambda_logit * cwd_loss(logits, teacher.voxel, teacher.kind, cfg.tau_cwd, voxel_mask,
                                                 cfg.cwd_space, cfg.prob_eps,
                                                 free_index if cfg.cwd_skip_free else None)
    if cfg.lambda_kd > 0 and cfg.kd_voxels == "occupied":
        if batch.semantics is None:
            raise ValueError("KD on occupied voxels needs GT semantics; the batch has none")
        out["kd"] = cfg.lambda_kd * occupied_kd_loss(logits, teacher.voxel, teacher.kind, batch.semantics,
                                                     free_index, cfg.tau_kd, voxel_mask, ignore_index,
                                                     cfg.prob_eps)
    elif cfg.lambda_kd > 0:
        out["kd"] = cfg.lambda_kd * logit_kd_loss(logits, teacher.voxel, teacher.kind, cfg.tau_kd, voxel_mask,
                                                  cfg.prob_eps)
    return out
