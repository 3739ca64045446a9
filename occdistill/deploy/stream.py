"""Streaming inference of an exported temporal dense student: the frames of a scene in time order,
the BEV history kept on the host.

The exported graph (:mod:`occdistill.deploy.export`, ``cfg.temporal_frames`` F > 0) takes the
history ALREADY warped into the current frame and returns this frame's ``lifted_bev``; the warp,
the reset rule and the pose bookkeeping are :class:`occdistill.nn.temporal.BEVHistory`'s, called
exactly as that module's per-evaluation-frame recipe calls them around the PyTorch model::

    history = None                                    # start, or after reset()
    for frame in frames:                              # one scene (per stream) in time order
        warped = zeros if history is None else history.warped(frame.global_from_ego, frame.scene_names, grid)
        out = engine(frame.images, warped)            # the graph
        history = BEVHistory.push(history, out.lifted_bev, frame.global_from_ego, frame.scene_names, F)

(zeros for a None history: the model's own default, "no earlier frame"). The BEV augmentation is
the identity at inference, so no ``bda`` is passed.

An engine runs the graph: onnxruntime (:func:`onnx_engine`) or the exported module in eager
PyTorch (:func:`eager_engine`), which builds the parity check's real-history inputs
(:func:`streamed_parity_inputs`). The batch of an export is B fixed streams, each playing its own
scene (:class:`StreamFrame`).

Letters: B streams, F earlier frames, C context channels, X Y Z voxels, K classes.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from occdistill.data.sample import Sample
from occdistill.deploy.export import LIFTED_BEV_NAME, ExportWrapper, OnnxOccModel
from occdistill.errors import OccDistillError
from occdistill.geometry.grid import VoxelGrid
from occdistill.models.dense import DenseStudent
from occdistill.nn.temporal import BEVHistory, HistoryLimits


@dataclass(frozen=True)
class StreamFrame:
    """The current frame of B streams.

    images: the graph's image input in the export's layout (B, ...) (``OnnxOccModel.prepare``);
    global_from_ego (B, 4, 4) float64: each stream's raw key ego pose;
    scene_names (B,): the scene each stream is in (a change resets that stream's history).
    """

    images: np.ndarray
    global_from_ego: torch.Tensor
    scene_names: tuple[str, ...]


@dataclass(frozen=True)
class GraphOutputs:
    """One run of a temporal graph: logits (B, X, Y, Z, K) float32, labels (B, X, Y, Z) uint8,
    lifted_bev (B, C, X, Y) float32 (the next frame's newest history slot)."""

    logits: np.ndarray
    labels: np.ndarray
    lifted_bev: np.ndarray


@dataclass(frozen=True)
class StreamStep:
    """One frame played: the history input it ran with (B, F, C, X, Y) float32 and the outputs."""

    history: np.ndarray
    outputs: GraphOutputs


Engine = Callable[[np.ndarray, np.ndarray], GraphOutputs]
"""(images in the export's layout, history (B, F, C, X, Y) float32) -> the graph's outputs."""


def onnx_engine(model: OnnxOccModel) -> Engine:
    """The exported graph in onnxruntime."""
    def run(images: np.ndarray, history: np.ndarray) -> GraphOutputs:
        out = model.run(images, history=history)
        return GraphOutputs(out["logits"], out["labels"], out[LIFTED_BEV_NAME])
    return run


def eager_engine(wrapper: ExportWrapper) -> Engine:
    """The exported module (baked rig, fixed-rig pooling) in eager PyTorch, in inference mode."""
    device = wrapper.model.pixel_mean.device

    def run(images: np.ndarray, history: np.ndarray) -> GraphOutputs:
        feeds = wrapper.feeds((torch.from_numpy(images).to(device), torch.from_numpy(history).to(device)))
        with torch.inference_mode():
            logits, labels, lifted = (t.cpu().numpy() for t in wrapper(**feeds))
        return GraphOutputs(logits, labels, lifted)
    return run


class StreamRunner:
    """Plays the frames of B streams in time order through a temporal graph, keeping their
    :class:`~occdistill.nn.temporal.BEVHistory` (see the module docstring for the loop).

    ``history_shape`` (B, F, C, X, Y) is the graph's history input; ``grid`` the voxel grid whose
    (X, Y) cells the BEVs cover; ``limits`` the reset rule's motion limits. Call :meth:`reset`
    before playing unrelated frames (a new run of the same scenes, a resumed log): the reset rule
    only sees scene names and ego motion.
    """

    def __init__(self, engine: Engine, grid: VoxelGrid, history_shape: Sequence[int],
                 limits: HistoryLimits = HistoryLimits()):
        if len(history_shape) != 5 or tuple(history_shape[3:]) != tuple(grid.shape[:2]):
            raise OccDistillError(f"history shape {tuple(history_shape)} is not (B, F, C, X, Y) over the grid's "
                                  f"{grid.shape[0]}x{grid.shape[1]} BEV cells")
        self.engine = engine
        self.grid = grid
        self.history_shape = tuple(int(d) for d in history_shape)
        self.limits = limits
        self.history: BEVHistory | None = None

    @classmethod
    def onnx(cls, model: OnnxOccModel, limits: HistoryLimits = HistoryLimits()) -> "StreamRunner":
        """A runner over an exported temporal graph in onnxruntime."""
        if model.history_shape is None:
            raise OccDistillError(f"{model.path.name}: a single-frame export (no history input); run it frame by "
                                  "frame with OnnxOccModel.run")
        return cls(onnx_engine(model), model.grid, model.history_shape, limits)

    @classmethod
    def eager(cls, wrapper: ExportWrapper, limits: HistoryLimits = HistoryLimits()) -> "StreamRunner":
        """A runner over the exported module of a temporal student in eager PyTorch."""
        if not wrapper.temporal_frames:
            raise OccDistillError("a single-frame model (temporal_frames = 0) has no history to stream")
        return cls(eager_engine(wrapper), wrapper.model.grid, wrapper.history_shape(), limits)

    @property
    def frames(self) -> int:
        return self.history_shape[1]

    def reset(self) -> None:
        """Forget every stream's earlier frames (the next frame runs with a zero history)."""
        self.history = None

    def _check(self, frame: StreamFrame) -> None:
        streams = self.history_shape[0]
        if len(frame.scene_names) != streams or tuple(frame.global_from_ego.shape) != (streams, 4, 4):
            raise OccDistillError(f"a frame of {len(frame.scene_names)} scene name(s) and poses "
                                  f"{tuple(frame.global_from_ego.shape)}: the graph runs {streams} stream(s), "
                                  f"(B, 4, 4) poses with B = {streams}")

    def history_input(self, frame: StreamFrame) -> np.ndarray:
        """The graph's history input (B, F, C, X, Y) float32 for ``frame``: every usable earlier
        BEV warped into its ego frame, zeros elsewhere (all zeros with no history)."""
        if self.history is None:
            return np.zeros(self.history_shape, dtype=np.float32)
        warped = self.history.warped(frame.global_from_ego, frame.scene_names, self.grid, limits=self.limits)
        return np.ascontiguousarray(warped.numpy(), dtype=np.float32)

    def step(self, frame: StreamFrame) -> StreamStep:
        """Run ``frame`` with its history, then push its lifted BEV as the newest slot."""
        self._check(frame)
        history = self.history_input(frame)
        out = self.engine(frame.images, history)
        self.history = BEVHistory.push(self.history, torch.from_numpy(out.lifted_bev), frame.global_from_ego,
                                       frame.scene_names, self.frames)
        return StreamStep(history, out)


def sample_frame(onnx_model: OnnxOccModel, samples: Sequence[Sample]) -> StreamFrame:
    """The current samples of the B streams (evaluation transform, no augmentation) -> a
    :class:`StreamFrame` in the export's input layout; each sample's calibration must pass the
    baked rig's check (:meth:`OnnxOccModel.check_rig`)."""
    batch = onnx_model.input_shape[0]
    if len(samples) != batch:
        raise OccDistillError(f"{onnx_model.path.name} runs {batch} stream(s), got {len(samples)} sample(s)")
    for s in samples:
        onnx_model.check_rig(s.intrinsics, s.img_from_raw, s.ego_from_cam, s.camera_names)
    # B x (N, 3, H, W) -> (B, N, 3, H, W) -> the graph's layout
    images = onnx_model.prepare(torch.stack([s.images for s in samples]))
    return StreamFrame(images, torch.stack([s.global_from_ego.double() for s in samples]),
                       tuple(s.scene_name for s in samples))


def streamed_parity_inputs(model: DenseStudent, onnx_model: OnnxOccModel,
                           samples: Sequence[Sample]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Parity inputs (images, history) of consecutive frames of ONE scene (``samples``, time
    order), every stream of the export playing that scene: the history is streamed by the eager
    exported module (the reference), so the first frame's is zeros and the later ones are real
    warped BEVs. Each frame's calibration is checked against the baked rig."""
    if len({s.scene_name for s in samples}) > 1:
        raise OccDistillError(f"parity frames of one scene, got scenes {sorted({s.scene_name for s in samples})}")
    wrapper = ExportWrapper(copy.deepcopy(model).eval(), onnx_model.rig, batch=onnx_model.input_shape[0],
                            input_format=onnx_model.input_format).eval()
    runner = StreamRunner.eager(wrapper)
    inputs = []
    for s in samples:
        frame = sample_frame(onnx_model, [s] * wrapper.batch)
        inputs.append((frame.images, runner.step(frame).history))
    return inputs


__all__ = [
    "Engine", "GraphOutputs", "StreamFrame", "StreamRunner", "StreamStep", "eager_engine", "onnx_engine",
    "sample_frame", "streamed_parity_inputs",
]
