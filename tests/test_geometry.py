"""Geometry core: rigid transforms, quaternions, projection, augmentation matrices vs real PIL ops, grid."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.spatial.transform import Rotation

from occdistill.errors import DataError
from occdistill.geometry import (
    OCC3D_GRID,
    VoxelGrid,
    check_rigid,
    crop_matrix,
    hflip_matrix,
    invert_rigid,
    make_transform,
    project,
    quat_to_rotmat,
    resize_matrix,
    rotate_matrix,
    rotmat_to_quat,
    transform_from_quat,
    transform_points,
    unproject,
    yaw_transform,
)


def random_rigid(rng: np.random.Generator) -> np.ndarray:
    return make_transform(Rotation.random(random_state=rng.integers(1 << 31)).as_matrix(), rng.normal(size=3) * 5)


# ---------------------------------------------------------------- quaternions and rigid transforms


def test_quaternion_hand_case_is_wxyz():
    # 90 deg about +z: (w, x, y, z) = (cos 45, 0, 0, sin 45) maps +x to +y.
    r = quat_to_rotmat([math.cos(math.pi / 4), 0, 0, math.sin(math.pi / 4)])
    np.testing.assert_allclose(r, [[0, -1, 0], [1, 0, 0], [0, 0, 1]], atol=1e-12)
    # 180 deg about +x: (0, 1, 0, 0) flips y and z.
    np.testing.assert_allclose(quat_to_rotmat([0, 1, 0, 0]), np.diag([1.0, -1, -1]), atol=1e-12)


def test_quaternion_matches_scipy_and_round_trips():
    rng = np.random.default_rng(0)
    for _ in range(50):
        q = rng.normal(size=4)
        q /= np.linalg.norm(q)
        q = q if q[0] >= 0 else -q
        expected = Rotation.from_quat([q[1], q[2], q[3], q[0]]).as_matrix()  # scipy is x,y,z,w
        np.testing.assert_allclose(quat_to_rotmat(q), expected, atol=1e-12)
        np.testing.assert_allclose(rotmat_to_quat(quat_to_rotmat(q)), q, atol=1e-10)
    # Shepperd branches near 180 degrees, where trace <= 0.
    for axis in np.eye(3):
        r = Rotation.from_rotvec(axis * (math.pi - 1e-3)).as_matrix()
        np.testing.assert_allclose(quat_to_rotmat(rotmat_to_quat(r)), r, atol=1e-12)


def test_quaternion_rejects_bad_input():
    with pytest.raises(ValueError, match="4 values"):
        quat_to_rotmat([1, 0, 0])
    with pytest.raises(ValueError, match="norm"):
        quat_to_rotmat([0, 0, 0, 0])


def test_yaw_transform_and_chain_naming():
    ego_from_lidar = yaw_transform(math.pi / 2, x=1.0)
    # A point 1 m ahead of the LiDAR (x) is 1 m to the left (y) of it in the ego frame, shifted by x=1.
    np.testing.assert_allclose(transform_points(ego_from_lidar, np.array([1.0, 0, 0])), [1, 1, 0], atol=1e-12)
    global_from_ego = transform_from_quat([1, 0, 0, 0], [10, 20, 0])
    global_from_lidar = global_from_ego @ ego_from_lidar
    np.testing.assert_allclose(transform_points(global_from_lidar, np.zeros(3)), [11, 20, 0], atol=1e-12)


def test_invert_rigid_numpy_torch_batched():
    rng = np.random.default_rng(1)
    t = np.stack([random_rigid(rng) for _ in range(6)]).reshape(2, 3, 4, 4)
    inv = invert_rigid(t)
    np.testing.assert_allclose(inv @ t, np.broadcast_to(np.eye(4), t.shape), atol=1e-12)
    np.testing.assert_allclose(inv, np.linalg.inv(t), atol=1e-12)
    inv_t = invert_rigid(torch.from_numpy(t))
    np.testing.assert_allclose(inv_t.numpy(), inv, atol=1e-12)


def test_transform_points_round_trip_and_gradcheck():
    rng = np.random.default_rng(2)
    t = random_rigid(rng)
    pts = rng.normal(size=(4, 5, 3))
    back = transform_points(invert_rigid(t), transform_points(t, pts))
    np.testing.assert_allclose(back, pts, atol=1e-12)
    tt = torch.from_numpy(t).requires_grad_()
    pp = torch.from_numpy(pts).requires_grad_()
    assert torch.autograd.gradcheck(transform_points, (tt, pp))


def test_check_rigid_errors_name_the_matrix():
    good = random_rigid(np.random.default_rng(3))
    assert check_rigid(good, "x").dtype == np.float64
    cases = {
        "shape": (np.eye(3), "expected a 4x4"),
        "nan": (np.where(np.eye(4) == 1, np.nan, 0), "NaN"),
        "row": (good + np.diag([0, 0, 0, 1.0]), "last row"),
        "scale": (make_transform(np.eye(3) * 1.1, [0, 0, 0]), "not orthonormal"),
        "mirror": (make_transform(np.diag([1.0, 1, -1]), [0, 0, 0]), "determinant"),
    }
    for name, (m, msg) in cases.items():
        with pytest.raises(DataError, match=msg) as err:
            check_rigid(m, f"sample 7 {name}")
        assert f"sample 7 {name}" in str(err.value)
        assert "\n" not in str(err.value)


# ---------------------------------------------------------------- camera projection

K = np.array([[800.0, 0.0, 640.0], [0.0, 780.0, 360.0], [0.0, 0.0, 1.0]])


def test_project_known_values():
    uv, depth = project(np.array([[0.0, 0.0, 5.0], [1.0, -0.5, 2.0]]), K)
    np.testing.assert_allclose(uv, [[640, 360], [640 + 400, 360 - 195]])
    np.testing.assert_allclose(depth, [5, 2])
    # Skew enters u only: u = fx x/z + s y/z + cx.
    ks = K.copy()
    ks[0, 1] = 3.0
    uv, _ = project(np.array([1.0, 2.0, 4.0]), ks)
    np.testing.assert_allclose(uv, [800 * 0.25 + 3 * 0.5 + 640, 780 * 0.5 + 360])


def test_project_unproject_round_trip_numpy_and_torch():
    rng = np.random.default_rng(4)
    ks = K.copy()
    ks[0, 1] = 2.5
    pts = rng.uniform([-5, -5, 0.5], [5, 5, 40], size=(100, 3))
    uv, d = project(pts, ks)
    np.testing.assert_allclose(unproject(uv, d, ks), pts, atol=1e-9)
    # Augmented intrinsics of a rotated image are not upper-triangular.
    k_aug = rotate_matrix(17.0, (320, 180)) @ hflip_matrix(640) @ resize_matrix(0.5) @ ks
    uv_aug, d_aug = project(pts, k_aug)
    np.testing.assert_allclose(unproject(uv_aug, d_aug, k_aug), pts, atol=1e-9)
    np.testing.assert_allclose(unproject(torch.from_numpy(uv_aug), torch.from_numpy(d_aug), torch.from_numpy(k_aug)).numpy(), pts, atol=1e-9)
    uv_t, d_t = project(torch.from_numpy(pts), torch.from_numpy(ks))
    np.testing.assert_allclose(uv_t.numpy(), uv, atol=1e-9)
    np.testing.assert_allclose(unproject(uv_t, d_t, torch.from_numpy(ks)).numpy(), pts, atol=1e-9)


def test_project_unproject_gradcheck():
    rng = np.random.default_rng(5)
    pts = torch.from_numpy(rng.uniform([-2, -2, 1], [2, 2, 10], size=(6, 3))).requires_grad_()
    k = torch.from_numpy(K).requires_grad_()
    assert torch.autograd.gradcheck(lambda p, kk: project(p, kk)[0], (pts, k))
    uv = torch.from_numpy(rng.uniform(0, 1000, size=(6, 2))).requires_grad_()
    d = torch.from_numpy(rng.uniform(1, 20, size=6)).requires_grad_()
    assert torch.autograd.gradcheck(unproject, (uv, d, k))


def test_augmented_intrinsics_compose():
    """img_from_raw @ K projects a point where the augmentation moves its raw pixel."""
    aug = rotate_matrix(7.0, (350, 120)) @ hflip_matrix(704) @ crop_matrix(10, 140) @ resize_matrix(0.44)
    p = np.array([1.5, -0.3, 12.0])
    uv_raw, _ = project(p, K)
    uv_aug, _ = project(p, aug @ K)
    np.testing.assert_allclose(uv_aug, (aug @ np.append(uv_raw, 1.0))[:2], atol=1e-9)


# ---------------------------------------------------------------- augmentation matrices vs PIL


def _blob_image(w: int, h: int, cx: float, cy: float, sigma: float = 1.5) -> Image.Image:
    """A float image with a Gaussian dot centred at continuous pixel position (cx, cy)."""
    ys, xs = np.mgrid[0:h, 0:w] + 0.5  # pixel centres under the [c, c+1) convention
    return Image.fromarray(np.exp(-((xs - cx) ** 2 + (ys - cy) ** 2) / (2 * sigma**2)).astype(np.float32), mode="F")


def _centroid(img: Image.Image) -> np.ndarray:
    a = np.asarray(img, dtype=np.float64)
    ys, xs = np.mgrid[0 : a.shape[0], 0 : a.shape[1]] + 0.5
    return np.array([(xs * a).sum(), (ys * a).sum()]) / a.sum()


DOT = (61.3, 37.8)
W0, H0 = 160, 96


def _predicted(m: np.ndarray) -> np.ndarray:
    return (m @ np.array([DOT[0], DOT[1], 1.0]))[:2]


def test_resize_matrix_matches_pil_resize():
    img = _blob_image(W0, H0, *DOT, sigma=3.0)
    for w, h in [(80, 48), (70, 41), (224, 130)]:
        out = img.resize((w, h), Image.BILINEAR)
        np.testing.assert_allclose(_centroid(out), _predicted(resize_matrix(w / W0, h / H0)), atol=0.1)


def test_crop_matrix_matches_pil_crop():
    img = _blob_image(W0, H0, *DOT)
    out = img.crop((17, 9, 17 + 100, 9 + 60))
    np.testing.assert_allclose(_centroid(out), _predicted(crop_matrix(17, 9)), atol=0.05)


def test_hflip_matrix_matches_pil_transpose():
    img = _blob_image(W0, H0, *DOT)
    out = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    np.testing.assert_allclose(_centroid(out), _predicted(hflip_matrix(W0)), atol=0.05)


@pytest.mark.parametrize("angle", [90.0, 23.5, -41.0])
def test_rotate_matrix_matches_pil_rotate(angle):
    img = _blob_image(W0, H0, *DOT)
    out = img.rotate(angle, resample=Image.BILINEAR)  # counter-clockwise about (W/2, H/2)
    np.testing.assert_allclose(_centroid(out), _predicted(rotate_matrix(angle, (W0 / 2, H0 / 2))), atol=0.1)


def test_composed_matrix_matches_pil_chain():
    img = _blob_image(W0, H0, *DOT, sigma=3.0)
    out = img.resize((120, 72), Image.BILINEAR).crop((10, 4, 110, 64))
    out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT).rotate(12.0, resample=Image.BILINEAR)
    m = rotate_matrix(12.0, (50, 30)) @ hflip_matrix(100) @ crop_matrix(10, 4) @ resize_matrix(120 / W0, 72 / H0)
    np.testing.assert_allclose(_centroid(out), _predicted(m), atol=0.15)


# ---------------------------------------------------------------- voxel grid


def test_occ3d_grid_spec_and_centre_formula():
    g = OCC3D_GRID
    assert g.shape == (200, 200, 16)
    c = g.centers()
    assert c.shape == (200, 200, 16, 3)
    np.testing.assert_allclose(c[0, 0, 0], [-39.8, -39.8, -0.8])
    np.testing.assert_allclose(c[199, 100, 2], [39.8, 0.2, 0.0], atol=1e-12)  # ground layer holds z = 0
    np.testing.assert_allclose(g.index_to_center(np.array([5, 7, 3])), c[5, 7, 3])
    idx_t = g.index_to_center(torch.tensor([[5, 7, 3]]))
    np.testing.assert_allclose(idx_t.numpy()[0], c[5, 7, 3])


def test_point_to_index_round_trip_and_outside():
    g = OCC3D_GRID
    rng = np.random.default_rng(6)
    idx = np.stack([rng.integers(0, n, 500) for n in g.shape], axis=-1)
    back, inside = g.point_to_index(g.index_to_center(idx))
    assert inside.all() and (back == idx).all()
    pts = np.array([[40.0, 0, 0], [-40.0, 0, 0], [0, 0, -1.0001], [0, 0, 5.39]])
    got, inside = g.point_to_index(pts)
    assert inside.tolist() == [False, True, False, True]
    assert got[1].tolist() == [0, 100, 2] and got[3].tolist() == [100, 100, 15]
    got_t, inside_t = g.point_to_index(torch.from_numpy(pts))
    assert (got_t.numpy() == got).all() and (inside_t.numpy() == inside).all()


def test_grid_from_origin_and_validation():
    g = VoxelGrid.from_origin((1.0, 2.0, -0.5), 0.08, (60, 60, 36))
    assert g.shape == (60, 60, 36)
    np.testing.assert_allclose(g.upper, [1 + 4.8, 2 + 4.8, -0.5 + 2.88])
    np.testing.assert_allclose(g.centers()[0, 0, 0], [1.04, 2.04, -0.46])
    with pytest.raises(ValueError, match="whole number"):
        VoxelGrid(range=(0, 0, 0, 1.0, 1.0, 1.0), voxel_size=(0.3, 0.25, 0.25))
