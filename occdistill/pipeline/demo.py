"""The main job on the built-in synthetic world, as a library function.

Stages: generate -> read back -> verify geometry (projection consistency, ground layer) -> draw ->
train the dense student (``street-tiny``) on the street world -> evaluate it against image-free
baselines -> benchmark it (``occdistill bench``: latency, FPS, memory, FLOPs, per-stage profile) ->
deploy it: ONNX export with the val scene's camera rig baked in and its parity with eager PyTorch,
INT8 variant, eager / onnxruntime side by side (``occdistill bench --side-by-side``), and the
navigation costmap of one val frame next to the ground truth's -> train the sparse-query student
(``room-sparse``) on the room world, evaluate it (Occ-ScanNet ISO metrics) against the image-free
baselines and benchmark it.
Every stage writes into one report folder; re-running resumes the data generation (completed
frames are skipped) and an unchanged, interrupted training run, and rewrites the report.
"""

from __future__ import annotations

import io
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from occdistill.config import load_config, save_config
from occdistill.data.build import DatasetFormat, classes_for, open_dataset
from occdistill.data.consistency import sample_consistency
from occdistill.data.labels import check_ground_layer
from occdistill.data.synth import SynthResult, generate
from occdistill.deploy.bench import (
    BenchResult,
    SideBySideResult,
    benchmark,
    dataset_inputs,
    load_bench_model,
    open_bench_dataset,
    side_by_side,
)
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
from occdistill.data.occ3d import Occ3DDataset
from occdistill.engine.baselines import baseline_reports
from occdistill.engine.config import TrainConfig, load_train_config
from occdistill.engine.data import label_counts, open_split
from occdistill.engine.loop import config_differences, train
from occdistill.geometry.grid import VoxelGrid
from occdistill.io import atomic_write_bytes, atomic_write_json, atomic_write_text
from occdistill.models.dense import DenseStudent
from occdistill.viz.sample_sheet import render_sample

CONSISTENCY_TARGET = 0.95
BENCH_WARMUP = 2  # untimed rounds first: allocator growth and oneDNN kernel selection on the first calls
PARITY_FRAMES = 4  # val frames of the rig's scene on which onnxruntime is compared with eager PyTorch
CALIB_FRAMES = 4  # training frames whose activation ranges calibrate the INT8 variant
# One intra-op thread per engine in the side-by-side: the demo cannot set OMP_WAIT_POLICY before torch
# loads, and with torch's default busy-waiting OpenMP threads a 2-thread eager forward on a loaded
# machine ran 10-40x slower (deploy.bench.OMP_NOTE), which would make the speed-ups meaningless.
DEPLOY_THREADS = 1


@dataclass(frozen=True)
class DemoConfig:
    seed: int = 0
    street_scenes: int = 4  # the last scene is the val split; the student trains on the others
    street_frames: int = 6
    room_scenes: int = 2  # the last scene is the val split of the sparse student; it trains on the others
    room_frames: int = 4
    augmented_views: int = 2  # samples per dataset also drawn after strong augmentation
    student_config: str = "street-tiny"  # built-in training config (or YAML path) of the student
    train_steps: int = 400  # the student's training budget in optimiser steps (~4 min on 2 cores); 0 skips it
    bench_iters: int = 10  # timed rounds of the student's benchmark and of the side-by-side; 0 skips both
    deploy: bool = True  # the deployment section (export, parity, INT8, side-by-side, costmap; ~1 min on 2 cores)
    deploy_compile: bool = False  # torch.compile in the side-by-side: its compilation alone takes ~40 s on 2 cores
    sparse_config: str = "room-sparse"  # built-in training config (or YAML path) of the sparse-query student
    sparse_steps: int = 150  # its training budget on the room world; 0 skips the sparse stage

    def __post_init__(self) -> None:
        for name in ("street_scenes", "street_frames", "room_scenes", "room_frames"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.augmented_views < 0:
            raise ValueError(f"augmented_views must be >= 0, got {self.augmented_views}")
        for name in ("train_steps", "bench_iters", "sparse_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.sparse_steps > 0 and self.room_scenes < 2:
            raise ValueError(f"sparse_steps > 0 needs room_scenes >= 2 (the last room is the val split), "
                             f"got room_scenes={self.room_scenes}")
        for name in ("deploy", "deploy_compile"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")


@dataclass(frozen=True)
class DatasetCheck:
    """Verification results of one dataset (fractions in [0, 1])."""

    name: str
    samples: int
    seen_voxels: int
    consistency: float  # pooled over samples and cameras, no augmentation
    consistency_augmented: float  # same, after strong image + BEV augmentation
    worst_sample: float  # lowest per-sample value over both passes
    ground_ok: int | None  # samples whose ground is in the expected z-layer (street only)
    pngs: tuple[str, ...]


def _save_png(image, path: Path) -> Path:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return atomic_write_bytes(path, buf.getvalue())


def _check_dataset(
    name: str, fmt: DatasetFormat, root: Path, infos: str | None, cfg: DemoConfig, viz_dir: Path
) -> DatasetCheck:
    classes = classes_for(fmt)
    plain = open_dataset(fmt, root, infos, rendered_maps=True)
    augmented = open_dataset(fmt, root, infos, rendered_maps=True, check_aug=True, seed=cfg.seed)
    totals = {False: [0, 0], True: [0, 0]}  # augmented? -> [consistent, seen]
    worst, ground_ok, pngs = 1.0, 0, []
    for i in tqdm(range(len(plain)), desc=f"check {name}", unit="sample"):
        for aug, ds in ((False, plain), (True, augmented)):
            sample = ds[i]
            report = sample_consistency(sample, ds.grid, classes)
            totals[aug][0] += sum(c.consistent for c in report.cameras)
            totals[aug][1] += report.seen
            if report.seen:
                worst = min(worst, report.fraction)
            if not aug and fmt == "occ3d":
                ground_ok += check_ground_layer(sample.semantics.numpy(), ds.grid, classes).ok
            if not aug or i < cfg.augmented_views:
                tag = "aug" if aug else "raw"
                title = f"{name} {sample.scene_name} {sample.token} ({tag}) consistency {report.fraction:.1%}"
                fname = f"{name}__{sample.scene_name}__{sample.token}__{tag}.png".replace("/", "_")
                pngs.append(str(_save_png(render_sample(sample, ds.grid, classes, title), viz_dir / fname)))
    frac = {a: (c / s if s else math.nan) for a, (c, s) in totals.items()}
    return DatasetCheck(
        name=name,
        samples=len(plain),
        seen_voxels=totals[False][1],
        consistency=frac[False],
        consistency_augmented=frac[True],
        worst_sample=worst,
        ground_ok=ground_ok if fmt == "occ3d" else None,
        pngs=tuple(pngs),
    )


@dataclass(frozen=True)
class StudentResult:
    """A trained student on its world's val split, next to the image-free baselines (percent)."""

    config: str
    steps: int
    train_seconds: float
    run_dir: str
    curves_png: str
    train_samples: int
    val_samples: int
    metrics: dict[str, Any]  # occ3d_report / occscannet_report of the student (EMA weights when the config has EMA)
    baselines: dict[str, dict[str, Any]]  # name -> report of the same format
    present_classes: tuple[str, ...] = ()  # classes with voxels in the val split's labels (unknown not counted)


def _train_student(cfg: DemoConfig, world: SynthResult, out: Path, config: str | None = None,
                   steps: int | None = None, name: str = "student") -> StudentResult:
    """Train ``config`` (default ``cfg.student_config``) on the train split of ``world`` (default: the
    street) for ``steps`` (default ``cfg.train_steps``) steps into ``out / name`` and evaluate it on the
    val split. An interrupted run with the same config is resumed."""
    config = cfg.student_config if config is None else config
    steps = cfg.train_steps if steps is None else steps
    train_cfg = load_train_config(
        config,
        [f"data.root={world.out}", f"data.train_split={world.splits['train']}",
         f"data.val_split={world.splits['val']}", f"optim.max_steps={steps}",
         f"runtime.seed={cfg.seed}", "runtime.eval_every=0", "runtime.ckpt_every=50"],
    )
    run_dir = out / name
    resume = (run_dir / "checkpoints" / "latest.json").is_file() and not config_differences(
        load_config(TrainConfig, run_dir / "config.yaml"), train_cfg
    )
    if not resume and run_dir.exists():
        shutil.rmtree(run_dir)
    result = train(train_cfg, run_dir, resume=resume)
    train_set, val_set = (open_split(train_cfg.data, split, augment=False) for split in ("train", "val"))
    baselines = baseline_reports(train_set, val_set)
    counts = label_counts(val_set, camera_mask=False)
    return StudentResult(
        config=config,
        steps=result.step,
        train_seconds=result.seconds,
        run_dir=str(run_dir),
        curves_png=str(run_dir / "curves.png"),
        train_samples=len(train_set),
        val_samples=len(val_set),
        metrics=result.metrics,
        baselines=baselines,
        present_classes=tuple(n for n, c in zip(val_set.classes.names, counts) if c > 0),
    )


@dataclass(frozen=True)
class StudentBench:
    """``occdistill bench`` of a trained student on its world's val split (``result``: all its numbers)."""

    infos: str  # the frames read by the end-to-end rounds
    seconds: float  # wall time of loading the checkpoint and benchmarking: what the bench adds to the demo
    result: BenchResult


def _bench_student(run_dir: str | Path, world: SynthResult, iters: int) -> StudentBench:
    """What ``occdistill bench --checkpoint RUN --data ROOT --infos VAL`` measures on ``world``'s val split
    (the checkpoint's data format: street or room), at the demo's budget:
    batch 1 on the CPU with torch's thread count, ``BENCH_WARMUP`` + ``iters`` rounds, training pooling
    path only (the exportable path and the other engines: ``occdistill bench --side-by-side``)."""
    start = time.perf_counter()
    loaded = load_bench_model(checkpoint=run_dir)
    model, data = loaded.model, loaded.data
    # The student's own evaluation transform (not bench's default crop), so end-to-end is its real input pipeline.
    dataset = open_bench_dataset(data.format, world.out, world.splits["val"], model.cfg.image_size, data.cameras,
                                 image_aug=data.image_aug)
    result = benchmark(model, dataset_inputs(dataset), dataset=dataset, model_name=loaded.name,
                       repeats=iters, warmup=BENCH_WARMUP, export_path=False)
    return StudentBench(infos=str(world.splits["val"]), seconds=time.perf_counter() - start, result=result)


@dataclass(frozen=True)
class SparseSection:
    """The sparse-query student on the room world: trained and evaluated (Occ-ScanNet ISO metrics) next
    to the image-free baselines, and its ``occdistill bench`` (None when ``bench_iters`` is 0)."""

    student: StudentResult
    bench: StudentBench | None
    seconds: float  # wall time of training, evaluation and bench: what the sparse stage adds to the demo


def _sparse_student(cfg: DemoConfig, room: SynthResult, out: Path) -> SparseSection:
    """Train ``cfg.sparse_config`` on the room train split for ``cfg.sparse_steps`` steps into
    ``out / "sparse_student"`` (resumed like the dense student), evaluate and benchmark it on the val room."""
    start = time.perf_counter()
    student = _train_student(cfg, room, out, config=cfg.sparse_config, steps=cfg.sparse_steps, name="sparse_student")
    bench = _bench_student(student.run_dir, room, cfg.bench_iters) if cfg.bench_iters > 0 else None
    return SparseSection(student, bench, time.perf_counter() - start)


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


def _deploy_student(run_dir: str | Path, iters: int, with_compile: bool, out: Path) -> DeploySection:
    """Export, side-by-side and costmap of the trained student (EMA weights) into ``out / "deploy"``."""
    start = time.perf_counter()
    loaded = load_bench_model(checkpoint=run_dir)
    model = loaded.model.eval()
    train_set, val_set = (open_split(loaded.data, split, augment=False) for split in ("train", "val"))
    deploy_dir = out / "deploy"
    export = _export_student(model, loaded.name, train_set, val_set, deploy_dir)
    latency = _side_by_side_student(model, loaded.name, export, val_set, iters, with_compile) if iters > 0 else None
    costmap = _student_costmap(export, val_set, model.grid, deploy_dir / "costmap")
    return DeploySection(export, latency, costmap, time.perf_counter() - start)


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f}"


def _student_markdown(student: StudentResult, out: Path) -> list[str]:
    rows = {"student": student.metrics, **student.baselines}
    lines = [
        "## Dense student on the street world",
        "",
        f"`{student.config}` trained for {student.steps} steps ({student.train_seconds / 60:.1f} min on this machine)",
        f"on the {student.train_samples} frames of the street train split, evaluated (EMA weights) on the",
        f"{student.val_samples} frames of the val split: Occ3D mIoU and geometry IoU over `mask_camera` voxels,",
        "RayIoU from the LiDAR origins without a mask. The baselines need no images: `all-free` predicts empty space",
        "everywhere, `voxel-majority` the most frequent training label of each voxel. This is a",
        "demo-sized budget; `benchmarks/train_street_tiny.py` trains 24 epochs on 136 frames (about",
        "15 min), where objects are learnt too (`benchmarks/results/train_street_tiny.json`).",
        "",
        "| predictor | mIoU | IoU | RayIoU | RayIoU@1m | RayIoU@2m | RayIoU@4m |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {_pct(r['mIoU'])} | {_pct(r['IoU'])} | {_pct(r['RayIoU'])} | {_pct(r['RayIoU@1m'])} | "
            f"{_pct(r['RayIoU@2m'])} | {_pct(r['RayIoU@4m'])} |"
        )
    lines += ["", "Per-class IoU (classes present in the val split):", "",
              "| class | " + " | ".join(rows) + " |", "|---|" + "---|" * len(rows)]
    present = student.baselines["all-free"]["per_class"]  # all-free scores 0 on a present class, n/a on an absent one
    for cls in student.metrics["per_class"]:
        if present[cls] is not None:
            lines.append(f"| {cls} | " + " | ".join(_pct(r["per_class"][cls]) for r in rows.values()) + " |")
    rel = Path(student.curves_png).relative_to(out).as_posix()
    lines += ["", "Training curves (loss terms, learning rate, validation metrics):", "", f"![curves]({rel})", ""]
    return lines


def _bench_markdown(bench: StudentBench) -> list[str]:
    r = bench.result
    h, w = r.image_size
    load = r.machine["load_average_at_start"]  # None where the OS has no load average
    lines = [
        "## Latency profile of the student",
        "",
        f"`occdistill bench` of the trained student, {r.model}, on `{r.device}` in {r.dtype} with "
        f"{r.machine['torch_threads']} torch threads",
        f"({r.machine['cpu']}, {r.machine['cpu_count']} CPUs, 1-minute load average "
        f"{'n/a' if load is None else f'{load[0]:.1f}'} at the start). Input: batch {r.batch} of {r.cameras} "
        f"cameras at {h}x{w}",
        f"from the street val split. Median and p90 of {r.repeats} rounds after {r.warmup} warm-up rounds "
        f"({bench.seconds:.1f} s in all).",
        "Engine-only: forward + argmax on a batch already on the device; end-to-end: read + decode + resize of the",
        "frame, collate, transfer, forward, argmax. Stage shares are of the engine-only stage sum, the data pipeline's",
        "of end-to-end. Other processes only add time, so on a busy machine these are upper bounds. The exportable",
        "pooling path and the other engines (torch.compile, onnxruntime): `occdistill bench --side-by-side`.",
        "",
        "| stage | median ms | p90 ms | share | GFLOPs |",
        "|---|---|---|---|---|",
        f"| data pipeline (per sample) | {r.data_pipeline_ms_per_sample:.1f} | n/a | "
        f"{r.data_share_of_end_to_end:.1%} | n/a |",
    ]
    for s in r.stages:
        lines.append(f"| {s.name} | {s.median_ms:.1f} | {s.p90_ms:.1f} | {s.share:.1%} | {s.gflops:.2f} |")
    lines += [
        f"| **engine-only** | {r.latency_median_ms:.1f} | {r.latency_p90_ms:.1f} | | {r.gflops:.2f} |",
        f"| **end-to-end** | {r.end_to_end_median_ms:.1f} | {r.end_to_end_p90_ms:.1f} | | |",
        "",
        f"FPS {r.fps:.1f} engine-only, {r.end_to_end_fps:.1f} end-to-end; {r.params / 1e6:.2f} M parameters "
        f"({r.model_memory_mb:.0f} MB), peak memory {r.peak_memory_mb:.0f} MB above the resident weights and inputs",
        f"({r.peak_memory_kind}); {r.gflops:.2f} GFLOPs = {r.gmacs:.2f} GMACs per batch "
        "(matmul/conv-type ops only).",
        "",
    ]
    return lines


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


def _ms_cell(median: float | None, p90: float | None) -> str:
    return "n/a" if median is None else f"{median:.1f} ({p90:.1f})"


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
            f"| {v.name} | {_ms_cell(v.engine_median_ms, v.engine_p90_ms)} | "
            f"{_ms_cell(v.end_to_end_median_ms, v.end_to_end_p90_ms)} | {v.engine_speedup_vs_eager:.2f} | {mem} | "
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


def _deploy_markdown(deploy: DeploySection, with_compile: bool, out: Path) -> list[str]:
    lines = _export_markdown(deploy.export, out)
    if deploy.latency is not None:
        lines += _latency_markdown(deploy.latency, with_compile)
    lines += _costmap_markdown(deploy.costmap, out)
    lines += [f"The deployment stages took {deploy.seconds:.0f} s.", ""]
    return lines


def _sparse_markdown(sparse: SparseSection, out: Path) -> list[str]:
    s = sparse.student
    rows = {"sparse student": s.metrics, **s.baselines}
    lines = [
        "## Sparse-query student on the room world",
        "",
        f"`{s.config}` (OPUS-style sparse queries, `model.kind: sparse`) trained for {s.steps} steps "
        f"({s.train_seconds / 60:.1f} min on this machine) on the",
        f"{s.train_samples} frames of the room train split, evaluated on the {s.val_samples} frames of the val "
        "split (an unseen room) with the Occ-ScanNet",
        "ISO metrics: completion IoU / precision / recall of occupied against empty over every voxel (unknown "
        "counts as empty), mIoU the plain",
        "mean over the 11 classes (a class absent from GT and prediction scores 0 and still counts). `all-free` "
        "predicts empty everywhere:",
        "it has no true positive, so it scores 0 IoU and 0 mIoU by construction; `voxel-majority` the most "
        "frequent training label of each voxel.",
        "",
        "| predictor | mIoU | IoU | precision | recall |",
        "|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        lines.append(f"| {name} | {_pct(r['mIoU'])} | {_pct(r['IoU'])} | {_pct(r.get('precision'))} | "
                     f"{_pct(r.get('recall'))} |")
    present = [c for c in s.metrics["per_class"] if c in s.present_classes]
    if present:
        lines += ["", "Per-class IoU (classes present in the val split):", "",
                  "| class | " + " | ".join(rows) + " |", "|---|" + "---|" * len(rows)]
        for cls in present:
            lines.append(f"| {cls} | " + " | ".join(_pct(r["per_class"][cls]) for r in rows.values()) + " |")
    if sparse.bench is not None:
        r = sparse.bench.result
        h, w = r.image_size
        stages = ", ".join(f"{st.name} {st.share:.0%}" for st in r.stages)
        lines += [
            "",
            f"Latency (`occdistill bench`, {r.device}, {r.dtype}, {r.machine['torch_threads']} torch threads, batch "
            f"{r.batch} at {h}x{w}, median (p90) of {r.repeats} rounds",
            f"after {r.warmup} warm-up rounds): engine-only {_ms_cell(r.latency_median_ms, r.latency_p90_ms)} ms "
            f"({r.fps:.1f} FPS), end-to-end from the val room's files",
            f"{_ms_cell(r.end_to_end_median_ms, r.end_to_end_p90_ms)} ms; stages {stages}; {r.gflops:.2f} GFLOPs, "
            f"{r.params / 1e6:.2f} M parameters.",
        ]
    rel = Path(s.curves_png).relative_to(out).as_posix()
    lines += [
        "",
        "This is a demo-sized budget on a few frames (the config's own budget is 300 steps on 216 frames). The "
        "DiScene ablation on a larger room",
        "world, `benchmarks/results/sparse_ablation.md`, distils this student from `room-sparse-teacher`: all four "
        "levels + teacher-guided",
        "initialisation close 80% +- 10% of the student-teacher mIoU gap over 2 seeds.",
        "",
        f"Training curves: ![sparse curves]({rel})",
        "",
        f"The sparse stage took {sparse.seconds:.0f} s.",
        "",
    ]
    return lines


def _report_markdown(
    cfg: DemoConfig, checks: list[DatasetCheck], student: StudentResult | None, bench: StudentBench | None,
    deploy: DeploySection | None, out: Path, sparse: SparseSection | None = None,
) -> str:
    lines = [
        "# occdistill demo report",
        "",
        "Synthetic data generated by `occdistill synth`, read back by the real-format readers.",
        "",
        "## Geometry verification",
        "",
        "Projection consistency: the fraction of GT-occupied voxels seen by a camera (in front, inside",
        "the image, depth agreeing within half a voxel diagonal) whose pixel in the rendered semantic",
        f"map has the voxel's class. Target: at least {CONSISTENCY_TARGET:.0%}, with and without augmentation.",
        "",
        "| dataset | samples | seen voxels | consistency | with augmentation | worst sample | ground layer ok |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in checks:
        ground = "n/a" if c.ground_ok is None else f"{c.ground_ok}/{c.samples}"
        lines.append(
            f"| {c.name} | {c.samples} | {c.seen_voxels} | {c.consistency:.2%} | "
            f"{c.consistency_augmented:.2%} | {c.worst_sample:.2%} | {ground} |"
        )
    lines += ["", "## Visual checks", "", "Camera images with GT voxels in class colours, and the BEV label map.", ""]
    for c in checks:
        for png in c.pngs:
            rel = Path(png).relative_to(out)
            lines.append(f"![{rel.name}]({rel.as_posix()})")
    lines.append("")
    if student is not None:
        lines += _student_markdown(student, out)
    if bench is not None:
        lines += _bench_markdown(bench)
    if deploy is not None:
        lines += _deploy_markdown(deploy, cfg.deploy_compile, out)
    if sparse is not None:
        lines += _sparse_markdown(sparse, out)
    lines += ["", f"Configuration: `config.yaml`. Numbers: `report.json`. Seed {cfg.seed}.", ""]
    return "\n".join(lines)


def run_demo(cfg: DemoConfig, out: Path) -> Path:
    """Run the main job into ``out``; returns the path of the report README."""
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    street = generate("street", out / "data" / "street", cfg.street_scenes, cfg.street_frames, cfg.seed)
    room = generate("room", out / "data" / "room", cfg.room_scenes, cfg.room_frames, cfg.seed)
    viz_dir = out / "viz"
    checks = [
        _check_dataset(f"street-{split}", "occ3d", street.out, str(infos), cfg, viz_dir)
        for split, infos in street.splits.items()
    ]
    checks.append(_check_dataset("room", "occscannet", room.out, None, cfg, viz_dir))
    student = _train_student(cfg, street, out) if cfg.train_steps > 0 else None
    bench = deploy = None
    if student is not None and cfg.bench_iters > 0:
        bench = _bench_student(student.run_dir, street, cfg.bench_iters)
    if student is not None and cfg.deploy:
        deploy = _deploy_student(student.run_dir, cfg.bench_iters, cfg.deploy_compile, out)
    sparse = _sparse_student(cfg, room, out) if cfg.sparse_steps > 0 else None
    report = {"config": asdict(cfg), "checks": [asdict(c) for c in checks],
              "student": asdict(student) if student is not None else None,
              "bench": asdict(bench) if bench is not None else None,
              "deploy": asdict(deploy) if deploy is not None else None,
              "sparse": asdict(sparse) if sparse is not None else None}
    atomic_write_json(out / "report.json", report)
    return atomic_write_text(out / "README.md", _report_markdown(cfg, checks, student, bench, deploy, out, sparse))
