"""The demo's data stage: the generated worlds read back through the real-format readers, their
geometry verified (projection consistency with and without augmentation, the street's ground layer)
and drawn; and that stage's report sections."""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from occdistill.data.build import DatasetFormat, classes_for, open_dataset
from occdistill.data.consistency import sample_consistency
from occdistill.data.labels import check_ground_layer
from occdistill.io import atomic_write_bytes
from occdistill.viz.sample_sheet import render_sample

CONSISTENCY_TARGET = 0.95


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


def check_dataset(name: str, fmt: DatasetFormat, root: Path, infos: str | None, viz_dir: Path, *, seed: int,
                  augmented_views: int) -> DatasetCheck:
    """Projection consistency of every sample of one dataset, plain and after strong augmentation
    (``seed``), the ground layer (Occ3D only), and a sample sheet per sample into ``viz_dir`` (the
    augmented view of the first ``augmented_views`` samples too)."""
    classes = classes_for(fmt)
    plain = open_dataset(fmt, root, infos, rendered_maps=True)
    augmented = open_dataset(fmt, root, infos, rendered_maps=True, check_aug=True, seed=seed)
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
            if not aug or i < augmented_views:
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


def checks_markdown(checks: list[DatasetCheck], out: Path) -> list[str]:
    """The geometry verification table and the visual checks (pictures relative to ``out``)."""
    lines = [
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
    return lines
