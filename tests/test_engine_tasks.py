"""Every model kind trains and evaluates through the one engine, and students train with a teacher:
offline from a dump or online from a checkpoint (dense: MFD/CWD; sparse: the four DiScene levels and
teacher-guided initialisation). The teacher never trains; bad pairings are config errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from occdistill.data.sample import collate
from occdistill.data.synth import generate
from occdistill.engine.checkpoint import load_checkpoint
from occdistill.engine.config import TrainConfig, load_train_config
from occdistill.engine.data import TrainItem, open_split
from occdistill.engine.history import read_records
from occdistill.engine.loop import train
from occdistill.engine.tasks import (
    DenseObjective,
    SparseObjective,
    build_objective,
    load_image_teacher,
    load_teacher,
    predict_labels,
    teacher_init,
)
from occdistill.errors import ConfigError, DataError
from occdistill.losses.discene import normalized_mse
from occdistill.models.build import build_model

SYNTH = [
    "rig.width=64", "rig.height=36", "rig.cameras=[CAM_FRONT,CAM_BACK]", "lidar.azimuths=256",
    "grid.range=[-9.6,-9.6,-1,9.6,9.6,5.4]", "grid.voxel_size=[0.8,0.8,0.8]",
]
GRID = ["grid.range=[-9.6,-9.6,-1,9.6,9.6,5.4]", "grid.voxel_size=[0.8,0.8,0.8]"]
COMMON = ["data.image_aug.final_size=[32,64]", "data.workers=0", "runtime.progress=false", "runtime.log_every=1",
          "runtime.eval_rayiou=false", "data.batch_size=1"]
DENSE = [
    "model.dense.image_size=[32,64]", "model.dense.backbone.base_width=8", "model.dense.neck_channels=16",
    "model.dense.depth_bins=[1.0,13.0,1.0]", "model.dense.context_channels=8", "model.dense.depth_net_channels=16",
    "model.dense.bev_channels=16", *(f"model.dense.{g}" for g in GRID),
]
GAUSSIAN = [
    "model.kind=gaussian", "model.gaussian.image_size=[32,64]", "model.gaussian.backbone.base_width=8",
    "model.gaussian.neck_channels=16", "model.gaussian.embed_dims=16", "model.gaussian.depth_bins=[1.0,13.0,1.0]",
    "model.gaussian.depth_net_channels=16", "model.gaussian.init_gaussians=96", "model.gaussian.learned_gaussians=32",
    "model.gaussian.num_blocks=2", "model.gaussian.num_heads=2", "model.gaussian.knn=8",
    "model.gaussian.scale_range=[0.2,1.6]", *(f"model.gaussian.{g}" for g in GRID),
]


def sparse(queries: int = 16, depth: int = 18) -> list[str]:
    return [
        "model.kind=sparse", "model.sparse.image_size=[32,64]", f"model.sparse.backbone.depth={depth}",
        "model.sparse.backbone.base_width=8", "model.sparse.neck_channels=16", "model.sparse.embed_dims=16",
        f"model.sparse.num_queries={queries}", "model.sparse.points_per_layer=[1,2]", "model.sparse.sampling_points=2",
        "model.sparse.mixing_out_points=4", "model.sparse.num_heads=2", "model.sparse.ffn_channels=32",
        "model.sparse.num_classes=18", "model.sparse.free_index=17", *(f"model.sparse.{g}" for g in GRID),
    ]


@pytest.fixture(scope="module")
def street(tmp_path_factory) -> Path:
    """2 scenes x 2 frames: 2 training frames, 2 validation frames."""
    return generate("street", tmp_path_factory.mktemp("street"), 2, 2, seed=3, overrides=SYNTH, progress=False).out


def config(root: Path, *overrides: str) -> TrainConfig:
    return load_train_config("street-tiny", [f"data.root={root}", *COMMON, *overrides])


def train_terms(run: Path) -> set[str]:
    return {k for r in read_records(run / "log.jsonl") if r["type"] == "train" for k in r}


@pytest.fixture(scope="module")
def dense_teacher(street, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("teacher") / "run"
    train(config(street, *DENSE, "optim.max_steps=1", "data.val_split="), run)
    return run


@pytest.fixture(scope="module")
def sparse_teacher(street, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("sparse_teacher") / "run"
    train(config(street, *sparse(queries=24, depth=34), "optim.max_steps=1", "data.val_split="), run)
    return run


def test_gaussian_kind_trains_and_evaluates(street, tmp_path):
    result = train(config(street, *GAUSSIAN, "optim.max_steps=2", "loss.depth_weight=0"), tmp_path / "g")
    assert {"ce", "lovasz", "init_depth", "loss"} <= train_terms(tmp_path / "g")
    assert result.metrics["num_samples"] == 2 and 0 <= result.metrics["mIoU"] <= 100


def test_sparse_kind_trains_and_evaluates_through_its_voxelisation(street, tmp_path):
    result = train(config(street, *sparse(), "optim.max_steps=2", "loss.depth_weight=0"), tmp_path / "s")
    assert {"init.pts", "d0.pts", "d1.cls", "loss"} <= train_terms(tmp_path / "s")
    assert result.metrics["num_samples"] == 2
    batch = collate([open_split(config(street, *sparse()).data, "val", augment=False)[0]])
    labels = predict_labels(result.model.eval(), TrainItem(batch))
    assert labels.dtype == torch.uint8 and tuple(labels.shape) == (1, 24, 24, 8)


def test_dense_student_distils_from_an_offline_dump(street, dense_teacher, tmp_path):
    dump = tmp_path / "dump"
    subprocess.run([sys.executable, "-m", "occdistill", "dump-teacher", "--checkpoint", str(dense_teacher),
                    "--split", "train", "--out", str(dump), "--workers", "0", "--no-progress", "--bev-feature"],
                   check=True, capture_output=True)
    # bev_prob: a 1x1 conv from the 16 student channels to the K = 18 classes; feature: the teacher
    # has 16 BEV channels too, so the adapter is the identity (no parameters).
    for target, shapes in (("bev_prob", {"mfd.proj.weight": (18, 16, 1, 1), "mfd.proj.bias": (18,)}), ("feature", {})):
        run = tmp_path / target
        train(config(street, *DENSE, "optim.max_steps=2", "data.val_split=", f"distill.dump={dump}",
                     f"distill.dense.mfd_target={target}", "distill.dense.lambda_kd=0.5"), run)
        assert {"ce", "depth", "mfd", "cwd", "kd"} <= train_terms(run), target
        adapters = load_checkpoint(run, with_state=True).state["adapters"]
        assert {k: tuple(v.shape) for k, v in adapters.items()} == shapes


def test_dense_student_distils_online_and_the_teacher_stays_frozen(street, dense_teacher, tmp_path):
    cfg = config(street, *DENSE, "optim.max_steps=2", "data.val_split=", f"distill.checkpoint={dense_teacher}",
                 "distill.dense.mfd_target=feature")
    train(cfg, tmp_path / "online")
    assert {"mfd", "cwd"} <= train_terms(tmp_path / "online")

    student = build_model(cfg.model)
    teacher = load_teacher(cfg.distill, student)
    objective = build_objective(student, cfg.loss, cfg.distill, open_split(cfg.data, "train", augment=False).classes,
                                amp="off", seed=0, teacher=teacher)
    assert isinstance(objective, DenseObjective)
    objective.train()
    assert not objective.teacher.training and not any(p.requires_grad for p in objective.teacher.parameters())
    assert all(p.requires_grad for p in objective.trainable_parameters())
    assert not {id(p) for p in objective.teacher.parameters()} & {id(p) for p in objective.trainable_parameters()}


def test_dense_student_distils_the_teachers_image_features(street, dense_teacher, tmp_path):
    """Image level alone (no dump, MFD/CWD off): the term is lambda * the mean over pixels of the
    channel-normalised squared difference of the neck features (equal widths: no adapter), and
    only the student learns from it."""
    overrides = [*DENSE, "optim.max_steps=2", "data.val_split=", f"distill.image_teacher={dense_teacher}",
                 "distill.dense.lambda_img=2.0", "distill.dense.lambda_feat=0", "distill.dense.lambda_logit=0"]
    train(config(street, *overrides), tmp_path / "img")
    terms = train_terms(tmp_path / "img")
    assert "img" in terms and not {"mfd", "cwd", "kd"} & terms

    cfg = config(street, *overrides)
    data = open_split(cfg.data, "train", augment=False)
    student = build_model(cfg.model)
    objective = build_objective(student, cfg.loss, cfg.distill, data.classes, amp="off", seed=0,
                                image_teacher=load_image_teacher(cfg.distill, student))
    objective.train()
    assert not objective.image_teacher.training
    assert not any(p.requires_grad for p in objective.image_teacher.parameters())
    assert not list(objective.adapters["img"].parameters())  # 16 -> 16 channels: identity
    item = TrainItem(collate([data[0]]))
    out = objective(item, 0)
    with torch.no_grad():
        s = student(item.batch.images, item.batch.intrinsics, item.batch.img_from_raw, item.batch.ego_from_cam)
        t = objective.image_teacher.image_features(item.batch.images)
    expected = 2.0 * normalized_mse(s.image_features, t, dim=2).mean()
    torch.testing.assert_close(out["img"], expected)
    out["img"].backward()
    assert student.backbone.conv1.weight.grad.abs().sum() > 0


def test_sparse_student_distils_at_every_discene_level_with_teacher_guided_init(street, sparse_teacher, tmp_path):
    overrides = [*sparse(), "optim.max_steps=2", "data.val_split=", f"distill.checkpoint={sparse_teacher}",
                 "distill.teacher_guided_init=true", "distill.num_anchors=8"]
    train(config(street, *overrides), tmp_path / "kd")
    assert {"kd.encoder", "kd.query", "kd.prior", "kd.anchor", "kd.total", "d1.cls"} <= train_terms(tmp_path / "kd")

    cfg = config(street, *overrides)
    student = build_model(cfg.model)
    objective = build_objective(student, cfg.loss, cfg.distill, open_split(cfg.data, "train", augment=False).classes,
                                amp="off", seed=0, teacher=load_teacher(cfg.distill, student))
    assert isinstance(objective, SparseObjective)
    assert "copied" in teacher_init(objective, cfg.distill)
    for name, value in student.decoder.state_dict().items():
        assert torch.equal(value, objective.distiller.teacher.decoder.state_dict()[name]), name


@pytest.mark.parametrize("overrides, message", [
    (["distill.dump=x", "distill.checkpoint=y"], "not both"),
    ([*sparse(), "distill.dump={dump}"], "offline teacher targets train dense students"),
    (["distill.checkpoint={sparse_teacher}"], "learns from a DenseStudent or GaussianTeacher"),
    (["distill.teacher_guided_init=true", "distill.checkpoint={dense_teacher}"], "teacher_guided_init needs a sparse"),
    (["distill.checkpoint={dense_teacher}", "distill.dense.lambda_img=1"],
     "lambda_img > 0 and distill.image_teacher go together"),
    (["distill.image_teacher={dense_teacher}"], "lambda_img > 0 and distill.image_teacher go together"),
    (["distill.image_teacher={dense_teacher}", "distill.dense.lambda_img=1"], "neither teacher targets"),
    (["distill.image_teacher={dense_teacher}", "distill.dense.lambda_img=1", "model.dense.backbone.out_indices=[2,3]"],
     "at stride 8, the student's at 16"),
])
def test_bad_teacher_pairings_are_config_errors(street, dense_teacher, sparse_teacher, tmp_path, overrides, message):
    paths = {"dump": tmp_path, "sparse_teacher": sparse_teacher, "dense_teacher": dense_teacher}
    overrides = [o.format(**paths) for o in overrides]
    with pytest.raises(ConfigError, match=message):
        train(config(street, *DENSE, "optim.max_steps=1", "data.val_split=", *overrides), tmp_path / "bad")


def test_temporal_dense_student_trains_on_earlier_keyframes_and_reports_flicker(street, tmp_path):
    result = train(config(street, *DENSE, "model.dense.temporal_frames=1", "optim.max_steps=2"), tmp_path / "t")
    assert {"ce", "depth"} <= train_terms(tmp_path / "t")
    report = result.metrics
    assert report["num_samples"] == 2 and report["flicker_pairs"] == 1  # 1 val scene of 2 frames
    assert 0 <= report["flicker"] <= 100
    with pytest.raises(ConfigError, match="temporal student"):
        train(config(street, *DENSE, "model.dense.temporal_frames=1", f"distill.dump={tmp_path}",
                     "optim.max_steps=1"), tmp_path / "t2")


def test_teacher_guided_init_alone_never_runs_the_teacher(street, sparse_teacher, tmp_path):
    weights = [f"distill.discene.{level}=0" for level in ("encoder", "query", "prior", "anchor")]
    cfg = config(street, *sparse(), "optim.max_steps=2", "data.val_split=", f"distill.checkpoint={sparse_teacher}",
                 "distill.teacher_guided_init=true", *weights)
    student = build_model(cfg.model)
    objective = build_objective(student, cfg.loss, cfg.distill, open_split(cfg.data, "train", augment=False).classes,
                                amp="off", seed=0, teacher=load_teacher(cfg.distill, student))
    calls = []
    objective.distiller.teacher.register_forward_hook(lambda *a: calls.append(1))
    terms = objective(TrainItem(collate([open_split(cfg.data, "train", augment=False)[0]])), step=0)
    assert not calls and not any(k.startswith("kd.") for k in terms)
    assert not any(p.requires_grad for p in objective.distiller.adapter.parameters())
    train(cfg, tmp_path / "tgi")  # and the loop trains it


def test_sparse_depth_prior_student_reads_the_datasets_depth_maps_in_training_and_evaluation(street, tmp_path):
    overrides = [*sparse(), "model.sparse.depth_prior=true", "optim.max_steps=2", "loss.depth_weight=0"]
    with pytest.raises(DataError, match="data.depth"):
        train(config(street, *overrides, "data.depth=none"), tmp_path / "no_depth")
    result = train(config(street, *overrides, "data.depth=rendered"), tmp_path / "prior")
    assert result.metrics["num_samples"] == 2
    val = open_split(config(street, *overrides, "data.depth=rendered").data, "val", augment=False, depth_input=True)
    assert val[0].depth is not None and float(val[0].depth.max()) > 0


def test_earlier_keyframes_carry_camera_inputs_only_with_the_samples_augmentation(street):
    from occdistill.engine.data import WithPreviousFrames

    cfg = config(street, *DENSE, "data.depth=rendered")
    frames = WithPreviousFrames(open_split(cfg.data, "train", augment=True, seed=0), 1)
    frames.set_epoch(3)
    item = frames[1]  # second frame of the first scene
    (prev,) = item.previous
    assert prev.frame_index == 0 and prev.scene_name == item.current.scene_name
    assert torch.equal(prev.bda, item.current.bda)
    assert prev.semantics is None and prev.depth is None and item.current.semantics is not None
    assert frames[0].previous[0].frame_index == 0  # scene start: the sample itself, inputs only
