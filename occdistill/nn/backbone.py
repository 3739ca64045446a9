"""ResNet image backbones (BasicBlock / Bottleneck), our own implementation.

Module and parameter names follow torchvision's ResNet (``conv1``, ``bn1``, ``layer1``..``layer4``,
``downsample.0/1``), so a torchvision state dict (minus ``fc``) loads with ``strict=False`` and
the parameter counts match torchvision: resnet18 11.18M, resnet34 21.28M, resnet50 23.51M without
the classifier. Bottleneck puts the stride on the 3x3 conv (torchvision "v1.5", mmdet ``pytorch``
style), as FlashOcc's R50 does.

Stages: index 0..3 = ``layer1``..``layer4`` at strides 4, 8, 16, 32. Only stages up to
``max(out_indices)`` are built, so every parameter takes part in the forward.

Shapes: B batch (any leading batch, e.g. B*N cameras folded), C channels, H W image.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

_STAGE_BLOCKS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual: (B, C_in, H, W) -> (B, C_out, H/stride, W/stride).

    ``downsample`` maps the identity to the output shape when channels or stride change; the
    caller chooses it (torchvision: 1x1 conv + BN; FlashOcc's BEV encoder: a plain 3x3 conv).
    """

    expansion = 1

    def __init__(self, in_channels: int, channels: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = _conv3x3(in_channels, channels, stride)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = _conv3x3(channels, channels)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided), 1x1 expand by 4: (B, C_in, H, W) -> (B, 4*channels, H/s, W/s)."""

    expansion = 4

    def __init__(self, in_channels: int, channels: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        out_channels = channels * self.expansion
        self.conv1 = nn.Conv2d(in_channels, channels, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = _conv3x3(channels, channels, stride)
        self.bn2 = nn.BatchNorm2d(channels)
        self.conv3 = nn.Conv2d(channels, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """ResNet-18/34/50/101 feature extractor without the classifier.

    Args:
        depth: 18, 34 (BasicBlock) or 50, 101 (Bottleneck).
        out_indices: stages to return, 0..3 = strides 4, 8, 16, 32 (FlashOcc: (2, 3)).
        base_width: channels of the stem and of stage 0 (64 = standard; 16 or 32 give cheap
            "tiny" variants for CPU work; stage widths are base_width * (1, 2, 4, 8) * expansion).
        in_channels: image channels.
        frozen_stages: -1 trains everything; 0 freezes the stem; k >= 1 freezes the stem and
            stages 0..k-1 (parameters get ``requires_grad=False`` and their BatchNorms stay in eval
            mode, so nothing in them changes during training).
        frozen_bn: keep every BatchNorm in eval mode (running statistics frozen, as detection
            fine-tuning with small per-GPU batches does); affine parameters still train.
        with_checkpoint: recompute each residual block in the backward pass to save activation
            memory (FlashOcc trains its R50 with ``with_cp=True``).

    Forward: images (B, in_channels, H, W) -> list of features, one per ``out_indices`` entry in
    increasing order, ``(B, out_channels[i], H / strides[i], W / strides[i])``.
    """

    def __init__(
        self,
        depth: int = 50,
        out_indices: Sequence[int] = (2, 3),
        base_width: int = 64,
        in_channels: int = 3,
        frozen_stages: int = -1,
        frozen_bn: bool = False,
        with_checkpoint: bool = False,
    ):
        super().__init__()
        if depth not in _STAGE_BLOCKS:
            raise ValueError(f"ResNet depth must be one of {sorted(_STAGE_BLOCKS)}, got {depth}")
        indices = tuple(sorted(set(int(i) for i in out_indices)))
        if not indices or indices[0] < 0 or indices[-1] > 3:
            raise ValueError(f"out_indices must be a non-empty subset of 0..3, got {tuple(out_indices)}")
        if not -1 <= frozen_stages <= indices[-1] + 1:
            raise ValueError(f"frozen_stages must be in -1..{indices[-1] + 1}, got {frozen_stages}")
        self.out_indices = indices
        self.frozen_stages = frozen_stages
        self.frozen_bn = frozen_bn
        self.with_checkpoint = with_checkpoint
        block = BasicBlock if depth < 50 else Bottleneck

        self.conv1 = nn.Conv2d(in_channels, base_width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(base_width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)

        channels_in = base_width
        out_channels = []
        for stage, num_blocks in enumerate(_STAGE_BLOCKS[depth][: indices[-1] + 1]):
            width = base_width * 2**stage
            stride = 1 if stage == 0 else 2
            layer, channels_in = self._make_stage(block, channels_in, width, num_blocks, stride)
            self.add_module(f"layer{stage + 1}", layer)
            out_channels.append(channels_in)
        self.out_channels = tuple(out_channels[i] for i in indices)
        self.strides = tuple(4 * 2**i for i in indices)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for module in self._frozen_modules():
            for p in module.parameters():
                p.requires_grad_(False)
        self.train()  # puts frozen BatchNorms in eval mode from the start

    @staticmethod
    def _make_stage(
        block: type[BasicBlock] | type[Bottleneck], channels_in: int, width: int, num_blocks: int, stride: int
    ) -> tuple[nn.Sequential, int]:
        channels_out = width * block.expansion
        downsample = None
        if stride != 1 or channels_in != channels_out:
            downsample = nn.Sequential(
                nn.Conv2d(channels_in, channels_out, 1, stride=stride, bias=False), nn.BatchNorm2d(channels_out)
            )
        blocks = [block(channels_in, width, stride, downsample)]
        blocks += [block(channels_out, width) for _ in range(num_blocks - 1)]
        return nn.Sequential(*blocks), channels_out

    def _frozen_modules(self) -> list[nn.Module]:
        if self.frozen_stages < 0:
            return []
        stem = [self.conv1, self.bn1]
        return stem + [getattr(self, f"layer{i + 1}") for i in range(self.frozen_stages)]

    def train(self, mode: bool = True) -> "ResNet":
        super().train(mode)
        # BatchNorm running statistics of frozen parts must not drift in training mode.
        frozen = self.modules() if self.frozen_bn else (m for f in self._frozen_modules() for m in f.modules())
        for m in frozen:
            if isinstance(m, nn.BatchNorm2d):
                m.eval()
        return self

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(images))))
        outs = []
        for stage in range(self.out_indices[-1] + 1):
            for blk in getattr(self, f"layer{stage + 1}"):
                if self.with_checkpoint and self.training and torch.is_grad_enabled():
                    x = checkpoint(blk, x, use_reentrant=False)
                else:
                    x = blk(x)
            if stage in self.out_indices:
                outs.append(x)
        return outs
