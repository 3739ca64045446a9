"""ROS artefacts without a ROS install: map_server maps, nav_msgs/OccupancyGrid messages, MCAP.

Layer convention (shared with :mod:`occdistill.deploy.costmap`): a 2D layer is an int8 array of
shape (H, W) = (Y cells, X cells) indexed ``layer[j, i]``, where column ``i`` runs along map x and
row ``j`` along map y. Cell (i, j) covers ``origin + (i, j) * res .. origin + (i + 1, j + 1) * res``
(centre at ``+ 0.5``). ``layer.reshape(-1)`` is then exactly ``OccupancyGrid.data`` (row-major,
starting with cell (0, 0), ``data[j * width + i]``), and ``MapMetaData.origin`` is the pose of the
corner of cell (0, 0). Values: -1 unknown, 0..100 cost.

map_server / nav2_map_server (YAML + PGM):

- The image's row 0 is the TOP of the map (largest y), so the PGM holds the layer flipped
  vertically. ``origin: [x, y, yaw]`` is the pose of the lower-left pixel.
- Pixel value ``v`` is read as occupancy probability ``p = (255 - v) / 255`` (``negate: 0``).
- ``mode: trinary`` (the occupancy layer): 0 -> black (p = 1.0, occupied), free -> 254
  (p = 0.004), unknown -> 205 (p = 0.196). The loader gives 100 if ``p > occupied_thresh``, 0 if
  ``p < free_thresh``, else -1. We write ``free_thresh: 0.196`` (the ROS 1 map_server value): Nav2's
  saver default 0.25 would read 205 back as FREE, turning unseen space into free space.
- ``mode: raw`` (the graded risk layer): the pixel value is the cell value (0..100; Nav2 reads
  101..255 as unknown), so graded costs round-trip exactly.

MCAP: ROS 2 ``nav_msgs/msg/OccupancyGrid`` messages (CDR) written with the ``mcap-ros2-support``
PyPI package (optional extra ``occdistill[ros]``), which needs no ROS install; it is imported only
by the MCAP functions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Literal, Sequence

import numpy as np
import yaml

from occdistill.errors import OccDistillError
from occdistill.io import atomic_write_bytes, atomic_write_text

UNKNOWN = -1
FREE = 0
OCCUPIED = 100

# map_server trinary pixel values (what map_saver writes).
PGM_OCCUPIED = 0
PGM_FREE = 254
PGM_UNKNOWN = 205

OCCUPANCY_GRID_TYPE = "nav_msgs/msg/OccupancyGrid"
# The concatenated ROS 2 (Humble and later) message definition, as ``rosbag2`` stores it: the
# top-level type, then each dependency after a separator line and ``MSG: <type>``.
OCCUPANCY_GRID_MSGDEF = """\
std_msgs/Header header
MapMetaData info
int8[] data
================================================================================
MSG: std_msgs/Header
builtin_interfaces/Time stamp
string frame_id
================================================================================
MSG: builtin_interfaces/Time
int32 sec
uint32 nanosec
================================================================================
MSG: nav_msgs/MapMetaData
builtin_interfaces/Time map_load_time
float32 resolution
uint32 width
uint32 height
geometry_msgs/Pose origin
================================================================================
MSG: geometry_msgs/Pose
Point position
Quaternion orientation
================================================================================
MSG: geometry_msgs/Point
float64 x
float64 y
float64 z
================================================================================
MSG: geometry_msgs/Quaternion
float64 x 0
float64 y 0
float64 z 0
float64 w 1
"""


def _check_layer(layer: np.ndarray, what: str = "layer") -> np.ndarray:
    layer = np.asarray(layer)
    if layer.ndim != 2 or layer.size == 0:
        raise ValueError(f"{what} must be a non-empty (H, W) array, got shape {layer.shape}")
    if not np.issubdtype(layer.dtype, np.integer):
        raise ValueError(f"{what} must hold integers -1..100, got dtype {layer.dtype}")
    if layer.min() < UNKNOWN or layer.max() > OCCUPIED:
        raise ValueError(f"{what} values must lie in -1..100, got [{layer.min()}, {layer.max()}]")
    return layer.astype(np.int8)


def _stamp(stamp_ns: int) -> dict[str, int]:
    return {"sec": int(stamp_ns // 1_000_000_000), "nanosec": int(stamp_ns % 1_000_000_000)}


def yaw_quaternion(yaw: float) -> dict[str, float]:
    """Rotation about z as a geometry_msgs/Quaternion dict."""
    return {"x": 0.0, "y": 0.0, "z": math.sin(yaw / 2.0), "w": math.cos(yaw / 2.0)}


def occupancy_grid_message(
    layer: np.ndarray,
    resolution: float,
    origin: Sequence[float],
    frame_id: str,
    stamp_ns: int = 0,
    yaw: float = 0.0,
) -> dict[str, Any]:
    """The fields of a ``nav_msgs/msg/OccupancyGrid`` as nested dicts (JSON- and MCAP-ready).

    ``layer`` (H, W) int8 as in the module docstring; ``origin`` (x, y[, z]) is the corner of
    cell (0, 0) in ``frame_id``; ``data`` is ``layer.reshape(-1)`` as a list of ints.
    """
    layer = _check_layer(layer)
    h, w = layer.shape
    x, y, z = (list(origin) + [0.0])[:3]
    return {
        "header": {"stamp": _stamp(stamp_ns), "frame_id": str(frame_id)},
        "info": {
            "map_load_time": _stamp(stamp_ns),
            "resolution": float(resolution),
            "width": int(w),
            "height": int(h),
            "origin": {
                "position": {"x": float(x), "y": float(y), "z": float(z)},
                "orientation": yaw_quaternion(yaw),
            },
        },
        "data": layer.reshape(-1).tolist(),
    }


def layer_from_message(msg: Any) -> np.ndarray:
    """(H, W) int8 layer from an OccupancyGrid (dict or decoded message object)."""

    def get(obj: Any, name: str) -> Any:
        return obj[name] if isinstance(obj, dict) else getattr(obj, name)

    info = get(msg, "info")
    h, w = int(get(info, "height")), int(get(info, "width"))
    data = np.asarray(list(get(msg, "data")), dtype=np.int64)
    if data.size != h * w:
        raise ValueError(f"OccupancyGrid data has {data.size} values, width x height = {w} x {h}")
    return data.astype(np.int8).reshape(h, w)


def write_occupancy_grid_json(path: str | Path, message: dict[str, Any]) -> Path:
    """The message fields as JSON (``data`` on one line, the rest indented)."""
    import json

    head = {k: v for k, v in message.items() if k != "data"}
    text = json.dumps(head, indent=2)[:-2] + ',\n  "data": ' + json.dumps(message["data"], separators=(",", ":")) + "\n}\n"
    return atomic_write_text(path, text)


# ------------------------------------------------------------------ map_server (PGM + YAML)


@dataclass(frozen=True)
class MapServerFiles:
    yaml: Path
    image: Path


def layer_to_pgm_pixels(layer: np.ndarray, mode: Literal["trinary", "raw"]) -> np.ndarray:
    """(H, W) layer -> (H, W) uint8 image rows, row 0 = top of the map (largest y)."""
    layer = _check_layer(layer)
    if mode == "trinary":
        if not np.isin(layer, (UNKNOWN, FREE, OCCUPIED)).all():
            raise ValueError("trinary maps hold only -1, 0 and 100; write graded layers with mode='raw'")
        pixels = np.full(layer.shape, PGM_UNKNOWN, dtype=np.uint8)
        pixels[layer == FREE] = PGM_FREE
        pixels[layer == OCCUPIED] = PGM_OCCUPIED
    elif mode == "raw":
        # Nav2 raw reads 0..100 as the value and 101..255 as unknown; 255 is -1 as int8 in ROS 1.
        pixels = np.where(layer < 0, 255, layer).astype(np.uint8)
    else:
        raise ValueError(f"unsupported map mode {mode!r}")
    return pixels[::-1]


def encode_pgm(pixels: np.ndarray) -> bytes:
    """Binary greyscale PGM (P5, maxval 255)."""
    pixels = np.ascontiguousarray(pixels, dtype=np.uint8)
    h, w = pixels.shape
    return f"P5\n{w} {h}\n255\n".encode("ascii") + pixels.tobytes()


def write_map_server(
    yaml_path: str | Path,
    layer: np.ndarray,
    resolution: float,
    origin: Sequence[float],
    mode: Literal["trinary", "raw"] = "trinary",
    occupied_thresh: float = 0.65,
    free_thresh: float = 0.196,
) -> MapServerFiles:
    """Write ``<stem>.pgm`` and the map_server YAML ``yaml_path`` (image path relative to it).

    ``origin`` (x, y[, ...]): the corner of cell (0, 0), i.e. the lower-left pixel; yaw 0.
    """
    yaml_path = Path(yaml_path)
    image_path = yaml_path.with_suffix(".pgm")
    if mode == "trinary":
        # The pixels we write must read back as what they mean, whatever the reader's rounding.
        if not (1 / 255 < free_thresh < 50 / 255 < occupied_thresh < 1.0):
            raise ValueError(
                f"trinary thresholds must satisfy 1/255 < free_thresh < 50/255 < occupied_thresh < 1 so that "
                f"254/205/0 read back as free/unknown/occupied; got free {free_thresh}, occupied {occupied_thresh}"
            )
    atomic_write_bytes(image_path, encode_pgm(layer_to_pgm_pixels(layer, mode)))
    meta = {
        "image": image_path.name,
        "mode": mode,
        "resolution": float(resolution),
        "origin": [float(origin[0]), float(origin[1]), 0.0],
        "negate": 0,
        "occupied_thresh": float(occupied_thresh),
        "free_thresh": float(free_thresh),
    }
    atomic_write_text(yaml_path, yaml.safe_dump(meta, sort_keys=False, default_flow_style=None))
    return MapServerFiles(yaml=yaml_path, image=image_path)


# ------------------------------------------------------------------ MCAP (ROS 2)


def _mcap_modules():
    try:
        from mcap_ros2.writer import Writer
    except ImportError as exc:
        raise OccDistillError(
            "writing MCAP needs the 'mcap-ros2-support' package: pip install 'occdistill[ros]'"
        ) from exc
    return Writer


def write_occupancy_grid_mcap(
    path: str | Path, messages: Iterable[tuple[str, dict[str, Any]]]
) -> int:
    """Write (topic, OccupancyGrid dict) pairs to a ROS 2 MCAP file; returns the message count.

    Log time = the header stamp. Readable by ``ros2 bag`` (MCAP storage), Foxglove and
    :func:`read_occupancy_grid_mcap`.
    """
    Writer = _mcap_modules()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    count = 0
    try:
        with open(tmp, "wb") as f:
            writer = Writer(f)
            schema = writer.register_msgdef(OCCUPANCY_GRID_TYPE, OCCUPANCY_GRID_MSGDEF)
            for seq, (topic, msg) in enumerate(messages):
                stamp = msg["header"]["stamp"]
                t = int(stamp["sec"]) * 1_000_000_000 + int(stamp["nanosec"])
                writer.write_message(topic, schema, msg, log_time=t, publish_time=t, sequence=seq)
                count += 1
            writer.finish()
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return count


def read_occupancy_grid_mcap(path: str | Path) -> list[tuple[str, int, Any]]:
    """(topic, log_time_ns, decoded message) for every OccupancyGrid in an MCAP file."""
    _mcap_modules()
    from mcap.reader import make_reader
    from mcap_ros2.decoder import DecoderFactory

    out = []
    with open(path, "rb") as f:
        reader = make_reader(f, decoder_factories=[DecoderFactory()])
        for schema, channel, message, decoded in reader.iter_decoded_messages():
            if schema is not None and schema.name == OCCUPANCY_GRID_TYPE:
                out.append((channel.topic, int(message.log_time), decoded))
    return out
