"""The demo's teacher and distillation stage on the street world, and its report section.

The dense teacher (``street-teacher``) trains on the street train split; ``occdistill dump-teacher``
writes its targets for that split (eval mode, no_grad, EMA weights) in the compact format, the seed
fp16 format beside it (only to measure what the compact one saves) and its BEV feature (the MFD
target); ``occdistill check-dump`` validates the dump against the dataset (a problem stops the demo);
the distilled student trains with the plain student's config, seed and budget plus the MFD + CWD
losses on those targets. Teacher, plain and distilled student are then compared on the val split and
timed at batch 1 on the same input in this run.
"""

from __future__ import annotations

import json
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from occdistill.data.build import open_dataset
from occdistill.data.synth import SynthResult
from occdistill.deploy.bench import dataset_inputs, interleaved_benchmark, load_bench_model, open_bench_dataset
from occdistill.distill.recipe import MFD_CWD_COMMON
from occdistill.engine.checkpoint import EMA_WEIGHTS, META, WEIGHTS, find_checkpoint
from occdistill.errors import OccDistillError
from occdistill.pipeline.markdown import ms_cell, pct
from occdistill.pipeline.student import BENCH_WARMUP, StudentResult, demo_train_config, train_resumed
from occdistill.targets.check import check_dump
from occdistill.targets.checkpoint_dump import dump_checkpoint
from occdistill.targets.dump import DumpOptions
from occdistill.targets.manifest import BEV, BEV_FEATURE, BEV_FP16, VOXEL, VOXEL_FP16, Manifest

DUMP_SPLIT = "train"
# The headline variant `both` of benchmarks/bench_kd_ablation.py (declared there before its runs, and
# its best: MFD + CWD closed 33% of the teacher-student gap over 2 seeds): MFD on the teacher's BEV
# feature through a 1x1 adapter, PKD-normalised, on GT-occupied BEV cells dilated by 1; CWD on
# per-voxel log-probabilities at tau 1 over camera-visible voxels; unit weights; no Hinton KD.
DISTILL_SETTINGS = (
    "distill.dump_source=compact", "distill.dense.mfd_target=feature", *MFD_CWD_COMMON,
    "distill.dense.lambda_feat=1.0", "distill.dense.lambda_logit=1.0",
)
# One intra-op thread for the three latencies: on a shared 2-core machine one thread is what the
# other users' load disturbs least, and benchmarks/bench_kd_ablation.py times its ratio the same way.
LATENCY_THREADS = 1


@dataclass(frozen=True)
class TrainedRun:
    """A training run of the stage: its final evaluation on the val split (percent, EMA weights)."""

    config: str
    run_dir: str
    steps: int
    train_seconds: float  # the optimiser steps
    seconds: float  # wall time of the call: setup, training and the final evaluation
    metrics: dict[str, Any]  # occ3d_report


@dataclass(frozen=True)
class TeacherDump:
    """The teacher's targets for the street train split and what ``check-dump`` found in them.
    Sizes are mean bytes per frame on disk."""

    dir: str
    split: str
    samples: int
    teacher: str  # the manifest's teacher name (kind, step, weights)
    teacher_checkpoint_sha256: str
    compact_codec: str  # dump-teacher's default compact probability codec
    compact_bytes: float  # voxel + BEV probabilities in it: what the student reads
    seed_fp16_bytes: float  # voxel logits + BEV probabilities, seed 000's fp16 npz
    feature_bytes: float  # the BEV feature (the MFD target), compact
    check_passed: bool  # True in every report: a failed check stops the demo
    seconds: float  # dump
    check_seconds: float


@dataclass(frozen=True)
class ModelRow:
    """One model of the comparison table: val metrics (percent) and batch-1 latency."""

    name: str
    config: str
    steps: int
    mIoU: float
    IoU: float
    RayIoU: float | None  # None when the run's config skips RayIoU
    per_class: dict[str, float | None]
    params: int
    latency_median_ms: float | None  # None when bench_iters is 0
    latency_p90_ms: float | None


@dataclass(frozen=True)
class ModelLatency:
    params: int
    median_ms: float  # mean over the passes of each pass's median
    p90_ms: float


@dataclass(frozen=True)
class LatencyComparison:
    """Engine-only latency of several models on one input, measured in one run."""

    input: str  # what they ran on
    repeats: int  # timed rounds per model, over the passes
    models: dict[str, ModelLatency]
    seconds: float


@dataclass(frozen=True)
class DistillSection:
    """Teacher, plain student and distilled student on the street val split."""

    seed: int  # of the teacher and both students
    teacher: TrainedRun
    dump: TeacherDump
    distilled: TrainedRun
    distill_overrides: tuple[str, ...]  # what the distilled student's config adds to the plain one's
    rows: tuple[ModelRow, ...]  # teacher, plain student, distilled student
    teacher_above_plain: bool  # in val mIoU
    gap_closed: float | None  # (distilled - plain) / (teacher - plain) in mIoU; None without a gap
    latency: LatencyComparison | None  # None when bench_iters is 0
    seconds: float  # wall time of the whole stage


def gap_closed(teacher: float, plain: float, distilled: float) -> float | None:
    """``(distilled - plain) / (teacher - plain)``: 1 = the distilled student reached the teacher,
    0 = no gain, < 0 = worse than the plain student; None when the teacher is not above the plain
    student (there is no gap to close)."""
    gap = teacher - plain
    return (distilled - plain) / gap if gap > 0 else None


def _train_run(config: str, world: SynthResult, run_dir: Path, steps: int, seed: int,
               overrides: tuple[str, ...] = ()) -> TrainedRun:
    start = time.perf_counter()
    result = train_resumed(demo_train_config(config, world, steps, seed, overrides), run_dir)
    return TrainedRun(config=config, run_dir=str(run_dir), steps=result.step, train_seconds=result.seconds,
                      seconds=time.perf_counter() - start, metrics=result.metrics)


def teacher_checkpoint_sha256(run_dir: Path) -> str:
    """The hash of the weights ``dump-teacher`` loads from the run's latest checkpoint (its EMA
    weights when it has them), which its manifest records."""
    hashes = json.loads((find_checkpoint(run_dir) / META).read_text())["sha256"]
    return hashes.get(EMA_WEIGHTS) or hashes[WEIGHTS]


def _dump_teacher(teacher_run: Path, dump_dir: Path) -> None:
    """``occdistill dump-teacher``'s checkpoint dump on the teacher's train split: compact and seed fp16
    targets plus the BEV feature, on the device the demo trains on, resuming a partial dump of the
    same teacher."""
    dump_checkpoint(teacher_run, DUMP_SPLIT, dump_dir, DumpOptions(split=DUMP_SPLIT, formats=("compact", "seed")),
                    bev_feature=True)


def _bytes_per_frame(dump_dir: Path, manifest: Manifest, artefacts: tuple[str, ...]) -> float:
    total = sum((dump_dir / s.files[a]).stat().st_size for s in manifest.samples for a in artefacts)
    return total / len(manifest.samples)


def dump_and_check(teacher_run: Path, world: SynthResult, dump_root: Path) -> TeacherDump:
    """Dump the teacher into ``dump_root / <first 12 hex digits of its checkpoint hash>`` (so that the
    distilled student's config names the targets it learnt from; dumps of earlier teachers are
    removed) and validate the dump against the street train split; raises on any problem."""
    sha = teacher_checkpoint_sha256(teacher_run)
    dump_dir = dump_root / sha[:12]
    if dump_root.is_dir():
        for stale in dump_root.iterdir():
            if stale != dump_dir:
                shutil.rmtree(stale)
    start = time.perf_counter()
    _dump_teacher(teacher_run, dump_dir)
    dumped = time.perf_counter()
    problems = check_dump(dump_dir, open_dataset("occ3d", world.out, str(world.splits[DUMP_SPLIT])), DUMP_SPLIT)
    if problems:
        shown = "; ".join(str(p) for p in problems[:5])
        raise OccDistillError(f"check-dump {dump_dir}: {len(problems)} problem(s), e.g. {shown}")
    checked = time.perf_counter()
    manifest = Manifest.load(dump_dir, DUMP_SPLIT)
    return TeacherDump(
        dir=str(dump_dir), split=DUMP_SPLIT, samples=len(manifest.samples), teacher=manifest.teacher.name,
        teacher_checkpoint_sha256=manifest.teacher.checkpoint_sha256,
        compact_codec=manifest.artefacts[VOXEL].encoding,
        compact_bytes=_bytes_per_frame(dump_dir, manifest, (VOXEL, BEV)),
        seed_fp16_bytes=_bytes_per_frame(dump_dir, manifest, (VOXEL_FP16, BEV_FP16)),
        feature_bytes=_bytes_per_frame(dump_dir, manifest, (BEV_FEATURE,)),
        check_passed=True, seconds=dumped - start, check_seconds=checked - dumped,
    )


@contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    was = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(was)


def measure_latency(run_dirs: dict[str, str], world: SynthResult, iters: int) -> LatencyComparison:
    """Engine-only latency (forward + argmax, batch 1, ``LATENCY_THREADS`` threads) of each run's model
    (EMA weights) on the same input, the first val frame. Two passes of ``iters // 2`` rounds (at least
    1) in opposite orders, so that every model sees the same background load; per model the mean of
    the two passes' medians and p90s."""
    start = time.perf_counter()
    models = {name: load_bench_model(checkpoint=run) for name, run in run_dirs.items()}
    shapes = {(tuple(m.model.cfg.image_size), tuple(m.data.cameras)) for m in models.values()}
    if len(shapes) != 1:
        raise OccDistillError(f"the models of {sorted(run_dirs)} read different inputs {sorted(shapes)}: "
                              "their latencies would not compare")
    first = next(iter(models.values()))
    dataset = open_bench_dataset(first.data.format, world.out, world.splits["val"], first.model.cfg.image_size,
                                 first.data.cameras, image_aug=first.data.image_aug)
    inputs = dataset_inputs(dataset)
    rounds = max(1, iters // 2)
    with _torch_threads(LATENCY_THREADS):
        timed = interleaved_benchmark({name: m.model for name, m in models.items()},
                                      {name: inputs for name in models}, rounds=rounds, warmup=BENCH_WARMUP)
    h, w = first.model.cfg.image_size
    return LatencyComparison(
        input=f"val frame `{dataset.frame(0).token}`, {inputs.images.shape[1]} cameras at {h}x{w}",
        repeats=2 * rounds,
        models={name: ModelLatency(params=t.passes[0].params, median_ms=t.median_ms, p90_ms=t.p90_ms)
                for name, t in timed.items()},
        seconds=time.perf_counter() - start,
    )


def _row(name: str, run: TrainedRun | StudentResult, latency: ModelLatency | None) -> ModelRow:
    m = run.metrics
    params = latency.params if latency is not None else sum(
        p.numel() for p in load_bench_model(checkpoint=run.run_dir).model.parameters())
    return ModelRow(name=name, config=run.config, steps=run.steps, mIoU=m["mIoU"], IoU=m["IoU"],
                    RayIoU=m.get("RayIoU"), per_class=m["per_class"], params=params,
                    latency_median_ms=None if latency is None else latency.median_ms,
                    latency_p90_ms=None if latency is None else latency.p90_ms)


def distillation_stage(street: SynthResult, out: Path, plain: StudentResult, *, teacher_config: str,
                       teacher_steps: int, seed: int, bench_iters: int) -> DistillSection:
    """Train ``teacher_config`` for ``teacher_steps`` steps into ``out / "teacher"``, dump and check its
    targets under ``out / "teacher_dump"``, train the distilled student (``plain``'s config, steps and
    ``seed``, plus :data:`DISTILL_SETTINGS` on the dump) into ``out / "distilled_student"``, and compare
    the three (latency: ``bench_iters`` rounds per model, 0 skips it). Runs of the same config resume."""
    start = time.perf_counter()
    teacher = _train_run(teacher_config, street, out / "teacher", teacher_steps, seed)
    dump = dump_and_check(Path(teacher.run_dir), street, out / "teacher_dump")
    overrides = (f"distill.dump={dump.dir}", *DISTILL_SETTINGS)
    distilled = _train_run(plain.config, street, out / "distilled_student", plain.steps, seed, overrides)
    runs = {"teacher": teacher, "plain student": plain, "distilled student": distilled}
    latency = measure_latency({n: r.run_dir for n, r in runs.items()}, street, bench_iters) if bench_iters > 0 else None
    rows = tuple(_row(name, run, None if latency is None else latency.models[name]) for name, run in runs.items())
    t, p, d = (r.mIoU for r in rows)
    return DistillSection(
        seed=seed, teacher=teacher, dump=dump, distilled=distilled, distill_overrides=overrides, rows=rows,
        teacher_above_plain=t > p, gap_closed=gap_closed(t, p, d), latency=latency,
        seconds=time.perf_counter() - start,
    )


def _mb(n: float) -> str:
    return f"{n / 2**20:.2f} MB" if n >= 2**20 else f"{n / 2**10:.0f} KB"


def distill_markdown(s: DistillSection, plain: StudentResult) -> list[str]:
    teacher_row, plain_row, distilled_row = s.rows
    d = s.dump
    lines = [
        "## Teacher and distilled student",
        "",
        f"The dense teacher `{s.teacher.config}` ({teacher_row.params / 1e6:.2f} M parameters) trained for "
        f"{s.teacher.steps} steps on the same {plain.train_samples} street train frames (seed {s.seed}).",
        f"`occdistill dump-teacher` wrote its targets for the {d.samples} frames of the `{d.split}` split "
        f"(eval mode, no_grad, {d.teacher});",
        f"`occdistill check-dump` validated them against the dataset (keys, shapes, finite values, probability "
        f"sums, GT hashes, grid, class table): **passed**, {d.samples} samples, no problem.",
        f"The distilled student is `{s.distilled.config}` with the plain student's seed and budget "
        f"({s.distilled.steps} steps) plus MFD on the teacher's BEV feature and CWD on its",
        "3D logits, the `both` variant of `benchmarks/bench_kd_ablation.py` "
        "(`benchmarks/results/kd_ablation_dense.md`); its config adds",
        f"`{' '.join(o for o in s.distill_overrides if not o.startswith('distill.dump='))}`.",
        "",
        f"Val split ({plain.val_samples} frames), percent, EMA weights. "
        + (f"Latency: engine-only forward + argmax, batch 1, {LATENCY_THREADS} thread, median (p90) in ms of the "
           f"three models on the same input ({s.latency.input}) in this run, {s.latency.repeats} rounds each over "
           "two passes in opposite orders." if s.latency is not None else "Latency: not measured (bench_iters=0)."),
        "",
        "| model | config | steps | mIoU | IoU | RayIoU | parameters | latency ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in s.rows:
        lines.append(f"| {r.name} | `{Path(r.config).stem}` | {r.steps} | {pct(r.mIoU)} | {pct(r.IoU)} | "
                     f"{pct(r.RayIoU)} | {r.params / 1e6:.2f} M | {ms_cell(r.latency_median_ms, r.latency_p90_ms)} |")
    lines.append("")
    if s.gap_closed is not None:
        lines.append(f"Gap closed = (distilled - plain) / (teacher - plain) in mIoU = ({distilled_row.mIoU:.2f} - "
                     f"{plain_row.mIoU:.2f}) / ({teacher_row.mIoU:.2f} - {plain_row.mIoU:.2f}) = "
                     f"**{100 * s.gap_closed:.0f}%** of the teacher's lead.")
    else:
        delta = distilled_row.mIoU - plain_row.mIoU
        lines += [
            f"**The teacher is not above the plain student on this val split** ({teacher_row.mIoU:.2f} vs "
            f"{plain_row.mIoU:.2f} mIoU): there is no gap to close, so",
            f"no gap-closed figure, and the distilled student's difference to the plain one ({delta:+.2f} mIoU) is "
            "not a better teacher's accuracy recovered.",
            f"With the demo's budget ({s.teacher.steps} teacher steps, sized to the demo's time) the teacher does not "
            "lead here; in `benchmarks/results/kd_ablation_dense.md`",
            "the same teacher trained 1224 steps on 136 frames leads the plain student by 3.9 mIoU and MFD + CWD "
            "closes 33% of that gap.",
        ]
    if teacher_row.latency_median_ms is not None and distilled_row.latency_median_ms is not None:
        speedup = teacher_row.latency_median_ms / distilled_row.latency_median_ms
        lines.append(f"The distilled student runs {speedup:.1f}x faster than the teacher on this input.")
    lines += ["", "Per-class IoU (classes present in the val split):", "",
              "| class | " + " | ".join(r.name for r in s.rows) + " |", "|---|" + "---|" * len(s.rows)]
    present = plain.baselines["all-free"]["per_class"]  # as in the student's table: None = absent from the val GT
    for cls in plain_row.per_class:
        if present[cls] is not None:
            lines.append(f"| {cls} | " + " | ".join(pct(r.per_class[cls]) for r in s.rows) + " |")
    lines += [
        "",
        f"Teacher targets per frame on disk (`{Path(d.dir).name}`, named after the teacher checkpoint's hash):",
        "",
        "| targets | bytes per frame | vs seed fp16 |",
        "|---|---|---|",
        f"| compact `{d.compact_codec}`: 3D + BEV probabilities (what the student reads) | {_mb(d.compact_bytes)} | "
        f"1/{d.seed_fp16_bytes / d.compact_bytes:.0f} |",
        f"| seed fp16 npz: 3D logits + BEV probabilities (written for this comparison only) | "
        f"{_mb(d.seed_fp16_bytes)} | 1 |",
        f"| BEV feature (the MFD target), compact | {_mb(d.feature_bytes)} | |",
        "",
        "Stage times in this run (a resumed training run counts only its new steps):",
        "",
        "| stage | seconds |",
        "|---|---|",
        f"| teacher: {s.teacher.steps} training steps | {s.teacher.train_seconds:.0f} |",
        f"| teacher: setup and evaluation | {s.teacher.seconds - s.teacher.train_seconds:.0f} |",
        f"| dump-teacher ({d.samples} frames) | {d.seconds:.0f} |",
        f"| check-dump | {d.check_seconds:.0f} |",
        f"| distilled student: {s.distilled.steps} training steps | {s.distilled.train_seconds:.0f} |",
        f"| distilled student: setup and evaluation | {s.distilled.seconds - s.distilled.train_seconds:.0f} |",
        *([f"| latency of the three models | {s.latency.seconds:.0f} |"] if s.latency is not None else []),
        f"| **stage total** | {s.seconds:.0f} |",
        "",
    ]
    return lines
