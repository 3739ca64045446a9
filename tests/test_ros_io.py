"""ROS writers: map_server PGM+YAML read back by an independent loader, OccupancyGrid layout, MCAP."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from occdistill.deploy.ros_io import (
    layer_from_message,
    occupancy_grid_message,
    write_map_server,
    write_occupancy_grid_json,
)


def load_map_server(yaml_path: Path) -> tuple[np.ndarray, dict]:
    """An independent map_server loader (ROS 1 image_loader / Nav2 map_io rules), written from
    their documentation: p = (255 - v) / 255 (negate 0); trinary: p > occupied_thresh -> 100,
    p < free_thresh -> 0, else -1; raw: the pixel value (Nav2: 101..255 -> -1). The image's top
    row is the map's last row (largest y). Returns OccupancyGrid data as (height, width)."""
    meta = yaml.safe_load(Path(yaml_path).read_text())
    image = Image.open(Path(yaml_path).parent / meta["image"])
    assert image.format == "PPM" and image.mode == "L"  # Pillow reads PGM as its PPM family
    v = np.asarray(image, dtype=np.float64)
    mode = meta.get("mode", "trinary")
    if mode == "trinary":
        p = v / 255.0 if meta["negate"] else (255.0 - v) / 255.0
        data = np.where(p > meta["occupied_thresh"], 100, np.where(p < meta["free_thresh"], 0, -1))
    elif mode == "raw":
        data = np.where(v <= 100, v, -1)
    else:
        raise AssertionError(f"unexpected mode {mode}")
    return data[::-1].astype(np.int8), meta


# An asymmetric 3 x 4 layer (height 3 = y rows, width 4 = x columns), every cell distinct in place.
LAYER = np.array(
    [
        [100, 0, 0, -1],  # j = 0: the row at the smallest y
        [0, -1, 0, 0],
        [0, 0, 100, 100],  # j = 2: the row at the largest y
    ],
    dtype=np.int8,
)


def test_occupancy_grid_message_is_row_major_from_cell_00():
    msg = occupancy_grid_message(LAYER, 0.5, (-1.0, -2.0, 0.3), "base_footprint", stamp_ns=3_250_000_000)
    info = msg["info"]
    assert (info["width"], info["height"]) == (4, 3)
    assert info["resolution"] == 0.5
    assert info["origin"]["position"] == {"x": -1.0, "y": -2.0, "z": 0.3}
    assert info["origin"]["orientation"] == {"x": 0.0, "y": 0.0, "z": 0.0, "w": 1.0}
    assert msg["header"] == {"stamp": {"sec": 3, "nanosec": 250_000_000}, "frame_id": "base_footprint"}
    # data[j * width + i] is cell (i, j): (0, 0) first, then along x.
    data = msg["data"]
    assert data[0] == 100 and data[1] == 0 and data[3] == -1
    assert data[1 * 4 + 1] == -1  # cell (i=1, j=1)
    assert data[2 * 4 + 2] == 100 and data[2 * 4 + 3] == 100  # top row, right end
    assert np.array_equal(layer_from_message(msg), LAYER)


def test_occupancy_grid_json(tmp_path):
    msg = occupancy_grid_message(LAYER, 0.4, (0.0, 0.0), "map")
    path = write_occupancy_grid_json(tmp_path / "g.json", msg)
    assert json.loads(path.read_text()) == msg


def test_map_server_trinary_round_trip_and_flip(tmp_path):
    files = write_map_server(tmp_path / "m.yaml", LAYER, 0.5, (-1.0, -2.0, 0.7))
    pixels = np.asarray(Image.open(files.image))
    # Image row 0 is the top of the map = the largest-y row (j = 2); its right end is occupied.
    assert pixels.shape == (3, 4)
    assert pixels[0, 2] == 0 and pixels[0, 3] == 0
    assert pixels[2, 0] == 0  # bottom-left pixel = cell (0, 0) = occupied
    assert pixels[2, 3] == 205 and pixels[1, 1] == 205  # unknown
    assert pixels[2, 1] == 254  # free
    data, meta = load_map_server(files.yaml)
    assert np.array_equal(data, LAYER)
    assert meta["origin"] == [-1.0, -2.0, 0.0]  # lower-left pixel's pose, yaw 0
    assert meta["resolution"] == 0.5 and meta["image"] == "m.pgm" and meta["mode"] == "trinary"
    assert files.image.read_bytes().startswith(b"P5\n4 3\n255\n")


def test_map_server_raw_keeps_graded_values(tmp_path):
    graded = np.array([[0, 1, 37], [99, 100, 50]], dtype=np.int8)
    files = write_map_server(tmp_path / "r.yaml", graded, 0.2, (0.0, 0.0), mode="raw")
    data, meta = load_map_server(files.yaml)
    assert meta["mode"] == "raw"
    assert np.array_equal(data, graded)
    with pytest.raises(ValueError, match="raw"):
        write_map_server(tmp_path / "t.yaml", graded, 0.2, (0.0, 0.0), mode="trinary")


def test_nav2_default_free_thresh_is_rejected(tmp_path):
    # Nav2's saver default 0.25 would read unknown (205, p = 0.196) back as free.
    with pytest.raises(ValueError, match="free_thresh"):
        write_map_server(tmp_path / "m.yaml", LAYER, 0.5, (0.0, 0.0), free_thresh=0.25)
    assert not (tmp_path / "m.pgm").exists()


def test_layer_checks():
    with pytest.raises(ValueError, match="-1..100"):
        occupancy_grid_message(np.array([[101]]), 0.1, (0, 0), "map")
    with pytest.raises(ValueError, match="integers"):
        occupancy_grid_message(np.zeros((2, 2), np.float32), 0.1, (0, 0), "map")


def test_mcap_round_trip(tmp_path):
    pytest.importorskip("mcap_ros2", reason="MCAP needs the optional 'ros' extra (mcap-ros2-support)")
    from occdistill.deploy.ros_io import read_occupancy_grid_mcap, write_occupancy_grid_mcap

    a = occupancy_grid_message(LAYER, 0.5, (-1.0, -2.0, 0.3), "base_footprint", stamp_ns=1_000_000_000)
    b = occupancy_grid_message(LAYER[::-1].copy(), 0.5, (-1.0, -2.0, 0.3), "base_footprint", stamp_ns=1_500_000_000)
    n = write_occupancy_grid_mcap(tmp_path / "g.mcap", [("/costmap/occupancy", a), ("/costmap/occupancy", b)])
    assert n == 2
    got = read_occupancy_grid_mcap(tmp_path / "g.mcap")
    assert [(t, lt) for t, lt, _ in got] == [("/costmap/occupancy", 1_000_000_000), ("/costmap/occupancy", 1_500_000_000)]
    msg = got[0][2]
    assert msg.header.frame_id == "base_footprint"
    assert (msg.header.stamp.sec, msg.header.stamp.nanosec) == (1, 0)
    assert (msg.info.width, msg.info.height) == (4, 3)
    assert msg.info.resolution == pytest.approx(0.5)
    assert (msg.info.origin.position.x, msg.info.origin.position.y, msg.info.origin.position.z) == (-1.0, -2.0, 0.3)
    assert msg.info.origin.orientation.w == 1.0
    assert np.array_equal(layer_from_message(msg), LAYER)
    assert np.array_equal(layer_from_message(got[1][2]), LAYER[::-1])
