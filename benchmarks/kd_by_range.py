"""Where distillation helps: per-class IoU of the teacher and the students by distance from the ego.

    python benchmarks/kd_by_range.py --work outputs/bench/kd_gauss_head --seeds 3,4 \
        --variants no_kd,mfd,both --ranges 8,14,20

For the teacher and every ``students/<variant>_s<seed>`` run of a ``bench_kd_ablation.py`` work
directory: ``occdistill eval --save-pred`` on the val split, then ``occdistill score --ranges``
(devkit mIoU per ring of horizontal distance, ``occdistill.metrics.by_range``). Writes each score
JSON under ``--out/<name>.json``, and ``--out.json`` / ``--out.md``: mIoU per ring for every model
and the gap each distilled variant closes per ring, (variant - no_kd) / (teacher - no_kd), from the
seed means; and, per ring, the share of camera-visible BEV columns that receive at least one of the
student's lifted frustum points (the LSS lift of its no_kd run's geometry, on every 4th val frame),
at its own depth bins and at each step of ``--coverage-steps``. Prints the JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from occdistill.cli.main import main as cli
from occdistill.io import atomic_write_text

ROOT = Path(__file__).resolve().parent.parent

CLASSES_SHOWN = ("driveable_surface", "other_flat", "sidewalk", "terrain", "manmade", "vegetation", "car",
                 "construction_vehicle", "truck")


def score(run: Path, data: Path, ranges: str, preds: Path, out_json: Path) -> dict:
    """Evaluate ``run`` (EMA weights) on the val split with saved predictions, then score them by range."""
    for argv in (["eval", "--checkpoint", str(run), "--no-rayiou", "--workers", "0", "--device", "cpu",
                  "--save-pred", str(preds)],
                 ["score", "--format", "occ3d", "--data-root", str(data), "--infos",
                  str(data / "occdistill_infos_val.pkl"), "--pred", str(preds), "--no-rayiou", "--ranges", ranges,
                  "--json", str(out_json)]):
        if cli(argv) != 0:
            raise SystemExit(f"occdistill {' '.join(argv)} failed")
    return json.loads(out_json.read_text())


def lift_coverage(run: Path, data: Path, edges: list[float], steps: list[float], every: int = 4) -> dict[str, list]:
    """{depth step in m: per ring, the mean over val frames of the share of camera-visible columns
    (any ``mask_camera`` voxel) holding at least one lifted frustum point inside the grid}."""
    import dataclasses

    import numpy as np

    from occdistill.data.sample import collate
    from occdistill.engine.checkpoint import load_trained_model
    from occdistill.engine.data import open_split
    from occdistill.metrics.by_range import range_rings, ring_masks
    from occdistill.models.dense import DenseStudent

    trained = load_trained_model(run)
    model, cfg = trained.model, trained.checkpoint.config
    grid = model.grid
    dataset = open_split(cfg.data, "val", augment=False, grid=grid, root=data,
                         split_path=data / "occdistill_infos_val.pkl")
    masks = ring_masks(grid, range_rings(edges))  # (R, X, Y)
    dmin, dmax, _ = model.cfg.depth_bins
    out: dict[str, list] = {}
    for step in steps:
        lift = DenseStudent(dataclasses.replace(model.cfg, depth_bins=(dmin, dmax, step))).view_transform
        shares = []
        for i in range(0, len(dataset), every):
            sample = dataset[i]
            b = collate([sample])
            # (1, N, D, h, w, 3) -> (P, 3) ego points of every frustum cell
            pts = lift.ego_points(b.intrinsics, b.img_from_raw, b.keyego_from_cam).reshape(-1, 3).double()
            idx, inside = grid.point_to_index(pts)
            hit = np.zeros(grid.shape[:2], bool)
            hit[idx[inside, 0].numpy(), idx[inside, 1].numpy()] = True
            visible = np.asarray(sample.mask_camera).astype(bool).any(axis=-1)
            shares.append([float(hit[m & visible].mean()) for m in masks])
        out[f"{step:g}"] = np.mean(shares, axis=0).tolist()
    return out


def mean(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None


def gap(teacher: float | None, student: float | None, distilled: float | None) -> float | None:
    if None in (teacher, student, distilled) or teacher - student <= 0:
        return None
    return (distilled - student) / (teacher - student)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="a bench_kd_ablation.py work directory")
    parser.add_argument("--data", type=Path, default=Path("outputs/bench/street"), help="the street dataset")
    parser.add_argument("--seeds", default="3,4")
    parser.add_argument("--variants", default="no_kd,mfd,both", help="must start with no_kd")
    parser.add_argument("--ranges", default="8,14,20", help="ring edges in metres")
    parser.add_argument("--coverage-steps", default="1.0,0.5",
                        help="depth-bin steps (m) at which to measure the lift's coverage")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "kd_by_range")
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    variants = args.variants.split(",")
    if variants[0] != "no_kd":
        parser.error("--variants must start with no_kd (the gap is measured from it)")
    args.out.mkdir(parents=True, exist_ok=True)
    preds = args.work / "by_range_preds"
    runs = {"teacher": args.work / "teacher"}
    runs.update({f"{v}_s{s}": args.work / "students" / f"{v}_s{s}" for v in variants for s in seeds})
    reports = {name: score(run, args.data, args.ranges, preds / name, args.out / f"{name}.json")
               for name, run in runs.items()}
    rings = [r["range_m"] for r in reports["teacher"]["by_range"]]

    def per_ring(name: str, key: str) -> list[float | None]:
        return [r["mIoU"] if key == "mIoU" else r["per_class"][key] for r in reports[name]["by_range"]]

    models = {"teacher": ["teacher"], **{v: [f"{v}_s{s}" for s in seeds] for v in variants}}
    table = {key: {model: [mean([per_ring(n, key)[i] for n in names]) for i in range(len(rings))]
                   for model, names in models.items()}
             for key in ("mIoU", *CLASSES_SHOWN)}
    overall = {model: mean([reports[n]["mIoU"] for n in names]) for model, names in models.items()}
    gaps = {v: [gap(table["mIoU"]["teacher"][i], table["mIoU"]["no_kd"][i], table["mIoU"][v][i])
                for i in range(len(rings))] for v in variants[1:]}
    edges = [float(e) for e in args.ranges.split(",")]
    coverage = lift_coverage(runs[f"no_kd_s{seeds[0]}"], args.data, edges,
                             [float(s) for s in args.coverage_steps.split(",")])
    report = {"command": " ".join([sys.executable, *sys.argv]), "work": str(args.work), "seeds": seeds,
              "rings_m": rings, "mIoU_overall": overall, "per_ring_seed_mean": table, "gap_closed_per_ring": gaps,
              "lift_coverage_per_ring": coverage,
              "scores": {name: str(args.out / f"{name}.json") for name in reports}}

    def fmt(v: float | None, pct: bool = False) -> str:
        return "-" if v is None else (f"{100 * v:.0f}%" if pct else f"{v:.1f}")

    labels = [f"{lo:g}-{hi:g} m" if hi is not None else f">= {lo:g} m" for lo, hi in rings]
    lines = ["# Distillation by distance from the ego", "", f"`{report['command']}`", "",
             f"Val split of the street world; EMA weights; IoU in percent, mean over student seeds "
             f"{', '.join(map(str, seeds))}; each ring scored with the devkit protocol (`occdistill score "
             f"--ranges {args.ranges}`).", "",
             "| model | mIoU | " + " | ".join(f"mIoU {label}" for label in labels) + " |",
             "|---|---|" + "---|" * len(rings)]
    for model in models:
        lines.append(f"| {model} | {fmt(overall[model])} | "
                     + " | ".join(fmt(v) for v in table["mIoU"][model]) + " |")
    for v in variants[1:]:
        lines.append(f"| gap closed by {v} | | " + " | ".join(fmt(g, pct=True) for g in gaps[v]) + " |")
    lines += ["", "Share of camera-visible BEV columns holding at least one lifted frustum point of the student "
              "(its geometry and rig, every 4th val frame), by depth-bin step:", "",
              "| depth step | " + " | ".join(labels) + " |", "|---|" + "---|" * len(rings)]
    for step, shares in coverage.items():
        lines.append(f"| {step} m | " + " | ".join(fmt(x, pct=True) for x in shares) + " |")
    lines += ["", "Per class (IoU per ring, " + ", ".join(labels) + "):", "",
              "| class | " + " | ".join(models) + " |", "|---|" + "---|" * len(models)]
    for key in CLASSES_SHOWN:
        lines.append(f"| {key} | " + " | ".join(" / ".join(fmt(x) for x in table[key][m]) for m in models) + " |")
    lines.append("")
    atomic_write_text(args.out.with_suffix(".json"), json.dumps(report, indent=2) + "\n")
    atomic_write_text(args.out.with_suffix(".md"), "\n".join(lines))
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
