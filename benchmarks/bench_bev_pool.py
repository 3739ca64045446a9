"""Benchmark the two BEV pooling paths and the full dense-student forward at FlashOcc geometry.

FlashOcc M0 (Yzichen/FlashOCC projects/configs/flashocc/flashocc-r50-M0.py): 6 cameras, input
256x704, ResNet-50 C4+C5 -> CustomFPN 256 ch at stride 16 (16x44 feature map), depth bins
[1, 45, 1.0] = 44, 64 LSS channels, BEV 200x200 at 0.4 m with one z bin [-1, 5.4], BEV encoder
64 -> (128, 256, 512) -> FPN_LSS 128, head 128 -> 16*18. M1 (flashocc-r50.py) differs only in
88 bins ([1, 45, 0.5]) and 256 BEV-encoder/head channels.

Calibration: the real nuScenes keyframe in ../shared/realdata (sensor2ego of the 6 cameras,
test-time resize 0.44 + top crop 140 px as FlashOcc), or a synthetic nuScenes-like rig if the
folder is absent. Timings: batch 1, eval mode, no_grad, medians over repeats; the variants are
timed round-robin after one warm-up round so that they share the background load of a shared
machine. Forward stages: backbone_neck; depth_net (camera gates, depth/context convs, softmax);
splat (frustum product, on the training path also the ego geometry, and pooling);
bev_encoder_head. The depth net is ours (camera-aware, 3x3 reduce + 1 BasicBlock), heavier than
FlashOcc M0's single 1x1 conv.

Prints one JSON line and a short table; writes benchmarks/results/bev_pool.json.

    .venv/bin/python benchmarks/bench_bev_pool.py [--repeats 5] [--pool-repeats 30] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from occdistill.deploy.rig import nuscenes_rig  # (intrinsics, img_from_raw, ego_from_cam, source, ...) at 256x704
from occdistill.geometry import OCC3D_GRID
from occdistill.nn import (
    BEVEncoder,
    BEVOccHead,
    DepthBins,
    FPNNeck,
    LSSViewTransformer,
    PrecomputedBEVPool,
    ResNet,
    bev_pool_scatter,
    precompute_pool_indices,
)

ROOT = Path(__file__).resolve().parents[1]
IMAGE = (256, 704)
STRIDE = 16
CONTEXT = 64
NUM_CLASSES = 18
CONFIGS = {"M0": (DepthBins(1.0, 45.0, 1.0), 128), "M1": (DepthBins(1.0, 45.0, 0.5), 256)}


class DenseStudent(torch.nn.Module):
    """FlashOcc-M0/M1-shaped composition of the nn blocks (for timing only)."""

    def __init__(self, bins: DepthBins, bev_channels: int):
        super().__init__()
        self.backbone = ResNet(50, out_indices=(2, 3))
        self.neck = FPNNeck(self.backbone.out_channels, 256)
        self.view = LSSViewTransformer(256, CONTEXT, IMAGE, STRIDE, bins, OCC3D_GRID, mid_channels=256)
        self.encoder = BEVEncoder(CONTEXT, bev_channels)
        self.head = BEVOccHead(bev_channels, OCC3D_GRID.shape[2], NUM_CLASSES)

        # Time the splat inside the unmodified view-transformer forward by shadowing the bound method.
        self._splat_seconds: list[float] = []
        splat = self.view.splat

        def timed_splat(*args):
            t = time.perf_counter()
            out = splat(*args)
            self._splat_seconds.append(time.perf_counter() - t)
            return out

        self.view.splat = timed_splat

    def forward_timed(self, images, intrinsics, img_from_raw, ego_from_cam) -> tuple[torch.Tensor, dict[str, float]]:
        """backbone -> neck -> view transform -> encoder -> head, with per-stage seconds."""
        t0 = time.perf_counter()
        batch, cams = images.shape[:2]
        feat = self.neck(self.backbone(images.flatten(0, 1)))  # (B*N, 256, 16, 44)
        t1 = time.perf_counter()
        view = self.view(feat.view(batch, cams, *feat.shape[1:]), intrinsics, img_from_raw, ego_from_cam)
        t2 = time.perf_counter()
        out = self.head(self.encoder(view.bev))
        t3 = time.perf_counter()
        splat = self._splat_seconds.pop()
        times = {"backbone_neck": t1 - t0, "depth_net": t2 - t1 - splat, "splat": splat,
                 "bev_encoder_head": t3 - t2, "total": t3 - t0}
        return out, times


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_samples_ms(fns: dict, repeats: int, device: torch.device) -> dict[str, list[float]]:
    """Milliseconds of each callable, timed round-robin so that all of them see the same
    background load (the machine is shared), after one warm-up call each."""
    samples = {name: [] for name in fns}
    for rep in range(repeats + 1):
        for name, fn in fns.items():
            _sync(device)
            t = time.perf_counter()
            fn()
            _sync(device)
            if rep:
                samples[name].append(1e3 * (time.perf_counter() - t))
    return samples


def bench_pool(bins: DepthBins, rig, repeats: int, device: torch.device) -> dict:
    k, aug, pose = (t[None].to(device) for t in rig)  # (1, N, ...)
    view = LSSViewTransformer(8, CONTEXT, IMAGE, STRIDE, bins, OCC3D_GRID, mid_channels=8).to(device)
    points = view.ego_points(k, aug, pose)  # (1, N, D, h, w, 3)
    gen = torch.Generator().manual_seed(0)
    # Realistic magnitudes: softmax depth x context features with a non-zero mean.
    depth = (2 * torch.randn(*points.shape[:-1], generator=gen)).softmax(dim=2)
    context = torch.randn(*points.shape[:2], *points.shape[3:5], CONTEXT, generator=gen) + 1.0
    frustum = (depth[..., None] * context[:, :, None]).to(device)  # (1, N, D, h, w, C)
    _sync(device)
    t = time.perf_counter()
    indices = precompute_pool_indices(points[0], OCC3D_GRID)
    _sync(device)
    precompute_ms = 1e3 * (time.perf_counter() - t)
    pool = PrecomputedBEVPool(indices)
    with torch.no_grad():
        samples = interleaved_samples_ms(
            {
                "train": lambda: bev_pool_scatter(frustum, view.ego_points(k, aug, pose), OCC3D_GRID),
                "scatter_only": lambda: bev_pool_scatter(frustum, points, OCC3D_GRID),
                "export": lambda: pool(frustum),
            },
            repeats,
            device,
        )
        times = {name: statistics.median(v) for name, v in samples.items()}
        reference = bev_pool_scatter(frustum.double(), points, OCC3D_GRID)
        err_train = (bev_pool_scatter(frustum, points, OCC3D_GRID) - reference).abs().max().item()
        err_export = (pool(frustum) - reference).abs().max().item()
    return {
        "frustum_points": int(points[..., 0].numel()),
        "kept_points": int(indices.point_index.numel()),
        "nonempty_cells": int(indices.interval_end.numel()),
        "precompute_ms": round(precompute_ms, 2),
        "train_path_ms": round(times["train"], 2),
        "train_path_scatter_only_ms": round(times["scatter_only"], 2),
        "export_path_ms": round(times["export"], 2),
        "ratio_export_over_train": round(times["export"] / times["train"], 3),
        # Background load only adds time: the minimum is the less noisy estimate on a shared machine.
        "train_path_min_ms": round(min(samples["train"]), 2),
        "export_path_min_ms": round(min(samples["export"]), 2),
        "ratio_export_over_train_of_minima": round(min(samples["export"]) / min(samples["train"]), 3),
        "max_abs_err_vs_float64_train_path": err_train,
        "max_abs_err_vs_float64_export_path": err_export,
        "max_abs_bev_value": reference.abs().max().item(),
    }


def bench_forward(bins: DepthBins, bev_channels: int, rig, repeats: int, device: torch.device) -> dict:
    torch.manual_seed(0)
    model = DenseStudent(bins, bev_channels).eval().to(device)
    k, aug, pose = (t[None].to(device) for t in rig)
    images = torch.randn(1, 6, 3, *IMAGE, device=device)
    model.view.set_fixed_rig(*(t.to(device) for t in rig))
    fixed = model.view.fixed_pool
    result = {"params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 2)}
    runs = {"train_path": [], "export_path": []}
    with torch.no_grad():
        for rep in range(repeats + 1):  # round-robin, first round is the warm-up
            for path in runs:
                model.view.fixed_pool = fixed if path == "export_path" else None
                _sync(device)
                times = model.forward_timed(images, k, aug, pose)[1]
                _sync(device)
                if rep:
                    runs[path].append(times)
    for path, samples in runs.items():
        stages = {key: round(1e3 * statistics.median(r[key] for r in samples), 1) for key in samples[0]}
        stages["splat_share"] = round(stages["splat"] / stages["total"], 4)
        stages["total_min"] = round(1e3 * min(r["total"] for r in samples), 1)
        stages["splat_min"] = round(1e3 * min(r["splat"] for r in samples), 1)
        result[path] = stages
    return result


def machine(device: torch.device) -> dict:
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        lines = cpuinfo.read_text().splitlines()
        names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
        cpu = names[0] if names else cpu
    return {
        "platform": platform.platform(),
        "cpu": cpu,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed full forwards per path (after 1 warm-up)")
    parser.add_argument("--pool-repeats", type=int, default=30, help="timed pooling calls per path")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "bev_pool.json")
    args = parser.parse_args()
    device = torch.device(args.device)

    rig = nuscenes_rig()
    report = {
        "bench": "bev_pool",
        "command": f"benchmarks/bench_bev_pool.py --repeats {args.repeats} --pool-repeats {args.pool_repeats} "
        f"--device {args.device}",
        "machine": machine(device),
        "rig": rig[3],
        "setup": {"cameras": 6, "image": list(IMAGE), "stride": STRIDE, "feature_map": [16, 44],
                  "context_channels": CONTEXT, "bev": list(OCC3D_GRID.shape[:2]), "batch": 1, "device": str(device),
                  "repeats": args.repeats, "pool_repeats": args.pool_repeats, "statistic": "median"},
    }
    rig = rig[:3]
    for name, (bins, _) in CONFIGS.items():
        report[f"pool_{name}"] = {"depth_bins": bins.num_bins, **bench_pool(bins, rig, args.pool_repeats, device)}
    bins, channels = CONFIGS["M0"]
    report["forward_M0_ms"] = bench_forward(bins, channels, rig, args.repeats, device)
    fwd = report["forward_M0_ms"]
    report["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    report["summary"] = {
        "ratio_export_over_train_M0": report["pool_M0"]["ratio_export_over_train"],
        "ratio_export_over_train_M1": report["pool_M1"]["ratio_export_over_train"],
        "splat_share_of_forward_train_path": fwd["train_path"]["splat_share"],
        "splat_share_of_forward_export_path": fwd["export_path"]["splat_share"],
        "ratio_export_over_train_M0_of_minima": report["pool_M0"]["ratio_export_over_train_of_minima"],
        "ratio_export_over_train_M1_of_minima": report["pool_M1"]["ratio_export_over_train_of_minima"],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report))
    print(f"\n{'':24s}{'train path':>12s}{'export path':>13s}  (ms, median)")
    for name in CONFIGS:
        r = report[f"pool_{name}"]
        print(f"pool {name} ({r['depth_bins']} bins){'':5s}{r['train_path_ms']:12.1f}{r['export_path_ms']:13.1f}")
    for key in ("backbone_neck", "depth_net", "splat", "bev_encoder_head", "total"):
        print(f"forward M0 {key:14s}{fwd['train_path'][key]:12.1f}{fwd['export_path'][key]:13.1f}")


if __name__ == "__main__":
    main()
