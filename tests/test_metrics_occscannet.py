"""Occ-ScanNet SSC metrics: the ISO protocol (255 -> empty, plain mean over classes 1..11)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from occdistill.metrics.occscannet import PROTOCOLS, OccScanNetAccumulator


def iso_reference(preds, targets, ignore_unknown=False):
    """Independent transcription of ISO's evaluation: the dataset rewrites target 255 -> 0, then
    MonoScene's SSCMetrics counts, per frame and per class, with explicit loops."""
    c_tp = c_fp = c_fn = 0
    tps, fps, fns = np.zeros(12), np.zeros(12), np.zeros(12)
    for pred, target in zip(preds, targets):
        y = np.asarray(target).reshape(-1).astype(np.int64)
        p = np.asarray(pred).reshape(-1).astype(np.int64)
        if ignore_unknown:
            keep = y != 255
            y, p = y[keep], p[keep]
        else:
            y = np.where(y == 255, 0, y)
        bt, bp = y > 0, p > 0
        c_tp += int(np.sum(bt & bp))
        c_fp += int(np.sum(~bt & bp))
        c_fn += int(np.sum(bt & ~bp))
        for j in range(12):
            tps[j] += np.sum((y == j) & (p == j))
            fps[j] += np.sum((y != j) & (p == j))
            fns[j] += np.sum((y == j) & (p != j))
    if c_tp:
        prec, rec, iou = c_tp / (c_tp + c_fp), c_tp / (c_tp + c_fn), c_tp / (c_tp + c_fp + c_fn)
    else:
        prec = rec = iou = 0
    iou_ssc = tps / (tps + fps + fns + 1e-5)
    return iou, prec, rec, iou_ssc, np.mean(iou_ssc[1:])


def test_toy_case_with_unknown_voxels_iso_protocol():
    target = np.array([0, 1, 255, 2, 255, 0], dtype=np.uint8).reshape(1, 2, 3)
    pred = np.array([0, 1, 3, 0, 0, 1], dtype=np.uint8).reshape(1, 2, 3)
    acc = OccScanNetAccumulator()
    acc.update(pred, target)
    m = acc.compute()
    # ISO: target -> [0, 1, 0, 2, 0, 0]. Completion: GT occupied {1, 3}, pred occupied {1, 2, 5}:
    # TP 1, FP 2 (2: unknown counted as empty, 5), FN 1 (3).
    assert m.iou == 1 / 4 and m.precision == 1 / 3 and m.recall == 1 / 2
    # class 1: TP 1, FP 1 (voxel 5) -> 1 / (2 + 1e-5); class 2: FN 1 -> 0; class 3: FP 1 -> 0.
    assert m.iou_ssc[1] == 1 / (2 + 1e-5)
    assert m.iou_ssc[2] == 0.0 and m.iou_ssc[3] == 0.0
    # empty (class 0): GT empty {0, 2, 4, 5}, pred empty {0, 3, 4}: TP 2, FP 1, FN 2
    assert m.iou_ssc[0] == 2 / (5 + 1e-5)
    assert m.miou == np.mean(m.iou_ssc[1:]) == pytest.approx(1 / (2 + 1e-5) / 11)
    assert m.num_voxels == 6 and m.protocol == "iso"


def test_toy_case_monoscene_protocol_excludes_unknown():
    target = np.array([0, 1, 255, 2, 255, 0], dtype=np.uint8).reshape(1, 2, 3)
    pred = np.array([0, 1, 3, 0, 0, 1], dtype=np.uint8).reshape(1, 2, 3)
    acc = OccScanNetAccumulator(protocol="monoscene")
    acc.update(pred, target)
    m = acc.compute()
    # voxels 2 and 4 excluded: completion TP 1 (1), FP 1 (5), FN 1 (3)
    assert m.iou == 1 / 3 and m.num_voxels == 4
    assert m.iou_ssc[3] == 0.0  # the class-3 prediction sat on an unknown voxel: not counted
    assert acc.compute().confusion[:, 3].sum() == 0


def test_absent_classes_count_zero_in_the_mean():
    target = np.zeros((4, 4, 4), np.uint8)
    target[0] = 1
    acc = OccScanNetAccumulator()
    acc.update(target, target)
    m = acc.compute()
    assert m.iou == 1.0
    assert m.iou_ssc[1] == pytest.approx(1.0, abs=1e-6) and m.iou_ssc[1] < 1.0  # the 1e-5 epsilon
    assert m.miou == pytest.approx(1 / 11, rel=1e-6)  # 9.09 %: ISO does not skip absent classes
    assert all(v == 0.0 for k, v in m.per_class.items() if k != "ceiling")


@pytest.mark.parametrize("protocol", sorted(PROTOCOLS))
def test_matches_iso_transcription_on_random_frames(protocol):
    rng = np.random.default_rng(0)
    preds, targets = [], []
    acc = OccScanNetAccumulator(protocol=protocol)
    for _ in range(3):
        t = rng.integers(0, 12, (12, 12, 8)).astype(np.uint8)
        t[rng.random(t.shape) < 0.5] = 0
        t[rng.random(t.shape) < 0.2] = 255
        t[t == 9] = 0  # tvs absent from GT
        p = np.where(rng.random(t.shape) < 0.6, np.where(t == 255, 0, t), rng.integers(0, 12, t.shape)).astype(np.uint8)
        preds.append(p), targets.append(t)
        acc.update(torch.from_numpy(p), torch.from_numpy(t))
    iou, prec, rec, iou_ssc, miou = iso_reference(preds, targets, ignore_unknown=protocol == "monoscene")
    m = acc.compute()
    assert (m.iou, m.precision, m.recall) == (iou, prec, rec)
    np.testing.assert_array_equal(m.iou_ssc, iou_ssc)
    assert m.miou == miou


def test_empty_prediction_scores_zero_completion():
    target = np.zeros((3, 3, 3), np.uint8)
    target[1, 1, 1] = 4
    acc = OccScanNetAccumulator()
    acc.update(np.zeros_like(target), target)
    m = acc.compute()
    assert (m.iou, m.precision, m.recall) == (0.0, 0.0, 0.0)


def test_validation_merge_and_batches():
    t = np.zeros((2, 3, 3, 3), np.uint8)
    acc = OccScanNetAccumulator()
    with pytest.raises(ValueError, match="outside"):
        acc.update(np.full(t.shape, 12, np.uint8), t)
    bad = t.copy()
    bad[0, 0, 0, 0] = 13
    with pytest.raises(ValueError, match="13"):
        acc.update(t, bad)
    with pytest.raises(ValueError, match="protocol"):
        OccScanNetAccumulator(protocol="embodiedocc")
    a, b, both = OccScanNetAccumulator(), OccScanNetAccumulator(), OccScanNetAccumulator()
    rng = np.random.default_rng(1)
    p = rng.integers(0, 12, t.shape).astype(np.uint8)
    y = rng.integers(0, 12, t.shape).astype(np.uint8)
    a.update(p[0], y[0])
    b.update(p[1], y[1])
    both.update(p, y)
    a.merge(b)
    np.testing.assert_array_equal(a.compute().confusion, both.compute().confusion)
    assert a.num_samples == both.num_samples == 2
    with pytest.raises(ValueError, match="merge"):
        a.merge(OccScanNetAccumulator(protocol="monoscene"))
