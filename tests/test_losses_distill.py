"""Dense distillation losses (MFD, CWD, Hinton KD) against hand-computed values."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from occdistill.data.sample import Batch
from occdistill.losses.distill import (
    BEVAdapter,
    DistillLossConfig,
    TeacherSignals,
    bev_occupancy_mask,
    build_adapter,
    cwd_loss,
    distill_losses,
    logit_kd_loss,
    mfd_loss,
    occupied_kd_loss,
)
from occdistill.models.dense import DenseOutput
from occdistill.models.gaussian import GaussianOutput
from occdistill.targets.collapse import collapse_bev
from occdistill.targets.loader import TargetBatch

LN3 = math.log(3.0)
# Temperature 2 turns (3/4, 1/4) into softmax(ln3 / 2, 0) = (A, B) = (sqrt3, 1) / (1 + sqrt3).
A = math.sqrt(3) / (1 + math.sqrt(3))
B = 1 / (1 + math.sqrt(3))
# KL((3/4, 1/4) || (1/2, 1/2)) = 3/4 ln(3/2) + 1/4 ln(1/2) = 0.130812...
KL_34_U = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
# KL((A, B) || (1/2, 1/2)) = A ln 2A + B ln 2B
KL_AB_U = A * math.log(2 * A) + B * math.log(2 * B)


def voxels(values, shape=(1, 2, 1, 1)) -> torch.Tensor:
    """Rows = voxels in C order of (B, X, Y, Z), columns = K classes."""
    t = torch.tensor(values, dtype=torch.float32)
    return t.view(*shape, t.shape[-1])


def rand_logits(seed: int, shape=(2, 3, 2, 2, 4)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * 2


# ----------------------------------------------------------------------------- BEV occupancy mask


def test_bev_occupancy_mask_dilation_0_and_1_square():
    free = 17
    sem = torch.full((1, 5, 5, 2), free)
    sem[0, 2, 2, 1] = 4  # a car in the upper layer of column (2, 2)
    sem[0, 0, 4, 0] = 255  # unknown: never occupied
    m0 = bev_occupancy_mask(sem, free, dilation=0)
    assert m0.shape == (1, 5, 5) and m0.dtype == torch.bool
    assert m0.nonzero().tolist() == [[0, 2, 2]]
    m1 = bev_occupancy_mask(sem, free, dilation=1)
    expected = torch.zeros(1, 5, 5, dtype=torch.bool)
    expected[0, 1:4, 1:4] = True  # square 3x3 (Chebyshev distance <= 1), corners included
    assert torch.equal(m1, expected)
    # Dilation 2 covers the whole 5x5 grid from the centre.
    assert bool(bev_occupancy_mask(sem, free, dilation=2).all())


def test_bev_occupancy_mask_border_ignore_and_voxel_mask():
    sem = torch.zeros(1, 4, 3, 2, dtype=torch.int64)  # Occ-ScanNet: free (empty) = 0
    sem[0, 0, 0, 0] = 3  # wall in the corner cell
    sem[0, 3, 2, 1] = 255
    m = bev_occupancy_mask(sem, free_index=0, dilation=1)
    expected = torch.zeros(1, 4, 3, dtype=torch.bool)
    expected[0, 0:2, 0:2] = True  # clipped at the border, not wrapped
    assert torch.equal(m, expected)
    # With ignore_index=None the 255 counts as a class.
    assert bool(bev_occupancy_mask(sem, 0, dilation=0, ignore_index=None)[0, 3, 2])
    # A voxel mask that hides the wall leaves nothing.
    hidden = torch.ones_like(sem, dtype=torch.bool)
    hidden[0, 0, 0, 0] = False
    assert not bool(bev_occupancy_mask(sem, 0, dilation=1, voxel_mask=hidden).any())
    with pytest.raises(ValueError, match="dilation"):
        bev_occupancy_mask(sem, 0, dilation=-1)


# ----------------------------------------------------------------------------- adapter


def test_adapter_only_when_channels_differ():
    same = BEVAdapter(4, 4)
    assert same.proj is None and len(list(same.parameters())) == 0
    x = torch.randn(1, 4, 2, 3)
    assert same(x) is x
    diff = BEVAdapter(3, 5)
    assert isinstance(diff.proj, torch.nn.Conv2d) and diff.proj.kernel_size == (1, 1)
    assert diff(torch.randn(2, 3, 4, 4)).shape == (2, 5, 4, 4)
    assert BEVAdapter(4, 4, project=True).proj is not None
    with pytest.raises(ValueError):
        BEVAdapter(3, 4, project=False)
    # build_adapter: feature target -> identity when equal; BEV-probability target -> always a conv.
    assert build_adapter(DistillLossConfig(mfd_target="feature"), 8, 8).proj is None
    assert build_adapter(DistillLossConfig(mfd_target="bev_prob"), 18, 18).proj is not None
    assert build_adapter(DistillLossConfig(lambda_feat=0.0), 8, 18) is None


# ----------------------------------------------------------------------------- MFD


def bev(values) -> torch.Tensor:
    """(cells, C) rows -> (1, C, cells, 1)."""
    return torch.tensor(values, dtype=torch.float32).T.reshape(1, -1, len(values), 1)


def test_mfd_plain_hand_values_and_mask():
    # 3 cells, 2 channels.
    s = bev([[1.0, 2.0], [0.0, 0.0], [5.0, -1.0]])
    t = bev([[0.0, 4.0], [1.0, 1.0], [100.0, 100.0]])
    # All cells: squared errors 1, 4 | 1, 1 | 95^2, 101^2, mean over 6.
    assert math.isclose(mfd_loss(s, t, None).item(), (1 + 4 + 1 + 1 + 95**2 + 101**2) / 6, rel_tol=1e-6)
    # Cells 0 and 1 only: (1 + 4 + 1 + 1) / 4; the third cell's values do not matter.
    mask = torch.tensor([True, True, False]).view(1, 3, 1)
    assert math.isclose(mfd_loss(s, t, mask).item(), 7 / 4, rel_tol=1e-6)
    t2 = t.clone()
    t2[..., 2, :] = -7.0
    assert mfd_loss(s, t2, mask).item() == mfd_loss(s, t, mask).item()


def test_mfd_normalised_is_one_minus_pearson():
    # One channel over 3 masked cells (a 4th, unmasked cell holds garbage).
    mask = torch.tensor([True, True, True, False]).view(1, 4, 1)
    s = bev([[1.0], [2.0], [3.0], [50.0]])
    # Standardised s = (-c, 0, c) with c = 1 / sqrt(2/3) = 1.2247 (population std).
    # t = (1, 3, 2) -> (-c, c, 0); squared differences (0, 1.5, 1.5), mean 1, /2 = 0.5 = 1 - r, r = 1/2.
    t = bev([[1.0], [3.0], [2.0], [-50.0]])
    assert math.isclose(mfd_loss(s, t, mask, normalize=True).item(), 0.5, rel_tol=1e-5)
    # Perfectly correlated, any scale and offset: 0; anti-correlated: 2.
    assert mfd_loss(s, bev([[12.0], [14.0], [16.0], [0.0]]), mask, normalize=True).item() == pytest.approx(0, abs=1e-5)
    assert mfd_loss(s, bev([[3.0], [2.0], [1.0], [0.0]]), mask, normalize=True).item() == pytest.approx(2, rel=1e-5)
    # Two channels: the mean of the per-channel (1 - r) = (0.5 + 0) / 2.
    s2 = torch.cat([s, s], dim=1)
    t2 = torch.cat([t, 2 * s + 1], dim=1)
    assert mfd_loss(s2, t2, mask, normalize=True).item() == pytest.approx(0.25, rel=1e-5)
    # Plain MSE of the same pair is not scale-free.
    assert mfd_loss(s, 2 * s, mask).item() == pytest.approx((1 + 4 + 9) / 3, rel=1e-6)


def test_mfd_bev_prob_target_softmax_after_adapter():
    adapter = BEVAdapter(2, 2, project=True)
    with torch.no_grad():
        adapter.proj.weight.copy_(torch.eye(2).view(2, 2, 1, 1))
        adapter.proj.bias.zero_()
    # One cell: student feature (0, ln 3) -> softmax (1/4, 3/4); teacher probs (1/2, 1/2) in (B, X, Y, K).
    s = torch.tensor([0.0, LN3]).view(1, 2, 1, 1)
    t = torch.tensor([0.5, 0.5]).view(1, 1, 1, 2)
    # ((1/4 - 1/2)^2 + (3/4 - 1/2)^2) / 2 = 1/16
    loss = mfd_loss(s, t, None, adapter, target="bev_prob")
    assert loss.item() == pytest.approx(1 / 16, rel=1e-6)


def test_mfd_channel_mismatch_needs_adapter_and_gradients():
    s = torch.randn(2, 3, 4, 4, requires_grad=True)
    t = torch.randn(2, 5, 4, 4, requires_grad=True)
    with pytest.raises(ValueError, match="BEVAdapter"):
        mfd_loss(s, t, None)
    adapter = BEVAdapter(3, 5)
    mask = torch.rand(2, 4, 4, generator=torch.Generator().manual_seed(0)) > 0.5
    for normalize in (False, True):
        loss = mfd_loss(s, t, mask, adapter, normalize=normalize)
        loss.backward()
        assert s.grad is not None and s.grad.abs().sum() > 0
        assert adapter.proj.weight.grad is not None and adapter.proj.weight.grad.abs().sum() > 0
        assert t.grad is None  # the teacher is detached inside
        s.grad = None
        adapter.zero_grad()


def test_mfd_empty_mask_is_attached_zero():
    s = torch.randn(1, 3, 4, 4, requires_grad=True)
    adapter = BEVAdapter(3, 2)
    loss = mfd_loss(s, torch.randn(1, 2, 4, 4), torch.zeros(1, 4, 4, dtype=torch.bool), adapter, normalize=True)
    assert loss.item() == 0 and loss.requires_grad
    loss.backward()
    assert torch.equal(s.grad, torch.zeros_like(s)) and torch.isfinite(adapter.proj.weight.grad).all()


# ----------------------------------------------------------------------------- CWD


def test_cwd_hand_values_raw_logits_tau_1_and_2():
    # 2 voxels, 2 classes, B = 1. Channel k = the column over the 2 voxels.
    # teacher channel 0 = (ln3, 0) -> spatial softmax (3/4, 1/4); channel 1 = (0, 0) -> (1/2, 1/2)
    # student channel 0 = (0, 0)   -> (1/2, 1/2);               channel 1 = (0, ln3) -> (1/4, 3/4)
    t = voxels([[LN3, 0.0], [0.0, 0.0]])
    s = voxels([[0.0, 0.0], [0.0, LN3]])
    # tau = 1: KL_0 = 3/4 ln(3/2) + 1/4 ln(1/2); KL_1 = 1/2 ln(1/2 / 1/4) + 1/2 ln(1/2 / 3/4) = 1/2 ln(4/3)
    # loss = (KL_0 + KL_1) / (B * K = 2) = (0.130812 + 0.143841) / 2 = 0.137327
    kl1 = 0.5 * math.log(4 / 3)
    assert cwd_loss(s, t, "logit", 1.0, space="logit").item() == pytest.approx((KL_34_U + kl1) / 2, rel=1e-6)
    # tau = 2: teacher channel 0 -> softmax(ln3/2, 0) = (A, B), student channel 1 -> (B, A), the rest uniform.
    # KL_0 = A ln 2A + B ln 2B; KL_1 = 1/2 ln(1/(2B)) + 1/2 ln(1/(2A)) = -1/2 ln(4AB); x tau^2 = 4, / 2.
    kl1_tau2 = -0.5 * math.log(4 * A * B)
    expected = 4 * (KL_AB_U + kl1_tau2) / 2
    assert cwd_loss(s, t, "logit", 2.0, space="logit").item() == pytest.approx(expected, rel=1e-6)


def test_cwd_hand_values_log_prob_space_prob_and_logit_teacher():
    # Teacher p(voxel 0) = (3/4, 1/4), p(voxel 1) = (1/4, 3/4); student uniform at both voxels.
    # Channel 0 over voxels: p_0 = (3/4, 1/4) -> spatial softmax of log p_0 = (3/4, 1/4);
    # channel 1: (1/4, 3/4); student channels (1/2, 1/2). Both channels have KL_34_U.
    probs = voxels([[0.75, 0.25], [0.25, 0.75]])
    s = voxels([[5.0, 5.0], [-2.0, -2.0]])  # per-voxel constant: uniform class probabilities
    assert cwd_loss(s, probs, "prob", 1.0).item() == pytest.approx(KL_34_U, rel=1e-6)
    assert cwd_loss(s, probs.log() + 3.0, "logit", 1.0).item() == pytest.approx(KL_34_U, rel=1e-6)
    # tau = 2: softmax_v(log p / 2) = sqrt(p) normalised = (A, B) per channel; x tau^2 = 4.
    assert cwd_loss(s, probs, "prob", 2.0).item() == pytest.approx(4 * KL_AB_U, rel=1e-6)
    # In raw-logit space the student's per-voxel constants (5, -2) are not cancelled.
    assert cwd_loss(s, probs.log(), "logit", 1.0, space="logit").item() > 1.0


def test_cwd_skip_channel_by_hand():
    # The raw-logit example above: KL_0 = KL_34_U, KL_1 = 1/2 ln(4/3). Skipping channel 0 leaves
    # KL_1 over K - 1 = 1 channel; skipping channel 1 leaves KL_0.
    t = voxels([[LN3, 0.0], [0.0, 0.0]])
    s = voxels([[0.0, 0.0], [0.0, LN3]])
    kl1 = 0.5 * math.log(4 / 3)
    assert cwd_loss(s, t, "logit", 1.0, space="logit", skip_channel=0).item() == pytest.approx(kl1, rel=1e-6)
    assert cwd_loss(s, t, "logit", 1.0, space="logit", skip_channel=1).item() == pytest.approx(KL_34_U, rel=1e-6)
    with pytest.raises(ValueError, match="skip_channel 2"):
        cwd_loss(s, t, "logit", 1.0, skip_channel=2)


def test_distill_losses_cwd_skip_free():
    student, targets, batch = scene()
    cfg = DistillLossConfig(lambda_feat=0.0, lambda_logit=2.0, cwd_skip_free=True)
    out = distill_losses(student, targets, batch, cfg, free_index=FREE)
    voxel_mask = targets.valid & batch.mask_camera
    expected = 2.0 * cwd_loss(student.voxel_logits, targets.voxel_probs, "prob", 1.0, voxel_mask, skip_channel=FREE)
    assert out["cwd"].item() == pytest.approx(expected.item(), rel=1e-6)
    every = distill_losses(student, targets, batch, replace(cfg, cwd_skip_free=False), free_index=FREE)
    assert every["cwd"].item() != pytest.approx(out["cwd"].item(), rel=1e-3)


def test_cwd_zero_at_match():
    t = rand_logits(1)
    for space in ("log_prob", "logit"):
        assert cwd_loss(t.clone(), t, "logit", 1.0, space=space).item() == pytest.approx(0, abs=1e-6)
        assert cwd_loss(t.clone(), t, "logit", 3.0, space=space).item() == pytest.approx(0, abs=1e-6)
    probs = t.softmax(-1)
    # Student logits = log of the teacher's probabilities (plus any per-voxel constant).
    shift = rand_logits(2)[..., :1]
    assert cwd_loss(probs.log() + shift, probs, "prob", 1.0).item() == pytest.approx(0, abs=1e-5)
    assert cwd_loss(probs.log(), probs, "prob", 2.0).item() == pytest.approx(0, abs=1e-5)


def test_cwd_symmetries_and_batch_normalisation():
    s, t = rand_logits(3), rand_logits(4)
    ref = cwd_loss(s, t, "logit", 2.0)
    assert ref.item() > 0
    # Same permutation of classes, or of voxels, on both sides: same loss.
    perm = torch.tensor([2, 0, 3, 1])
    assert cwd_loss(s[..., perm], t[..., perm], "logit", 2.0).item() == pytest.approx(ref.item(), rel=1e-5)
    flip = lambda x: x.flip(1, 3)  # noqa: E731
    assert cwd_loss(flip(s), flip(t), "logit", 2.0).item() == pytest.approx(ref.item(), rel=1e-5)
    # Mean over the batch: a batch of two copies gives the single-sample loss.
    one = cwd_loss(s[:1], t[:1], "logit", 2.0)
    two = cwd_loss(s[:1].repeat(2, 1, 1, 1, 1), t[:1].repeat(2, 1, 1, 1, 1), "logit", 2.0)
    assert two.item() == pytest.approx(one.item(), rel=1e-6)


def test_cwd_mask_excludes_voxels_and_empty_is_zero():
    s, t = rand_logits(5), rand_logits(6)
    mask = torch.ones(s.shape[:-1], dtype=torch.bool)
    mask[..., -1] = False  # drop the top z layer
    ref = cwd_loss(s[..., :-1, :], t[..., :-1, :], "logit", 1.5)
    assert cwd_loss(s, t, "logit", 1.5, mask).item() == pytest.approx(ref.item(), rel=1e-5)
    # Values at masked voxels do not change the result.
    s2, t2 = s.clone(), t.clone()
    s2[..., -1, :] = 1e4
    t2[..., -1, :] = -1e4
    assert cwd_loss(s2, t2, "logit", 1.5, mask).item() == pytest.approx(ref.item(), rel=1e-5)
    # All masked: exact 0, attached, finite zero gradient.
    leaf = s.clone().requires_grad_(True)
    zero = cwd_loss(leaf, t, "logit", 1.5, torch.zeros_like(mask))
    zero.backward()
    assert zero.item() == 0 and torch.equal(leaf.grad, torch.zeros_like(leaf))
    # One element fully masked: it contributes 0 but still counts in B (mmrazor's / (N * C)).
    half = mask.clone()
    half[1] = False
    one = cwd_loss(s[:1], t[:1], "logit", 1.5, mask[:1])
    assert cwd_loss(s, t, "logit", 1.5, half).item() == pytest.approx(one.item() / 2, rel=1e-5)


def test_cwd_prob_teacher_equals_logit_teacher():
    s, t = rand_logits(7), rand_logits(8)
    mask = rand_logits(9)[..., 0] > -1
    for tau in (1.0, 2.0):
        by_logit = cwd_loss(s, t, "logit", tau, mask)
        by_prob = cwd_loss(s, t.softmax(-1), "prob", tau, mask)
        assert by_prob.item() == pytest.approx(by_logit.item(), rel=1e-4)
    with pytest.raises(ValueError, match="logit teacher"):
        cwd_loss(s, t.softmax(-1), "prob", 1.0, space="logit")


def test_cwd_gradcheck_float64():
    g = torch.Generator().manual_seed(10)
    s = torch.randn(2, 2, 1, 2, 3, dtype=torch.float64, generator=g, requires_grad=True)
    t = torch.randn(2, 2, 1, 2, 3, dtype=torch.float64, generator=g)
    mask = torch.tensor([[True, True, False, True], [False, False, False, False]]).view(2, 2, 1, 2)
    for space in ("log_prob", "logit"):
        assert torch.autograd.gradcheck(lambda x: cwd_loss(x, t, "logit", 2.0, mask, space), (s,))
    assert torch.autograd.gradcheck(lambda x: logit_kd_loss(x, t, "logit", 2.0, mask), (s,))


# ----------------------------------------------------------------------------- Hinton KD


def test_kd_hand_values_mask_and_kinds():
    # Voxel 0: teacher (ln3, 0) -> (3/4, 1/4), student uniform: KL_34_U. Voxel 1: equal: 0.
    t = voxels([[LN3, 0.0], [1.0, 2.0]])
    s = voxels([[0.0, 0.0], [1.0, 2.0]])
    assert logit_kd_loss(s, t, "logit", 1.0).item() == pytest.approx(KL_34_U / 2, rel=1e-6)
    mask = torch.tensor([True, False]).view(1, 2, 1, 1)
    assert logit_kd_loss(s, t, "logit", 1.0, mask).item() == pytest.approx(KL_34_U, rel=1e-6)
    # tau = 2: teacher (A, B): KL = A ln 2A + B ln 2B, x tau^2.
    assert logit_kd_loss(s, t, "logit", 2.0, mask).item() == pytest.approx(4 * KL_AB_U, rel=1e-6)
    # The same teacher as probabilities.
    assert logit_kd_loss(s, t.softmax(-1), "prob", 2.0, mask).item() == pytest.approx(4 * KL_AB_U, rel=1e-5)
    empty = logit_kd_loss(s.requires_grad_(True), t, "logit", 1.0, torch.zeros_like(mask))
    assert empty.item() == 0 and empty.requires_grad


def test_kd_zero_at_match():
    t = rand_logits(11)
    assert logit_kd_loss(t.clone(), t, "logit", 3.0).item() == pytest.approx(0, abs=1e-6)
    assert logit_kd_loss(t.log_softmax(-1), t.softmax(-1), "prob", 1.0).item() == pytest.approx(0, abs=1e-6)


def test_occupied_kd_hand_values_free_channel_and_voxels_excluded():
    """Class given occupancy: the free channel (index 2) is dropped on both sides and renormalised
    away, only GT-occupied, non-ignored voxels (and the mask) count."""
    # Voxel 0 (GT class 0): teacher p = (0.3, 0.1, 0.6) -> given occupied (3/4, 1/4); student
    # logits (0, 0, 5) -> given occupied (1/2, 1/2): KL_34_U, whatever the free logits say.
    # Voxel 1 (GT free) and voxel 2 (GT ignore 255) disagree wildly and must not count.
    t = voxels([[0.3, 0.1, 0.6], [0.98, 0.01, 0.01], [0.01, 0.98, 0.01]], shape=(1, 3, 1, 1))
    s = voxels([[0.0, 0.0, 5.0], [0.0, 9.0, 0.0], [9.0, 0.0, 0.0]], shape=(1, 3, 1, 1)).requires_grad_(True)
    gt = torch.tensor([0, 2, 255]).view(1, 3, 1, 1)
    loss = occupied_kd_loss(s, t, "prob", gt, free_index=2, tau=1.0)
    assert loss.item() == pytest.approx(KL_34_U, rel=1e-6)
    loss.backward()
    assert s.grad[0, 0, 0, 0, :2].abs().sum() > 0
    assert s.grad[0, 0, 0, 0, 2].item() == 0 and s.grad[0, 1:].abs().sum() == 0  # free logit, other voxels
    # tau 2 on the same voxel: the conditional teacher (3/4, 1/4) becomes (A, B), x tau^2.
    assert occupied_kd_loss(s, t, "prob", gt, 2, tau=2.0).item() == pytest.approx(4 * KL_AB_U, rel=1e-5)
    # A logit teacher with the same conditional (ln3, 0 on the semantic classes) gives the same.
    t_logit = voxels([[LN3, 0.0, -7.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]], shape=(1, 3, 1, 1))
    assert occupied_kd_loss(s, t_logit, "logit", gt, 2).item() == pytest.approx(KL_34_U, rel=1e-6)
    # The mask removes the only occupied voxel: an attached 0.
    none = occupied_kd_loss(s, t, "prob", gt, 2, mask=torch.tensor([False, True, True]).view(1, 3, 1, 1))
    assert none.item() == 0 and none.requires_grad
    with pytest.raises(ValueError, match="free_index"):
        occupied_kd_loss(s, t, "prob", gt, free_index=3)
    with pytest.raises(ValueError, match="semantics"):
        occupied_kd_loss(s, t, "prob", gt[:, :2], free_index=2)


def test_distill_losses_kd_on_occupied_voxels():
    student, targets, batch = scene()
    cfg = DistillLossConfig(lambda_feat=0.0, lambda_logit=0.0, lambda_kd=2.0, tau_kd=1.5, kd_voxels="occupied")
    out = distill_losses(student, targets, batch, cfg, free_index=FREE)
    voxel_mask = targets.valid & batch.mask_camera
    expected = 2.0 * occupied_kd_loss(student.voxel_logits, targets.voxel_probs, "prob", batch.semantics, FREE,
                                      1.5, voxel_mask)
    assert set(out) == {"kd"} and out["kd"].item() > 0
    assert out["kd"].item() == pytest.approx(expected.item(), rel=1e-6)
    everywhere = distill_losses(student, targets, batch, replace(cfg, kd_voxels="all"), free_index=FREE)
    assert everywhere["kd"].item() != pytest.approx(out["kd"].item(), rel=1e-3)


# ----------------------------------------------------------------------------- dtype and gradients


@pytest.mark.parametrize("fn", [cwd_loss, logit_kd_loss])
def test_voxel_losses_gradients_and_precision(fn):
    s = rand_logits(12).requires_grad_(True)
    t = rand_logits(13).requires_grad_(True)
    loss = fn(s, t, "logit", 2.0)
    loss.backward()
    assert s.grad is not None and s.grad.abs().sum() > 0 and t.grad is None
    # Low-precision inputs are computed in float32.
    low = fn(s.detach().bfloat16(), t.detach().half(), "logit", 2.0)
    assert low.dtype == torch.float32
    assert low.item() == pytest.approx(loss.item(), rel=2e-2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fn(s.detach(), t.detach(), "logit", 2.0).dtype == torch.float32


# ----------------------------------------------------------------------------- teacher signals and glue


X, Y, Z, K, C_S, C_T, FREE = 4, 4, 2, 3, 5, 6, 2


def make_batch(semantics: torch.Tensor, mask_camera: torch.Tensor | None) -> Batch:
    b = semantics.shape[0]
    eye = torch.eye(4).expand(b, 4, 4)
    return Batch(
        tokens=tuple(f"t{i}" for i in range(b)), scene_names=("s",) * b, timestamps=torch.zeros(b, dtype=torch.int64),
        frame_indices=torch.arange(b), camera_names=(("CAM",),) * b, images=torch.zeros(b, 1, 3, 4, 4),
        intrinsics=torch.eye(3).expand(b, 1, 3, 3), img_from_raw=torch.eye(3).expand(b, 1, 3, 3),
        keyego_from_cam=eye[:, None], bda=eye, global_from_ego=eye.double(), lidar_origin=torch.zeros(b, 3),
        semantics=semantics, mask_camera=mask_camera,
    )


def scene(seed: int = 20):
    g = torch.Generator().manual_seed(seed)
    student = DenseOutput(
        voxel_logits=torch.randn(2, X, Y, Z, K, generator=g).requires_grad_(True),
        bev_feature=torch.randn(2, C_S, X, Y, generator=g).requires_grad_(True),
        depth=torch.zeros(1), image_features=torch.zeros(1),
    )
    probs = torch.randn(2, X, Y, Z, K, generator=g).softmax(-1)
    valid = torch.ones(2, X, Y, Z, dtype=torch.bool)
    valid[0, 0] = False  # row x = 0 pulled from outside the grid
    targets = TargetBatch(("t0", "t1"), probs, collapse_bev(probs, FREE), valid, torch.randn(2, C_T, X, Y, generator=g))
    sem = torch.full((2, X, Y, Z), FREE)
    sem[0, 1, 1, 0] = 0
    sem[1, 3, 3, 1] = 1
    camera = torch.rand(2, X, Y, Z, generator=g) > 0.2
    camera[0, 1, 1, 0] = True
    camera[1, 3, 3, 1] = False  # the only occupied voxel of element 1 is not seen
    return student, targets, make_batch(sem, camera)


def test_distill_losses_offline_matches_the_parts():
    student, targets, batch = scene()
    cfg = DistillLossConfig(lambda_feat=2.0, lambda_logit=3.0, lambda_kd=0.5, tau_cwd=2.0, tau_kd=1.5,
                            mfd_target="feature", mfd_normalize=True, mfd_dilation=1)
    adapter = build_adapter(cfg, C_S, C_T)
    out = distill_losses(student, targets, batch, cfg, adapter, free_index=FREE)
    assert set(out) == {"mfd", "cwd", "kd"}
    voxel_mask = targets.valid & batch.mask_camera
    # Element 0: occupied visible column (1, 1) dilated to x, y in 0..2, minus invalid row x = 0.
    # Element 1: its only occupied voxel is not camera-visible -> no cell.
    cells = torch.zeros(2, X, Y, dtype=torch.bool)
    cells[0, 1:3, 0:3] = True
    expected = {
        "mfd": 2.0 * mfd_loss(student.bev_feature, targets.bev_feature, cells, adapter, True),
        "cwd": 3.0 * cwd_loss(student.voxel_logits, targets.voxel_probs, "prob", 2.0, voxel_mask),
        "kd": 0.5 * logit_kd_loss(student.voxel_logits, targets.voxel_probs, "prob", 1.5, voxel_mask),
    }
    for name, value in expected.items():
        assert out[name].item() == pytest.approx(value.item(), rel=1e-6), name
    sum(out.values()).backward()
    assert student.voxel_logits.grad.abs().sum() > 0 and student.bev_feature.grad.abs().sum() > 0
    assert adapter.proj.weight.grad.abs().sum() > 0


def test_distill_losses_bev_prob_default_and_errors():
    student, targets, batch = scene(21)
    cfg = DistillLossConfig()  # MFD on BEV probabilities + CWD, KD off
    adapter = build_adapter(cfg, C_S, K)
    out = distill_losses(student, targets, batch, cfg, adapter, free_index=FREE)
    assert set(out) == {"mfd", "cwd"} and all(torch.isfinite(v) for v in out.values())
    with pytest.raises(ValueError, match="adapter"):
        distill_losses(student, targets, batch, cfg, None, free_index=FREE)
    no_feature = TargetBatch(targets.keys, targets.voxel_probs, targets.bev_probs, targets.valid, None)
    with pytest.raises(ValueError, match="BEV feature"):
        distill_losses(student, no_feature, batch, DistillLossConfig(mfd_target="feature"), None, free_index=FREE)
    scannet = make_batch(batch.semantics, None)
    with pytest.raises(ValueError, match="mask_camera"):
        distill_losses(student, targets, scannet, cfg, adapter, free_index=FREE)
    only_cwd = DistillLossConfig(lambda_feat=0.0, camera_mask=False)
    assert set(distill_losses(student, targets, scannet, only_cwd, free_index=FREE)) == {"cwd"}
    with pytest.raises(ValueError):
        DistillLossConfig(tau_cwd=0.0)
    with pytest.raises(ValueError):
        DistillLossConfig(lambda_kd=-1.0)


def test_teacher_signals_constructors():
    student, targets, batch = scene(22)
    offline = TeacherSignals.from_target_batch(targets)
    assert offline.kind == "prob" and offline.voxel is targets.voxel_probs and offline.valid is targets.valid
    # An online dense teacher: logits, detached, BEV probabilities by the dump's collapse rule.
    dense = TeacherSignals.from_dense_output(student, free_index=FREE)
    assert dense.kind == "logit" and not dense.voxel.requires_grad and not dense.bev_feature.requires_grad
    assert torch.allclose(dense.bev_probs, collapse_bev(student.voxel_logits.detach().softmax(-1), FREE))
    assert TeacherSignals.from_dense_output(student).bev_probs is None
    # The same teacher offline (probabilities) and online (logits) gives the same losses.
    cfg = DistillLossConfig(lambda_kd=1.0, camera_mask=False, lambda_feat=0.0)
    logits = student.voxel_logits.detach()
    as_dump = TargetBatch(targets.keys, logits.softmax(-1), dense.bev_probs, torch.ones_like(targets.valid))
    s2 = DenseOutput(rand_logits(23, logits.shape), student.bev_feature, student.depth, student.image_features)
    a = distill_losses(s2, as_dump, batch, cfg, free_index=FREE)
    b = distill_losses(s2, dense, batch, cfg, free_index=FREE)
    for name in ("cwd", "kd"):
        assert a[name].item() == pytest.approx(b[name].item(), rel=1e-4)
    # A Gaussian teacher: probabilities; its (B, K, X, Y) BEV map becomes bev_probs (B, X, Y, K).
    probs = logits.softmax(-1)
    bev_map = collapse_bev(probs, FREE).permute(0, 3, 1, 2)
    fields = {f: None for f in GaussianOutput.__dataclass_fields__}
    gauss = GaussianOutput(**{**fields, "voxel_probs": probs, "voxel_logits": probs.log(), "bev_feature": bev_map})
    sig = TeacherSignals.from_gaussian_output(gauss)
    assert sig.kind == "prob" and sig.bev_feature is None
    assert torch.equal(sig.bev_probs, bev_map.permute(0, 2, 3, 1))
    with pytest.raises(ValueError):
        TeacherSignals(probs, "probs")  # type: ignore[arg-type]
