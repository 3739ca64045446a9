"""Analytic solids of the synthetic world: yawed boxes, vertical cylinders and yawed ellipsoids.

Every object of a scene is a union of such convex solids. One structure-of-arrays table
(:class:`Primitives`) serves ray casting (entry distance along rays), voxelisation (point-inside
tests) and shading (local hit coordinates and normals). All solids rotate about +z only, which is
all a world with a flat ground needs and keeps every transform a 2D rigid motion plus a z shift.

Local frame of a primitive: origin at its centre, x/y rotated by ``yaw`` about +z. ``half`` holds
the half extents along the local axes; for a cylinder ``half = (r, r, half_height)``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

BOX, CYLINDER, ELLIPSOID = 0, 1, 2


@dataclass(frozen=True)
class Primitives:
    """P solids. ``material`` selects the procedural texture (see shading.py); ``priority`` decides
    the class of a voxel that several solids claim (higher wins); ``instance`` groups the parts of
    one object (texture phase, per-object colour)."""

    kind: np.ndarray  # (P,) int8: BOX, CYLINDER or ELLIPSOID
    center: np.ndarray  # (P, 3) float64
    half: np.ndarray  # (P, 3) float64 half extents in the local frame
    yaw: np.ndarray  # (P,) float64 radians about +z
    cls: np.ndarray  # (P,) int64 class id of the preset's class table
    material: np.ndarray  # (P,) int64 material id
    color: np.ndarray  # (P, 3) float32 base albedo in [0, 1]
    priority: np.ndarray  # (P,) int64
    instance: np.ndarray  # (P,) int64

    def __len__(self) -> int:
        return int(self.kind.shape[0])

    @staticmethod
    def empty() -> "Primitives":
        return Primitives(
            kind=np.zeros(0, np.int8), center=np.zeros((0, 3)), half=np.zeros((0, 3)), yaw=np.zeros(0),
            cls=np.zeros(0, np.int64), material=np.zeros(0, np.int64), color=np.zeros((0, 3), np.float32),
            priority=np.zeros(0, np.int64), instance=np.zeros(0, np.int64),
        )

    @staticmethod
    def concat(parts: list["Primitives"]) -> "Primitives":
        parts = [p for p in parts if len(p)]
        if not parts:
            return Primitives.empty()
        return Primitives(**{f.name: np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(Primitives)})

    def subset(self, index: np.ndarray) -> "Primitives":
        return Primitives(**{f.name: getattr(self, f.name)[index] for f in fields(Primitives)})

    def moved(self, yaw: float, tx: float, ty: float, tz: float = 0.0) -> "Primitives":
        """Apply the rigid motion 'rotate by ``yaw`` about +z, then translate' to every solid."""
        c, s = np.cos(yaw), np.sin(yaw)
        x, y = self.center[:, 0], self.center[:, 1]
        center = np.stack([c * x - s * y + tx, s * x + c * y + ty, self.center[:, 2] + tz], axis=1)
        return Primitives(
            kind=self.kind, center=center, half=self.half, yaw=self.yaw + yaw, cls=self.cls,
            material=self.material, color=self.color, priority=self.priority, instance=self.instance,
        )

    def bound_radius(self) -> np.ndarray:
        """(P,) radius of a sphere around each centre that contains the solid."""
        return np.linalg.norm(self.half, axis=1)

    def corners(self) -> np.ndarray:
        """(P, 8, 3) corners of each solid's local bounding box, in the parent frame."""
        signs = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)], dtype=np.float64)
        local = signs[None] * self.half[:, None, :]
        c, s = np.cos(self.yaw)[:, None], np.sin(self.yaw)[:, None]
        x = c * local[..., 0] - s * local[..., 1]
        y = s * local[..., 0] + c * local[..., 1]
        return np.stack([x, y, local[..., 2]], axis=-1) + self.center[:, None, :]

    def to_local(self, i: int, points: np.ndarray) -> np.ndarray:
        """Points (..., 3) of the parent frame -> the local frame of solid ``i``."""
        c, s = np.cos(self.yaw[i]), np.sin(self.yaw[i])
        d = points - self.center[i]
        return np.stack([c * d[..., 0] + s * d[..., 1], -s * d[..., 0] + c * d[..., 1], d[..., 2]], axis=-1)

    def dir_to_parent(self, i: int, vectors: np.ndarray) -> np.ndarray:
        """Directions (..., 3) in the local frame of solid ``i`` -> the parent frame."""
        c, s = np.cos(self.yaw[i]), np.sin(self.yaw[i])
        return np.stack(
            [c * vectors[..., 0] - s * vectors[..., 1], s * vectors[..., 0] + c * vectors[..., 1], vectors[..., 2]],
            axis=-1,
        )


def ray_entry(prims: Primitives, i: int, origin: np.ndarray, dirs: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """Entry parameter ``t`` of rays ``origin + t * dirs`` into solid ``i``; ``inf`` where missed.

    origin (3,) shared by all rays; dirs (..., 3), not necessarily unit length (t is in units of
    ``dirs``). Rays starting inside the solid count as misses: sensors never sit inside geometry.
    """
    o = prims.to_local(i, origin)
    c, s = np.cos(prims.yaw[i]), np.sin(prims.yaw[i])
    d = np.stack([c * dirs[..., 0] + s * dirs[..., 1], -s * dirs[..., 0] + c * dirs[..., 1], dirs[..., 2]], axis=-1)
    h = prims.half[i]
    kind = prims.kind[i]
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        if kind == BOX:
            inv = 1.0 / np.where(d == 0, 1e-30, d)
            t1 = (-h - o) * inv
            t2 = (h - o) * inv
            t_in = np.minimum(t1, t2).max(axis=-1)
            t_out = np.maximum(t1, t2).min(axis=-1)
        elif kind == CYLINDER:
            r = h[0]
            a = d[..., 0] ** 2 + d[..., 1] ** 2
            b = o[0] * d[..., 0] + o[1] * d[..., 1]
            cc = o[0] ** 2 + o[1] ** 2 - r * r
            disc = b * b - a * cc
            sq = np.sqrt(np.maximum(disc, 0.0))
            a_safe = np.where(a > 1e-18, a, 1.0)
            vertical = a <= 1e-18  # ray parallel to the axis: inside the circle or never
            tc0 = np.where(vertical, np.where(cc <= 0, -np.inf, np.inf), (-b - sq) / a_safe)
            tc1 = np.where(vertical, np.where(cc <= 0, np.inf, -np.inf), (-b + sq) / a_safe)
            miss = (disc < 0) & ~vertical
            tc0 = np.where(miss, np.inf, tc0)
            tc1 = np.where(miss, -np.inf, tc1)
            dz = np.where(d[..., 2] == 0, 1e-30, d[..., 2])
            tz1 = (-h[2] - o[2]) / dz
            tz2 = (h[2] - o[2]) / dz
            t_in = np.maximum(tc0, np.minimum(tz1, tz2))
            t_out = np.minimum(tc1, np.maximum(tz1, tz2))
        else:  # ELLIPSOID: scale to the unit sphere
            os_ = o / h
            ds = d / h
            a = (ds * ds).sum(axis=-1)
            b = (ds * os_).sum(axis=-1)
            cc = float((os_ * os_).sum()) - 1.0
            disc = b * b - a * cc
            sq = np.sqrt(np.maximum(disc, 0.0))
            t_in = np.where(disc >= 0, (-b - sq) / a, np.inf)
            t_out = np.where(disc >= 0, (-b + sq) / a, -np.inf)
    hit = (t_in <= t_out) & (t_in > eps)
    return np.where(hit, t_in, np.inf)


def local_normals(kind: int, half: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Outward unit normals (N, 3) at local surface points p (N, 3) of a solid of ``kind``."""
    if kind == BOX:
        rel = np.abs(p) / half
        axis = rel.argmax(axis=-1)
        n = np.zeros_like(p)
        n[np.arange(len(p)), axis] = np.sign(p[np.arange(len(p)), axis])
        return n
    if kind == CYLINDER:
        radial = np.hypot(p[:, 0], p[:, 1]) / half[0]
        cap = np.abs(p[:, 2]) / half[2] > radial
        n = np.stack([p[:, 0], p[:, 1], np.zeros(len(p))], axis=-1)
        n[cap] = 0.0
        n[cap, 2] = np.sign(p[cap, 2])
    else:
        n = p / (half * half)
    return n / np.maximum(np.linalg.norm(n, axis=-1, keepdims=True), 1e-12)


def inside(prims: Primitives, i: int, points: np.ndarray, half: np.ndarray | None = None) -> np.ndarray:
    """(...,) bool: points (..., 3) inside solid ``i`` (boundary included); ``half`` overrides its
    half extents (the voxeliser grows thin solids to one voxel)."""
    p = prims.to_local(i, points)
    h = prims.half[i] if half is None else half
    kind = prims.kind[i]
    if kind == BOX:
        return np.all(np.abs(p) <= h, axis=-1)
    if kind == CYLINDER:
        return (p[..., 0] ** 2 + p[..., 1] ** 2 <= h[0] ** 2) & (np.abs(p[..., 2]) <= h[2])
    return ((p / h) ** 2).sum(axis=-1) <= 1.0


class PrimitiveBuilder:
    """Accumulates solids one by one (scene generation), then freezes them into :class:`Primitives`."""

    def __init__(self) -> None:
        self._rows: list[tuple] = []
        self._next_instance = 0

    def new_instance(self) -> int:
        self._next_instance += 1
        return self._next_instance

    def add(
        self,
        kind: int,
        center: tuple[float, float, float],
        half: tuple[float, float, float],
        yaw: float,
        cls: int,
        material: int,
        color: tuple[float, float, float] | np.ndarray,
        priority: int,
        instance: int,
    ) -> None:
        if min(half) <= 0:
            raise ValueError(f"solid half extents must be positive, got {half}")
        self._rows.append((kind, center, half, yaw, cls, material, tuple(np.clip(color, 0, 1)), priority, instance))

    def box(self, center, size, yaw, cls, material, color, priority, instance) -> None:
        """A box given by its full ``size`` (l, w, h)."""
        self.add(BOX, center, tuple(0.5 * np.asarray(size, dtype=np.float64)), yaw, cls, material, color, priority, instance)

    def build(self) -> Primitives:
        if not self._rows:
            return Primitives.empty()
        k, c, h, y, cl, m, col, pr, ins = zip(*self._rows)
        return Primitives(
            kind=np.asarray(k, np.int8), center=np.asarray(c, np.float64), half=np.asarray(h, np.float64),
            yaw=np.asarray(y, np.float64), cls=np.asarray(cl, np.int64), material=np.asarray(m, np.int64),
            color=np.asarray(col, np.float32), priority=np.asarray(pr, np.int64), instance=np.asarray(ins, np.int64),
        )
