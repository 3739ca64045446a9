"""The demo's deployment stages for the trained dense student: ONNX export with one val scene's camera
rig baked in and its parity with eager PyTorch, the INT8 variant, eager / onnxruntime side by side
(``occdistill bench --side-by-side``), the navigation costmap of one val frame next to the ground
truth's; and that section of the report."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from occdistill.data.occ3d import Occ3DDataset
from occdistill.deploy.bench import SideBySideResult, load_bench_model, side_by_side
from occdistill.deploy.costmap import UNKNOWN, Costmap, CostmapConfig, compute_costmap, write_costmap
from occdistill.deploy.export import (
    OnnxOccModel,
    Parity,
    check_parity,
    export_onnx,
    read_metadata,
    rig_from_dataset,
    rig_from_dict,
)
from occdistill.deploy.quantize import VARIANT_FILES, calibration_frames, quantize_int8
from occdistill.engine.data import open_split
from occdistill.engine.tasks import temporal_frames
from occdistill.errors import OccDistillError
from occdistill.geometry.grid import VoxelGrid
from occdistill.models.dense import DenseStudent
from occdistill.pipeline.markdown import ms_cell
from occdistill.pipeline.student import BENCH_WARMUP

PARITY_FRAMES = 4  # val frames of the rig's scene on which onnxruntime is compared with eager PyTorch
CALIB_FRAMES = 4  # training frames whose activation ranges calibrate the INT8 variant
# One intra-op thread per engine in the side-by-side: the demo cannot set OMP_WAIT_POLICY before torch
# loads, and with torch's default busy-waiting OpenMP threads a 2-thread eager forward on a loaded
# machine ran 10-40x slower (deploy.bench.OMP_NOTE), which would make the speed-ups meaningless.
DEPLOY_THREADS = 1


@dataclass(frozen=True)
class DeployExport:
    """The student exported to ONNX with ONE camera rig baked in, its INT8 variant, and both compared
    with eager PyTorch (the same module with the same baked rig) on frames of that rig."""

    onnx: str  # FP32 graph (dynamo exporter, uint8 images in, logits + argmax labels out, batch 1)
    onnx_int8: str  # static QDQ INT8 variant of it
    opset: int
    rig_hash: str
    rig_source: str  # the val frame whose calibration is baked in
    rig_frame: int  # its index in the val split
    rig_scene: str  # its scene: the only one whose frames share the rig
    rig_tolerance_m: float  # frames whose frustum moves more than this from the baked rig are refused
    parity_frames: tuple[str, ...]  # tokens of the val frames compared, all of the rig frame's scene
    parity_max_shift_m: float  # largest frustum shift of a parity frame against the baked rig (ego motion)
    calibration_frames: tuple[str, ...]  # training-frame tokens of the INT8 calibration
    size_mb: float
    int8_size_mb: float
    parity: Parity  # FP32, checked against the deployment bounds
    parity_int8: Parity  # INT8, reported only (reduced precision is judged by its agreement)
    seconds: float


def _parity_inputs(ort32: OnnxOccModel, val_set: Occ3DDataset, scene: str) -> tuple[list[Any], list[str], float]:
    """Graph inputs of up to ``PARITY_FRAMES`` val frames of ``scene``, the rig frame's. The synthetic
    street gives every scene its own camera mounts, so only that scene's frames share the baked rig; each
    frame's calibration is checked against it (raises otherwise). Also their tokens and largest shift."""
    picks = [i for i in range(len(val_set)) if val_set.frame(i).scene_name == scene][:PARITY_FRAMES]
    inputs, tokens, shift = [], [], 0.0
    for i in picks:
        s = val_set[i]
        check = ort32.check_rig(s.intrinsics, s.img_from_raw, s.ego_from_cam, s.camera_names)
        inputs.append(ort32.prepare(s.images[None]))
        tokens.append(s.token)
        shift = max(shift, check.max_shift_m)
    return inputs, tokens, shift


def _export_student(model: DenseStudent, name: str, train_set: Occ3DDataset, val_set: Occ3DDataset,
                    deploy_dir: Path) -> DeployExport:
    """The steps of ``occdistill export --rig-split val`` at the demo's budget: export with the rig of val
    frame 0 (dynamo exporter, opset 18, uint8 input), INT8 calibrated on ``CALIB_FRAMES`` training
    frames, parity of both with eager PyTorch on val frames of that rig."""
    start = time.perf_counter()
    rig_frame = 0
    fp32 = export_onnx(model, rig_from_dataset(val_set, rig_frame), deploy_dir / VARIANT_FILES["fp32"],
                       model_name=name)
    ort32 = OnnxOccModel(fp32.path)
    ort32.check_dataset(val_set)
    scene = val_set.frame(rig_frame).scene_name
    inputs, tokens, shift = _parity_inputs(ort32, val_set, scene)
    # The training scenes have other camera mounts than the baked rig (~1 deg), which the rig check
    # refuses; calibration only records activation ranges of their images, so it is relaxed here only.
    frames, calib_tokens = calibration_frames(OnnxOccModel(fp32.path, rig_tolerance_m=math.inf), train_set,
                                              CALIB_FRAMES)
    int8 = quantize_int8(fp32.path, deploy_dir / VARIANT_FILES["int8"], frames, calibration_tokens=calib_tokens)
    parity = check_parity(model, ort32, inputs, raise_on_failure=False, verbose=False)
    parity_int8 = check_parity(model, OnnxOccModel(int8.path), inputs, logit_tolerance=None, agreement_bound=None,
                               raise_on_failure=False, verbose=False)
    return DeployExport(
        onnx=str(fp32.path), onnx_int8=str(int8.path), opset=fp32.opset, rig_hash=fp32.rig_hash,
        rig_source=ort32.rig.source, rig_frame=rig_frame, rig_scene=scene, rig_tolerance_m=ort32.rig_tolerance_m,
        parity_frames=tuple(tokens), parity_max_shift_m=shift, calibration_frames=tuple(calib_tokens),
        size_mb=fp32.size_bytes / 2**20, int8_size_mb=int8.size_bytes / 2**20, parity=parity,
        parity_int8=parity_int8, seconds=time.perf_counter() - start,
    )


def _side_by_side_student(model: DenseStudent, name: str, export: DeployExport, val_set: Occ3DDataset,
                          iters: int, with_compile: bool) -> SideBySideResult:
    """What ``occdistill bench --side-by-side --onnx-dir DEPLOY --data ROOT --infos VAL`` measures, at
    the demo's budget: the exported files' rig, batch 1, ``DEPLOY_THREADS`` per engine,
    ``BENCH_WARMUP`` + ``iters`` interleaved rounds, end-to-end from the val scene's camera files."""
    variants = ["eager", *(["compile"] if with_compile else []), "ort-fp32", "ort-int8"]
    return side_by_side(
        model, rig_from_dict(read_metadata(export.onnx)["rig"]), variants=variants,
        onnx_paths={"fp32": export.onnx, "int8": export.onnx_int8}, dataset=val_set, image_aug=val_set.image_aug,
        threads=DEPLOY_THREADS, repeats=iters, warmup=BENCH_WARMUP, model_name=name,
    )


@dataclass(frozen=True)
class DeployCostmap:
    """Outdoor-preset costmaps of one val frame: the exported student's prediction (onnxruntime FP32;
    voxels whose free probability is not confident leave their cell unknown) and the ground truth
    (observed = ``mask_camera``). ``*_files``: role -> path (map_server PGM/YAML, PNG, OccupancyGrid JSON)."""

    token: str
    student_files: dict[str, str]
    gt_files: dict[str, str]
    student_cells: dict[str, int]  # occupied / free / unknown / risk_cells
    gt_cells: dict[str, int]
    agreement: float  # share of the cells known in the GT costmap that the student's gives the same state


def _student_costmap(export: DeployExport, val_set: Occ3DDataset, grid: VoxelGrid, out_dir: Path) -> DeployCostmap:
    """Costmaps of the rig frame (whose calibration is exactly the baked one) from the exported graph."""
    cfg = CostmapConfig()  # the outdoor preset: the street world uses the Occ3D-nuScenes classes
    ort32 = OnnxOccModel(export.onnx)
    sample = val_set[export.rig_frame]
    out = ort32.run(ort32.prepare(sample.images[None]))
    free_prob = torch.from_numpy(out["logits"][0]).softmax(dim=-1)[..., cfg.table.free_index].numpy()
    student = compute_costmap(out["labels"][0], grid, cfg, free_prob=free_prob)
    gt = compute_costmap(sample.semantics.numpy(), val_set.grid, cfg, observed=sample.mask_camera.numpy())
    return DeployCostmap(
        token=sample.token,
        student_files=write_costmap(student, out_dir, f"student_{sample.token}", cfg),
        gt_files=write_costmap(gt, out_dir, f"gt_{sample.token}", cfg),
        student_cells=student.counts(),
        gt_cells=gt.counts(),
        agreement=_cell_agreement(student, gt),
    )


def _cell_agreement(pred: Costmap, gt: Costmap) -> float:
    known = gt.occupancy != UNKNOWN
    return float((pred.occupancy[known] == gt.occupancy[known]).mean()) if known.any() else math.nan


@dataclass(frozen=True)
class DeploySection:
    """The deployment stages of the trained student; ``latency`` is None when ``bench_iters`` is 0."""

    export: DeployExport
    latency: SideBySideResult | None
    costmap: DeployCostmap
    seconds: float  # wall time of all of them: what the deployment section adds to the demo


def deploy_student(run_dir: str | Path, iters: int, with_compile: bool, out: Path) -> DeploySection:
    """Export, side-by-side and costmap of the trained student (EMA weights) into ``out / "deploy"``."""
    start = time.perf_counter()
    loaded = load_bench_model(checkpoint=run_dir)
    model = loaded.model.eval()
    if temporal_frames(model):
        # Its parity frames, INT8 calibration and costmap frame would need streamed histories.
        raise OccDistillError(f"{run_dir}: the demo's deployment stages are made for a single-frame student, this one "
                              "fuses earlier frames (model.dense.temporal_frames > 0); export it with `occdistill "
                              "export --precision fp32` and play it with occdistill.deploy.stream.StreamRunner")
    train_set, val_set = (open_split(loaded.data, split, augment=False) for split in ("train", "val"))
    deploy_dir = out / "deploy"
    export = _export_student(model, loaded.name, train_set, val_set, deploy_dir)
    latency = _side_by_side_student(model, loaded.name, export, val_set, iters, with_compile) if iters > 0 else None
    costmap = _student_costmap(export, val_set, model.grid, deploy_dir / "costmap")
    return DeploySection(export, latency, costmap, time.perf_counter() - start)


def _parity_row(label: str, p: Parity) -> str:
    verdict = ("PASS" if p.ok else "**FAIL**") if p.agreement_bound is not None else "reported only"
    return (f"| {label} | {p.max_abs_logit_diff:.3g} | {p.mean_abs_logit_diff:.3g} | {p.max_abs_logit:.3g} | "
            f"{100 * p.argmax_agreement:.4f}% | {verdict} |")


def _export_markdown(e: DeployExport, out: Path) -> list[str]:
    p = e.parity
    return [
        "## Deployment of the student",
        "",
        f"ONNX export (`occdistill.deploy.export`: dynamo exporter, opset {e.opset}, uint8 images in, logits and "
        f"argmax labels out, batch 1; `{Path(e.onnx).relative_to(out).as_posix()}`, {e.size_mb:.1f} MB)",
        f"with ONE camera rig baked in, rig `{e.rig_hash}`: the calibration of val frame `{e.parity_frames[0]}` "
        f"of `{e.rig_scene}`.",
        "The synthetic street gives every scene its own camera mounts (about 1 degree apart), and the graph "
        f"refuses frames whose calibration moves the frustum by more than {e.rig_tolerance_m:.2f} m, so the parity",
        f"runs on {len(e.parity_frames)} val frames of that scene (frustum within {e.parity_max_shift_m:.3f} m of "
        "the baked rig: ego motion between camera times): onnxruntime against eager PyTorch running the same",
        "module with the same baked rig on the same uint8 images.",
        "INT8: static QDQ (per-channel int8 weights, uint8 activations, BEV pooling kept in float32), "
        f"{e.int8_size_mb:.1f} MB, calibrated on",
        f"{len(e.calibration_frames)} training frames (their scenes may have other mounts: the rig check is "
        "relaxed for the calibration only, which records activation ranges).",
        "",
        "| variant vs eager | max abs logit diff | mean abs logit diff | max abs logit | argmax agreement | bound |",
        "|---|---|---|---|---|---|",
        _parity_row("onnxruntime FP32", p),
        _parity_row("onnxruntime INT8", e.parity_int8),
        "",
        f"Bound (FP32): argmax agreement >= {100 * p.agreement_bound:.1f}% of the {p.voxels} voxels and max abs "
        f"logit diff <= {p.allowed_logit_diff:.3g} ({p.logit_tolerance:g} x max(1, max abs logit)).",
        "",
    ]



def _latency_markdown(r: SideBySideResult, with_compile: bool) -> list[str]:
    m = r.machine
    load = m.get("load_average_at_start"), m.get("load_average_at_end")
    load_text = "n/a" if load[0] is None else f"{load[0][0]:.1f} at the start, {load[1][0]:.1f} at the end"
    lines = [
        "### Engines side by side",
        "",
        f"`occdistill bench --side-by-side` on the exported files, {r.threads} intra-op thread per engine (the demo "
        "cannot set `OMP_WAIT_POLICY` before torch loads,",
        "and busy-waiting OpenMP threads make multi-threaded eager runs on a loaded machine many times slower; the "
        "CLI sets it), batch 1:",
        f"median (p90) in ms of {r.repeats} interleaved rounds after {r.warmup} warm-up rounds on {m['cpu']} "
        f"({m['cpu_count']} CPUs, 1-minute load average",
        f"{load_text}; `OMP_WAIT_POLICY={m.get('omp_wait_policy') or 'unset'}`). Engine-only: uint8 images -> "
        "labels; end-to-end: the camera files of a val frame",
        "-> decode + resize -> engine -> labels. Eager and torch.compile run the exported module (fixed-rig "
        "pooling). Other processes only add time.",
        "",
        "| engine | engine-only ms | end-to-end ms | x eager (engine) | peak MB | labels = eager |",
        "|---|---|---|---|---|---|",
    ]
    for v in r.variants:
        if not v.ok:
            lines.append(f"| {v.name} | failed: {v.error} | | | | |")
            continue
        mem = "n/a" if v.peak_memory_mb is None else f"{v.peak_memory_mb:.0f}"
        lines.append(
            f"| {v.name} | {ms_cell(v.engine_median_ms, v.engine_p90_ms)} | "
            f"{ms_cell(v.end_to_end_median_ms, v.end_to_end_p90_ms)} | {v.engine_speedup_vs_eager:.2f} | {mem} | "
            f"{100 * v.label_agreement_vs_eager:.3f}% |")
    if not with_compile:
        lines.append("| compile | not run: tens of seconds of compilation on a small CPU (`deploy_compile=true` "
                     "adds it) | | | | |")
    lines += ["", f"Model: {r.gflops:.2f} GFLOPs per forward. Peak MB: {r.peak_memory_kind}.", ""]
    return lines


def _costmap_markdown(c: DeployCostmap, out: Path) -> list[str]:
    rel = {k: Path(f["png"]).relative_to(out).as_posix() for k, f in (("student", c.student_files),
                                                                      ("gt", c.gt_files))}
    cells = lambda n: ", ".join(f"{v} {k.replace('_cells', '')}" for k, v in n.items())  # noqa: E731
    return [
        "### Navigation costmap of one val frame",
        "",
        f"`occdistill.deploy.costmap` (outdoor preset) of val frame `{c.token}`: the exported student's prediction "
        "(onnxruntime FP32; a voxel",
        "whose free probability is not confident leaves its cell unknown) and the ground truth (observed = "
        "`mask_camera`). map_server files",
        f"(PGM + YAML, occupancy and risk) beside each picture in "
        f"`{Path(c.student_files['png']).parent.relative_to(out).as_posix()}/`.",
        "",
        "| student (onnxruntime FP32) | ground truth |",
        "|---|---|",
        f"| ![student costmap]({rel['student']}) | ![GT costmap]({rel['gt']}) |",
        "",
        "Black occupied, light grey free, blue-grey unknown, red risk around dynamic objects (opacity = cost); "
        "yellow triangle: the ego, facing +x (right).",
        "",
        f"Cells: student {cells(c.student_cells)}; GT {cells(c.gt_cells)}. The student gives the GT's state to "
        f"{100 * c.agreement:.1f}% of the cells known in the GT.",
        "",
    ]


def deploy_markdown(deploy: DeploySection, with_compile: bool, out: Path) -> list[str]:
    lines = _export_markdown(deploy.export, out)
    if deploy.latency is not None:
        lines += _latency_markdown(deploy.latency, with_compile)
    lines += _costmap_markdown(deploy.costmap, out)
    lines += [f"The deployment stages took {deploy.seconds:.0f} s.", ""]
    return lines
