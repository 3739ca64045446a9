"""The GaussianFormer-2 converter: both array layouts, free-last onto the class table (Occ3D and
Occ-ScanNet), input checks, and ``dump-teacher --external`` (one process and ``--procs 2``)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from occdistill.cli.main import main
from occdistill.data.occ3d import Occ3DDataset
from occdistill.data.occscannet import OccScanNetDataset
from occdistill.data.synth import generate
from occdistill.errors import DataError
from occdistill.targets import DumpOptions, Manifest, TeacherInfo, TeacherTargets, check_dump, convert_external
from occdistill.targets.compact import decode_probs
from occdistill.targets.pairing import gt_semantics
from occdistill.targets.pseudo import label_teacher_probs

SYNTH = ["rig.width=64", "rig.height=36", "rig.cameras=[CAM_FRONT]", "lidar.azimuths=256",
         "grid.range=[-9.6,-9.6,-1,9.6,9.6,5.4]", "grid.voxel_size=[0.8,0.8,0.8]"]
GF2 = TeacherInfo("gaussianformer-2", "gf2.pth", "f" * 64, "prob")


@pytest.fixture(scope="module")
def street(tmp_path_factory):
    return generate("street", tmp_path_factory.mktemp("ext"), 1, 2, seed=6, overrides=SYNTH, progress=False)


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and ".parts" not in p.parts}


def teacher_probs(dataset, i: int, k: int, free: int) -> np.ndarray:
    sem = torch.from_numpy(gt_semantics(dataset, i).astype(np.int64))
    return label_teacher_probs(sem, k, free, generator=torch.Generator().manual_seed(i)).numpy()


def write_gf2_outputs(dataset, folder: Path, layout: str) -> Path:
    """What a GaussianFormer-2 dump script saves: fp16 probabilities, free last, one file per
    frame, plus the frame list."""
    folder.mkdir(parents=True)
    lines = ["# GaussianFormer-2 outputs: <file> <token>"]
    for i in range(len(dataset)):
        p = teacher_probs(dataset, i, 18, 17).astype(np.float16)  # Occ3D: free is already last
        if layout == "flat":  # pred_occ[-1]: (1, K, X*Y*Z)
            np.save(folder / f"{i:06d}.npy", p.reshape(-1, 18).T[None])
            lines.append(f"{i:06d}.npy {dataset.frame(i).token}")
        else:  # (X, Y, Z, K) inside an npz
            np.savez(folder / f"{i:06d}.npz", pred_occ=p)
            lines.append(f"{i:06d}.npz   {dataset.frame(i).token}  # frame {i}")
    (folder / "frames.txt").write_text("\n".join(lines) + "\n")
    return folder / "frames.txt"


def test_both_gaussianformer_layouts_convert_to_the_same_checked_dump(street, tmp_path):
    dataset = Occ3DDataset(street.out, street.splits["val"])
    opts = DumpOptions(split="val", progress=False)
    for layout in ("flat", "grid"):
        frames = write_gf2_outputs(dataset, tmp_path / layout, layout)
        result = convert_external(frames, tmp_path / layout, dataset, tmp_path / f"dump_{layout}", GF2, opts,
                                  array_key="pred_occ" if layout == "grid" else None)
        assert result.written == 2 and result.manifest is not None
    assert tree(tmp_path / "dump_flat") == tree(tmp_path / "dump_grid")
    assert check_dump(tmp_path / "dump_flat", dataset) == []
    m = Manifest.load(tmp_path / "dump_flat")
    assert m.teacher.value_kind == "prob" and m.classes.free_index == 17
    decoded = decode_probs((tmp_path / "dump_flat" / m.samples[1].files["voxel"]).read_bytes())
    assert np.abs(decoded - teacher_probs(dataset, 1, 18, 17)).max() < 2.5 / 255 + 1e-3


def test_free_last_goes_to_occ_scannet_free_index_zero(tmp_path):
    room = generate("room", tmp_path / "room", 1, 1, seed=0, progress=False,
                    overrides=["grid.shape=[16,16,12]", "camera.width=64", "camera.height=48"])
    dataset = OccScanNetDataset(room.out, shape=(16, 16, 12))
    table = teacher_probs(dataset, 0, 12, 0)  # Occ-ScanNet order: empty (free) = 0
    gf_order = np.concatenate([table[..., 1:], table[..., :1]], axis=-1)  # GaussianFormer: free last
    (tmp_path / "gf").mkdir()
    np.save(tmp_path / "gf" / "f.npy", gf_order)
    token = "scene0000_00/00000"
    (tmp_path / "frames.txt").write_text(f"f.npy {token}\n")
    convert_external(tmp_path / "frames.txt", tmp_path / "gf", dataset, tmp_path / "dump", GF2,
                     DumpOptions(split="all", progress=False))
    target = TeacherTargets(tmp_path / "dump", dataset).load(0)
    assert np.abs(target.voxel_probs.numpy() - table).max() < 2.5 / 255 + 1e-6
    labels = gt_semantics(dataset, 0)
    known = labels != 255
    assert (target.voxel_probs.argmax(-1).numpy()[known] == labels[known]).all()
    assert check_dump(tmp_path / "dump", dataset) == []


def test_converter_input_errors_name_the_file_and_the_problem(street, tmp_path):
    dataset = Occ3DDataset(street.out, street.splits["val"])
    token = dataset.frame(0).token
    opts = DumpOptions(split="val", progress=False)
    src = tmp_path / "in"
    src.mkdir()

    def convert(array, line=None):
        np.save(src / "a.npy", array)
        (tmp_path / "frames.txt").write_text((line or f"a.npy {token}") + "\n")
        return convert_external(tmp_path / "frames.txt", src, dataset, tmp_path / "out", GF2, opts)

    logits = np.random.default_rng(0).normal(size=(18, 24 * 24 * 8)).astype(np.float32)
    with pytest.raises(DataError, match=f"a.npy \\(token {token}\\): not probabilities .* value kind 'logit'"):
        convert(logits)
    with pytest.raises(DataError, match=r"none of \(K, X\*Y\*Z\) = \(18, 4608\)"):
        convert(np.zeros((17, 4608), np.float32))
    with pytest.raises(DataError, match="1 token\\(s\\) are not samples of the dataset \\(first: nope\\)"):
        convert(logits, "a.npy nope")
    with pytest.raises(DataError, match="frames.txt:1: expected '<file> <token>'"):
        convert(logits, "a.npy")
    with pytest.raises(DataError, match="already listed on line 1"):
        convert(logits, f"a.npy {token}\nb.npy {token}")
    with pytest.raises(DataError, match="teacher output not found"):
        convert(logits, f"missing.npy {token}")


def test_dump_teacher_external_cli_hashes_the_checkpoint_and_runs_in_two_processes(street, tmp_path, capsys):
    dataset = Occ3DDataset(street.out, street.splits["val"])
    frames = write_gf2_outputs(dataset, tmp_path / "gf", "flat")
    weights = tmp_path / "gf2.pth"
    weights.write_bytes(b"pretend weights")
    common = ["dump-teacher", "--external", str(tmp_path / "gf"), "--frame-list", str(frames),
              "--teacher-checkpoint", str(weights), "--data", str(street.out), "--infos", str(street.splits["val"]),
              "--formats", "compact,seed", "--no-progress", "--workers", "0"]
    assert main([*common, "--out", str(tmp_path / "one")]) == 0
    assert "dump complete" in capsys.readouterr().out
    m = Manifest.load(tmp_path / "one", "occdistill_infos_val")
    assert m.teacher.checkpoint_sha256 == hashlib.sha256(b"pretend weights").hexdigest()
    assert m.artefacts["voxel_fp16"].array_key == "prob"
    assert m.artefacts["voxel"].encoding == "dense-u8" and m.artefacts["voxel"].tau == 1 / 255
    assert main([*common, "--out", str(tmp_path / "two"), "--procs", "2"]) == 0
    assert tree(tmp_path / "two") == tree(tmp_path / "one")
    assert main([*common, "--out", str(tmp_path / "topset"), "--codec", "topset-u8", "--tau", "0.01"]) == 0
    m = Manifest.load(tmp_path / "topset", "occdistill_infos_val")
    assert m.artefacts["bev"].encoding == "topset-u8" and m.artefacts["bev"].tau == 0.01
