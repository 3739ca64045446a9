"""Probabilistic Gaussian superposition splatting against a brute-force float64 evaluation."""

from __future__ import annotations

import math

import pytest
import torch

from occdistill.geometry.grid import VoxelGrid
from occdistill.nn.gaussian_splat import (
    bev_collapse,
    free_last_to_table,
    quaternion_to_matrix,
    splat_gaussians,
    table_to_free_last,
)

GRID = VoxelGrid((-2.0, -2.0, -1.0, 2.0, 2.0, 1.0), (0.4, 0.4, 0.4))  # 10 x 10 x 5


def random_gaussians(batch=2, num=7, num_sem=4, dtype=torch.float64, seed=0, grid=GRID, scale=(0.1, 0.6)):
    gen = torch.Generator().manual_seed(seed)
    lo = torch.tensor(grid.range[:3], dtype=dtype)
    hi = torch.tensor(grid.range[3:], dtype=dtype)
    # means also a little outside the grid: their tails still count
    means = lo - 0.3 + torch.rand(batch, num, 3, generator=gen, dtype=dtype) * (hi - lo + 0.6)
    scales = scale[0] + torch.rand(batch, num, 3, generator=gen, dtype=dtype) * (scale[1] - scale[0])
    rots = torch.randn(batch, num, 4, generator=gen, dtype=dtype)
    opa = 0.05 + 0.9 * torch.rand(batch, num, generator=gen, dtype=dtype)
    sem = torch.randn(batch, num, num_sem, generator=gen, dtype=dtype).softmax(-1)
    return means, scales, rots, opa, sem


def brute_force(means, scales, rots, opa, sem, grid, opacity_in_geometry=True, density_normalised=False):
    """Every voxel against every Gaussian, float64, straight from the formulas."""
    centres = torch.as_tensor(grid.centers()).reshape(-1, 3)  # (V, 3)
    rot = quaternion_to_matrix(rots.double())
    out = []
    for b in range(means.shape[0]):
        d = centres[:, None, :] - means[b].double()[None]  # (V, G, 3)
        local = torch.einsum("vgi,gij->vgj", d, rot[b])  # R^T d: coordinates along the principal axes
        g = torch.exp(-0.5 * ((local / scales[b].double()) ** 2).sum(-1))  # (V, G)
        o = opa[b].double()
        alpha = o * g if opacity_in_geometry else g
        p_free = torch.prod(1 - alpha.clamp(max=1 - 1e-6), dim=1)
        w = o * g
        if density_normalised:
            w = w / scales[b].double().prod(-1)
        den = w.sum(1, keepdim=True)
        mix = torch.where(den > 1e-12, (w @ sem[b].double()) / den.clamp(min=1e-12),
                          torch.full((len(w), sem.shape[-1]), 1.0 / sem.shape[-1], dtype=torch.float64))
        probs = torch.cat([(1 - p_free)[:, None] * mix, p_free[:, None]], dim=1)
        out.append(probs.reshape(*grid.shape, -1))
    return torch.stack(out)


@pytest.mark.parametrize("opacity_in_geometry", [True, False])
@pytest.mark.parametrize("density_normalised", [False, True])
def test_matches_brute_force_when_the_cutoff_covers_everything(opacity_in_geometry, density_normalised):
    gauss = random_gaussians()
    ref = brute_force(*gauss, GRID, opacity_in_geometry, density_normalised)
    # cutoff 20 sigma puts every voxel in every Gaussian's box: the same sum, term by term
    out = splat_gaussians(*gauss, GRID, cutoff=20.0, chunk_size=97, opacity_in_geometry=opacity_in_geometry,
                          density_normalised=density_normalised)
    assert out.pairs == 2 * 7 * 500
    assert out.probs.shape == (2, 10, 10, 5, 5) and out.probs.dtype == torch.float64
    torch.testing.assert_close(out.probs, ref, atol=1e-12, rtol=0)
    torch.testing.assert_close(out.log_probs.exp(), ref, atol=1e-11, rtol=0)


@pytest.mark.parametrize("cutoff", [1.5, 2.0, 3.0])
def test_truncation_error_is_bounded(cutoff):
    gauss = random_gaussians(num=12, seed=1)
    means, scales, rots, opa, sem = gauss
    ref = brute_force(*gauss, GRID)
    out = splat_gaussians(*gauss, GRID, cutoff=cutoff)
    assert out.pairs < 2 * 12 * 500
    # every omitted term has g < exp(-cutoff^2 / 2); prod of factors in [0, 1] moves by at most the sum
    bound = (opa.sum(dim=1) * math.exp(-cutoff**2 / 2)).view(-1, 1, 1, 1)
    err = (out.probs[..., -1] - ref[..., -1]).abs()
    assert bool((err <= bound + 1e-12).all())
    assert err.max() > 0  # the test really truncates


def test_chunk_size_does_not_change_the_result():
    grid = VoxelGrid((-4.0, -4.0, -1.0, 4.0, 4.0, 2.2), (0.4, 0.4, 0.4))
    gauss = random_gaussians(batch=2, num=60, num_sem=5, dtype=torch.float32, seed=2, grid=grid)
    ref = splat_gaussians(*gauss, grid, chunk_size=1 << 30)
    for chunk in (1, 50, 1000, 7777):
        out = splat_gaussians(*gauss, grid, chunk_size=chunk)
        assert out.pairs == ref.pairs
        torch.testing.assert_close(out.probs, ref.probs, atol=2e-6, rtol=0)
        torch.testing.assert_close(out.log_probs, ref.log_probs, atol=2e-5, rtol=1e-5)


def test_probabilities_sum_to_one_and_unreached_voxels_are_free():
    gauss = random_gaussians(num=20, dtype=torch.float32, seed=3)
    means = gauss[0].clone()
    means[0, :, 0] = means[0, :, 0].clamp(max=0.0) - 1.5  # sample 0: nothing reaches x > 0.2 m
    out = splat_gaussians(means, *gauss[1:], GRID)
    p = out.probs
    assert bool(((p >= 0) & (p <= 1)).all())
    torch.testing.assert_close(p.sum(-1), torch.ones(p.shape[:-1]), atol=1e-6, rtol=0)
    torch.testing.assert_close(torch.logsumexp(out.log_probs, -1), torch.zeros(p.shape[:-1]), atol=1e-5, rtol=0)
    far = p[0, 7:]  # x centres >= 1 m, beyond every cut-off box
    assert torch.equal(far[..., -1], torch.ones_like(far[..., -1]))
    assert torch.equal(far[..., :-1], torch.zeros_like(far[..., :-1]))


def test_single_gaussian_profile():
    grid = VoxelGrid((-2.0, -0.2, -0.2, 2.0, 0.2, 0.2), (0.4, 0.4, 0.4))  # a row of 10 voxels along x
    s = 0.5
    means = torch.tensor([[[0.2, 0.0, 0.0]]], dtype=torch.float64)
    scales = torch.tensor([[[s, 0.1, 0.1]]], dtype=torch.float64)
    # a 90 degree turn about z puts the long axis along y; turn it back with the identity to compare
    rots = torch.tensor([[[1.0, 0.0, 0.0, 0.0]]], dtype=torch.float64)
    opa = torch.tensor([[0.8]], dtype=torch.float64)
    sem = torch.tensor([[[0.25, 0.75]]], dtype=torch.float64)
    out = splat_gaussians(means, scales, rots, opa, sem, grid, cutoff=10.0)
    x = torch.as_tensor(grid.centers()[:, 0, 0, 0])
    occ = 0.8 * torch.exp(-0.5 * (x - 0.2) ** 2 / s**2)
    torch.testing.assert_close(1 - out.probs[0, :, 0, 0, -1], occ)
    torch.testing.assert_close(out.probs[0, :, 0, 0, 1], 0.75 * occ)
    turned = torch.tensor([[[math.cos(math.pi / 4), 0.0, 0.0, math.sin(math.pi / 4)]]], dtype=torch.float64)
    across = splat_gaussians(means, scales, turned, opa, sem, grid, cutoff=10.0)
    # the long axis now points along y: along x the profile has the short scale 0.1
    torch.testing.assert_close(1 - across.probs[0, :, 0, 0, -1], 0.8 * torch.exp(-0.5 * (x - 0.2) ** 2 / 0.01))


@pytest.mark.parametrize("checkpoint", [False, True])
def test_gradcheck(checkpoint):
    grid = VoxelGrid((-0.8, -0.8, -0.4, 0.8, 0.8, 0.4), (0.4, 0.4, 0.4))  # 4 x 4 x 2
    gauss = random_gaussians(batch=1, num=3, num_sem=3, seed=4, grid=grid, scale=(0.2, 0.5))
    inputs = tuple(t.clone().requires_grad_() for t in gauss)

    def fn(*args):
        out = splat_gaussians(*args, grid, cutoff=20.0, chunk_size=40, checkpoint=checkpoint)
        return out.probs, out.log_probs

    assert torch.autograd.gradcheck(fn, inputs, fast_mode=True)


def test_checkpointed_gradients_equal_plain_ones():
    gauss = random_gaussians(num=15, dtype=torch.float32, seed=5)
    grads = []
    for ckpt in (False, True):
        inputs = [t.clone().requires_grad_() for t in gauss]
        out = splat_gaussians(*inputs, GRID, chunk_size=300, checkpoint=ckpt)
        (out.log_probs[..., 1].sum() + out.probs[..., -1].square().sum()).backward()
        grads.append([t.grad for t in inputs])
    for a, b in zip(*grads):
        assert a.abs().sum() > 0
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_quaternion_matrix_is_a_rotation():
    q = torch.randn(50, 4, dtype=torch.float64)
    r = quaternion_to_matrix(q)
    torch.testing.assert_close(r @ r.transpose(-1, -2), torch.eye(3, dtype=torch.float64).expand(50, 3, 3))
    torch.testing.assert_close(torch.linalg.det(r), torch.ones(50, dtype=torch.float64))
    torch.testing.assert_close(quaternion_to_matrix(torch.tensor([2.0, 0, 0, 0])), torch.eye(3))


def test_free_index_permutation():
    x = torch.arange(12.0).expand(2, 12)  # free-last layout: columns 0..10 classes, 11 free
    table = free_last_to_table(x, free_index=0)  # Occ-ScanNet: empty = 0
    assert table[0, 0] == 11 and torch.equal(table[0, 1:], torch.arange(11.0))
    assert torch.equal(table_to_free_last(table, 0), x)
    assert free_last_to_table(x, 11) is x and free_last_to_table(x, -1) is x
    mid = free_last_to_table(x, 5)
    assert mid[0, 5] == 11 and torch.equal(table_to_free_last(mid, 5), x)


def test_bev_collapse_is_top_down_compositing():
    gen = torch.Generator().manual_seed(6)
    probs = torch.rand(2, 3, 4, 5, 6, generator=gen, dtype=torch.float64)
    probs = probs / probs.sum(-1, keepdim=True)
    bev = bev_collapse(probs)
    assert bev.shape == (2, 3, 4, 6)
    torch.testing.assert_close(bev.sum(-1), torch.ones(2, 3, 4, dtype=torch.float64))
    # loop reference: w_z = a_z prod_{z' > z} (1 - a_z'), class k = sum_z w_z e_zk
    a = 1 - probs[..., -1]
    ref = torch.zeros_like(bev)
    for z in range(5):
        w = a[..., z] * torch.prod(1 - a[..., z + 1:], dim=-1)
        ref[..., :-1] += w[..., None] * probs[..., z, :-1] / a[..., z, None]
    ref[..., -1] = torch.prod(1 - a, dim=-1)
    torch.testing.assert_close(bev, ref)
    # one-hot volumes: the class of the top-most occupied voxel, free for an empty column
    labels = torch.randint(0, 6, (2, 3, 4, 5), generator=gen)
    labels[0, 0, 0] = 5
    hard = bev_collapse(torch.nn.functional.one_hot(labels, 6).double())
    occupied = labels != 5
    top = torch.where(occupied, torch.arange(5), -1).amax(-1)
    expect = torch.where(top >= 0, labels.gather(-1, top.clamp(min=0)[..., None])[..., 0], 5)
    assert torch.equal(hard.argmax(-1), expect) and hard[0, 0, 0, 5] == 1
    # free first (Occ-ScanNet layout)
    torch.testing.assert_close(bev_collapse(free_last_to_table(probs, 0), free_index=0), free_last_to_table(bev, 0))
