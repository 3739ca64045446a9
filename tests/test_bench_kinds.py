"""``occdistill bench`` for the sparse student and the Gaussian teacher: the staged forward equals
``forward`` exactly, the benchmark's numbers are complete and consistent (stages of the kind,
engine-only and end-to-end), the CLI runs a sparse/gaussian training config and a sparse
checkpoint on Occ-ScanNet-layout (synthetic room) data, the sparse depth-prior model is profiled
with its prior depth map as an input (the dataset's depth maps or a synthetic map; the depth
branch is its own stage), and what bench cannot profile is a clear error. No assertion is on
speed: the machine is shared."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import yaml

from occdistill.cli.main import main
from occdistill.config import to_dict
from occdistill.data.synth import generate
from occdistill.deploy.bench import (
    KIND_STAGES,
    SPARSE_PRIOR_STAGES,
    StageClock,
    benchmark,
    count_stage_flops,
    dataset_inputs,
    format_table,
    model_kind,
    model_stages,
    occscannet_rig,
    open_bench_dataset,
    output_labels,
    profiled_forward,
    side_by_side,
    synthetic_inputs,
)
from occdistill.deploy.rig import nuscenes_rig
from occdistill.errors import OccDistillError
from occdistill.models.gaussian import GaussianTeacher, GaussianTeacherConfig, TeacherBackboneConfig, TeacherGridConfig
from occdistill.models.sparse import SparseBackboneConfig, SparseGridConfig, SparseOccStudent, tiny_sparse_config

# The tiny street of tests/test_engine_tasks.py: 2 cameras at 64x36, a 24 x 24 x 8 grid at 0.8 m.
STREET = [
    "rig.width=64", "rig.height=36", "rig.cameras=[CAM_FRONT,CAM_BACK]", "lidar.azimuths=256",
    "grid.range=[-9.6,-9.6,-1,9.6,9.6,5.4]", "grid.voxel_size=[0.8,0.8,0.8]",
]
STREET_RANGE = (-9.6, -9.6, -1.0, 9.6, 9.6, 5.4)
ROOM = ["camera.width=64", "camera.height=48"]  # the Occ-ScanNet 60 x 60 x 36 grid, small images


def sparse_config(**overrides):
    """A micro sparse student on the street grid (Occ3D table: 18 classes, free 17)."""
    cfg = tiny_sparse_config(
        image_size=(32, 64), backbone=SparseBackboneConfig(depth=18, base_width=8), neck_channels=16,
        embed_dims=16, num_queries=16, points_per_layer=(1, 2), sampling_points=2, mixing_out_points=4,
        num_heads=2, ffn_channels=32, num_classes=18, free_index=17,
        grid=SparseGridConfig(range=STREET_RANGE, voxel_size=(0.8, 0.8, 0.8)),
    )
    return dataclasses.replace(cfg, **overrides)


def gaussian_config() -> GaussianTeacherConfig:
    """A micro Gaussian teacher on the street grid (Occ3D table, free last)."""
    return GaussianTeacherConfig(
        image_size=(32, 64), backbone=TeacherBackboneConfig(base_width=8), neck_channels=16, embed_dims=16,
        depth_bins=(1.0, 13.0, 1.0), depth_net_channels=16, init_gaussians=96, learned_gaussians=32, num_blocks=2,
        num_heads=2, knn=8, scale_range=(0.2, 1.6), grid=TeacherGridConfig(range=STREET_RANGE,
                                                                          voxel_size=(0.8, 0.8, 0.8)),
    )


def build(kind: str) -> torch.nn.Module:
    """A random model whose labels are not all free (else comparing labels would prove little):
    the sparse student's last layer starts at class probability 0.5 instead of the focal prior 0.01
    and keeps points up to OPUS's 3 m from their query centre; the teacher's last refinement makes
    large opaque Gaussians. ``prior``: the sparse student with the depth-prior branch."""
    torch.manual_seed(0)
    if kind in ("sparse", "prior"):
        model = SparseOccStudent(sparse_config(score_threshold=0.3, centre_distance_threshold=3.0,
                                               depth_prior=kind == "prior")).eval()
        with torch.no_grad():
            model.decoder[-1].cls_branch[-1].bias.zero_()
        return model
    model = GaussianTeacher(gaussian_config()).eval()
    with torch.no_grad():  # refine output: delta 0:3, scale 3:6, rotation 6:10, opacity 10, semantics 11:
        model.blocks[-1].refine.mlp[-1].bias[3:6] = 2.0
        model.blocks[-1].refine.mlp[-1].bias[10] = 4.0
    return model


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def models() -> dict[str, torch.nn.Module]:
    return {kind: build(kind) for kind in ("sparse", "gaussian", "prior")}


@pytest.fixture(scope="module")
def street(tmp_path_factory):
    return generate("street", tmp_path_factory.mktemp("street"), 1, 2, seed=3, overrides=STREET, progress=False)


@pytest.fixture(scope="module")
def room(tmp_path_factory):
    return generate("room", tmp_path_factory.mktemp("room"), 1, 2, seed=0, overrides=ROOM, progress=False)


def assert_same(a, b, where: str = "output") -> None:
    """Exact equality of two model outputs, field by field (tensors, lists, nested dataclasses)."""
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif dataclasses.is_dataclass(a):
        for f in dataclasses.fields(a):
            assert_same(getattr(a, f.name), getattr(b, f.name), f"{where}.{f.name}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same(a[k], b[k], f"{where}[{k}]")
    else:
        assert a == b, where


@pytest.mark.parametrize("kind", ["sparse", "gaussian"])
def test_staged_forward_equals_forward_exactly(models, kind):
    model = models[kind]
    inputs = synthetic_inputs(model, batch=2)
    with torch.no_grad():
        ref = model(*inputs.args())
        clock = StageClock(torch.device("cpu"))
        staged = profiled_forward(model, *inputs.args(), clock=clock)
    assert type(staged.output) is type(ref)
    assert_same(staged.output, ref)
    labels = output_labels(model, ref)
    assert torch.equal(staged.labels, labels) and staged.labels.dtype == torch.uint8
    assert staged.labels.shape == (2, *model.grid.shape) and len(labels.unique()) > 2
    if kind == "gaussian":  # the teacher's labels are the argmax of its voxel logits
        assert torch.equal(labels, ref.voxel_logits.argmax(-1).to(torch.uint8))
    else:  # the sparse student's are its voxelisation
        assert torch.equal(labels, model.voxelize(ref).to(torch.uint8))
    assert tuple(clock.seconds) == KIND_STAGES[kind] and all(t >= 0 for t in clock.seconds.values())


@pytest.mark.parametrize("kind", ["sparse", "gaussian"])
def test_benchmark_engine_only_and_end_to_end(models, street, kind):
    model = models[kind]
    model.train()
    ds = open_bench_dataset("occ3d", street.out, street.splits["val"], model.cfg.image_size)
    result = benchmark(model, dataset_inputs(ds), dataset=ds, model_name=kind, repeats=2, warmup=1)
    assert model.training  # mode restored
    d = json.loads(json.dumps(result.to_dict()))
    assert d["kind"] == kind and d["cameras"] == 2 and d["input_source"].startswith("dataset")
    assert [p["path"] for p in d["paths"]] == ["forward"] and d["pooling_share"] is None
    assert d["export_over_train_latency"] is None and d["export_plan_ms"] is None
    assert [s["name"] for s in d["stages"]] == list(KIND_STAGES[kind])
    assert all(s["p90_ms"] >= s["median_ms"] >= s["min_ms"] >= 0 for s in d["stages"])
    assert sum(s["share"] for s in d["stages"]) == pytest.approx(1.0, abs=2e-3)
    assert d["latency_p90_ms"] >= d["latency_median_ms"] >= d["latency_min_ms"] > 0 and d["fps"] > 0
    assert d["end_to_end_p90_ms"] >= d["end_to_end_median_ms"] >= d["end_to_end_min_ms"] > 0
    assert 0 < d["data_pipeline_ms_per_sample"] < d["end_to_end_median_ms"]
    assert 0 < d["data_share_of_end_to_end"] < 1 and d["end_to_end_fps"] > 0
    # Every counted FLOP is attributed to a stage; the backbone convolutions count.
    by_stage = {s["name"]: s["gflops"] for s in d["stages"]}
    assert d["flops"] > 0 and by_stage["backbone"] > 0
    assert sum(by_stage.values()) == pytest.approx(d["gflops"], abs=5e-3)
    assert d["peak_memory_mb"] is not None and d["peak_memory_mb"] >= 0
    assert d["params"] == sum(p.numel() for p in model.parameters())
    table = format_table(result)
    assert all(stage in table for stage in KIND_STAGES[kind]) and "forward ms" in table and "end-to-end" in table
    model.eval()


@pytest.mark.parametrize("kind", ["sparse", "gaussian"])
def test_benchmark_under_autocast(models, kind):
    model = models[kind]
    result = benchmark(model, synthetic_inputs(model), dtype="bfloat16", repeats=1, warmup=0, measure_memory=False)
    assert result.dtype == "bfloat16" and result.latency_median_ms > 0 and result.flops > 0
    assert any(note.startswith("bfloat16: torch.autocast") for note in result.notes)


def test_occscannet_rig_sees_the_room_grid():
    rig = occscannet_rig((48, 64))
    assert rig.intrinsics.shape == (1, 3, 3) and rig.ego_from_cam.shape == (1, 4, 4) and rig.camera_names == ("CAM",)
    # The centre of the Occ-ScanNet grid (origin at its bottom centre, 2.88 m high) is in front of
    # the camera and inside the 64x48 network image.
    centre = torch.tensor([0.0, 0.0, 1.44, 1.0])
    cam = torch.linalg.inv(rig.ego_from_cam[0]) @ centre
    u, v, z = (rig.img_from_raw[0] @ rig.intrinsics[0] @ cam[:3]).tolist()
    assert z > 0 and 0 < u / z < 64 and 0 < v / z < 48


@pytest.mark.parametrize("kind, fmt, cams", [("sparse", "occscannet", 1), ("gaussian", "occ3d", 6)])
def test_cli_benchmarks_a_training_config_of_the_kind(tmp_path, capsys, kind, fmt, cams):
    section = to_dict(sparse_config() if kind == "sparse" else gaussian_config())
    path = tmp_path / f"{kind}.yaml"
    path.write_text(yaml.safe_dump({"data": {"format": fmt}, "model": {"kind": kind, kind: section}}))
    out = tmp_path / "bench.json"
    rc = main(["bench", "--config", str(path), "--json", str(out), "--repeats", "1", "--warmup", "0", "--quiet",
               "--no-memory", "--threads", "1"])
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["kind"] == kind and report["model"] == f"{kind} ({kind}.yaml)" and report["cameras"] == cams
    assert [s["name"] for s in report["stages"]] == list(KIND_STAGES[kind]) and report["flops"] > 0
    printed = capsys.readouterr().out.splitlines()
    assert json.loads(printed[0])["params"] == report["params"]
    table = [line.split()[0] for line in printed[3:] if line.strip()]  # after the JSON, title, header
    assert table[:len(KIND_STAGES[kind])] == list(KIND_STAGES[kind]) and "latency" in table and "FPS" in table


@pytest.fixture(scope="module")
def room_checkpoint(tmp_path_factory):
    """A sparse student 'trained' on Occ-ScanNet data (the default Occ-ScanNet grid and classes)."""
    from occdistill.engine.checkpoint import save_checkpoint
    from occdistill.engine.config import DataConfig, TrainConfig
    from occdistill.models.build import ModelConfig

    cfg = sparse_config(grid=SparseGridConfig(), num_classes=12, free_index=0, image_size=(48, 64))
    torch.manual_seed(1)
    run = tmp_path_factory.mktemp("room_run")
    train_cfg = TrainConfig(data=DataConfig(format="occscannet", root="data/room", val_split="val_subscenes.txt"),
                            model=ModelConfig(kind="sparse", sparse=cfg))
    save_checkpoint(run / "checkpoints", 5, model=SparseOccStudent(cfg), ema=None, config=train_cfg, state={})
    return run


@pytest.mark.parametrize("split", [None, "val_subscenes.txt"])
def test_cli_benchmarks_a_sparse_checkpoint_on_room_data(room_checkpoint, room, tmp_path, split):
    out = tmp_path / "room.json"
    argv = ["bench", "--checkpoint", str(room_checkpoint), "--data", str(room.out), "--format", "occscannet",
            "--json", str(out), "--repeats", "1", "--warmup", "0", "--quiet", "--no-flops", "--no-memory"]
    assert main(argv + (["--infos", split] if split else [])) == 0
    report = json.loads(out.read_text())
    assert report["kind"] == "sparse" and report["cameras"] == 1 and report["input_source"].startswith("dataset")
    assert report["image_size"] == [48, 64] and report["end_to_end_median_ms"] > 0
    assert 0 < report["data_pipeline_ms_per_sample"] < report["end_to_end_median_ms"]


def test_staged_forward_of_the_depth_prior_model_equals_forward_and_times_the_branch(models):
    model = models["prior"]
    inputs = synthetic_inputs(model, batch=2)
    assert inputs.prior_depth.shape == (2, 6, 32, 64) and inputs.prior_depth.min() >= 0.5
    assert "synthetic prior depth map" in inputs.prior_source
    with torch.no_grad():
        ref = model(*inputs.args(), prior_depth=inputs.prior_depth)
        clock = StageClock(torch.device("cpu"))
        staged = profiled_forward(model, *inputs.args(), clock=clock, prior_depth=inputs.prior_depth)
        no_prior = model(*inputs.args(), prior_depth=torch.zeros_like(inputs.prior_depth))
    assert_same(staged.output, ref)
    assert torch.equal(staged.labels, model.voxelize(ref).to(torch.uint8))
    # The prior depth map is read: another map gives other points.
    assert not torch.equal(no_prior.final.points, ref.final.points)
    assert tuple(clock.seconds) == SPARSE_PRIOR_STAGES == model_stages(model)
    assert clock.seconds["depth_prior"] > 0 and clock.seconds["decoder"] > 0
    # The branch's FLOPs are the depth_prior stage's, not the decoder's. Per layer, sample and query:
    # the projection of its R_prev points into N cameras (3x4 each) and the MLP 3 R_prev -> C/2 -> C -> C;
    # R_prev = 1 in both layers (1, 2 points per query); 2 FLOPs per multiply-add.
    flops = count_stage_flops(model, inputs)
    b, n, c, q = 2, 6, model.cfg.embed_dims, model.cfg.num_queries
    macs = sum(b * q * (n * r * 3 * 4 + 3 * r * c // 2 + c // 2 * c + c * c) for r in (1, 1))
    assert flops["depth_prior"] == 2 * macs


def test_benchmark_of_the_depth_prior_model_reads_the_datasets_depth_maps(models, street):
    model = models["prior"]
    ds = open_bench_dataset("occ3d", street.out, street.splits["val"], model.cfg.image_size, depth="rendered")
    inputs = dataset_inputs(ds, prior_depth=True)
    assert inputs.prior_depth.shape == (1, 2, 32, 64) and (inputs.prior_depth > 0).any()
    result = benchmark(model, inputs, dataset=ds, model_name="prior", repeats=2, warmup=1)
    d = result.to_dict()
    assert [s["name"] for s in d["stages"]] == list(SPARSE_PRIOR_STAGES) and d["kind"] == "sparse"
    assert sum(s["gflops"] for s in d["stages"]) == pytest.approx(d["gflops"], abs=5e-3)
    assert d["end_to_end_median_ms"] > 0 and any("depth maps of the dataset samples" in n for n in d["notes"])
    assert "depth_prior" in format_table(result)
    no_depth = open_bench_dataset("occ3d", street.out, street.splits["val"], model.cfg.image_size)
    with pytest.raises(OccDistillError, match="loads no depth maps"):
        dataset_inputs(no_depth, prior_depth=True)
    with pytest.raises(OccDistillError, match="loads no depth maps"):
        benchmark(model, inputs, dataset=no_depth, repeats=1, warmup=0)


def test_cli_benchmarks_a_depth_prior_config_with_and_without_data(street, tmp_path):
    path = tmp_path / "prior.yaml"
    path.write_text(yaml.safe_dump({"data": {"format": "occ3d", "depth": "rendered"},
                                    "model": {"kind": "sparse", "sparse": to_dict(sparse_config(depth_prior=True))}}))
    common = ["--repeats", "1", "--warmup", "0", "--quiet", "--no-memory", "--threads", "1"]
    for data in ([], ["--data", str(street.out), "--infos", str(street.splits["val"])]):
        out = tmp_path / "bench.json"
        assert main(["bench", "--config", str(path), "--json", str(out), *data, *common]) == 0
        report = json.loads(out.read_text())
        assert [s["name"] for s in report["stages"]] == list(SPARSE_PRIOR_STAGES)
        source = "depth maps of the dataset samples" if data else "synthetic prior depth map"
        assert any(source in note for note in report["notes"]), report["notes"]
        assert report["cameras"] == (2 if data else 6)


def test_what_bench_cannot_profile_is_a_clear_error(tmp_path, capsys):
    prior = SparseOccStudent(sparse_config(depth_prior=True)).eval()
    inputs = synthetic_inputs(prior)
    with pytest.raises(OccDistillError, match="depth-prior branch .*give it a prior depth map"):
        benchmark(prior, dataclasses.replace(inputs, prior_depth=None), repeats=1, warmup=0)
    plain = build("sparse")
    with pytest.raises(OccDistillError, match="a prior depth map was given, but this SparseOccStudent reads none"):
        benchmark(plain, dataclasses.replace(synthetic_inputs(plain), prior_depth=inputs.prior_depth), repeats=1,
                  warmup=0)
    with pytest.raises(OccDistillError, match="bench profiles dense, sparse, gaussian models; got a Linear$"):
        model_kind(torch.nn.Linear(2, 2))
    sparse = build("sparse")
    with pytest.raises(OccDistillError, match="side-by-side benchmarks the dense student; got a SparseOccStudent"):
        side_by_side(sparse, nuscenes_rig(sparse.cfg.image_size), variants=["eager"], repeats=1, warmup=0)
    path = tmp_path / "sparse.yaml"
    path.write_text(yaml.safe_dump({"model": {"kind": "sparse", "sparse": to_dict(sparse_config())}}))
    assert main(["bench", "--config", str(path), "--side-by-side", "--quiet"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "the side-by-side benchmarks the dense student; got a SparseOccStudent" in lines[0]
    assert main(["bench", "--config", str(path), "--data", str(tmp_path), "--format", "occscannet",
                 "--infos", "missing.txt"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "missing.txt: split file not found" in lines[0]


def test_help_lists_the_stages_of_every_kind():
    import re

    from occdistill.cli.bench import EPILOG

    for kind, stages in KIND_STAGES.items():
        line = next(ln for ln in EPILOG.splitlines() if ln.strip().startswith(f"{kind} "))
        listed = re.sub(r"\s*\([^)]*\)", "", line).split(None, 1)[1]  # parenthesised explanations out
        assert listed.split(", ") == list(stages), kind
