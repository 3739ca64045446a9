"""ONNX export of a temporal dense student: the graph's history input and lifted_bev output, parity
with a non-zero history, the streaming runner against PyTorch streaming on consecutive frames of the
synthetic street, the sidecar, the runtime's refusals, a single-frame graph's unchanged I/O, and the
consumers of exported files (side-by-side bench, evaluation, INT8, the export command)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx", reason="onnx is not installed (a dependency of occdistill: pip install -e .)")
pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install -e .)")
pytest.importorskip("onnxscript", reason="onnxscript (torch's dynamo ONNX exporter) is not installed")

from occdistill.cli.main import main  # noqa: E402
from occdistill.data.augment import ImageAugConfig  # noqa: E402
from occdistill.data.occ3d import Occ3DDataset  # noqa: E402
from occdistill.deploy.bench import TEMPORAL_BENCH_NOTE  # noqa: E402
from occdistill.deploy.export import (  # noqa: E402
    TEMPORAL_NOTE,
    OnnxOccModel,
    check_parity,
    evaluate_onnx,
    export_onnx,
    rig_from_dataset,
    sidecar_path,
)
from occdistill.deploy.quantize import convert_fp16, quantize_int8  # noqa: E402
from occdistill.deploy.stream import StreamRunner, sample_frame  # noqa: E402
from occdistill.errors import OccDistillError  # noqa: E402
from occdistill.models.dense import BackboneConfig, DenseStudent, DenseStudentConfig, GridConfig  # noqa: E402
from occdistill.nn.temporal import BEVHistory  # noqa: E402

IMAGE_SIZE = (64, 96)
AUG = ImageAugConfig(final_size=IMAGE_SIZE, crop_top_range=(0.5, 0.5))
FRAMES = 2  # earlier frames fused: two slots show the newest-first order and a partly filled history
HISTORY_SHAPE = (1, FRAMES, 8, 100, 100)  # (B, F, C_ctx, X, Y)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tiny_config(temporal_frames: int = FRAMES) -> DenseStudentConfig:
    """Street grid and class table, tiny everything else (as tests/test_export.py)."""
    return DenseStudentConfig(
        image_size=IMAGE_SIZE, backbone=BackboneConfig(depth=18, base_width=8), neck_channels=16,
        depth_bins=(1.0, 21.0, 2.0), context_channels=8, depth_net_channels=16, bev_channels=8, num_classes=18,
        grid=GridConfig(range=(-20.0, -20.0, -1.0, 20.0, 20.0, 5.4), voxel_size=(0.4, 0.4, 0.4)),
        temporal_frames=temporal_frames,
    )


def tiny_student(temporal_frames: int = FRAMES) -> DenseStudent:
    """Random weights, with non-trivial BN statistics (so that folding them is exercised) and the BEV
    side (fusion, BEV encoder, head) re-initialised variance-preserving: under PyTorch's default
    init the untrained BEV encoder passes ~1e-4 of a BEV change to the logits, and a history fed
    or not would hide below the parity tolerance; with it a real history moves the logits by ~0.7
    (of ~5) and flips ~4% of the labels."""
    torch.manual_seed(0)
    m = DenseStudent(tiny_config(temporal_frames)).eval()
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.2, 0.2)
                mod.running_var.uniform_(0.5, 1.5)
        bev_side = [m.bev_encoder, m.head, *([m.temporal] if temporal_frames else [])]
        for mod in (mod for part in bev_side for mod in part.modules()):
            if isinstance(mod, (torch.nn.Conv2d, torch.nn.Linear)):
                torch.nn.init.kaiming_normal_(mod.weight, nonlinearity="relu")
    return m


@pytest.fixture(scope="module")
def street(tmp_path_factory):
    """Two scenes of three frames at 160x90, one camera mount for both (the baked rig fits all frames
    up to the camera-time ego motion); the ego drives a few metres between frames."""
    from occdistill.data.synth import generate

    return generate("street", tmp_path_factory.mktemp("street"), scenes=2, frames=3, seed=0, progress=False,
                    overrides=["rig.width=160", "rig.height=90", "split.val_scenes=0", "rig.mount_jitter_deg=0"])


@pytest.fixture(scope="module")
def dataset(street):
    return Occ3DDataset(street.out, street.splits["train"], image_aug=AUG)


@pytest.fixture(scope="module")
def model() -> DenseStudent:
    return tiny_student()


@pytest.fixture(scope="module")
def rig(dataset):
    return rig_from_dataset(dataset, 0)


@pytest.fixture(scope="module")
def exported(model, rig, tmp_path_factory):
    return export_onnx(model, rig, tmp_path_factory.mktemp("onnx") / "model.onnx")


def random_history(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(HISTORY_SHAPE, dtype=np.float32)


def test_temporal_graph_takes_the_history_and_returns_the_lifted_bev(exported):
    io = lambda infos: [(t.name, t.shape, t.dtype) for t in infos]  # noqa: E731
    assert io(exported.inputs) == [("images", (1, 6, *IMAGE_SIZE, 3), "uint8"), ("history", HISTORY_SHAPE, "float32")]
    assert io(exported.outputs) == [("logits", (1, 100, 100, 16, 18), "float32"),
                                    ("labels", (1, 100, 100, 16), "uint8"), ("lifted_bev", (1, 8, 100, 100), "float32")]
    assert TEMPORAL_NOTE in exported.notes
    sidecar = json.loads(sidecar_path(exported.path).read_text())
    history = sidecar["extra_inputs"][0]
    assert len(sidecar["extra_inputs"]) == 1 and history["name"] == "history"
    assert history["shape"] == list(HISTORY_SHAPE) and history["dtype"] == "float32" and history["frames"] == FRAMES
    assert "zeros = no usable earlier frame" in history["meaning"] and "warped" in history["meaning"]
    assert history["layout"].startswith("B,F,C,X,Y")
    bev = sidecar["extra_outputs"][0]
    assert len(sidecar["extra_outputs"]) == 1 and bev["name"] == "lifted_bev"
    assert bev["shape"] == [1, 8, 100, 100] and "BEVHistory.push" in bev["meaning"]
    assert [o["name"] for o in sidecar["outputs"]] == ["logits", "labels", "lifted_bev"]
    m = OnnxOccModel(exported.path)
    assert m.history_shape == HISTORY_SHAPE and m.prior_depth_shape is None and m.grid.shape == (100, 100, 16)


def test_parity_with_a_random_history(model, exported, dataset, rig):
    m = OnnxOccModel(exported.path)
    images = [m.prepare(dataset[i].images[None]) for i in (0, 1)]
    inputs = [(x, random_history(seed)) for seed, x in enumerate(images)]
    parity = check_parity(model, m, inputs, verbose=False)
    assert parity.ok and parity.frames == 2 and parity.argmax_agreement >= 0.999
    assert parity.max_abs_logit_diff <= 1e-4 * max(1.0, parity.max_abs_logit)
    assert parity.max_abs_bev is not None and parity.max_abs_bev > 0
    assert parity.max_abs_bev_diff <= 1e-4 * max(1.0, parity.max_abs_bev)
    # The history is live in the graph (a random and a zero history give other logits), and the
    # lifted BEV comes before the fusion (the same either way), equal to PyTorch's own forward.
    with_history = m.run(images[0], history=inputs[0][1])
    without = m.run(images[0], history=np.zeros(HISTORY_SHAPE, np.float32))
    assert np.abs(with_history["logits"] - without["logits"]).max() > 100 * parity.max_abs_logit_diff
    np.testing.assert_array_equal(with_history["lifted_bev"], without["lifted_bev"])
    cams = [t[None] for t in rig[:3]]
    with torch.no_grad():
        ref = model(dataset[0].images[None], *cams, history=torch.from_numpy(inputs[0][1]))
    np.testing.assert_allclose(with_history["lifted_bev"], ref.lifted_bev.numpy(), rtol=0,
                               atol=1e-4 * float(ref.lifted_bev.abs().max()))
    np.testing.assert_allclose(with_history["logits"], ref.voxel_logits.numpy(), rtol=0,
                               atol=1e-4 * max(1.0, float(ref.voxel_logits.abs().max())))


def test_runtime_refuses_a_missing_or_wrong_shaped_history(exported, dataset):
    m = OnnxOccModel(exported.path)
    x = m.prepare(dataset[0].images[None])
    with pytest.raises(OccDistillError, match=r"model\.onnx: the export takes a BEV history \(1, 2, 8, 100, 100\)"):
        m.run(x)
    with pytest.raises(OccDistillError, match=r"model\.onnx: history \(1, 1, 8, 100, 100\), the export takes "
                                              r"\(1, 2, 8, 100, 100\) \(history: B, F, C, X, Y"):
        m.run(x, history=np.zeros((1, 1, 8, 100, 100), np.float32))
    with pytest.raises(OccDistillError, match="no prior_depth input"):
        m.run(x, prior_depth=np.zeros((1, 6, *IMAGE_SIZE), np.float32), history=random_history(0))


def pytorch_stream(model: DenseStudent, rig, samples) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The per-frame streaming recipe of occdistill.nn.temporal around the PyTorch model (training
    pooling path), with the baked rig's calibration as the graph has it: (history, logits) per frame."""
    cams = [t[None] for t in rig[:3]]
    history, out = None, []
    for s in samples:
        pose, scenes = s.global_from_ego[None], (s.scene_name,)
        warped = None if history is None else history.warped(pose, scenes, model.grid)
        with torch.no_grad():
            result = model(s.images[None], *cams, history=warped)
        history = BEVHistory.push(history, result.lifted_bev, pose, scenes, model.cfg.temporal_frames)
        out.append((torch.zeros(HISTORY_SHAPE) if warped is None else warped, result.voxel_logits))
    return out


def test_stream_runner_equals_pytorch_streaming_frame_by_frame(model, exported, dataset, rig):
    samples = [dataset[i] for i in range(len(dataset))]  # scene 1 frames 0-2, then scene 2 frames 0-2
    assert [s.scene_name for s in samples].count(samples[0].scene_name) == 3 and len(samples) == 6
    m = OnnxOccModel(exported.path)
    runner = StreamRunner.onnx(m)
    steps = [runner.step(sample_frame(m, [s])) for s in samples]
    reference = pytorch_stream(model, rig, samples)
    for k, (step, (ref_history, ref_logits)) in enumerate(zip(steps, reference)):
        starts_scene = k in (0, 3)
        # zeros at each scene start; the second frame has one earlier frame, the third both
        assert (step.history == 0).all() == starts_scene, k
        assert [bool(np.abs(step.history[0, f]).max() > 0) for f in range(FRAMES)] == [k % 3 >= 1, k % 3 >= 2], k
        scale = max(1.0, float(ref_history.abs().max()))
        np.testing.assert_allclose(step.history, ref_history.numpy(), rtol=0, atol=1e-4 * scale)
        ref = ref_logits.numpy()
        tol = 1e-4 * max(1.0, float(np.abs(ref).max()))
        assert np.abs(step.outputs.logits - ref).max() <= tol, (k, np.abs(step.outputs.logits - ref).max(), tol)
        assert (step.outputs.labels == ref.argmax(-1)).mean() >= 0.999
    # The history matters on the frames that have one: without it the logits move far beyond the tolerance.
    alone = m.run(sample_frame(m, [samples[2]]).images, history=np.zeros(HISTORY_SHAPE, np.float32))["logits"]
    assert np.abs(alone - steps[2].outputs.logits).max() > 100 * tol
    # reset() forgets the streams: the next frame runs with zeros
    runner.reset()
    assert (runner.step(sample_frame(m, [samples[1]])).history == 0).all()


def test_single_frame_export_keeps_its_inputs_and_outputs(rig, dataset, tmp_path):
    single = tiny_student(temporal_frames=0)
    info = export_onnx(single, rig, tmp_path / "single.onnx")
    assert [t.name for t in info.inputs] == ["images"] and [t.name for t in info.outputs] == ["logits", "labels"]
    assert TEMPORAL_NOTE not in info.notes
    sidecar = json.loads(sidecar_path(info.path).read_text())
    assert sidecar["extra_inputs"] == [] and sidecar["extra_outputs"] == []
    m = OnnxOccModel(info.path)
    assert m.history_shape is None and m.output_names == ["logits", "labels"]
    x = m.prepare(dataset[0].images[None])
    assert set(m.run(x)) == {"logits", "labels"}
    with pytest.raises(OccDistillError, match=r"single\.onnx: the export has no history input \(it takes images\)"):
        m.run(x, history=random_history(0))
    with pytest.raises(OccDistillError, match="single-frame export"):
        StreamRunner.onnx(m)


def test_evaluation_int8_and_fp16_of_a_temporal_export(model, exported, dataset, tmp_path):
    m = OnnxOccModel(exported.path)
    with pytest.raises(OccDistillError, match="temporal student is not supported"):
        evaluate_onnx(m, dataset)
    with pytest.raises(OccDistillError, match="INT8 calibration feeds the images only.*history"):
        quantize_int8(exported.path, tmp_path / "int8.onnx", [m.prepare(dataset[0].images[None])])
    # FP16 keeps the history input and the lifted_bev output in float32
    fp16 = OnnxOccModel(convert_fp16(exported.path, tmp_path / "model.fp16.onnx").path)
    assert fp16.history_shape == HISTORY_SHAPE and fp16.output_names == ["logits", "labels", "lifted_bev"]
    inputs = [(m.prepare(dataset[0].images[None]), random_history(0))]
    assert check_parity(model, fp16, inputs, logit_tolerance=None, agreement_bound=None,
                        verbose=False).argmax_agreement >= 0.99


@pytest.fixture(scope="module")
def checkpoint(street, model, tmp_path_factory):
    from occdistill.engine.checkpoint import save_checkpoint
    from occdistill.engine.config import DataConfig, TrainConfig
    from occdistill.models.build import ModelConfig

    run = tmp_path_factory.mktemp("run")
    # Both scenes share the rig (mount_jitter_deg=0): the training split serves as the evaluation one too.
    data = DataConfig(root=str(street.out), train_split=str(street.splits["train"]),
                      val_split=str(street.splits["train"]), image_aug=AUG)
    cfg = TrainConfig(data=data, model=ModelConfig(kind="dense", dense=tiny_config()))
    save_checkpoint(run / "checkpoints", 5, model=model, ema=None, config=cfg, state={})
    return run


def test_cli_export_of_a_temporal_student_streams_its_parity_frames(checkpoint, tmp_path, capsys):
    out = tmp_path / "deploy"
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(out), "--parity-frames", "3",
                 "--threads", "1"]) == 0
    text = capsys.readouterr().out
    assert "history [1, 2, 8, 100, 100] float32" in text and "lifted_bev [1, 8, 100, 100] float32" in text
    assert sorted(p.name for p in out.glob("*.onnx")) == ["model.onnx"]  # FP32 alone by default
    report = json.loads((out / "export.json").read_text())
    parity = report["parity"]["fp32"]
    assert parity["ok"] and parity["frames"] == 4 and parity["max_abs_bev_diff"] <= parity["allowed_bev_diff"]
    assert "3 consecutive val frames of scene" in report["parity_inputs"]
    assert "random history" in report["parity_inputs"]
    for args, message in ((["--precision", "fp32,int8"], "INT8 calibration feeds images only"),
                          (["--eval"], "evaluation of an exported temporal student is not supported")):
        rc = main(["export", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "refused"), *args])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "refused").exists()


def test_cli_side_by_side_feeds_a_temporal_student_a_zero_history(checkpoint, street, tmp_path):
    out = tmp_path / "sbs.json"
    assert main(["bench", "--checkpoint", str(checkpoint), "--data", str(street.out), "--infos",
                 str(street.splits["train"]), "--variants", "eager@1,ort-fp32@1,ort-int8@1", "--repeats", "1",
                 "--warmup", "0", "--no-memory", "--quiet", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    rows = {v["name"]: v for v in report["variants"]}
    assert rows["eager@1"]["ok"] and rows["ort-fp32@1"]["ok"] and rows["ort-fp32@1"]["end_to_end_median_ms"] > 0
    assert rows["ort-fp32@1"]["label_agreement_vs_eager"] >= 0.999 and report["flops"] > 0
    # no INT8 variant for a temporal graph: reported, not run on a made-up calibration
    assert not rows["ort-int8@1"]["ok"]
    assert TEMPORAL_BENCH_NOTE in report["notes"]
    assert any(n.startswith("ort-int8: not made for a temporal student") for n in report["notes"])


def test_the_demo_deployment_refuses_a_temporal_student(checkpoint, tmp_path):
    from occdistill.pipeline.deployment import deploy_student

    with pytest.raises(OccDistillError, match="single-frame student"):
        deploy_student(checkpoint, 0, False, tmp_path)


def test_stream_runner_checks_the_streams(exported, dataset):
    m = OnnxOccModel(exported.path)
    runner = StreamRunner.onnx(m)
    frame = sample_frame(m, [dataset[0]])
    with pytest.raises(OccDistillError, match="runs 1 stream"):
        runner.step(dataclasses.replace(frame, scene_names=("a", "b")))
    with pytest.raises(OccDistillError, match="runs 1 stream"):
        sample_frame(m, [dataset[0], dataset[1]])
