"""The training loop on a tiny synthetic street: it learns (one-batch overfit), a killed and resumed
run equals an uninterrupted one bit for bit, bad steps are skipped and reported, and two gloo
processes hold identical weights after a step."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from occdistill.data.synth import generate
from occdistill.engine.config import TrainConfig, load_train_config
from occdistill.engine.data import open_split
from occdistill.engine.evaluate import evaluate
from occdistill.engine.history import read_records
from occdistill.engine.loop import train
from occdistill.errors import ConfigError, OccDistillError
from occdistill.models.build import build_model

# Two 64x36 cameras and a 24x24x8 grid at 0.8 m: a world that renders and trains in seconds.
SYNTH = [
    "rig.width=64", "rig.height=36", "rig.cameras=[CAM_FRONT,CAM_BACK]", "lidar.azimuths=256",
    "grid.range=[-9.6,-9.6,-1,9.6,9.6,5.4]", "grid.voxel_size=[0.8,0.8,0.8]",
]
# street-tiny shrunk to that world.
TINY = [
    "data.image_aug.final_size=[32,64]", "model.dense.image_size=[32,64]",
    "model.dense.backbone.base_width=8", "model.dense.neck_channels=16", "model.dense.depth_bins=[1.0,13.0,1.0]",
    "model.dense.context_channels=8", "model.dense.depth_net_channels=16", "model.dense.bev_channels=16",
    "model.dense.grid.range=[-9.6,-9.6,-1,9.6,9.6,5.4]", "model.dense.grid.voxel_size=[0.8,0.8,0.8]",
    "data.workers=0", "runtime.progress=false", "runtime.log_every=1",
]
NO_AUG = ["data.image_aug.resize_range=[1,1]", "data.image_aug.flip_prob=0", "data.image_aug.rotate_range_deg=[0,0]",
          "data.bev_aug.flip_x_prob=0", "data.bev_aug.flip_y_prob=0"]


@pytest.fixture(scope="module")
def street(tmp_path_factory) -> Path:
    """3 scenes x 4 frames: 8 training frames (2 scenes), 4 validation frames."""
    return generate("street", tmp_path_factory.mktemp("street"), 3, 4, seed=0, overrides=SYNTH, progress=False).out


@pytest.fixture(scope="module")
def one_frame(tmp_path_factory) -> Path:
    """1 scene x 1 frame, in both splits."""
    return generate("street", tmp_path_factory.mktemp("one"), 1, 1, seed=1, overrides=SYNTH, progress=False).out


def weights_digest(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 over names and raw bytes: equal digests mean bitwise-equal weights."""
    digest = hashlib.sha256()
    for name, t in sorted(state.items()):
        digest.update(name.encode() + t.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def tiny(root: Path, *overrides: str) -> TrainConfig:
    return load_train_config("street-tiny", [f"data.root={root}", *TINY, *overrides])


def test_overfitting_one_batch_lowers_the_loss_and_raises_its_miou(one_frame, tmp_path):
    cfg = tiny(one_frame, *NO_AUG, "data.batch_size=1", "optim.max_steps=60", "optim.lr=5.0e-3", "optim.warmup_steps=0",
               "optim.schedule=constant", "runtime.ema_decay=0", "runtime.eval_rayiou=false")
    torch.manual_seed(cfg.runtime.seed)  # the loop's initial weights
    untrained = evaluate(build_model(cfg.model), open_split(cfg.data, "val", augment=False), torch.device("cpu"),
                         rayiou=False)
    result = train(cfg, tmp_path / "run")
    losses = [r["ce"] for r in read_records(tmp_path / "run" / "log.jsonl") if r["type"] == "train"]
    assert losses[-1] < 0.3 * losses[0], losses
    assert result.metrics["mIoU"] > untrained["mIoU"] + 25, (untrained["mIoU"], result.metrics["mIoU"])
    assert result.metrics["IoU"] > 50
    assert (tmp_path / "run" / "curves.png").stat().st_size > 10_000
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["metrics"]["mIoU"] == result.metrics["mIoU"]


class _Killed(Exception):
    pass


def test_kill_and_resume_equals_an_uninterrupted_run_bitwise(street, tmp_path, monkeypatch):
    # Augmentation, EMA, accumulation and a mid-epoch kill between two checkpoints: 8 frames at
    # batch 1 x 2 micro-batches = 4 steps per epoch, 6 steps, checkpoints at steps 2 and 4.
    args = ["data.batch_size=1", "optim.accum_steps=2", "optim.max_steps=6", "optim.warmup_steps=2",
            "runtime.deterministic=true", "runtime.threads=1", "runtime.ckpt_every=2", "runtime.keep_checkpoints=5",
            "runtime.ema_decay=0.9", "runtime.ema_ramp_steps=2", "runtime.eval_rayiou=false"]
    full = train(tiny(street, *args), tmp_path / "full")

    import occdistill.engine.tasks as tasks

    calls = {"n": 0}
    real_losses = tasks.supervised_losses

    def dies_in_step_4(*a, **kw):  # micro-batch 7 = first half of step 4 (0-based 3)
        calls["n"] += 1
        if calls["n"] == 7:
            raise _Killed
        return real_losses(*a, **kw)

    monkeypatch.setattr(tasks, "supervised_losses", dies_in_step_4)
    with pytest.raises(_Killed):
        train(tiny(street, *args), tmp_path / "resumed")
    monkeypatch.setattr(tasks, "supervised_losses", real_losses)
    assert json.loads((tmp_path / "resumed" / "checkpoints" / "latest.json").read_text())["step"] == 2
    # The resumed half loads with 2 worker processes: the sample stream must not depend on it.
    resumed = train(tiny(street, *args, "data.workers=2"), tmp_path / "resumed", resume=True)

    assert resumed.step == full.step == 6
    for name in ("model.safetensors", "ema.safetensors"):
        a, b = (weights_digest(load_file(tmp_path / run / "checkpoints" / "step_000006" / name))
                for run in ("full", "resumed"))
        assert a == b, name
    logs = [[(r["step"], r["loss"]) for r in read_records(tmp_path / run / "log.jsonl") if r["type"] == "train"]
            for run in ("full", "resumed")]
    assert logs[0] == logs[1] and [s for s, _ in logs[0]] == [1, 2, 3, 4, 5, 6]
    assert resumed.metrics == full.metrics


def test_resume_refuses_a_changed_config_and_a_fresh_run_refuses_an_old_directory(street, tmp_path):
    cfg = tiny(street, "optim.max_steps=1", "data.val_split=")
    train(cfg, tmp_path / "run")
    with pytest.raises(OccDistillError, match="already holds a training run"):
        train(cfg, tmp_path / "run")
    with pytest.raises(ConfigError, match="changed: optim.lr"):
        train(tiny(street, "optim.max_steps=1", "data.val_split=", "optim.lr=1.0e-2"), tmp_path / "run", resume=True)


def test_non_finite_steps_are_skipped_reported_and_stop_training_when_too_many(street, tmp_path, monkeypatch):
    import occdistill.engine.tasks as tasks

    real_losses = tasks.supervised_losses
    calls = {"n": 0}

    def nan_on_calls_2_and_3(*a, **kw):
        calls["n"] += 1
        terms = real_losses(*a, **kw)
        if calls["n"] in (2, 3):
            terms["total"] = terms["total"] * float("nan")
        return terms

    monkeypatch.setattr(tasks, "supervised_losses", nan_on_calls_2_and_3)
    cfg = tiny(street, "data.batch_size=2", "optim.max_steps=4", "data.val_split=", "runtime.ema_decay=0")
    result = train(cfg, tmp_path / "ok")
    assert result.bad_steps == 2 and result.step == 4
    bad = [r for r in read_records(tmp_path / "ok" / "log.jsonl") if r["type"] == "bad_step"]
    assert [r["step"] for r in bad] == [1, 2] and "non-finite total" in bad[0]["message"]
    assert all(torch.isfinite(p).all() for p in result.model.parameters())

    calls["n"] = 0
    with pytest.raises(OccDistillError, match="training stopped at step 2: 2 non-finite steps"):
        train(tiny(street, "data.batch_size=2", "optim.max_steps=4", "data.val_split=", "runtime.max_bad_steps=1"),
              tmp_path / "stopped")


DDP_WORKER = textwrap.dedent(
    """
    import hashlib, os, sys
    import torch
    from occdistill.engine.config import load_train_config
    from occdistill.engine.loop import train

    out, *overrides = sys.argv[1:]
    result = train(load_train_config("street-tiny", overrides), out)
    digest = hashlib.sha256()
    for name, t in sorted(result.model.state_dict().items()):
        digest.update(name.encode() + t.detach().cpu().contiguous().numpy().tobytes())
    with open(os.path.join(out, f"rank{os.environ['RANK']}.sha256"), "w") as f:
        f.write(digest.hexdigest())
    """
)


def test_two_gloo_processes_hold_identical_weights_after_training(street, tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(DDP_WORKER)
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(script), str(run), f"data.root={street}", *TINY, "data.batch_size=2", "optim.max_steps=2",
           "runtime.eval_rayiou=false", "runtime.device=cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    hashes = [(run / f"rank{r}.sha256").read_text() for r in (0, 1)]
    assert hashes[0] == hashes[1]
    # Rank 0 alone wrote the run; the step consumed 2 processes x batch 2 = 4 of the 8 frames.
    records = [r for r in read_records(run / "log.jsonl") if r["type"] == "train"]
    assert [r["step"] for r in records] == [1, 2]
    assert weights_digest(load_file(run / "checkpoints" / "step_000002" / "model.safetensors")) == hashes[0]
    assert json.loads((run / "metrics.json").read_text())["metrics"]["num_samples"] == 4


def test_mixed_precision_with_the_gradient_scaler_trains(street, tmp_path):
    # fp16 autocast + GradScaler (CPU autocast here; the same code path runs on CUDA). Early
    # steps may overflow: the scaler skips them, which is not a bad step.
    result = train(tiny(street, "optim.max_steps=2", "data.batch_size=1", "data.val_split=", "runtime.amp=fp16"),
                   tmp_path / "amp")
    assert result.step == 2 and result.bad_steps == 0
    records = [r for r in read_records(tmp_path / "amp" / "log.jsonl") if r["type"] == "train"]
    assert records and all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in result.model.parameters())
