"""The demo's sparse stage: the sparse-query student (OPUS style) trained on the room world, evaluated
with the Occ-ScanNet ISO metrics next to the image-free baselines and benchmarked; and that section
of the report."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from occdistill.data.synth import SynthResult
from occdistill.pipeline.markdown import ms_cell, pct
from occdistill.pipeline.student import StudentBench, StudentResult, bench_student, train_student


@dataclass(frozen=True)
class SparseSection:
    """The sparse-query student on the room world: trained and evaluated (Occ-ScanNet ISO metrics) next
    to the image-free baselines, and its ``occdistill bench`` (None when ``bench_iters`` is 0)."""

    student: StudentResult
    bench: StudentBench | None
    seconds: float  # wall time of training, evaluation and bench: what the sparse stage adds to the demo


def sparse_student(config: str, room: SynthResult, out: Path, steps: int, seed: int,
                   bench_iters: int) -> SparseSection:
    """Train ``config`` on the room train split for ``steps`` steps into ``out / "sparse_student"``
    (resumed like the dense student), evaluate it on the val room and benchmark it (``bench_iters``
    rounds; 0 skips the bench)."""
    start = time.perf_counter()
    student = train_student(config, room, out / "sparse_student", steps, seed)
    bench = bench_student(student.run_dir, room, bench_iters) if bench_iters > 0 else None
    return SparseSection(student, bench, time.perf_counter() - start)


def sparse_markdown(sparse: SparseSection, out: Path) -> list[str]:
    s = sparse.student
    rows = {"sparse student": s.metrics, **s.baselines}
    lines = [
        "## Sparse-query student on the room world",
        "",
        f"`{s.config}` (OPUS-style sparse queries, `model.kind: sparse`) trained for {s.steps} steps "
        f"({s.train_seconds / 60:.1f} min on this machine) on the",
        f"{s.train_samples} frames of the room train split, evaluated on the {s.val_samples} frames of the val "
        "split (an unseen room) with the Occ-ScanNet",
        "ISO metrics: completion IoU / precision / recall of occupied against empty over every voxel (unknown "
        "counts as empty), mIoU the plain",
        "mean over the 11 classes (a class absent from GT and prediction scores 0 and still counts). `all-free` "
        "predicts empty everywhere:",
        "it has no true positive, so it scores 0 IoU and 0 mIoU by construction; `voxel-majority` the most "
        "frequent training label of each voxel.",
        "",
        "| predictor | mIoU | IoU | precision | recall |",
        "|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        lines.append(f"| {name} | {pct(r['mIoU'])} | {pct(r['IoU'])} | {pct(r.get('precision'))} | "
                     f"{pct(r.get('recall'))} |")
    present = [c for c in s.metrics["per_class"] if c in s.present_classes]
    if present:
        lines += ["", "Per-class IoU (classes present in the val split):", "",
                  "| class | " + " | ".join(rows) + " |", "|---|" + "---|" * len(rows)]
        for cls in present:
            lines.append(f"| {cls} | " + " | ".join(pct(r["per_class"][cls]) for r in rows.values()) + " |")
    if sparse.bench is not None:
        r = sparse.bench.result
        h, w = r.image_size
        stages = ", ".join(f"{st.name} {st.share:.0%}" for st in r.stages)
        lines += [
            "",
            f"Latency (`occdistill bench`, {r.device}, {r.dtype}, {r.machine['torch_threads']} torch threads, batch "
            f"{r.batch} at {h}x{w}, median (p90) of {r.repeats} rounds",
            f"after {r.warmup} warm-up rounds): engine-only {ms_cell(r.latency_median_ms, r.latency_p90_ms)} ms "
            f"({r.fps:.1f} FPS), end-to-end from the val room's files",
            f"{ms_cell(r.end_to_end_median_ms, r.end_to_end_p90_ms)} ms; stages {stages}; {r.gflops:.2f} GFLOPs, "
            f"{r.params / 1e6:.2f} M parameters.",
        ]
    rel = Path(s.curves_png).relative_to(out).as_posix()
    lines += [
        "",
        "This is a demo-sized budget on a few frames (the config's own budget is 300 steps on 216 frames). The "
        "DiScene ablation on a larger room",
        "world, `benchmarks/results/sparse_ablation.md`, distils this student from `room-sparse-teacher`: all four "
        "levels + teacher-guided",
        "initialisation close 80% +- 10% of the student-teacher mIoU gap over 2 seeds.",
        "",
        f"Training curves: ![sparse curves]({rel})",
        "",
        f"The sparse stage took {sparse.seconds:.0f} s.",
        "",
    ]
    return lines
