"""``occdistill bench``: latency (median, p90), FPS, peak memory, FLOPs and the per-stage profile.

    occdistill bench --config CONFIG.yaml [key=value ...] --json OUT.json
    occdistill bench --checkpoint RUN_OR_CKPT_DIR --data ROOT --infos INFOS.pkl --json OUT.json
    occdistill bench --checkpoint ROOM_RUN --data ROOM_ROOT [--format occscannet] [--infos val_subscenes.txt]

Every model kind the engine trains (``model.kind`` of the training config or checkpoint):
engine-only numbers (forward + labels on a batch already on the device), the per-stage breakdown,
FLOPs and peak memory. The stages are the kind's:

- dense: backbone, neck, depth_net, pooling, bev_encoder, head, argmax; timed on both BEV pooling
  paths (training scatter and the exportable precomputed plan; ``--no-export-path``: the first);
- sparse: backbone, neck, decoder (all layers), voxelize (final points -> voxel labels); a model
  with the depth-prior branch (``model.sparse.depth_prior``) also depth_prior (the branch in every
  layer), and its prior depth map is an input: the dataset's depth maps with ``--data`` (the
  training config's ``data.depth``, else auto), else a random map of the right shape;
- gaussian: backbone, neck, lift (depth distribution, initial Gaussians), refine (all blocks),
  splat (Gaussians -> voxel probabilities), argmax.

With ``--data`` the batch comes from the dataset and the end-to-end latency (read, decode, resize,
collate, transfer, forward, labels) and the data pipeline time per sample are reported too
(``--format occ3d`` needs ``--infos``; ``occscannet``, e.g. ``occdistill synth --preset room``,
reads every frame under ROOT or the split list given as ``--infos``). Without it the input is
random images on a synthetic rig chosen by the format: occ3d the nuScenes 6-camera rig (real
calibration from ../shared/realdata if present), occscannet one ScanNet-like camera. The format
defaults to the training config's ``data.format``, else occ3d. See :mod:`occdistill.deploy.bench`
for what each number measures.

Side by side (dense student only; one interleaved run; medians, p90, peak memory, engine-only and
end-to-end):

    occdistill bench --checkpoint RUN --data ROOT --infos VAL.pkl --variants eager@1,eager@2,compile,ort-fp32,ort-int8
    occdistill bench --checkpoint RUN --data ROOT --infos VAL.pkl --side-by-side --onnx-dir deploy/

A variant is ENGINE[@THREADS], ENGINE one of eager, compile (torch.compile), ort-fp32, ort-fp16,
ort-int8. The ONNX files come from ``occdistill export`` (``--onnx-dir``: its rig is the one
benchmarked) or are exported on the fly with the rig of the dataset's first frame (nuScenes rig
without ``--data``; INT8 then needs ``--data`` and is calibrated on the benchmark frames: fine for
latency, use ``occdistill export`` for accuracy). Speed-ups are over the fastest eager variant;
the roofline is model FLOPs / latency over a dense matmul timed in the same rounds. Sets
``OMP_WAIT_POLICY=PASSIVE`` when unset (see the JSON notes).
"""

from __future__ import annotations

import argparse
import json

HELP = "latency (median, p90), FPS, peak memory, FLOPs and per-stage profile of a dense, sparse or gaussian model"
# Literal (not built from occdistill.deploy.bench.KIND_STAGES: --help must not import torch); a test
# keeps the two in step.
EPILOG = """\
stages per model kind (model.kind of the config or checkpoint):
  dense     backbone, neck, depth_net, pooling, bev_encoder, head, argmax
            (timed on the train and export pooling paths)
  sparse    backbone, neck, decoder (all layers), voxelize
            (a depth-prior model: backbone, neck, decoder, depth_prior, voxelize; the prior depth map
            comes from --data's depth maps, else a random map)
  gaussian  backbone, neck, lift (depth distribution, initial Gaussians), refine (all blocks), splat, argmax

examples:
  occdistill bench --config street-tiny --json bench.json
  occdistill bench --checkpoint RUN --data data/street --infos occdistill_infos_val.pkl
  occdistill bench --checkpoint ROOM_RUN --data data/room --format occscannet --infos val_subscenes.txt
  occdistill bench --checkpoint RUN --data data/street --infos VAL.pkl --side-by-side   (dense only)
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter  # keep the epilog's lines
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", help="training config of any model kind (YAML with model.kind dense, sparse or "
                     "gaussian, or a built-in name, e.g. flashocc-m0) or a dense-model YAML; random weights")
    src.add_argument("--checkpoint", help="checkpoint directory, or a run directory (its latest checkpoint)")
    parser.add_argument("--data", help="dataset root: take the batch from it and measure end-to-end")
    parser.add_argument("--infos", help="with --data: the info pickle (occ3d, required) or a split list of frame "
                        "pickles (occscannet, optional; default every frame under ROOT)")
    parser.add_argument("--format", choices=("occ3d", "occscannet"),
                        help="dataset format (default: the training config's data.format, else occ3d); without "
                        "--data it picks the synthetic rig: occ3d the nuScenes 6 cameras, occscannet one camera")
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
    parser.add_argument("--no-export-path", action="store_true",
                        help="dense student: time the training pooling path only")
    parser.add_argument("--variants", help="side by side (dense student): comma list of ENGINE[@THREADS] (eager, "
                        "compile, ort-fp32, ort-fp16, ort-int8)")
    parser.add_argument("--side-by-side", action="store_true", help="side by side (dense student) with the default "
                        "variants (eager, compile, ort-fp32, ort-fp16, ort-int8)")
    parser.add_argument("--onnx-dir", help="side by side: directory written by `occdistill export` (model.onnx, "
                        "model.fp16.onnx, model.int8.onnx)")
    parser.add_argument("--calib-frames", type=int, default=8,
                        help="side by side without --onnx-dir: dataset frames for the on-the-fly INT8 calibration")
    parser.add_argument("--compile-mode", help="side by side: torch.compile mode (default: torch's default)")
    parser.add_argument("--json", help="write the result to this JSON file")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="model config overrides (with --config)")


def run(args: argparse.Namespace) -> int:
    if args.variants or args.side_by_side:
        return run_side_by_side(args)
    import torch

    from occdistill.deploy.bench import (
        benchmark,
        dataset_inputs,
        format_table,
        load_bench_model,
        model_kind,
        open_bench_dataset,
        synthetic_inputs,
        synthetic_rig,
        takes_prior_depth,
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
    model_kind(loaded.model)  # a kind bench cannot profile fails before any data is read
    model = loaded.model.to(device)
    fmt = args.format or (loaded.data.format if loaded.data is not None else "occ3d")
    dataset = None
    if args.data:
        cameras = loaded.data.cameras if loaded.data is not None else ()
        prior = takes_prior_depth(model)
        # The depth-prior model reads the depth maps its training read (data.depth); a bare config: auto.
        configured = loaded.data.depth if loaded.data is not None else "none"
        depth = (configured if configured != "none" else "auto") if prior else "none"
        dataset = open_bench_dataset(fmt, args.data, args.infos, model.cfg.image_size, cameras, depth=depth)
        inputs = dataset_inputs(dataset, args.batch, device, prior_depth=prior)
    else:
        inputs = synthetic_inputs(model, args.batch, rig=synthetic_rig(fmt, model.cfg.image_size), device=device)
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


def run_side_by_side(args: argparse.Namespace) -> int:
    import os

    # Before torch loads its OpenMP runtime: busy-waiting worker threads are what made 2-thread
    # eager runs 10-40x slower on a loaded machine (recorded in the JSON, overridable).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import tempfile
    from pathlib import Path

    import torch

    from occdistill.deploy.bench import (
        DEFAULT_VARIANTS,
        format_side_by_side,
        load_bench_model,
        open_bench_dataset,
        parse_variant,
        side_by_side,
    )
    from occdistill.deploy.export import export_onnx, read_metadata, rig_from_dataset, rig_from_dict
    from occdistill.deploy.quantize import VARIANT_FILES, calibration_frames, convert_fp16, quantize_int8
    from occdistill.deploy.rig import nuscenes_rig
    from occdistill.errors import OccDistillError
    from occdistill.io import atomic_write_json
    from occdistill.models.dense import DenseStudent

    if args.variants and args.side_by_side:
        raise OccDistillError("give --variants or --side-by-side, not both")
    if args.device != "cpu" or args.dtype != "float32":
        raise OccDistillError("the side-by-side runs on the CPU in float32 (the onnxruntime variants carry their "
                              "own precision)")
    if args.overrides and args.checkpoint:
        raise OccDistillError("key=value overrides apply to --config only")
    if args.infos and not args.data:
        raise OccDistillError("--infos needs --data ROOT")
    threads = args.threads if args.threads is not None else torch.get_num_threads()
    if threads < 1 or args.batch < 1 or args.calib_frames < 1:
        raise OccDistillError("--threads, --batch and --calib-frames must be >= 1")
    variants = [v.strip() for v in (args.variants.split(",") if args.variants else DEFAULT_VARIANTS) if v.strip()]
    engines = [parse_variant(v, threads)[0] for v in variants]

    loaded = load_bench_model(config=args.config, checkpoint=args.checkpoint, overrides=args.overrides,
                              weights=args.weights)
    model = loaded.model.eval()
    if not isinstance(model, DenseStudent):
        raise OccDistillError(f"the side-by-side benchmarks the dense student; got a {type(model).__name__}")
    image_size = tuple(model.cfg.image_size)
    dataset, image_aug = None, None
    if args.data:
        fmt = args.format or (loaded.data.format if loaded.data is not None else "occ3d")
        if fmt != "occ3d":
            raise OccDistillError("the side-by-side takes its rig from an occ3d-layout dataset")
        image_aug = loaded.data.image_aug if loaded.data is not None else None
        cameras = loaded.data.cameras if loaded.data is not None else ()
        dataset = open_bench_dataset(fmt, args.data, args.infos, image_size, cameras, image_aug=image_aug)
        image_aug = dataset.image_aug

    onnx_paths: dict[str, Path] = {}
    notes = []
    tmp = None
    if args.onnx_dir:
        root = Path(args.onnx_dir)
        if not (root / VARIANT_FILES["fp32"]).is_file():
            raise OccDistillError(f"{root}: no {VARIANT_FILES['fp32']} (write it with "
                                  f"`occdistill export --out {root}`)")
        onnx_paths = {p: root / f for p, f in VARIANT_FILES.items() if (root / f).is_file()}
        meta = read_metadata(onnx_paths["fp32"])
        rig = rig_from_dict(meta["rig"])
        input_format, batch = meta["input_format"], int(meta["batch"])
        if dataset is not None:
            from occdistill.deploy.export import OnnxOccModel

            check = OnnxOccModel(onnx_paths["fp32"], threads=1)
            check.check_dataset(dataset)
            s0 = dataset[0]
            check.check_rig(s0.intrinsics, s0.img_from_raw, s0.ego_from_cam, s0.camera_names)
    else:
        rig = rig_from_dataset(dataset, 0) if dataset is not None else nuscenes_rig(image_size)
        input_format, batch = "uint8", args.batch
        needed = {parse_variant(v, threads)[0] for v in variants} - {"eager", "compile"}
        if needed:
            tmp = tempfile.TemporaryDirectory(prefix="occdistill-bench-")
            root = Path(tmp.name)
            print(f"exporting to {root} (rig baked in: {rig.source})")
            info = export_onnx(model, rig, root / VARIANT_FILES["fp32"], batch=batch, model_name=loaded.name)
            onnx_paths["fp32"] = info.path
            if "ort-fp16" in needed:
                onnx_paths["fp16"] = convert_fp16(info.path, root / VARIANT_FILES["fp16"]).path
            # quantize_int8 refuses a temporal graph: calibration feeds images only (note below)
            if "ort-int8" in needed and dataset is not None and not model.cfg.temporal_frames:
                from occdistill.deploy.export import OnnxOccModel

                # Calibration records activation ranges only: benchmark frames of other camera mounts
                # (other scenes) calibrate as well, so the rig check is skipped (cameras must match).
                frames, _ = calibration_frames(OnnxOccModel(info.path, threads=threads), dataset, args.calib_frames,
                                               check_rig=False)
                onnx_paths["int8"] = quantize_int8(info.path, root / VARIANT_FILES["int8"], frames).path
                notes.append("INT8 calibrated on the benchmark frames, rig check skipped for the calibration (it "
                             "records activation ranges only; latency only; `occdistill export` calibrates on "
                             "training frames)")
    try:
        result = side_by_side(
            model, rig, variants=variants, onnx_paths=onnx_paths, dataset=dataset, image_aug=image_aug,
            input_format=input_format, batch=batch, threads=threads, repeats=args.repeats, warmup=args.warmup,
            compile_mode=args.compile_mode, measure_memory=not args.no_memory, model_name=loaded.name,
            progress=not args.quiet,
        )
    finally:
        if tmp is not None:
            tmp.cleanup()
    if "ort-int8" in engines and "int8" not in onnx_paths:
        notes.append("ort-int8: not made for a temporal student (INT8 calibration feeds images only, its graph also "
                     "takes the BEV history)" if model.cfg.temporal_frames else
                     "ort-int8: no INT8 file (pass --onnx-dir from `occdistill export`, or --data to calibrate)")
    report = {"command": "bench", "mode": "side-by-side", **result.to_dict()}
    report["notes"] = [*report["notes"], *notes]
    print(json.dumps(report))
    print(format_side_by_side(result))
    for note in notes:
        print(f"note: {note}")
    if args.json:
        atomic_write_json(args.json, report)
        print(f"wrote {args.json}")
    return 0
