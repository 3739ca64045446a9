"""Real data (DESIGN.md section 10): nuScenes keyframe, mini-val infos, Occ3D labels.

The data lives beside the repository in ``../shared/realdata`` (see each PROVENANCE.md); every
test skips, saying which folder is missing, when it is absent.
"""

from __future__ import annotations

import pickle
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from occdistill.data.augment import ImageAugConfig, sample_image_aug
from occdistill.data.depth import lidar_depth_maps, load_lidar_points
from occdistill.data.infos import load_infos, parse_frame
from occdistill.data.labels import check_ground_layer, load_occ3d_labels
from occdistill.data.occ3d import Occ3DDataset
from occdistill.errors import DataError
from occdistill.geometry import OCC3D_GRID, hflip_matrix, invert_rigid, project, transform_points

REAL = Path(__file__).resolve().parents[2] / "shared" / "realdata"
KEYFRAME = REAL / "nuscenes_bevdet_trt_sample0_scene0003"
VIS_DEMO = REAL / "occ3d_openocc_occupancy_vis_demo"
CVPR = REAL / "occ3d_cvpr2023_challenge_scene1077_29796060"
CAMERAS = ("CAM_FRONT_LEFT", "CAM_FRONT", "CAM_FRONT_RIGHT", "CAM_BACK_LEFT", "CAM_BACK", "CAM_BACK_RIGHT")


def need(folder: Path) -> None:
    if not folder.is_dir():
        pytest.skip(f"real data folder {folder} is absent (DESIGN.md section 10: ../shared/realdata)")


@pytest.fixture(scope="module")
def keyframe_record() -> dict:
    need(KEYFRAME)
    return yaml.safe_load((KEYFRAME / "sample0000.yaml").read_text())


@pytest.fixture(scope="module")
def keyframe_root(keyframe_record, tmp_path_factory) -> Path:
    """A nuScenes-style root for the one keyframe: the YAML's ``data_path`` names the original
    files, which are stored here by camera name, so they are copied under their original names."""
    root = tmp_path_factory.mktemp("nuscenes")
    for name, cam in keyframe_record["cams"].items():
        dst = root / "samples" / name / Path(cam["data_path"]).name
        dst.parent.mkdir(parents=True)
        shutil.copy(KEYFRAME / "imgs" / f"{name}.jpg", dst)
    lidar = root / "samples" / "LIDAR_TOP" / Path(keyframe_record["lidar_path"]).name
    lidar.parent.mkdir(parents=True)
    shutil.copy(KEYFRAME / "0.bin", lidar)
    with open(root / "infos.pkl", "wb") as f:
        pickle.dump(dict(infos=[keyframe_record], metadata=dict(version="v1.0-trainval")), f)
    return root


def test_keyframe_loads_six_images_with_plausible_intrinsics(keyframe_root):
    ds = Occ3DDataset(keyframe_root, "infos.pkl", with_labels=False, cameras=CAMERAS)
    s = ds[0]
    assert s.token == "fd8420396768425eabec9bdddf7e64b6" and s.timestamp == 1533201470448696
    assert s.images.shape == (6, 3, 900, 1600)
    k = s.intrinsics.double().numpy()
    assert np.all((k[:, 0, 0] > 500) & (k[:, 0, 0] < 2000)), k[:, 0, 0]
    np.testing.assert_allclose(k[:, 1, 1], k[:, 0, 0], rtol=1e-6)  # square pixels
    assert np.all(np.abs(k[:, 0, 2] - 800) < 80) and np.all(np.abs(k[:, 1, 2] - 450) < 60)
    np.testing.assert_array_equal(k[:, 0, 1], 0)
    assert 0.05 < float(s.images.mean()) < 0.95  # real content, not a blank image


def test_keyframe_key_ego_chain_equals_sensor2lidar(keyframe_record):
    frame = parse_frame(keyframe_record, "sample0000.yaml")
    assert sorted(c.name for c in frame.cameras) == sorted(CAMERAS)
    for cam in frame.cameras:
        # The YAML's sensor2lidar is nuScenes' own composition through the camera-time ego pose.
        np.testing.assert_allclose(frame.ego_from_lidar @ cam.lidar_from_cam, cam.keyego_from_cam, atol=1e-6)


def test_keyframe_lidar_voxels_are_seen_by_the_cameras_and_ground_in_layer_2(keyframe_record):
    frame = parse_frame(keyframe_record, "sample0000.yaml")
    pts_ego = transform_points(frame.ego_from_lidar, load_lidar_points(KEYFRAME / "0.bin"))
    idx, inside = OCC3D_GRID.point_to_index(pts_ego)
    occupied = np.unique(idx[inside], axis=0)  # (V, 3)
    centers = OCC3D_GRID.index_to_center(occupied)
    seen = np.zeros(len(occupied), dtype=bool)
    for cam in frame.cameras:
        uv, z = project(transform_points(invert_rigid(cam.keyego_from_cam), centers), cam.intrinsic)
        seen |= (z > 0.1) & (uv[:, 0] >= 0) & (uv[:, 0] < 1600) & (uv[:, 1] >= 0) & (uv[:, 1] < 900)
    # Measured: 5056 occupied voxels, 93.6% seen (the rest in the blind ring around the car).
    assert len(occupied) > 3000 and seen.mean() >= 0.90, seen.mean()
    assert np.bincount(occupied[:, 2], minlength=16).argmax() == 2


def test_keyframe_lidar_depth_through_the_reader(keyframe_root):
    aug = ImageAugConfig(final_size=(256, 704))
    ds = Occ3DDataset(keyframe_root, "infos.pkl", image_aug=aug, with_labels=False, depth="lidar", cameras=CAMERAS)
    s = ds[0]
    assert s.images.shape == (6, 3, 256, 704) and s.depth.shape == (6, 256, 704)
    per_cam = (s.depth > 0).flatten(1).sum(1)
    assert bool((per_cam > 1000).all()), per_cam.tolist()
    assert float(s.depth.max()) < 120 and float(s.depth[s.depth > 0].min()) > 0.1
    # A flipped image gets the mirrored depth map: the points are projected with the augmented
    # intrinsics, not resampled from a full-resolution map.
    pts_ego = transform_points(ds.frame(0).ego_from_lidar, load_lidar_points(KEYFRAME / "0.bin"))
    cam_from_ego = invert_rigid(s.keyego_from_cam.double().numpy())
    k_aug = s.aug_intrinsics.double().numpy()
    flipped = lidar_depth_maps(pts_ego, cam_from_ego, hflip_matrix(704) @ k_aug, (256, 704))
    same = np.isclose(flipped[:, :, ::-1], s.depth.numpy(), rtol=1e-5)
    assert same.mean() > 0.999
    evaluation = sample_image_aug(aug, (900, 1600), None).img_from_raw
    np.testing.assert_allclose(s.img_from_raw[0].double().numpy(), evaluation, atol=1e-6)


@pytest.fixture(scope="module")
def mini_val() -> Path:
    need(VIS_DEMO)
    return VIS_DEMO / "world-nuscenes_mini_infos_val.pkl"


def test_mini_val_infos_load_and_order(mini_val, tmp_path):
    infos = load_infos(mini_val)
    assert len(infos) == 81
    assert infos.scenes() == ["scene-0103", "scene-0916"]  # from occ_path: the file has no scene_name
    assert [len(infos.scene_frames(n)) for n in infos.scenes()] == [40, 41]
    for scene in infos.scenes():
        ts = [f.timestamp for f in infos.scene_frames(scene)]
        assert ts == sorted(ts) and len(set(ts)) == len(ts)
    first = infos.frames[0]
    assert first.token == "3e8750f331d7499e9b5123e9eb70f2e2"
    assert "\\" not in first.cameras[0].image_path and first.cameras[0].image_path.startswith("data/nuscenes/samples/")
    # Shuffled records come back in the same order.
    with open(mini_val, "rb") as f:
        obj = pickle.load(f)
    random.Random(0).shuffle(obj["infos"])
    with open(tmp_path / "shuffled.pkl", "wb") as f:
        pickle.dump(obj, f)
    shuffled = load_infos(tmp_path / "shuffled.pkl")
    by_scene = {n: [f.token for f in shuffled.scene_frames(n)] for n in shuffled.scenes()}
    assert by_scene == {n: [f.token for f in infos.scene_frames(n)] for n in infos.scenes()}
    assert infos.previous(infos.frames[40]) is None and infos.previous(infos.frames[41]).token == infos.frames[40].token


def test_mini_val_poses(mini_val):
    infos = load_infos(mini_val)
    for f in infos.frames:
        # The file's own 4x4 global_from_ego (OccWorld field) equals our quaternion (w, x, y, z) reading.
        np.testing.assert_allclose(f.global_from_ego, f.raw["global_from_ego"], atol=1e-9)
        for cam in f.cameras:
            np.testing.assert_allclose(f.ego_from_lidar @ cam.lidar_from_cam, cam.keyego_from_cam, atol=1e-6)
    # Skipping the camera-time ego pose would move cameras by up to 0.4 m in this file.
    shift = max(np.linalg.norm(c.ego_from_cam[:3, 3] - c.keyego_from_cam[:3, 3]) for f in infos.frames for c in f.cameras)
    assert shift > 0.3
    # The car drives forward: between keyframes it moves along +x of the earlier ego frame.
    for a in infos.frames[:-1]:
        b = infos.frames[a.index + 1]
        if b.scene_name != a.scene_name:
            continue
        step = (invert_rigid(a.global_from_ego) @ b.global_from_ego)[:3, 3]
        if np.linalg.norm(step) > 1.0:
            assert step[0] / np.linalg.norm(step) > 0.95


def test_mini_val_missing_images_are_named(mini_val, tmp_path):
    ds = Occ3DDataset(tmp_path, mini_val, with_labels=False)
    with pytest.raises(DataError, match=r"samples/CAM_FRONT/n008-2018-08-01-15-16-36-0400__CAM_FRONT__1533151603512404\.jpg: image not found"):
        ds[0]


def test_real_labels_schema_and_ground_layer():
    need(VIS_DEMO)
    need(CVPR)
    good = load_occ3d_labels(VIS_DEMO / "3D_occupancy_data.npz", OCC3D_GRID.shape)
    assert int(good.mask_lidar.sum()) == 107649 and int(good.mask_camera.sum()) == 100520
    assert not (good.mask_camera & ~good.mask_lidar).any()
    check = check_ground_layer(good.semantics, OCC3D_GRID)
    assert check.ok and check.mode_layer == 2, check.message

    offset = load_occ3d_labels(CVPR / "29796060110c4163b07f06eff4af0753" / "labels.npz", OCC3D_GRID.shape)
    assert int(offset.mask_lidar.sum()) == 56601 and int(offset.mask_camera.sum()) == 43355
    check = check_ground_layer(offset.semantics, OCC3D_GRID)
    assert not check.ok and check.mode_layer == 0
    assert "vertically offset by -0.8 m" in check.message

    # OpenOcc v2 (free = 16, int32, no masks) is another schema: rejected, not misread.
    with pytest.raises(DataError, match=r"3D_occupancy_flow_data\.npz: missing key\(s\) \['mask_lidar', 'mask_camera'\]"):
        load_occ3d_labels(VIS_DEMO / "3D_occupancy_flow_data.npz")
