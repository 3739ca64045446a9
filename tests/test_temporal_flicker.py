"""Flicker metric on hand-computed cases: which voxels count, ego-motion compensation, scene
changes and merging."""

from __future__ import annotations

import numpy as np
import pytest

from occdistill.data.classes import OCC3D_NUSCENES
from occdistill.geometry.grid import VoxelGrid
from occdistill.geometry.transforms import make_transform
from occdistill.metrics.flicker import FlickerAccumulator

FREE, ROAD, CAR = OCC3D_NUSCENES.free_index, OCC3D_NUSCENES.index("driveable_surface"), OCC3D_NUSCENES.index("car")
FLICKER_GRID = VoxelGrid(range=(0.0, 0.0, 0.0, 4.0, 3.0, 2.0), voxel_size=(1.0, 1.0, 1.0))  # 4 x 3 x 2 = 24


def test_flicker_counts_changed_static_visible_voxels():
    gt = np.full((4, 3, 2), FREE)
    gt[:, :, 0] = ROAD
    gt[3, 2, 1] = CAR  # dynamic: never counted
    mask = np.ones((4, 3, 2), dtype=bool)
    mask[0, 0, :] = False  # not visible in frame 0 ...
    mask1 = mask.copy()
    mask1[1, 0, 1] = False  # ... nor this one in frame 1
    pred0 = gt.copy()
    pred1 = gt.copy()
    pred1[2, 1, 0] = FREE  # road voxel flickers
    pred1[2, 2, 1] = ROAD  # free voxel flickers
    pred1[0, 0, 0] = FREE  # not visible at t-1: does not count
    pred1[1, 0, 1] = ROAD  # not visible at t: does not count
    pred1[3, 2, 1] = FREE  # the car voxel: does not count
    acc = FlickerAccumulator(FLICKER_GRID)
    acc.update(pred0, gt, mask, np.eye(4), "s")
    acc.update(pred1, gt, mask1, np.eye(4), "s")
    m = acc.compute()
    # 24 voxels - 2 (mask at t-1) - 1 (mask at t) - 1 (car) = 20 counted, 2 changed
    assert m.counted.sum() == 20 and m.changed.sum() == 2 and m.num_pairs == 1
    assert m.flicker == pytest.approx(2 / 20)
    road_counted = 12 - 1  # layer 0 minus (0, 0, 0)
    assert m.per_class["driveable_surface"] == pytest.approx(1 / road_counted)
    assert m.flicker_occupied == pytest.approx(1 / road_counted)
    assert m.per_class["car"] is None


def test_flicker_compensates_ego_motion():
    # A static world; the ego drives +1 m in x, so everything sits 1 voxel further back in x.
    rng = np.random.default_rng(0)
    world = rng.choice([FREE, ROAD, OCC3D_NUSCENES.index("manmade")], size=(5, 3, 2))
    gt0, gt1 = world[:4], world[1:]  # frame 1 sees world x = 1..4
    pose0, pose1 = make_transform(np.eye(3), (300.0, 7.0, 0.0)), make_transform(np.eye(3), (301.0, 7.0, 0.0))
    acc = FlickerAccumulator(FLICKER_GRID)
    acc.update(np.stack([gt0, gt1]), np.stack([gt0, gt1]), None, np.stack([pose0, pose1]), ["s", "s"])
    m = acc.compute()
    assert m.flicker == 0.0
    assert m.counted.sum() == 3 * 3 * 2  # voxels x = 0..2 of frame 1 come from inside frame 0
    # the same predictions compared without the motion would disagree
    naive = FlickerAccumulator(FLICKER_GRID)
    naive.update(np.stack([gt0, gt1]), np.stack([gt0, gt1]), None, np.stack([pose0, pose0]), ["s", "s"])
    assert naive.compute().flicker > 0


def test_flicker_skips_scene_changes_and_merges():
    gt = np.full((4, 3, 2), ROAD)
    pred_a, pred_b = gt.copy(), np.full_like(gt, FREE)
    one = FlickerAccumulator(FLICKER_GRID)
    one.update(pred_a, gt, None, np.eye(4), "s")
    one.update(pred_b, gt, None, np.eye(4), "t")  # new scene: not compared
    assert one.num_pairs == 0 and np.isnan(one.compute().flicker)
    one.update(pred_a, gt, None, np.eye(4), "t")  # all 24 change
    other = FlickerAccumulator(FLICKER_GRID)
    other.update(pred_a, gt, None, np.eye(4), "u")
    other.update(pred_a, gt, None, np.eye(4), "u")  # none change
    one.merge(other)
    m = one.compute()
    assert (m.changed.sum(), m.counted.sum(), m.num_pairs) == (24, 48, 2)
    assert m.flicker == 0.5
