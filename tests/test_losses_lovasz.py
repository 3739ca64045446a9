"""Lovász-softmax: a hand-computed value, the voxel selection, and the dense student's ``lovasz`` term."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from occdistill.data.classes import OCC3D_NUSCENES
from occdistill.engine.config import LossConfig
from occdistill.engine.objective import supervised_losses
from occdistill.losses.lovasz import lovasz_softmax
from occdistill.losses.supervised import labelled_voxels


def test_lovasz_softmax_by_hand():
    # labels 0 0 1, p(class 0) = 0.9 0.6 0.3 (two classes, so p(class 1) = 0.1 0.4 0.7).
    # Class 0: errors |fg - p| 0.1 0.4 0.3, sorted 0.4 (fg) 0.3 (bg) 0.1 (fg); Jaccard of the growing
    # prefix 1/2, 2/3, 1 -> increments 1/2, 1/6, 1/3 -> 0.4/2 + 0.3/6 + 0.1/3 = 0.28333.
    # Class 1: errors 0.1 0.4 0.3, sorted 0.4 (bg) 0.3 (fg) 0.1 (bg); Jaccard 1/2, 1, 1 ->
    # increments 1/2, 1/2, 0 -> 0.4/2 + 0.3/2 = 0.35. Mean over the two present classes: 0.316667.
    p0 = torch.tensor([0.9, 0.6, 0.3])
    probs = torch.stack([p0, 1 - p0], dim=-1)
    labels = torch.tensor([0, 0, 1])
    assert lovasz_softmax(probs, labels).item() == pytest.approx((0.2 + 0.05 + 0.1 / 3 + 0.35) / 2, abs=1e-6)
    # Only voxel 2 counted: class 1 alone, its one error 0.3 with increment 1.
    assert lovasz_softmax(probs, labels, torch.tensor([False, False, True])).item() == pytest.approx(0.3)


def test_labelled_voxels_mask_ignore_and_free():
    sem = torch.tensor([0, 17, 255, 3])
    mask = torch.tensor([True, True, True, False])
    assert labelled_voxels(sem, mask, 255, 17).tolist() == [True, False, False, False]
    assert labelled_voxels(sem, None, None, None).tolist() == [True, True, True, True]
    assert labelled_voxels(sem, None, 255, None).tolist() == [True, True, False, True]


def _tiny(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    k = len(OCC3D_NUSCENES.names)
    logits = torch.randn(1, 3, 3, 2, k, generator=g, requires_grad=True)
    sem = torch.full((1, 3, 3, 2), OCC3D_NUSCENES.free_index)
    sem[0, :, :, 0] = torch.tensor([[11, 11, 13], [11, 14, 13], [4, 4, 14]])
    mask = torch.ones_like(sem, dtype=torch.bool)
    mask[0, 2, 2, :] = False
    batch = SimpleNamespace(semantics=sem, mask_camera=mask, depth=None)
    return SimpleNamespace(voxel_logits=logits), batch


def test_dense_objective_adds_weighted_lovasz_over_occupied_camera_voxels():
    out, batch = _tiny()
    plain = supervised_losses(out, batch, LossConfig(), OCC3D_NUSCENES)
    assert "lovasz" not in plain
    terms = supervised_losses(out, batch, LossConfig(lovasz_weight=0.5), OCC3D_NUSCENES)
    counted = batch.mask_camera & (batch.semantics != OCC3D_NUSCENES.free_index)
    want = lovasz_softmax(out.voxel_logits.softmax(-1), batch.semantics, counted)
    assert terms["lovasz"].item() == pytest.approx(want.item(), rel=1e-6)
    assert terms["total"].item() == pytest.approx(plain["ce"].item() + 0.5 * want.item(), rel=1e-6)
    # Gradient only where Lovász counts: free voxels and the voxel outside the camera mask get none.
    terms["lovasz"].backward()
    grad = out.voxel_logits.grad.abs().sum(-1)[0]
    assert (grad[:, :, 1] == 0).all() and grad[2, 2, 0] == 0
    assert (grad[:, :, 0].flatten()[:8] > 0).all()
    with_free = supervised_losses(out, batch, LossConfig(lovasz_weight=0.5, lovasz_ignore_free=False), OCC3D_NUSCENES)
    want_free = lovasz_softmax(out.voxel_logits.softmax(-1), batch.semantics, batch.mask_camera)
    assert with_free["lovasz"].item() == pytest.approx(want_free.item(), rel=1e-6)


def test_loss_config_rejects_a_negative_lovasz_weight():
    with pytest.raises(ValueError, match="lovasz_weight"):
        LossConfig(lovasz_weight=-0.1)
