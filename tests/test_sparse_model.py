"""Sparse-query (OPUS-style) model: shapes, gradient flow, one camera, the sampler's projection,
extra query groups, voxelisation (round trip, filters, closing) and config checks."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from occdistill.geometry.camera import project
from occdistill.models.sparse import (
    SparseBackboneConfig,
    SparseGridConfig,
    ExtraQueries,
    LayerOutput,
    OccClasses,
    SparseOccConfig,
    SparseOccStudent,
    SparseOutput,
    box_max3d,
    sparse_teacher_config,
    tiny_sparse_config,
    voxelize,
)
from occdistill.nn.sparse_decoder import PointSampler, project_points

GRID = SparseGridConfig(range=(-1.6, -1.6, 0.0, 1.6, 1.6, 1.6), voxel_size=(0.2, 0.2, 0.2))  # 16 x 16 x 8


@pytest.fixture(autouse=True)
def _one_thread():
    """Many small ops: on the shared 2-core machine, threading costs more than it gains."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def micro(**overrides) -> SparseOccConfig:
    cfg = tiny_sparse_config(
        image_size=(48, 64), backbone=SparseBackboneConfig(depth=18, base_width=8),
        neck_channels=32, embed_dims=32, num_queries=16, points_per_layer=(1, 2, 4), sampling_points=2,
        mixing_out_points=4, num_heads=4, ffn_channels=64, grid=GRID, num_classes=5, free_index=0,
    )
    return dataclasses.replace(cfg, **overrides)


def cameras(batch: int = 2, cams: int = 2, height: int = 48, width: int = 64):
    """Camera n sits 2.5 m from the grid centre on the ego x axis, 0.8 m up, looking at the grid
    (n = 0 from -x, n = 1 from +x); OpenCV axes (z forward, x right, y down)."""
    torch.manual_seed(0)
    images = torch.rand(batch, cams, 3, height, width)
    k = torch.tensor([[40.0, 0, width / 2], [0, 40.0, height / 2], [0, 0, 1]]).expand(batch, cams, 3, 3).clone()
    aug = torch.eye(3).expand(batch, cams, 3, 3).clone()
    poses = []
    for n in range(cams):
        sign = 1.0 if n % 2 == 0 else -1.0
        fwd = torch.tensor([sign, 0.0, 0.0])
        right = torch.tensor([0.0, -sign, 0.0])
        down = torch.tensor([0.0, 0.0, -1.0])
        pose = torch.eye(4)
        pose[:3, :3] = torch.stack([right, down, fwd], dim=1)
        pose[:3, 3] = torch.tensor([-2.5 * sign, 0.0, 0.8])
        poses.append(pose)
    return images, k, aug, torch.stack(poses).expand(batch, cams, 4, 4).clone()


def test_output_shapes():
    cfg = micro()
    model = SparseOccStudent(cfg)
    out = model(*cameras())
    assert out.init_points.shape == (2, 16, 3)
    assert [tuple(layer.points.shape) for layer in out.layers] == [(2, 16, r, 3) for r in (1, 2, 4)]
    for layer in out.layers:
        assert layer.logits.shape == (*layer.points.shape[:3], 4)  # 5-class table without free
        assert layer.centres.shape == (2, 16, 3) and layer.features.shape == (2, 16, 32)
        torch.testing.assert_close(layer.centres, layer.points.mean(dim=2))
    assert [tuple(f.shape) for f in out.image_features] == [(2, 2, 32, -(-48 // s), 64 // s) for s in (4, 8, 16, 32)]
    assert out.extra == {}
    # Initial points lie in the grid (uniform in normalised coordinates).
    lo, hi = torch.tensor(GRID.range[:3]), torch.tensor(GRID.range[3:])
    assert bool(((out.init_points >= lo) & (out.init_points <= hi)).all())
    labels = model.voxelize(out)
    assert labels.shape == (2, 16, 16, 8) and labels.dtype == torch.int64
    assert int(labels.min()) >= 0 and int(labels.max()) < 5


def test_every_parameter_gets_a_gradient_with_depth_prior():
    model = SparseOccStudent(micro(depth_prior=True))
    images, k, aug, pose = cameras()
    prior = torch.rand(2, 2, 48, 64) * 4.0
    out = model(images, k, aug, pose, prior_depth=prior)
    loss = out.init_points.sum() + sum(layer.points.sum() + layer.logits.sum() for layer in out.layers)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    # Image features reach the queries: the backbone stem gets a non-zero gradient.
    assert float(model.backbone.conv1.weight.grad.abs().sum()) > 0
    assert float(model.decoder[0].depth_prior.mlp[0].weight.grad.abs().sum()) > 0


def test_points_do_not_carry_gradients_across_layers():
    model = SparseOccStudent(micro())
    out = model(*cameras())
    # Layer l's points depend on layer l-1's only through detached centres (OPUS); the initial
    # points learn from their own loss term only.
    grads = torch.autograd.grad(out.layers[-1].points.sum(), [out.layers[-2].points, out.init_points],
                                allow_unused=True)
    assert grads[0] is None and grads[1] is None
    assert out.init_points.requires_grad


def test_one_camera_is_finite():
    model = SparseOccStudent(micro(depth_prior=True))
    images, k, aug, pose = cameras(batch=1, cams=1)
    out = model(images, k, aug, pose, prior_depth=torch.rand(1, 1, 48, 64))
    loss = sum(layer.points.sum() + layer.logits.sum() + layer.features.sum() for layer in out.layers)
    loss.backward()
    assert all(torch.isfinite(t).all() for layer in out.layers for t in (layer.points, layer.logits, layer.features))
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_sampler_reads_the_pixel_a_point_projects_to_and_averages_seen_views():
    images, k, aug, pose = cameras(batch=1, cams=2)
    img_from_ego = SparseOccStudent.img_from_ego(k, aug, pose)  # (1, 2, 3, 4)
    # Points inside the grid, seen by both cameras, and one behind camera 1 (x > 2.5) seen by camera 0 only.
    pts = torch.tensor([[[0.3, 0.2, 0.5], [-0.4, -0.3, 1.1], [2.8, 0.1, 0.7]]])  # (1, 3, 3)
    uv, depth, inside = project_points(pts, img_from_ego, (48, 64))
    for n in range(2):
        cam = (torch.linalg.inv(pose[0, n]) @ torch.cat([pts[0], torch.ones(3, 1)], 1).T).T[:, :3]
        ref_uv, ref_depth = project(cam, k[0, n])
        seen = ref_depth > 0
        torch.testing.assert_close(uv[0, n][seen], ref_uv[seen])
        torch.testing.assert_close(depth[0, n], ref_depth)
    assert inside[0, 0].tolist() == [True, True, True] and inside[0, 1].tolist() == [True, True, False]

    sampler = PointSampler(embed_dims=8, feat_channels=4, num_groups=1, num_points=2, strides=(1,), image_size=(48, 64))
    # Feature map at stride 1: channel 0 = u (pixel-centre column), channel 1 = v, channel 2 = camera id.
    cols = torch.arange(64).float() + 0.5
    rows = torch.arange(48).float() + 0.5
    feat = torch.zeros(1, 2, 4, 48, 64)
    for n in range(2):
        feat[0, n, 0] = cols[None, :].expand(48, 64)
        feat[0, n, 1] = rows[:, None].expand(48, 64)
        feat[0, n, 2] = float(n)
    # Snap the points so that they project exactly to pixel centres in camera 0 (bilinear then returns the centre).
    snapped_uv = uv[0, 0].floor() + 0.5
    cam0 = torch.linalg.inv(pose[0, 0])
    rays = torch.cat([snapped_uv, torch.ones(3, 1)], 1) @ torch.linalg.inv(k[0, 0]).T * depth[0, 0, :, None]
    snapped = (pose[0, 0] @ torch.cat([rays, torch.ones(3, 1)], 1).T).T[:, :3]
    assert torch.allclose((cam0 @ torch.cat([snapped, torch.ones(3, 1)], 1).T).T[:, 2], depth[0, 0])
    out = sampler(snapped[None, :, None], torch.zeros(1, 3, 8), [feat], img_from_ego)  # (1, Q, G, P, C)
    assert out.shape == (1, 3, 1, 2, 4)
    seen_by_one = out[0, 2, 0, 0]
    torch.testing.assert_close(seen_by_one[:3], torch.tensor([snapped_uv[2, 0], snapped_uv[2, 1], 0.0]))
    # Seen by both: camera id averages to 0.5 (sum over seen views / count, count clamped to >= 1).
    torch.testing.assert_close(out[0, :2, 0, 0, 2], torch.tensor([0.5, 0.5]))


def test_extra_groups_are_decoded_separately():
    model = SparseOccStudent(micro()).eval()
    inputs = cameras()
    with torch.no_grad():
        plain = model(*inputs)
        groups = {"same": plain.init_points.clone(), "other": torch.rand(2, 5, 3)}
        with_extra = model(*inputs, extra_queries=ExtraQueries(groups))
    for a, b in zip(plain.layers, with_extra.layers):
        assert torch.equal(a.points, b.points) and torch.equal(a.features, b.features)
    # Decoding the model's own initial points as an extra group reproduces the main outputs.
    for a, b in zip(plain.layers, with_extra.extra["same"].layers):
        assert torch.equal(a.points, b.points) and torch.equal(a.logits, b.logits)
    assert with_extra.extra["other"].layers[-1].points.shape == (2, 5, 4, 3)
    assert set(with_extra.extra) == {"same", "other"}


def _output_from_points(points: torch.Tensor, channels: torch.Tensor, grid_cfg: SparseGridConfig, classes: OccClasses,
                        score: float = 10.0) -> SparseOutput:
    """A fake output with one query per point (R = 1), logit +score on ``channels``, -score elsewhere."""
    logits = torch.full((1, points.shape[0], 1, classes.num_channels), -score)
    logits[0, torch.arange(points.shape[0]), 0, channels] = score
    pts = points[None, :, None].float()
    layer = LayerOutput(points=pts, logits=logits, centres=pts.mean(2), features=torch.zeros(1, points.shape[0], 4))
    return SparseOutput(init_points=pts[:, :, 0], layers=[layer], image_features=[], extra={},
                        grid=grid_cfg.voxel_grid(), classes=classes)


@pytest.mark.parametrize("free_index", [0, 4])
def test_voxelize_round_trips_gt_points(free_index):
    grid = GRID.voxel_grid()
    classes = OccClasses(num_classes=5, free_index=free_index)
    gen = torch.Generator().manual_seed(1)
    gt = torch.full(grid.shape, free_index, dtype=torch.long)
    occupied = torch.rand(grid.shape, generator=gen) < 0.1
    gt[occupied] = torch.tensor(classes.occupied_labels)[torch.randint(0, 4, (int(occupied.sum()),), generator=gen)]
    idx = occupied.nonzero()
    labels = gt[idx[:, 0], idx[:, 1], idx[:, 2]]
    out = _output_from_points(grid.index_to_center(idx), classes.to_channels(labels), GRID, classes)
    assert torch.equal(voxelize(out, closing=False)[0], gt)


def test_voxelize_closing_keeps_boxes_and_fills_holes():
    grid = GRID.voxel_grid()
    classes = OccClasses(num_classes=5, free_index=0)
    gt = torch.zeros(grid.shape, dtype=torch.long)
    gt[2:6, 3:8, 0:3] = 1
    gt[9:14, 9:12, 2:7] = 3
    gt[6:9, 3:8, 0:2] = 2  # touches the first box
    idx = gt.nonzero()
    labels = gt[idx[:, 0], idx[:, 1], idx[:, 2]]
    out = _output_from_points(grid.index_to_center(idx), classes.to_channels(labels), GRID, classes)
    assert torch.equal(voxelize(out, closing=True)[0], gt)
    # Remove one interior voxel of a box: closing fills it with the box's class.
    hole = ~((idx == torch.tensor([11, 10, 4])).all(dim=1))
    out = _output_from_points(grid.index_to_center(idx[hole]), classes.to_channels(labels[hole]), GRID, classes)
    assert int(voxelize(out, closing=False)[0, 11, 10, 4]) == 0
    assert torch.equal(voxelize(out, closing=True)[0], gt)


def test_box_max_equals_max_pool():
    x = torch.randn(2, 3, 7, 5, 1)
    torch.testing.assert_close(box_max3d(x), torch.nn.functional.max_pool3d(x, 3, stride=1, padding=1), rtol=0, atol=0)
    x = torch.randn(1, 4, 6, 9, 4)
    assert torch.equal(box_max3d(x), torch.nn.functional.max_pool3d(x, 3, stride=1, padding=1))


def test_voxelize_filters_and_averages():
    grid = GRID.voxel_grid()
    classes = OccClasses(num_classes=5, free_index=0)
    centre = grid.index_to_center(torch.tensor([5, 5, 3])).float()
    # Query 0: two points in the same voxel, scores averaged: channel 1 wins (0.9 + 0.3 vs 0.2 + 0.8).
    # Query 1: a point outside the grid. Query 2: a weak point (all scores < 0.5).
    pts = torch.stack([centre, centre + 0.05, torch.tensor([9.0, 0.0, 0.5]), centre + 0.4])
    probs = torch.tensor([[0.9, 0.2, 0.0, 0.0], [0.3, 0.8, 0.0, 0.0], [0.9, 0.0, 0.0, 0.0], [0.4, 0.1, 0.0, 0.0]])
    logits = torch.logit(probs.clamp(1e-4, 1 - 1e-4))
    points = torch.stack([pts[:2], pts[2:3].expand(2, 3), pts[3:4].expand(2, 3)])[None]  # (1, 3, 2, 3)
    lg = torch.stack([logits[:2], logits[2:3].expand(2, 4), logits[3:4].expand(2, 4)])[None]
    layer = LayerOutput(points=points, logits=lg, centres=points.mean(2), features=torch.zeros(1, 3, 4))
    out = SparseOutput(points[:, :, 0], [layer], [], {}, grid, classes)
    labels = voxelize(out, closing=False)[0]
    assert int((labels != 0).sum()) == 1 and int(labels[5, 5, 3]) == 1  # channel 0 -> label 1
    # The centre-distance filter drops points far from their query's centre.
    far = points.clone()
    far[0, 0, 1] = centre + torch.tensor([1.0, 0.0, 0.0])
    layer = LayerOutput(points=far, logits=lg, centres=far.mean(2), features=torch.zeros(1, 3, 4))
    out = SparseOutput(far[:, :, 0], [layer], [], {}, grid, classes)
    assert int((voxelize(out, closing=False, centre_distance_threshold=0.3)[0] != 0).sum()) == 0


def test_config_and_input_checks():
    with pytest.raises(ValueError, match="neck_channels"):
        micro(neck_channels=30)
    with pytest.raises(ValueError, match="points_per_layer"):
        micro(points_per_layer=())
    with pytest.raises(ValueError, match="free_index"):
        micro(free_index=5)
    model = SparseOccStudent(micro(depth_prior=True))
    images, k, aug, pose = cameras(batch=1, cams=1)
    with pytest.raises(ValueError, match="prior_depth"):
        model(images, k, aug, pose)
    with pytest.raises(ValueError, match="expects"):
        model(torch.rand(1, 1, 3, 32, 64), k, aug, pose, prior_depth=torch.rand(1, 1, 32, 64))


def test_teacher_preset_is_larger_with_the_same_decoder():
    student = micro()
    teacher = sparse_teacher_config(student)
    assert teacher.backbone.depth == 34 and teacher.num_queries == 2 * student.num_queries
    s, t = SparseOccStudent(student), SparseOccStudent(teacher)
    assert sum(p.numel() for p in t.parameters()) > sum(p.numel() for p in s.parameters())
    assert {k: v.shape for k, v in s.decoder.state_dict().items()} == {k: v.shape for k, v in t.decoder.state_dict().items()}
    # The default config is the DiScene student on Occ-ScanNet.
    default = SparseOccConfig()
    assert default.num_queries == 960 and default.points_per_layer == (1, 2, 4, 8, 16, 16)
    assert default.grid.voxel_grid().shape == (60, 60, 36) and default.num_classes == 12


def test_config_loads_from_overrides_keeping_sparse_defaults():
    from occdistill.config import load_config

    cfg = load_config(SparseOccConfig, overrides=["backbone.depth=18", "grid.voxel_size=[0.16, 0.16, 0.16]",
                                                  "points_per_layer=[1, 4, 8]"])
    assert cfg.backbone.out_indices == (0, 1, 2, 3) and cfg.backbone.depth == 18
    assert cfg.grid.range == (-2.4, -2.4, 0.0, 2.4, 2.4, 2.88) and cfg.grid.voxel_grid().shape == (30, 30, 18)
    assert cfg.points_per_layer == (1, 4, 8) and cfg.num_layers == 3
