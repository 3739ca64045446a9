"""``occdistill train`` and ``occdistill eval`` end to end on a tiny synthetic street, and their
one-line errors for bad configs, data and checkpoints."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from occdistill.cli.main import main
from occdistill.data.synth import generate

SYNTH = [
    "rig.width=64", "rig.height=36", "rig.cameras=[CAM_FRONT,CAM_BACK]", "lidar.azimuths=256",
    "grid.range=[-9.6,-9.6,-1,9.6,9.6,5.4]", "grid.voxel_size=[0.8,0.8,0.8]",
]
TINY = [
    "data.image_aug.final_size=[32,64]", "model.dense.image_size=[32,64]",
    "model.dense.backbone.base_width=8", "model.dense.neck_channels=16", "model.dense.depth_bins=[1.0,13.0,1.0]",
    "model.dense.context_channels=8", "model.dense.depth_net_channels=16", "model.dense.bev_channels=16",
    "model.dense.grid.range=[-9.6,-9.6,-1,9.6,9.6,5.4]", "model.dense.grid.voxel_size=[0.8,0.8,0.8]",
    "data.workers=0", "runtime.progress=false",
]


@pytest.fixture(scope="module")
def street(tmp_path_factory) -> Path:
    return generate("street", tmp_path_factory.mktemp("street"), 2, 2, seed=2, overrides=SYNTH, progress=False).out


@pytest.fixture(scope="module")
def trained(street, tmp_path_factory) -> Path:
    """A 3-step run through the real console entry point."""
    run = tmp_path_factory.mktemp("runs") / "tiny"
    res = subprocess.run(
        [sys.executable, "-m", "occdistill", "train", "street-tiny", f"data.root={street}", *TINY,
         "optim.max_steps=3", "--out", str(run)],
        capture_output=True, text=True, timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "mIoU" in res.stdout and f"run: {run}" in res.stdout
    return run


def test_train_writes_the_run_directory(trained):
    assert (trained / "config.yaml").is_file() and (trained / "curves.png").is_file()
    assert (trained / "checkpoints" / "step_000003" / "model.safetensors").is_file()
    metrics = json.loads((trained / "metrics.json").read_text())
    assert metrics["step"] == 3 and metrics["weights"] == "ema" and metrics["metrics"]["RayIoU"] is not None
    kinds = [json.loads(line)["type"] for line in (trained / "log.jsonl").read_text().splitlines()]
    assert kinds.count("train") == 1 and kinds[-1] == "eval"


def test_eval_reports_and_saves_predictions_that_score_identically(trained, street, tmp_path, capsys):
    out, preds = tmp_path / "eval.json", tmp_path / "preds"
    args = ["--checkpoint", str(trained), "--json", str(out), "--save-pred", str(preds), "--workers", "0"]
    assert main(["eval", *args]) == 0
    report = json.loads(out.read_text())
    assert report["step"] == 3 and report["weights"] == "ema" and report["num_samples"] == 2
    assert set(report["per_class"]) and report["mIoU"] is not None and report["RayIoU"] is not None
    files = sorted(preds.glob("*.npz"))
    assert len(files) == 2
    with np.load(files[0]) as npz:
        assert npz["semantics"].dtype == np.uint8 and npz["semantics"].shape == (24, 24, 8)
    scored = tmp_path / "score.json"
    assert main(["score", "--format", "occ3d", "--data-root", str(street), "--infos",
                 str(street / "occdistill_infos_val.pkl"), "--pred", str(preds), "--json", str(scored)]) == 0
    rescored = json.loads(scored.read_text())
    for key in ("mIoU", "IoU", "RayIoU", "per_class"):
        assert rescored[key] == report[key], key
    assert "mIoU" in capsys.readouterr().out


def test_resume_of_a_finished_run_only_re_evaluates(trained, capsys):
    assert main(["train", "--resume", "--out", str(trained)]) == 0
    assert "step 3" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, message",
    [
        (["eval", "--checkpoint", "{tmp}/nowhere", "--json", "{tmp}/x.json"], "nowhere: checkpoint not found"),
        (["eval", "--checkpoint", "{tmp}"], "not a checkpoint directory (no meta.json)"),
        (["train", "{tmp}/missing.yaml"], "missing.yaml: no such config file or built-in config"),
        (["train", "street-tiny", "optim.lrr=1"], "unknown config key 'optim.lrr'; did you mean 'lr'?"),
        (["train", "street-tiny", "data.root={tmp}/no-data", "--out", "{tmp}/r"], "no-data: data root not found"),
        (["train", "--resume", "--out", "{tmp}/empty"], "config.yaml: not found"),
        (["train"], "give a CONFIG"),
    ],
)
def test_bad_input_is_one_line_with_status_2(tmp_path, capsys, args, message):
    assert main([a.format(tmp=tmp_path) for a in args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_training_into_an_existing_run_needs_resume(trained, street, capsys):
    assert main(["train", "street-tiny", f"data.root={street}", *TINY, "optim.max_steps=3", "--out", str(trained)]) == 2
    assert "already holds a training run; use --resume" in capsys.readouterr().err


def test_list_shows_the_builtin_configs(capsys):
    assert main(["train", "--list"]) == 0
    assert {"flashocc-m0", "flashocc-m1", "street-tiny"} <= set(capsys.readouterr().out.split())
