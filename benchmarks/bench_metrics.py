"""Benchmark of the evaluation metrics: voxel mIoU and RayIoU throughput, and the vectorised RayIoU
against a straightforward per-ray float64 traversal measured in the same run.

    python benchmarks/bench_metrics.py [--samples 24] [--repeats 3] [--out benchmarks/results/metrics.json]

Inputs are real when ../shared/realdata is present (the Occ3D label of the visualisation demo as GT,
a prediction made from it by a 0.8 m shift plus 2 % relabelled voxels, and the LiDAR origins of the
81 nuScenes-mini val keyframes from their real poses, up to 8 per sample); otherwise a synthetic
street and a straight trajectory. 200x200x16 grid, 14,040 rays per origin.

Timings on a shared machine are noisy: per-sample medians over all repeats are quoted, wall and CPU
(process) time both, and the load average is recorded. Prints one JSON line and a short table;
writes the JSON (with the command and the machine) to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from occdistill.data.classes import OCC3D_NUSCENES
from occdistill.io import atomic_write_json
from occdistill.metrics.occ3d import Occ3DAccumulator
from occdistill.metrics.rayiou import RayIoUAccumulator, lidar_origins

REPO = Path(__file__).resolve().parents[1]
REALDATA = REPO.parent / "shared" / "realdata" / "occ3d_openocc_occupancy_vis_demo"
FREE = OCC3D_NUSCENES.free_index
TARGETS = {"rayiou_samples_per_s": 5.0, "rayiou_speedup_vs_reference": 10.0, "voxel_miou_samples_per_s": 200.0}


def load_inputs(n: int, rng: np.random.Generator):
    """GT (X,Y,Z) uint8, camera mask, a list of n origin arrays, and where they come from."""
    label = REALDATA / "3D_occupancy_data.npz"
    infos_path = REALDATA / "world-nuscenes_mini_infos_val.pkl"
    if label.exists() and infos_path.exists():
        from occdistill.data.infos import load_infos
        from occdistill.data.labels import load_occ3d_labels

        lab = load_occ3d_labels(label)
        infos = load_infos(infos_path)
        picks = np.round(np.linspace(0, len(infos.frames) - 1, n)).astype(int)
        origins = [lidar_origins(infos.scene_frames(infos.frames[i].scene_name), infos.frames[i]) for i in picks]
        return lab.semantics, lab.mask_camera.astype(np.uint8), origins, "real: Occ3D label + 81 mini-val keyframe poses"
    sem = np.full((200, 200, 16), FREE, np.uint8)
    sem[:, :, :2] = 14
    sem[:, 80:120, 2] = 11
    sem[:, 60:70, 3:9] = 15
    sem[:, 130:140, 3:12] = 16
    mask = (rng.random(sem.shape) < 0.6).astype(np.uint8)
    base = np.array([0.94, 0.0, 1.84])
    origins = [base + np.array([[dx, 0.0, 0.0] for dx in np.linspace(-30, 30, 8)]) for _ in range(n)]
    return sem, mask, origins, "synthetic street (shared/realdata absent)"


def make_prediction(gt: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    pred = np.full_like(gt, FREE)
    pred[2:] = gt[:-2]  # 0.8 m shift
    noise = rng.random(gt.shape) < 0.02
    pred[noise] = rng.integers(0, 18, int(noise.sum()))
    return pred


def timed(fn) -> tuple[float, float]:
    w, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w, time.process_time() - c


def machine() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "metric_threads": "1 (the metric updates scope torch to one intra-op thread on CPU)",
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
    }


def loadavg() -> list[float] | None:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=24, help="RayIoU samples per repeat")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--voxel-samples", type=int, default=400, help="voxel mIoU updates per repeat")
    ap.add_argument("--reference-samples", type=int, default=1, help="samples cast with the per-ray loop")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "metrics.json")
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    load_before = loadavg()
    gt, mask, origins, source = load_inputs(args.samples, rng)
    pred = make_prediction(gt, rng)

    # Voxel mIoU (devkit protocol, uint8 mask as stored).
    vox_times = []
    for _ in range(args.repeats):
        acc = Occ3DAccumulator()
        w, c = timed(lambda: [acc.update(pred, gt, mask) for _ in range(args.voxel_samples)])
        vox_times.append((w / args.voxel_samples, c / args.voxel_samples))
    vox_wall = statistics.median(t[0] for t in vox_times)
    vox_cpu = statistics.median(t[1] for t in vox_times)

    # RayIoU, vectorised: one update per sample (8 origins x 14,040 rays, GT and prediction).
    ray_times = []
    warm = RayIoUAccumulator()
    warm.update(pred, gt, origins[0])
    for _ in range(args.repeats):
        acc = RayIoUAccumulator()
        for o in origins:
            ray_times.append(timed(lambda: acc.update(pred, gt, o)))
    ray_result = acc.compute()
    ray_wall = statistics.median(t[0] for t in ray_times)
    ray_cpu = statistics.median(t[1] for t in ray_times)

    # The straightforward per-ray float64 traversal (Python loop over rays, one DDA each), on the
    # same samples; its counts must equal the vectorised ones.
    ref_times = []
    ref = RayIoUAccumulator(backend="reference")
    vec = RayIoUAccumulator()
    for o in origins[: args.reference_samples]:
        ref_times.append(timed(lambda: ref.update(pred, gt, o)))
        vec.update(pred, gt, o)
    identical = bool(
        torch.equal(ref.tp_count, vec.tp_count)
        and torch.equal(ref.gt_count, vec.gt_count)
        and torch.equal(ref.pred_count, vec.pred_count)
    )
    ref_wall = statistics.median(t[0] for t in ref_times)
    ref_cpu = statistics.median(t[1] for t in ref_times)

    result = {
        "benchmark": "metrics",
        "command": " ".join(["python benchmarks/bench_metrics.py", *(sys.argv[1:] if argv is None else argv)]),
        "machine": machine(),
        "load_average_before": load_before,
        "load_average_after": loadavg(),
        "inputs": {
            "source": source,
            "grid": [200, 200, 16],
            "rays_per_origin": 14040,
            "origins_per_sample": [len(o) for o in origins],
            "rayiou_samples_timed": len(ray_times),
            "voxel_samples_timed": args.voxel_samples * args.repeats,
        },
        "voxel_miou": {
            "median_s_per_sample_wall": vox_wall,
            "median_s_per_sample_cpu": vox_cpu,
            "samples_per_s_wall": 1.0 / vox_wall,
        },
        "rayiou_vectorised": {
            "median_s_per_sample_wall": ray_wall,
            "median_s_per_sample_cpu": ray_cpu,
            "samples_per_s_wall": 1.0 / ray_wall,
            "samples_per_s_cpu": 1.0 / ray_cpu,
            "rayiou_of_the_timed_prediction": ray_result.rayiou,
        },
        "rayiou_reference_per_ray_loop": {
            "median_s_per_sample_wall": ref_wall,
            "median_s_per_sample_cpu": ref_cpu,
            "samples": len(ref_times),
            "counts_identical_to_vectorised": identical,
        },
        "speedup_vectorised_vs_reference": {"wall": ref_wall / ray_wall, "cpu": ref_cpu / ray_cpu},
    }
    result["meets_targets"] = {
        "rayiou_samples_per_s>=5": result["rayiou_vectorised"]["samples_per_s_wall"] >= TARGETS["rayiou_samples_per_s"],
        "rayiou_speedup>=10": result["speedup_vectorised_vs_reference"]["wall"] >= TARGETS["rayiou_speedup_vs_reference"],
        "voxel_miou_samples_per_s>=200": result["voxel_miou"]["samples_per_s_wall"] >= TARGETS["voxel_miou_samples_per_s"],
        "reference_counts_identical": identical,
    }
    print(json.dumps(result))
    print()
    print(f"{'metric':<34}{'wall s/sample':>15}{'cpu s/sample':>14}{'samples/s':>11}")
    print(f"{'voxel mIoU (devkit)':<34}{vox_wall:>15.5f}{vox_cpu:>14.5f}{1 / vox_wall:>11.1f}")
    print(f"{'RayIoU vectorised':<34}{ray_wall:>15.4f}{ray_cpu:>14.4f}{1 / ray_wall:>11.2f}")
    print(f"{'RayIoU per-ray float64 loop':<34}{ref_wall:>15.3f}{ref_cpu:>14.3f}{1 / ref_wall:>11.3f}")
    print(f"speedup (wall) {ref_wall / ray_wall:.1f}x, counts identical: {identical}, load {load_before} -> {loadavg()}")
    if args.out:
        atomic_write_json(args.out, result)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
