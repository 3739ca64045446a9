"""Benchmark: DiScene distillation ablation (paper Table III style) on the synthetic room or street world.

    .venv/bin/python benchmarks/bench_sparse_ablation.py [--world room|street] [--seeds 0 1] [--steps N]
        [--teacher-steps N] [--scenes N] [--frames N] [--val-scenes N] [--data-seed 0] [--data DIR]
        [--work DIR] [--procs N] [--variants ...] [--fresh] [--smoke]

Two worlds (``--world``, default room):

- ``room``: Occ-ScanNet layout, 60x60x36 at 0.08 m, 11 classes; 40 scenes x 6 frames rendered at
  256x192 into ``WORK/data``, the last 4 scenes are the val split; configs ``room-sparse`` /
  ``room-sparse-teacher``; the trainings run one after the other (``--procs 1``). Writes
  ``benchmarks/results/sparse_ablation.json`` / ``.md``.
- ``street``: Occ3D-nuScenes layout, six 320x180 cameras, 100x100x16 at 0.4 m, 17 classes + free;
  20 scenes x 8 frames, the last 3 scenes are the val split: the world of benchmarks/bench_temporal.py
  and bench_kd_ablation.py, reused from ``outputs/bench/street`` (generated there when absent);
  configs ``street-sparse`` / ``street-sparse-teacher``; two trainings at a time (``--procs 2``),
  each a process at one CPU thread. Writes ``benchmarks/results/sparse_ablation_street.json`` / ``.md``.

1. Generates the world (or reuses the directory when it already holds that dataset).
2. Trains the teacher ONCE, with seed 0; every student seed distils from that one teacher
   (training one teacher per seed would not fit the time budget).
3. For every seed, trains the student with the same split, steps and seed: ``baseline`` (no
   distillation), each DiScene level alone at the paper's weight (``encoder`` 1, ``query`` 0.2,
   ``prior`` 0.2, ``anchor`` 0.5; the other levels 0), ``tgi`` (teacher-guided initialisation
   alone: all levels 0) and ``all_tgi`` (all four levels + TGI, DiScene's full recipe). With
   ``--procs 2`` the baselines train beside the teacher, then the distilled students two at a time.
4. Evaluates every run on the val split -- room: Occ-ScanNet ISO protocol (completion IoU, mIoU
   over the 11 classes, per class); street: Occ3D (mIoU over classes 0..16 and geometry IoU inside
   ``mask_camera``, per class) and RayIoU (1, 2, 4 m) -- and scores two image-free floors on the
   same split (all-empty and the per-voxel majority of the training labels).
5. Measures latency of the student and the teacher: batch 1, 1 CPU thread, one fixed val frame,
   median and p90 over ``--latency-runs`` forward passes after warm-up (model forward alone, and
   forward + voxelisation = what inference returns).

Writes the JSON (per seed and mean +- sample std over seeds: ``teacher_mIoU``, ``student_mIoU``,
``distilled_mIoU`` = all_tgi, ``gap_closed`` = (distilled - student) / (teacher - student);
per-variant metrics; latencies; the command; machine and load averages) and the markdown tables.

Street budget (the configs' ``optim.max_steps``: teacher 360 steps, students 80), sized for a
whole run of <= 50 min on this shared 2-core machine with two trainings side by side at one
thread each. Rates measured with two street trainings side by side (load average ~4.6, other
users included), batch 2: teacher 2.5 s/step (average over a 360-step run); student 1.3 s/step
without KD and with TGI alone (TGI never runs the teacher), 2.6 encoder, 2.55 query, 2.85 prior,
2.45 anchor, 3.3 all four levels; evaluation on the 24 val frames with RayIoU ~40 s per run;
floors 11 s; latency ~1 min. Wall time, S student and T teacher steps:
  phase 1: teacher || both baselines     max(2.5 T + 30, 2 x (1.3 S + 40))     = 930 s  (T = 360)
  phase 2: 12 distilled students, 2 at a time
           (S x (2.6 + 2.55 + 2.85 + 2.45 + 1.3 + 3.3) x 2 seeds + 12 x 40) / 2 = 15.05 S + 240 = 1444 s  (S = 80)
  data check + floors + start-up ~50 s, latency ~60 s                          =  110 s
  total ~2480 s = 41 min at that load; the 9 min left absorb a busier machine (the rates above
  were measured beside other users' jobs). Run it with:
    .venv/bin/python benchmarks/bench_sparse_ablation.py --world street
``--smoke``: a 2-scene x 2-frame world of the chosen kind (room at a 20x20x12 grid of 0.12 m),
micro models, 2 steps, results under ``WORK`` only (the tests).

Resume: every finished run leaves ``bench_run.json`` holding its fingerprint (resolved training
config, the dataset's config, and for distilled runs the teacher checkpoint's SHA-256s); a later
invocation reuses a run whose fingerprint is unchanged and retrains (from scratch) any other.
Every training uses ``runtime.threads=1`` and ``data.workers=0``: the benchmark is sized for one
core per training on a shared 2-core machine. The val split is never used to choose anything
here: the room configs were tuned on a different synthetic world (another data seed), the street
configs' sizes come from step timings (see the configs' header comments).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch: the pool's workers inherit it
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle OpenMP threads must not spin on a shared machine

import argparse
import hashlib
import json
import math
import platform
import shlex
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch

from occdistill.config import to_dict
from occdistill.data.sample import collate
from occdistill.data.synth import generate
from occdistill.engine import jobpool
from occdistill.engine.baselines import baseline_reports
from occdistill.engine.checkpoint import find_checkpoint, load_trained_model
from occdistill.engine.config import TrainConfig, load_train_config
from occdistill.engine.data import model_grid, open_split
from occdistill.engine.jobpool import Hooks
from occdistill.engine.loop import train
from occdistill.engine.objective import forward_batch

RESULTS = Path(__file__).resolve().parent / "results"
RENDER = ["camera.width=256", "camera.height=192"]  # the models read 96x128: no need to render 640x480


@dataclass(frozen=True)
class World:
    """A synthetic world the ablation runs on: its configs, data, protocol and defaults."""

    name: str  # the synth preset
    student: str  # built-in configs
    teacher: str
    render: tuple[str, ...]  # synth overrides besides the split
    scenes: int
    frames: int
    val_scenes: int
    data: Path | None  # dataset directory; None: WORK/data
    work: Path
    out_json: Path
    out_md: Path
    metrics: tuple[str, ...]  # the run-level metrics kept per variant
    procs: int  # trainings at once (one CPU thread each)
    protocol: str


WORLDS = {
    "room": World(
        "room", "room-sparse", "room-sparse-teacher", tuple(RENDER), 40, 6, 4, None,
        Path("outputs/bench/sparse_ablation"), RESULTS / "sparse_ablation.json", RESULTS / "sparse_ablation.md",
        ("mIoU", "IoU"), 1,
        "Occ-ScanNet (ISO): 255 counted as empty, completion IoU on occupied, mIoU over classes 1..11 "
        "(absent classes count 0), one confusion matrix pooled over the val split; percent"),
    # The street world of benchmarks/bench_temporal.py and bench_kd_ablation.py (shared directory).
    "street": World(
        "street", "street-sparse", "street-sparse-teacher", (), 20, 8, 3, Path("outputs/bench/street"),
        Path("outputs/bench/sparse_ablation_street"), RESULTS / "sparse_ablation_street.json",
        RESULTS / "sparse_ablation_street.md", ("mIoU", "IoU", "RayIoU", "RayIoU@1m", "RayIoU@2m", "RayIoU@4m"), 2,
        "Occ3D: mIoU over classes 0..16 and geometry IoU inside mask_camera, one confusion matrix pooled over the "
        "val split; RayIoU (SparseOcc: 1, 2, 4 m, no camera mask); percent"),
}

# --smoke: a 2-scene x 2-frame world of each kind and micro models, 2 steps (the tests).
SMOKE_SYNTH = {
    "room": ("camera.width=64", "camera.height=48", "grid.shape=[20,20,12]", "grid.voxel_size=0.12"),
    "street": ("rig.width=64", "rig.height=36", "rig.cameras=[CAM_FRONT,CAM_BACK]", "lidar.azimuths=256",
               "grid.range=[-9.6,-9.6,-1,9.6,9.6,5.4]", "grid.voxel_size=[0.8,0.8,0.8]"),
}
SMOKE_GRID = {
    "room": ("model.sparse.grid.range=[-1.2,-1.2,0.0,1.2,1.2,1.44]", "model.sparse.grid.voxel_size=[0.12,0.12,0.12]"),
    "street": ("model.sparse.grid.range=[-9.6,-9.6,-1,9.6,9.6,5.4]", "model.sparse.grid.voxel_size=[0.8,0.8,0.8]"),
}
SMOKE_MODEL = ("data.image_aug.final_size=[32,64]", "model.sparse.image_size=[32,64]",
               "model.sparse.backbone.base_width=8", "model.sparse.neck_channels=16", "model.sparse.embed_dims=16",
               "model.sparse.num_heads=2", "model.sparse.points_per_layer=[1,2]", "model.sparse.sampling_points=2",
               "model.sparse.mixing_out_points=4", "model.sparse.ffn_channels=32", "loss.sparse.max_gt_points=256",
               "optim.max_steps=2", "optim.warmup_steps=0", "data.batch_size=1")
SMOKE_QUERIES = {"student": "model.sparse.num_queries=8", "teacher": "model.sparse.num_queries=16"}
# Every training: one intra-op thread, data loaded in the training process (a shared 2-core machine).
RUNTIME = ["runtime.threads=1", "data.workers=0", "runtime.progress=false", "runtime.eval_every=0",
           "runtime.ckpt_every=0"]

# name -> distillation overrides (DiScene Table III rows; the paper's lambdas 1, 0.2, 0.2, 0.5).
LEVELS_OFF = ["distill.discene.encoder=0", "distill.discene.query=0", "distill.discene.prior=0",
              "distill.discene.anchor=0"]
PAPER = {"encoder": 1.0, "query": 0.2, "prior": 0.2, "anchor": 0.5}
VARIANTS: dict[str, list[str]] = {
    "baseline": [],
    **{level: [*LEVELS_OFF, f"distill.discene.{level}={w}"] for level, w in PAPER.items()},
    "tgi": [*LEVELS_OFF, "distill.teacher_guided_init=true"],
    "all_tgi": [f"distill.discene.{level}={w}" for level, w in PAPER.items()] + ["distill.teacher_guided_init=true"],
}
DESCRIPTION = {
    "baseline": "no distillation",
    "encoder": "encoder-level feature alignment alone (lambda 1)",
    "query": "query level alone (Hungarian-matched queries, lambda 0.2)",
    "prior": "prior level alone (teacher's initial points as an extra group, lambda 0.2)",
    "anchor": "anchor level alone (GT-sampled anchors, lambda 0.5)",
    "tgi": "teacher-guided initialisation alone (decoder copied at step 0, no KD loss)",
    "all_tgi": "all four levels + TGI (DiScene)",
}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def teacher_fingerprint(run: Path) -> dict[str, str]:
    """SHA-256 of every file of the teacher's final checkpoint (from its meta.json)."""
    meta = json.loads((find_checkpoint(run) / "meta.json").read_text())
    return dict(sorted(meta["sha256"].items()))


def run_or_reuse(name: str, cfg: TrainConfig, run: Path, fingerprint: dict[str, Any],
                 metrics: tuple[str, ...] = ("mIoU", "IoU")) -> dict[str, Any]:
    """Train ``cfg`` into ``run`` unless a finished run with the same fingerprint is there; returns
    the run's record (``metrics`` of the val split with the per-class IoU, timings, load averages)."""
    marker = run / "bench_run.json"
    if marker.is_file():
        record = json.loads(marker.read_text())
        if record.get("fingerprint") == fingerprint:
            log(f"{name}: reusing the finished run in {run} (mIoU {record['metrics']['mIoU']:.2f})")
            record["reused"] = True
            return record
        log(f"{name}: {run} was trained with another config; retraining")
    shutil.rmtree(run, ignore_errors=True)
    log(f"{name}: training {cfg.optim.max_steps} steps into {run}")
    load_before = os.getloadavg()
    start = time.perf_counter()
    result = train(cfg, run)
    wall = time.perf_counter() - start
    m = result.metrics
    record = {
        "fingerprint": fingerprint,
        "metrics": {**{k: m[k] for k in metrics}, "per_class": m["per_class"], "num_samples": m["num_samples"]},
        "steps": result.step, "bad_steps": result.bad_steps, "train_seconds": round(result.seconds, 1),
        "wall_seconds_with_eval": round(wall, 1),
        "loadavg_before": [round(x, 2) for x in load_before], "loadavg_after": [round(x, 2) for x in os.getloadavg()],
    }
    (run / "bench_run.json").write_text(json.dumps(record, indent=2) + "\n")
    log(f"{name}: mIoU {m['mIoU']:.2f}  IoU {m['IoU']:.2f}  ({result.seconds / 60:.1f} min training, "
        f"{result.seconds / max(result.step, 1):.2f} s/step)")
    record["reused"] = False
    return record


@torch.no_grad()
def latency(run: Path, batch, runs: int, warmup: int = 3) -> dict[str, Any]:
    """Forward and forward+voxelise times (ms) of a run's evaluated weights on one frame, batch 1."""
    trained = load_trained_model(run, "ema")
    model = trained.model.eval()
    params = sum(p.numel() for p in model.parameters())

    def timed(fn) -> list[float]:
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return times

    forward = timed(lambda: forward_batch(model, batch))
    full = timed(lambda: model.voxelize(forward_batch(model, batch)))
    return {"params_M": round(params / 1e6, 3), "runs": runs, "batch": 1, "threads": torch.get_num_threads(),
            "forward_ms": summary_ms(forward), "forward_voxelize_ms": summary_ms(full)}


def summary_ms(times: list[float]) -> dict[str, float]:
    ordered = sorted(times)
    p90 = ordered[min(len(ordered) - 1, math.ceil(0.9 * len(ordered)) - 1)]
    return {"median": round(statistics.median(ordered), 2), "p90": round(p90, 2), "min": round(ordered[0], 2)}


def mean_std(values: list[float]) -> dict[str, float]:
    out = {"mean": round(statistics.fmean(values), 3), "n": len(values)}
    out["std"] = round(statistics.stdev(values), 3) if len(values) > 1 else None
    out["min"], out["max"] = round(min(values), 3), round(max(values), 3)
    return out


def fmt(stat: dict[str, Any], digits: int = 2) -> str:
    if stat["std"] is None:
        return f"{stat['mean']:.{digits}f}"
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


@dataclass(frozen=True)
class Job:
    """One training of the benchmark: ``config`` with ``overrides`` into ``run``. ``role``
    "teacher" (fingerprint: config and data) or "student" (plus ``teacher_fp``, the teacher
    checkpoint's SHA-256s when ``distilled``: such a job ``deps`` on the teacher and gets them when
    it starts)."""

    name: str
    config: str
    overrides: tuple[str, ...]
    run: Path
    role: Literal["teacher", "student"]
    distilled: bool
    data_fp: str
    metrics: tuple[str, ...]
    description: str = ""
    deps: tuple[str, ...] = ()
    teacher_fp: dict[str, str] | None = None


def run_job(job: Job) -> dict[str, Any]:
    """Train (or reuse) one job; in the calling process or a pool worker."""
    torch.set_num_threads(1)
    cfg = load_train_config(job.config, list(job.overrides))
    fingerprint: dict[str, Any] = {"config": to_dict(cfg), "data": job.data_fp}
    if job.role == "student":
        fingerprint["teacher"] = job.teacher_fp
    return run_or_reuse(job.name, cfg, job.run, fingerprint, job.metrics)


def run_jobs(jobs: list[Job], procs: int, teacher_run: Path, start: float) -> dict[str, dict[str, Any]]:
    """Every job's record by name, from the shared job pool (:func:`occdistill.engine.jobpool.run_jobs`):
    ``procs`` trainings at once, each a process at one CPU thread (1: one after the other in this
    process), taken in list order among the ready ones: a distilled student is ready once the
    teacher has finished. A failed job stops the benchmark (re-running the same command reuses every
    finished run)."""

    def prepare(job: Job) -> Job:
        return replace(job, teacher_fp=teacher_fingerprint(teacher_run)) if job.distilled else job

    def announce(job: Job, index: int) -> None:
        elapsed = (time.perf_counter() - start) / 60
        log(f"[{index}/{len(jobs)}] {job.name} ({job.description}); {elapsed:.1f} min so far")

    return jobpool.run_jobs(jobs, run_job, procs, Hooks(prepare=prepare, on_start=announce), poll_s=1.0,
                            in_process=procs == 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", choices=list(WORLDS), default="room",
                        help="room (default; Occ-ScanNet layout, room-sparse configs) or street (Occ3D layout, "
                        "street-sparse configs)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="student seeds (teacher: seed 0, once)")
    parser.add_argument("--steps", type=int, default=0,
                        help="student steps (default: the student config's optim.max_steps)")
    parser.add_argument("--teacher-steps", type=int, default=0,
                        help="teacher steps (default: the teacher config's optim.max_steps)")
    parser.add_argument("--scenes", type=int, help="scenes of the world (default: room 40, street 20)")
    parser.add_argument("--frames", type=int, help="frames per scene (default: room 6, street 8)")
    parser.add_argument("--val-scenes", type=int, help="last scenes forming the val split (default: room 4, street 3)")
    parser.add_argument("--data-seed", type=int, default=0, help="seed of the synthetic world")
    parser.add_argument("--data", type=Path,
                        help="dataset directory, generated or reused (default: room WORK/data, street "
                        "outputs/bench/street, the street world of bench_temporal.py and bench_kd_ablation.py)")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--latency-runs", type=int, default=30)
    parser.add_argument("--procs", type=int,
                        help="trainings at once, one CPU thread each (default: room 1, street 2)")
    parser.add_argument("--work", type=Path,
                        help="run directories, reused across invocations (default: room "
                        "outputs/bench/sparse_ablation, street outputs/bench/sparse_ablation_street)")
    parser.add_argument("--out-json", type=Path,
                        help="default benchmarks/results/sparse_ablation.json (street: sparse_ablation_street.json; "
                        "--smoke: WORK/sparse_ablation.json)")
    parser.add_argument("--out-md", type=Path, help="default: --out-json with .md")
    parser.add_argument("--fresh", action="store_true", help="retrain every run (ignore finished ones)")
    parser.add_argument("--smoke", action="store_true",
                        help="a 2-scene x 2-frame world, micro models, 2 steps, results under WORK (tests)")
    parser.add_argument("--markdown-only", action="store_true",
                        help="only re-render --out-md from the results in --out-json (no training)")
    args = parser.parse_args(argv)
    world = WORLDS[args.world]
    work = (args.work or world.work).resolve()
    out_json = args.out_json or (work / "sparse_ablation.json" if args.smoke else world.out_json)
    out_md = args.out_md or (out_json.with_suffix(".md") if args.out_json or args.smoke else world.out_md)
    if args.markdown_only:
        report = json.loads(out_json.read_text())
        out_md.write_text(markdown(report, list(report["variants"])))
        log(f"wrote {out_md} from {out_json}")
        return 0
    if "baseline" not in args.variants or "all_tgi" not in args.variants:
        parser.error("--variants must include baseline and all_tgi (the gap is measured between them)")
    procs = args.procs or world.procs
    if procs < 1:
        parser.error("--procs must be >= 1")
    scenes, frames, val_scenes = (world.scenes if args.scenes is None else args.scenes,
                                  world.frames if args.frames is None else args.frames,
                                  world.val_scenes if args.val_scenes is None else args.val_scenes)
    render, data_dir = list(world.render), args.data or world.data or work / "data"
    student_extra, teacher_extra, latency_runs = [], [], args.latency_runs
    if args.smoke:
        scenes, frames, val_scenes, data_dir = 2, 2, 1, work / "data"
        render = list(SMOKE_SYNTH[world.name])
        micro = [*SMOKE_MODEL, *SMOKE_GRID[world.name]]
        student_extra, teacher_extra = [*micro, SMOKE_QUERIES["student"]], [*micro, SMOKE_QUERIES["teacher"]]
        latency_runs = min(latency_runs, 2)
    torch.set_num_threads(1)
    jobpool.exit_on_sigterm()  # the pool's exit then ends its workers
    bench_start, load_start = time.perf_counter(), os.getloadavg()
    if args.fresh:
        shutil.rmtree(work / "runs", ignore_errors=True)

    # --- data ------------------------------------------------------------------------------------
    log(f"data: {world.name} world {scenes} scenes x {frames} frames, seed {args.data_seed} -> {data_dir}")
    t0 = time.perf_counter()
    data = generate(world.name, data_dir, scenes, frames, args.data_seed,
                    overrides=[*render, f"split.val_scenes={val_scenes}"], workers=2, progress=False)
    synth_seconds = time.perf_counter() - t0
    data_fp = sha256_text(data.config_path.read_text())
    common = [f"data.root={data.out}", f"data.train_split={data.splits['train']}",
              f"data.val_split={data.splits['val']}", *RUNTIME]
    student_common = load_train_config(world.student, [*common, *student_extra])
    grid = model_grid(student_common.model)
    train_set = open_split(student_common.data, "train", augment=False, grid=grid)
    val_set = open_split(student_common.data, "val", augment=False, grid=grid)
    log(f"data: {len(train_set)} train / {len(val_set)} val frames ({data.generated} rendered now, "
        f"{synth_seconds:.0f} s); floors on val ...")
    floors = baseline_reports(train_set, val_set)

    # --- trainings: the teacher once (seed 0), then every seed x variant ---------------------------
    runs = work / "runs"
    teacher_steps = [f"optim.max_steps={args.teacher_steps}"] if args.teacher_steps else []
    teacher_over = [*common, "runtime.seed=0", *teacher_steps, *teacher_extra]
    teacher_cfg = load_train_config(world.teacher, teacher_over)
    teacher_run = runs / "teacher"
    teacher_job = Job("teacher", world.teacher, tuple(teacher_over), teacher_run, "teacher", False, data_fp,
                      world.metrics, f"{world.teacher}, seed 0")
    jobs = [teacher_job]
    for seed in args.seeds:
        for variant in args.variants:
            distilled = variant != "baseline"
            over = [*common, f"runtime.seed={seed}"] + ([f"optim.max_steps={args.steps}"] if args.steps else [])
            if distilled:
                over += [f"distill.checkpoint={teacher_run}", *VARIANTS[variant]]
            jobs.append(Job(f"seed {seed} {variant}", world.student, tuple([*over, *student_extra]),
                            runs / f"seed{seed}" / variant, "student", distilled, data_fp, world.metrics,
                            DESCRIPTION[variant], deps=(teacher_job.name,) if distilled else ()))
    done = run_jobs(jobs, procs, teacher_run, bench_start)
    teacher = done["teacher"]
    records: dict[int, dict[str, dict[str, Any]]] = {
        seed: {v: done[f"seed {seed} {v}"] for v in args.variants} for seed in args.seeds}

    # --- latency ---------------------------------------------------------------------------------
    log(f"latency: batch 1, 1 thread, {latency_runs} runs each")
    frame = collate([val_set[0]])
    lat = {"student": latency(runs / f"seed{args.seeds[0]}" / "baseline", frame, latency_runs),
           "teacher": latency(teacher_run, frame, latency_runs)}
    lat["teacher_over_student_forward"] = round(lat["teacher"]["forward_ms"]["median"]
                                                / lat["student"]["forward_ms"]["median"], 2)

    # --- summary ---------------------------------------------------------------------------------
    extra_metrics = [k for k in world.metrics if k not in ("mIoU", "IoU")]  # street: RayIoU
    teacher_miou = teacher["metrics"]["mIoU"]
    per_seed = {}
    for seed, recs in records.items():
        student, distilled = recs["baseline"]["metrics"]["mIoU"], recs["all_tgi"]["metrics"]["mIoU"]
        gap = teacher_miou - student
        per_seed[str(seed)] = {
            "teacher_mIoU": round(teacher_miou, 3), "student_mIoU": round(student, 3),
            "distilled_mIoU": round(distilled, 3),
            "gap_closed": round((distilled - student) / gap, 3) if gap > 0 else None,
            "variants": {v: {"mIoU": round(r["metrics"]["mIoU"], 3), "IoU": round(r["metrics"]["IoU"], 3),
                             **{k: _round(r["metrics"][k]) for k in extra_metrics},
                             "delta_mIoU_vs_baseline": round(r["metrics"]["mIoU"] - student, 3),
                             # None: a class absent from the val labels (Occ3D skips it in mIoU)
                             "per_class": {k: _round(x, 2) for k, x in r["metrics"]["per_class"].items()},
                             "train_seconds": r["train_seconds"], "reused": r["reused"]}
                         for v, r in recs.items()},
        }
    seeds = list(per_seed.values())
    gaps = [s["gap_closed"] for s in seeds if s["gap_closed"] is not None]
    mean = {
        "teacher_mIoU": round(teacher_miou, 3),
        "student_mIoU": mean_std([s["student_mIoU"] for s in seeds]),
        "distilled_mIoU": mean_std([s["distilled_mIoU"] for s in seeds]),
        "gap_closed": mean_std(gaps) if gaps else None,
        # the gap closed by the seed-mean distilled and student mIoU (robust to a seed whose gap is small)
        "gap_closed_of_means": None,
        "variants": {v: {"mIoU": mean_std([s["variants"][v]["mIoU"] for s in seeds]),
                         "IoU": mean_std([s["variants"][v]["IoU"] for s in seeds]),
                         **{k: mean_std([s["variants"][v][k] for s in seeds]) for k in extra_metrics
                            if all(s["variants"][v][k] is not None for s in seeds)},
                         "delta_mIoU_vs_baseline": mean_std([s["variants"][v]["delta_mIoU_vs_baseline"]
                                                             for s in seeds]),
                         "per_class": {k: _mean_present([s["variants"][v]["per_class"][k] for s in seeds])
                                       for k in seeds[0]["variants"][v]["per_class"]}}
                     for v in args.variants},
    }
    gap_of_means = teacher_miou - mean["student_mIoU"]["mean"]
    if gap_of_means > 0:
        mean["gap_closed_of_means"] = round((mean["distilled_mIoU"]["mean"] - mean["student_mIoU"]["mean"])
                                            / gap_of_means, 3)
    total_minutes = (time.perf_counter() - bench_start) / 60
    report = {
        "benchmark": "bench_sparse_ablation",
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                    "torch_threads": 1, "loader_workers": 0,
                    "loadavg_at_start": [round(x, 2) for x in load_start],
                    "loadavg_at_end": [round(x, 2) for x in os.getloadavg()],
                    "note": "shared machine: other jobs ran alongside; see each run's load averages"},
        "data": {"preset": world.name, "scenes": scenes, "frames_per_scene": frames,
                 "val_scenes": val_scenes, "data_seed": args.data_seed, "render": render,
                 "train_samples": len(train_set), "val_samples": len(val_set),
                 "grid_shape": list(val_set.grid.shape), "synth_seconds": round(synth_seconds, 1)},
        "protocol": world.protocol,
        "teacher": {"config": world.teacher, "seed": 0, "trained": "once, shared by every student seed",
                    "steps": teacher["steps"], "train_seconds": teacher["train_seconds"],
                    "metrics": {k: teacher["metrics"][k] for k in (*world.metrics, "per_class")},
                    "reused": teacher["reused"]},
        "student": {"config": world.student, "seeds": args.seeds, "steps": records[args.seeds[0]]["baseline"]["steps"]},
        "variants": {v: {"description": DESCRIPTION[v], "overrides": VARIANTS[v]} for v in args.variants},
        "floors": {k: {m: r[m] for m in world.metrics if m in r} | {"per_class": r["per_class"]}
                   for k, r in floors.items()},
        "per_seed": per_seed,
        "mean": mean,
        "target": {"gap_closed_at_least": 0.5,
                   "met": bool(mean["gap_closed"] is not None and mean["gap_closed"]["mean"] >= 0.5)},
        "latency": lat,
        "configs": {"student": to_dict(student_common), "teacher": to_dict(teacher_cfg)},
        "total_minutes": round(total_minutes, 1),
    }
    if procs > 1:
        report["machine"]["parallel_trainings"] = procs
    if args.smoke:
        report["smoke"] = True
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(report, indent=2) + "\n")
    out_md.write_text(markdown(report, args.variants))
    print(json.dumps({k: report[k] for k in ("benchmark", "mean", "latency", "total_minutes")}))
    print(out_md.read_text())
    log(f"wrote {out_json} and {out_md} ({total_minutes:.1f} min)")
    return 0


def _round(x: float | None, digits: int = 3) -> float | None:
    return None if x is None else round(x, digits)


def _mean_present(values: list[float | None]) -> float | None:
    """Mean of the values that exist (a class absent from the val labels is None in every seed)."""
    present = [x for x in values if x is not None]
    return round(statistics.fmean(present), 2) if present else None


FLOOR_NAMES = {"all-free": "all-empty (image-free)", "voxel-majority": "voxel-majority (image-free)"}


def notes(r: dict[str, Any], variants: list[str]) -> list[str]:
    """Reading notes computed from the results (nothing here is a fixed number)."""
    m, t = r["mean"], r["teacher"]["metrics"]
    majority = r["floors"]["voxel-majority"]
    student = m["variants"]["baseline"]
    out = ["## Reading the numbers", ""]
    relation = "below" if student["mIoU"]["mean"] < majority["mIoU"] else "above"
    learnt = [f"{c} {x:.1f}" for c, x in student["per_class"].items() if x is not None and x >= 1.0]
    out.append(f"- The student without distillation ({student['mIoU']['mean']:.2f} mIoU, {student['IoU']['mean']:.2f} "
               f"IoU) is {relation} the image-free voxel-majority floor in mIoU ({majority['mIoU']:.2f}; IoU "
               f"{majority['IoU']:.2f}). After {r['student']['steps']} steps its classes at 1 IoU or more are: "
               f"{', '.join(learnt) or 'none'}; the student architecture is step-limited (the configs' header "
               f"comments give the tuning-world numbers of longer runs).")
    scored = [c for c, x in t["per_class"].items() if x is not None]  # the classes present in the val labels
    best = sorted(scored, key=lambda c: -t["per_class"][c])[:3]
    distilled = m["variants"]["all_tgi"]["per_class"]
    gained = sorted(scored, key=lambda c: student["per_class"][c] - distilled[c])[:3]
    out.append(f"- mIoU averages {len(scored)} classes, most still near 0 for every model here. The "
               "teacher's best classes: "
               + ", ".join(f"{c} {t['per_class'][c]:.1f}" for c in best) + "; the largest gains of all levels + TGI "
               "over the baseline: "
               + ", ".join(f"{c} {student['per_class'][c]:.1f} -> {distilled[c]:.1f}" for c in gained) + ".")
    if "tgi" in variants:
        levels = [v for v in ("encoder", "query", "prior", "anchor") if v in variants]
        gains = ", ".join(f"{v} {m['variants'][v]['delta_mIoU_vs_baseline']['mean']:+.2f}" for v in levels)
        out.append(f"- Single levels move mIoU by {gains} (seed spread: see the std column); teacher-guided "
                   f"initialisation alone by {m['variants']['tgi']['delta_mIoU_vs_baseline']['mean']:+.2f}, and all "
                   f"levels with it by {m['variants']['all_tgi']['delta_mIoU_vs_baseline']['mean']:+.2f}. In "
                   f"DiScene's Table III each level row also carries the encoder-level alignment; here each level "
                   f"runs truly alone.")
    out.append("- One teacher (seed 0) serves both student seeds, so the seed spread covers the student only.")
    if r["data"]["preset"] == "room":
        out.append("- Dense students were not trained on the room world here (no room config for them), so this "
                   "benchmark makes no dense-vs-sparse accuracy claim.")
    else:
        out.append(dense_comparison(r))
    return out + [""]


def dense_comparison(r: dict[str, Any]) -> str:
    """The dense street student of benchmarks/bench_kd_ablation.py on the same street world, when
    its committed result is there: numbers from another run and budget, side by side."""
    path = RESULTS / "kd_ablation.json"
    sparse_miou = r["mean"]["variants"]["baseline"]["mIoU"]["mean"]
    sparse_ms = r["latency"]["student"]["forward_ms"]["median"]
    if not path.is_file() or json.loads(path.read_text()).get("smoke"):
        return "- No dense street result (benchmarks/results/kd_ablation.json) to compare with."
    kd = json.loads(path.read_text())
    dense = kd["variants"]["no_kd"]["mean"]
    return (f"- Dense vs sparse on this street world (benchmarks/results/kd_ablation.json, another run): the dense "
            f"`{kd['student_config']}` student without KD reached {dense['mIoU']['mean']:.2f} mIoU after "
            f"{kd['budget']['student_steps']} steps, {kd['student_ms']:.1f} ms per forward at batch 1 / 1 thread; "
            f"this sparse student {sparse_miou:.2f} mIoU after {r['student']['steps']} steps, {sparse_ms:.1f} ms "
            f"(forward; forward + voxelisation {r['latency']['student']['forward_voxelize_ms']['median']:.1f} ms). "
            "Different step budgets and load: a rough comparison, not a controlled one.")


def markdown(r: dict[str, Any], variants: list[str]) -> str:
    seeds = list(r["per_seed"])
    m, ps, t = r["mean"], r["per_seed"], r["teacher"]["metrics"]

    def row(label: str, per_seed: list[str], mean: str, *rest: str) -> str:
        return "| " + " | ".join([label, *per_seed, mean, *rest]) + " |"

    def pct(x: float | None) -> str:
        return "-" if x is None else f"{100 * x:.0f}%"

    ray = int("RayIoU" in t)  # street (Occ3D): a RayIoU column
    gap = m["gap_closed"]
    gap_mean = "-" if gap is None else pct(gap["mean"]) + ("" if gap["std"] is None else f" ± {100 * gap['std']:.0f}%")
    lines = [
        f"# DiScene ablation on the synthetic {r['data']['preset']} world",
        "",
        f"Produced by `{r['command']}` in {r['total_minutes']} min on {r['machine']['cpu_count']} shared CPU cores "
        f"(load average {r['machine']['loadavg_at_start'][0]} at start, {r['machine']['loadavg_at_end'][0]} at "
        f"end; every training used 1 thread). {r['data']['train_samples']} train / {r['data']['val_samples']} val "
        f"frames (val = {r['data']['val_scenes']} unseen {'rooms' if r['data']['preset'] == 'room' else 'scenes'}), "
        f"grid {'x'.join(map(str, r['data']['grid_shape']))}. "
        f"{r['protocol']}.",
        "",
        f"Teacher `{r['teacher']['config']}`: {r['teacher']['steps']} steps, seed 0, trained once and shared by "
        f"every seed. Students `{r['student']['config']}`: {r['student']['steps']} steps, seeds "
        f"{', '.join(seeds)}; every variant of a seed has the same split, steps and seed.",
        "",
        row("", [f"seed {s}" for s in seeds], "mean ± std"),
        "|---|" + "---|" * (len(seeds) + 1),
        row("teacher mIoU", [f"{ps[s]['teacher_mIoU']:.2f}" for s in seeds], f"{m['teacher_mIoU']:.2f}"),
        row("student mIoU (no KD)", [f"{ps[s]['student_mIoU']:.2f}" for s in seeds], fmt(m["student_mIoU"])),
        row("distilled mIoU (all levels + TGI)", [f"{ps[s]['distilled_mIoU']:.2f}" for s in seeds],
            fmt(m["distilled_mIoU"])),
        row("gap closed", [pct(ps[s]["gap_closed"]) for s in seeds], gap_mean),
        "",
        f"gap closed = (distilled - student) / (teacher - student). Gap closed by the seed means: "
        f"{pct(m['gap_closed_of_means'])}. Target (all levels together close >= 50% of the gap): "
        f"**{'met' if r['target']['met'] else 'not met'}**.",
        "",
        f"## Variants (val mIoU / IoU{' / RayIoU' if ray else ''}, percent)",
        "",
        row("variant", [f"seed {s} mIoU" for s in seeds], "mIoU mean ± std", "Δ mIoU vs baseline", "IoU mean",
            *(["RayIoU mean"] if ray else [])),
        "|---|" + "---|" * (len(seeds) + 3 + ray),
    ]

    def ray_cell(stat: Any) -> list[str]:  # a mean_std dict, a number, or None (not computed)
        if not ray:
            return []
        value = stat["mean"] if isinstance(stat, dict) else stat
        return ["-" if value is None else f"{value:.2f}"]

    for v in variants:
        mv = m["variants"][v]
        lines.append(row(f"{v}: {r['variants'][v]['description']}",
                         [f"{ps[s]['variants'][v]['mIoU']:.2f}" for s in seeds], fmt(mv["mIoU"]),
                         f"{mv['delta_mIoU_vs_baseline']['mean']:+.2f}", f"{mv['IoU']['mean']:.2f}",
                         *ray_cell(mv.get("RayIoU"))))
    lines.append(row(f"teacher `{r['teacher']['config']}`", [f"{t['mIoU']:.2f}"] * len(seeds), f"{t['mIoU']:.2f}", "",
                     f"{t['IoU']:.2f}", *ray_cell(t.get("RayIoU"))))
    for name, f in r["floors"].items():
        lines.append(row(f"floor: {FLOOR_NAMES.get(name, name)}", [f"{f['mIoU']:.2f}"] * len(seeds),
                         f"{f['mIoU']:.2f}", "", f"{f['IoU']:.2f}", *ray_cell(f.get("RayIoU"))))
    classes = list(t["per_class"])
    lines += ["", "## Per-class IoU (students: mean over seeds)", "",
              "| | " + " | ".join(classes) + " |", "|---|" + "---|" * len(classes)]
    cell = lambda x: "-" if x is None else f"{x:.1f}"  # noqa: E731  (-: absent from the val labels)
    lines.append("| teacher | " + " | ".join(cell(t["per_class"][c]) for c in classes) + " |")
    for v in variants:
        pc = m["variants"][v]["per_class"]
        lines.append(f"| {v} | " + " | ".join(cell(pc[c]) for c in classes) + " |")
    lines += ["", *notes(r, variants)]
    lat = r["latency"]
    lines += ["## Latency (batch 1, 1 CPU thread, one val frame, ms)", "",
              "| model | params (M) | forward median | forward p90 | forward + voxelise median | p90 |",
              "|---|---|---|---|---|---|"]
    for name in ("student", "teacher"):
        x = lat[name]
        fwd, full = x["forward_ms"], x["forward_voxelize_ms"]
        lines.append(f"| {name} | {x['params_M']:.2f} | {fwd['median']:.1f} | {fwd['p90']:.1f} | "
                     f"{full['median']:.1f} | {full['p90']:.1f} |")
    lines += ["", f"{lat['student']['runs']} timed passes each after warm-up; the teacher's forward takes "
              f"{lat['teacher_over_student_forward']}x the student's. Timings on a shared machine are noisy.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
