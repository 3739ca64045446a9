"""The blocks composed as the dense student: gradients reach every parameter; a tiny batch overfits."""

from __future__ import annotations

import math

import torch
from torch import nn

from occdistill.geometry import VoxelGrid
from occdistill.losses import depth_bce_loss, voxel_cross_entropy
from occdistill.nn import BEVEncoder, BEVOccHead, DepthBins, FPNNeck, LSSViewTransformer, ResNet, bev_cell_index

IMAGE = (32, 64)
GRID = VoxelGrid(range=(-8.0, -8.0, -1.0, 8.0, 8.0, 3.0), voxel_size=(1.0, 1.0, 1.0))  # 16 x 16 x 4
BINS = DepthBins(1.0, 9.0, 1.0)
NUM_CLASSES = 3


class TinyStudent(nn.Module):
    """backbone -> neck -> view transform -> BEV encoder -> head, at toy sizes."""

    def __init__(self):
        super().__init__()
        self.backbone = ResNet(18, out_indices=(2, 3), base_width=8)
        self.neck = FPNNeck(self.backbone.out_channels, 16)
        self.view = LSSViewTransformer(16, 8, IMAGE, 16, BINS, GRID, mid_channels=16)
        self.encoder = BEVEncoder(8, 16)
        self.head = BEVOccHead(16, GRID.shape[2], NUM_CLASSES)

    def forward(self, images, intrinsics, img_from_raw, ego_from_cam):
        batch, cams = images.shape[:2]
        feat = self.neck(self.backbone(images.flatten(0, 1)))  # (B*N, C, h, w)
        view = self.view(feat.view(batch, cams, *feat.shape[1:]), intrinsics, img_from_raw, ego_from_cam)
        return self.head(self.encoder(view.bev)), view.depth


def rig(batch: int):
    """Two cameras 1 m above the ego origin looking along +x and -x."""
    k = torch.tensor([[40.0, 0.0, 32.0], [0.0, 40.0, 16.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    to_ego = torch.tensor([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]], dtype=torch.float64)
    poses = torch.eye(4, dtype=torch.float64).repeat(2, 1, 1)
    poses[0, :3, :3] = to_ego
    poses[1, :3, :3] = torch.diag(torch.tensor([-1.0, -1.0, 1.0], dtype=torch.float64)) @ to_ego
    poses[:, 2, 3] = 1.0
    expand = lambda t: t.expand(batch, 2, *t.shape[-2:]).clone()  # noqa: E731
    return expand(k), expand(torch.eye(3, dtype=torch.float64)), expand(poses)


def batch_data(batch: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 2, 3, *IMAGE, generator=gen)
    labels = torch.randint(0, NUM_CLASSES, (batch, *GRID.shape), generator=gen)
    depth = torch.rand(batch, 2, *IMAGE, generator=gen) * 10  # some beyond 9 m: invalid
    return images, labels, depth


def test_every_parameter_gets_a_gradient():
    torch.manual_seed(0)
    model = TinyStudent().train()
    images, labels, depth = batch_data(2)
    logits, depth_prob = model(images, *rig(2))
    assert logits.shape == (2, 16, 16, 4, NUM_CLASSES) and logits.dtype == torch.float32
    assert depth_prob.shape == (2, 2, BINS.num_bins, 2, 4)
    loss = voxel_cross_entropy(logits, labels) + depth_bce_loss(depth_prob, depth, BINS)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert not missing, f"parameters without gradient: {missing}"


def test_tiny_batch_overfits():
    torch.manual_seed(0)
    model = TinyStudent().train()
    images, labels, depth = batch_data(1)
    cams = rig(1)
    # Count only BEV columns the cameras see (as Occ3D's camera mask): elsewhere the BEV input is 0.
    cell, kept = bev_cell_index(model.view.ego_points(*cams), GRID)  # (1, N, D, h, w)
    seen = torch.zeros(GRID.shape[0] * GRID.shape[1], dtype=torch.bool)
    seen[cell[kept]] = True
    mask = seen.view(1, GRID.shape[0], GRID.shape[1], 1).expand_as(labels)  # (B, X, Y, Z)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(40):
        logits, depth_prob = model(images, *cams)
        ce = voxel_cross_entropy(logits, labels, mask)
        loss = ce + 0.05 * depth_bce_loss(depth_prob, depth, BINS)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(ce.item())
    assert math.isclose(losses[0], math.log(NUM_CLASSES), rel_tol=0.2)
    assert losses[-1] < 0.5 * losses[0], losses  # typically ~0.3x after 40 steps
