"""Occ3D labels: schema check with file-naming errors, and the ground-layer sanity check."""

from __future__ import annotations

import numpy as np
import pytest

from occdistill.data.classes import OCC3D_NUSCENES
from occdistill.data.labels import check_ground_layer, load_occ3d_labels, validate_labels
from occdistill.errors import DataError
from occdistill.geometry import VoxelGrid

SHAPE = (20, 20, 16)
ROAD = OCC3D_NUSCENES.index("driveable_surface")


def arrays(ground_layer: int = 2) -> dict[str, np.ndarray]:
    sem = np.full(SHAPE, 17, dtype=np.uint8)
    sem[:, :, ground_layer] = ROAD
    sem[5:8, 5:8, ground_layer + 1 : ground_layer + 5] = OCC3D_NUSCENES.index("car")
    mask_lidar = np.zeros(SHAPE, dtype=np.uint8)
    mask_lidar[:, :10] = 1
    return dict(semantics=sem, mask_lidar=mask_lidar, mask_camera=mask_lidar.copy())


def test_load_good_labels(tmp_path):
    np.savez_compressed(tmp_path / "labels.npz", **arrays())
    occ = load_occ3d_labels(tmp_path / "labels.npz", SHAPE)
    assert occ.semantics.dtype == np.uint8 and occ.mask_camera.dtype == np.bool_
    assert occ.mask_lidar.sum() == 20 * 10 * 16
    np.testing.assert_array_equal(occ.semantics, arrays()["semantics"])


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: a.pop("mask_camera"), r"missing key\(s\) \['mask_camera'\]"),
        (lambda a: a.update(semantics=a["semantics"][..., :8]), r"semantics has shape \(20, 20, 8\), expected \(20, 20, 16\)"),
        (lambda a: a.update(semantics=a["semantics"].astype(np.float32)), "integer class ids, got dtype float32"),
        (lambda a: a["semantics"].__setitem__((0, 0, 0), 18), r"labels in \[4, 18\], outside 0..17"),
        (lambda a: a["mask_lidar"].__setitem__((0, 0, 0), 2), r"mask_lidar must hold only 0 and 1, found \[2\]"),
        (lambda a: a.update(mask_camera=a["mask_camera"][:, :, :3]), r"mask_camera has shape \(20, 20, 3\)"),
        (lambda a: a.update(mask_camera=a["mask_camera"].astype(np.float64)), "mask_camera must be 0/1 integers or bool"),
        (lambda a: a.update(semantics=a["semantics"][0]), "semantics must be 3-D"),
    ],
)
def test_schema_errors_name_the_file(tmp_path, change, message):
    a = arrays()
    change(a)
    path = tmp_path / "scene-1" / "tok" / "labels.npz"
    path.parent.mkdir(parents=True)
    np.savez(path, **a)
    with pytest.raises(DataError, match=message) as err:
        load_occ3d_labels(path, SHAPE)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_unreadable_and_missing_files(tmp_path):
    with pytest.raises(DataError, match="labels file not found"):
        load_occ3d_labels(tmp_path / "none.npz")
    (tmp_path / "bad.npz").write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"bad.npz: not a readable \.npz"):
        load_occ3d_labels(tmp_path / "bad.npz")


def test_bool_masks_accepted():
    a = arrays()
    a["mask_camera"] = a["mask_camera"].astype(bool)
    assert validate_labels(a, "x").mask_camera.sum() == 20 * 10 * 16


def test_ground_layer_check():
    grid = VoxelGrid(range=(-4.0, -4.0, -1.0, 4.0, 4.0, 5.4), voxel_size=(0.4, 0.4, 0.4))  # 20 x 20 x 16
    good = check_ground_layer(arrays(2)["semantics"], grid)
    assert good.ok and (good.mode_layer, good.expected_layer, good.ground_voxels) == (2, 2, 400)
    low = check_ground_layer(arrays(0)["semantics"], grid)
    assert not low.ok and low.mode_layer == 0
    assert "vertically offset by -0.8 m" in low.message
    few = np.full(SHAPE, 17, dtype=np.uint8)
    few[0, :5, 0] = ROAD
    assert check_ground_layer(few, grid).ok  # 5 voxels: too few to judge
