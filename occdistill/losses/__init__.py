"""Supervised and distillation losses as plain functions of tensors."""

from occdistill.losses.supervised import depth_bce_loss, downsample_depth, voxel_cross_entropy

__all__ = ["depth_bce_loss", "downsample_depth", "voxel_cross_entropy"]
