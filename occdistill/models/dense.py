"""The dense BEV student (FlashOcc style): images -> 2D features -> LSS lift -> BEV -> C2H voxels.

images (B, N, 3, H, W) in [0, 1] -> ResNet -> FPN neck (stride s) -> camera-aware depth net
(D bins x C context) -> BEV pooling (B, C, X, Y) -> BEV encoder -> occupancy head with
Channel-to-Height -> voxel logits (B, X, Y, Z, K).

The same module serves training and deployment: :meth:`DenseStudent.forward` takes tensors only,
and :meth:`set_fixed_rig` switches the view transformer to the precomputed, exportable pooling.

Temporal mode (opt-in, ``DenseStudentConfig.temporal_frames = F > 0``; BEVDet4D / FlashOcc style):
the pooled BEV of the current frame is concatenated with the pooled BEVs of the F earlier frames,
already warped into the current frame, and reduced back to C channels
(:class:`occdistill.nn.temporal.TemporalFusion`) before the BEV encoder. ``forward`` then takes
``history`` (B, F, C, X, Y), zeros where an earlier frame is missing (None = all zeros: scene
start). Where it comes from: :func:`training_history` during training (earlier frames recomputed
without gradient), :class:`occdistill.nn.temporal.BEVHistory` when streaming (see that module for
the per-step calls). With ``temporal_frames = 0`` the model, its parameters and state-dict keys
and its outputs are exactly those of the single-frame student.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn

from occdistill.data.sample import Batch
from occdistill.geometry.grid import VoxelGrid
from occdistill.nn import BEVEncoder, BEVOccHead, DepthBins, FPNNeck, LSSViewTransformer, ResNet
from occdistill.nn.temporal import HistoryLimits, TemporalFusion, cur_from_prev_transform, plausible_motion, warp_bev
from occdistill.nn.view_transform import ViewTransformOutput

# ImageNet statistics: the usual input normalisation of ResNets, kept even without pretrained
# weights so that a checkpoint trained elsewhere drops in unchanged.
_MEAN = (0.485, 0.456, 0.406)
_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class BackboneConfig:
    depth: int = 50
    base_width: int = 64
    out_indices: tuple[int, ...] = (2, 3)  # stages fused by the neck; the finest sets the stride
    frozen_stages: int = -1
    with_checkpoint: bool = False


@dataclass(frozen=True)
class GridConfig:
    range: tuple[float, float, float, float, float, float] = (-40.0, -40.0, -1.0, 40.0, 40.0, 5.4)
    voxel_size: tuple[float, float, float] = (0.4, 0.4, 0.4)

    def voxel_grid(self) -> VoxelGrid:
        return VoxelGrid(self.range, self.voxel_size)


@dataclass(frozen=True)
class DenseStudentConfig:
    """Defaults are FlashOcc M0 (Yzichen/FlashOCC ``flashocc-r50-M0.py``)."""

    image_size: tuple[int, int] = (256, 704)  # (H, W) network input
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    neck_channels: int = 256
    depth_bins: tuple[float, float, float] = (1.0, 45.0, 1.0)  # (min, max, step) metres
    context_channels: int = 64
    depth_net_channels: int = 256
    camera_aware: bool = True
    bev_channels: int = 128  # BEV encoder output (M0 128, M1 256)
    bev_stage_channels: tuple[int, ...] | None = None  # BEV encoder stage widths (None: FlashOcc's 2C, 4C, 8C)
    head_mlp: bool = True
    num_classes: int = 18
    grid: GridConfig = field(default_factory=GridConfig)
    temporal_frames: int = 0  # earlier frames fused into the BEV (0 = single-frame model)
    # None (FlashOcc): LSS splat only. A height (m, ego frame): add the ground plane's backward
    # projection to the splat (occdistill/nn/ground_sample.py), for the flat classes.
    ground_height: float | None = None

    @property
    def feature_stride(self) -> int:
        return 4 * 2 ** min(self.backbone.out_indices)


@dataclass
class DenseOutput:
    """Model outputs, including the intermediates that distillation and losses need.

    voxel_logits (B, X, Y, Z, K); bev_feature (B, C_bev, X, Y) after the BEV encoder;
    depth (B, N, D, h, w) softmax over depth bins; image_features (B, N, C_neck, h, w);
    lifted_bev (B, C_ctx, X, Y) this frame's pooled BEV before temporal fusion and the encoder,
    the next frame's history (:meth:`occdistill.nn.temporal.BEVHistory.push`). It defaults to
    None only for code that assembles outputs stage by stage (deploy.bench).
    """

    voxel_logits: torch.Tensor
    bev_feature: torch.Tensor
    depth: torch.Tensor
    image_features: torch.Tensor
    lifted_bev: torch.Tensor | None = None


class DenseStudent(nn.Module):
    def __init__(self, cfg: DenseStudentConfig):
        super().__init__()
        self.cfg = cfg
        grid = cfg.grid.voxel_grid()
        self.backbone = ResNet(
            depth=cfg.backbone.depth,
            out_indices=cfg.backbone.out_indices,
            base_width=cfg.backbone.base_width,
            frozen_stages=cfg.backbone.frozen_stages,
            with_checkpoint=cfg.backbone.with_checkpoint,
        )
        self.neck = FPNNeck(self.backbone.out_channels, cfg.neck_channels, out_index=0)
        self.view_transform = LSSViewTransformer(
            in_channels=cfg.neck_channels,
            context_channels=cfg.context_channels,
            image_size=cfg.image_size,
            feature_stride=cfg.feature_stride,
            depth_bins=DepthBins(*cfg.depth_bins),
            grid=grid,
            mid_channels=cfg.depth_net_channels,
            camera_aware=cfg.camera_aware,
            ground_height=cfg.ground_height,
        )
        if cfg.temporal_frames < 0:
            raise ValueError(f"temporal_frames must be >= 0, got {cfg.temporal_frames}")
        # Created only when on, so that a single-frame model keeps its exact state-dict keys.
        if cfg.temporal_frames:
            self.temporal = TemporalFusion(cfg.context_channels, cfg.temporal_frames)
        self.bev_encoder = BEVEncoder(cfg.context_channels, cfg.bev_channels, cfg.bev_stage_channels)
        self.head = BEVOccHead(cfg.bev_channels, grid.shape[2], cfg.num_classes, use_mlp=cfg.head_mlp)
        self.register_buffer("pixel_mean", torch.tensor(_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(_STD).view(1, 3, 1, 1), persistent=False)

    @property
    def grid(self) -> VoxelGrid:
        return self.view_transform.grid

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, N, 3, H, W) in [0, 1] -> neck features (B, N, C_neck, h, w)."""
        batch, cams = images.shape[:2]
        if tuple(images.shape[-2:]) != self.cfg.image_size:
            raise ValueError(f"images are {tuple(images.shape[-2:])}, the model expects {self.cfg.image_size}")
        x = images.flatten(0, 1)  # (B, N, 3, H, W) -> (B*N, 3, H, W)
        x = (x - self.pixel_mean) / self.pixel_std
        feats = self.neck(self.backbone(x))  # (B*N, C, h, w)
        return feats.view(batch, cams, *feats.shape[1:])  # -> (B, N, C, h, w)

    def lift(
        self, images: torch.Tensor, intrinsics: torch.Tensor, img_from_raw: torch.Tensor, ego_from_cam: torch.Tensor
    ) -> tuple[torch.Tensor, ViewTransformOutput]:
        """Images and cameras (as :meth:`forward`) -> (neck features (B, N, C_neck, h, w), the
        view transformer's pooled BEV (B, C_ctx, X, Y) and depth)."""
        feats = self.image_features(images)
        return feats, self.view_transform(feats, intrinsics, img_from_raw, ego_from_cam)

    def forward(
        self,
        images: torch.Tensor,
        intrinsics: torch.Tensor,
        img_from_raw: torch.Tensor,
        ego_from_cam: torch.Tensor,
        history: torch.Tensor | None = None,
    ) -> DenseOutput:
        """images (B, N, 3, H, W); intrinsics, img_from_raw (B, N, 3, 3); ego_from_cam (B, N, 4, 4),
        which includes the BEV augmentation (``Batch.ego_from_cam``).

        history (temporal mode only): (B, F, C_ctx, X, Y) the earlier frames' lifted BEVs warped
        into this frame's augmented ego frame, newest first, zeros for missing frames; None means
        no earlier frame at all (scene start, first frame after a resume)."""
        feats, lifted = self.lift(images, intrinsics, img_from_raw, ego_from_cam)
        bev = lifted.bev
        if self.cfg.temporal_frames:
            if history is None:
                history = bev.new_zeros((bev.shape[0], self.cfg.temporal_frames, *bev.shape[1:]))
            bev = self.temporal(bev, history)
        elif history is not None:
            raise ValueError("history given to a single-frame DenseStudent (temporal_frames = 0)")
        bev = self.bev_encoder(bev)
        return DenseOutput(voxel_logits=self.head(bev), bev_feature=bev, depth=lifted.depth, image_features=feats,
                           lifted_bev=lifted.bev)

    def set_fixed_rig(self, intrinsics: torch.Tensor, img_from_raw: torch.Tensor, ego_from_cam: torch.Tensor) -> None:
        """Deployment: precompute the exportable pooling plan of one rig ((N, 3, 3), (N, 3, 3), (N, 4, 4))."""
        self.view_transform.set_fixed_rig(intrinsics, img_from_raw, ego_from_cam)


@torch.no_grad()
def training_history(
    model: DenseStudent, current: Batch, previous: Sequence[Batch], limits: HistoryLimits = HistoryLimits()
) -> torch.Tensor:
    """The ``history`` input of a training step (BEVDet4D style): (B, F, C_ctx, X, Y).

    ``previous[f]`` is the batch of every sample's (f+1)-th earlier keyframe, loaded with the
    sample's own augmentation (``Occ3DDataset.load(prev_index, aug_index=index)``), on the model's
    device. Where a sample has no such frame, put any frame of its scene in its place (the sample
    itself is simplest): a slot is used only if it is another frame (``frame_indices`` differ) of
    the same scene within ``limits``, else it is zeros, as in streaming evaluation.

    The earlier frames go through the model without gradient, in the model's current mode (in
    training, BatchNorm normalises them with their own batch statistics like the current frame's
    and updates its running statistics with them). Pass the bare student, not a DDP wrapper.
    """
    if len(previous) != model.cfg.temporal_frames:
        raise ValueError(f"{len(previous)} earlier batches for a model fusing {model.cfg.temporal_frames} frames")
    slots = []
    for prev in previous:
        if len(prev) != len(current):
            raise ValueError(f"earlier batch of {len(prev)} samples for a batch of {len(current)}")
        same_scene = torch.tensor([a == b for a, b in zip(prev.scene_names, current.scene_names)])
        other_frame = (prev.frame_indices != current.frame_indices).cpu()
        raw_motion = cur_from_prev_transform(current.global_from_ego, prev.global_from_ego)  # (B, 4, 4), no bda
        use = (same_scene & other_frame & plausible_motion(raw_motion, limits).cpu()).to(current.bda.device)  # (B,)
        if not torch.allclose(prev.bda[use], current.bda[use]):
            raise ValueError("an earlier frame was loaded with another BEV augmentation than its sample "
                             "(load it with aug_index = the sample's index)")
        _, lifted = model.lift(prev.images, prev.intrinsics, prev.img_from_raw, prev.ego_from_cam)
        transform = cur_from_prev_transform(current.global_from_ego, prev.global_from_ego, current.bda)
        # Unused slots may hold any pose: warp them with the identity, then zero them.
        transform = torch.where(use.to(transform.device)[:, None, None], transform,
                                torch.eye(4, dtype=transform.dtype, device=transform.device))
        warped = warp_bev(lifted.bev, transform, model.grid)  # (B, C, X, Y)
        slots.append(warped * use.to(warped.device, warped.dtype)[:, None, None, None])
    return torch.stack(slots, dim=1)  # F x (B, C, X, Y) -> (B, F, C, X, Y)
