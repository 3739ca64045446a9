"""Probabilistic Gaussian superposition (GaussianFormer-2) splatted onto a voxel grid, pure PyTorch.

Each Gaussian i has a mean m_i, per-axis scales s_i, a rotation quaternion q_i = (w, x, y, z), an
opacity o_i in (0, 1) and a distribution c_i over the K-1 non-free classes. With
``Sigma_i = R_i diag(s_i^2) R_i^T`` (R_i the rotation matrix of the unit quaternion, so the
Gaussian's principal axes are the columns of R_i) and ``g_i(x) = exp(-0.5 d^T Sigma_i^-1 d)``,
``d = x - m_i``, the field at a voxel centre x is

    occupancy      a(x)   = 1 - prod_i (1 - o_i g_i(x))                 (probabilistic geometry)
    semantics      e_k(x) = sum_i w_i(x) c_ik / sum_i w_i(x),  w_i = o_i g_i(x)   (Gaussian mixture)
    probabilities  p_k = a e_k (k < K-1),   p_free = p_{K-1} = 1 - a

so ``sum_k p_k = 1`` exactly. Where no Gaussian reaches a voxel (sum_i w_i below 1e-12) the mixture
is undefined and e is uniform (as GaussianFormer-2's kernel); there a = 0, so p is one-hot free.

Differences from GaussianFormer-2's released code (``localagg_prob``), both selectable:
- its geometry uses ``g_i`` without the opacity (``opacity_in_geometry=False``); here, by default,
  a Gaussian can also be made transparent, which lets a badly placed Gaussian fade out;
- its mixture weights carry the Gaussian's density normalisation, ``w_i = o_i g_i / (s_x s_y s_z)``
  (``density_normalised=True``; the constant (2 pi)^-1.5 cancels).
- its covariance is ``R^T S^2 R`` (the quaternion's conjugate rotation): porting its weights needs
  ``q -> (w, -x, -y, -z)``.

Evaluation is local: Gaussian i is evaluated only on the voxels whose centres lie in the axis-
aligned box of half-width ``cutoff * max(s_i)`` around m_i, so every omitted term has
``g_i < exp(-cutoff^2 / 2)`` (3 sigma: 0.011; 4 sigma: 3.4e-4) and the occupancy error is at most
``sum_i o_i exp(-cutoff^2 / 2)`` over the Gaussians that were cut. The (Gaussian, voxel) pairs are
expanded in chunks of about ``chunk_size`` pairs; each chunk adds ``log(1 - o g)`` (the product
becomes a sum of logs), ``w`` and ``w c`` into per-voxel buffers with ``index_add``. Memory is bounded
by the chunk in inference; in training autograd keeps every chunk's intermediates unless
``checkpoint=True`` recomputes each chunk in the backward pass (memory bounded by one chunk, about
1.5x the time). The box uses detached scales: it is piecewise constant, so gradients are exact.

Class order: the output has free LAST (Occ3D-nuScenes: free = 17 = K-1, nothing to do). A table
whose free class is elsewhere (Occ-ScanNet: empty = 0) maps with :func:`free_last_to_table` /
:func:`table_to_free_last`.

Shapes: B batch, G Gaussians, K classes including free, X Y Z voxels, P pairs.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint as _checkpoint

from occdistill.geometry.grid import VoxelGrid

_EMPTY_WEIGHT = 1e-12  # sum_i w_i below this: no Gaussian reaches the voxel (GaussianFormer-2 uses 1e-9)
_LOG_FLOOR = 1e-12  # smallest occupancy whose log is taken (log 1e-12 = -27.6)
_TINY = 1e-30  # smallest mixture numerator whose log is taken (float32 normals reach 1.2e-38)
_MIN_LOG_PROB = -70.0  # floor of log_probs (exp(-70) = 4e-31)
_MAX_ALPHA = 1.0 - 1e-6  # log(1 - alpha) stays finite (a single Gaussian gives at most p_free >= 1e-6)


@dataclass
class SplatOutput:
    """probs (B, X, Y, Z, K) with free last, sums to 1; log_probs (B, X, Y, Z, K), the same
    distribution computed in log space (exact ``log p_free = sum_i log(1 - o_i g_i)``; other entries
    floored at log 1e-12), the input a cross-entropy needs; pairs: number of (Gaussian, voxel)
    pairs evaluated."""

    probs: torch.Tensor
    log_probs: torch.Tensor
    pairs: int


def quaternion_to_matrix(q: torch.Tensor) -> torch.Tensor:
    """Quaternions (..., 4) as (w, x, y, z), normalised here -> rotation matrices (..., 3, 3)."""
    q = q / q.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    w, x, y, z = q.unbind(-1)
    rows = (
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
    )
    return torch.stack(rows, dim=-1).unflatten(-1, (3, 3))


def precision_matrices(scales: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """Inverse covariances ``R diag(1/s^2) R^T`` (..., 3, 3) from scales (..., 3) and quaternions (..., 4)."""
    rot = quaternion_to_matrix(rotations)
    return (rot / scales.unsqueeze(-2) ** 2) @ rot.transpose(-1, -2)


def free_last_to_table(x: torch.Tensor, free_index: int) -> torch.Tensor:
    """Class axis (last) from the free-last layout to a table whose free class is ``free_index``
    (Occ-ScanNet: 0). Identity when free_index is already K-1."""
    num = x.shape[-1]
    free_index = free_index % num
    if free_index == num - 1:
        return x
    return torch.cat([x[..., :free_index], x[..., -1:], x[..., free_index:-1]], dim=-1)


def table_to_free_last(x: torch.Tensor, free_index: int) -> torch.Tensor:
    """Inverse of :func:`free_last_to_table`: move class ``free_index`` of the last axis to the end."""
    num = x.shape[-1]
    free_index = free_index % num
    if free_index == num - 1:
        return x
    return torch.cat([x[..., :free_index], x[..., free_index + 1:], x[..., free_index:free_index + 1]], dim=-1)


def bev_collapse(probs: torch.Tensor, free_index: int = -1) -> torch.Tensor:
    """Top-down compositing of a 3D distribution (DESIGN.md section 6): (B, X, Y, Z, K) -> (B, X, Y, K).

    Looking down the column (z up, so from the highest z index), the BEV cell shows class k of voxel
    z with probability ``p_zk prod_{z' > z} p_free,z'`` and is free with ``prod_z p_free,z``: this is
    ``sum_z w_z e_zk`` with ``w_z = a_z prod_{z'>z} (1 - a_z')`` written without dividing by a_z. It
    sums to 1 (telescoping), and its hard version is "class of the top-most occupied voxel".
    """
    free = probs[..., free_index]  # (B, X, Y, Z)
    # transmittance from the top down to (excluding) z: exclusive reverse cumulative product
    above = torch.cumprod(free.flip(-1), dim=-1).flip(-1)  # prod_{z' >= z}
    trans = torch.cat([above[..., 1:], torch.ones_like(above[..., :1])], dim=-1)  # prod_{z' > z}
    bev = (probs * trans.unsqueeze(-1)).sum(dim=-2)
    return bev.index_copy(-1, torch.tensor([free_index % probs.shape[-1]], device=probs.device),
                          above[..., :1])


def _pair_boxes(means: torch.Tensor, scales: torch.Tensor, grid: VoxelGrid, cutoff: float):
    """Per Gaussian (flattened (G',)) the voxel box it is evaluated on: lower corner (G', 3) int64
    and extent (G', 3) int64 (0 on an axis where the box misses the grid)."""
    lo = torch.as_tensor(grid.lower, dtype=torch.float64, device=means.device)
    size = torch.as_tensor(grid.size, dtype=torch.float64, device=means.device)
    shape = torch.as_tensor(grid.shape, dtype=torch.int64, device=means.device)
    radius = cutoff * scales.detach().double().amax(dim=-1, keepdim=True)  # (G', 1) metres
    centre = (means.detach().double() - lo) / size - 0.5  # continuous index of the mean
    # voxel i has its centre at index i: keep |i - centre| <= radius / size on every axis
    first = torch.ceil(centre - radius / size).clamp(min=0).long()
    last = torch.minimum(torch.floor(centre + radius / size).long(), shape - 1)
    extent = (last - first + 1).clamp(min=0)
    return first, extent


def _chunk_values(
    means: torch.Tensor,
    precision: torch.Tensor,
    opacities: torch.Tensor,
    weights_scale: torch.Tensor | None,
    semantics: torch.Tensor,
    first: torch.Tensor,
    extent: torch.Tensor,
    voxel_offset: torch.Tensor,
    grid: VoxelGrid,
    opacity_in_geometry: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk of G_c Gaussians -> per-pair values (P, 2 + K-1) = [log(1 - alpha), w, w c_k] and
    their flat voxel indices (P,) (``voxel_offset`` (G_c,) = b * V of each Gaussian's sample).

    The pairs are enumerated here (not passed in) so that a checkpointed chunk keeps no per-pair
    tensor alive between forward and backward."""
    device, dtype = means.device, means.dtype
    counts = extent.prod(dim=-1)  # (G_c,)
    total = int(counts.sum())
    gid = torch.repeat_interleave(torch.arange(len(counts), device=device), counts, output_size=total)  # (P,)
    start = torch.cumsum(counts, 0) - counts
    local = torch.arange(total, device=device) - start[gid]  # position inside the Gaussian's box
    ext = extent[gid]
    iz = local % ext[:, 2]
    rest = local // ext[:, 2]
    idx = first[gid] + torch.stack([rest // ext[:, 1], rest % ext[:, 1], iz], dim=-1)  # (P, 3) voxel
    lo = torch.as_tensor(grid.lower, dtype=dtype, device=device)
    size = torch.as_tensor(grid.size, dtype=dtype, device=device)
    d = lo + (idx.to(dtype) + 0.5) * size - means[gid]  # (P, 3)
    mahal = torch.einsum("pi,pij,pj->p", d, precision[gid], d)
    g = torch.exp(-0.5 * mahal)
    w = opacities[gid] * g
    alpha = w if opacity_in_geometry else g
    log_free = torch.log1p(-alpha.clamp(max=_MAX_ALPHA))
    if weights_scale is not None:
        w = w * weights_scale[gid]
    vals = torch.cat([log_free[:, None], w[:, None], w[:, None] * semantics[gid]], dim=-1)
    _, ny, nz = grid.shape
    vox = voxel_offset[gid] + (idx[:, 0] * ny + idx[:, 1]) * nz + idx[:, 2]
    return vals, vox


def splat_gaussians(
    means: torch.Tensor,
    scales: torch.Tensor,
    rotations: torch.Tensor,
    opacities: torch.Tensor,
    semantics: torch.Tensor,
    grid: VoxelGrid,
    cutoff: float = 3.0,
    chunk_size: int = 1 << 18,
    opacity_in_geometry: bool = True,
    density_normalised: bool = False,
    checkpoint: bool = False,
) -> SplatOutput:
    """Splat Gaussians into K-way voxel probabilities with free last.

    Args:
        means: (B, G, 3) metres, in the grid's frame (may lie outside the grid).
        scales: (B, G, 3) metres, > 0 (standard deviations along the principal axes).
        rotations: (B, G, 4) quaternions (w, x, y, z), normalised here.
        opacities: (B, G) in (0, 1).
        semantics: (B, G, K-1) class probabilities over the non-free classes (softmax of logits).
        grid: the voxel grid; the output is (B, X, Y, Z, K).
        cutoff: evaluation radius in units of each Gaussian's largest scale.
        chunk_size: (Gaussian, voxel) pairs per chunk (a chunk holds whole Gaussians, so one very
            large Gaussian may exceed it).
        opacity_in_geometry: ``a = 1 - prod(1 - o g)`` (True) or GaussianFormer-2's ``1 - prod(1 - g)``.
        density_normalised: mixture weights ``o g / (s_x s_y s_z)`` (GaussianFormer-2) instead of ``o g``.
        checkpoint: recompute chunks in backward (bounded memory in training).

    Computed in at least float32 (float64 inputs stay float64).
    """
    batch, num_g = means.shape[:2]
    if scales.shape != (batch, num_g, 3) or rotations.shape != (batch, num_g, 4) or opacities.shape != (batch, num_g):
        raise ValueError(
            f"Gaussian shapes disagree: means {tuple(means.shape)}, scales {tuple(scales.shape)}, "
            f"rotations {tuple(rotations.shape)}, opacities {tuple(opacities.shape)}"
        )
    if semantics.shape[:2] != (batch, num_g):
        raise ValueError(f"semantics {tuple(semantics.shape)} must be (B, G, K-1) with B, G = {batch}, {num_g}")
    if cutoff <= 0 or chunk_size < 1:
        raise ValueError(f"cutoff ({cutoff}) and chunk_size ({chunk_size}) must be positive")
    dtype = torch.promote_types(means.dtype, torch.float32)
    means, scales, rotations, opacities, semantics = (
        t.to(dtype) for t in (means, scales, rotations, opacities, semantics)
    )
    nx, ny, nz = grid.shape
    per_batch = nx * ny * nz
    num_sem = semantics.shape[-1]

    # Flatten the batch: Gaussian j of sample b writes into voxels b*V + v.
    flat_means = means.reshape(-1, 3)
    flat_scales = scales.reshape(-1, 3)
    precision = precision_matrices(flat_scales, rotations.reshape(-1, 4))  # (B*G, 3, 3)
    flat_opa = opacities.reshape(-1)
    flat_sem = semantics.reshape(-1, num_sem)
    weights_scale = 1.0 / flat_scales.prod(dim=-1) if density_normalised else None
    offset = torch.arange(batch, device=means.device).repeat_interleave(num_g) * per_batch  # (B*G,)
    first, extent = _pair_boxes(flat_means, flat_scales, grid, cutoff)
    counts = extent.prod(dim=-1)
    cum = torch.cumsum(counts, 0).tolist()
    total_pairs = cum[-1] if cum else 0

    # index_add_ saves only the (P,) indices for backward; sums starts without grad and joins the
    # graph through the first chunk.
    sums = torch.zeros(batch * per_batch, 2 + num_sem, dtype=dtype, device=means.device)
    use_ckpt = checkpoint and torch.is_grad_enabled()
    start, done = 0, 0
    while start < len(cum):
        # the most Gaussians whose pairs fit in the chunk, at least one
        end = max(start + 1, bisect.bisect_right(cum, done + chunk_size))
        if cum[end - 1] > done:
            sl = slice(start, end)
            args = (flat_means[sl], precision[sl], flat_opa[sl],
                    None if weights_scale is None else weights_scale[sl], flat_sem[sl],
                    first[sl], extent[sl], offset[sl], grid, opacity_in_geometry)
            if use_ckpt:
                vals, vox = _checkpoint(_chunk_values, *args, use_reentrant=False)
            else:
                vals, vox = _chunk_values(*args)
            sums.index_add_(0, vox, vals)
        done = cum[end - 1]
        start = end

    sums = sums.view(batch, nx, ny, nz, 2 + num_sem)
    log_free = sums[..., 0]  # sum_i log(1 - alpha_i) <= 0
    weight = sums[..., 1]
    numer = sums[..., 2:]
    reached = weight > _EMPTY_WEIGHT
    safe_w = weight.clamp(min=_EMPTY_WEIGHT).unsqueeze(-1)
    uniform = torch.full_like(numer, 1.0 / num_sem)
    mix = torch.where(reached.unsqueeze(-1), numer / safe_w, uniform)
    p_free = torch.exp(log_free)
    occ = -torch.expm1(log_free)  # 1 - p_free, accurate where p_free is close to 1
    probs = torch.cat([occ.unsqueeze(-1) * mix, p_free.unsqueeze(-1)], dim=-1)
    log_mix = torch.where(
        reached.unsqueeze(-1), numer.clamp(min=_TINY).log() - safe_w.log(), uniform.log()
    )
    log_occ = occ.clamp(min=_LOG_FLOOR).log().unsqueeze(-1)
    log_probs = torch.cat([(log_occ + log_mix).clamp(min=_MIN_LOG_PROB), log_free.unsqueeze(-1)], dim=-1)
    return SplatOutput(probs=probs, log_probs=log_probs, pairs=int(total_pairs))
