"""OPUS losses: nearest neighbours vs brute force, the Chamfer/focal terms against a hand-written
reference, label assignment, empty frames, GT subsampling, and a short overfit on a synthetic room."""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

import occdistill.losses.sparse as sparse_losses
from occdistill.data.sample import Batch
from occdistill.models.sparse import (
    LayerOutput,
    OccClasses,
    SparseBackboneConfig,
    SparseGridConfig,
    SparseOccStudent,
    SparseOutput,
    tiny_sparse_config,
)
from occdistill.losses.sparse import SparseLossConfig, gt_points, nearest_neighbours, sparse_loss

GRID_CFG = SparseGridConfig(range=(-1.6, -1.6, 0.0, 1.6, 1.6, 1.6), voxel_size=(0.2, 0.2, 0.2))  # 16 x 16 x 8


@pytest.fixture(autouse=True)
def _one_thread():
    """Many small ops: on the shared 2-core machine, threading costs more than it gains."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)
CLASSES = OccClasses(num_classes=5, free_index=0)


def labels_batch(semantics: torch.Tensor) -> Batch:
    """A Batch carrying only what the loss reads (labels); the camera fields are placeholders."""
    b = semantics.shape[0]
    eye3 = torch.eye(3).expand(b, 1, 3, 3)
    return Batch(
        tokens=tuple(str(i) for i in range(b)), scene_names=("s",) * b, timestamps=torch.zeros(b, dtype=torch.long),
        frame_indices=torch.arange(b), camera_names=(("CAM",),) * b, images=torch.zeros(b, 1, 3, 4, 4),
        intrinsics=eye3, img_from_raw=eye3, keyego_from_cam=torch.eye(4).expand(b, 1, 4, 4), bda=torch.eye(4).expand(b, 4, 4),
        global_from_ego=torch.eye(4, dtype=torch.float64).expand(b, 4, 4), lidar_origin=torch.zeros(b, 3),
        semantics=semantics,
    )


def fake_output(points: torch.Tensor, logits: torch.Tensor, init_points: torch.Tensor | None = None) -> SparseOutput:
    """points (B, Q, R, 3), logits (B, Q, R, K_occ) as a one-layer output."""
    init = points[:, :, 0] if init_points is None else init_points
    layer = LayerOutput(points=points, logits=logits, centres=points.mean(2), features=torch.zeros(*points.shape[:2], 4))
    return SparseOutput(init_points=init, layers=[layer], image_features=[], extra={}, grid=GRID_CFG.voxel_grid(),
                        classes=CLASSES)


def random_semantics(batch: int, fraction: float, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    shape = GRID_CFG.voxel_grid().shape
    sem = torch.randint(1, 5, (batch, *shape), generator=gen)
    sem[torch.rand(batch, *shape, generator=gen) > fraction] = 0
    sem[torch.rand(batch, *shape, generator=gen) < 0.05] = 255  # unknown voxels are never GT points
    return sem


def test_nearest_neighbours_is_exact_and_chunked(monkeypatch):
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(300, 3, generator=gen), torch.randn(70, 3, generator=gen)
    brute = ((a[:, None] - b[None]) ** 2).sum(-1)
    monkeypatch.setattr(sparse_losses, "_CDIST_BUDGET", 500)  # several chunks of 7 rows
    idx, dist = nearest_neighbours(a, b)
    assert torch.equal(idx, brute.argmin(1))
    torch.testing.assert_close(dist, brute.min(1).values.sqrt())


def reference_loss(points, logits, sem, cfg: SparseLossConfig):
    """Brute-force OPUS/DiScene loss of one layer, written independently of the implementation."""
    grid = GRID_CFG.voxel_grid()
    voxel = 0.2
    gt_sum, pred_sum, cls_sum, n_gt, n_pred = 0.0, 0.0, 0.0, 0, 0

    def weight(dist, labels):
        w = torch.where(dist > cfg.empty_distance * voxel, cfg.empty_weight, 1.0)
        rare = torch.tensor([int(x) in cfg.rare_classes for x in labels])
        return torch.where(rare, w.clamp(min=cfg.rare_weight), w)

    def sl1(x, y):
        return F.smooth_l1_loss(x, y, beta=cfg.smooth_l1_beta * voxel, reduction="none").sum(-1)

    for b in range(sem.shape[0]):
        idx = ((sem[b] > 0) & (sem[b] < 5)).nonzero()
        g = grid.index_to_center(idx).float()
        lab = sem[b][idx[:, 0], idx[:, 1], idx[:, 2]]
        p, lg = points[b].reshape(-1, 3), logits[b].reshape(-1, 4)
        d = torch.cdist(g, p)  # (G, P)
        p_of_g, g_of_p = d.argmin(1), d.argmin(0)
        gt_sum = gt_sum + (sl1(p[p_of_g], g) * weight(d.min(1).values, lab)).sum()
        pred_w = weight(d.min(0).values, lab[g_of_p]) if cfg.weight_pred_side else torch.ones(p.shape[0])
        pred_sum = pred_sum + (sl1(p, g[g_of_p]) * pred_w).sum()
        onehot = F.one_hot(lab[g_of_p] - 1, 4).float()  # free = 0: labels 1..4 -> channels 0..3
        prob = lg.sigmoid()
        pt = torch.where(onehot > 0, prob, 1 - prob)
        at = torch.where(onehot > 0, cfg.focal_alpha, 1 - cfg.focal_alpha)
        radial = 1 + g[g_of_p][:, :2].norm(dim=-1) / (3.2**2 + 3.2**2) ** 0.5  # grid centred at x = y = 0
        cls_sum = cls_sum + (-at * (1 - pt) ** cfg.focal_gamma * torch.log(pt) * radial[:, None]).sum()
        n_gt, n_pred = n_gt + idx.shape[0], n_pred + p.shape[0]
    return gt_sum / n_gt + pred_sum / n_pred, cls_sum / n_pred


@pytest.mark.parametrize("pred_side", [True, False])
def test_terms_match_a_brute_force_reference(pred_side):
    sem = random_semantics(2, 0.05, seed=3)
    gen = torch.Generator().manual_seed(4)
    points = torch.rand(2, 6, 4, 3, generator=gen) * torch.tensor([3.2, 3.2, 1.6]) + torch.tensor([-1.6, -1.6, 0.0])
    logits = torch.randn(2, 6, 4, 4, generator=gen)
    cfg = SparseLossConfig(rare_classes=(3,), weight_pred_side=pred_side)
    terms = sparse_loss(fake_output(points, logits), labels_batch(sem), cfg)
    ref_pts, ref_cls = reference_loss(points, logits, sem, cfg)
    torch.testing.assert_close(terms["d0.pts"], ref_pts)
    torch.testing.assert_close(terms["d0.cls"], ref_cls)
    expected_total = cfg.points_weight * (terms["init.pts"] + terms["d0.pts"]) + cfg.cls_weight * terms["d0.cls"]
    torch.testing.assert_close(terms["total"], expected_total)


def test_points_on_gt_give_zero_point_loss_and_labels_follow_the_nearest_voxel():
    sem = random_semantics(1, 0.05, seed=5)
    grid = GRID_CFG.voxel_grid()
    gt = gt_points(sem[0], grid, CLASSES)
    assert int(((sem[0] > 0) & (sem[0] < 5)).sum()) == gt.points.shape[0]  # 0 and 255 are not GT
    # One query per GT voxel, R = 1, points exactly on the voxel centres, logits for their class.
    pts = gt.points[None, :, None]
    good = torch.full((1, pts.shape[1], 1, 4), -12.0)
    good[0, torch.arange(pts.shape[1]), 0, CLASSES.to_channels(gt.labels)] = 12.0
    terms = sparse_loss(fake_output(pts, good), labels_batch(sem), SparseLossConfig())
    assert float(terms["d0.pts"]) == 0.0 and float(terms["init.pts"]) == 0.0
    assert float(terms["d0.cls"]) < 1e-6
    # Points moved by a quarter voxel still take the label of the voxel they sit in.
    shifted = fake_output(pts + 0.05, good)
    assert float(sparse_loss(shifted, labels_batch(sem), SparseLossConfig())["d0.cls"]) < 1e-6
    wrong = good.roll(1, dims=-1)
    assert float(sparse_loss(fake_output(pts, wrong), labels_batch(sem), SparseLossConfig())["d0.cls"]) > 1.0


def test_gradient_pulls_points_towards_gt():
    sem = torch.zeros(1, *GRID_CFG.voxel_grid().shape, dtype=torch.long)
    sem[0, 8, 8, 4] = 2  # one GT voxel, centre (0.1, 0.1, 0.9)
    pts = torch.tensor([[[[0.6, 0.1, 0.9]]]], requires_grad=True)
    sparse_loss(fake_output(pts, torch.zeros(1, 1, 1, 4)), labels_batch(sem), SparseLossConfig())["total"].backward()
    assert float(pts.grad[0, 0, 0, 0]) > 0 and abs(float(pts.grad[0, 0, 0, 1])) < 1e-7


def test_frame_without_occupied_voxels():
    sem = random_semantics(2, 0.05, seed=6)
    sem[1][(sem[1] > 0) & (sem[1] < 5)] = 0
    pts = torch.zeros(2, 3, 2, 3, requires_grad=True)
    logits = torch.zeros(2, 3, 2, 4, requires_grad=True)
    terms = sparse_loss(fake_output(pts, logits), labels_batch(sem), SparseLossConfig())
    assert all(torch.isfinite(v) for v in terms.values())
    terms["total"].backward()
    # Frame 1: no point term; every class is a negative, so the gradient pushes all logits down.
    assert float(pts.grad[1].abs().sum()) == 0.0
    assert bool((logits.grad[1] > 0).all())
    all_empty = torch.zeros_like(sem)
    terms = sparse_loss(fake_output(pts, logits), labels_batch(all_empty), SparseLossConfig())
    assert float(terms["d0.pts"].detach()) == 0.0 and float(terms["d0.cls"].detach()) > 0


def test_gt_subsampling_is_capped_and_reproducible():
    sem = random_semantics(1, 0.3, seed=7)[0]
    grid = GRID_CFG.voxel_grid()
    a = gt_points(sem, grid, CLASSES, max_points=50, generator=torch.Generator().manual_seed(1))
    b = gt_points(sem, grid, CLASSES, max_points=50, generator=torch.Generator().manual_seed(1))
    c = gt_points(sem, grid, CLASSES, max_points=50, generator=torch.Generator().manual_seed(2))
    assert a.points.shape == (50, 3) and torch.equal(a.points, b.points) and not torch.equal(a.points, c.points)
    # Points and labels stay paired: each subsampled point lies in a voxel of its label.
    idx, inside = grid.point_to_index(a.points)
    assert bool(inside.all()) and torch.equal(sem[idx[:, 0], idx[:, 1], idx[:, 2]], a.labels)


def test_loss_input_checks():
    sem = random_semantics(1, 0.05, seed=8)
    out = fake_output(torch.zeros(1, 2, 1, 3), torch.zeros(1, 2, 1, 4))
    with pytest.raises(ValueError, match="grid"):
        sparse_loss(out, labels_batch(sem[:, :8]), SparseLossConfig())
    with pytest.raises(ValueError, match="mask_camera"):
        sparse_loss(out, labels_batch(sem), SparseLossConfig(camera_mask=True))
    with pytest.raises(ValueError, match="class_weights"):
        sparse_loss(out, labels_batch(sem), SparseLossConfig(class_weights=(1.0, 2.0)))


@pytest.fixture(scope="module")
def room_batch(tmp_path_factory):
    from occdistill.data.augment import ImageAugConfig
    from occdistill.data.occscannet import OccScanNetDataset
    from occdistill.data.sample import collate
    from occdistill.data.synth import generate

    root = tmp_path_factory.mktemp("sparse_room")
    generate("room", root, scenes=1, frames=1, seed=3, progress=False)
    ds = OccScanNetDataset(root, image_aug=ImageAugConfig(final_size=(48, 64), keep_aspect=False), load_depth=True)
    return collate([ds[0]])


def test_overfit_one_room_frame(room_batch):
    """A few steps on one synthetic room frame drive the OPUS loss down (points and classes)."""
    torch.manual_seed(0)
    cfg = tiny_sparse_config(
        image_size=(48, 64), backbone=SparseBackboneConfig(depth=18, base_width=8),
        neck_channels=32, embed_dims=32, num_queries=32, points_per_layer=(1, 4, 8), sampling_points=2,
        mixing_out_points=4, ffn_channels=64, dropout=0.0, depth_prior=True,
    )
    model = SparseOccStudent(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    b = room_batch
    history = []
    for _ in range(14):
        out = model(b.images, b.intrinsics, b.img_from_raw, b.ego_from_cam, prior_depth=b.depth)
        terms = sparse_loss(out, b, SparseLossConfig())
        opt.zero_grad()
        terms["total"].backward()
        opt.step()
        history.append({k: float(v.detach()) for k, v in terms.items()})
    first, last = history[0], history[-1]
    assert all(torch.isfinite(torch.tensor(list(h.values()))).all() for h in history)
    assert last["total"] < 0.75 * first["total"]
    assert last["d2.pts"] < 0.7 * first["d2.pts"] and last["d2.cls"] < first["d2.cls"]
    labels = model.eval().voxelize(model(b.images, b.intrinsics, b.img_from_raw, b.ego_from_cam, prior_depth=b.depth))
    assert labels.shape == b.semantics.shape
