"""check-dump: every corruption is found and named (sample, kind, message), on the CLI too."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from occdistill.cli.main import main
from occdistill.data.occ3d import Occ3DDataset
from occdistill.data.synth import generate
from occdistill.targets import DumpOptions, Manifest, TeacherInfo, TeacherPrediction, check_dump, dump_targets
from occdistill.targets.pseudo import label_teacher_probs

SYNTH = ["rig.width=64", "rig.height=36", "rig.cameras=[CAM_FRONT]", "lidar.azimuths=256",
         "grid.range=[-9.6,-9.6,-1,9.6,9.6,5.4]", "grid.voxel_size=[0.8,0.8,0.8]"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A 3-frame street and a clean dump of a probability teacher in both formats."""
    root = tmp_path_factory.mktemp("check")
    street = generate("street", root / "street", 1, 3, seed=4, overrides=SYNTH, progress=False)
    dataset = Occ3DDataset(street.out, street.splits["val"])
    teacher = TeacherInfo("label-teacher", "none", "c" * 64, "prob")
    dump_targets(lambda s: TeacherPrediction(label_teacher_probs(s.semantics, 18, 17), "prob"), dataset,
                 root / "dump", teacher, DumpOptions(split="val", formats=("compact", "seed"), progress=False))
    return street, root / "dump"


@pytest.fixture
def copy(world, tmp_path):
    """A private copy of the clean dump (and dataset), its manifest as JSON and the dataset."""
    street, dump = world
    out = tmp_path / "dump"
    shutil.copytree(dump, out)
    data = tmp_path / "street"
    shutil.copytree(street.out, data)
    dataset = Occ3DDataset(data, street.splits["val"].name)
    manifest = json.loads((out / "manifest_val.json").read_text())
    return out, manifest, dataset


def save(out: Path, manifest: dict) -> None:
    (out / "manifest_val.json").write_text(json.dumps(manifest))


def rewrite_fp16(path: Path, edit) -> None:
    with np.load(path) as npz:
        arr = npz["prob"].astype(np.float32)
    np.savez_compressed(path, prob=edit(arr).astype(np.float16))


def only(problems, kind):
    found = [p for p in problems if p.kind == kind]
    assert len(found) == 1 and len(problems) == 1, [str(p) for p in problems]
    return found[0]


def test_a_clean_dump_has_no_problems(world):
    street, dump = world
    assert check_dump(dump, Occ3DDataset(street.out, street.splits["val"]), workers=2) == []


def test_missing_samples_and_missing_files(copy):
    out, manifest, dataset = copy
    key = manifest["samples"][1]["key"]
    gone = manifest["samples"].pop(1)
    save(out, manifest)
    p = only(check_dump(out, dataset), "missing")
    assert p.key == key and "no teacher target" in p.message
    manifest["samples"].insert(1, gone)
    save(out, manifest)
    (out / gone["files"]["bev"]).unlink()
    p = only(check_dump(out, dataset), "missing")
    assert p.key == key and p.message == f"bev: file {gone['files']['bev']} not found"


def test_wrong_shape_nan_and_probabilities_not_summing_to_one(copy):
    out, manifest, dataset = copy
    entries = manifest["samples"]
    rewrite_fp16(out / entries[0]["files"]["voxel_fp16"], lambda a: a[:, :, :4])
    rewrite_fp16(out / entries[1]["files"]["voxel_fp16"],
                 lambda a: np.where(np.arange(a.size).reshape(a.shape) == 40, np.nan, a))
    rewrite_fp16(out / entries[2]["files"]["bev_fp16"], lambda a: a * 0.9)
    problems = {p.key: p for p in check_dump(out, dataset)}
    assert len(problems) == 3
    shape, nan, norm = (problems[e["key"]] for e in entries)
    assert shape.kind == "shape" and shape.message == "voxel_fp16: shape [24, 24, 4, 18], expected [24, 24, 8, 18]"
    assert nan.kind == "nonfinite" and nan.message == "voxel_fp16: 1 NaN/inf values (first at (0, 0, 2, 4))"
    assert norm.kind == "not_normalized"
    assert re.match(r"bev_fp16: probabilities sum to 0\.(89|90)\d+ at \(\d+, \d+\)", norm.message)
    assert "576 cells beyond the tolerance 0.002" in norm.message  # every BEV cell of 24x24


def test_a_target_made_for_other_labels_is_a_gt_mismatch(copy):
    out, manifest, dataset = copy
    frame = dataset.frame(2)
    path = dataset.label_path(frame)
    with np.load(path) as npz:
        arrays = {k: npz[k].copy() for k in npz.files}
    arrays["semantics"][0, 0, 0] = (arrays["semantics"][0, 0, 0] + 1) % 18  # one voxel differs
    np.savez_compressed(path, **arrays)
    p = only(check_dump(out, dataset), "gt_mismatch")
    assert p.key == frame.token and "misaligned" in p.message
    assert manifest["samples"][2]["gt_sha256"][:12] in p.message


def test_wrong_grid_and_wrong_class_table(copy):
    out, manifest, dataset = copy
    bad = json.loads(json.dumps(manifest))
    bad["grid"]["range"] = [-4.8, -4.8, -0.5, 4.8, 4.8, 2.7]  # same 24x24x8 shape at 0.4 m
    bad["grid"]["voxel_size"] = [0.4, 0.4, 0.4]
    save(out, bad)
    p = only(check_dump(out, dataset), "grid")
    assert p.key is None and "dump grid 24x24x8 range [-4.8" in p.message and "differs from the dataset grid" in p.message
    bad = json.loads(json.dumps(manifest))
    bad["classes"]["names"][0] = "noise"  # SurroundOcc's class 0, not Occ3D's "others"
    bad["classes"]["name"] = "surroundocc"
    save(out, bad)
    p = only(check_dump(out, dataset), "classes")
    assert "dump class table 'surroundocc'" in p.message and "'occ3d-nuscenes'" in p.message


def test_unreadable_files_extra_entries_and_no_manifest(copy):
    out, manifest, dataset = copy
    voxel = out / manifest["samples"][0]["files"]["voxel"]
    voxel.write_bytes(voxel.read_bytes()[:-10])
    extra = dict(manifest["samples"][0], key="not-a-sample", index=9)
    manifest["samples"].append(extra)
    save(out, manifest)
    problems = check_dump(out, dataset)
    kinds = sorted((p.kind, p.key) for p in problems)
    assert ("extra", "not-a-sample") in kinds and ("unreadable", manifest["samples"][0]["key"]) in kinds
    assert any("corrupt" in p.message for p in problems if p.kind == "unreadable")
    (out / "manifest_val.json").unlink()
    p = only(check_dump(out, dataset), "manifest")
    assert "no manifest" in p.message


def test_check_dump_cli_lists_each_problem_writes_json_and_exits_1(copy, capsys, tmp_path):
    out, manifest, dataset = copy
    key = manifest["samples"].pop(0)["key"]
    save(out, manifest)
    report = tmp_path / "report.json"
    rc = main(["check-dump", str(out), "--data", str(dataset.data_root), "--infos", str(dataset.infos.path),
               "--json", str(report), "--no-progress"])
    lines = capsys.readouterr().out.splitlines()
    assert rc == 1
    assert f"{key}: missing: no teacher target in the manifest" in lines
    assert lines[-1].endswith("1 problem(s) in 1 sample(s) of 3")
    data = json.loads(report.read_text())
    assert data["ok"] is False and data["problems"] == [{"key": key, "kind": "missing",
                                                          "message": "no teacher target in the manifest"}]
    assert Manifest.load(out).split == "val"
