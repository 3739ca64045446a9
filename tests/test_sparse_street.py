"""The sparse configs of the synthetic street world (``street-sparse``, ``street-sparse-teacher``):
they read the Occ3D-layout street at street-tiny's input size, train one step each on a tiny street
(the student distilling from the teacher's checkpoint), and the DiScene ablation benchmark runs end
to end in its street mode (Occ3D metrics with RayIoU). Their DiScene pairing is tested beside the
room pair's in tests/test_sparse_configs.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from occdistill.data.synth import generate
from occdistill.engine.config import builtin_configs, load_train_config
from occdistill.engine.history import read_records
from occdistill.engine.loop import train

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "benchmarks" / "bench_sparse_ablation.py"
# The tiny street of tests/test_engine_tasks.py (2 cameras at 64x36, 24x24x8 grid at 0.8 m) and
# micro models on it; the teacher keeps its deeper backbone and takes twice the queries.
SYNTH = ["rig.width=64", "rig.height=36", "rig.cameras=[CAM_FRONT,CAM_BACK]", "lidar.azimuths=256",
         "grid.range=[-9.6,-9.6,-1,9.6,9.6,5.4]", "grid.voxel_size=[0.8,0.8,0.8]"]
SMALL = [
    "data.image_aug.final_size=[32,64]", "model.sparse.image_size=[32,64]", "model.sparse.backbone.base_width=8",
    "model.sparse.neck_channels=16", "model.sparse.embed_dims=16", "model.sparse.num_heads=2",
    "model.sparse.points_per_layer=[1,2]", "model.sparse.sampling_points=2", "model.sparse.mixing_out_points=4",
    "model.sparse.ffn_channels=32", "model.sparse.grid.range=[-9.6,-9.6,-1,9.6,9.6,5.4]",
    "model.sparse.grid.voxel_size=[0.8,0.8,0.8]", "loss.sparse.max_gt_points=256", "optim.max_steps=1",
    "optim.warmup_steps=0", "data.batch_size=1", "data.workers=0", "runtime.threads=1", "runtime.progress=false",
    "runtime.log_every=1", "runtime.eval_rayiou=false",
]


def test_both_street_configs_are_built_in_and_read_the_street_world():
    assert {"street-sparse", "street-sparse-teacher"} <= set(builtin_configs())
    tiny = load_train_config("street-tiny")
    for name in ("street-sparse", "street-sparse-teacher"):
        cfg = load_train_config(name)
        sparse = cfg.model.sparse
        assert cfg.model.kind == "sparse" and cfg.data.format == "occ3d", name
        assert tuple(sparse.image_size) == tuple(cfg.data.image_aug.final_size) == (128, 224), name
        # the dense street student's grid and data pipeline: both kinds read the same frames
        assert sparse.grid.voxel_grid() == tiny.model.dense.grid.voxel_grid(), name
        assert sparse.grid.voxel_grid().shape == (100, 100, 16) and (sparse.num_classes, sparse.free_index) == (18, 17)
        assert cfg.data.image_aug == tiny.data.image_aug and cfg.data.bev_aug == tiny.data.bev_aug, name
        # Occ3D is scored inside mask_camera: the loss pairs GT inside it only (OPUS on Occ3D)
        assert cfg.loss.sparse.camera_mask, name


@pytest.fixture(scope="module")
def street(tmp_path_factory) -> Path:
    """2 scenes x 1 frame: one training frame, one validation frame."""
    return generate("street", tmp_path_factory.mktemp("street"), 2, 1, seed=3, overrides=SYNTH, progress=False).out


def test_street_teacher_and_distilled_student_train_one_step(street, tmp_path):
    data = [f"data.root={street}"]
    teacher_run = tmp_path / "teacher"
    result = train(load_train_config("street-sparse-teacher", [*data, *SMALL, "model.sparse.num_queries=16",
                                                               "data.val_split="]), teacher_run)
    assert result.step == 1 and result.bad_steps == 0
    cfg = load_train_config("street-sparse", [*data, *SMALL, "model.sparse.num_queries=8",
                                              f"distill.checkpoint={teacher_run}", "distill.teacher_guided_init=true"])
    result = train(cfg, tmp_path / "student")
    assert result.step == 1 and result.bad_steps == 0
    terms = {k for r in read_records(tmp_path / "student" / "log.jsonl") if r["type"] == "train" for k in r}
    assert {"kd.encoder", "kd.query", "kd.prior", "kd.anchor", "d1.cls"} <= terms
    metrics = json.loads((tmp_path / "student" / "metrics.json").read_text())["metrics"]
    assert metrics["format"] == "occ3d" and metrics["num_samples"] == 1 and 0.0 <= metrics["mIoU"] <= 100.0


def test_the_ablation_benchmark_runs_in_street_mode(tmp_path):
    """The street world, micro models, 2 steps, one seed and three variants, two trainings at once."""
    work = tmp_path / "bench"
    proc = subprocess.run([sys.executable, str(BENCH), "--world", "street", "--smoke", "--work", str(work),
                           "--seeds", "0", "--variants", "baseline", "query", "all_tgi", "--latency-runs", "1"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((work / "sparse_ablation.json").read_text())
    assert report["smoke"] and report["data"]["preset"] == "street" and report["machine"]["parallel_trainings"] == 2
    assert report["configs"]["student"]["model"]["sparse"]["num_classes"] == 18
    assert report["teacher"]["config"] == "street-sparse-teacher" and report["student"]["config"] == "street-sparse"
    assert "RayIoU" in report["protocol"] and report["teacher"]["metrics"]["RayIoU"] is not None
    seed = report["per_seed"]["0"]
    assert {"teacher_mIoU", "student_mIoU", "distilled_mIoU", "gap_closed"} <= set(seed)
    assert set(seed["variants"]) == {"baseline", "query", "all_tgi"}
    assert all(v["RayIoU"] is not None for v in seed["variants"].values())
    assert set(report["mean"]["variants"]["all_tgi"]) >= {"mIoU", "IoU", "RayIoU", "delta_mIoU_vs_baseline"}
    assert report["latency"]["student"]["forward_ms"]["median"] > 0 and report["latency"]["teacher"]["params_M"] > 0
    md = (work / "sparse_ablation.md").read_text()
    assert md.startswith("# DiScene ablation on the synthetic street world") and "RayIoU mean" in md
