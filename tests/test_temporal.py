"""Temporal fusion parts: the BEV warp against a hand-written loop and exact shifts/rotations, the
history reset rule, the fusion module and the dense student's temporal mode (off = unchanged)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from occdistill.geometry.grid import VoxelGrid
from occdistill.geometry.transforms import make_transform, yaw_transform
from occdistill.models.dense import BackboneConfig, DenseStudent, DenseStudentConfig, GridConfig
from occdistill.nn.temporal import (
    BEVHistory,
    HistoryLimits,
    TemporalFusion,
    cur_from_prev_transform,
    plausible_motion,
    warp_bev,
)

# Non-square, off-centre, anisotropic: an x/y swap anywhere shows up.
ODD_GRID = VoxelGrid(range=(-1.0, 0.4, -1.0, 2.0, 2.4, 1.0), voxel_size=(0.5, 0.4, 2.0))  # 6 x 5 x 1
SQUARE_GRID = VoxelGrid(range=(-2.0, -2.0, -1.0, 2.0, 2.0, 1.0), voxel_size=(0.5, 0.5, 2.0))  # 8 x 8 x 1


def t64(m: np.ndarray, batch: int = 1) -> torch.Tensor:
    return torch.as_tensor(m, dtype=torch.float64).expand(batch, 4, 4).clone()


def reference_warp(prev: torch.Tensor, cur_from_prev: torch.Tensor, grid: VoxelGrid, mode: str) -> torch.Tensor:
    """Loop over current cells: map the centre (z = 0) into the previous frame, interpolate by hand
    (bilinear over the 4 surrounding cell centres, or the containing cell), zeros outside."""
    batch, channels, num_x, num_y = prev.shape
    xmin, ymin = grid.range[0], grid.range[1]
    sx, sy = grid.voxel_size[:2]
    out = torch.zeros(batch, channels, num_x, num_y, dtype=torch.float64)
    for b in range(batch):
        prev_from_cur = np.linalg.inv(cur_from_prev[b].numpy())
        for i in range(num_x):
            for j in range(num_y):
                p = prev_from_cur @ np.array([xmin + (i + 0.5) * sx, ymin + (j + 0.5) * sy, 0.0, 1.0])
                fi, fj = (p[0] - xmin) / sx - 0.5, (p[1] - ymin) / sy - 0.5  # continuous cell index
                if mode == "nearest":
                    ii, jj = math.floor(fi + 0.5), math.floor(fj + 0.5)  # the cell containing p
                    if 0 <= ii < num_x and 0 <= jj < num_y:
                        out[b, :, i, j] = prev[b, :, ii, jj].double()
                    continue
                i0, j0 = math.floor(fi), math.floor(fj)
                for di in (0, 1):
                    for dj in (0, 1):
                        ii, jj = i0 + di, j0 + dj
                        w = (fi - i0 if di else 1 - (fi - i0)) * (fj - j0 if dj else 1 - (fj - j0))
                        if 0 <= ii < num_x and 0 <= jj < num_y:
                            out[b, :, i, j] += w * prev[b, :, ii, jj].double()
    return out


# ------------------------------------------------------------------------------------------------
# warp


def test_transform_maps_a_world_point_between_augmented_frames():
    rng = np.random.default_rng(0)
    g_prev = make_transform(np.eye(3), (1200.0, -830.0, 3.0)) @ yaw_transform(0.3)
    g_cur = make_transform(np.eye(3), (1204.0, -829.0, 3.1)) @ yaw_transform(0.35)
    bda = np.diag([1.0, -1.0, 1.0, 1.0]) @ np.diag([1.1, 1.1, 1.1, 1.0]) @ yaw_transform(0.2)  # mirror, scale, rotate
    world = np.append(rng.uniform(-20, 20, 3) + [1200, -830, 0], 1.0)
    prev_aug = bda @ np.linalg.inv(g_prev) @ world
    cur_aug = bda @ np.linalg.inv(g_cur) @ world
    transform = cur_from_prev_transform(t64(g_cur), t64(g_prev), torch.as_tensor(bda, dtype=torch.float32)[None])
    assert transform.dtype == torch.float64 and transform.shape == (1, 4, 4)
    np.testing.assert_allclose(transform[0].numpy() @ prev_aug, cur_aug, atol=1e-5)  # bda is float32
    np.testing.assert_allclose(cur_from_prev_transform(t64(g_cur), t64(g_prev))[0].numpy(),
                               np.linalg.inv(g_cur) @ g_prev, atol=1e-12)


@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
def test_warp_matches_a_hand_written_loop(mode):
    torch.manual_seed(0)
    prev = torch.randn(2, 3, *ODD_GRID.shape[:2])
    # sub-cell translations and a few degrees of yaw: every sample point falls between centres
    transforms = torch.stack([
        torch.as_tensor(yaw_transform(0.13, 0.37, -0.21)), torch.as_tensor(yaw_transform(-0.4, -0.52, 0.29)),
    ])
    got = warp_bev(prev, transforms, ODD_GRID, mode=mode)
    torch.testing.assert_close(got.double(), reference_warp(prev, transforms, ODD_GRID, mode), atol=1e-5, rtol=0)


def test_identity_warp_returns_the_input():
    prev = torch.randn(2, 4, *ODD_GRID.shape[:2])
    torch.testing.assert_close(warp_bev(prev, t64(np.eye(4), 2), ODD_GRID), prev, atol=1e-6, rtol=0)


def test_one_cell_translation_shifts_the_tensor():
    prev = torch.randn(1, 2, *ODD_GRID.shape[:2])
    # content moves +1 cell in x (0.5 m): cur[x + 1] = prev[x], the first row enters empty
    got = warp_bev(prev, t64(make_transform(np.eye(3), (0.5, 0.0, 0.0))), ODD_GRID)
    expect = torch.zeros_like(prev)
    expect[:, :, 1:] = prev[:, :, :-1]
    torch.testing.assert_close(got, expect, atol=1e-6, rtol=0)
    # and -1 cell in y (0.4 m): cur[:, y] = prev[:, y + 1]
    got = warp_bev(prev, t64(make_transform(np.eye(3), (0.0, -0.4, 0.0))), ODD_GRID)
    expect = torch.zeros_like(prev)
    expect[..., :-1] = prev[..., 1:]
    torch.testing.assert_close(got, expect, atol=1e-6, rtol=0)


def test_quarter_turn_is_rot90_from_x_towards_y():
    prev = torch.randn(1, 3, *SQUARE_GRID.shape[:2])
    # A +90 deg yaw takes the point (x, 0) of the previous frame to (0, x): the content turns from
    # the +x axis towards +y, which is rot90 with k = 1 over the (X, Y) dimensions.
    got = warp_bev(prev, t64(yaw_transform(math.pi / 2)), SQUARE_GRID)
    torch.testing.assert_close(got, torch.rot90(prev, 1, dims=(2, 3)), atol=1e-5, rtol=0)
    got = warp_bev(prev, t64(yaw_transform(-math.pi / 2)), SQUARE_GRID)
    torch.testing.assert_close(got, torch.rot90(prev, -1, dims=(2, 3)), atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------------
# history and fusion


def test_motion_limits():
    limits = HistoryLimits(max_translation_m=10.0, max_rotation_deg=30.0)
    moves = torch.stack([torch.as_tensor(m) for m in (
        yaw_transform(0.1, 5.0), yaw_transform(0.1, 11.0), yaw_transform(math.radians(40)), np.full((4, 4), np.nan),
    )])
    assert plausible_motion(moves, limits).tolist() == [True, False, False, False]


def history_step(history, bev, poses, scenes, frames=2):
    warped = None if history is None else history.warped(poses, scenes, SQUARE_GRID)
    return warped, BEVHistory.push(history, bev, poses, scenes, frames)


def test_history_keeps_the_newest_frames_and_resets_on_scene_change_and_pose_jump():
    torch.manual_seed(0)
    bevs = [torch.randn(2, 3, 8, 8) for _ in range(4)]
    still = t64(np.eye(4), 2)
    warped, h = history_step(None, bevs[0], still, ("a", "b"))
    assert warped is None and h.valid.tolist() == [[True, False], [True, False]]
    warped, h = history_step(h, bevs[1], still, ("a", "b"))
    # standing still: the newest slot is the previous BEV itself, the older one is still empty
    torch.testing.assert_close(warped[:, 0], bevs[0], atol=1e-6, rtol=0)
    assert (warped[:, 1] == 0).all()
    # stream 1 enters scene "c": its two slots are dropped; stream 0 sees both earlier frames, newest first
    warped, h = history_step(h, bevs[2], still, ("a", "c"))
    torch.testing.assert_close(warped[0, 0], bevs[1][0], atol=1e-6, rtol=0)
    torch.testing.assert_close(warped[0, 1], bevs[0][0], atol=1e-6, rtol=0)
    assert (warped[1] == 0).all()
    assert h.valid.tolist() == [[True, True], [True, False]]
    # stream 0 jumps 50 m: its slots are unusable; stream 1 keeps its one frame of scene "c"
    jump = torch.stack([torch.as_tensor(make_transform(np.eye(3), (50.0, 0, 0))), torch.eye(4, dtype=torch.float64)])
    warped, _ = history_step(h, bevs[3], jump, ("a", "c"))
    assert (warped[0] == 0).all()
    torch.testing.assert_close(warped[1, 0], bevs[2][1], atol=1e-6, rtol=0)
    assert h.usable(jump, ("a", "c")).tolist() == [[False, False], [True, False]]


def test_history_warps_with_the_ego_motion():
    prev = torch.randn(1, 2, 8, 8)
    pose_prev = t64(make_transform(np.eye(3), (500.0, 20.0, 0.0)))
    pose_cur = t64(make_transform(np.eye(3), (500.5, 20.0, 0.0)))  # ego drove 0.5 m = 1 cell forward
    h = BEVHistory.push(None, prev, pose_prev, ("a",), frames=1)
    warped = h.warped(pose_cur, ("a",), SQUARE_GRID)  # (1, 1, C, X, Y)
    # a static thing 1 cell further back in x now: cur[x] = prev[x + 1]
    torch.testing.assert_close(warped[0, 0, :, :-1], prev[0, :, 1:], atol=1e-6, rtol=0)
    assert (warped[0, 0, :, -1] == 0).all()


def test_history_refuses_another_number_of_streams():
    h = BEVHistory.push(None, torch.zeros(2, 1, 8, 8), t64(np.eye(4), 2), ("a", "b"), frames=1)
    with pytest.raises(ValueError, match="streams"):
        h.warped(t64(np.eye(4)), ("a",), SQUARE_GRID)


def test_fusion_shapes_and_gradients():
    fusion = TemporalFusion(channels=4, frames=2)
    cur = torch.randn(2, 4, 6, 5, requires_grad=True)
    hist = torch.randn(2, 2, 4, 6, 5, requires_grad=True)
    out = fusion(cur, hist)
    assert out.shape == (2, 4, 6, 5)
    out.sum().backward()
    assert cur.grad.abs().sum() > 0 and hist.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="history"):
        fusion(cur, hist[:, :1])
    with pytest.raises(ValueError, match="at least one"):
        TemporalFusion(4, 0)


# ------------------------------------------------------------------------------------------------
# the dense student


def tiny_config() -> DenseStudentConfig:
    """A 16 x 16 BEV of 8 channels (tests/test_models_dense.py's tiny student)."""
    return DenseStudentConfig(
        image_size=(64, 96), backbone=BackboneConfig(depth=18, base_width=8), neck_channels=16,
        depth_bins=(1.0, 13.0, 1.0), context_channels=8, depth_net_channels=16, bev_channels=16, num_classes=5,
        grid=GridConfig(range=(-6.4, -6.4, -1.0, 6.4, 6.4, 2.2), voxel_size=(0.8, 0.8, 0.8)),
    )


def inputs(batch: int) -> tuple[torch.Tensor, ...]:
    """Random images; two cameras 1.5 m up looking along +x and -x (OpenCV axes)."""
    torch.manual_seed(0)
    k = torch.tensor([[50.0, 0, 48], [0, 50.0, 32], [0, 0, 1]])
    front = torch.tensor([[0.0, 0, 1, 0], [-1, 0, 0, 0], [0, -1, 0, 1.5], [0, 0, 0, 1]])
    back = torch.tensor([[0.0, 0, -1, 0], [1, 0, 0, 0], [0, -1, 0, 1.5], [0, 0, 0, 1]])
    return (torch.rand(batch, 2, 3, 64, 96), k.expand(batch, 2, 3, 3), torch.eye(3).expand(batch, 2, 3, 3),
            torch.stack([front, back]).expand(batch, 2, 4, 4))


def temporal_model(frames: int) -> DenseStudent:
    return DenseStudent(dataclasses.replace(tiny_config(), temporal_frames=frames))


def test_temporal_off_is_the_single_frame_model():
    torch.manual_seed(0)
    off = DenseStudent(tiny_config()).eval()
    torch.manual_seed(0)
    on = temporal_model(frames=1).eval()
    off_keys = set(off.state_dict())
    assert not any(k.startswith("temporal.") for k in off_keys)
    assert off_keys == {k for k in on.state_dict() if not k.startswith("temporal.")}
    args = inputs(batch=1)
    with torch.no_grad():
        out = off(*args)
        feats, lifted = off.lift(*args)
        by_hand = off.head(off.bev_encoder(lifted.bev))  # the single-frame pipeline, stage by stage
    torch.testing.assert_close(out.voxel_logits, by_hand, rtol=0, atol=0)
    torch.testing.assert_close(out.lifted_bev, lifted.bev, rtol=0, atol=0)
    with pytest.raises(ValueError, match="single-frame"):
        off(*args, history=torch.zeros(1, 1, 8, 16, 16))


def test_temporal_mode_uses_the_history():
    torch.manual_seed(0)
    model = temporal_model(frames=2).eval()
    args = inputs(batch=2)
    num_x, num_y, _ = model.grid.shape
    with torch.no_grad():
        start = model(*args)
        zeros = model(*args, history=torch.zeros(2, 2, 8, num_x, num_y))
        other = model(*args, history=torch.randn(2, 2, 8, num_x, num_y))
    torch.testing.assert_close(start.voxel_logits, zeros.voxel_logits, rtol=0, atol=0)  # None = zeros
    assert not torch.allclose(start.voxel_logits, other.voxel_logits)
    assert start.lifted_bev.shape == (2, 8, num_x, num_y)
    model.train()
    out = model(*args, history=torch.randn(2, 2, 8, num_x, num_y))
    out.voxel_logits.mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.temporal.parameters())
