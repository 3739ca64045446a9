"""Height collapse of a 3D class distribution into a BEV one (DESIGN.md section 6).

Top-down compositing: looking down a column from the top layer, layer z is the first occupied
one with probability ``w_z = a_z * prod_{z' above z} (1 - a_z')``, where ``a_z = 1 - p_free(z)``
is its occupancy probability and ``e_zk = p_zk / a_z`` its class distribution given occupied:

    free    = prod_z (1 - a_z)
    class_k = sum_z w_z e_zk = sum_z p_zk * prod_{z' above z} p_free(z')

The second form needs no division (``a_z e_zk = p_zk``), so empty layers (a_z = 0) need no
special case. The weights telescope: ``sum_z w_z + free = 1``, so the result is a distribution.
Its hard version is "class of the top-most occupied voxel, free if the column is empty" -- the
independence (noisy-OR) rule GaussianFormer-2 uses for geometry.

``z_band`` restricts the column to layers ``lo <= z < hi`` (a robot cares about a height band);
layers outside it are ignored, i.e. treated as free.
"""

from __future__ import annotations

from typing import TypeVar

import numpy as np
import torch

Array = TypeVar("Array", np.ndarray, torch.Tensor)

RULE = "topdown"


def collapse_bev(probs: Array, free_index: int, z_band: tuple[int, int] | None = None) -> Array:
    """(..., X, Y, Z, K) probabilities -> (..., X, Y, K) BEV probabilities (same type and dtype).

    Layer index z grows upwards (DESIGN.md section 3: z up), so "above z" means larger indices.
    """
    if isinstance(probs, np.ndarray):
        return collapse_bev(torch.from_numpy(probs), free_index, z_band).numpy()
    if probs.dim() < 4:
        raise ValueError(f"collapse_bev expects (..., X, Y, Z, K), got shape {tuple(probs.shape)}")
    k = probs.shape[-1]
    if not 0 <= free_index < k:
        raise ValueError(f"free index {free_index} outside 0..{k - 1}")
    if z_band is not None:
        lo, hi = z_band
        if not 0 <= lo < hi <= probs.shape[-2]:
            raise ValueError(f"z band {z_band} outside 0..{probs.shape[-2]}")
        probs = probs[..., lo:hi, :]
    p_free = probs[..., free_index]  # (..., X, Y, Z)
    # Transmittance from the top down to (excluding) layer z: reverse cumulative product, shifted.
    from_top = torch.cumprod(p_free.flip(-1), dim=-1)  # [..., j] = prod of the j+1 top layers
    above = torch.cat([torch.ones_like(from_top[..., :1]), from_top[..., :-1]], dim=-1).flip(-1)
    bev = (probs * above.unsqueeze(-1)).sum(dim=-2)  # (..., X, Y, K)
    # The free entry of the sum above is sum_z p_free(z) * above(z), not the empty-column term.
    bev[..., free_index] = from_top[..., -1]
    return bev


def rule_name(z_band: tuple[int, int] | None) -> str:
    """The manifest's ``bev_rule`` string: ``topdown`` or ``topdown z=lo:hi``."""
    return RULE if z_band is None else f"{RULE} z={z_band[0]}:{z_band[1]}"


def parse_rule(rule: str) -> tuple[int, int] | None:
    """Inverse of :func:`rule_name`; ValueError on anything else."""
    if rule == RULE:
        return None
    head, _, band = rule.partition(" z=")
    lo, _, hi = band.partition(":")
    if head != RULE or not lo.isdigit() or not hi.isdigit() or int(lo) >= int(hi):
        raise ValueError(f"unknown BEV rule {rule!r} (expected {RULE!r} or '{RULE} z=lo:hi')")
    return int(lo), int(hi)
