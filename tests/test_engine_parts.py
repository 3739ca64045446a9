"""Engine parts without a training run: schedule, EMA, class weights, configs, checkpoints."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch
from torch import nn

from occdistill.engine.checkpoint import (
    find_checkpoint,
    load_checkpoint,
    load_weights,
    restore_rng_state,
    rng_state,
    save_checkpoint,
)
from occdistill.engine.config import TrainConfig, builtin_configs, load_train_config
from occdistill.engine.ema import ModelEMA
from occdistill.engine.objective import class_weights
from occdistill.engine.schedule import LRSchedule
from occdistill.errors import ConfigError, OccDistillError
from occdistill.models.build import MODEL_KINDS, ModelConfig, build_model


def test_schedule_warms_up_linearly_then_follows_the_cosine_to_its_floor():
    s = LRSchedule(base_lr=1.0, total_steps=110, warmup_steps=10, warmup_ratio=0.1, kind="cosine", min_lr_ratio=0.2)
    assert s(0) == pytest.approx(0.1) and s(5) == pytest.approx(0.55) and s(10) == pytest.approx(1.0)
    assert s(60) == pytest.approx(0.6)  # half way down the cosine: 0.2 + 0.8 / 2
    assert s(110) == pytest.approx(0.2) and s(500) == pytest.approx(0.2)
    assert all(s(i) >= s(i + 1) for i in range(10, 120))
    flat = LRSchedule(base_lr=1e-4, total_steps=100, warmup_steps=200, warmup_ratio=1e-3, kind="constant")
    assert flat(0) == pytest.approx(1e-7) and flat(200) == flat(10_000) == 1e-4


def test_ema_ramps_its_decay_and_averages_parameters_and_buffers():
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    ema = ModelEMA(model, decay=0.9, ramp_steps=10)
    start = [p.clone() for p in ema.module.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
        model[1].running_mean.fill_(4.0)
    ema.update(model)
    d = 0.9 * (1 - math.exp(-1 / 10))
    for s, p in zip(start, ema.module.parameters()):
        torch.testing.assert_close(p, d * s + (1 - d) * (s + 1.0))
    torch.testing.assert_close(ema.module[1].running_mean, torch.full((2,), (1 - d) * 4.0))
    assert not any(p.requires_grad for p in ema.module.parameters()) and not ema.module.training


def test_class_weights():
    counts = np.array([100, 10_000, 0, 1_000_000])
    assert class_weights(counts, "none") is None
    inv_sqrt = class_weights(counts, "inverse_frequency", 0.5)
    assert inv_sqrt[2] == 0 and inv_sqrt[0] > inv_sqrt[1] > inv_sqrt[3]
    assert inv_sqrt[[0, 1, 3]].mean().item() == pytest.approx(1.0)
    assert (inv_sqrt[0] / inv_sqrt[3]).item() == pytest.approx(100.0)  # sqrt of the count ratio
    assert torch.equal(class_weights(counts, "inverse_frequency", 0.0), torch.tensor([1.0, 1.0, 0.0, 1.0]))
    inv_log = class_weights(counts, "inverse_log")  # FlashOcc class_balance
    assert inv_log[3].item() == pytest.approx(1 / math.log(1_000_000.001), rel=1e-6)
    assert torch.isfinite(inv_log).all() and inv_log[2] == inv_log.max()


def test_builtin_configs_load_and_match_their_models():
    assert {"flashocc-m0", "flashocc-m1", "street-tiny"} <= set(builtin_configs())
    m0, m1 = load_train_config("flashocc-m0"), load_train_config("flashocc-m1")
    for cfg, bins, bev in ((m0, 44, 128), (m1, 88, 256)):
        dense = cfg.model.dense
        assert dense.image_size == cfg.data.image_aug.final_size == (256, 704)
        assert dense.backbone.depth == 50 and dense.context_channels == 64 and dense.bev_channels == bev
        assert round((dense.depth_bins[1] - dense.depth_bins[0]) / dense.depth_bins[2]) == bins
        assert dense.grid.voxel_grid().shape == (200, 200, 16)
        optim = cfg.optim
        assert (optim.lr, optim.weight_decay, optim.grad_clip, optim.warmup_steps) == (1e-4, 1e-2, 5.0, 200)
        assert cfg.loss.camera_mask and cfg.loss.class_weights == "none" and cfg.loss.depth_weight == 0


def test_street_gaussian_teacher_reads_the_students_input_and_grid():
    """A teacher of street-tiny: same data section (images, augmentation, splits), same network input
    and voxel grid, so that dumps and online distillation pair it with the student frame by frame."""
    teacher, student = load_train_config("street-gaussian-teacher"), load_train_config("street-tiny")
    assert teacher.model.kind == "gaussian" and teacher.data == student.data
    gaussian, dense = teacher.model.gaussian, student.model.dense
    assert gaussian.image_size == dense.image_size == teacher.data.image_aug.final_size
    assert gaussian.grid.voxel_grid() == dense.grid.voxel_grid()
    assert gaussian.num_classes == dense.num_classes


@pytest.mark.parametrize(
    "name, overrides, message",
    [
        ("street-tiny", ["optim.lrr=1"], "unknown config key 'optim.lrr'; did you mean 'lr'?"),
        ("street-tiny", ["model.kind=diffusion"], "model.kind"),
        ("street-tiny", ["optim.accum_steps=0"], "accum_steps"),
        ("no-such-config", [], "no-such-config: no such config file or built-in config (built-in: "),
    ],
)
def test_bad_configs_are_config_errors(name, overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("?", r"\?")):
        load_train_config(name, overrides)


def tiny_model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1))


def save(root, step, model, **kw):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.rand(2, 3, 5, 5)).sum().backward()
    opt.step()
    state = {"optimizer": opt.state_dict(), "rng": rng_state(), "bad_steps": 0, "world_size": 1}
    return save_checkpoint(root, step, model=model, ema=None, config=TrainConfig(), state=state, **kw)


def test_checkpoint_round_trip_latest_pointer_and_pruning(tmp_path):
    model = tiny_model()
    root = tmp_path / "run" / "checkpoints"
    for step in (10, 20, 30):
        save(root, step, model, keep=2)
    assert sorted(p.name for p in root.glob("step_*")) == ["step_000020", "step_000030"]
    assert not list(root.glob(".*"))  # no temporary leftovers
    assert find_checkpoint(tmp_path / "run") == find_checkpoint(root) == root / "step_000030"
    ckpt = load_checkpoint(tmp_path / "run", with_state=True)
    assert ckpt.step == 30 and ckpt.config == TrainConfig() and ckpt.ema_weights is None
    fresh = tiny_model()
    load_weights(fresh, ckpt.weights, ckpt.path)
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values()):
        assert torch.equal(a, b)
    assert ckpt.state["optimizer"]["state"][0]["exp_avg"].shape == model[0].weight.shape


def test_rng_state_round_trip():
    state = rng_state()
    draws = (random.random(), np.random.rand(), torch.rand(1).item())
    restore_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == draws


def test_bad_checkpoints_give_one_line_errors_naming_the_file(tmp_path):
    with pytest.raises(OccDistillError, match="nowhere: checkpoint not found"):
        load_checkpoint(tmp_path / "nowhere")
    with pytest.raises(OccDistillError, match="not a checkpoint directory"):
        load_checkpoint(tmp_path)
    ckpt = save(tmp_path / "checkpoints", 5, tiny_model())
    weights = ckpt / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(OccDistillError, match="model.safetensors: checksum mismatch"):
        load_checkpoint(ckpt)
    weights.unlink()
    with pytest.raises(OccDistillError, match="model.safetensors: missing"):
        load_checkpoint(tmp_path)
    (ckpt / "meta.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(OccDistillError, match="meta.json: not an occdistill checkpoint"):
        load_checkpoint(ckpt)
    good = load_checkpoint(save(tmp_path / "other", 1, tiny_model()))
    with pytest.raises(OccDistillError, match="weights do not fit the model"):
        load_weights(nn.Linear(2, 2), good.weights, good.path)


def test_model_kind_table_builds_the_configured_model():
    # flashocc-m0 as configured (its CPU forward/backward is in benchmarks/train_street_tiny.py)
    cfg = load_train_config("flashocc-m0").model
    model = build_model(cfg)
    assert type(model) is MODEL_KINDS[cfg.kind][1] and isinstance(cfg, ModelConfig)
    assert model.grid.shape == (200, 200, 16) and model.view_transform.depth_bins.num_bins == 44
    assert 39e6 < sum(p.numel() for p in model.parameters()) < 45e6  # FlashOcc M0: 39.94M
