"""``occdistill export``: ONNX export of the dense student for ONE camera rig, with onnxruntime parity,
FP16 and INT8 (static QDQ, calibrated on training frames) variants and their mIoU change.

    occdistill export --checkpoint runs/street-tiny --out deploy/ [--eval]
    occdistill export --checkpoint RUN --data ROOT --train-split T.pkl --val-split V.pkl --out deploy/
    occdistill export --config flashocc-m0 --rig nuscenes --precision fp32 --out deploy/m0/

Writes ``DIR/model.onnx`` (FP32), ``DIR/model.fp16.onnx``, ``DIR/model.int8.onnx``, a sidecar
JSON beside each and ``DIR/export.json`` (export info, parity, sizes, mIoU per variant).

THE CAMERA RIG IS BAKED IN. The graph takes images only; the BEV pooling plan and the camera
parameters of the depth net are computed from one calibration (by default frame 0 of the
checkpoint's training split, deterministic evaluation transform; ``--rig nuscenes`` for the
nuScenes 6-camera rig) and stored as constants. The rig hash, camera names/order and image size
are in the ONNX metadata and the sidecar; the runtime refuses frames whose calibration moves the
frustum by more than ``--rig-tolerance`` metres (default half a BEV cell). Re-export for another robot.

A sparse student with the depth-prior branch (``model.sparse.depth_prior``) exports with a second
graph input, ``prior_depth`` (B, N, H, W) metres (shape and meaning in the sidecar's
``extra_inputs``); its parity check feeds the evaluation frames' depth maps (the config's
``data.depth``), or random maps with random images. The FP16 and INT8 variants are made for the
dense student (its BEV pooling stays float32; INT8 calibration feeds images alone): other models
export FP32 by default, and asking them for fp16 or int8 is an error.

A temporal dense student (``model.dense.temporal_frames`` F > 0) exports with a second input,
``history`` (B, F, C, X, Y): the earlier frames' lifted BEVs already warped into the current frame,
zeros where none is usable, and a third output ``lifted_bev`` for the next frame's history (both in
the sidecar); :class:`occdistill.deploy.stream.StreamRunner` plays scenes through it. Its parity
check streams consecutive frames of one scene of the rig (histories from eager PyTorch, so the first
is zeros and the others real), plus the first frame with a random history; without frames, random
images and histories. It exports FP32 by default (FP16 on request; INT8 calibration feeds images
only and is refused), and ``--eval`` is refused (the evaluation cannot stream its history).

A dataset may hold several rigs (nuScenes logs, the synthetic street's per-scene camera mounts,
``rig.mount_jitter_deg``): the parity check and the ``--eval`` mIoU use only the frames whose
calibration passes that check (the evaluation split's, else the rig frame's own scene) and say how
many were skipped and why; ``--eval`` stops with one line when no evaluation frame shares the rig
(bake one: ``--rig-split val --rig-frame I``). INT8 calibration only records activation ranges, so
it skips the rig check and calibrates over every training scene.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

HELP = "ONNX export (camera rig baked in) with onnxruntime parity, FP16/INT8 variants and their mIoU change"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="checkpoint directory, or a run directory (its latest checkpoint)")
    src.add_argument("--config", help="training config (YAML or built-in name) or dense-model YAML; random weights")
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--weights", choices=("ema", "model"), default="ema",
                        help="with --checkpoint: EMA weights (default, when present) or the raw weights")
    parser.add_argument("--data", type=Path, help="dataset root (default: the config's data.root)")
    parser.add_argument("--train-split", help="info pickle of the training frames (rig, INT8 calibration)")
    parser.add_argument("--val-split", help="info pickle of the evaluation frames (parity, --eval)")
    parser.add_argument("--rig", choices=("dataset", "nuscenes"), default="dataset",
                        help="calibration to bake in: a dataset frame (default) or the nuScenes 6-camera rig")
    parser.add_argument("--rig-split", choices=("train", "val"), default="train", help="split of the rig frame")
    parser.add_argument("--rig-frame", type=int, default=0, help="index of the rig frame in that split (default 0)")
    parser.add_argument("--rig-tolerance", type=float,
                        help="metres a frame's calibration may move the frustum points (default half a BEV cell)")
    parser.add_argument("--precision",
                        help="comma list of fp32, fp16, int8 (fp32 is always written; default: all for a dense "
                             "student, fp32 for other models, whose reduced-precision variants are not made)")
    parser.add_argument("--calib-frames", type=int, default=8, help="training frames for INT8 calibration (default 8)")
    parser.add_argument("--calib-method", choices=("minmax", "entropy", "percentile"), default="minmax")
    parser.add_argument("--opset", type=int, default=18, help="ONNX opset (>= 17, default 18)")
    parser.add_argument("--exporter", choices=("dynamo", "torchscript"), default="dynamo")
    parser.add_argument("--input", choices=("uint8", "float32"), default="uint8",
                        help="graph input: uint8 (B,N,H,W,3) RGB, normalised in the graph (default), or "
                        "float32 (B,N,3,H,W) in [0,1]")
    parser.add_argument("--batch", type=int, default=1, help="batch size fixed in the graph (default 1)")
    parser.add_argument("--parity-frames", type=int, default=4,
                        help="frames of the baked rig for the parity check (default 4)")
    parser.add_argument("--eval", action="store_true",
                        help="mIoU of eager and every variant on the evaluation frames that share the baked rig")
    parser.add_argument("--threads", type=int, help="intra-op threads of torch and onnxruntime")
    parser.add_argument("--json", type=Path, help="report path (default OUT/export.json)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (with --config)")


def _banner(meta_rig: dict, rig_hash: str, tolerance: float) -> str:
    h, w = meta_rig["image_size"]
    cams = ", ".join(meta_rig["camera_names"])
    bar = "!" * 100
    return "\n".join([
        bar,
        f"!! CAMERA RIG BAKED IN -- rig {rig_hash}: {len(meta_rig['camera_names'])} cameras [{cams}] at {h}x{w} "
        f"(raw {meta_rig['raw_size'][0]}x{meta_rig['raw_size'][1]})",
        f"!! calibration from: {meta_rig['source']}",
        "!! the exported model is valid ONLY for this calibration, camera order and image size; inputs whose",
        f"!! calibration moves the frustum by more than {tolerance:.3f} m are refused. Re-export for another rig.",
        bar,
    ])


def _no_eval_frames(dataset: Any, frames: Any, rig: Any) -> str:
    """One line: why ``--eval`` has no frame to evaluate, and what to do."""
    return (f"--eval: none of the {frames.checked} evaluation frames of {getattr(dataset, 'data_root', 'the dataset')} "
            f"shares the baked rig ({rig.source}): {frames.skip_reason()}; bake an evaluation frame's rig "
            "(--rig-split val --rig-frame I), evaluate frames of this rig (--val-split), or use data with one "
            "camera calibration (synthetic: rig.mount_jitter_deg=0)")


def _spread(items: list, count: int) -> list:
    """Up to ``count`` items spread evenly (first and last included)."""
    if len(items) <= count:
        return list(items)
    return [items[round(i * (len(items) - 1) / max(count - 1, 1))] for i in range(count)]


def _temporal_parity_inputs(model: Any, ort32: Any, dataset: Any, kept: list[int], count: int,
                            split: str) -> tuple[list[Any], str]:
    """Parity inputs of a temporal student: up to ``count`` consecutive frames (time order) of the first
    scene among the ``kept`` frames of the rig, with histories streamed by eager PyTorch, plus the
    first frame with a random history (the streamed first history is zeros, and ``count`` may be 1).
    Also their description."""
    import numpy as np

    from occdistill.deploy.stream import streamed_parity_inputs

    scene = dataset.frame(kept[0]).scene_name
    picks = [i for i in kept if dataset.frame(i).scene_name == scene][:count]
    inputs: list[Any] = streamed_parity_inputs(model, ort32, [dataset[i] for i in picks])
    history = np.random.default_rng(0).standard_normal(ort32.history_shape, dtype=np.float32)
    inputs.append((inputs[0][0], history))
    return inputs, (f"{len(picks)} consecutive {split} frames of scene {scene} of {dataset.data_root} with their BEV "
                    "history streamed by eager PyTorch (BEVHistory), plus the first with a random history")


def run(args: argparse.Namespace) -> int:
    import torch

    from occdistill.deploy.bench import load_bench_model
    from occdistill.deploy.export import (
        FrustumSpec,
        OnnxOccModel,
        check_parity,
        dataset_subset,
        default_rig_tolerance,
        export_onnx,
        rig_from_dataset,
        rig_to_dict,
        select_rig_frames,
    )
    from occdistill.deploy.quantize import (
        VARIANT_FILES,
        calibration_frames,
        convert_fp16,
        evaluate_variants,
        qdq_counts,
        quantize_int8,
    )
    from occdistill.deploy.rig import nuscenes_rig
    from occdistill.engine.tasks import takes_depth_input, temporal_frames
    from occdistill.errors import OccDistillError
    from occdistill.io import atomic_write_json
    from occdistill.models.dense import DenseStudent

    precisions = [p.strip() for p in (args.precision or "fp32").split(",") if p.strip()]
    bad = [p for p in precisions if p not in VARIANT_FILES]
    if bad:
        raise OccDistillError(f"--precision: unknown {bad}; choose from {', '.join(VARIANT_FILES)}")
    if "fp32" not in precisions:
        precisions.insert(0, "fp32")
    for name in ("batch", "calib_frames", "parity_frames"):
        if getattr(args, name) < 1:
            raise OccDistillError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.rig_tolerance is not None and args.rig_tolerance < 0:
        raise OccDistillError(f"--rig-tolerance must be >= 0, got {args.rig_tolerance}")
    if args.overrides and args.checkpoint:
        raise OccDistillError("key=value overrides apply to --config only")
    if args.threads is not None:
        if args.threads < 1:
            raise OccDistillError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)

    loaded = load_bench_model(config=args.config, checkpoint=args.checkpoint, overrides=args.overrides,
                              weights=args.weights)
    model = loaded.model.eval()
    if args.eval and not isinstance(model, DenseStudent):
        raise OccDistillError(f"--eval: evaluation of an exported {type(model).__name__} is not supported")
    prior = takes_depth_input(model)  # the graph's second input: the prior depth map
    temporal = temporal_frames(model) > 0  # the graph's second input: the warped BEV history
    if args.eval and temporal:
        raise OccDistillError("--eval: evaluation of an exported temporal student is not supported (the evaluation "
                              "cannot stream its BEV history input); play it with "
                              "occdistill.deploy.stream.StreamRunner")
    if args.precision is None and isinstance(model, DenseStudent) and not temporal:
        precisions = list(VARIANT_FILES)  # the single-frame dense student's default: every variant
    reduced = [p for p in precisions if p != "fp32"]
    if reduced and not isinstance(model, DenseStudent):
        raise OccDistillError(f"--precision {','.join(reduced)}: the reduced-precision variants are made for the dense "
                              "student (its BEV pooling kept float32; INT8 calibration feeds images only); export a "
                              f"{type(model).__name__} with --precision fp32")
    if temporal and "int8" in precisions:
        raise OccDistillError("--precision int8: INT8 calibration feeds images only, and a temporal student's graph "
                              "also takes its BEV history; export it with --precision fp32 or fp32,fp16")

    # datasets (training frames: rig + calibration; evaluation frames: parity + mIoU)
    splits = {}
    data_cfg = loaded.data
    if args.rig == "dataset" or "int8" in precisions or args.eval or args.data is not None:
        if data_cfg is None:
            raise OccDistillError("--data needs a training config or checkpoint (its data section: format, image "
                                  "pipeline, cameras)")
        if data_cfg.format != "occ3d":
            raise OccDistillError(f"data.format {data_cfg.format}: rig-from-dataset export supports occ3d-layout "
                                  "datasets; use --rig nuscenes")
        from occdistill.engine.data import open_split

        for split, override in (("train", args.train_split), ("val", args.val_split)):
            stored = override or (data_cfg.train_split if split == "train" else data_cfg.val_split)
            if stored:
                splits[split] = open_split(data_cfg, split, augment=False, grid=model.grid, root=args.data,
                                           split_path=override, depth_input=prior)
    if args.rig == "dataset":
        if args.rig_split not in splits:
            raise OccDistillError(f"--rig dataset: no {args.rig_split} split (give --checkpoint/--config with a data "
                                  f"section, or --{args.rig_split}-split), or use --rig nuscenes")
        rig = rig_from_dataset(splits[args.rig_split], args.rig_frame)
    else:
        rig = nuscenes_rig(tuple(model.cfg.image_size))
    if "int8" in precisions and "train" not in splits:
        raise OccDistillError("INT8 calibration needs training frames of the rig (a checkpoint/config with "
                              "data.train_split, or --train-split); or drop int8 from --precision")
    if args.eval and "val" not in splits:
        raise OccDistillError("--eval needs an evaluation split (the config's data.val_split or --val-split)")

    # Frames that share the baked rig (calibrations only, before the export: fail fast). A dataset may
    # hold several rigs (per-scene camera mounts); the runtime refuses the others.
    spec = FrustumSpec.of(model)
    tolerance = args.rig_tolerance if args.rig_tolerance is not None else default_rig_tolerance(spec)
    eval_frames = None
    if args.eval:
        eval_frames = select_rig_frames(rig, spec, splits["val"], tolerance_m=tolerance)
        if not eval_frames.kept:
            raise OccDistillError(_no_eval_frames(splits["val"], eval_frames, rig))
    # parity: evaluation frames of the rig, else frames of the rig frame's own scene (it holds the rig
    # frame itself), else random images
    candidates: list[tuple[str, list[int] | None]] = [("val", None)] if "val" in splits else []
    if "train" in splits and args.rig == "dataset" and args.rig_split == "train":
        train = splits["train"]
        scene = train.frame(args.rig_frame).scene_name
        candidates.append(("train", [i for i in range(len(train)) if train.frame(i).scene_name == scene]))
    elif "train" in splits and args.rig == "nuscenes":
        candidates.append(("train", None))
    parity_split, parity_frames, parity_notes = None, None, []
    for name, indices in candidates:
        if name == "val" and eval_frames is not None:
            sel = eval_frames
        else:
            sel = select_rig_frames(rig, spec, splits[name], tolerance_m=tolerance, indices=indices)
        if sel.kept:
            parity_split, parity_frames = name, sel
            break
        parity_notes.append(f"no {name} frame shares the baked rig ({sel.checked} checked: {sel.skip_reason()})")

    args.out.mkdir(parents=True, exist_ok=True)
    info = export_onnx(model, rig, args.out / VARIANT_FILES["fp32"], opset=args.opset, exporter=args.exporter,
                       input_format=args.input, batch=args.batch, model_name=loaded.name)
    ort32 = OnnxOccModel(info.path, threads=args.threads, rig_tolerance_m=tolerance)
    print(_banner(rig_to_dict(rig, model.cfg.image_size), info.rig_hash, tolerance))
    print(f"exported {info.path} ({info.size_bytes / 2**20:.1f} MB, {info.exporter} exporter, opset {info.opset}, "
          f"{info.seconds:.1f} s): input{'s' if len(info.inputs) > 1 else ''} "
          + ", ".join(f"{i.name} {list(i.shape)} {i.dtype}" for i in info.inputs) + "; "
          + ", ".join(f"{o.name} {list(o.shape)} {o.dtype}" for o in info.outputs))

    # parity inputs: frames of the rig (each checked again by the runtime), else random images
    for note in parity_notes:
        print(f"parity: {note}")
    if parity_frames is not None:
        eval_set = splits[parity_split]
        ort32.check_dataset(eval_set)
        use = "parity and --eval" if parity_frames is eval_frames else "parity"
        print(f"frames of the rig ({use}): {parity_frames.summary(f'{parity_split} frames')}")
        if temporal:  # consecutive frames: the history of each is the frames before it
            inputs, parity_source = _temporal_parity_inputs(model, ort32, eval_set, list(parity_frames.kept),
                                                            args.parity_frames, parity_split)
        else:
            inputs = []
            for i in _spread(list(parity_frames.kept), args.parity_frames):
                s = eval_set[i]
                ort32.check_rig(s.intrinsics, s.img_from_raw, s.ego_from_cam, s.camera_names)
                x = ort32.prepare(s.images[None])
                x = x.repeat(args.batch, axis=0) if args.batch > 1 else x
                if prior:  # the frame's depth map (N, H, W) metres, in the same network-input pixels
                    inputs.append((x, s.depth[None].numpy().repeat(args.batch, axis=0)))
                else:
                    inputs.append(x)
            parity_source = (f"{len(inputs)} {parity_split} frames of {eval_set.data_root} sharing the rig "
                             f"({len(parity_frames.skipped)} of {parity_frames.checked} checked skipped)")
    else:
        from occdistill.deploy.export import ExportWrapper

        wrapper = ExportWrapper(model, rig, batch=args.batch, input_format=args.input)
        inputs = [tuple(t.cpu().numpy() for t in wrapper.example_inputs(seed)) for seed in range(args.parity_frames)]
        extra = " and prior depth maps" if prior else " and BEV histories" if temporal else ""
        parity_source = f"{len(inputs)} random images{extra} ({'no frame of the rig' if splits else 'no dataset'})"

    files = {"fp32": info.path}
    variants = {"fp32": {"path": str(info.path), "size_bytes": info.size_bytes, "sha256": info.sha256}}
    parity = {"fp32": check_parity(model, ort32, inputs, verbose=False)}
    print(f"parity fp32 vs eager ({parity_source}): {parity['fp32'].summary()}")
    if "fp16" in precisions:
        v = convert_fp16(info.path, args.out / VARIANT_FILES["fp16"])
        files["fp16"] = v.path
        variants["fp16"] = v.to_dict()
    if "int8" in precisions:
        # Calibration records activation ranges only: frames of other camera mounts (other training
        # scenes) calibrate as well, so the rig check is skipped here (cameras still must match).
        frames, tokens = calibration_frames(ort32, splits["train"], args.calib_frames, check_rig=False)
        v = quantize_int8(info.path, args.out / VARIANT_FILES["int8"], frames, method=args.calib_method,
                          calibration_tokens=tokens)
        files["int8"] = v.path
        variants["int8"] = {**v.to_dict(), **qdq_counts(v.path), "calibration_rig_check": False}
        print(f"INT8: static QDQ, {v.details['calibration_method']} ranges from {v.details['calibration_frames']} "
              f"training frames (rig check skipped for calibration: it only records activation ranges; inference "
              f"keeps it), per-channel weights; {v.details['QuantizeLinear']} QuantizeLinear nodes")
    for precision in ("fp16", "int8"):
        if precision in files:
            # Reported, not asserted: reduced precision is judged by its mIoU change.
            p = check_parity(model, OnnxOccModel(files[precision], threads=args.threads), inputs,
                             logit_tolerance=None, agreement_bound=None, raise_on_failure=False, verbose=False)
            parity[precision] = p
            size_mb = variants[precision]["size_bytes"] / 2**20
            print(f"parity {precision} vs eager: {p.summary()}; file {size_mb:.1f} MB")

    report = {
        "command": "export",
        "model": loaded.name,
        "warning": info.notes[0],
        "rig_hash": info.rig_hash,
        "rig": rig_to_dict(rig, model.cfg.image_size),
        "rig_tolerance_m": tolerance,
        "frustum": FrustumSpec.of(model).to_dict(),
        "export": info.to_dict(),
        "variants": variants,
        "parity_inputs": parity_source,
        "parity_rig_frames": None if parity_frames is None else {"split": parity_split, **parity_frames.to_dict()},
        "parity": {k: p.to_dict() for k, p in parity.items()},
    }
    if args.eval:
        ev = evaluate_variants(model, files, dataset_subset(splits["val"], eval_frames.kept), threads=args.threads,
                               progress=True, rig_tolerance_m=tolerance)
        ev["rig_frames"] = eval_frames.to_dict()
        report["evaluation"] = ev
        skipped = f", {len(eval_frames.skipped)} skipped: another rig" if eval_frames.skipped else ""
        print(f"mIoU on {ev['frames']} evaluation frames of the rig{skipped} (percent; change vs ONNX FP32):")
        for name, row in ev["variants"].items():
            print(f"  {name:10s} mIoU {row['mIoU']:6.2f} ({row.get('mIoU_change_vs_fp32', 0.0):+.2f})  "
                  f"IoU {row['IoU']:6.2f}")
    if not parity["fp32"].ok:
        atomic_write_json(args.json or args.out / "export.json", report)
        raise OccDistillError(f"{info.path}: FP32 parity failed: {parity['fp32'].summary()}")
    out_json = args.json or args.out / "export.json"
    atomic_write_json(out_json, report)
    print(json.dumps({"command": "export", "rig_hash": info.rig_hash, "files": {k: str(v) for k, v in files.items()},
                      "parity_fp32_ok": parity["fp32"].ok}))
    print(f"wrote {out_json}")
    return 0
