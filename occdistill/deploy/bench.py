"""Latency, memory and FLOPs of the models the engine trains, with the per-stage (Amdahl) profile.

Seed 000 found that shrinking voxelisation alone was bounded by Amdahl's law: the backbone and the
data pipeline were fixed costs. This module measures where the time goes, for every model kind of
:data:`occdistill.models.build.MODEL_KINDS` (dense student, sparse-query student, Gaussian teacher):

- **engine-only**: model forward + labels on a batch already on the device (what FlashOcc's
  ``benchmark_trt.py`` reports as FPS, plus the step to class ids: the argmax, or the sparse
  model's voxelisation of its points);
- **end-to-end** (with a dataset): read + decode + resize/crop of every sample, collate,
  ``to(device)``, forward, labels, one after the other in this process (no loader workers);
- **stages** of the engine-only forward, timed by :func:`profiled_forward`, which calls the
  model's sub-modules one by one and reproduces the model's ``forward`` exactly (tested). The
  stages depend on the kind (:data:`KIND_STAGES`):

  - dense (:data:`STAGES`): backbone (with input normalisation), neck, depth_net (camera
    parameters, depth/context convs, softmax), pooling (``LSSViewTransformer.splat``: the depth x
    context outer product, on the training path also the ego geometry of the frustum, and the BEV
    pooling), bev_encoder (with the temporal fusion of a temporal student, on a zero history),
    head (C2H), argmax (to uint8 class ids);
  - sparse (:data:`SPARSE_STAGES`): backbone (with input normalisation), neck (multi-level FPN),
    decoder (camera projection matrices, initial points, every decoder layer), voxelize
    (``SparseOccStudent.voxelize`` of the final points, to uint8 class ids); a model with the
    DiScene† depth branch (``cfg.depth_prior``, :data:`SPARSE_PRIOR_STAGES`) also depth_prior: the
    branch's calls in every decoder layer (projection of the layer's input points, lookup of the
    prior depth map, MLP), timed apart from the rest of the decoder. Its prior depth map is an
    input (:attr:`EngineInputs.prior_depth`): the dataset's depth maps, or a synthetic map;
  - gaussian (:data:`GAUSSIAN_STAGES`): backbone, neck, lift (``DistributionLifter``: depth net
    and rays, depth softmax, selection of the initial means, context gather, the initial Gaussians
    with the learnable anchors), refine (projection matrices, every refinement block with its
    Gaussian embedding), splat (probabilistic superposition into voxel probabilities, class
    reordering, the BEV collapse of the output), argmax (to uint8 class ids);
- **both pooling paths** of the dense student in one run: the training path
  (``bev_pool_scatter`` on the batch's geometry) and the exportable path (plan precomputed for the
  fixed rig of the batch's first sample). Each round runs every path and one end-to-end batch in
  turn, so that all of them share the background load of a shared machine; minima are reported
  next to medians. The other kinds have one path, ``forward`` (no BEV pooling to choose);
- **FLOPs** with ``torch.utils.flop_counter.FlopCounterMode``: formula counts of matmul/conv-type
  ops only (conv, mm, addmm, bmm, einsum through bmm), 2 FLOPs per multiply-add; elementwise ops,
  softmax, index_add, cumsum, gathers, grid_sample, sorting and the argmax count zero. ``gmacs`` =
  FLOPs / 2 is the unit of mmcv's ``get_flops``, which FlashOcc's published "GFLOPs" come from;
- **peak memory**: on CUDA ``torch.cuda.max_memory_allocated`` during one forward minus what was
  allocated before it (the resident weights and inputs); on CPU the increase of the process's peak
  resident set (Linux ``VmHWM``, reset through ``/proc/self/clear_refs`` after ``malloc_trim``)
  over the resident set before the forward. ``tracemalloc`` does not see torch's allocations, and
  ``ru_maxrss`` cannot be reset: it is only the fallback (an upper bound), named in the result.

Medians and p90 (numpy ``percentile``, linear) over ``repeats`` after ``warmup`` rounds. On CUDA
every stage boundary synchronises, so the engine latency is taken from separate unsynchronised
forwards; on CPU synchronisation is a no-op and the profiled forward is the latency sample.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import gc
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence, Union

import numpy as np
import torch

from occdistill.deploy.export import synthetic_prior_depth
from occdistill.deploy.rig import Rig, eval_image_transform, nuscenes_rig
from occdistill.errors import OccDistillError
from occdistill.geometry import img_from_ego_matrices, yaw_transform
from occdistill.models.build import MODEL_KINDS
from occdistill.models.dense import DenseOutput, DenseStudent
from occdistill.models.gaussian import GaussianOutput, GaussianTeacher
from occdistill.models.sparse import SparseOccStudent, SparseOutput
from occdistill.nn.gaussian_splat import bev_collapse, free_last_to_table, splat_gaussians
from occdistill.nn.view_transform import FixedRigPlans, camera_parameters

STAGES = ("backbone", "neck", "depth_net", "pooling", "bev_encoder", "head", "argmax")  # dense student
SPARSE_STAGES = ("backbone", "neck", "decoder", "voxelize")
SPARSE_PRIOR_STAGES = ("backbone", "neck", "decoder", "depth_prior", "voxelize")  # sparse with cfg.depth_prior
GAUSSIAN_STAGES = ("backbone", "neck", "lift", "refine", "splat", "argmax")
KIND_STAGES = {"dense": STAGES, "sparse": SPARSE_STAGES, "gaussian": GAUSSIAN_STAGES}
PATHS = ("train", "export")  # dense: pooling on the batch geometry (scatter) / precomputed fixed-rig plan
FORWARD_PATH = "forward"  # the one path of the other kinds
POOLING = {
    "train": "bev_pool_scatter (per-batch geometry)",
    "export": "bev_pool_precomputed (fixed rig)",
    FORWARD_PATH: "none (no BEV pooling in this model)",
}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
FLOP_COUNT_NOTE = (
    "FlopCounterMode counts matmul/conv-type ops only (2 FLOPs per multiply-add); gmacs = flops / 2 "
    "is mmcv get_flops' unit (FlashOcc's published GFLOPs)"
)
# The models bench can profile (a staged forward per kind of MODEL_KINDS, see _STAGED_FORWARDS).
BenchableModel = Union[DenseStudent, SparseOccStudent, GaussianTeacher]


@dataclass(frozen=True)
class StageTiming:
    """One stage of the forward in ms: median, p90 and minimum (background load only adds time: on a
    shared machine the minimum is the less noisy estimate); ``share`` = median / sum of the stage
    medians."""

    name: str
    median_ms: float
    p90_ms: float
    min_ms: float
    share: float
    gflops: float | None = None


@dataclass(frozen=True)
class PathProfile:
    """Engine-only timing of one path: the dense student's ``train`` or ``export`` pooling path, or
    the other kinds' ``forward``."""

    path: str
    pooling: str
    latency_median_ms: float
    latency_p90_ms: float
    latency_min_ms: float
    fps: float
    stages: tuple[StageTiming, ...]

    def stage(self, name: str) -> StageTiming:
        return next(s for s in self.stages if s.name == name)

    @property
    def pooling_share(self) -> float | None:
        """Share of the BEV pooling stage (None for the kinds without one)."""
        return next((s.share for s in self.stages if s.name == "pooling"), None)


@dataclass(frozen=True)
class BenchResult:
    """Everything ``occdistill bench`` reports; :meth:`to_dict` is the JSON.

    ``kind``: the model kind (dense, sparse, gaussian); the stage names are that kind's
    (:data:`KIND_STAGES`). The headline latency/FPS/stages are the first path: for the dense
    student the training (scatter) path, the one ``forward`` takes without a fixed rig; ``paths``
    has both pooling paths (the other kinds: the one ``forward`` path). FPS = samples per second.
    ``peak_memory_mb``: memory of one engine-only forward + labels above the resident weights and
    inputs (``peak_memory_kind`` says how it was measured); ``model_memory_mb``: parameters + buffers.
    """

    model: str
    kind: str
    device: str
    dtype: str
    batch: int
    cameras: int
    image_size: tuple[int, int]
    input_source: str
    rig: str
    repeats: int
    warmup: int
    latency_median_ms: float
    latency_p90_ms: float
    latency_min_ms: float
    fps: float
    stages: tuple[StageTiming, ...]
    paths: tuple[PathProfile, ...]
    export_plan_ms: float | None
    export_over_train_latency: float | None
    export_over_train_pooling: float | None
    params: int
    flops: int | None
    gflops: float | None
    gmacs: float | None
    peak_memory_mb: float | None
    peak_memory_kind: str
    model_memory_mb: float
    end_to_end_median_ms: float | None
    end_to_end_p90_ms: float | None
    end_to_end_min_ms: float | None
    end_to_end_fps: float | None
    data_pipeline_ms_per_sample: float | None
    data_share_of_end_to_end: float | None
    machine: dict[str, Any]
    notes: tuple[str, ...] = ()

    def path(self, name: str) -> PathProfile:
        return next(p for p in self.paths if p.path == name)

    @property
    def pooling_share(self) -> float | None:
        """Share of the dense student's BEV pooling stage (None for the other kinds)."""
        return self.paths[0].pooling_share

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["pooling_share"] = self.pooling_share
        for p, d in zip(self.paths, out["paths"]):
            d["pooling_share"] = p.pooling_share
        return out


@dataclass
class EngineInputs:
    """A batch on the device: images (B, N, 3, H, W) in [0, 1]; intrinsics, img_from_raw
    (B, N, 3, 3); ego_from_cam (B, N, 4, 4) (``Batch.ego_from_cam``, BEV augmentation included);
    prior_depth (B, N, H, W) metres, 0 = none, for a model that reads a prior depth map (the sparse
    student's depth branch), else None; ``prior_source`` says where it came from."""

    images: torch.Tensor
    intrinsics: torch.Tensor
    img_from_raw: torch.Tensor
    ego_from_cam: torch.Tensor
    source: str
    rig: str
    prior_depth: torch.Tensor | None = None
    prior_source: str = ""

    def args(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.images, self.intrinsics, self.img_from_raw, self.ego_from_cam


@dataclass
class StagedOutput:
    """:func:`profiled_forward`'s result: the model's output (the dataclass its ``forward``
    returns) and the labels (B, X, Y, Z) uint8 class ids."""

    output: DenseOutput | SparseOutput | GaussianOutput
    labels: torch.Tensor


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StageClock:
    """Records the seconds (and, under a FlopCounterMode, the FLOPs) of consecutive stages.

    ``start()`` then ``lap(name)`` at the end of every stage; synchronises CUDA at each boundary.
    """

    def __init__(self, device: torch.device, flop_counter: Any = None):
        self.device = device
        self.flop_counter = flop_counter
        self.seconds: dict[str, float] = {}
        self.flops: dict[str, int] = {}

    def _flops(self) -> int:
        return int(self.flop_counter.get_total_flops()) if self.flop_counter is not None else 0

    def start(self) -> None:
        sync(self.device)
        self._f = self._flops()
        self._t = time.perf_counter()

    def lap(self, name: str) -> None:
        """End the current stage; a stage lapped several times (the sparse depth branch, once per
        decoder layer, interleaved with the decoder) accumulates its time and FLOPs."""
        sync(self.device)
        t = time.perf_counter()
        self.seconds[name] = self.seconds.get(name, 0.0) + t - self._t
        f = self._flops()
        self.flops[name] = self.flops.get(name, 0) + f - self._f
        self._t, self._f = t, f

    @property
    def total(self) -> float:
        return sum(self.seconds.values())


Lap = Callable[[str], None]  # marks the end of the named stage


def model_kind(model: torch.nn.Module) -> str:
    """The kind (dense, sparse, gaussian) of a model bench can profile; an error for anything else."""
    kind = next((k for k, (_, cls) in MODEL_KINDS.items() if isinstance(model, cls)), None)
    if kind not in _STAGED_FORWARDS:  # also a kind added to MODEL_KINDS without its staged forward here
        raise OccDistillError(f"bench profiles {', '.join(_STAGED_FORWARDS)} models; got a {type(model).__name__}")
    return kind


def takes_prior_depth(model: torch.nn.Module) -> bool:
    """The model reads a prior depth map per camera: the sparse student's DiScene† depth branch."""
    return isinstance(model, SparseOccStudent) and model.cfg.depth_prior


def model_stages(model: BenchableModel) -> tuple[str, ...]:
    """The stages of the model's profile, in order: its kind's (:data:`KIND_STAGES`), with
    depth_prior for a sparse model with the depth branch."""
    return SPARSE_PRIOR_STAGES if takes_prior_depth(model) else KIND_STAGES[model_kind(model)]


def predict_labels(voxel_logits: torch.Tensor) -> torch.Tensor:
    """(B, X, Y, Z, K) logits -> (B, X, Y, Z) uint8 class ids (softmax is monotonic: not needed)."""
    return voxel_logits.argmax(dim=-1).to(torch.uint8)


def output_labels(model: BenchableModel, output: DenseOutput | SparseOutput | GaussianOutput) -> torch.Tensor:
    """A model's output -> (B, X, Y, Z) uint8 class ids, as the engine's evaluation predicts them:
    the sparse student voxelises its final points, the others take the argmax of the voxel logits."""
    if isinstance(model, SparseOccStudent):
        return model.voxelize(output).to(torch.uint8)
    return predict_labels(output.voxel_logits)


def forward_labels(model: BenchableModel, *cams: torch.Tensor, prior_depth: torch.Tensor | None = None) -> torch.Tensor:
    """``model(images, intrinsics, img_from_raw, ego_from_cam)`` (+ ``prior_depth`` for a model
    that reads one) -> uint8 labels, unstaged (no synchronisation between stages: the CUDA latency,
    end-to-end and memory samples)."""
    _check_prior(model, prior_depth)
    return output_labels(model, model(*cams) if prior_depth is None else model(*cams, prior_depth=prior_depth))


def _check_prior(model: BenchableModel, prior_depth: torch.Tensor | None) -> None:
    if takes_prior_depth(model) and prior_depth is None:
        raise OccDistillError("the model has the depth-prior branch (model.sparse.depth_prior): give it a prior "
                              "depth map (B, N, H, W) metres (EngineInputs.prior_depth)")
    if prior_depth is not None and not takes_prior_depth(model):
        raise OccDistillError(f"a prior depth map was given, but this {type(model).__name__} reads none")


def profiled_forward(
    model: BenchableModel,
    images: torch.Tensor,
    intrinsics: torch.Tensor,
    img_from_raw: torch.Tensor,
    ego_from_cam: torch.Tensor,
    clock: StageClock | None = None,
    prior_depth: torch.Tensor | None = None,
) -> StagedOutput:
    """The model's ``forward`` + labels, sub-module by sub-module, with a lap of ``clock`` after
    every stage of the model (:func:`model_stages`). Must stay numerically identical to ``forward``
    and :func:`output_labels` (tested for every kind). ``prior_depth`` (B, N, H, W) metres: the
    input of a sparse model with the depth branch (required there, refused elsewhere)."""
    kind = model_kind(model)
    if tuple(images.shape[-2:]) != tuple(model.cfg.image_size):
        raise OccDistillError(f"images are {tuple(images.shape[-2:])}, the model expects {model.cfg.image_size}")
    _check_prior(model, prior_depth)
    lap = clock.lap if clock is not None else (lambda name: None)
    if clock is not None:
        clock.start()
    if kind == "sparse":
        return _sparse_stages(model, images, intrinsics, img_from_raw, ego_from_cam, lap, prior_depth)
    return _STAGED_FORWARDS[kind](model, images, intrinsics, img_from_raw, ego_from_cam, lap)


def _dense_stages(model: DenseStudent, images: torch.Tensor, intrinsics: torch.Tensor, img_from_raw: torch.Tensor,
                  ego_from_cam: torch.Tensor, lap: Lap) -> StagedOutput:
    """``DenseStudent.forward`` (no history: a temporal student fuses zeros, as at a scene start)."""
    batch, cams = images.shape[:2]
    # image_features(): (B, N, 3, H, W) -> (B*N, 3, H, W), normalise, ResNet, FPN -> (B, N, C, h, w)
    x = (images.flatten(0, 1) - model.pixel_mean) / model.pixel_std
    pyramid = model.backbone(x)  # per-stage feature maps of the out_indices
    lap("backbone")
    feats = model.neck(pyramid)
    feats = feats.view(batch, cams, *feats.shape[1:])
    lap("neck")
    # LSSViewTransformer.forward(), lift then splat
    vt = model.view_transform
    _, _, channels, h, w = feats.shape
    params = None
    if vt.depth_net.camera_aware:
        params = camera_parameters(intrinsics, img_from_raw, ego_from_cam, vt.image_size)
        params = params.to(feats.dtype).reshape(batch * cams, -1)  # (B*N, P)
    depth_logits, context = vt.depth_net(feats.reshape(batch * cams, channels, h, w), params)
    depth = depth_logits.softmax(dim=1).view(batch, cams, -1, h, w)  # (B, N, D, h, w)
    context = context.view(batch, cams, vt.context_channels, h, w)  # (B, N, C, h, w)
    lap("depth_net")
    lifted = vt.splat(depth, context, intrinsics, img_from_raw, ego_from_cam)  # (B, C, X, Y)
    lifted = vt.add_ground(lifted, feats, intrinsics, img_from_raw, ego_from_cam)  # the pooling stage includes it
    lap("pooling")
    bev = lifted
    if model.cfg.temporal_frames:  # history (B, F, C, X, Y) of zeros: forward's default without history
        bev = model.temporal(bev, bev.new_zeros((batch, model.cfg.temporal_frames, *bev.shape[1:])))
    bev = model.bev_encoder(bev)
    lap("bev_encoder")
    logits = model.head(bev)  # (B, X, Y, Z, K)
    lap("head")
    labels = predict_labels(logits)
    lap("argmax")
    out = DenseOutput(voxel_logits=logits, bev_feature=bev, depth=depth, image_features=feats, lifted_bev=lifted)
    return StagedOutput(output=out, labels=labels)


def _multilevel_features(model: SparseOccStudent | GaussianTeacher, images: torch.Tensor,
                         lap: Lap) -> list[torch.Tensor]:
    """``image_features()`` of the sparse student and the Gaussian teacher, with a lap after the
    backbone and after the neck: (B, N, 3, H, W) -> normalised (B*N, 3, H, W) -> ResNet -> L FPN
    levels (B, N, C, h_l, w_l), fine to coarse."""
    batch, cams = images.shape[:2]
    pyramid = model.backbone((images.flatten(0, 1) - model.pixel_mean) / model.pixel_std)
    lap("backbone")
    feats = [f.view(batch, cams, *f.shape[1:]) for f in model.neck(pyramid)]
    lap("neck")
    return feats


def _sparse_stages(model: SparseOccStudent, images: torch.Tensor, intrinsics: torch.Tensor,
                   img_from_raw: torch.Tensor, ego_from_cam: torch.Tensor, lap: Lap,
                   prior_depth: torch.Tensor | None) -> StagedOutput:
    """``SparseOccStudent.forward`` without extra query groups, then ``voxelize``. With the depth
    branch, hooks on each layer's ``depth_prior`` module lap "decoder" when the branch starts and
    "depth_prior" when it ends, so ``decode`` itself runs unchanged and the two stages interleave."""
    batch = images.shape[0]
    feats = _multilevel_features(model, images, lap)
    proj = model.img_from_ego(intrinsics, img_from_raw, ego_from_cam)  # (B, N, 3, 4)
    init = model.initial_points(batch)  # (B, Q, 3) metres
    hooks = []
    if prior_depth is not None:
        for layer in model.decoder:
            hooks.append(layer.depth_prior.register_forward_pre_hook(lambda *_: lap("decoder")))
            hooks.append(layer.depth_prior.register_forward_hook(lambda *_: lap("depth_prior")))
    try:
        layers = model.decode(init, feats, proj, prior_depth)
    finally:
        for hook in hooks:
            hook.remove()
    lap("decoder")
    out = SparseOutput(init_points=init, layers=layers, image_features=feats, extra={}, grid=model.grid,
                       classes=model.classes)
    labels = output_labels(model, out)
    lap("voxelize")
    return StagedOutput(output=out, labels=labels)


def _gaussian_stages(model: GaussianTeacher, images: torch.Tensor, intrinsics: torch.Tensor,
                     img_from_raw: torch.Tensor, ego_from_cam: torch.Tensor, lap: Lap) -> StagedOutput:
    """``GaussianTeacher.forward`` then the argmax."""
    cfg = model.cfg
    feats = _multilevel_features(model, images, lap)
    depth_logits, context, rays = model.lifter(feats[0], intrinsics, img_from_raw, ego_from_cam)
    init_depth = depth_logits.softmax(dim=2)  # (B, N, D+1, h, w)
    means, ray_index = model.lifter.select(init_depth, rays)  # (B, G0, 3), (B, G0)
    ctx = context.permute(0, 1, 3, 4, 2).flatten(1, 3)  # (B, N*h*w, E)
    lifted = ctx.gather(1, ray_index[..., None].expand(-1, -1, ctx.shape[-1]))  # (B, G0, E)
    g, x = model.initial_gaussians(means, lifted)
    lap("lift")
    img_from_ego = img_from_ego_matrices(intrinsics, img_from_raw, ego_from_cam).to(x.dtype)  # (B, N, 3, 4)
    history = [g]
    for block in model.blocks:
        x, g = block(x, g, model.embedding(g), feats, img_from_ego)
        history.append(g)
    lap("refine")
    splat = splat_gaussians(
        g.means, g.scales, g.rotations, g.opacities, g.semantics, model.grid,
        cutoff=cfg.cutoff, chunk_size=cfg.splat_chunk, opacity_in_geometry=cfg.opacity_in_geometry,
        density_normalised=cfg.density_normalised, checkpoint=cfg.splat_checkpoint,
    )
    probs = free_last_to_table(splat.probs, cfg.free_index)  # (B, X, Y, Z, K) in the table's order
    log_probs = free_last_to_table(splat.log_probs, cfg.free_index)
    free_index = cfg.free_index % cfg.num_classes
    # Not needed for the labels, but part of forward's output (the teacher's BEV target).
    bev = bev_collapse(probs, free_index).permute(0, 3, 1, 2)  # (B, X, Y, K) -> (B, K, X, Y)
    lap("splat")
    labels = predict_labels(log_probs)
    lap("argmax")
    out = GaussianOutput(
        voxel_probs=probs, voxel_logits=log_probs, bev_feature=bev, init_depth=init_depth,
        init_depth_logits=depth_logits, init_rays=rays, gaussians=history, features=x, grid=model.grid,
        free_index=free_index, splat_pairs=splat.pairs,
    )
    return StagedOutput(output=out, labels=labels)


_STAGED_FORWARDS: dict[str, Callable[..., StagedOutput]] = {
    "dense": _dense_stages, "sparse": _sparse_stages, "gaussian": _gaussian_stages,
}


def count_stage_flops(model: BenchableModel, inputs: EngineInputs) -> dict[str, int]:
    """FLOPs of each stage of one forward (FlopCounterMode: matmul/conv-type ops, 2 per multiply-add).

    A dense student runs with its current pooling path; only the training path's frustum geometry
    (an einsum) counts anything in the pooling stage.
    """
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        clock = StageClock(inputs.images.device, counter)
        profiled_forward(model, *inputs.args(), clock=clock, prior_depth=inputs.prior_depth)
    return clock.flops


# ---------------------------------------------------------------------------------------------
# model and inputs

_TRAIN_SECTIONS = ("data", "model", "optim", "loss", "distill", "runtime")


def _yaml_mapping(path: Path) -> dict:
    import yaml

    from occdistill.errors import ConfigError

    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return loaded


@dataclass
class BenchModel:
    """A model to benchmark, its description, and the training config's data section (dataset
    format and camera order) when it came from a training config or checkpoint."""

    model: torch.nn.Module
    name: str
    data: Any = None


def load_bench_model(
    config: str | Path | None = None,
    checkpoint: str | Path | None = None,
    overrides: Sequence[str] = (),
    weights: str = "ema",
) -> BenchModel:
    """The model of a config (random weights) or of a checkpoint.

    ``config``: a training config of any model kind (YAML with any of the sections
    data/model/optim/loss/distill/runtime, e.g. ``model: {kind: sparse, sparse: {...}}``, or a
    built-in name such as ``street-tiny``; built by :func:`occdistill.models.build.build_model`)
    or a bare dense-model YAML (the fields of :class:`DenseStudentConfig`); ``overrides`` are
    ``key=value`` in that file's key space. ``checkpoint``: a checkpoint or run directory
    (:func:`occdistill.engine.checkpoint.load_checkpoint`), with its EMA weights when ``weights``
    is "ema" and it has them, else the raw weights.
    """
    from occdistill.config import load_config
    from occdistill.engine.config import load_train_config, resolve_config_path
    from occdistill.models.build import build_model
    from occdistill.models.dense import DenseStudentConfig

    if (config is None) == (checkpoint is None):
        raise OccDistillError("give exactly one of a config and a checkpoint")
    if checkpoint is not None:
        from occdistill.engine.checkpoint import load_trained_model

        trained = load_trained_model(checkpoint, weights)
        ckpt = trained.checkpoint
        name = f"{ckpt.config.model.kind} ({ckpt.path}, step {ckpt.step}, {'ema' if trained.ema else 'model'} weights)"
        return BenchModel(trained.model, name, ckpt.config.data)
    path = resolve_config_path(config)
    if set(_yaml_mapping(path)) & set(_TRAIN_SECTIONS):
        cfg = load_train_config(path, list(overrides))
        return BenchModel(build_model(cfg.model), f"{cfg.model.kind} ({path.name})", cfg.data)
    return BenchModel(DenseStudent(load_config(DenseStudentConfig, path, list(overrides))), f"dense ({path.name})")


# ---------------------------------------------------------------------------------------------
# inputs


OCCSCANNET_RAW_SIZE = (480, 640)  # (H, W): ISO's Occ-ScanNet input


def occscannet_rig(image_size: tuple[int, int]) -> Rig:
    """One ScanNet-like camera in the Occ-ScanNet ego frame (origin at the bottom centre of the
    label grid, z up) at network input ``image_size``: 640x480 raw images, focal length 578 px
    (ScanNet's 640x480 depth camera), 1.4 m high, level, 2 m behind the grid centre looking along +x
    so that the 4.8 m grid is in view. Occ-ScanNet frames have one camera: timing a model trained on
    them on the 6-camera nuScenes rig would cost 6x its real forward."""
    k = np.array([[578.0, 0.0, 320.0], [0.0, 578.0, 240.0], [0.0, 0.0, 1.0]])
    # OpenCV camera axes (x right, y down, z forward) -> ego (x forward, y left, z up).
    ego_from_opencv = np.array(
        [[0.0, 0.0, 1.0, 0.0], [-1.0, 0.0, 0.0, 0.0], [0.0, -1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]]
    )
    pose = yaw_transform(0.0, -2.0, 0.0, 1.4) @ ego_from_opencv
    aug = eval_image_transform(OCCSCANNET_RAW_SIZE, image_size)
    as_tensor = lambda a: torch.from_numpy(np.asarray(a)[None]).float()  # noqa: E731  (1, ...) float32
    return Rig(as_tensor(k), as_tensor(aug), as_tensor(pose), "synthetic Occ-ScanNet-like single camera",
               camera_names=("CAM",), raw_size=OCCSCANNET_RAW_SIZE)


def synthetic_rig(fmt: str, image_size: tuple[int, int]) -> Rig:
    """The rig of engine-only runs without a dataset: a model for ``fmt`` data ("occ3d": the
    nuScenes 6-camera rig of :func:`nuscenes_rig`; "occscannet": :func:`occscannet_rig`)."""
    if fmt == "occ3d":
        return nuscenes_rig(image_size)
    if fmt == "occscannet":
        return occscannet_rig(image_size)
    raise OccDistillError(f"unknown dataset format {fmt!r} (occ3d or occscannet)")


def synthetic_inputs(
    model: BenchableModel, batch: int = 1, rig: Rig | None = None, device: str | torch.device = "cpu", seed: int = 0
) -> EngineInputs:
    """Random images at the model's input size on a camera rig (default: the nuScenes rig of
    :func:`nuscenes_rig`, real calibration when available); for a model with the depth branch
    also a random prior depth map
    (:func:`occdistill.deploy.export.synthetic_prior_depth`)."""
    rig = rig if rig is not None else nuscenes_rig(model.cfg.image_size)
    gen = torch.Generator().manual_seed(seed)
    cams = rig.intrinsics.shape[0]
    images = torch.rand(batch, cams, 3, *model.cfg.image_size, generator=gen)
    k, aug, pose = rig.batched(batch, device)
    prior, prior_source = None, ""
    if takes_prior_depth(model):
        prior, prior_source = synthetic_prior_depth(model.cfg.grid.range, (batch, cams, *model.cfg.image_size), gen,
                                                    device)
    return EngineInputs(images.to(device), k, aug, pose, source="synthetic random images", rig=rig.source,
                        prior_depth=prior, prior_source=prior_source)


def _data_file(root: Path, name: str | Path, what: str) -> Path:
    """``name`` as given, else under ``root``; an error naming it when neither exists."""
    from occdistill.errors import DataError

    p = Path(name)
    if p.is_file():
        return p
    if not p.is_absolute() and (root / p).is_file():
        return root / p
    raise DataError(f"{name}: {what} not found")


def open_bench_dataset(
    fmt: str, data_root: str | Path, infos: str | Path | None, image_size: tuple[int, int],
    cameras: Sequence[str] = (), image_aug: Any = None, depth: str = "none",
):
    """An evaluation-mode dataset (no labels: deployment does not read them) whose images are
    resized/cropped to the network input ``image_size``.

    ``fmt`` "occ3d": ``infos`` is the info pickle (required), ``cameras`` orders the cameras
    (empty: the order of the infos). "occscannet" (``occdistill synth --preset room`` writes it):
    ``infos`` is an optional split list of frame pickles (e.g. ``val_subscenes.txt``; None: every
    frame under the root), one camera. ``image_aug``: the training config's ImageAugConfig (its
    evaluation transform is used), default a bottom-aligned cover resize to ``image_size``.
    ``depth``: also load each camera's depth map (the prior of a depth-branch model), as the
    training config's ``data.depth`` says (auto, lidar, rendered; occscannet: any but "none" reads
    the frame's depth PNG); "none": no depth."""
    from occdistill.data.augment import ImageAugConfig
    from occdistill.errors import DataError

    root = Path(data_root)
    if not root.is_dir():
        raise DataError(f"{root}: data root not found")
    aug = image_aug if image_aug is not None else ImageAugConfig(final_size=tuple(image_size))
    if tuple(aug.final_size) != tuple(image_size):
        raise DataError(f"image pipeline makes {tuple(aug.final_size)} images, the model takes {tuple(image_size)}")
    if fmt == "occ3d":
        from occdistill.data.occ3d import Occ3DDataset

        if infos is None:
            raise DataError("format occ3d needs an info pickle (--infos)")
        _data_file(root, infos, "info file")
        ds = Occ3DDataset(root, infos, image_aug=aug, with_labels=False, cameras=tuple(cameras) or None, depth=depth)
    elif fmt == "occscannet":
        from occdistill.data.occscannet import OccScanNetDataset

        split = _data_file(root, infos, "split file") if infos is not None else None
        ds = OccScanNetDataset(root, split_file=split, image_aug=aug, with_labels=False, load_depth=depth != "none")
    else:
        raise DataError(f"unknown dataset format {fmt!r} (occ3d or occscannet)")
    if len(ds) == 0:
        raise DataError(f"{root}: the dataset has no samples")
    return ds


def _indices(start: int, batch: int, length: int) -> list[int]:
    return [(start + i) % length for i in range(batch)]


def dataset_inputs(dataset: Any, batch: int = 1, device: str | torch.device = "cpu",
                   prior_depth: bool = False) -> EngineInputs:
    """The first ``batch`` samples (cycling if the dataset is shorter), collated and on the device;
    ``prior_depth``: with their depth maps as the prior depth input (the dataset must load them:
    :func:`open_bench_dataset` ``depth``)."""
    from occdistill.data.sample import collate

    b = collate([dataset[i] for i in _indices(0, batch, len(dataset))]).to(device)
    root = getattr(dataset, "data_root", "dataset")
    if prior_depth and b.depth is None:
        raise OccDistillError(f"{root}: the model reads a prior depth map but the dataset loads no depth maps "
                              "(open it with depth=auto, lidar or rendered)")
    return EngineInputs(b.images, b.intrinsics, b.img_from_raw, b.ego_from_cam, source=f"dataset {root}",
                        rig="calibration of the dataset samples", prior_depth=b.depth if prior_depth else None,
                        prior_source=f"depth maps of the dataset samples ({root})" if prior_depth else "")


# ---------------------------------------------------------------------------------------------
# memory and machine


def _status_kb(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Return freed heap to the OS (glibc) and reset VmHWM to the current RSS (Linux >= 4.0)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return _status_kb("VmHWM") is not None


def measure_peak_memory(fn: Callable[[], Any], device: torch.device) -> tuple[float, str]:
    """MB of extra memory at the peak of ``fn()`` over what was allocated before it, and what was measured."""
    gc.collect()
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        out = fn()
        sync(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        del out
        return peak / 2**20, "CUDA max_memory_allocated during the call minus memory_allocated before it"
    if _reset_peak_rss():
        base = _status_kb("VmRSS")
        out = fn()
        peak = _status_kb("VmHWM") - base
        del out
        return peak / 1024, ("CPU process peak RSS (VmHWM, reset via clear_refs after malloc_trim) during the "
                             "call minus RSS before it")
    import resource  # POSIX only, like this fallback

    base = _status_kb("VmRSS") or 0
    out = fn()
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 1024 - base
    del out
    return max(peak, 0.0) / 1024, ("CPU ru_maxrss minus RSS before the call (upper bound: ru_maxrss is the "
                                    "lifetime peak)")


def machine_info(device: torch.device) -> dict[str, Any]:
    """CPU/GPU, load, library versions: timings are only comparable on the same machine."""
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [ln.split(":", 1)[1].strip() for ln in cpuinfo.read_text().splitlines() if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    return {
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }


# ---------------------------------------------------------------------------------------------
# the benchmark


def _ms(samples: Sequence[float]) -> tuple[float, float]:
    arr = 1e3 * np.asarray(samples, dtype=np.float64)
    return float(np.median(arr)), float(np.percentile(arr, 90))


def _r(x: float | None, nd: int = 3) -> float | None:
    return None if x is None else round(float(x), nd)


def _autocast(device: torch.device, dtype: str):
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[dtype])


def _path_profile(path: str, stage_samples: list[dict[str, float]], latency: list[float], batch: int,
                  flops: dict[str, int] | None) -> PathProfile:
    names = tuple(stage_samples[0])  # the laps' order: the kind's stages
    medians = {s: _ms([r[s] for r in stage_samples]) for s in names}
    total = sum(m for m, _ in medians.values())
    stages = tuple(
        StageTiming(s, _r(m), _r(p), _r(1e3 * min(r[s] for r in stage_samples)), _r(m / total, 4),
                    None if flops is None else _r(flops[s] / 1e9))
        for s, (m, p) in medians.items()
    )
    lat_med, lat_p90 = _ms(latency)
    return PathProfile(path, POOLING[path], _r(lat_med), _r(lat_p90), _r(1e3 * min(latency)),
                       _r(1e3 * batch / lat_med, 2), stages)


@dataclass
class _Rounds:
    """Seconds sampled in the timed rounds: per path the stage laps and the engine latency; the
    end-to-end batches and their data-pipeline part."""

    stages: dict[str, list[dict[str, float]]]
    latency: dict[str, list[float]]
    end_to_end: list[float]
    data: list[float]


def _bench_paths(model: BenchableModel, kind: str, inputs: EngineInputs,
                 export_path: bool) -> tuple[dict[str, Callable[[], None]], float | None]:
    """The paths to time, each with the call that puts the model on it (first: the path ``forward``
    takes by default), and the ms the dense export path's pooling plan took to build."""
    if kind != "dense":
        return {FORWARD_PATH: lambda: None}, None
    vt = model.view_transform
    paths = {"train": lambda: vt.use_plans(FixedRigPlans())}
    if not export_path:
        return paths, None
    device = inputs.images.device
    sync(device)
    t = time.perf_counter()
    model.set_fixed_rig(inputs.intrinsics[0], inputs.img_from_raw[0], inputs.ego_from_cam[0])
    sync(device)
    plan_ms = 1e3 * (time.perf_counter() - t)
    plans = vt.fixed_plans()
    paths["export"] = lambda: vt.use_plans(plans)
    return paths, plan_ms


def _engine_seconds(model: BenchableModel, inputs: EngineInputs, clock: StageClock) -> float:
    """One engine-only latency sample: on CUDA a separate forward without the stage
    synchronisations; on CPU (synchronisation is a no-op) the profiled forward's own time."""
    device = inputs.images.device
    if device.type != "cuda":
        return clock.total
    sync(device)
    t = time.perf_counter()
    forward_labels(model, *inputs.args(), prior_depth=inputs.prior_depth)
    sync(device)
    return time.perf_counter() - t


def _end_to_end_seconds(model: BenchableModel, dataset: Any, start: int, batch: int,
                        device: torch.device) -> tuple[float, float]:
    """Seconds of one end-to-end batch (samples ``start``.., cycled) and of its data pipeline
    (read, decode, resize, collate, transfer; with the depth maps for a depth-branch model)."""
    from occdistill.data.sample import collate

    sync(device)
    t0 = time.perf_counter()
    b = collate([dataset[i] for i in _indices(start, batch, len(dataset))]).to(device)
    sync(device)
    t1 = time.perf_counter()
    forward_labels(model, b.images, b.intrinsics, b.img_from_raw, b.ego_from_cam,
                   prior_depth=b.depth if takes_prior_depth(model) else None)
    sync(device)
    return time.perf_counter() - t0, t1 - t0


def _timed_rounds(model: BenchableModel, inputs: EngineInputs, paths: dict[str, Callable[[], None]], dataset: Any,
                  repeats: int, warmup: int, progress: bool) -> _Rounds:
    """``warmup`` + ``repeats`` rounds, each: every path's profiled forward, then one end-to-end
    batch on the first path (for the dense student the training path, as ``forward`` runs it).
    Leaves the model on the first path."""
    device = inputs.images.device
    batch = inputs.images.shape[0]
    out = _Rounds({p: [] for p in paths}, {p: [] for p in paths}, [], [])
    first = next(iter(paths))
    rounds = range(warmup + repeats)
    if progress:
        from tqdm import tqdm

        rounds = tqdm(rounds, desc="bench", unit="round", file=sys.stderr, dynamic_ncols=True)
    for rep in rounds:
        timed = rep >= warmup
        for path, use in paths.items():
            use()
            clock = StageClock(device)
            profiled_forward(model, *inputs.args(), clock=clock, prior_depth=inputs.prior_depth)
            latency = _engine_seconds(model, inputs, clock)
            if timed:
                out.stages[path].append(dict(clock.seconds))
                out.latency[path].append(latency)
        paths[first]()
        if dataset is not None:
            e2e, data = _end_to_end_seconds(model, dataset, rep * batch, batch, device)
            if timed:
                out.end_to_end.append(e2e)
                out.data.append(data)
    return out


def _loads_depth(dataset: Any) -> bool:
    """The dataset loads depth maps with its samples (Occ3D ``depth`` source, Occ-ScanNet ``load_depth``)."""
    return getattr(dataset, "depth", "none") != "none" or bool(getattr(dataset, "load_depth", False))


# What autocast does not reach, per kind (each computes it in at least float32 on purpose).
_FLOAT32_PARTS = {"dense": "the BEV pooling", "sparse": "the voxelisation", "gaussian": "the splat"}


def _notes(model: BenchableModel, kind: str, paths: Sequence[str], batch: int, dataset: Any, dtype: str,
           prior_source: str) -> list[str]:
    notes = [FLOP_COUNT_NOTE]
    if prior_source:
        notes.append(f"depth-prior branch: engine input {prior_source}; its calls in every decoder layer are the "
                     "depth_prior stage")
    if "export" in paths and (batch > 1 or dataset is not None):
        notes.append("export path: pooling plan of the first sample's rig, used for every sample")
    if kind == "dense" and model.cfg.temporal_frames:
        notes.append("temporal student: fused with a zero history (forward without history, as at a scene start); "
                     "the fusion is timed in bev_encoder")
    if dataset is None:
        notes.append("no dataset: end-to-end and data pipeline not measured (pass --data)")
    else:
        notes.append("end-to-end: dataset read + collate + to(device) + forward + labels, sequential, "
                     "no loader workers")
    if dtype != "float32":
        notes.append(f"{dtype}: torch.autocast; {_FLOAT32_PARTS[kind]} runs in float32 by design; FLOPs counted "
                     "without autocast (the same counts)")
    return notes


def benchmark(
    model: BenchableModel,
    inputs: EngineInputs,
    *,
    dataset: Any = None,
    model_name: str = "dense",
    dtype: str = "float32",
    repeats: int = 10,
    warmup: int = 2,
    count_flops: bool = True,
    measure_memory: bool = True,
    export_path: bool = True,
    progress: bool = False,
) -> BenchResult:
    """Benchmark ``model`` (a dense, sparse or gaussian model; eval mode, inference mode) on
    ``inputs`` (already on the model's device).

    With ``dataset`` (samples at the model's input size, see :func:`open_bench_dataset`), also the
    end-to-end latency and the data pipeline per sample. ``export_path`` (dense student only): also
    time the exportable pooling path. Every round runs every path and one end-to-end batch in turn,
    so that all of them share the background load of a shared machine. The model's mode and (dense)
    fixed-rig state are restored.
    """
    kind = model_kind(model)
    _check_prior(model, inputs.prior_depth)
    if dataset is not None and takes_prior_depth(model) and not _loads_depth(dataset):
        raise OccDistillError(f"{getattr(dataset, 'data_root', 'dataset')}: the model reads a prior depth map but "
                              "the dataset loads no depth maps (open_bench_dataset depth=auto, lidar or rendered)")
    if dtype not in DTYPES:
        raise OccDistillError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if repeats < 1 or warmup < 0:
        raise OccDistillError(f"need repeats >= 1 and warmup >= 0, got {repeats} and {warmup}")
    device = inputs.images.device
    machine = machine_info(device)
    was_training = model.training
    original_plans = model.view_transform.fixed_plans() if kind == "dense" else None
    model.eval()
    try:
        paths, plan_ms = _bench_paths(model, kind, inputs, export_path)
        with torch.inference_mode(), _autocast(device, dtype):
            rounds = _timed_rounds(model, inputs, paths, dataset, repeats, warmup, progress)
            peak_mb, peak_kind = None, "not measured"
            if measure_memory:
                peak_mb, peak_kind = measure_peak_memory(
                    lambda: forward_labels(model, *inputs.args(), prior_depth=inputs.prior_depth), device)
        # Outside autocast: the counts depend on shapes only, and FlopCounterMode's einsum under
        # autocast fails on mixed float32/low-precision operands (the Gaussian key points).
        with torch.inference_mode():
            flops_by_stage = count_stage_flops(model, inputs) if count_flops else None
    finally:
        if kind == "dense":
            model.view_transform.use_plans(original_plans)
        model.train(was_training)

    batch, cams = inputs.images.shape[:2]
    profiles = tuple(
        _path_profile(p, rounds.stages[p], rounds.latency[p], batch, flops_by_stage if i == 0 else None)
        for i, p in enumerate(paths)
    )
    main = profiles[0]
    export = next((p for p in profiles if p.path == "export"), None)
    total_flops = sum(flops_by_stage.values()) if flops_by_stage is not None else None
    e2e = rounds.end_to_end
    e2e_med, e2e_p90 = _ms(e2e) if e2e else (None, None)
    data_med = _ms(rounds.data)[0] if rounds.data else None
    notes = _notes(model, kind, tuple(paths), batch, dataset, dtype, inputs.prior_source)
    if hasattr(os, "getloadavg"):
        machine["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    params = sum(p.numel() for p in model.parameters())
    model_bytes = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    return BenchResult(
        model=model_name,
        kind=kind,
        device=str(device),
        dtype=dtype,
        batch=int(batch),
        cameras=int(cams),
        image_size=tuple(model.cfg.image_size),
        input_source=inputs.source,
        rig=inputs.rig,
        repeats=repeats,
        warmup=warmup,
        latency_median_ms=main.latency_median_ms,
        latency_p90_ms=main.latency_p90_ms,
        latency_min_ms=main.latency_min_ms,
        fps=main.fps,
        stages=main.stages,
        paths=profiles,
        export_plan_ms=_r(plan_ms),
        export_over_train_latency=None if export is None else _r(export.latency_median_ms / main.latency_median_ms),
        export_over_train_pooling=None if export is None else _r(
            export.stage("pooling").median_ms / main.stage("pooling").median_ms),
        params=int(params),
        flops=None if total_flops is None else int(total_flops),
        gflops=None if total_flops is None else _r(total_flops / 1e9),
        gmacs=None if total_flops is None else _r(total_flops / 2e9),
        peak_memory_mb=_r(peak_mb, 1),
        peak_memory_kind=peak_kind,
        model_memory_mb=_r(model_bytes / 2**20, 1),
        end_to_end_median_ms=_r(e2e_med),
        end_to_end_p90_ms=_r(e2e_p90),
        end_to_end_min_ms=_r(1e3 * min(e2e)) if e2e else None,
        end_to_end_fps=None if e2e_med is None else _r(1e3 * batch / e2e_med, 2),
        data_pipeline_ms_per_sample=None if data_med is None else _r(data_med / batch),
        data_share_of_end_to_end=None if data_med is None else _r(data_med / e2e_med, 4),
        machine=machine,
        notes=tuple(notes),
    )


@dataclass(frozen=True)
class InterleavedLatency:
    """Engine-only latency of one model in :func:`interleaved_benchmark`: the two passes' results,
    and their mean median / p90 (so each model's figure spans the same stretch of the run)."""

    passes: tuple[BenchResult, BenchResult]

    @property
    def median_ms(self) -> float:
        return sum(r.latency_median_ms for r in self.passes) / len(self.passes)

    @property
    def p90_ms(self) -> float:
        return sum(r.latency_p90_ms for r in self.passes) / len(self.passes)

    @property
    def min_ms(self) -> float:
        return min(r.latency_min_ms for r in self.passes)


def interleaved_benchmark(models: dict[str, BenchableModel], inputs: dict[str, EngineInputs], *, rounds: int,
                          warmup: int, count_flops: bool = False) -> dict[str, InterleavedLatency]:
    """Engine-only :func:`benchmark` of several models under the same background load, to compare
    their latencies as a ratio: two passes of ``rounds`` timed forwards per model, the second pass in
    the reverse order (A B C, then C B A), so that a load change during the run hits every model
    alike. ``inputs[name]``: that model's input. FLOPs, when asked, are counted in the first pass.
    Threads are the caller's (``torch.set_num_threads``)."""
    if set(inputs) != set(models):
        raise ValueError(f"inputs for {sorted(inputs)} but models {sorted(models)}")
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    passes: dict[str, list[BenchResult]] = {name: [] for name in models}
    for order in (list(models), list(reversed(models))):
        for name in order:
            passes[name].append(benchmark(models[name], inputs[name], model_name=name, repeats=rounds, warmup=warmup,
                                          count_flops=count_flops and not passes[name], measure_memory=False,
                                          export_path=False))
    return {name: InterleavedLatency(passes=(rs[0], rs[1])) for name, rs in passes.items()}


def format_table(result: BenchResult) -> str:
    """A short human-readable table: stage medians (ms) and shares for every path (the dense
    student's two pooling paths, or the other kinds' forward), the kind's stages."""
    names = [p.path for p in result.paths]
    head = f"{'stage':14s}" + "".join(f"{n + ' ms':>12s}{'share':>8s}" for n in names)
    if result.paths[0].stages[0].gflops is not None:
        head += f"{'GFLOPs':>9s}"
    lines = [f"{result.model} on {result.device} ({result.dtype}, batch {result.batch}, {result.cameras} cams "
             f"{result.image_size[0]}x{result.image_size[1]}), median of {result.repeats}", head]
    for i, stage in enumerate(s.name for s in result.paths[0].stages):
        row = f"{stage:14s}"
        for p in result.paths:
            s = p.stages[i]
            row += f"{s.median_ms:12.1f}{100 * s.share:7.1f}%"
        g = result.paths[0].stages[i].gflops
        if g is not None:
            row += f"{g:9.2f}"
        lines.append(row)
    lines.append(f"{'latency':14s}" + "".join(f"{p.latency_median_ms:12.1f}{'':8s}" for p in result.paths)
                 + (f"{result.gflops:9.2f}" if result.gflops is not None else ""))
    lines.append(f"{'p90':14s}" + "".join(f"{p.latency_p90_ms:12.1f}{'':8s}" for p in result.paths))
    lines.append(f"{'min':14s}" + "".join(f"{p.latency_min_ms:12.1f}{'':8s}" for p in result.paths))
    lines.append(f"{'FPS':14s}" + "".join(f"{p.fps:12.2f}{'':8s}" for p in result.paths))
    if result.end_to_end_median_ms is not None:
        lines.append(f"end-to-end {result.end_to_end_median_ms:.1f} ms (p90 {result.end_to_end_p90_ms:.1f}), "
                     f"data pipeline {result.data_pipeline_ms_per_sample:.1f} ms/sample "
                     f"({100 * result.data_share_of_end_to_end:.1f}% of end-to-end)")
    mem = "n/a" if result.peak_memory_mb is None else f"{result.peak_memory_mb:.0f} MB"
    lines.append(f"params {result.params / 1e6:.2f} M, peak memory {mem}, model {result.model_memory_mb:.0f} MB")
    if result.export_over_train_latency is not None:
        lines.append(f"export/train: forward {result.export_over_train_latency:.2f}x, "
                     f"pooling {result.export_over_train_pooling:.2f}x "
                     f"(plan built once in {result.export_plan_ms:.1f} ms)")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# side by side: eager PyTorch, torch.compile, onnxruntime FP32 / FP16 / INT8

ENGINES = ("eager", "compile", "ort-fp32", "ort-fp16", "ort-int8")
VARIANTS = ENGINES  # a variant is ENGINE or ENGINE@THREADS, e.g. "eager@1"
DEFAULT_VARIANTS = ("eager", "compile", "ort-fp32", "ort-fp16", "ort-int8")
TEMPORAL_BENCH_NOTE = (
    "temporal student: every engine gets a zero BEV history as its history input (a legitimate input, a "
    "stream's first frame, of the same cost as any other: the fusion conv reads every slot); the host-side "
    "warp of the history (BEVHistory.warped, outside the graph) is not timed"
)
ORT_PRECISION = {"ort-fp32": "fp32", "ort-fp16": "fp16", "ort-int8": "int8"}
# (library, n, intra-op threads: 0 = the bench's count); numpy uses its BLAS's own thread count.
# onnxruntime's MatMul (MLAS) is included: on this AMD CPU torch's MKL sgemm runs well below the
# AVX-512 kernels MLAS uses, and the roofline denominator must be the best dense matmul available.
MATMUL_CONFIGS = (("torch", 2048, 0), ("torch", 4096, 0), ("torch", 2048, 1), ("torch", 4096, 1), ("numpy", 2048, 0),
                  ("onnxruntime", 2048, 0), ("onnxruntime", 2048, 1))
SIDE_BY_SIDE_MEMORY_KIND = (
    "peak RSS increase (VmHWM after clear_refs) while building the engine from scratch (eager: copy of the "
    "weights; compile: copy + compilation; onnxruntime: session from the file) and running one inference"
)
OMP_NOTE = (
    "OMP_WAIT_POLICY={}: torch's OpenMP threads busy-wait between parallel regions by default; on an "
    "oversubscribed machine a 2-thread eager forward then took 10-40x longer in our runs (PASSIVE fixes it; "
    "`occdistill bench --variants` sets it when unset)"
)


def parse_variant(spec: str, default_threads: int) -> tuple[str, int]:
    """``"eager@1"`` -> ("eager", 1); ``"ort-int8"`` -> ("ort-int8", default_threads)."""
    name, _, threads = spec.strip().partition("@")
    if name not in ENGINES:
        raise OccDistillError(f"unknown variant {spec!r}; choose from {', '.join(ENGINES)} (optionally @THREADS)")
    if not threads:
        return name, default_threads
    if not threads.isdigit() or int(threads) < 1:
        raise OccDistillError(f"variant {spec!r}: threads after '@' must be a positive integer")
    return name, int(threads)


@dataclass(frozen=True)
class VariantResult:
    """One engine of the side-by-side benchmark; times in ms over the timed rounds.

    engine-only: the prepared graph input (uint8 images) -> uint8 labels; end-to-end: camera files
    -> decode + resize/crop (+ float conversion for a float32 graph) -> engine -> labels.
    Speed-ups are over the baseline, the fastest eager variant (by engine median).
    ``label_agreement_vs_eager``: share of voxels whose label equals eager's on the same input.
    ``achieved_gflops_*`` = model FLOPs / median latency; ``roofline_*`` = that over the measured
    dense matmul throughput (:class:`MatmulPeak`).
    """

    name: str
    engine: str
    threads: int
    ok: bool
    error: str | None = None
    description: str = ""
    setup_seconds: float | None = None
    engine_median_ms: float | None = None
    engine_p90_ms: float | None = None
    engine_min_ms: float | None = None
    end_to_end_median_ms: float | None = None
    end_to_end_p90_ms: float | None = None
    end_to_end_min_ms: float | None = None
    preprocess_median_ms: float | None = None
    peak_memory_mb: float | None = None
    engine_speedup_vs_eager: float | None = None
    end_to_end_speedup_vs_eager: float | None = None
    label_agreement_vs_eager: float | None = None
    achieved_gflops_engine: float | None = None
    achieved_gflops_end_to_end: float | None = None
    roofline_engine: float | None = None
    roofline_end_to_end: float | None = None


@dataclass(frozen=True)
class MatmulPeak:
    """Dense float32 matrix-multiply throughput of this machine, timed in the same rounds as the
    engines: GFLOP/s (2 n^3 / t) per (library, n, threads), median and best sample. ``gflops`` is
    the best sample of any of them (background load only slows a matmul down, so the fastest run
    is the closest to what the hardware does): the conservative, largest denominator of the
    roofline fractions."""

    gflops: float
    best: str
    medians: dict[str, float]
    best_samples: dict[str, float]
    threads: int


@dataclass(frozen=True)
class SideBySideResult:
    """``occdistill bench --variants``: :meth:`to_dict` is the JSON. ``baseline``: the eager
    variant the speed-ups are relative to."""

    model: str
    rig_hash: str
    rig_source: str
    camera_names: tuple[str, ...]
    image_size: tuple[int, int]
    batch: int
    input_format: str
    threads: int
    repeats: int
    warmup: int
    flops: int
    gflops: float
    matmul: MatmulPeak
    baseline: str
    variants: tuple[VariantResult, ...]
    end_to_end_source: str | None
    peak_memory_kind: str
    machine: dict[str, Any]
    notes: tuple[str, ...] = ()

    def variant(self, name: str) -> VariantResult:
        return next(v for v in self.variants if v.name == name)

    def best(self, engine: str) -> VariantResult | None:
        """The fastest successful variant of ``engine`` (by engine median), if any."""
        rows = [v for v in self.variants if v.engine == engine and v.ok]
        return min(rows, key=lambda v: v.engine_median_ms) if rows else None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class _Engine:
    description: str
    run: Callable[[np.ndarray], np.ndarray]  # graph input -> labels (B, X, Y, Z) uint8
    setup_seconds: float
    build: Callable[[], Callable[[np.ndarray], np.ndarray]]  # from scratch, for the memory probe


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"[:300]


def _torch_engine(engine: str, model: DenseStudent, rig: Rig, batch: int, input_format: str, threads: int,
                  example: np.ndarray, compile_mode: str | None, history: np.ndarray | None) -> _Engine:
    """Eager or torch.compile (Inductor C++ kernels, weight freezing; the first call compiles and
    counts as setup) of the exported module, on ``threads`` intra-op threads; a temporal student
    gets ``history`` (B, F, C, X, Y) as its history input in every run."""
    import copy

    from occdistill.deploy.export import ExportWrapper

    extra = {} if history is None else {"history": torch.from_numpy(history)}

    def build(m: DenseStudent | None = None) -> Callable[[np.ndarray], np.ndarray]:
        torch.set_num_threads(threads)
        wrapper = ExportWrapper(m if m is not None else copy.deepcopy(model), rig, batch=batch,
                                input_format=input_format).eval()
        fn = wrapper if engine == "eager" else torch.compile(wrapper, mode=compile_mode, dynamic=False)

        def run(x: np.ndarray) -> np.ndarray:
            torch.set_num_threads(threads)
            with torch.inference_mode():
                return fn(torch.from_numpy(x), **extra)[1].numpy()
        if engine == "compile":
            import torch._inductor.config as inductor_config

            with inductor_config.patch(freezing=True):
                run(example)
        return run

    t = time.perf_counter()
    run = build(model)
    what = ("PyTorch eager" if engine == "eager" else
            f"torch.compile (inductor, freezing, mode={compile_mode or 'default'})")
    return _Engine(f"{what}, exported module (fixed-rig pooling), {threads} threads", run,
                   time.perf_counter() - t, build)


def _ort_engine(engine: str, path: Path, threads: int, history: np.ndarray | None) -> _Engine:
    """An onnxruntime session of ``path``; a temporal graph gets ``history`` in every run."""
    from occdistill.deploy.export import OnnxOccModel

    def build() -> Callable[[np.ndarray], np.ndarray]:
        # No busy-waiting: spinning pool threads would take the cores from the engine timed next.
        m = OnnxOccModel(path, threads=threads, spin=False)
        return lambda x: m.run(x, ["labels"], history=history)["labels"]

    t = time.perf_counter()
    run = build()
    return _Engine(f"onnxruntime {ORT_PRECISION[engine].upper()} CPU ({path.name}), {threads} intra-op threads",
                   run, time.perf_counter() - t, build)


def _time_matmul(lib: str, n: int, cache: dict, threads: int) -> float:
    """Seconds of one n x n float32 matmul (operands cached across rounds)."""
    key = (lib, n)
    if key not in cache:
        gen = np.random.default_rng(n)
        a, b = gen.standard_normal((n, n), dtype=np.float32), gen.standard_normal((n, n), dtype=np.float32)
        cache[key] = (torch.from_numpy(a), torch.from_numpy(b)) if lib == "torch" else (a, b)
    if lib == "onnxruntime":
        import importlib.util

        if importlib.util.find_spec("onnxruntime") is None:  # optional for the eager-only bench
            return float("nan")
    a, b = cache[key]
    if lib == "onnxruntime":
        skey = ("session", n, threads)
        if skey not in cache:
            cache[skey] = _ort_matmul_session(n, threads)
        sess = cache[skey]
        t = time.perf_counter()
        sess.run(None, {"a": a, "b": b})
        return time.perf_counter() - t
    torch.set_num_threads(threads)
    t = time.perf_counter()
    if lib == "torch":
        torch.mm(a, b)
    else:
        np.matmul(a, b)
    return time.perf_counter() - t


def _ort_matmul_session(n: int, threads: int) -> Any:
    """An onnxruntime session of one (n, n) x (n, n) float32 MatMul."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    vi = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT, [n, n])  # noqa: E731
    graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "matmul", [vi("a"), vi("b")], [vi("c")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), sess_options=opts, providers=["CPUExecutionProvider"])


def count_export_flops(model: DenseStudent, rig: Rig, batch: int = 1) -> int:
    """FLOPs (FlopCounterMode: conv/matmul-type ops, 2 per multiply-add) of one forward of the
    exported module (fixed rig: the pooling is gathers and a cumsum and counts zero)."""
    from torch.utils.flop_counter import FlopCounterMode

    from occdistill.deploy.export import ExportWrapper

    wrapper = ExportWrapper(model, rig, batch=batch, input_format="float32").eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        wrapper(**wrapper.feeds(wrapper.example_inputs()))
    return int(counter.get_total_flops())


def side_by_side(
    model: DenseStudent,
    rig: Rig,
    *,
    variants: Sequence[str] = DEFAULT_VARIANTS,
    onnx_paths: dict[str, str | Path] | None = None,
    dataset: Any = None,
    image_aug: Any = None,
    input_format: str = "uint8",
    batch: int = 1,
    threads: int | None = None,
    repeats: int = 20,
    warmup: int = 3,
    compile_mode: str | None = None,
    measure_memory: bool = True,
    model_name: str = "dense",
    progress: bool = False,
) -> SideBySideResult:
    """Time ``variants`` (``ENGINE`` or ``ENGINE@THREADS``) on the same inputs in interleaved
    rounds (the order rotates every round, so all share the background load of a shared machine),
    plus one dense matmul per round for the roofline.

    ``onnx_paths``: precision ("fp32", "fp16", "int8") -> exported file with ``rig`` baked in
    (:func:`occdistill.deploy.export.export_onnx`; checked by rig hash, input format and batch).
    ``dataset`` (eval mode, the rig's cameras) + ``image_aug`` (its ImageAugConfig): end-to-end from
    the camera files and engine input from its first frame; otherwise engine-only on random images.
    A variant that fails (torch.compile without a compiler, a missing file) is reported, not raised;
    at least one eager variant must run (it is the reference and the baseline). A temporal student's
    engines all get a zero BEV history (:data:`TEMPORAL_BENCH_NOTE`).
    """
    if not isinstance(model, DenseStudent):  # the variants run the exported dense graph
        raise OccDistillError(f"the side-by-side benchmarks the dense student; got a {type(model).__name__}")
    if repeats < 1 or warmup < 0:
        raise OccDistillError(f"need repeats >= 1 and warmup >= 0, got {repeats} and {warmup}")
    if input_format not in ("uint8", "float32"):
        raise OccDistillError(f"input format {input_format!r} is not uint8 or float32")
    threads = int(threads or torch.get_num_threads())
    specs = [parse_variant(v, threads) for v in variants]
    names = [f"{e}@{t}" for e, t in specs]
    if not specs or len(set(names)) != len(names):
        raise OccDistillError(f"give distinct variants, got {list(variants)}")
    if not any(e == "eager" for e, _ in specs):
        raise OccDistillError("the side-by-side needs an eager variant (the reference and the baseline)")
    was_training, original_plans = model.training, model.view_transform.fixed_plans()
    original_threads = torch.get_num_threads()  # each variant sets its own; the caller gets its setting back
    model.eval()
    try:
        return _side_by_side(model, rig, specs, names, onnx_paths, dataset, image_aug, input_format, batch, threads,
                             repeats, warmup, compile_mode, measure_memory, model_name, progress)
    finally:
        model.view_transform.use_plans(original_plans)
        model.train(was_training)
        torch.set_num_threads(original_threads)


def _side_by_side(model, rig, specs, names, onnx_paths, dataset, image_aug, input_format, batch, threads, repeats,
                  warmup, compile_mode, measure_memory, model_name, progress) -> SideBySideResult:
    from occdistill.deploy.export import FramePreprocessor, frame_image_paths, read_metadata, rig_hash

    machine = machine_info(torch.device("cpu"))
    machine["omp_wait_policy"] = os.environ.get("OMP_WAIT_POLICY")
    image_size = tuple(model.cfg.image_size)
    expected_hash = rig_hash(rig, image_size)
    onnx_paths = {k: Path(v) for k, v in (onnx_paths or {}).items()}
    notes: list[str] = [FLOP_COUNT_NOTE, OMP_NOTE.format(os.environ.get("OMP_WAIT_POLICY", "<unset>")),
                        "eager and torch.compile run the exported module (fixed-rig pooling, argmax to uint8) on "
                        "the same uint8 input as onnxruntime; onnxruntime sessions do not spin between runs"]

    # inputs
    pre = FramePreprocessor(image_aug) if (dataset is not None and image_aug is not None) else None
    frames: list[list[Path]] = []
    if pre is not None:
        if tuple(dataset.camera_names) != tuple(rig.camera_names):
            raise OccDistillError(f"dataset cameras {list(dataset.camera_names)} differ from the rig's "
                                  f"{list(rig.camera_names)}")
        frames = [frame_image_paths(dataset, i) for i in range(len(dataset))]

    def prepare(k: int) -> np.ndarray:
        """Frames k*B .. k*B+B-1 (cycled) -> graph input: decode + resize/crop (+ float conversion)."""
        x = np.stack([pre.load(frames[(k * batch + i) % len(frames)]) for i in range(batch)])  # (B, N, H, W, 3)
        if input_format == "float32":
            x = np.ascontiguousarray(x.transpose(0, 1, 4, 2, 3), dtype=np.float32) / np.float32(255.0)
        return x

    if frames:
        engine_input = prepare(0)
    else:
        gen = np.random.default_rng(0)
        engine_input = gen.integers(0, 256, (batch, rig.intrinsics.shape[0], *image_size, 3), dtype=np.uint8)
        if input_format == "float32":
            engine_input = np.ascontiguousarray(engine_input.transpose(0, 1, 4, 2, 3), np.float32) / np.float32(255.0)
        notes.append("engine input: random images (no dataset)")
    history = None
    if model.cfg.temporal_frames:
        # The graph's cost does not depend on the history's values (the fusion conv reads every slot):
        # zeros, what a stream's first frame gets, time it like any history.
        num_x, num_y, _ = model.grid.shape
        history = np.zeros((batch, model.cfg.temporal_frames, model.cfg.context_channels, num_x, num_y), np.float32)
        notes.append(TEMPORAL_BENCH_NOTE)

    # engines
    engines: dict[str, _Engine] = {}
    failures: dict[str, str] = {}
    for (engine, n_threads), name in zip(specs, names):
        try:
            if engine in ("eager", "compile"):
                engines[name] = _torch_engine(engine, model, rig, batch, input_format, n_threads, engine_input,
                                              compile_mode, history)
                continue
            path = onnx_paths.get(ORT_PRECISION[engine])
            if path is None:
                raise OccDistillError(f"no {ORT_PRECISION[engine]} ONNX file given")
            meta = read_metadata(path)
            if (meta["rig_hash"], meta["input_format"], int(meta["batch"])) != (expected_hash, input_format, batch):
                raise OccDistillError(
                    f"{path} was exported for rig {meta['rig_hash']}, {meta['input_format']} input, batch "
                    f"{meta['batch']}; this bench runs rig {expected_hash}, {input_format}, batch {batch}")
            engines[name] = _ort_engine(engine, path, n_threads, history)
        except Exception as exc:  # report, do not crash: compile in particular fails in many ways
            failures[name] = _one_line(exc)

    # agreement with eager on the engine input
    eager_names = [n for (e, _), n in zip(specs, names) if e == "eager" and n in engines]
    if not eager_names:
        raise OccDistillError(f"the eager reference failed: {failures}")
    ref = engines[eager_names[0]].run(engine_input)
    agreement = {}
    for name, eng in list(engines.items()):
        try:
            agreement[name] = float((eng.run(engine_input) == ref).mean())
        except Exception as exc:
            failures[name] = _one_line(exc)
            engines.pop(name)

    # interleaved rounds
    eng_t: dict[str, list[float]] = {n: [] for n in engines}
    e2e_t: dict[str, list[float]] = {n: [] for n in engines}
    pre_t: list[float] = []
    mm_keys = [(lib, n, t or threads, f"{lib} {n}" + (f"@{t or threads}" if lib != "numpy" else ""))
               for lib, n, t in MATMUL_CONFIGS]
    mm_keys = list({key: (lib, n, t, key) for lib, n, t, key in mm_keys}.values())  # threads may coincide
    mm_t: dict[str, list[float]] = {key: [] for *_, key in mm_keys}
    mm_cache: dict = {}
    order = list(engines)
    rounds = range(warmup + repeats)
    if progress:
        from tqdm import tqdm

        rounds = tqdm(rounds, desc="side-by-side", unit="round", file=sys.stderr, dynamic_ncols=True)
    for rep in rounds:
        timed = rep >= warmup
        k = rep % len(order)
        for name in order[k:] + order[:k]:
            run = engines[name].run
            t = time.perf_counter()
            run(engine_input)
            dt = time.perf_counter() - t
            if timed:
                eng_t[name].append(dt)
            if frames:
                t0 = time.perf_counter()
                x = prepare(rep)
                t1 = time.perf_counter()
                run(x)
                t2 = time.perf_counter()
                if timed:
                    e2e_t[name].append(t2 - t0)
                    pre_t.append(t1 - t0)
        lib, n, t, key = mm_keys[rep % len(mm_keys)]
        dt = _time_matmul(lib, n, mm_cache, t)
        if rep >= len(mm_keys) and dt == dt:  # the first call per config pays allocation and warm-up; nan: n/a
            mm_t[key].append(dt)
    mm_cache.clear()
    if not any(mm_t.values()):  # fewer rounds than configs: time each once more
        for lib, n, t, key in mm_keys:
            dt = _time_matmul(lib, n, mm_cache, t)
            if dt == dt:
                mm_t[key].append(dt)
        mm_cache.clear()
    mm_medians = {key: _r(2 * n**3 / float(np.median(mm_t[key])) / 1e9, 1) for _, n, _, key in mm_keys if mm_t[key]}
    mm_best = {key: _r(2 * n**3 / float(np.min(mm_t[key])) / 1e9, 1) for _, n, _, key in mm_keys if mm_t[key]}
    best = max(mm_best, key=mm_best.get)
    matmul = MatmulPeak(mm_best[best], best, mm_medians, mm_best, threads)

    # FLOPs, memory
    torch.set_num_threads(threads)
    flops = count_export_flops(model, rig, batch)
    peak: dict[str, float] = {}
    if measure_memory:
        for name, eng in engines.items():
            try:
                peak[name], _ = measure_peak_memory(lambda: eng.build()(engine_input), torch.device("cpu"))
            except Exception as exc:
                notes.append(f"{name}: memory probe failed ({_one_line(exc)})")
    torch.set_num_threads(threads)

    baseline = min(eager_names, key=lambda n: float(np.median(eng_t[n])))
    base_eng = float(np.median(eng_t[baseline]))
    base_e2e = float(np.median(e2e_t[baseline])) if e2e_t[baseline] else None
    pre_med = _ms(pre_t)[0] if pre_t else None
    results = []
    for (engine, n_threads), name in zip(specs, names):
        if name not in engines:
            results.append(VariantResult(name, engine, n_threads, False, failures.get(name, "not run")))
            continue
        em, ep = _ms(eng_t[name])
        xm, xp = _ms(e2e_t[name]) if e2e_t[name] else (None, None)
        gf_eng = flops / (em / 1e3) / 1e9
        gf_e2e = None if xm is None else flops / (xm / 1e3) / 1e9
        results.append(VariantResult(
            name=name, engine=engine, threads=n_threads, ok=True, description=engines[name].description,
            setup_seconds=_r(engines[name].setup_seconds, 2),
            engine_median_ms=_r(em), engine_p90_ms=_r(ep), engine_min_ms=_r(1e3 * min(eng_t[name])),
            end_to_end_median_ms=_r(xm), end_to_end_p90_ms=_r(xp),
            end_to_end_min_ms=_r(1e3 * min(e2e_t[name])) if e2e_t[name] else None,
            preprocess_median_ms=_r(pre_med), peak_memory_mb=_r(peak.get(name), 1),
            engine_speedup_vs_eager=_r(1e3 * base_eng / em),
            end_to_end_speedup_vs_eager=None if xm is None or base_e2e is None else _r(1e3 * base_e2e / xm),
            label_agreement_vs_eager=_r(agreement[name], 6),
            achieved_gflops_engine=_r(gf_eng, 1), achieved_gflops_end_to_end=_r(gf_e2e, 1),
            roofline_engine=_r(gf_eng / matmul.gflops, 4),
            roofline_end_to_end=None if gf_e2e is None else _r(gf_e2e / matmul.gflops, 4),
        ))
    if frames:
        notes.append("end-to-end: decode + resize/crop of every camera image (PIL, the evaluation transform) + "
                     "engine + labels, frame after frame; the preprocessing is the same for every variant")
    else:
        notes.append("no dataset: end-to-end not measured")
    notes.append("roofline: model FLOPs / median latency over the best dense float32 matmul throughput measured "
                 "in the same rounds (fastest sample over torch 2048/4096 and onnxruntime MatMul 2048 at 1 and all "
                 "threads, numpy 2048)")
    if hasattr(os, "getloadavg"):
        machine["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    return SideBySideResult(
        model=model_name, rig_hash=expected_hash, rig_source=rig.source, camera_names=tuple(rig.camera_names),
        image_size=image_size, batch=batch, input_format=input_format, threads=threads, repeats=repeats,
        warmup=warmup, flops=flops, gflops=_r(flops / 1e9), matmul=matmul, baseline=baseline,
        variants=tuple(results),
        end_to_end_source=(f"{getattr(dataset, 'data_root', 'dataset')} ({len(frames)} frames, cycled)"
                           if frames else None),
        peak_memory_kind=SIDE_BY_SIDE_MEMORY_KIND if measure_memory else "not measured",
        machine=machine, notes=tuple(notes),
    )


def format_side_by_side(result: SideBySideResult) -> str:
    """The side-by-side table: medians (p90) in ms, speed-ups over the eager baseline, memory,
    label agreement with eager, achieved GFLOP/s and roofline fraction (end-to-end when measured)."""
    def fmt(x: float | None, spec: str = "8.1f") -> str:
        return f"{x:{spec}}" if x is not None else f"{'-':>{spec.split('.')[0]}}"

    lines = [
        f"{result.model}: {len(result.camera_names)} cams {result.image_size[0]}x{result.image_size[1]}, batch "
        f"{result.batch}, {result.input_format} input, rig {result.rig_hash} (baked in), median (p90) of "
        f"{result.repeats} interleaved rounds; speed-ups over {result.baseline}",
        f"{'variant':12s}{'engine ms':>10s}{'(p90)':>8s}{'e2e ms':>9s}{'(p90)':>8s}{'x eager':>8s}{'x e2e':>7s}"
        f"{'peak MB':>8s}{'agree %':>9s}{'GFLOP/s':>8s}{'roofline':>9s}{'setup s':>8s}",
    ]
    for v in result.variants:
        if not v.ok:
            lines.append(f"{v.name:12s}  FAILED: {v.error}")
            continue
        roof = v.roofline_end_to_end if v.roofline_end_to_end is not None else v.roofline_engine
        gf = v.achieved_gflops_end_to_end if v.achieved_gflops_end_to_end is not None else v.achieved_gflops_engine
        agree = None if v.label_agreement_vs_eager is None else 100 * v.label_agreement_vs_eager
        lines.append(
            f"{v.name:12s}{fmt(v.engine_median_ms, '10.1f')}{fmt(v.engine_p90_ms)}"
            f"{fmt(v.end_to_end_median_ms, '9.1f')}{fmt(v.end_to_end_p90_ms)}"
            f"{fmt(v.engine_speedup_vs_eager, '8.2f')}{fmt(v.end_to_end_speedup_vs_eager, '7.2f')}"
            f"{fmt(v.peak_memory_mb, '8.0f')}{fmt(agree, '9.3f')}{fmt(gf, '8.1f')}"
            f"{fmt(None if roof is None else 100 * roof, '8.1f')}%{fmt(v.setup_seconds, '8.1f')}")
    mm = ", ".join(f"{k} {g:.0f}/{result.matmul.best_samples[k]:.0f}" for k, g in result.matmul.medians.items())
    lines.append(f"model {result.gflops:.2f} GFLOPs per forward; dense matmul {result.matmul.gflops:.0f} GFLOP/s "
                 f"(fastest sample; median/best: {mm}); roofline = model GFLOP/s "
                 f"{'end-to-end' if result.end_to_end_source else 'engine-only'} / matmul GFLOP/s")
    return "\n".join(lines)


__all__ = [
    "BenchModel", "BenchResult", "BenchableModel", "DEFAULT_VARIANTS", "ENGINES", "EngineInputs", "GAUSSIAN_STAGES",
    "KIND_STAGES", "MatmulPeak", "PATHS", "PathProfile", "SPARSE_PRIOR_STAGES", "SPARSE_STAGES", "STAGES",
    "SideBySideResult", "StageClock", "TEMPORAL_BENCH_NOTE",
    "StageTiming", "StagedOutput", "VARIANTS", "VariantResult", "benchmark", "count_export_flops", "count_stage_flops",
    "dataset_inputs", "format_side_by_side", "format_table", "forward_labels", "load_bench_model", "machine_info",
    "measure_peak_memory", "model_kind", "model_stages", "occscannet_rig", "open_bench_dataset", "output_labels",
    "parse_variant", "predict_labels", "profiled_forward", "side_by_side", "synthetic_inputs", "synthetic_rig",
    "takes_prior_depth",
]
