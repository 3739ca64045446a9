"""Temporal BEV fusion (BEVDet4D / FlashOcc style): earlier frames' lifted BEVs, warped into the
current frame and concatenated with the current one, reduced back to C channels by a small conv.

Frames. Every lifted BEV lives in its own frame's *augmented* ego frame (``ego_from_cam`` includes
the BEV augmentation ``bda``). A temporal sample is loaded with one ``bda`` for all its frames
(``Occ3DDataset.load(prev_index, aug_index=index)``), so, with ``global_from_augego =
global_from_ego @ inv(bda)`` (occdistill/data/sample.py),

    cur_from_prev = inv(global_from_augego_cur) @ global_from_augego_prev
                  = bda @ inv(global_from_ego_cur) @ global_from_ego_prev @ inv(bda)

(:func:`cur_from_prev_transform`; ``bda`` is a similarity, inverted in general, not as a rigid
transform). At evaluation ``bda`` is the identity.

Warp. :func:`warp_bev` resamples a previous BEV (B, C, X, Y) at the previous-frame position of every
current cell centre, bilinearly, zeros outside the previous grid. BEV tensors are indexed [x, y]
like the voxel grid (occdistill/nn/bev_pool.py), so for ``F.grid_sample`` the X axis is the
*height* (its grid coordinate 1) and Y the *width* (coordinate 0). The warp is planar: it uses the
x/y rows and columns of ``prev_from_cur`` on the plane z = 0 (the ground, where the ego frame's
origin lies); pitch and roll between keyframes move points at z = 2 m by centimetres.

Who calls what
--------------
Model: ``DenseStudentConfig.temporal_frames = F`` (occdistill/models/dense.py) adds
:class:`TemporalFusion` and a ``history`` argument (B, F, C, X, Y) to ``DenseStudent.forward``.

Per training step (BEVDet4D style): the loader gives, besides the batch, the batch of every
sample's f-th earlier keyframe for f = 1..F (``Occ3DDataset.previous(index, f)``, loaded with
``load(prev_index, aug_index=index)``; a sample without one repeats itself there), then

    history = training_history(student, batch, prev_batches)   # models.dense; no gradient
    out = student(batch.images, batch.intrinsics, batch.img_from_raw, batch.ego_from_cam, history)

Per evaluation frame (streaming: frames of a scene in time order, from
``occdistill.engine.sequence.SceneSequenceSampler``, batch size 1 or B fixed parallel streams):

    history = None                                    # at the start and after a resume
    for batch in loader:
        warped = None if history is None else history.warped(batch.global_from_ego, batch.scene_names,
                                                              grid, batch.bda)
        out = student(..., history=warped)            # None -> zeros, as at a scene start
        history = BEVHistory.push(history, out.lifted_bev, batch.global_from_ego, batch.scene_names, F)

Reset rule (:meth:`BEVHistory.usable`): an earlier frame is used only if it belongs to the same
scene as the current frame of its stream and the ego moved plausibly between them
(:class:`HistoryLimits`); otherwise its slot is zeros, as at a scene start. A ``None`` history (start,
resume) means zeros everywhere.

Shapes: B batch (streams), F earlier frames, C channels, X Y BEV cells.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from occdistill.geometry.grid import VoxelGrid
from occdistill.geometry.transforms import invert_rigid


def cur_from_prev_transform(
    global_from_ego_cur: torch.Tensor, global_from_ego_prev: torch.Tensor, bda: torch.Tensor | None = None
) -> torch.Tensor:
    """(B, 4, 4) key ego poses of the current and previous frame and the (shared) BEV augmentation
    (B, 4, 4) or None (identity) -> (B, 4, 4) float64 ``cur_aug_from_prev_aug``.

    Composed in float64: global translations are kilometres, where float32 rounds to centimetres.
    """
    cur_from_prev = invert_rigid(global_from_ego_cur.double()) @ global_from_ego_prev.double()
    if bda is None:
        return cur_from_prev
    bda = bda.double().to(cur_from_prev.device)
    return bda @ cur_from_prev @ torch.linalg.inv(bda)


def _sampling_grid(prev_from_cur: torch.Tensor, grid: VoxelGrid) -> torch.Tensor:
    """(B, 4, 4) float64 -> (B, X, Y, 2) float64 ``grid_sample`` coordinates (width = y, height = x)
    of the previous-frame position of every current BEV cell centre at z = 0."""
    num_x, num_y, _ = grid.shape
    xmin, ymin, _, xmax, ymax, _ = grid.range
    opts = dict(dtype=torch.float64, device=prev_from_cur.device)
    xs = xmin + (torch.arange(num_x, **opts) + 0.5) * grid.voxel_size[0]  # (X,)
    ys = ymin + (torch.arange(num_y, **opts) + 0.5) * grid.voxel_size[1]  # (Y,)
    cx, cy = torch.meshgrid(xs, ys, indexing="ij")  # (X, Y) each
    rot = prev_from_cur[:, None, None, :2, :2]  # (B, 1, 1, 2, 2)
    shift = prev_from_cur[:, None, None, :2, 3]  # (B, 1, 1, 2)
    prev_xy = (rot @ torch.stack([cx, cy], dim=-1)[..., None])[..., 0] + shift  # (B, X, Y, 2)
    # align_corners=False: -1 and +1 are the outer cell edges, i.e. the grid range itself.
    nx = 2.0 * (prev_xy[..., 0] - xmin) / (xmax - xmin) - 1.0
    ny = 2.0 * (prev_xy[..., 1] - ymin) / (ymax - ymin) - 1.0
    return torch.stack([ny, nx], dim=-1)  # grid_sample wants (width, height) = (y, x)


def warp_bev(
    prev_bev: torch.Tensor, cur_from_prev: torch.Tensor, grid: VoxelGrid, mode: str = "bilinear"
) -> torch.Tensor:
    """Previous-frame BEV (B, C, X, Y) -> the same content in the current frame (B, C, X, Y).

    ``cur_from_prev`` (B, 4, 4) from :func:`cur_from_prev_transform`. Each current cell centre is
    mapped into the previous frame and sampled there (``mode`` "bilinear" or "nearest"); cells
    whose source lies outside the previous grid get zeros.
    """
    batch, _, num_x, num_y = prev_bev.shape
    if (num_x, num_y) != grid.shape[:2] or cur_from_prev.shape != (batch, 4, 4):
        raise ValueError(f"prev_bev (B,C,X,Y) {tuple(prev_bev.shape)} and cur_from_prev (B,4,4) "
                         f"{tuple(cur_from_prev.shape)} do not fit the grid {grid.shape[:2]}")
    prev_from_cur = torch.linalg.inv(cur_from_prev.double())  # similarity under bda: not rigid
    coords = _sampling_grid(prev_from_cur, grid).to(device=prev_bev.device, dtype=prev_bev.dtype)
    return F.grid_sample(prev_bev, coords, mode=mode, padding_mode="zeros", align_corners=False)


@dataclass(frozen=True)
class HistoryLimits:
    """Largest ego motion between an earlier frame and the current one that is still taken as the
    same drive. nuScenes keyframes are 0.5 s apart (< 10 m at 70 km/h); a larger jump means a
    broken pose or a skipped stretch, and warping across it would paste wrong content."""

    max_translation_m: float = 20.0
    max_rotation_deg: float = 60.0


def plausible_motion(cur_from_prev: torch.Tensor, limits: HistoryLimits) -> torch.Tensor:
    """(..., 4, 4) rigid ``cur_from_prev`` (without bda) -> (...) bool: finite and within ``limits``."""
    translation = cur_from_prev[..., :3, 3].norm(dim=-1)
    trace = cur_from_prev[..., 0, 0] + cur_from_prev[..., 1, 1] + cur_from_prev[..., 2, 2]
    angle = torch.rad2deg(torch.arccos(((trace - 1) / 2).clamp(-1.0, 1.0)))
    finite = torch.isfinite(cur_from_prev).flatten(-2).all(dim=-1)
    return finite & (translation <= limits.max_translation_m) & (angle <= limits.max_rotation_deg)


@dataclass
class BEVHistory:
    """Lifted BEVs of the F earlier frames of B streams (a stream plays one scene in time order),
    newest first, for streaming inference.

    bev (B, F, C, X, Y): each slot in its own frame's (augmented) ego frame, detached; zeros where
        not valid. All frames of a stream must share the BEV augmentation given to :meth:`warped`
        (identity at evaluation).
    global_from_ego (B, F, 4, 4) float64: the raw key ego pose of each slot.
    valid (B, F) bool: the slot holds a frame (False before F frames were seen, or after a reset).
    scene_names: (B,) the scene each stream is in.
    """

    bev: torch.Tensor
    global_from_ego: torch.Tensor
    valid: torch.Tensor
    scene_names: tuple[str, ...]

    @property
    def frames(self) -> int:
        return self.bev.shape[1]

    def _check_streams(self, scene_names: Sequence[str]) -> None:
        if len(scene_names) != len(self.scene_names):
            raise ValueError(f"history has {len(self.scene_names)} streams, the batch {len(scene_names)}: a "
                             "streaming batch must keep one stream per element (use batch size 1 or fixed streams)")

    def usable(
        self, global_from_ego: torch.Tensor, scene_names: Sequence[str], limits: HistoryLimits = HistoryLimits()
    ) -> torch.Tensor:
        """The reset rule: (B, F) bool, slots that are valid, of the current scene and within the
        motion limits of the current pose ``global_from_ego`` (B, 4, 4)."""
        self._check_streams(scene_names)
        same_scene = torch.tensor([a == b for a, b in zip(self.scene_names, scene_names)], device=self.valid.device)
        cur = global_from_ego.double().to(self.global_from_ego.device)[:, None]  # (B, 1, 4, 4)
        motion_ok = plausible_motion(invert_rigid(cur) @ self.global_from_ego, limits)  # (B, F)
        return self.valid & same_scene[:, None] & motion_ok.to(self.valid.device)

    def warped(
        self,
        global_from_ego: torch.Tensor,
        scene_names: Sequence[str],
        grid: VoxelGrid,
        bda: torch.Tensor | None = None,
        limits: HistoryLimits = HistoryLimits(),
    ) -> torch.Tensor:
        """The model's ``history`` input for the current frame: (B, F, C, X, Y), every usable slot
        warped into the current (augmented) ego frame, zeros elsewhere."""
        batch, frames, channels, num_x, num_y = self.bev.shape
        use = self.usable(global_from_ego, scene_names, limits)  # (B, F)
        cur = global_from_ego.double().to(self.global_from_ego.device)[:, None].expand(-1, frames, -1, -1)
        # (B, 4, 4) -> (B*F, 4, 4), one copy per slot; (B, F, C, X, Y) -> (B*F, C, X, Y)
        aug = None if bda is None else bda.double().to(cur.device).repeat_interleave(frames, dim=0)
        transform = cur_from_prev_transform(cur.reshape(-1, 4, 4), self.global_from_ego.reshape(-1, 4, 4), aug)
        # An implausible pose may be singular or non-finite: warp those slots with the identity
        # and zero them afterwards rather than feed NaNs to grid_sample.
        transform = torch.where(use.reshape(-1, 1, 1).to(transform.device), transform,
                                torch.eye(4, dtype=transform.dtype, device=transform.device))
        out = warp_bev(self.bev.reshape(batch * frames, channels, num_x, num_y), transform, grid)
        out = out.view(batch, frames, channels, num_x, num_y)  # (B*F, C, X, Y) -> (B, F, C, X, Y)
        return out * use.to(out.device, out.dtype)[:, :, None, None, None]

    @staticmethod
    def push(
        history: "BEVHistory | None",
        lifted_bev: torch.Tensor,
        global_from_ego: torch.Tensor,
        scene_names: Sequence[str],
        frames: int,
    ) -> "BEVHistory":
        """The history for the next frame: this frame's lifted BEV (B, C, X, Y) (``DenseOutput.lifted_bev``)
        and pose (B, 4, 4) become the newest slot; the oldest falls out; slots of a stream whose
        scene changed are dropped. ``history`` None starts a new one."""
        bev = lifted_bev.detach()[:, None]  # (B, C, X, Y) -> (B, 1, C, X, Y)
        pose = global_from_ego.detach().double()[:, None]  # (B, 1, 4, 4)
        valid = torch.ones(bev.shape[0], 1, dtype=torch.bool, device=bev.device)
        if history is None:
            pad = frames - 1
            old_bev = bev.new_zeros((bev.shape[0], pad, *bev.shape[2:]))
            old_pose = torch.eye(4, dtype=torch.float64, device=pose.device).expand(bev.shape[0], pad, 4, 4)
            old_valid = valid.new_zeros(bev.shape[0], pad)
        else:
            if history.frames != frames:
                raise ValueError(f"history holds {history.frames} frames, the model fuses {frames}")
            history._check_streams(scene_names)
            keep = torch.tensor([a == b for a, b in zip(history.scene_names, scene_names)], device=bev.device)
            old_bev = history.bev[:, : frames - 1] * keep.to(bev.dtype)[:, None, None, None, None]
            old_pose = history.global_from_ego[:, : frames - 1].to(pose.device)
            old_valid = history.valid[:, : frames - 1] & keep[:, None]
        return BEVHistory(
            bev=torch.cat([bev, old_bev], dim=1),
            global_from_ego=torch.cat([pose, old_pose], dim=1),
            valid=torch.cat([valid, old_valid], dim=1),
            scene_names=tuple(scene_names),
        )


class TemporalFusion(nn.Module):
    """Current lifted BEV (B, C, X, Y) + ``frames`` warped earlier ones (B, F, C, X, Y) ->
    concatenation (B, C*(1+F), X, Y) -> 3x3 conv + BN + ReLU -> (B, C, X, Y) for the BEV encoder.

    One 3x3 conv (BEVDet4D concatenates and widens the encoder's input instead): the encoder keeps
    its C input channels, and the 3x3 support absorbs the sub-cell misalignment left by the warp
    and by objects that moved. At FlashOcc M0 sizes (C = 64, 200x200, F = 1) it costs 2.9 GMACs,
    under 2% of the model.
    """

    def __init__(self, channels: int, frames: int):
        super().__init__()
        if frames < 1:
            raise ValueError(f"temporal fusion needs at least one earlier frame, got {frames}")
        self.channels, self.frames = channels, frames
        self.reduce = nn.Sequential(
            nn.Conv2d(channels * (1 + frames), channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
        )

    def forward(self, current: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
        batch, channels, num_x, num_y = current.shape
        if history.shape != (batch, self.frames, channels, num_x, num_y):
            raise ValueError(f"history (B,F,C,X,Y) is {tuple(history.shape)}, expected "
                             f"{(batch, self.frames, channels, num_x, num_y)}")
        # (B, F, C, X, Y) -> (B, F*C, X, Y), after the current frame's C channels
        stacked = torch.cat([current, history.to(current.dtype).flatten(1, 2)], dim=1)
        return self.reduce(stacked)

