"""Parsing of nuScenes-style info pickles into typed, validated records.

Accepted layouts (all real-world variants we have met):
- BEVDet / mmdet3d v1 / Occ3D: ``{'infos': [...], 'metadata': {...}}``, per sample ``token``,
  ``timestamp`` (microseconds), ``lidar2ego_rotation/translation``, ``ego2global_rotation/translation``
  (quaternions w,x,y,z), ``cams[CAM]`` with ``data_path``, ``cam_intrinsic``,
  ``sensor2ego_rotation/translation``, camera-time ``ego2global_rotation/translation`` and
  ``sensor2lidar_rotation/translation``; optional ``scene_name``, ``occ_path``.
- mmdet3d >= 1.1: ``{'data_list': [...], 'metainfo': {...}}`` with ``images[CAM]`` holding
  ``img_path``, ``cam2img`` and ``lidar2cam`` (which already folds in the camera-time ego pose),
  ``lidar_points.lidar2ego`` and ``ego2global`` as 4x4 matrices.

Paths may carry Windows separators; they are normalised to ``/`` and resolved against a data root
by their tail (see :func:`resolve_data_path`). When ``scene_name`` is absent it is taken from the
``occ_path`` (``.../gts/<scene>/<token>``), else from ``scene_token``.
"""

from __future__ import annotations

import dataclasses
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from occdistill.errors import DataError
from occdistill.geometry.grid import VoxelGrid
from occdistill.geometry.transforms import check_rigid, invert_rigid, make_transform, transform_from_quat

# Directory names under a dataset root that anchor a stored path's tail (nuScenes-style roots and
# Occ-ScanNet's ``posed_images``).
_ANCHORS = ("samples", "sweeps", "gts", "semantic", "depth", "posed_images")


@dataclass(frozen=True)
class CameraInfo:
    """One camera of one frame. Transforms are (4, 4) float64 ``b_from_a``."""

    name: str
    image_path: str
    intrinsic: np.ndarray  # (3, 3) raw intrinsics, before any augmentation
    keyego_from_cam: np.ndarray  # camera -> ego frame at the keyframe (LiDAR) time
    ego_from_cam: np.ndarray | None  # sensor2ego (None when the layout does not store it)
    global_from_egocam: np.ndarray | None  # ego2global at the camera timestamp
    lidar_from_cam: np.ndarray | None  # sensor2lidar
    timestamp: int | None
    semantic_path: str | None = None
    depth_path: str | None = None


@dataclass(frozen=True)
class FrameInfo:
    """One keyframe. ``global_from_ego`` is the ego pose at the keyframe (LiDAR) time."""

    index: int  # position in the sorted InfoSet
    token: str
    scene_name: str
    timestamp: int
    ego_from_lidar: np.ndarray
    global_from_ego: np.ndarray
    cameras: tuple[CameraInfo, ...]
    lidar_path: str | None
    occ_path: str | None
    raw: dict[str, Any] = field(repr=False, compare=False)

    @property
    def lidar_origin_ego(self) -> np.ndarray:
        """(3,) LiDAR position in this frame's ego frame."""
        return self.ego_from_lidar[:3, 3].copy()

    def camera(self, name: str) -> CameraInfo:
        for cam in self.cameras:
            if cam.name == name:
                return cam
        raise DataError(f"sample {self.token}: no camera {name!r} (has {[c.name for c in self.cameras]})")


@dataclass(frozen=True)
class InfoSet:
    """All frames of an info file, ordered by scene (first appearance) and timestamp."""

    path: Path
    frames: tuple[FrameInfo, ...]
    metadata: dict[str, Any]

    def __len__(self) -> int:
        return len(self.frames)

    def scenes(self) -> list[str]:
        return list(dict.fromkeys(f.scene_name for f in self.frames))

    def scene_frames(self, scene_name: str) -> list[FrameInfo]:
        return [f for f in self.frames if f.scene_name == scene_name]

    def previous(self, frame: FrameInfo, steps: int = 1) -> FrameInfo | None:
        """The frame ``steps`` keyframes earlier in the same scene, or None at the scene start."""
        j = frame.index - steps
        if j < 0 or self.frames[j].scene_name != frame.scene_name:
            return None
        return self.frames[j]

    def by_token(self) -> dict[str, FrameInfo]:
        return {f.token: f for f in self.frames}


def normalize_path(path: str) -> str:
    """Windows separators -> '/', leading './' removed."""
    p = str(path).replace("\\", "/")
    while p.startswith("./"):
        p = p[2:]
    return p


def resolve_data_path(data_root: str | Path, stored: str) -> Path:
    """Locate a stored (possibly foreign, possibly Windows) path under ``data_root``.

    Tries, in order: the path as given if absolute and existing; ``data_root/path``; then
    ``data_root/<tail>`` where the tail starts at the last anchor directory (samples, sweeps, gts,
    semantic, depth, posed_images). Returns the best candidate even if it does not exist, so that the caller's
    error names a concrete path.
    """
    root = Path(data_root)
    norm = normalize_path(stored)
    p = Path(norm)
    if p.is_absolute() and p.exists():
        return p
    direct = root / norm
    if direct.exists():
        return direct
    parts = norm.split("/")
    for i in range(len(parts) - 1, -1, -1):
        if parts[i] in _ANCHORS:
            return root.joinpath(*parts[i:])
    return direct


def _get(d: dict, key: str, where: str) -> Any:
    if key not in d:
        raise DataError(f"{where}: missing key {key!r}")
    return d[key]


def _matrix(value: Any, shape: tuple[int, ...], where: str) -> np.ndarray:
    arr = np.asarray(value, dtype=np.float64)
    if arr.shape != shape:
        raise DataError(f"{where}: expected shape {shape}, got {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise DataError(f"{where}: contains NaN or inf")
    return arr


def _pose(d: dict, prefix: str, where: str) -> np.ndarray:
    """``<prefix>_rotation`` (quaternion or 3x3) + ``<prefix>_translation`` -> checked 4x4."""
    rot = np.asarray(_get(d, f"{prefix}_rotation", where), dtype=np.float64)
    trans = _matrix(_get(d, f"{prefix}_translation", where), (3,), f"{where} {prefix}_translation")
    if rot.shape == (4,):
        t = transform_from_quat(rot, trans)
    elif rot.shape == (3, 3):
        t = make_transform(rot, trans)
    else:
        raise DataError(f"{where}: {prefix}_rotation must be a w,x,y,z quaternion or 3x3, got shape {rot.shape}")
    return check_rigid(t, f"{where} {prefix}")


def _scene_name(info: dict) -> str:
    if info.get("scene_name"):
        return str(info["scene_name"])
    occ = info.get("occ_path")
    if occ:
        parts = normalize_path(occ).rstrip("/").split("/")
        if len(parts) >= 2 and "gts" in parts:
            return parts[parts.index("gts") + 1]
    if info.get("scene_token"):
        return str(info["scene_token"])
    return "unknown-scene"


def _parse_v1(info: dict, where: str) -> tuple[dict, list[CameraInfo]]:
    ego_from_lidar = _pose(info, "lidar2ego", where)
    global_from_ego = _pose(info, "ego2global", where)
    cams = []
    for name, cam in _get(info, "cams", where).items():
        cw = f"{where} camera {name}"
        ego_from_cam = _pose(cam, "sensor2ego", cw)
        global_from_egocam = _pose(cam, "ego2global", cw)
        lidar_from_cam = _pose(cam, "sensor2lidar", cw) if "sensor2lidar_rotation" in cam else None
        # DESIGN.md section 3: go through the camera-time ego pose (up to 0.33 m on real data).
        keyego_from_cam = invert_rigid(global_from_ego) @ global_from_egocam @ ego_from_cam
        cams.append(
            CameraInfo(
                name=name,
                image_path=normalize_path(_get(cam, "data_path", cw)),
                intrinsic=_matrix(_get(cam, "cam_intrinsic", cw), (3, 3), f"{cw} cam_intrinsic"),
                keyego_from_cam=keyego_from_cam,
                ego_from_cam=ego_from_cam,
                global_from_egocam=global_from_egocam,
                lidar_from_cam=lidar_from_cam,
                timestamp=int(cam["timestamp"]) if "timestamp" in cam else None,
                semantic_path=normalize_path(cam["semantic_path"]) if cam.get("semantic_path") else None,
                depth_path=normalize_path(cam["depth_path"]) if cam.get("depth_path") else None,
            )
        )
    common = dict(
        token=str(_get(info, "token", where)),
        timestamp=int(_get(info, "timestamp", where)),
        ego_from_lidar=ego_from_lidar,
        global_from_ego=global_from_ego,
        lidar_path=normalize_path(info["lidar_path"]) if info.get("lidar_path") else None,
    )
    return common, cams


def _parse_v2(info: dict, where: str) -> tuple[dict, list[CameraInfo]]:
    lidar = _get(info, "lidar_points", where)
    ego_from_lidar = check_rigid(_matrix(_get(lidar, "lidar2ego", where), (4, 4), f"{where} lidar2ego"), where)
    global_from_ego = check_rigid(_matrix(_get(info, "ego2global", where), (4, 4), f"{where} ego2global"), where)
    cams = []
    for name, cam in _get(info, "images", where).items():
        cw = f"{where} camera {name}"
        if not cam.get("img_path"):
            continue  # mmdet3d leaves cameras without an image as empty entries
        cam_from_lidar = check_rigid(_matrix(_get(cam, "lidar2cam", cw), (4, 4), f"{cw} lidar2cam"), cw)
        lidar_from_cam = invert_rigid(cam_from_lidar)
        cam2img = np.asarray(_get(cam, "cam2img", cw), dtype=np.float64)[:3, :3]
        ego_from_cam = (
            check_rigid(_matrix(cam["cam2ego"], (4, 4), f"{cw} cam2ego"), cw) if "cam2ego" in cam else None
        )
        cams.append(
            CameraInfo(
                name=name,
                image_path=normalize_path(cam["img_path"]),
                intrinsic=_matrix(cam2img, (3, 3), f"{cw} cam2img"),
                keyego_from_cam=ego_from_lidar @ lidar_from_cam,
                ego_from_cam=ego_from_cam,
                global_from_egocam=None,
                lidar_from_cam=lidar_from_cam,
                timestamp=int(cam["timestamp"]) if "timestamp" in cam else None,
            )
        )
    ts = info.get("timestamp", 0)
    # mmdet3d v2 stores seconds as float; keep microseconds throughout.
    ts = int(round(ts * 1e6)) if isinstance(ts, float) else int(ts)
    common = dict(
        token=str(_get(info, "token", where) if "token" in info else _get(info, "sample_idx", where)),
        timestamp=ts,
        ego_from_lidar=ego_from_lidar,
        global_from_ego=global_from_ego,
        lidar_path=normalize_path(lidar["lidar_path"]) if lidar.get("lidar_path") else None,
    )
    return common, cams


def parse_infos(obj: Any, source: str = "<infos>") -> tuple[list[dict], dict]:
    """Split a loaded info object into (per-sample dicts, metadata)."""
    if isinstance(obj, dict) and "infos" in obj:
        return list(obj["infos"]), dict(obj.get("metadata") or {})
    if isinstance(obj, dict) and "data_list" in obj:
        return list(obj["data_list"]), dict(obj.get("metainfo") or {})
    if isinstance(obj, list):
        return obj, {}
    keys = list(obj.keys()) if isinstance(obj, dict) else type(obj).__name__
    raise DataError(f"{source}: not an info file (expected 'infos' or 'data_list', found {keys})")


def parse_frame(record: Any, where: str = "<record>", index: int = 0) -> FrameInfo:
    """Parse one sample record (BEVDet / mmdet3d v1 dict, or mmdet3d >= 1.1 dict) into a FrameInfo.

    Also the entry point for single records stored outside a pickle (e.g. a YAML dump of a BEVDet
    info). ``where`` names the record in error messages; ``index`` is its position in its InfoSet.
    """
    if not isinstance(record, dict):
        raise DataError(f"{where}: a sample record must be a mapping, got {type(record).__name__}")
    common, cams = (_parse_v2 if "lidar_points" in record else _parse_v1)(record, where)
    occ = record.get("occ_path")
    return FrameInfo(
        index=index,
        scene_name=_scene_name(record),
        cameras=tuple(cams),
        occ_path=normalize_path(occ) if occ else None,
        raw=record,
        **common,
    )


def load_infos(path: str | Path) -> InfoSet:
    """Load and validate an info pickle; frames are ordered by scene, then timestamp."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: info file not found")
    try:
        with open(path, "rb") as f:
            obj = pickle.load(f)
    except Exception as exc:  # unpickling errors come in many types
        raise DataError(f"{path}: cannot unpickle info file ({type(exc).__name__}: {exc})") from exc
    records, metadata = parse_infos(obj, str(path))
    if not records:
        raise DataError(f"{path}: info file holds no samples")
    parsed = [
        parse_frame(info, f"{path.name} sample {i} ({info.get('token', '?') if isinstance(info, dict) else '?'})")
        for i, info in enumerate(records)
    ]
    # Scenes keep the order of their first appearance; frames within a scene go by time.
    scene_rank: dict[str, int] = {}
    for f in parsed:
        scene_rank.setdefault(f.scene_name, len(scene_rank))
    parsed.sort(key=lambda f: (scene_rank[f.scene_name], f.timestamp))
    frames = tuple(dataclasses.replace(f, index=i) for i, f in enumerate(parsed))
    tokens = [f.token for f in frames]
    if len(set(tokens)) != len(tokens):
        dup = next(t for t in tokens if tokens.count(t) > 1)
        raise DataError(f"{path}: sample token {dup} appears more than once")
    return InfoSet(path=path, frames=frames, metadata=metadata)


def grid_from_metadata(metadata: dict, where: str) -> VoxelGrid | None:
    """The grid an info file declares (synthetic infos write ``occ_range``, ``voxel_size``,
    ``grid_shape``), or None when it declares none (real nuScenes infos)."""
    if "occ_range" not in metadata:
        return None
    size = metadata.get("voxel_size", 0.4)
    size = (float(size),) * 3 if np.isscalar(size) else tuple(float(s) for s in size)
    try:
        grid = VoxelGrid(range=tuple(float(v) for v in metadata["occ_range"]), voxel_size=size)
    except (ValueError, TypeError) as exc:
        raise DataError(f"{where}: metadata occ_range/voxel_size do not form a grid ({exc})") from exc
    if "grid_shape" in metadata and tuple(int(v) for v in metadata["grid_shape"]) != grid.shape:
        raise DataError(f"{where}: metadata grid_shape {tuple(metadata['grid_shape'])} != {grid.shape} from occ_range/voxel_size")
    return grid
