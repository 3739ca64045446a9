"""occdistill costmap: height band, ground estimate, cell states, risk inflation, files, CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from occdistill.cli.main import main
from occdistill.data.classes import OCC3D_NUSCENES as T3
from occdistill.data.classes import OCC_SCANNET as TS
from occdistill.data.occscannet import scannet_grid
from occdistill.deploy.costmap import (
    CostmapConfig,
    IndoorCostmapConfig,
    compute_costmap,
    load_costmap_config,
    risk_from_objects,
    write_costmap,
)
from occdistill.errors import ConfigError, OccDistillError
from occdistill.geometry.grid import VoxelGrid

FREE3 = T3.free_index
ROAD, TERRAIN = T3.index("driveable_surface"), T3.index("terrain")


def read_map(yaml_path: Path) -> np.ndarray:
    """Independent map_server reading (trinary / raw), OccupancyGrid rows (row 0 = smallest y)."""
    meta = yaml.safe_load(Path(yaml_path).read_text())
    v = np.asarray(Image.open(Path(yaml_path).parent / meta["image"]), dtype=np.float64)
    if meta["mode"] == "raw":
        data = np.where(v <= 100, v, -1)
    else:
        p = (255.0 - v) / 255.0
        data = np.where(p > meta["occupied_thresh"], 100, np.where(p < meta["free_thresh"], 0, -1))
    return data[::-1].astype(np.int8)


# A 1.0 x 0.6 m patch at 0.1 m: X = 10, Y = 6 (asymmetric), Z = 32 from -0.2 m. Road in z-layer 2
# (centre 0.05 m), so a voxel in layer k sits (k - 2) * 0.1 m above the ground.
GRID = VoxelGrid(range=(0.0, 0.0, -0.2, 1.0, 0.6, 3.0), voxel_size=(0.1, 0.1, 0.1))
CFG = CostmapConfig(band_min=0.15, band_max=2.0, inflation_radius=0.3)


def street_patch() -> tuple[np.ndarray, np.ndarray]:
    sem = np.full(GRID.shape, FREE3, dtype=np.uint8)
    sem[:, :, 2] = ROAD
    obs = np.ones(GRID.shape, dtype=bool)
    sem[1, 1, 3:11] = T3.index("manmade")  # wall 0.1..0.8 m: in the band
    sem[2, 1, 3] = T3.index("barrier")  # curb 0.1 m: below band_min 0.15
    sem[3, 1, 24:27] = T3.index("vegetation")  # canopy 2.2..2.4 m: above band_max
    obs[4, 1, :] = False  # never seen
    sem[5, 1, 2] = TERRAIN  # grass instead of road
    sem[7, 4, 3:20] = T3.index("pedestrian")
    return sem, obs


def test_band_rules_and_layout():
    sem, obs = street_patch()
    cm = compute_costmap(sem, GRID, CFG, observed=obs)
    occ = cm.occupancy
    assert occ.shape == (6, 10) and occ.dtype == np.int8  # (H, W) = (Y, X)
    assert cm.ground_height == pytest.approx(0.05) and cm.ground_source == "traversable"
    # layer[j, i] = column (x index i, y index j)
    assert occ[1, 1] == 100  # wall
    assert occ[1, 2] == 0  # curb below the band
    assert occ[1, 3] == 0  # overhang above the band
    assert occ[1, 4] == -1  # unobserved column
    assert occ[1, 5] == 0  # terrain is traversable by default
    assert occ[4, 7] == 100  # pedestrian
    assert occ[0, 0] == 0 and occ[5, 9] == 0
    assert cm.counts() == {"occupied": 2, "free": 57, "unknown": 1, "risk_cells": cm.counts()["risk_cells"]}
    # Cell (i, j) centre = origin + (i + 0.5, j + 0.5) * res: the wall's column centre (0.15, 0.15).
    assert cm.origin[:2] == (0.0, 0.0)
    assert cm.cell_center(1, 1) == pytest.approx((0.15, 0.15))
    assert cm.cell_at(0.75, 0.45) == (7, 4)


def test_untraversable_ground_is_occupied_and_ignored_classes():
    sem, obs = street_patch()
    cfg = CostmapConfig(band_min=0.15, traversable_classes=("driveable_surface", "sidewalk", "other_flat"))
    occ = compute_costmap(sem, GRID, cfg, observed=obs).occupancy
    assert occ[1, 5] == 100  # a robot that may not drive on terrain
    cfg = CostmapConfig(band_min=0.15, ignored_classes=("manmade",))
    assert compute_costmap(sem, GRID, cfg, observed=obs).occupancy[1, 1] == 0


def test_unobserved_obstacle_does_not_mark_occupied():
    sem, obs = street_patch()
    obs[1, 1, 3:11] = False  # the wall is labelled but the camera never saw it; its road is seen
    assert compute_costmap(sem, GRID, CFG, observed=obs).occupancy[1, 1] == -1  # not occupied, never free
    obs[1, 1, 3:6] = True  # its lower part seen
    assert compute_costmap(sem, GRID, CFG, observed=obs).occupancy[1, 1] == 100
    obs[2, 1, 4:] = False  # curb column: band partly unseen, but nothing hides there
    assert compute_costmap(sem, GRID, CFG, observed=obs).occupancy[1, 2] == 0


def test_ground_step_limit_rejects_a_stray_high_ground_voxel():
    sem, obs = street_patch()
    sem[8, 2, 5] = T3.index("manmade")  # 0.3 m obstacle
    sem[8, 2, 20] = ROAD  # a mislabelled "road" voxel 1.8 m up would lift the band over it
    assert compute_costmap(sem, GRID, CFG, observed=obs).occupancy[2, 8] == 100
    loose = CostmapConfig(band_min=0.15, ground_max_step=5.0)
    assert compute_costmap(sem, GRID, loose, observed=obs).occupancy[2, 8] == 0


def test_prediction_with_free_probability():
    sem, _ = street_patch()
    p = np.where(sem == FREE3, 0.95, 0.05)
    p[2, 3, 8] = 0.5  # an uncertain voxel in the band of a free column -> unknown
    p[1, 1, 4] = 0.5  # the wall column keeps confident obstacle voxels -> still occupied
    cm = compute_costmap(sem, GRID, CFG, free_prob=p)
    assert cm.occupancy[3, 2] == -1
    assert cm.occupancy[1, 1] == 100
    assert cm.occupancy[1, 4] == 0  # no mask: a prediction counts every voxel as observed
    assert cm.stats["uncertain_cells"] == 1


def test_risk_inflation_values():
    objects = np.zeros((41, 41), dtype=bool)
    objects[20, 20] = True
    cfg = CostmapConfig(inflation_radius=1.0)
    r = risk_from_objects(objects, 0.1, cfg)
    assert r[20, 20] == 100
    assert r[20, 25] == 50 and r[25, 20] == 50  # d = 0.5 m of 1.0
    assert r[28, 20] == 20  # d = 0.8
    assert r[24, 23] == 50  # d = hypot(0.3, 0.4) = 0.5
    assert r[27, 27] == round(100 * (1 - math.hypot(0.7, 0.7)))  # d = 0.99 -> 1
    assert r[20, 30] == 0 and r[0, 0] == 0  # at and beyond the radius
    exp = risk_from_objects(objects, 0.1, CostmapConfig(inflation_radius=1.0, risk_decay="exponential", risk_decay_rate=2.0))
    assert exp[20, 25] == round(100 * math.exp(-1.0))
    assert exp[20, 31] == 0  # beyond the radius


def test_risk_layer_through_compute_costmap():
    sem, obs = street_patch()  # pedestrian at cell (i=7, j=4); radius 0.3 m, 0.1 m cells
    risk = compute_costmap(sem, GRID, CFG, observed=obs).risk
    assert risk[4, 7] == 100
    assert risk[4, 8] == round(100 * (1 - 0.1 / 0.3)) and risk[3, 7] == risk[4, 8]  # 67
    assert risk[2, 7] == round(100 * (1 - 0.2 / 0.3))  # 33
    assert risk[1, 7] == 0 and risk[4, 3] == 0
    static = compute_costmap(sem, GRID, CostmapConfig(band_min=0.15, dynamic_classes=()), observed=obs)
    assert not static.risk.any() and static.occupancy[4, 7] == 100


def test_indoor_preset_floor_above_grid_bottom():
    grid = scannet_grid((20, 16, 30), 0.08)  # z 0..2.4 m, ego at the grid's bottom centre
    sem = np.zeros(grid.shape, dtype=np.uint8)  # empty
    sem[:, :, 10] = TS.index("floor")  # floor at z = 0.84 m, not 0
    sem[2:5, 3:6, 19] = TS.index("table")  # table top 0.72 m above the floor
    sem[10, 12, 11] = TS.index("objects")  # 0.08 m item on the floor
    sem[:, :, 29] = TS.index("ceiling")  # 1.6 m above the floor: above the band
    sem[15:, :, :] = 255  # unknown
    cm = compute_costmap(sem, grid, IndoorCostmapConfig())
    assert cm.ground_height == pytest.approx(0.84) and cm.frame_id == "occ_grid"
    occ = cm.occupancy  # (Y, X)
    assert (occ[3:6, 2:5] == 100).all()
    assert occ[12, 10] == 100
    assert occ[0, 0] == 0 and occ[15, 14] == 0
    assert (occ[:, 15:] == -1).all()
    assert not cm.risk.any()  # no dynamic class indoors by default
    # A ground fixed at the grid bottom misses the table top (band 0.05..1.5 m ends below it).
    fixed = compute_costmap(sem, grid, IndoorCostmapConfig(ground="fixed"))
    assert fixed.occupancy[4, 3] == 0


def test_ground_fallback_without_traversable_voxels():
    sem = np.full(GRID.shape, FREE3, dtype=np.uint8)
    sem[3, 3, 5] = T3.index("manmade")
    cm = compute_costmap(sem, GRID, CostmapConfig(band_min=0.15, ground_height=0.05))
    assert cm.ground_source == "fallback" and cm.ground_height == 0.05
    assert cm.occupancy[3, 3] == 100 and cm.occupancy[0, 0] == 0  # free support = free


def test_config_presets_and_errors(tmp_path):
    cfg = load_costmap_config("indoor", None, ["band_max=1.2", "dynamic_classes=[chair]"])
    assert isinstance(cfg, IndoorCostmapConfig) and cfg.band_max == 1.2 and cfg.dynamic_classes == ("chair",)
    (tmp_path / "c.yaml").write_text("band_min: 0.2\ninflation_radius: 3\n")
    cfg = load_costmap_config("outdoor", tmp_path / "c.yaml", ["risk_decay=exponential"])
    assert (cfg.band_min, cfg.inflation_radius, cfg.risk_decay) == (0.2, 3.0, "exponential")
    with pytest.raises(ConfigError, match="chair"):
        load_costmap_config("outdoor", None, ["dynamic_classes=[chair]"])
    with pytest.raises(ConfigError, match="band_min"):
        load_costmap_config("outdoor", None, ["band_min=3"])
    with pytest.raises(ConfigError, match="free_thresh"):
        load_costmap_config("outdoor", None, ["free_thresh=0.25"])
    with pytest.raises(OccDistillError, match="shape"):
        compute_costmap(np.zeros((3, 3, 3), np.uint8), GRID)


def test_written_files_read_back(tmp_path):
    sem, obs = street_patch()
    cm = compute_costmap(sem, GRID, CFG, observed=obs)
    files = write_costmap(cm, tmp_path, "patch", CFG, stamp_ns=2_000_000_000)
    assert np.array_equal(read_map(tmp_path / "patch.yaml"), cm.occupancy)
    assert np.array_equal(read_map(tmp_path / "patch_risk.yaml"), cm.risk)
    meta = yaml.safe_load((tmp_path / "patch.yaml").read_text())
    assert meta["origin"] == [0.0, 0.0, 0.0] and meta["resolution"] == pytest.approx(0.1)
    msg = json.loads(Path(files["occupancy_grid_json"]).read_text())
    assert (msg["info"]["width"], msg["info"]["height"]) == (10, 6)
    assert msg["data"][1 * 10 + 1] == 100 and msg["data"][1 * 10 + 4] == -1  # data[j * W + i]
    assert msg["info"]["origin"]["position"]["z"] == pytest.approx(0.05)  # at ground level
    assert msg["header"]["frame_id"] == "base_footprint" and msg["header"]["stamp"]["sec"] == 2
    assert Image.open(files["png"]).mode == "RGB"


@pytest.fixture(scope="module")
def street(tmp_path_factory):
    from occdistill.data.synth import generate

    root = tmp_path_factory.mktemp("street")
    result = generate("street", root, scenes=1, frames=1, seed=0, progress=False)
    return root, result.frame_files[0]


def test_cli_on_the_synthetic_street(street, tmp_path, capsys):
    root, labels = street
    out = tmp_path / "cm"
    argv = ["costmap", "--labels", str(labels), "inflation_radius=3", "--grid-from", str(root / "occdistill_infos_val.pkl"),
            "--out", str(out)]
    have_mcap = True
    try:
        import mcap_ros2  # noqa: F401
    except ImportError:
        have_mcap = False
    if have_mcap:
        argv += ["--mcap", str(out / "cm.mcap")]
    assert main(argv) == 0
    name = labels.parent.name
    for suffix in (".yaml", ".pgm", "_risk.yaml", "_risk.pgm", ".png", "_occupancy_grid.json", "_risk_occupancy_grid.json"):
        assert (out / f"{name}{suffix}").is_file(), suffix
    assert yaml.safe_load((out / "costmap_config.yaml").read_text())["inflation_radius"] == 3.0
    summary = json.loads((out / "costmap.json").read_text())
    entry = summary["inputs"][0]
    assert entry["observed"] == "mask_camera" and entry["width"] == 100 and entry["height"] == 100
    assert entry["origin"][:2] == [-20.0, -20.0]
    cells = entry["cells"]
    assert cells["occupied"] > 0 and cells["free"] > 0 and cells["unknown"] > 0 and cells["risk_cells"] > 0
    occ = read_map(out / f"{name}.yaml")
    assert occ.shape == (100, 100)
    # The ego (x = 0, y = 0) is the corner of cells 49/50; the cells around it are free and known.
    assert occ[50, 50] == 0 and occ[49, 49] == 0
    msg = json.loads((out / f"{name}_occupancy_grid.json").read_text())
    assert msg["data"][50 * 100 + 50] == 0
    assert np.array_equal(np.asarray(msg["data"], np.int8).reshape(100, 100), occ)
    if have_mcap:
        from occdistill.deploy.ros_io import layer_from_message, read_occupancy_grid_mcap

        got = read_occupancy_grid_mcap(out / "cm.mcap")
        assert [t for t, _, _ in got] == ["/occdistill/costmap/occupancy", "/occdistill/costmap/risk"]
        assert np.array_equal(layer_from_message(got[0][2]), occ)
        assert np.array_equal(layer_from_message(got[1][2]), read_map(out / f"{name}_risk.yaml"))
        assert summary["mcap"]["messages"] == 2


def test_cli_prediction_with_probabilities_and_errors(street, tmp_path, capsys):
    root, labels = street
    with np.load(labels) as npz:
        sem = npz["semantics"]
    free_prob = np.where(sem == FREE3, 0.9, 0.1).astype(np.float16)
    free_prob[60:70, 40:60, 3:8] = 0.5
    pred = tmp_path / "pred.npz"
    np.savez(pred, semantics=sem, free_prob=free_prob)
    infos = str(root / "occdistill_infos_val.pkl")
    out = tmp_path / "p"
    assert main(["costmap", "--pred", str(pred), "--prob-key", "free_prob", "--grid-from", infos, "--out", str(out)]) == 0
    entry = json.loads((out / "costmap.json").read_text())["inputs"][0]
    assert entry["name"] == "pred" and entry["cells"]["unknown"] > 0 and entry["stats"]["uncertain_cells"] > 0
    capsys.readouterr()
    assert main(["costmap", "--pred", str(pred), "--out", str(out)]) == 2  # (100,100,16) is not the Occ3D grid
    assert "grid" in capsys.readouterr().err
    assert main(["costmap", "--pred", str(pred), "--key", "nope", "--grid-from", infos, "--out", str(out)]) == 2
    assert "'nope'" in capsys.readouterr().err
    assert main(["costmap", "--pred", str(pred), "--grid-from", infos, "--out", str(out), "--preset", "indoor"]) == 2
    assert "class table" in capsys.readouterr().err


def test_cli_occscannet_room(tmp_path):
    from occdistill.data.synth import generate

    result = generate("room", tmp_path / "room", scenes=1, frames=1, seed=0, progress=False)
    out = tmp_path / "cm"
    assert main(["costmap", "--format", "occscannet", "--labels", str(result.frame_files[0]), "--out", str(out)]) == 0
    entry = json.loads((out / "costmap.json").read_text())["inputs"][0]
    assert entry["name"] == "scene0000_00_00000" and entry["frame_id"] == "occ_grid"
    assert entry["observed"] == "mask_camera, not 255"
    assert (entry["width"], entry["height"]) == (60, 60) and entry["resolution"] == pytest.approx(0.08)
    assert entry["cells"]["free"] > 0 and entry["cells"]["occupied"] > 0


REAL = Path(__file__).resolve().parents[2] / "shared" / "realdata"


@pytest.mark.parametrize(
    "folder, expected_ground",
    [
        ("occ3d_openocc_occupancy_vis_demo", 0.0),  # road in z-layer 2 (ego z = 0)
        ("occ3d_cvpr2023_challenge_scene1077_29796060", -0.8),  # early release: road in layer 0
    ],
)
def test_real_occ3d_labels_ground_follows_the_road(folder, expected_ground):
    from occdistill.geometry.grid import OCC3D_GRID

    files = sorted((REAL / folder).rglob("*.npz")) if (REAL / folder).is_dir() else []
    files = [f for f in files if f.name in ("labels.npz", "3D_occupancy_data.npz")]
    if not files:
        pytest.skip(f"real data folder {REAL / folder} is absent (DESIGN.md section 10: ../shared/realdata)")
    with np.load(files[0]) as npz:
        sem, mask = npz["semantics"], npz["mask_camera"]
    cm = compute_costmap(sem, OCC3D_GRID, CostmapConfig(), observed=mask)
    assert cm.ground_height == pytest.approx(expected_ground)
    assert (cm.occupancy[99:101, 99:101] == 0).all()  # the ego stands on free, observed road
    c = cm.counts()
    assert c["occupied"] > 500 and c["free"] > 5000 and c["risk_cells"] > 0
