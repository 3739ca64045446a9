"""The streaming voxel filter (occdistill/nn/voxel_filter.py): the recursion against hand-written
values, the border and reset rules, fewer label changes on noisy static scores, the warp direction
on real consecutive street frames, and the evaluation option."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from occdistill.data.augment import ImageAugConfig
from occdistill.data.occ3d import Occ3DDataset
from occdistill.data.occscannet import OccScanNetDataset
from occdistill.data.synth import generate
from occdistill.engine.data import eval_loader
from occdistill.engine.distributed import DistContext
from occdistill.engine.evaluate import evaluate
from occdistill.engine.tasks import predict_scores
from occdistill.errors import ConfigError
from occdistill.geometry.grid import VoxelGrid
from occdistill.geometry.transforms import yaw_transform
from occdistill.metrics.flicker import OCC3D_DYNAMIC_CLASSES
from occdistill.models.dense import BackboneConfig, DenseStudent, DenseStudentConfig, GridConfig
from occdistill.models.sparse import SparseOccStudent, tiny_sparse_config
from occdistill.nn.temporal import HistoryLimits
from occdistill.nn.voxel_filter import VoxelScoreFilter

GRID = VoxelGrid(range=(-2.0, -1.5, -1.0, 2.0, 1.5, 1.0), voxel_size=(0.5, 0.5, 1.0))  # 8 x 6 x 2
K = 4


def pose(x: float = 0.0, y: float = 0.0, yaw_deg: float = 0.0) -> torch.Tensor:
    return torch.as_tensor(yaw_transform(math.radians(yaw_deg), x, y), dtype=torch.float64)


def test_weight_zero_is_the_per_frame_log_softmax():
    f = VoxelScoreFilter(GRID, 0.0)
    for i in range(3):
        logits = torch.randn(*GRID.shape, K)
        out = f.step(logits, pose(x=0.5 * i), "s")
        torch.testing.assert_close(out, torch.log_softmax(logits, dim=-1))


def test_recursion_without_motion_matches_the_unrolled_sum():
    w = 0.3
    f = VoxelScoreFilter(GRID, w)
    frames = [torch.randn(*GRID.shape, K) for _ in range(3)]
    outs = [f.step(x, pose(), "s") for x in frames]
    s = [torch.log_softmax(x, dim=-1) for x in frames]
    torch.testing.assert_close(outs[0], s[0])
    torch.testing.assert_close(outs[1], (1 - w) * s[1] + w * s[0])
    # frame t-n enters with (1 - w) w^n, the first frame with the rest
    torch.testing.assert_close(outs[2], (1 - w) * s[2] + w * (1 - w) * s[1] + w * w * s[0])


def test_one_cell_of_forward_motion_shifts_the_history_and_new_cells_take_the_current_frame():
    """The ego moves +0.5 m (one cell) in x: current cell i shows what previous cell i + 1 showed;
    the last row enters the grid and has no history."""
    w = 0.4
    f = VoxelScoreFilter(GRID, w)
    first, second = torch.randn(*GRID.shape, K), torch.randn(*GRID.shape, K)
    f.step(first, pose(), "s")
    out = f.step(second, pose(x=0.5), "s")
    s1, s2 = torch.log_softmax(first, dim=-1), torch.log_softmax(second, dim=-1)
    expected = s2.clone()
    expected[:-1] = (1 - w) * s2[:-1] + w * s1[1:]
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_quarter_turn_rotates_the_history_like_a_brute_force_loop():
    """A square grid turned by 90 degrees about the origin: every cell centre maps onto a cell centre."""
    grid = VoxelGrid(range=(-2.0, -2.0, -1.0, 2.0, 2.0, 1.0), voxel_size=(0.5, 0.5, 1.0))  # 8 x 8 x 2
    w = 0.25
    f = VoxelScoreFilter(grid, w, limits=HistoryLimits(max_rotation_deg=120.0))  # a quarter turn is past the default 60
    first, second = torch.randn(*grid.shape, K), torch.randn(*grid.shape, K)
    f.step(first, pose(), "s")
    out = f.step(second, pose(yaw_deg=90.0), "s")
    s1, s2 = torch.log_softmax(first, dim=-1), torch.log_softmax(second, dim=-1)
    expected = torch.empty_like(s2)
    centres = grid.centers()
    for i in range(8):
        for j in range(8):
            # current (x, y) in the previous frame: prev_from_cur = rotation by +90 degrees
            x, y = centres[i, j, 0, 0], centres[i, j, 0, 1]
            px, py = -y, x
            pi, pj = int(math.floor((px + 2.0) / 0.5)), int(math.floor((py + 2.0) / 0.5))
            expected[i, j] = (1 - w) * s2[i, j] + w * s1[pi, pj]
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_voxels_that_show_or_showed_a_mover_take_the_current_frame():
    """Class 3 is dynamic. Where the history is confidently class 3 (a car that drove off) or the
    current frame is, the output is the current frame; elsewhere the blend weight is w times the
    static probability of both frames."""
    w = 0.4
    f = VoxelScoreFilter(GRID, w, dynamic=(3,))
    first = torch.zeros(*GRID.shape, K)
    first[0, 0, 0, 3] = 30.0  # history: a car
    first[1, 1, 0, 1] = 30.0  # history: static class 1
    second = torch.zeros(*GRID.shape, K)
    second[0, 0, 0, 0] = 30.0  # now: free where the car was
    second[1, 1, 0, 0] = 30.0  # now: free where class 1 was (a static disagreement)
    second[2, 2, 0, 3] = 30.0  # now: a car where the history was uniform
    f.step(first, pose(), "s")
    out = f.step(second, pose(), "s")
    s1, s2 = torch.log_softmax(first, dim=-1), torch.log_softmax(second, dim=-1)
    torch.testing.assert_close(out[0, 0, 0], s2[0, 0, 0], atol=1e-4, rtol=0)
    torch.testing.assert_close(out[2, 2, 0], s2[2, 2, 0], atol=1e-4, rtol=0)
    torch.testing.assert_close(out[1, 1, 0], (1 - w) * s2[1, 1, 0] + w * s1[1, 1, 0])
    # uniform in both frames: dynamic mass 1/K, weight w * (1 - 1/K)
    wu = w * (1 - 1 / K)
    torch.testing.assert_close(out[3, 3, 1], (1 - wu) * s2[3, 3, 1] + wu * s1[3, 3, 1])


# 25 m and a quarter turn between keyframes are past the default HistoryLimits (20 m, 60 degrees).
@pytest.mark.parametrize("second_pose, scene", [(pose(), "other"), (pose(x=25.0), "s"), (pose(yaw_deg=90.0), "s")])
def test_new_scene_or_implausible_jump_restarts_from_the_current_frame(second_pose, scene):
    f = VoxelScoreFilter(GRID, 0.4)
    f.step(torch.randn(*GRID.shape, K), pose(), "s")
    second = torch.randn(*GRID.shape, K)
    torch.testing.assert_close(f.step(second, second_pose, scene), torch.log_softmax(second, dim=-1))


def test_reset_forgets_the_history():
    f = VoxelScoreFilter(GRID, 0.4)
    f.step(torch.randn(*GRID.shape, K), pose(), "s")
    f.reset()
    second = torch.randn(*GRID.shape, K)
    torch.testing.assert_close(f.step(second, pose(), "s"), torch.log_softmax(second, dim=-1))


@pytest.mark.parametrize("weight", [-0.1, 1.0, 1.5])
def test_weight_outside_the_unit_interval_is_refused(weight):
    with pytest.raises(ValueError, match="weight"):
        VoxelScoreFilter(GRID, weight)


def test_noisy_scores_of_a_static_scene_change_label_less_often():
    """Near-tied scores plus per-frame noise: the filter (w = 0.4) must cut label changes between
    consecutive frames by at least a quarter (an EMA at w = 0.4 leaves 0.65x the noise's spread), and keep the majority label the same."""
    torch.manual_seed(0)
    base = torch.randn(*GRID.shape, K) * 0.3
    plain, filtered = VoxelScoreFilter(GRID, 0.0), VoxelScoreFilter(GRID, 0.4)
    changes = {"plain": 0, "filtered": 0}
    last: dict[str, torch.Tensor] = {}
    for t in range(20):
        logits = base + torch.randn(*GRID.shape, K) * 0.5
        for name, f in (("plain", plain), ("filtered", filtered)):
            labels = f.step(logits, pose(), "s").argmax(dim=-1)
            if name in last:
                changes[name] += int((labels != last[name]).sum())
            last[name] = labels
    assert changes["filtered"] < changes["plain"] * 3 / 4, changes


@pytest.fixture(scope="module")
def street(tmp_path_factory):
    """2 scenes x 3 frames of six 64x36 cameras; the ego drives 2-5 m between frames."""
    overrides = ["rig.width=64", "rig.height=36", "lidar.azimuths=256", "split.val_scenes=0"]
    return generate("street", tmp_path_factory.mktemp("street"), 2, 3, seed=3, overrides=overrides, progress=False)


def test_history_alone_predicts_the_current_static_labels_on_consecutive_street_frames(street):
    """Frame t-1 scored by its GT (confident one-hot logits), frame t uninformative (all zeros):
    the filtered labels at t are the warped history. On static camera-visible voxels both frames
    see, they must match frame t's GT (a wrong warp direction or axis order fails this)."""
    ds = Occ3DDataset(street.out, street.splits["train"], image_aug=ImageAugConfig(final_size=(32, 64)))
    dynamic = torch.tensor([ds.classes.index(n) for n in OCC3D_DYNAMIC_CLASSES])
    k = ds.classes.num_classes
    agree = total = 0
    for i in range(len(ds)):
        j = ds.previous(i)
        if j is None:
            continue
        prev, cur = ds.load(j), ds.load(i)
        f = VoxelScoreFilter(ds.grid, 0.4)
        f.step(10.0 * torch.nn.functional.one_hot(prev.semantics.long(), k).float(), prev.global_from_ego, "s")
        labels = f.step(torch.zeros(*ds.grid.shape, k), cur.global_from_ego, "s").argmax(dim=-1)
        # x/y cells the previous grid covers: inside the grid after moving by the ego motion
        counted = cur.mask_camera & ~torch.isin(cur.semantics.long(), dynamic)
        seen_before = labels != 0  # cells outside the history keep a uniform score: argmax 0
        counted &= seen_before | (cur.semantics == 0)
        agree += int((labels[counted] == cur.semantics[counted]).sum())
        total += int(counted.sum())
    assert total > 10_000
    assert agree / total > 0.9, agree / total


def tiny_dense(grid: VoxelGrid) -> DenseStudent:
    cfg = DenseStudentConfig(
        image_size=(32, 64), backbone=BackboneConfig(depth=18, base_width=8, out_indices=(1, 2)),
        neck_channels=16, depth_bins=(1.0, 21.0, 4.0), context_channels=8, depth_net_channels=16, bev_channels=8,
        grid=GridConfig(range=grid.range, voxel_size=grid.voxel_size))
    model = DenseStudent(cfg).eval()
    # Default-initialised logits hardly depend on the images (one label everywhere, no flicker):
    # larger random weights make them vary from voxel to voxel and frame to frame, so that the
    # filter has labels to change.
    for param in model.parameters():
        if param.dim() > 1:
            torch.nn.init.normal_(param, std=0.3)
    return model


def test_evaluate_with_the_filter_scores_the_filtered_labels(street, tmp_path):
    """The labels ``evaluate`` saves with the filter on are the filter (movers: the Occ3D dynamic
    classes) run by hand over the frames in scene and time order; they differ from the per-frame argmax; w = 0 is the plain evaluation."""
    ds = Occ3DDataset(street.out, street.splits["train"], image_aug=ImageAugConfig(final_size=(32, 64)))
    torch.manual_seed(0)
    model = tiny_dense(ds.grid)
    plain = evaluate(model, ds, torch.device("cpu"), rayiou=False, save_pred=tmp_path / "plain")
    off = evaluate(model, ds, torch.device("cpu"), rayiou=False, temporal_filter=0.0)
    assert off["mIoU"] == plain["mIoU"] and off["flicker"] == plain["flicker"]
    on = evaluate(model, ds, torch.device("cpu"), rayiou=False, temporal_filter=0.45, save_pred=tmp_path / "on",
                  batch_size=2)
    assert on["flicker_pairs"] == plain["flicker_pairs"] > 0
    manual = VoxelScoreFilter(ds.grid, 0.45, dynamic=[ds.classes.index(n) for n in OCC3D_DYNAMIC_CLASSES])
    changed = 0
    for item in eval_loader(ds, DistContext(), 1, 0):
        batch = item.batch
        expected = manual.step(predict_scores(model, item)[0], batch.global_from_ego[0], batch.scene_names[0])
        token = batch.tokens[0]
        saved = torch.as_tensor(np.load(tmp_path / "on" / f"{token}.npz")["semantics"]).long()
        assert torch.equal(saved, expected.argmax(dim=-1))
        changed += int((saved != torch.as_tensor(np.load(tmp_path / "plain" / f"{token}.npz")["semantics"])).sum())
    assert changed > 0


def test_evaluate_refuses_the_filter_on_data_without_ego_poses(tmp_path):
    room = generate("room", tmp_path / "room", 1, 1, seed=0, overrides=["camera.width=64", "camera.height=48"],
                    progress=False)
    with pytest.raises(ConfigError, match="Occ3D"):
        evaluate(torch.nn.Identity(), OccScanNetDataset(room.out), torch.device("cpu"), temporal_filter=0.3)


def test_a_sparse_model_has_no_dense_scores_to_filter():
    with pytest.raises(ConfigError, match="sparse"):
        predict_scores(SparseOccStudent(tiny_sparse_config()), None)
