"""What the engine trains: one objective per model kind, with or without a teacher.

An objective is an ``nn.Module`` that holds the trained model and everything that trains with it
(distillation adapters) plus, for online distillation, the frozen teacher. The loop wraps it in
DistributedDataParallel and calls it once per micro-batch::

    terms = objective(item, step)   # named float32 scalars; terms["total"] is backpropagated

``item`` is a :class:`~occdistill.engine.data.TrainItem`: the batch, the teacher targets of an
offline dump (or None) and the earlier keyframes of a temporal model; ``step`` seeds the random
draws of the sparse objective (GT subsets, anchors) so that a resumed run draws what an
uninterrupted one would. Evaluation predicts with :func:`predict_labels`.

Terms per kind (unweighted terms, except the distillation terms which are logged as added):

- dense: ``ce``, ``lovasz`` and ``depth`` (when weighted in); with a teacher ``mfd``, ``cwd``, ``kd``, ``img``
  (weighted);
- gaussian: ``ce``, ``lovasz``, ``init_depth``;
- sparse: ``init.pts``, ``d{l}.pts``, ``d{l}.cls``; with a teacher ``kd.encoder``, ``kd.query``,
  ``kd.prior``, ``kd.anchor`` (level totals before the DiScene lambdas) and ``kd.total`` (weighted).

The teacher never trains: its parameters are frozen, it is put back in eval mode whenever the
objective is put in train mode, and it runs under ``torch.no_grad``.
"""

from __future__ import annotations

import torch
from torch import nn

from occdistill.data.classes import ClassTable
from occdistill.data.sample import Batch
from occdistill.distill.discene import DiSceneDistiller
from occdistill.engine.config import DistillConfig, LossConfig
from occdistill.engine.data import TrainItem
from occdistill.engine.objective import forward_batch, supervised_losses
from occdistill.engine.precision import autocast
from occdistill.errors import ConfigError
from occdistill.losses.discene import EncoderAdapter, encoder_kd, teacher_guided_init
from occdistill.losses.distill import TeacherSignals, build_adapter, distill_losses
from occdistill.losses.gaussian import gaussian_teacher_loss
from occdistill.losses.sparse import sparse_loss
from occdistill.models.dense import DenseStudent, training_history
from occdistill.models.gaussian import GaussianTeacher
from occdistill.models.sparse import SparseOccStudent


def freeze(teacher: nn.Module) -> nn.Module:
    """Eval mode and no gradients, for good."""
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher.eval()


class Objective(nn.Module):
    """Base: ``model`` is what gets trained, evaluated and checkpointed as the run's weights;
    ``adapters`` holds training-only modules (saved for resuming, never exported)."""

    def __init__(self, model: nn.Module, amp: str) -> None:
        super().__init__()
        self.model = model
        self.adapters = nn.ModuleDict()
        self.amp = amp

    def trainable_parameters(self) -> list[nn.Parameter]:
        """What the optimiser gets, in a fixed order: the model's, then the adapters'."""
        return [p for m in (self.model, self.adapters) for p in m.parameters() if p.requires_grad]

    def forward(self, item: TrainItem, step: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError


class DenseObjective(Objective):
    """The dense student's supervised loss, plus MFD / CWD / KD from a teacher when given one
    (``targets`` of a dump, or ``teacher``: a frozen dense or Gaussian model run online), plus the
    image-level term from ``image_teacher`` (a frozen dense or Gaussian model whose image encoder
    runs online; :func:`load_image_teacher`)."""

    def __init__(self, model: DenseStudent, loss: LossConfig, classes: ClassTable, amp: str, *,
                 class_weights: torch.Tensor | None = None, distill: DistillConfig | None = None,
                 teacher: nn.Module | None = None, teacher_channels: int | None = None,
                 image_teacher: nn.Module | None = None) -> None:
        super().__init__(model, amp)
        self.loss, self.classes, self.distill = loss, classes, distill
        self.register_buffer("class_weights", class_weights, persistent=False)
        self.depth_bins = model.view_transform.depth_bins if loss.depth_weight > 0 else None
        self.teacher = None if teacher is None else freeze(teacher)
        self.image_teacher = None if image_teacher is None else freeze(image_teacher)
        d = distill.dense if distill is not None else None
        if (d is not None and d.lambda_img > 0) != (self.image_teacher is not None):
            raise ConfigError("distill.dense.lambda_img > 0 and distill.image_teacher go together (the image-level "
                              "term needs the teacher's image features; a teacher without the term would idle)")
        # MFD / CWD / KD read a dump's targets or the online teacher's outputs.
        self.target_terms = d is not None and max(d.lambda_feat, d.lambda_logit, d.lambda_kd) > 0
        if self.image_teacher is not None:
            # Both kinds' finest level (finest_image_features) has neck_channels channels.
            self.adapters["img"] = EncoderAdapter([model.cfg.neck_channels], [self.image_teacher.cfg.neck_channels])
        if distill is not None:
            # MFD matches the BEV probability map (K channels) or the teacher's BEV feature.
            channels = classes.num_classes if distill.dense.mfd_target == "bev_prob" else teacher_channels
            if distill.dense.lambda_feat > 0 and channels is None:
                raise ConfigError("distill.dense.mfd_target=feature needs the teacher's BEV feature channels")
            adapter = build_adapter(distill.dense, model.cfg.bev_channels, channels or 0)
            if adapter is not None:
                self.adapters["mfd"] = adapter

    def train(self, mode: bool = True) -> "DenseObjective":
        super().train(mode)
        for teacher in (self.teacher, self.image_teacher):
            if teacher is not None:
                teacher.eval()
        return self

    def _teacher_signals(self, item: TrainItem) -> TeacherSignals:
        if item.targets is not None:
            return TeacherSignals.from_target_batch(item.targets)
        with torch.no_grad(), autocast(item.batch.images.device, self.amp):
            if isinstance(self.teacher, DenseStudent):
                out = dense_forward(self.teacher, item.batch, item.previous)
            else:
                out = forward_batch(self.teacher, item.batch)
        if isinstance(self.teacher, GaussianTeacher):
            return TeacherSignals.from_gaussian_output(out)
        d = self.distill.dense
        # BEV probabilities are collapsed from the teacher's voxels only when MFD matches them.
        wants_bev_probs = d.lambda_feat > 0 and d.mfd_target == "bev_prob"
        return TeacherSignals.from_dense_output(out, self.classes.free_index if wants_bev_probs else None)

    def forward(self, item: TrainItem, step: int) -> dict[str, torch.Tensor]:
        batch = item.batch
        with autocast(batch.images.device, self.amp):
            out = dense_forward(self.model, batch, item.previous)
        terms = supervised_losses(out, batch, self.loss, self.classes, self.depth_bins, self.class_weights)
        if self.distill is not None:
            kd: dict[str, torch.Tensor] = {}
            if self.target_terms:
                if item.targets is None and self.teacher is None:
                    raise ConfigError("MFD / CWD / KD are weighted in (distill.dense.lambda_feat, lambda_logit, "
                                      "lambda_kd) but neither teacher targets (distill.dump) nor a teacher "
                                      "(distill.checkpoint) were given")
                kd = distill_losses(out, self._teacher_signals(item), batch, self.distill.dense,
                                    self.adapters["mfd"] if "mfd" in self.adapters else None,
                                    free_index=self.classes.free_index, ignore_index=self.classes.ignore_index)
            if self.image_teacher is not None:
                with torch.no_grad(), autocast(batch.images.device, self.amp):
                    teacher_feats = finest_image_features(self.image_teacher, batch.images)
                kd["img"] = self.distill.dense.lambda_img * encoder_kd([out.image_features], [teacher_feats],
                                                                       self.adapters["img"])
            total = terms.pop("total")
            for name, value in kd.items():
                terms[name] = value
                total = total + value
            terms["total"] = total
        return terms


class GaussianObjective(Objective):
    """The Gaussian teacher's NLL (+ Lovász) and its initialisation's depth loss."""

    def __init__(self, model: GaussianTeacher, loss: LossConfig, classes: ClassTable, amp: str, *,
                 class_weights: torch.Tensor | None = None) -> None:
        super().__init__(model, amp)
        self.loss, self.classes = loss, classes
        self.register_buffer("class_weights", class_weights, persistent=False)

    def forward(self, item: TrainItem, step: int) -> dict[str, torch.Tensor]:
        batch = item.batch
        with autocast(batch.images.device, self.amp):
            out = forward_batch(self.model, batch)
        return gaussian_teacher_loss(out, batch, self.loss.gaussian, self.class_weights, self.classes.ignore_index)


class SparseObjective(Objective):
    """OPUS losses of the main queries, plus DiScene's four levels from a frozen sparse teacher."""

    def __init__(self, model: SparseOccStudent, loss: LossConfig, amp: str, seed: int, *,
                 distill: DistillConfig | None = None, teacher: SparseOccStudent | None = None,
                 anchor_class_weights: torch.Tensor | None = None) -> None:
        super().__init__(model, amp)
        self.loss, self.seed = loss, seed
        self.distiller = None
        self.levels_on = False  # some DiScene level has a weight: the teacher runs every step
        if teacher is not None:
            d = distill or DistillConfig()
            self.distiller = DiSceneDistiller(model, freeze(teacher), d.discene, num_anchors=d.num_anchors or None,
                                              class_rebalance=d.anchor_rebalance,
                                              anchor_class_weights=anchor_class_weights)
            w = d.discene
            self.levels_on = max(w.encoder, w.query, w.prior, w.anchor) > 0
            if w.encoder > 0:
                self.adapters["encoder"] = self.distiller.adapter
            else:  # never used: no gradient (DDP requires every trainable parameter to get one)
                self.distiller.adapter.requires_grad_(False)

    def forward(self, item: TrainItem, step: int) -> dict[str, torch.Tensor]:
        batch = item.batch
        # One generator per step: GT subsets and anchors are a function of (seed, step).
        gen = torch.Generator(device=batch.images.device).manual_seed(self.seed * 1_000_003 + step)
        with autocast(batch.images.device, self.amp):
            # TGI alone keeps the teacher for the initialisation but never runs it.
            prior = prior_depth(self.model, batch)
            distilled = self.distiller(batch, prior, generator=gen) if self.levels_on else None
            out = distilled.student if distilled is not None else forward_batch(self.model, batch, prior)
        terms = sparse_loss(out, batch, self.loss.sparse, gen)
        if distilled is not None:
            total = terms.pop("total")
            for level in ("encoder", "query", "prior", "anchor"):
                if level in distilled.terms:
                    terms[f"kd.{level}"] = distilled.terms[level].float()
            terms["kd.total"] = distilled.terms["total"].float()
            terms["total"] = total + terms["kd.total"]
        return terms


def teacher_init(objective: Objective, distill: DistillConfig) -> str | None:
    """DiScene's teacher-guided initialisation of a fresh sparse student (not on resume): a
    report of what was copied, or None when it does not apply."""
    if not distill.teacher_guided_init:
        return None
    if not isinstance(objective, SparseObjective) or objective.distiller is None:
        raise ConfigError("distill.teacher_guided_init needs a sparse student and a sparse teacher "
                          "(distill.checkpoint)")
    return str(teacher_guided_init(objective.model, objective.distiller.teacher))


def takes_depth_input(model: nn.Module) -> bool:
    """The model reads a prior depth map per camera (the sparse student's DiScene† depth branch)."""
    return isinstance(model, SparseOccStudent) and model.cfg.depth_prior


def prior_depth(model: nn.Module, batch: Batch) -> torch.Tensor | None:
    """The prior depth input (B, N, H, W) metres (0 = none) of a depth-prior model: the batch's
    depth maps (``data.depth``: rendered or LiDAR, moved by the image augmentation); None for
    other models."""
    if not takes_depth_input(model):
        return None
    if batch.depth is None:
        raise ConfigError("the model takes a prior depth map (model.sparse.depth_prior) but the batch has none: "
                          "set data.depth")
    return batch.depth


def temporal_frames(model: nn.Module) -> int:
    """Earlier keyframes the model fuses (0: a single-frame model)."""
    return model.cfg.temporal_frames if isinstance(model, DenseStudent) else 0


def dense_forward(model: DenseStudent, batch: Batch, previous: tuple[Batch, ...] = ()):
    """The dense student on a batch; a temporal one with the history of the earlier keyframes
    (recomputed without gradient, BEVDet4D style)."""
    if not temporal_frames(model):
        return forward_batch(model, batch)
    history = training_history(model, batch, previous)
    return model(batch.images, batch.intrinsics, batch.img_from_raw, batch.ego_from_cam, history)


@torch.no_grad()
def predict_labels(model: nn.Module, item: TrainItem, amp: str = "off") -> torch.Tensor:
    """Class ids (B, X, Y, Z) uint8 (the ``score`` file format) of an item on the model's device:
    the arg-max of the voxel logits, or the sparse model's voxelisation of its final points."""
    if isinstance(model, SparseOccStudent):
        with autocast(item.batch.images.device, amp):
            out = forward_batch(model, item.batch, prior_depth(model, item.batch))
        return model.voxelize(out).to(torch.uint8)
    return predict_scores(model, item, amp).argmax(dim=-1).to(torch.uint8)


@torch.no_grad()
def predict_scores(model: nn.Module, item: TrainItem, amp: str = "off") -> torch.Tensor:
    """Voxel logits (B, X, Y, Z, K) of a dense student, or log-probabilities of a Gaussian teacher
    (both: argmax = the labels, softmax = the probabilities). A sparse model has no dense scores."""
    if isinstance(model, SparseOccStudent):
        raise ConfigError("a sparse-query model has no dense voxel scores (its labels come from voxelising points)")
    batch = item.batch
    with autocast(batch.images.device, amp):
        if isinstance(model, DenseStudent):
            out = dense_forward(model, batch, item.previous)
        else:  # a Gaussian teacher: the cameras alone (only the sparse model takes a depth prior)
            out = forward_batch(model, batch)
    return out.voxel_logits


def load_teacher(distill: DistillConfig, student: nn.Module) -> nn.Module | None:
    """The frozen online teacher of ``distill.checkpoint`` (None without one), checked against the
    student: same grid, class table and input size, and a kind the student can learn from."""
    if not distill.checkpoint:
        return None
    from occdistill.engine.checkpoint import load_trained_model

    teacher = load_trained_model(distill.checkpoint, distill.teacher_weights).model
    where = f"distill.checkpoint {distill.checkpoint}"
    allowed = (DenseStudent, GaussianTeacher) if isinstance(student, DenseStudent) else (SparseOccStudent,)
    if not isinstance(teacher, allowed):
        names = " or ".join(a.__name__ for a in allowed)
        raise ConfigError(f"{where}: a {type(student).__name__} learns from a {names}, not a {type(teacher).__name__}")
    if teacher.grid != student.grid:
        raise ConfigError(f"{where}: teacher grid {teacher.grid} differs from the student's {student.grid}")
    if teacher.cfg.num_classes != student.cfg.num_classes:
        raise ConfigError(f"{where}: teacher has {teacher.cfg.num_classes} classes, "
                          f"the student {student.cfg.num_classes}")
    if tuple(teacher.cfg.image_size) != tuple(student.cfg.image_size):
        raise ConfigError(f"{where}: teacher input {tuple(teacher.cfg.image_size)} differs from the student's "
                          f"{tuple(student.cfg.image_size)} (both read the same loader's images)")
    return freeze(teacher)


def finest_image_features(teacher: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """(B, N, 3, H, W) -> the model's finest neck level (B, N, C, h, w): a dense model's only
    level, a Gaussian teacher's first."""
    feats = teacher.image_features(images)
    return feats[0] if isinstance(feats, list) else feats


def load_image_teacher(distill: DistillConfig, student: nn.Module) -> nn.Module | None:
    """The frozen model of ``distill.image_teacher`` (None without one), checked against the dense
    student: a dense or Gaussian model with the same input size and finest feature stride, so that
    its feature map and the student's cover the same pixels."""
    if not distill.image_teacher:
        return None
    from occdistill.engine.checkpoint import load_trained_model

    where = f"distill.image_teacher {distill.image_teacher}"
    if not isinstance(student, DenseStudent):
        raise ConfigError(f"{where}: image-level distillation is for dense students, not a {type(student).__name__}")
    teacher = load_trained_model(distill.image_teacher, distill.teacher_weights).model
    if not isinstance(teacher, (DenseStudent, GaussianTeacher)):
        raise ConfigError(f"{where}: a DenseStudent or GaussianTeacher, not a {type(teacher).__name__}")
    if tuple(teacher.cfg.image_size) != tuple(student.cfg.image_size):
        raise ConfigError(f"{where}: teacher input {tuple(teacher.cfg.image_size)} differs from the student's "
                          f"{tuple(student.cfg.image_size)} (both read the same loader's images)")
    if teacher.cfg.feature_stride != student.cfg.feature_stride:
        raise ConfigError(f"{where}: teacher's finest features are at stride {teacher.cfg.feature_stride}, the "
                          f"student's at {student.cfg.feature_stride}")
    return freeze(teacher)


def build_objective(model: nn.Module, loss: LossConfig, distill: DistillConfig, classes: ClassTable, *,
                    amp: str, seed: int, class_weights: torch.Tensor | None = None,
                    teacher: nn.Module | None = None, dump_feature_channels: int | None = None,
                    image_teacher: nn.Module | None = None) -> Objective:
    """The objective of ``model``'s kind; ``teacher`` from :func:`load_teacher` (online), or an
    offline dump (``distill.dump``) whose targets the loop passes to every call
    (``dump_feature_channels``: C of its BEV feature, when it has one); ``image_teacher`` from
    :func:`load_image_teacher` (dense students)."""
    if isinstance(model, DenseStudent):
        channels = teacher.cfg.bev_channels if isinstance(teacher, DenseStudent) else dump_feature_channels
        return DenseObjective(model, loss, classes, amp, class_weights=class_weights,
                              distill=distill if distill.enabled else None, teacher=teacher,
                              teacher_channels=channels, image_teacher=image_teacher)
    if image_teacher is not None:
        raise ConfigError("distill.image_teacher: image-level distillation is for dense students")
    if isinstance(model, GaussianTeacher):
        if teacher is not None:
            raise ConfigError("distill: the Gaussian teacher trains without a teacher")
        return GaussianObjective(model, loss, classes, amp, class_weights=class_weights)
    if isinstance(model, SparseOccStudent):
        if model.cfg.free_index != classes.free_index:
            raise ConfigError(f"model.sparse.free_index={model.cfg.free_index}, the {classes.name} free class is "
                              f"{classes.free_index}")
        return SparseObjective(model, loss, amp, seed, distill=distill, teacher=teacher)
    raise ConfigError(f"no training objective for a {type(model).__name__}")
