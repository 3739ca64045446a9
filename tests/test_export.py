"""ONNX export with a baked-in rig: parity, metadata, rig refusal, FP16/INT8 variants, the export
command and the side-by-side bench (tiny model, synthetic street world)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx", reason="onnx is not installed (a dependency of occdistill: pip install -e .)")
ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install -e .)")
pytest.importorskip("onnxscript", reason="onnxscript (torch's dynamo ONNX exporter) is not installed")

from occdistill.cli.main import main  # noqa: E402
from occdistill.data.augment import ImageAugConfig  # noqa: E402
from occdistill.data.occ3d import Occ3DDataset  # noqa: E402
from occdistill.deploy.export import (  # noqa: E402
    ExportSoftplus,
    FramePreprocessor,
    OnnxOccModel,
    check_parity,
    compare_rig,
    evaluate_onnx,
    export_onnx,
    frame_image_paths,
    read_metadata,
    rig_from_dataset,
    rig_hash,
    sidecar_path,
)
from occdistill.deploy.quantize import (  # noqa: E402
    calibration_frames,
    convert_fp16,
    pooling_node_names,
    qdq_counts,
    quantize_int8,
)
from occdistill.errors import OccDistillError  # noqa: E402
from occdistill.geometry import yaw_transform  # noqa: E402
from occdistill.models.dense import BackboneConfig, DenseStudent, DenseStudentConfig, GridConfig  # noqa: E402

IMAGE_SIZE = (64, 96)
AUG = ImageAugConfig(final_size=IMAGE_SIZE, crop_top_range=(0.5, 0.5))


def tiny_config() -> DenseStudentConfig:
    """Street grid and class table (so it evaluates on the synthetic world), tiny everything else."""
    return DenseStudentConfig(
        image_size=IMAGE_SIZE,
        backbone=BackboneConfig(depth=18, base_width=8),
        neck_channels=16,
        depth_bins=(1.0, 21.0, 2.0),
        context_channels=8,
        depth_net_channels=16,
        bev_channels=8,
        num_classes=18,
        grid=GridConfig(range=(-20.0, -20.0, -1.0, 20.0, 20.0, 5.4), voxel_size=(0.4, 0.4, 0.4)),
    )


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def street(tmp_path_factory):
    """Two scenes of two frames at 160x90; each scene has its own calibration (1 deg mount spread)."""
    from occdistill.data.synth import generate

    return generate("street", tmp_path_factory.mktemp("street"), scenes=2, frames=2, seed=0, progress=False,
                    overrides=["rig.width=160", "rig.height=90", "split.val_scenes=1"])


@pytest.fixture(scope="module")
def splits(street):
    from occdistill.data.occ3d import Occ3DDataset

    return {name: Occ3DDataset(street.out, street.splits[name], image_aug=AUG) for name in ("train", "val")}


@pytest.fixture(scope="module")
def model() -> DenseStudent:
    torch.manual_seed(0)
    m = DenseStudent(tiny_config()).eval()
    with torch.no_grad():  # non-trivial BN statistics, so that folding them is exercised
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.2, 0.2)
                mod.running_var.uniform_(0.5, 1.5)
    return m


@pytest.fixture(scope="module")
def rig(splits):
    return rig_from_dataset(splits["train"], 0)


@pytest.fixture(scope="module")
def exported(model, rig, tmp_path_factory):
    return export_onnx(model, rig, tmp_path_factory.mktemp("onnx") / "model.onnx")


def frame_inputs(ort_model: OnnxOccModel, dataset, count: int = 2) -> list[np.ndarray]:
    return [ort_model.prepare(dataset[i].images[None]) for i in range(min(count, len(dataset)))]


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_export_matches_eager_on_dataset_frames(model, rig, splits, exporter, tmp_path):
    info = export_onnx(model, rig, tmp_path / f"{exporter}.onnx", exporter=exporter, opset=17 if exporter ==
                       "torchscript" else 18)
    assert info.opset >= 17 and info.exporter == exporter
    assert [t.name for t in info.outputs] == ["logits", "labels"]
    assert info.inputs[0].shape == (1, 6, *IMAGE_SIZE, 3) and info.inputs[0].dtype == "uint8"
    assert info.outputs[0].shape == (1, 100, 100, 16, 18) and info.outputs[1].dtype == "uint8"
    m = OnnxOccModel(info.path)
    parity = check_parity(model, m, frame_inputs(m, splits["train"]))
    assert parity.ok and parity.max_abs_logit_diff < 1e-4 * max(1.0, parity.max_abs_logit)
    assert parity.argmax_agreement >= 0.999 and parity.max_abs_logit > 0
    assert parity.voxels == 2 * 100 * 100 * 16
    assert model.view_transform.fixed_pool is None  # parity and export leave the caller's model alone
    graph_ops = {n.op_type for n in onnx.load(str(info.path)).graph.node}
    assert not graph_ops & {"ScatterND", "ScatterElements", "Softplus"}  # no scatter, no scalar Softplus kernel


def test_float32_input_export(model, rig, splits, tmp_path):
    info = export_onnx(model, rig, tmp_path / "f32.onnx", input_format="float32", exporter="torchscript", opset=17)
    m = OnnxOccModel(info.path)
    assert m.input_shape == (1, 6, 3, *IMAGE_SIZE)
    x = m.prepare(splits["train"][0].images[None])
    assert x.dtype == np.float32
    assert check_parity(model, m, [x]).ok


def test_metadata_and_sidecar_name_the_rig(exported, rig, model):
    meta = read_metadata(exported.path)
    assert meta["rig_hash"] == exported.rig_hash == rig_hash(rig, IMAGE_SIZE)
    assert meta["camera_names"] == list(rig.camera_names) and meta["image_size"] == list(IMAGE_SIZE)
    assert "ONLY" in meta["warning"] and meta["input_format"] == "uint8"
    side = json.loads(sidecar_path(exported.path).read_text())
    assert side["sha256"] == exported.sha256 and side["rig_hash"] == exported.rig_hash
    assert np.allclose(side["rig"]["ego_from_cam"], rig.ego_from_cam.numpy(), atol=1e-6)
    # the hash is stable through the JSON round trip and changes with the calibration
    m = OnnxOccModel(exported.path)
    assert rig_hash(m.rig, IMAGE_SIZE) == exported.rig_hash
    moved = rig._replace(ego_from_cam=rig.ego_from_cam.clone())
    moved.ego_from_cam[0, 0, 3] += 0.01
    assert rig_hash(moved, IMAGE_SIZE) != exported.rig_hash


def test_runtime_refuses_another_rig(exported, rig):
    m = OnnxOccModel(exported.path)
    ok = m.check_rig(*rig[:3], camera_names=rig.camera_names)
    assert ok.ok and ok.max_shift_m < 1e-5 and ok.moved_fraction == 0.0
    turned = rig.ego_from_cam.clone()
    turned[2] = torch.from_numpy(yaw_transform(math.radians(1.0))).float() @ turned[2]  # one camera yawed 1 deg
    with pytest.raises(OccDistillError, match="refuses.*moves frustum points"):
        m.check_rig(rig.intrinsics, rig.img_from_raw, turned)
    check = compare_rig(m.rig, m.frustum, rig.intrinsics, rig.img_from_raw, turned, tolerance_m=10.0)
    assert check.ok and 0.2 < check.max_shift_m < 0.5 and check.moved_fraction > 0  # 1 deg at ~20 m
    with pytest.raises(OccDistillError, match="names and order"):
        m.check_rig(*rig[:3], camera_names=tuple(reversed(rig.camera_names)))
    with pytest.raises(OccDistillError, match="5 cameras given"):
        m.check_rig(rig.intrinsics[:5], rig.img_from_raw[:5], rig.ego_from_cam[:5])


def test_evaluation_checks_every_frame_against_the_baked_rig(model, exported, splits):
    # train split: the rig's own scene (camera-time ego motion only) -> evaluated
    report = evaluate_onnx(OnnxOccModel(exported.path), splits["train"])
    assert 0 <= report["mIoU"] <= 100 and report["rig_max_shift_m"] < 0.2
    # val split: another scene, another calibration (1 deg mount spread) -> refused
    with pytest.raises(OccDistillError, match="refuses"):
        evaluate_onnx(OnnxOccModel(exported.path), splits["val"])
    # a tight tolerance refuses the ego-motion differences too
    with pytest.raises(OccDistillError, match="tolerance 0.001 m"):
        evaluate_onnx(OnnxOccModel(exported.path, rig_tolerance_m=0.001), splits["train"])


def test_int8_and_fp16_variants(model, exported, splits, tmp_path):
    m = OnnxOccModel(exported.path)
    frames, tokens = calibration_frames(m, splits["train"], 2)
    assert len(frames) == 2 and len(set(tokens)) == 2
    v8 = quantize_int8(exported.path, tmp_path / "model.int8.onnx", frames, calibration_tokens=tokens)
    proto = onnx.load(str(v8.path))
    counts = qdq_counts(proto)
    assert counts["QuantizeLinear"] > 10 and counts["DequantizeLinear"] >= counts["QuantizeLinear"]
    # the pooling (cumsum run sums) stays float32: no QDQ pair feeds the CumSum
    producers = {o: n.op_type for n in proto.graph.node for o in n.output}
    cumsum = next(n for n in proto.graph.node if n.op_type == "CumSum")
    assert producers.get(cumsum.input[0]) != "DequantizeLinear"
    assert v8.size_bytes < 0.6 * exported.size_bytes
    v16 = convert_fp16(exported.path, tmp_path / "model.fp16.onnx")
    inputs = frame_inputs(m, splits["train"])
    for v, min_agree in ((v16, 0.999), (v8, 0.95)):
        meta = read_metadata(v.path)
        assert meta["rig_hash"] == exported.rig_hash and meta["precision"] == v.precision
        runtime = OnnxOccModel(v.path)
        out = runtime.run(inputs[0])
        assert out["logits"].dtype == np.float32 and out["labels"].shape == (1, 100, 100, 16)
        p = check_parity(model, runtime, inputs, logit_tolerance=None, agreement_bound=None)
        assert p.argmax_agreement >= min_agree
    assert pooling_node_names(onnx.load(str(exported.path)))


def test_preprocessor_bytes_are_the_dataset_images(splits):
    pre = FramePreprocessor(AUG)
    ds = splits["val"]
    u8 = pre.load(frame_image_paths(ds, 1))
    assert u8.dtype == np.uint8 and u8.shape == (6, *IMAGE_SIZE, 3)
    assert np.array_equal(u8.transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255.0), ds[1].images.numpy())


def test_export_rewrites_are_exact(model, rig):
    import copy

    from occdistill.deploy.export import ExportLinear, GatheredPool

    m = copy.deepcopy(model)
    m.set_fixed_rig(*rig[:3])
    vt = m.view_transform
    gen = torch.Generator().manual_seed(0)
    n, d, h, w = vt.fixed_pool.frustum_shape
    depth = torch.rand(2, n, d, h, w, generator=gen).softmax(dim=2)
    context = torch.randn(2, n, 8, h, w, generator=gen)
    frustum = context.permute(0, 1, 3, 4, 2)[:, :, None] * depth[..., None]
    assert torch.equal(GatheredPool(vt.fixed_pool)(depth, context), vt.fixed_pool(frustum))
    lin = m.head.mlp[2]
    x = torch.randn(3, 5, lin.in_features, generator=gen)
    assert torch.allclose(ExportLinear(lin)(x), lin(x), atol=1e-5)


def test_export_softplus_equals_softplus():
    x = torch.linspace(-60, 60, 20001)
    assert torch.allclose(ExportSoftplus()(x), torch.nn.Softplus()(x), atol=1e-6, rtol=1e-6)
    assert torch.allclose(ExportSoftplus(2.0)(x), torch.nn.Softplus(beta=2.0)(x), atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# command line


@pytest.fixture(scope="module")
def checkpoint(street, model, tmp_path_factory):
    from occdistill.engine.checkpoint import save_checkpoint
    from occdistill.engine.config import DataConfig, TrainConfig
    from occdistill.models.build import ModelConfig

    run = tmp_path_factory.mktemp("run")
    data = DataConfig(root=str(street.out), train_split=str(street.splits["train"]),
                      val_split=str(street.splits["val"]), image_aug=AUG)
    cfg = TrainConfig(data=data, model=ModelConfig(kind="dense", dense=tiny_config()))
    save_checkpoint(run / "checkpoints", 5, model=model, ema=None, config=cfg, state={})
    return run


def test_cli_export_writes_variants_parity_and_loud_rig(checkpoint, street, tmp_path, capsys):
    out = tmp_path / "deploy"
    # evaluation on the training split, the rig's own scene: the val scene has another calibration and
    # would be skipped (tests/test_export_rigs.py)
    rc = main(["export", "--checkpoint", str(checkpoint), "--out", str(out), "--val-split", str(street.splits["train"]),
               "--calib-frames", "2", "--parity-frames", "2", "--exporter", "torchscript", "--eval"])
    text = capsys.readouterr().out
    assert rc == 0
    assert "CAMERA RIG BAKED IN" in text and "PASS" in text
    report = json.loads((out / "export.json").read_text())
    assert set(report["variants"]) == {"fp32", "fp16", "int8"}
    assert report["parity"]["fp32"]["ok"] and report["parity"]["fp32"]["argmax_agreement"] >= 0.999
    assert report["rig"]["camera_names"] == ["CAM_FRONT", "CAM_FRONT_RIGHT", "CAM_FRONT_LEFT", "CAM_BACK",
                                             "CAM_BACK_LEFT", "CAM_BACK_RIGHT"]
    ev = report["evaluation"]["variants"]
    assert set(ev) == {"eager", "ort-fp32", "ort-fp16", "ort-int8"}
    assert ev["ort-fp32"]["mIoU_change_vs_fp32"] == 0.0 and "mIoU_change_vs_fp32" in ev["ort-int8"]
    for f in ("model.onnx", "model.fp16.onnx", "model.int8.onnx", "model.int8.onnx.json"):
        assert (out / f).is_file()


@pytest.mark.parametrize("args, message", [
    (["--checkpoint", "/nonexistent/run"], "checkpoint not found"),
    (["--config", "street-tiny", "--precision", "fp32,int9"], "unknown ['int9']"),
    (["--config", "street-tiny", "--opset", "13", "--rig", "nuscenes", "--precision", "fp32"], "opset >= 17"),
    (["--config", "street-tiny", "--calib-frames", "0"], "--calib-frames must be >= 1"),
])
def test_cli_export_bad_input_is_one_line(args, message, tmp_path, capsys):
    rc = main(["export", *args, "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and message in err and len(err.splitlines()) == 1


def test_sparse_student_exports_with_dynamo_only(tmp_path):
    from occdistill.deploy.export import SPARSE_TORCHSCRIPT_REASON, ExportWrapper
    from occdistill.deploy.rig import nuscenes_rig
    from occdistill.models.sparse import SparseOccStudent, tiny_sparse_config

    torch.manual_seed(0)
    # >= 26 queries: torch.cdist of fewer points dispatches aten._cdist_forward, which has no ONNX translation
    cfg = tiny_sparse_config(image_size=(64, 96), num_queries=32, points_per_layer=(1, 4))
    sparse = SparseOccStudent(cfg).eval()
    with torch.no_grad():  # confident classes, so that the voxelisation has points to scatter
        for layer in sparse.decoder:
            layer.cls_branch[-1].bias.uniform_(-1.0, 3.0)
    rig = nuscenes_rig(cfg.image_size)
    with pytest.raises(OccDistillError, match="dynamo exporter only"):
        export_onnx(sparse, rig, tmp_path / "ts.onnx", exporter="torchscript")
    assert SPARSE_TORCHSCRIPT_REASON
    info = export_onnx(sparse, rig, tmp_path / "sparse.onnx")
    assert read_metadata(info.path)["model_kind"] == "sparse"
    m = OnnxOccModel(info.path)
    inputs = [ExportWrapper(sparse, rig).example_input(seed).numpy() for seed in range(2)]
    labels = m.run(inputs[0])["labels"]
    assert labels.shape == (1, 60, 60, 36) and (labels != sparse.classes.free_index).any()
    assert check_parity(sparse, m, inputs).argmax_agreement >= 0.999
    with pytest.raises(OccDistillError, match="not supported"):
        evaluate_onnx(m, [])


def test_cli_side_by_side_bench(checkpoint, street, tmp_path, capsys, monkeypatch):
    # torch.compile would compile for ~20 s here: make it fail to check that a failure is reported
    def broken(*args, **kwargs):
        raise RuntimeError("no compiler in this test")

    monkeypatch.setattr(torch, "compile", broken)
    out = tmp_path / "sbs.json"
    rc = main(["bench", "--checkpoint", str(checkpoint), "--data", str(street.out), "--infos",
               str(street.splits["train"]), "--variants", "eager@1,compile@1,ort-fp32@1,ort-int8@1",
               "--calib-frames", "2", "--repeats", "2", "--warmup", "0", "--quiet", "--json", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    rows = {v["name"]: v for v in report["variants"]}
    assert not rows["compile@1"]["ok"] and "no compiler" in rows["compile@1"]["error"]
    for name in ("eager@1", "ort-fp32@1", "ort-int8@1"):
        v = rows[name]
        assert v["ok"] and v["engine_median_ms"] > 0 and v["end_to_end_median_ms"] > v["preprocess_median_ms"] > 0
        assert v["peak_memory_mb"] is not None and 0 < v["roofline_end_to_end"]
    assert rows["ort-fp32@1"]["label_agreement_vs_eager"] >= 0.999
    assert report["baseline"] == "eager@1" and report["matmul"]["gflops"] > 0 and report["flops"] > 0
    assert "FAILED" in capsys.readouterr().out


@pytest.fixture(scope="module")
def prior_checkpoint(street, tmp_path_factory):
    """A sparse student with the depth-prior branch (random weights, confident classes so that the
    voxelisation has points to scatter) saved as a checkpoint whose config reads the street's
    rendered depth maps (data.depth), as a trained depth-prior student's does."""
    from occdistill.engine.checkpoint import save_checkpoint
    from occdistill.engine.config import DataConfig, TrainConfig
    from occdistill.models.build import ModelConfig
    from occdistill.models.sparse import SparseGridConfig, SparseOccStudent, tiny_sparse_config

    # >= 26 queries: torch.cdist of fewer points has no ONNX translation (see test_sparse_student_exports...)
    cfg = tiny_sparse_config(image_size=IMAGE_SIZE, num_queries=32, points_per_layer=(1, 2), depth_prior=True,
                             num_classes=18, free_index=17, centre_distance_threshold=3.0,
                             grid=SparseGridConfig(range=(-20.0, -20.0, -1.0, 20.0, 20.0, 5.4),
                                                   voxel_size=(0.4, 0.4, 0.4)))
    torch.manual_seed(0)
    sparse = SparseOccStudent(cfg).eval()
    with torch.no_grad():
        for layer in sparse.decoder:
            layer.cls_branch[-1].bias.uniform_(-1.0, 3.0)
    data = DataConfig(format="occ3d", root=str(street.out), train_split=str(street.splits["train"]),
                      val_split=str(street.splits["val"]), image_aug=AUG, depth="rendered")
    run = tmp_path_factory.mktemp("prior_run")
    save_checkpoint(run / "checkpoints", 1, model=sparse, ema=None, config=TrainConfig(
        data=data, model=ModelConfig(kind="sparse", sparse=cfg)), state={})
    return run


def test_cli_exports_the_depth_prior_model_with_the_prior_as_a_second_input(prior_checkpoint, splits, tmp_path,
                                                                          capsys):
    out = tmp_path / "prior"
    # No --precision: a sparse student's default is FP32 alone.
    assert main(["export", "--checkpoint", str(prior_checkpoint), "--out", str(out),
                 "--parity-frames", "2", "--threads", "1"]) == 0
    assert sorted(p.name for p in out.glob("*.onnx")) == ["model.onnx"]
    report = json.loads((out / "export.json").read_text())
    assert report["parity"]["fp32"]["ok"] and report["parity"]["fp32"]["argmax_agreement"] >= 0.999
    assert "train frames" in report["parity_inputs"] and report["parity_rig_frames"]["kept"] >= 1
    assert [(i["name"], i["shape"], i["dtype"]) for i in report["export"]["inputs"]] == [
        ("images", [1, 6, *IMAGE_SIZE, 3], "uint8"), ("prior_depth", [1, 6, *IMAGE_SIZE], "float32")]
    sidecar = json.loads(sidecar_path(out / "model.onnx").read_text())
    assert sidecar["extra_inputs"][0]["name"] == "prior_depth" and sidecar["extra_inputs"][0]["shape"] == [
        1, 6, *IMAGE_SIZE] and "metres" in sidecar["extra_inputs"][0]["meaning"]
    assert "prior_depth [1, 6, 64, 96] float32" in capsys.readouterr().out
    # The prior is live in the graph (a frame's rendered depth and an empty map give other points),
    # and the runtime asks for it by name.
    m = OnnxOccModel(out / "model.onnx")
    assert m.prior_depth_shape == (1, 6, *IMAGE_SIZE)
    x = m.prepare(splits["train"][0].images[None])
    depth = Occ3DDataset(splits["train"].data_root, splits["train"].infos, image_aug=AUG, depth="rendered")[0].depth
    with_prior = m.run(x, prior_depth=depth[None].numpy())["logits"]
    assert not np.array_equal(with_prior, m.run(x, prior_depth=np.zeros((1, 6, *IMAGE_SIZE), np.float32))["logits"])
    with pytest.raises(OccDistillError, match=r"takes a prior depth map \(1, 6, 64, 96\) \(prior_depth, metres\)"):
        m.run(x)
    # The reduced-precision variants are the dense student's: refused in one line before any export.
    rc = main(["export", "--checkpoint", str(prior_checkpoint), "--out", str(tmp_path / "int8"), "--precision",
               "fp32,int8"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "export a SparseOccStudent with --precision fp32" in err
    assert not (tmp_path / "int8").exists()
