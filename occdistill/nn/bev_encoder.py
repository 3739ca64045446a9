"""FlashOcc BEV encoder: residual 2D stages on the BEV (``CustomResNet``) + an LSS-FPN upsampling neck
(``FPN_LSS``) back to the input resolution.

FlashOcc M0/M1 (C = 64 LSS channels): 3 stages of 2 BasicBlocks, strides 2/2/2, channels
(128, 256, 512) -> features at 1/2, 1/4, 1/8 of the 200x200 BEV; the neck upsamples the 1/8 feature
to 1/2 (bilinear, align_corners=True), concatenates the 1/2 feature (512 + 128 = 640 ch), applies
two 3x3 conv-BN-ReLU to 2*C_out, upsamples x2 to full resolution, 3x3 conv-BN-ReLU to C_out and a
final 1x1 conv (with bias). C_out = 128 (M0) / 256 (M1).

Shapes: B batch, C channels, X Y BEV cells; tensors (B, C, X, Y).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from occdistill.nn.backbone import BasicBlock


class BEVResNet(nn.Module):
    """Residual BEV stages: (B, C_in, X, Y) -> one feature per stage, (B, channels[i], X/s_i, Y/s_i)
    with s_i the cumulative stride.

    The first block of each stage changes width/stride through a plain 3x3 conv shortcut (with
    bias, no norm), as FlashOcc's CustomResNet does.
    """

    def __init__(
        self,
        in_channels: int,
        channels: Sequence[int],
        num_blocks: Sequence[int] = (2, 2, 2),
        strides: Sequence[int] = (2, 2, 2),
    ):
        super().__init__()
        if not len(channels) == len(num_blocks) == len(strides):
            raise ValueError(f"channels {channels}, num_blocks {num_blocks} and strides {strides} differ in length")
        stages = []
        prev = in_channels
        for width, blocks, stride in zip(channels, num_blocks, strides):
            shortcut = nn.Conv2d(prev, width, 3, stride=stride, padding=1)
            layers = [BasicBlock(prev, width, stride, shortcut)]
            layers += [BasicBlock(width, width) for _ in range(blocks - 1)]
            stages.append(nn.Sequential(*layers))
            prev = width
        self.stages = nn.ModuleList(stages)
        self.out_channels = tuple(channels)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return feats


class FPNLSSNeck(nn.Module):
    """Fuse a fine and a coarse BEV feature and upsample to the output size.

    Forward: fine (B, C_fine, x, y), coarse (B, C_coarse, x', y'), out_size (X, Y) ->
    (B, out_channels, X, Y). The coarse feature is resized to the fine one's size and the result
    to ``out_size`` (sizes rather than fixed factors, so grids such as 200 -> 25 -> 100 -> 200 and
    non-power-of-two grids both work).
    """

    def __init__(self, fine_channels: int, coarse_channels: int, out_channels: int):
        super().__init__()
        mid = 2 * out_channels
        self.fuse = nn.Sequential(
            nn.Conv2d(fine_channels + coarse_channels, mid, 3, padding=1, bias=False),
            nn.BatchNorm2d(mid),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid, mid, 3, padding=1, bias=False),
            nn.BatchNorm2d(mid),
            nn.ReLU(inplace=True),
        )
        self.up_conv = nn.Sequential(
            nn.Conv2d(mid, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 1),
        )

    def forward(self, fine: torch.Tensor, coarse: torch.Tensor, out_size: tuple[int, int]) -> torch.Tensor:
        coarse = F.interpolate(coarse, size=fine.shape[-2:], mode="bilinear", align_corners=True)
        x = self.fuse(torch.cat([fine, coarse], dim=1))  # (B, C_fine + C_coarse, x, y) -> (B, 2*C_out, x, y)
        x = F.interpolate(x, size=tuple(out_size), mode="bilinear", align_corners=True)
        return self.up_conv(x)


class BEVEncoder(nn.Module):
    """:class:`BEVResNet` + :class:`FPNLSSNeck` on its first and last stage: (B, C_in, X, Y) -> (B, C_out, X, Y).

    Args:
        in_channels: C of the pooled BEV feature (FlashOcc: 64).
        out_channels: C of the output (FlashOcc M0: 128, M1: 256).
        stage_channels: widths of the residual stages (FlashOcc: 2C, 4C, 8C).
        num_blocks, strides: per stage (FlashOcc: (2, 2, 2), (2, 2, 2)).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stage_channels: Sequence[int] | None = None,
        num_blocks: Sequence[int] = (2, 2, 2),
        strides: Sequence[int] = (2, 2, 2),
    ):
        super().__init__()
        if stage_channels is None:
            stage_channels = [in_channels * 2 ** (i + 1) for i in range(len(num_blocks))]
        if len(stage_channels) < 2:
            raise ValueError("BEVEncoder needs at least two stages (a fine and a coarse one)")
        self.backbone = BEVResNet(in_channels, stage_channels, num_blocks, strides)
        self.neck = FPNLSSNeck(stage_channels[0], stage_channels[-1], out_channels)
        self.out_channels = out_channels

    def forward(self, bev: torch.Tensor) -> torch.Tensor:
        feats = self.backbone(bev)
        return self.neck(feats[0], feats[-1], bev.shape[-2:])
