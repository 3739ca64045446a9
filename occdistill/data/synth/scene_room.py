"""Procedural rooms (preset ``room``) with the 11 Occ-ScanNet classes and one moving camera.

A room is an axis-aligned box in a z-up world frame (floor at z = 0): floor and ceiling slabs,
four walls with windows, furniture backed against the walls (beds, sofas, cabinets and shelves,
a tv on a stand or on the wall), tables with chairs, and small objects on tables, cabinets and the
floor. The camera walks an arc around the room centre, turning as it goes, at 1.2-1.6 m height
and pitched slightly down. The arc is reserved before anything is placed, so no solid ever
contains the camera.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from occdistill.data.synth import assets as A
from occdistill.data.synth.assets import ROOM_IDS as IDS
from occdistill.data.synth.assets import ROOM_PRIORITY, Asset
from occdistill.data.synth.config import RoomConfig
from occdistill.data.synth.primitives import BOX, PrimitiveBuilder, Primitives
from occdistill.data.synth.rig import ego_from_camera_rotation, pinhole_intrinsic
from occdistill.data.synth.shading import GLASS, PLAIN, WALLPAPER, WOOD
from occdistill.geometry.transforms import make_transform

WALL_T = 0.12  # wall thickness (m)


@dataclass(frozen=True)
class RoomScene:
    index: int
    name: str  # ScanNet-like scene name, e.g. scene0003_00
    lo: np.ndarray  # (2,) interior min corner (x, y)
    hi: np.ndarray  # (2,) interior max corner
    height: float  # floor-to-ceiling (m)
    prims: Primitives  # world frame
    cam_positions: np.ndarray  # (F, 3)
    cam_yaw: np.ndarray  # (F,)
    cam_pitch: np.ndarray  # (F,)
    intrinsic: np.ndarray  # (3, 3)
    light: np.ndarray  # (3,) lamp position
    ambient: float

    def world_from_cam(self, frame: int) -> np.ndarray:
        rot = ego_from_camera_rotation(self.cam_yaw[frame], self.cam_pitch[frame])
        return make_transform(rot, self.cam_positions[frame])

    def inside_room(self, points: np.ndarray) -> np.ndarray:
        """(...,) bool: points within the room's outer shell (walls, floor and ceiling included)."""
        lo, hi = self.lo - WALL_T, self.hi + WALL_T
        return (
            (points[..., 0] >= lo[0]) & (points[..., 0] <= hi[0]) & (points[..., 1] >= lo[1]) & (points[..., 1] <= hi[1])
            & (points[..., 2] >= -0.1) & (points[..., 2] <= self.height + 0.1)
        )


class _Placer:
    """Axis-aligned footprints (x0, x1, y0, y1) that must not overlap."""

    def __init__(self) -> None:
        self.rects: list[tuple[float, float, float, float]] = []

    def take(self, r: tuple[float, float, float, float]) -> bool:
        for q in self.rects:
            if r[0] < q[1] and r[1] > q[0] and r[2] < q[3] and r[3] > q[2]:
                return False
        self.rects.append(r)
        return True


def _footprint(asset: Asset, x: float, y: float, yaw: float, margin: float = 0.05) -> tuple[float, float, float, float]:
    c, s = abs(np.cos(yaw)), abs(np.sin(yaw))
    hx = 0.5 * (c * asset.size[0] + s * asset.size[1]) + margin
    hy = 0.5 * (s * asset.size[0] + c * asset.size[1]) + margin
    return x - hx, x + hx, y - hy, y + hy


def _against_wall(lo: np.ndarray, hi: np.ndarray, wall: int, along: float, depth: float) -> tuple[float, float, float]:
    """(x, y, yaw) of an object of ``depth`` (local x) backed against ``wall`` (0: -x, 1: +x,
    2: -y, 3: +y) at fraction ``along`` of that wall, facing into the room (local +x inwards)."""
    gap = 0.03
    if wall == 0:
        return lo[0] + gap + 0.5 * depth, lo[1] + along * (hi[1] - lo[1]), 0.0
    if wall == 1:
        return hi[0] - gap - 0.5 * depth, lo[1] + along * (hi[1] - lo[1]), np.pi
    if wall == 2:
        return lo[0] + along * (hi[0] - lo[0]), lo[1] + gap + 0.5 * depth, np.pi / 2
    return lo[0] + along * (hi[0] - lo[0]), hi[1] - gap - 0.5 * depth, -np.pi / 2


def build_room_scene(cfg: RoomConfig, index: int) -> RoomScene:
    """Scene ``index``; deterministic in (cfg.seed, index)."""
    rng = np.random.default_rng([cfg.seed, 11, index])
    size = np.array([rng.uniform(4.0, 7.0), rng.uniform(4.0, 7.5)])
    lo = np.round(rng.uniform(0.0, 3.0, 2), 2)
    hi = lo + size
    height = rng.uniform(2.4, 2.7)
    b = PrimitiveBuilder()
    placer = _Placer()

    def shell(center, dims, cls, material, color):
        b.add(BOX, tuple(center), tuple(0.5 * np.asarray(dims)), 0.0, IDS[cls], material, color, ROOM_PRIORITY[cls], b.new_instance())

    mid = 0.5 * (lo + hi)
    outer = size + 2 * WALL_T
    floor_t = max(0.1, cfg.grid.voxel_size)
    floor_col = A.jitter(rng, rng.choice([(0.55, 0.4, 0.25), (0.7, 0.6, 0.45), (0.45, 0.45, 0.48), (0.35, 0.25, 0.18)]), 0.1)
    shell((mid[0], mid[1], -0.5 * floor_t), (outer[0], outer[1], floor_t), "floor", WOOD, floor_col)
    shell((mid[0], mid[1], height + 0.05), (outer[0], outer[1], 0.1), "ceiling", PLAIN, (0.92, 0.92, 0.9))
    wall_col = A.jitter(rng, rng.choice([(0.85, 0.82, 0.75), (0.75, 0.82, 0.85), (0.88, 0.8, 0.7), (0.8, 0.85, 0.75)]), 0.05)
    zc, zh = 0.5 * (height - 0.1 + 0.1), height + 0.2
    shell((lo[0] - 0.5 * WALL_T, mid[1], zc), (WALL_T, outer[1], zh), "wall", WALLPAPER, wall_col)
    shell((hi[0] + 0.5 * WALL_T, mid[1], zc), (WALL_T, outer[1], zh), "wall", WALLPAPER, wall_col)
    shell((mid[0], lo[1] - 0.5 * WALL_T, zc), (outer[0], WALL_T, zh), "wall", WALLPAPER, wall_col)
    shell((mid[0], hi[1] + 0.5 * WALL_T, zc), (outer[0], WALL_T, zh), "wall", WALLPAPER, wall_col)
    # Windows: slabs through the wall standing 2 cm proud of its inner face.
    for wall in rng.choice(4, size=rng.integers(1, 3), replace=False):
        w, h, sill = rng.uniform(0.8, 2.0), rng.uniform(1.0, 1.4), rng.uniform(0.75, 1.0)
        along = rng.uniform(0.25, 0.75)
        depth = WALL_T + 0.04
        if wall < 2:
            x = lo[0] - 0.5 * WALL_T + 0.02 if wall == 0 else hi[0] + 0.5 * WALL_T - 0.02
            center, dims = (x, lo[1] + along * size[1], sill + 0.5 * h), (depth, w, h)
        else:
            y = lo[1] - 0.5 * WALL_T + 0.02 if wall == 2 else hi[1] + 0.5 * WALL_T - 0.02
            center, dims = (lo[0] + along * size[0], y, sill + 0.5 * h), (w, depth, h)
        shell(center, dims, "window", GLASS, A.jitter(rng, (0.75, 0.85, 0.95), 0.05))

    # Camera path: an arc around the centre; its footprint is reserved before any furniture.
    frames = cfg.frames
    radius = rng.uniform(0.2, 0.35) * min(size)
    theta = rng.uniform(0, 2 * np.pi) + np.linspace(0, rng.uniform(0.6, 1.6), frames)
    cam_xy = mid + radius * np.stack([np.cos(theta), np.sin(theta)], axis=1)
    for x, y in cam_xy:
        placer.take((x - 0.45, x + 0.45, y - 0.45, y + 0.45))
    # Look across the room (towards its centre, give or take 35 degrees), so that the far walls
    # and the furniture along them fill the view.
    to_mid = mid - cam_xy
    cam_yaw = np.arctan2(to_mid[:, 1], to_mid[:, 0]) + rng.uniform(-0.6, 0.6) + rng.uniform(-0.15, 0.15, frames)
    cam_h = rng.uniform(*cfg.camera.height_range) + rng.uniform(-0.05, 0.05, frames)
    cam_pitch = np.radians(rng.uniform(*cfg.camera.pitch_range_deg, frames))

    def put(asset: Asset, x: float, y: float, yaw: float) -> bool:
        """Place on the floor if the footprint is free."""
        if not placer.take(_footprint(asset, x, y, yaw)):
            return False
        A.add_asset(b, asset, x, y, yaw, IDS, ROOM_PRIORITY)
        return True

    def on_top(base: Asset, x: float, y: float, yaw: float, n: int) -> None:
        """``n`` small objects standing on the top of ``base`` (placed at x, y, yaw)."""
        c, s = np.cos(yaw), np.sin(yaw)
        for _ in range(n):
            obj = A.small_object(rng, base.size[2])
            lx = rng.uniform(-0.35, 0.35) * max(base.size[0] - obj.size[0], 0.0)
            ly = rng.uniform(-0.35, 0.35) * max(base.size[1] - obj.size[1], 0.0)
            A.add_asset(b, obj, x + c * lx - s * ly, y + s * lx + c * ly, rng.uniform(0, np.pi), IDS, ROOM_PRIORITY)

    walls = list(rng.permutation(4))
    # Large pieces against the walls.
    makers = [A.bed, A.sofa, A.cabinet, A.cabinet, A.cabinet]
    rng.shuffle(makers)
    for k, make in enumerate(makers):
        asset = make(rng)
        wall = walls[k % 4]
        for _ in range(6):
            x, y, yaw = _against_wall(lo, hi, wall, rng.uniform(0.15, 0.85), asset.size[0])
            if put(asset, x, y, yaw):
                if asset.cls_name == "furniture" and asset.size[2] < 1.3:
                    on_top(asset, x, y, yaw, int(rng.integers(0, 3)))
                break
    # A tv on a low stand (or on the wall) facing into the room.
    width = rng.uniform(1.0, 1.6)
    stand = Asset("furniture", (0.45, width, 0.5), (A.grounded_box(0, 0, 0.45, width, 0.0, 0.5, WOOD, A.jitter(rng, (0.35, 0.25, 0.18))),))
    for _ in range(8):
        wall = int(rng.integers(4))
        x, y, yaw = _against_wall(lo, hi, wall, rng.uniform(0.2, 0.8), stand.size[0])
        if put(stand, x, y, yaw):
            tv = A.tv(rng, 0.5, max_width=width - 0.05)
            A.add_asset(b, tv, x, y, yaw, IDS, ROOM_PRIORITY)
            break
    else:
        wall = int(rng.integers(4))
        x, y, yaw = _against_wall(lo, hi, wall, 0.5, 0.06)
        A.add_asset(b, A.tv(rng, 1.2), x, y, yaw, IDS, ROOM_PRIORITY)
    # Tables with chairs, then loose objects on the floor.
    for _ in range(int(rng.integers(1, 3))):
        tbl = A.table(rng)
        for _ in range(10):
            x, y = rng.uniform(lo[0] + 0.9, hi[0] - 0.9), rng.uniform(lo[1] + 0.9, hi[1] - 0.9)
            yaw = np.pi / 2 * rng.integers(2)
            if put(tbl, x, y, yaw):
                on_top(tbl, x, y, yaw, int(rng.integers(1, 4)))
                c, s = np.cos(yaw), np.sin(yaw)
                for side in (-1, 1):
                    ch = A.chair(rng)
                    lx = side * (0.5 * tbl.size[0] + 0.35)
                    put(ch, x + c * lx, y + s * lx, yaw + (np.pi if side > 0 else 0.0))
                break
    for _ in range(int(rng.integers(2, 6))):
        obj = A.small_object(rng, 0.0)
        put(obj, rng.uniform(lo[0] + 0.3, hi[0] - 0.3), rng.uniform(lo[1] + 0.3, hi[1] - 0.3), rng.uniform(0, np.pi))

    positions = np.column_stack([cam_xy, np.full(frames, cam_h)])
    return RoomScene(
        index=index,
        name=f"scene{index:04d}_00",
        lo=lo, hi=hi, height=height,
        prims=b.build(),
        cam_positions=positions,
        cam_yaw=cam_yaw,
        cam_pitch=cam_pitch,
        intrinsic=pinhole_intrinsic(cfg.camera.width, cfg.camera.height, cfg.camera.hfov_deg),
        light=np.array([mid[0], mid[1], height - 0.3]),
        ambient=rng.uniform(0.35, 0.5),
    )
