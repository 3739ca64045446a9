"""Ground-plane backward projection: every BEV cell samples the image features where its ground point is seen.

The LSS splat (forward projection) reaches a BEV cell only if some frustum point lands in it; at
1 m depth bins and stride-8 features that is under half of the camera-visible cells within 8 m
of the ego and about a fifth beyond 20 m (benchmarks/results/kd_by_range.md), and what arrives is
smeared by the depth uncertainty. Flat classes (road, sidewalk, terrain, other flat) are told
apart by the colour and texture of the ground itself, so the ground point of a cell is where to
look (a one-height case of the backward projection of BEVFormer / Simple-BEV / FB-BEV):

    p_ego  = (x_c, y_c, height)                  BEV cell centre at the ground height
    (u, v) = pix(K_aug @ inv(ego_from_cam) @ p)  K_aug = img_from_raw @ K; seen if z_cam > 0 and
                                                 (u, v) lies inside the H x W input
    value  = bilinear sample of the feature map at (u, v), clamped to the outer cell centres,
             averaged over the cameras that see the point (zero where none does).

Feature cell (i, j) at stride s looks along input pixel ((j + 1/2) s, (i + 1/2) s)
(view_transform.py), so input pixel u is feature coordinate u / s - 1/2: exactly what
``grid_sample(align_corners=False)`` reads at the normalised ``2 u / W - 1``, whatever the stride.

The geometry (:class:`GroundProjection`) is computed per batch in training and once for a fixed
rig in deployment (:meth:`GroundSampler.set_fixed_rig`). Per batch, :func:`ground_sample_seen`
samples only the (camera, cell) pairs that see the point (gathers and one index_add); for a fixed
rig, :func:`ground_sample` samples every cell in every camera with GridSample, Mul and ReduceSum
(static shapes, ONNX opset >= 16; the export needs 17 anyway). Both give the same numbers.

Shapes: B batch, N cameras, C channels, h w feature map, X Y BEV cells (flattened x-major, as the grid).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from occdistill.geometry import VoxelGrid, img_from_ego_matrices


@dataclass(frozen=True)
class GroundProjection:
    """coords (B, N, X*Y, 2) float32: ``grid_sample`` coordinates (x = u, y = v, align_corners=False)
    of every cell's ground point in camera n; weight (B, N, X*Y) float32: 1 / (cameras seeing the
    point) where camera n sees it, else 0, so a seen cell's weights sum to 1 over the cameras."""

    coords: torch.Tensor
    weight: torch.Tensor


def ground_points(grid: VoxelGrid, height: float) -> torch.Tensor:
    """(4, X*Y) float32 homogeneous ego points: every BEV cell centre (x-major) at ``height`` (m)."""
    xy = torch.from_numpy(grid.centers()[:, :, 0, :2].reshape(-1, 2).T).float()  # (2, X*Y)
    return torch.cat([xy, torch.full_like(xy[:1], height), torch.ones_like(xy[:1])])


def project_ground(
    intrinsics: torch.Tensor,
    img_from_raw: torch.Tensor,
    ego_from_cam: torch.Tensor,
    grid: VoxelGrid,
    image_size: tuple[int, int],
    height: float,
) -> GroundProjection:
    """Cameras (B, N, 3, 3), (B, N, 3, 3), (B, N, 4, 4) -> the projection of every BEV cell centre
    at ``height`` (m, ego frame)."""
    points = ground_points(grid, height).to(intrinsics.device)
    return project_points(intrinsics, img_from_raw, ego_from_cam, points, image_size)


def project_points(
    intrinsics: torch.Tensor,
    img_from_raw: torch.Tensor,
    ego_from_cam: torch.Tensor,
    points: torch.Tensor,
    image_size: tuple[int, int],
) -> GroundProjection:
    """:func:`project_ground` of given homogeneous ego points (4, X*Y) (:func:`ground_points`,
    which :class:`GroundSampler` builds once). The 3x4 camera matrices are composed in float64
    (the calibration's precision); the per-point product runs in float32."""
    img_h, img_w = image_size
    pix = img_from_ego_matrices(intrinsics, img_from_raw, ego_from_cam) @ points  # (B, N, 3, X*Y)
    z = pix[:, :, 2]
    safe_z = torch.where(z > 0, z, torch.ones_like(z))
    u, v = pix[:, :, 0] / safe_z, pix[:, :, 1] / safe_z  # (B, N, X*Y) input pixels
    seen = (z > 0) & (u >= 0) & (u < img_w) & (v >= 0) & (v < img_h)
    views = seen.sum(dim=1, keepdim=True).clamp(min=1)  # (B, 1, X*Y) cameras seeing each cell
    # Unseen points get coordinate 0 (their weight is 0): no inf/NaN ever reaches grid_sample.
    coords = torch.stack([torch.where(seen, 2 * u / img_w - 1, torch.zeros_like(u)),
                          torch.where(seen, 2 * v / img_h - 1, torch.zeros_like(v))], dim=-1)
    return GroundProjection(coords=coords, weight=seen / views)


def ground_sample(features: torch.Tensor, proj: GroundProjection, grid_xy: tuple[int, int]) -> torch.Tensor:
    """features (B, N, C, h, w) -> (B, C, X, Y): each cell the weighted mean over cameras of the
    bilinear feature at its ground point. A projection of batch 1 (a fixed rig) serves any batch."""
    batch, cams, channels, h, w = features.shape
    num_x, num_y = grid_xy
    pb, pn, cells, _ = proj.coords.shape
    if pn != cams or cells != num_x * num_y or pb not in (1, batch):
        raise ValueError(f"ground projection {tuple(proj.coords.shape)} does not fit features "
                         f"{tuple(features.shape)} and grid {num_x}x{num_y}")
    coords = proj.coords.expand(batch, -1, -1, -1).reshape(batch * cams, 1, cells, 2)
    # (B*N, C, h, w) sampled at (B*N, 1, X*Y, 2) -> (B*N, C, 1, X*Y)
    sampled = F.grid_sample(features.reshape(batch * cams, channels, h, w), coords.to(features.dtype),
                            mode="bilinear", padding_mode="border", align_corners=False)
    weight = proj.weight.to(features.dtype).expand(batch, -1, -1)[:, :, None]  # (B, N, 1, X*Y)
    out = (sampled.view(batch, cams, channels, cells) * weight).sum(dim=1)  # (B, C, X*Y)
    return out.view(batch, channels, num_x, num_y)


def ground_sample_seen(features: torch.Tensor, proj: GroundProjection, grid_xy: tuple[int, int]) -> torch.Tensor:
    """:func:`ground_sample` computed only for the (camera, cell) pairs that see the ground point:
    each camera sees a fraction of the cells, so this reads about N times fewer feature cells than
    sampling every cell in every camera (the per-batch path; dynamic sizes, so not for export).

    The same numbers as ``grid_sample(border, align_corners=False)``: normalised x -> feature
    coordinate ``((x + 1) w - 1) / 2`` clamped to [0, w - 1], then the 4 bilinear neighbours."""
    batch, cams, channels, h, w = features.shape
    num_x, num_y = grid_xy
    pb, pn, cells, _ = proj.coords.shape
    if pn != cams or cells != num_x * num_y or pb != batch:
        raise ValueError(f"ground projection {tuple(proj.coords.shape)} does not fit features "
                         f"{tuple(features.shape)} and grid {num_x}x{num_y}")
    b, n, c = proj.weight.nonzero(as_tuple=True)  # (P,) each: the seen pairs
    xy = proj.coords[b, n, c]  # (P, 2) normalised
    fx = (((xy[:, 0] + 1) * w - 1) / 2).clamp(0, w - 1)
    fy = (((xy[:, 1] + 1) * h - 1) / 2).clamp(0, h - 1)
    x0, y0 = fx.floor(), fy.floor()
    ax, ay = (fx - x0)[:, None], (fy - y0)[:, None]  # (P, 1)
    x0, y0 = x0.long(), y0.long()
    x1, y1 = (x0 + 1).clamp(max=w - 1), (y0 + 1).clamp(max=h - 1)
    base = (b * cams + n) * (h * w)  # first feature cell of the pair's camera
    flat = features.permute(0, 1, 3, 4, 2).reshape(-1, channels)  # (B*N*h*w, C)
    value = ((flat[base + y0 * w + x0] * (1 - ax) + flat[base + y0 * w + x1] * ax) * (1 - ay)
             + (flat[base + y1 * w + x0] * (1 - ax) + flat[base + y1 * w + x1] * ax) * ay)  # (P, C)
    value = value * proj.weight[b, n, c].to(features.dtype)[:, None]
    out = features.new_zeros(batch * cells, channels).index_add_(0, b * cells + c, value)  # (B*X*Y, C)
    return out.view(batch, num_x, num_y, channels).permute(0, 3, 1, 2)


class GroundSampler(nn.Module):
    """A 1x1 conv from the neck features to C channels, sampled at every BEV cell's ground point.

    Forward: features (B, N, C_in, h, w) + cameras (as :func:`project_ground`) -> (B, C, X, Y).
    After :meth:`set_fixed_rig` the projection of that rig is held as (non-persistent) buffers and
    the camera matrices are ignored.
    """

    def __init__(self, in_channels: int, out_channels: int, grid: VoxelGrid, image_size: tuple[int, int],
                 height: float):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, out_channels, 1)
        self.grid, self.image_size = grid, tuple(image_size)
        # Built once: the cell centres are fixed, only the cameras change per batch.
        self.register_buffer("points", ground_points(grid, height), persistent=False)
        # Buffers (they follow .to()) outside the state dict: derived from the calibration, not learned.
        self.register_buffer("fixed_coords", None, persistent=False)
        self.register_buffer("fixed_weight", None, persistent=False)

    def project(self, intrinsics: torch.Tensor, img_from_raw: torch.Tensor,
                ego_from_cam: torch.Tensor) -> GroundProjection:
        return project_points(intrinsics, img_from_raw, ego_from_cam, self.points, self.image_size)

    @torch.no_grad()
    def set_fixed_rig(self, intrinsics: torch.Tensor, img_from_raw: torch.Tensor, ego_from_cam: torch.Tensor) -> None:
        """Precompute the projection of one rig: (N, 3, 3), (N, 3, 3), (N, 4, 4)."""
        device = self.proj.weight.device
        self.use_fixed(self.project(*(t.to(device)[None] for t in (intrinsics, img_from_raw, ego_from_cam))))

    def fixed(self) -> GroundProjection | None:
        """The fixed rig's projection in use, None on the per-batch path."""
        if self.fixed_coords is None:
            return None
        return GroundProjection(coords=self.fixed_coords, weight=self.fixed_weight)

    def use_fixed(self, proj: GroundProjection | None) -> None:
        """Sample with ``proj`` from now on (None: project each batch's cameras)."""
        self.fixed_coords, self.fixed_weight = (None, None) if proj is None else (proj.coords, proj.weight)

    def forward(self, features: torch.Tensor, intrinsics: torch.Tensor, img_from_raw: torch.Tensor,
                ego_from_cam: torch.Tensor) -> torch.Tensor:
        batch, cams, channels, h, w = features.shape
        x = self.proj(features.reshape(batch * cams, channels, h, w))  # (B*N, C_in, h, w) -> (B*N, C, h, w)
        x = x.view(batch, cams, -1, h, w)
        proj = self.fixed()
        if proj is None:  # per batch: only the pairs that see the point
            return ground_sample_seen(x, self.project(intrinsics, img_from_raw, ego_from_cam), self.grid.shape[:2])
        return ground_sample(x, proj, self.grid.shape[:2])
