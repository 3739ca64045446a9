"""Voxel cross-entropy and the BEVDepth depth loss against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from occdistill.losses import depth_bce_loss, downsample_depth, voxel_cross_entropy
from occdistill.nn.depth_bins import DepthBins

LN3 = math.log(3.0)


def three_voxels():
    # (B, X, Y, Z, K) = (1, 1, 1, 3, 2). Softmax of [0, 0] = (1/2, 1/2); of [ln 3, 0] = (3/4, 1/4).
    logits = torch.tensor([[0.0, 0.0], [LN3, 0.0], [LN3, 0.0]]).view(1, 1, 1, 3, 2)
    labels = torch.tensor([0, 1, 0]).view(1, 1, 1, 3)
    ce = [math.log(2), math.log(4), math.log(4 / 3)]  # -log p(label) per voxel
    return logits, labels, ce


def test_cross_entropy_all_voxels_and_mask():
    logits, labels, ce = three_voxels()
    loss = voxel_cross_entropy(logits, labels, mask=None)
    assert loss.shape == () and loss.dtype == torch.float32
    assert math.isclose(loss.item(), sum(ce) / 3, rel_tol=1e-6)
    mask = torch.tensor([True, True, False]).view(1, 1, 1, 3)
    assert math.isclose(voxel_cross_entropy(logits, labels, mask).item(), (ce[0] + ce[1]) / 2, rel_tol=1e-6)


def test_cross_entropy_class_weights_and_ignore():
    logits, labels, ce = three_voxels()
    weights = torch.tensor([1.0, 3.0])
    expected = (ce[0] + 3 * ce[1] + ce[2]) / (1 + 3 + 1)  # weighted mean: sum w CE / sum w
    assert math.isclose(voxel_cross_entropy(logits, labels, class_weights=weights).item(), expected, rel_tol=1e-6)
    ignored = labels.clone()
    ignored[..., 1] = 255
    assert math.isclose(voxel_cross_entropy(logits, ignored).item(), (ce[0] + ce[2]) / 2, rel_tol=1e-6)
    with pytest.raises(ValueError, match="outside"):
        voxel_cross_entropy(logits, ignored, ignore_index=None)


def test_cross_entropy_no_counted_voxel_is_zero_with_graph():
    logits, labels, _ = three_voxels()
    logits.requires_grad_(True)
    loss = voxel_cross_entropy(logits, labels, torch.zeros(1, 1, 1, 3, dtype=torch.bool))
    assert loss.item() == 0.0
    loss.backward()
    assert logits.grad is not None and not logits.grad.any()


def test_cross_entropy_half_logits_reduce_in_float32():
    logits, labels, ce = three_voxels()
    loss = voxel_cross_entropy(logits.half(), labels)
    assert loss.dtype == torch.float32 and math.isclose(loss.item(), sum(ce) / 3, rel_tol=1e-3)


def test_downsample_depth_takes_nearest_valid():
    depth = torch.tensor([
        [0.0, 3.5, 0.0, 0.0],
        [2.7, 0.0, 0.0, 0.0],
        [9.0, 8.0, 1.0, 0.0],
        [7.0, 6.0, 0.0, 4.0],
    ]).view(1, 1, 4, 4)
    out = downsample_depth(depth, 2)
    torch.testing.assert_close(out, torch.tensor([[2.7, 0.0], [6.0, 1.0]]).view(1, 1, 2, 2))


def test_depth_bce_by_hand():
    bins = DepthBins(1.0, 5.0, 1.0)  # 4 bins [1,2) [2,3) [3,4) [4,5)
    target = torch.tensor([
        [0.0, 3.5, 0.0, 7.0, 1.0, 0.0],
        [2.7, 0.0, 0.0, 0.0, 0.0, 0.0],
    ]).view(1, 1, 2, 6)
    # Stride 2 -> 3 cells: nearest 2.7 (bin 1), 7.0 (beyond dmax: not valid), 1.0 (= dmin: bin 0).
    prob = torch.tensor([
        [0.1, 0.6, 0.2, 0.1],
        [0.25, 0.25, 0.25, 0.25],
        [0.5, 0.2, 0.2, 0.1],
    ]).T.reshape(1, 1, 4, 1, 3).clone().requires_grad_(True)
    loss = depth_bce_loss(prob, target, bins)
    ln = math.log
    cell0 = -(ln(0.9) + ln(0.6) + ln(0.8) + ln(0.9))
    cell2 = -(ln(0.5) + ln(0.8) + ln(0.8) + ln(0.9))
    assert loss.shape == () and loss.dtype == torch.float32
    assert math.isclose(loss.item(), (cell0 + cell2) / 2, rel_tol=1e-6)  # / number of valid cells
    loss.backward()
    assert not prob.grad[..., 1].any()  # the invalid cell gets no gradient
    empty = depth_bce_loss(prob, torch.zeros_like(target), bins)
    assert empty.item() == 0.0


def test_depth_bce_shape_errors():
    bins = DepthBins(1.0, 5.0, 1.0)
    with pytest.raises(ValueError, match="bins"):
        depth_bce_loss(torch.rand(1, 1, 3, 2, 2), torch.zeros(1, 1, 4, 4), bins)
    with pytest.raises(ValueError, match="tile"):
        depth_bce_loss(torch.rand(1, 1, 4, 2, 2), torch.zeros(1, 1, 5, 4), bins)


def test_depth_bins():
    bins = DepthBins(1.0, 45.0, 0.5)
    assert bins.num_bins == 88  # FlashOcc M1 (M0: step 1.0 -> 44)
    assert DepthBins(1.0, 45.0, 1.0).num_bins == 44
    torch.testing.assert_close(bins.centers()[:2], torch.tensor([1.25, 1.75]))
    idx, valid = bins.index(torch.tensor([0.0, 1.0, 1.49, 1.5, 44.99, 45.0]))
    assert valid.tolist() == [False, True, True, True, True, False]
    assert idx[valid].tolist() == [0, 0, 1, 87]
    with pytest.raises(ValueError):
        DepthBins(1.0, 45.0, 0.7)
