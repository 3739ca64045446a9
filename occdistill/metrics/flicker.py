"""Temporal flicker of occupancy predictions: the fraction of static, camera-visible voxels whose
predicted label changes between consecutive frames of a scene, after ego-motion compensation.

Definition (ours; there is no benchmark protocol for it):
- Consecutive frames t-1, t of one scene, predictions in each frame's key ego frame (no BEV
  augmentation, as at evaluation). Every voxel v of frame t takes the frame t-1 voxel that
  contains its centre mapped by ``prev_from_cur = inv(global_from_ego_prev) @ global_from_ego_cur``
  (nearest neighbour on the grid, :func:`warp_labels_nearest`).
- A voxel counts when its source lies inside the grid, it is camera-visible in both frames
  (``mask_camera`` at t and at its source at t-1), and it is static in both frames' GT: its GT class
  at t and its source's GT class at t-1 are not dynamic (:data:`OCC3D_DYNAMIC_CLASSES`) and are
  known (not the table's ignore label). Requiring both keeps out space that a moving car just left
  or entered, where the prediction *should* change. Free space counts: a static free voxel
  that blinks occupied is flicker too (:attr:`FlickerMetrics.flicker_occupied` leaves it out).
- It changes when ``pred_t[v] != pred_{t-1}[source(v)]``. flicker = changed / counted, pooled over
  all pairs of the split (never a mean of per-pair fractions).

Per evaluation frame (the engine): ``acc.update(pred, gt, mask_camera, global_from_ego, scene)``
with frames in time order, scene by scene (:class:`occdistill.engine.sequence.SceneSequenceSampler`);
a batch is taken as consecutive frames in its order. Sharded by whole scenes, each process
accumulates its scenes and ``all_reduce`` (or ``merge``) sums the counts; ``compute`` at the end.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from occdistill.data.classes import OCC3D_NUSCENES, ClassTable
from occdistill.geometry.grid import VoxelGrid
from occdistill.geometry.transforms import invert_rigid
from occdistill.metrics._common import as_bool_tensor, as_label_tensor, reduce_sum_distributed

OCC3D_DYNAMIC_CLASSES = (
    "car", "truck", "bus", "trailer", "construction_vehicle", "pedestrian", "motorcycle", "bicycle",
)
"""Occ3D-nuScenes classes that move (nuScenes' vehicle and human categories)."""


def warp_labels_nearest(
    prev: torch.Tensor, prev_from_cur: torch.Tensor, grid: VoxelGrid
) -> tuple[torch.Tensor, torch.Tensor]:
    """Previous-frame voxel array (X, Y, Z) (labels or a mask) and the rigid ``prev_from_cur``
    (4, 4) -> (the previous value at the voxel containing each current voxel centre (X, Y, Z),
    inside (X, Y, Z) bool: that voxel exists). Values where ``inside`` is False are meaningless."""
    centres = torch.as_tensor(grid.centers(), device=prev.device)  # (X, Y, Z, 3) float64
    transform = prev_from_cur.to(device=prev.device, dtype=torch.float64)
    src = centres @ transform[:3, :3].T + transform[:3, 3]  # (X, Y, Z, 3) in the previous ego frame
    idx, inside = grid.point_to_index(src)  # (X, Y, Z, 3) clamped, (X, Y, Z)
    return prev[idx[..., 0], idx[..., 1], idx[..., 2]], inside


@dataclass(frozen=True)
class FlickerMetrics:
    """flicker: changed / counted over all voxels that count (NaN when none did);
    flicker_occupied: the same over voxels whose current GT is an occupied (non-free) static class;
    per_class: flicker by current GT class (None where no voxel of that class counted);
    changed / counted (K,) int64 by current GT class; num_pairs: consecutive frame pairs compared."""

    flicker: float
    flicker_occupied: float
    per_class: dict[str, float | None]
    changed: np.ndarray
    counted: np.ndarray
    num_pairs: int


@dataclass
class _Frame:
    """What the next frame is compared with (one frame, on the accumulator's device)."""

    pred: torch.Tensor  # (X, Y, Z) int64
    static_class: torch.Tensor  # (X, Y, Z) int64: the GT class where static, else K (not static)
    mask: torch.Tensor  # (X, Y, Z) bool
    global_from_ego: torch.Tensor  # (4, 4) float64
    scene: str


@dataclass
class FlickerAccumulator:
    """Streaming flicker (module docstring): ``update`` per frame in scene/time order, ``merge`` /
    ``all_reduce`` across processes, ``compute``. State: (K,) int64 changed and counted voxels by
    GT class, and the last frame of the stream."""

    grid: VoxelGrid
    classes: ClassTable = OCC3D_NUSCENES
    dynamic_classes: Sequence[str] = OCC3D_DYNAMIC_CLASSES
    device: torch.device | str | None = None
    changed: torch.Tensor = field(init=False)
    counted: torch.Tensor = field(init=False)
    num_pairs: int = field(default=0, init=False)
    _last: _Frame | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.device = torch.device(self.device if self.device is not None else "cpu")
        k = self.classes.num_classes
        self._dynamic = torch.zeros(k + 1, dtype=torch.bool, device=self.device)  # +1: unknown labels
        self._dynamic[[self.classes.index(n) for n in self.dynamic_classes]] = True
        self._dynamic[k] = True  # unknown (ignore label, out of table) is never static
        self.changed = torch.zeros(k, dtype=torch.int64, device=self.device)
        self.counted = torch.zeros(k, dtype=torch.int64, device=self.device)

    def reset(self) -> None:
        self.changed.zero_()
        self.counted.zero_()
        self.num_pairs = 0
        self._last = None

    def _static_class(self, gt: torch.Tensor) -> torch.Tensor:
        """GT (X, Y, Z) -> its class where static and known, K elsewhere."""
        k = self.classes.num_classes
        known = torch.where((gt >= 0) & (gt < k), gt.long(), torch.full_like(gt, k, dtype=torch.long))
        return torch.where(self._dynamic[known], torch.full_like(known, k), known)

    def update(
        self,
        pred: np.ndarray | torch.Tensor,
        gt: np.ndarray | torch.Tensor,
        mask: np.ndarray | torch.Tensor | None,
        global_from_ego: np.ndarray | torch.Tensor,
        scene: str | Sequence[str],
    ) -> None:
        """One frame (X, Y, Z) with pose (4, 4) and scene name, or B consecutive frames
        (B, X, Y, Z), (B, 4, 4), B scene names. ``mask``: camera visibility, None = everything."""
        pred = as_label_tensor(pred, self.device)
        gt = as_label_tensor(gt, self.device)
        pose = torch.as_tensor(global_from_ego, dtype=torch.float64).to(self.device)
        if pred.dim() == 3:
            # one frame -> a batch of one: (X, Y, Z) -> (1, X, Y, Z), (4, 4) -> (1, 4, 4)
            pred, gt, pose, scene = pred[None], gt[None], pose[None], [scene]
            mask = None if mask is None else as_bool_tensor(mask, self.device)[None]
        mask = torch.ones_like(gt, dtype=torch.bool) if mask is None else as_bool_tensor(mask, self.device)
        if isinstance(scene, str) or len(scene) != pred.shape[0]:
            raise ValueError(f"{pred.shape[0]} frames need as many scene names, got {scene!r}")
        for arr in (pred, gt, mask):
            if tuple(arr.shape[1:]) != self.grid.shape:
                raise ValueError(f"voxel array of shape {tuple(arr.shape[1:])} does not match grid {self.grid.shape}")
        for b in range(pred.shape[0]):
            frame = _Frame(pred[b].long(), self._static_class(gt[b]), mask[b], pose[b], scene[b])
            if self._last is not None and self._last.scene == frame.scene:
                self._compare(self._last, frame)
            self._last = frame

    def _compare(self, prev: _Frame, cur: _Frame) -> None:
        prev_from_cur = invert_rigid(prev.global_from_ego) @ cur.global_from_ego
        # The three voxel arrays of the previous frame share one gather: stack them as int64.
        stacked = torch.stack([prev.pred, prev.static_class, prev.mask.long()], dim=-1)  # (X, Y, Z, 3)
        warped, inside = warp_labels_nearest(stacked, prev_from_cur, self.grid)
        prev_pred, prev_static_class, prev_mask = warped.unbind(-1)  # (X, Y, Z) each
        k = self.classes.num_classes
        counts = inside & cur.mask & prev_mask.bool() & (cur.static_class < k) & (prev_static_class < k)
        # Voxels that do not count go to the spare bin k, sliced off.
        gt_class = torch.where(counts, cur.static_class, torch.full_like(cur.static_class, k))
        self.counted += torch.bincount(gt_class.reshape(-1), minlength=k + 1)[:k]
        gt_changed = torch.where(cur.pred != prev_pred, gt_class, torch.full_like(gt_class, k))
        self.changed += torch.bincount(gt_changed.reshape(-1), minlength=k + 1)[:k]
        self.num_pairs += 1

    def merge(self, other: "FlickerAccumulator") -> None:
        """Add another process's counts (each process streams its own whole scenes)."""
        self.changed += other.changed.to(self.device)
        self.counted += other.counted.to(self.device)
        self.num_pairs += other.num_pairs

    def all_reduce(self) -> None:
        """Sum the counts over all processes (no-op when not distributed)."""
        pairs = torch.tensor([self.num_pairs], dtype=torch.int64, device=self.device)
        for t in (self.changed, self.counted, pairs):
            reduce_sum_distributed(t)
        self.num_pairs = int(pairs.item())

    def compute(self) -> FlickerMetrics:
        changed, counted = self.changed.cpu().numpy(), self.counted.cpu().numpy()
        occupied = np.arange(len(counted)) != self.classes.free_index

        def ratio(c: np.ndarray, n: np.ndarray) -> float:
            return float(c.sum() / n.sum()) if n.sum() > 0 else float("nan")

        return FlickerMetrics(
            flicker=ratio(changed, counted),
            flicker_occupied=ratio(changed[occupied], counted[occupied]),
            per_class={
                name: (float(changed[c] / counted[c]) if counted[c] > 0 else None)
                for c, name in enumerate(self.classes.names)
            },
            changed=changed,
            counted=counted,
            num_pairs=self.num_pairs,
        )
