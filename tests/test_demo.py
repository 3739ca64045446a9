"""The demo's student stages on a tiny street world: a 2-step student, its `occdistill bench` profile,
and where that profile lands in the report. The whole job runs in tests/test_cli.py."""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

import pytest

from occdistill.config import save_config
from occdistill.data.synth import SynthResult, generate
from occdistill.deploy.bench import STAGES
from occdistill.engine.config import load_train_config
from occdistill.io import atomic_write_json
from occdistill.pipeline.demo import (
    BENCH_WARMUP,
    DemoConfig,
    StudentBench,
    StudentResult,
    _bench_student,
    _report_markdown,
    _train_student,
)

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
ITERS = 3


@pytest.fixture(scope="module")
def street(tmp_path_factory) -> SynthResult:
    return generate("street", tmp_path_factory.mktemp("street"), 2, 2, seed=2, overrides=SYNTH, progress=False)


@pytest.fixture(scope="module")
def trained(street, tmp_path_factory) -> tuple[DemoConfig, StudentResult, StudentBench]:
    """The demo's own train and bench stages, with a student config shrunk to the tiny world."""
    out = tmp_path_factory.mktemp("demo")
    student_yaml = save_config(load_train_config("street-tiny", TINY), out / "student.yaml")
    cfg = DemoConfig(student_config=str(student_yaml), train_steps=2, bench_iters=ITERS)
    student = _train_student(cfg, street, out)
    return cfg, student, _bench_student(student.run_dir, street, cfg.bench_iters)


def test_bench_measures_the_trained_student_engine_only_and_end_to_end(trained, street):
    _, student, bench = trained
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
    # End-to-end runs the same forward plus the data pipeline: medians of 3 rounds on a shared
    # machine, so it is compared with the fastest engine-only round.
    assert r.end_to_end_median_ms >= r.latency_min_ms
    assert r.gflops > 0 and r.peak_memory_mb is not None and r.params > 0
    assert 0 < bench.seconds < 60


def test_report_has_the_bench_table_after_the_student_and_in_json(trained, tmp_path):
    cfg, student, bench = trained
    readme = _report_markdown(cfg, [], student, bench, Path(student.run_dir).parent)
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
