"""The dense BEV student (FlashOcc style): images -> 2D features -> LSS lift -> BEV -> C2H voxels.

images (B, N, 3, H, W) in [0, 1] -> ResNet -> FPN neck (stride s) -> camera-aware depth net
(D bins x C context) -> BEV pooling (B, C, X, Y) -> BEV encoder -> occupancy head with
Channel-to-Height -> voxel logits (B, X, Y, Z, K).

The same module serves training and deployment: :meth:`DenseStudent.forward` takes tensors only,
and :meth:`set_fixed_rig` switches the view transformer to the precomputed, exportable pooling.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from occdistill.geometry.grid import VoxelGrid
from occdistill.nn import BEVEncoder, BEVOccHead, DepthBins, FPNNeck, LSSViewTransformer, ResNet

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
    head_mlp: bool = True
    num_classes: int = 18
    grid: GridConfig = field(default_factory=GridConfig)

    @property
    def feature_stride(self) -> int:
        return 4 * 2 ** min(self.backbone.out_indices)


@dataclass
class DenseOutput:
    """Model outputs, including the intermediates that distillation and losses need.

    voxel_logits (B, X, Y, Z, K); bev_feature (B, C_bev, X, Y) after the BEV encoder;
    depth (B, N, D, h, w) softmax over depth bins; image_features (B, N, C_neck, h, w).
    """

    voxel_logits: torch.Tensor
    bev_feature: torch.Tensor
    depth: torch.Tensor
    image_features: torch.Tensor


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
        )
        self.bev_encoder = BEVEncoder(cfg.context_channels, cfg.bev_channels)
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

    def forward(
        self,
        images: torch.Tensor,
        intrinsics: torch.Tensor,
        img_from_raw: torch.Tensor,
        ego_from_cam: torch.Tensor,
    ) -> DenseOutput:
        """images (B, N, 3, H, W); intrinsics, img_from_raw (B, N, 3, 3); ego_from_cam (B, N, 4, 4),
        which includes the BEV augmentation (``Batch.ego_from_cam``)."""
        feats = self.image_features(images)
        lifted = self.view_transform(feats, intrinsics, img_from_raw, ego_from_cam)
        bev = self.bev_encoder(lifted.bev)
        return DenseOutput(voxel_logits=self.head(bev), bev_feature=bev, depth=lifted.depth, image_features=feats)

    def set_fixed_rig(self, intrinsics: torch.Tensor, img_from_raw: torch.Tensor, ego_from_cam: torch.Tensor) -> None:
        """Deployment: precompute the exportable pooling plan of one rig ((N, 3, 3), (N, 3, 3), (N, 4, 4))."""
        self.view_transform.set_fixed_rig(intrinsics, img_from_raw, ego_from_cam)
