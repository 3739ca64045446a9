"""The demo's stages on a tiny street world: a 2-step student, its `occdistill bench` profile, its
deployment (ONNX export and parity, INT8, engines side by side, costmap), the teacher and distillation
stage (3-step teacher, dump, check-dump, 2-step distilled student), and where they land in the report;
the sparse-query student's stage on a tiny room world. The whole job runs in tests/test_cli.py."""

from __future__ import annotations

import json
import math
import re
import shutil
from dataclasses import asdict, replace
from pathlib import Path

import pytest
from PIL import Image

from occdistill.config import save_config
from occdistill.data.synth import SynthResult, generate
from occdistill.deploy.bench import SPARSE_STAGES, STAGES
from occdistill.deploy.export import MIN_ARGMAX_AGREEMENT, read_metadata
from occdistill.config import load_config
from occdistill.data.build import open_dataset
from occdistill.engine.config import TrainConfig, load_train_config
from occdistill.engine.history import read_records
from occdistill.errors import OccDistillError
from occdistill.io import atomic_write_json
from occdistill.targets.check import check_dump
from occdistill.targets.manifest import VOXEL, Manifest
from occdistill.pipeline.demo import DemoConfig
from occdistill.pipeline.deployment import DEPLOY_THREADS, DeploySection, deploy_student
from occdistill.pipeline.distillation import (
    DISTILL_SETTINGS,
    DistillSection,
    dump_and_check,
    distillation_stage,
    gap_closed,
    teacher_checkpoint_sha256,
)
from occdistill.pipeline.report import DemoResults, report_markdown
from occdistill.pipeline.sparse import SparseSection, sparse_student
from occdistill.pipeline.student import BENCH_WARMUP, StudentBench, StudentResult, bench_student, train_student

SYNTH = [
    "rig.width=64", "rig.height=36", "rig.cameras=[CAM_FRONT,CAM_BACK]", "lidar.azimuths=256",
    "grid.range=[-9.6,-9.6,-1,9.6,9.6,5.4]", "grid.voxel_size=[0.8,0.8,0.8]",
]
TINY = [
    "data.image_aug.final_size=[32,64]", "model.dense.image_size=[32,64]",
    "model.dense.backbone.base_width=8", "model.dense.neck_channels=16", "model.dense.depth_bins=[1.0,13.0,1.0]",
    "model.dense.context_channels=8", "model.dense.depth_net_channels=16", "model.dense.bev_channels=16",
    "model.dense.grid.range=[-9.6,-9.6,-1,9.6,9.6,5.4]", "model.dense.grid.voxel_size=[0.8,0.8,0.8]",
    "data.workers=0", "runtime.progress=false",
]
# street-teacher shrunk to the tiny world, still larger than the tiny student (finer depth, more BEV channels).
TEACHER_TINY = [
    *(o for o in TINY if not o.startswith(("model.dense.depth_bins", "model.dense.bev_channels"))),
    "model.dense.depth_bins=[1.0,13.0,0.5]", "model.dense.bev_channels=24",
]
SPARSE_TINY = [
    "data.image_aug.final_size=[48,64]", "model.sparse.image_size=[48,64]", "model.sparse.backbone.base_width=8",
    "model.sparse.neck_channels=16", "model.sparse.embed_dims=16", "model.sparse.num_heads=2",
    "model.sparse.num_queries=16", "model.sparse.points_per_layer=[1,2]", "model.sparse.sampling_points=2",
    "model.sparse.mixing_out_points=4", "model.sparse.ffn_channels=32", "loss.sparse.max_gt_points=512",
    "optim.warmup_steps=0", "data.batch_size=1", "data.workers=0", "runtime.progress=false",
]
ITERS = 3


@pytest.fixture(scope="module")
def street(tmp_path_factory) -> SynthResult:
    return generate("street", tmp_path_factory.mktemp("street"), 2, 2, seed=2, overrides=SYNTH, progress=False)


@pytest.fixture(scope="module")
def trained(street, tmp_path_factory) -> tuple[StudentResult, StudentBench]:
    """The demo's own train and bench stages, with a student config shrunk to the tiny world."""
    out = tmp_path_factory.mktemp("demo")
    student_yaml = save_config(load_train_config("street-tiny", TINY), out / "student.yaml")
    student = train_student(str(student_yaml), street, out / "student", 2, seed=0)
    return student, bench_student(student.run_dir, street, ITERS)


@pytest.fixture(scope="module")
def deployed(trained) -> DeploySection:
    """The demo's deployment stages on the 2-step student (into the demo folder of ``trained``)."""
    student, _ = trained
    return deploy_student(student.run_dir, ITERS, False, Path(student.run_dir).parent)


def test_bench_measures_the_trained_student_engine_only_and_end_to_end(trained, street):
    student, bench = trained
    r = bench.result
    assert str(student.run_dir) in r.model and "step 2" in r.model
    assert (r.device, r.batch, r.cameras, r.image_size) == ("cpu", 1, 2, (32, 64))
    assert (r.repeats, r.warmup) == (ITERS, BENCH_WARMUP) and bench.infos == str(street.splits["val"])
    assert [p.path for p in r.paths] == ["train"]  # the demo skips the exportable path
    assert [s.name for s in r.stages] == list(STAGES)
    assert all(s.median_ms > 0 and s.p90_ms >= s.median_ms for s in r.stages)
    assert math.isclose(sum(s.share for s in r.stages), 1.0, abs_tol=1e-3)
    assert 0 < r.latency_median_ms <= r.latency_p90_ms and r.fps > 0
    assert 0 < r.data_pipeline_ms_per_sample < r.end_to_end_median_ms <= r.end_to_end_p90_ms
    # (End-to-end against engine-only is not asserted: 3 rounds on a shared machine flip them.)
    assert r.gflops > 0 and r.peak_memory_mb is not None and r.params > 0
    assert 0 < bench.seconds < 60


def test_report_has_the_bench_table_after_the_student_and_in_json(trained, tmp_path):
    student, bench = trained
    readme = report_markdown(DemoResults((), student, bench), Path(student.run_dir).parent, seed=0,
                             deploy_compile=False)
    student_at, bench_at = readme.index("## Dense student"), readme.index("## Latency profile of the student")
    assert student_at < bench_at < readme.index("Configuration: `config.yaml`")
    table = [line for line in readme[bench_at:].splitlines() if line.startswith("| ")][1:]  # after the header
    assert [row.split(" | ")[0][2:] for row in table] == [
        "data pipeline (per sample)", *STAGES, "**engine-only**", "**end-to-end**"]
    r = bench.result
    assert f"| **engine-only** | {r.latency_median_ms:.1f} | {r.latency_p90_ms:.1f} |" in readme
    assert f"{ITERS} rounds after {BENCH_WARMUP} warm-up rounds" in readme and "torch threads" in readme
    assert "load average" in readme and "batch 1 of 2 cameras at 32x64" in readme
    # run_demo writes asdict(bench) into report.json: it must survive the JSON round trip.
    saved = json.loads(atomic_write_json(tmp_path / "report.json", {"bench": asdict(bench)}).read_text())["bench"]
    assert saved["result"]["end_to_end_median_ms"] == r.end_to_end_median_ms
    assert [s["name"] for s in saved["result"]["stages"]] == list(STAGES)


def test_bench_iters_may_be_zero_but_not_negative():
    assert DemoConfig(bench_iters=0).bench_iters == 0
    with pytest.raises(ValueError, match="bench_iters must be >= 0"):
        DemoConfig(bench_iters=-1)


def test_deploy_config_switches_are_booleans():
    assert DemoConfig(deploy=False).deploy is False and DemoConfig().deploy_compile is False
    with pytest.raises(ValueError, match="deploy must be true or false"):
        DemoConfig(deploy="no")


def test_export_parity_on_the_val_scene_is_within_the_deployment_bounds(deployed):
    e = deployed.export
    meta = read_metadata(e.onnx)
    assert (meta["rig_hash"], meta["batch"], meta["input_format"]) == (e.rig_hash, 1, "uint8") and e.opset >= 17
    assert read_metadata(e.onnx_int8)["rig_hash"] == e.rig_hash and e.size_mb > 0 and e.int8_size_mb > 0
    # The baked rig is that of val frame 0; parity runs on the frames of its scene (the tiny val split: 2 frames).
    assert e.rig_frame == 0 and len(e.parity_frames) == 2 and e.parity.frames == 2
    assert 0 <= e.parity_max_shift_m <= e.rig_tolerance_m
    p = e.parity
    assert p.ok and p.argmax_agreement >= MIN_ARGMAX_AGREEMENT
    assert p.max_abs_logit_diff <= p.allowed_logit_diff and p.max_abs_logit > 0
    assert p.voxels == 2 * 24 * 24 * 8  # 2 frames of the 24x24x8 tiny grid
    # INT8 is reported, not bounded; calibrated on the training scene's frames.
    assert e.parity_int8.agreement_bound is None and 0 <= e.parity_int8.argmax_agreement <= 1
    assert e.calibration_frames and not set(e.calibration_frames) & set(e.parity_frames)


def test_side_by_side_has_eager_and_both_onnxruntime_rows(deployed):
    r = deployed.latency
    assert [v.name for v in r.variants] == [f"{e}@{DEPLOY_THREADS}" for e in ("eager", "ort-fp32", "ort-int8")]
    assert (r.batch, r.threads, r.repeats, r.warmup) == (1, DEPLOY_THREADS, ITERS, BENCH_WARMUP)
    assert r.rig_hash == deployed.export.rig_hash and r.end_to_end_source is not None
    for v in r.variants:
        assert v.ok, v.error
        assert 0 < v.engine_median_ms <= v.engine_p90_ms and 0 < v.end_to_end_median_ms <= v.end_to_end_p90_ms
    assert r.variant(f"ort-fp32@{DEPLOY_THREADS}").label_agreement_vs_eager >= MIN_ARGMAX_AGREEMENT


def test_costmap_pictures_and_map_server_files_of_student_and_gt(deployed):
    c = deployed.costmap
    assert c.token == deployed.export.parity_frames[0]  # the rig frame: its calibration is the baked one
    for files, cells in ((c.student_files, c.student_cells), (c.gt_files, c.gt_cells)):
        with Image.open(files["png"]) as img:
            img.verify()
            assert img.format == "PNG" and img.width >= 24
        assert all(Path(files[k]).is_file() for k in ("map_yaml", "map_pgm", "risk_yaml", "risk_pgm"))
        assert cells["occupied"] + cells["free"] + cells["unknown"] == 24 * 24
    assert c.gt_cells["unknown"] < 24 * 24 and 0 <= c.agreement <= 1


def test_report_renders_the_deployment_section_and_json(trained, deployed, tmp_path):
    student, bench = trained
    out = Path(student.run_dir).parent
    readme = report_markdown(DemoResults((), student, bench, deployed), out, seed=0, deploy_compile=False)
    at = readme.index("## Deployment of the student")
    assert readme.index("## Latency profile of the student") < at < readme.index("Configuration: `config.yaml`")
    section = readme[at:]
    p = deployed.export.parity
    assert f"| onnxruntime FP32 | {p.max_abs_logit_diff:.3g} |" in section and "| PASS |" in section
    assert f"{100 * p.argmax_agreement:.4f}%" in section and deployed.export.rig_hash in section
    for v in deployed.latency.variants:
        assert f"| {v.name} | {v.engine_median_ms:.1f} ({v.engine_p90_ms:.1f}) |" in section
    assert "| compile | not run" in section and f"{ITERS} interleaved rounds" in section and "load average" in section
    images = re.findall(r"!\[[^]]*\]\(([^)]+)\)", section)
    assert len(images) == 2 and all((out / rel).is_file() for rel in images)
    saved = json.loads(atomic_write_json(tmp_path / "report.json", {"deploy": asdict(deployed)}).read_text())["deploy"]
    assert saved["export"]["parity"]["argmax_agreement"] == p.argmax_agreement
    assert [v["name"] for v in saved["latency"]["variants"]] == [v.name for v in deployed.latency.variants]


@pytest.fixture(scope="module")
def sparse(tmp_path_factory) -> tuple[SparseSection, Path]:
    """The demo's sparse stage: a 2-step micro sparse student on a 2-room world (1 train, 1 val room)."""
    room = generate("room", tmp_path_factory.mktemp("room"), 2, 1, seed=5,
                    overrides=["camera.width=64", "camera.height=48"], progress=False)
    out = tmp_path_factory.mktemp("demo_sparse")
    sparse_yaml = save_config(load_train_config("room-sparse", SPARSE_TINY), out / "sparse.yaml")
    return sparse_student(str(sparse_yaml), room, out, steps=2, seed=0, bench_iters=ITERS), out


def test_sparse_stage_trains_evaluates_and_benchmarks_on_the_val_room(sparse):
    section, out = sparse
    s = section.student
    assert s.steps == 2 and Path(s.run_dir) == out / "sparse_student" and (s.train_samples, s.val_samples) == (1, 1)
    assert s.metrics["format"] == "occscannet" and s.metrics["num_samples"] == 1
    assert set(s.baselines) == {"all-free", "voxel-majority"}
    free = s.baselines["all-free"]
    assert free["mIoU"] == 0 and free["IoU"] == 0  # all empty: no true positive
    assert s.present_classes and set(s.present_classes) <= set(s.metrics["per_class"]) | {"empty"}
    r = section.bench.result
    assert [st.name for st in r.stages] == list(SPARSE_STAGES) and r.image_size == (48, 64)
    assert 0 < r.latency_median_ms <= r.latency_p90_ms and section.bench.infos.endswith("val_subscenes.txt")
    assert section.seconds >= s.train_seconds + section.bench.seconds - 1e-6


def test_report_renders_the_sparse_section_last_and_json_round_trips(sparse, tmp_path):
    section, out = sparse
    readme = report_markdown(DemoResults((), sparse=section), out, seed=0, deploy_compile=False)
    at = readme.index("## Sparse-query student on the room world")
    assert at < readme.index("Configuration: `config.yaml`")
    part = readme[at:]
    s = section.student
    assert f"| sparse student | {s.metrics['mIoU']:.2f} | {s.metrics['IoU']:.2f} |" in part
    assert "| all-free | 0.00 | 0.00 |" in part and "benchmarks/results/sparse_ablation.md" in part
    assert f"engine-only {section.bench.result.latency_median_ms:.1f}" in part
    for cls in s.present_classes:
        if cls in s.metrics["per_class"]:
            assert f"| {cls} | " in part
    images = re.findall(r"!\[[^]]*\]\(([^)]+)\)", part)
    assert len(images) == 1 and (out / images[0]).is_file()
    saved = json.loads(atomic_write_json(tmp_path / "report.json", {"sparse": asdict(section)}).read_text())["sparse"]
    student = {**saved["student"], "present_classes": tuple(saved["student"]["present_classes"])}
    back = SparseSection(StudentResult(**student), None, saved["seconds"])
    assert back.student == s and saved["bench"]["result"]["latency_median_ms"] == section.bench.result.latency_median_ms


def test_sparse_steps_need_a_val_room():
    assert DemoConfig().room_scenes >= 2 and DemoConfig(sparse_steps=0, room_scenes=1).sparse_steps == 0
    with pytest.raises(ValueError, match="sparse_steps must be >= 0"):
        DemoConfig(sparse_steps=-1)
    with pytest.raises(ValueError, match="needs room_scenes >= 2"):
        DemoConfig(room_scenes=1)


@pytest.fixture(scope="module")
def distilled(trained, street) -> DistillSection:
    """The demo's teacher and distillation stage beside the 2-step student: a 3-step tiny teacher."""
    student, _ = trained
    out = Path(student.run_dir).parent
    teacher_yaml = save_config(load_train_config("street-teacher", TEACHER_TINY), out / "teacher.yaml")
    return distillation_stage(street, out, student, teacher_config=str(teacher_yaml), teacher_steps=3, seed=0,
                              bench_iters=ITERS)


def test_distillation_stage_dumps_checks_and_trains_the_distilled_student(distilled, trained, street):
    student, _ = trained
    s, d = distilled, distilled.dump
    out = Path(student.run_dir).parent
    assert s.teacher.steps == 3 and s.distilled.steps == student.steps == 2 and s.distilled.config == student.config
    # The dump is named after the teacher's checkpoint and validates against the train split.
    sha = teacher_checkpoint_sha256(Path(s.teacher.run_dir))
    assert Path(d.dir) == out / "teacher_dump" / sha[:12] and d.teacher_checkpoint_sha256 == sha
    train_set = open_dataset("occ3d", street.out, str(street.splits["train"]))
    assert d.check_passed and d.samples == len(train_set) == 2 and check_dump(d.dir, train_set, "train") == []
    assert Manifest.load(d.dir, "train").teacher.name.startswith("dense step 3 (ema weights)")
    assert 0 < d.compact_bytes < d.seed_fp16_bytes and d.feature_bytes > 0
    assert d.compact_codec == Manifest.load(d.dir, "train").artefacts[VOXEL].encoding != "npz-fp16"
    # The distilled student read that dump with the ablation's MFD + CWD weights, and both terms were trained.
    cfg = load_config(TrainConfig, Path(s.distilled.run_dir) / "config.yaml")
    assert cfg.distill.dump == d.dir and cfg.distill.dump_source == "compact"
    assert (cfg.distill.dense.lambda_feat, cfg.distill.dense.lambda_logit) == (1.0, 1.0)
    assert s.distill_overrides == (f"distill.dump={d.dir}", *DISTILL_SETTINGS)
    last = [r for r in read_records(Path(s.distilled.run_dir) / "log.jsonl") if r["type"] == "train"][-1]
    assert last["mfd"] > 0 and last["cwd"] > 0
    # The table compares exactly these three runs.
    assert [r.name for r in s.rows] == ["teacher", "plain student", "distilled student"]
    teacher, plain, dist = s.rows
    assert plain.mIoU == student.metrics["mIoU"] and dist.mIoU == s.distilled.metrics["mIoU"]
    assert teacher.mIoU == s.teacher.metrics["mIoU"] and teacher.params > plain.params == dist.params
    assert all(0 < r.latency_median_ms <= r.latency_p90_ms for r in s.rows)
    assert s.latency.repeats == 2 and set(s.latency.models) == {r.name for r in s.rows}
    assert s.teacher_above_plain == (teacher.mIoU > plain.mIoU)
    assert s.gap_closed == gap_closed(teacher.mIoU, plain.mIoU, dist.mIoU)


def test_gap_closed_is_undefined_without_a_gap():
    assert gap_closed(10.0, 6.0, 8.0) == 0.5 and gap_closed(10.0, 6.0, 5.0) == -0.25
    assert gap_closed(6.0, 6.0, 7.0) is None and gap_closed(5.0, 6.0, 7.0) is None


def _table_row(readme: str, name: str) -> list[str]:
    return next(line for line in readme.splitlines() if line.startswith(f"| {name} | `")).split(" | ")


def test_report_has_the_teacher_plain_distilled_table_and_json(distilled, trained, tmp_path):
    student, bench = trained
    out = Path(student.run_dir).parent
    readme = report_markdown(DemoResults((), student, bench, None, distilled), out, seed=0, deploy_compile=False)
    at = readme.index("## Teacher and distilled student")
    assert readme.index("## Latency profile of the student") < at < readme.index("Configuration: `config.yaml`")
    section = readme[at:]
    for r in distilled.rows:
        cells = _table_row(section, r.name)
        assert cells[2:6] == [str(r.steps), f"{r.mIoU:.2f}", f"{r.IoU:.2f}", f"{r.RayIoU:.2f}"]
        assert cells[6] == f"{r.params / 1e6:.2f} M" and cells[7].startswith(f"{r.latency_median_ms:.1f} (")
    assert "**passed**" in section and f"{distilled.dump.samples} samples" in section
    ratio = distilled.dump.seed_fp16_bytes / distilled.dump.compact_bytes
    assert f"| compact `{distilled.dump.compact_codec}`: " in section and f"| 1/{ratio:.0f} |" in section
    assert "| dump-teacher (2 frames) |" in section
    assert "| **stage total** |" in section and "| check-dump |" in section
    absent = {c for c, v in student.baselines["all-free"]["per_class"].items() if v is None}
    assert absent and set(distilled.rows[0].per_class) > absent
    for cls in distilled.rows[0].per_class:  # per-class rows: the classes of the val GT only
        assert (f"| {cls} | " in section) == (cls not in absent), cls
    saved = json.loads(atomic_write_json(tmp_path / "report.json", {"distillation": asdict(distilled)}).read_text())
    back = saved["distillation"]
    assert [r["mIoU"] for r in back["rows"]] == [r.mIoU for r in distilled.rows]
    assert back["gap_closed"] == distilled.gap_closed and back["dump"]["check_passed"] is True
    assert back["rows"][0]["latency_median_ms"] == distilled.rows[0].latency_median_ms


def test_report_says_plainly_whether_the_teacher_leads(distilled, trained):
    student, _ = trained
    out = Path(student.run_dir).parent
    teacher, plain, dist = distilled.rows

    def render(t: float, d: float) -> str:
        rows = (replace(teacher, mIoU=t), replace(plain, mIoU=10.0), replace(dist, mIoU=d))
        section = replace(distilled, rows=rows, teacher_above_plain=t > 10.0, gap_closed=gap_closed(t, 10.0, d))
        return report_markdown(DemoResults((), student, None, None, section), out, seed=0, deploy_compile=False)

    leading = render(14.0, 11.0)
    assert "= **25%**" in leading and "not above" not in leading
    behind = render(9.0, 10.5)
    assert "**The teacher is not above the plain student on this val split** (9.00 vs 10.00 mIoU)" in behind
    assert "+0.50 mIoU" in behind and "Gap closed" not in behind


def test_a_dump_that_fails_check_dump_stops_the_demo(distilled, street, tmp_path):
    teacher_run = Path(distilled.teacher.run_dir)
    bad = tmp_path / "teacher_dump" / Path(distilled.dump.dir).name
    shutil.copytree(distilled.dump.dir, bad)
    entry = Manifest.load(bad, "train").samples[0]
    (bad / entry.files[VOXEL]).write_bytes(b"not a compact file")  # its marker still says done: no re-dump
    with pytest.raises(OccDistillError, match=rf"check-dump {bad}: 1 problem\(s\), e.g. {entry.key}"):
        dump_and_check(teacher_run, street, tmp_path / "teacher_dump")


def test_teacher_steps_may_be_zero_but_not_negative():
    assert DemoConfig().teacher_steps > 0 and DemoConfig(teacher_steps=0).teacher_steps == 0
    with pytest.raises(ValueError, match="teacher_steps must be >= 0"):
        DemoConfig(teacher_steps=-1)
