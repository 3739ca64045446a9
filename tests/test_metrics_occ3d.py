"""Occ3D voxel mIoU: hand-computed confusion matrices and the devkit's conventions."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from occdistill.data.classes import OCC3D_NUSCENES
from occdistill.metrics.occ3d import Occ3DAccumulator, occ3d_metrics_from_confusion

FREE = 17


def devkit_miou(preds, gts, masks):
    """Independent transcription of the CVPR 2023 devkit arithmetic (Metric_mIoU with
    use_image_mask=True): per-sample histogram of 18*gt + pred over mask voxels with GT in range,
    summed; per-class diag / (row + col - diag); nanmean over the first 17 classes, x100."""
    hist = np.zeros((18, 18))
    for p, g, m in zip(preds, gts, masks):
        g1, p1 = g[m.astype(bool)], p[m.astype(bool)]
        k = (g1 >= 0) & (g1 < 18)
        hist += np.bincount(18 * g1[k].astype(int) + p1[k].astype(int), minlength=324).reshape(18, 18)
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.diag(hist) / (hist.sum(1) + hist.sum(0) - np.diag(hist))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # nanmean of an all-NaN slice
        return np.nanmean(iou[:17]) * 100, iou, hist


def test_hand_computed_confusion_matrix():
    # 2x2x2 grid, 8 voxels. GT / pred / mask, voxel by voxel (flattened x, y, z order):
    gt = np.array([4, 4, 11, 11, 17, 17, 15, 0], dtype=np.uint8).reshape(2, 2, 2)
    pred = np.array([4, 11, 11, 17, 4, 17, 15, 3], dtype=np.uint8).reshape(2, 2, 2)
    mask = np.array([1, 1, 1, 1, 1, 1, 1, 0], dtype=np.uint8).reshape(2, 2, 2)  # last voxel unobserved
    acc = Occ3DAccumulator()
    acc.update(pred, gt, mask)
    m = acc.compute()
    expected = np.zeros((18, 18), dtype=np.int64)
    for g, p in [(4, 4), (4, 11), (11, 11), (11, 17), (17, 4), (17, 17), (15, 15)]:
        expected[g, p] += 1
    np.testing.assert_array_equal(m.confusion, expected)
    # car (4): TP 1, FN 1 (-> 11), FP 1 (free -> 4): 1/3. driveable (11): TP 1, FP 1, FN 1: 1/3.
    # manmade (15): 1/1. others (0) and bus (3): only in the unmasked voxel -> absent -> NaN.
    assert m.iou[4] == pytest.approx(1 / 3)
    assert m.iou[11] == pytest.approx(1 / 3)
    assert m.iou[15] == 1.0
    assert math.isnan(m.iou[0]) and math.isnan(m.iou[3])
    assert m.miou == pytest.approx((1 / 3 + 1 / 3 + 1) / 3)
    # geometry: occupied GT {4,4,11,11,15} vs occupied pred {4,11,11,4(on free),15}:
    # TP 4 (v0, v1, v2, v6), FN 1 (v3 -> free), FP 1 (v4 free -> 4): 4/6.
    assert m.iou_geometry == pytest.approx(4 / 6)
    assert m.num_voxels == 7 and m.num_samples == 1
    assert m.per_class["others"] is None and m.per_class["manmade"] == 1.0
    assert "free" not in m.per_class


def test_perfect_prediction_scores_100():
    rng = np.random.default_rng(0)
    gt = rng.integers(0, 18, (20, 20, 4), dtype=np.uint8)
    mask = rng.random(gt.shape) < 0.5
    acc = Occ3DAccumulator()
    acc.update(gt, gt, mask)
    m = acc.compute()
    assert m.miou == 1.0 and m.iou_geometry == 1.0
    assert all(v == 1.0 for v in m.per_class.values())


def test_predicted_but_absent_scores_zero_absent_from_both_is_skipped():
    gt = np.full((4, 4, 2), FREE, dtype=np.uint8)
    gt[0] = 4  # car
    pred = gt.copy()
    pred[3, 3, 1] = 10  # truck predicted on a free voxel; truck absent from GT
    mask = np.ones(gt.shape, dtype=bool)
    acc = Occ3DAccumulator()
    acc.update(pred, gt, mask)
    m = acc.compute()
    assert m.iou[10] == 0.0  # predicted but absent from GT: counted, as 0
    assert m.iou[4] == 1.0
    assert math.isnan(m.iou[5])  # absent from both: NaN
    assert m.miou == pytest.approx(0.5)  # mean of car (1) and truck (0); the 15 NaN classes skipped
    assert m.per_class["construction_vehicle"] is None


def test_uint8_mask_behaves_as_bool():
    rng = np.random.default_rng(1)
    gt = rng.integers(0, 18, (8, 8, 4), dtype=np.uint8)
    pred = rng.integers(0, 18, (8, 8, 4), dtype=np.uint8)
    mask_bool = rng.random(gt.shape) < 0.3
    a, b, c = Occ3DAccumulator(), Occ3DAccumulator(), Occ3DAccumulator()
    a.update(pred, gt, mask_bool)
    b.update(pred, gt, mask_bool.astype(np.uint8))
    c.update(torch.from_numpy(pred), torch.from_numpy(gt), torch.from_numpy(mask_bool.astype(np.uint8)))
    np.testing.assert_array_equal(a.compute().confusion, b.compute().confusion)
    np.testing.assert_array_equal(a.compute().confusion, c.compute().confusion)
    assert a.compute().num_voxels == int(mask_bool.sum())
    # The trap the cast avoids: indexing with the uint8 mask picks voxels 0 and 1 of axis 0.
    wrong = gt[mask_bool.astype(np.uint8)]
    assert wrong.shape != gt[mask_bool].shape


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_devkit_transcription_on_random_splits(seed):
    rng = np.random.default_rng(seed)
    preds, gts, masks = [], [], []
    acc = Occ3DAccumulator()
    for _ in range(4):
        gt = rng.choice(18, size=(16, 16, 4), p=np.r_[np.full(17, 0.02), 0.66]).astype(np.uint8)
        gt[gt == 6] = 17  # motorcycle absent from GT
        pred = np.where(rng.random(gt.shape) < 0.7, gt, rng.integers(0, 18, gt.shape)).astype(np.uint8)
        pred[pred == 2] = 17  # bicycle never predicted
        mask = (rng.random(gt.shape) < 0.6).astype(np.uint8)
        preds.append(pred), gts.append(gt), masks.append(mask)
        acc.update(pred, gt, mask)
    ref_miou, ref_iou, ref_hist = devkit_miou(preds, gts, masks)
    m = acc.compute()
    np.testing.assert_array_equal(m.confusion, ref_hist.astype(np.int64))
    np.testing.assert_array_equal(m.iou, ref_iou)  # bit-identical, NaN in the same places
    assert m.miou * 100 == ref_miou


def test_gt_outside_table_is_excluded_like_the_devkit():
    gt = np.array([4, 255, 11, 17], dtype=np.uint8).reshape(1, 2, 2)
    pred = np.array([4, 4, 11, 17], dtype=np.uint8).reshape(1, 2, 2)
    acc = Occ3DAccumulator()
    acc.update(pred, gt, np.ones(gt.shape, bool))
    ref_miou, _, ref_hist = devkit_miou([pred], [gt], [np.ones(gt.shape, bool)])
    np.testing.assert_array_equal(acc.compute().confusion, ref_hist.astype(np.int64))
    assert acc.compute().num_voxels == 3


def test_predictions_outside_the_table_are_rejected():
    gt = np.zeros((2, 2, 2), np.uint8)
    acc = Occ3DAccumulator()
    with pytest.raises(ValueError, match=r"outside 0\.\.17"):
        acc.update(np.full((2, 2, 2), 255, np.uint8), gt, np.ones(gt.shape, bool))
    with pytest.raises(ValueError, match="shape"):
        acc.update(np.zeros((2, 2, 3), np.uint8), gt, np.ones(gt.shape, bool))
    with pytest.raises(ValueError, match="camera mask"):
        acc.update(gt, gt)
    with pytest.raises(TypeError):
        acc.update(gt.astype(np.float32), gt, np.ones(gt.shape, bool))


def test_batched_update_and_merge_equal_a_single_pass():
    rng = np.random.default_rng(3)
    gts = rng.integers(0, 18, (6, 10, 10, 3), dtype=np.uint8)
    preds = rng.integers(0, 18, (6, 10, 10, 3), dtype=np.uint8)
    masks = rng.random(gts.shape) < 0.5
    single = Occ3DAccumulator()
    for p, g, m in zip(preds, gts, masks):
        single.update(p, g, m)
    batched = Occ3DAccumulator()
    batched.update(preds, gts, masks)
    a, b = Occ3DAccumulator(), Occ3DAccumulator()  # two "processes"
    a.update(preds[:4], gts[:4], masks[:4])
    b.update(preds[4:], gts[4:], masks[4:])
    merged = a.merge(b)
    for other in (batched, merged):
        np.testing.assert_array_equal(other.compute().confusion, single.compute().confusion)
        assert other.compute().num_samples == 6
    # all_reduce outside a distributed run is a no-op
    merged.all_reduce()
    assert merged.compute().num_samples == 6


def test_no_mask_mode_counts_every_voxel():
    gt = np.full((3, 3, 3), 4, np.uint8)
    acc = Occ3DAccumulator(use_mask=False)
    acc.update(gt, gt)
    assert acc.compute().num_voxels == 27


def test_metrics_from_confusion_matches_accumulator():
    rng = np.random.default_rng(4)
    gt = rng.integers(0, 18, (10, 10, 4), dtype=np.uint8)
    pred = rng.integers(0, 18, (10, 10, 4), dtype=np.uint8)
    acc = Occ3DAccumulator()
    acc.update(pred, gt, np.ones(gt.shape, bool))
    m = acc.compute()
    m2 = occ3d_metrics_from_confusion(m.confusion, OCC3D_NUSCENES, 1)
    assert m2.miou == m.miou and m2.iou_geometry == m.iou_geometry


def test_read_only_and_mixed_dtype_inputs():
    rng = np.random.default_rng(5)
    gt = rng.integers(0, 18, (6, 6, 3), dtype=np.uint8)
    pred = rng.integers(0, 18, (6, 6, 3)).astype(np.int64)
    mask = rng.random(gt.shape) < 0.5
    for a in (gt, mask):
        a.flags.writeable = False  # as a memory-mapped file would be
    acc = Occ3DAccumulator()
    acc.update(pred, gt, mask)
    ref = Occ3DAccumulator()
    ref.update(torch.from_numpy(pred.astype(np.uint8)), torch.from_numpy(gt.copy()), torch.from_numpy(mask.copy()))
    np.testing.assert_array_equal(acc.compute().confusion, ref.compute().confusion)
