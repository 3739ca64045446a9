"""The Gaussian teacher (GaussianFormer-2 style), pure PyTorch, no custom ops.

images (B, N, 3, H, W) in [0, 1] -> ResNet -> multi-level FPN (strides 8/16/32 by default)
-> distribution-based initialisation: per stride-8 ray a softmax over D depth bins + 1 "nothing
   within range" bin; the most probable (ray, bin) points, thinned to one per ``init_min_spacing``
   cell, become the initial Gaussian means, the ray's context feature their initial feature;
   plus ``learned_gaussians`` learnable anchors (GaussianFormer-2's random anchors)
-> ``num_blocks`` refinement blocks, each:
     x = norm(x + image cross-attention)   key points around each Gaussian (7 fixed at the mean
                                           and +-1 sigma along its axes, + learned offsets up to
                                           +-3 sigma), projected into every camera and level,
                                           F.grid_sample, averaged over the cameras that see the
                                           point, weighted per group by a softmax over points x levels
     x = norm(x + self-encoding)           k-NN attention over neighbouring Gaussians with a
                                           relative-position term (replaces the sparse 3D conv)
     x = norm(x + FFN)
     Gaussians <- refine(x): mean += bounded delta (kept in the grid); scale (sigmoid-bounded),
                             rotation (normalised quaternion), opacity (sigmoid) and semantics
                             (K-1 logits) predicted absolutely (GaussianFormer-2 V2 refinement)
-> probabilistic superposition splat of the last block's Gaussians (occdistill.nn.gaussian_splat)
-> voxel probabilities (B, X, Y, Z, K).

Outputs are probabilities, not logits: ``voxel_logits`` holds log-probabilities computed in log
space, so ``softmax(voxel_logits) = voxel_probs`` and any cross-entropy on logits is the NLL of
the probabilities (what GaussianFormer-2 trains with). ``bev_feature`` is the top-down
compositing of the voxel probabilities (DESIGN.md section 6), (B, K, X, Y) — the teacher's BEV
probability target, not a learned feature map.

Letters: B batch, N cameras, C channels, D depth bins, H W image, h w feature map, G Gaussians,
P key points, L feature levels, K classes, X Y Z voxels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from occdistill.geometry.camera import img_from_ego_matrices
from occdistill.geometry.grid import VoxelGrid
from occdistill.models.dense import BackboneConfig, GridConfig
from occdistill.nn import DepthBins, ResNet
from occdistill.nn.gaussian_splat import (
    bev_collapse,
    free_last_to_table,
    quaternion_to_matrix,
    splat_gaussians,
)
from occdistill.nn.sparse_decoder import MultiLevelFPN, project_points
from occdistill.nn.view_transform import DepthNet, camera_parameters

_MEAN = (0.485, 0.456, 0.406)
_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class TeacherBackboneConfig(BackboneConfig):
    """The dense student's backbone section with the teacher's defaults (a subclass, not a
    default_factory, so that a partial YAML section keeps them): ResNet-18 at half width, stages
    2-4 (strides 8/16/32)."""

    depth: int = 18
    base_width: int = 32
    out_indices: tuple[int, ...] = (1, 2, 3)


@dataclass(frozen=True)
class TeacherGridConfig(GridConfig):
    """The synthetic street's grid: 100x100x16 at 0.4 m (Occ3D voxel size and heights, 40 m x 40 m)."""

    range: tuple[float, float, float, float, float, float] = (-20.0, -20.0, -1.0, 20.0, 20.0, 5.4)


@dataclass(frozen=True)
class GaussianTeacherConfig:
    """Defaults: a CPU-sized teacher for the synthetic street world (100x100x16 at 0.4 m, six
    176x320 cameras); :meth:`large` is the GPU-sized variant for Occ3D-nuScenes."""

    image_size: tuple[int, int] = (176, 320)  # (H, W) network input
    backbone: TeacherBackboneConfig = field(default_factory=TeacherBackboneConfig)
    neck_channels: int = 64  # every FPN level; the finest level's stride is the ray stride
    embed_dims: int = 64  # Gaussian feature width
    depth_bins: tuple[float, float, float] = (1.0, 29.0, 0.5)  # init distribution (min, max, step) m, + 1 "none" bin
    depth_net_channels: int = 64
    init_gaussians: int = 2048  # placed from the depth distribution
    learned_gaussians: int = 512  # learnable anchors
    init_min_spacing: float = 0.8  # m; at most one initial Gaussian per cell of this size
    num_blocks: int = 3
    num_groups: int = 4  # cross-attention weight groups (channels split evenly)
    learned_points: int = 4  # learned key points per Gaussian, besides the 7 fixed ones
    knn: int = 16  # neighbours of the self-encoding
    num_heads: int = 4
    ffn_ratio: int = 2
    scale_range: tuple[float, float] = (0.08, 0.64)  # m, Gaussian standard deviations
    max_step: tuple[float, float, float] = (1.6, 1.6, 0.8)  # m, largest mean update per block
    cutoff: float = 3.0  # splat radius in units of the largest scale
    splat_chunk: int = 1 << 18  # (Gaussian, voxel) pairs per splat chunk
    splat_checkpoint: bool = False  # recompute splat chunks in backward (bounded memory)
    opacity_in_geometry: bool = True  # False: GaussianFormer-2's released geometry (see gaussian_splat)
    density_normalised: bool = False  # True: GaussianFormer-2's released mixture weights
    num_classes: int = 18
    free_index: int = -1  # the table's free class (Occ3D 17 = -1; Occ-ScanNet 0)
    grid: TeacherGridConfig = field(default_factory=TeacherGridConfig)

    def __post_init__(self) -> None:
        if self.embed_dims % self.num_heads or self.neck_channels % self.num_groups:
            raise ValueError("embed_dims must divide by num_heads and neck_channels by num_groups")
        if self.init_gaussians < 1 or self.learned_gaussians < 0 or self.num_blocks < 1:
            raise ValueError("need init_gaussians >= 1, learned_gaussians >= 0, num_blocks >= 1")
        if not 0 < self.scale_range[0] < self.scale_range[1]:
            raise ValueError(f"scale_range {self.scale_range} must satisfy 0 < min < max")
        if not -self.num_classes <= self.free_index < self.num_classes:
            raise ValueError(f"free_index {self.free_index} is not a class of {self.num_classes}")
        if self.knn < 1 or self.cutoff <= 0:
            raise ValueError("knn must be >= 1 and cutoff > 0")

    @property
    def feature_stride(self) -> int:
        return 4 * 2 ** min(self.backbone.out_indices)

    @classmethod
    def large(cls, **overrides) -> "GaussianTeacherConfig":
        """GPU-sized variant for Occ3D-nuScenes (200x200x16, 704x256 inputs): ResNet-50 + 3-level
        FPN at 128 channels, 88 depth bins, 9600 + 3200 = 12,800 Gaussians (GaussianFormer-2's
        Prob-128 budget), 4 blocks, checkpointed splat. Untested on CPU beyond construction."""
        base = dict(
            image_size=(256, 704),
            backbone=TeacherBackboneConfig(depth=50, base_width=64),
            neck_channels=128,
            embed_dims=128,
            depth_bins=(1.0, 45.0, 0.5),
            depth_net_channels=128,
            init_gaussians=9600,
            learned_gaussians=3200,
            init_min_spacing=0.6,
            num_blocks=4,
            num_groups=4,
            learned_points=6,
            num_heads=8,
            scale_range=(0.08, 1.0),
            splat_checkpoint=True,
            grid=TeacherGridConfig(range=(-40.0, -40.0, -1.0, 40.0, 40.0, 5.4)),
        )
        base.update(overrides)
        return cls(**base)


@dataclass
class Gaussians:
    """means (B, G, 3) m in the ego frame; scales (B, G, 3) m; rotations (B, G, 4) unit quaternions
    (w, x, y, z), covariance ``R diag(s^2) R^T``; opacities (B, G); semantic_logits (B, G, K-1) over
    the non-free classes in table order with free removed."""

    means: torch.Tensor
    scales: torch.Tensor
    rotations: torch.Tensor
    opacities: torch.Tensor
    semantic_logits: torch.Tensor

    @property
    def semantics(self) -> torch.Tensor:
        return self.semantic_logits.softmax(dim=-1)


@dataclass
class InitRays:
    """The rays of the distribution-based initialisation, with what its target needs.

    origins (B, N, 3) camera centres in the ego frame; directions (B, N, h, w, 3): the ego point at
    z-depth d of ray (i, j) is ``origin + d * direction``; bins: the D depth bins (the
    distribution has D + 1 entries, the last = nothing occupied within range)."""

    origins: torch.Tensor
    directions: torch.Tensor
    bins: DepthBins


@dataclass
class GaussianOutput:
    """voxel_probs (B, X, Y, Z, K) in the table's class order (free last for Occ3D), sums to 1;
    voxel_logits (B, X, Y, Z, K) = log(voxel_probs) computed in log space (floored at -70), for a
    cross-entropy on logits; bev_feature (B, K, X, Y) top-down composited BEV probabilities;
    init_depth (B, N, D+1, h, w) softmax of init_depth_logits; init_rays: geometry for the init
    target; gaussians: the initial Gaussians then those after each block (num_blocks + 1 entries,
    the last is splatted); features (B, G, C) of the last block; grid and free_index of the output;
    splat_pairs: (Gaussian, voxel) pairs evaluated."""

    voxel_probs: torch.Tensor
    voxel_logits: torch.Tensor
    bev_feature: torch.Tensor
    init_depth: torch.Tensor
    init_depth_logits: torch.Tensor
    init_rays: InitRays
    gaussians: list[Gaussians]
    features: torch.Tensor
    grid: VoxelGrid
    free_index: int
    splat_pairs: int


def _grid_bounds(grid: VoxelGrid, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.as_tensor(grid.lower, dtype=like.dtype, device=like.device),
            torch.as_tensor(grid.upper, dtype=like.dtype, device=like.device))


def ray_geometry(
    intrinsics: torch.Tensor, img_from_raw: torch.Tensor, ego_from_cam: torch.Tensor,
    feature_size: tuple[int, int], stride: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rays through the feature-cell centres (pixel ((j + 0.5) s, (i + 0.5) s), the project's pixel
    convention) -> origins (B, N, 3) and z-depth directions (B, N, h, w, 3) in the ego frame."""
    h, w = feature_size
    k_aug = img_from_raw.double() @ intrinsics.double()
    ego_from_pix = ego_from_cam[..., :3, :3].double() @ torch.linalg.inv(k_aug)  # (B, N, 3, 3)
    dev = intrinsics.device
    u = (torch.arange(w, dtype=torch.float64, device=dev) + 0.5) * stride
    v = (torch.arange(h, dtype=torch.float64, device=dev) + 0.5) * stride
    pix = torch.stack([u.expand(h, w), v[:, None].expand(h, w), torch.ones(h, w, dtype=torch.float64, device=dev)], -1)
    dirs = torch.einsum("bnij,hwj->bnhwi", ego_from_pix, pix)
    return ego_from_cam[..., :3, 3].float(), dirs.float()


class GaussianEmbedding(nn.Module):
    """Gaussian parameters -> (B, G, C): sinusoidal encoding of the grid-normalised mean (4
    octaves), log scale, rotation, opacity and semantic probabilities through a 2-layer MLP
    (GaussianFormer-2's anchor encoder, one MLP instead of one per attribute)."""

    def __init__(self, embed_dims: int, num_sem: int, grid: VoxelGrid, octaves: int = 4):
        super().__init__()
        self.grid = grid
        self.register_buffer("freqs", (2.0 ** torch.arange(octaves)) * math.pi, persistent=False)
        in_dims = 3 + 6 * octaves + 3 + 4 + 1 + num_sem
        self.mlp = nn.Sequential(
            nn.Linear(in_dims, embed_dims), nn.ReLU(inplace=True), nn.LayerNorm(embed_dims),
            nn.Linear(embed_dims, embed_dims), nn.ReLU(inplace=True), nn.LayerNorm(embed_dims),
        )

    def forward(self, g: Gaussians) -> torch.Tensor:
        lo, hi = _grid_bounds(self.grid, g.means)
        pos = (g.means - lo) / (hi - lo)  # (B, G, 3) in [0, 1]
        angles = (pos[..., None] * self.freqs).flatten(-2)  # (B, G, 3 * octaves)
        x = torch.cat([pos, angles.sin(), angles.cos(), g.scales.log(), g.rotations, g.opacities[..., None],
                       g.semantics], dim=-1)
        return self.mlp(x)


class ImageCrossAttention(nn.Module):
    """Deformable multi-camera, multi-level sampling around each Gaussian (GaussianFormer-2's
    DeformableFeatureAggregation with F.grid_sample).

    Key points (P = 7 + learned): the mean, the mean +-1 sigma along each principal axis, and learned
    offsets ``(sigmoid(linear(q)) - 0.5) * 6`` sigma, all rotated by the Gaussian's rotation. Each is
    projected into every camera; a point behind a camera or outside its image is invalid there.
    A point's feature at one level is the mean over the cameras where it is valid (the count is
    clamped to 1: a single camera, or none, never divides by zero; an unseen point reads 0 and
    gets weight 0). Per group of channels, weights are a softmax over points x levels.

    Forward: query (B, G, C), Gaussians, features: L tensors (B, N, C_f, h_l, w_l), img_from_ego
    (B, N, 3, 4) -> (B, G, C).
    """

    _FIXED = ((0, 0, 0), (1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0), (0, 0, 1), (0, 0, -1))

    def __init__(self, embed_dims: int, feat_channels: int, num_levels: int, num_groups: int,
                 learned_points: int, image_size: tuple[int, int]):
        super().__init__()
        self.num_levels, self.num_groups, self.learned_points = num_levels, num_groups, learned_points
        self.num_points = len(self._FIXED) + learned_points
        self.image_size = tuple(image_size)
        self.register_buffer("fixed", torch.tensor(self._FIXED, dtype=torch.float32), persistent=False)
        self.offsets = nn.Linear(embed_dims, learned_points * 3) if learned_points else None
        self.weights = nn.Linear(embed_dims, self.num_points * num_levels * num_groups)
        self.output = nn.Linear(feat_channels, embed_dims)
        if self.offsets is not None:
            nn.init.zeros_(self.offsets.weight)
            nn.init.uniform_(self.offsets.bias, -2.0, 2.0)  # spread the learned points from the start
        nn.init.zeros_(self.weights.weight)
        nn.init.zeros_(self.weights.bias)

    def key_points(self, query: torch.Tensor, g: Gaussians) -> torch.Tensor:
        """-> (B, G, P, 3) ego points."""
        batch, num = query.shape[:2]
        local = self.fixed.to(query.dtype).expand(batch, num, -1, -1)
        if self.offsets is not None:
            learned = (torch.sigmoid(self.offsets(query)) - 0.5) * 6.0
            local = torch.cat([local, learned.view(batch, num, self.learned_points, 3)], dim=2)
        rot = quaternion_to_matrix(g.rotations)  # (B, G, 3, 3)
        return g.means[:, :, None] + torch.einsum("bgij,bgpj->bgpi", rot, local * g.scales[:, :, None])

    def forward(self, query: torch.Tensor, g: Gaussians, features: Sequence[torch.Tensor],
                img_from_ego: torch.Tensor) -> torch.Tensor:
        batch, num = query.shape[:2]
        pts, levels, groups = self.num_points, self.num_levels, self.num_groups
        points = self.key_points(query, g)
        uv, _, inside = project_points(points.flatten(1, 2), img_from_ego, self.image_size)  # (B, N, M = G*P, ...)
        cams, total = uv.shape[1], num * pts
        height, width = self.image_size
        grid = uv * uv.new_tensor([2.0 / width, 2.0 / height]) - 1.0  # grid_sample coordinates, align_corners=False
        # Pack, per camera, only the points it sees (a point is in ~1 of 6 surround cameras): one
        # grid_sample per level over (B*N, 1, S, 2), S = the most points any camera sees.
        vis = inside.reshape(batch * cams, total)
        seen_count = vis.sum(dim=1)
        slots = max(1, int(seen_count.max()))
        order = torch.argsort((~vis).to(torch.uint8), dim=1, stable=True)[:, :slots]  # visible points first
        slot_ok = torch.arange(slots, device=vis.device) < seen_count[:, None]  # (B*N, S)
        packed = grid.reshape(batch * cams, total, 2).gather(1, order[..., None].expand(-1, -1, 2))
        packed = torch.where(slot_ok[..., None], packed, torch.full_like(packed, -2.0))[:, None]  # (B*N, 1, S, 2)
        sample_b = torch.arange(batch, device=vis.device).repeat_interleave(cams)[:, None]
        rows = (sample_b * total + order)[slot_ok]  # (V,) row b*M + m of every visible (camera, point)
        count = inside.sum(dim=1).reshape(batch * total, 1).to(query.dtype)  # cameras seeing each point
        seen = (count > 0).view(batch, num, pts)
        logits = self.weights(query).view(batch, num, pts, levels, groups)
        logits = logits.masked_fill(~seen[..., None, None], -1e4)  # finite: an all-unseen Gaussian stays NaN-free
        weights = logits.flatten(2, 3).softmax(dim=2).view(batch, num, pts, levels, groups)
        weights = weights * seen[..., None, None].to(weights.dtype)
        out = None
        for level, feat in enumerate(features):
            channels, h, w = feat.shape[2:]
            sampled = F.grid_sample(feat.reshape(batch * cams, channels, h, w), packed, mode="bilinear",
                                    padding_mode="zeros", align_corners=False)  # (B*N, C, 1, S)
            sampled = sampled[:, :, 0].transpose(1, 2)[slot_ok]  # (V, C)
            # mean over the cameras that see the point; the count is >= 1 wherever a sample landed
            fused = sampled.new_zeros(batch * total, channels).index_add_(0, rows, sampled) / count.clamp(min=1.0)
            fused = fused.view(batch, num, pts, groups, channels // groups)
            part = (fused * weights[..., level, :, None]).sum(dim=2)  # (B, G, groups, C/groups)
            out = part if out is None else out + part
        return self.output(out.flatten(2))


@torch.no_grad()
def knn_indices(points: torch.Tensor, k: int, chunk: int = 2048) -> torch.Tensor:
    """(B, G, 3) -> (B, G, k) indices of the k nearest points (self included), rows in chunks."""
    k = min(k, points.shape[1])
    out = []
    for start in range(0, points.shape[1], chunk):
        dist = torch.cdist(points[:, start:start + chunk], points)  # (B, g, G)
        out.append(dist.topk(k, dim=-1, largest=False).indices)
    return torch.cat(out, dim=1)


class KNNSelfEncoding(nn.Module):
    """Self-encoding of the Gaussians: multi-head attention over each Gaussian's k nearest
    neighbours (by mean), with a learned relative-position term added to keys and values (Point
    Transformer style). A plain-PyTorch substitute for GaussianFormer-2's sparse 3D convolution on
    a voxelised Gaussian grid; unlike that it has no duplicate-voxel ambiguity and no extent limit.

    Forward: x (B, G, C), means (B, G, 3) -> (B, G, C).
    """

    def __init__(self, embed_dims: int, num_heads: int, k: int, position_scale: float = 2.0):
        super().__init__()
        self.k, self.num_heads, self.position_scale = k, num_heads, position_scale
        self.qkv = nn.Linear(embed_dims, 3 * embed_dims)
        self.position = nn.Sequential(
            nn.Linear(3, embed_dims), nn.ReLU(inplace=True), nn.Linear(embed_dims, embed_dims)
        )
        self.output = nn.Linear(embed_dims, embed_dims)

    def forward(self, x: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
        batch, num, channels = x.shape
        heads = self.num_heads
        idx = knn_indices(means.detach(), self.k)  # (B, G, k)
        k = idx.shape[-1]
        q, key, value = self.qkv(x).chunk(3, dim=-1)
        flat = idx.reshape(batch, num * k, 1)

        def gather(t: torch.Tensor) -> torch.Tensor:  # (B, G, c) -> (B, G, k, c)
            return t.gather(1, flat.expand(-1, -1, t.shape[-1])).view(batch, num, k, t.shape[-1])

        rel = (gather(means) - means[:, :, None]) / self.position_scale
        pos = self.position(rel)  # (B, G, k, C)
        key = (gather(key) + pos).view(batch, num, k, heads, channels // heads)
        value = (gather(value) + pos).view(batch, num, k, heads, channels // heads)
        q = q.view(batch, num, 1, heads, channels // heads)
        attn = ((q * key).sum(-1) / math.sqrt(channels // heads)).softmax(dim=2)  # (B, G, k, heads)
        out = (attn[..., None] * value).sum(dim=2).reshape(batch, num, channels)
        return self.output(out)


class GaussianRefine(nn.Module):
    """Feature -> updated Gaussians. Mean: ``mean + (2 sigmoid(o) - 1) * max_step``, clamped into
    the grid; scale ``s_min + (s_max - s_min) sigmoid(o)``; rotation: normalised quaternion;
    opacity: sigmoid; semantics: K-1 logits. All but the mean are predicted absolutely."""

    def __init__(self, embed_dims: int, num_sem: int, scale_range: tuple[float, float],
                 max_step: tuple[float, float, float], grid: VoxelGrid):
        super().__init__()
        self.grid, self.scale_range = grid, scale_range
        self.register_buffer("max_step", torch.tensor(max_step, dtype=torch.float32), persistent=False)
        self.mlp = nn.Sequential(
            nn.Linear(embed_dims, embed_dims), nn.ReLU(inplace=True), nn.LayerNorm(embed_dims),
            nn.Linear(embed_dims, embed_dims), nn.ReLU(inplace=True), nn.LayerNorm(embed_dims),
            nn.Linear(embed_dims, 11 + num_sem),
        )
        last = self.mlp[-1]
        nn.init.xavier_uniform_(last.weight, gain=0.1)  # start close to the initial Gaussians
        nn.init.zeros_(last.bias)
        with torch.no_grad():
            last.bias[6] = 1.0  # identity rotation (w = 1)

    def forward(self, x: torch.Tensor, g: Gaussians) -> Gaussians:
        out = self.mlp(x)
        delta, scale, rot, opa, sem = out.split([3, 3, 4, 1, out.shape[-1] - 11], dim=-1)
        lo, hi = _grid_bounds(self.grid, g.means)
        means = torch.maximum(torch.minimum(g.means + (2 * torch.sigmoid(delta) - 1) * self.max_step, hi), lo)
        s_min, s_max = self.scale_range
        return Gaussians(
            means=means,
            scales=s_min + (s_max - s_min) * torch.sigmoid(scale),
            rotations=F.normalize(rot, dim=-1, eps=1e-6),
            opacities=torch.sigmoid(opa[..., 0]),
            semantic_logits=sem,
        )


class GaussianRefineBlock(nn.Module):
    """cross-attention -> add & norm -> k-NN self-encoding -> add & norm -> FFN -> add & norm -> refine.
    Forward: x (B, G, C), Gaussians, their embedding (B, G, C), features, img_from_ego -> (x, Gaussians)."""

    def __init__(self, cfg: GaussianTeacherConfig, num_levels: int, grid: VoxelGrid):
        super().__init__()
        e = cfg.embed_dims
        self.cross = ImageCrossAttention(e, cfg.neck_channels, num_levels, cfg.num_groups, cfg.learned_points,
                                         cfg.image_size)
        self.self_enc = KNNSelfEncoding(e, cfg.num_heads, cfg.knn)
        hidden = cfg.ffn_ratio * e
        self.ffn = nn.Sequential(nn.Linear(e, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, e))
        self.norms = nn.ModuleList(nn.LayerNorm(e) for _ in range(3))
        self.refine = GaussianRefine(e, cfg.num_classes - 1, cfg.scale_range, cfg.max_step, grid)

    def forward(self, x: torch.Tensor, g: Gaussians, embed: torch.Tensor, features: Sequence[torch.Tensor],
                img_from_ego: torch.Tensor) -> tuple[torch.Tensor, Gaussians]:
        x = self.norms[0](x + self.cross(x + embed, g, features, img_from_ego))
        x = self.norms[1](x + self.self_enc(x + embed, g.means))
        x = self.norms[2](x + self.ffn(x))
        return x, self.refine(x + embed, g)


class DistributionLifter(nn.Module):
    """Distribution-based initialisation (GaussianFormer-2's lifter, deterministic).

    A camera-aware depth net on the finest level predicts, per ray, logits over D bins + 1 "nothing
    occupied within range" bin, and a context feature. Every (ray, bin) point inside the grid is a
    candidate scored by its bin probability; candidates are visited by decreasing score and at
    most one is kept per ``min_spacing`` cell (so that confident surfaces do not take every
    Gaussian); the first ``num`` kept become the initial means (if fewer are kept, the best
    remaining candidates fill up). The choice is deterministic and not differentiable; the means
    are where the distribution says the scene is, and the depth net learns from its own loss
    (:func:`occdistill.losses.gaussian.init_depth_loss`) while the context feature, gathered at the
    chosen rays, carries the CE gradient back into the image features.
    """

    def __init__(self, in_channels: int, mid_channels: int, embed_dims: int, bins: DepthBins, num: int,
                 min_spacing: float, grid: VoxelGrid, image_size: tuple[int, int], stride: int):
        super().__init__()
        self.bins, self.num, self.min_spacing, self.grid = bins, num, min_spacing, grid
        self.image_size, self.stride = tuple(image_size), stride
        self.depth_net = DepthNet(in_channels, mid_channels, bins.num_bins + 1, embed_dims, camera_aware=True)
        self.register_buffer("centers", bins.centers(), persistent=False)

    def forward(self, feat: torch.Tensor, intrinsics: torch.Tensor, img_from_raw: torch.Tensor,
                ego_from_cam: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, InitRays]:
        """feat (B, N, C, h, w) -> depth logits (B, N, D+1, h, w), context (B, N, E, h, w), rays."""
        batch, cams, channels, h, w = feat.shape
        params = camera_parameters(intrinsics, img_from_raw, ego_from_cam, self.image_size).to(feat.dtype)
        logits, context = self.depth_net(feat.reshape(batch * cams, channels, h, w), params.reshape(batch * cams, -1))
        origins, dirs = ray_geometry(intrinsics, img_from_raw, ego_from_cam, (h, w), self.stride)
        return (logits.view(batch, cams, -1, h, w), context.view(batch, cams, -1, h, w),
                InitRays(origins=origins, directions=dirs, bins=self.bins))

    @torch.no_grad()
    def select(self, probs: torch.Tensor, rays: InitRays) -> tuple[torch.Tensor, torch.Tensor]:
        """probs (B, N, D+1, h, w) -> means (B, num, 3) and the flat (N*h*w) ray index (B, num) of each."""
        batch, cams, _, h, w = probs.shape
        num_bins = self.bins.num_bins
        # (B, N, D, h, w, 3) candidate points; flat candidate index = ((n * D + d) * h + i) * w + j
        depth = self.centers.view(1, 1, -1, 1, 1, 1)
        points = rays.origins[:, :, None, None, None] + depth * rays.directions[:, :, None]
        points = points.reshape(batch, -1, 3)
        score = probs[:, :, :num_bins].reshape(batch, -1).float()
        total = score.shape[1]
        lo, hi = _grid_bounds(self.grid, points)
        inside = ((points >= lo) & (points < hi)).all(dim=-1)
        order = torch.where(inside, score, torch.full_like(score, -1.0)).argsort(dim=1, descending=True, stable=True)
        pts_sorted = points.gather(1, order[..., None].expand(-1, -1, 3))
        cells_per_axis = torch.ceil((hi - lo) / self.min_spacing).long()
        cell3 = ((pts_sorted - lo) / self.min_spacing).floor().long()
        cell3 = torch.minimum(cell3.clamp(min=0), cells_per_axis - 1)
        num_cells = int(cells_per_axis.prod())
        cell = (cell3[..., 0] * cells_per_axis[1] + cell3[..., 1]) * cells_per_axis[2] + cell3[..., 2]
        cell = cell + torch.arange(batch, device=cell.device)[:, None] * num_cells  # (B, M) unique per sample
        rank = torch.arange(total, device=cell.device).expand(batch, total)
        first = torch.full((batch * num_cells,), total, dtype=torch.long, device=cell.device)
        first = first.scatter_reduce(0, cell.reshape(-1), rank.reshape(-1), reduce="amin")
        kept = (first[cell] == rank) & inside.gather(1, order)
        # kept candidates by score, then the rest by score, outside-grid candidates last
        key = rank + total * (~kept).long() + total * (~inside.gather(1, order)).long()
        pick = key.topk(min(self.num, total), dim=1, largest=False).indices  # (B, num)
        chosen = order.gather(1, pick)  # flat candidate index
        means = points.gather(1, chosen[..., None].expand(-1, -1, 3))
        means = torch.maximum(torch.minimum(means, hi), lo)
        cam = chosen // (num_bins * h * w)
        cell_ij = chosen % (h * w)
        return means, cam * (h * w) + cell_ij


class GaussianTeacher(nn.Module):
    def __init__(self, cfg: GaussianTeacherConfig):
        super().__init__()
        self.cfg = cfg
        grid = cfg.grid.voxel_grid()
        self.grid = grid
        stride = cfg.feature_stride
        if cfg.image_size[0] % stride or cfg.image_size[1] % stride:
            raise ValueError(f"image size {cfg.image_size} is not a multiple of the ray stride {stride}")
        self.backbone = ResNet(
            depth=cfg.backbone.depth,
            out_indices=cfg.backbone.out_indices,
            base_width=cfg.backbone.base_width,
            frozen_stages=cfg.backbone.frozen_stages,
            with_checkpoint=cfg.backbone.with_checkpoint,
        )
        self.neck = MultiLevelFPN(self.backbone.out_channels, cfg.neck_channels)
        num_levels = len(cfg.backbone.out_indices)
        self.lifter = DistributionLifter(
            cfg.neck_channels, cfg.depth_net_channels, cfg.embed_dims, DepthBins(*cfg.depth_bins),
            cfg.init_gaussians, cfg.init_min_spacing, grid, cfg.image_size, stride,
        )
        num_sem = cfg.num_classes - 1
        # GaussianFormer-2's learnable anchors: means (pre-sigmoid, grid-normalised) and features.
        self.anchor_means = nn.Parameter(torch.logit(torch.rand(cfg.learned_gaussians, 3).clamp(0.02, 0.98)))
        self.anchor_features = nn.Parameter(torch.randn(cfg.learned_gaussians, cfg.embed_dims) * 0.02)
        self.embedding = GaussianEmbedding(cfg.embed_dims, num_sem, grid)
        self.blocks = nn.ModuleList(GaussianRefineBlock(cfg, num_levels, grid) for _ in range(cfg.num_blocks))
        s_mid = math.sqrt(cfg.scale_range[0] * cfg.scale_range[1])
        self.register_buffer("init_scale", torch.tensor([s_mid] * 3), persistent=False)
        self.register_buffer("pixel_mean", torch.tensor(_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(_STD).view(1, 3, 1, 1), persistent=False)

    @property
    def num_gaussians(self) -> int:
        return self.cfg.init_gaussians + self.cfg.learned_gaussians

    def image_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """(B, N, 3, H, W) in [0, 1] -> L levels (B, N, C, h_l, w_l), fine to coarse."""
        batch, cams = images.shape[:2]
        if tuple(images.shape[-2:]) != tuple(self.cfg.image_size):
            raise ValueError(f"images are {tuple(images.shape[-2:])}, the model expects {self.cfg.image_size}")
        x = (images.flatten(0, 1) - self.pixel_mean) / self.pixel_std
        return [f.view(batch, cams, *f.shape[1:]) for f in self.neck(self.backbone(x))]

    def initial_gaussians(self, means: torch.Tensor, features: torch.Tensor) -> tuple[Gaussians, torch.Tensor]:
        """Lifted means (B, G0, 3) and features (B, G0, C) + the learnable anchors -> Gaussians, features."""
        batch = means.shape[0]
        lo, hi = _grid_bounds(self.grid, means)
        anchors = lo + (hi - lo) * torch.sigmoid(self.anchor_means)  # (G1, 3)
        means = torch.cat([means, anchors.expand(batch, -1, -1)], dim=1)
        features = torch.cat([features, self.anchor_features.expand(batch, -1, -1)], dim=1)
        num = means.shape[1]
        rotations = means.new_zeros(batch, num, 4)
        rotations[..., 0] = 1.0
        g = Gaussians(
            means=means,
            scales=self.init_scale.to(means.dtype).expand(batch, num, 3),
            rotations=rotations,
            opacities=means.new_full((batch, num), 0.5),
            semantic_logits=means.new_zeros(batch, num, self.cfg.num_classes - 1),
        )
        return g, features

    def forward(
        self,
        images: torch.Tensor,
        intrinsics: torch.Tensor,
        img_from_raw: torch.Tensor,
        ego_from_cam: torch.Tensor,
    ) -> GaussianOutput:
        """images (B, N, 3, H, W); intrinsics, img_from_raw (B, N, 3, 3); ego_from_cam (B, N, 4, 4)
        including the BEV augmentation (``Batch.ego_from_cam``)."""
        cfg = self.cfg
        feats = self.image_features(images)
        depth_logits, context, rays = self.lifter(feats[0], intrinsics, img_from_raw, ego_from_cam)
        init_depth = depth_logits.softmax(dim=2)
        means, ray_index = self.lifter.select(init_depth, rays)
        ctx = context.permute(0, 1, 3, 4, 2).flatten(1, 3)  # (B, N*h*w, E)
        lifted = ctx.gather(1, ray_index[..., None].expand(-1, -1, ctx.shape[-1]))
        g, x = self.initial_gaussians(means, lifted)
        img_from_ego = img_from_ego_matrices(intrinsics, img_from_raw, ego_from_cam).to(x.dtype)
        history = [g]
        for block in self.blocks:
            x, g = block(x, g, self.embedding(g), feats, img_from_ego)
            history.append(g)
        splat = splat_gaussians(
            g.means, g.scales, g.rotations, g.opacities, g.semantics, self.grid,
            cutoff=cfg.cutoff, chunk_size=cfg.splat_chunk, opacity_in_geometry=cfg.opacity_in_geometry,
            density_normalised=cfg.density_normalised, checkpoint=cfg.splat_checkpoint,
        )
        probs = free_last_to_table(splat.probs, cfg.free_index)
        log_probs = free_last_to_table(splat.log_probs, cfg.free_index)
        free_index = cfg.free_index % cfg.num_classes
        bev = bev_collapse(probs, free_index).permute(0, 3, 1, 2)  # (B, X, Y, K) -> (B, K, X, Y)
        return GaussianOutput(
            voxel_probs=probs,
            voxel_logits=log_probs,
            bev_feature=bev,
            init_depth=init_depth,
            init_depth_logits=depth_logits,
            init_rays=rays,
            gaussians=history,
            features=x,
            grid=self.grid,
            free_index=free_index,
            splat_pairs=splat.pairs,
        )


__all__ = [
    "GaussianOutput", "GaussianTeacher", "GaussianTeacherConfig", "Gaussians", "InitRays", "TeacherBackboneConfig",
    "TeacherGridConfig", "img_from_ego_matrices", "knn_indices", "ray_geometry",
]
