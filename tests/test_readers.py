"""Readers on hand-made worlds: a tiny street in the Occ3D-nuScenes layout and a tiny room in the
Occ-ScanNet layout, each rendered here by brute-force ray marching through its labelled voxels
(semantic map, z-depth, colour image), so that every pixel's content is known exactly.

The central check projects every rendered pixel back into 3D through the Sample's augmented
intrinsics, ``bda @ keyego_from_cam`` and its depth map, and compares the class of the voxel it
lands in with the pixel's class: 100% without augmentation, >= 95% with augmentation, and well
below that when any one matrix is wrong.
"""

from __future__ import annotations

import dataclasses
import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from occdistill.data.augment import BevAugConfig, ImageAugConfig
from occdistill.data.classes import OCC3D_NUSCENES, OCC_SCANNET
from occdistill.data.occ3d import Occ3DDataset
from occdistill.data.occscannet import OccScanNetDataset, scannet_grid
from occdistill.data.sample import Batch, Sample, collate
from occdistill.errors import DataError
from occdistill.geometry import VoxelGrid, invert_rigid, make_transform, rotmat_to_quat, transform_points, unproject
from occdistill.geometry.camera import project

FREE = OCC3D_NUSCENES.free_index
STREET_GRID = VoxelGrid(range=(-8.0, -8.0, -1.0, 8.0, 8.0, 5.4), voxel_size=(0.4, 0.4, 0.4))


# ---------------------------------------------------------------- brute-force rendering


def raycast(grid: VoxelGrid, sem: np.ndarray, origin: np.ndarray, dirs: np.ndarray, empty: set[int],
            step: float = 0.02, max_dist: float = 16.0) -> tuple[np.ndarray, np.ndarray]:
    """March rays (R, 3 unit) from ``origin``; -> (class of the first non-empty voxel or 255, distance or 0)."""
    ts = np.arange(1, int(max_dist / step) + 1) * step
    labels = np.full(len(dirs), 255, dtype=np.int64)
    dist = np.zeros(len(dirs))
    occupied_lut = np.ones(256, dtype=bool)
    occupied_lut[list(empty)] = False
    for s in range(0, len(dirs), 512):
        pts = origin + dirs[s : s + 512, None, :] * ts[None, :, None]  # (r, T, 3)
        idx, inside = grid.point_to_index(pts)
        lab = sem[idx[..., 0], idx[..., 1], idx[..., 2]]
        occ = inside & occupied_lut[lab]
        hit = occ.any(axis=1)
        first = occ.argmax(axis=1)
        rows = np.nonzero(hit)[0]
        labels[s + rows] = lab[rows, first[rows]]
        # Report the middle of the ray's segment inside the hit voxel (slab intersection), so the
        # depth stays inside that voxel after millimetre rounding.
        vox = idx[rows, first[rows]]
        lo = grid.lower + vox * grid.size
        d = dirs[s + rows]
        with np.errstate(divide="ignore", invalid="ignore"):
            t0, t1 = (lo - origin) / d, (lo + grid.size - origin) / d
        t_in = np.nanmax(np.minimum(t0, t1), axis=1)
        t_out = np.nanmin(np.maximum(t0, t1), axis=1)
        dist[s + rows] = (t_in + t_out) / 2
    return labels, dist


def render(grid, sem, frame_from_cam, k, size, empty):
    """Per-pixel class (H, W) uint8 (255 = nothing hit), z-depth (H, W) float, for a camera whose
    pose in the grid's frame is ``frame_from_cam``; rays through pixel centres."""
    h, w = size
    vs, us = np.meshgrid(np.arange(h) + 0.5, np.arange(w) + 0.5, indexing="ij")
    dirs_cam = unproject(np.stack([us, vs], -1).reshape(-1, 2), np.ones(h * w), k)  # z = 1
    norm = np.linalg.norm(dirs_cam, axis=1)
    dirs = (dirs_cam / norm[:, None]) @ frame_from_cam[:3, :3].T
    labels, dist = raycast(grid, sem, frame_from_cam[:3, 3], dirs, empty)
    zdepth = dist / norm  # distance along a ray with z = 1 per unit -> z-depth
    return labels.reshape(h, w).astype(np.uint8), zdepth.reshape(h, w)


def colorize(sem_map: np.ndarray, palette: np.ndarray) -> np.ndarray:
    pal = np.zeros((256, 3), dtype=np.uint8)
    pal[: len(palette)] = palette
    pal[255] = (90, 140, 230)  # sky / nothing
    return pal[sem_map]


def cam_axes(yaw_deg: float, pitch_deg: float) -> np.ndarray:
    """Rotation frame_from_cam of an OpenCV camera (x right, y down, z forward) looking along
    ``yaw`` (about +z of a z-up frame) and pitched down by ``pitch``."""
    base = np.array([[0.0, 0, 1], [-1, 0, 0], [0, -1, 0]])  # cam z -> x, cam x -> -y, cam y -> -z
    p = math.radians(pitch_deg)
    pitch = np.array([[1, 0, 0], [0, math.cos(p), math.sin(p)], [0, -math.sin(p), math.cos(p)]])
    y = math.radians(yaw_deg)
    yaw = np.array([[math.cos(y), -math.sin(y), 0], [math.sin(y), math.cos(y), 0], [0, 0, 1]])
    return yaw @ base @ pitch


def consistency(sample: Sample, grid: VoxelGrid, exclude: tuple[int, ...] = (), push: float = 0.0) -> float:
    """Fraction of rendered pixels (depth > 0, class known and not in ``exclude``) whose
    back-projected 3D point lands in a voxel of the same class; points outside the grid are left out.
    ``push`` moves each point that far further along its ray: surfaces of continuous geometry lie
    on voxel boundaries, where the voxel in front may be free."""
    agree = total = 0
    ego_from_cam = sample.ego_from_cam.double().numpy()
    k_aug = sample.aug_intrinsics.double().numpy()
    sem = sample.semantics.numpy()
    for n in range(len(sample.camera_names)):
        d = sample.depth[n].double().numpy()
        cls = sample.semantic_maps[n].numpy()
        rows, cols = np.nonzero((d > 0) & (cls != 255) & ~np.isin(cls, exclude))
        pts = unproject(np.stack([cols + 0.5, rows + 0.5], -1), d[rows, cols], k_aug[n])
        pts = pts + push * pts / np.linalg.norm(pts, axis=-1, keepdims=True)
        idx, inside = grid.point_to_index(transform_points(ego_from_cam[n], pts))
        got = sem[idx[inside, 0], idx[inside, 1], idx[inside, 2]]
        agree += int((got == cls[rows, cols][inside]).sum())
        total += int(inside.sum())
    assert total > 500, "too few rendered pixels to judge"
    return agree / total


# ---------------------------------------------------------------- the street world (Occ3D layout)


def street_labels() -> np.ndarray:
    g = STREET_GRID
    sem = np.full(g.shape, FREE, dtype=np.uint8)
    c = g.centers()
    x, y, z = c[..., 0], c[..., 1], c[..., 2]
    sem[:, :, 2] = OCC3D_NUSCENES.index("driveable_surface")  # z in [-0.2, 0.2): the ground layer
    sem[(x > 4) & (x < 6) & (y > -1) & (y < 1.2) & (z > 0.2) & (z < 1.4)] = OCC3D_NUSCENES.index("car")
    sem[(x > 2) & (x < 8) & (y > 3.2) & (y < 3.6) & (z > 0.2) & (z < 2.6)] = OCC3D_NUSCENES.index("manmade")
    sem[(x > -4.4) & (x < -4.0) & (y > 0.8) & (y < 1.2) & (z > 0.2) & (z < 1.8)] = OCC3D_NUSCENES.index("pedestrian")
    sem[(x > -7) & (x < -5.8) & (y > -3) & (y < 0) & (z > 0.2) & (z < 3.0)] = OCC3D_NUSCENES.index("truck")
    return sem


STREET_K = np.array([[100.0, 0, 80], [0, 100.0, 45], [0, 0, 1]])
STREET_SIZE = (90, 160)
EGO_FROM_LIDAR = make_transform(cam_axes(0, 0) @ cam_axes(0, 0).T @ np.array(
    [[0.0, -1, 0], [1, 0, 0], [0, 0, 1]]), [0.9, 0.0, 1.8])  # nuScenes LiDAR: yawed 90 deg, 1.8 m up
# The camera-time ego pose differs from the keyframe's by 0.3 m, as on real data: rendering uses
# the true key-ego camera pose, so a reader that skips the camera-time pose is off by 0.3 m.
CAMERA_SHIFT = 0.3
STREET_CAMS = {
    "CAM_FRONT": make_transform(cam_axes(8.0, 12.0), [1.0, 0.1, 1.5]),
    "CAM_BACK": make_transform(cam_axes(175.0, 10.0), [-1.0, 0.0, 1.5]),
}


def _quat_pose(t: np.ndarray, prefix: str) -> dict:
    return {f"{prefix}_rotation": rotmat_to_quat(t[:3, :3]).tolist(), f"{prefix}_translation": t[:3, 3].tolist()}


@pytest.fixture(scope="module")
def street(tmp_path_factory) -> Path:
    """Root with infos.pkl (BEVDet field names, Windows separators), two scenes of 2 + 1 frames
    sharing one rendered world, labels, LiDAR sweeps, semantic and depth PNGs."""
    root = tmp_path_factory.mktemp("street")
    sem = street_labels()
    rng = np.random.default_rng(0)
    mask_lidar = rng.uniform(size=sem.shape) < 0.7
    renders = {}
    for name, egocam_from_cam in STREET_CAMS.items():
        keyego_from_cam = make_transform(np.eye(3), [CAMERA_SHIFT, 0, 0]) @ egocam_from_cam
        renders[name] = render(STREET_GRID, sem, keyego_from_cam, STREET_K, STREET_SIZE, {FREE})
    occupied = np.argwhere(sem != FREE)
    pts_ego = STREET_GRID.index_to_center(occupied) + rng.uniform(-0.15, 0.15, size=(len(occupied), 3))
    pts_lidar = transform_points(invert_rigid(EGO_FROM_LIDAR), pts_ego)
    cloud = np.concatenate([pts_lidar, rng.uniform(0, 1, (len(pts_lidar), 2))], axis=1).astype(np.float32)

    frames = [("scene-a", "tok-a0", 1_000_000), ("scene-a", "tok-a1", 1_500_000), ("scene-b", "tok-b0", 9_000_000)]
    infos = []
    for scene, token, ts in frames:
        global_from_ego = make_transform(cam_axes(30.0, 0) @ cam_axes(0, 0).T, [100.0 + ts / 1e6, 50.0, 0.0])
        global_from_egocam = global_from_ego @ make_transform(np.eye(3), [CAMERA_SHIFT, 0, 0])
        gts = root / "gts" / scene / token
        gts.mkdir(parents=True)
        np.savez_compressed(gts / "labels.npz", semantics=sem, mask_lidar=mask_lidar.astype(np.uint8),
                            mask_camera=np.ones_like(sem))
        (root / "samples" / "LIDAR_TOP").mkdir(parents=True, exist_ok=True)
        cloud.tofile(root / "samples" / "LIDAR_TOP" / f"{token}.pcd.bin")
        cams = {}
        for name, egocam_from_cam in STREET_CAMS.items():
            labels_map, zdepth = renders[name]
            for sub, arr in (("samples", colorize(labels_map, OCC3D_NUSCENES.palette())), ("semantic", labels_map),
                             ("depth", np.round(zdepth * 1000).astype(np.uint16))):
                (root / sub / name).mkdir(parents=True, exist_ok=True)
                Image.fromarray(arr).save(root / sub / name / f"{token}.png")
            lidar_from_cam = (invert_rigid(EGO_FROM_LIDAR) @ invert_rigid(global_from_ego) @ global_from_egocam
                              @ egocam_from_cam)
            cams[name] = dict(
                data_path=f"./data/nuscenes\\samples\\{name}\\{token}.png",
                semantic_path=f"data\\semantic\\{name}\\{token}.png",
                depth_path=f"data/depth/{name}/{token}.png",
                cam_intrinsic=STREET_K.tolist(),
                timestamp=ts - 10_000,
                sensor2lidar_rotation=lidar_from_cam[:3, :3],
                sensor2lidar_translation=lidar_from_cam[:3, 3],
                **_quat_pose(egocam_from_cam, "sensor2ego"),
                **_quat_pose(global_from_egocam, "ego2global"),
            )
        infos.append(dict(
            token=token, timestamp=ts, cams=cams,
            lidar_path=f"./data/nuscenes\\samples\\LIDAR_TOP\\{token}.pcd.bin",
            occ_path=f"./data/nuscenes\\gts\\{scene}\\{token}",
            **_quat_pose(EGO_FROM_LIDAR, "lidar2ego"), **_quat_pose(global_from_ego, "ego2global"),
        ))
    metadata = dict(occ_range=list(STREET_GRID.range), voxel_size=0.4, grid_shape=list(STREET_GRID.shape),
                    class_names=list(OCC3D_NUSCENES.names))
    with open(root / "infos.pkl", "wb") as f:
        pickle.dump(dict(infos=[infos[2], infos[1], infos[0]], metadata=metadata), f)  # unordered on purpose
    return root


TRAIN_AUG = ImageAugConfig(final_size=(64, 128), resize_range=(0.85, 1.2), crop_top_range=(0.3, 1.0),
                           flip_prob=0.5, rotate_range_deg=(-12, 12), color_jitter=0.2)
BEV_AUG = BevAugConfig(rotate_range_deg=(-30, 30), scale_range=(0.95, 1.05), flip_x_prob=0.5, flip_y_prob=0.5)


def test_street_reader_without_augmentation_is_exact(street):
    ds = Occ3DDataset(street, "infos.pkl", depth="rendered", semantic_maps=True)
    assert ds.grid == STREET_GRID and len(ds) == 3
    s = ds[1]
    assert (s.token, s.scene_name, s.frame_index, s.timestamp) == ("tok-a0", "scene-a", 1, 1_000_000)
    assert s.camera_names == ("CAM_FRONT", "CAM_BACK")
    assert s.images.shape == (2, 3, 90, 160) and s.images.dtype == torch.float32
    assert 0.0 <= float(s.images.min()) and float(s.images.max()) <= 1.0
    torch.testing.assert_close(s.img_from_raw, torch.eye(3).expand(2, 3, 3))
    torch.testing.assert_close(s.bda, torch.eye(4))
    assert s.semantics.shape == STREET_GRID.shape and s.semantics.dtype == torch.int64
    assert s.mask_camera.all() and s.mask_lidar.dtype == torch.bool
    assert s.mask_known is None
    # The camera pose went through the camera-time ego pose (0.3 m ahead of the key ego).
    expected = make_transform(np.eye(3), [CAMERA_SHIFT, 0, 0]) @ STREET_CAMS["CAM_FRONT"]
    np.testing.assert_allclose(s.keyego_from_cam[0].double().numpy(), expected, atol=1e-6)
    np.testing.assert_allclose(s.lidar_origin.numpy(), [0.9, 0.0, 1.8], atol=1e-6)
    assert s.global_from_ego.dtype == torch.float64
    # Exact up to the millimetre rounding of the depth PNG on rays that clip a voxel corner.
    assert consistency(s, ds.grid) > 0.999


MIRROR_X = torch.diag(torch.tensor([-1.0, 1, 1, 1]))
ADD_FLIP = torch.tensor([[-1.0, 0, 128], [0, 1, 0], [0, 0, 1]])  # an extra left-right flip of a 128 px image


def test_bev_flips_are_exact(street):
    ds = Occ3DDataset(street, "infos.pkl", bev_aug=BevAugConfig(flip_x_prob=0.5, flip_y_prob=0.5), augment=True,
                      seed=0, depth="rendered", semantic_maps=True)
    mirrors = set()
    for i in range(len(ds)):
        s = ds[i]
        mirrors.add(tuple(torch.diagonal(s.bda)[:2].tolist()))
        assert consistency(s, ds.grid) > 0.999
        assert consistency(dataclasses.replace(s, bda=s.bda @ MIRROR_X), ds.grid) < 0.75
    assert len(mirrors) > 1


def test_street_reader_with_augmentation_stays_consistent(street):
    """Nearest-neighbour resampling costs a few percent of surface pixels: the depth of a raw pixel
    is reused on a ray up to half a raw pixel away (image aug), and rotated/scaled labels move
    voxel boundaries by up to half a voxel diagonal (BEV aug). Wrong matrices score <= 0.70 here."""
    for bev_aug, floor in ((None, 0.93), (BEV_AUG, 0.80)):
        ds = Occ3DDataset(street, "infos.pkl", image_aug=TRAIN_AUG, bev_aug=bev_aug, augment=True, seed=3,
                          depth="rendered", semantic_maps=True)
        for i in range(len(ds)):
            s = ds[i]
            assert s.images.shape == (2, 3, 64, 128) and s.depth.shape == (2, 64, 128)
            assert s.semantic_maps.shape == (2, 64, 128)
            frac = consistency(s, ds.grid)
            assert frac >= floor, f"sample {i}: only {frac:.3f} of pixels agree with the voxels"
            # The check must be able to fail: one wrong matrix (BEV or image) breaks it.
            assert consistency(dataclasses.replace(s, img_from_raw=ADD_FLIP @ s.img_from_raw), ds.grid) < 0.75
            if bev_aug is not None:
                assert consistency(dataclasses.replace(s, bda=s.bda @ MIRROR_X), ds.grid) < 0.75
                assert consistency(dataclasses.replace(s, bda=torch.eye(4)), ds.grid) < 0.75


def test_augmentation_is_deterministic_and_off_at_evaluation(street):
    kw = dict(image_aug=TRAIN_AUG, bev_aug=BEV_AUG, depth="none", with_labels=True)
    a = Occ3DDataset(street, "infos.pkl", augment=True, seed=7, **kw)
    b = Occ3DDataset(street, "infos.pkl", augment=True, seed=7, **kw)
    s1, s2 = a[1], b[1]
    torch.testing.assert_close(s1.images, s2.images)
    torch.testing.assert_close(s1.img_from_raw, s2.img_from_raw)
    torch.testing.assert_close(s1.bda, s2.bda)
    assert torch.equal(s1.semantics, s2.semantics)
    b.set_epoch(1)
    assert not torch.allclose(b[1].bda, s1.bda)
    # A previous frame loaded with the current frame's draws shares its augmentation.
    prev = a.load(0, aug_index=1)
    torch.testing.assert_close(prev.bda, s1.bda)
    torch.testing.assert_close(prev.img_from_raw, s1.img_from_raw)
    # Evaluation: deterministic resize + crop (mean of crop_top_range, centred), no flip/rotation/BEV.
    ev = Occ3DDataset(street, "infos.pkl", augment=False, **kw)[1]
    torch.testing.assert_close(ev.bda, torch.eye(4))
    scale = 128 / 160  # keep_aspect: max(64/90, 128/160); 90 rows -> 72, 8 spare rows
    expected = torch.tensor([[scale, 0, 0], [0, scale, -round(0.65 * 8)], [0, 0, 1]])
    torch.testing.assert_close(ev.img_from_raw[0], expected)


def test_lidar_depth_matches_brute_force(street):
    ds = Occ3DDataset(street, "infos.pkl", image_aug=TRAIN_AUG, augment=True, seed=1, depth="lidar", with_labels=False)
    s = ds[2]
    assert s.semantics is None and s.depth.shape == (2, 64, 128)
    raw = np.fromfile(street / "samples" / "LIDAR_TOP" / "tok-b0.pcd.bin", dtype=np.float32).reshape(-1, 5)
    pts_ego = transform_points(EGO_FROM_LIDAR, raw[:, :3].astype(np.float64))
    for n in range(2):
        ref = np.zeros((64, 128))
        cam_from_ego = invert_rigid(s.keyego_from_cam[n].double().numpy())
        uv, z = project(transform_points(cam_from_ego, pts_ego), s.aug_intrinsics[n].double().numpy())
        for (u, v), zz in zip(uv, z):  # reference: a plain loop, nearest point per pixel
            c, r = math.floor(u), math.floor(v)
            if zz > 0.1 and 0 <= c < 128 and 0 <= r < 64 and (ref[r, c] == 0 or zz < ref[r, c]):
                ref[r, c] = zz
        assert (ref > 0).sum() > 100
        np.testing.assert_allclose(s.depth[n].numpy(), ref, atol=1e-5)


def test_previous_frames_and_order(street):
    ds = Occ3DDataset(street, "infos.pkl", with_labels=False)
    # The file lists b0, a1, a0: scenes keep the order of first appearance, frames go by time.
    assert [ds.frame(i).token for i in range(3)] == ["tok-b0", "tok-a0", "tok-a1"]
    assert [ds.frame(i).scene_name for i in range(3)] == ["scene-b", "scene-a", "scene-a"]  # from occ_path
    assert ds.previous(2) == 1 and ds.previous(1) is None and ds.previous(0) is None
    assert ds.previous(2, steps=2) is None


def test_collate_and_to_device(street):
    ds = Occ3DDataset(street, "infos.pkl", image_aug=TRAIN_AUG, depth="rendered", semantic_maps=True)
    loader = torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=collate)
    batch = next(iter(loader))
    assert isinstance(batch, Batch) and len(batch) == 2
    assert batch.images.shape == (2, 2, 3, 64, 128)
    assert batch.keyego_from_cam.shape == (2, 2, 4, 4) and batch.bda.shape == (2, 4, 4)
    assert batch.semantics.shape == (2, *STREET_GRID.shape) and batch.mask_known is None
    assert batch.timestamps.tolist() == [9_000_000, 1_000_000]
    torch.testing.assert_close(batch.ego_from_cam[1], ds[1].ego_from_cam)
    moved = batch.to("cpu")
    assert moved.global_from_ego.dtype == torch.float64 and moved.images.data_ptr() == batch.images.data_ptr()
    with pytest.raises(DataError, match="sample tok-b0 has no depth but sample tok-a0 has one"):
        collate([ds[1], dataclasses.replace(ds[0], depth=None)])


# ---------------------------------------------------------------- bad input


def _write_infos(root: Path, infos: list, name: str = "bad.pkl") -> Path:
    with open(root / name, "wb") as f:
        pickle.dump(dict(infos=infos, metadata={}), f)
    return root / name


def _street_infos(street: Path) -> list:
    with open(street / "infos.pkl", "rb") as f:
        return pickle.load(f)["infos"]


def test_bad_input_errors_name_the_culprit(street, tmp_path):
    infos = _street_infos(street)
    # Missing image.
    bad = [dict(infos[0], cams={**infos[0]["cams"], "CAM_BACK": dict(infos[0]["cams"]["CAM_BACK"], data_path="samples/CAM_BACK/nope.png")})]
    ds = Occ3DDataset(street, _write_infos(tmp_path, bad), with_labels=False)
    with pytest.raises(DataError, match=r"nope\.png: image not found"):
        ds[0]
    # Non-rigid calibration.
    cam = dict(infos[0]["cams"]["CAM_FRONT"], sensor2ego_rotation=(np.eye(3) * 1.2).tolist())
    with pytest.raises(DataError, match="tok-b0.*CAM_FRONT.*sensor2ego.*orthonormal"):
        Occ3DDataset(street, _write_infos(tmp_path, [dict(infos[0], cams={"CAM_FRONT": cam})]))
    # Intrinsics for another resolution.
    cam = dict(infos[0]["cams"]["CAM_FRONT"], cam_intrinsic=(STREET_K * [[4], [4], [1]]).tolist())
    ds = Occ3DDataset(street, _write_infos(tmp_path, [dict(infos[0], cams={"CAM_FRONT": cam})]), with_labels=False)
    with pytest.raises(DataError, match="CAM_FRONT.*do not fit a 160x90 image"):
        ds[0]
    # Labels: missing, wrong shape, out of range.
    ds = Occ3DDataset(street, "infos.pkl", grid=STREET_GRID)
    missing = [dict(infos[0], occ_path="gts/scene-x/none")]
    with pytest.raises(DataError, match=r"gts/scene-x/none/labels\.npz: labels file not found"):
        Occ3DDataset(street, _write_infos(tmp_path, missing))[0]
    bad_dir = street / "gts" / "bad" / "tok"
    bad_dir.mkdir(parents=True, exist_ok=True)
    sem = street_labels()
    np.savez(bad_dir / "labels.npz", semantics=sem[:, :, :8], mask_lidar=sem[:, :, :8] * 0, mask_camera=sem[:, :, :8] * 0)
    with pytest.raises(DataError, match=r"bad/tok/labels\.npz: semantics has shape \(40, 40, 8\)"):
        Occ3DDataset(street, _write_infos(tmp_path, [dict(infos[0], occ_path="gts/bad/tok")]), grid=STREET_GRID)[0]
    np.savez(bad_dir / "labels.npz", semantics=sem + 20, mask_lidar=sem * 0, mask_camera=sem * 0)
    with pytest.raises(DataError, match=r"labels\.npz: semantics has labels in \[24, 37\], outside 0..17"):
        Occ3DDataset(street, _write_infos(tmp_path, [dict(infos[0], occ_path="gts/bad/tok")]), grid=STREET_GRID)[0]
    # Grid disagreement and an unknown depth source.
    with pytest.raises(DataError, match="differs from the requested"):
        Occ3DDataset(street, "infos.pkl", grid=VoxelGrid((-4, -4, -1, 4, 4, 5.4), (0.4, 0.4, 0.4)))
    with pytest.raises(DataError, match="depth source 'radar'"):
        Occ3DDataset(street, "infos.pkl", depth="radar")
    # A depth map of another image, a semantic map that is not given, cameras of different sizes.
    Image.fromarray(np.zeros((10, 10), dtype=np.uint16)).save(street / "depth" / "CAM_FRONT" / "square.png")
    cam = dict(infos[0]["cams"]["CAM_FRONT"], depth_path="depth/CAM_FRONT/square.png")
    cam.pop("semantic_path")
    ds = Occ3DDataset(street, _write_infos(tmp_path, [dict(infos[0], cams={"CAM_FRONT": cam})]), with_labels=False,
                      depth="rendered")
    with pytest.raises(DataError, match=r"square\.png: map is 10x10, its image 160x90 has another aspect ratio"):
        ds[0]
    ds.depth, ds.semantic_maps = "none", True
    with pytest.raises(DataError, match="tok-b0 .*camera CAM_FRONT: no semantic_path given"):
        ds[0]
    Image.new("RGB", (80, 45)).save(street / "samples" / "CAM_BACK" / "small.png")
    small = dict(infos[0]["cams"]["CAM_BACK"], data_path="samples/CAM_BACK/small.png",
                 cam_intrinsic=(STREET_K * [[0.5], [0.5], [1]]).tolist())
    ds = Occ3DDataset(street, _write_infos(tmp_path, [dict(infos[0], cams={**infos[0]["cams"], "CAM_BACK": small})]),
                      with_labels=False)
    with pytest.raises(DataError, match="cameras give images of different sizes"):
        ds[0]
    # A LiDAR file that is not (N, 5) float32.
    np.zeros(7, dtype=np.float32).tofile(street / "samples" / "LIDAR_TOP" / "odd.bin")
    odd = [dict(infos[0], lidar_path="samples\\LIDAR_TOP\\odd.bin")]
    ds = Occ3DDataset(street, _write_infos(tmp_path, odd), with_labels=False, depth="lidar")
    with pytest.raises(DataError, match=r"odd\.bin: 7 float32 values is not a whole number of 5-value points"):
        ds[0]


def test_image_aug_config_errors_through_config_loader():
    from occdistill.config import load_config
    from occdistill.errors import ConfigError

    cfg = load_config(ImageAugConfig, overrides=["final_size=[128, 352]", "flip_prob=0.5"])
    assert cfg.final_size == (128, 352) and cfg.flip_prob == 0.5
    with pytest.raises(ConfigError, match="flip_probability.*did you mean 'flip_prob'"):
        load_config(ImageAugConfig, overrides=["flip_probability=0.5"])
    with pytest.raises(ConfigError, match="flip_prob must be a probability"):
        load_config(ImageAugConfig, overrides=["flip_prob=2"])
    with pytest.raises(ConfigError, match="scale_range"):
        load_config(BevAugConfig, overrides=["scale_range=[1.2, 0.8]"])


# ---------------------------------------------------------------- the room world (Occ-ScanNet layout)

ROOM_SHAPE = (30, 30, 20)
ROOM_VOXEL = 0.08
ROOM_K = np.array([[90.0, 0, 64, 0], [0, 90.0, 48, 0], [0, 0, 1, 0], [0, 0, 0, 1]])  # 4x4, as ScanNet stores it
ROOM_SIZE = (96, 128)
UNK = 255
HALF_RES_DEPTH = "00007"


def room_labels() -> np.ndarray:
    """target_1_4[i, j, k] along world x, y, z from voxel_origin; deliberately not symmetric in x/y."""
    sem = np.zeros(ROOM_SHAPE, dtype=np.uint8)
    sem[:, :, 0] = OCC_SCANNET.index("floor")
    sem[29, :, :] = OCC_SCANNET.index("wall")
    sem[10:16, 4:11, 1:7] = OCC_SCANNET.index("table")
    sem[11:15, 5:10, 1:5] = UNK  # the table's inside was never observed
    sem[5:9, 18:23, 1:9] = OCC_SCANNET.index("chair")
    sem[0:4, :, 15:] = UNK
    return sem


def room_pose(yaw_deg: float, offset) -> np.ndarray:
    return make_transform(cam_axes(yaw_deg, 35.0), offset)


ROOM_FRAMES = {  # (scene, frame) -> (voxel_origin, world_from_cam)
    ("scene0042_00", "00000"): ((0.37, -1.21, 0.05), room_pose(10.0, [0.37 - 0.8, -1.21 + 1.0, 1.35])),
    ("scene0042_00", "00007"): ((0.30, -1.00, 0.05), room_pose(-12.0, [0.30 - 0.7, -1.00 + 1.5, 1.30])),
    ("scene0043_00", "00003"): ((-2.0, 3.0, -0.4), room_pose(25.0, [-2.0 - 0.6, 3.0 + 0.8, 0.9])),
}


@pytest.fixture(scope="module")
def room(tmp_path_factory) -> Path:
    """ISO-like layout: ``gathered_data/<scene>/<frame>.pkl`` whose paths point to another machine;
    images and depth under ``posed_images/<scene>/``."""
    root = tmp_path_factory.mktemp("room")
    sem = room_labels()
    for (scene, frame), (origin, world_from_cam) in ROOM_FRAMES.items():
        grid_world = VoxelGrid.from_origin(origin, ROOM_VOXEL, ROOM_SHAPE)
        labels_map, zdepth = render(grid_world, sem, world_from_cam, ROOM_K[:3, :3], ROOM_SIZE, {0, UNK})
        img_dir = root / "posed_images" / scene
        img_dir.mkdir(parents=True, exist_ok=True)
        Image.fromarray(colorize(labels_map, OCC_SCANNET.palette())).save(img_dir / f"{frame}.jpg", quality=95)
        # One frame stores depth at half resolution, as ScanNet's depth camera beside its colour one.
        stored = zdepth[::2, ::2] if frame == HALF_RES_DEPTH else zdepth
        Image.fromarray(np.round(stored * 1000).astype(np.uint16)).save(img_dir / f"{frame}.png")
        Image.fromarray(labels_map).save(img_dir / f"{frame}_sem.png")
        foreign = f"/home/someone/data/occscannet/posed_images/{scene}/{frame}"
        rec = dict(img=f"{foreign}.jpg", depth_gt=f"{foreign}.png", semantic_path=f"{foreign}_sem.png",
                   intrinsic=ROOM_K, cam_pose=world_from_cam, voxel_origin=np.array(origin),
                   target_1_4=sem, target_1_16=sem[::4, ::4, ::4])
        (root / "gathered_data" / scene).mkdir(parents=True, exist_ok=True)
        with open(root / "gathered_data" / scene / f"{frame}.pkl", "wb") as f:
            pickle.dump(rec, f)
    return root


def test_room_reader_frames_and_exact_consistency(room):
    ds = OccScanNetDataset(room, shape=ROOM_SHAPE, semantic_maps=True)
    # Nothing at <root>/<scene>/*.pkl, so the reader looks under gathered_data/.
    assert [ds[i].token for i in range(len(ds))] == ["scene0042_00/00000", "scene0042_00/00007", "scene0043_00/00003"]
    assert ds.previous(1) == 0 and ds.previous(2) is None and ds.previous(0) is None
    s = ds[1]
    assert s.camera_names == ("CAM",) and s.images.shape == (1, 3, 96, 128) and s.timestamp == 7
    assert s.depth is None and s.mask_camera is None and s.mask_lidar is None
    assert torch.equal(s.mask_known, s.semantics != UNK)
    assert int((~s.mask_known).sum()) == int((room_labels() == UNK).sum())
    # The ego frame: world axes, origin at the grid's bottom centre.
    origin, world_from_cam = ROOM_FRAMES[("scene0042_00", "00007")]
    world_from_ego = make_transform(np.eye(3), np.array(origin) + [1.2, 1.2, 0.0])
    np.testing.assert_allclose(s.global_from_ego.numpy(), world_from_ego, atol=1e-12)
    np.testing.assert_allclose(s.keyego_from_cam[0].double().numpy(), invert_rigid(world_from_ego) @ world_from_cam, atol=1e-6)
    assert ds.grid == scannet_grid(ROOM_SHAPE, ROOM_VOXEL) and ds.grid.range[:3] == (-1.2, -1.2, 0.0)
    np.testing.assert_allclose(s.lidar_origin.numpy(), s.keyego_from_cam[0, :3, 3].numpy())

    full = OccScanNetDataset(room, shape=ROOM_SHAPE, semantic_maps=True, load_depth=True)
    for i in range(len(full)):
        s = full[i]
        assert s.depth.shape == (1, 96, 128)
        # Labels read as stored ([x, y, z] along world axes) fit the images exactly; the
        # half-resolution depth map is upsampled by nearest neighbour, a 4 cm footprint at 2 m.
        assert consistency(s, full.grid) > (0.85 if s.token.endswith(HALF_RES_DEPTH) else 0.999)
        # The other axis order public loaders use ((1, 0, 2) transpose) does not fit the objects
        # (the floor is the same either way).
        transposed = dataclasses.replace(s, semantics=s.semantics.permute(1, 0, 2).contiguous())
        floor = (OCC_SCANNET.index("floor"),)
        assert consistency(s, full.grid, exclude=floor) > 0.8
        assert consistency(transposed, full.grid, exclude=floor) < 0.5


def test_room_reader_with_augmentation(room):
    aug = ImageAugConfig(final_size=(72, 100), keep_aspect=False, resize_range=(0.9, 1.15), crop_top_range=(0.0, 1.0),
                         flip_prob=0.5, rotate_range_deg=(-10, 10))
    bev = BevAugConfig(rotate_range_deg=(-20, 20), flip_x_prob=0.5, flip_y_prob=0.5)
    ds = OccScanNetDataset(room, shape=ROOM_SHAPE, image_aug=aug, bev_aug=bev, augment=True, seed=5,
                           semantic_maps=True, load_depth=True)
    batch = collate([ds[i] for i in range(len(ds))])
    assert batch.images.shape == (3, 1, 3, 72, 100) and batch.mask_known.shape == (3, *ROOM_SHAPE)
    assert batch.mask_camera is None
    for i in range(len(ds)):
        s = ds[i]
        assert consistency(s, ds.grid) >= 0.8
        assert consistency(dataclasses.replace(s, bda=s.bda @ MIRROR_X), ds.grid) < 0.75
        # Voxels rotated in from outside the grid are unknown, never free.
        assert torch.equal(s.mask_known, s.semantics != UNK)
    # Evaluation reproduces ISO's anisotropic 1296x968 -> 640x480 resize exactly.
    ev = OccScanNetDataset(room, shape=ROOM_SHAPE, image_aug=ImageAugConfig(final_size=(48, 60), keep_aspect=False))[0]
    torch.testing.assert_close(ev.img_from_raw[0], torch.tensor([[60 / 128, 0, 0], [0, 48 / 96, 0], [0, 0, 1.0]]))


def test_room_bad_input(room, tmp_path):
    src = room / "gathered_data" / "scene0042_00" / "00000.pkl"
    with open(src, "rb") as f:
        rec = pickle.load(f)
    cases = {
        "range": (dict(rec, target_1_4=np.where(room_labels() == 5, 20, room_labels()).astype(np.uint8)),
                  r"target_1_4 has labels \[20\] outside 0..11 and 255"),
        "shape": (dict(rec, target_1_4=room_labels()[:, :, :10]), r"target_1_4 has shape \(30, 30, 10\)"),
        "dtype": (dict(rec, target_1_4=room_labels().astype(np.float32)), "integer class ids"),
        "pose": (dict(rec, cam_pose=np.diag([1.0, 1, -1, 1])), "cam_pose: rotation block has determinant"),
        "key": ({k: v for k, v in rec.items() if k != "voxel_origin"}, r"missing key\(s\) \['voxel_origin'\]"),
        "image": (dict(rec, img="/elsewhere/posed_images/scene0042_00/missing.jpg"), r"missing\.jpg: image not found"),
        "mask": (dict(rec, mask_camera=np.full(ROOM_SHAPE, 2, dtype=np.uint8)), "mask_camera must hold only 0 and 1"),
    }
    for name, (bad, msg) in cases.items():
        path = tmp_path / "gathered_data" / "scene9" / f"{name}.pkl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            pickle.dump(bad, f)
        ds = OccScanNetDataset(room, [path], shape=ROOM_SHAPE)
        with pytest.raises(DataError, match=msg) as err:
            ds[0]
        assert str(path) in str(err.value) or name == "image"
    with pytest.raises(DataError, match="no Occ-ScanNet frame pickles"):
        OccScanNetDataset(tmp_path / "empty")
    with pytest.raises(DataError, match="split file not found"):
        OccScanNetDataset(room, split_file=tmp_path / "train.txt")


def test_room_axis_order_on_the_synthetic_world(tmp_path):
    """The synthetic room writes ``target_1_4`` from its own geometry; read as stored ([x, y, z])
    its labels fit its images, read transposed (1, 0, 2) they do not. Measured: 0.91-0.95 vs 0.15."""
    from occdistill.data.synth import generate

    out = generate("room", tmp_path / "room", scenes=1, frames=2, seed=0, progress=False)
    ds = OccScanNetDataset(out.out, split_file=out.splits["train"], semantic_maps=True, load_depth=True)
    assert len(ds) == 2
    for i in range(len(ds)):
        s = ds[i]
        assert s.images.shape == (1, 3, 480, 640) and s.mask_camera is not None
        transposed = dataclasses.replace(s, semantics=s.semantics.permute(1, 0, 2).contiguous())
        assert consistency(s, ds.grid, push=ROOM_VOXEL / 2) > 0.85
        assert consistency(transposed, ds.grid, push=ROOM_VOXEL / 2) < 0.3
