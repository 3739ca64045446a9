"""Vectorised ray casting of a :class:`Primitives` table plus an optional ground plane z = 0.

Rays come as a :class:`RayImage`: one origin and an (H, W) grid of directions (the pixels of a
pinhole camera, or the beams x azimuths of a spinning LiDAR). Each solid is tested only against
the rectangle of rays its bounds can reach (screen-space bounding box for a pinhole camera,
elevation/azimuth box for a LiDAR), so the cost scales with the image area the solids cover, not
with rays x solids. The nearest hit per ray wins (a z-buffer over the ray parameter ``t``).

All geometry is expressed in one reference frame (the keyframe ego frame in practice), where the
ground is the plane z = 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from occdistill.data.synth.primitives import Primitives, local_normals, ray_entry

NO_HIT = -2
GROUND = -1

_EDGES = np.array(
    [[0, 1], [2, 3], [4, 5], [6, 7], [0, 2], [1, 3], [4, 6], [5, 7], [0, 4], [1, 5], [2, 6], [3, 7]]
)  # the 12 edges of the corner order of Primitives.corners


@dataclass(frozen=True)
class RayImage:
    """(H, W) rays from one ``origin`` (3,) with directions ``dirs`` (H, W, 3), both in the
    reference frame. For a pinhole camera the directions have unit z in the camera frame, so the
    ray parameter ``t`` of a hit is its z-depth."""

    origin: np.ndarray
    dirs: np.ndarray

    @property
    def shape(self) -> tuple[int, int]:
        return self.dirs.shape[:2]


@dataclass(frozen=True)
class Hits:
    """Nearest hit per ray: ``t`` (H, W) ray parameter (inf where nothing was hit) and ``index``
    (H, W) int64: a solid index, ``GROUND`` or ``NO_HIT``."""

    t: np.ndarray
    index: np.ndarray


class GroundModel(Protocol):
    """The ground plane's appearance and classes (the street layout implements it)."""

    def classify(self, points: np.ndarray) -> np.ndarray:
        """Points (N, 3) on the plane z = 0 -> class ids (N,)."""
        ...

    def albedo(self, points: np.ndarray, cls: np.ndarray) -> np.ndarray:
        """Points (N, 3) and their classes -> albedo (N, 3) float32 in [0, 1]."""
        ...


def pinhole_rays(ref_from_cam: np.ndarray, intrinsic: np.ndarray, width: int, height: int) -> RayImage:
    """Rays through the pixel centres (c + 0.5, r + 0.5)."""
    u, v = np.meshgrid(np.arange(width) + 0.5, np.arange(height) + 0.5)  # (H, W)
    k_inv = np.linalg.inv(intrinsic)
    pix = np.stack([u, v, np.ones_like(u)], axis=-1)
    d_cam = pix @ k_inv.T
    d_cam /= d_cam[..., 2:3]
    return RayImage(origin=ref_from_cam[:3, 3].copy(), dirs=d_cam @ ref_from_cam[:3, :3].T)


def pinhole_rects(
    prims: Primitives, cam_from_ref: np.ndarray, intrinsic: np.ndarray, width: int, height: int, near: float = 0.05
) -> np.ndarray:
    """(P, 4) int64 pixel rectangles [r0, r1, c0, c1) that each solid can cover (empty if r0 >= r1).

    The bounding-box corners are clipped against the near plane before projection, so solids that
    straddle the camera plane get an exact rather than a full-image rectangle.
    """
    if len(prims) == 0:
        return np.zeros((0, 4), np.int64)
    pc = prims.corners() @ cam_from_ref[:3, :3].T + cam_from_ref[:3, 3]  # (P, 8, 3)
    a, b = pc[:, _EDGES[:, 0]], pc[:, _EDGES[:, 1]]  # (P, 12, 3)
    za, zb = a[..., 2] - near, b[..., 2] - near
    crosses = za * zb < 0
    with np.errstate(divide="ignore", invalid="ignore"):
        s = np.where(crosses, za / (za - zb), 0.0)
    clipped = a + s[..., None] * (b - a)
    pts = np.concatenate([pc, clipped], axis=1)  # (P, 20, 3)
    valid = np.concatenate([pc[..., 2] >= near, crosses], axis=1)
    z = np.where(valid, pts[..., 2], 1.0)
    uvw = pts @ intrinsic.T
    u = uvw[..., 0] / z
    v = uvw[..., 1] / z
    inf = np.inf
    umin = np.where(valid, u, inf).min(axis=1)
    umax = np.where(valid, u, -inf).max(axis=1)
    vmin = np.where(valid, v, inf).min(axis=1)
    vmax = np.where(valid, v, -inf).max(axis=1)
    any_valid = valid.any(axis=1)
    with np.errstate(invalid="ignore"):
        c0 = np.clip(np.floor(np.nan_to_num(umin, posinf=width, neginf=0)), 0, width)
        c1 = np.clip(np.ceil(np.nan_to_num(umax, posinf=width, neginf=0)) + 1, 0, width)
        r0 = np.clip(np.floor(np.nan_to_num(vmin, posinf=height, neginf=0)), 0, height)
        r1 = np.clip(np.ceil(np.nan_to_num(vmax, posinf=height, neginf=0)) + 1, 0, height)
    rects = np.stack([r0, r1, c0, c1], axis=1).astype(np.int64)
    rects[~any_valid] = 0
    return rects


def spherical_rays(ref_from_sensor: np.ndarray, elevations: np.ndarray, azimuths: np.ndarray) -> RayImage:
    """Unit rays of a spinning LiDAR: ``elevations`` (B,) ascending and ``azimuths`` (A,) uniform
    over [-pi, pi) (radians, azimuth measured from the sensor x axis towards y)."""
    el, az = np.meshgrid(elevations, azimuths, indexing="ij")
    d = np.stack([np.cos(el) * np.cos(az), np.cos(el) * np.sin(az), np.sin(el)], axis=-1)
    return RayImage(origin=ref_from_sensor[:3, 3].copy(), dirs=d @ ref_from_sensor[:3, :3].T)


def spherical_rects(
    prims: Primitives, sensor_from_ref: np.ndarray, elevations: np.ndarray, num_azimuths: int, max_range: float
) -> list[list[tuple[int, int, int, int]]]:
    """Per solid, up to two [r0, r1, c0, c1) rectangles of the (beam, azimuth) grid that its
    bounding sphere can reach (two when its azimuth interval wraps around +-pi)."""
    centers = prims.center @ sensor_from_ref[:3, :3].T + sensor_from_ref[:3, 3]
    radius = prims.bound_radius()
    dist = np.linalg.norm(centers, axis=1)
    dh = np.hypot(centers[:, 0], centers[:, 1])
    nb = len(elevations)
    out: list[list[tuple[int, int, int, int]]] = []
    step = 2 * np.pi / num_azimuths
    for c, r, d, h in zip(centers, radius, dist, dh):
        if d - r > max_range:
            out.append([])
            continue
        if d <= r:
            out.append([(0, nb, 0, num_azimuths)])
            continue
        el_c = np.arctan2(c[2], h)
        alpha = np.arcsin(min(1.0, r / d))
        b0 = int(np.searchsorted(elevations, el_c - alpha - 1e-9, side="left"))
        b1 = int(np.searchsorted(elevations, el_c + alpha + 1e-9, side="right"))
        if b0 >= b1:
            out.append([])
            continue
        if h <= r:
            out.append([(b0, b1, 0, num_azimuths)])
            continue
        beta = np.arcsin(r / h)
        az_c = np.arctan2(c[1], c[0])
        a0 = int(np.floor((az_c - beta + np.pi) / step))
        a1 = int(np.ceil((az_c + beta + np.pi) / step)) + 1
        if a1 - a0 >= num_azimuths:
            out.append([(b0, b1, 0, num_azimuths)])
        elif a0 < 0:
            out.append([(b0, b1, 0, a1), (b0, b1, a0 + num_azimuths, num_azimuths)])
        elif a1 > num_azimuths:
            out.append([(b0, b1, a0, num_azimuths), (b0, b1, 0, a1 - num_azimuths)])
        else:
            out.append([(b0, b1, a0, a1)])
    return out


def cast(
    rays: RayImage,
    prims: Primitives,
    rects: list[list[tuple[int, int, int, int]]] | np.ndarray,
    far: float,
    ground: bool,
) -> Hits:
    """Nearest hit of every ray against the ground plane z = 0 (if ``ground``) and the solids.

    ``rects`` gives, per solid, the ray rectangles it may cover ((P, 4) array or lists); hits
    farther than ``far`` (Euclidean distance from the origin) are dropped.
    """
    h, w = rays.shape
    norm = np.linalg.norm(rays.dirs, axis=-1)
    t_best = far / norm
    index = np.full((h, w), NO_HIT, np.int64)
    oz = rays.origin[2]
    if ground and oz > 0:
        dz = rays.dirs[..., 2]
        with np.errstate(divide="ignore"):
            tg = np.where(dz < 0, -oz / np.where(dz < 0, dz, -1.0), np.inf)
        g = tg < t_best
        t_best = np.where(g, tg, t_best)
        index[g] = GROUND
    for i in range(len(prims)):
        boxes = rects[i] if isinstance(rects, list) else [tuple(rects[i])]
        for r0, r1, c0, c1 in boxes:
            if r0 >= r1 or c0 >= c1:
                continue
            t = ray_entry(prims, i, rays.origin, rays.dirs[r0:r1, c0:c1])
            tb = t_best[r0:r1, c0:c1]
            better = t < tb
            if better.any():
                tb[better] = t[better]
                index[r0:r1, c0:c1][better] = i
    t_out = np.where(index == NO_HIT, np.inf, t_best)
    return Hits(t=t_out, index=index)


@dataclass(frozen=True)
class Surface:
    """Attributes of the N hit rays of a :class:`Hits` (flat ray order), for shading and labels."""

    flat: np.ndarray  # (N,) flat ray index into H*W
    point: np.ndarray  # (N, 3) hit point, reference frame
    normal: np.ndarray  # (N, 3) unit normal, reference frame
    local: np.ndarray  # (N, 3) hit point in the solid's local frame (ground: reference frame)
    cls: np.ndarray  # (N,) class id
    index: np.ndarray  # (N,) solid index or GROUND


def surface(rays: RayImage, hits: Hits, prims: Primitives, ground: GroundModel | None) -> Surface:
    """Hit points, normals, local coordinates and classes of every ray that hit something."""
    idx = hits.index.reshape(-1)
    flat = np.nonzero(idx != NO_HIT)[0]
    sel = idx[flat]
    t = hits.t.reshape(-1)[flat]
    d = rays.dirs.reshape(-1, 3)[flat]
    point = rays.origin + t[:, None] * d
    normal = np.zeros_like(point)
    local = point.copy()
    cls = np.zeros(len(flat), np.int64)
    g = sel == GROUND
    if g.any():
        if ground is None:
            raise ValueError("rays hit the ground plane but no ground model was given")
        point[g, 2] = 0.0  # exactly on the plane: no drift across the ground voxel layer
        local[g] = point[g]
        normal[g] = (0.0, 0.0, 1.0)
        cls[g] = ground.classify(point[g])
    order = np.argsort(sel, kind="stable")
    uniq, starts = np.unique(sel[order], return_index=True)
    bounds = np.append(starts, len(order))
    for j, i in enumerate(uniq):
        if i < 0:
            continue
        rows = order[bounds[j] : bounds[j + 1]]
        p_loc = prims.to_local(int(i), point[rows])
        local[rows] = p_loc
        normal[rows] = prims.dir_to_parent(int(i), local_normals(int(prims.kind[i]), prims.half[i], p_loc))
        cls[rows] = prims.cls[i]
    return Surface(flat=flat, point=point, normal=normal, local=local, cls=cls, index=sel)
