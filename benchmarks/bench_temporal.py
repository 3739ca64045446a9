"""Benchmark: does temporal fusion lower flicker without lowering mIoU? ``street-tiny`` with and
without BEVDet4D-style fusion of the previous keyframe, on the synthetic street sequences.

    .venv/bin/python benchmarks/bench_temporal.py [--scenes 20] [--frames 8] [--val-scenes 3]
        [--steps 816] [--seed 0] [--data DIR] [--runs DIR] [--sequential] [key=value ...]

1. Generates the street world (or reuses ``--data``; the same defaults as
   benchmarks/train_street_tiny.py: 20 scenes x 8 keyframes, the last 3 scenes are the val split).
2. Trains two variants from the same seed, split and budget, each in its own process with one
   CPU thread and no loader workers (both run side by side on 2 cores unless ``--sequential``):
   ``single`` (street-tiny as is) and ``temporal`` (``model.dense.temporal_frames=1``: the
   previous keyframe's lifted BEV, recomputed without gradient, warped by ego motion and fused).
   An interrupted invocation resumes each run from its last checkpoint.
3. Reads each run's final evaluation on the val split (EMA weights): Occ3D mIoU / IoU over
   ``mask_camera``, RayIoU, and flicker = % of static camera-visible voxels whose predicted label
   changes between consecutive frames after ego-motion compensation (``flicker_occupied``: over
   static occupied voxels only; occdistill/metrics/flicker.py).

Writes benchmarks/results/temporal.json (command, machine, load average, per-variant metrics and
training time, and the two target checks) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

from occdistill.config import to_dict
from occdistill.data.synth import generate
from occdistill.engine.config import load_train_config
from occdistill.io import atomic_write_json

VARIANTS = {"single": [], "temporal": ["model.dense.temporal_frames=1"]}
KEYS = ("mIoU", "IoU", "RayIoU", "flicker", "flicker_occupied")


def run_command(variant: str, run_dir: Path, overrides: list[str]) -> list[str]:
    """``occdistill train`` for one variant; ``--resume`` when the run has a checkpoint."""
    resume = ["--resume"] if (run_dir / "checkpoints" / "latest.json").is_file() else []
    return [sys.executable, "-m", "occdistill", "train", "--out", str(run_dir), *resume, "street-tiny",
            *overrides, *VARIANTS[variant]]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenes", type=int, default=20)
    parser.add_argument("--frames", type=int, default=8, help="keyframes per scene")
    parser.add_argument("--val-scenes", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=816, help="optimiser steps per variant (816 = 12 epochs)")
    parser.add_argument("--data", type=Path, default=Path("outputs/bench/street"), help="dataset directory (reused)")
    parser.add_argument("--runs", type=Path, default=Path("outputs/bench/temporal"), help="run directories (resumed)")
    parser.add_argument("--sequential", action="store_true", help="train one variant after the other")
    parser.add_argument("--out-json", type=Path, default=Path(__file__).parent / "results" / "temporal.json")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="street-tiny config overrides (both)")
    args = parser.parse_args(argv)
    load_start = os.getloadavg()

    data = generate("street", args.data, args.scenes, args.frames, args.seed,
                    overrides=[f"split.val_scenes={args.val_scenes}"], workers=2, progress=False)
    overrides = [
        f"data.root={data.out}", f"data.train_split={data.splits['train']}", f"data.val_split={data.splits['val']}",
        f"optim.max_steps={args.steps}", f"runtime.seed={args.seed}", "runtime.progress=false",
        "runtime.threads=1", "data.workers=0", "runtime.ckpt_every=100", "runtime.eval_every=0", *args.overrides,
    ]
    configs = {v: load_train_config("street-tiny", [*overrides, *extra]) for v, extra in VARIANTS.items()}

    t0 = time.perf_counter()
    procs = {}
    args.runs.mkdir(parents=True, exist_ok=True)
    for variant in VARIANTS:
        log_path = args.runs / f"{variant}.log"
        print(f"training {variant}: log {log_path}", flush=True)
        with open(log_path, "a") as log:  # the child keeps its own handle
            procs[variant] = subprocess.Popen(run_command(variant, args.runs / variant, overrides),
                                              stdout=log, stderr=log)
        if args.sequential and procs[variant].wait() != 0:
            raise SystemExit(f"{variant} failed: see {args.runs / f'{variant}.log'}")
    for variant, proc in procs.items():
        if proc.wait() != 0:
            raise SystemExit(f"{variant} failed: see {args.runs / f'{variant}.log'}")
    wall = time.perf_counter() - t0

    results = {}
    for variant in VARIANTS:
        summary = json.loads((args.runs / variant / "metrics.json").read_text())
        metrics = summary["metrics"]
        results[variant] = {
            **{k: metrics[k] for k in KEYS}, "flicker_pairs": metrics["flicker_pairs"],
            "per_class_iou": metrics["per_class"], "steps": summary["step"],
            "train_minutes": round(summary["train_seconds"] / 60, 2),
        }
    single, temporal = results["single"], results["temporal"]
    report = {
        "benchmark": "temporal fusion on the synthetic street sequences",
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                    "threads_per_run": 1, "runs_in_parallel": not args.sequential,
                    "loadavg_at_start": [round(x, 2) for x in load_start],
                    "loadavg_at_end": [round(x, 2) for x in os.getloadavg()]},
        "data": {"scenes": args.scenes, "frames_per_scene": args.frames, "val_scenes": args.val_scenes,
                 "root": str(data.out)},
        "seed": args.seed,
        "config_single": to_dict(configs["single"]),
        "temporal_overrides": VARIANTS["temporal"],
        "wall_minutes": round(wall / 60, 1),
        "variants": results,
        "targets": {
            "flicker_lower_with_fusion": temporal["flicker"] < single["flicker"],
            "miou_not_lower_with_fusion": temporal["mIoU"] >= single["mIoU"],
        },
        "units": "percent; mIoU/IoU over mask_camera voxels (Occ3D devkit), SparseOcc RayIoU, flicker "
                 "over static camera-visible voxel pairs of consecutive val frames",
    }
    atomic_write_json(args.out_json, report)
    print(json.dumps(report["variants"], indent=1)[:2000])
    print(f"\n{'variant':<10}" + "".join(f"{k:>18}" for k in KEYS) + f"{'train min':>11}")
    for name, r in results.items():
        print(f"{name:<10}" + "".join(f"{r[k]:>18.2f}" for k in KEYS) + f"{r['train_minutes']:>11}")
    print(f"\ntargets: {report['targets']}  ->  {args.out_json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
