"""FP16 and INT8 (static, calibrated, QDQ) variants of an exported dense student, for onnxruntime.

- :func:`convert_fp16`: weights and activations in float16 (``onnxruntime.transformers.float16``),
  inputs/outputs unchanged, the BEV pooling kept in float32: its prefix sum runs over ~1e5 points,
  and float16 running sums lose ~1e-2 (:mod:`occdistill.nn.bev_pool`). onnxruntime's CPU provider
  has few float16 kernels, so on a CPU this variant mostly adds casts: it is for GPUs (CUDA /
  TensorRT execution providers); the benchmark reports its CPU speed as measured.
- :func:`quantize_int8`: static post-training quantisation in the QDQ format
  (QuantizeLinear/DequantizeLinear pairs, which onnxruntime fuses into integer kernels on CPU and
  TensorRT reads as explicit quantisation): per-channel symmetric int8 weights, per-tensor uint8
  activations whose ranges come from a :class:`FrameCalibrationReader` over a few TRAINING frames
  under the deterministic evaluation transform (never the evaluation frames). The pooling stays
  float32 (excluded nodes), as FlashOcc's INT8 TensorRT engines keep ``bev_pool_v2`` in float.

Both variants keep the export's ``occdistill.*`` metadata (rig hash, cameras, image size) and add
``precision``; the runtime (:class:`occdistill.deploy.export.OnnxOccModel`) refuses other rigs alike.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from occdistill.deploy.export import (
    META_PREFIX,
    OnnxOccModel,
    compare_rig,
    read_metadata,
    sidecar_path,
)
from occdistill.errors import OccDistillError
from occdistill.io import atomic_write_bytes, atomic_write_json, file_sha256
from occdistill.nn.view_transform import FixedRigPlans

PRECISIONS = ("fp32", "fp16", "int8")
POOLING_SCOPE = "fixed_pool"  # module path of the precomputed pooling inside the exported DenseStudent
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")


@dataclass(frozen=True)
class VariantFile:
    """One precision variant on disk."""

    precision: str
    path: Path
    size_bytes: int
    sha256: str
    seconds: float
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["path"] = str(self.path)
        return d


def _load(path: str | Path) -> Any:
    import onnx

    p = Path(path)
    if not p.is_file():
        raise OccDistillError(f"{p}: ONNX file not found")
    return onnx.load(str(p))


def pooling_node_names(proto: Any) -> list[str]:
    """Names of the nodes of the precomputed BEV pooling: the dynamo exporter records the module
    path in each node's ``pkg.torch.onnx.name_scopes`` metadata, the TorchScript exporter in the
    node name (``/model/view_transform/fixed_pool/...``)."""
    names = []
    for node in proto.graph.node:
        scopes = " ".join(p.value for p in node.metadata_props if p.key == "pkg.torch.onnx.name_scopes")
        if POOLING_SCOPE in node.name or POOLING_SCOPE in scopes:
            names.append(node.name)
    return names


def _finish(proto: Any, dst: Path, src_meta: dict[str, Any], precision: str, extra: dict[str, Any],
            seconds: float) -> VariantFile:
    """Copy the export's metadata (plus precision and ``extra``) into ``proto``, write it and its sidecar."""
    del proto.metadata_props[:]
    meta = {**src_meta, "precision": precision, **{f"{precision}_{k}": v for k, v in extra.items()}}
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key = META_PREFIX + key
        entry.value = value if isinstance(value, str) else json.dumps(value)
    atomic_write_bytes(dst, proto.SerializeToString())
    sha = file_sha256(dst)
    atomic_write_json(sidecar_path(dst), {**meta, "file": dst.name, "sha256": sha, "size_bytes": dst.stat().st_size})
    return VariantFile(precision, dst, dst.stat().st_size, sha, round(seconds, 2), extra)


def _dedupe_casts(proto: Any) -> None:
    """The float16 converter inserts one Cast per (tensor, float32 consumer) and names it, and its
    output, after the tensor: a tensor read by two float32 nodes gets two identical Casts defining
    the same name, which onnxruntime rejects. Keep the first of identical nodes."""
    seen: dict[str, Any] = {}
    keep = []
    for node in proto.graph.node:
        clash = [o for o in node.output if o in seen]
        if not clash:
            keep.append(node)
            seen.update({o: node for o in node.output})
            continue
        first = seen[clash[0]]
        if (node.op_type, list(node.input), list(node.output), list(node.attribute)) != (
                first.op_type, list(first.input), list(first.output), list(first.attribute)):
            raise OccDistillError(f"float16 conversion produced two different nodes defining {clash[0]!r}")
    del proto.graph.node[:]
    proto.graph.node.extend(keep)


def convert_fp16(src: str | Path, dst: str | Path) -> VariantFile:
    """Float16 weights/activations, float32 inputs/outputs and pooling."""
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    start = time.perf_counter()
    src_meta = read_metadata(src)
    proto = _load(src)
    keep = pooling_node_names(proto)
    if not keep:
        raise OccDistillError(f"{src}: no BEV pooling nodes found (is it an occdistill export?)")
    # ArgMax over float16 logits could flip near-ties against the float32 head; it is cheap, keep it float32.
    proto = convert_float_to_float16(proto, keep_io_types=True, node_block_list=keep,
                                     op_block_list=[*DEFAULT_OP_BLOCK_LIST, "ArgMax"])
    _dedupe_casts(proto)
    return _finish(proto, Path(dst), src_meta, "fp16", {"float32_nodes": len(keep)}, time.perf_counter() - start)


def calibration_frames(onnx_model: OnnxOccModel, dataset: Any, count: int = 8, *,
                       check_rig: bool = True) -> tuple[list[np.ndarray], list[str]]:
    """``count`` frames spread evenly over ``dataset`` (a training split WITHOUT augmentation: the
    deterministic evaluation transform), in the export's input layout, one graph input each
    (batched as the export), and their tokens.

    ``check_rig`` (default): every frame's calibration must pass the baked rig's check, as at
    inference. ``check_rig=False``: only the cameras (names, order, count) must match; the frames'
    geometry is not checked. Calibration only records activation ranges of the images, so frames
    of another camera mount calibrate as well: use it to calibrate over the training scenes of a
    dataset whose scenes each have their own mounts (nuScenes logs, the synthetic street's
    ``rig.mount_jitter_deg``), which the rig check would refuse. (Same as an ``OnnxOccModel``
    with ``rig_tolerance_m=math.inf``.) Inference keeps the strict check."""
    if getattr(dataset, "augment", False):
        raise OccDistillError("calibrate on frames under the deterministic eval transform (augment=False)")
    if count < 1 or len(dataset) == 0:
        raise OccDistillError(f"need >= 1 calibration frame, got count {count} and {len(dataset)} frames")
    onnx_model.check_dataset(dataset)
    batch = onnx_model.input_shape[0]
    picks = np.unique(np.linspace(0, len(dataset) - 1, max(count, batch)).round().astype(int))
    frames, tokens, pending = [], [], []
    for i in picks:
        sample = dataset[int(i)]
        if check_rig:
            onnx_model.check_rig(sample.intrinsics, sample.img_from_raw, sample.ego_from_cam, sample.camera_names)
        else:
            # cameras only: tolerance inf accepts any geometry, not other camera names or counts
            check = compare_rig(onnx_model.rig, onnx_model.frustum, sample.intrinsics, sample.img_from_raw,
                                sample.ego_from_cam, sample.camera_names, tolerance_m=math.inf)
            if not check.ok:
                raise OccDistillError(f"{onnx_model.path.name}: calibration frame {sample.token}: {check.reason}")
        pending.append(onnx_model.prepare(sample.images[None]))
        tokens.append(sample.token)
        if len(pending) == batch:
            frames.append(np.concatenate(pending))
            pending = []
    return frames, tokens


class FrameCalibrationReader:
    """``onnxruntime.quantization.CalibrationDataReader`` over prepared graph inputs."""

    def __init__(self, input_name: str, frames: Sequence[np.ndarray]):
        self.input_name = input_name
        self.frames = list(frames)
        self._it: Iterator[np.ndarray] = iter(self.frames)

    def get_next(self) -> dict[str, np.ndarray] | None:
        x = next(self._it, None)
        return None if x is None else {self.input_name: x}

    def rewind(self) -> None:
        self._it = iter(self.frames)


def quantize_int8(
    src: str | Path,
    dst: str | Path,
    frames: Sequence[np.ndarray],
    *,
    per_channel: bool = True,
    method: str = "minmax",
    op_types: Sequence[str] | None = ("Conv", "MatMul", "Gemm"),
    exclude_nodes: Sequence[str] = (),
    calibration_tokens: Sequence[str] = (),
) -> VariantFile:
    """Static INT8 QDQ quantisation of ``src`` calibrated on ``frames`` (graph inputs).

    ``op_types``: which ops get QDQ pairs (default the matmul/conv-type ops that have integer
    kernels; None = everything onnxruntime can quantise, which also wraps reshapes, concats and
    activations and tends to add more Q/DQ overhead than it saves on CPU). The BEV pooling and
    ``exclude_nodes`` stay float32. ``method``: minmax, entropy or percentile (99.999) ranges.
    """
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if not frames:
        raise OccDistillError("INT8 calibration needs at least one frame")
    if method not in CALIBRATION_METHODS:
        raise OccDistillError(f"calibration method {method!r} is not one of {', '.join(CALIBRATION_METHODS)}")
    start = time.perf_counter()
    src_meta = read_metadata(src)
    src_proto = _load(src)
    input_name = src_proto.graph.input[0].name
    others = [i.name for i in src_proto.graph.input[1:]]
    if others:
        # The reader feeds images only; a temporal graph's history (or a prior depth map) calibrated
        # on stand-in values would give its branch the wrong activation ranges.
        raise OccDistillError(f"{src}: INT8 calibration feeds the images only, and this graph also takes "
                              f"{', '.join(others)}; export this model in FP32 (or FP16)")
    excluded = [*pooling_node_names(src_proto), *exclude_nodes]
    reader_cls = type("_Reader", (FrameCalibrationReader, CalibrationDataReader), {})
    reader = reader_cls(input_name, frames)
    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    with tempfile.TemporaryDirectory(prefix=".quant.") as tmp:
        pre = Path(tmp) / "pre.onnx"
        # Shape inference only: onnxruntime's own graph optimisation here would rename the nodes
        # that the exclusion list names, and the session applies it at load anyway.
        quant_pre_process(str(src), str(pre), skip_optimization=True)
        out = Path(tmp) / "int8.onnx"
        quantize_static(
            str(pre), str(out), reader, quant_format=QuantFormat.QDQ, per_channel=per_channel,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            op_types_to_quantize=list(op_types) if op_types is not None else None,
            nodes_to_exclude=excluded, calibrate_method=methods[method],
            extra_options={"WeightSymmetric": True, "ActivationSymmetric": False,
                           "CalibTensorRangeSymmetric": False},
        )
        proto = onnx.load(str(out))
    counts = qdq_counts(proto)
    if counts["QuantizeLinear"] == 0:
        raise OccDistillError(f"{src}: quantisation inserted no QDQ nodes")
    extra = {"calibration_frames": len(frames) * int(frames[0].shape[0]), "calibration_method": method,
             "per_channel": per_channel, "op_types": list(op_types) if op_types is not None else "all",
             "float32_nodes": len(excluded), "calibration_tokens": list(calibration_tokens), **counts}
    return _finish(proto, Path(dst), src_meta, "int8", extra, time.perf_counter() - start)


VARIANT_FILES = {"fp32": "model.onnx", "fp16": "model.fp16.onnx", "int8": "model.int8.onnx"}
"""File names of the precision variants in an export directory (``occdistill export --out DIR``)."""


def evaluate_variants(
    model: Any,
    files: dict[str, str | Path],
    dataset: Any,
    *,
    threads: int | None = None,
    rayiou: bool = False,
    progress: bool = False,
    rig_tolerance_m: float | None = None,
) -> dict[str, Any]:
    """mIoU/IoU of the eager model on its training path (per-frame geometry, what ``occdistill
    eval`` reports) and of every exported variant (``files``: precision -> path, fixed rig) on
    ``dataset`` (eval mode), and each variant's change against ONNX FP32 and against eager.

    Every frame of ``dataset`` must share the baked rig (``rig_tolerance_m``, default half a BEV
    cell; ``OnnxOccModel.rig_frames`` + ``dataset_subset`` select such frames): others are refused.

    The eager-vs-FP32 difference is the fixed-rig approximation (the frames' own calibration vs
    the baked one), FP16/INT8-vs-FP32 the precision change. Values in percent points.
    """
    import torch

    from occdistill.deploy.export import OnnxOccModel, evaluate_onnx
    from occdistill.engine.evaluate import evaluate

    vt = model.view_transform
    saved = vt.fixed_plans()
    vt.use_plans(FixedRigPlans())
    try:
        eager = evaluate(model, dataset, torch.device("cpu"), rayiou=rayiou, progress=progress)
    finally:
        vt.use_plans(saved)
    keys = ("mIoU", "IoU") + (("RayIoU",) if rayiou else ())
    rows: dict[str, dict[str, Any]] = {"eager": {k: eager[k] for k in keys}}
    rows["eager"]["note"] = "PyTorch, per-frame calibration (training pooling path)"
    per_class = {"eager": eager.get("per_class")}
    for precision, path in files.items():
        report = evaluate_onnx(OnnxOccModel(path, threads=threads, rig_tolerance_m=rig_tolerance_m), dataset,
                               rayiou=rayiou, progress=progress)
        rows[f"ort-{precision}"] = {**{k: report[k] for k in keys}, "rig_max_shift_m": report["rig_max_shift_m"]}
        per_class[f"ort-{precision}"] = report.get("per_class")
    ref = rows.get("ort-fp32")
    for name, row in rows.items():
        row["mIoU_change_vs_eager"] = round(row["mIoU"] - rows["eager"]["mIoU"], 3)
        if ref is not None:
            row["mIoU_change_vs_fp32"] = round(row["mIoU"] - ref["mIoU"], 3)
            row["IoU_change_vs_fp32"] = round(row["IoU"] - ref["IoU"], 3)
    return {"frames": len(dataset), "variants": rows, "per_class": per_class}


def qdq_counts(proto_or_path: Any) -> dict[str, int]:
    """Number of QuantizeLinear / DequantizeLinear nodes."""
    proto = _load(proto_or_path) if isinstance(proto_or_path, (str, Path)) else proto_or_path
    ops = [n.op_type for n in proto.graph.node]
    return {"QuantizeLinear": ops.count("QuantizeLinear"), "DequantizeLinear": ops.count("DequantizeLinear")}


__all__ = [
    "CALIBRATION_METHODS", "FrameCalibrationReader", "PRECISIONS", "VARIANT_FILES", "VariantFile",
    "calibration_frames", "convert_fp16", "evaluate_variants", "pooling_node_names", "qdq_counts", "quantize_int8",
]
