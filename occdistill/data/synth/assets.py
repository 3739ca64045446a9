"""Procedural object shapes of both presets, each a few convex solids of one class.

An :class:`Asset` lives in its own frame: x forward (length), y left (width), z up, origin on the
ground at the footprint centre. Solids that rest on the ground reach ``SINK`` below it: the
ground plane hides that part in every image, and the ground voxel layer under the object takes
the object's class (the object, not the road, is what a sensor sees there).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from occdistill.data.classes import OCC3D_NUSCENES as OCC
from occdistill.data.classes import OCC_SCANNET as SCN
from occdistill.data.synth.primitives import BOX, CYLINDER, ELLIPSOID, PrimitiveBuilder
from occdistill.data.synth.shading import (
    BARK, FABRIC, FACADE, FOLIAGE, GLASS, METAL, PLAIN, SCREEN, STRIPES, VEHICLE, WOOD,
)

SINK = 0.1

# Voxel overlap priority per class: small things beat the large things they touch or stand in.
STREET_PRIORITY = {
    "traffic_cone": 16, "barrier": 15, "pedestrian": 14, "bicycle": 13, "motorcycle": 12, "others": 11,
    "car": 10, "truck": 9, "bus": 8, "trailer": 7, "construction_vehicle": 6, "vegetation": 4, "manmade": 3,
}
ROOM_PRIORITY = {
    "objects": 12, "tvs": 11, "window": 10, "chair": 9, "table": 8, "sofa": 7, "bed": 6, "furniture": 5,
    "wall": 3, "ceiling": 2, "floor": 1,
}

CAR_COLOURS = np.array([
    (0.92, 0.92, 0.92), (0.08, 0.08, 0.09), (0.62, 0.63, 0.66), (0.35, 0.36, 0.38), (0.62, 0.08, 0.07),
    (0.10, 0.22, 0.55), (0.06, 0.12, 0.28), (0.15, 0.35, 0.2), (0.75, 0.68, 0.52), (0.85, 0.7, 0.1),
])


@dataclass(frozen=True)
class Part:
    kind: int
    center: tuple[float, float, float]
    half: tuple[float, float, float]
    yaw: float
    material: int
    color: np.ndarray


@dataclass(frozen=True)
class Asset:
    """One object: its class name, box size (l, w, h) for detection labels, and its solids."""

    cls_name: str
    size: tuple[float, float, float]
    parts: tuple[Part, ...]


def jitter(rng: np.random.Generator, color, amount: float = 0.06) -> np.ndarray:
    return np.clip(np.asarray(color, np.float64) * rng.uniform(1 - amount, 1 + amount, 3), 0, 1)


def grounded_box(cx: float, cy: float, l: float, w: float, z0: float, z1: float, material: int, color, yaw: float = 0.0) -> Part:
    """A box from height z0 to z1 (z0 = 0 means resting on the ground, so it sinks by SINK)."""
    lo = z0 - SINK if z0 <= 0 else z0
    return Part(BOX, (cx, cy, 0.5 * (lo + z1)), (0.5 * l, 0.5 * w, 0.5 * (z1 - lo)), yaw, material, np.asarray(color))


def post(cx: float, cy: float, r: float, z0: float, z1: float, material: int, color) -> Part:
    lo = z0 - SINK if z0 <= 0 else z0
    return Part(CYLINDER, (cx, cy, 0.5 * (lo + z1)), (r, r, 0.5 * (z1 - lo)), 0.0, material, np.asarray(color))


# ---------------------------------------------------------------------------------------- street


def car(rng: np.random.Generator) -> Asset:
    l, w, h = rng.uniform(4.0, 4.9), rng.uniform(1.75, 2.0), rng.uniform(1.45, 1.75)
    col = jitter(rng, CAR_COLOURS[rng.integers(len(CAR_COLOURS))])
    body_h = 0.55 * h
    return Asset("car", (l, w, h), (
        grounded_box(0.0, 0.0, l, w, 0.0, body_h, METAL, col),
        grounded_box(-0.08 * l, 0.0, 0.55 * l, 0.9 * w, body_h, h, VEHICLE, col),
    ))


def truck(rng: np.random.Generator) -> Asset:
    l, w, h = rng.uniform(6.0, 9.0), rng.uniform(2.3, 2.6), rng.uniform(2.8, 3.6)
    cab = 2.2
    cab_col = jitter(rng, CAR_COLOURS[rng.integers(len(CAR_COLOURS))])
    box_col = jitter(rng, rng.choice([(0.9, 0.9, 0.88), (0.7, 0.2, 0.15), (0.3, 0.4, 0.6), (0.55, 0.55, 0.5)]))
    return Asset("truck", (l, w, h), (
        grounded_box(0.5 * l - 0.5 * cab, 0.0, cab, w, 0.0, 0.85 * h, VEHICLE, cab_col),
        grounded_box(-0.5 * cab, 0.0, l - cab - 0.1, w, 0.0, h, PLAIN, box_col),
    ))


def bus(rng: np.random.Generator) -> Asset:
    l, w, h = rng.uniform(10.0, 12.5), rng.uniform(2.5, 2.9), rng.uniform(3.0, 3.6)
    col = jitter(rng, rng.choice([(0.85, 0.75, 0.15), (0.8, 0.12, 0.1), (0.2, 0.45, 0.7), (0.9, 0.9, 0.9)]))
    return Asset("bus", (l, w, h), (grounded_box(0.0, 0.0, l, w, 0.0, h, VEHICLE, col),))


def trailer(rng: np.random.Generator) -> Asset:
    l, w, h = rng.uniform(7.0, 11.0), rng.uniform(2.4, 2.6), rng.uniform(3.2, 3.9)
    col = jitter(rng, rng.choice([(0.82, 0.82, 0.8), (0.55, 0.2, 0.12), (0.2, 0.3, 0.45)]))
    return Asset("trailer", (l, w, h), (
        grounded_box(-0.4, 0.0, l - 0.8, w, 0.0, h, PLAIN, col),
        grounded_box(0.5 * l - 0.4, 0.0, 0.8, 0.3, 0.0, 0.9, METAL, (0.2, 0.2, 0.2)),
    ))


def construction_vehicle(rng: np.random.Generator) -> Asset:
    l, w, h = rng.uniform(5.5, 7.5), rng.uniform(2.4, 3.0), rng.uniform(3.0, 3.6)
    col = jitter(rng, (0.9, 0.65, 0.08))
    return Asset("construction_vehicle", (l, w, h), (
        grounded_box(-0.15 * l, 0.0, 0.65 * l, w, 0.0, 1.5, METAL, col),
        grounded_box(-0.25 * l, 0.0, 1.6, 0.8 * w, 1.5, h, VEHICLE, col),
        grounded_box(0.3 * l, 0.0, 0.4 * l, 0.45, 1.8, 2.3, METAL, col * 0.9),
        grounded_box(0.5 * l - 0.4, 0.0, 0.8, 0.9 * w, 0.0, 0.9, METAL, (0.25, 0.25, 0.25)),
    ))


def motorcycle(rng: np.random.Generator, ridden: bool) -> Asset:
    l, w = rng.uniform(1.9, 2.3), rng.uniform(0.7, 0.9)
    h = 1.55 if ridden else 1.15
    col = jitter(rng, CAR_COLOURS[rng.integers(len(CAR_COLOURS))])
    parts = [grounded_box(0.0, 0.0, l, 0.45 * w, 0.0, 0.85, METAL, col),
             grounded_box(0.4 * l, 0.0, 0.2, w, 0.85, 1.15, METAL, (0.15, 0.15, 0.15))]
    if ridden:
        parts.append(grounded_box(-0.1 * l, 0.0, 0.5, 0.5, 0.85, h, FABRIC, jitter(rng, (0.2, 0.2, 0.25), 0.4)))
    return Asset("motorcycle", (l, w, h), tuple(parts))


def bicycle(rng: np.random.Generator, ridden: bool) -> Asset:
    l, w = rng.uniform(1.6, 1.8), 0.6
    h = 1.7 if ridden else 1.05
    col = jitter(rng, CAR_COLOURS[rng.integers(len(CAR_COLOURS))], 0.2)
    parts = [grounded_box(0.0, 0.0, l, 0.16, 0.0, 0.75, METAL, col),
             grounded_box(0.38 * l, 0.0, 0.12, w, 0.75, 1.05, METAL, (0.1, 0.1, 0.1))]
    if ridden:
        parts.append(grounded_box(-0.1 * l, 0.0, 0.45, 0.45, 0.75, h, FABRIC, jitter(rng, (0.3, 0.25, 0.2), 0.5)))
    return Asset("bicycle", (l, w, h), tuple(parts))


def pedestrian(rng: np.random.Generator) -> Asset:
    h = rng.uniform(1.55, 1.9)
    r = rng.uniform(0.22, 0.3)
    clothes = jitter(rng, rng.uniform(0.05, 0.8, 3), 0.1)
    skin = jitter(rng, rng.choice([(0.85, 0.65, 0.5), (0.55, 0.38, 0.25), (0.35, 0.22, 0.15)]))
    head = 0.12
    return Asset("pedestrian", (2 * r, 2 * r, h), (
        post(0.0, 0.0, r, 0.0, h - 2 * head, FABRIC, clothes),
        Part(ELLIPSOID, (0.0, 0.0, h - head), (head * 0.9, head * 0.8, head), 0.0, PLAIN, skin),
    ))


def traffic_cone(rng: np.random.Generator) -> Asset:
    h = rng.uniform(0.7, 1.0)
    r = rng.uniform(0.17, 0.22)
    return Asset("traffic_cone", (2 * r, 2 * r, h), (post(0.0, 0.0, r, 0.0, h, STRIPES, jitter(rng, (0.95, 0.35, 0.05))),))


def barrier(rng: np.random.Generator) -> Asset:
    l, w, h = rng.uniform(1.8, 2.6), rng.uniform(0.4, 0.6), rng.uniform(0.8, 1.1)
    if rng.random() < 0.5:
        return Asset("barrier", (l, w, h), (grounded_box(0.0, 0.0, l, w, 0.0, h, STRIPES, jitter(rng, (0.85, 0.12, 0.1))),))
    return Asset("barrier", (l, w, h), (grounded_box(0.0, 0.0, l, w, 0.0, h, PLAIN, jitter(rng, (0.72, 0.72, 0.68))),))


def clutter(rng: np.random.Generator) -> Asset:
    """``others``: bins, dumpsters, hydrants, crates, benches."""
    kind = rng.integers(5)
    if kind == 0:
        return Asset("others", (0.6, 0.6, 1.0), (grounded_box(0, 0, 0.6, 0.6, 0.0, 1.0, PLAIN, jitter(rng, (0.15, 0.35, 0.2), 0.3)),))
    if kind == 1:
        return Asset("others", (2.0, 1.3, 1.4), (grounded_box(0, 0, 2.0, 1.3, 0.0, 1.4, METAL, jitter(rng, (0.2, 0.3, 0.45), 0.3)),))
    if kind == 2:
        return Asset("others", (0.35, 0.35, 0.75), (post(0, 0, 0.17, 0.0, 0.75, METAL, jitter(rng, (0.8, 0.1, 0.08))),))
    if kind == 3:
        return Asset("others", (1.0, 1.0, 0.9), (grounded_box(0, 0, 1.0, 1.0, 0.0, 0.9, WOOD, jitter(rng, (0.6, 0.45, 0.25), 0.15)),))
    return Asset("others", (1.8, 0.6, 0.5), (grounded_box(0, 0, 1.8, 0.6, 0.0, 0.5, WOOD, jitter(rng, (0.45, 0.3, 0.2), 0.15)),))


def tree(rng: np.random.Generator, max_crown: float = 2.8) -> Asset:
    """Trunk and crown; the crown starts above 2.1 m so that pedestrians pass under it."""
    trunk_h = rng.uniform(2.6, 3.6)
    r_trunk = rng.uniform(0.15, 0.3)
    crown_r = rng.uniform(1.2, max_crown)
    crown_h = rng.uniform(1.3, 2.2)
    leaf = jitter(rng, rng.choice([(0.18, 0.38, 0.12), (0.25, 0.45, 0.15), (0.15, 0.3, 0.14)]), 0.15)
    return Asset("vegetation", (2 * crown_r, 2 * crown_r, trunk_h + 1.8 * crown_h), (
        post(0.0, 0.0, r_trunk, 0.0, trunk_h + 0.5, BARK, jitter(rng, (0.35, 0.25, 0.17))),
        Part(ELLIPSOID, (0.0, 0.0, trunk_h + 0.8 * crown_h), (crown_r, crown_r * rng.uniform(0.85, 1.0), crown_h), rng.uniform(0, np.pi), FOLIAGE, leaf),
    ))


def hedge(rng: np.random.Generator, length: float) -> Asset:
    w, h = rng.uniform(0.7, 1.3), rng.uniform(0.8, 1.6)
    leaf = jitter(rng, (0.2, 0.4, 0.14), 0.15)
    return Asset("vegetation", (length, w, h), (grounded_box(0, 0, length, w, 0.0, h, FOLIAGE, leaf),))


def building(rng: np.random.Generator, length: float, depth: float) -> Asset:
    """A block of ``length`` along the street (local y) and ``depth`` away from it (local x)."""
    h = rng.uniform(5.0, 24.0)
    col = jitter(rng, rng.choice([(0.75, 0.68, 0.58), (0.6, 0.35, 0.28), (0.8, 0.8, 0.78), (0.5, 0.52, 0.55), (0.7, 0.6, 0.45)]), 0.1)
    parts = [grounded_box(0, 0, depth, length, 0.0, h, FACADE, col)]
    if h > 10 and rng.random() < 0.5:  # a set-back upper storey block
        top = rng.uniform(3.0, 7.0)
        parts.append(grounded_box(0.1 * depth, 0, 0.7 * depth, 0.7 * length, h, h + top, FACADE, col * 0.92))
        h += top
    return Asset("manmade", (depth, length, h), tuple(parts))


def wall(rng: np.random.Generator, length: float) -> Asset:
    h, t = rng.uniform(1.2, 2.6), rng.uniform(0.2, 0.35)
    col = jitter(rng, rng.choice([(0.65, 0.6, 0.55), (0.55, 0.3, 0.25), (0.4, 0.4, 0.42)]), 0.1)
    return Asset("manmade", (t, length, h), (grounded_box(0, 0, t, length, 0.0, h, PLAIN, col),))


def street_lamp(rng: np.random.Generator) -> Asset:
    """A pole with an arm reaching over the road (local +x), or a sign post."""
    h = rng.uniform(5.0, 8.0)
    grey = jitter(rng, (0.35, 0.36, 0.38))
    if rng.random() < 0.35:
        plate = jitter(rng, rng.choice([(0.1, 0.3, 0.7), (0.8, 0.1, 0.1), (0.9, 0.9, 0.9)]))
        return Asset("manmade", (0.3, 0.8, 2.8), (  # a sign post
            post(0, 0, 0.06, 0.0, 2.8, METAL, grey),
            grounded_box(0.0, 0.0, 0.06, 0.8, 2.0, 2.8, PLAIN, plate),
        ))
    arm = rng.uniform(1.0, 2.0)
    # The footprint is the pole's: the arm passes high above everything else.
    return Asset("manmade", (0.3, 0.3, h), (
        post(0, 0, rng.uniform(0.08, 0.14), 0.0, h, METAL, grey),
        grounded_box(0.5 * arm, 0, arm, 0.15, h - 0.15, h, METAL, grey),
    ))


def bus_shelter(rng: np.random.Generator) -> Asset:
    l = rng.uniform(3.0, 5.0)
    grey = jitter(rng, (0.5, 0.52, 0.55))
    return Asset("manmade", (1.6, l, 2.6), (
        grounded_box(0.0, 0.0, 1.6, l, 2.4, 2.6, METAL, grey),
        grounded_box(-0.75, 0.0, 0.1, l, 0.0, 2.4, GLASS, (0.55, 0.65, 0.7)),
    ))


# ------------------------------------------------------------------------------------------ room


def bed(rng: np.random.Generator) -> Asset:
    l, w = rng.uniform(1.9, 2.2), rng.uniform(0.95, 1.8)
    frame = jitter(rng, (0.45, 0.3, 0.2), 0.2)
    sheet = jitter(rng, rng.uniform(0.4, 0.95, 3), 0.1)
    return Asset("bed", (l, w, 1.0), (
        grounded_box(0, 0, l, w, 0.0, 0.3, WOOD, frame),
        grounded_box(0.02, 0, l - 0.1, w - 0.06, 0.3, 0.55, FABRIC, sheet),
        grounded_box(-0.5 * l + 0.05, 0, 0.1, w, 0.0, 1.0, WOOD, frame),
    ))


def sofa(rng: np.random.Generator) -> Asset:
    l, d = rng.uniform(1.6, 2.4), rng.uniform(0.8, 1.0)
    col = jitter(rng, rng.choice([(0.45, 0.45, 0.5), (0.55, 0.3, 0.2), (0.2, 0.3, 0.45), (0.7, 0.65, 0.55)]), 0.15)
    # local x: depth (front at +x), local y: length
    return Asset("sofa", (d, l, 0.85), (
        grounded_box(0.05, 0, d - 0.1, l - 0.3, 0.0, 0.45, FABRIC, col),
        grounded_box(-0.5 * d + 0.1, 0, 0.2, l, 0.0, 0.85, FABRIC, col * 0.95),
        grounded_box(0, 0.5 * l - 0.1, d, 0.2, 0.0, 0.62, FABRIC, col * 0.9),
        grounded_box(0, -0.5 * l + 0.1, d, 0.2, 0.0, 0.62, FABRIC, col * 0.9),
    ))


def table(rng: np.random.Generator) -> Asset:
    l, w, h = rng.uniform(0.8, 1.8), rng.uniform(0.6, 1.0), rng.uniform(0.45, 0.78)
    col = jitter(rng, rng.choice([(0.55, 0.38, 0.22), (0.8, 0.78, 0.72), (0.3, 0.22, 0.15)]), 0.1)
    leg = 0.06
    parts = [grounded_box(0, 0, l, w, h - 0.04, h, WOOD, col)]
    for sx in (-1, 1):
        for sy in (-1, 1):
            parts.append(grounded_box(sx * (0.5 * l - leg), sy * (0.5 * w - leg), leg, leg, 0.0, h - 0.04, WOOD, col * 0.85))
    return Asset("table", (l, w, h), tuple(parts))


def chair(rng: np.random.Generator) -> Asset:
    s = rng.uniform(0.42, 0.52)
    seat_h = rng.uniform(0.42, 0.48)
    col = jitter(rng, rng.choice([(0.5, 0.35, 0.2), (0.15, 0.15, 0.17), (0.6, 0.2, 0.15), (0.25, 0.4, 0.55)]), 0.1)
    leg = 0.05
    parts = [grounded_box(0, 0, s, s, seat_h - 0.05, seat_h, FABRIC, col),
             grounded_box(-0.5 * s + 0.03, 0, 0.06, s, seat_h, seat_h + 0.45, WOOD, col * 0.9)]
    for sx in (-1, 1):
        for sy in (-1, 1):
            parts.append(grounded_box(sx * (0.5 * s - leg), sy * (0.5 * s - leg), leg, leg, 0.0, seat_h - 0.05, WOOD, col * 0.8))
    return Asset("chair", (s, s, seat_h + 0.45), tuple(parts))


def cabinet(rng: np.random.Generator) -> Asset:
    """``furniture``: cabinets, wardrobes, shelves (local x: depth, y: width)."""
    w, d, h = rng.uniform(0.6, 2.0), rng.uniform(0.35, 0.6), rng.uniform(0.7, 2.1)
    col = jitter(rng, rng.choice([(0.85, 0.83, 0.78), (0.55, 0.4, 0.25), (0.35, 0.25, 0.18), (0.6, 0.62, 0.65)]), 0.08)
    return Asset("furniture", (d, w, h), (grounded_box(0, 0, d, w, 0.0, h, WOOD, col),))


def tv(rng: np.random.Generator, stand_h: float, max_width: float = 1.4) -> Asset:
    w = rng.uniform(0.7, max(0.75, max_width))
    h = w * 0.58
    return Asset("tvs", (0.06, w, h), (grounded_box(0, 0, 0.06, w, stand_h, stand_h + h, SCREEN, (0.05, 0.05, 0.06)),))


def small_object(rng: np.random.Generator, base_h: float) -> Asset:
    """``objects``: boxes, bins, lamps, vases, balls standing at height ``base_h``."""
    col = jitter(rng, rng.uniform(0.1, 0.95, 3), 0.05)
    kind = rng.integers(3)
    if kind == 0:
        s = rng.uniform(0.15, 0.45, 3)
        return Asset("objects", tuple(s), (grounded_box(0, 0, s[0], s[1], base_h, base_h + s[2], PLAIN, col),))
    if kind == 1:
        r, h = rng.uniform(0.06, 0.18), rng.uniform(0.15, 0.5)
        return Asset("objects", (2 * r, 2 * r, h), (post(0, 0, r, base_h, base_h + h, PLAIN, col),))
    r = rng.uniform(0.1, 0.2)
    z = base_h + r if base_h > 0 else r
    return Asset("objects", (2 * r, 2 * r, 2 * r), (Part(ELLIPSOID, (0, 0, z), (r, r, r), 0.0, PLAIN, col),))


def add_asset(
    builder: PrimitiveBuilder,
    asset: Asset,
    x: float,
    y: float,
    yaw: float,
    class_ids: dict[str, int],
    priority: dict[str, int],
) -> None:
    """Place ``asset`` at (x, y) on the ground with heading ``yaw`` into ``builder``."""
    inst = builder.new_instance()
    c, s = np.cos(yaw), np.sin(yaw)
    for p in asset.parts:
        px, py, pz = p.center
        builder.add(p.kind, (x + c * px - s * py, y + s * px + c * py, pz), p.half, yaw + p.yaw,
                    class_ids[asset.cls_name], p.material, p.color, priority[asset.cls_name], inst)


STREET_IDS = {n: i for i, n in enumerate(OCC.names)}
ROOM_IDS = {n: i for i, n in enumerate(SCN.names)}
