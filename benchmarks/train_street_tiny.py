"""Benchmark: does the dense student learn? ``street-tiny`` trained on the synthetic street world.

    .venv/bin/python benchmarks/train_street_tiny.py [--scenes 20] [--frames 8] [--val-scenes 3]
        [--steps N] [--data DIR] [--run DIR] [--out-json PATH] [--skip-m0] [key=value ...]

1. Generates the street world (``occdistill synth`` defaults: 100x100x16 grid, six 320x180
   cameras; scenes x frames keyframes, the last ``val-scenes`` scenes form the val split), or
   reuses ``--data`` when it already holds that dataset.
2. Measures the data pipeline alone: training samples (with augmentation and rendered depth)
   per second through a DataLoader with 2 worker processes.
3. Trains ``street-tiny`` as configured (24 epochs; ``--steps`` and ``key=value`` overrides apply),
   evaluating every 408 steps (6 epochs) and at the end on the val split: Occ3D mIoU and geometry
   IoU over ``mask_camera``, RayIoU (the EMA weights, as FlashOcc evaluates).
4. Scores two image-free baselines on the same val split: all-free, and the per-voxel majority
   class of the training labels.
5. Builds ``flashocc-m0`` (R50, 256x704, 44 bins, 128 BEV channels, Occ3D grid) and runs one
   forward/backward on the CPU (``--skip-m0`` to skip).

Prints one JSON line and a table and writes the JSON to benchmarks/results/train_street_tiny.json
(command, machine, load average, timings, metrics). Timings on a shared machine are noisy: the load
average before and after is recorded.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shlex
import shutil
import sys
import time
from pathlib import Path

import torch

from occdistill.config import to_dict
from occdistill.data.synth import generate
from occdistill.engine.baselines import baseline_reports
from occdistill.engine.config import load_train_config
from occdistill.engine.data import open_split, train_loader
from occdistill.engine.distributed import DistContext, ResumableSampler
from occdistill.engine.loop import train
from occdistill.losses.supervised import voxel_cross_entropy
from occdistill.models.build import build_model

TIME_BUDGET_MIN = 20.0
LOADER_WORKERS = 2


def loader_rate(cfg, batches: int = 30) -> float:
    """Training samples per second through the configured loader with 2 workers, after start-up."""
    dataset = open_split(cfg.data, "train", augment=True, seed=cfg.runtime.seed)
    data_cfg = dataclasses.replace(cfg.data, workers=LOADER_WORKERS)
    sampler = ResumableSampler(dataset, DistContext(), cfg.runtime.seed)
    sampler.set_epoch(0)
    it = iter(train_loader(dataset, sampler, data_cfg, cfg.runtime.seed, epoch=0))
    next(it)  # workers started, first batch in
    start = time.perf_counter()
    n = 0
    for _, item in zip(range(batches), it):
        n += len(item.batch)
    return n / (time.perf_counter() - start)


def flashocc_m0_step() -> dict:
    """Build ``flashocc-m0`` from its config and run one forward/backward on the CPU: batch 1,
    six 256x704 cameras on a nuScenes-like ring (yaw every 60 deg, 1.5 m high), random images."""
    cfg = load_train_config("flashocc-m0")
    torch.manual_seed(0)
    model = build_model(cfg.model)
    cams, (h, w) = 6, cfg.model.dense.image_size
    k = torch.tensor([[560.0, 0.0, w / 2], [0.0, 560.0, h / 2], [0.0, 0.0, 1.0]]).expand(1, cams, 3, 3)
    poses = torch.eye(4).repeat(1, cams, 1, 1)
    for n in range(cams):
        yaw = torch.tensor(n * torch.pi / 3)
        forward = torch.stack([yaw.cos(), yaw.sin(), torch.tensor(0.0)])
        left = torch.stack([-yaw.sin(), yaw.cos(), torch.tensor(0.0)])
        # camera axes in the ego frame (OpenCV: x right, y down, z forward)
        poses[0, n, :3, :3] = torch.stack([-left, torch.tensor([0.0, 0.0, -1.0]), forward], dim=1)
        poses[0, n, :3, 3] = torch.tensor([0.0, 0.0, 1.5])
    images = torch.rand(1, cams, 3, h, w)
    labels = torch.randint(0, 18, (1, *model.grid.shape))
    t0 = time.perf_counter()
    out = model(images, k, torch.eye(3).expand(1, cams, 3, 3), poses)
    t1 = time.perf_counter()
    voxel_cross_entropy(out.voxel_logits, labels).backward()
    t2 = time.perf_counter()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    return {"params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
            "voxel_logits": list(out.voxel_logits.shape), "depth": list(out.depth.shape),
            "forward_seconds": round(t1 - t0, 2), "backward_seconds": round(t2 - t1, 2),
            "parameters_without_grad": len(missing)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenes", type=int, default=20)
    parser.add_argument("--frames", type=int, default=8, help="keyframes per scene")
    parser.add_argument("--val-scenes", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=0, help="optimiser steps (default: the config's 24 epochs)")
    parser.add_argument("--data", type=Path, default=Path("outputs/bench/street"), help="dataset directory (reused)")
    parser.add_argument("--run", type=Path, default=Path("outputs/bench/street-tiny"), help="run directory (replaced)")
    parser.add_argument("--out-json", type=Path, default=Path(__file__).parent / "results" / "train_street_tiny.json")
    parser.add_argument("--skip-m0", action="store_true", help="skip the flashocc-m0 forward/backward check")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="street-tiny config overrides")
    args = parser.parse_args(argv)
    load_start = os.getloadavg()
    m0 = None if args.skip_m0 else flashocc_m0_step()

    t0 = time.perf_counter()
    data = generate("street", args.data, args.scenes, args.frames, args.seed,
                    overrides=[f"split.val_scenes={args.val_scenes}"], workers=2, progress=False)
    synth_seconds = time.perf_counter() - t0
    cfg = load_train_config("street-tiny", [
        f"data.root={data.out}", f"data.train_split={data.splits['train']}", f"data.val_split={data.splits['val']}",
        f"optim.max_steps={args.steps}", f"runtime.seed={args.seed}", "runtime.progress=false",
        "runtime.eval_every=408", *args.overrides,
    ])

    samples_per_s_loader = loader_rate(cfg)

    shutil.rmtree(args.run, ignore_errors=True)
    t0 = time.perf_counter()
    result = train(cfg, args.run)
    wall_seconds = time.perf_counter() - t0
    samples_per_step = cfg.data.batch_size * cfg.optim.accum_steps
    steps_per_s = result.step / result.seconds
    train_sets = (open_split(cfg.data, "train", augment=False), open_split(cfg.data, "val", augment=False))
    t0 = time.perf_counter()
    baselines = baseline_reports(*train_sets)
    baseline_seconds = time.perf_counter() - t0

    keys = ("mIoU", "IoU", "RayIoU", "RayIoU@1m", "RayIoU@2m", "RayIoU@4m")
    rows = {"street-tiny": result.metrics, **baselines}
    majority = baselines["voxel-majority"]["mIoU"]
    report = {
        "benchmark": "train_street_tiny",
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                    "torch_threads_in_training": cfg.runtime.threads or "auto (cpus - loader workers)",
                    "loadavg_at_start": [round(x, 2) for x in load_start],
                    "loadavg_at_end": [round(x, 2) for x in os.getloadavg()]},
        "data": {"scenes": args.scenes, "frames_per_scene": args.frames, "val_scenes": args.val_scenes,
                 "train_samples": len(train_sets[0]), "val_samples": len(train_sets[1]),
                 "grid_shape": list(train_sets[0].grid.shape), "synth_seconds": round(synth_seconds, 1),
                 "synth_generated": data.generated},
        "config": to_dict(cfg),
        "training": {"steps": result.step, "samples_per_step": samples_per_step,
                     "epochs": round(result.step * samples_per_step / len(train_sets[0]), 2),
                     "train_seconds": round(result.seconds, 1), "train_minutes": round(result.seconds / 60, 2),
                     "wall_seconds_with_final_eval": round(wall_seconds, 1), "skipped_steps": result.bad_steps,
                     "within_budget": result.seconds / 60 <= TIME_BUDGET_MIN, "budget_minutes": TIME_BUDGET_MIN},
        "throughput": {"loader_samples_per_s_2_workers": round(samples_per_s_loader, 2),
                       "train_samples_per_s": round(steps_per_s * samples_per_step, 2),
                       "train_steps_per_s": round(steps_per_s, 3),
                       "loader_over_train_ratio": round(samples_per_s_loader / (steps_per_s * samples_per_step), 2)},
        "metrics": {name: {k: r[k] for k in keys} for name, r in rows.items()},
        "per_class_iou": {name: r["per_class"] for name, r in rows.items()},
        "miou_over_voxel_majority": round(result.metrics["mIoU"] / majority, 2) if majority else None,
        "baseline_seconds": round(baseline_seconds, 1),
        "flashocc_m0_cpu_forward_backward": m0,
        "units": "percent; Occ3D devkit mIoU/IoU over mask_camera voxels, SparseOcc RayIoU",
    }
    args.out_json.parent.mkdir(parents=True, exist_ok=True)
    args.out_json.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report))
    print(f"\n{'predictor':<16}" + "".join(f"{k:>11}" for k in keys))
    for name, r in rows.items():
        print(f"{name:<16}" + "".join(f"{r[k]:>11.2f}" if r[k] is not None else f"{'-':>11}" for k in keys))
    t, rates = report["training"], report["throughput"]
    print(f"\ntrained {t['steps']} steps ({t['epochs']} epochs) in {t['train_minutes']} min; "
          f"loader {rates['loader_samples_per_s_2_workers']} samples/s vs training "
          f"{rates['train_samples_per_s']} samples/s (x{rates['loader_over_train_ratio']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
