"""Typed configuration of the synthetic world (``occdistill synth``).

Two presets, each a frozen dataclass tree that :func:`occdistill.config.load_config` fills from
``key=value`` overrides: :class:`StreetConfig` (Occ3D-nuScenes output) and :class:`RoomConfig`
(Occ-ScanNet output). The resolved tree is written to ``<out>/config.yaml``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from occdistill.geometry.grid import VoxelGrid

# The nuScenes camera ring, in the order of the nuScenes/BEVDet info files.
NUSCENES_CAMERAS: tuple[str, ...] = (
    "CAM_FRONT", "CAM_FRONT_RIGHT", "CAM_FRONT_LEFT", "CAM_BACK", "CAM_BACK_LEFT", "CAM_BACK_RIGHT",
)


@dataclass(frozen=True)
class GridConfig:
    """Occupancy grid in the keyframe ego frame: ``range`` = xmin,ymin,zmin,xmax,ymax,zmax (m).

    The default keeps the Occ3D voxel size and vertical range (ground in z-layer 2) on a 40 m x 40 m
    area, 100x100x16, so that CPU work is 4x smaller than the full 200x200x16 Occ3D grid.
    """

    range: tuple[float, float, float, float, float, float] = (-20.0, -20.0, -1.0, 20.0, 20.0, 5.4)
    voxel_size: tuple[float, float, float] = (0.4, 0.4, 0.4)

    def __post_init__(self) -> None:
        self.voxel_grid()  # raises ValueError (-> ConfigError) on a grid that is not whole voxels

    def voxel_grid(self) -> VoxelGrid:
        return VoxelGrid(range=self.range, voxel_size=self.voxel_size)


@dataclass(frozen=True)
class RigConfig:
    """Surround cameras: any subset (and order) of the six nuScenes cameras.

    Mounts follow nuScenes (height ~1.5 m; yaw 0, -55, +55, 180, +110, -110 deg). Every camera but
    CAM_BACK has ``hfov_deg``; CAM_BACK is wider, as in nuScenes. 320x180 is nuScenes' 1600x900 / 5.
    """

    cameras: tuple[str, ...] = NUSCENES_CAMERAS
    width: int = 320
    height: int = 180
    hfov_deg: float = 70.0
    back_hfov_deg: float = 110.0
    mount_jitter_deg: float = 1.0  # per-scene calibration spread (yaw/pitch/roll), like nuScenes logs

    def __post_init__(self) -> None:
        if not self.cameras:
            raise ValueError("rig.cameras must name at least one camera")
        bad = [c for c in self.cameras if c not in NUSCENES_CAMERAS]
        if bad:
            raise ValueError(f"rig.cameras: unknown camera(s) {bad}; choose from {list(NUSCENES_CAMERAS)}")
        if len(set(self.cameras)) != len(self.cameras):
            raise ValueError(f"rig.cameras lists a camera twice: {list(self.cameras)}")
        if self.width < 8 or self.height < 8:
            raise ValueError(f"rig image size {self.width}x{self.height} is too small (min 8x8)")
        for name, fov in (("hfov_deg", self.hfov_deg), ("back_hfov_deg", self.back_hfov_deg)):
            if not 5.0 <= fov <= 170.0:
                raise ValueError(f"rig.{name} = {fov} must be within [5, 170] degrees")


@dataclass(frozen=True)
class LidarConfig:
    """A spinning LiDAR (nuScenes LIDAR_TOP-like) ray-cast against the scene at the keyframe time."""

    beams: int = 32
    azimuths: int = 1000
    min_elevation_deg: float = -30.0
    max_elevation_deg: float = 10.0
    max_range: float = 70.0

    def __post_init__(self) -> None:
        if self.beams < 1 or self.azimuths < 8:
            raise ValueError(f"lidar needs beams >= 1 and azimuths >= 8, got {self.beams}, {self.azimuths}")
        if not -90 < self.min_elevation_deg < self.max_elevation_deg < 90:
            raise ValueError("lidar elevations must satisfy -90 < min_elevation_deg < max_elevation_deg < 90")
        if self.max_range <= 0:
            raise ValueError("lidar.max_range must be positive")


@dataclass(frozen=True)
class RenderConfig:
    """Image appearance. Exposure and light vary per frame; noise is per pixel."""

    far: float = 90.0  # geometry beyond this distance (m) is not rendered (fog hides the cut)
    exposure_range: tuple[float, float] = (0.75, 1.25)
    noise_std: float = 0.015  # sensor noise, fraction of full scale
    jpeg_quality: int = 92

    def __post_init__(self) -> None:
        if self.far <= 1.0:
            raise ValueError("render.far must exceed 1 m")
        lo, hi = self.exposure_range
        if not 0 < lo <= hi:
            raise ValueError(f"render.exposure_range {self.exposure_range} must satisfy 0 < lo <= hi")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError("render.jpeg_quality must be within 1..100")


@dataclass(frozen=True)
class MaskConfig:
    """Camera visibility-mask rays: neighbouring rays are at most ``ray_spacing`` voxels apart
    where they leave the grid or hit the ground (see voxelize.camera_mask_rays). Occ3D casts one
    ray per pixel of a 1600x900 image; against 6x denser rays, 1.0 leaves ~3% of the observed
    voxels unobserved at the default and the full Occ3D grid (measured), 0.5 ~1.5% at 4x the cost."""

    ray_spacing: float = 1.0

    def __post_init__(self) -> None:
        if not 0.05 <= self.ray_spacing <= 4.0:
            raise ValueError("mask.ray_spacing must be within [0.05, 4] voxels")


@dataclass(frozen=True)
class SplitConfig:
    """The last ``val_scenes`` scenes form the val split; with fewer scenes than that + 1, every
    scene is in both splits (smoke-test data, no generalisation claim)."""

    val_scenes: int = 1

    def __post_init__(self) -> None:
        if self.val_scenes < 0:
            raise ValueError("split.val_scenes must be >= 0")


@dataclass(frozen=True)
class StreetSceneConfig:
    """Procedural street layout and traffic."""

    frame_interval_s: float = 0.5  # nuScenes keyframes are 2 Hz
    ego_speed: tuple[float, float] = (4.0, 10.0)  # m/s, drawn per scene
    traffic_density: float = 1.0  # multiplies the number of moving agents
    clutter_density: float = 1.0  # multiplies the number of static objects

    def __post_init__(self) -> None:
        if self.frame_interval_s <= 0:
            raise ValueError("scene.frame_interval_s must be positive")
        if not 0 <= self.ego_speed[0] <= self.ego_speed[1] <= 30:
            raise ValueError(f"scene.ego_speed {self.ego_speed} must satisfy 0 <= lo <= hi <= 30")
        if self.traffic_density < 0 or self.clutter_density < 0:
            raise ValueError("scene densities must be >= 0")


@dataclass(frozen=True)
class StreetConfig:
    """``occdistill synth --preset street``: Occ3D-nuScenes layout."""

    preset: Literal["street"] = "street"
    scenes: int = 2
    frames: int = 6
    seed: int = 0
    grid: GridConfig = field(default_factory=GridConfig)
    rig: RigConfig = field(default_factory=RigConfig)
    lidar: LidarConfig = field(default_factory=LidarConfig)
    render: RenderConfig = field(default_factory=RenderConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    scene: StreetSceneConfig = field(default_factory=StreetSceneConfig)

    def __post_init__(self) -> None:
        _check_counts(self.scenes, self.frames, self.seed)


@dataclass(frozen=True)
class RoomCameraConfig:
    """The single moving RGB-D camera. 640x480 is the size Occ-ScanNet loaders work at; 58 deg is
    the horizontal field of view of ScanNet's colour camera."""

    width: int = 640
    height: int = 480
    hfov_deg: float = 58.0
    height_range: tuple[float, float] = (1.2, 1.6)  # camera height above the floor (m)
    pitch_range_deg: tuple[float, float] = (-22.0, 2.0)  # negative = looking down

    def __post_init__(self) -> None:
        if self.width < 8 or self.height < 8:
            raise ValueError(f"camera image size {self.width}x{self.height} is too small (min 8x8)")
        if not 5.0 <= self.hfov_deg <= 170.0:
            raise ValueError("camera.hfov_deg must be within [5, 170]")
        if not 0.3 <= self.height_range[0] <= self.height_range[1] <= 2.2:
            raise ValueError("camera.height_range must satisfy 0.3 <= lo <= hi <= 2.2 m")


@dataclass(frozen=True)
class RoomGridConfig:
    """Occ-ScanNet grid: ``shape`` voxels of ``voxel_size`` from ``voxel_origin`` in the world
    frame, axis-aligned with the world, placed in front of the camera for every frame."""

    shape: tuple[int, int, int] = (60, 60, 36)
    voxel_size: float = 0.08

    def __post_init__(self) -> None:
        if min(self.shape) < 4 or any(s % 4 for s in self.shape):
            raise ValueError(f"grid.shape {self.shape} must be multiples of 4 (target_1_16 is 4x coarser)")
        if self.voxel_size <= 0:
            raise ValueError("grid.voxel_size must be positive")


@dataclass(frozen=True)
class RoomConfig:
    """``occdistill synth --preset room``: Occ-ScanNet layout."""

    preset: Literal["room"] = "room"
    scenes: int = 1
    frames: int = 4
    seed: int = 0
    grid: RoomGridConfig = field(default_factory=RoomGridConfig)
    camera: RoomCameraConfig = field(default_factory=RoomCameraConfig)
    render: RenderConfig = field(default_factory=lambda: RenderConfig(far=20.0))
    mask: MaskConfig = field(default_factory=MaskConfig)
    split: SplitConfig = field(default_factory=SplitConfig)

    def __post_init__(self) -> None:
        _check_counts(self.scenes, self.frames, self.seed)


def _check_counts(scenes: int, frames: int, seed: int) -> None:
    if scenes < 1:
        raise ValueError(f"scenes must be >= 1, got {scenes}")
    if frames < 1:
        raise ValueError(f"frames must be >= 1, got {frames}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")


PRESETS: dict[str, type] = {"street": StreetConfig, "room": RoomConfig}
