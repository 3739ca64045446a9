"""Occ-ScanNet semantic scene completion metrics (ISO protocol), streaming.

What was confirmed, and where
-----------------------------
hongxiaoy/ISO evaluates with MonoScene's ``SSCMetrics`` (``iso/models/iso.py`` imports
``iso.loss.sscMetrics.SSCMetrics``; ``step`` calls ``metric.add_batch(argmax(logits), target)``;
the class is astra-vision/MonoScene ``monoscene/loss/sscMetrics.py``):
- ``iso/data/OccScanNet/occscannet_dataset.py`` rewrites the label first:
  ``target = np.where(target == 255, 0, target)`` (also for val/test). Unknown voxels therefore
  count as **empty**: a prediction of any class there is a false positive. All 60x60x36 voxels are
  evaluated (``add_batch``'s ``y_true != 255`` mask is then all true).
- Completion: occupied = label > 0 on both sides; TP/FP/FN summed over the dataset; IoU =
  TP / (TP + FP + FN), precision = TP / (TP + FP), recall = TP / (TP + FN), all three 0 when TP = 0.
- Semantic: per class j in 0..11, TP/FP/FN summed over the dataset;
  ``iou_ssc = TP / (TP + FP + FN + 1e-5)`` and ``mIoU = np.mean(iou_ssc[1:])``: a **plain mean**
  over the 11 non-empty classes; a class absent from GT and prediction scores 0 and still counts
  (no NaN skipping, unlike Occ3D); perfect classes score 0.99999..., not 1.
- Counts are summed per process and never pooled across GPUs by ISO (Lightning averages per-GPU
  scalars); here ``merge``/``all_reduce`` pool the counts, which equals ISO's single-GPU numbers.

``protocol="monoscene"`` is the other reading of the same class: voxels whose target is 255 are
excluded instead of counted as empty (MonoScene on NYUv2, where the dataset keeps 255). Every
report names the protocol it follows.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from occdistill.data.classes import OCC_SCANNET, ClassTable
from occdistill.metrics._common import ConfusionCounts, as_label_tensor, single_thread

PROTOCOLS = {
    "iso": "ISO (hongxiaoy/ISO): target 255 -> empty before SSCMetrics; all voxels evaluated; "
    "completion IoU on label > 0; mIoU = plain mean of TP/(TP+FP+FN+1e-5) over classes 1..11",
    "monoscene": "MonoScene SSCMetrics with target 255 excluded; completion IoU on label > 0; "
    "mIoU = plain mean of TP/(TP+FP+FN+1e-5) over classes 1..11",
}


@dataclass(frozen=True)
class OccScanNetMetrics:
    """SSC metrics over a split, fractions in [0, 1].

    ``iou_ssc``: (K,) float64 per class (empty included, as ISO computes it).
    ``miou``: mean of ``iou_ssc[1:]``; ``iou``/``precision``/``recall``: completion (occupied vs empty).
    """

    protocol: str
    class_names: tuple[str, ...]
    confusion: np.ndarray  # (K, K) int64, rows target, columns prediction
    iou_ssc: np.ndarray
    miou: float
    iou: float
    precision: float
    recall: float
    num_samples: int
    num_voxels: int

    @property
    def per_class(self) -> dict[str, float]:
        """IoU of the classes in the mean (1..K-1)."""
        return {n: float(v) for n, v in zip(self.class_names[1:], self.iou_ssc[1:])}


@dataclass
class OccScanNetAccumulator(ConfusionCounts):
    """Streaming ISO metrics: ``update`` per frame or batch, ``merge``/``all_reduce``, ``compute``."""

    classes: ClassTable = OCC_SCANNET
    protocol: str = "iso"
    device: torch.device | str | None = None
    num_samples: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {sorted(PROTOCOLS)}, got {self.protocol!r}")
        self.device = torch.device(self.device) if self.device is not None else torch.device("cpu")
        self._init_counts(self.classes.num_classes)

    def update(self, pred: np.ndarray | torch.Tensor, target: np.ndarray | torch.Tensor) -> None:
        """pred: (X, Y, Z) or (B, X, Y, Z) class ids in 0..K-1 (argmax of the logits);
        target: same shape, 0..K-1 or the ignore label (255)."""
        with single_thread(self.device):
            self._update(pred, target)

    def _update(self, pred, target) -> None:
        K = self.classes.num_classes
        ignore = self.classes.ignore_index
        p = as_label_tensor(pred, self.device)
        y = as_label_tensor(target, self.device)
        if p.shape != y.shape:
            raise ValueError(f"prediction shape {tuple(p.shape)} != target shape {tuple(y.shape)}")
        if p.numel():
            lo, hi = torch.aminmax(p)
            if int(lo) < 0 or int(hi) >= K:
                raise ValueError(f"prediction has labels in [{int(lo)}, {int(hi)}], outside 0..{K - 1}")
        y = y.to(torch.int64)
        unknown = (y == ignore) if ignore is not None else torch.zeros_like(y, dtype=torch.bool)
        bad = ~unknown & ((y < 0) | (y >= K))
        if bool(bad.any()):
            vals = torch.unique(y[bad])[:5].tolist()
            raise ValueError(f"target has labels {vals} outside 0..{K - 1} and not the ignore label {ignore}")
        idx = y.clamp(0, K - 1) * K + p.to(torch.int64)
        if self.protocol == "iso":
            idx = torch.where(unknown, p.to(torch.int64), idx)  # target 255 -> 0 (empty)
        else:
            idx = torch.where(unknown, K * K, idx)  # excluded
        self._count(idx, 1 if p.dim() == 3 else p.shape[0])

    def merge(self, other: "OccScanNetAccumulator") -> "OccScanNetAccumulator":
        if other.classes != self.classes or other.protocol != self.protocol:
            raise ValueError("cannot merge Occ-ScanNet accumulators with different classes or protocols")
        self._merge_counts(other)
        return self

    def compute(self) -> OccScanNetMetrics:
        hist = self.confusion.cpu().numpy()
        # ISO's arithmetic: integer counts, float64 ratios, the same operation order.
        tps = np.diag(hist).astype(np.float64)
        fps = hist.sum(0).astype(np.float64) - tps
        fns = hist.sum(1).astype(np.float64) - tps
        iou_ssc = tps / (tps + fps + fns + 1e-5)
        tp = int(hist[1:, 1:].sum())
        fp = int(hist[0, 1:].sum())
        fn = int(hist[1:, 0].sum())
        if tp != 0:
            precision, recall, iou = tp / (tp + fp), tp / (tp + fn), tp / (tp + fp + fn)
        else:
            precision = recall = iou = 0.0
        return OccScanNetMetrics(
            protocol=self.protocol,
            class_names=self.classes.names,
            confusion=hist.astype(np.int64),
            iou_ssc=iou_ssc,
            miou=float(np.mean(iou_ssc[1:])),
            iou=float(iou),
            precision=float(precision),
            recall=float(recall),
            num_samples=self.num_samples,
            num_voxels=int(hist.sum()),
        )
