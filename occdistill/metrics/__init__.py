"""Evaluation metrics, exactly as the benchmarks define them (DESIGN.md section 7).

- :mod:`occdistill.metrics.occ3d`: Occ3D-nuScenes voxel mIoU / geometry IoU with ``mask_camera``
  (CVPR 2023 devkit ``Metric_mIoU``).
- :mod:`occdistill.metrics.rayiou`: RayIoU at 1, 2, 4 m (SparseOcc ``ray_metrics``), its LiDAR
  origins and an exact vectorised first-hit ray caster.
- :mod:`occdistill.metrics.occscannet`: Occ-ScanNet completion IoU and semantic mIoU (ISO protocol).
- :mod:`occdistill.metrics.flicker`: temporal flicker of predictions on static voxels (our definition).

Every accumulator streams: ``update`` per sample or batch, ``merge`` / ``all_reduce`` across
processes (counts are summed, never per-sample IoUs averaged), ``compute`` at the end.
"""

from occdistill.metrics.flicker import FlickerAccumulator, FlickerMetrics
from occdistill.metrics.occ3d import Occ3DAccumulator, Occ3DMetrics, occ3d_metrics_from_confusion
from occdistill.metrics.occscannet import OccScanNetAccumulator, OccScanNetMetrics
from occdistill.metrics.rayiou import (
    RayHits,
    RayIoUAccumulator,
    RayIoUMetrics,
    cast_rays,
    cast_rays_reference,
    lidar_origins,
    lidar_ray_directions,
    rays_in_voxel_units,
)
from occdistill.metrics.report import format_table, occ3d_report, occscannet_report

__all__ = [
    "FlickerAccumulator", "FlickerMetrics", "Occ3DAccumulator", "Occ3DMetrics", "OccScanNetAccumulator",
    "OccScanNetMetrics", "RayHits",
    "RayIoUAccumulator", "RayIoUMetrics", "cast_rays", "cast_rays_reference", "format_table",
    "lidar_origins", "lidar_ray_directions", "occ3d_metrics_from_confusion", "occ3d_report",
    "occscannet_report", "rays_in_voxel_units",
]
