"""The synthetic world (``occdistill synth``): formats, determinism, resume, geometry consistency.

The consistency checks below are written independently of the generator: they read only the info
pickle / frame pickles, the label files, and the PNGs, with numpy and PIL, following nuScenes and
Occ-ScanNet conventions (w,x,y,z quaternions, camera-time ego poses, OpenCV cameras).
"""

from __future__ import annotations

import argparse
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from occdistill.cli import synth as synth_cli
from occdistill.data.infos import load_infos
from occdistill.data.labels import check_ground_layer, load_occ3d_labels
from occdistill.data.synth import generate
from occdistill.errors import ConfigError, OccDistillError
from occdistill.geometry.grid import VoxelGrid

SMALL = ["rig.width=64", "rig.height=36", "lidar.azimuths=256"]


# ----------------------------------------------------------------------------- independent reader


def _quat(q) -> np.ndarray:
    w, x, y, z = np.asarray(q, float) / np.linalg.norm(q)
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
        [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
        [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
    ])


def _pose(rotation, translation) -> np.ndarray:
    t = np.eye(4)
    t[:3, :3] = _quat(rotation) if np.shape(rotation) == (4,) else np.asarray(rotation)
    t[:3, 3] = translation
    return t


def _project_check(points, cls, cam_from_ref, k, sem_path, depth_path, tol):
    """Voxel centres (P, 3) with classes (P,) seen by one camera: (#seen, #seen with own class).

    Seen = in front, inside the image, and nothing in front of the centre by more than ``tol``
    (rendered depth >= centre depth - tol); a centre the camera sees through counts as seen."""
    pc = points @ cam_from_ref[:3, :3].T + cam_from_ref[:3, 3]
    z = pc[:, 2]
    front = z > 0.05
    uvw = pc[front] @ k.T
    col = np.floor(uvw[:, 0] / uvw[:, 2]).astype(int)
    row = np.floor(uvw[:, 1] / uvw[:, 2]).astype(int)
    sem = np.asarray(Image.open(sem_path))
    depth = np.asarray(Image.open(depth_path)).astype(np.float64) / 1000.0
    h, w = sem.shape
    ok = (col >= 0) & (col < w) & (row >= 0) & (row < h)
    row, col, zz, cc = row[ok], col[ok], z[front][ok], cls[front][ok]
    d = depth[row, col]
    seen = (d > 0) & (d >= zz - tol)
    return int(seen.sum()), int((sem[row, col][seen] == cc[seen]).sum())


def street_consistency(root: Path, info_file: str) -> float:
    """Fraction of (camera, GT-occupied camera-observed voxel) pairs, voxel seen by the camera,
    whose centre projects onto a pixel of its own class. nuScenes conventions only."""
    with open(root / info_file, "rb") as f:
        data = pickle.load(f)
    meta = data["metadata"]
    lo, size = np.asarray(meta["occ_range"][:3]), np.asarray(meta["voxel_size"])
    free = meta["class_names"].index("free")
    seen = same = 0
    for info in data["infos"]:
        with np.load(root / info["occ_path"] / "labels.npz") as npz:
            sem, mask = npz["semantics"], npz["mask_camera"].astype(bool)
        idx = np.argwhere((sem != free) & mask)
        pts, cls = lo + (idx + 0.5) * size, sem[tuple(idx.T)]
        global_from_keyego = _pose(info["ego2global_rotation"], info["ego2global_translation"])
        for cam in info["cams"].values():
            ego_from_cam = _pose(cam["sensor2ego_rotation"], cam["sensor2ego_translation"])
            global_from_egocam = _pose(cam["ego2global_rotation"], cam["ego2global_translation"])
            cam_from_keyego = np.linalg.inv(ego_from_cam) @ np.linalg.inv(global_from_egocam) @ global_from_keyego
            n, m = _project_check(pts, cls, cam_from_keyego, np.asarray(cam["cam_intrinsic"]), root / cam["semantic_path"],
                                  root / cam["depth_path"], 0.5 * np.linalg.norm(size))
            seen, same = seen + n, same + m
    assert seen > 1000, "too few voxels seen to judge"
    return same / seen


def room_consistency(root: Path, split_list: str, axes: tuple[int, int, int] = (0, 1, 2)) -> float:
    """The same check for Occ-ScanNet frames, reading ``target_1_4`` with axis order ``axes``."""
    seen = same = 0
    for line in (root / split_list).read_text().split():
        with open(root / line, "rb") as f:
            d = pickle.load(f)
        target = np.transpose(d["target_1_4"], axes)
        idx = np.argwhere((target > 0) & (target < 255))
        pts, cls = np.asarray(d["voxel_origin"]) + (idx + 0.5) * 0.08, target[tuple(idx.T)]
        n, m = _project_check(pts, cls, np.linalg.inv(d["cam_pose"]), np.asarray(d["intrinsic"]), root / d["semantic_path"],
                              root / d["depth_gt"], 0.5 * np.sqrt(3) * 0.08)
        seen, same = seen + n, same + m
    assert seen > 500, "too few voxels seen to judge"
    return same / seen


# --------------------------------------------------------------------------------------- fixtures


def _cli(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    synth_cli.add_arguments(parser)
    return synth_cli.run(parser.parse_args(list(argv)))


@pytest.fixture(scope="module")
def street(tmp_path_factory) -> Path:
    """Exactly the command of the issue's done criterion."""
    out = tmp_path_factory.mktemp("street")
    assert _cli("--preset", "street", "--scenes", "2", "--frames", "6", "--out", str(out), "--quiet") == 0
    return out


@pytest.fixture(scope="module")
def room(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("room")
    assert _cli("--preset", "room", "--scenes", "1", "--frames", "4", "--out", str(out), "--quiet") == 0
    return out


# ------------------------------------------------------------------------------------------ street


def test_street_layout_and_readers(street):
    assert (street / "config.yaml").is_file()
    for split in ("train", "val"):
        infos = load_infos(street / f"occdistill_infos_{split}.pkl")
        assert len(infos) == 6 and len(infos.scenes()) == 1  # 2 scenes: the last one is val
        meta = infos.metadata
        grid = VoxelGrid(tuple(meta["occ_range"]), tuple(meta["voxel_size"]))
        assert list(grid.shape) == meta["grid_shape"] == [100, 100, 16]
        assert meta["class_names"][17] == "free" and len(meta["class_names"]) == 18
        for frame in infos.frames:
            assert frame.occ_path == f"gts/{frame.scene_name}/{frame.token}"
            labels = load_occ3d_labels(street / frame.occ_path / "labels.npz", grid.shape)
            assert check_ground_layer(labels.semantics, grid).ok
            assert len(frame.cameras) == 6
            for cam in frame.cameras:
                stem = Path(cam.image_path).stem
                assert cam.image_path.startswith(f"samples/{cam.name}/") and cam.image_path.endswith(".jpg")
                assert cam.semantic_path == f"semantic/{cam.name}/{stem}.png"
                assert cam.depth_path == f"depth/{cam.name}/{stem}.png"
                assert Image.open(street / cam.image_path).size == (320, 180)
                assert Image.open(street / cam.depth_path).mode.startswith("I")
            raw = frame.raw
            pts = np.fromfile(street / raw["lidar_path"], dtype=np.float32).reshape(-1, 5)
            assert len(pts) > 10000 and set(np.unique(pts[:, 4])) <= set(range(32))
            assert raw["gt_boxes"].shape == (len(raw["gt_names"]), 7) and raw["gt_velocity"].shape == (len(raw["gt_names"]), 2)
        tokens = [f.token for f in infos.frames]
        assert [f.raw["prev"] for f in infos.frames] == [""] + tokens[:-1]
        assert [f.raw["next"] for f in infos.frames] == tokens[1:] + [""]
    with np.load(street / infos.frames[0].occ_path / "labels.npz") as npz:
        assert all(npz[k].dtype == np.uint8 for k in ("semantics", "mask_lidar", "mask_camera"))


def test_street_voxels_project_onto_their_class(street):
    for split in ("train", "val"):
        assert street_consistency(street, f"occdistill_infos_{split}.pkl") >= 0.95


def test_camera_time_chain(street):
    """sensor2lidar = inv(lidar2ego) inv(ego2global_key) ego2global_cam sensor2ego, from the
    stored fields, and the camera-time poses really differ from the keyframe pose."""
    with open(street / "occdistill_infos_train.pkl", "rb") as f:
        infos = pickle.load(f)["infos"]
    for info in infos:
        keyego = _pose(info["ego2global_rotation"], info["ego2global_translation"])
        lidar2ego = _pose(info["lidar2ego_rotation"], info["lidar2ego_translation"])
        offsets = []
        for cam in info["cams"].values():
            egocam = _pose(cam["ego2global_rotation"], cam["ego2global_translation"])
            chain = np.linalg.inv(lidar2ego) @ np.linalg.inv(keyego) @ egocam @ _pose(cam["sensor2ego_rotation"], cam["sensor2ego_translation"])
            stored = _pose(cam["sensor2lidar_rotation"], cam["sensor2lidar_translation"])
            np.testing.assert_allclose(stored, chain, atol=1e-9, rtol=0)
            offsets.append(cam["timestamp"] - info["timestamp"])
            if abs(offsets[-1]) > 2000:  # the ego drives >= 4 m/s: a few ms move it by centimetres
                assert np.linalg.norm(egocam[:3, 3] - keyego[:3, 3]) > 0.005
        assert max(abs(o) for o in offsets) <= 50_000 and len(set(offsets)) == len(offsets)


def test_lidar_sweep_matches_depth_maps(street):
    """LiDAR points projected through sensor2lidar land where the rendered depth says they do."""
    with open(street / "occdistill_infos_train.pkl", "rb") as f:
        info = pickle.load(f)["infos"][2]
    pts = np.fromfile(street / info["lidar_path"], dtype=np.float32).reshape(-1, 5)[:, :3].astype(np.float64)
    errors = []
    for cam in info["cams"].values():
        cam_from_lidar = np.linalg.inv(_pose(cam["sensor2lidar_rotation"], cam["sensor2lidar_translation"]))
        pc = pts @ cam_from_lidar[:3, :3].T + cam_from_lidar[:3, 3]
        pc = pc[pc[:, 2] > 0.5]
        uvw = pc @ np.asarray(cam["cam_intrinsic"]).T
        c, r = np.floor(uvw[:, 0] / uvw[:, 2]).astype(int), np.floor(uvw[:, 1] / uvw[:, 2]).astype(int)
        depth = np.asarray(Image.open(street / cam["depth_path"])).astype(np.float64) / 1000.0
        ok = (c >= 0) & (c < depth.shape[1]) & (r >= 0) & (r < depth.shape[0])
        d = depth[r[ok], c[ok]]
        errors.append(np.abs(d - pc[ok, 2])[d > 0])
    err = np.concatenate(errors)
    assert len(err) > 1000 and np.median(err) < 0.05 and np.mean(err < 0.3) > 0.8


def test_masks(street):
    """What must hold for Occ3D-style visibility masks (mask_camera is *not* a subset of
    mask_lidar here: one 32-beam sweep is much sparser than the camera rays)."""
    infos = load_infos(street / "occdistill_infos_val.pkl")
    grid = VoxelGrid(tuple(infos.metadata["occ_range"]), tuple(infos.metadata["voxel_size"]))
    for frame in infos.frames[:3]:
        lab = load_occ3d_labels(street / frame.occ_path / "labels.npz", grid.shape)
        occ = lab.semantics != 17
        # Sensor origins are in free, observed voxels.
        for origin, mask in [(frame.lidar_origin_ego, lab.mask_lidar)] + [(c.keyego_from_cam[:3, 3], lab.mask_camera) for c in frame.cameras]:
            idx, inside = grid.point_to_index(origin)
            assert inside and mask[tuple(idx)] and not occ[tuple(idx)]
        # A voxel whose six face neighbours are all occupied cannot be reached by any ray.
        core = occ[1:-1, 1:-1, 1:-1] & occ[:-2, 1:-1, 1:-1] & occ[2:, 1:-1, 1:-1] & occ[1:-1, :-2, 1:-1] & occ[1:-1, 2:, 1:-1] \
            & occ[1:-1, 1:-1, :-2] & occ[1:-1, 1:-1, 2:]
        assert core.sum() > 0
        for mask in (lab.mask_camera, lab.mask_lidar):
            assert not (mask[1:-1, 1:-1, 1:-1] & core).any()
        # Both masks see most of the ground right around the car; the camera mask is the denser.
        assert lab.mask_camera.sum() > lab.mask_lidar.sum() > 0.02 * occ.size


def test_every_issue_class_appears(tmp_path):
    result = generate("street", tmp_path, scenes=4, frames=1, overrides=SMALL, progress=False)
    seen = set()
    for path in result.frame_files:
        seen |= set(np.unique(load_occ3d_labels(path).semantics).tolist())
    assert seen == set(range(18))


def test_full_occ3d_grid(tmp_path):
    result = generate("street", tmp_path, scenes=1, frames=1, overrides=[*SMALL, "grid.range=[-40,-40,-1,40,40,5.4]"], progress=False)
    labels = load_occ3d_labels(result.frame_files[0], (200, 200, 16))
    check = check_ground_layer(labels.semantics)
    assert check.ok and check.expected_layer == 2
    assert labels.mask_camera.any() and labels.mask_lidar.any()


def test_deterministic_per_seed_and_resumable(tmp_path):
    a = generate("street", tmp_path / "a", scenes=1, frames=2, seed=3, overrides=SMALL, progress=False)
    b = generate("street", tmp_path / "b", scenes=1, frames=2, seed=3, overrides=SMALL, progress=False)
    c = generate("street", tmp_path / "c", scenes=1, frames=2, seed=4, overrides=SMALL, progress=False)
    files_a = sorted(p.relative_to(a.out) for p in a.out.rglob("*") if p.is_file())
    assert files_a == sorted(p.relative_to(b.out) for p in b.out.rglob("*") if p.is_file())
    for rel in files_a:
        assert (a.out / rel).read_bytes() == (b.out / rel).read_bytes(), rel
    assert (a.out / "gts").is_dir() and {p.name for p in (c.out / "gts" / "scene-0000").iterdir()} != {
        p.name for p in (a.out / "gts" / "scene-0000").iterdir()}

    # Resume: nothing to do; a lost file is regenerated identically.
    again = generate("street", a.out, scenes=1, frames=2, seed=3, overrides=SMALL, progress=False)
    assert (again.generated, again.skipped) == (0, 2)
    victim = next((a.out / "samples" / "CAM_BACK").iterdir())
    original = victim.read_bytes()
    victim.unlink()
    again = generate("street", a.out, scenes=1, frames=2, seed=3, overrides=SMALL, progress=False)
    assert (again.generated, again.skipped) == (1, 1) and victim.read_bytes() == original

    # Another config into the same directory is refused, unless forced.
    with pytest.raises(OccDistillError, match="different config"):
        generate("street", a.out, scenes=1, frames=2, seed=5, overrides=SMALL, progress=False)
    forced = generate("street", a.out, scenes=1, frames=1, seed=5, overrides=SMALL, progress=False, force=True)
    assert forced.generated == 1


def test_bad_input_is_one_line_error(tmp_path):
    with pytest.raises(ConfigError, match="scenes"):
        generate("street", tmp_path / "x", scenes=0, progress=False)
    with pytest.raises(ConfigError, match="rig.widht|did you mean 'width'"):
        generate("street", tmp_path / "x", overrides=["rig.widht=10"], progress=False)
    with pytest.raises(ConfigError, match="CAM_TOP"):
        generate("street", tmp_path / "x", overrides=["rig.cameras=[CAM_TOP]"], progress=False)
    (tmp_path / "file").write_text("")
    with pytest.raises(OccDistillError, match="not a directory"):
        generate("room", tmp_path / "file", progress=False)
    with pytest.raises(OccDistillError, match="unknown preset"):
        generate("forest", tmp_path / "y", progress=False)


# -------------------------------------------------------------------------------------------- room


def test_room_format(room):
    lists = {s: (room / f"{s}_subscenes.txt").read_text().split() for s in ("train", "val")}
    assert lists["train"] == lists["val"] == [f"gathered_data/scene0000_00/{i:05d}.pkl" for i in range(4)]
    for line in lists["train"]:
        with open(room / line, "rb") as f:
            d = pickle.load(f)
        assert d["target_1_4"].shape == (60, 60, 36) and d["target_1_4"].dtype == np.uint8
        assert d["target_1_16"].shape == (15, 15, 9) and d["target_1_16"].dtype == np.uint8
        assert set(np.unique(d["target_1_4"]).tolist()) <= set(range(12)) | {255}
        assert {0, 255} <= set(np.unique(d["target_1_4"]).tolist())
        assert d["intrinsic"].shape == (3, 3) and d["cam_pose"].shape == (4, 4) and np.shape(d["voxel_origin"]) == (3,)
        assert np.allclose(d["cam_pose"][:3, :3].T @ d["cam_pose"][:3, :3], np.eye(3))
        assert Image.open(room / d["img"]).size == (640, 480)
        assert Image.open(room / d["depth_gt"]).mode.startswith("I")
        assert d["name"] == line[len("gathered_data/"):-len(".pkl")]


def test_room_voxels_project_onto_their_class_xyz_order(room):
    """target_1_4 is indexed [x, y, z] in world axes: that reading is consistent, and the
    (1, 0, 2) transpose that some Occ-ScanNet loaders apply is not."""
    assert room_consistency(room, "train_subscenes.txt") >= 0.95
    assert room_consistency(room, "train_subscenes.txt", (1, 0, 2)) < 0.8


def test_project_readers_load_both_presets(street, room):
    from occdistill.data.build import open_dataset

    ds = open_dataset("occ3d", street, street / "occdistill_infos_val.pkl", rendered_maps=True)
    sample = ds[len(ds) - 1]
    assert tuple(sample.images.shape) == (6, 3, 180, 320) and tuple(sample.semantics.shape) == (100, 100, 16)
    ds = open_dataset("occscannet", room, rendered_maps=True)
    assert len(ds) == 4 and tuple(ds[0].semantics.shape) == (60, 60, 36)
