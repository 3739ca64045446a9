"""``occdistill score`` on small datasets written in the real on-disk formats."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from occdistill.cli.main import main
from occdistill.data.infos import load_infos
from occdistill.metrics.occ3d import Occ3DAccumulator
from occdistill.metrics.occscannet import OccScanNetAccumulator
from occdistill.metrics.rayiou import RayIoUAccumulator, lidar_origins

SHAPE = (200, 200, 16)


def _quat_yaw(yaw: float) -> list[float]:
    return [float(np.cos(yaw / 2)), 0.0, 0.0, float(np.sin(yaw / 2))]


def _street(rng: np.random.Generator) -> np.ndarray:
    sem = np.full(SHAPE, 17, np.uint8)
    sem[:, :, :2] = 14  # terrain below
    sem[:, 80:120, 2] = 11  # road in z-layer 2
    sem[:, :80, 2] = 13
    sem[:, 120:, 2] = 13
    sem[:, 60:70, 3:9] = 15  # buildings
    sem[:, 130:140, 3:12] = 16
    for _ in range(6):
        x, y = rng.integers(20, 180), rng.integers(85, 112)
        sem[x : x + 10, y : y + 5, 3:7] = 4
    return sem


def make_occ3d(root: Path, windows_paths: bool = False, frames_per_scene=(3, 1)) -> tuple[Path, list]:
    """Write gts/<scene>/<token>/labels.npz and an infos pickle without scene_name (as the real
    mini-val pickle); returns (infos path, [(token, semantics, mask_camera)])."""
    rng = np.random.default_rng(0)
    infos, samples = [], []
    for s, n in enumerate(frames_per_scene):
        scene = f"scene-{s:04d}"
        for i in range(n):
            token = f"tok{s}{i:02d}" + "a" * 25
            sem = _street(rng)
            mask = (rng.random(SHAPE) < 0.6).astype(np.uint8)
            d = root / "gts" / scene / token
            d.mkdir(parents=True)
            np.savez_compressed(d / "labels.npz", semantics=sem, mask_lidar=mask, mask_camera=mask)
            occ_path = f"./data/nuscenes/gts/{scene}/{token}"
            if windows_paths:
                occ_path = occ_path.replace("/", "\\")
            infos.append(
                {
                    "token": token,
                    "timestamp": 1_000_000 * (10 * s + i),
                    "lidar2ego_translation": [0.94, 0.0, 1.84],
                    "lidar2ego_rotation": [0.7071068, -0.0153, 0.0174, -0.7070847],
                    "ego2global_translation": [300.0 + 4.0 * i, 1000.0 + 0.5 * i, 0.1 * i],
                    "ego2global_rotation": _quat_yaw(0.1 * i),
                    "cams": {},
                    "occ_path": occ_path,
                }
            )
            samples.append((token, sem, mask))
    rng.shuffle(infos)  # the pickle order must not matter
    path = root / "infos.pkl"
    with open(path, "wb") as f:
        pickle.dump({"infos": infos, "metadata": {"version": "v1.0-mini"}}, f)
    return path, samples


def write_preds(pred_dir: Path, preds: dict) -> None:
    pred_dir.mkdir(parents=True, exist_ok=True)
    for token, arr in preds.items():
        np.savez_compressed(pred_dir / f"{token}.npz", semantics=arr)


def direct_occ3d(infos_path: Path, samples: list, preds: dict, rayiou: bool = True):
    """The same evaluation through the library, for comparison with the command's JSON."""
    infos = load_infos(infos_path)
    by_token = {t: (s, m) for t, s, m in samples}
    vox = Occ3DAccumulator()
    ray = RayIoUAccumulator()
    for frame in infos.frames:
        sem, mask = by_token[frame.token]
        vox.update(preds[frame.token], sem, mask)
        if rayiou:
            ray.update(preds[frame.token], sem, lidar_origins(infos.scene_frames(frame.scene_name), frame))
    return vox.compute(), ray.compute() if rayiou else None


def run_score(args: list[str]) -> int:
    return main(["score", *map(str, args)])


def test_occ3d_perfect_and_imperfect_predictions_match_the_library(tmp_path, capsys):
    infos_path, samples = make_occ3d(tmp_path)
    rng = np.random.default_rng(1)
    preds = {}
    for k, (token, sem, _) in enumerate(samples):
        pred = sem.copy()
        if k == 0:
            pred[sem == 13] = 12  # sidewalk predicted as other_flat (absent from GT)
        if k == 1:
            pred = np.roll(sem, 2, axis=0)
            pred[rng.random(SHAPE) < 0.01] = 4
        preds[token] = pred
    write_preds(tmp_path / "pred", preds)
    out = tmp_path / "out.json"
    rc = run_score(["--format", "occ3d", "--data-root", tmp_path, "--infos", infos_path,
                    "--pred", tmp_path / "pred", "--json", out])
    assert rc == 0
    report = json.loads(out.read_text())
    vox, ray = direct_occ3d(infos_path, samples, preds)
    assert report["mIoU"] == vox.miou * 100
    assert report["IoU"] == vox.iou_geometry * 100
    assert report["RayIoU"] == ray.rayiou * 100
    for j, key in enumerate(("RayIoU@1m", "RayIoU@2m", "RayIoU@4m")):
        assert report[key] == ray.rayiou_at[j] * 100
    assert report["num_samples"] == 4
    assert report["per_class"]["other_flat"] == 0.0  # predicted, absent from GT
    assert report["per_class"]["bus"] is None  # absent from both
    assert 0 < report["mIoU"] < 100 and 0 < report["RayIoU"] < 100
    assert "devkit" in report["protocol"]["mIoU"] and "SparseOcc" in report["protocol"]["RayIoU"]
    assert report["invalid_predictions"] == []
    printed = capsys.readouterr().out
    assert "mIoU" in printed and "RayIoU" in printed and "driveable_surface" in printed


def test_occ3d_perfect_prediction_is_100_with_windows_paths(tmp_path):
    infos_path, samples = make_occ3d(tmp_path, windows_paths=True, frames_per_scene=(2,))
    write_preds(tmp_path / "pred", {t: s for t, s, _ in samples})
    out = tmp_path / "out.json"
    assert run_score(["--format", "occ3d", "--data-root", tmp_path, "--infos", infos_path,
                      "--pred", tmp_path / "pred", "--json", out]) == 0
    report = json.loads(out.read_text())
    for key in ("mIoU", "IoU", "RayIoU", "RayIoU@1m", "RayIoU@2m", "RayIoU@4m"):
        assert report[key] == 100.0


@pytest.mark.parametrize(
    "defect, message",
    [
        ("missing", "not found"),
        ("shape", "shape (200, 200, 15)"),
        ("range", "outside 0..17"),
        ("dtype", "integer class ids"),
        ("key", "no key 'semantics'"),
    ],
)
def test_occ3d_invalid_prediction_is_an_error_naming_the_sample(tmp_path, capsys, defect, message):
    infos_path, samples = make_occ3d(tmp_path, frames_per_scene=(2,))
    preds = {t: s for t, s, _ in samples}
    bad_token = samples[1][0]
    write_preds(tmp_path / "pred", {samples[0][0]: samples[0][1]})
    bad = tmp_path / "pred" / f"{bad_token}.npz"
    if defect == "shape":
        np.savez_compressed(bad, semantics=samples[1][1][:, :, :15])
    elif defect == "range":
        arr = samples[1][1].copy()
        arr[0, 0, 0] = 18
        np.savez_compressed(bad, semantics=arr)
    elif defect == "dtype":
        np.savez_compressed(bad, semantics=samples[1][1].astype(np.float32))
    elif defect == "key":
        np.savez_compressed(bad, pred=samples[1][1])
    args = ["--format", "occ3d", "--data-root", tmp_path, "--infos", infos_path, "--pred", tmp_path / "pred",
            "--no-rayiou"]
    assert run_score(args) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert bad_token in err and message in err
    # with the flag: scored as all-free, listed in the JSON
    out = tmp_path / "out.json"
    assert run_score([*args, "--invalid-as-free", "--json", out]) == 0
    report = json.loads(out.read_text())
    assert [d["sample"] for d in report["invalid_predictions"]] == [bad_token]
    assert message in report["invalid_predictions"][0]["problem"]
    preds[bad_token] = np.full(SHAPE, 17, np.uint8)
    vox, _ = direct_occ3d(infos_path, samples, preds, rayiou=False)
    assert report["mIoU"] == vox.miou * 100 and report["RayIoU"] is None


def test_occ3d_usage_errors(tmp_path, capsys):
    infos_path, _ = make_occ3d(tmp_path, frames_per_scene=(1,))
    (tmp_path / "pred").mkdir()
    assert run_score(["--format", "occ3d", "--data-root", tmp_path, "--pred", tmp_path / "pred"]) == 2
    assert "--infos" in capsys.readouterr().err
    assert run_score(["--format", "occ3d", "--data-root", tmp_path, "--infos", infos_path,
                      "--pred", tmp_path / "nope"]) == 2
    assert "prediction directory not found" in capsys.readouterr().err
    gts = next((tmp_path / "gts").rglob("labels.npz"))
    gts.unlink()
    assert run_score(["--format", "occ3d", "--data-root", tmp_path, "--infos", infos_path,
                      "--pred", tmp_path / "pred", "--invalid-as-free"]) == 2
    assert "labels file not found" in capsys.readouterr().err


def make_occscannet(root: Path) -> list:
    rng = np.random.default_rng(2)
    frames = []
    for scene in ("scene0000_00", "scene0001_00"):
        for fr in ("0", "10"):
            t = np.zeros((60, 60, 36), np.uint8)
            t[:, :, :3] = 2  # floor
            t[:3] = 3  # wall
            t[20:30, 20:30, 3:10] = 5  # chair
            t[rng.random(t.shape) < 0.1] = 255
            d = root / "data" / scene
            d.mkdir(parents=True, exist_ok=True)
            rec = {"img": "x.jpg", "intrinsic": np.eye(3), "cam_pose": np.eye(4), "voxel_origin": np.zeros(3),
                   "target_1_4": t, "target_1_16": t[::4, ::4, ::4]}
            with open(d / f"{fr}.pkl", "wb") as f:
                pickle.dump(rec, f)
            frames.append((scene, fr, t))
    return frames


def test_occscannet_iso_protocol_matches_the_library(tmp_path):
    frames = make_occscannet(tmp_path)
    rng = np.random.default_rng(3)
    iso, mono = OccScanNetAccumulator(), OccScanNetAccumulator(protocol="monoscene")
    for scene, fr, t in frames:
        pred = np.where(t == 255, 0, t).astype(np.uint8)
        pred[rng.random(t.shape) < 0.05] = 10
        (tmp_path / "pred" / scene).mkdir(parents=True, exist_ok=True)
        np.savez_compressed(tmp_path / "pred" / scene / f"{fr}.npz", semantics=pred)
        iso.update(pred, t)
        mono.update(pred, t)
    for protocol, acc in (("iso", iso), ("monoscene", mono)):
        out = tmp_path / f"{protocol}.json"
        assert run_score(["--format", "occscannet", "--data-root", tmp_path / "data", "--pred", tmp_path / "pred",
                          "--json", out, "--protocol", protocol]) == 0
        report = json.loads(out.read_text())
        m = acc.compute()
        assert report["mIoU"] == m.miou * 100 and report["IoU"] == m.iou * 100
        assert report["per_class"]["chair"] == m.iou_ssc[5] * 100
        assert "empty" not in report["per_class"] and len(report["per_class"]) == 11
        assert report["num_samples"] == 4 and report["protocol"]["name"] == protocol
        assert report["RayIoU"] is None and report["RayIoU@1m"] is None
    assert json.loads((tmp_path / "iso.json").read_text())["IoU"] != json.loads((tmp_path / "monoscene.json").read_text())["IoU"]


def test_occscannet_missing_prediction(tmp_path, capsys):
    frames = make_occscannet(tmp_path)
    (tmp_path / "pred").mkdir()
    assert run_score(["--format", "occscannet", "--data-root", tmp_path / "data", "--pred", tmp_path / "pred"]) == 2
    assert f"{frames[0][0]}/{frames[0][1]}" in capsys.readouterr().err
    out = tmp_path / "o.json"
    assert run_score(["--format", "occscannet", "--data-root", tmp_path / "data", "--pred", tmp_path / "pred",
                      "--invalid-as-free", "--json", out]) == 0
    report = json.loads(out.read_text())
    assert len(report["invalid_predictions"]) == 4 and report["IoU"] == 0.0 and report["mIoU"] == 0.0


def test_occ3d_on_the_synthetic_world_uses_the_grid_its_infos_declare(tmp_path, capsys):
    # The synthetic street's default grid is 100x100x16; score must read it from the metadata.
    from occdistill.data.synth import generate

    world = generate("street", tmp_path / "street", scenes=1, frames=2, seed=0, progress=False)
    infos = load_infos(world.splits["val"])
    pred = tmp_path / "pred"
    pred.mkdir()
    for frame in infos.frames:
        sem = np.load(world.out / frame.occ_path / "labels.npz")["semantics"].copy()
        assert sem.shape == (100, 100, 16)
        sem[sem == 15] = 16  # every manmade voxel predicted as vegetation
        np.savez_compressed(pred / f"{frame.token}.npz", semantics=sem)
    out = tmp_path / "score.json"
    args = ["score", "--format", "occ3d", "--data-root", str(world.out), "--infos", str(world.splits["val"])]
    assert main([*args, "--pred", str(pred), "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["per_class"]["manmade"] == 0.0
    assert 0.0 < report["per_class"]["vegetation"] < 100.0
    assert report["per_class"]["driveable_surface"] == 100.0
    assert report["IoU"] == 100.0 and report["num_samples"] == 2
