"""RayIoU (SparseOcc): query rays, LiDAR origins, exact first-hit ray casting, streaming accumulator.

What was confirmed, and where (MCG-NJU/SparseOcc; the OPUS and FlashOCC copies compute the same)
--------------------------------------------------------------------------------------------------
``loaders/ego_pose_dataset.py`` (``EgoPoseDataset.__getitem__``), origins of one sample r:
- Every keyframe f of r's scene, **the current frame included**, in info-list order (mmdet3d's
  ``load_annotations`` sorts the infos by timestamp, so: time order).
- f == r: origin = ``lidar2ego_translation`` of r exactly (a float32 zero pushed through
  ``ego_from_lidar_r``). f != r: ``ref_from_curr = inv(global_from_lidar_r) @ global_from_lidar_f``
  (``np.linalg.inv``; poses built with pyquaternion's ``rotation_matrix``), its translation is cast
  to **float32**, then mapped with ``ego_from_lidar_r`` (float64). So origins are LiDAR positions
  expressed in r's **ego** frame.
- Kept if ``|x| < 39 and |y| < 39`` (strict, no z test); when more than 8 remain, indices
  ``np.round(np.linspace(0, n - 1, 8))`` of that list. The collated origins are float64.

``loaders/ray_metrics.py`` (``generate_lidar_rays``, ``process_one_sample``, ``calc_rayiou``,
``main_rayiou``):
- Elevations ``-(pi/2 - atan(k+1))`` for k = 0..9, then the last step (atan(10) - atan(9)) repeated
  while the last elevation is < 0.21 rad: 39 elevations from -45 deg to +12.55 deg; azimuths 0..359
  deg every degree; unit vectors computed in float64 and stored float32: 14,040 rays per origin.
- Occupied = label != free (``sem < 17 -> 1``, ``sem == 17 -> 0``, other values such as 255 keep a
  non-zero value, i.e. occupied). Class 0 "others" is an ordinary occupied class.
- Voxel units: ``((p - pc_range[:3]) / scaler).float()`` where ``scaler`` is a float32 tensor of 0.4,
  so the division is by float64(float32(0.4)); origin and end point (origin + float32 ray, float64)
  are both rounded to float32.
- ``lib/dvr/dvr.cu`` ``render_forward`` phase "test" (double precision): start voxel = C ``int()``
  truncation (towards zero) of the origin; Amanatides-Woo DDA with ``tMax += tDelta`` accumulation;
  ties go to z over x and y and to y over x; at most 1000 moves (``step > MAX_STEP`` breaks);
  stops once it leaves the grid after having been inside. Depth = t at which the ray **exits** the
  first voxel with occupancy > 0.5 (in voxel units, written to a float32 tensor, then ``*= 0.4`` in
  float32); label = that voxel's class. No occupied voxel: depth and voxel of the last in-grid voxel
  (whose label is free). Never inside: depth -1 (-> -0.4 m) and voxel (0, 0, 0), whose label is used.
- Rays whose GT label is free are dropped. For classes c of the table (free included, then dropped):
  GT_c = #kept rays with GT label c, P_c = #kept rays with predicted label c (so a predicted hit of
  the wrong class, or at the wrong depth, is an FP of the predicted class and an FN of the GT
  class), TP_c(tau) = #rays with both labels c and ``|d_pred - d_gt| < tau`` (strict, float32), tau
  in {1, 2, 4} m. Counts are summed over the dataset, ``IoU = TP / (GT + P - TP)`` (NaN only for
  0/0, so a class predicted but absent from GT scores 0), RayIoU@tau = nanmean over the non-free
  classes and RayIoU = nanmean over all thresholds x classes. No camera mask is used.

Consequences worth knowing (all reproduced, none in DESIGN.md section 7):
- When more than 8 keyframes are in range the rounded linspace may skip the current frame itself.
- A ray that never enters the volume (an origin above 5.4 m looking up) keeps depth -0.4 m and the
  label of voxel (0, 0, 0); it is evaluated whenever that voxel is not free in the GT.
- The kernel starts from the truncated (not floored) origin, so for an origin just below a grid
  face the start voxel is the first layer inside.
- Variants: OpenDriveLab/OccNet's CVPR 2024 packaging casts origins to float32 and uses the
  17-class OpenOcc table (free = 16); we follow SparseOcc (float64 origins, Occ3D table).

Our casting is an exact vectorised transcription of that traversal (float64, the same operation
order, the same tie rule), checked against :func:`cast_rays_reference`, a plain per-ray loop. One
trap found on the way: torch's vectorised CPU float64 ``sqrt`` is not correctly rounded (1 ulp off
for ~1.5 % of inputs here) while the kernel's is; the ray norm therefore goes through numpy on CPU.
Validated in a throwaway experiment (nothing of it kept in the repository): SparseOcc also ships
a CPU port of the kernel (``rayiou_metrics/lib/dvr_cpu/dvr_render_cpu.cpp``, commit f33f5ca).
Compiled locally and driven by the official ``process_one_sample`` / ``calc_rayiou``, it gave
per-class RayIoU bit-identical to :class:`RayIoUAccumulator` on three real mini-val frames with
their real origins, and 0 per-ray mismatches (depth and voxel) over 153k rays from 9 origins
inside, outside, on faces and on voxel corners, including axis-aligned and diagonal (tie) rays.
Not verified on a GPU: nvcc may contract ``rx*rx + ry*ry + rz*rz`` into FMAs, which could flip an
exact DDA tie in the last ulp relative to the CPU arithmetic reproduced here.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Sequence

import numpy as np
import torch

from occdistill.data.classes import OCC3D_NUSCENES, ClassTable
from occdistill.geometry.grid import OCC3D_GRID, VoxelGrid
from occdistill.metrics._common import as_label_tensor, nanmean, reduce_sum_distributed, single_thread

RAYIOU_THRESHOLDS: tuple[float, ...] = (1.0, 2.0, 4.0)
MAX_ORIGINS = 8
ORIGIN_MAX_ABS_XY = 39.0
# dvr.cu MAX_STEP: the traversal breaks once more than this many moves were made.
MAX_DDA_STEPS = 1000
_DBL_MAX = sys.float_info.max
_BORDER = -1  # int8 code of the one-voxel border around the grid (all bits set)
# Live set compaction when fewer than this fraction of the rows still need stepping: trades the
# wasted steps of resolved rays against the cost of the gather.
_COMPACT_BELOW = 0.7
_MAX_GRIDS = 7  # grids cast together share one int8 code per voxel (bits 0..6)


# --------------------------------------------------------------------------------------------
# Query rays and origins
# --------------------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def _lidar_rays() -> np.ndarray:
    # Same arithmetic as the reference generator (scalar float64 trig per ray, then float32), so
    # that the float32 directions are bit-identical; 14,040 scalar evaluations, done once.
    pitch = [-(math.pi / 2 - math.atan(k + 1)) for k in range(10)]
    while pitch[-1] < 0.21:
        pitch.append(pitch[-1] + (pitch[-1] - pitch[-2]))
    rays = []
    for p in pitch:
        for az_deg in np.arange(0, 360, 1):
            az = np.deg2rad(az_deg)
            rays.append((np.cos(p) * np.cos(az), np.cos(p) * np.sin(az), np.sin(p)))
    out = np.array(rays, dtype=np.float32)
    out.flags.writeable = False
    return out


def lidar_ray_directions() -> np.ndarray:
    """(R = 14040, 3) float32 unit directions, elevation-major (39 elevations x 360 azimuths)."""
    return _lidar_rays().copy()


def _pyquaternion_rotation(q_wxyz: Any) -> np.ndarray:
    # pyquaternion's ``rotation_matrix`` (normalise unless |q|^2 is within 1e-14 of 1, then the
    # lower-right 3x3 of Q(q) @ Qbar(q)^T), reproduced so origins match the reference to the ulp.
    q = np.array(q_wxyz, dtype=np.float64).reshape(4)
    if not abs(1.0 - np.dot(q, q)) < 1e-14:
        n = math.sqrt(np.dot(q, q))
        if n > 0:
            q = q / n
    w, x, y, z = q
    qm = np.array([[w, -x, -y, -z], [x, w, -z, y], [y, z, w, -x], [z, -y, x, w]])
    qb = np.array([[w, -x, -y, -z], [x, w, z, -y], [y, -z, w, x], [z, y, -x, w]])
    return np.dot(qm, qb.conj().transpose())[1:][:, 1:]


def _pose(translation: Any, rotation: Any) -> np.ndarray:
    t = np.eye(4)
    rot = np.asarray(rotation, dtype=np.float64)
    t[:3, :3] = _pyquaternion_rotation(rot) if rot.shape == (4,) else rot
    t[:3, 3] = np.asarray(translation, dtype=np.float64)
    return t


def _frame_poses(frame: Any) -> tuple[np.ndarray, np.ndarray]:
    """(ego_from_lidar, global_from_lidar) of a FrameInfo, built like the reference when the raw
    info has nuScenes quaternion fields, else from the parsed 4x4 matrices."""
    raw = getattr(frame, "raw", None) or {}
    keys = ("lidar2ego_translation", "lidar2ego_rotation", "ego2global_translation", "ego2global_rotation")
    if all(k in raw for k in keys):
        ego_from_lidar = _pose(raw["lidar2ego_translation"], raw["lidar2ego_rotation"])
        global_from_ego = _pose(raw["ego2global_translation"], raw["ego2global_rotation"])
    else:
        ego_from_lidar = np.asarray(frame.ego_from_lidar, dtype=np.float64)
        global_from_ego = np.asarray(frame.global_from_ego, dtype=np.float64)
    return ego_from_lidar, global_from_ego.dot(ego_from_lidar)


def lidar_origins(
    scene_frames: Sequence[Any],
    ref: Any,
    max_origins: int = MAX_ORIGINS,
    max_abs_xy: float = ORIGIN_MAX_ABS_XY,
) -> np.ndarray:
    """RayIoU origins of sample ``ref``: (T, 3) float64 in ``ref``'s ego frame, 1 <= T <= 8.

    ``scene_frames`` are the keyframes of ``ref``'s scene in time order (``InfoSet.scene_frames``),
    ``ref`` among them; each needs ``ego_from_lidar`` / ``global_from_ego`` (or the raw nuScenes
    quaternion fields, preferred because the reference builds its poses from them).
    """
    ref_index = next((i for i, f in enumerate(scene_frames) if f is ref), None)
    if ref_index is None:
        ref_index = next((i for i, f in enumerate(scene_frames) if f.token == ref.token), None)
    if ref_index is None:
        raise ValueError(f"sample {ref.token} is not among the {len(scene_frames)} frames given for its scene")
    ref_ego_from_lidar, ref_global_from_lidar = _frame_poses(ref)
    ref_lidar_from_global = np.linalg.inv(ref_global_from_lidar)
    kept = []
    for i, frame in enumerate(scene_frames):
        if i == ref_index:
            origin_lidar = np.zeros(3, dtype=np.float32)
        else:
            ref_from_curr = ref_lidar_from_global.dot(_frame_poses(frame)[1])
            origin_lidar = np.array(ref_from_curr[:3, 3], dtype=np.float32)
        pad = np.ones(4)
        pad[:3] = origin_lidar
        origin = np.dot(ref_ego_from_lidar[:3], pad.T).T
        if np.abs(origin[0]) < max_abs_xy and np.abs(origin[1]) < max_abs_xy:
            kept.append(origin)
    if len(kept) > max_origins:
        idx = np.round(np.linspace(0, len(kept) - 1, max_origins)).astype(np.int64)
        kept = [kept[i] for i in idx]
    if not kept:
        raise ValueError(f"sample {ref.token}: no LiDAR origin within |x|,|y| < {max_abs_xy} m")
    return np.stack(kept).astype(np.float64)


def _check_isotropic(grid: VoxelGrid) -> float:
    vs = grid.voxel_size
    if not (vs[0] == vs[1] == vs[2]):
        raise ValueError(f"RayIoU needs cubic voxels (depths are voxel units x one size), got {vs}")
    return vs[0]


def rays_in_voxel_units(
    origins: np.ndarray | torch.Tensor,
    directions: np.ndarray | torch.Tensor,
    grid: VoxelGrid = OCC3D_GRID,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Origins (T, 3) metres and directions (R, 3) -> (origin (T, 3), end (T, R, 3)) float32 voxel units.

    Same dtypes as the reference: end = float32 direction + float64 origin, both shifted by the grid
    minimum and divided by float32(voxel size) in float64, then rounded to float32.
    """
    vs = _check_isotropic(grid)
    o = torch.as_tensor(np.asarray(origins, dtype=np.float64) if not torch.is_tensor(origins) else origins)
    o = o.to(device=device, dtype=torch.float64).reshape(-1, 3)
    d = torch.as_tensor(directions).to(device=device, dtype=torch.float32).reshape(-1, 3)
    offset = torch.tensor(grid.range[:3], dtype=torch.float32, device=o.device)
    scaler = torch.tensor([vs] * 3, dtype=torch.float32, device=o.device)
    origin_vox = ((o - offset) / scaler).float()
    end_vox = ((d[None, :, :] + o[:, None, :]) - offset) / scaler
    return origin_vox, end_vox.float()


# --------------------------------------------------------------------------------------------
# Ray casting
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RayHits:
    """First-hit results of N = T*R rays (origin-major) against G occupancy grids.

    ``depth`` (G, N) float64, voxel units: t at which the ray exits its first occupied voxel, or the
    exit t of its last in-grid voxel when it hits nothing, or -1 when it never enters the grid.
    ``voxel`` (G, N, 3) int64 [x, y, z] of that voxel ((0, 0, 0) for rays that never enter).
    """

    depth: torch.Tensor
    voxel: torch.Tensor


def _sqrt_ieee(x: torch.Tensor) -> torch.Tensor:
    # torch's vectorised CPU float64 sqrt is not always correctly rounded (1 ulp off on ~1.5% of
    # inputs on this machine), while dvr.cu's ``sqrt`` is IEEE; numpy's sqrt is exact. CUDA's
    # double sqrt is IEEE round-to-nearest.
    if x.device.type == "cpu":
        return torch.from_numpy(np.sqrt(x.contiguous().numpy()))
    return torch.sqrt(x)


def _ray_setup(origin_vox: torch.Tensor, end_vox: torch.Tensor, device: torch.device):
    """Per-ray DDA state in float64, as dvr.cu sets it up. N = T*R rays, origin-major.

    Returns v0 (N, 3) int64 start voxel (C truncation of the origin), step (N, 3) int64 (+-1),
    tmax (N, 3) t of the first boundary crossing per axis, tdelta (N, 3) t per voxel per axis
    (DBL_MAX on axes the ray does not move along).
    """
    T = origin_vox.shape[0]
    R = end_vox.shape[1]
    o = origin_vox.to(device=device, dtype=torch.float64)
    e = end_vox.to(device=device, dtype=torch.float64).reshape(T, R, 3)
    o_ray = o[:, None, :].expand(T, R, 3).reshape(-1, 3)
    r = e.reshape(-1, 3) - o_ray
    rx, ry, rz = r.unbind(1)
    norm = _sqrt_ieee(rx * rx + ry * ry + rz * rz)
    d = r / norm[:, None]
    forward = (d >= 0).to(torch.int64)
    step = forward * 2 - 1
    v0 = torch.trunc(o).to(torch.int64)[:, None, :].expand(T, R, 3).reshape(-1, 3)
    boundary = (v0 + forward).to(torch.float64)
    still = d == 0
    tmax = ((boundary - o_ray) / d).masked_fill_(still, _DBL_MAX)
    tdelta = (step.to(torch.float64) / d).masked_fill_(still, _DBL_MAX)
    return v0, step, tmax, tdelta


def cast_rays(
    occupied: torch.Tensor,
    origin_vox: torch.Tensor,
    end_vox: torch.Tensor,
    max_steps: int = MAX_DDA_STEPS,
) -> RayHits:
    """Exact first-hit casting of all rays of all origins at once, against G grids together.

    occupied: (G, X, Y, Z) or (X, Y, Z) bool, G <= 7. origin_vox: (T, 3) float32 voxel units.
    end_vox: (T, R, 3) float32 voxel units (origin + direction). Vectorised over rays: each loop
    iteration is one Amanatides-Woo step of every live ray; a ray leaves the live set once it has
    been resolved in every grid. Sharing the traversal between GT and prediction costs
    max(path lengths) instead of their sum. Bit-identical to :func:`cast_rays_reference` (same
    float64 operations in the same order, same tie rule, same move limit).
    """
    if occupied.dim() == 3:
        occupied = occupied[None]
    _, X, Y, Z = occupied.shape
    depth, flat = _cast(occupied, origin_vox, end_vox, max_steps)
    pz = flat % (Z + 2)
    rest = flat // (Z + 2)
    voxel = torch.stack([rest // (Y + 2) - 1, rest % (Y + 2) - 1, pz - 1], dim=-1)
    return RayHits(depth=depth, voxel=voxel)


def _cast(
    occupied: torch.Tensor, origin_vox: torch.Tensor, end_vox: torch.Tensor, max_steps: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`cast_rays` with the voxel as an index into the grid padded by one voxel on every
    side: depth (G, N) float64, flat (G, N) int64."""
    if occupied.dim() == 3:
        occupied = occupied[None]
    G, X, Y, Z = occupied.shape
    if G > _MAX_GRIDS:
        raise ValueError(f"at most {_MAX_GRIDS} grids per call, got {G}")
    dev = occupied.device
    N = origin_vox.shape[0] * end_vox.shape[1]
    with single_thread(dev):
        v, step, tmax, tdelta = _ray_setup(origin_vox, end_vox, dev)
        size = torch.tensor([X, Y, Z], device=dev)

        # Code grid with a one-voxel border: bit g = occupied in grid g, the border is _BORDER.
        # A live ray moves one voxel at a time, so it cannot skip the border; one lookup per step
        # answers both "occupied in which grids" and "left the volume".
        code = torch.full((X + 2, Y + 2, Z + 2), _BORDER, dtype=torch.int8, device=dev)
        inner = code[1:-1, 1:-1, 1:-1]
        inner.zero_()
        for g in range(G):
            inner |= occupied[g].to(torch.int8) << g
        code = code.reshape(-1)
        strides = torch.tensor([(Y + 2) * (Z + 2), Z + 2, 1], device=dev)

        # Phase A (rare: an origin outside the volume, e.g. a keyframe above the 5.4 m ceiling).
        inside = ((v >= 0) & (v < size)).all(1)
        moves = torch.zeros(N, dtype=torch.int64, device=dev)
        entered = [inside.nonzero().squeeze(1)]
        if not bool(inside.all()):
            entered.append(_enter_volume((~inside).nonzero().squeeze(1), v, step, tmax, tdelta, moves, size, max_steps))

        # Phase B: every ray that is still cast is inside the volume.
        depth = torch.full((G, N), -1.0, dtype=torch.float64, device=dev)
        # Rays that never enter report voxel (0, 0, 0), as the kernel's zero-initialised output.
        flat = torch.full((G, N), int(strides.sum()), dtype=torch.int64, device=dev)
        rid = torch.cat(entered)
        if rid.numel():
            ids, rec, t, f = _traverse_inside(code, strides, G, (X, Y, Z), rid, v, step, tmax, tdelta, moves, max_steps)
            for g in range(G):
                m = ((rec >> g) & 1).bool()
                gid = ids[m].long()
                depth[g, gid] = t[m]
                flat[g, gid] = f[m].long()
    return depth, flat


def _enter_volume(
    ids: torch.Tensor,
    v: torch.Tensor,
    step: torch.Tensor,
    tmax: torch.Tensor,
    tdelta: torch.Tensor,
    moves: torch.Tensor,
    size: torch.Tensor,
    max_steps: int,
) -> torch.Tensor:
    """Step rays that start outside the volume until they enter it; update their state in place
    and return the ids of those that entered within ``max_steps`` moves.

    A ray that, on some axis, is outside and moving away (or not moving) can never enter: the
    kernel would spin to its move limit and report nothing; we drop it at once.
    """
    entered = []
    vo, so, tmo, tdo = v[ids], step[ids], tmax[ids], tdelta[ids]
    mo = torch.zeros(ids.numel(), dtype=torch.int64, device=v.device)
    zyx = [2, 1, 0]
    while ids.numel():
        below, above = vo < 0, vo >= size
        away = ((below & (so < 0)) | (above & (so > 0)) | ((below | above) & (tdo == _DBL_MAX))).any(1)
        keep = ~away & (mo < max_steps)
        ids, vo, so, tmo, tdo, mo = ids[keep], vo[keep], so[keep], tmo[keep], tdo[keep], mo[keep]
        if not ids.numel():
            break
        # torch.min returns the first minimum: with columns in z, y, x order that is the
        # kernel's tie rule.
        _, a = tmo[:, zyx].min(dim=1)
        a = (2 - a)[:, None]
        tmo.scatter_add_(1, a, tdo.gather(1, a))
        vo.scatter_add_(1, a, so.gather(1, a))
        mo += 1
        now_in = ((vo >= 0) & (vo < size)).all(1)
        if bool(now_in.any()):
            gid = ids[now_in]
            v[gid], tmax[gid], moves[gid] = vo[now_in], tmo[now_in], mo[now_in]
            entered.append(gid)
            out = ~now_in
            ids, vo, so, tmo, tdo, mo = ids[out], vo[out], so[out], tmo[out], tdo[out], mo[out]
    return torch.cat(entered) if entered else ids


def _traverse_inside(
    code: torch.Tensor,
    strides: torch.Tensor,
    G: int,
    shape: tuple[int, int, int],
    rid: torch.Tensor,
    v: torch.Tensor,
    step: torch.Tensor,
    tmax: torch.Tensor,
    tdelta: torch.Tensor,
    moves: torch.Tensor,
    max_steps: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Lock-step DDA of the rays ``rid`` (all inside the volume) until each is resolved in every
    grid: at its first voxel with bit g, or else at its last in-volume voxel (the kernel's
    fallback). Returns the resolution log (ray id int32, grid bits int8, exit t f64, padded flat
    index int32), one entry per ray and step at which some grid got resolved.

    Struct-of-arrays state with one row per quantity, so that every per-step operation is a
    same-dtype elementwise op on a contiguous row (mixed-dtype ops, ``torch.where`` and per-step
    scatters are an order of magnitude slower on CPU): f64 rows tx, ty, tz, dx, dy, dz; i32 rows
    sx, sy, sz (flat-index steps), ray id; f (i32 padded flat index), c (i8 code of the current
    voxel), pending (i8 grid bits not yet resolved).
    """
    dev = code.device
    X, Y, Z = shape
    n = rid.numel()
    f64 = torch.empty((6, n), dtype=torch.float64, device=dev)
    f64[:3] = tmax[rid].T
    f64[3:] = tdelta[rid].T
    i32 = torch.empty((4, n), dtype=torch.int32, device=dev)
    i32[:3] = (step[rid] * strides).T
    i32[3] = rid
    vr = v[rid] + 1
    f = (vr[:, 0] * strides[0] + vr[:, 1] * strides[1] + vr[:, 2]).to(torch.int32)
    c = code.index_select(0, f)
    pending = torch.full((n,), (1 << G) - 1, dtype=torch.int8, device=dev)
    mv = moves[rid]
    # The move limit can only bite for rays that spent moves outside the volume first.
    check_limit = bool((mv.max() + X + Y + Z) > max_steps)
    buf = torch.empty((3, n), dtype=torch.float64, device=dev)
    last_cell = code.numel() - 1
    logs = []
    live = width = n
    rows = None
    while live:
        if rows is None:  # row views, rebuilt after each compaction
            rows = (*f64, *i32, *buf[:, :width])
        tx, ty, tz, dx, dy, dz, sx, sy, sz, ids, ex, ey, ez = rows
        # Exit time of the current voxel and the one-hot of the stepped axis, written straight
        # into f64 rows (the fast path for comparisons). x steps iff tx < min(ty, tz); z steps
        # iff tz is the minimum; else y: the kernel's tie rule (z over x and y, y over x).
        m_yz = torch.minimum(ty, tz)
        t = torch.minimum(tx, m_yz)
        torch.lt(tx, m_yz, out=ex)
        torch.eq(tz, t, out=ez)
        torch.sub(1.0, ex, out=ey).sub_(ez)
        chosen = buf[:, :width]
        f64[:3].addcmul_(f64[3:], chosen)
        ci = chosen.to(torch.int32)
        f_next = f + sx * ci[0] + sy * ci[1] + sz * ci[2]
        # Resolved rays keep stepping until the next compaction; the clamp keeps their (unused)
        # lookups inside the array. Live rays never need it: they stop at the border.
        f_next.clamp_(0, last_cell)
        c_next = code.index_select(0, f_next)
        # Grids resolved at the current voxel: occupied here, or every pending one when the next
        # voxel is the border (code -1: the arithmetic shift gives all bits) or beyond the move
        # limit: this voxel is then the last one.
        leaving = c_next >> 7
        if check_limit:
            mv += 1
            leaving |= -(mv > max_steps).to(torch.int8)
        rec = (c | leaving) & pending
        if bool(rec.any()):
            sel = rec.nonzero().squeeze(1)
            logs.append((ids[sel], rec[sel], t[sel], f[sel]))
            pending ^= rec
            live = int(torch.count_nonzero(pending))
        f, c = f_next, c_next
        if live and live < _COMPACT_BELOW * width:
            keep = pending.nonzero().squeeze(1)
            f64, i32, f, c, pending = f64[:, keep], i32[:, keep], f[keep], c[keep], pending[keep]
            if check_limit:
                mv = mv[keep]
            width = live
            rows = None
    return tuple(torch.cat(parts) for parts in zip(*logs))  # type: ignore[return-value]


def cast_rays_reference(
    occupied: np.ndarray | torch.Tensor,
    origin_vox: np.ndarray | torch.Tensor,
    end_vox: np.ndarray | torch.Tensor,
    max_steps: int = MAX_DDA_STEPS,
) -> tuple[np.ndarray, np.ndarray]:
    """Straightforward per-ray float64 DDA (a Python loop over rays): the oracle for :func:`cast_rays`.

    occupied (X, Y, Z) bool; origin_vox (T, 3) and end_vox (T, R, 3) float32 voxel units.
    Returns depth (T*R,) float64 voxel units and voxel (T*R, 3) int64, with the semantics of
    dvr.cu ``render_forward`` phase "test" (see the module docstring).
    """
    occ = np.asarray(occupied.cpu() if torch.is_tensor(occupied) else occupied).astype(bool)
    X, Y, Z = occ.shape
    cells = occ.reshape(-1).tolist()
    ov = np.asarray(origin_vox.cpu() if torch.is_tensor(origin_vox) else origin_vox, dtype=np.float32)
    ev = np.asarray(end_vox.cpu() if torch.is_tensor(end_vox) else end_vox, dtype=np.float32)
    T, R = ev.shape[:2]
    depth = np.full(T * R, -1.0)
    voxel = np.zeros((T * R, 3), dtype=np.int64)
    for ti in range(T):
        xo, yo, zo = (float(c) for c in ov[ti])
        for ri in range(R):
            xe, ye, ze = (float(c) for c in ev[ti, ri])
            rx, ry, rz = xe - xo, ye - yo, ze - zo
            n = math.sqrt(rx * rx + ry * ry + rz * rz)
            dx, dy, dz = rx / n, ry / n, rz / n
            vx, vy, vz = int(xo), int(yo), int(zo)
            sx = 1 if dx >= 0 else -1
            sy = 1 if dy >= 0 else -1
            sz = 1 if dz >= 0 else -1
            tx = (vx + (0 if sx < 0 else 1) - xo) / dx if dx != 0 else _DBL_MAX
            ty = (vy + (0 if sy < 0 else 1) - yo) / dy if dy != 0 else _DBL_MAX
            tz = (vz + (0 if sz < 0 else 1) - zo) / dz if dz != 0 else _DBL_MAX
            ddx = sx / dx if dx != 0 else _DBL_MAX
            ddy = sy / dy if dy != 0 else _DBL_MAX
            ddz = sz / dz if dz != 0 else _DBL_MAX
            moves = 0
            was_inside = False
            last = None
            while True:
                inside = 0 <= vx < X and 0 <= vy < Y and 0 <= vz < Z
                if inside:
                    was_inside = True
                elif was_inside:
                    break
                cur = (vx, vy, vz)
                if tx < ty:
                    if tx < tz:
                        t = tx
                        vx += sx
                        tx += ddx
                    else:
                        t = tz
                        vz += sz
                        tz += ddz
                else:
                    if ty < tz:
                        t = ty
                        vy += sy
                        ty += ddy
                    else:
                        t = tz
                        vz += sz
                        tz += ddz
                if inside:
                    last = (t, cur)
                    if cells[(cur[0] * Y + cur[1]) * Z + cur[2]]:
                        break
                moves += 1
                if moves > max_steps:
                    break
            if last is not None:
                k = ti * R + ri
                depth[k] = last[0]
                voxel[k] = last[1]
    return depth, voxel


# --------------------------------------------------------------------------------------------
# Metric
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RayIoUMetrics:
    """RayIoU over a split. IoUs are fractions in [0, 1] (NaN where GT + pred = 0).

    ``iou``: (len(thresholds), K') float64, K' = the non-free classes in table order.
    """

    thresholds: tuple[float, ...]
    class_names: tuple[str, ...]
    iou: np.ndarray
    rayiou_at: tuple[float, ...]  # nanmean over classes, one per threshold
    rayiou: float  # nanmean over thresholds x classes (= mean of rayiou_at)
    gt_count: np.ndarray  # (K',) int64 kept rays with GT label c
    pred_count: np.ndarray  # (K',) int64 kept rays with predicted label c
    tp_count: np.ndarray  # (len(thresholds), K') int64
    num_samples: int
    num_rays: int  # kept (GT-hit) rays

    def per_class(self, threshold_index: int) -> dict[str, float | None]:
        return {n: (None if np.isnan(v) else float(v)) for n, v in zip(self.class_names, self.iou[threshold_index])}


@dataclass
class RayIoUAccumulator:
    """Streaming RayIoU: ``update`` per sample (or batch), ``merge``/``all_reduce`` across
    processes, ``compute`` at the end. Counts are int64 tensors on ``device``.

    ``backend="reference"`` uses the per-ray loop (for checks and benchmarks only).
    """

    classes: ClassTable = OCC3D_NUSCENES
    grid: VoxelGrid = OCC3D_GRID
    thresholds: tuple[float, ...] = RAYIOU_THRESHOLDS
    device: torch.device | str | None = None
    backend: str = "vectorized"
    num_samples: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        if self.backend not in ("vectorized", "reference"):
            raise ValueError(f"backend must be 'vectorized' or 'reference', got {self.backend!r}")
        _check_isotropic(self.grid)
        self.device = torch.device(self.device) if self.device is not None else torch.device("cpu")
        K = self.classes.num_classes
        self.gt_count = torch.zeros(K, dtype=torch.int64, device=self.device)
        self.pred_count = torch.zeros(K, dtype=torch.int64, device=self.device)
        self.tp_count = torch.zeros(len(self.thresholds), K, dtype=torch.int64, device=self.device)
        self._directions = torch.from_numpy(lidar_ray_directions())

    def reset(self) -> None:
        self.gt_count.zero_()
        self.pred_count.zero_()
        self.tp_count.zero_()
        self.num_samples = 0

    def update(
        self,
        pred: np.ndarray | torch.Tensor,
        gt: np.ndarray | torch.Tensor,
        origins: np.ndarray | torch.Tensor | Sequence[np.ndarray | torch.Tensor],
    ) -> None:
        """pred, gt: (X, Y, Z) or (B, X, Y, Z) integer labels; origins: (T, 3) float64 metres in
        the sample's ego frame, or a sequence of B such arrays (from :func:`lidar_origins`)."""
        p = as_label_tensor(pred, self.device)
        g = as_label_tensor(gt, self.device)
        if p.shape != g.shape:
            raise ValueError(f"prediction shape {tuple(p.shape)} != GT shape {tuple(g.shape)}")
        if p.dim() == 3:
            p, g, origins = p[None], g[None], [origins]
        if p.dim() != 4 or tuple(p.shape[1:]) != self.grid.shape:
            raise ValueError(f"labels must be (X, Y, Z) = {self.grid.shape} or batched, got {tuple(p.shape)}")
        if len(origins) != p.shape[0]:
            raise ValueError(f"{p.shape[0]} samples but {len(origins)} origin arrays")
        for b in range(p.shape[0]):
            self._update_one(p[b], g[b], origins[b])

    def _update_one(self, pred: torch.Tensor, gt: torch.Tensor, origins: Any) -> None:
        with single_thread(pred.device):
            self._update_one_impl(pred, gt, origins)

    def _update_one_impl(self, pred: torch.Tensor, gt: torch.Tensor, origins: Any) -> None:
        free = self.classes.free_index
        K = self.classes.num_classes
        o = origins if torch.is_tensor(origins) else torch.from_numpy(np.asarray(origins, dtype=np.float64))
        if o.dim() != 2 or o.shape[1] != 3 or o.shape[0] == 0:
            raise ValueError(f"origins must be (T >= 1, 3), got {tuple(o.shape)}")
        origin_vox, end_vox = rays_in_voxel_units(o, self._directions, self.grid, self.device)
        sem = torch.stack([gt, pred])  # (2, X, Y, Z): grid 0 = GT, grid 1 = prediction
        # Occupied = not free; any other value (255 included) is occupied, as in the reference.
        occ = sem != free
        if self.backend == "vectorized":
            depth, flat = _cast(occ, origin_vox, end_vox, MAX_DDA_STEPS)
            padded = torch.zeros((2,) + tuple(s + 2 for s in sem.shape[1:]), dtype=sem.dtype, device=sem.device)
            padded[:, 1:-1, 1:-1, 1:-1] = sem
            labels = padded.reshape(2, -1).gather(1, flat).to(torch.int64)
        else:
            res = [cast_rays_reference(occ[i], origin_vox, end_vox) for i in range(2)]
            depth = torch.from_numpy(np.stack([r[0] for r in res])).to(self.device)
            vox = torch.from_numpy(np.stack([r[1] for r in res])).to(self.device)
            labels = torch.stack([sem[i][vox[i, :, 0], vox[i, :, 1], vox[i, :, 2]] for i in range(2)]).to(torch.int64)
        # As the reference: the voxel-unit depth is stored float32, then scaled in float32.
        dist = depth.to(torch.float32) * self.grid.voxel_size[0]
        keep = labels[0] != free  # rays whose GT hits nothing are not evaluated
        lab_gt, lab_pred = labels[0, keep], labels[1, keep]
        err = (dist[1, keep] - dist[0, keep]).abs()
        self.gt_count += _count(lab_gt, K)
        self.pred_count += _count(lab_pred, K)
        # One histogram for every threshold: bin = class * 2^J + (bit j set iff err < tau_j).
        J = len(self.thresholds)
        same = lab_gt == lab_pred
        bits = torch.zeros_like(lab_gt)
        for j, tau in enumerate(self.thresholds):
            bits |= (err < tau).to(torch.int64) << j
        hist = _count(lab_gt[same] * (1 << J) + bits[same], K << J).reshape(K, 1 << J)
        masks = torch.arange(1 << J, device=hist.device)
        for j in range(J):
            self.tp_count[j] += hist[:, ((masks >> j) & 1).bool()].sum(1)
        self.num_samples += 1

    def merge(self, other: "RayIoUAccumulator") -> "RayIoUAccumulator":
        if other.classes != self.classes or other.thresholds != self.thresholds:
            raise ValueError("cannot merge RayIoU accumulators with different classes or thresholds")
        self.gt_count += other.gt_count.to(self.device)
        self.pred_count += other.pred_count.to(self.device)
        self.tp_count += other.tp_count.to(self.device)
        self.num_samples += other.num_samples
        return self

    def all_reduce(self) -> None:
        """Sum the counts over all processes of the default group (no-op when not distributed)."""
        n = torch.tensor([self.num_samples], dtype=torch.int64, device=self.device)
        for t in (self.gt_count, self.pred_count, self.tp_count, n):
            reduce_sum_distributed(t)
        self.num_samples = int(n.item())

    def compute(self) -> RayIoUMetrics:
        free = self.classes.free_index
        keep = [c for c in range(self.classes.num_classes) if c != free]
        gt = self.gt_count.cpu().numpy().astype(np.float64)
        pr = self.pred_count.cpu().numpy().astype(np.float64)
        tp = self.tp_count.cpu().numpy().astype(np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            iou = np.stack([(tp[j] / (gt + pr - tp[j]))[keep] for j in range(len(self.thresholds))])
        return RayIoUMetrics(
            thresholds=tuple(self.thresholds),
            class_names=tuple(self.classes.names[c] for c in keep),
            iou=iou,
            rayiou_at=tuple(nanmean(iou[j]) for j in range(len(self.thresholds))),
            rayiou=nanmean(iou),
            gt_count=self.gt_count.cpu().numpy()[keep],
            pred_count=self.pred_count.cpu().numpy()[keep],
            tp_count=self.tp_count.cpu().numpy()[:, keep],
            num_samples=self.num_samples,
            num_rays=int(self.gt_count.sum()),
        )


def _count(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Histogram of labels in 0..K-1 (other values, e.g. 255, belong to no class)."""
    labels = labels[(labels >= 0) & (labels < num_classes)]
    return torch.bincount(labels, minlength=num_classes)
