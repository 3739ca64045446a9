"""Benchmark: DiScene distillation ablation (paper Table III style) on the synthetic room world.

    .venv/bin/python benchmarks/bench_sparse_ablation.py [--seeds 0 1] [--steps N] [--teacher-steps N]
        [--scenes 40] [--frames 6] [--val-scenes 4] [--data-seed 0] [--work DIR] [--variants ...]
        [--fresh]

1. Generates the synthetic room world (Occ-ScanNet layout, 60x60x36 at 0.08 m, 11 classes;
   ``scenes`` x ``frames`` frames rendered at 256x192, the last ``val-scenes`` scenes form the val
   split), or reuses ``WORK/data`` when it already holds that dataset.
2. Trains the teacher (``room-sparse-teacher``) ONCE, with seed 0; every student seed distils
   from that one teacher (training one teacher per seed would not fit the time budget).
3. For every seed, trains the student (``room-sparse``) with the same split, steps and seed:
   ``baseline`` (no distillation), each DiScene level alone at the paper's weight (``encoder`` 1,
   ``query`` 0.2, ``prior`` 0.2, ``anchor`` 0.5; the other levels 0), ``tgi`` (teacher-guided
   initialisation alone: all levels 0) and ``all_tgi`` (all four levels + TGI, DiScene's full
   recipe).
4. Evaluates every run on the val split (Occ-ScanNet ISO protocol: completion IoU, mIoU over the
   11 classes, per class), and scores two image-free floors on the same split (all-empty and the
   per-voxel majority of the training labels).
5. Measures latency of the student and the teacher: batch 1, 1 CPU thread, one fixed val frame,
   median and p90 over ``--latency-runs`` forward passes after warm-up (model forward alone, and
   forward + voxelisation = what inference returns).

Writes ``benchmarks/results/sparse_ablation.json`` (per seed and mean +- sample std over seeds:
``teacher_mIoU``, ``student_mIoU``, ``distilled_mIoU`` = all_tgi, ``gap_closed`` =
(distilled - student) / (teacher - student); per-variant metrics; latencies; the command; machine
and load averages) and ``benchmarks/results/sparse_ablation.md`` (tables).

Resume: every finished run leaves ``bench_run.json`` holding its fingerprint (resolved training
config, the dataset's config, and for distilled runs the teacher checkpoint's SHA-256s); a later
invocation reuses a run whose fingerprint is unchanged and retrains (from scratch) any other.
Every training uses ``runtime.threads=1`` and ``data.workers=0``: the benchmark is sized for one
core of a shared 2-core machine. The val split is never used to choose anything here; the configs
were tuned on a different synthetic world (another data seed), see the configs' header comments.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import shlex
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from occdistill.config import to_dict
from occdistill.data.sample import collate
from occdistill.data.synth import generate
from occdistill.engine.baselines import baseline_reports
from occdistill.engine.checkpoint import find_checkpoint, load_trained_model
from occdistill.engine.config import TrainConfig, load_train_config
from occdistill.engine.data import open_split
from occdistill.engine.loop import train
from occdistill.engine.objective import forward_batch

STUDENT, TEACHER = "room-sparse", "room-sparse-teacher"
RESULTS = Path(__file__).resolve().parent / "results"
RENDER = ["camera.width=256", "camera.height=192"]  # the models read 96x128: no need to render 640x480
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


def run_or_reuse(name: str, cfg: TrainConfig, run: Path, fingerprint: dict[str, Any]) -> dict[str, Any]:
    """Train ``cfg`` into ``run`` unless a finished run with the same fingerprint is there; returns
    the run's record (metrics on the val split, timings, load averages)."""
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
        "metrics": {"mIoU": m["mIoU"], "IoU": m["IoU"], "per_class": m["per_class"], "num_samples": m["num_samples"]},
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="student seeds (teacher: seed 0, once)")
    parser.add_argument("--steps", type=int, default=0, help="student steps (default: room-sparse's optim.max_steps)")
    parser.add_argument("--teacher-steps", type=int, default=0,
                        help="teacher steps (default: room-sparse-teacher's optim.max_steps)")
    parser.add_argument("--scenes", type=int, default=40)
    parser.add_argument("--frames", type=int, default=6, help="frames per scene")
    parser.add_argument("--val-scenes", type=int, default=4)
    parser.add_argument("--data-seed", type=int, default=0, help="seed of the synthetic world")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--latency-runs", type=int, default=30)
    parser.add_argument("--work", type=Path, default=Path("outputs/bench/sparse_ablation"),
                        help="dataset and run directories (reused across invocations)")
    parser.add_argument("--out-json", type=Path, default=RESULTS / "sparse_ablation.json")
    parser.add_argument("--out-md", type=Path, default=RESULTS / "sparse_ablation.md")
    parser.add_argument("--fresh", action="store_true", help="retrain every run (ignore finished ones)")
    parser.add_argument("--markdown-only", action="store_true",
                        help="only re-render --out-md from the results in --out-json (no training)")
    args = parser.parse_args(argv)
    if args.markdown_only:
        report = json.loads(args.out_json.read_text())
        args.out_md.write_text(markdown(report, list(report["variants"])))
        log(f"wrote {args.out_md} from {args.out_json}")
        return 0
    if "baseline" not in args.variants or "all_tgi" not in args.variants:
        parser.error("--variants must include baseline and all_tgi (the gap is measured between them)")
    torch.set_num_threads(1)
    bench_start, load_start = time.perf_counter(), os.getloadavg()
    work = args.work.resolve()
    if args.fresh:
        shutil.rmtree(work / "runs", ignore_errors=True)

    # --- data ------------------------------------------------------------------------------------
    log(f"data: room world {args.scenes} scenes x {args.frames} frames, seed {args.data_seed} -> {work / 'data'}")
    t0 = time.perf_counter()
    data = generate("room", work / "data", args.scenes, args.frames, args.data_seed,
                    overrides=[*RENDER, f"split.val_scenes={args.val_scenes}"], workers=2, progress=False)
    synth_seconds = time.perf_counter() - t0
    data_fp = sha256_text(data.config_path.read_text())
    common = [f"data.root={data.out}", f"data.train_split={data.splits['train']}",
              f"data.val_split={data.splits['val']}", *RUNTIME]
    train_set = open_split(load_train_config(STUDENT, common).data, "train", augment=False)
    val_set = open_split(load_train_config(STUDENT, common).data, "val", augment=False)
    log(f"data: {len(train_set)} train / {len(val_set)} val frames ({data.generated} rendered now, "
        f"{synth_seconds:.0f} s); floors on val ...")
    floors = baseline_reports(train_set, val_set)

    # --- teacher (once) --------------------------------------------------------------------------
    runs = work / "runs"
    teacher_steps = [f"optim.max_steps={args.teacher_steps}"] if args.teacher_steps else []
    teacher_over = [*common, "runtime.seed=0", *teacher_steps]
    teacher_cfg = load_train_config(TEACHER, teacher_over)
    teacher_run = runs / "teacher"
    teacher = run_or_reuse("teacher", teacher_cfg, teacher_run, {"config": to_dict(teacher_cfg), "data": data_fp})
    t_fp = teacher_fingerprint(teacher_run)

    # --- students --------------------------------------------------------------------------------
    records: dict[int, dict[str, dict[str, Any]]] = {}
    todo = [(seed, v) for seed in args.seeds for v in args.variants]
    for i, (seed, variant) in enumerate(todo, 1):
        over = [*common, f"runtime.seed={seed}"] + ([f"optim.max_steps={args.steps}"] if args.steps else [])
        if variant != "baseline":
            over += [f"distill.checkpoint={teacher_run}", *VARIANTS[variant]]
        cfg = load_train_config(STUDENT, over)
        fingerprint = {"config": to_dict(cfg), "data": data_fp, "teacher": t_fp if variant != "baseline" else None}
        elapsed = (time.perf_counter() - bench_start) / 60
        log(f"[{i}/{len(todo)}] seed {seed} {variant} ({DESCRIPTION[variant]}); {elapsed:.1f} min so far")
        records.setdefault(seed, {})[variant] = run_or_reuse(f"seed {seed} {variant}", cfg,
                                                             runs / f"seed{seed}" / variant, fingerprint)

    # --- latency ---------------------------------------------------------------------------------
    log(f"latency: batch 1, 1 thread, {args.latency_runs} runs each")
    frame = collate([val_set[0]])
    lat = {"student": latency(runs / f"seed{args.seeds[0]}" / "baseline", frame, args.latency_runs),
           "teacher": latency(teacher_run, frame, args.latency_runs)}
    lat["teacher_over_student_forward"] = round(lat["teacher"]["forward_ms"]["median"]
                                                / lat["student"]["forward_ms"]["median"], 2)

    # --- summary ---------------------------------------------------------------------------------
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
                             "delta_mIoU_vs_baseline": round(r["metrics"]["mIoU"] - student, 3),
                             "per_class": {k: round(x, 2) for k, x in r["metrics"]["per_class"].items()},
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
                         "delta_mIoU_vs_baseline": mean_std([s["variants"][v]["delta_mIoU_vs_baseline"]
                                                             for s in seeds]),
                         "per_class": {k: round(statistics.fmean(s["variants"][v]["per_class"][k] for s in seeds), 2)
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
        "data": {"preset": "room", "scenes": args.scenes, "frames_per_scene": args.frames,
                 "val_scenes": args.val_scenes, "data_seed": args.data_seed, "render": RENDER,
                 "train_samples": len(train_set), "val_samples": len(val_set),
                 "grid_shape": list(val_set.grid.shape), "synth_seconds": round(synth_seconds, 1)},
        "protocol": ("Occ-ScanNet (ISO): 255 counted as empty, completion IoU on occupied, mIoU over classes 1..11 "
                     "(absent classes count 0), one confusion matrix pooled over the val split; percent"),
        "teacher": {"config": TEACHER, "seed": 0, "trained": "once, shared by every student seed",
                    "steps": teacher["steps"], "train_seconds": teacher["train_seconds"],
                    "metrics": {k: teacher["metrics"][k] for k in ("mIoU", "IoU", "per_class")},
                    "reused": teacher["reused"]},
        "student": {"config": STUDENT, "seeds": args.seeds, "steps": records[args.seeds[0]]["baseline"]["steps"]},
        "variants": {v: {"description": DESCRIPTION[v], "overrides": VARIANTS[v]} for v in args.variants},
        "floors": {k: {"mIoU": r["mIoU"], "IoU": r["IoU"], "per_class": r["per_class"]} for k, r in floors.items()},
        "per_seed": per_seed,
        "mean": mean,
        "target": {"gap_closed_at_least": 0.5,
                   "met": bool(mean["gap_closed"] is not None and mean["gap_closed"]["mean"] >= 0.5)},
        "latency": lat,
        "configs": {"student": to_dict(load_train_config(STUDENT, common)), "teacher": to_dict(teacher_cfg)},
        "total_minutes": round(total_minutes, 1),
    }
    args.out_json.parent.mkdir(parents=True, exist_ok=True)
    args.out_json.write_text(json.dumps(report, indent=2) + "\n")
    args.out_md.write_text(markdown(report, args.variants))
    print(json.dumps({k: report[k] for k in ("benchmark", "mean", "latency", "total_minutes")}))
    print(args.out_md.read_text())
    log(f"wrote {args.out_json} and {args.out_md} ({total_minutes:.1f} min)")
    return 0


FLOOR_NAMES = {"all-free": "all-empty (image-free)", "voxel-majority": "voxel-majority (image-free)"}


def notes(r: dict[str, Any], variants: list[str]) -> list[str]:
    """Reading notes computed from the results (nothing here is a fixed number)."""
    m, t = r["mean"], r["teacher"]["metrics"]
    majority = r["floors"]["voxel-majority"]
    student = m["variants"]["baseline"]
    out = ["## Reading the numbers", ""]
    relation = "below" if student["mIoU"]["mean"] < majority["mIoU"] else "above"
    learnt = [f"{c} {x:.1f}" for c, x in student["per_class"].items() if x >= 1.0]
    out.append(f"- The student without distillation ({student['mIoU']['mean']:.2f} mIoU, {student['IoU']['mean']:.2f} "
               f"IoU) is {relation} the image-free voxel-majority floor in mIoU ({majority['mIoU']:.2f}; IoU "
               f"{majority['IoU']:.2f}). After {r['student']['steps']} steps its classes at 1 IoU or more are: "
               f"{', '.join(learnt) or 'none'}; the student architecture is step-limited (the configs' header "
               f"comments give the tuning-world numbers of longer runs).")
    best = sorted(t["per_class"], key=lambda c: -t["per_class"][c])[:3]
    distilled = m["variants"]["all_tgi"]["per_class"]
    gained = sorted(distilled, key=lambda c: student["per_class"][c] - distilled[c])[:3]
    out.append("- mIoU averages 11 classes, most still near 0 for every model here. The teacher's best classes: "
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
    out.append("- Dense students were not trained on the room world here (no room config for them), so this "
               "benchmark makes no dense-vs-sparse accuracy claim.")
    return out + [""]


def markdown(r: dict[str, Any], variants: list[str]) -> str:
    seeds = list(r["per_seed"])
    m, ps, t = r["mean"], r["per_seed"], r["teacher"]["metrics"]

    def row(label: str, per_seed: list[str], mean: str, *rest: str) -> str:
        return "| " + " | ".join([label, *per_seed, mean, *rest]) + " |"

    def pct(x: float | None) -> str:
        return "-" if x is None else f"{100 * x:.0f}%"

    gap = m["gap_closed"]
    gap_mean = "-" if gap is None else pct(gap["mean"]) + ("" if gap["std"] is None else f" ± {100 * gap['std']:.0f}%")
    lines = [
        "# DiScene ablation on the synthetic room world",
        "",
        f"Produced by `{r['command']}` in {r['total_minutes']} min on {r['machine']['cpu_count']} shared CPU cores "
        f"(load average {r['machine']['loadavg_at_start'][0]} at start, {r['machine']['loadavg_at_end'][0]} at "
        f"end; every training used 1 thread). {r['data']['train_samples']} train / {r['data']['val_samples']} val "
        f"frames (val = {r['data']['val_scenes']} unseen rooms), grid {'x'.join(map(str, r['data']['grid_shape']))}. "
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
        "## Variants (val mIoU / IoU, percent)",
        "",
        row("variant", [f"seed {s} mIoU" for s in seeds], "mIoU mean ± std", "Δ mIoU vs baseline", "IoU mean"),
        "|---|" + "---|" * (len(seeds) + 3),
    ]
    for v in variants:
        mv = m["variants"][v]
        lines.append(row(f"{v}: {r['variants'][v]['description']}",
                         [f"{ps[s]['variants'][v]['mIoU']:.2f}" for s in seeds], fmt(mv["mIoU"]),
                         f"{mv['delta_mIoU_vs_baseline']['mean']:+.2f}", f"{mv['IoU']['mean']:.2f}"))
    lines.append(row(f"teacher `{r['teacher']['config']}`", [f"{t['mIoU']:.2f}"] * len(seeds), f"{t['mIoU']:.2f}", "",
                     f"{t['IoU']:.2f}"))
    for name, f in r["floors"].items():
        lines.append(row(f"floor: {FLOOR_NAMES.get(name, name)}", [f"{f['mIoU']:.2f}"] * len(seeds),
                         f"{f['mIoU']:.2f}", "", f"{f['IoU']:.2f}"))
    classes = list(t["per_class"])
    lines += ["", "## Per-class IoU (students: mean over seeds)", "",
              "| | " + " | ".join(classes) + " |", "|---|" + "---|" * len(classes)]
    lines.append("| teacher | " + " | ".join(f"{t['per_class'][c]:.1f}" for c in classes) + " |")
    for v in variants:
        pc = m["variants"][v]["per_class"]
        lines.append(f"| {v} | " + " | ".join(f"{pc[c]:.1f}" for c in classes) + " |")
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
