"""``occdistill bench``: the staged forward equals the model's, result sanity, rigs, memory, CLI."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

from occdistill.cli.main import main
from occdistill.config import to_dict
from occdistill.deploy.bench import (
    STAGES,
    StageClock,
    benchmark,
    dataset_inputs,
    interleaved_benchmark,
    load_bench_model,
    measure_peak_memory,
    open_bench_dataset,
    profiled_forward,
    synthetic_inputs,
)
from occdistill.deploy import bench as bench_module
from occdistill.deploy.rig import nuscenes_rig
from occdistill.models.dense import BackboneConfig, DenseStudent, DenseStudentConfig, GridConfig


def tiny_config() -> DenseStudentConfig:
    return DenseStudentConfig(
        image_size=(64, 96),
        backbone=BackboneConfig(depth=18, base_width=8),
        neck_channels=16,
        depth_bins=(1.0, 13.0, 1.0),
        context_channels=8,
        depth_net_channels=16,
        bev_channels=16,
        num_classes=5,
        grid=GridConfig(range=(-6.4, -6.4, -1.0, 6.4, 6.4, 2.2), voxel_size=(0.8, 0.8, 0.8)),
    )


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def model() -> DenseStudent:
    torch.manual_seed(0)
    return DenseStudent(tiny_config()).eval()


@pytest.fixture(scope="module")
def tiny_yaml(tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg") / "tiny.yaml"
    path.write_text(yaml.safe_dump(to_dict(tiny_config())))
    return path


@pytest.fixture(scope="module")
def street(tmp_path_factory):
    from occdistill.data.synth import generate

    return generate("street", tmp_path_factory.mktemp("street"), scenes=1, frames=2, seed=0, progress=False)


@pytest.mark.parametrize("ground", [False, True])
@pytest.mark.parametrize("fixed_rig", [False, True])
def test_profiled_forward_reproduces_forward_exactly(model, fixed_rig, ground):
    if ground:  # the ground-plane branch is part of the pooling stage
        torch.manual_seed(0)
        model = DenseStudent(dataclasses.replace(tiny_config(), ground_height=0.0)).eval()
    inputs = synthetic_inputs(model, batch=2)
    if fixed_rig:
        model.set_fixed_rig(inputs.intrinsics[0], inputs.img_from_raw[0], inputs.ego_from_cam[0])
    try:
        with torch.no_grad():
            ref = model(*inputs.args())
            clock = StageClock(torch.device("cpu"))
            staged = profiled_forward(model, *inputs.args(), clock=clock)
    finally:
        model.view_transform.clear_fixed_rig()
    for name in ("voxel_logits", "bev_feature", "depth", "image_features", "lifted_bev"):
        assert torch.equal(getattr(staged.output, name), getattr(ref, name)), name
    assert torch.equal(staged.labels, ref.voxel_logits.argmax(-1).to(torch.uint8))
    assert staged.labels.dtype == torch.uint8 and staged.labels.shape == ref.voxel_logits.shape[:-1]
    assert tuple(clock.seconds) == STAGES and all(t >= 0 for t in clock.seconds.values())


def test_profiled_forward_of_a_temporal_student_fuses_a_zero_history():
    torch.manual_seed(0)
    model = DenseStudent(dataclasses.replace(tiny_config(), temporal_frames=2)).eval()
    inputs = synthetic_inputs(model)
    with torch.no_grad():
        ref = model(*inputs.args())  # no history: zeros, as at a scene start
        staged = profiled_forward(model, *inputs.args())
        # the fusion changes the BEV: a staged forward that skipped it would differ
        assert not torch.equal(model.bev_encoder(ref.lifted_bev), ref.bev_feature)
    for name in ("voxel_logits", "bev_feature", "depth", "image_features", "lifted_bev"):
        assert torch.equal(getattr(staged.output, name), getattr(ref, name)), name
    result = benchmark(model, inputs, repeats=1, warmup=0, count_flops=False, measure_memory=False,
                       export_path=False)
    assert any(note.startswith("temporal student") for note in result.notes)


def test_benchmark_result_is_complete_and_sane(model):
    model.train()
    result = benchmark(model, synthetic_inputs(model, batch=1), repeats=3, warmup=0)
    assert model.training and model.view_transform.fixed_pool is None  # state restored
    d = json.loads(json.dumps(result.to_dict()))
    assert d["kind"] == "dense"
    for key in ("device", "dtype", "batch", "latency_median_ms", "latency_p90_ms", "fps", "peak_memory_mb", "flops",
                "params", "stages", "paths", "end_to_end_median_ms", "data_pipeline_ms_per_sample", "machine",
                "pooling_share", "export_over_train_latency", "export_over_train_pooling", "gmacs"):
        assert key in d, key
    assert [p["path"] for p in d["paths"]] == ["train", "export"]
    for path in d["paths"]:
        assert [s["name"] for s in path["stages"]] == list(STAGES)
        assert sum(s["share"] for s in path["stages"]) == pytest.approx(1.0, abs=2e-3)
        assert all(s["p90_ms"] >= s["median_ms"] >= s["min_ms"] >= 0 for s in path["stages"])
        assert path["latency_p90_ms"] >= path["latency_median_ms"] >= path["latency_min_ms"] > 0
        assert path["fps"] == pytest.approx(1e3 / path["latency_median_ms"], rel=1e-3, abs=0.01)
    assert d["stages"] == d["paths"][0]["stages"]
    assert d["params"] == sum(p.numel() for p in model.parameters())
    assert d["flops"] > 0 and d["gmacs"] == pytest.approx(d["flops"] / 2e9, abs=1e-3)
    # Every counted FLOP is attributed to a stage; the backbone convolutions count, the argmax does not.
    by_stage = {s["name"]: s["gflops"] for s in d["stages"]}
    assert sum(by_stage.values()) == pytest.approx(d["gflops"], abs=5e-3)
    assert by_stage["backbone"] > 0 and by_stage["argmax"] == 0
    assert d["peak_memory_mb"] is not None and d["peak_memory_mb"] >= 0
    assert d["end_to_end_median_ms"] is None and d["rig"].startswith(("real nuScenes", "synthetic"))
    assert d["machine"]["torch"] == torch.__version__


def test_benchmark_end_to_end_on_a_dataset(model, street):
    ds = open_bench_dataset("occ3d", street.out, street.splits["val"], model.cfg.image_size)
    inputs = dataset_inputs(ds, batch=1)
    assert tuple(inputs.images.shape[-2:]) == model.cfg.image_size
    result = benchmark(model, inputs, dataset=ds, repeats=2, warmup=0, count_flops=False, measure_memory=False)
    assert result.end_to_end_p90_ms >= result.end_to_end_median_ms >= result.end_to_end_min_ms > 0
    assert 0 < result.data_pipeline_ms_per_sample < result.end_to_end_median_ms
    assert 0 < result.data_share_of_end_to_end < 1 and result.flops is None


def test_nuscenes_rig_matches_flashocc_test_transform(tmp_path):
    real = nuscenes_rig((256, 704))
    # FlashOcc test time: resize 1600x900 by 0.44 to 704x396, keep the bottom 256 rows.
    expect = torch.tensor([[0.44, 0, 0], [0, 0.44, -140.0], [0, 0, 1]])
    torch.testing.assert_close(real.img_from_raw, expect.expand(6, 3, 3))
    synthetic = nuscenes_rig((256, 704), realdata_dir=tmp_path)
    assert synthetic.source.startswith("synthetic")
    for rig in (real, synthetic):
        assert rig.intrinsics.shape == (6, 3, 3) and rig.ego_from_cam.shape == (6, 4, 4)
        assert rig.intrinsics.dtype == torch.float32
        k, aug, pose = rig.batched(2)
        assert k.shape == (2, 6, 3, 3) and torch.equal(pose[1], rig.ego_from_cam)
        # the optical axes are horizontal-ish: camera z in ego has a small vertical component
        assert rig.ego_from_cam[:, 2, 2].abs().max() < 0.1


def test_peak_memory_sees_a_large_allocation():
    mb, kind = measure_peak_memory(lambda: torch.ones(64, 2**20), torch.device("cpu"))  # 256 MiB, touched
    assert kind and 200 < mb < 600


def test_load_bench_model_from_dense_yaml_and_training_config(tiny_yaml, tmp_path):
    loaded = load_bench_model(config=tiny_yaml, overrides=["bev_channels=8"])
    assert isinstance(loaded.model, DenseStudent) and loaded.model.cfg.bev_channels == 8
    assert "tiny.yaml" in loaded.name and loaded.data is None
    train_yaml = tmp_path / "train.yaml"
    train_yaml.write_text(yaml.safe_dump({"model": {"kind": "dense", "dense": to_dict(tiny_config())},
                                          "data": {"cameras": ["CAM_FRONT", "CAM_BACK"]}}))
    loaded = load_bench_model(config=train_yaml, overrides=["model.dense.num_classes=7"])
    assert isinstance(loaded.model, DenseStudent) and loaded.model.cfg.num_classes == 7
    assert loaded.name.startswith("dense") and loaded.data.cameras == ("CAM_FRONT", "CAM_BACK")
    builtin = load_bench_model(config="street-tiny")  # a built-in training config by name
    assert isinstance(builtin.model, DenseStudent) and builtin.name == "dense (street-tiny.yaml)"


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    from occdistill.engine.checkpoint import save_checkpoint
    from occdistill.engine.config import TrainConfig
    from occdistill.models.build import ModelConfig

    torch.manual_seed(3)
    model = DenseStudent(tiny_config())
    run = tmp_path_factory.mktemp("run")
    cfg = TrainConfig(model=ModelConfig(kind="dense", dense=tiny_config()))
    save_checkpoint(run / "checkpoints", 7, model=model, ema=None, config=cfg, state={})
    return run, model


def test_load_bench_model_from_a_checkpoint(tiny_checkpoint):
    run, trained = tiny_checkpoint
    loaded = load_bench_model(checkpoint=run)
    assert "step 7" in loaded.name and "model weights" in loaded.name  # no EMA in this checkpoint
    for (name, a), b in zip(trained.state_dict().items(), loaded.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_cli_benchmarks_a_checkpoint_on_a_dataset(tiny_checkpoint, street, tmp_path):
    run, _ = tiny_checkpoint
    out = tmp_path / "ckpt.json"
    rc = main(["bench", "--checkpoint", str(run), "--data", str(street.out), "--infos", str(street.splits["val"]),
               "--json", str(out), "--repeats", "1", "--warmup", "0", "--quiet", "--no-flops", "--no-memory"])
    report = json.loads(out.read_text())
    assert rc == 0 and report["end_to_end_median_ms"] > 0 and report["input_source"].startswith("dataset")


def test_cli_writes_json(tiny_yaml, tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = main(["bench", "--config", str(tiny_yaml), "--json", str(out), "--repeats", "1", "--warmup", "0",
               "--quiet", "--no-memory", "--no-flops", "--threads", "1"])
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["command"] == "bench" and report["model"] == "dense (tiny.yaml)"
    assert report["latency_median_ms"] > 0 and report["cameras"] == 6
    assert json.loads(capsys.readouterr().out.splitlines()[0])["params"] == report["params"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--config", "{tmp}/missing.yaml"], "missing.yaml: no such config file"),
        (["--config", "{cfg}", "--data", "{tmp}/nodata"], "nodata: data root not found"),
        (["--config", "{cfg}", "--data", "{tmp}", "--infos", "{tmp}/none.pkl"], "none.pkl: info file not found"),
        (["--config", "{cfg}", "bev_chanels=8"], "unknown config key 'bev_chanels'; did you mean 'bev_channels'?"),
        (["--config", "{cfg}", "--batch", "0"], "--batch must be >= 1"),
        (["--checkpoint", "{tmp}/norun"], "norun: checkpoint not found"),
    ],
)
def test_bad_input_is_one_line_with_status_2(tiny_yaml, tmp_path, capsys, args, message):
    argv = ["bench", *[a.format(tmp=tmp_path, cfg=tiny_yaml) for a in args]]
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines


def test_cli_exit_status_in_a_subprocess(tmp_path):
    res = subprocess.run([sys.executable, "-m", "occdistill", "bench", "--config", str(tmp_path / "nope.yaml")],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr


def test_shares_are_medians_over_repeats(model):
    result = benchmark(model, synthetic_inputs(model), repeats=3, warmup=0, count_flops=False, measure_memory=False,
                       export_path=False)
    assert [p.path for p in result.paths] == ["train"] and result.export_over_train_latency is None
    medians = np.array([s.median_ms for s in result.stages])
    np.testing.assert_allclose([s.share for s in result.stages], medians / medians.sum(), atol=1e-3)


def test_interleaved_benchmark_runs_two_passes_in_opposite_orders(model, monkeypatch):
    """A B C then C B A; each model's median/p90 = the mean of its two passes' (min = the smaller);
    FLOPs counted in the first pass only; mismatched inputs are refused."""
    calls = []
    real = bench_module.benchmark

    def recording(m, inputs, **kw):
        calls.append((kw["model_name"], kw["count_flops"], kw["repeats"]))
        return real(m, inputs, **kw)

    monkeypatch.setattr(bench_module, "benchmark", recording)
    inputs = synthetic_inputs(model, batch=1)
    names = ("a", "b", "c")
    timed = interleaved_benchmark({n: model for n in names}, {n: inputs for n in names}, rounds=2, warmup=0,
                                  count_flops=True)
    assert [c[0] for c in calls] == ["a", "b", "c", "c", "b", "a"]
    assert [c[1] for c in calls] == [True, True, True, False, False, False] and {c[2] for c in calls} == {2}
    for t in timed.values():
        first, second = t.passes
        assert first.flops is not None and second.flops is None
        assert t.median_ms == pytest.approx((first.latency_median_ms + second.latency_median_ms) / 2)
        assert t.p90_ms == pytest.approx((first.latency_p90_ms + second.latency_p90_ms) / 2)
        assert t.min_ms == min(first.latency_min_ms, second.latency_min_ms)
    with pytest.raises(ValueError, match="inputs for"):
        interleaved_benchmark({"a": model}, {"b": inputs}, rounds=1, warmup=0)
    with pytest.raises(ValueError, match="rounds"):
        interleaved_benchmark({"a": model}, {"a": inputs}, rounds=0, warmup=0)


# ---------------------------------------------------------------------------------------------
# side by side (the ONNX variants are tested in tests/test_export.py)


def test_parse_variant():
    from occdistill.deploy.bench import parse_variant
    from occdistill.errors import OccDistillError

    assert parse_variant("eager@1", 2) == ("eager", 1)
    assert parse_variant(" ort-int8 ", 2) == ("ort-int8", 2)
    for bad in ("eagre", "eager@0", "eager@x"):
        with pytest.raises(OccDistillError):
            parse_variant(bad, 2)


def test_side_by_side_engine_only_reports_missing_files(model):
    from occdistill.deploy.bench import format_side_by_side, side_by_side

    rig = nuscenes_rig(model.cfg.image_size)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:  # eager@1 runs last of the eager variants: without the restore, 1 thread would be left set
        result = side_by_side(model, rig, variants=["eager@2", "eager@1", "ort-fp32@1"], repeats=2, warmup=0,
                              threads=1, measure_memory=False)
        assert torch.get_num_threads() == 2  # the caller's thread setting is restored
    finally:
        torch.set_num_threads(before)
    rows = {v.name: v for v in result.variants}
    assert rows["eager@1"].ok and rows["eager@2"].ok and rows["eager@1"].end_to_end_median_ms is None
    assert not rows["ort-fp32@1"].ok and "no fp32 ONNX file" in rows["ort-fp32@1"].error
    assert result.baseline in ("eager@1", "eager@2") and result.variant(result.baseline).engine_speedup_vs_eager == 1.0
    assert result.matmul.gflops > 0 and result.flops > 0 and rows["eager@1"].roofline_engine > 0
    assert "FAILED" in format_side_by_side(result)
    assert model.view_transform.fixed_pool is None  # the model's pooling mode is restored
