"""Blocks of the sparse-query (OPUS-style) occupancy decoder, in plain PyTorch.

A decoder layer refines Q queries; query q owns a point set of R_prev points (metres, ego frame)
and emits a new set of R points around the centroid of the old one (coarse to fine):

    q += depth_prior(prev points)                    (optional, DiScene†)
    q += pos_mlp(normalised prev points)             (3 * R_prev -> C)
    s  = sample(multi-level, multi-view image features at centre + offset * std(prev points))
    q  = norm1(q + adaptive_mixing(s, q))            (AdaMixer: channel then point mixing)
    q  = norm2(q + scale_adaptive_self_attention(q)) (attention biased by -tau * centre distance)
    q  = norm3(q + ffn(q))
    points = mean(prev points) + offset_scale * reg(q)   (B, Q, R, 3), logits = cls(q) (B, Q, R, K)

Letters: B batch, N cameras, C channels, G sampling groups, P sampling points per group,
L feature levels, Q queries, R points per query, K classes, H W image, h w feature map.

Projection: ``img_from_ego`` (B, N, 3, 4) maps homogeneous ego points to (u z, v z, z) in the
network's (augmented) pixels. Pixels follow the project convention (pixel c covers [c, c+1)), so
``grid_sample(align_corners=False)`` reads pixel u at normalised ``2 u / W - 1`` exactly, on any
feature level whose stride divides the image.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

# Points closer to the camera plane than this are treated as not visible (metres).
_MIN_DEPTH = 1e-3


class MultiLevelFPN(nn.Module):
    """FPN with one output per input level: 1x1 laterals, top-down nearest upsampling + add, 3x3
    output convs (mmdet FPN without extra levels, as OPUS uses it).

    Forward: list of L features (B, C_i, h_i, w_i), fine to coarse -> L features (B, C, h_i, w_i).
    """

    def __init__(self, in_channels: Sequence[int], out_channels: int):
        super().__init__()
        self.out_channels = out_channels
        self.lateral_convs = nn.ModuleList(nn.Conv2d(c, out_channels, 1) for c in in_channels)
        self.output_convs = nn.ModuleList(nn.Conv2d(out_channels, out_channels, 3, padding=1) for _ in in_channels)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, feats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if len(feats) != len(self.lateral_convs):
            raise ValueError(f"MultiLevelFPN expects {len(self.lateral_convs)} levels, got {len(feats)}")
        laterals = [conv(f) for conv, f in zip(self.lateral_convs, feats)]
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + F.interpolate(laterals[i], size=laterals[i - 1].shape[-2:], mode="nearest")
        return [conv(x) for conv, x in zip(self.output_convs, laterals)]


def project_points(points: torch.Tensor, img_from_ego: torch.Tensor, image_size: tuple[int, int]):
    """Ego points (B, M, 3) -> pixels (B, N, M, 2), z-depth (B, N, M) and in-image mask (B, N, M).

    ``img_from_ego`` (B, N, 3, 4). Points behind the camera get finite, meaningless pixels; the
    mask (depth > 1 mm and 0 <= u < W, 0 <= v < H) tells them apart.
    """
    height, width = image_size
    # Pixel coordinates in half precision would be off by pixels: project in float32 always.
    with torch.autocast(points.device.type, enabled=False):
        points = points.float()
        homo = torch.cat([points, torch.ones_like(points[..., :1])], dim=-1)  # (B, M, 4)
        cam = torch.einsum("bnij,bmj->bnmi", img_from_ego.float(), homo)  # (B, N, M, 3) = (u z, v z, z)
        depth = cam[..., 2]
        uv = cam[..., :2] / depth.clamp(min=_MIN_DEPTH)[..., None]
    inside = (depth > _MIN_DEPTH) & (uv[..., 0] >= 0) & (uv[..., 0] < width) & (uv[..., 1] >= 0) & (uv[..., 1] < height)
    return uv, depth, inside


def _normalised_grid(uv: torch.Tensor, extent: tuple[float, float]) -> torch.Tensor:
    """Pixels (..., 2) -> grid_sample coordinates (align_corners=False) of a map covering
    ``extent`` = (height, width) pixels, clamped far outside so that invalid points (masked later)
    never produce huge values."""
    height, width = extent
    scale = uv.new_tensor([2.0 / width, 2.0 / height])
    return (uv * scale - 1.0).clamp(-2.0, 2.0)


class PointSampler(nn.Module):
    """OPUS "consistent point sampling": G x P sampling points around each query's point set.

    Sampling point = centre + offset(q) * std(prev points), per axis; a query whose previous set is a
    single point samples only its centre (std 0), as in OPUS. Level weights: softmax over L.
    Features of a point are averaged over the cameras it projects into (the count is clamped to 1,
    so a single camera or a point seen by no camera never divides by zero; unseen points read 0).

    Level l has stride s_l: feature cell j covers pixels [j s_l, (j + 1) s_l), so a map of w_l
    cells spans w_l s_l pixels (more than W when W is not a multiple of s_l) and pixel u reads it
    at normalised ``2 u / (w_l s_l) - 1``.

    Forward: points (B, Q, R, 3) metres, query (B, Q, C), features: L tensors (B, N, C_f, h, w),
    img_from_ego (B, N, 3, 4) -> sampled (B, Q, G, P, C_f / G).
    """

    def __init__(self, embed_dims: int, feat_channels: int, num_groups: int, num_points: int,
                 strides: Sequence[int], image_size: tuple[int, int]):
        super().__init__()
        if feat_channels % num_groups:
            raise ValueError(f"feature channels {feat_channels} are not divisible by {num_groups} groups")
        self.num_groups, self.num_points, self.num_levels = num_groups, num_points, len(strides)
        self.strides = tuple(int(s) for s in strides)
        self.image_size = tuple(image_size)
        self.sampling_offset = nn.Linear(embed_dims, num_groups * num_points * 3)
        self.level_weights = nn.Linear(embed_dims, num_groups * num_points * self.num_levels)
        nn.init.zeros_(self.sampling_offset.weight)
        nn.init.uniform_(self.sampling_offset.bias, -0.5, 0.5)

    def forward(self, points: torch.Tensor, query: torch.Tensor, features: Sequence[torch.Tensor],
                img_from_ego: torch.Tensor) -> torch.Tensor:
        batch, num_q, num_r = points.shape[:3]
        groups, num_p, levels = self.num_groups, self.num_points, self.num_levels
        centre = points.mean(dim=2, keepdim=True)  # (B, Q, 1, 3)
        spread = points.std(dim=2, keepdim=True) if num_r > 1 else torch.zeros_like(centre)
        offsets = self.sampling_offset(query).view(batch, num_q, groups * num_p, 3)
        samples = centre + offsets * spread  # (B, Q, G*P, 3)

        weights = self.level_weights(query).view(batch, num_q, groups, num_p, levels).softmax(dim=-1)
        uv, _, inside = project_points(samples.flatten(1, 2), img_from_ego, self.image_size)
        cams = uv.shape[1]
        # (B, N, Q*G*P, 2) -> (B, N, Q, G, P, 2) -> (B, N, G, Q, P, 2) -> (B*N*G, Q, P, 2)
        uv = uv.view(batch, cams, num_q, groups, num_p, 2).permute(0, 1, 3, 2, 4, 5)
        uv = uv.reshape(batch * cams * groups, num_q, num_p, 2)
        if len(features) != levels:
            raise ValueError(f"sampler built for {levels} feature levels, got {len(features)}")

        sampled = None
        for level, (feat, stride) in enumerate(zip(features, self.strides)):
            _, _, channels, h, w = feat.shape
            cg = channels // groups
            grid = _normalised_grid(uv, (h * stride, w * stride))
            # (B, N, C, h, w) -> (B*N*G, C/G, h, w): group g reads only its own sampling points.
            x = feat.reshape(batch * cams * groups, cg, h, w)
            out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
            out = out.view(batch, cams, groups, cg, num_q, num_p)  # (B, N, G, C/G, Q, P)
            lw = weights[..., level].permute(0, 2, 1, 3)[:, None, :, None]  # (B, 1, G, 1, Q, P)
            sampled = out * lw if sampled is None else sampled + out * lw
        # Average over the cameras where the point is in the image.
        vis = inside.view(batch, cams, num_q, groups, num_p).permute(0, 1, 3, 2, 4)[:, :, :, None]  # (B,N,G,1,Q,P)
        vis = vis.to(sampled.dtype)
        fused = (sampled * vis).sum(dim=1) / vis.sum(dim=1).clamp(min=1.0)  # (B, G, C/G, Q, P)
        return fused.permute(0, 3, 1, 4, 2).contiguous()  # (B, Q, G, P, C/G)


class AdaptiveMixing(nn.Module):
    """AdaMixer: query-generated channel mixing (C_g x C_g) then point mixing (P_out x P) per group.

    Forward: sampled (B, Q, G, P, C_g), query (B, Q, C) -> query + out_proj(mixed) (B, Q, C).
    """

    def __init__(self, query_dims: int, group_channels: int, num_groups: int, in_points: int, out_points: int):
        super().__init__()
        self.group_channels, self.num_groups = group_channels, num_groups
        self.in_points, self.out_points = in_points, out_points
        self.m_params = group_channels * group_channels
        self.s_params = in_points * out_points
        self.parameter_generator = nn.Linear(query_dims, num_groups * (self.m_params + self.s_params))
        self.out_proj = nn.Linear(num_groups * out_points * group_channels, query_dims)
        nn.init.zeros_(self.parameter_generator.weight)

    def forward(self, sampled: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        batch, num_q, groups, num_p, cg = sampled.shape
        params = self.parameter_generator(query).view(batch * num_q, groups, -1)
        m, s = params.split([self.m_params, self.s_params], dim=-1)
        m = m.view(batch * num_q, groups, cg, cg)
        s = s.view(batch * num_q, groups, self.out_points, num_p)
        x = sampled.reshape(batch * num_q, groups, num_p, cg)
        x = F.relu(F.layer_norm(x @ m, x.shape[-2:]))  # channel mixing (BQ, G, P, C_g)
        x = s @ x  # point mixing (BQ, G, P_out, C_g)
        x = F.relu(F.layer_norm(x, x.shape[-2:]))
        return query + self.out_proj(x.reshape(batch, num_q, -1))


class ScaleAdaptiveSelfAttention(nn.Module):
    """SparseBEV/OPUS self-attention with an additive bias ``-tau_h(q_i) * ||c_i - c_j||`` (metres).

    The attention is written out (softmax(q k^T / sqrt(d) + bias) v) rather than calling a fused
    kernel, so train/eval and grad/no-grad runs compute bit-identical results (the distillation
    identity tests rely on it) and it exports to ONNX as plain matmuls.

    Forward: query (B, Q, C), centres (B, Q, 3) -> query + attention (B, Q, C).
    """

    def __init__(self, embed_dims: int, num_heads: int, dropout: float):
        super().__init__()
        if embed_dims % num_heads:
            raise ValueError(f"embed dims {embed_dims} not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.qkv = nn.Linear(embed_dims, 3 * embed_dims)
        self.out_proj = nn.Linear(embed_dims, embed_dims)
        self.attn_drop = nn.Dropout(dropout)
        self.gen_tau = nn.Linear(embed_dims, num_heads)
        nn.init.xavier_uniform_(self.qkv.weight)
        nn.init.zeros_(self.qkv.bias)
        nn.init.zeros_(self.out_proj.bias)
        nn.init.zeros_(self.gen_tau.weight)
        nn.init.uniform_(self.gen_tau.bias, 0.0, 2.0)

    def forward(self, query: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
        batch, num_q, channels = query.shape
        heads, dh = self.num_heads, channels // self.num_heads
        dist = torch.cdist(centres.detach(), centres.detach())  # (B, Q, Q)
        tau = self.gen_tau(query).permute(0, 2, 1)  # (B, heads, Q)
        bias = -tau[..., None] * dist[:, None]  # (B, heads, Q, Q)
        q, k, v = self.qkv(query).view(batch, num_q, 3, heads, dh).permute(2, 0, 3, 1, 4)  # each (B, h, Q, dh)
        attn = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(dh)) + bias
        attn = self.attn_drop(attn.softmax(dim=-1))
        out = (attn @ v).transpose(1, 2).reshape(batch, num_q, channels)
        return query + self.out_proj(out)


class DepthPriorEncoder(nn.Module):
    """DiScene† depth branch: for each previous point of a query, its projected depth d_q and the
    prior depth d_p at its pixel -> MLP -> a feature added to the query.

    Per point the input is ``(d_q / s, d_p / s, seen)``, where ``seen`` is 1 when the point lies in
    some camera's image in front of it and the prior has a value there (d_p > 0), else the three
    values are 0. The flag (not in DiScene, which is monocular and clamps to the image border)
    lets multi-camera rigs and holes in the prior map say "no information". With several cameras
    the first camera that sees the point is used. Depth lookup: nearest pixel (as DiScene).

    Forward: points (B, Q, R, 3), prior_depth (B, N, H, W) metres (0 = none), img_from_ego
    (B, N, 3, 4) -> (B, Q, C).
    """

    def __init__(self, num_prev_points: int, embed_dims: int, image_size: tuple[int, int], depth_scale: float):
        super().__init__()
        self.image_size = tuple(image_size)
        self.depth_scale = depth_scale
        self.mlp = nn.Sequential(
            nn.Linear(3 * num_prev_points, embed_dims // 2), nn.ReLU(inplace=True),
            nn.Linear(embed_dims // 2, embed_dims), nn.ReLU(inplace=True),
            nn.Linear(embed_dims, embed_dims),
        )

    def forward(self, points: torch.Tensor, prior_depth: torch.Tensor, img_from_ego: torch.Tensor) -> torch.Tensor:
        batch, num_q, num_r = points.shape[:3]
        cams = prior_depth.shape[1]
        uv, depth, inside = project_points(points.flatten(1, 2), img_from_ego, self.image_size)  # (B, N, M, .)
        grid = _normalised_grid(uv, self.image_size)  # (B, N, M, 2), prior maps are full resolution
        prior = F.grid_sample(prior_depth.flatten(0, 1)[:, None], grid.flatten(0, 1)[:, None],
                              mode="nearest", padding_mode="zeros", align_corners=False)
        prior = prior.view(batch, cams, -1)  # (B, N, M)
        seen = inside & (prior > 0)
        # First camera that sees the point (argmax of a 0/1 mask returns the first maximum).
        first = seen.to(torch.uint8).argmax(dim=1, keepdim=True)  # (B, 1, M)
        any_seen = seen.any(dim=1)  # (B, M)
        d_q = depth.gather(1, first)[:, 0] * any_seen
        d_p = prior.gather(1, first)[:, 0] * any_seen
        feats = torch.stack([d_q / self.depth_scale, d_p / self.depth_scale, any_seen.to(d_q.dtype)], dim=-1)
        return self.mlp(feats.view(batch, num_q, num_r * 3))


class SparseDecoderLayer(nn.Module):
    """One OPUS decoder layer (see the module docstring); R_prev -> R points per query.

    Forward: points (B, Q, R_prev, 3) metres (detached by the caller), query (B, Q, C),
    features: L tensors (B, N, C_f, h, w), img_from_ego (B, N, 3, 4), prior_depth (B, N, H, W) or
    None -> (query (B, Q, C), points (B, Q, R, 3), logits (B, Q, R, K)).
    """

    def __init__(
        self,
        *,
        embed_dims: int,
        feat_channels: int,
        num_classes: int,
        num_points_in: int,
        num_points_out: int,
        num_groups: int,
        sampling_points: int,
        mixing_out_points: int,
        strides: Sequence[int],
        num_heads: int,
        ffn_channels: int,
        dropout: float,
        offset_scale: float,
        grid_lower: Sequence[float],
        grid_upper: Sequence[float],
        image_size: tuple[int, int],
        depth_prior: bool,
        depth_scale: float,
    ):
        super().__init__()
        self.num_points_in, self.num_points_out, self.num_classes = num_points_in, num_points_out, num_classes
        self.offset_scale = offset_scale
        self.register_buffer("grid_lower", torch.tensor(grid_lower, dtype=torch.float32), persistent=False)
        self.register_buffer("grid_extent", torch.tensor(grid_upper, dtype=torch.float32) - self.grid_lower,
                             persistent=False)
        self.position_encoder = nn.Sequential(
            nn.Linear(3 * num_points_in, embed_dims), nn.LayerNorm(embed_dims), nn.ReLU(inplace=True),
            nn.Linear(embed_dims, embed_dims), nn.LayerNorm(embed_dims), nn.ReLU(inplace=True),
        )
        self.depth_prior = DepthPriorEncoder(num_points_in, embed_dims, image_size, depth_scale) if depth_prior else None
        self.sampling = PointSampler(embed_dims, feat_channels, num_groups, sampling_points, strides, image_size)
        self.mixing = AdaptiveMixing(embed_dims, feat_channels // num_groups, num_groups, sampling_points,
                                     mixing_out_points)
        self.self_attn = ScaleAdaptiveSelfAttention(embed_dims, num_heads, dropout)
        self.ffn = nn.Sequential(
            nn.Linear(embed_dims, ffn_channels), nn.ReLU(inplace=True), nn.Dropout(dropout),
            nn.Linear(ffn_channels, embed_dims), nn.Dropout(dropout),
        )
        self.norm1, self.norm2, self.norm3 = (nn.LayerNorm(embed_dims) for _ in range(3))
        cls = []
        for _ in range(2):
            cls += [nn.Linear(embed_dims, embed_dims), nn.LayerNorm(embed_dims), nn.ReLU(inplace=True)]
        self.cls_branch = nn.Sequential(*cls, nn.Linear(embed_dims, num_classes * num_points_out))
        reg = []
        for _ in range(2):
            reg += [nn.Linear(embed_dims, embed_dims), nn.ReLU(inplace=True)]
        self.reg_branch = nn.Sequential(*reg, nn.Linear(embed_dims, 3 * num_points_out))
        # Focal-loss prior: every class starts at probability 0.01 (RetinaNet / OPUS).
        nn.init.constant_(self.cls_branch[-1].bias, -math.log((1 - 0.01) / 0.01))

    def forward(self, points, query, features, img_from_ego, prior_depth=None):
        batch, num_q, num_r = points.shape[:3]
        if num_r != self.num_points_in:
            raise ValueError(f"layer expects {self.num_points_in} points per query, got {num_r}")
        if self.depth_prior is not None:
            if prior_depth is None:
                raise ValueError("the model has a depth-prior branch: pass prior_depth (B, N, H, W)")
            query = query + self.depth_prior(points, prior_depth, img_from_ego)
        normalised = (points - self.grid_lower) / self.grid_extent
        query = query + self.position_encoder(normalised.flatten(2))
        sampled = self.sampling(points, query, features, img_from_ego)
        query = self.norm1(self.mixing(sampled, query))
        centres = points.mean(dim=2)
        query = self.norm2(self.self_attn(query, centres))
        query = self.norm3(query + self.ffn(query))

        logits = self.cls_branch(query).view(batch, num_q, self.num_points_out, self.num_classes)
        offsets = self.offset_scale * self.reg_branch(query).view(batch, num_q, self.num_points_out, 3)
        new_points = centres[:, :, None] + offsets
        return query, new_points, logits
