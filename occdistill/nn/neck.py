"""FPN-style image neck fusing several backbone levels into ONE output level (FlashOcc ``CustomFPN``).

FlashOcc feeds ResNet-50 C4 (1024 ch, stride 16) and C5 (2048 ch, stride 32) and keeps one
256-channel output at stride 16: 1x1 lateral convs, top-down nearest upsampling with addition,
then a 3x3 output conv. Like FlashOcc's config (no norm, no activation) the neck is linear; the
depth net after it starts with conv + BN + ReLU.

Shapes: B batch (cameras folded in), C channels; level i has (B, C_i, h_i, w_i), levels ordered
from fine to coarse (as the backbone returns them).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class FPNNeck(nn.Module):
    """Fuse levels ``out_index..L-1`` top-down into level ``out_index``.

    Args:
        in_channels: channels of every input level, fine to coarse.
        out_channels: C of the output.
        out_index: which input level's resolution the output has. Levels finer than it are not
            used (no lateral conv is built for them), so pass only the levels you need.

    Forward: list of L features -> (B, out_channels, h_out, w_out) at level ``out_index``.
    """

    def __init__(self, in_channels: Sequence[int], out_channels: int, out_index: int = 0):
        super().__init__()
        if not 0 <= out_index < len(in_channels):
            raise ValueError(f"out_index {out_index} is not one of the {len(in_channels)} input levels")
        self.num_levels = len(in_channels)
        self.out_index = out_index
        self.out_channels = out_channels
        self.lateral_convs = nn.ModuleList(nn.Conv2d(c, out_channels, 1) for c in in_channels[out_index:])
        self.output_conv = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                # FlashOcc initialises its FPN with Xavier-uniform (mmdet default for FPN).
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(feats) != self.num_levels:
            raise ValueError(f"FPNNeck expects {self.num_levels} levels, got {len(feats)}")
        used = feats[self.out_index:]
        x = self.lateral_convs[-1](used[-1])
        for feat, lateral in zip(reversed(used[:-1]), reversed(self.lateral_convs[:-1])):
            # Upsample to the exact size: odd sizes (e.g. 256x705 inputs) break a fixed factor 2.
            x = lateral(feat) + F.interpolate(x, size=feat.shape[-2:], mode="nearest")
        return self.output_conv(x)
