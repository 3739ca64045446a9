"""Benchmark: does temporal fusion lower flicker without lowering mIoU? ``street-tiny`` with and
without temporal fusion, on the synthetic street sequences.

    .venv/bin/python benchmarks/bench_temporal.py [--scenes 20] [--frames 8] [--val-scenes 3]
        [--steps 816] [--seed 0] [--data DIR] [--runs DIR] [--sequential]
        [--tune-scenes 3] [--test-scenes 6] [--filter-weights 0.2 0.3 0.4 0.5 0.6] [key=value ...]

Temporal fusion here is two parts, measured apart and together:
- feature fusion (``model.dense.temporal_frames=1``, occdistill/nn/temporal.py): the previous
  keyframe's lifted BEV, recomputed without gradient, warped by ego motion and fused (trained);
- the streaming voxel filter (occdistill/nn/voxel_filter.py): each frame's log-probabilities blended
  with the previous frame's filtered ones, warped by ego motion, history weight w, voxels that
  show a moving class taken from the current frame (no training).

1. Generates the street world (or reuses ``--data``; the same defaults as
   benchmarks/train_street_tiny.py: 20 scenes x 8 keyframes, the last 3 scenes are the val split),
   and two more worlds from other seeds whose scenes are all evaluation scenes: a *tune* world
   (``--tune-scenes``, seed + 100) that picks w, and a held-out *test* world (``--test-scenes``,
   seed + 200) that, with the val split, reports.
2. Trains two variants from the same seed, split and budget, each in its own process with one
   CPU thread and no loader workers (both run side by side on 2 cores unless ``--sequential``):
   ``single`` (street-tiny as is) and ``temporal`` (feature fusion). An interrupted invocation
   resumes each run from its last checkpoint; finished runs are reused.
3. Picks w on the tune world only, by a rule fixed before looking: among ``--filter-weights``, the
   one with the lowest flicker of the feature-fusion model whose tune mIoU is not below that
   model's unfiltered tune mIoU (none: w = 0, the filter is off).
4. Evaluates (EMA weights) ``single``, ``single+filter``, ``temporal`` and ``temporal+filter`` on the
   val split and on the test world: Occ3D mIoU / IoU over ``mask_camera``, RayIoU, and flicker =
   % of static camera-visible voxels whose predicted label changes between consecutive frames after
   ego-motion compensation (``flicker_occupied``: over static occupied voxels only;
   occdistill/metrics/flicker.py).

The targets compare the full temporal pipeline (``temporal+filter``) with the single-frame model:
flicker lower and mIoU not lower, on the val split and on the test world. Writes
benchmarks/results/temporal.json (command, machine, load average, tune table, chosen w, per-variant
metrics and training time, the target checks) and prints the tables.
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
from occdistill.engine.checkpoint import load_trained_model
from occdistill.engine.config import load_train_config
from occdistill.engine.data import open_split
from occdistill.engine.evaluate import evaluate
from occdistill.io import atomic_write_json

VARIANTS = {"single": [], "temporal": ["model.dense.temporal_frames=1"]}
KEYS = ("mIoU", "IoU", "RayIoU", "flicker", "flicker_occupied")


def run_command(variant: str, run_dir: Path, overrides: list[str]) -> list[str]:
    """``occdistill train`` for one variant; ``--resume`` when the run has a checkpoint."""
    resume = ["--resume"] if (run_dir / "checkpoints" / "latest.json").is_file() else []
    return [sys.executable, "-m", "occdistill", "train", "--out", str(run_dir), *resume, "street-tiny",
            *overrides, *VARIANTS[variant]]


def finished(run_dir: Path, steps: int) -> bool:
    """The run wrote its final metrics at ``steps`` (nothing left to train)."""
    path = run_dir / "metrics.json"
    return path.is_file() and json.loads(path.read_text()).get("step") == steps


def train_variants(args: argparse.Namespace, overrides: list[str]) -> None:
    procs = {}
    args.runs.mkdir(parents=True, exist_ok=True)
    for variant in VARIANTS:
        if finished(args.runs / variant, args.steps):
            print(f"{variant}: trained ({args.runs / variant}), reused", flush=True)
            continue
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


def eval_world(model, cfg, root: Path, split: Path, weight: float, rayiou: bool) -> dict:
    """One evaluation of a trained model on a split, with the voxel filter at ``weight``."""
    dataset = open_split(cfg.data, "val", augment=False, root=root, split_path=split)
    report = evaluate(model, dataset, torch.device("cpu"), rayiou=rayiou, temporal_filter=weight)
    out = {k: report.get(k) for k in KEYS if report.get(k) is not None}
    out["flicker_pairs"] = report["flicker_pairs"]
    if rayiou:
        out["per_class_iou"] = report["per_class"]
    return out


def pick_weight(tune: dict[str, dict[str, dict]]) -> float:
    """The rule of the module docstring, on the tune world: the lowest flicker of the feature-fusion
    model among weights whose mIoU is not below its unfiltered mIoU."""
    table = tune["temporal"]
    base = table["0.0"]["mIoU"]
    ok = [(r["flicker"], float(w)) for w, r in table.items() if float(w) > 0 and r["mIoU"] >= base]
    return min(ok)[1] if ok else 0.0


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
    parser.add_argument("--tune-scenes", type=int, default=3, help="scenes of the world that picks the filter weight")
    parser.add_argument("--test-scenes", type=int, default=6, help="scenes of the held-out test world")
    parser.add_argument("--filter-weights", type=float, nargs="+", default=[0.2, 0.3, 0.4, 0.5, 0.6],
                        help="candidate history weights of the voxel filter (tried on the tune world)")
    parser.add_argument("--out-json", type=Path, default=Path(__file__).parent / "results" / "temporal.json")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="street-tiny config overrides (both)")
    args = parser.parse_args(argv)
    if any(not 0.0 < w < 1.0 for w in args.filter_weights):
        parser.error(f"--filter-weights must lie in (0, 1), got {args.filter_weights}")
    load_start = os.getloadavg()

    data = generate("street", args.data, args.scenes, args.frames, args.seed,
                    overrides=[f"split.val_scenes={args.val_scenes}"], workers=2, progress=False)
    # All scenes of the tune and test worlds are evaluation scenes (val_scenes = scenes).
    worlds = {name: generate("street", args.data.parent / f"{args.data.name}_{name}", n, args.frames,
                             args.seed + offset, overrides=[f"split.val_scenes={n}"], workers=2, progress=False)
              for name, n, offset in (("tune", args.tune_scenes, 100), ("test", args.test_scenes, 200))}
    overrides = [
        f"data.root={data.out}", f"data.train_split={data.splits['train']}", f"data.val_split={data.splits['val']}",
        f"optim.max_steps={args.steps}", f"runtime.seed={args.seed}", "runtime.progress=false",
        "runtime.threads=1", "data.workers=0", "runtime.ckpt_every=100", "runtime.eval_every=0", *args.overrides,
    ]
    configs = {v: load_train_config("street-tiny", [*overrides, *extra]) for v, extra in VARIANTS.items()}

    t0 = time.perf_counter()
    train_variants(args, overrides)
    train_wall = time.perf_counter() - t0

    torch.set_num_threads(2)
    t1 = time.perf_counter()
    trained = {v: load_trained_model(args.runs / v, "ema") for v in VARIANTS}
    for t in trained.values():
        t.model.eval()
    splits = {"val": (data.out, data.splits["val"]),
              "test": (worlds["test"].out, worlds["test"].splits["val"])}
    tune_root, tune_split = worlds["tune"].out, worlds["tune"].splits["val"]
    tune = {v: {str(w): eval_world(trained[v].model, trained[v].checkpoint.config, tune_root, tune_split, w, False)
                for w in [0.0, *args.filter_weights]} for v in VARIANTS}
    weight = pick_weight(tune)
    print(f"filter weight picked on the tune world: {weight}", flush=True)

    results: dict[str, dict[str, dict]] = {}
    for name, (root, split) in splits.items():
        results[name] = {}
        for v in VARIANTS:
            for w, suffix in ((0.0, ""), (weight, "+filter")):
                if suffix and weight == 0.0:
                    continue
                r = eval_world(trained[v].model, trained[v].checkpoint.config, root, split, w, True)
                results[name][v + suffix] = r
    eval_wall = time.perf_counter() - t1

    for v in VARIANTS:
        summary = json.loads((args.runs / v / "metrics.json").read_text())
        results["val"][v].update(steps=summary["step"], train_minutes=round(summary["train_seconds"] / 60, 2))
    pipeline = "temporal+filter" if weight > 0 else "temporal"
    targets = {}
    for name in splits:
        single, full = results[name]["single"], results[name][pipeline]
        targets[name] = {"flicker_lower_with_fusion": full["flicker"] < single["flicker"],
                         "miou_not_lower_with_fusion": full["mIoU"] >= single["mIoU"],
                         "flicker_change_percent": round(100 * (full["flicker"] / single["flicker"] - 1), 1),
                         "miou_change": round(full["mIoU"] - single["mIoU"], 2)}
    report = {
        "benchmark": "temporal fusion on the synthetic street sequences",
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                    "threads_per_run": 1, "runs_in_parallel": not args.sequential,
                    "loadavg_at_start": [round(x, 2) for x in load_start],
                    "loadavg_at_end": [round(x, 2) for x in os.getloadavg()]},
        "data": {"scenes": args.scenes, "frames_per_scene": args.frames, "val_scenes": args.val_scenes,
                 "root": str(data.out),
                 "tune_world": {"scenes": args.tune_scenes, "seed": args.seed + 100, "root": str(worlds["tune"].out)},
                 "test_world": {"scenes": args.test_scenes, "seed": args.seed + 200, "root": str(worlds["test"].out)}},
        "seed": args.seed,
        "config_single": to_dict(configs["single"]),
        "temporal_overrides": VARIANTS["temporal"],
        "train_wall_minutes": round(train_wall / 60, 1),
        "eval_wall_minutes": round(eval_wall / 60, 1),
        "filter": {"candidates": args.filter_weights, "picked": weight, "pipeline": pipeline,
                   "rule": "lowest tune-world flicker of the feature-fusion model among weights whose tune mIoU is "
                           "not below its unfiltered tune mIoU",
                   "tune": tune},
        "variants": results,
        "targets": targets,
        "units": "percent; mIoU/IoU over mask_camera voxels (Occ3D devkit), SparseOcc RayIoU, flicker "
                 "over static camera-visible voxel pairs of consecutive frames",
    }
    atomic_write_json(args.out_json, report)
    print("\ntune world (flicker / mIoU by filter weight):")
    for v, table in tune.items():
        print(f"  {v:<9}" + "".join(f"  w={w}: {r['flicker']:.3f} / {r['mIoU']:.2f}" for w, r in table.items()))
    for name, table in results.items():
        print(f"\n{name}: {'variant':<16}" + "".join(f"{k:>18}" for k in KEYS))
        for v, r in table.items():
            print(f"{'':<{len(name) + 2}}{v:<16}" + "".join(f"{r[k]:>18.3f}" for k in KEYS))
    print(f"\ntargets ({pipeline} vs single): {targets}  ->  {args.out_json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
