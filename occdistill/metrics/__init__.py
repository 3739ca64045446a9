"""Evaluation metrics, exactly as the benchmarks define them (DESIGN.md section 7).

- :mod:`occdistill.metrics.occ3d`: Occ3D-nuScenes voxel mIoU / geometry IoU with ``mask_camera``
  (CVPR 2023 devkit ``Metric_mIoU``).
- :mod:`occdistill.metrics.rayiou`: RayIoU at 1, 2, 4 m (SparseOcc ``ray_metrics``), its LiDAR
  origins and an exact vectorised first-hit ray caster.
- :mod:`occdistill.metrics.occscannet`: Occ-ScanNet completion IoU and semantic mIoU (ISO protocol).

Every accumulator streams: ``update`` per sample or batch, ``merge`` / ``all_reduce`` across
processes (counts are summed, never per-sample IoUs averaged), ``compute`` at the end.
"""
