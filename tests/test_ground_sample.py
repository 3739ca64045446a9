"""Ground-plane backward projection (occdistill/nn/ground_sample.py): hand-computed projections,
exact bilinear sampling, the mean over cameras, fixed-rig parity, the student with the branch, export."""

from __future__ import annotations

import pytest
import torch

from occdistill.geometry import VoxelGrid
from occdistill.models.dense import BackboneConfig, DenseStudent, DenseStudentConfig, GridConfig
from occdistill.nn.ground_sample import (
    GroundProjection,
    GroundSampler,
    ground_sample,
    ground_sample_seen,
    project_ground,
)
from occdistill.nn.view_transform import FixedRigPlans

# OpenCV camera axes (x right, y down, z forward) -> ego (x forward, y left, z up).
EGO_FROM_OPENCV = torch.tensor([[0.0, 0.0, 1.0, 0.0], [-1.0, 0.0, 0.0, 0.0], [0.0, -1.0, 0.0, 0.0],
                                [0.0, 0.0, 0.0, 1.0]])
IMAGE = (32, 64)  # (H, W)
K = torch.tensor([[10.0, 0.0, 32.0], [0.0, 10.0, 16.0], [0.0, 0.0, 1.0]])
GRID = VoxelGrid((-8.0, -2.0, -1.0, 8.0, 2.0, 1.0), (1.0, 1.0, 2.0))  # X 16 (x centres -7.5..7.5), Y 4


def camera(yaw_deg: float = 0.0, height: float = 1.5) -> torch.Tensor:
    """ego_from_cam (4, 4) of a level camera at (0, 0, height) looking along ego yaw ``yaw_deg``."""
    yaw = torch.tensor(yaw_deg).deg2rad()
    rot = torch.eye(4)
    rot[:2, :2] = torch.tensor([[torch.cos(yaw), -torch.sin(yaw)], [torch.sin(yaw), torch.cos(yaw)]])
    rot[2, 3] = height
    return rot @ EGO_FROM_OPENCV


def rig(*yaws: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(1, N, 3, 3) K, (1, N, 3, 3) identity augmentation, (1, N, 4, 4) poses."""
    n = len(yaws)
    return (K.expand(1, n, 3, 3).clone(), torch.eye(3).expand(1, n, 3, 3).clone(),
            torch.stack([camera(y) for y in yaws])[None])


def cell(x: float, y: float) -> int:
    """Flat index (x-major) of the cell whose centre is (x, y)."""
    ix, iy = int(x - GRID.range[0]), int(y - GRID.range[1])
    return ix * GRID.shape[1] + iy


def test_projection_by_hand():
    proj = project_ground(*rig(0.0), GRID, IMAGE, height=0.0)
    assert proj.coords.shape == (1, 1, 16 * 4, 2) and proj.weight.shape == (1, 1, 16 * 4)
    # Cell centre (4.5, 0.5, 0): camera coordinates x = -0.5, y = 1.5, z = 4.5;
    # u = 10 * -0.5 / 4.5 + 32 = 30.889, v = 10 * 1.5 / 4.5 + 16 = 19.333 -> normalised 2u/W - 1, 2v/H - 1.
    i = cell(4.5, 0.5)
    u, v = 10 * -0.5 / 4.5 + 32, 10 * 1.5 / 4.5 + 16
    torch.testing.assert_close(proj.coords[0, 0, i], torch.tensor([2 * u / 64 - 1, 2 * v / 32 - 1]))
    assert proj.weight[0, 0, i] == 1
    # Cell centre (1.5, 0.5): v = 10 * 1.5 / 1.5 + 16 = 26 < 32 (seen); (0.5, 0.5): v = 46 (below the image).
    assert proj.weight[0, 0, cell(1.5, 0.5)] == 1 and proj.weight[0, 0, cell(0.5, 0.5)] == 0
    # Behind the camera (x < 0): never seen, even where u, v / z would land inside the image.
    behind = torch.tensor([cell(-x, y) for x in (0.5, 4.5, 7.5) for y in (-1.5, 0.5)])
    assert (proj.weight[0, 0, behind] == 0).all() and (proj.coords[0, 0, behind] == 0).all()
    # A higher plane: the same cell is seen higher up in the image (v = 10 * 0.5 / 4.5 + 16).
    high = project_ground(*rig(0.0), GRID, IMAGE, height=1.0)
    assert high.coords[0, 0, i, 1] == pytest.approx(2 * (10 * 0.5 / 4.5 + 16) / 32 - 1, abs=1e-6)


def test_samples_are_bilinear_at_the_feature_coordinates():
    """Features holding their own column/row index: bilinear interpolation of a linear function is
    exact, so each seen cell must read u / s - 1/2 and v / s - 1/2 (clamped to the outer centres)."""
    stride = 8
    h, w = IMAGE[0] // stride, IMAGE[1] // stride
    cols, rows = torch.meshgrid(torch.arange(w, dtype=torch.float32), torch.arange(h, dtype=torch.float32),
                                indexing="xy")
    features = torch.stack([cols, rows, torch.ones_like(cols)])[None, None]  # (1, 1, 3, h, w)
    cams = rig(0.0)
    out = ground_sample(features, project_ground(*cams, GRID, IMAGE, height=0.0), GRID.shape[:2])
    assert out.shape == (1, 3, 16, 4)
    flat = out.reshape(3, -1)
    i = cell(4.5, 0.5)
    u, v = 10 * -0.5 / 4.5 + 32, 10 * 1.5 / 4.5 + 16
    torch.testing.assert_close(flat[:, i], torch.tensor([u / stride - 0.5, min(v / stride - 0.5, h - 1), 1.0]))
    seen = flat[2] > 0
    assert seen.sum() > 4 and (flat[:, ~seen] == 0).all()
    assert (flat[0, seen] >= 0).all() and (flat[0, seen] <= w - 1).all()


def test_cells_seen_by_two_cameras_get_the_mean():
    """Cameras at yaw 0 and 30 deg see some cells together: constant features 2 and 6 -> 4 there."""
    cams = rig(0.0, 30.0)
    proj = project_ground(*cams, GRID, IMAGE, height=0.0)
    features = torch.tensor([2.0, 6.0]).view(1, 2, 1, 1, 1).expand(1, 2, 1, 4, 8)
    out = ground_sample(features, proj, GRID.shape[:2]).reshape(-1)
    both = (proj.weight[0] > 0).all(dim=0)
    only_first = (proj.weight[0, 0] > 0) & (proj.weight[0, 1] == 0)
    assert both.any() and only_first.any()
    torch.testing.assert_close(proj.weight[0][:, both], torch.full((2, int(both.sum())), 0.5))
    torch.testing.assert_close(out[both], torch.full((int(both.sum()),), 4.0))
    torch.testing.assert_close(out[only_first], torch.full((int(only_first.sum()),), 2.0))


def test_seen_pairs_path_equals_grid_sample_path_with_gradients():
    """The per-batch path (gathers over the seen pairs) and the fixed-rig path (grid_sample over
    every cell and camera) give the same values and the same feature gradients."""
    torch.manual_seed(0)
    cams = tuple(torch.cat([t, t]) for t in rig(0.0, 30.0))
    cams[2][1, 1] = camera(-40.0)  # the second sample has another rig
    proj = project_ground(*cams, GRID, IMAGE, height=0.3)
    features = torch.randn(2, 2, 5, 4, 8, requires_grad=True)
    ref = ground_sample(features, proj, GRID.shape[:2])
    out = ground_sample_seen(features, proj, GRID.shape[:2])
    torch.testing.assert_close(out, ref)
    probe = torch.randn_like(ref)
    (grad_ref,) = torch.autograd.grad((ref * probe).sum(), features)
    (grad_out,) = torch.autograd.grad((out * probe).sum(), features)
    torch.testing.assert_close(grad_out, grad_ref)
    with pytest.raises(ValueError, match="does not fit"):
        ground_sample_seen(features[:1], proj, GRID.shape[:2])


def test_batch_one_projection_serves_a_batch_and_shapes_are_checked():
    proj = project_ground(*rig(0.0, 30.0), GRID, IMAGE, height=0.0)
    features = torch.randn(3, 2, 5, 4, 8)
    out = ground_sample(features, proj, GRID.shape[:2])
    for b in range(3):
        torch.testing.assert_close(out[b:b + 1], ground_sample(features[b:b + 1], proj, GRID.shape[:2]))
    with pytest.raises(ValueError, match="does not fit"):
        ground_sample(features[:, :1], proj, GRID.shape[:2])
    with pytest.raises(ValueError, match="does not fit"):
        ground_sample(features, GroundProjection(proj.coords.expand(2, -1, -1, -1), proj.weight.expand(2, -1, -1)),
                      GRID.shape[:2])


def test_sampler_fixed_rig_matches_per_batch_projection():
    torch.manual_seed(0)
    sampler = GroundSampler(6, 5, GRID, IMAGE, height=0.0)
    cams = rig(0.0, 30.0)
    feats = torch.randn(2, 2, 6, 4, 8)
    batched = tuple(t.expand(2, *t.shape[1:]) for t in cams)
    ref = sampler(feats, *batched)
    sampler.set_fixed_rig(*(t[0] for t in cams))
    assert sampler.fixed_coords is not None and "fixed_coords" not in sampler.state_dict()
    torch.testing.assert_close(sampler(feats, *batched), ref)
    sampler.use_fixed(None)
    assert sampler.fixed() is None and sampler.fixed_coords is None


def student_config(ground_height: float | None) -> DenseStudentConfig:
    return DenseStudentConfig(
        image_size=(64, 96), backbone=BackboneConfig(depth=18, base_width=8), neck_channels=16,
        depth_bins=(1.0, 13.0, 1.0), context_channels=8, depth_net_channels=16, bev_channels=16, num_classes=5,
        grid=GridConfig(range=(-6.4, -6.4, -1.0, 6.4, 6.4, 2.2), voxel_size=(0.8, 0.8, 0.8)),
        ground_height=ground_height, bev_stage_channels=(8, 16, 16))


def student_inputs(batch: int = 1):
    torch.manual_seed(0)
    k = torch.tensor([[50.0, 0, 48], [0, 50.0, 32], [0, 0, 1]]).expand(batch, 2, 3, 3).clone()
    poses = torch.stack([camera(0.0), camera(180.0)]).expand(batch, 2, 4, 4).clone()
    return torch.rand(batch, 2, 3, 64, 96), k, torch.eye(3).expand(batch, 2, 3, 3).clone(), poses


def test_student_with_ground_branch_trains_and_keeps_flashocc_keys_without_it():
    plain = DenseStudent(student_config(None))
    assert not any(k.startswith("view_transform.ground") for k in plain.state_dict())
    model = DenseStudent(student_config(0.0))
    extra = {k for k in model.state_dict()} - {k for k in plain.state_dict()}
    assert extra == {"view_transform.ground.proj.weight", "view_transform.ground.proj.bias"}
    out = model(*student_inputs(batch=2))
    assert out.voxel_logits.shape == (2, 16, 16, 4, 5)
    out.voxel_logits.square().mean().backward()
    assert model.view_transform.ground.proj.weight.grad.abs().sum() > 0
    # The branch changes the lifted BEV (it is added to the splat).
    with torch.no_grad():
        plain.load_state_dict(model.state_dict(), strict=False)
        args = student_inputs()
        assert not torch.allclose(model(*args).lifted_bev, plain(*args).lifted_bev)


def test_student_fixed_rig_matches_per_batch_geometry_with_ground_branch():
    model = DenseStudent(student_config(0.0)).eval()
    images, k, aug, pose = student_inputs()
    with torch.no_grad():
        ref = model(images, k, aug, pose).voxel_logits
        model.set_fixed_rig(k[0], aug[0], pose[0])
        fixed = model(images, k, aug, pose).voxel_logits
        plans = model.view_transform.fixed_plans()
        assert plans.pool is not None and plans.ground is not None
        model.view_transform.clear_fixed_rig()  # both back to per-batch geometry
        assert model.view_transform.fixed_plans() == FixedRigPlans()
        model.view_transform.use_plans(plans)
        again = model(images, k, aug, pose).voxel_logits
    torch.testing.assert_close(fixed, ref, atol=1e-4, rtol=1e-4)
    assert torch.equal(again, fixed)


def test_student_with_ground_branch_exports_and_matches_onnxruntime(tmp_path):
    pytest.importorskip("onnxruntime")
    from occdistill.deploy.export import OnnxOccModel, check_parity, export_onnx
    from occdistill.deploy.rig import nuscenes_rig

    torch.manual_seed(0)
    cfg = DenseStudentConfig(
        image_size=(64, 96), backbone=BackboneConfig(depth=18, base_width=8), neck_channels=16,
        depth_bins=(1.0, 21.0, 2.0), context_channels=8, depth_net_channels=16, bev_channels=8, num_classes=18,
        grid=GridConfig(range=(-20.0, -20.0, -1.0, 20.0, 20.0, 5.4), voxel_size=(0.8, 0.8, 0.4)),
        ground_height=0.0)
    model = DenseStudent(cfg).eval()
    info = export_onnx(model, nuscenes_rig((64, 96)), tmp_path / "ground.onnx", exporter="torchscript", opset=17)
    runtime = OnnxOccModel(info.path)
    frames = [runtime.prepare(torch.rand(1, 6, 3, 64, 96)) for _ in range(2)]
    parity = check_parity(model, runtime, frames)
    assert parity.ok and parity.max_abs_logit_diff < 1e-4 * max(1.0, parity.max_abs_logit)
    assert model.view_transform.ground.fixed_coords is None  # the export works on a copy
