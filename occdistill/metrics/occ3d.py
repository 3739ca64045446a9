"""Occ3D-nuScenes voxel mIoU with ``mask_camera`` (CVPR 2023 devkit protocol), streaming.

What was confirmed, and where
-----------------------------
CVPR2023-3D-Occupancy-Prediction ``projects/mmdet3d_plugin/datasets/occ_metrics.py``
(``Metric_mIoU``) and ``nuscenes_occ.py`` (``evaluate_miou``):
- The official setting is ``Metric_mIoU(num_classes=18, use_lidar_mask=False, use_image_mask=True)``;
  ``evaluate_miou`` casts both masks with ``.astype(bool)`` before indexing (a uint8 0/1 mask used as
  an index array would pick wrong voxels silently; we cast any mask with ``!= 0``).
- Per sample, ``semantics_gt[mask_camera]`` and ``semantics_pred[mask_camera]``; ``hist_info`` keeps
  GT in ``0 <= gt < 18`` and bins ``18 * gt + pred`` into an 18x18 matrix (rows GT, columns pred),
  added into **one matrix for the whole split** (no per-sample averaging). Free (17) stays in the
  matrix: free predicted on an occupied voxel is an FN of that class, class c predicted on a free
  voxel is an FP of c.
- ``per_class_iu``: ``diag / (rowsum + colsum - diag)`` over all 18 classes; ``count_miou`` prints
  ``round(np.nanmean(IoU[:17]) * 100, 2)``: the mean over classes 0..16 (others in, free out) is a
  **nanmean**, with ``np.seterr(divide='ignore', invalid='ignore')``. So a class absent from GT but
  predicted has TP = 0 and FP > 0: IoU **0**, counted in the mean; a class absent from both is
  0/0 = NaN and **skipped**. This agrees with DESIGN.md section 7. (SparseOcc's ``old_metrics``
  differs: it gives NaN to any class without GT voxels; we follow the devkit.)
- The devkit does not check predictions; a value outside 0..17 lands in a wrong cell or crashes
  the reshape. We reject it (``ValueError``) instead.
- The devkit's ``class_names`` list (used only for printing) is in another order (others, car,
  truck, ...) than its label indices; we name classes by the Occ3D index table (DESIGN.md
  section 4: 0 others, 1 barrier, ..., 16 vegetation, 17 free), which is what the labels mean.
- Geometry IoU is not in the devkit; DESIGN.md section 7 defines it: occupied = class != free,
  same camera mask, pooled TP / (TP + FP + FN). It is read off the same confusion matrix.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from occdistill.data.classes import OCC3D_NUSCENES, ClassTable
from occdistill.metrics._common import ConfusionCounts, as_bool_tensor, as_label_tensor, nanmean, single_thread


@dataclass(frozen=True)
class Occ3DMetrics:
    """Voxel metrics over a split; IoUs are fractions in [0, 1] (NaN where TP + FP + FN = 0).

    ``confusion``: (K, K) int64, rows GT, columns prediction, free included.
    ``iou``: (K,) per-class IoU of every class (free included, as the devkit computes it).
    ``miou``: nanmean of ``iou`` over the non-free classes; ``iou_geometry``: occupied vs free.
    """

    class_names: tuple[str, ...]
    free_index: int
    confusion: np.ndarray
    iou: np.ndarray
    miou: float
    iou_geometry: float
    num_samples: int
    num_voxels: int  # evaluated (masked) voxels

    @property
    def per_class(self) -> dict[str, float | None]:
        """IoU of the classes in the mean (all but free), None where undefined."""
        return {
            n: (None if np.isnan(v) else float(v))
            for c, (n, v) in enumerate(zip(self.class_names, self.iou))
            if c != self.free_index
        }


@dataclass
class Occ3DAccumulator(ConfusionCounts):
    """Streaming devkit mIoU: ``update`` per sample or batch, ``merge``/``all_reduce``, ``compute``.

    ``use_mask=True`` is the official protocol (``mask_camera``); with False every voxel counts.
    The state is one (K, K) int64 confusion matrix on ``device``.
    """

    classes: ClassTable = OCC3D_NUSCENES
    use_mask: bool = True
    device: torch.device | str | None = None
    num_samples: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        self.device = torch.device(self.device) if self.device is not None else torch.device("cpu")
        K = self.classes.num_classes
        self._init_counts(K)
        # Bin index g*K + p fits int16 (faster bincount) for every table we have; one extra bin
        # collects the voxels outside the mask or with GT outside the table.
        self._index_dtype = torch.int16 if 2 * K * K < 2**15 else torch.int32

    def update(
        self,
        pred: np.ndarray | torch.Tensor,
        gt: np.ndarray | torch.Tensor,
        mask: np.ndarray | torch.Tensor | None = None,
    ) -> None:
        """pred, gt: (X, Y, Z) or (B, X, Y, Z) integer labels; mask: same shape, bool or 0/1
        (``mask_camera``; required when ``use_mask``). Predictions must lie in 0..K-1."""
        with single_thread(self.device):
            self._update(pred, gt, mask)

    def _update(self, pred, gt, mask) -> None:
        K = self.classes.num_classes
        p = as_label_tensor(pred, self.device)
        g = as_label_tensor(gt, self.device)
        if p.shape != g.shape:
            raise ValueError(f"prediction shape {tuple(p.shape)} != GT shape {tuple(g.shape)}")
        if p.numel():
            lo, hi = torch.aminmax(p)
            if int(lo) < 0 or int(hi) >= K:
                raise ValueError(
                    f"prediction has labels in [{int(lo)}, {int(hi)}], outside 0..{K - 1} of the {self.classes.name} table"
                )
        drop = None
        if self.use_mask:
            if mask is None:
                raise ValueError("use_mask=True needs the camera mask")
            m = as_bool_tensor(mask, self.device)
            if m.shape != g.shape:
                raise ValueError(f"mask shape {tuple(m.shape)} != GT shape {tuple(g.shape)}")
            drop = ~m
        if g.numel():
            glo, ghi = torch.aminmax(g)
            if int(glo) < 0 or int(ghi) >= K:  # the devkit's ``(gt >= 0) & (gt < n_cl)``
                out = (g < 0) | (g >= K)
                drop = out if drop is None else drop | out
                g = g.clamp(0, K - 1)
        dt = self._index_dtype
        idx = g.to(dt) * K + p.to(dt)
        if drop is not None:
            idx += drop.to(dt) * (K * K)
        self._count(idx, 1 if p.dim() == 3 else p.shape[0])

    def merge(self, other: "Occ3DAccumulator") -> "Occ3DAccumulator":
        if other.classes != self.classes or other.use_mask != self.use_mask:
            raise ValueError("cannot merge Occ3D accumulators with different classes or mask settings")
        self._merge_counts(other)
        return self

    def compute(self) -> Occ3DMetrics:
        return occ3d_metrics_from_confusion(self.confusion.cpu().numpy(), self.classes, self.num_samples)


def occ3d_metrics_from_confusion(
    confusion: np.ndarray, classes: ClassTable = OCC3D_NUSCENES, num_samples: int = 0
) -> Occ3DMetrics:
    """Devkit arithmetic on a pooled (K, K) confusion matrix (rows GT, columns prediction)."""
    hist = np.asarray(confusion).astype(np.float64)
    free = classes.free_index
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.diag(hist) / (hist.sum(1) + hist.sum(0) - np.diag(hist))
    mean_classes = [c for c in range(classes.num_classes) if c != free]
    occ = np.array(mean_classes)
    tp = hist[np.ix_(occ, occ)].sum()
    fp = hist[free, occ].sum()
    fn = hist[occ, free].sum()
    denom = tp + fp + fn
    return Occ3DMetrics(
        class_names=classes.names,
        free_index=free,
        confusion=np.asarray(confusion).astype(np.int64),
        iou=iou,
        miou=nanmean(iou[mean_classes]),
        iou_geometry=float(tp / denom) if denom > 0 else float("nan"),
        num_samples=num_samples,
        num_voxels=int(np.asarray(confusion).sum()),
    )
