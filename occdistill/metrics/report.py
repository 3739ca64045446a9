"""The JSON report and printed table shared by ``occdistill score`` and ``occdistill eval``.

JSON values are percent (fraction x 100, no rounding), ``null`` where a metric is undefined.
Keys: ``mIoU``, ``IoU``, ``per_class`` {name: value or null}, ``RayIoU``, ``RayIoU@1m``,
``RayIoU@2m``, ``RayIoU@4m`` (null when not computed), ``num_samples``, ``protocol`` (one line per
metric naming the reference it follows) and, for Occ3D, ``per_class_rayiou``.
"""

from __future__ import annotations

import math
from typing import Any

from occdistill.metrics._common import percent
from occdistill.metrics.by_range import RangeRing
from occdistill.metrics.occ3d import Occ3DMetrics
from occdistill.metrics.occscannet import PROTOCOLS, OccScanNetMetrics
from occdistill.metrics.rayiou import RayIoUMetrics

OCC3D_MIOU_PROTOCOL = (
    "Occ3D-nuScenes voxel mIoU, CVPR2023 devkit Metric_mIoU(use_image_mask=True): mask_camera voxels, "
    "one 18x18 confusion matrix pooled over all samples, nanmean of per-class IoU over classes 0..16 "
    "(free=17 out of the mean; 0/0 skipped, predicted-but-absent = 0)"
)
OCC3D_IOU_PROTOCOL = "geometry IoU: occupied = class != 17 (free), mask_camera voxels, pooled counts"
RAYIOU_PROTOCOL = (
    "RayIoU, SparseOcc ray_metrics: 39x360 LiDAR rays from up to 8 keyframe LiDAR origins of the scene "
    "(|x|,|y| < 39 m, rounded linspace), depth where the ray exits the first occupied voxel, GT-free rays "
    "dropped, TP = same class and |d_pred - d_gt| < 1/2/4 m, counts pooled, nanmean over classes 0..16; "
    "no camera mask"
)


def _rayiou_keys(ray: RayIoUMetrics | None) -> dict[str, Any]:
    keys: dict[str, Any] = {"RayIoU": percent(ray.rayiou) if ray else None}
    for tau in (1.0, 2.0, 4.0):
        name = f"RayIoU@{tau:g}m"
        if ray is None or tau not in ray.thresholds:
            keys[name] = None
        else:
            keys[name] = percent(ray.rayiou_at[ray.thresholds.index(tau)])
    return keys


def occ3d_report(
    voxel: Occ3DMetrics,
    ray: RayIoUMetrics | None,
    invalid: list[dict[str, str]] | None = None,
) -> dict[str, Any]:
    """JSON-ready dict for Occ3D voxel metrics (+ RayIoU when computed)."""
    report: dict[str, Any] = {
        "format": "occ3d",
        "units": "percent",
        "mIoU": percent(voxel.miou),
        "IoU": percent(voxel.iou_geometry),
        "per_class": {k: percent(v) for k, v in voxel.per_class.items()},
        **_rayiou_keys(ray),
        "num_samples": voxel.num_samples,
        "protocol": {
            "name": "occ3d-cvpr2023-devkit" + ("+sparseocc-rayiou" if ray is not None else ""),
            "mIoU": OCC3D_MIOU_PROTOCOL,
            "IoU": OCC3D_IOU_PROTOCOL,
            "RayIoU": RAYIOU_PROTOCOL if ray is not None else "not computed",
        },
        "num_voxels_evaluated": voxel.num_voxels,
    }
    if ray is not None:
        report["per_class_rayiou"] = {
            name: {f"{tau:g}m": percent(ray.iou[j, c]) for j, tau in enumerate(ray.thresholds)}
            for c, name in enumerate(ray.class_names)
        }
        report["num_rays_evaluated"] = ray.num_rays
    report["invalid_predictions"] = list(invalid or [])
    return report


def by_range_report(results: list[tuple[RangeRing, Occ3DMetrics]]) -> list[dict[str, Any]]:
    """JSON-ready list, one entry per ring: ``range_m`` [lo, hi] (hi null = no bound), ``mIoU``,
    ``IoU``, ``per_class`` and ``num_voxels_evaluated``, as the whole-grid keys."""
    return [{"range_m": [ring.lo, ring.hi if math.isfinite(ring.hi) else None], "mIoU": percent(m.miou),
             "IoU": percent(m.iou_geometry), "per_class": {k: percent(v) for k, v in m.per_class.items()},
             "num_voxels_evaluated": m.num_voxels}
            for ring, m in results]


def occscannet_report(m: OccScanNetMetrics, invalid: list[dict[str, str]] | None = None) -> dict[str, Any]:
    """JSON-ready dict for Occ-ScanNet metrics."""
    return {
        "format": "occscannet",
        "units": "percent",
        "mIoU": percent(m.miou),
        "IoU": percent(m.iou),
        "per_class": {k: percent(v) for k, v in m.per_class.items()},
        **_rayiou_keys(None),
        "num_samples": m.num_samples,
        "protocol": {"name": m.protocol, "mIoU": PROTOCOLS[m.protocol], "IoU": PROTOCOLS[m.protocol],
                     "RayIoU": "not defined for Occ-ScanNet"},
        "precision": percent(m.precision),
        "recall": percent(m.recall),
        "num_voxels_evaluated": m.num_voxels,
        "invalid_predictions": list(invalid or []),
    }


def format_table(report: dict[str, Any]) -> str:
    """Human-readable table of a report (2 decimals, as the devkits print)."""

    def f(v: Any) -> str:
        return "   -  " if v is None else f"{v:6.2f}"

    ray_rows = report.get("per_class_rayiou")
    head = f"{'class':<22}{'IoU':>8}"
    if ray_rows:
        head += f"{'Ray@1m':>9}{'Ray@2m':>9}{'Ray@4m':>9}"
    lines = [head, "-" * len(head)]
    for name, v in report["per_class"].items():
        line = f"{name:<22}{f(v):>8}"
        if ray_rows:
            r = ray_rows.get(name, {})
            line += "".join(f"{f(r.get(k)):>9}" for k in ("1m", "2m", "4m"))
        lines.append(line)
    lines.append("-" * len(head))
    summary = f"{'mIoU':<22}{f(report['mIoU']):>8}"
    if ray_rows:
        summary += "".join(f"{f(report[k]):>9}" for k in ("RayIoU@1m", "RayIoU@2m", "RayIoU@4m"))
    lines.append(summary)
    lines.append(f"{'IoU (geometry)':<22}{f(report['IoU']):>8}")
    if report.get("RayIoU") is not None:
        lines.append(f"{'RayIoU':<22}{f(report['RayIoU']):>8}")
    lines.append(f"samples: {report['num_samples']}   ({report['format']}, values in percent)")
    if report.get("invalid_predictions"):
        lines.append(f"invalid predictions counted as all-free: {len(report['invalid_predictions'])}")
    if report.get("by_range"):
        lines += ["", _range_table(report["by_range"], f)]
    return "\n".join(lines)


def _range_table(rows: list[dict[str, Any]], f) -> str:
    """Per-class IoU by distance ring: one column per ring."""
    labels = [f"<{hi:g} m" if lo == 0 else (f"{lo:g}-{hi:g} m" if hi is not None else f">={lo:g} m")
              for lo, hi in (r["range_m"] for r in rows)]
    head = f"{'IoU by range':<22}" + "".join(f"{label:>10}" for label in labels)
    lines = [head, "-" * len(head)]
    for name in rows[0]["per_class"]:
        lines.append(f"{name:<22}" + "".join(f"{f(r['per_class'][name]):>10}" for r in rows))
    lines.append("-" * len(head))
    lines.append(f"{'mIoU':<22}" + "".join(f"{f(r['mIoU']):>10}" for r in rows))
    lines.append(f"{'IoU (geometry)':<22}" + "".join(f"{f(r['IoU']):>10}" for r in rows))
    return "\n".join(lines)
