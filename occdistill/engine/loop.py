"""The training loop, in one readable function (:func:`train`).

Per optimiser step::

    lr = schedule(step)
    for each of accum_steps micro-batches: forward under autocast, float32 losses, backward
        (DDP all-reduces the gradients on the last micro-batch only)
    unscale, clip the global gradient norm
    non-finite loss or gradients -> skip the update, report it, stop after max_bad_steps
    AdamW step, EMA update
    every log_every steps: JSONL record; every eval_every: evaluate; every ckpt_every: checkpoint
    (curves.png is redrawn at evaluations and checkpoints)

Resuming: a checkpoint holds weights, EMA, optimiser, gradient scaler, RNG states and the step.
The learning rate is a function of the step, the data order a function of (seed, epoch) with the
position in the epoch derived from the step, and the augmentation a function of (seed, epoch,
index). So in deterministic mode, with the same number of CPU threads, a resumed run repeats an
uninterrupted one bit for bit (tested on the CPU, with 0 loader workers before and 2 after the kill).

Run directory: ``config.yaml`` (resolved), ``log.jsonl``, ``curves.png``, ``checkpoints/``,
``eval/step_XXXXXX.json`` and, at the end, ``metrics.json``. Only rank 0 writes.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from occdistill.config import save_config, to_dict
from occdistill.data.build import Dataset
from occdistill.engine.checkpoint import (
    Checkpoint,
    load_checkpoint,
    load_weights,
    restore_rng_state,
    rng_state,
    save_checkpoint,
)
from occdistill.engine.config import TrainConfig
from occdistill.engine.data import WithPreviousFrames, label_counts, open_split, train_loader
from occdistill.engine.distributed import (
    DistContext,
    ResumableSampler,
    all_reduce_max,
    all_reduce_sum,
    broadcast_buffers,
    cpu_threads,
    init_distributed,
    resolve_device,
    shutdown_distributed,
)
from occdistill.engine.ema import ModelEMA
from occdistill.engine.evaluate import evaluate
from occdistill.engine.history import History, plot_curves, read_records
from occdistill.engine.objective import class_weights
from occdistill.engine.precision import grad_scaler
from occdistill.engine.schedule import LRSchedule
from occdistill.engine.tasks import (
    Objective,
    build_objective,
    load_image_teacher,
    load_teacher,
    takes_depth_input,
    teacher_init,
    temporal_frames,
)
from occdistill.errors import ConfigError, OccDistillError
from occdistill.io import atomic_write_json
from occdistill.models.build import build_model
from occdistill.targets.loader import TeacherTargets, WithTeacherTargets
from occdistill.targets.manifest import BEV_FEATURE, Manifest

# Settings that change nothing in the arithmetic of training: a resume may change them. (The CPU
# thread count may change float reduction order: keep runtime.threads fixed for bitwise resumes;
# with threads = 0 it follows data.workers.)
RESUME_MAY_CHANGE = ("data.workers", "runtime.progress", "runtime.eval_every", "runtime.ckpt_every",
                     "runtime.log_every", "runtime.keep_checkpoints", "runtime.eval_rayiou")


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    model: nn.Module  # the trained weights (unwrapped, on the training device)
    ema: ModelEMA | None
    metrics: dict[str, Any] | None  # final evaluation report (percent), None without a val split
    bad_steps: int
    seconds: float  # wall time of this call's training steps (evaluation excluded)


def train(cfg: TrainConfig, run_dir: str | Path, *, resume: bool = False) -> TrainResult:
    """Train ``cfg`` into ``run_dir``; ``resume`` continues from its latest checkpoint.

    Under ``torchrun`` every process calls this; the process group is created and torn down here.
    """
    ctx = init_distributed(cfg.runtime.device)
    was_deterministic, was_threads = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    try:
        torch.set_num_threads(cpu_threads(cfg.runtime.threads, cfg.data.workers))
        if cfg.runtime.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it for determinism
            torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.benchmark = False
        return _train(cfg, Path(run_dir), resume, ctx)
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
        torch.set_num_threads(was_threads)
        shutdown_distributed(ctx)


def config_differences(a: TrainConfig, b: TrainConfig) -> list[str]:
    """Dotted keys whose values differ between two configs."""

    def flat(d: dict, prefix: str = "") -> dict[str, Any]:
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    fa, fb = flat(to_dict(a)), flat(to_dict(b))
    return sorted(k for k in fa.keys() | fb.keys() if fa.get(k) != fb.get(k))


def _check_fits(cfg: TrainConfig, model: nn.Module, dataset: Dataset) -> None:
    """The model must predict the dataset's grid and classes from images of the loader's size."""
    grid, data_grid = model.grid, dataset.grid
    if grid.shape != data_grid.shape or not np.allclose(grid.range, data_grid.range):
        raise ConfigError(
            f"model grid {grid.range} {grid.shape} does not match the dataset grid {data_grid.range} {data_grid.shape}"
        )
    num_classes = cfg.model.selected.num_classes
    if num_classes != dataset.classes.num_classes:
        raise ConfigError(
            f"model num_classes={num_classes}, the {dataset.classes.name} labels have {dataset.classes.num_classes}"
        )
    image_size, final_size = tuple(cfg.model.selected.image_size), tuple(cfg.data.image_aug.final_size)
    if image_size != final_size:
        raise ConfigError(f"model image_size {image_size} != data.image_aug.final_size {final_size}")


def _training_data(cfg: TrainConfig, train_set: Dataset, frames: int) -> tuple[Any, int | None]:
    """(dataset the loader reads, C of the dump's BEV feature or None): the training split itself,
    with the ``frames`` earlier keyframes of every sample (temporal models), or paired with the
    teacher dump of ``distill.dump`` (verified against its manifest: keys, grid, classes and, per
    sample on first read, the GT hash)."""
    d = cfg.distill
    if frames and d.dump:
        raise ConfigError("distill.dump with a temporal student (model.dense.temporal_frames > 0) is not supported "
                          "yet; distil online (distill.checkpoint) or train without temporal fusion")
    if frames:
        return WithPreviousFrames(train_set, frames), None
    if not d.dump:
        return train_set, None
    dump = Path(d.dump)
    split = "train" if Manifest.path_for(dump, "train").is_file() else None
    feature = d.dense.lambda_feat > 0 and d.dense.mfd_target == "feature"
    targets = TeacherTargets(dump, train_set, split, source=d.dump_source, with_bev_feature=feature)
    channels = targets.manifest.artefacts[BEV_FEATURE].shape[0] if feature else None
    return WithTeacherTargets(train_set, targets), channels


def _restore(ckpt: Checkpoint, objective: Objective, ema: ModelEMA | None, optimizer: torch.optim.Optimizer,
             scaler: torch.amp.GradScaler) -> tuple[int, int]:
    """Load a checkpoint's training state; returns (step, bad steps so far)."""
    load_weights(objective.model, ckpt.weights, ckpt.path)
    load_weights(objective.adapters, ckpt.state.get("adapters", {}), ckpt.path / "state.pt (adapters)")
    if ema is not None:
        load_weights(ema.module, ckpt.ema_weights, ckpt.path)
        ema.updates = ckpt.state["ema_updates"]
    optimizer.load_state_dict(ckpt.state["optimizer"])
    scaler.load_state_dict(ckpt.state["scaler"])
    restore_rng_state(ckpt.state["rng"])
    return ckpt.step, ckpt.state["bad_steps"]


class _LossWindow:
    """Loss terms and step times summed between two log records (good steps only)."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.steps, self.seconds = 0, 0.0

    def add(self, terms: dict[str, float], seconds: float) -> None:
        for k, v in terms.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.steps += 1
        self.seconds += seconds

    def record(self, ctx: DistContext, device: torch.device, samples_per_step: int) -> dict[str, float] | None:
        """Means over this window and every rank (a collective: all ranks call it), then reset."""
        packed = torch.tensor([self.steps, self.seconds, *self.sums.values()], dtype=torch.float64, device=device)
        steps, seconds, *sums = all_reduce_sum(packed, ctx).tolist()  # x ranks
        names = list(self.sums)
        self.__init__()
        if steps == 0:
            return None
        means = {k: v / steps for k, v in zip(names, sums)}
        rate = steps * samples_per_step / (seconds / ctx.world_size)
        return {"loss": means.pop("total"), **means, "samples_per_s": rate, "step_seconds": seconds / steps}


def _train(cfg: TrainConfig, run_dir: Path, resume: bool, ctx: DistContext) -> TrainResult:
    rt, opt = cfg.runtime, cfg.optim
    device = resolve_device(rt.device, ctx)
    ckpt_root = run_dir / "checkpoints"
    ckpt = None
    if resume:
        ckpt = load_checkpoint(run_dir, with_state=True)
        changed = [k for k in config_differences(ckpt.config, cfg) if k not in RESUME_MAY_CHANGE]
        if changed:
            raise ConfigError(f"{run_dir}: cannot resume with a different config (changed: {', '.join(changed)})")
        if ckpt.state["world_size"] != ctx.world_size:
            saved = ckpt.state["world_size"]
            raise ConfigError(f"{ckpt.path}: saved with {saved} processes, resuming with {ctx.world_size}")
    elif (ckpt_root / "latest.json").exists():
        raise OccDistillError(f"{run_dir}: already holds a training run; use --resume to continue it, or another --out")

    # --- data, model, teacher, objective, optimiser ----------------------------------------------
    torch.manual_seed(rt.seed)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    model = build_model(cfg.model)
    depth_input = takes_depth_input(model)
    train_set = open_split(cfg.data, "train", augment=True, grid=model.grid, seed=rt.seed, depth_input=depth_input)
    val_set = (open_split(cfg.data, "val", augment=False, grid=model.grid, depth_input=depth_input)
               if cfg.data.val_split else None)
    train_data, dump_channels = _training_data(cfg, train_set, temporal_frames(model))
    _check_fits(cfg, model, train_set)
    if rt.sync_bn and ctx.distributed and device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    weights = None
    if cfg.loss.class_weights != "none" and cfg.model.kind != "sparse":  # sparse: loss.sparse.class_weights
        counts = label_counts(train_set, cfg.loss.camera_mask)
        weights = class_weights(counts, cfg.loss.class_weights, cfg.loss.class_weight_exponent)
    objective = build_objective(model, cfg.loss, cfg.distill, train_set.classes, amp=rt.amp, seed=rt.seed,
                                class_weights=weights, teacher=load_teacher(cfg.distill, model),
                                dump_feature_channels=dump_channels,
                                image_teacher=load_image_teacher(cfg.distill, model))
    if ckpt is None and cfg.distill.teacher_guided_init:
        init_report = teacher_init(objective, cfg.distill)  # before the EMA copies the weights
        if ctx.is_main and rt.progress:
            tqdm.write(f"occdistill train: {init_report}", file=sys.stderr)
    objective.to(device)
    ema = ModelEMA(model, rt.ema_decay, rt.ema_ramp_steps) if rt.ema_decay > 0 else None
    params = objective.trainable_parameters()
    optimizer = torch.optim.AdamW(params, lr=opt.lr, betas=opt.betas, weight_decay=opt.weight_decay)
    scaler = grad_scaler(device, rt.amp)

    sampler = ResumableSampler(train_data, ctx, rt.seed)
    micro = opt.accum_steps
    steps_per_epoch = sampler.shard_size // (cfg.data.batch_size * micro)
    if steps_per_epoch == 0:
        raise ConfigError(
            f"{len(train_set)} training samples cannot fill one step of {ctx.world_size} process(es) x "
            f"batch_size {cfg.data.batch_size} x accum_steps {micro}"
        )
    total_steps = opt.max_steps or opt.epochs * steps_per_epoch
    schedule = LRSchedule(opt.lr, total_steps, opt.warmup_steps, opt.warmup_ratio, opt.schedule, opt.min_lr_ratio)

    step, bad_steps = (0, 0) if ckpt is None else _restore(ckpt, objective, ema, optimizer, scaler)

    history = None
    if ctx.is_main:
        save_config(cfg, run_dir / "config.yaml")
        history = History(run_dir / "log.jsonl", resume_step=step if ckpt is not None else None)
    train_step: nn.Module = objective
    if ctx.distributed:
        train_step = DistributedDataParallel(objective, device_ids=[device.index] if device.type == "cuda" else None)

    def checkpoint() -> None:
        broadcast_buffers(model, ctx)
        if ctx.is_main and not (ckpt_root / f"step_{step:06d}").exists():
            state = {"bad_steps": bad_steps, "world_size": ctx.world_size, "optimizer": optimizer.state_dict(),
                     "scaler": scaler.state_dict(), "rng": rng_state(), "ema_updates": ema.updates if ema else 0,
                     "adapters": objective.adapters.state_dict()}
            save_checkpoint(ckpt_root, step, model=model, ema=ema.module if ema else None, config=cfg,
                            state=state, keep=rt.keep_checkpoints)
            plot_curves(read_records(history.path), run_dir / "curves.png", title=run_dir.name)

    def validate() -> dict[str, Any]:
        eval_model = ema.module if ema is not None else model
        broadcast_buffers(eval_model, ctx)
        report = evaluate(eval_model, val_set, device, ctx=ctx, batch_size=cfg.data.val_batch_size,
                          workers=cfg.data.workers, rayiou=rt.eval_rayiou, amp=rt.amp, progress=rt.progress)
        if ctx.is_main:
            atomic_write_json(run_dir / "eval" / f"step_{step:06d}.json", {"step": step, **report})
            history.write({"type": "eval", "step": step, **{k: report[k] for k in ("mIoU", "IoU", "RayIoU")}})
            plot_curves(read_records(history.path), run_dir / "curves.png", title=run_dir.name)
        return report

    # --- the loop ---------------------------------------------------------------------------------
    bar = tqdm(total=total_steps, initial=step, desc="train", unit="step", file=sys.stderr, dynamic_ncols=True,
               disable=not (rt.progress and ctx.is_main))
    window = _LossWindow()
    train_seconds = 0.0  # time in training steps (evaluation and checkpoints excluded)
    report = None
    while step < total_steps:
        epoch, in_epoch = divmod(step, steps_per_epoch)
        # Start this rank's shard where the interrupted epoch stopped; every later epoch starts at 0.
        sampler.set_epoch(epoch, skip=in_epoch * micro * cfg.data.batch_size)
        batches = iter(train_loader(train_data, sampler, cfg.data, rt.seed, epoch))
        for _ in range(in_epoch, min(steps_per_epoch, in_epoch + total_steps - step)):
            step_start = time.perf_counter()
            lr = schedule(step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            terms: dict[str, torch.Tensor] = {}
            for m in range(micro):
                item = next(batches).to(device, non_blocking=True)
                # DDP all-reduces gradients in backward; only the last micro-batch needs to.
                sync = contextlib.nullcontext() if not ctx.distributed or m == micro - 1 else train_step.no_sync()
                with sync:
                    losses = train_step(item, step)
                    scaler.scale(losses["total"] / micro).backward()
                for k, v in losses.items():
                    terms[k] = terms.get(k, 0.0) + v.detach() / micro
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, opt.grad_clip or math.inf)

            # Non-finite guard. fp16 overflow of the gradients is the scaler's business (it skips
            # the step and lowers the scale); a non-finite loss, or non-finite gradients without a
            # scaler, means the step is bad. All ranks decide together.
            names = [*terms, "grad_norm"]
            values = torch.stack([*terms.values(), grad_norm.detach().float()]).tolist()
            loss_ok, grads_ok = all(math.isfinite(v) for v in values[:-1]), math.isfinite(values[-1])
            bad = not loss_ok or (not grads_ok and not scaler.is_enabled())
            bad = bool(all_reduce_max(torch.tensor([int(bad)], device=device), ctx))
            if bad:
                bad_steps += 1
                culprits = [k for k, v in zip(names, values) if not math.isfinite(v)] or ["values on another rank"]
                message = f"step {step}: non-finite {', '.join(culprits)}; update skipped ({bad_steps} so far)"
                if ctx.is_main:
                    tqdm.write(f"occdistill train: {message}", file=sys.stderr)
                    history.write({"type": "bad_step", "step": step, "message": message})
                if bad_steps > rt.max_bad_steps:
                    raise OccDistillError(f"training stopped at step {step}: {bad_steps} non-finite steps "
                                          f"(runtime.max_bad_steps={rt.max_bad_steps})")
            else:
                scaler.step(optimizer)  # fp16 with overflowing gradients: skipped by the scaler
                if ema is not None:
                    ema.update(model)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            seconds = time.perf_counter() - step_start
            train_seconds += seconds
            if not bad and grads_ok:
                window.add(dict(zip(names, values)), seconds)
            bar.update(1)
            bar.set_postfix({**{k: f"{v:.3g}" for k, v in zip(names[:-1], values)}, "lr": f"{lr:.2e}"}, refresh=False)

            if step % rt.log_every == 0 or step == total_steps:
                means = window.record(ctx, device, cfg.data.batch_size * micro)
                if ctx.is_main and means is not None:
                    history.write({"type": "train", "step": step, "epoch": epoch, "lr": lr, **means})
            if rt.ckpt_every and step % rt.ckpt_every == 0 and step < total_steps:
                checkpoint()
            if val_set is not None and rt.eval_every and step % rt.eval_every == 0 and step < total_steps:
                report = validate()
    bar.close()

    checkpoint()
    if val_set is not None:
        report = validate()
    broadcast_buffers(model, ctx)
    if ctx.is_main:
        summary = {"step": step, "bad_steps": bad_steps, "train_seconds": train_seconds,
                   "weights": "ema" if ema else "model", "metrics": report}
        atomic_write_json(run_dir / "metrics.json", summary)
        history.close()
    return TrainResult(run_dir=run_dir, step=step, model=model, ema=ema, metrics=report, bad_steps=bad_steps,
                       seconds=train_seconds)
