"""``occdistill bench``: latency (median, p90), FPS, peak memory, FLOPs and the per-stage profile.

    occdistill bench --config CONFIG.yaml [key=value ...] --json OUT.json
    occdistill bench --checkpoint RUN_OR_CKPT_DIR --data ROOT --infos INFOS.pkl --json OUT.json

Engine-only numbers (forward + argmax on a batch already on the device) for both BEV pooling paths
(training scatter and the exportable precomputed plan), the per-stage breakdown (backbone, neck,
depth net, pooling, BEV encoder, head, argmax), FLOPs and peak memory. With ``--data`` the
batch comes from the dataset and the end-to-end latency (read, decode, resize, collate, transfer,
forward, argmax) and the data pipeline time per sample are reported too; without it the input is
random images on the nuScenes 6-camera rig (real calibration from ../shared/realdata if present).
See :mod:`occdistill.deploy.bench` for what each number measures.
"""

from __future__ import annotations

import argparse
import json

HELP = "latency (median, p90), FPS, peak memory, FLOPs and per-stage profile of a model"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", help="training config (YAML or built-in name, e.g. flashocc-m0) or a dense-model "
                     "YAML; random weights")
    src.add_argument("--checkpoint", help="checkpoint directory, or a run directory (its latest checkpoint)")
    parser.add_argument("--data", help="dataset root: take the batch from it and measure end-to-end")
    parser.add_argument("--infos", help="info pickle of the dataset (occ3d format)")
    parser.add_argument("--format", choices=("occ3d", "occscannet"),
                        help="dataset format (default: the training config's data.format, else occ3d)")
    parser.add_argument("--weights", choices=("ema", "model"), default="ema",
                        help="with --checkpoint: the EMA weights (default, when present) or the raw weights")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"),
                        help="float32, or autocast to float16/bfloat16")
    parser.add_argument("--batch", type=int, default=1, help="samples per forward (default 1)")
    parser.add_argument("--repeats", type=int, default=10, help="timed rounds (default 10)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first (default 2)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--no-flops", action="store_true", help="skip the FLOP count")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory forward")
    parser.add_argument("--no-export-path", action="store_true", help="time the training pooling path only")
    parser.add_argument("--json", help="write the result to this JSON file")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="model config overrides (with --config)")


def run(args: argparse.Namespace) -> int:
    import torch

    from occdistill.deploy.bench import (
        benchmark,
        dataset_inputs,
        format_table,
        load_bench_model,
        open_bench_dataset,
        synthetic_inputs,
    )
    from occdistill.errors import OccDistillError
    from occdistill.io import atomic_write_json

    if args.batch < 1:
        raise OccDistillError(f"--batch must be >= 1, got {args.batch}")
    if args.threads is not None:
        if args.threads < 1:
            raise OccDistillError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    try:
        device = torch.device(args.device)
    except RuntimeError as exc:
        raise OccDistillError(f"--device {args.device!r}: {exc}") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise OccDistillError(f"--device {args.device}: CUDA is not available")
    if args.infos and not args.data:
        raise OccDistillError("--infos needs --data ROOT")
    if args.overrides and args.checkpoint:
        raise OccDistillError("key=value overrides apply to --config only")

    loaded = load_bench_model(config=args.config, checkpoint=args.checkpoint, overrides=args.overrides,
                              weights=args.weights)
    model = loaded.model.to(device)
    dataset = None
    if args.data:
        fmt = args.format or (loaded.data.format if loaded.data is not None else "occ3d")
        cameras = loaded.data.cameras if loaded.data is not None else ()
        dataset = open_bench_dataset(fmt, args.data, args.infos, model.cfg.image_size, cameras)
        inputs = dataset_inputs(dataset, args.batch, device)
    else:
        inputs = synthetic_inputs(model, args.batch, device=device)
    result = benchmark(
        model, inputs, dataset=dataset, model_name=loaded.name, dtype=args.dtype, repeats=args.repeats,
        warmup=args.warmup, count_flops=not args.no_flops, measure_memory=not args.no_memory,
        export_path=not args.no_export_path, progress=not args.quiet,
    )
    report = {"command": "bench", **result.to_dict()}
    print(json.dumps(report))
    print(format_table(result))
    if args.json:
        atomic_write_json(args.json, report)
        print(f"wrote {args.json}")
    return 0
