"""dump_targets / dump-teacher: files and manifest, determinism, resumption, sharding, the CLI
with a real checkpoint, and the manifest's validation."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from occdistill.cli.main import main
from occdistill.data.labels import load_occ3d_labels
from occdistill.data.occ3d import Occ3DDataset
from occdistill.data.synth import generate
from occdistill.errors import DataError, OccDistillError
from occdistill.targets import (DumpOptions, Manifest, TeacherInfo, TeacherPrediction, TeacherTargets, check_dump,
                                dump_targets)
from occdistill.targets import compact, seed_format
from occdistill.targets.collapse import collapse_bev
from occdistill.targets.pairing import gt_sha256
from occdistill.targets.pseudo import label_teacher_logits

# Two 64x36 cameras, a 24x24x8 grid at 0.8 m; one scene of 4 frames (in both splits).
SYNTH = ["rig.width=64", "rig.height=36", "rig.cameras=[CAM_FRONT,CAM_BACK]", "lidar.azimuths=256",
         "grid.range=[-9.6,-9.6,-1,9.6,9.6,5.4]", "grid.voxel_size=[0.8,0.8,0.8]"]
TEACHER = TeacherInfo("label-teacher", "none", "a" * 64, "logit")
FEATURE_C = 3


@pytest.fixture(scope="module")
def street(tmp_path_factory):
    return generate("street", tmp_path_factory.mktemp("street"), 1, 4, seed=2, overrides=SYNTH, progress=False)


@pytest.fixture
def dataset(street):
    return Occ3DDataset(street.out, street.splits["train"])


def label_teacher(sample) -> TeacherPrediction:
    """A deterministic teacher computed from the GT, with noise from the global RNG: equal outputs
    across runs and shards prove the per-sample seeding."""
    x, y, _ = sample.semantics.shape
    return TeacherPrediction(label_teacher_logits(sample.semantics, 18, 17), "logit",
                             bev_feature=torch.randn(FEATURE_C, x, y))


def options(**kw) -> DumpOptions:
    base = dict(split="train", formats=("compact", "seed"), bev_feature_channels=FEATURE_C, progress=False)
    return DumpOptions(**{**base, **kw})


def tree(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` but the resume markers, by relative path."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and ".parts" not in p.parts}


def test_dump_writes_seed_and_compact_files_and_a_manifest_that_pairs_them_with_the_labels(dataset, tmp_path):
    out = tmp_path / "dump"
    result = dump_targets(label_teacher, dataset, out, TEACHER, options())
    assert (result.written, result.skipped, result.remaining) == (4, 0, 0)
    m = Manifest.load(out)
    assert result.manifest == out / "manifest_train.json" and m.split == "train"
    assert m.teacher == TEACHER and m.classes.free_index == 17 and m.grid.shape == (24, 24, 8)
    assert m.artefacts["voxel_fp16"].array_key == "logits" and m.artefacts["bev_fp16"].array_key == "prob"
    assert m.artefacts["voxel"].value == "prob" and m.artefacts["voxel_fp16"].value == "logit"
    for i, entry in enumerate(m.samples):
        frame = dataset.frame(i)
        assert entry.key == frame.token and entry.index == i
        labels = load_occ3d_labels(dataset.label_path(frame), (24, 24, 8))
        assert entry.gt_sha256 == gt_sha256(labels.semantics)
        # The seed's own naming, relative to the dump root.
        assert entry.files["voxel_fp16"] == f"occ3d_logits/train/{frame.token}_3d_logits_fp16.npz"
        assert entry.files["bev_fp16"] == f"bev_prob/train/{frame.token}_bev_prob_fp16.npz"
        logits = seed_format.read_fp16_npz(out / entry.files["voxel_fp16"], "logits").astype(np.float32)
        probs = torch.from_numpy(logits).softmax(-1).numpy()
        decoded = compact.decode_probs((out / entry.files["voxel"]).read_bytes())
        assert np.abs(decoded - probs).max() < 2 / 255 + 2e-3  # dense-u8 bound at tau 1/255 + fp16 of the logits
        bev = seed_format.read_fp16_npz(out / entry.files["bev_fp16"], "prob").astype(np.float32)
        np.testing.assert_allclose(bev, collapse_bev(probs, 17), atol=2e-3)
        assert compact.decode_feature((out / entry.files["bev_feature"]).read_bytes()).shape == (FEATURE_C, 24, 24)


class _Killed(Exception):
    pass


def test_an_interrupted_dump_resumes_skipping_done_samples_and_equals_an_uninterrupted_one(dataset, tmp_path):
    dump_targets(label_teacher, dataset, tmp_path / "full", TEACHER, options())
    calls = {"n": 0}

    def dies_at_the_third_sample(sample):
        calls["n"] += 1
        if calls["n"] == 3:
            raise _Killed
        return label_teacher(sample)

    with pytest.raises(_Killed):
        dump_targets(dies_at_the_third_sample, dataset, tmp_path / "resumed", TEACHER, options())
    assert not (tmp_path / "resumed" / "manifest_train.json").exists()
    result = dump_targets(label_teacher, dataset, tmp_path / "resumed", TEACHER, options())
    assert (result.written, result.skipped) == (2, 2)
    assert tree(tmp_path / "resumed") == tree(tmp_path / "full")
    again = dump_targets(label_teacher, dataset, tmp_path / "resumed", TEACHER, options())
    assert (again.written, again.skipped, again.manifest) == (0, 4, result.manifest)


def test_sharded_dump_equals_the_single_process_dump(dataset, tmp_path):
    dump_targets(label_teacher, dataset, tmp_path / "single", TEACHER, options())
    first = dump_targets(label_teacher, dataset, tmp_path / "sharded", TEACHER, options(shard=(1, 2)))
    assert (first.written, first.remaining, first.manifest) == (2, 2, None)
    last = dump_targets(label_teacher, dataset, tmp_path / "sharded", TEACHER, options(shard=(0, 2)))
    assert last.written == 2 and last.manifest is not None
    assert tree(tmp_path / "sharded") == tree(tmp_path / "single")


def test_a_directory_of_another_teacher_is_refused_unless_overwritten(dataset, tmp_path):
    out = tmp_path / "dump"
    dump_targets(label_teacher, dataset, out, TEACHER, options())
    other = replace(TEACHER, checkpoint_sha256="b" * 64)
    with pytest.raises(OccDistillError, match="other settings .*differs in teacher"):
        dump_targets(label_teacher, dataset, out, other, options())
    result = dump_targets(label_teacher, dataset, out, other, options(overwrite=True))
    assert result.written == 4 and Manifest.load(out).teacher.checkpoint_sha256 == "b" * 64


def test_each_compact_codec_is_written_on_request_checked_and_loaded(dataset, tmp_path):
    bda = np.diag([-1.0, 1.0, 1.0, 1.0])  # an x mirror: the loader decodes into its reused buffer
    decoded = {}
    for codec in compact.PROBS_CODECS:
        out = tmp_path / codec
        dump_targets(label_teacher, dataset, out, TEACHER, options(codec=codec))
        m = Manifest.load(out)
        for name in ("voxel", "bev"):
            assert m.artefacts[name].encoding == codec and m.artefacts[name].tau == compact.DEFAULT_TAUS[codec]
            assert compact.read_header((out / m.samples[0].files[name]).read_bytes())["codec"] == codec
        assert check_dump(out, dataset) == []
        targets = TeacherTargets(out, dataset)
        plain, moved = targets.load(1), targets.load(1, bda)
        torch.testing.assert_close(moved.voxel_probs, plain.voxel_probs.flip(0), rtol=0, atol=0)
        decoded[codec] = plain.voxel_probs
    # Both within their error bounds (2/255 and 2.5/255 at the default taus) of the same teacher.
    assert float((decoded["dense-u8"] - decoded["topset-u8"]).abs().max()) <= 4.5 / 255
    with pytest.raises(OccDistillError, match="other settings .*differs in artefacts"):
        dump_targets(label_teacher, dataset, tmp_path / "dense-u8", TEACHER, options(codec="topset-u8"))
    with pytest.raises(OccDistillError, match="codec 'zlib' must be one of dense-u8, topset-u8"):
        options(codec="zlib")


def test_bad_teacher_outputs_are_errors_naming_the_sample(dataset, tmp_path):
    token = dataset.frame(0).token
    cases = [
        (lambda s: TeacherPrediction(torch.zeros(24, 24, 8, 17), "logit"), r"shape \(24, 24, 8, 18\)"),
        (lambda s: TeacherPrediction(torch.full((24, 24, 8, 18), 0.5), "prob"), "value kind 'prob', the dump declares"),
        (lambda s: TeacherPrediction(torch.full((24, 24, 8, 18), float("nan")), "logit"), "NaN/inf"),
        (lambda s: TeacherPrediction(torch.zeros(24, 24, 8, 18), "logit", torch.zeros(2, 24, 24)), "BEV feature"),
    ]
    for predict, message in cases:
        with pytest.raises(DataError, match=message) as info:
            dump_targets(predict, dataset, tmp_path / "bad", TEACHER, options(overwrite=True))
        assert token in str(info.value)
    probs_teacher = replace(TEACHER, value_kind="prob")
    with pytest.raises(DataError, match="not probabilities"):
        dump_targets(lambda s: TeacherPrediction(torch.full((24, 24, 8, 18), 0.5), "prob"), dataset,
                     tmp_path / "bad2", probs_teacher, options(bev_feature_channels=None))


def test_dump_teacher_cli_runs_a_checkpoint_and_check_dump_accepts_the_result(street, tmp_path, capsys):
    from occdistill.engine.checkpoint import save_checkpoint
    from occdistill.engine.config import load_train_config
    from occdistill.models.build import build_model

    cfg = load_train_config("street-tiny", [
        f"data.root={street.out}", "data.image_aug.final_size=[32,64]", "model.dense.image_size=[32,64]",
        "model.dense.backbone.base_width=8", "model.dense.neck_channels=16", "model.dense.depth_bins=[1.0,13.0,1.0]",
        "model.dense.context_channels=8", "model.dense.depth_net_channels=16", "model.dense.bev_channels=16",
        "model.dense.grid.range=[-9.6,-9.6,-1,9.6,9.6,5.4]", "model.dense.grid.voxel_size=[0.8,0.8,0.8]",
    ])
    torch.manual_seed(0)
    ckpt = save_checkpoint(tmp_path / "run" / "checkpoints", 7, model=build_model(cfg.model), ema=None, config=cfg, state={})
    out = tmp_path / "dump"
    args = ["dump-teacher", "--checkpoint", str(tmp_path / "run"), "--split", "val", "--out", str(out),
            "--formats", "compact,seed", "--bev-feature", "--workers", "0", "--no-progress", "--device", "cpu"]
    assert main(args) == 0
    m = Manifest.load(out, "val")
    meta = json.loads((ckpt / "meta.json").read_text())
    assert m.teacher.checkpoint_sha256 == meta["sha256"]["model.safetensors"] and m.teacher.value_kind == "logit"
    assert m.artefacts["bev_feature"].shape == (16, 24, 24) and len(m.samples) == 4
    assert main(["check-dump", str(out), "--data", str(street.out), "--infos", str(street.splits["val"]),
                 "--no-progress"]) == 0
    assert "OK, 4 samples checked" in capsys.readouterr().out
    assert main(["dump-teacher", "--out", str(out)]) == 2  # no teacher given
    assert main([*args, "--shard", "1/0"]) == 2


# ----------------------------------------------------------------------------- manifest validation


def test_manifest_round_trips_and_rejects_malformed_content(dataset, tmp_path):
    out = tmp_path / "dump"
    dump_targets(label_teacher, dataset, out, TEACHER, options(formats=("compact",), bev_feature_channels=None))
    good = json.loads((out / "manifest_train.json").read_text())
    assert json.loads(json.dumps(Manifest.from_json(good, "m").to_json())) == good

    def broken(edit):
        obj = json.loads(json.dumps(good))
        edit(obj)
        return obj

    cases = [
        (lambda o: o.update(format="other"), "format 'other'"),
        (lambda o: o.update(version=99), "version 99"),
        (lambda o: o["teacher"].pop("checkpoint_sha256"), "missing field 'checkpoint_sha256'"),
        (lambda o: o["teacher"].update(value_kind="softmax"), "value_kind 'softmax'"),
        (lambda o: o["grid"].update(shape=[24, 24, 9]), "does not follow from its range"),
        (lambda o: o["classes"].update(free_index=18), "free_index 18 outside"),
        (lambda o: o["artefacts"]["voxel"].update(shape=[24, 24, 8, 17]), "does not match the grid and classes"),
        (lambda o: o["artefacts"]["voxel"].update(encoding="png"), "unknown encoding 'png'"),
        (lambda o: o["artefacts"]["voxel"].pop("tau"), "need their tau"),
        (lambda o: o["artefacts"]["voxel"].update(path="../{key}.occt"), "must be relative"),
        (lambda o: o.update(bev_rule="max"), "unknown BEV rule"),
        (lambda o: o["samples"].append(dict(o["samples"][0])), "appears twice"),
        (lambda o: o["samples"][0].update(key="../../etc"), "cannot name a file"),
        (lambda o: o["samples"][0].update(gt_sha256="abc"), "gt_sha256 must be 64 hex"),
        (lambda o: o["samples"][0]["files"].update(logits="x.npz"), "unknown artefacts"),
    ]
    for edit, message in cases:
        with pytest.raises(DataError, match=message):
            Manifest.from_json(broken(edit), "m")
    (out / "manifest_val.json").write_text("{}")
    with pytest.raises(DataError, match="several manifests"):
        Manifest.load(out)
    (out / "manifest_val.json").write_text("{not json")
    with pytest.raises(DataError, match="unreadable manifest"):
        Manifest.load(out, "val")
