"""RayIoU: rays, origin selection, exact first-hit casting and the metric's counting rules."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

from occdistill.data.classes import OCC3D_NUSCENES, ClassTable
from occdistill.geometry.grid import VoxelGrid
from occdistill.geometry.transforms import make_transform, yaw_transform
from occdistill.metrics.rayiou import (
    RayIoUAccumulator,
    cast_rays,
    cast_rays_reference,
    lidar_origins,
    lidar_ray_directions,
    rays_in_voxel_units,
)

FREE = 17


def cast_one(occ: np.ndarray, origin, end, max_steps: int = 1000):
    """Cast single rays given in voxel units with both implementations; assert they agree."""
    ov = torch.tensor([origin], dtype=torch.float32)
    ev = torch.tensor([[end]], dtype=torch.float32)
    hits = cast_rays(torch.from_numpy(occ), ov, ev, max_steps=max_steps)
    d_ref, v_ref = cast_rays_reference(occ, ov, ev, max_steps=max_steps)
    assert hits.depth[0, 0].item() == d_ref[0]
    assert hits.voxel[0, 0].tolist() == v_ref[0].tolist()
    return d_ref[0], tuple(v_ref[0].tolist())


# ---------------------------------------------------------------------------------------------
# query rays
# ---------------------------------------------------------------------------------------------
def test_lidar_rays_are_the_sparseocc_sweep():
    rays = lidar_ray_directions()
    assert rays.shape == (14040, 3) and rays.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(rays, axis=1), 1.0, atol=1e-6)
    elev = np.degrees(np.arcsin(np.clip(rays[::360, 2].astype(np.float64), -1, 1)))
    assert len(elev) == 39
    assert elev[0] == pytest.approx(-45.0, abs=1e-4)
    assert elev[1] == pytest.approx(-(90 - math.degrees(math.atan(2))), abs=1e-4)
    assert elev[9] == pytest.approx(-(90 - math.degrees(math.atan(10))), abs=1e-4)
    step = math.degrees(math.atan(10) - math.atan(9))
    np.testing.assert_allclose(np.diff(elev[9:]), step, atol=1e-4)  # constant step after k = 9
    assert elev[-2] < math.degrees(0.21) <= elev[-1]  # stop once past 0.21 rad (12.55 deg)
    az = np.degrees(np.arctan2(rays[:360, 1], rays[:360, 0])) % 360
    np.testing.assert_allclose(az, np.arange(360), atol=1e-4)


# ---------------------------------------------------------------------------------------------
# casting on hand-built grids, exit depth known analytically
# ---------------------------------------------------------------------------------------------
def test_depth_is_the_exit_of_the_first_occupied_voxel():
    occ = np.zeros((30, 5, 5), bool)
    occ[20:23, :, :] = True  # a wall three voxels thick
    d, v = cast_one(occ, (10.5, 2.5, 2.5), (11.5, 2.5, 2.5))
    assert d == 21.0 - 10.5  # exits voxel x=20 at x=21: not the entry (9.5), not the slab end (12.5)
    assert v == (20, 2, 2)


def test_depth_along_a_diagonal():
    occ = np.zeros((10, 10, 10), bool)
    occ[6, 6, 6] = True
    d, v = cast_one(occ, (0.5, 0.5, 0.5), (1.5, 1.5, 1.5))
    assert v == (6, 6, 6)
    assert d == pytest.approx(6.5 * math.sqrt(3), rel=1e-14)  # leaves the voxel at (7, 7, 7)


def test_origin_inside_an_occupied_voxel_hits_it():
    occ = np.zeros((5, 5, 5), bool)
    occ[2, 2, 2] = True
    d, v = cast_one(occ, (2.25, 2.5, 2.5), (1.25, 2.5, 2.5))  # moving -x
    assert v == (2, 2, 2) and d == 0.25


def test_ray_hitting_nothing_reports_the_grid_exit():
    occ = np.zeros((8, 4, 4), bool)
    d, v = cast_one(occ, (1.5, 1.5, 1.5), (2.5, 1.5, 1.5))
    assert d == 8.0 - 1.5 and v == (7, 1, 1)  # the last in-grid voxel, and where the ray leaves


def test_ray_that_never_enters_reports_minus_one_and_voxel_zero():
    occ = np.ones((4, 4, 4), bool)
    d, v = cast_one(occ, (2.5, 2.5, 6.5), (2.5, 2.5, 7.5))  # above the grid, going up
    assert d == -1.0 and v == (0, 0, 0)
    d, v = cast_one(occ, (-3.5, 1.5, 1.5), (-2.5, 1.5, 1.5))  # outside, entering along +x
    assert d == 3.5 + 1.0 - 0.0 and v == (0, 1, 1)  # enters at x=0, exits voxel 0 at x=1: t = 4.5


def test_origin_outside_uses_truncation_towards_zero_like_the_kernel():
    # x = -0.5 truncates to voxel 0 (C int()), so the kernel starts "inside" voxel 0 and reports its
    # exit at x = 1, t = 1.5; a floor() start would enter at t = 0.5 and give the same exit but a
    # ray going -x shows the difference: it is already "inside" and leaves at once.
    occ = np.zeros((4, 4, 4), bool)
    d, v = cast_one(occ, (-0.5, 1.5, 1.5), (-1.5, 1.5, 1.5))
    assert v == (0, 1, 1) and d == -0.5  # (0 - (-0.5)) / -1: the exit t of the start voxel


def test_ties_go_to_z_then_y_then_x():
    # Through a voxel edge exactly: tx == ty at every crossing. The kernel steps y first, so it
    # visits (0, 1, 0) and never (1, 0, 0).
    occ = np.zeros((4, 4, 2), bool)
    occ[0, 1, 0] = True
    d, v = cast_one(occ, (0.5, 0.5, 0.5), (3.5, 3.5, 0.5))
    assert v == (0, 1, 0)
    assert d == pytest.approx(0.5 * math.sqrt(2), rel=1e-14)  # zero-length visit at the corner
    occ = np.zeros((4, 4, 2), bool)
    occ[1, 0, 0] = True
    d, v = cast_one(occ, (0.5, 0.5, 0.5), (3.5, 3.5, 0.5))
    assert v != (1, 0, 0)
    # z over x: through an x-z edge the kernel visits (0, 0, 1) first.
    occ = np.zeros((4, 2, 4), bool)
    occ[0, 0, 1] = True
    _, v = cast_one(occ, (0.5, 0.5, 0.5), (3.5, 0.5, 3.5))
    assert v == (0, 0, 1)
    # z over y.
    occ = np.zeros((2, 4, 4), bool)
    occ[0, 0, 1] = True
    _, v = cast_one(occ, (0.5, 0.5, 0.5), (0.5, 3.5, 3.5))
    assert v == (0, 0, 1)


def test_move_limit():
    occ = np.zeros((40, 3, 3), bool)
    occ[30] = True
    d, v = cast_one(occ, (0.5, 1.5, 1.5), (1.5, 1.5, 1.5), max_steps=10)
    assert v == (10, 1, 1) and d == 10.5  # positions after at most 10 moves are examined


@pytest.mark.parametrize("seed", range(6))
def test_vectorised_equals_per_ray_reference_exactly(seed):
    rng = np.random.default_rng(seed)
    X, Y, Z = (int(s) for s in rng.integers(3, 14, 3))
    grid = VoxelGrid.from_origin((-X * 0.2, -Y * 0.2, -1.0), 0.4, (X, Y, Z))
    occ = rng.random((2, X, Y, Z)) < rng.uniform(0.01, 0.3)
    T = 5
    lo, hi = grid.lower - 1.5, grid.upper + 1.5
    origins = rng.uniform(lo, hi, (T, 3))
    origins[0] = grid.lower + np.round((origins[0] - grid.lower) / 0.4) * 0.4  # on voxel corners
    origins[1] = grid.lower + (np.floor((origins[1] - grid.lower) / 0.4) + 0.5) * 0.4  # voxel centres
    dirs = np.concatenate(
        [
            lidar_ray_directions()[rng.choice(14040, 400, replace=False)],
            rng.normal(size=(200, 3)).astype(np.float32),
            np.array([[1, 0, 0], [0, -1, 0], [0, 0, 1], [1, 1, 0], [-1, 0, -1], [0, 1, 1], [1, 1, 1]], np.float32),
        ]
    )
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    ov, ev = rays_in_voxel_units(origins, dirs, grid)
    max_steps = int(rng.choice([4, 12, 1000]))
    hits = cast_rays(torch.from_numpy(occ), ov, ev, max_steps=max_steps)
    for g in range(2):
        d, v = cast_rays_reference(occ[g], ov, ev, max_steps=max_steps)
        np.testing.assert_array_equal(hits.depth[g].numpy(), d)
        np.testing.assert_array_equal(hits.voxel[g].numpy(), v)


def test_rays_in_voxel_units_follows_the_reference_dtypes():
    grid = VoxelGrid(range=(-40, -40, -1, 40, 40, 5.4), voxel_size=(0.4, 0.4, 0.4))
    o = np.array([[0.985793, 0.0, 1.84019]])
    d = lidar_ray_directions()[:5]
    ov, ev = rays_in_voxel_units(o, d, grid)
    scale = np.float64(np.float32(0.4))  # the reference divides by a float32 0.4 tensor
    np.testing.assert_array_equal(ov.numpy(), ((o - grid.lower) / scale).astype(np.float32))
    np.testing.assert_array_equal(
        ev.numpy()[0], ((d.astype(np.float64) + o - grid.lower) / scale).astype(np.float32)
    )


# ---------------------------------------------------------------------------------------------
# origins
# ---------------------------------------------------------------------------------------------
@dataclass
class _Frame:
    token: str
    ego_from_lidar: np.ndarray
    global_from_ego: np.ndarray
    raw: dict = field(default_factory=dict)


LIDAR = make_transform(np.eye(3), (0.94, 0.0, 1.84))


def _scene(xs, yaw=0.0, ys=None, zs=None):
    ys = np.zeros(len(xs)) if ys is None else ys
    zs = np.zeros(len(xs)) if zs is None else zs
    return [_Frame(f"f{i}", LIDAR, yaw_transform(yaw, x, y, z)) for i, (x, y, z) in enumerate(zip(xs, ys, zs))]


def test_origins_current_frame_included_and_expressed_in_its_ego_frame():
    frames = _scene([0.0, 5.0, 10.0], yaw=0.5)  # heading 0.5 rad, driving along global x
    o = lidar_origins(frames, frames[1])
    assert o.shape == (3, 3) and o.dtype == np.float64
    np.testing.assert_array_equal(o[1], LIDAR[:3, 3])  # the current frame: exactly lidar2ego
    # frame 2 is 5 m along global x: in frame 1's ego that is R(-0.5) (5, 0) plus the mount
    np.testing.assert_allclose(o[2], [0.94 + 5 * np.cos(0.5), -5 * np.sin(0.5), 1.84], atol=1e-5)
    np.testing.assert_allclose(o[0], [0.94 - 5 * np.cos(0.5), 5 * np.sin(0.5), 1.84], atol=1e-5)
    # the reference casts the LiDAR-frame offset to float32 before mapping it to the ego frame
    off = (o[2] - LIDAR[:3, 3]).astype(np.float32).astype(np.float64) + LIDAR[:3, 3]
    np.testing.assert_allclose(o[2], off, atol=0)


def test_origins_39m_test_is_strict_on_x_and_y_only():
    # LiDAR at +0.94 m ahead of each ego: ego x = 38.06 puts the LiDAR at 39.0 exactly (excluded)
    frames = _scene([0.0, 38.0, 38.06, 0.0, 0.0, -40.0], ys=[0, 0, 0, 38.9, 39.0, 0], zs=[0, 0, 0, 0, 0, 0])
    frames.append(_Frame("high", LIDAR, yaw_transform(0.0, 1.0, 0.0, 50.0)))  # no z test
    o = lidar_origins(frames, frames[0])
    kept = {tuple(np.round(p, 3)) for p in o}
    assert (38.94, 0.0, 1.84) in kept  # 38.94 < 39
    assert not any(abs(p[0] - 39.0) < 1e-3 for p in o)  # 39.0 is not < 39
    assert (0.94, 38.9, 1.84) in kept and not any(abs(p[1] - 39.0) < 1e-3 for p in o)
    assert not any(p[0] < -39 for p in o)  # LiDAR at -39.06
    assert any(abs(p[2] - 51.84) < 1e-3 for p in o)


def test_origins_pick_8_by_rounded_linspace_in_time_order():
    frames = _scene(np.arange(12) * 2.0)  # 12 frames, all within range of frame 5
    o = lidar_origins(frames, frames[5])
    # np.round(np.linspace(0, 11, 8)) = [0, 2, 3, 5, 6, 8, 9, 11] (round half to even)
    expected_frames = [0, 2, 3, 5, 6, 8, 9, 11]
    np.testing.assert_allclose(o[:, 0], [0.94 + 2.0 * (i - 5) for i in expected_frames], atol=1e-5)
    # with 3 out of range the list is the 9 remaining ones: round(linspace(0, 8, 8))
    frames = _scene(np.arange(12) * 5.0)
    o = lidar_origins(frames, frames[0])
    in_range = [i for i in range(12) if abs(0.94 + 5.0 * i) < 39]
    assert len(in_range) == 8  # exactly 8: all kept, no subsampling
    np.testing.assert_allclose(o[:, 0], [0.94 + 5.0 * i for i in in_range], atol=1e-5)


def test_origins_use_the_quaternion_fields_when_present():
    q = [0.9950041652780258, 0.0, 0.0, 0.09983341664682815]  # yaw 0.2 rad, w x y z
    frames = []
    for i in range(3):
        raw = {
            "lidar2ego_translation": [0.94, 0.0, 1.84],
            "lidar2ego_rotation": [0.7071, 0.0, 0.0, 0.7071],  # unnormalised on purpose
            "ego2global_translation": [100.0 + 3.0 * i, 50.0, 0.0],
            "ego2global_rotation": q,
        }
        frames.append(_Frame(f"q{i}", np.eye(4), np.eye(4), raw))
    o = lidar_origins(frames, frames[0])
    np.testing.assert_array_equal(o[0], [0.94, 0.0, 1.84])
    # frame 1 is 3 m along global x; in frame 0's ego (yaw 0.2) that is (3cos0.2, -3sin0.2) + mount
    np.testing.assert_allclose(o[1], [0.94 + 3 * np.cos(0.2), -3 * np.sin(0.2), 1.84], atol=1e-5)


# ---------------------------------------------------------------------------------------------
# the metric
# ---------------------------------------------------------------------------------------------
SMALL = ClassTable("small", ("a", "b", "c", "free"), 3, None, ((0, 0, 0),) * 4)


def _world(X=24, Y=24, Z=8):
    grid = VoxelGrid.from_origin((-X * 0.2, -Y * 0.2, -0.4), 0.4, (X, Y, Z))
    sem = np.full((X, Y, Z), 3, np.uint8)
    sem[:, :, 0] = 0  # ground, class a
    sem[:2, :, :] = 1  # walls, class b
    sem[-2:, :, :] = 1
    sem[:, :2, :] = 1
    sem[:, -2:, :] = 1
    return grid, sem


def _origins():
    return np.array([[0.0, 0.0, 1.0], [0.5, -0.3, 1.4]])


def test_perfect_prediction():
    grid, gt = _world()
    acc = RayIoUAccumulator(classes=SMALL, grid=grid)
    acc.update(gt, gt, _origins())
    m = acc.compute()
    assert m.iou[:, 0].tolist() == [1.0, 1.0, 1.0] and m.iou[:, 1].tolist() == [1.0, 1.0, 1.0]
    assert math.isnan(m.iou[0, 2]) and m.rayiou == 1.0  # class c absent from both: skipped
    assert m.num_rays == 2 * 14040  # closed box: every ray hits


def test_depth_thresholds_are_strict_and_float32(monkeypatch):
    # Prescribed casting results (depth in voxel units, voxel = padded flat index): GT hits class a
    # at depth 10 voxels (4 m) on every ray; the prediction hits class a at depth 10 + e / 0.4.
    from occdistill.metrics import rayiou as R

    grid = VoxelGrid.from_origin((-2.0, -2.0, -1.0), 0.4, (10, 10, 5))
    gt = np.zeros((10, 10, 5), np.uint8)  # class a everywhere
    errors_m = np.array([0.0, 0.5, 0.99, 1.0, 1.5, 1.99, 2.0, 3.0, 3.99, 4.0, 5.0])
    n = 14040
    err_vox = np.resize(errors_m / 0.4, n)

    def fake_cast(occ, origin_vox, end_vox, max_steps):
        depth = torch.tensor(np.stack([np.full(n, 10.0), 10.0 + err_vox]))
        flat = torch.full((2, n), 1 * 12 * 7 + 7 + 1, dtype=torch.int64)  # voxel (0, 0, 0) padded
        return depth, flat

    monkeypatch.setattr(R, "_cast", fake_cast)
    acc = RayIoUAccumulator(classes=SMALL, grid=grid)
    acc.update(gt, gt, np.array([[0.0, 0.0, 0.0]]))
    m = acc.compute()
    d_gt = np.float32(10.0) * np.float32(0.4)
    d_pr = (10.0 + err_vox).astype(np.float32) * np.float32(0.4)
    err32 = np.abs(d_pr - d_gt)
    for j, tau in enumerate((1, 2, 4)):
        assert m.tp_count[j, 0] == int((err32 < tau).sum())
    assert m.gt_count[0] == m.pred_count[0] == n
    # nominal errors exactly at a threshold are not TPs (strict), just below are
    per_pattern = np.resize(np.arange(len(errors_m)), n)
    tp1 = err32 < 1
    assert not tp1[per_pattern == 3].any() and tp1[per_pattern == 2].all()


def test_walls_moved_inwards_lose_tps_at_the_smaller_thresholds():
    grid, gt = _world()
    iou_b = []
    for k in (0, 3, 6, 12):
        pred = gt.copy()
        if k:
            pred[2 : 2 + k, 2:-2, 1:] = 1  # the x- wall k voxels thicker, towards the origin
        acc = RayIoUAccumulator(classes=SMALL, grid=grid)
        acc.update(pred, gt, np.array([[0.0, 0.0, 1.0]]))
        iou_b.append(acc.compute().iou[:, 1])
    for j in range(3):  # more displacement, lower IoU at every threshold
        assert iou_b[0][j] >= iou_b[1][j] >= iou_b[2][j] >= iou_b[3][j]
    for row in iou_b:  # a larger threshold never scores lower
        assert row[0] <= row[1] <= row[2]
    assert iou_b[1][2] > iou_b[1][0]  # 1.2 m displacements pass at 4 m but not at 1 m


def test_wrong_class_is_fp_of_pred_and_fn_of_gt_and_absent_class_scores_zero():
    grid, gt = _world()
    pred = gt.copy()
    pred[pred == 1] = 2  # walls predicted as class c, absent from the GT
    acc = RayIoUAccumulator(classes=SMALL, grid=grid)
    acc.update(pred, gt, _origins())
    m = acc.compute()
    assert m.iou[:, 1].tolist() == [0.0, 0.0, 0.0]  # b: all FN
    assert m.iou[:, 2].tolist() == [0.0, 0.0, 0.0]  # c: predicted, absent from GT -> 0, not NaN
    assert m.iou[:, 0].tolist() == [1.0, 1.0, 1.0]
    assert m.pred_count[2] == m.gt_count[1] and m.tp_count[:, 1].sum() == 0
    assert m.rayiou == pytest.approx(1 / 3)


def test_rays_whose_gt_hits_nothing_are_dropped():
    grid, gt = _world()
    gt[:, :, 0] = 3  # no ground: rays going down leave through the floor
    gt[:2] = gt[-2:] = 3  # and no x walls
    pred = gt.copy()
    pred[:, :, 0] = 0  # a predicted floor where the GT has nothing
    acc = RayIoUAccumulator(classes=SMALL, grid=grid)
    acc.update(pred, gt, _origins())
    m = acc.compute()
    assert m.pred_count[0] == 0  # predicted hits on GT-free rays do not count
    assert m.iou[:, 1].tolist() == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("seed", [0, 1])
def test_accumulator_vectorised_equals_reference_backend(seed):
    rng = np.random.default_rng(seed)
    grid = VoxelGrid.from_origin((-2.4, -2.0, -1.0), 0.4, (12, 10, 6))
    vec = RayIoUAccumulator(classes=SMALL, grid=grid)
    ref = RayIoUAccumulator(classes=SMALL, grid=grid, backend="reference")
    for _ in range(2):
        gt = np.where(rng.random((12, 10, 6)) < 0.25, rng.integers(0, 3, (12, 10, 6)), 3).astype(np.uint8)
        pred = np.where(rng.random(gt.shape) < 0.8, gt, rng.integers(0, 4, gt.shape)).astype(np.uint8)
        origins = rng.uniform(grid.lower - 0.3, grid.upper + 0.3, (3, 3))
        vec.update(pred, gt, origins)
        ref.update(torch.from_numpy(pred), torch.from_numpy(gt), origins)
    a, b = vec.compute(), ref.compute()
    np.testing.assert_array_equal(a.tp_count, b.tp_count)
    np.testing.assert_array_equal(a.gt_count, b.gt_count)
    np.testing.assert_array_equal(a.pred_count, b.pred_count)
    np.testing.assert_array_equal(a.iou, b.iou)


def test_rayiou_is_the_nanmean_of_all_thresholds_and_classes():
    grid, gt = _world()
    pred = gt.copy()
    pred[2:5, 2:-2, 1:] = 1
    acc = RayIoUAccumulator(classes=SMALL, grid=grid)
    acc.update(pred, gt, _origins())
    m = acc.compute()
    with np.errstate(invalid="ignore"):
        assert m.rayiou == np.nanmean(m.iou)
        assert m.rayiou_at == tuple(np.nanmean(m.iou[j]) for j in range(3))
    assert m.rayiou == pytest.approx(np.mean(m.rayiou_at))
    per = m.per_class(0)
    assert set(per) == {"a", "b", "c"} and per["c"] is None


def test_merge_batch_and_validation():
    grid, gt = _world()
    pred = gt.copy()
    pred[3:5, 2:-2, 1:] = 1
    single = RayIoUAccumulator(classes=SMALL, grid=grid)
    single.update(pred, gt, _origins())
    single.update(gt, gt, _origins()[:1])
    batched = RayIoUAccumulator(classes=SMALL, grid=grid)
    batched.update(np.stack([pred, gt]), np.stack([gt, gt]), [_origins(), _origins()[:1]])
    a = RayIoUAccumulator(classes=SMALL, grid=grid)
    b = RayIoUAccumulator(classes=SMALL, grid=grid)
    a.update(pred, gt, _origins())
    b.update(gt, gt, _origins()[:1])
    a.merge(b)
    for other in (batched, a):
        np.testing.assert_array_equal(other.tp_count.numpy(), single.tp_count.numpy())
        assert other.num_samples == 2
    with pytest.raises(ValueError, match="origin"):
        single.update(pred, gt, [_origins()])
    with pytest.raises(ValueError, match="shape"):
        single.update(pred[:-1], gt, _origins())
    with pytest.raises(ValueError, match="merge"):
        single.merge(RayIoUAccumulator(classes=OCC3D_NUSCENES))
