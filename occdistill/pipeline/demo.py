"""The main job on the built-in synthetic world, as a library function.

Stages: generate -> read back -> verify geometry (projection consistency, ground layer) -> draw ->
train the dense student (``street-tiny``) on the street world -> evaluate it against image-free
baselines -> benchmark it (``occdistill bench``: latency, FPS, memory, FLOPs, per-stage profile).
Every stage writes into one report folder; re-running resumes the data generation (completed
frames are skipped) and an unchanged, interrupted training run, and rewrites the report.
"""

from __future__ import annotations

import io
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from occdistill.config import load_config, save_config
from occdistill.data.build import DatasetFormat, classes_for, open_dataset
from occdistill.data.consistency import sample_consistency
from occdistill.data.labels import check_ground_layer
from occdistill.data.synth import SynthResult, generate
from occdistill.deploy.bench import BenchResult, benchmark, dataset_inputs, load_bench_model, open_bench_dataset
from occdistill.engine.baselines import baseline_reports
from occdistill.engine.config import TrainConfig, load_train_config
from occdistill.engine.data import open_split
from occdistill.engine.loop import config_differences, train
from occdistill.io import atomic_write_bytes, atomic_write_json, atomic_write_text
from occdistill.viz.sample_sheet import render_sample

CONSISTENCY_TARGET = 0.95
BENCH_WARMUP = 2  # untimed rounds first: allocator growth and oneDNN kernel selection on the first calls


@dataclass(frozen=True)
class DemoConfig:
    seed: int = 0
    street_scenes: int = 4  # the last scene is the val split; the student trains on the others
    street_frames: int = 6
    room_scenes: int = 1
    room_frames: int = 4
    augmented_views: int = 2  # samples per dataset also drawn after strong augmentation
    student_config: str = "street-tiny"  # built-in training config (or YAML path) of the student
    train_steps: int = 400  # the student's training budget in optimiser steps (~4 min on 2 cores); 0 skips it
    bench_iters: int = 10  # timed rounds of the student's benchmark (a few seconds in all); 0 skips it

    def __post_init__(self) -> None:
        for name in ("street_scenes", "street_frames", "room_scenes", "room_frames"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.augmented_views < 0:
            raise ValueError(f"augmented_views must be >= 0, got {self.augmented_views}")
        for name in ("train_steps", "bench_iters"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


@dataclass(frozen=True)
class DatasetCheck:
    """Verification results of one dataset (fractions in [0, 1])."""

    name: str
    samples: int
    seen_voxels: int
    consistency: float  # pooled over samples and cameras, no augmentation
    consistency_augmented: float  # same, after strong image + BEV augmentation
    worst_sample: float  # lowest per-sample value over both passes
    ground_ok: int | None  # samples whose ground is in the expected z-layer (street only)
    pngs: tuple[str, ...]


def _save_png(image, path: Path) -> Path:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return atomic_write_bytes(path, buf.getvalue())


def _check_dataset(
    name: str, fmt: DatasetFormat, root: Path, infos: str | None, cfg: DemoConfig, viz_dir: Path
) -> DatasetCheck:
    classes = classes_for(fmt)
    plain = open_dataset(fmt, root, infos, rendered_maps=True)
    augmented = open_dataset(fmt, root, infos, rendered_maps=True, check_aug=True, seed=cfg.seed)
    totals = {False: [0, 0], True: [0, 0]}  # augmented? -> [consistent, seen]
    worst, ground_ok, pngs = 1.0, 0, []
    for i in tqdm(range(len(plain)), desc=f"check {name}", unit="sample"):
        for aug, ds in ((False, plain), (True, augmented)):
            sample = ds[i]
            report = sample_consistency(sample, ds.grid, classes)
            totals[aug][0] += sum(c.consistent for c in report.cameras)
            totals[aug][1] += report.seen
            if report.seen:
                worst = min(worst, report.fraction)
            if not aug and fmt == "occ3d":
                ground_ok += check_ground_layer(sample.semantics.numpy(), ds.grid, classes).ok
            if not aug or i < cfg.augmented_views:
                tag = "aug" if aug else "raw"
                title = f"{name} {sample.scene_name} {sample.token} ({tag}) consistency {report.fraction:.1%}"
                fname = f"{name}__{sample.scene_name}__{sample.token}__{tag}.png".replace("/", "_")
                pngs.append(str(_save_png(render_sample(sample, ds.grid, classes, title), viz_dir / fname)))
    frac = {a: (c / s if s else math.nan) for a, (c, s) in totals.items()}
    return DatasetCheck(
        name=name,
        samples=len(plain),
        seen_voxels=totals[False][1],
        consistency=frac[False],
        consistency_augmented=frac[True],
        worst_sample=worst,
        ground_ok=ground_ok if fmt == "occ3d" else None,
        pngs=tuple(pngs),
    )


@dataclass(frozen=True)
class StudentResult:
    """The trained student on the street val split, next to the image-free baselines (percent)."""

    config: str
    steps: int
    train_seconds: float
    run_dir: str
    curves_png: str
    train_samples: int
    val_samples: int
    metrics: dict[str, Any]  # occ3d_report of the student (EMA weights when the config has EMA)
    baselines: dict[str, dict[str, Any]]  # name -> occ3d_report


def _train_student(cfg: DemoConfig, street: SynthResult, out: Path) -> StudentResult:
    """Train ``cfg.student_config`` on the street train split for ``cfg.train_steps`` steps and
    evaluate it on the val split. An interrupted run with the same config is resumed."""
    train_cfg = load_train_config(
        cfg.student_config,
        [f"data.root={street.out}", f"data.train_split={street.splits['train']}",
         f"data.val_split={street.splits['val']}", f"optim.max_steps={cfg.train_steps}",
         f"runtime.seed={cfg.seed}", "runtime.eval_every=0", "runtime.ckpt_every=50"],
    )
    run_dir = out / "student"
    resume = (run_dir / "checkpoints" / "latest.json").is_file() and not config_differences(
        load_config(TrainConfig, run_dir / "config.yaml"), train_cfg
    )
    if not resume and run_dir.exists():
        shutil.rmtree(run_dir)
    result = train(train_cfg, run_dir, resume=resume)
    train_set, val_set = (open_split(train_cfg.data, split, augment=False) for split in ("train", "val"))
    baselines = baseline_reports(train_set, val_set)
    return StudentResult(
        config=cfg.student_config,
        steps=result.step,
        train_seconds=result.seconds,
        run_dir=str(run_dir),
        curves_png=str(run_dir / "curves.png"),
        train_samples=len(train_set),
        val_samples=len(val_set),
        metrics=result.metrics,
        baselines=baselines,
    )


@dataclass(frozen=True)
class StudentBench:
    """``occdistill bench`` of the trained student on the street val split (``result``: all its numbers)."""

    infos: str  # the frames read by the end-to-end rounds
    seconds: float  # wall time of loading the checkpoint and benchmarking: what the bench adds to the demo
    result: BenchResult


def _bench_student(run_dir: str | Path, street: SynthResult, iters: int) -> StudentBench:
    """What ``occdistill bench --checkpoint RUN --data ROOT --infos VAL`` measures, at the demo's budget:
    batch 1 on the CPU with torch's thread count, ``BENCH_WARMUP`` + ``iters`` rounds, training pooling
    path only (the exportable path and the other engines: ``occdistill bench --side-by-side``)."""
    start = time.perf_counter()
    loaded = load_bench_model(checkpoint=run_dir)
    model, data = loaded.model, loaded.data
    # The student's own evaluation transform (not bench's default crop), so end-to-end is its real input pipeline.
    dataset = open_bench_dataset(data.format, street.out, street.splits["val"], model.cfg.image_size, data.cameras,
                                 image_aug=data.image_aug)
    result = benchmark(model, dataset_inputs(dataset), dataset=dataset, model_name=loaded.name,
                       repeats=iters, warmup=BENCH_WARMUP, export_path=False)
    return StudentBench(infos=str(street.splits["val"]), seconds=time.perf_counter() - start, result=result)


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f}"


def _student_markdown(student: StudentResult, out: Path) -> list[str]:
    rows = {"student": student.metrics, **student.baselines}
    lines = [
        "## Dense student on the street world",
        "",
        f"`{student.config}` trained for {student.steps} steps ({student.train_seconds / 60:.1f} min on this machine)",
        f"on the {student.train_samples} frames of the street train split, evaluated (EMA weights) on the",
        f"{student.val_samples} frames of the val split: Occ3D mIoU and geometry IoU over `mask_camera` voxels,",
        "RayIoU from the LiDAR origins without a mask. The baselines need no images: `all-free` predicts empty space",
        "everywhere, `voxel-majority` the most frequent training label of each voxel. This is a",
        "demo-sized budget; `benchmarks/train_street_tiny.py` trains 24 epochs on 136 frames (about",
        "15 min), where objects are learnt too (`benchmarks/results/train_street_tiny.json`).",
        "",
        "| predictor | mIoU | IoU | RayIoU | RayIoU@1m | RayIoU@2m | RayIoU@4m |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {_pct(r['mIoU'])} | {_pct(r['IoU'])} | {_pct(r['RayIoU'])} | {_pct(r['RayIoU@1m'])} | "
            f"{_pct(r['RayIoU@2m'])} | {_pct(r['RayIoU@4m'])} |"
        )
    lines += ["", "Per-class IoU (classes present in the val split):", "",
              "| class | " + " | ".join(rows) + " |", "|---|" + "---|" * len(rows)]
    present = student.baselines["all-free"]["per_class"]  # all-free scores 0 on a present class, n/a on an absent one
    for cls in student.metrics["per_class"]:
        if present[cls] is not None:
            lines.append(f"| {cls} | " + " | ".join(_pct(r["per_class"][cls]) for r in rows.values()) + " |")
    rel = Path(student.curves_png).relative_to(out).as_posix()
    lines += ["", "Training curves (loss terms, learning rate, validation metrics):", "", f"![curves]({rel})", ""]
    return lines


def _bench_markdown(bench: StudentBench) -> list[str]:
    r = bench.result
    h, w = r.image_size
    load = r.machine["load_average_at_start"]  # None where the OS has no load average
    lines = [
        "## Latency profile of the student",
        "",
        f"`occdistill bench` of the trained student, {r.model}, on `{r.device}` in {r.dtype} with "
        f"{r.machine['torch_threads']} torch threads",
        f"({r.machine['cpu']}, {r.machine['cpu_count']} CPUs, 1-minute load average "
        f"{'n/a' if load is None else f'{load[0]:.1f}'} at the start). Input: batch {r.batch} of {r.cameras} "
        f"cameras at {h}x{w}",
        f"from the street val split. Median and p90 of {r.repeats} rounds after {r.warmup} warm-up rounds "
        f"({bench.seconds:.1f} s in all).",
        "Engine-only: forward + argmax on a batch already on the device; end-to-end: read + decode + resize of the",
        "frame, collate, transfer, forward, argmax. Stage shares are of the engine-only stage sum, the data pipeline's",
        "of end-to-end. Other processes only add time, so on a busy machine these are upper bounds. The exportable",
        "pooling path and the other engines (torch.compile, onnxruntime): `occdistill bench --side-by-side`.",
        "",
        "| stage | median ms | p90 ms | share | GFLOPs |",
        "|---|---|---|---|---|",
        f"| data pipeline (per sample) | {r.data_pipeline_ms_per_sample:.1f} | n/a | "
        f"{r.data_share_of_end_to_end:.1%} | n/a |",
    ]
    for s in r.stages:
        lines.append(f"| {s.name} | {s.median_ms:.1f} | {s.p90_ms:.1f} | {s.share:.1%} | {s.gflops:.2f} |")
    lines += [
        f"| **engine-only** | {r.latency_median_ms:.1f} | {r.latency_p90_ms:.1f} | | {r.gflops:.2f} |",
        f"| **end-to-end** | {r.end_to_end_median_ms:.1f} | {r.end_to_end_p90_ms:.1f} | | |",
        "",
        f"FPS {r.fps:.1f} engine-only, {r.end_to_end_fps:.1f} end-to-end; {r.params / 1e6:.2f} M parameters "
        f"({r.model_memory_mb:.0f} MB), peak memory {r.peak_memory_mb:.0f} MB above the resident weights and inputs",
        f"({r.peak_memory_kind}); {r.gflops:.2f} GFLOPs = {r.gmacs:.2f} GMACs per batch "
        "(matmul/conv-type ops only).",
        "",
    ]
    return lines


def _report_markdown(
    cfg: DemoConfig, checks: list[DatasetCheck], student: StudentResult | None, bench: StudentBench | None, out: Path
) -> str:
    lines = [
        "# occdistill demo report",
        "",
        "Synthetic data generated by `occdistill synth`, read back by the real-format readers.",
        "",
        "## Geometry verification",
        "",
        "Projection consistency: the fraction of GT-occupied voxels seen by a camera (in front, inside",
        "the image, depth agreeing within half a voxel diagonal) whose pixel in the rendered semantic",
        f"map has the voxel's class. Target: at least {CONSISTENCY_TARGET:.0%}, with and without augmentation.",
        "",
        "| dataset | samples | seen voxels | consistency | with augmentation | worst sample | ground layer ok |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in checks:
        ground = "n/a" if c.ground_ok is None else f"{c.ground_ok}/{c.samples}"
        lines.append(
            f"| {c.name} | {c.samples} | {c.seen_voxels} | {c.consistency:.2%} | "
            f"{c.consistency_augmented:.2%} | {c.worst_sample:.2%} | {ground} |"
        )
    lines += ["", "## Visual checks", "", "Camera images with GT voxels in class colours, and the BEV label map.", ""]
    for c in checks:
        for png in c.pngs:
            rel = Path(png).relative_to(out)
            lines.append(f"![{rel.name}]({rel.as_posix()})")
    lines.append("")
    if student is not None:
        lines += _student_markdown(student, out)
    if bench is not None:
        lines += _bench_markdown(bench)
    lines += ["", f"Configuration: `config.yaml`. Numbers: `report.json`. Seed {cfg.seed}.", ""]
    return "\n".join(lines)


def run_demo(cfg: DemoConfig, out: Path) -> Path:
    """Run the main job into ``out``; returns the path of the report README."""
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    street = generate("street", out / "data" / "street", cfg.street_scenes, cfg.street_frames, cfg.seed)
    room = generate("room", out / "data" / "room", cfg.room_scenes, cfg.room_frames, cfg.seed)
    viz_dir = out / "viz"
    checks = [
        _check_dataset(f"street-{split}", "occ3d", street.out, str(infos), cfg, viz_dir)
        for split, infos in street.splits.items()
    ]
    checks.append(_check_dataset("room", "occscannet", room.out, None, cfg, viz_dir))
    student = _train_student(cfg, street, out) if cfg.train_steps > 0 else None
    bench = None
    if student is not None and cfg.bench_iters > 0:
        bench = _bench_student(student.run_dir, street, cfg.bench_iters)
    report = {"config": asdict(cfg), "checks": [asdict(c) for c in checks],
              "student": asdict(student) if student is not None else None,
              "bench": asdict(bench) if bench is not None else None}
    atomic_write_json(out / "report.json", report)
    return atomic_write_text(out / "README.md", _report_markdown(cfg, checks, student, bench, out))
