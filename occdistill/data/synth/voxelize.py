"""Ground-truth occupancy from the analytic scene, and ray-cast visibility masks.

Voxelisation rule: a voxel takes the class of a solid that contains its centre; where several
solids do, the highest ``priority`` wins (then the later solid). Solids thinner than a voxel are
never lost between voxel centres, much like LiDAR accumulation marks every voxel a point falls
into: a box thinner than a voxel along an axis (fence, table top, sign plate) is grown to half a
voxel along that axis for this test, which selects the one voxel layer around its mid-plane; a
cylinder thinner than a voxel (pole, cone, table leg) marks the voxel column that contains its
axis. The ground (street preset) occupies only its surface layer, the z-layer that contains
z = 0, as Occ3D labels built from LiDAR do.

Visibility (Occ3D's definition): a voxel is observed by a ray if the ray traverses it before or at
the first occupied voxel. :func:`observed_by_rays` walks every ray through the grid with an exact
3D DDA (Amanatides & Woo), vectorised over rays.
"""

from __future__ import annotations

import numpy as np

from occdistill.data.synth.primitives import BOX, CYLINDER, Primitives, inside
from occdistill.geometry.grid import VoxelGrid


def ground_layer(grid: VoxelGrid) -> int | None:
    """The z-layer index that contains z = 0, or None if the grid does not reach the ground."""
    k = int(np.floor((0.0 - grid.range[2]) / grid.voxel_size[2]))
    return k if 0 <= k < grid.shape[2] else None


def voxel_half_extents(prims: Primitives, i: int, grid: VoxelGrid) -> np.ndarray:
    """Half extents of solid ``i`` for the centre test: thin box axes grow to half a voxel."""
    h = prims.half[i].copy()
    if prims.kind[i] == BOX:
        h = np.maximum(h, 0.5 * grid.size)
    else:
        h[2] = max(h[2], 0.5 * grid.voxel_size[2])
    return h


def voxelize(
    prims: Primitives,
    grid: VoxelGrid,
    free_index: int,
    ground_classes: np.ndarray | None = None,
) -> np.ndarray:
    """(X, Y, Z) uint8 semantics of the solids (in the grid's frame) and, if given, the ground.

    ``ground_classes`` (X, Y) class of the ground under each column's centre; it fills the layer
    that contains z = 0 wherever no solid claims that voxel.
    """
    shape = grid.shape
    sem = np.full(shape, free_index, np.uint8)
    prio = np.full(shape, np.iinfo(np.int64).min, np.int64)
    if ground_classes is not None:
        k = ground_layer(grid)
        if k is not None:
            sem[:, :, k] = ground_classes
    lo, size = grid.lower, grid.size
    axes = [lo[a] + (np.arange(shape[a]) + 0.5) * size[a] for a in range(3)]
    for i in range(len(prims)):
        h = voxel_half_extents(prims, i, grid)
        # Axis-aligned bounds of the (grown) solid -> index ranges of candidate centres.
        ext = np.abs(np.array([[np.cos(prims.yaw[i]), np.sin(prims.yaw[i])], [np.sin(prims.yaw[i]), np.cos(prims.yaw[i])]])) @ h[:2]
        bmin = np.append(prims.center[i, :2] - ext, prims.center[i, 2] - h[2])
        bmax = np.append(prims.center[i, :2] + ext, prims.center[i, 2] + h[2])
        i0 = np.maximum(np.ceil((bmin - lo) / size - 0.5).astype(int), 0)
        i1 = np.minimum(np.floor((bmax - lo) / size - 0.5).astype(int) + 1, shape)
        if np.any(i1 <= i0):
            continue
        thin_post = prims.kind[i] == CYLINDER and 2 * h[0] < min(size[0], size[1])
        if thin_post:
            col = np.floor((prims.center[i, :2] - lo[:2]) / size[:2]).astype(int)
            if np.any(col < 0) or np.any(col >= shape[:2]):
                continue
            block = (slice(col[0], col[0] + 1), slice(col[1], col[1] + 1), slice(i0[2], i1[2]))
            mask = np.ones((1, 1, i1[2] - i0[2]), bool)
        else:
            pts = np.stack(np.meshgrid(axes[0][i0[0]:i1[0]], axes[1][i0[1]:i1[1]], axes[2][i0[2]:i1[2]], indexing="ij"), axis=-1)
            mask = inside(prims, i, pts, h)
            block = (slice(i0[0], i1[0]), slice(i0[1], i1[1]), slice(i0[2], i1[2]))
        win = mask & (prims.priority[i] >= prio[block])
        sem[block][win] = prims.cls[i]
        prio[block][win] = prims.priority[i]
    return sem


def observed_by_rays(occupied: np.ndarray, grid: VoxelGrid, origins: np.ndarray, dirs: np.ndarray) -> np.ndarray:
    """(X, Y, Z) bool: voxels traversed by any ray up to and including its first occupied voxel.

    occupied (X, Y, Z) bool; origins (N, 3) or (3,) and dirs (N, 3) in the grid's frame. Rays that
    start outside the grid enter it first; a ray ends at its first occupied voxel or on leaving.
    """
    nx, ny, nz = occupied.shape
    shape = np.array(occupied.shape)
    dirs = np.asarray(dirs, np.float64).reshape(-1, 3)
    origins = np.broadcast_to(np.asarray(origins, np.float64), dirs.shape)
    lo, hi, size = grid.lower, grid.upper, grid.size
    # A one-voxel border marked 2 ends rays that leave the grid with the same lookup that ends
    # rays at occupied voxels (1), so the loop needs no bounds test.
    state = np.full((nx + 2, ny + 2, nz + 2), 2, np.uint8)
    state[1:-1, 1:-1, 1:-1] = occupied
    state_flat = state.reshape(-1)
    observed = np.zeros(state.size, bool)
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = 1.0 / np.where(dirs == 0, 1e-300, dirs)
        t1 = (lo - origins) * inv
        t2 = (hi - origins) * inv
        t_enter = np.maximum(np.minimum(t1, t2).max(axis=1), 0.0)
        t_exit = np.maximum(t1, t2).min(axis=1)
    keep = t_enter < t_exit
    o, d, t0 = origins[keep], dirs[keep], t_enter[keep]
    # Start just inside the grid; the tiny offset keeps floor() from landing on the entry face.
    start = o + d * (t0 + 1e-9)[:, None]
    idx = np.clip(np.floor((start - lo) / size).astype(np.int64), 0, shape - 1)
    strides = np.array([(ny + 2) * (nz + 2), nz + 2, 1], np.int64)
    flat = (idx + 1) @ strides
    pos = d > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        # (3, N): ray parameter of the next face crossing per axis, its increment, flat-index step.
        t_max = np.where(d != 0, (lo + (idx + pos) * size - o) / d, np.inf).T.copy()
        t_delta = np.where(d != 0, size / np.abs(d), np.inf).T.copy()
    step = (np.where(pos, 1, -1) * strides).T.copy()
    while flat.size:
        observed[flat] = True
        alive = state_flat[flat] == 0
        if not alive.all():
            flat, t_max, t_delta, step = flat[alive], t_max[:, alive], t_delta[:, alive], step[:, alive]
        # Step along the axis whose face is nearest.
        tx, ty, tz = t_max
        ax_x = (tx <= ty) & (tx <= tz)
        ax_y = ~ax_x & (ty <= tz)
        axis = ax_y.astype(np.int64) + 2 * ~(ax_x | ax_y)
        rows = np.arange(flat.size)
        flat = flat + step[axis, rows]
        t_max[axis, rows] += t_delta[axis, rows]
    return observed.reshape(state.shape)[1:-1, 1:-1, 1:-1].copy()


def camera_mask_rays(
    ref_from_cam: np.ndarray,
    intrinsic: np.ndarray,
    width: int,
    height: int,
    grid: VoxelGrid,
    spacing: float,
    ground_z: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Rays of one pinhole camera for :func:`observed_by_rays`: origin (3,) and dirs (N, 3).

    Occ3D casts one ray per pixel, so its mask depends on the image resolution. Here the rays are
    spaced by what the grid needs instead: neighbouring rays are at most ``spacing`` voxels apart
    where they leave the grid, and where they hit the ground plane z = ``ground_z`` (grazing rays
    near the horizon need far denser rows than columns). Rows are stepped from the top of the image
    down with the spacing the shallowest ray of the row needs; each row gets evenly spaced columns.
    """
    rot, origin = ref_from_cam[:3, :3], ref_from_cam[:3, 3]
    fx, fy, cx, cy = intrinsic[0, 0], intrinsic[1, 1], intrinsic[0, 2], intrinsic[1, 2]
    step = spacing * float(min(grid.voxel_size))
    lo, hi = grid.lower, grid.upper
    corners = np.array([[x, y] for x in (lo[0], hi[0]) for y in (lo[1], hi[1])])
    reach = np.linalg.norm(corners - origin[:2], axis=1).max()  # farthest horizontal distance in the grid
    height_above_ground = origin[2] - ground_z
    probe_x = (np.array([0.0, cx, width]) - cx) / fx  # left edge, centre, right edge of a row

    def row_needs(r: float) -> tuple[float, float]:
        """(angular row spacing, longest in-grid ray length) for image row coordinate r."""
        d = np.stack([probe_x, np.full(3, (r - cy) / fy), np.ones(3)], axis=1) @ rot.T
        elev = np.arctan2(d[:, 2], np.hypot(d[:, 0], d[:, 1]))
        vertical = np.where(elev < 0, (origin[2] - lo[2]) / np.maximum(np.sin(-elev), 1e-9), (hi[2] - origin[2]) / np.maximum(np.sin(elev), 1e-9))
        length = np.minimum(reach / np.cos(elev), vertical)
        dtheta = step / length
        hits_ground = (elev < 0) & (height_above_ground > 0) & (height_above_ground < reach * np.tan(np.maximum(-elev, 0)))
        # A plane hit at depression a: rows dtheta apart land h * dtheta / sin(a)^2 apart.
        dtheta = np.where(hits_ground, np.minimum(dtheta, step * np.sin(elev) ** 2 / max(height_above_ground, 1e-9)), dtheta)
        k = int(dtheta.argmin())
        return float(dtheta[k]), float(length.max())

    rows, lengths = [], []
    r = 0.0
    while r < height:
        dtheta, length = row_needs(r)
        rows.append(r)
        lengths.append(length)
        r += max(dtheta * (fy * fy + (r - cy) ** 2) / fy, 1e-3)  # angle -> image rows at this row
    dirs = []
    for r, length in zip(rows, lengths):
        n = max(2, int(np.ceil(width * length / (step * fx))) + 1)
        u = np.linspace(0.0, width, n)
        dirs.append(np.stack([(u - cx) / fx, np.full(n, (r - cy) / fy), np.ones(n)], axis=1))
    return origin.copy(), np.concatenate(dirs) @ rot.T
