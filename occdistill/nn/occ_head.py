"""BEV occupancy head with the Channel-to-Height (C2H) reshape (FlashOcc ``BEVOCCHead2D``).

A 3x3 conv on the BEV feature, optionally followed by a per-cell MLP (Linear(C, 2C), Softplus,
Linear(2C, Z*K); FlashOcc's "predicter", equivalent to two 1x1 convs), produces Z*K channels per
BEV cell. C2H (DESIGN.md section 3): channel ``k = z*K + c`` holds the logit of class c in height
layer z, so (B, X, Y, Z*K) reshapes to (B, X, Y, Z, K) with no data movement.

Shapes: B batch, C channels, X Y Z voxels, K classes.
"""

from __future__ import annotations

import torch
from torch import nn


class BEVOccHead(nn.Module):
    """(B, C_in, X, Y) -> voxel logits (B, X, Y, Z, K).

    Args:
        in_channels: C of the BEV feature.
        num_z: Z height layers (Occ3D: 16).
        num_classes: K (Occ3D: 18, free included).
        mid_channels: output width of the 3x3 conv when ``use_mlp`` (FlashOcc: = in_channels).
        use_mlp: conv3x3 + ReLU + MLP (FlashOcc, every released config); otherwise the 3x3 conv
            outputs the Z*K logits directly.
    """

    def __init__(self, in_channels: int, num_z: int, num_classes: int, mid_channels: int | None = None,
                 use_mlp: bool = True):
        super().__init__()
        self.num_z = num_z
        self.num_classes = num_classes
        out = num_z * num_classes
        mid = in_channels if mid_channels is None else mid_channels
        self.use_mlp = use_mlp
        if use_mlp:
            self.conv = nn.Sequential(nn.Conv2d(in_channels, mid, 3, padding=1), nn.ReLU(inplace=True))
            self.mlp = nn.Sequential(nn.Linear(mid, 2 * mid), nn.Softplus(), nn.Linear(2 * mid, out))
        else:
            self.conv = nn.Conv2d(in_channels, out, 3, padding=1)

    def forward(self, bev: torch.Tensor) -> torch.Tensor:
        x = self.conv(bev).permute(0, 2, 3, 1)  # (B, C', X, Y) -> (B, X, Y, C')
        if self.use_mlp:
            x = self.mlp(x)  # (B, X, Y, C') -> (B, X, Y, Z*K), per BEV cell
        batch, num_x, num_y, _ = x.shape
        # C2H: (B, X, Y, Z*K) -> (B, X, Y, Z, K), channel z*K + c -> [..., z, c]
        return x.reshape(batch, num_x, num_y, self.num_z, self.num_classes)
