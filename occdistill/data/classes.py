"""Class tables (DESIGN.md section 4) and display colours.

The synthetic world writes these exact tables, so every tool works on it unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ClassTable:
    """An ordered class table.

    ``free_index`` is the label of empty space (Occ3D: 17 = free; Occ-ScanNet: 0 = empty).
    ``ignore_index`` marks unknown voxels where the format has them (Occ-ScanNet: 255).
    ``colors`` are RGB uint8, one row per class, used by every visualisation.
    """

    name: str
    names: tuple[str, ...]
    free_index: int
    ignore_index: int | None
    colors: tuple[tuple[int, int, int], ...]

    @property
    def num_classes(self) -> int:
        return len(self.names)

    def palette(self) -> np.ndarray:
        """(K, 3) uint8 colours."""
        return np.asarray(self.colors, dtype=np.uint8)

    def index(self, name: str) -> int:
        try:
            return self.names.index(name)
        except ValueError:
            raise KeyError(f"class {name!r} is not in the {self.name} table {list(self.names)}") from None


OCC3D_NUSCENES = ClassTable(
    name="occ3d-nuscenes",
    names=(
        "others", "barrier", "bicycle", "bus", "car", "construction_vehicle", "motorcycle",
        "pedestrian", "traffic_cone", "trailer", "truck", "driveable_surface", "other_flat",
        "sidewalk", "terrain", "manmade", "vegetation", "free",
    ),
    free_index=17,
    ignore_index=None,
    # The colour map of the Occ3D / CVPR 2023 devkit visualiser.
    colors=(
        (0, 0, 0), (255, 120, 50), (255, 192, 203), (255, 255, 0), (0, 150, 245), (0, 255, 255),
        (200, 180, 0), (255, 0, 0), (255, 240, 150), (135, 60, 0), (160, 32, 240), (255, 0, 255),
        (139, 137, 137), (75, 0, 75), (150, 240, 80), (230, 230, 250), (0, 175, 0), (255, 255, 255),
    ),
)

OCC_SCANNET = ClassTable(
    name="occ-scannet",
    names=(
        "empty", "ceiling", "floor", "wall", "window", "chair", "bed", "sofa", "table", "tvs",
        "furniture", "objects",
    ),
    free_index=0,
    ignore_index=255,
    colors=(
        (255, 255, 255), (214, 38, 40), (43, 160, 43), (158, 216, 229), (114, 158, 206),
        (204, 204, 91), (255, 186, 119), (147, 102, 188), (30, 119, 181), (188, 188, 33),
        (255, 127, 12), (196, 175, 214),
    ),
)

TABLES: dict[str, ClassTable] = {t.name: t for t in (OCC3D_NUSCENES, OCC_SCANNET)}
