"""Procedural street scenes (preset ``street``): layout, static objects, traffic and the ego drive.

Everything is generated in a *road frame* (u along the main road, v to its left, z up) and placed
in the nuScenes ``global`` frame by a per-scene rigid motion, so global poses are arbitrary
rotations and offsets, as in real logs. Cross section of the main road (per side, from v = 0):

    median (other_flat, optional) | travel lanes | parking lane | verge (terrain or other_flat,
    optional) | sidewalk (furniture zone + walking zone) | lot (buildings, park, parking lot,
    construction site or plaza)

with cross streets cutting through. Traffic drives on the right: lanes with v < 0 go towards +u.
Objects in one lane share that lane's speed, pedestrians in one walking lane share theirs, so
nothing ever collides. The ego car drives in a right lane with a gentle in-lane weave (its heading
changes slowly), so camera-time poses differ from the keyframe pose in translation and yaw.

Every scene starts with a guaranteed set of rarer objects next to the ego start (roadworks with a
construction vehicle, barriers and cones, a parked trailer, motorcycle and bicycle, clutter, a
pedestrian, a bus and a truck in traffic), so that even a few short scenes cover every class.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from occdistill.data.synth import assets as A
from occdistill.data.synth.assets import STREET_IDS as IDS
from occdistill.data.synth.assets import STREET_PRIORITY, Asset
from occdistill.data.synth.config import StreetConfig
from occdistill.data.synth.primitives import PrimitiveBuilder, Primitives
from occdistill.data.synth.rig import CameraMount, LidarMount, build_lidar, build_rig
from occdistill.data.synth.shading import cell_hash, noise

DRIVEABLE, OTHER_FLAT, SIDEWALK, TERRAIN = IDS["driveable_surface"], IDS["other_flat"], IDS["sidewalk"], IDS["terrain"]
BUILDINGS, PARK, PARKING, CONSTRUCTION, PLAZA = range(5)
START_CLEAR = 35.0  # no cross street within this distance (m) of the ego start at u = 0
FURNITURE_W = 1.4  # road-side furniture zone width (m); its objects are at most 1.3 m wide across
_LOT_CLASS_CHOICES = {
    BUILDINGS: (SIDEWALK, TERRAIN), PARK: (TERRAIN,), PARKING: (DRIVEABLE,), CONSTRUCTION: (TERRAIN, OTHER_FLAT),
    PLAZA: (OTHER_FLAT,),
}


@dataclass(frozen=True)
class StreetLayout:
    """The ground plan. Side 0 is the right (v < 0), side 1 the left (v > 0) of the main road."""

    lanes: int  # travel lanes per direction
    lane_width: float
    median: float  # half width of the central other_flat median (0: painted centre line)
    parking: tuple[float, float]  # parking lane width per side
    verge: tuple[float, float]  # strip between curb and sidewalk, per side
    verge_cls: tuple[int, int]
    sidewalk: tuple[float, float]
    cross_u: np.ndarray  # (C,) cross street centres along u
    cross_half: np.ndarray  # (C,) their half widths
    block_edges: tuple[np.ndarray, np.ndarray]  # per side, (K+1,) ascending u boundaries of the lots
    block_kind: tuple[np.ndarray, np.ndarray]  # per side, (K,)
    lot_cls: tuple[np.ndarray, np.ndarray]  # per side, (K,) ground class of each lot
    asphalt: np.ndarray  # (3,) road colour of this scene

    def curb(self, side: int) -> float:
        return self.median + self.lanes * self.lane_width + self.parking[side]

    def sidewalk_start(self, side: int) -> float:
        return self.curb(side) + self.verge[side]

    def lot_start(self, side: int) -> float:
        return self.sidewalk_start(side) + self.sidewalk[side]

    def lane_centers(self) -> list[float]:
        """|v| of the travel lane centres (the same on both sides), inner lane first."""
        return [self.median + (k + 0.5) * self.lane_width for k in range(self.lanes)]

    def cross_distance(self, u: np.ndarray) -> np.ndarray:
        """Distance along u to the nearest cross street edge (negative inside one)."""
        if len(self.cross_u) == 0:
            return np.full(np.shape(u), np.inf)
        d = np.abs(np.asarray(u)[..., None] - self.cross_u) - self.cross_half
        return d.min(axis=-1)

    def classify(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        """Ground class ids at road-frame points (u, v)."""
        a = np.abs(v)
        side = (v > 0).astype(np.int64)
        pick = lambda pair: np.where(side == 1, pair[1], pair[0])  # noqa: E731
        curb = self.median + self.lanes * self.lane_width + pick(self.parking)
        walk0 = curb + pick(self.verge)
        lot0 = walk0 + pick(self.sidewalk)
        cls = np.empty(np.shape(u), np.int64)
        for s in (0, 1):
            m = side == s
            k = np.clip(np.searchsorted(self.block_edges[s], u[m], side="right") - 1, 0, len(self.lot_cls[s]) - 1)
            cls[m] = self.lot_cls[s][k]
        cls = np.where(a < lot0, SIDEWALK, cls)
        cls = np.where(a < walk0, pick(self.verge_cls), cls)
        cls = np.where(a < curb, DRIVEABLE, cls)
        cls = np.where(a < self.median, OTHER_FLAT, cls)
        dc = self.cross_distance(u)
        cls = np.where((dc < self.sidewalk[0]) & (a >= curb), SIDEWALK, cls)  # corner sidewalks
        return np.where(dc < 0, DRIVEABLE, cls)

    def albedo(self, u: np.ndarray, v: np.ndarray, cls: np.ndarray) -> np.ndarray:
        """Ground colour: asphalt with lane markings and crossings, tiled sidewalks, grass, paving."""
        p = np.stack([u, v, np.zeros_like(u)], axis=-1)
        out = np.empty((len(u), 3))
        a = np.abs(v)
        fine, coarse = noise(p * 1.7, 4.0), noise(p, 0.15)
        m = cls == DRIVEABLE
        if m.any():
            c = self.asphalt * (1 + 0.07 * fine[m] + 0.08 * coarse[m])[:, None]
            am, um = a[m], u[m]
            dc = self.cross_distance(um)
            main = (dc >= 0) & (am < self.median + self.lanes * self.lane_width + 0.2)
            white = np.zeros(len(am), bool)
            for k in range(1, self.lanes):  # dashed lane dividers
                white |= (np.abs(am - self.median - k * self.lane_width) < 0.08) & (np.mod(um, 9.0) < 3.0)
            white |= np.abs(am - self.median - self.lanes * self.lane_width) < 0.09  # edge line
            white |= (dc >= 0.5) & (dc < 3.5) & (am < self.curb(0)) & (np.mod(v[m], 1.0) < 0.5)  # zebra
            yellow = (self.median == 0) & (np.abs(am - 0.12) < 0.06)
            c[main & white] = (0.85, 0.85, 0.82)
            c[main & yellow] = (0.8, 0.65, 0.15)
            out[m] = c
        m = cls == SIDEWALK
        if m.any():
            joint = (np.mod(u[m], 1.2) < 0.05) | (np.mod(v[m], 1.2) < 0.05)
            tile = 0.9 + 0.1 * cell_hash(np.floor(u[m] / 1.2), np.floor(v[m] / 1.2), 3)
            out[m] = np.array([0.62, 0.6, 0.57]) * (tile * (1 - 0.35 * joint) + 0.05 * fine[m])[:, None]
        m = cls == TERRAIN
        if m.any():
            dirt = np.clip(0.5 + noise(p[m], 0.3), 0, 1)[:, None]
            grass = np.array([0.28, 0.42, 0.16]) * (1 + 0.25 * fine[m])[:, None]
            out[m] = grass * (1 - 0.5 * dirt) + np.array([0.42, 0.35, 0.24]) * 0.5 * dirt
        m = cls == OTHER_FLAT
        if m.any():
            hatch = np.mod(u[m] + v[m], 1.5) < 0.25
            out[m] = np.array([0.55, 0.52, 0.46]) * (1 + 0.12 * fine[m] + 0.15 * hatch)[:, None]
        return np.clip(out, 0, 1)


@dataclass(frozen=True)
class StreetGround:
    """The layout seen from one keyframe ego frame: ``road_from_ref`` (3, 3) 2D homogeneous."""

    layout: StreetLayout
    road_from_ref: np.ndarray

    def _uv(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        uv = points[:, :2] @ self.road_from_ref[:2, :2].T + self.road_from_ref[:2, 2]
        return uv[:, 0], uv[:, 1]

    def classify(self, points: np.ndarray) -> np.ndarray:
        u, v = self._uv(points)
        return self.layout.classify(u, v)

    def albedo(self, points: np.ndarray, cls: np.ndarray) -> np.ndarray:
        u, v = self._uv(points)
        return self.layout.albedo(u, v, cls)


@dataclass(frozen=True)
class Movers:
    """Objects with a detection box (parked or moving). Object m is at road-frame
    (u0 + speed cos(heading) t, v0 + speed sin(heading) t) with heading ``heading`` at time t (s)."""

    parts: Primitives  # solids in their object's frame
    owner: np.ndarray  # (Pp,) object index of each solid
    names: tuple[str, ...]  # (M,) nuScenes detection class names
    size: np.ndarray  # (M, 3) l, w, h
    u0: np.ndarray
    v0: np.ndarray
    heading: np.ndarray
    speed: np.ndarray

    def positions(self, t: float) -> tuple[np.ndarray, np.ndarray]:
        return self.u0 + self.speed * np.cos(self.heading) * t, self.v0 + self.speed * np.sin(self.heading) * t


@dataclass(frozen=True)
class EgoTrack:
    """Ego drive in the road frame: constant speed along u, sinusoidal weave across the lane."""

    u0: float
    v0: float
    speed: float
    amplitude: float
    period: float
    phase: float

    def pose(self, t: float) -> tuple[float, float, float]:
        """(u, v, heading) at time t (s)."""
        w = 2 * np.pi / self.period
        u = self.u0 + self.speed * t
        v = self.v0 + self.amplitude * np.sin(w * t + self.phase)
        dv = self.amplitude * w * np.cos(w * t + self.phase)
        return u, v, float(np.arctan2(dv, self.speed)) if self.speed > 0 else 0.0


@dataclass(frozen=True)
class StreetScene:
    index: int
    name: str
    token: str
    log: str  # nuScenes-like log name, used in file stems
    layout: StreetLayout
    static: Primitives  # road frame
    movers: Movers
    ego: EgoTrack
    road_yaw: float  # global_from_road = yaw_transform(road_yaw, *road_offset)
    road_offset: tuple[float, float]
    start_us: int
    frame_interval_us: int
    cameras: tuple[CameraMount, ...]
    lidar: LidarMount
    sun_road: np.ndarray  # (3,) unit direction towards the sun, road frame
    sky: tuple[np.ndarray, np.ndarray]  # horizon, zenith colours


class _Placer:
    """Rejects footprints (road-frame axis-aligned rectangles) that overlap earlier ones."""

    def __init__(self) -> None:
        self._rects = np.zeros((0, 4))

    def free(self, u0: float, u1: float, v0: float, v1: float) -> bool:
        r = self._rects
        return not np.any((r[:, 0] < u1) & (r[:, 1] > u0) & (r[:, 2] < v1) & (r[:, 3] > v0))

    def take(self, u0: float, u1: float, v0: float, v1: float) -> bool:
        if not self.free(u0, u1, v0, v1):
            return False
        self._rects = np.vstack([self._rects, [u0, u1, v0, v1]])
        return True


def _footprint(asset: Asset, u: float, v: float, yaw: float, margin: float) -> tuple[float, float, float, float]:
    l, w = asset.size[0], asset.size[1]
    c, s = abs(np.cos(yaw)), abs(np.sin(yaw))
    hu, hv = 0.5 * (c * l + s * w) + margin, 0.5 * (s * l + c * w) + margin
    return u - hu, u + hu, v - hv, v + hv


class _SceneBuilder:
    """Accumulates static solids and movers of one scene."""

    def __init__(self, layout: StreetLayout, rng: np.random.Generator) -> None:
        self.layout, self.rng = layout, rng
        self.static = PrimitiveBuilder()
        self.placer = _Placer()
        self.mover_parts: list[Primitives] = []
        self.mover_rows: list[tuple[str, tuple[float, float, float], float, float, float, float]] = []

    def place_static(self, asset: Asset, u: float, v: float, yaw: float, margin: float = 0.2) -> bool:
        if not self.placer.take(*_footprint(asset, u, v, yaw, margin)):
            return False
        A.add_asset(self.static, asset, u, v, yaw, IDS, STREET_PRIORITY)
        return True

    def place_mover(self, asset: Asset, u: float, v: float, heading: float, speed: float, reserve: bool,
                    margin: float = 0.3) -> bool:
        """A detection object; parked ones (``reserve``) also take their footprint."""
        if reserve and not self.placer.take(*_footprint(asset, u, v, heading, margin)):
            return False
        b = PrimitiveBuilder()
        A.add_asset(b, asset, 0.0, 0.0, 0.0, IDS, STREET_PRIORITY)
        self.mover_parts.append(b.build())
        self.mover_rows.append((asset.cls_name, asset.size, u, v, heading, speed))
        return True

    def movers(self) -> Movers:
        parts = Primitives.concat(self.mover_parts)
        owner = np.concatenate([np.full(len(p), i) for i, p in enumerate(self.mover_parts)])
        names, size, u, v, hd, sp = zip(*self.mover_rows)
        # Instance ids of movers follow the static ones so textures/colours never collide.
        parts = Primitives(**{**parts.__dict__, "instance": owner + 1_000_000})
        return Movers(parts, owner, tuple(names), np.asarray(size, float), np.asarray(u, float),
                      np.asarray(v, float), np.asarray(hd, float), np.asarray(sp, float))


def _make_layout(rng: np.random.Generator, u_lo: float, u_hi: float) -> StreetLayout:
    lanes = int(rng.choice([1, 2], p=[0.55, 0.45]))
    lane_width = rng.uniform(3.3, 3.7)
    median = rng.uniform(0.8, 1.6) if rng.random() < 0.4 else 0.0
    parking = (rng.uniform(2.3, 2.7), rng.uniform(2.2, 2.6) if rng.random() < 0.6 else 0.0)
    verge = tuple(rng.uniform(FURNITURE_W, 2.5) if rng.random() < 0.6 else 0.0 for _ in range(2))
    verge_cls = tuple(TERRAIN if rng.random() < 0.65 else OTHER_FLAT for _ in range(2))
    if median == 0 and OTHER_FLAT not in [c for c, w in zip(verge_cls, verge) if w > 0]:
        verge, verge_cls = (max(verge[0], rng.uniform(FURNITURE_W, 2.0)), verge[1]), (OTHER_FLAT, verge_cls[1])
    sidewalk = (rng.uniform(3.0, 4.8), rng.uniform(3.0, 4.8))
    cross, u = [], u_lo + rng.uniform(15, 70)
    while u < u_hi:
        if abs(u) < START_CLEAR:  # the start set (near u = 0) needs an uninterrupted parking lane
            u = START_CLEAR + rng.uniform(0, 10)
        cross.append((u, rng.uniform(3.5, 5.5)))
        u += rng.uniform(70, 150)
    edges, kinds, lots = [], [], []
    for _ in range(2):
        e = [u_lo - 1.0]
        while e[-1] < u_hi:
            e.append(e[-1] + rng.uniform(25, 60))
        k = rng.choice([BUILDINGS, PARK, PARKING, CONSTRUCTION, PLAZA], size=len(e) - 1, p=[0.5, 0.2, 0.14, 0.08, 0.08])
        edges.append(np.asarray(e))
        kinds.append(k)
        lots.append(np.asarray([rng.choice(_LOT_CLASS_CHOICES[int(x)]) for x in k]))
    cu = np.asarray([c[0] for c in cross]) if cross else np.zeros(0)
    ch = np.asarray([c[1] for c in cross]) if cross else np.zeros(0)
    asphalt = np.array([0.3, 0.3, 0.31]) * rng.uniform(0.8, 1.2)
    return StreetLayout(lanes, lane_width, median, parking, verge, verge_cls, sidewalk, cu, ch,
                        tuple(edges), tuple(kinds), tuple(lots), asphalt)


def _vehicle(rng: np.random.Generator, moving: bool) -> Asset:
    r = rng.random()
    if r < 0.72:
        return A.car(rng)
    if r < 0.82:
        return A.truck(rng)
    if r < 0.88:
        return A.bus(rng)
    if r < 0.94:
        return A.motorcycle(rng, ridden=moving)
    if r < 0.98 or not moving:
        return A.bicycle(rng, ridden=moving)
    return A.construction_vehicle(rng)


def _fill_lane(sb: _SceneBuilder, v: float, heading: float, speed: float, lo: float, hi: float,
               keep_out: tuple[float, float] | None, gap: tuple[float, float]) -> None:
    """Moving traffic along one lane, bumper to bumper gaps drawn from ``gap``, every vehicle
    within [lo, hi] at t = 0 and none overlapping ``keep_out`` (the ego's stretch of its lane)."""
    rng = sb.rng
    u = lo + rng.uniform(0, gap[1])
    while True:
        asset = _vehicle(rng, moving=True)
        if u + asset.size[0] > hi:
            return
        u += 0.5 * asset.size[0]
        half = 0.5 * asset.size[0]
        if keep_out is None or not (keep_out[0] - half < u < keep_out[1] + half):
            sb.place_mover(asset, u, v + rng.uniform(-0.1, 0.1), heading, speed, reserve=False)
        u += half + rng.uniform(*gap)


def _start_set(sb: _SceneBuilder, u_start: float) -> None:
    """Roadworks and rarer objects along the right parking lane, furniture zone and lot edge next
    to the ego start (the lamp arm, local +x, reaches over the road)."""
    rng, lay = sb.rng, sb.layout
    v_park = -(lay.curb(0) - 0.5 * lay.parking[0])
    items = [A.construction_vehicle(rng), A.trailer(rng), A.motorcycle(rng, ridden=False)]
    rng.shuffle(items)
    u = u_start - rng.uniform(12, 16)
    for asset in items:  # each vehicle followed by barriers and cones, 0.5 m apart
        u += 0.5 * asset.size[0]
        sb.place_mover(_fit_width(asset, lay.parking[0]), u, v_park, 0.0, 0.0, reserve=True, margin=0.2)
        u += 0.5 * asset.size[0] + 0.5
        for _ in range(rng.integers(1, 3)):
            for item, dv in ((A.barrier(rng), 0.3), (A.traffic_cone(rng), 0.6)):
                u += 0.5 * item.size[0]
                sb.place_mover(item, u, v_park + rng.uniform(-dv, dv), 0.0, 0.0, reserve=True, margin=0.2)
                u += 0.5 * item.size[0] + 0.5
    a_furniture = _furniture_offset(lay, 0)
    u = u_start - rng.uniform(4, 8)
    for obj in (A.bicycle(rng, ridden=False), A.clutter(rng), A.street_lamp(rng), A.clutter(rng)):
        if obj.cls_name in ("others", "manmade"):
            sb.place_static(obj, u, -a_furniture, np.pi / 2 if obj.cls_name == "manmade" else 0.0, margin=0.1)
        else:
            sb.place_mover(obj, u, -a_furniture, 0.0, 0.0, reserve=True, margin=0.1)
        u += rng.uniform(2.5, 5.0)
    # A standing pedestrian at the lot edge, clear of the walking lanes.
    sb.place_mover(A.pedestrian(rng), u, -(lay.lot_start(0) + 0.6), rng.uniform(-np.pi, np.pi), 0.0, reserve=True)


def _fit_width(asset: Asset, lane: float) -> Asset:
    """Parked objects may overhang their parking lane by at most 5 cm per side."""
    limit = lane + 0.1
    if asset.size[1] <= limit:
        return asset
    s = limit / asset.size[1]
    parts = tuple(A.Part(p.kind, (p.center[0], p.center[1] * s, p.center[2]), (p.half[0], p.half[1] * s, p.half[2]),
                         p.yaw, p.material, p.color) for p in asset.parts)
    return Asset(asset.cls_name, (asset.size[0], limit, asset.size[2]), parts)


def _furniture_offset(lay: StreetLayout, side: int) -> float:
    """|v| of the furniture zone centre: the verge if there is one (always >= FURNITURE_W wide),
    else the first FURNITURE_W metres of the sidewalk (the walking lanes start after them)."""
    return lay.curb(side) + 0.5 * (lay.verge[side] if lay.verge[side] > 0 else FURNITURE_W)


def _walk_start(lay: StreetLayout, side: int) -> float:
    """|v| where the walking lanes begin."""
    return lay.sidewalk_start(side) + (0.0 if lay.verge[side] > 0 else FURNITURE_W)


def _furniture(sb: _SceneBuilder, side: int, lo: float, hi: float, density: float) -> None:
    """Trees, lamps, signs, clutter, parked bicycles and cones along the road-side furniture zone.
    Everything is at most 1.3 m wide across the street, so the walking lanes stay clear."""
    rng, lay = sb.rng, sb.layout
    sign = -1.0 if side == 0 else 1.0
    a = _furniture_offset(lay, side)
    u = lo + rng.uniform(0, 8)
    while u < hi:
        if lay.cross_distance(np.array([u]))[0] > 3.0:
            r = rng.random()
            if r < 0.4:
                if sb.placer.take(u - 0.5, u + 0.5, sign * a - 0.5, sign * a + 0.5):
                    A.add_asset(sb.static, A.tree(rng, max_crown=2.0), u, sign * a, 0.0, IDS, STREET_PRIORITY)
            elif r < 0.65:  # the lamp arm (local +x) reaches over the road
                sb.place_static(A.street_lamp(rng), u, sign * (lay.curb(side) + 0.35), np.pi / 2 * (1 if side == 0 else -1), margin=0.1)
            elif r < 0.82:
                sb.place_static(A.clutter(rng), u, sign * a, 0.0, margin=0.1)
            elif r < 0.92:
                sb.place_mover(A.bicycle(rng, ridden=False), u, sign * a, rng.choice([0.0, np.pi]), 0.0, reserve=True, margin=0.1)
            else:
                sb.place_mover(A.traffic_cone(rng), u, sign * a, 0.0, 0.0, reserve=True, margin=0.1)
        u += rng.uniform(5.0, 13.0) / max(density, 1e-3)


def _parking_lane(sb: _SceneBuilder, side: int, lo: float, hi: float, density: float) -> None:
    rng, lay = sb.rng, sb.layout
    if lay.parking[side] <= 0:
        return
    v = (1 if side == 1 else -1) * (lay.curb(side) - 0.5 * lay.parking[side])
    heading = 0.0 if side == 0 else np.pi
    u = lo + rng.uniform(0, 6)
    while u < hi:
        r = rng.random()
        if r < 0.12 / max(density, 1e-3):
            u += rng.uniform(3, 10)
            continue
        asset = (A.car(rng) if r < 0.75 else A.truck(rng) if r < 0.83 else A.trailer(rng) if r < 0.87
                 else A.motorcycle(rng, ridden=False) if r < 0.93 else A.barrier(rng) if r < 0.97 else A.traffic_cone(rng))
        asset = _fit_width(asset, lay.parking[side])
        u += 0.5 * asset.size[0]
        if lay.cross_distance(np.array([u]))[0] > 0.5 * asset.size[0] + 4:
            sb.place_mover(asset, u, v, heading, 0.0, reserve=True)
        u += 0.5 * asset.size[0] + rng.uniform(0.8, 4.0)


def _lots(sb: _SceneBuilder, side: int, lo: float, hi: float, density: float) -> None:
    """Buildings, parks, parking lots, construction sites and plazas behind the sidewalk."""
    rng, lay = sb.rng, sb.layout
    sign = -1.0 if side == 0 else 1.0
    a0 = lay.lot_start(side)
    edges, kinds = lay.block_edges[side], lay.block_kind[side]
    for k, kind in enumerate(kinds):
        b0, b1 = max(edges[k], lo), min(edges[k + 1], hi)
        if b1 - b0 < 5:
            continue
        ok = lambda u, half: lay.cross_distance(np.array([u]))[0] > half + lay.sidewalk[side] + 0.5  # noqa: E731
        if kind == BUILDINGS:
            u = b0
            while u < b1:
                length, depth = rng.uniform(8, 26), rng.uniform(8, 18)
                setback = rng.uniform(0.5, 6.0)
                uc = u + 0.5 * length
                if uc + 0.5 * length < b1 and ok(uc, 0.5 * length):
                    sb.place_static(A.building(rng, length, depth), uc, sign * (a0 + setback + 0.5 * depth), 0.0, 0.1)
                    if setback > 3 and rng.random() < 0.4:
                        sb.place_static(A.hedge(rng, 0.8 * length), uc, sign * (a0 + 0.9), np.pi / 2, 0.1)
                u += length + rng.uniform(0.0, 5.0)
        elif kind in (PARK, PLAZA):
            n = int((b1 - b0) * 0.15 * density) + 1
            for _ in range(n):
                u, a = rng.uniform(b0, b1), a0 + rng.uniform(2, 22)
                if not ok(u, 3.0):
                    continue
                r = rng.random()
                if r < 0.55:
                    if sb.placer.take(u - 1.5, u + 1.5, sign * a - 1.5, sign * a + 1.5):
                        A.add_asset(sb.static, A.tree(rng), u, sign * a, 0.0, IDS, STREET_PRIORITY)
                elif r < 0.7:
                    sb.place_static(A.hedge(rng, rng.uniform(3, 9)), u, sign * a, np.pi / 2 * rng.integers(2))
                elif r < 0.85:
                    sb.place_static(A.clutter(rng), u, sign * a, rng.uniform(0, np.pi))
                else:
                    sb.place_mover(A.pedestrian(rng), u, sign * a, rng.uniform(-np.pi, np.pi), 0.0, reserve=True)
            if kind == PLAZA and rng.random() < 0.5:
                sb.place_static(A.bus_shelter(rng), 0.5 * (b0 + b1), sign * (a0 + 1.2), 0.0 if side == 1 else np.pi)
        elif kind == PARKING:
            for row in range(2):
                a = a0 + 3.5 + row * 6.0
                u = b0 + 1.5
                while u < b1 - 1.5:
                    if ok(u, 2.0) and rng.random() < 0.75 * min(density, 1.3):
                        car = A.car(rng) if rng.random() < 0.9 else A.truck(rng)
                        sb.place_mover(car, u, sign * a, np.pi / 2 + np.pi * rng.integers(2), 0.0, reserve=True)
                    u += rng.uniform(2.6, 3.2)
        else:  # CONSTRUCTION
            u = b0 + rng.uniform(2, 6)
            while u < b1 - 3:
                if ok(u, 2.0):
                    b = A.barrier(rng)
                    sb.place_mover(b, u, sign * (a0 + 0.6), 0.0, 0.0, reserve=True)
                u += rng.uniform(2.7, 4.0)
            for _ in range(int(rng.integers(1, 3))):
                u = rng.uniform(b0 + 6, b1 - 6) if b1 - b0 > 12 else 0.5 * (b0 + b1)
                if ok(u, 5.0):
                    sb.place_mover(A.construction_vehicle(rng), u, sign * (a0 + rng.uniform(4, 12)), rng.uniform(-np.pi, np.pi), 0.0, reserve=True)
            for _ in range(int(rng.integers(2, 6))):
                u = rng.uniform(b0, b1)
                if ok(u, 1.0):
                    maker = rng.choice([0, 1, 2])
                    asset = A.traffic_cone(rng) if maker == 0 else A.clutter(rng) if maker == 1 else A.trailer(rng)
                    if asset.cls_name == "others":
                        sb.place_static(asset, u, sign * (a0 + rng.uniform(2, 14)), rng.uniform(0, np.pi))
                    else:
                        sb.place_mover(asset, u, sign * (a0 + rng.uniform(2, 14)), rng.uniform(0, np.pi), 0.0, reserve=True)
            sb.place_static(A.wall(rng, b1 - b0 - 2), 0.5 * (b0 + b1), sign * (a0 + 18), 0.0 if side else np.pi)
        # Skyline: a tall building far behind some lots hides the empty world behind them.
        if rng.random() < 0.6 and b1 - b0 > 15:
            length = min(b1 - b0 - 2, rng.uniform(15, 40))
            sb.place_static(A.building(rng, length, rng.uniform(10, 20)), 0.5 * (b0 + b1), sign * (a0 + rng.uniform(34, 45)), 0.0, 0.1)


def _pedestrians(sb: _SceneBuilder, side: int, lo: float, hi: float, density: float, span: float) -> None:
    """Two walking lanes per sidewalk, one each way, each at its own walking speed."""
    rng, lay = sb.rng, sb.layout
    sign = -1.0 if side == 0 else 1.0
    w0 = _walk_start(lay, side)
    width = lay.lot_start(side) - w0
    for j, heading in enumerate((0.0, np.pi)):
        a = w0 + width * (0.3 + 0.45 * j)
        speed = rng.uniform(0.8, 1.6)
        u = lo - span * speed + rng.uniform(0, 5)
        while u < hi + span * speed:
            sb.place_mover(A.pedestrian(rng), u, sign * a, heading, speed, reserve=False)
            u += rng.uniform(3.0, 18.0) / max(density, 1e-3)


def build_street_scene(cfg: StreetConfig, index: int) -> StreetScene:
    """Scene ``index`` of a dataset; deterministic in (cfg.seed, index) and independent of the
    number of scenes, so generating more scenes never changes the earlier ones."""
    rng = np.random.default_rng([cfg.seed, 1, index])
    sc = cfg.scene
    duration = (cfg.frames - 1) * sc.frame_interval_s
    speed = rng.uniform(*sc.ego_speed)
    margin = cfg.render.far + 15.0
    u_e0 = 0.0
    lo, hi = u_e0 - margin, u_e0 + speed * duration + margin
    layout = _make_layout(rng, lo - 60.0, hi + 60.0)
    sb = _SceneBuilder(layout, rng)

    lane = rng.integers(layout.lanes)
    ego = EgoTrack(u_e0, -layout.lane_centers()[lane], speed, min(0.35, 0.04 * speed), rng.uniform(8, 16), rng.uniform(0, 2 * np.pi))
    _start_set(sb, u_e0)
    for side in (0, 1):
        _parking_lane(sb, side, lo, hi, sc.clutter_density)
        _furniture(sb, side, lo, hi, sc.clutter_density)
        _lots(sb, side, lo, hi, sc.clutter_density)
        _pedestrians(sb, side, lo, hi, sc.traffic_density, duration)
    gap = (8.0 / max(sc.traffic_density, 1e-3), 40.0 / max(sc.traffic_density, 1e-3))
    for side in (0, 1):
        for k, a in enumerate(layout.lane_centers()):
            v = -a if side == 0 else a
            heading = 0.0 if side == 0 else np.pi
            if side == 0 and k == lane:
                lane_speed, keep_out = speed, (u_e0 - 12.0, u_e0 + 12.0)  # keeps its gap to the ego
            else:
                lane_speed, keep_out = rng.uniform(2.0, 12.0), None
            rel = abs(lane_speed * (1 if side == 0 else -1) - speed) * duration
            if side == 1 and k == 0:  # a bus and a truck near the ego start, then the rest of the lane
                u0 = u = u_e0 + rng.uniform(10.0, 25.0)
                for asset in (A.bus(rng), A.truck(rng)):
                    sb.place_mover(asset, u + 0.5 * asset.size[0], v, heading, lane_speed, reserve=False)
                    u += asset.size[0] + gap[0] + rng.uniform(0.0, 4.0)
                _fill_lane(sb, v, heading, lane_speed, lo - rel, u0 - gap[0], None, gap)
                _fill_lane(sb, v, heading, lane_speed, u, hi + rel, None, gap)
            else:
                _fill_lane(sb, v, heading, lane_speed, lo - rel, hi + rel, keep_out, gap)

    rig_rng = np.random.default_rng([cfg.seed, 2, index])
    cameras = build_rig(cfg.rig, rig_rng)
    lidar = build_lidar(cfg.lidar, rig_rng, cfg.rig.mount_jitter_deg)
    sun_az, sun_el = rng.uniform(-np.pi, np.pi), rng.uniform(np.radians(20), np.radians(65))
    sun = np.array([np.cos(sun_el) * np.cos(sun_az), np.cos(sun_el) * np.sin(sun_az), np.sin(sun_el)])
    haze = rng.uniform(0.0, 1.0)
    horizon = np.array([0.78, 0.82, 0.86]) * rng.uniform(0.9, 1.05)
    zenith = np.array([0.3, 0.5, 0.85]) * (1 - haze * 0.4) + haze * 0.4 * horizon
    token = make_token(f"scene-{cfg.seed}-{index}")
    return StreetScene(
        index=index,
        name=f"scene-{index:04d}",
        token=token,
        log=f"synth{cfg.seed:04d}-{index:04d}",
        layout=layout,
        static=sb.static.build(),
        movers=sb.movers(),
        ego=ego,
        road_yaw=float(rng.uniform(-np.pi, np.pi)),
        road_offset=(float(rng.uniform(300, 2000)), float(rng.uniform(300, 2000))),
        start_us=1_533_000_000_000_000 + cfg.seed * 10_000_000_000 + index * 100_000_000,
        frame_interval_us=int(round(sc.frame_interval_s * 1e6)),
        cameras=cameras,
        lidar=lidar,
        sun_road=sun,
        sky=(horizon, zenith),
    )


def make_token(text: str) -> str:
    """A deterministic 32-hex-digit token, like nuScenes tokens."""
    return hashlib.md5(text.encode()).hexdigest()


def frame_token(scene: StreetScene, frame: int) -> str:
    return make_token(f"{scene.token}-sample-{frame}")


def ego_pose_road(scene: StreetScene, time_us: int) -> tuple[float, float, float]:
    """Ego (u, v, heading) in the road frame at an absolute timestamp."""
    return scene.ego.pose((time_us - scene.start_us) * 1e-6)


@dataclass(frozen=True)
class EgoView:
    """The scene around the ego at one keyframe, in that keyframe's ego frame."""

    prims: Primitives  # static solids within the radius, then the solids of the movers
    owner: np.ndarray  # (P,) mover index of each solid, -1 for static solids
    movers: np.ndarray  # (M,) indices of the movers included
    ground: StreetGround


def primitives_in_ego(scene: StreetScene, key_time_us: int, radius: float) -> EgoView:
    """Solids within ``radius`` of the ego at the keyframe time, with movers at their
    keyframe-time positions, in the keyframe ego frame."""
    u, v, hd = ego_pose_road(scene, key_time_us)
    c, s = np.cos(hd), np.sin(hd)
    # ego_from_road: rotate by -heading about the ego position.
    def to_ego(p: Primitives) -> Primitives:
        tx, ty = -(c * u + s * v), -(-s * u + c * v)
        return p.moved(-hd, tx, ty)

    st = scene.static
    near = np.hypot(st.center[:, 0] - u, st.center[:, 1] - v) < radius + st.bound_radius()
    mv = scene.movers
    t = (key_time_us - scene.start_us) * 1e-6
    mu, mvv = mv.positions(t)
    obj_near = np.hypot(mu - u, mvv - v) < radius + np.linalg.norm(mv.size, axis=1)
    sel = obj_near[mv.owner]
    parts = mv.parts.subset(sel)
    own = mv.owner[sel]
    # Each part: rotate by its object's heading, then translate to the object's position.
    hc, hs = np.cos(mv.heading[own]), np.sin(mv.heading[own])
    x, y = parts.center[:, 0], parts.center[:, 1]
    center = np.stack([hc * x - hs * y + mu[own], hs * x + hc * y + mvv[own], parts.center[:, 2]], axis=1)
    placed = Primitives(**{**parts.__dict__, "center": center, "yaw": parts.yaw + mv.heading[own]})
    prims = to_ego(Primitives.concat([st.subset(near), placed]))
    owner = np.concatenate([np.full(int(near.sum()), -1), own])
    road_from_ego = np.array([[c, -s, u], [s, c, v], [0.0, 0.0, 1.0]])
    return EgoView(prims, owner, np.nonzero(obj_near)[0], StreetGround(scene.layout, road_from_ego))
