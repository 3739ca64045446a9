"""The built-in sparse configs of the synthetic room world: ``room-sparse`` (the CPU student) and
``room-sparse-teacher`` load and build; the room and the street pair (``street-sparse`` /
``street-sparse-teacher``) pair under DiScene (teacher-guided initialisation copies every decoder
tensor); a student distils through the training engine from a teacher checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from occdistill.data.synth import generate
from occdistill.distill.discene import DiSceneDistiller
from occdistill.engine.config import builtin_configs, load_train_config
from occdistill.engine.history import read_records
from occdistill.engine.loop import train
from occdistill.losses.discene import teacher_guided_init
from occdistill.models.build import build_model
from occdistill.models.sparse import SparseOccStudent, tiny_sparse_config

# Decoder fields that must agree for teacher-guided initialisation to copy every tensor.
DECODER_FIELDS = ("image_size", "neck_channels", "embed_dims", "points_per_layer", "num_groups", "sampling_points",
                  "mixing_out_points", "num_heads", "ffn_channels", "offset_scale", "depth_prior", "grid",
                  "num_classes", "free_index")

# A small room world and models, for one training step each (the Occ-ScanNet grid stays: the
# engine's Occ-ScanNet reader reads 60x60x36 labels; the teacher keeps its deeper backbone and
# more queries).
SYNTH = ["camera.width=64", "camera.height=48", "split.val_scenes=1"]
SMALL = [
    "data.image_aug.final_size=[48,64]", "model.sparse.image_size=[48,64]", "model.sparse.backbone.base_width=8",
    "model.sparse.neck_channels=16", "model.sparse.embed_dims=16", "model.sparse.num_heads=2",
    "model.sparse.points_per_layer=[1,2]", "model.sparse.sampling_points=2", "model.sparse.mixing_out_points=4",
    "model.sparse.ffn_channels=32", "loss.sparse.max_gt_points=512",
    "optim.max_steps=1", "optim.warmup_steps=0", "data.batch_size=1", "data.workers=0", "runtime.threads=1",
    "runtime.progress=false", "runtime.log_every=1",
]


def test_both_room_configs_are_built_in():
    assert {"room-sparse", "room-sparse-teacher"} <= set(builtin_configs())


def test_configs_read_the_room_world_with_the_occscannet_grid_and_classes():
    for name in ("room-sparse", "room-sparse-teacher"):
        cfg = load_train_config(name)
        sparse = cfg.model.sparse
        assert cfg.model.kind == "sparse" and cfg.data.format == "occscannet", name
        assert tuple(cfg.data.image_aug.final_size) == tuple(sparse.image_size), name
        assert sparse.grid.voxel_grid().shape == (60, 60, 36) and (sparse.num_classes, sparse.free_index) == (12, 0)
        # the student stays near the CPU preset: same input size and backbone family
        assert tuple(sparse.image_size) == tiny_sparse_config().image_size, name


@pytest.mark.parametrize("student_name, teacher_name", [("room-sparse", "room-sparse-teacher"),
                                                        ("street-sparse", "street-sparse-teacher")])
def test_student_and_teacher_pair_under_discene(student_name, teacher_name):
    """Each world's built-in sparse student and teacher: same decoder (teacher-guided initialisation
    copies every tensor), the teacher deeper with more queries and over twice the parameters."""
    torch.manual_seed(0)
    student = build_model(load_train_config(student_name).model)
    teacher = build_model(load_train_config(teacher_name).model)
    s, t = student.cfg, teacher.cfg
    assert {f: getattr(s, f) for f in DECODER_FIELDS} == {f: getattr(t, f) for f in DECODER_FIELDS}
    assert t.backbone.depth > s.backbone.depth and t.backbone.base_width >= s.backbone.base_width
    assert t.num_queries > s.num_queries
    n_student = sum(p.numel() for p in student.parameters())
    n_teacher = sum(p.numel() for p in teacher.parameters())
    assert n_teacher > 2 * n_student
    DiSceneDistiller(student, teacher)  # raises on grid / classes / image size / layers / embed dims mismatch
    copy = SparseOccStudent(s)
    report = teacher_guided_init(copy, teacher)
    assert report.skipped == [] and len(report.copied) == len(copy.decoder.state_dict())


@pytest.fixture(scope="module")
def room(tmp_path_factory) -> Path:
    """2 rooms x 1 frame: one training frame, one validation frame."""
    return generate("room", tmp_path_factory.mktemp("room"), 2, 1, seed=5, overrides=SYNTH, progress=False).out


def test_student_distils_from_a_teacher_checkpoint_through_the_engine(room, tmp_path):
    data = [f"data.root={room}"]
    teacher_run = tmp_path / "teacher"
    train(load_train_config("room-sparse-teacher", [*data, *SMALL, "model.sparse.num_queries=12",
                                                    "data.val_split="]), teacher_run)
    cfg = load_train_config("room-sparse", [*data, *SMALL, "model.sparse.num_queries=6",
                                            f"distill.checkpoint={teacher_run}", "distill.teacher_guided_init=true",
                                            "distill.num_anchors=8"])
    w = cfg.distill.discene  # the paper's lambdas unless a config says otherwise
    assert (w.encoder, w.query, w.prior, w.anchor) == (1.0, 0.2, 0.2, 0.5)
    result = train(cfg, tmp_path / "student")
    assert result.step == 1 and result.bad_steps == 0
    terms = {k for r in read_records(tmp_path / "student" / "log.jsonl") if r["type"] == "train" for k in r}
    assert {"kd.encoder", "kd.query", "kd.prior", "kd.anchor", "kd.total", "d1.cls"} <= terms
    metrics = json.loads((tmp_path / "student" / "metrics.json").read_text())["metrics"]
    assert metrics["num_samples"] == 1 and metrics["format"] == "occscannet"
    assert 0.0 <= metrics["mIoU"] <= 100.0
