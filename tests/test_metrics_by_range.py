"""Occ3D metrics by distance ring: ring geometry and per-ring IoU by hand; the rings partition the
whole grid's confusion; ``occdistill score --ranges`` end to end."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from occdistill.geometry.grid import OCC3D_GRID, VoxelGrid
from occdistill.metrics.by_range import RangeAccumulator, RangeRing, range_rings, ring_masks
from occdistill.metrics.occ3d import Occ3DAccumulator
from test_score_cli import make_occ3d, run_score, write_preds

# 4 x 4 columns of 1 m around the ego, 2 layers: column centres at +-0.5 and +-1.5 m, so distances
# 0.71 (the 4 inner columns), 1.58 (the 8 edge ones) and 2.12 m (the 4 corners).
GRID = VoxelGrid(range=(-2.0, -2.0, 0.0, 2.0, 2.0, 2.0), voxel_size=(1.0, 1.0, 1.0))
INNER = np.zeros((4, 4), bool)
INNER[1:3, 1:3] = True
CORNER = np.zeros((4, 4), bool)
CORNER[[0, 0, 3, 3], [0, 3, 0, 3]] = True


def test_range_rings_and_their_validation():
    assert range_rings([1, 2.5]) == (RangeRing(0.0, 1.0), RangeRing(1.0, 2.5), RangeRing(2.5, math.inf))
    for bad in ([], [0.0], [2, 1], [1, 1], [-1], [math.inf]):
        with pytest.raises(ValueError, match="range edges"):
            range_rings(bad)


def test_ring_masks_by_hand():
    masks = ring_masks(GRID, range_rings([1, 2]))
    assert masks.shape == (3, 4, 4)
    assert np.array_equal(masks[0], INNER) and np.array_equal(masks[2], CORNER)
    assert np.array_equal(masks[1], ~INNER & ~CORNER) and masks.sum() == 16


def test_per_ring_iou_by_hand_and_rings_partition_the_grid():
    free, car, road = 17, 4, 11
    gt = np.full((4, 4, 2), free, np.uint8)
    gt[:, :, 0] = road
    gt[1, 1, 1] = car  # an inner column
    gt[0, 1, 1] = car  # an edge column
    pred = gt.copy()
    pred[0, 1, 1] = free  # the edge car missed
    pred[0, 0, 1] = car  # a car predicted in a corner column's free voxel
    mask = np.ones_like(gt, bool)
    mask[3, 3, :] = False  # a corner column outside the camera mask
    acc = RangeAccumulator(GRID, range_rings([1, 2]))
    acc.update(pred, gt, mask)
    (r0, inner), (r1, edge), (r2, corner) = acc.compute()
    assert (r0.hi, r1.hi, r2.lo) == (1.0, 2.0, 2.0)
    # inner: road 4/4 and car 1/1 right -> mIoU over the two present classes = 1
    assert inner.miou == pytest.approx(1.0) and inner.num_voxels == 8
    # edge: road 8/8; car GT 1, TP 0 -> IoU 0; mIoU (1 + 0) / 2; geometry: occupied 9 GT, 8 predicted
    assert edge.per_class["car"] == 0.0 and edge.miou == pytest.approx(0.5)
    assert edge.iou_geometry == pytest.approx(8 / 9) and edge.num_voxels == 16
    # corners (3 counted columns): road 3/3; car predicted in free: TP 0, FP 1 -> IoU 0, in the mean
    assert corner.per_class["car"] == 0.0 and corner.miou == pytest.approx(0.5) and corner.num_voxels == 6
    whole = Occ3DAccumulator()
    whole.update(pred, gt, mask)
    total = sum(m.confusion for _, m in (acc.compute()))
    assert np.array_equal(total, whole.compute().confusion)


def test_update_refuses_labels_of_another_grid():
    acc = RangeAccumulator(GRID, range_rings([1]))
    with pytest.raises(ValueError, match="not on the"):
        acc.update(np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4, 3), np.uint8), np.ones((4, 4, 3), bool))


def test_score_ranges_end_to_end(tmp_path, capsys):
    infos_path, samples = make_occ3d(tmp_path, frames_per_scene=(2,))
    preds = {}
    for token, sem, _ in samples:
        pred = sem.copy()
        pred[:100][sem[:100] == 13] = 14  # sidewalk behind the ego (x < 0) predicted as terrain
        preds[token] = pred
    write_preds(tmp_path / "pred", preds)
    out = tmp_path / "out.json"
    assert run_score(["--format", "occ3d", "--data-root", tmp_path, "--infos", infos_path, "--pred",
                      tmp_path / "pred", "--no-rayiou", "--ranges", "10,25", "--json", out]) == 0
    report = json.loads(out.read_text())
    rows = report["by_range"]
    assert [r["range_m"] for r in rows] == [[0.0, 10.0], [10.0, 25.0], [25.0, None]]
    assert sum(r["num_voxels_evaluated"] for r in rows) == report["num_voxels_evaluated"]
    for r in rows:  # the road is right everywhere; sidewalk is half wrong in every ring
        assert r["per_class"]["driveable_surface"] == 100.0 and 0 < r["per_class"]["sidewalk"] < 100
    printed = capsys.readouterr().out
    assert "IoU by range" in printed and "<10 m" in printed and ">=25 m" in printed
    assert OCC3D_GRID.shape == samples[0][1].shape


def test_score_ranges_usage_errors(tmp_path, capsys):
    infos_path, _ = make_occ3d(tmp_path, frames_per_scene=(1,))
    (tmp_path / "pred").mkdir()
    base = ["--data-root", tmp_path, "--pred", tmp_path / "pred"]
    assert run_score(["--format", "occ3d", "--infos", infos_path, *base, "--ranges", "10,x"]) == 2
    assert "--ranges 10,x" in capsys.readouterr().err
    assert run_score(["--format", "occ3d", "--infos", infos_path, *base, "--ranges", "20,10"]) == 2
    assert "strictly increasing" in capsys.readouterr().err
    assert run_score(["--format", "occscannet", *base, "--ranges", "10"]) == 2
    assert "--format occ3d" in capsys.readouterr().err
