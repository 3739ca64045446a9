"""BEV pooling ("splat") of frustum features into a BEV grid, in pure PyTorch.

Every frustum point (one per camera, depth bin and feature cell) carries a C-vector and an ego
position. The BEV cell (x, y) receives the SUM of the vectors of all points with
``xmin + x*sx <= px < xmin + (x+1)*sx``, the same for y, and ``zmin <= pz < zmax`` (all heights
of the grid collapse into one pillar, as FlashOcc's single 6.4 m z bin). Points outside are
dropped. (FlashOcc truncates coordinates toward zero with ``.long()``, which also keeps points up
to one cell below/outside the range, e.g. rays already under the ground down to z = -7.4 m; we
floor and drop them.)

Two interchangeable implementations with identical results:

* :func:`bev_pool_scatter` (training): cell indices computed on the fly from per-sample geometry
  (augmentation changes it every batch), one ``index_add_`` per batch. Dropped points go to a
  spare "dump" row that is sliced off, so there is no boolean compaction and no host sync.
  ``index_add_`` uses atomics on CUDA (not bitwise deterministic).
* :func:`bev_pool_precomputed` (deployment, ONNX-exportable): for a FIXED camera rig the indices are
  computed once by :func:`precompute_pool_indices`, then the forward uses only Gather, CumSum,
  ReduceMean, Concat, Reshape, Transpose and elementwise ops (the cumsum-difference trick of LSS's
  QuickCumsum / BEVPoolv2's interval sums, on mean-centred values to limit float32 cancellation).
  It needs no plugin; exports with both torch exporters at opsets 11 and 17 matched onnxruntime to
  ~1e-7. ``scatter_add`` would export correctly only at opset >= 16 and ``index_put(accumulate)``
  exports silently wrong with the TorchScript exporter (research/flashocc.md section 3.3). The
  cumsum runs over all kept points: keep it in fp32 (fp16 prefix sums over 1e5 rows lose ~1e-2).

Shapes: B batch, N cameras, D depth bins, h w feature map, C channels, X Y BEV cells; output
(B, C, X, Y) indexed [x, y] like the occupancy grid (DESIGN.md section 3). R = N*D*h*w frustum
points per sample, P kept points, I non-empty cells.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from occdistill.geometry import VoxelGrid


def bev_cell_index(points: torch.Tensor, grid: VoxelGrid) -> tuple[torch.Tensor, torch.Tensor]:
    """Ego points (..., 3) -> (flat BEV cell ``x*Y + y`` (...) int64, kept (...) bool).

    Dropped points (outside the x/y range or the z range) get cell 0 and ``kept = False``. Both
    pooling paths use this one function, so they agree even for points on cell boundaries.
    """
    num_x, num_y, _ = grid.shape
    xmin, ymin, zmin, _, _, zmax = grid.range
    sx, sy, _ = grid.voxel_size
    # Compare in float before casting: far-away or non-finite coordinates must not overflow int64.
    fx = (points[..., 0] - xmin) / sx
    fy = (points[..., 1] - ymin) / sy
    z = points[..., 2]
    kept = (fx >= 0) & (fx < num_x) & (fy >= 0) & (fy < num_y) & (z >= zmin) & (z < zmax)
    ix = torch.where(kept, fx, torch.zeros_like(fx)).floor().long().clamp(max=num_x - 1)
    iy = torch.where(kept, fy, torch.zeros_like(fy)).floor().long().clamp(max=num_y - 1)
    return ix * num_y + iy, kept


def bev_pool_scatter(frustum: torch.Tensor, points: torch.Tensor, grid: VoxelGrid) -> torch.Tensor:
    """Training path: frustum features (B, N, D, h, w, C) at ego points (B, N, D, h, w, 3) -> (B, C, X, Y).

    Geometry may differ per sample. Differentiable w.r.t. ``frustum`` (not w.r.t. the points:
    cell membership is piecewise constant).
    """
    if frustum.shape[:-1] != points.shape[:-1] or points.shape[-1] != 3 or frustum.dim() != 6:
        raise ValueError(f"frustum (B,N,D,h,w,C) {tuple(frustum.shape)} and points (B,N,D,h,w,3) "
                         f"{tuple(points.shape)} do not match")
    batch, channels = frustum.shape[0], frustum.shape[-1]
    num_x, num_y, _ = grid.shape
    cells = num_x * num_y
    cell, kept = bev_cell_index(points, grid)  # (B, N, D, h, w)
    offset = torch.arange(batch, device=cell.device).view(batch, 1, 1, 1, 1) * cells
    dump = batch * cells
    target = torch.where(kept, cell + offset, torch.full_like(cell, dump)).reshape(-1)  # (B*R,)
    out = frustum.new_zeros(dump + 1, channels).index_add_(0, target, frustum.reshape(-1, channels))
    # (B*X*Y, C) -> (B, X, Y, C) -> (B, C, X, Y)
    return out[:dump].view(batch, num_x, num_y, channels).permute(0, 3, 1, 2).contiguous()


@dataclass(frozen=True)
class BEVPoolIndices:
    """Pooling plan of one fixed rig (no batch dimension: every sample shares the geometry).

    point_index: (P,) int64, frustum row (in the flattened N*D*h*w points) of every kept point,
        sorted by BEV cell so that each non-empty cell is one contiguous run.
    interval_end: (I,) int64, position in ``point_index`` of the last point of each run.
    cell_interval: (X*Y,) int64, for BEV cell ``x*Y + y``: 1 + its run number, 0 if empty.
    frustum_shape: (N, D, h, w) the plan was computed for.
    grid_shape: (X, Y).
    """

    point_index: torch.Tensor
    interval_end: torch.Tensor
    cell_interval: torch.Tensor
    frustum_shape: tuple[int, int, int, int]
    grid_shape: tuple[int, int]


def precompute_pool_indices(points: torch.Tensor, grid: VoxelGrid) -> BEVPoolIndices:
    """Ego points of a fixed rig (N, D, h, w, 3) -> :class:`BEVPoolIndices` (run once, not per frame)."""
    if points.dim() != 5 or points.shape[-1] != 3:
        raise ValueError(f"rig points must be (N, D, h, w, 3), got {tuple(points.shape)}")
    num_x, num_y, _ = grid.shape
    cell, kept = bev_cell_index(points, grid)
    cell, kept = cell.reshape(-1), kept.reshape(-1)
    rows = kept.nonzero().squeeze(1)
    order = torch.argsort(cell[rows], stable=True)
    rows = rows[order]
    sorted_cells = cell[rows]
    is_end = torch.ones_like(sorted_cells, dtype=torch.bool)
    is_end[:-1] = sorted_cells[1:] != sorted_cells[:-1]
    interval_end = is_end.nonzero().squeeze(1)
    cell_interval = torch.zeros(num_x * num_y, dtype=torch.long, device=points.device)
    cell_interval[sorted_cells[interval_end]] = torch.arange(1, interval_end.numel() + 1, device=points.device)
    return BEVPoolIndices(
        point_index=rows,
        interval_end=interval_end,
        cell_interval=cell_interval,
        frustum_shape=tuple(points.shape[:4]),
        grid_shape=(num_x, num_y),
    )


def bev_pool_precomputed(
    frustum: torch.Tensor, point_index: torch.Tensor, interval_end: torch.Tensor, cell_interval: torch.Tensor,
    grid_shape: tuple[int, int],
) -> torch.Tensor:
    """Exportable path: frustum features (B, N, D, h, w, C) of the fixed rig -> (B, C, X, Y).

    Takes the index tensors of :class:`BEVPoolIndices` separately so that they can be module
    buffers. The batch is folded into channels, so one plan serves any batch size.
    """
    batch, channels = frustum.shape[0], frustum.shape[-1]
    num_x, num_y = grid_shape
    # (B, N, D, h, w, C) -> (B, R, C) -> (R, B, C) -> (R, B*C)
    rows = frustum.reshape(batch, -1, channels).permute(1, 0, 2).reshape(-1, batch * channels)
    values = rows[point_index]  # (P, B*C), in cell order
    # Run sums are differences of a running sum over all P points, so float32 loses ~eps * |running
    # sum|. Subtracting the column mean keeps the running sum a zero-mean walk instead of growing
    # like P * mean (features after ReLU/bias are not centred): 30-60x smaller error at M0 sizes.
    centre = values.mean(dim=0, keepdim=True)  # (1, B*C)
    ends = (values - centre).cumsum(0)[interval_end]  # (I, B*C), running sum at each run's end
    counts = interval_end - torch.cat([interval_end.new_full((1,), -1), interval_end[:-1]])  # (I,) run lengths
    runs = torch.cat([ends[:1], ends[1:] - ends[:-1]], dim=0) + counts[:, None].to(values.dtype) * centre
    sums = torch.cat([runs.new_zeros(1, batch * channels), runs], dim=0)  # (I+1, B*C), row 0 = empty cell
    out = sums[cell_interval]  # (X*Y, B*C)
    # (X*Y, B*C) -> (X, Y, B, C) -> (B, C, X, Y)
    return out.view(num_x, num_y, batch, channels).permute(2, 3, 0, 1).contiguous()


class PrecomputedBEVPool(nn.Module):
    """:func:`bev_pool_precomputed` with the plan of one fixed rig held as (non-persistent) buffers.

    The buffers follow ``.to(device)`` but stay out of the state dict: the plan is derived from the
    calibration, not learned, and its sizes change with the rig.
    """

    def __init__(self, indices: BEVPoolIndices):
        super().__init__()
        self.frustum_shape = indices.frustum_shape
        self.grid_shape = indices.grid_shape
        self.register_buffer("point_index", indices.point_index, persistent=False)
        self.register_buffer("interval_end", indices.interval_end, persistent=False)
        self.register_buffer("cell_interval", indices.cell_interval, persistent=False)

    def forward(self, frustum: torch.Tensor) -> torch.Tensor:
        if tuple(frustum.shape[1:5]) != self.frustum_shape:
            raise ValueError(
                f"frustum (B,N,D,h,w,C) {tuple(frustum.shape)} does not match the fixed rig plan "
                f"(N,D,h,w) = {self.frustum_shape}"
            )
        return bev_pool_precomputed(frustum, self.point_index, self.interval_end, self.cell_interval, self.grid_shape)
