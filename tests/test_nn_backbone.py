"""ResNet backbone: torchvision-equal parameter counts, multi-scale outputs, freezing, checkpointing."""

from __future__ import annotations

import pytest
import torch

from occdistill.nn.backbone import ResNet
from occdistill.nn.neck import FPNNeck


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("depth,expected", [(18, 11_176_512), (34, 21_284_672), (50, 23_508_032)])
def test_parameter_counts_match_torchvision_without_fc(depth, expected):
    # torchvision resnet18/34/50 = 11,689,512 / 21,797,672 / 25,557,032 including the 1000-way fc
    # (512*1000+1000 resp. 2048*1000+1000 parameters).
    assert count(ResNet(depth, out_indices=(0, 1, 2, 3))) == expected


def test_torchvision_parameter_names():
    names = {n for n, _ in ResNet(50, out_indices=(3,)).named_parameters()}
    assert {"conv1.weight", "bn1.weight", "layer1.0.downsample.0.weight", "layer4.2.conv3.weight",
            "layer4.2.bn3.bias"} <= names


@pytest.mark.parametrize("depth", [18, 50])
def test_multiscale_outputs(depth):
    net = ResNet(depth, out_indices=(1, 2, 3), base_width=16)
    x = torch.randn(2, 3, 64, 96)
    feats = net(x)
    expansion = 1 if depth == 18 else 4
    assert net.strides == (8, 16, 32)
    assert net.out_channels == (32 * expansion, 64 * expansion, 128 * expansion)
    for feat, c, s in zip(feats, net.out_channels, net.strides):
        assert feat.shape == (2, c, 64 // s, 96 // s) and feat.dtype == torch.float32


def test_only_needed_stages_are_built():
    net = ResNet(18, out_indices=(1,), base_width=16)
    assert not hasattr(net, "layer3") and not hasattr(net, "layer4")
    with pytest.raises(ValueError):
        ResNet(18, out_indices=(4,))


def test_frozen_stages_and_frozen_bn():
    torch.manual_seed(0)
    net = ResNet(18, out_indices=(2, 3), base_width=8, frozen_stages=2).train()
    frozen = [n for n, p in net.named_parameters() if not p.requires_grad]
    assert frozen and all(n.startswith(("conv1", "bn1", "layer1", "layer2")) for n in frozen)
    assert all(p.requires_grad for n, p in net.named_parameters() if n.startswith(("layer3", "layer4")))
    stem_stats = net.bn1.running_mean.clone()
    l3_stats = net.layer3[0].bn1.running_mean.clone()
    net(torch.randn(2, 3, 64, 64))
    assert torch.equal(net.bn1.running_mean, stem_stats)  # frozen part: statistics untouched
    assert not torch.equal(net.layer3[0].bn1.running_mean, l3_stats)  # trainable part: updated

    net = ResNet(18, out_indices=(3,), base_width=8, frozen_bn=True).train()
    before = net.layer4[1].bn2.running_var.clone()
    net(torch.randn(2, 3, 64, 64))
    assert torch.equal(net.layer4[1].bn2.running_var, before)
    assert all(p.requires_grad for p in net.parameters())


def test_checkpointing_gives_same_values_and_gradients():
    torch.manual_seed(0)
    plain = ResNet(18, out_indices=(2, 3), base_width=8)
    ckpt = ResNet(18, out_indices=(2, 3), base_width=8, with_checkpoint=True)
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 64, 64)
    a, b = plain(x), ckpt(x)
    sum(f.sum() for f in a).backward()
    sum(f.sum() for f in b).backward()
    for fa, fb in zip(a, b):
        torch.testing.assert_close(fa, fb)
    torch.testing.assert_close(plain.conv1.weight.grad, ckpt.conv1.weight.grad, rtol=1e-4, atol=1e-5)


def test_fpn_neck_fuses_to_one_level():
    neck = FPNNeck([32, 64], 16)
    out = neck([torch.randn(2, 32, 4, 11), torch.randn(2, 64, 2, 6)])  # odd sizes: 11 vs 2*6
    assert out.shape == (2, 16, 4, 11) and out.dtype == torch.float32
    neck = FPNNeck([8, 32, 64], 16, out_index=1)
    assert len(neck.lateral_convs) == 2  # the finest level is not used at all
    out = neck([torch.randn(1, 8, 8, 8), torch.randn(1, 32, 4, 4), torch.randn(1, 64, 2, 2)])
    assert out.shape == (1, 16, 4, 4)
    with pytest.raises(ValueError):
        FPNNeck([8], 4, out_index=1)
    with pytest.raises(ValueError):
        neck([torch.randn(1, 32, 4, 4)])
