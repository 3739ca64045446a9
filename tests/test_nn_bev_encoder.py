"""BEV encoder (CustomResNet + FPN_LSS) and the C2H occupancy head."""

from __future__ import annotations

import torch

from occdistill.nn.bev_encoder import BEVEncoder, BEVResNet
from occdistill.nn.occ_head import BEVOccHead


def test_bev_resnet_stage_shapes():
    net = BEVResNet(8, (16, 32, 64))
    feats = net(torch.randn(2, 8, 24, 16))
    assert [tuple(f.shape) for f in feats] == [(2, 16, 12, 8), (2, 32, 6, 4), (2, 64, 3, 2)]


def test_bev_encoder_returns_input_resolution():
    enc = BEVEncoder(8, 12)
    assert enc.backbone.out_channels == (16, 32, 64)  # FlashOcc default widths 2C, 4C, 8C
    for size in ((16, 16), (24, 40), (20, 20)):  # 20 -> 10 -> 5 -> 3: sizes, not fixed factors
        out = enc(torch.randn(2, 8, *size))
        assert out.shape == (2, 12, *size) and out.dtype == torch.float32


def test_flashocc_m0_encoder_parameter_count():
    # FlashOcc M0: CustomResNet(64, [128, 256, 512]) + FPN_LSS(640 -> 128). Count by hand:
    # stage i: block0 = conv3x3(c_in, c) + BN + conv3x3(c, c) + BN + shortcut conv3x3 with bias;
    # block1 = 2 x (conv3x3(c, c) + BN).
    def stage(c_in, c):
        return (9 * c_in * c + 2 * c) + (9 * c * c + 2 * c) + (9 * c_in * c + c) + 2 * (9 * c * c + 2 * c)
    backbone = stage(64, 128) + stage(128, 256) + stage(256, 512)
    neck = (9 * 640 * 256 + 2 * 256) + (9 * 256 * 256 + 2 * 256) + (9 * 256 * 128 + 2 * 128) + (128 * 128 + 128)
    enc = BEVEncoder(64, 128)
    assert sum(p.numel() for p in enc.backbone.parameters()) == backbone
    assert sum(p.numel() for p in enc.neck.parameters()) == neck


def test_channel_to_height_order_by_hand():
    num_z, num_classes = 3, 4
    head = BEVOccHead(5, num_z, num_classes, use_mlp=False)
    conv = head.conv
    torch.nn.init.zeros_(conv.weight)
    torch.nn.init.zeros_(conv.bias)
    z, c = 2, 1
    with torch.no_grad():
        conv.bias[z * num_classes + c] = 1.0  # the only non-zero output channel: k = z*K + c = 9
    logits = head(torch.randn(2, 5, 6, 7))
    assert logits.shape == (2, 6, 7, num_z, num_classes) and logits.dtype == torch.float32
    nonzero = logits.nonzero()
    assert set(nonzero[:, 3].tolist()) == {z} and set(nonzero[:, 4].tolist()) == {c}
    assert len(nonzero) == 2 * 6 * 7  # every BEV cell, only at [.., z, c]


def test_head_with_mlp_keeps_bev_axes():
    # A single BEV cell with a distinct input must change only that cell's logits (per-cell MLP
    # and a 3x3 conv: only its 3x3 neighbourhood), and the axes stay (B, X, Y, Z, K).
    torch.manual_seed(0)
    head = BEVOccHead(4, num_z=2, num_classes=3, mid_channels=6)
    assert head.mlp[0].in_features == 6 and head.mlp[0].out_features == 12 and head.mlp[2].out_features == 6
    bev = torch.zeros(1, 4, 8, 5)
    base = head(bev)
    bev[0, :, 6, 1] = 1.0
    diff = (head(bev) - base).abs().sum(dim=(3, 4))[0]  # (X, Y)
    changed = diff.nonzero().tolist()
    assert changed and all(abs(x - 6) <= 1 and abs(y - 1) <= 1 for x, y in changed)
    assert base.shape == (1, 8, 5, 2, 3)
