"""FlashOcc M0 (and M1) at full size: parameters and FLOPs next to the published numbers, one
forward/backward on CPU, and the per-stage (Amdahl) profile of M0 with both pooling paths.

Published (Yzichen/FlashOCC README.md at 4084861, "Main Results / 1. FlashOCC"; FLOPs from
tools/analysis_tools/get_flops.py = mmcv ``get_model_complexity_info``, batch 1 x 6 cameras
256x704, which counts multiply-accumulates): M0 154.1 GFLOPs, 39.94 M params, 197.6 FPS; M1
248.57 GFLOPs, 44.74 M params, 152.7 FPS (RTX 3090, TensorRT FP16, engine only).

Our count (``torch.utils.flop_counter.FlopCounterMode``) covers conv/matmul-type ops, 2 FLOPs per
multiply-add; ``gmacs`` = GFLOPs / 2 is the unit to compare. mmcv also counts BN/ReLU elements and
biases (a few %), neither counts the LSS outer product nor the pooling. The models are the built-in
configs ``flashocc-m0`` / ``flashocc-m1`` (occdistill/configs); our depth net (3x3 reduce +
BasicBlock + two 1x1 convs) is heavier than FlashOcc's single 1x1 conv 256 -> D + 64:
``*_flashocc_depth_net`` swaps in that conv's count for a like-for-like comparison.

Profile: batch 1, eval, inference mode, the first sample of a synthetic street dataset rendered at
nuScenes' 1600x900 (JPEG, like nuScenes) and resized/cropped to 256x704 as FlashOcc's test
pipeline; end-to-end includes reading and decoding the 6 JPEGs. Both pooling paths are timed
round-robin in the same run. M0 takes seconds per forward on a 2-core CPU, so the default is few
repeats; shares and ratios, measured in one run, are the numbers to read, not absolute times.

Prints one JSON line and a short table; writes benchmarks/results/flashocc_m0.json.

    .venv/bin/python benchmarks/bench_flashocc_m0.py [--repeats 5] [--warmup 1] [--frames 3] [--device cpu]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import torch

from occdistill.config import to_dict
from occdistill.data.synth import generate
from occdistill.deploy.bench import (
    STAGES,
    benchmark,
    count_stage_flops,
    dataset_inputs,
    format_table,
    load_bench_model,
    measure_peak_memory,
    open_bench_dataset,
    synthetic_inputs,
)
from occdistill.losses.supervised import voxel_cross_entropy
from occdistill.models.dense import DenseStudent

ROOT = Path(__file__).resolve().parents[1]
SOURCE = "Yzichen/FlashOCC README.md @4084861d (Main Results, 1. FlashOCC); FLOPs via tools/analysis_tools/get_flops.py"
PUBLISHED = {
    "M0": {"gflops_mmcv": 154.1, "params_M": 39.94, "fps_rtx3090_trt_fp16": 197.6, "miou": 31.95},
    "M1": {"gflops_mmcv": 248.57, "params_M": 44.74, "fps_rtx3090_trt_fp16": 152.7, "miou": 32.08},
}
CONFIGS = {"M0": "flashocc-m0", "M1": "flashocc-m1"}  # built-in training configs
MODULES = ("backbone", "neck", "view_transform", "bev_encoder", "head")


def _params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def size_report(name: str, model: DenseStudent, flops: dict[str, int]) -> dict:
    """Parameters per module and FLOPs per stage next to the published numbers."""
    cfg = model.cfg
    total_params = _params(model)
    bins = model.view_transform.depth_bins.num_bins
    h, w = model.view_transform.feature_size
    # FlashOcc's depth net: Conv2d(256, D + 64, 1) with bias, on 6 cameras x h x w cells.
    fo_depth_params = cfg.neck_channels * (bins + cfg.context_channels) + bins + cfg.context_channels
    fo_depth_macs = 6 * h * w * cfg.neck_channels * (bins + cfg.context_channels)
    depth_params = _params(model.view_transform.depth_net)
    total_macs = sum(flops.values()) / 2
    fo_macs = total_macs - flops["depth_net"] / 2 + fo_depth_macs
    fo_params = total_params - depth_params + fo_depth_params
    pub = PUBLISHED[name]
    return {
        "model_config": to_dict(cfg),
        "depth_bins": bins,
        "bev_channels": cfg.bev_channels,
        "params_M": round(total_params / 1e6, 3),
        "params_M_by_module": {m: round(_params(getattr(model, m)) / 1e6, 3) for m in MODULES},
        "depth_net_params_M": round(depth_params / 1e6, 3),
        "params_M_flashocc_depth_net": round(fo_params / 1e6, 3),
        "gflops": round(2 * total_macs / 1e9, 2),
        "gmacs": round(total_macs / 1e9, 2),
        "gmacs_by_stage": {s: round(flops[s] / 2e9, 3) for s in STAGES},
        "gmacs_flashocc_depth_net": round(fo_macs / 1e9, 2),
        "published": pub,
        "ratio_params_flashocc_depth_net_over_published": round(fo_params / 1e6 / pub["params_M"], 4),
        "ratio_gmacs_flashocc_depth_net_over_published": round(fo_macs / 1e9 / pub["gflops_mmcv"], 4),
    }


def train_step(model: DenseStudent, device: torch.device) -> dict:
    """One forward + backward with a voxel CE loss on random labels; every gradient must be finite."""
    model.train()
    inputs = synthetic_inputs(model, batch=1, device=device, seed=1)
    gen = torch.Generator().manual_seed(2)
    grid = model.grid.shape
    labels = torch.randint(0, model.cfg.num_classes, (1, *grid), generator=gen).to(device)
    times = {}

    def step():
        t = time.perf_counter()
        out = model(*inputs.args())
        loss = voxel_cross_entropy(out.voxel_logits, labels)
        times["forward_s"] = time.perf_counter() - t
        t = time.perf_counter()
        loss.backward()
        times["backward_s"] = time.perf_counter() - t
        return loss.detach()

    model.zero_grad(set_to_none=True)
    peak_mb, kind = measure_peak_memory(step, device)
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    nonfinite = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    assert not missing, f"parameters without a gradient: {missing[:5]}"
    assert not nonfinite, f"non-finite gradients: {nonfinite[:5]}"
    grad_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()])).item()
    model.zero_grad(set_to_none=True)
    model.eval()
    return {
        "batch": 1,
        "forward_s": round(times["forward_s"], 2),
        "backward_s": round(times["backward_s"], 2),
        "peak_memory_mb": round(peak_mb, 1),
        "peak_memory_kind": kind,
        "grads_finite": True,
        "params_with_grad": sum(1 for p in model.parameters() if p.requires_grad),
        "grad_global_norm": round(grad_norm, 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (each: both pooling paths)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--frames", type=int, default=3, help="synthetic street frames for the end-to-end run")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "flashocc_m0.json")
    args = parser.parse_args()
    device = torch.device(args.device)
    start = time.perf_counter()

    report: dict = {
        "bench": "flashocc_m0",
        "command": f"benchmarks/bench_flashocc_m0.py --repeats {args.repeats} --warmup {args.warmup} "
        f"--frames {args.frames} --device {args.device}",
        "published_source": SOURCE,
        "flop_note": "ours: FlopCounterMode (conv/matmul only, 2 per MAC); gmacs = gflops / 2 is comparable to "
        "mmcv get_flops (MACs, plus BN/ReLU elements); *_flashocc_depth_net swaps our depth net (3x3 reduce + "
        "BasicBlock + 1x1 convs) for FlashOcc's single 1x1 conv",
    }

    # 1. Sizes of M0 and M1, FLOPs on the real nuScenes rig (batch 1, 6 cameras, 256x704).
    torch.manual_seed(0)
    models = {}
    for name, config in CONFIGS.items():
        model = load_bench_model(config=config).model.eval().to(device)
        flops = count_stage_flops(model, synthetic_inputs(model, batch=1, device=device))
        report[f"size_{name}"] = size_report(name, model, flops)
        models[name] = model
    del models["M1"]
    m0 = models["M0"]

    # 2. One training step of M0 on CPU.
    report["train_step_M0"] = train_step(m0, device)

    # 3. Per-stage profile of M0, engine-only (both pooling paths) and end-to-end.
    with tempfile.TemporaryDirectory() as tmp:
        synth = generate("street", Path(tmp) / "street", scenes=1, frames=args.frames, seed=0,
                         overrides=["rig.width=1600", "rig.height=900"], progress=False)
        ds = open_bench_dataset("occ3d", synth.out, synth.splits["val"], m0.cfg.image_size)
        inputs = dataclasses.replace(
            dataset_inputs(ds, batch=1, device=device),
            source=f"synthetic street, {len(ds)} frames, 6 x 1600x900 JPEG -> 256x704 (FlashOcc test resize/crop)",
            rig="synthetic street rig (nuScenes mounts and image size, 70 deg hfov)",
        )
        result = benchmark(m0, inputs, dataset=ds, model_name="flashocc-m0", repeats=args.repeats,
                           warmup=args.warmup, progress=True)
    report["profile_M0"] = result.to_dict()
    train, export = result.path("train"), result.path("export")
    report["summary"] = {
        "params_M": report["size_M0"]["params_M"],
        "params_M_flashocc_depth_net": report["size_M0"]["params_M_flashocc_depth_net"],
        "params_M_published": PUBLISHED["M0"]["params_M"],
        "gmacs": report["size_M0"]["gmacs"],
        "gmacs_flashocc_depth_net": report["size_M0"]["gmacs_flashocc_depth_net"],
        "gflops_published_mmcv": PUBLISHED["M0"]["gflops_mmcv"],
        "M1_params_M_flashocc_depth_net": report["size_M1"]["params_M_flashocc_depth_net"],
        "M1_gmacs_flashocc_depth_net": report["size_M1"]["gmacs_flashocc_depth_net"],
        "stage_share_train_path": {s.name: s.share for s in train.stages},
        "pooling_share_train_path": train.pooling_share,
        "pooling_share_export_path": export.pooling_share,
        "export_over_train_pooling": result.export_over_train_pooling,
        "export_over_train_forward": result.export_over_train_latency,
        "data_share_of_end_to_end": result.data_share_of_end_to_end,
        "target_pooling_under_10pct": train.pooling_share < 0.10 and export.pooling_share < 0.10,
        "target_export_within_2x_of_train_forward": result.export_over_train_latency <= 2.0,
    }
    report["seconds"] = round(time.perf_counter() - start, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")

    print(json.dumps(report))
    print()
    for name in CONFIGS:
        s = report[f"size_{name}"]
        print(f"{name}: params {s['params_M']:.2f} M ({s['params_M_flashocc_depth_net']:.2f} with FlashOcc's "
              f"depth net; published {s['published']['params_M']}), GMACs {s['gmacs']:.1f} "
              f"({s['gmacs_flashocc_depth_net']:.1f}; published {s['published']['gflops_mmcv']} 'GFLOPs')")
    ts = report["train_step_M0"]
    print(f"M0 train step on {device}: forward {ts['forward_s']} s, backward {ts['backward_s']} s, "
          f"peak +{ts['peak_memory_mb']:.0f} MB, grads finite")
    print(format_table(result))


if __name__ == "__main__":
    main()
