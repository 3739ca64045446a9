"""DiScene distillation: Hungarian optimum vs brute force, the anchor sampler on sparse frames,
the frozen eval-mode teacher, every term zero when the student is the teacher, the encoder
adapter, teacher-guided initialisation and level switches."""

from __future__ import annotations

import copy
import dataclasses
import itertools

import pytest
import torch

from occdistill.data.sample import Batch
from occdistill.distill.discene import DiSceneDistiller, DiSceneWeights
from occdistill.losses.discene import (
    anchor_class_weights,
    encoder_kd,
    hungarian_match,
    paired_kd,
    query_kd,
    sample_anchors,
    teacher_guided_init,
)
from occdistill.losses.sparse import SparseLossConfig, sparse_loss
from occdistill.models.sparse import (
    SparseBackboneConfig,
    SparseGridConfig,
    LayerOutput,
    OccClasses,
    SparseOccConfig,
    SparseOccStudent,
    sparse_teacher_config,
    tiny_sparse_config,
)

GRID = SparseGridConfig(range=(-1.6, -1.6, 0.0, 1.6, 1.6, 1.6), voxel_size=(0.2, 0.2, 0.2))  # 16 x 16 x 8
CLASSES = OccClasses(num_classes=5, free_index=0)


@pytest.fixture(autouse=True)
def _one_thread():
    """Many small ops: on the shared 2-core machine, threading costs more than it gains."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def micro(**overrides) -> SparseOccConfig:
    cfg = tiny_sparse_config(
        image_size=(48, 64), backbone=SparseBackboneConfig(depth=18, base_width=8),
        neck_channels=32, embed_dims=32, num_queries=12, points_per_layer=(1, 2, 4), sampling_points=2,
        mixing_out_points=4, num_heads=4, ffn_channels=64, grid=GRID, num_classes=5, free_index=0,
    )
    return dataclasses.replace(cfg, **overrides)


def make_batch(batch: int = 2, cams: int = 1, seed: int = 0) -> Batch:
    """Cameras 2.5 m from the grid centre looking at it (camera n = 1 from the other side) and
    random labels with a few unknown voxels."""
    gen = torch.Generator().manual_seed(seed)
    k = torch.tensor([[40.0, 0, 32.0], [0, 40.0, 24.0], [0, 0, 1]]).expand(batch, cams, 3, 3).clone()
    poses = []
    for n in range(cams):
        sign = 1.0 if n % 2 == 0 else -1.0
        pose = torch.eye(4)
        pose[:3, :3] = torch.stack([torch.tensor([0.0, -sign, 0.0]), torch.tensor([0.0, 0.0, -1.0]),
                                    torch.tensor([sign, 0.0, 0.0])], dim=1)
        pose[:3, 3] = torch.tensor([-2.5 * sign, 0.0, 0.8])
        poses.append(pose)
    shape = GRID.voxel_grid().shape
    sem = torch.randint(1, 5, (batch, *shape), generator=gen)
    sem[torch.rand(batch, *shape, generator=gen) > 0.08] = 0
    sem[torch.rand(batch, *shape, generator=gen) < 0.03] = 255
    return Batch(
        tokens=tuple(map(str, range(batch))), scene_names=("s",) * batch, timestamps=torch.zeros(batch, dtype=torch.long),
        frame_indices=torch.arange(batch), camera_names=(("CAM",) * cams,) * batch,
        images=torch.rand(batch, cams, 3, 48, 64, generator=gen), intrinsics=k,
        img_from_raw=torch.eye(3).expand(batch, cams, 3, 3).clone(),
        keyego_from_cam=torch.stack(poses).expand(batch, cams, 4, 4).clone(), bda=torch.eye(4).expand(batch, 4, 4).clone(),
        global_from_ego=torch.eye(4, dtype=torch.float64).expand(batch, 4, 4), lidar_origin=torch.zeros(batch, 3),
        semantics=sem, depth=torch.rand(batch, cams, 48, 64, generator=gen) * 4.0,
    )


# ---------------------------------------------------------------- Hungarian matching


@pytest.mark.parametrize("shape", [(1, 1), (2, 2), (4, 4), (6, 6), (3, 5), (5, 3), (2, 6)])
def test_hungarian_is_optimal_against_brute_force(shape):
    gen = torch.Generator().manual_seed(sum(shape))
    for _ in range(5):
        cost = torch.rand(*shape, generator=gen, dtype=torch.float64)
        rows, cols = hungarian_match(cost)
        n = min(shape)
        assert rows.numel() == cols.numel() == n
        assert len(set(rows.tolist())) == n and len(set(cols.tolist())) == n
        best = min(
            sum(float(cost[r, c]) for r, c in zip(rs, cs))
            for rs in itertools.combinations(range(shape[0]), n)
            for cs in itertools.permutations(range(shape[1]), n)
        )
        assert float(cost[rows, cols].sum()) == pytest.approx(best, abs=1e-9)


def _layer(centres: torch.Tensor, features: torch.Tensor) -> LayerOutput:
    return LayerOutput(points=centres[:, :, None], logits=torch.zeros(*centres.shape[:2], 1, 4), centres=centres,
                       features=features)


def test_query_kd_recovers_a_permutation_and_handles_unequal_query_counts():
    gen = torch.Generator().manual_seed(0)
    centres, feats = torch.rand(2, 6, 3, generator=gen), torch.randn(2, 6, 8, generator=gen)
    perm = torch.randperm(6, generator=gen)
    (c, f), = query_kd([_layer(centres, feats)], [_layer(centres[:, perm], feats[:, perm])])
    assert float(c) == 0.0 and float(f) == pytest.approx(0.0, abs=1e-12)
    # Student with 4 queries, teacher with 6 of which 4 coincide with the student's: zero.
    (c, f), = query_kd([_layer(centres[:, :4], feats[:, :4])], [_layer(centres[:, perm], feats[:, perm])])
    assert float(c) == 0.0 and float(f) == pytest.approx(0.0, abs=1e-12)
    # Index-wise pairs of a permuted teacher are not zero; valid masks drop pairs.
    (c, f), = paired_kd([_layer(centres, feats)], [_layer(centres[:, perm], feats[:, perm])])
    assert float(c) > 0
    valid = torch.zeros(2, 6, dtype=torch.bool)
    valid[:, perm == torch.arange(6)] = True
    (c, f), = paired_kd([_layer(centres, feats)], [_layer(centres[:, perm], feats[:, perm])], valid)
    assert float(c) == 0.0


# ---------------------------------------------------------------- anchors


def _occupied_frame(n: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    shape = GRID.voxel_grid().shape
    sem = torch.zeros(shape, dtype=torch.long)
    sem[torch.rand(shape, generator=gen) < 0.2] = 255  # unknown voxels are never anchors
    flat = torch.randperm(sem.numel(), generator=gen)[:n]
    sem.view(-1)[flat] = torch.randint(1, 5, (n,), generator=gen)
    return sem


def _check_consistent(anchors, sem):
    idx, inside = GRID.voxel_grid().point_to_index(anchors.points[anchors.valid])
    assert bool(inside.all())
    assert torch.equal(sem[idx[:, 0], idx[:, 1], idx[:, 2]], anchors.labels[anchors.valid])
    torch.testing.assert_close(GRID.voxel_grid().index_to_center(idx).float(), anchors.points[anchors.valid])


@pytest.mark.parametrize("occupied", [0, 1, 5, 40])
def test_anchor_sampler_on_sparse_frames(occupied):
    sem = _occupied_frame(occupied)
    anchors = sample_anchors(sem, GRID.voxel_grid(), 16, torch.Generator().manual_seed(0), classes=CLASSES)
    assert anchors.points.shape == (16, 3) and anchors.labels.shape == (16,) and anchors.valid.shape == (16,)
    assert torch.isfinite(anchors.points).all()
    if occupied == 0:
        assert not anchors.valid.any() and bool((anchors.labels == 0).all())
        return
    assert anchors.valid.all()
    _check_consistent(anchors, sem)
    idx, _ = GRID.voxel_grid().point_to_index(anchors.points)
    distinct = {tuple(i) for i in idx.tolist()}
    if occupied < 16:
        assert len(distinct) == occupied  # every occupied voxel drawn, the rest with replacement
    else:
        assert len(distinct) == 16  # without replacement


def test_anchor_sampler_rebalances_and_is_reproducible():
    shape = GRID.voxel_grid().shape
    sem = torch.zeros(shape, dtype=torch.long)
    sem[:, :, 0] = 2  # 256 floor voxels
    sem[3, 3, 3:7] = 4  # 4 rare voxels
    grid = GRID.voxel_grid()
    draws = {}
    for rebalance in (False, True):
        anchors = sample_anchors(sem, grid, 40, torch.Generator().manual_seed(1), rebalance, classes=CLASSES)
        _check_consistent(anchors, sem)
        draws[rebalance] = int((anchors.labels == 4).sum())
    assert draws[True] > draws[False]
    a = sample_anchors(sem, grid, 40, torch.Generator().manual_seed(5), classes=CLASSES)
    b = sample_anchors(sem, grid, 40, torch.Generator().manual_seed(5), classes=CLASSES)
    assert torch.equal(a.points, b.points) and torch.equal(a.labels, b.labels)
    # Explicit class weights (DiScene: 1/ln(count) - 0.05); a zero weight excludes a class.
    weights = torch.tensor([0.0, 1.0, 0.0, 1.0, 1.0])
    c = sample_anchors(sem, grid, 40, torch.Generator().manual_seed(5), classes=CLASSES, class_weights=weights)
    assert bool((c.labels == 4).all()) and c.valid.all()
    w = anchor_class_weights([0, 1e3, 1e6, 2.0])
    assert float(w[0]) == 0.0 and float(w[1]) == pytest.approx(1 / 6.907755 - 0.05, rel=1e-5)
    assert float(w[1]) > float(w[2]) > 0 and float(w[3]) > float(w[1])


# ---------------------------------------------------------------- distiller


def _pair(student_cfg: SparseOccConfig | None = None, teacher_cfg: SparseOccConfig | None = None, **kw):
    torch.manual_seed(0)
    student = SparseOccStudent(student_cfg or micro())
    teacher = SparseOccStudent(teacher_cfg or sparse_teacher_config(micro()))
    return DiSceneDistiller(student, teacher, **kw)


def test_teacher_gets_no_gradient_and_stays_in_eval_mode():
    distiller = _pair()
    batch = make_batch()
    distiller.train()
    assert distiller.student.training and not any(m.training for m in distiller.teacher.modules())
    distiller.teacher.train()  # even if someone flips it, forward puts it back
    seen = []
    hook = distiller.teacher.decoder[0].register_forward_pre_hook(
        lambda m, a: seen.append((m.training, torch.is_grad_enabled())))
    out = distiller(batch, generator=torch.Generator().manual_seed(0))
    hook.remove()
    assert seen and all(training is False and grad is False for training, grad in seen)
    loss = out.terms["total"] + sparse_loss(out.student, batch, SparseLossConfig())["total"]
    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in distiller.teacher.parameters())
    assert all(not t.requires_grad for layer in out.teacher.layers for t in (layer.points, layer.features))
    assert float(distiller.student.backbone.conv1.weight.grad.abs().sum()) > 0
    trainable = {id(p) for p in distiller.trainable_parameters()}
    assert not trainable & {id(p) for p in distiller.teacher.parameters()}
    assert {id(p) for p in distiller.student.parameters()} <= trainable


def test_every_term_is_zero_when_the_student_is_the_teacher():
    torch.manual_seed(0)
    student = SparseOccStudent(micro(depth_prior=True))
    distiller = DiSceneDistiller(student, copy.deepcopy(student))
    distiller.train()
    student.eval()  # same dropout / batch-norm behaviour as the teacher
    batch = make_batch(cams=2)
    out = distiller(batch, prior_depth=batch.depth, generator=torch.Generator().manual_seed(0))
    expected = {"encoder", "query", "prior", "anchor", "total"}
    expected |= {f"{lvl}.d{i}.{part}" for lvl in ("query", "prior", "anchor") for i in range(3)
                 for part in ("centre", "feature")}
    assert set(out.terms) == expected
    for name, value in out.terms.items():
        assert float(value.detach()) == 0.0, name
    assert set(out.student.extra) == {"prior", "anchor"} and set(out.teacher.extra) == {"anchor"}
    assert out.anchors.points.shape == (2, 12, 3) and bool(out.anchors.valid.all())


def test_terms_are_positive_and_weighted_for_different_models():
    weights = DiSceneWeights(encoder=1.0, query=0.2, prior=0.2, anchor=0.5, centre=3.0, feature=2.0)
    distiller = _pair(weights=weights, num_anchors=8)
    out = distiller(make_batch(), generator=torch.Generator().manual_seed(0))
    t = out.terms
    assert all(float(t[k].detach()) > 0 for k in ("encoder", "query", "prior", "anchor"))
    for level in ("query", "prior", "anchor"):
        manual = sum(3.0 * t[f"{level}.d{i}.centre"] + 2.0 * t[f"{level}.d{i}.feature"] for i in range(3))
        torch.testing.assert_close(t[level], manual)
    torch.testing.assert_close(t["total"], t["encoder"] + 0.2 * t["query"] + 0.2 * t["prior"] + 0.5 * t["anchor"])
    assert out.anchors.points.shape == (2, 8, 3)
    assert out.student.extra["prior"].init_points.shape == (2, 24, 3)  # the teacher's 24 initial points


def test_disabled_levels_add_no_decoder_pass():
    distiller = _pair(weights=DiSceneWeights(prior=0.0, anchor=0.0))
    out = distiller(make_batch(), generator=torch.Generator().manual_seed(0))
    assert out.student.extra == {} and out.teacher.extra == {} and out.anchors is None
    assert set(out.terms) == {"encoder", "query", "total"} | {f"query.d{i}.{p}" for i in range(3)
                                                               for p in ("centre", "feature")}


def test_encoder_adapter_when_neck_channels_differ():
    teacher_cfg = dataclasses.replace(sparse_teacher_config(micro()), neck_channels=48)
    distiller = _pair(teacher_cfg=teacher_cfg)
    assert all(isinstance(m, torch.nn.Conv2d) for m in distiller.adapter.levels)
    out = distiller(make_batch(), generator=torch.Generator().manual_seed(0))
    out.terms["encoder"].backward()
    assert all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in distiller.adapter.parameters())
    adapter_ids = {id(p) for p in distiller.adapter.parameters()}
    assert adapter_ids <= {id(p) for p in distiller.trainable_parameters()}
    assert not adapter_ids & {id(p) for p in distiller.student.parameters()}  # the student stays deployable
    # Same channels: identity adapter, and the encoder term equals the plain function.
    same = _pair()
    assert not list(same.adapter.parameters())
    feats = [torch.randn(1, 1, 32, 4, 4) for _ in range(4)]
    assert float(encoder_kd(feats, feats)) == 0.0


def test_mismatched_models_are_refused():
    with pytest.raises(ValueError, match="embed_dims"):
        _pair(teacher_cfg=micro(embed_dims=64, num_heads=4))
    with pytest.raises(ValueError, match="decoder layers"):
        _pair(teacher_cfg=micro(points_per_layer=(1, 2)))


def test_teacher_guided_init_copies_the_decoder():
    teacher = SparseOccStudent(sparse_teacher_config(micro()))
    student = SparseOccStudent(micro())
    report = teacher_guided_init(student, teacher)
    assert not report.skipped and len(report.copied) == len(student.decoder.state_dict())
    for name, value in student.decoder.state_dict().items():
        assert torch.equal(value, teacher.decoder.state_dict()[name])
    assert not torch.equal(student.init_points, teacher.init_points[:12])  # not part of the decoder
    # With the teacher's encoder and initial points as well, the two models agree exactly.
    twin = SparseOccStudent(dataclasses.replace(sparse_teacher_config(micro()))).eval()
    teacher_guided_init(twin, teacher)
    twin.backbone.load_state_dict(teacher.backbone.state_dict())
    twin.neck.load_state_dict(teacher.neck.state_dict())
    twin.init_points.data.copy_(teacher.init_points)
    batch = make_batch(batch=1)
    with torch.no_grad():
        a = twin(batch.images, batch.intrinsics, batch.img_from_raw, batch.ego_from_cam)
        b = teacher.eval()(batch.images, batch.intrinsics, batch.img_from_raw, batch.ego_from_cam)
    assert torch.equal(a.final.points, b.final.points)
    # A different last-layer point count: those head tensors are reported, not copied.
    other = SparseOccStudent(micro(points_per_layer=(1, 2, 8)))
    report = teacher_guided_init(other, teacher)
    skipped = {name for name, _ in report.skipped}
    assert skipped == {"2.cls_branch.6.weight", "2.cls_branch.6.bias", "2.reg_branch.4.weight", "2.reg_branch.4.bias"}
    assert "skipped 2.reg_branch.4.bias" in str(report)
