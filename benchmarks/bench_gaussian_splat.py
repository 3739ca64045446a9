"""Benchmark the probabilistic Gaussian splat (occdistill.nn.gaussian_splat) and the Gaussian
teacher's forward on the CPU default configuration.

Splat: random Gaussians inside the synthetic-street grid (100x100x16 at 0.4 m, 18 classes), scales
uniform in the teacher's default range [0.08, 0.64] m, cutoff 3 sigma; for each number of Gaussians
and chunk size: forward (no grad) and forward + backward (a loss on log-probabilities and
probabilities), plain and with chunk checkpointing. The variants of one size are timed
round-robin after a warm-up round, so that they share the background load of a shared machine;
medians over repeats. Also records the pair count and the peak resident memory of the process.

Teacher: GaussianTeacherConfig() forward (eval, no grad) and one training step (forward, losses,
backward) for a batch of 1 sample with 6 cameras, medians over repeats.

Prints one JSON line and a short table; writes benchmarks/results/gaussian_splat.json.

    .venv/bin/python benchmarks/bench_gaussian_splat.py [--repeats 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import time
from pathlib import Path

import torch

from occdistill.geometry.grid import VoxelGrid
from occdistill.nn.gaussian_splat import splat_gaussians

ROOT = Path(__file__).resolve().parents[1]
GRID = VoxelGrid((-20.0, -20.0, -1.0, 20.0, 20.0, 5.4), (0.4, 0.4, 0.4))
NUM_SEM = 17


def gaussians(num: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    lo = torch.tensor(GRID.range[:3])
    hi = torch.tensor(GRID.range[3:])
    means = lo + torch.rand(1, num, 3, generator=gen) * (hi - lo)
    scales = 0.08 + torch.rand(1, num, 3, generator=gen) * 0.56
    rots = torch.randn(1, num, 4, generator=gen)
    opa = torch.rand(1, num, generator=gen)
    sem = torch.randn(1, num, NUM_SEM, generator=gen).softmax(-1)
    return means, scales, rots, opa, sem


def time_splat(inputs, chunk: int, grad: bool, ckpt: bool) -> tuple[float, int]:
    if grad:
        leaves = [t.clone().requires_grad_() for t in inputs]
        t0 = time.perf_counter()
        out = splat_gaussians(*leaves, GRID, chunk_size=chunk, checkpoint=ckpt)
        (out.log_probs[..., 3].sum() + out.probs[..., -1].sum()).backward()
    else:
        t0 = time.perf_counter()
        with torch.no_grad():
            out = splat_gaussians(*inputs, GRID, chunk_size=chunk)
    return time.perf_counter() - t0, out.pairs


def bench_splat(counts, chunks, repeats: int) -> list[dict]:
    rows = []
    for num in counts:
        inputs = gaussians(num)
        modes = ((False, False), (True, False), (True, True))  # (grad, checkpoint)
        variants = [(c, grad, ckpt) for grad, ckpt in modes for c in chunks]
        times = {v: [] for v in variants}
        pairs = 0
        for rep in range(repeats + 1):
            for v in variants:
                dt, pairs = time_splat(inputs, *v)
                if rep:  # round 0 is the warm-up
                    times[v].append(dt)
        for (chunk, grad, ckpt), ts in times.items():
            rows.append({
                "gaussians": num, "pairs": pairs, "chunk": chunk,
                "mode": "fwd+bwd checkpoint" if ckpt else ("fwd+bwd" if grad else "fwd"),
                "median_ms": round(1e3 * statistics.median(ts), 1), "min_ms": round(1e3 * min(ts), 1),
            })
    return rows


def bench_teacher(repeats: int) -> dict:
    from occdistill.losses.gaussian import GaussianLossConfig, gaussian_teacher_loss
    from occdistill.models.gaussian import GaussianTeacher, GaussianTeacherConfig

    cfg = GaussianTeacherConfig()
    torch.manual_seed(0)
    model = GaussianTeacher(cfg)
    h, w = cfg.image_size
    images = torch.rand(1, 6, 3, h, w)
    k = torch.tensor([[w * 0.6, 0, w / 2], [0, w * 0.6, h / 2], [0, 0, 1]]).expand(1, 6, 3, 3).clone()
    aug = torch.eye(3).expand(1, 6, 3, 3).clone()
    poses = []
    for n in range(6):
        yaw = 2 * math.pi * n / 6
        pose = torch.eye(4)
        c, s = math.cos(yaw), math.sin(yaw)
        pose[:3, :3] = torch.tensor([[s, 0, c], [-c, 0, s], [0, -1.0, 0]])  # OpenCV axes, looking along yaw
        pose[2, 3] = 1.5
        poses.append(pose)
    ego_from_cam = torch.stack(poses)[None]
    gx, gy, gz = cfg.grid.voxel_grid().shape
    labels = torch.full((1, gx, gy, gz), 17)
    labels[..., :3] = 11
    labels[:, 40:60, 40:60, 3:8] = 4

    class _Batch:
        semantics = labels
        mask_camera = torch.ones_like(labels, dtype=torch.bool)

    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    fwd, step, pairs = [], [], 0
    for rep in range(repeats + 1):
        model.eval()
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model(images, k, aug, ego_from_cam)
        t1 = time.perf_counter()
        model.train()
        out = model(images, k, aug, ego_from_cam)
        terms = gaussian_teacher_loss(out, _Batch, GaussianLossConfig())
        opt.zero_grad()
        terms["total"].backward()
        opt.step()
        t2 = time.perf_counter()
        pairs = out.splat_pairs
        if rep:
            fwd.append(t1 - t0)
            step.append(t2 - t1)
    return {
        "config": "GaussianTeacherConfig() defaults", "cameras": 6, "image": list(cfg.image_size),
        "gaussians": model.num_gaussians, "parameters_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
        "splat_pairs": pairs, "forward_eval_ms": round(1e3 * statistics.median(fwd), 1),
        "train_step_ms": round(1e3 * statistics.median(step), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--counts", type=int, nargs="+", default=[1024, 2560, 6400])
    parser.add_argument("--chunks", type=int, nargs="+", default=[1 << 16, 1 << 18, 1 << 20])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load0 = os.getloadavg()
    splat = bench_splat(args.counts, args.chunks, args.repeats)
    teacher = bench_teacher(args.repeats)
    result = {
        "bench": "gaussian_splat",
        "command": "benchmarks/bench_gaussian_splat.py " + " ".join(
            f"--{k} {' '.join(map(str, v)) if isinstance(v, list) else v}" for k, v in vars(args).items()),
        "machine": {
            "platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "load_average_at_start": [round(x, 2) for x in load0],
            "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        },
        "setup": {"grid": list(GRID.shape), "voxel_size": 0.4, "classes": NUM_SEM + 1, "scale_range": [0.08, 0.64],
                  "cutoff": 3.0, "batch": 1, "statistic": "median", "repeats": args.repeats},
        "splat": splat,
        "teacher": teacher,
    }
    print(json.dumps(result))
    print(f"{'gaussians':>9} {'pairs':>9} {'chunk':>8} {'mode':>20} {'median ms':>10}")
    for r in splat:
        print(f"{r['gaussians']:>9} {r['pairs']:>9} {r['chunk']:>8} {r['mode']:>20} {r['median_ms']:>10}")
    print(f"teacher: forward {teacher['forward_eval_ms']} ms, train step {teacher['train_step_ms']} ms "
          f"({teacher['gaussians']} Gaussians, {teacher['splat_pairs']} pairs)")
    out = ROOT / "benchmarks" / "results" / "gaussian_splat.json"
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
