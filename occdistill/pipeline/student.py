"""The demo's student stages: a training config trained on a generated world (resumed when the same
run was interrupted) and evaluated on its val split next to the image-free baselines; its
``occdistill bench`` profile; and their report sections."""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from occdistill.config import load_config
from occdistill.data.synth import SynthResult
from occdistill.deploy.bench import BenchResult, benchmark, dataset_inputs, load_bench_model, open_bench_dataset
from occdistill.engine.baselines import baseline_reports
from occdistill.engine.config import TrainConfig, load_train_config
from occdistill.engine.data import label_counts, open_split
from occdistill.engine.loop import TrainResult, config_differences, train
from occdistill.pipeline.markdown import pct

BENCH_WARMUP = 2  # untimed rounds first: allocator growth and oneDNN kernel selection on the first calls
CKPT_EVERY = 50  # optimiser steps between checkpoints: what an interrupted demo loses at most


def demo_train_config(config: str, world: SynthResult, steps: int, seed: int,
                      overrides: Sequence[str] = ()) -> TrainConfig:
    """``config`` (a built-in name or YAML path) on ``world``'s train/val splits for ``steps`` optimiser
    steps with ``seed``, evaluated once at the end, plus ``overrides``. One checkpoint is kept (the
    latest, enough to resume): the teacher's are 160 MB each."""
    return load_train_config(
        config,
        [f"data.root={world.out}", f"data.train_split={world.splits['train']}",
         f"data.val_split={world.splits['val']}", f"optim.max_steps={steps}",
         f"runtime.seed={seed}", "runtime.eval_every=0", f"runtime.ckpt_every={CKPT_EVERY}",
         "runtime.keep_checkpoints=1", *overrides],
    )


def train_resumed(train_cfg: TrainConfig, run_dir: Path) -> TrainResult:
    """Train ``train_cfg`` into ``run_dir``: an interrupted (or finished) run of the same config is
    resumed (a finished one only re-evaluates); a run of another config is replaced."""
    resume = (run_dir / "checkpoints" / "latest.json").is_file() and not config_differences(
        load_config(TrainConfig, run_dir / "config.yaml"), train_cfg
    )
    if not resume and run_dir.exists():
        shutil.rmtree(run_dir)
    return train(train_cfg, run_dir, resume=resume)


@dataclass(frozen=True)
class StudentResult:
    """A trained student on its world's val split, next to the image-free baselines (percent)."""

    config: str
    steps: int
    train_seconds: float
    run_dir: str
    curves_png: str
    train_samples: int
    val_samples: int
    metrics: dict[str, Any]  # occ3d_report / occscannet_report of the student (EMA weights when the config has EMA)
    baselines: dict[str, dict[str, Any]]  # name -> report of the same format
    present_classes: tuple[str, ...] = ()  # classes with voxels in the val split's labels (unknown not counted)


def train_student(config: str, world: SynthResult, run_dir: Path, steps: int, seed: int) -> StudentResult:
    """Train ``config`` on the train split of ``world`` for ``steps`` steps into ``run_dir`` and evaluate
    it on the val split, with the image-free baselines."""
    train_cfg = demo_train_config(config, world, steps, seed)
    result = train_resumed(train_cfg, run_dir)
    train_set, val_set = (open_split(train_cfg.data, split, augment=False) for split in ("train", "val"))
    baselines = baseline_reports(train_set, val_set)
    counts = label_counts(val_set, camera_mask=False)
    return StudentResult(
        config=config,
        steps=result.step,
        train_seconds=result.seconds,
        run_dir=str(run_dir),
        curves_png=str(run_dir / "curves.png"),
        train_samples=len(train_set),
        val_samples=len(val_set),
        metrics=result.metrics,
        baselines=baselines,
        present_classes=tuple(n for n, c in zip(val_set.classes.names, counts) if c > 0),
    )


@dataclass(frozen=True)
class StudentBench:
    """``occdistill bench`` of a trained student on its world's val split (``result``: all its numbers)."""

    infos: str  # the frames read by the end-to-end rounds
    seconds: float  # wall time of loading the checkpoint and benchmarking: what the bench adds to the demo
    result: BenchResult


def bench_student(run_dir: str | Path, world: SynthResult, iters: int) -> StudentBench:
    """What ``occdistill bench --checkpoint RUN --data ROOT --infos VAL`` measures on ``world``'s val split
    (the checkpoint's data format: street or room), at the demo's budget:
    batch 1 on the CPU with torch's thread count, ``BENCH_WARMUP`` + ``iters`` rounds, training pooling
    path only (the exportable path and the other engines: ``occdistill bench --side-by-side``)."""
    start = time.perf_counter()
    loaded = load_bench_model(checkpoint=run_dir)
    model, data = loaded.model, loaded.data
    # The student's own evaluation transform (not bench's default crop), so end-to-end is its real input pipeline.
    dataset = open_bench_dataset(data.format, world.out, world.splits["val"], model.cfg.image_size, data.cameras,
                                 image_aug=data.image_aug)
    result = benchmark(model, dataset_inputs(dataset), dataset=dataset, model_name=loaded.name,
                       repeats=iters, warmup=BENCH_WARMUP, export_path=False)
    return StudentBench(infos=str(world.splits["val"]), seconds=time.perf_counter() - start, result=result)


def student_markdown(student: StudentResult, out: Path) -> list[str]:
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
            f"| {name} | {pct(r['mIoU'])} | {pct(r['IoU'])} | {pct(r['RayIoU'])} | {pct(r['RayIoU@1m'])} | "
            f"{pct(r['RayIoU@2m'])} | {pct(r['RayIoU@4m'])} |"
        )
    lines += ["", "Per-class IoU (classes present in the val split):", "",
              "| class | " + " | ".join(rows) + " |", "|---|" + "---|" * len(rows)]
    present = student.baselines["all-free"]["per_class"]  # all-free scores 0 on a present class, n/a on an absent one
    for cls in student.metrics["per_class"]:
        if present[cls] is not None:
            lines.append(f"| {cls} | " + " | ".join(pct(r["per_class"][cls]) for r in rows.values()) + " |")
    rel = Path(student.curves_png).relative_to(out).as_posix()
    lines += ["", "Training curves (loss terms, learning rate, validation metrics):", "", f"![curves]({rel})", ""]
    return lines


def bench_markdown(bench: StudentBench) -> list[str]:
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
