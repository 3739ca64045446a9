"""Dense student: shapes, every parameter gets a gradient, one-batch overfit, fixed-rig parity."""

from __future__ import annotations

import torch

from occdistill.losses.supervised import voxel_cross_entropy
from occdistill.models.dense import BackboneConfig, DenseStudent, DenseStudentConfig, GridConfig


def tiny_config() -> DenseStudentConfig:
    return DenseStudentConfig(
        image_size=(64, 96),
        backbone=BackboneConfig(depth=18, base_width=8),
        neck_channels=16,
        depth_bins=(1.0, 13.0, 1.0),
        context_channels=8,
        depth_net_channels=16,
        bev_channels=16,
        num_classes=5,
        grid=GridConfig(range=(-6.4, -6.4, -1.0, 6.4, 6.4, 2.2), voxel_size=(0.8, 0.8, 0.8)),
    )


def inputs(batch: int = 2, cams: int = 2):
    torch.manual_seed(0)
    images = torch.rand(batch, cams, 3, 64, 96)
    k = torch.tensor([[50.0, 0, 48], [0, 50.0, 32], [0, 0, 1]]).expand(batch, cams, 3, 3).clone()
    aug = torch.eye(3).expand(batch, cams, 3, 3).clone()
    # Camera n looks along ego +x rotated by n * 180 deg; OpenCV axes: z forward, x right, y down.
    poses = []
    for n in range(cams):
        yaw = torch.tensor(n * torch.pi)
        fwd = torch.stack([torch.cos(yaw), torch.sin(yaw), torch.tensor(0.0)])
        right = torch.stack([torch.sin(yaw), -torch.cos(yaw), torch.tensor(0.0)])
        down = torch.tensor([0.0, 0.0, -1.0])
        pose = torch.eye(4)
        pose[:3, :3] = torch.stack([right, down, fwd], dim=1)
        pose[:3, 3] = torch.tensor([0.0, 0.0, 1.5])
        poses.append(pose)
    ego_from_cam = torch.stack(poses).expand(batch, cams, 4, 4).clone()
    return images, k, aug, ego_from_cam


def test_output_shapes_and_dtypes():
    cfg = tiny_config()
    model = DenseStudent(cfg)
    out = model(*inputs())
    x, y, z = cfg.grid.voxel_grid().shape
    assert out.voxel_logits.shape == (2, x, y, z, 5) and out.voxel_logits.dtype == torch.float32
    assert out.bev_feature.shape == (2, 16, x, y)
    assert out.depth.shape == (2, 2, 12, 4, 6)
    torch.testing.assert_close(out.depth.sum(dim=2), torch.ones(2, 2, 4, 6))
    assert out.image_features.shape == (2, 2, 16, 4, 6)


def test_every_parameter_gets_a_gradient():
    model = DenseStudent(tiny_config())
    out = model(*inputs())
    labels = torch.randint(0, 5, out.voxel_logits.shape[:-1])
    (voxel_cross_entropy(out.voxel_logits, labels) + out.depth.mean()).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)]
    assert not missing, missing


def test_overfits_one_batch():
    torch.manual_seed(1)
    model = DenseStudent(tiny_config())
    args = inputs(batch=1)
    labels = torch.randint(0, 5, model(*args).voxel_logits.shape[:-1])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses, accs = [], []
    for _ in range(60):
        out = model(*args)
        loss = voxel_cross_entropy(out.voxel_logits, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        accs.append((out.voxel_logits.argmax(-1) == labels).float().mean().item())
    assert losses[-1] < 0.5 * losses[0], losses
    assert accs[-1] > accs[0] + 0.2, accs


def test_fixed_rig_matches_per_batch_geometry():
    model = DenseStudent(tiny_config()).eval()
    images, k, aug, pose = inputs(batch=1)
    with torch.no_grad():
        ref = model(images, k, aug, pose).voxel_logits
        model.set_fixed_rig(k[0], aug[0], pose[0])
        fixed = model(images, k, aug, pose).voxel_logits
    torch.testing.assert_close(fixed, ref, atol=1e-4, rtol=1e-4)
