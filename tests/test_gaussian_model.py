"""Gaussian teacher: output contract, gradients, the init target, and a one-batch overfit on a tiny
synthetic street."""

from __future__ import annotations

import math

import pytest
import torch

from occdistill.geometry.grid import VoxelGrid
from occdistill.losses.gaussian import (
    GaussianLossConfig,
    gaussian_teacher_loss,
    init_depth_loss,
    init_depth_target,
)
from occdistill.losses.lovasz import lovasz_softmax
from occdistill.models.gaussian import (
    GaussianTeacher,
    GaussianTeacherConfig,
    TeacherBackboneConfig,
    TeacherGridConfig,
    img_from_ego_matrices,
    knn_indices,
    ray_geometry,
)
from occdistill.nn.depth_bins import DepthBins
from occdistill.nn.sparse_decoder import project_points

GRID = TeacherGridConfig(range=(-6.4, -6.4, -1.0, 6.4, 6.4, 2.2), voxel_size=(0.8, 0.8, 0.8))


def tiny_config(**overrides) -> GaussianTeacherConfig:
    base = dict(
        image_size=(32, 64),
        backbone=TeacherBackboneConfig(base_width=8),
        neck_channels=16,
        embed_dims=16,
        depth_bins=(1.0, 9.0, 0.5),
        depth_net_channels=16,
        init_gaussians=96,
        learned_gaussians=32,
        num_blocks=2,
        num_heads=2,
        knn=8,
        num_classes=5,
        grid=GRID,
    )
    base.update(overrides)
    return GaussianTeacherConfig(**base)


def camera_pose(yaw: float, height: float = 1.5) -> torch.Tensor:
    """ego_from_cam of a camera looking along ego (cos yaw, sin yaw, 0); OpenCV axes."""
    fwd = torch.tensor([math.cos(yaw), math.sin(yaw), 0.0])
    right = torch.tensor([math.sin(yaw), -math.cos(yaw), 0.0])
    down = torch.tensor([0.0, 0.0, -1.0])
    pose = torch.eye(4)
    pose[:3, :3] = torch.stack([right, down, fwd], dim=1)
    pose[2, 3] = height
    return pose


def inputs(batch: int = 2, cams: int = 2, size=(32, 64), seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, cams, 3, *size, generator=gen)
    h, w = size
    k = torch.tensor([[w * 0.6, 0, w / 2], [0, w * 0.6, h / 2], [0, 0, 1]]).expand(batch, cams, 3, 3).clone()
    aug = torch.eye(3).expand(batch, cams, 3, 3).clone()
    poses = torch.stack([camera_pose(2 * math.pi * n / cams) for n in range(cams)])
    return images, k, aug, poses.expand(batch, cams, 4, 4).clone()


def test_output_contract():
    cfg = tiny_config()
    torch.manual_seed(0)
    model = GaussianTeacher(cfg).eval()
    with torch.no_grad():
        out = model(*inputs())
    x, y, z = cfg.grid.voxel_grid().shape
    assert out.voxel_probs.shape == (2, x, y, z, 5) and out.voxel_logits.shape == (2, x, y, z, 5)
    p = out.voxel_probs
    assert bool(((p >= 0) & (p <= 1)).all())
    torch.testing.assert_close(p.sum(-1), torch.ones(2, x, y, z), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.voxel_logits.softmax(-1), p, atol=1e-5, rtol=0)
    assert out.bev_feature.shape == (2, 5, x, y)
    torch.testing.assert_close(out.bev_feature.sum(1), torch.ones(2, x, y), atol=1e-5, rtol=0)
    assert out.init_depth.shape == (2, 2, 17, 4, 8)  # 16 bins + "none", stride-8 rays of 32x64
    torch.testing.assert_close(out.init_depth.sum(2), torch.ones(2, 2, 4, 8))
    assert out.init_rays.directions.shape == (2, 2, 4, 8, 3) and out.init_rays.origins.shape == (2, 2, 3)
    assert len(out.gaussians) == cfg.num_blocks + 1 and out.features.shape == (2, 128, 16)
    grid = cfg.grid.voxel_grid()
    for g in out.gaussians:
        assert g.means.shape == (2, 128, 3) and g.semantic_logits.shape == (2, 128, 4)
        assert bool(((g.means >= torch.tensor(grid.lower, dtype=torch.float32))
                     & (g.means <= torch.tensor(grid.upper, dtype=torch.float32))).all())
        torch.testing.assert_close(g.rotations.norm(dim=-1), torch.ones(2, 128))
        assert bool(((g.opacities > 0) & (g.opacities < 1)).all())
    last = out.gaussians[-1]
    assert bool(((last.scales >= cfg.scale_range[0]) & (last.scales <= cfg.scale_range[1])).all())
    assert out.free_index == 4 and out.splat_pairs > 0
    # evaluation is deterministic
    with torch.no_grad():
        again = model(*inputs())
    assert torch.equal(again.voxel_probs, out.voxel_probs)


def test_config_sections_keep_the_teacher_defaults(tmp_path):
    from occdistill.config import dump_config, load_config

    cfg = load_config(GaussianTeacherConfig, overrides=["backbone.base_width=16", "grid.voxel_size=[0.8, 0.8, 0.8]"])
    assert (cfg.backbone.depth, cfg.backbone.out_indices, cfg.backbone.base_width) == (18, (1, 2, 3), 16)
    assert cfg.grid.range == (-20.0, -20.0, -1.0, 20.0, 20.0, 5.4) and cfg.grid.voxel_grid().shape == (50, 50, 8)
    assert cfg.feature_stride == 8
    large = GaussianTeacherConfig.large()
    assert large.grid.voxel_grid().shape == (200, 200, 16) and large.init_gaussians + large.learned_gaussians == 12800
    (tmp_path / "large.yaml").write_text(dump_config(large))
    assert load_config(GaussianTeacherConfig, tmp_path / "large.yaml") == large


def test_batch_elements_are_independent_and_one_camera_works():
    model = GaussianTeacher(tiny_config()).eval()
    images, k, aug, pose = inputs(batch=2, cams=1)
    with torch.no_grad():
        both = model(images, k, aug, pose)
        second = model(images[1:], k[1:], aug[1:], pose[1:])
    assert torch.isfinite(both.voxel_logits).all()
    torch.testing.assert_close(both.voxel_probs[1:], second.voxel_probs, atol=1e-5, rtol=1e-4)


def test_free_first_table_order():
    cfg = tiny_config(free_index=0)
    torch.manual_seed(0)
    ref_model = GaussianTeacher(tiny_config()).eval()
    model = GaussianTeacher(cfg).eval()
    model.load_state_dict(ref_model.state_dict())
    with torch.no_grad():
        ref, out = ref_model(*inputs()), model(*inputs())
    torch.testing.assert_close(out.voxel_probs[..., 0], ref.voxel_probs[..., -1])
    torch.testing.assert_close(out.voxel_probs[..., 1:], ref.voxel_probs[..., :-1])
    torch.testing.assert_close(out.bev_feature[:, 0], ref.bev_feature[:, -1])
    assert out.free_index == 0


def fake_batch(labels, mask=None):
    """The two Batch fields the loss reads."""
    from types import SimpleNamespace

    return SimpleNamespace(semantics=labels, mask_camera=mask)


def test_every_parameter_gets_a_gradient():
    torch.manual_seed(0)
    model = GaussianTeacher(tiny_config())
    out = model(*inputs())
    gen = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 5, out.voxel_probs.shape[:-1], generator=gen)
    labels[:, :, :, 2:] = 4  # free above the ground layers, so that rays have a first hit
    loss_cfg = GaussianLossConfig(camera_mask=False, lovasz_weight=0.0)
    terms = gaussian_teacher_loss(out, fake_batch(labels), loss_cfg)
    assert set(terms) == {"ce", "init_depth", "total"}
    terms["total"].backward()
    missing = [n for n, p in model.named_parameters()
               if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)]
    assert not missing, missing


def test_init_depth_target_on_a_wall():
    grid = VoxelGrid((-4.0, -4.0, -1.0, 12.0, 4.0, 3.0), (0.4, 0.4, 0.4))  # 40 x 20 x 10
    free, unknown = 4, 255
    sem = torch.full((1, *grid.shape), free, dtype=torch.long)
    sem[0, 25, :, :] = 1  # wall: x in [6.0, 6.4)
    sem[0, :, :, 0] = 2  # ground layer z in [-1, -0.6)
    bins = DepthBins(1.0, 11.0, 0.5)
    # one camera 1 m up looking along +x; 2x2 rays at stride 8 through pixels u, v in {4, 12}: with
    # cx = 8, cy = 4 the top row is level, the bottom row descends 0.8 m per metre of depth
    pose = camera_pose(0.0, height=1.0)[None, None]
    k = torch.tensor([[10.0, 0, 8], [0, 10.0, 4], [0, 0, 1]])[None, None]
    origins, dirs = ray_geometry(k, torch.eye(3)[None, None], pose, (2, 2), 8)
    target, valid = init_depth_target(origins, dirs, sem, grid, bins, free, unknown)
    assert target.shape == (1, 1, 2, 2) and bool(valid.all())
    # level rays reach the wall at z-depth 6.0 (bin 10); the lower rays hit the ground top (z = -0.6) at 2.0 (bin 2)
    assert target[0, 0, 0].tolist() == [10, 10] == [int(bins.index(torch.tensor(6.0))[0])] * 2
    assert target[0, 0, 1].tolist() == [2, 2]
    # no wall, no ground: nothing within range -> the extra bin D
    sem_empty = torch.full_like(sem, free)
    target, valid = init_depth_target(origins, dirs, sem_empty, grid, bins, free, unknown)
    assert bool((target == bins.num_bins).all()) and bool(valid.all())
    # unknown voxels in front of the wall make the straight-ahead ray invalid; behind it they do not matter
    sem_unknown = sem.clone()
    sem_unknown[0, 20, :, 1:] = unknown  # x in [4.0, 4.4), above the ground layer
    _, valid = init_depth_target(origins, dirs, sem_unknown, grid, bins, free, unknown)
    assert valid[0, 0].tolist() == [[False, False], [True, True]]  # lower rays hit the ground first
    # loss: confident logits on the right bin give ~0, the uniform distribution log(D + 1)
    target, valid = init_depth_target(origins, dirs, sem, grid, bins, free, unknown)
    uniform = torch.zeros(1, 1, bins.num_bins + 1, 2, 2)
    assert init_depth_loss(uniform, target, valid).item() == pytest.approx(math.log(bins.num_bins + 1))
    sharp = torch.nn.functional.one_hot(target, bins.num_bins + 1).permute(0, 1, 4, 2, 3).float() * 50
    assert init_depth_loss(sharp, target, valid).item() < 1e-6


def test_lift_spreads_and_respects_the_grid():
    cfg = tiny_config(init_min_spacing=1.6)
    model = GaussianTeacher(cfg).eval()
    with torch.no_grad():
        feats = model.image_features(inputs()[0])
        logits, _, rays = model.lifter(feats[0], *inputs()[1:])
        means, ray_index = model.lifter.select(logits.softmax(2), rays)
    assert means.shape == (2, 96, 3) and ray_index.max() < 2 * 4 * 8
    # candidates are thinned: no two initial means share a 1.6 m cell unless the cells ran out
    cells = torch.floor((means - torch.tensor(cfg.grid.range[:3])) / 1.6).long()
    for b in range(2):
        distinct = torch.unique(cells[b], dim=0).shape[0]
        assert distinct == min(96, distinct) and distinct >= 40


def test_knn_is_exact():
    pts = torch.randn(2, 300, 3)
    idx = knn_indices(pts, 5, chunk=64)
    ref = torch.cdist(pts, pts).topk(5, largest=False).indices
    assert torch.equal(torch.sort(idx, -1).values, torch.sort(ref, -1).values)


def test_lovasz_softmax_perfect_and_wrong():
    labels = torch.tensor([0, 1, 1, 2])
    perfect = torch.nn.functional.one_hot(labels, 3).float()
    assert lovasz_softmax(perfect, labels).item() == 0.0
    wrong = torch.nn.functional.one_hot((labels + 1) % 3, 3).float()
    assert lovasz_softmax(wrong, labels).item() == pytest.approx(1.0)


def test_overfits_one_synthetic_batch(tmp_path):
    from occdistill.data.augment import ImageAugConfig
    from occdistill.data.occ3d import Occ3DDataset
    from occdistill.data.sample import collate
    from occdistill.data.synth import generate

    small = ["rig.width=64", "rig.height=36", "lidar.azimuths=256", "grid.range=[-8,-8,-1,8,8,5.4]"]
    world = generate("street", tmp_path / "street", scenes=1, frames=1, seed=0, overrides=small, progress=False)
    ds = Occ3DDataset(world.out, world.splits["train"], image_aug=ImageAugConfig(final_size=(32, 64)))
    batch = collate([ds[0]])
    cfg = tiny_config(num_classes=18, depth_bins=(1.0, 13.0, 0.5), init_gaussians=256, learned_gaussians=64,
                      grid=TeacherGridConfig(range=ds.grid.range, voxel_size=ds.grid.voxel_size))
    torch.manual_seed(0)
    model = GaussianTeacher(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    loss_cfg = GaussianLossConfig()
    history = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # thousands of small ops: on a loaded 2-core box threading costs 5x here
    try:
        for _ in range(25):
            out = model(batch.images, batch.intrinsics, batch.img_from_raw, batch.ego_from_cam)
            terms = gaussian_teacher_loss(out, batch, loss_cfg)
            opt.zero_grad()
            terms["total"].backward()
            opt.step()
            history.append({k: v.item() for k, v in terms.items()})
    finally:
        torch.set_num_threads(threads)
    assert history[-1]["ce"] < 0.5 * history[0]["ce"], history
    assert history[-1]["init_depth"] < 0.5 * history[0]["init_depth"], history
    assert history[-1]["lovasz"] < history[0]["lovasz"], history


def dense_cross_attention_reference(attn, query, g, features, img_from_ego):
    """Every point sampled in every camera, invalid ones masked out of a per-point camera mean."""
    batch, num = query.shape[:2]
    pts, levels, groups = attn.num_points, attn.num_levels, attn.num_groups
    points = attn.key_points(query, g)
    uv, _, inside = project_points(points.flatten(1, 2), img_from_ego, attn.image_size)
    cams = uv.shape[1]
    height, width = attn.image_size
    grid = (uv * uv.new_tensor([2.0 / width, 2.0 / height]) - 1.0).reshape(batch * cams, 1, num * pts, 2)
    vis = inside.float().view(batch, cams, 1, num, pts)
    count = vis.sum(dim=1)
    seen = (count > 0).squeeze(1)
    logits = attn.weights(query).view(batch, num, pts, levels, groups).masked_fill(~seen[..., None, None], -1e4)
    weights = logits.flatten(2, 3).softmax(dim=2).view(batch, num, pts, levels, groups) * seen[..., None, None]
    out = 0
    for level, feat in enumerate(features):
        channels, h, w = feat.shape[2:]
        sampled = torch.nn.functional.grid_sample(feat.reshape(batch * cams, channels, h, w), grid, align_corners=False)
        fused = (sampled.view(batch, cams, channels, num, pts) * vis).sum(1) / count.clamp(min=1.0)  # (B, C, G, P)
        fused = fused.view(batch, groups, channels // groups, num, pts)
        out = out + (fused * weights[..., level, :].permute(0, 3, 1, 2)[:, :, None]).sum(-1)
    return attn.output(out.flatten(1, 2).transpose(1, 2))


def test_packed_cross_attention_matches_the_dense_reference():
    torch.manual_seed(3)
    model = GaussianTeacher(tiny_config()).eval()
    block = model.blocks[0]
    torch.nn.init.normal_(block.cross.weights.weight, std=0.5)  # non-uniform weights over points and levels
    images, k, aug, pose = inputs(batch=2, cams=3)
    with torch.no_grad():
        feats = model.image_features(images)
        means = torch.rand(2, 40, 3) * torch.tensor([12.8, 12.8, 3.2]) - torch.tensor([6.4, 6.4, 1.0])
        g, _ = model.initial_gaussians(means, torch.zeros(2, 40, 16))  # + 32 learned anchors
        x = torch.randn(2, 72, 16)
        mats = img_from_ego_matrices(k, aug, pose)
        got = block.cross(x, g, feats, mats)
        ref = dense_cross_attention_reference(block.cross, x, g, feats, mats)
        seen = project_points(block.cross.key_points(x, g).flatten(1, 2), mats, (32, 64))[2].any(1)
    assert 0.1 < seen.float().mean() < 0.9  # some key points are seen, some are not
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
