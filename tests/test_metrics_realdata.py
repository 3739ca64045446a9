"""Metrics on the real files in ../shared/realdata (skipped when the folder is absent)."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

from occdistill.data.infos import load_infos
from occdistill.data.labels import load_occ3d_labels
from occdistill.geometry.transforms import transform_from_quat
from occdistill.metrics.occ3d import Occ3DAccumulator
from occdistill.metrics.rayiou import (
    RayIoUAccumulator,
    cast_rays,
    cast_rays_reference,
    lidar_origins,
    lidar_ray_directions,
    rays_in_voxel_units,
)

REALDATA = Path(__file__).resolve().parents[2] / "shared" / "realdata"
DEMO = REALDATA / "occ3d_openocc_occupancy_vis_demo"
LABELS = [
    DEMO / "3D_occupancy_data.npz",
    REALDATA / "occ3d_cvpr2023_challenge_scene1077_29796060" / "29796060110c4163b07f06eff4af0753" / "labels.npz",
]
INFOS = DEMO / "world-nuscenes_mini_infos_val.pkl"
FREE = 17


def _need(path: Path) -> None:
    if not path.exists():
        pytest.skip(f"real data not available: {path} is absent (expected beside the repository in shared/realdata)")


@pytest.fixture(scope="module")
def infos():
    _need(INFOS)
    return load_infos(INFOS)


@pytest.fixture(scope="module")
def real_label():
    _need(LABELS[0])
    return load_occ3d_labels(LABELS[0])


@pytest.mark.parametrize("path", LABELS, ids=["vis_demo", "challenge_scene1077"])
def test_miou_of_gt_against_itself_is_100(path):
    _need(path)
    lab = load_occ3d_labels(path)
    acc = Occ3DAccumulator()
    acc.update(lab.semantics, lab.semantics, lab.mask_camera)
    m = acc.compute()
    assert m.miou * 100 == 100.0 and m.iou_geometry == 1.0
    present = set(np.unique(lab.semantics[lab.mask_camera]).tolist()) - {FREE}
    assert {k for k, v in m.per_class.items() if v is not None} == {
        n for c, n in enumerate(m.class_names) if c in present
    }


def test_known_relabelling_gives_the_analytic_miou(real_label):
    sem, mask = real_label.semantics, real_label.mask_camera
    veg, ter = 16, 14
    pred = sem.copy()
    pred[sem == veg] = ter  # every vegetation voxel predicted as terrain
    acc = Occ3DAccumulator()
    acc.update(pred, sem, mask.astype(np.uint8))  # the uint8 mask as stored
    m = acc.compute()
    g = sem[mask]
    n_veg, n_ter = int((g == veg).sum()), int((g == ter).sum())
    present = sorted(set(np.unique(g).tolist()) - {FREE})
    assert veg in present and ter in present and n_veg > 0 and n_ter > 0
    # vegetation: TP 0, FN n_veg -> 0; terrain: TP n_ter, FP n_veg -> n_ter / (n_ter + n_veg); rest 1
    expected = (Fraction(len(present) - 2) + Fraction(n_ter, n_ter + n_veg)) / len(present)
    assert m.iou[veg] == 0.0
    assert m.iou[ter] == pytest.approx(n_ter / (n_ter + n_veg), rel=1e-15)
    assert m.miou == pytest.approx(float(expected), rel=1e-14)
    assert m.iou_geometry == 1.0  # occupancy unchanged
    # all-free prediction: every present class 0, geometry 0
    acc = Occ3DAccumulator()
    acc.update(np.full_like(sem, FREE), sem, mask)
    assert acc.compute().miou == 0.0 and acc.compute().iou_geometry == 0.0


def _sparseocc_origins(scene, frame):
    """SparseOcc's EgoPoseDataset construction written out with plain 4x4 algebra (our own
    closed-form quaternion matrix, not the pyquaternion product the library mirrors)."""

    def pose(info):
        ego_from_lidar = transform_from_quat(info["lidar2ego_rotation"], info["lidar2ego_translation"])
        return ego_from_lidar, transform_from_quat(info["ego2global_rotation"], info["ego2global_translation"]) @ ego_from_lidar

    ref_ego_from_lidar, ref_global_from_lidar = pose(frame.raw)
    candidates = []
    for f in scene:
        t = np.zeros(3, np.float32) if f is frame else (np.linalg.inv(ref_global_from_lidar) @ pose(f.raw)[1])[:3, 3].astype(np.float32)
        p = ref_ego_from_lidar[:3, :3] @ t.astype(np.float64) + ref_ego_from_lidar[:3, 3]
        if abs(p[0]) < 39 and abs(p[1]) < 39:
            candidates.append(p)
    kept = candidates
    if len(kept) > 8:
        kept = [kept[i] for i in np.round(np.linspace(0, len(kept) - 1, 8)).astype(int)]
    return np.array(kept), len(candidates)


def test_origins_from_the_real_poses_of_the_81_keyframes(infos):
    assert len(infos.frames) == 81 and infos.scenes() == ["scene-0103", "scene-0916"]
    n_candidates = []
    for frame in infos.frames:
        scene = infos.scene_frames(frame.scene_name)
        o = lidar_origins(scene, frame)
        expected, n = _sparseocc_origins(scene, frame)
        n_candidates.append(n)
        assert o.shape == expected.shape and 1 <= len(o) <= 8
        np.testing.assert_allclose(o, expected, atol=1e-5)
        assert np.all(np.abs(o[:, :2]) < 39)
        mount = np.asarray(frame.raw["lidar2ego_translation"], float)
        has_current = any(np.array_equal(p, mount) for p in o)  # exactly lidar2ego when selected
        if n <= 8:
            assert has_current
        # every origin is the LiDAR of a keyframe of the scene, seen from this frame's ego
        ego_from_global = np.linalg.inv(frame.global_from_ego)
        lidars = np.array([(ego_from_global @ f.global_from_ego @ f.ego_from_lidar)[:3, 3] for f in scene])
        for p in o:
            assert np.min(np.abs(lidars - p).max(axis=1)) < 1e-3
    # the ego drives through: the number of keyframes within 39 m varies along the scene
    assert min(n_candidates) < max(n_candidates) and max(n_candidates) > 8


def test_rayiou_gt_against_a_shifted_copy_with_real_origins(infos, real_label):
    sem = real_label.semantics
    shifted = np.full_like(sem, FREE)
    shifted[2:] = sem[:-2]  # everything moved 0.8 m forward
    frames = [infos.frames[i] for i in (0, 20, 45)]
    same = RayIoUAccumulator()
    moved = RayIoUAccumulator()
    for frame in frames:
        o = lidar_origins(infos.scene_frames(frame.scene_name), frame)
        same.update(sem, sem, o)
        moved.update(shifted, sem, o)
    s, m = same.compute(), moved.compute()
    assert s.rayiou == 1.0 and s.rayiou_at == (1.0, 1.0, 1.0)
    assert 0.0 < m.rayiou < 1.0
    assert m.rayiou_at[0] < m.rayiou_at[1] <= m.rayiou_at[2]
    assert m.gt_count.sum() == s.gt_count.sum()  # the GT side does not depend on the prediction
    # per class, a larger threshold never scores lower
    ok = ~np.isnan(m.iou[0])
    assert np.all(m.iou[0, ok] <= m.iou[1, ok]) and np.all(m.iou[1, ok] <= m.iou[2, ok])


def test_vectorised_casting_equals_the_per_ray_reference_on_real_data(infos, real_label):
    sem = real_label.semantics
    shifted = np.full_like(sem, FREE)
    shifted[:, 1:] = sem[:, :-1]
    frame = infos.frames[30]
    o = lidar_origins(infos.scene_frames(frame.scene_name), frame)
    dirs = lidar_ray_directions()[::23]
    ov, ev = rays_in_voxel_units(o, dirs)
    occ = np.stack([sem != FREE, shifted != FREE])
    hits = cast_rays(torch.from_numpy(occ), ov, ev)
    for g in range(2):
        d, v = cast_rays_reference(occ[g], ov, ev)
        np.testing.assert_array_equal(hits.depth[g].numpy(), d)
        np.testing.assert_array_equal(hits.voxel[g].numpy(), v)


def test_score_command_with_the_real_mini_val_pickle(infos, real_label, tmp_path):
    """The real pickle (no scene_name, Windows separators in its camera paths, occ_path
    './data/nuscenes/gts/<scene>/<token>') drives ``occdistill score``: every keyframe's labels are
    found through the occ_path tail, predictions by token."""
    import json

    from occdistill.cli.main import main

    sem, mask = real_label.semantics, real_label.mask_camera.astype(np.uint8)
    pred_dir = tmp_path / "pred"
    pred_dir.mkdir()
    expected = Occ3DAccumulator()
    for k, frame in enumerate(infos.frames):
        d = tmp_path / "gts" / frame.scene_name / frame.token
        d.mkdir(parents=True)
        np.savez(d / "labels.npz", semantics=sem, mask_lidar=mask, mask_camera=mask)
        pred = sem if k % 2 else np.where(sem == 16, 14, sem).astype(np.uint8)
        np.savez(pred_dir / f"{frame.token}.npz", semantics=pred)
        expected.update(pred, sem, mask)
    out = tmp_path / "out.json"
    rc = main(["score", "--format", "occ3d", "--data-root", str(tmp_path), "--infos", str(INFOS),
               "--pred", str(pred_dir), "--json", str(out), "--no-rayiou"])
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["num_samples"] == 81
    assert report["mIoU"] == expected.compute().miou * 100
    assert report["per_class"]["vegetation"] == expected.compute().iou[16] * 100
