"""Augmentation: drawn matrices, pixel/map warps against brute force and PIL, BEV resampling, depth."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from occdistill.data.augment import (
    BevAugConfig,
    ImageAug,
    ImageAugConfig,
    apply_bev_aug,
    make_rngs,
    sample_bev_aug,
    sample_image_aug,
)
from occdistill.data.depth import lidar_depth_maps
from occdistill.geometry import VoxelGrid, project, transform_points

TRAIN = ImageAugConfig(final_size=(48, 96), resize_range=(0.8, 1.25), crop_top_range=(0.0, 1.0), flip_prob=0.5,
                       rotate_range_deg=(-20, 20), color_jitter=0.3)


# ---------------------------------------------------------------- image augmentation


def test_evaluation_transform_values():
    # keep_aspect: one scale covering the output (BEVDet 1600x900 -> 704x256: 0.44, 396 rows, crop 140 from the top).
    aug = sample_image_aug(ImageAugConfig(final_size=(256, 704)), (900, 1600), rng=None)
    np.testing.assert_allclose(aug.img_from_raw, [[0.44, 0, 0], [0, 0.44, -140], [0, 0, 1]])
    assert aug.resize_size == (396, 704) and aug.out_size == (256, 704) and aug.color is None
    # Per-axis scales to the output (ISO's 1296x968 -> 640x480).
    aug = sample_image_aug(ImageAugConfig(final_size=(480, 640), keep_aspect=False), (968, 1296), rng=None)
    np.testing.assert_allclose(aug.img_from_raw, np.diag([640 / 1296, 480 / 968, 1.0]))
    # Centred crop with crop_top 0.5, in both directions.
    aug = sample_image_aug(ImageAugConfig(final_size=(100, 100), crop_top_range=(0.5, 0.5)), (200, 300), rng=None)
    np.testing.assert_allclose(aug.img_from_raw, [[0.5, 0, -25], [0, 0.5, 0], [0, 0, 1]])


def test_draws_are_deterministic_and_streams_independent():
    a = sample_image_aug(TRAIN, (90, 160), make_rngs(4, 0, 9)[0])
    b = sample_image_aug(TRAIN, (90, 160), make_rngs(4, 0, 9)[0])
    np.testing.assert_array_equal(a.img_from_raw, b.img_from_raw)
    assert a.color == b.color
    c = sample_image_aug(TRAIN, (90, 160), make_rngs(4, 1, 9)[0])
    assert not np.allclose(a.img_from_raw, c.img_from_raw)
    # The BEV stream does not depend on how many cameras drew from the image stream.
    img_rng, bev_rng = make_rngs(4, 0, 9)
    for _ in range(6):
        sample_image_aug(TRAIN, (90, 160), img_rng)
    bev = BevAugConfig(rotate_range_deg=(-30, 30), flip_x_prob=0.5)
    np.testing.assert_array_equal(sample_bev_aug(bev, bev_rng), sample_bev_aug(bev, make_rngs(4, 0, 9)[1]))
    # Draws happen whatever the probabilities: turning flips off keeps the other draws.
    no_flip = ImageAugConfig(**{**TRAIN.__dict__, "flip_prob": 0.0})
    d = sample_image_aug(no_flip, (90, 160), make_rngs(4, 0, 9)[0])
    assert d.color == a.color


def test_apply_image_moves_a_dot_where_the_matrix_says():
    h, w = 90, 160
    cx, cy = 101.3, 27.6
    ys, xs = np.mgrid[0:h, 0:w] + 0.5
    blob = np.exp(-((xs - cx) ** 2 + (ys - cy) ** 2) / (2 * 3.0**2))
    img = Image.fromarray((np.stack([blob] * 3, -1) * 255).astype(np.uint8))
    cfg = ImageAugConfig(**{**TRAIN.__dict__, "color_jitter": 0.0})
    for seed in range(6):
        aug = sample_image_aug(cfg, (h, w), np.random.default_rng(seed))
        out = aug.apply_image(img)[..., 0].astype(np.float64)
        oy, ox = np.mgrid[0 : out.shape[0], 0 : out.shape[1]] + 0.5
        got = np.array([(ox * out).sum(), (oy * out).sum()]) / out.sum()
        expected = (aug.img_from_raw @ [cx, cy, 1.0])[:2]
        np.testing.assert_allclose(got, expected, atol=0.5)


def test_warp_nearest_matches_brute_force_and_image_warp():
    rng = np.random.default_rng(1)
    labels = np.kron(rng.integers(0, 6, size=(12, 20)), np.ones((8, 8), dtype=np.int64)).astype(np.uint8)  # 96x160 blocks
    palette = rng.integers(0, 256, size=(256, 3)).astype(np.uint8)
    img = Image.fromarray(palette[labels])
    for seed in range(4):
        aug = sample_image_aug(ImageAugConfig(**{**TRAIN.__dict__, "color_jitter": 0.0}), labels.shape, np.random.default_rng(seed))
        warped = aug.warp_nearest(labels, fill=255)
        inv = np.linalg.inv(aug.img_from_raw)
        for r in range(0, 48, 5):  # reference: one pixel at a time
            for c in range(0, 96, 7):
                x, y, z = inv @ [c + 0.5, r + 0.5, 1.0]
                col, row = math.floor(x / z), math.floor(y / z)
                inside = 0 <= col < 160 and 0 <= row < 96
                assert warped[r, c] == (labels[row, col] if inside else 255)
        # The bilinear image warp shows the same content where the label map is locally uniform.
        pixels = aug.apply_image(img)
        uniform = np.ones_like(warped, dtype=bool)
        for dr in (-1, 0, 1):
            for dc in (-1, 0, 1):
                uniform[1:-1, 1:-1] &= warped[1 + dr : 47 + dr, 1 + dc : 95 + dc] == warped[1:-1, 1:-1]
        uniform[[0, -1]] = uniform[:, [0, -1]] = False
        uniform &= warped != 255
        err = np.abs(pixels[uniform] - palette[warped[uniform]] / 255.0).max(axis=-1)
        assert uniform.sum() > 400 and (err < 0.05).mean() > 0.99


def test_warp_nearest_of_a_lower_resolution_map():
    aug = ImageAug.identity((4, 6))
    half = np.arange(6).reshape(2, 3)
    np.testing.assert_array_equal(aug.warp_nearest(half, fill=-1), np.kron(half, np.ones((2, 2), dtype=int)))


def test_color_jitter_touches_pixels_only():
    cfg = ImageAugConfig(final_size=(90, 160), color_jitter=0.4)
    aug = sample_image_aug(cfg, (90, 160), np.random.default_rng(0))
    np.testing.assert_allclose(aug.img_from_raw, np.eye(3))
    assert aug.color is not None and all(0.6 <= f <= 1.4 for f in aug.color)
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (90, 160, 3)).astype(np.uint8))
    out = aug.apply_image(img)
    assert out.dtype == np.float32 and out.min() >= 0 and out.max() <= 1
    assert not np.allclose(out, np.asarray(img) / 255.0)


def test_config_validation():
    with pytest.raises(ValueError, match="final_size"):
        ImageAugConfig(final_size=(0, 10))
    with pytest.raises(ValueError, match="crop_top_range"):
        ImageAugConfig(crop_top_range=(0.5, 1.5))
    with pytest.raises(ValueError, match="flip_x_prob"):
        BevAugConfig(flip_x_prob=-0.1)


# ---------------------------------------------------------------- BEV augmentation

GRID = VoxelGrid(range=(-2.0, -1.6, -1.0, 2.0, 1.6, 0.6), voxel_size=(0.4, 0.4, 0.4))  # 10 x 8 x 4


def test_sample_bev_aug_composition():
    rng = np.random.default_rng(0)
    cfg = BevAugConfig(rotate_range_deg=(30, 30), scale_range=(2, 2), flip_x_prob=1.0, flip_y_prob=0.0)
    bda = sample_bev_aug(cfg, rng)
    # +x rotated by 30 deg, scaled by 2, then x mirrored.
    np.testing.assert_allclose(transform_points(bda, np.array([1.0, 0, 0])), [-2 * math.cos(math.pi / 6), 2 * 0.5, 0], atol=1e-12)
    np.testing.assert_allclose(transform_points(bda, np.array([0, 0, 1.0])), [0, 0, 2])
    np.testing.assert_array_equal(sample_bev_aug(cfg, None), np.eye(4))
    np.testing.assert_array_equal(sample_bev_aug(None, rng), np.eye(4))


def test_apply_bev_aug_flips_and_rotations_are_exact():
    rng = np.random.default_rng(2)
    sem = rng.integers(0, 17, GRID.shape).astype(np.uint8)
    mask = rng.uniform(size=GRID.shape) < 0.5
    flip_x = np.diag([-1.0, 1, 1, 1])
    out, (m,) = apply_bev_aug(flip_x, GRID, sem, (mask,), fill_label=17)
    np.testing.assert_array_equal(out, sem[::-1])
    np.testing.assert_array_equal(m, mask[::-1])
    square = VoxelGrid(range=(-1.6, -1.6, -1.0, 1.6, 1.6, 0.6), voxel_size=(0.4, 0.4, 0.4))
    sq = rng.integers(0, 17, square.shape).astype(np.uint8)
    rot90 = np.array([[0.0, -1, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])  # (x, y) -> (-y, x)
    out, _ = apply_bev_aug(rot90, square, sq, (), fill_label=17)
    # new[i, j] = old at the source of centre (x_i, y_j): (y_j, -x_i).
    np.testing.assert_array_equal(out, np.rot90(sq, k=1, axes=(0, 1)))


def test_apply_bev_aug_matches_brute_force_with_outside_fill():
    rng = np.random.default_rng(3)
    sem = rng.integers(0, 17, GRID.shape).astype(np.uint8)
    mask_a = rng.uniform(size=GRID.shape) < 0.7
    mask_b = rng.uniform(size=GRID.shape) < 0.3
    bda = sample_bev_aug(BevAugConfig(rotate_range_deg=(25, 25), scale_range=(0.9, 0.9)), rng)
    out, (ma, mb) = apply_bev_aug(bda, GRID, sem, (mask_a, mask_b), fill_label=17)
    inv = np.linalg.inv(bda)
    outside = 0
    for i, j, k in np.ndindex(*GRID.shape):
        src = transform_points(inv, GRID.index_to_center(np.array([i, j, k])))
        idx = np.floor((src - GRID.lower) / GRID.size).astype(int)
        if np.all(idx >= 0) and np.all(idx < GRID.shape):
            assert (out[i, j, k], ma[i, j, k], mb[i, j, k]) == (sem[tuple(idx)], mask_a[tuple(idx)], mask_b[tuple(idx)])
        else:
            outside += 1
            assert (out[i, j, k], ma[i, j, k], mb[i, j, k]) == (17, False, False)
    assert outside > 0


# ---------------------------------------------------------------- LiDAR depth

K = np.array([[10.0, 0, 5], [0, 10.0, 4], [0, 0, 1]])


def test_lidar_depth_nearest_wins_and_bounds():
    cam_from_ego = np.eye(4)[None]
    pts = np.array([
        [0.0, 0.0, 5.0],  # pixel (5, 4), depth 5
        [0.0, 0.0, 3.0],  # same pixel, nearer: wins
        [0.05, 0.05, 6.0],  # u = 5.083, v = 4.083: same pixel, farther
        [-0.39, 0.0, 1.0],  # u = 1.1: column 1
        [0.0, 0.0, -2.0],  # behind the camera
        [2.0, 0.0, 1.0],  # u = 25: outside
        [0.0, 0.0, 0.05],  # nearer than min_depth
    ])
    d = lidar_depth_maps(pts, cam_from_ego, K[None], (8, 10))
    expected = np.zeros((8, 10), dtype=np.float32)
    expected[4, 5] = 3.0
    expected[4, 1] = 1.0
    np.testing.assert_array_equal(d[0], expected)


def test_lidar_depth_uses_the_transform_and_augmented_intrinsics():
    rng = np.random.default_rng(4)
    pts = rng.uniform([-5, -5, 1], [5, 5, 20], size=(2000, 3))
    cam_from_ego = np.stack([np.eye(4), np.diag([-1.0, -1, 1, 1])])  # second camera rolled 180 deg
    aug = sample_image_aug(TRAIN, (80, 100), np.random.default_rng(0)).img_from_raw
    k_aug = np.stack([aug @ np.array([[40.0, 0, 50], [0, 40, 40], [0, 0, 1]])] * 2)
    d = lidar_depth_maps(pts, cam_from_ego, k_aug, (48, 96))
    for n in range(2):
        uv, z = project(transform_points(cam_from_ego[n], pts), k_aug[n])
        rows, cols = np.nonzero(d[n])
        assert len(rows) > 200
        for r, c in zip(rows[:50], cols[:50]):
            here = (np.floor(uv[:, 0]) == c) & (np.floor(uv[:, 1]) == r) & (z > 0.1)
            assert math.isclose(d[n, r, c], z[here].min(), rel_tol=1e-6)
