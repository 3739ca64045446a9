"""Info parsing: BEVDet/mmdet3d v1 and mmdet3d v2 records, camera-time ego poses, paths, ordering, errors."""

from __future__ import annotations

import math
import pickle
from pathlib import Path

import numpy as np
import pytest

from occdistill.data.infos import load_infos, normalize_path, parse_frame, resolve_data_path
from occdistill.errors import DataError
from occdistill.geometry import invert_rigid, make_transform, rotmat_to_quat, transform_from_quat

# A front camera looking along ego +x: cam z -> ego x, cam x -> ego -y, cam y -> ego -z.
CAM_ROT = np.array([[0.0, 0, 1], [-1, 0, 0], [0, -1, 0]])
S = math.sqrt(0.5)


def v1_record(token="t0", timestamp=1_000_000, **extra) -> dict:
    """Hand-made BEVDet record: key ego at global (10, 0, 0); at the camera's time the ego had moved
    on to (10.3, 0, 0); LiDAR yawed +90 deg, 1.8 m up (nuScenes mounting)."""
    cam = dict(
        data_path="./data/nuscenes\\samples\\CAM_FRONT\\img0.jpg",
        cam_intrinsic=[[1000.0, 0, 800], [0, 1000.0, 450], [0, 0, 1]],
        sensor2ego_rotation=rotmat_to_quat(CAM_ROT).tolist(),
        sensor2ego_translation=[1.5, 0.0, 1.6],
        ego2global_rotation=[1.0, 0, 0, 0],
        ego2global_translation=[10.3, 0.0, 0.0],
        timestamp=timestamp - 20_000,
    )
    rec = dict(
        token=token, timestamp=timestamp,
        lidar2ego_rotation=[S, 0, 0, S], lidar2ego_translation=[0.9, 0.0, 1.8],
        ego2global_rotation=[1.0, 0, 0, 0], ego2global_translation=[10.0, 0.0, 0.0],
        lidar_path="./data/nuscenes\\samples\\LIDAR_TOP\\l0.pcd.bin",
        cams={"CAM_FRONT": cam},
    )
    rec.update(extra)
    return rec


def test_v1_record_goes_through_the_camera_time_ego_pose():
    f = parse_frame(v1_record(), "rec")
    cam = f.cameras[0]
    assert (f.token, f.timestamp, cam.name) == ("t0", 1_000_000, "CAM_FRONT")
    # Hand value: camera 1.5 m ahead of an ego that is itself 0.3 m ahead of the key ego.
    np.testing.assert_allclose(cam.keyego_from_cam, make_transform(CAM_ROT, [1.8, 0.0, 1.6]), atol=1e-12)
    np.testing.assert_allclose(cam.ego_from_cam, make_transform(CAM_ROT, [1.5, 0.0, 1.6]), atol=1e-12)
    # LiDAR quaternion (w, x, y, z) = 90 deg about +z: LiDAR +x is ego +y.
    np.testing.assert_allclose(f.ego_from_lidar[:3, 0], [0, 1, 0], atol=1e-12)
    np.testing.assert_allclose(f.lidar_origin_ego, [0.9, 0, 1.8])
    assert cam.image_path == "data/nuscenes/samples/CAM_FRONT/img0.jpg"
    assert f.lidar_path == "data/nuscenes/samples/LIDAR_TOP/l0.pcd.bin"
    assert cam.lidar_from_cam is None and cam.timestamp == 980_000
    assert f.camera("CAM_FRONT") is cam
    with pytest.raises(DataError, match="sample t0: no camera 'CAM_BACK'"):
        f.camera("CAM_BACK")


def test_v1_sensor2lidar_as_3x3_and_scene_name_sources():
    rec = v1_record()
    ego_from_lidar = transform_from_quat(rec["lidar2ego_rotation"], rec["lidar2ego_translation"])
    lidar_from_cam = invert_rigid(ego_from_lidar) @ make_transform(CAM_ROT, [1.8, 0.0, 1.6])
    rec["cams"]["CAM_FRONT"].update(sensor2lidar_rotation=lidar_from_cam[:3, :3], sensor2lidar_translation=lidar_from_cam[:3, 3])
    f = parse_frame(rec)
    np.testing.assert_allclose(f.ego_from_lidar @ f.cameras[0].lidar_from_cam, f.cameras[0].keyego_from_cam, atol=1e-12)
    assert f.scene_name == "unknown-scene"
    assert parse_frame(dict(rec, scene_token="abc")).scene_name == "abc"
    assert parse_frame(dict(rec, scene_token="abc", occ_path=".\\data\\gts\\scene-0007\\t0")).scene_name == "scene-0007"
    assert parse_frame(dict(rec, scene_name="scene-0001", occ_path="gts/scene-0007/t0")).scene_name == "scene-0001"


def test_v2_record():
    lidar2ego = make_transform(np.array([[0.0, -1, 0], [1, 0, 0], [0, 0, 1]]), [0.9, 0, 1.8])
    keyego_from_cam = make_transform(CAM_ROT, [1.8, 0.0, 1.6])
    lidar2cam = invert_rigid(keyego_from_cam) @ lidar2ego  # cam_from_lidar
    cam2img = np.eye(4)
    cam2img[:3, :3] = [[1000.0, 0, 800], [0, 1000.0, 450], [0, 0, 1]]
    rec = dict(
        sample_idx="s7", timestamp=1533201470.448696, ego2global=make_transform(np.eye(3), [5, 6, 0]).tolist(),
        lidar_points=dict(lidar_path="n015__LIDAR_TOP__1.pcd.bin", lidar2ego=lidar2ego.tolist()),
        images=dict(CAM_FRONT=dict(img_path="CAM_FRONT/x.jpg", cam2img=cam2img.tolist(), lidar2cam=lidar2cam.tolist()),
                    CAM_BACK=dict()),  # mmdet3d keeps absent cameras as empty entries
    )
    f = parse_frame(rec, "v2")
    assert f.token == "s7" and f.timestamp == 1533201470448696
    assert [c.name for c in f.cameras] == ["CAM_FRONT"]
    np.testing.assert_allclose(f.cameras[0].keyego_from_cam, keyego_from_cam, atol=1e-12)
    np.testing.assert_allclose(f.cameras[0].intrinsic, cam2img[:3, :3])


def test_paths(tmp_path):
    assert normalize_path(".\\data\\nuscenes\\samples/CAM_FRONT/a.jpg") == "data/nuscenes/samples/CAM_FRONT/a.jpg"
    assert normalize_path("././a/b") == "a/b"
    (tmp_path / "samples" / "CAM_FRONT").mkdir(parents=True)
    target = tmp_path / "samples" / "CAM_FRONT" / "a.jpg"
    target.write_bytes(b"x")
    assert resolve_data_path(tmp_path, "./data/nuscenes\\samples\\CAM_FRONT\\a.jpg") == target  # by anchor
    assert resolve_data_path(tmp_path, "samples/CAM_FRONT/a.jpg") == target  # relative to root
    assert resolve_data_path(tmp_path / "elsewhere", str(target)) == target  # absolute and existing
    assert resolve_data_path(tmp_path, "C:\\data\\posed_images\\scene0\\1.jpg") == tmp_path / "posed_images/scene0/1.jpg"
    assert resolve_data_path(tmp_path, "no/anchor.jpg") == tmp_path / "no/anchor.jpg"  # best candidate, for errors


def _dump(path: Path, obj) -> Path:
    with open(path, "wb") as f:
        pickle.dump(obj, f)
    return path


def test_load_infos_orders_by_scene_then_time(tmp_path):
    recs = [
        v1_record("b1", 3_000_000, scene_name="scene-b"),
        v1_record("a1", 2_000_000, scene_name="scene-a"),
        v1_record("b0", 1_000_000, scene_name="scene-b"),
        v1_record("a0", 1_500_000, scene_name="scene-a"),
    ]
    infos = load_infos(_dump(tmp_path / "i.pkl", dict(infos=recs, metadata=dict(version="x"))))
    assert [f.token for f in infos.frames] == ["b0", "b1", "a0", "a1"]
    assert [f.index for f in infos.frames] == [0, 1, 2, 3]
    assert infos.scenes() == ["scene-b", "scene-a"] and infos.metadata == dict(version="x")
    assert [f.token for f in infos.scene_frames("scene-a")] == ["a0", "a1"]
    assert infos.previous(infos.frames[3]).token == "a0"
    assert infos.previous(infos.frames[2]) is None and infos.previous(infos.frames[1], 2) is None
    assert set(infos.by_token()) == {"a0", "a1", "b0", "b1"}
    assert len(load_infos(_dump(tmp_path / "l.pkl", recs))) == 4  # a bare list is accepted


def test_load_infos_errors(tmp_path):
    with pytest.raises(DataError, match="missing.pkl: info file not found"):
        load_infos(tmp_path / "missing.pkl")
    (tmp_path / "junk.pkl").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="junk.pkl: cannot unpickle"):
        load_infos(tmp_path / "junk.pkl")
    with pytest.raises(DataError, match=r"expected 'infos' or 'data_list', found \['samples'\]"):
        load_infos(_dump(tmp_path / "k.pkl", dict(samples=[])))
    with pytest.raises(DataError, match="holds no samples"):
        load_infos(_dump(tmp_path / "e.pkl", dict(infos=[])))
    with pytest.raises(DataError, match="sample token t0 appears more than once"):
        load_infos(_dump(tmp_path / "d.pkl", dict(infos=[v1_record(), v1_record(timestamp=5)])))
    rec = v1_record()
    del rec["cams"]["CAM_FRONT"]["cam_intrinsic"]
    with pytest.raises(DataError, match=r"m.pkl sample 0 \(t0\) camera CAM_FRONT: missing key 'cam_intrinsic'"):
        load_infos(_dump(tmp_path / "m.pkl", dict(infos=[rec])))
    bad = v1_record()
    bad["cams"]["CAM_FRONT"]["sensor2ego_rotation"] = [1.0, 0, 0]
    with pytest.raises(DataError, match="sensor2ego_rotation must be a w,x,y,z quaternion or 3x3"):
        parse_frame(bad, "r")
    bad = v1_record(ego2global_translation=[0.0, float("nan"), 0])
    with pytest.raises(DataError, match="ego2global_translation: contains NaN"):
        parse_frame(bad, "r")
    with pytest.raises(DataError, match="a sample record must be a mapping"):
        parse_frame(["token"], "r")
