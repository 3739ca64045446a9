"""3D semantic occupancy -> 2D navigation layers: occupancy (occupied / free / unknown) and risk.

Layout (see also :mod:`occdistill.deploy.ros_io`): the input is indexed ``[x, y, z]`` on a
:class:`VoxelGrid`; every 2D layer is (H, W) = (Y, X) indexed ``[j, i]`` with ``i`` the x index and
``j`` the y index, i.e. ``layer = column_values.T``. So ``layer.reshape(-1)`` is the
``nav_msgs/OccupancyGrid`` data (``data[j * W + i]``), the map frame is the grid's frame (ego:
x forward, y left), ``origin = (xmin, ymin)`` is the corner of cell (0, 0) and cell (i, j) has its
centre at ``origin + ((i + 0.5) * res, (j + 0.5) * res)`` -- the voxel column's centre.

Per column (x, y):

1. Ground height ``g``: the centre height of the column's highest voxel of a traversable class
   (``ground="column"``), kept only within ``ground_max_step`` of the global ground (the median of
   those heights over the grid), so a stray "floor" voxel on a table cannot lift the band; columns
   without one (under a car, inside a wall, unlabelled) take the nearest accepted column's height.
   ``ground="global"`` uses the median everywhere and ``"fixed"`` uses ``ground_height``, which is
   also the fallback when no traversable voxel exists at all. Every labelled traversable voxel
   counts, observed or not (the height of the ground is geometry, not visibility).
2. Band: voxels whose centre lies in ``[g + band_min, g + band_max]`` (inclusive).
3. Obstacle voxel: a class that is not free, not unknown (Occ-ScanNet 255), not traversable and not
   in ``ignored_classes``. Dynamic classes are obstacles too (``dynamic_in_occupancy``).
4. occupied (100): an observed, confident obstacle voxel in the band. Otherwise, if the column is
   known: free (0) when its support voxel (the voxel at the ground height) is traversable or
   free, occupied (100) when it is an obstacle class (e.g. terrain removed from the traversable
   list, or a barrier in the ground layer), so a robot is never sent over ground it cannot drive.
   Below-band voxels (a curb lower than ``band_min``) and above-band ones (an overhang, a tree
   canopy) never block. Unknown (-1) otherwise, and also where the band holds an obstacle voxel
   that is labelled but not observed (GT behind an occluder): never free what hides an obstacle.
5. known: any observed band voxel or an observed support voxel. "Observed" is ``observed``
   (e.g. Occ3D ``mask_camera``) where given -- GT labels -- and every voxel for a model prediction
   without a mask; Occ-ScanNet's 255 voxels are never observed. With ``free_prob`` (per-voxel
   probability of free, from a model's softmax), a voxel is confident only if
   ``max(p, 1 - p) >= confidence``; an uncertain voxel cannot mark a cell occupied, and a band
   holding one is unknown unless a confident obstacle makes it occupied (a planner must not treat
   a maybe-obstacle as free).

Risk layer: cells holding an observed, confident voxel of a dynamic class in the band cost 100;
the cost decays with the Euclidean distance d (metres, cell centre to nearest object cell centre,
``scipy.ndimage.distance_transform_edt``) to 0 at ``inflation_radius``: linearly,
``100 * (1 - d / R)``, or exponentially, ``100 * exp(-rate * d)`` cut to 0 beyond R. It has no
unknown cells (it adds cost; it is not evidence of free space). Merge with :meth:`Costmap.combined`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from occdistill.data.classes import TABLES, ClassTable
from occdistill.errors import OccDistillError
from occdistill.geometry.grid import VoxelGrid

UNKNOWN, FREE, OCCUPIED = -1, 0, 100

OUTDOOR_TRAVERSABLE = ("driveable_surface", "sidewalk", "other_flat", "terrain")
OUTDOOR_DYNAMIC = ("car", "truck", "bus", "trailer", "construction_vehicle", "motorcycle", "bicycle", "pedestrian")


@dataclass
class CostmapConfig:
    """Occupancy -> costmap settings; this class's defaults are the outdoor (Occ3D) preset.

    Heights are metres relative to the ground estimate, distances metres.
    """

    preset: Literal["outdoor", "indoor"] = "outdoor"
    classes: Literal["occ3d-nuscenes", "occ-scannet"] = "occ3d-nuscenes"  # class table of the input
    band_min: float = 0.1  # lower edge of the robot's obstacle band above ground (climbable below)
    band_max: float = 2.0  # upper edge: robot height plus margin (overhangs above are ignored)
    traversable_classes: tuple[str, ...] = OUTDOOR_TRAVERSABLE
    dynamic_classes: tuple[str, ...] = OUTDOOR_DYNAMIC
    ignored_classes: tuple[str, ...] = ()  # never obstacles (e.g. a class a model hallucinates)
    dynamic_in_occupancy: bool = True  # dynamic objects are also lethal in the occupancy layer
    ground: Literal["column", "global", "fixed"] = "column"
    ground_height: float = 0.0  # "fixed" ground, and the fallback with no traversable voxel at all
    ground_max_step: float = 1.0  # per-column ground kept within this of the global (median) ground
    confidence: float = 0.7  # with free_prob: a voxel is confident if max(p, 1 - p) >= this
    inflation_radius: float = 2.0  # risk reaches 0 at this distance from a dynamic object
    risk_decay: Literal["linear", "exponential"] = "linear"
    risk_decay_rate: float = 1.0  # 1/m, exponential decay only
    frame_id: str = "base_footprint"  # nuScenes ego: origin on the ground, x forward, y left, z up
    occupied_thresh: float = 0.65  # map_server YAML thresholds (trinary occupancy map)
    free_thresh: float = 0.196

    def __post_init__(self) -> None:
        if not self.band_min < self.band_max:
            raise ValueError(f"band_min ({self.band_min}) must be below band_max ({self.band_max})")
        if self.inflation_radius < 0:
            raise ValueError(f"inflation_radius must be >= 0, got {self.inflation_radius}")
        if self.risk_decay_rate <= 0:
            raise ValueError(f"risk_decay_rate must be > 0, got {self.risk_decay_rate}")
        if self.ground_max_step <= 0:
            raise ValueError(f"ground_max_step must be > 0, got {self.ground_max_step}")
        if not 0.5 <= self.confidence <= 1.0:
            raise ValueError(f"confidence must be in [0.5, 1], got {self.confidence}")
        if not (1 / 255 < self.free_thresh < 50 / 255 < self.occupied_thresh < 1.0):
            raise ValueError(
                "map thresholds must satisfy 1/255 < free_thresh < 50/255 (0.196) < occupied_thresh < 1 "
                f"so that map_server reads the written pixels back; got free_thresh {self.free_thresh}, "
                f"occupied_thresh {self.occupied_thresh}"
            )
        table = TABLES[self.classes]
        for key in ("traversable_classes", "dynamic_classes", "ignored_classes"):
            for name in getattr(self, key):
                if name not in table.names:
                    raise ValueError(f"{key}: {name!r} is not a class of the {table.name} table {list(table.names)}")
                if table.names.index(name) == table.free_index:
                    raise ValueError(f"{key}: {name!r} is the free class")
        both = set(self.traversable_classes) & set(self.dynamic_classes)
        if both:
            raise ValueError(f"classes {sorted(both)} are both traversable and dynamic")

    @property
    def table(self) -> ClassTable:
        return TABLES[self.classes]


@dataclass
class IndoorCostmapConfig(CostmapConfig):
    """Indoor preset (Occ-ScanNet classes). No dynamic class by default: the table has no people,
    and chairs, though often moved, are static obstacles in one frame; set
    ``dynamic_classes=[chair]`` to keep a risk halo around them."""

    preset: Literal["outdoor", "indoor"] = "indoor"
    classes: Literal["occ3d-nuscenes", "occ-scannet"] = "occ-scannet"
    band_min: float = 0.05  # 0.08 m voxels: the first voxel above the floor is an obstacle
    band_max: float = 1.5
    traversable_classes: tuple[str, ...] = ("floor",)
    dynamic_classes: tuple[str, ...] = ()
    ground_max_step: float = 0.3
    inflation_radius: float = 1.0
    frame_id: str = "occ_grid"  # Occ-ScanNet ego: world axes, origin at the grid's bottom centre


PRESETS: dict[str, type[CostmapConfig]] = {"outdoor": CostmapConfig, "indoor": IndoorCostmapConfig}


def load_costmap_config(
    preset: str = "outdoor", path: str | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> CostmapConfig:
    """The preset's config with a YAML file and ``key=value`` overrides on top (later wins)."""
    from occdistill.config import load_config

    if preset not in PRESETS:
        raise OccDistillError(f"unknown costmap preset {preset!r}; choose from {sorted(PRESETS)}")
    return load_config(PRESETS[preset], path, list(overrides))


@dataclass(frozen=True)
class Costmap:
    """2D navigation layers of one occupancy frame. Layers are (H, W) = (Y, X), ``[j, i]``.

    ``occupancy`` int8: -1 unknown, 0 free, 100 occupied. ``risk`` int8 0..100. ``ground`` float32
    per-cell ground height (m, grid frame z). ``origin`` = (xmin, ymin, global ground height): the
    corner of cell (0, 0), placed at ground level for 3D viewers.
    """

    occupancy: np.ndarray
    risk: np.ndarray
    ground: np.ndarray
    resolution: float
    origin: tuple[float, float, float]
    frame_id: str
    ground_height: float  # global (median) ground height
    ground_source: str  # "traversable" (from voxels), "fallback" or "fixed"
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def width(self) -> int:
        return int(self.occupancy.shape[1])

    @property
    def height(self) -> int:
        return int(self.occupancy.shape[0])

    def cell_center(self, i: int, j: int) -> tuple[float, float]:
        """Centre (x, y) of cell column i, row j in the map frame."""
        return (self.origin[0] + (i + 0.5) * self.resolution, self.origin[1] + (j + 0.5) * self.resolution)

    def cell_at(self, x: float, y: float) -> tuple[int, int] | None:
        """(i, j) of the cell containing map point (x, y), or None outside the map."""
        i = int(np.floor((x - self.origin[0]) / self.resolution))
        j = int(np.floor((y - self.origin[1]) / self.resolution))
        return (i, j) if 0 <= i < self.width and 0 <= j < self.height else None

    def combined(self) -> np.ndarray:
        """max(occupancy, risk) where risk > 0, occupancy elsewhere (unknown stays unknown where no
        risk reaches, and a risky unknown cell gets the risk cost)."""
        return np.where(self.risk > 0, np.maximum(self.occupancy, self.risk), self.occupancy).astype(np.int8)

    def counts(self) -> dict[str, int]:
        occ = self.occupancy
        return {
            "occupied": int((occ == OCCUPIED).sum()),
            "free": int((occ == FREE).sum()),
            "unknown": int((occ == UNKNOWN).sum()),
            "risk_cells": int((self.risk > 0).sum()),
        }


def _class_ids(table: ClassTable, names: tuple[str, ...]) -> np.ndarray:
    return np.asarray([table.index(n) for n in names], dtype=np.int64)


def estimate_ground(
    traversable: np.ndarray, z_centers: np.ndarray, cfg: CostmapConfig
) -> tuple[np.ndarray, float, str]:
    """Per-column ground height (X, Y) from a traversable-voxel mask (X, Y, Z); see module doc."""
    from scipy.ndimage import distance_transform_edt

    x, y, z = traversable.shape
    if cfg.ground == "fixed":
        return np.full((x, y), cfg.ground_height, dtype=np.float64), float(cfg.ground_height), "fixed"
    has = traversable.any(axis=2)
    if not has.any():
        return np.full((x, y), cfg.ground_height, dtype=np.float64), float(cfg.ground_height), "fallback"
    top = z - 1 - np.argmax(traversable[:, :, ::-1], axis=2)
    height = z_centers[top]
    g0 = float(np.median(height[has]))
    if cfg.ground == "global":
        return np.full((x, y), g0, dtype=np.float64), g0, "traversable"
    accepted = has & (np.abs(height - g0) <= cfg.ground_max_step + 1e-9)
    if accepted.all():
        return height.astype(np.float64), g0, "traversable"
    # Columns without an accepted ground voxel take the nearest accepted column's height.
    _, (ix, iy) = distance_transform_edt(~accepted, return_indices=True)
    return height[ix, iy].astype(np.float64), g0, "traversable"


def risk_from_objects(objects: np.ndarray, resolution: float, cfg: CostmapConfig) -> np.ndarray:
    """(H, W) bool object cells -> (H, W) int8 risk 0..100 (100 on the objects)."""
    from scipy.ndimage import distance_transform_edt

    if not objects.any():
        return np.zeros(objects.shape, dtype=np.int8)
    d = distance_transform_edt(~objects, sampling=resolution)
    radius = cfg.inflation_radius
    if cfg.risk_decay == "linear":
        cost = 100.0 * (1.0 - d / radius) if radius > 0 else np.where(d == 0, 100.0, 0.0)
    else:
        cost = 100.0 * np.exp(-cfg.risk_decay_rate * d)
    cost = np.where(d <= radius, cost, 0.0)
    cost[objects] = 100.0
    return np.clip(np.rint(cost), 0, 100).astype(np.int8)


def compute_costmap(
    semantics: np.ndarray,
    grid: VoxelGrid,
    cfg: CostmapConfig | None = None,
    observed: np.ndarray | None = None,
    free_prob: np.ndarray | None = None,
) -> Costmap:
    """Costmap of one frame.

    Args:
        semantics: (X, Y, Z) integer class ids of ``cfg.classes`` (GT labels or a prediction's argmax).
        grid: the voxel grid of ``semantics`` (its x and y voxel sizes must be equal).
        cfg: settings (default: the outdoor preset).
        observed: (X, Y, Z) bool, e.g. GT ``mask_camera``; None = every voxel observed (prediction).
        free_prob: (X, Y, Z) float probability of free per voxel, from a model; marks uncertain voxels.
    """
    cfg = cfg or CostmapConfig()
    table = cfg.table
    sem = np.asarray(semantics)
    if sem.ndim != 3 or tuple(sem.shape) != tuple(grid.shape):
        raise OccDistillError(f"semantics has shape {tuple(sem.shape)}, the grid {grid.range} @ {grid.voxel_size} has {grid.shape}")
    if not np.issubdtype(sem.dtype, np.integer):
        raise OccDistillError(f"semantics must hold integer class ids, got dtype {sem.dtype}")
    valid = np.arange(table.num_classes).tolist() + ([table.ignore_index] if table.ignore_index is not None else [])
    bad = np.setdiff1d(np.unique(sem), valid)
    if bad.size:
        raise OccDistillError(f"semantics has labels {bad[:5].tolist()} outside the {table.name} table")
    if abs(grid.voxel_size[0] - grid.voxel_size[1]) > 1e-9:
        raise OccDistillError(f"a costmap needs square cells, the grid has voxel sizes {grid.voxel_size[:2]} in x, y")
    sem = sem.astype(np.int64)
    res = float(grid.voxel_size[0])
    nx, ny, nz = grid.shape

    obs = np.ones(sem.shape, dtype=bool) if observed is None else np.asarray(observed).astype(bool)
    if obs.shape != sem.shape:
        raise OccDistillError(f"observation mask has shape {obs.shape}, semantics {sem.shape}")
    if table.ignore_index is not None:
        obs = obs & (sem != table.ignore_index)
    if free_prob is not None:
        p = np.asarray(free_prob, dtype=np.float64)
        if p.shape != sem.shape:
            raise OccDistillError(f"free probability has shape {p.shape}, semantics {sem.shape}")
        if not np.isfinite(p).all() or p.min() < 0 or p.max() > 1:
            raise OccDistillError("free probability must be finite and within [0, 1]")
        uncertain = np.maximum(p, 1.0 - p) < cfg.confidence
    else:
        uncertain = np.zeros(sem.shape, dtype=bool)

    trav_ids = _class_ids(table, cfg.traversable_classes)
    dyn_ids = _class_ids(table, cfg.dynamic_classes)
    traversable = np.isin(sem, trav_ids)
    free = sem == table.free_index
    unknown_label = sem == table.ignore_index if table.ignore_index is not None else np.zeros(sem.shape, bool)
    obstacle = ~(traversable | free | unknown_label | np.isin(sem, _class_ids(table, cfg.ignored_classes)))
    dynamic = np.isin(sem, dyn_ids)
    if not cfg.dynamic_in_occupancy:
        obstacle &= ~dynamic

    z_centers = grid.range[2] + (np.arange(nz) + 0.5) * grid.voxel_size[2]
    ground, g0, source = estimate_ground(traversable, z_centers, cfg)
    rel = z_centers[None, None, :] - ground[:, :, None]  # (X, Y, Z) height above the ground
    eps = 1e-6
    band = (rel >= cfg.band_min - eps) & (rel <= cfg.band_max + eps)

    seen = obs & ~uncertain
    occupied = (band & obstacle & seen).any(axis=2)
    k_support = np.clip(np.floor((ground - grid.range[2]) / grid.voxel_size[2]).astype(np.int64), 0, nz - 1)
    support_obs = np.take_along_axis(obs, k_support[..., None], axis=2)[..., 0]
    support_blocked = np.take_along_axis(obstacle, k_support[..., None], axis=2)[..., 0]
    known = (band & obs).any(axis=2) | support_obs
    band_uncertain = (band & uncertain & ~unknown_label).any(axis=2)
    hidden_obstacle = (band & obstacle & ~obs).any(axis=2)

    cells = np.full((nx, ny), UNKNOWN, dtype=np.int8)
    decided = known & ~band_uncertain & ~hidden_obstacle
    cells[decided] = np.where(support_blocked[decided], OCCUPIED, FREE)
    cells[occupied] = OCCUPIED

    objects = (band & dynamic & seen).any(axis=2)
    risk = risk_from_objects(objects.T, res, cfg)

    stats = {
        "ground_height": g0,
        "ground_source": source,
        "ground_min": float(ground.min()),
        "ground_max": float(ground.max()),
        "band": [cfg.band_min, cfg.band_max],
        "dynamic_object_cells": int(objects.sum()),
        "uncertain_cells": int((band_uncertain & ~occupied).sum()),
    }
    # [x, y] columns -> (H, W) = (Y, X) layers: row j = y index, column i = x index.
    return Costmap(
        occupancy=np.ascontiguousarray(cells.T),
        risk=np.ascontiguousarray(risk),
        ground=np.ascontiguousarray(ground.T.astype(np.float32)),
        resolution=res,
        origin=(float(grid.range[0]), float(grid.range[1]), g0),
        frame_id=cfg.frame_id,
        ground_height=g0,
        ground_source=source,
        stats=stats,
    )


# ------------------------------------------------------------------ picture

_COLOURS = {
    "free": (236, 236, 236),
    "occupied": (25, 25, 25),
    "unknown": (128, 140, 160),
    "risk": (230, 40, 20),
}


def render_costmap(
    costmap: Costmap,
    scale: int | None = None,
    legend: bool = True,
    marker: tuple[float, ...] | None = (0.0, 0.0),
):
    """Colour picture of the layers as a PIL image, oriented like the PGM and RViz's top view:
    x (forward) to the right, y (left) up. Occupied black, free light grey, unknown blue-grey,
    risk in red with opacity = cost. ``marker`` (x, y[, yaw]) in the map frame -- the ego origin
    by default, the camera for Occ-ScanNet, None for none -- is a yellow triangle pointing along
    yaw (radians from +x, default 0).
    """
    from PIL import Image, ImageDraw

    occ, risk = costmap.occupancy, costmap.risk
    h, w = occ.shape
    rgb = np.empty((h, w, 3), dtype=np.float64)
    rgb[occ == FREE] = _COLOURS["free"]
    rgb[occ == OCCUPIED] = _COLOURS["occupied"]
    rgb[occ == UNKNOWN] = _COLOURS["unknown"]
    alpha = (risk.astype(np.float64) / 100.0)[..., None] * 0.75
    rgb = rgb * (1 - alpha) + np.asarray(_COLOURS["risk"], dtype=np.float64) * alpha
    img = rgb.clip(0, 255).astype(np.uint8)[::-1]  # row 0 = top = max y
    if scale is None:
        scale = max(1, int(np.ceil(480 / max(h, w))))
    pic = Image.fromarray(img, "RGB").resize((w * scale, h * scale), Image.NEAREST)
    draw = ImageDraw.Draw(pic)
    if marker is not None and costmap.cell_at(marker[0], marker[1]) is not None:
        px = (marker[0] - costmap.origin[0]) / costmap.resolution * scale
        py = (h - (marker[1] - costmap.origin[1]) / costmap.resolution) * scale
        s = max(4.0, 1.2 * scale)
        yaw = float(marker[2]) if len(marker) > 2 else 0.0
        c, n = np.cos(yaw), np.sin(yaw)
        # Triangle in the marker's frame, rotated by yaw; image y points down, map y up.
        tri = [(2.0 * s, 0.0), (-s, -0.8 * s), (-s, 0.8 * s)]
        draw.polygon([(px + c * u - n * v, py - (n * u + c * v)) for u, v in tri], fill=(255, 200, 0), outline=(0, 0, 0))
    if not legend:
        return pic
    bar = 22
    out = Image.new("RGB", (pic.width, pic.height + bar), (255, 255, 255))
    out.paste(pic, (0, 0))
    d = ImageDraw.Draw(out)
    x = 4
    for label, colour in (("free", "free"), ("occupied", "occupied"), ("unknown", "unknown"), ("dynamic risk", "risk")):
        d.rectangle([x, pic.height + 5, x + 12, pic.height + 17], fill=_COLOURS[colour], outline=(0, 0, 0))
        d.text((x + 16, pic.height + 5), label, fill=(0, 0, 0))
        x += 16 + 7 * len(label) + 14
    d.text((x, pic.height + 5), f"{costmap.resolution:g} m/cell, x right, y up", fill=(90, 90, 90))
    return out


# ------------------------------------------------------------------ files


def costmap_messages(costmap: Costmap, stamp_ns: int = 0) -> dict[str, dict[str, Any]]:
    """``{"occupancy": msg, "risk": msg}``: nav_msgs/OccupancyGrid fields of both layers."""
    from occdistill.deploy.ros_io import occupancy_grid_message

    return {
        layer: occupancy_grid_message(getattr(costmap, layer), costmap.resolution, costmap.origin, costmap.frame_id, stamp_ns)
        for layer in ("occupancy", "risk")
    }


def write_costmap(
    costmap: Costmap,
    out_dir: str | Path,
    name: str,
    cfg: CostmapConfig,
    stamp_ns: int = 0,
    marker: tuple[float, ...] | None = (0.0, 0.0),
) -> dict[str, str]:
    """Write one frame's files into ``out_dir`` and return them by role:

    ``<name>.yaml/.pgm`` (occupancy, map_server trinary), ``<name>_risk.yaml/.pgm`` (risk, map_server
    raw: pixel = cost), ``<name>.png`` (picture), ``<name>_occupancy_grid.json`` and
    ``<name>_risk_occupancy_grid.json`` (OccupancyGrid message fields).
    """
    import io as _io

    from occdistill.deploy import ros_io
    from occdistill.io import atomic_write_bytes

    out = Path(out_dir)
    origin = costmap.origin
    occ = ros_io.write_map_server(
        out / f"{name}.yaml", costmap.occupancy, costmap.resolution, origin, "trinary", cfg.occupied_thresh, cfg.free_thresh
    )
    risk = ros_io.write_map_server(
        out / f"{name}_risk.yaml", costmap.risk, costmap.resolution, origin, "raw", cfg.occupied_thresh, cfg.free_thresh
    )
    buf = _io.BytesIO()
    render_costmap(costmap, marker=marker).save(buf, format="PNG")
    png = atomic_write_bytes(out / f"{name}.png", buf.getvalue())
    msgs = costmap_messages(costmap, stamp_ns)
    occ_json = ros_io.write_occupancy_grid_json(out / f"{name}_occupancy_grid.json", msgs["occupancy"])
    risk_json = ros_io.write_occupancy_grid_json(out / f"{name}_risk_occupancy_grid.json", msgs["risk"])
    return {
        "map_yaml": str(occ.yaml),
        "map_pgm": str(occ.image),
        "risk_yaml": str(risk.yaml),
        "risk_pgm": str(risk.image),
        "png": str(png),
        "occupancy_grid_json": str(occ_json),
        "risk_occupancy_grid_json": str(risk_json),
    }
