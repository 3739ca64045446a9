"""The training config: one typed tree, filled from a YAML file plus ``a.b=value`` overrides.

Sections: ``data`` (what to read and how to augment it), ``model`` (``kind`` + that kind's
config), ``optim`` (AdamW, schedule, clipping, accumulation), ``loss`` (which voxels count, class
weights, depth supervision; ``loss.gaussian`` / ``loss.sparse`` for those model kinds),
``distill`` (an optional teacher: a dump directory or a trained checkpoint, and the distillation
weights) and ``runtime`` (seed, device, precision, EMA, evaluation, checkpoints).
Built-in configs live in ``occdistill/configs/<name>.yaml``; :func:`resolve_config_path` accepts a
bare name (``street-tiny``) or a path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from occdistill.config import load_config
from occdistill.data.augment import BevAugConfig, ImageAugConfig
from occdistill.distill.discene import DiSceneWeights
from occdistill.errors import ConfigError
from occdistill.losses.distill import DistillLossConfig
from occdistill.losses.gaussian import GaussianLossConfig
from occdistill.losses.sparse import SparseLossConfig
from occdistill.models.build import ModelConfig

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


@dataclass(frozen=True)
class DataConfig:
    """``root`` and relative split paths are resolved from the working directory, then under ``root``."""

    format: Literal["occ3d", "occscannet"] = "occ3d"
    root: str = "data/street"
    # occ3d: info pickle; occscannet: split list of frame pickles. train_split "" (occscannet) =
    # every frame under root; val_split "" = no validation.
    train_split: str = "occdistill_infos_train.pkl"
    val_split: str = "occdistill_infos_val.pkl"
    cameras: tuple[str, ...] = ()  # camera order fed to the model; empty = the order of the infos
    image_aug: ImageAugConfig = field(default_factory=ImageAugConfig)
    bev_aug: BevAugConfig = field(default_factory=BevAugConfig)
    depth: Literal["none", "auto", "lidar", "rendered"] = "none"  # depth targets (loss.depth_weight > 0)
    batch_size: int = 4  # per process
    val_batch_size: int = 1
    workers: int = 2

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.val_batch_size < 1:
            raise ValueError("data.batch_size and data.val_batch_size must be >= 1")
        if self.workers < 0:
            raise ValueError("data.workers must be >= 0")


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-4
    weight_decay: float = 1e-2
    betas: tuple[float, float] = (0.9, 0.999)
    epochs: int = 24
    max_steps: int = 0  # > 0: train this many optimiser steps instead of ``epochs`` epochs
    warmup_steps: int = 200  # linear from lr * warmup_ratio to lr
    warmup_ratio: float = 1e-3
    schedule: Literal["cosine", "constant"] = "cosine"  # after warm-up
    min_lr_ratio: float = 0.0  # the cosine ends at lr * min_lr_ratio
    grad_clip: float = 5.0  # max global L2 norm of the gradients; 0 = off
    accum_steps: int = 1  # micro-batches per optimiser step

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.weight_decay < 0:
            raise ValueError("optim.lr must be > 0 and optim.weight_decay >= 0")
        if self.epochs < 1 and self.max_steps < 1:
            raise ValueError("set optim.epochs >= 1 or optim.max_steps >= 1")
        if self.warmup_steps < 0 or not 0 < self.warmup_ratio <= 1 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError("optim.warmup_steps must be >= 0, warmup_ratio in (0, 1], min_lr_ratio in [0, 1]")
        if self.grad_clip < 0 or self.accum_steps < 1:
            raise ValueError("optim.grad_clip must be >= 0 and optim.accum_steps >= 1")


@dataclass(frozen=True)
class LossConfig:
    camera_mask: bool = True  # CE over camera-visible voxels only (FlashOcc); False: every voxel
    # Per-class CE weights from the training labels' class counts (inside the camera mask when it
    # is on): "none"; "inverse_log" = FlashOcc's class_balance, 1 / log(count + 0.001);
    # "inverse_frequency" = frequency ** -class_weight_exponent, mean 1 over the classes present.
    # Weights move the arg-max towards rare classes by their ratio: strong weights trade geometry
    # IoU (free predicted as objects) for recall of rare classes.
    class_weights: Literal["none", "inverse_log", "inverse_frequency"] = "none"
    class_weight_exponent: float = 0.5
    depth_weight: float = 0.0  # BEVDepth BCE on the depth bins; needs data.depth != none
    # Lovász-softmax on the voxel probabilities (0 = off), over the CE's voxels; with
    # lovasz_ignore_free over the occupied ones only, as the Gaussian teacher's loss.gaussian.
    lovasz_weight: float = 0.0
    lovasz_ignore_free: bool = True
    # The other model kinds' objectives. kind gaussian: camera_mask and the CE weights come from
    # loss.gaussian, the class weights from class_weights above; kind sparse: loss.sparse alone.
    gaussian: GaussianLossConfig = field(default_factory=GaussianLossConfig)
    sparse: SparseLossConfig = field(default_factory=SparseLossConfig)

    def __post_init__(self) -> None:
        if self.depth_weight < 0 or self.class_weight_exponent < 0 or self.lovasz_weight < 0:
            raise ValueError("loss.depth_weight, loss.class_weight_exponent and loss.lovasz_weight must be >= 0")


@dataclass(frozen=True)
class DistillConfig:
    """Training with a teacher; neither ``dump`` nor ``checkpoint`` set = no distillation.

    Offline (``dump``): targets written by ``occdistill dump-teacher`` for the training split,
    paired by sample key and verified against the manifest (grid, classes, GT hashes), moved by
    each sample's BEV augmentation. Dense students only.
    Online (``checkpoint``): a trained teacher (run directory or checkpoint) run in eval mode under
    no_grad on every training batch. A dense student takes a dense or Gaussian teacher (``dense``
    weights), a sparse student a sparse teacher (DiScene levels, ``discene`` weights).
    Image level (``image_teacher``, dense students, with or without the two above): a trained dense
    or Gaussian model whose image encoder alone runs online, for ``dense.lambda_img``.
    """

    dump: str = ""
    dump_source: Literal["auto", "compact", "fp16"] = "auto"  # auto: compact when the dump has it
    checkpoint: str = ""
    teacher_weights: Literal["ema", "model"] = "ema"  # ema: the teacher's EMA weights when it has them
    image_teacher: str = ""  # run directory or checkpoint whose image features dense.lambda_img matches
    dense: DistillLossConfig = field(default_factory=DistillLossConfig)  # MFD / CWD / KD
    discene: DiSceneWeights = field(default_factory=DiSceneWeights)  # encoder / query / prior / anchor
    teacher_guided_init: bool = False  # DiScene TGI: copy the teacher's decoder into the student at step 0
    num_anchors: int = 0  # DiScene anchors per frame; 0 = the student's number of queries
    anchor_rebalance: bool = True  # draw anchors with class rebalancing

    def __post_init__(self) -> None:
        if self.dump and self.checkpoint:
            raise ValueError("distill: set dump (offline targets) or checkpoint (online teacher), not both")
        if self.num_anchors < 0:
            raise ValueError("distill.num_anchors must be >= 0")

    @property
    def enabled(self) -> bool:
        return bool(self.dump or self.checkpoint or self.image_teacher)


@dataclass(frozen=True)
class RuntimeConfig:
    seed: int = 0
    device: str = "auto"  # auto (CUDA when available), cpu, cuda; under torchrun each rank takes its local GPU
    # CPU intra-op threads; 0 = the cores this process's share leaves after its loader workers (>= 1).
    # Oversubscribed cores make every op wait at OpenMP barriers (10x slower steps measured).
    threads: int = 0
    deterministic: bool = False  # torch.use_deterministic_algorithms: bitwise-repeatable runs and resumes
    amp: Literal["off", "bf16", "fp16"] = "off"  # autocast precision (losses stay float32)
    ema_decay: float = 0.0  # 0 = no EMA; FlashOcc 0.999 with a ramp d * (1 - exp(-n / ramp))
    ema_ramp_steps: int = 2000
    eval_every: int = 0  # optimiser steps between evaluations; 0 = only at the end
    eval_rayiou: bool = True
    ckpt_every: int = 0  # optimiser steps between checkpoints; 0 = only at the end
    keep_checkpoints: int = 2  # most recent checkpoints kept on disk
    max_bad_steps: int = 20  # non-finite steps skipped before training stops
    log_every: int = 10  # optimiser steps between JSONL records (and plot refreshes)
    sync_bn: bool = False  # SyncBatchNorm across processes (CUDA only)
    progress: bool = True

    def __post_init__(self) -> None:
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError("runtime.ema_decay must be in [0, 1)")
        for name in ("threads", "eval_every", "ckpt_every", "max_bad_steps", "ema_ramp_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"runtime.{name} must be >= 0")
        if self.keep_checkpoints < 1 or self.log_every < 1:
            raise ValueError("runtime.keep_checkpoints and runtime.log_every must be >= 1")


@dataclass(frozen=True)
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def __post_init__(self) -> None:
        kind = self.model.kind
        if self.distill.dump and kind != "dense":
            raise ValueError(f"distill.dump: offline teacher targets train dense students; model.kind is {kind!r}")
        if self.distill.teacher_guided_init and (kind != "sparse" or not self.distill.checkpoint):
            raise ValueError("distill.teacher_guided_init needs a sparse student (model.kind: sparse) and a sparse "
                             "teacher (distill.checkpoint)")


def builtin_configs() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def resolve_config_path(name_or_path: str | Path) -> Path:
    """A YAML path as given, or the built-in config of that name (``street-tiny``)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    builtin = CONFIG_DIR / f"{name_or_path}.yaml"
    if path.suffix == "" and builtin.is_file():
        return builtin
    names = ", ".join(builtin_configs())
    raise ConfigError(f"{name_or_path}: no such config file or built-in config (built-in: {names})")


def load_train_config(name_or_path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    return load_config(TrainConfig, resolve_config_path(name_or_path), overrides)
