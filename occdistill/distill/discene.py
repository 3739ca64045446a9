"""DiScene distillation wrapper: a trainable sparse-query student and a frozen teacher.

One training step (what the engine does with it)::

    distiller = DiSceneDistiller(student, teacher, DiSceneWeights())   # teacher: trained, frozen
    teacher_guided_init(student, teacher)                              # once, before training
    optimiser = AdamW(distiller.trainable_parameters(), ...)           # student + encoder adapter
    out = distiller(batch, generator=gen)                              # teacher pass, then student pass
    task = sparse_loss(out.student, batch, loss_cfg)                   # OPUS terms, main queries only
    (task["total"] + out.terms["total"]).backward()

Passes per step: teacher (encoder, main queries, anchors) under ``torch.no_grad`` in eval mode,
then the student (encoder, main queries, teacher's initial points as the ``prior`` group, anchors
as the ``anchor`` group). A level whose weight is 0 is not computed and adds no decoder pass.

Fixes over the public code: the teacher is in eval mode and under no_grad on every call, even
after ``.train()`` on the wrapper (DiScene leaves dropout/drop-path active in its teacher); the
anchor sampler works on frames with fewer occupied voxels than anchors and draws points and labels
once; a single camera needs no special case (the sampler never divides by N - 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from occdistill.data.sample import Batch
from occdistill.losses.discene import (
    Anchors,
    EncoderAdapter,
    anchor_kd,
    encoder_kd,
    prior_kd,
    query_kd,
    sample_anchor_batch,
)
from occdistill.models.sparse import ExtraQueries, SparseOccStudent, SparseOutput


@dataclass(frozen=True)
class DiSceneWeights:
    """Loss weights. ``encoder`` .. ``anchor`` are the paper's lambda_1..4 (1, 0.2, 0.2, 0.5);
    within each query-type level the centre and feature terms are weighted by ``centre`` and
    ``feature`` (DiScene's configs: 3.0 and 2.0, i.e. 0.6 / 0.4 for the query and prior levels and
    1.5 / 1.0 for the anchor level after lambda). Per-layer terms are summed over all layers."""

    encoder: float = 1.0
    query: float = 0.2
    prior: float = 0.2
    anchor: float = 0.5
    centre: float = 3.0
    feature: float = 2.0

    def __post_init__(self) -> None:
        if min(self.encoder, self.query, self.prior, self.anchor, self.centre, self.feature) < 0:
            raise ValueError("distillation weights must be >= 0")


@dataclass
class DistillOutput:
    """student: the student's output (main queries plus the ``prior``/``anchor`` groups);
    teacher: the teacher's (no graph); anchors (B, A, ...) or None; terms: unweighted named terms
    and the weighted ``total``."""

    student: SparseOutput
    teacher: SparseOutput
    anchors: Anchors | None
    terms: dict[str, torch.Tensor]


class DiSceneDistiller(nn.Module):
    """Student + frozen teacher + the training-only encoder adapter.

    Args:
        student, teacher: :class:`SparseOccStudent` models with the same grid, class table, image
            size, number of decoder layers and embed dims (queries, backbone, neck channels and
            points per query may differ; differing neck channels get a 1x1 adapter).
        weights: :class:`DiSceneWeights`.
        num_anchors: anchors per frame; default the student's number of queries (DiScene).
        class_rebalance, anchor_class_weights: see :func:`occdistill.losses.discene.sample_anchors`.

    The teacher's parameters are frozen here; it stays in eval mode whatever ``train()`` says.
    ``state_dict()`` includes the teacher: save ``distiller.student`` (and ``distiller.adapter``
    to resume) rather than the wrapper.
    """

    def __init__(
        self,
        student: SparseOccStudent,
        teacher: SparseOccStudent,
        weights: DiSceneWeights | None = None,
        *,
        num_anchors: int | None = None,
        class_rebalance: bool = True,
        anchor_class_weights: torch.Tensor | None = None,
    ):
        super().__init__()
        s, t = student.cfg, teacher.cfg
        mismatch = [
            name for name, a, b in (
                ("grid", student.grid, teacher.grid),
                ("class table", student.classes, teacher.classes),
                ("image_size", tuple(s.image_size), tuple(t.image_size)),
                ("number of decoder layers", s.num_layers, t.num_layers),
                ("embed_dims", s.embed_dims, t.embed_dims),
                ("feature levels", len(s.backbone.out_indices), len(t.backbone.out_indices)),
            ) if a != b
        ]
        if mismatch:
            raise ValueError(f"student and teacher must agree on: {', '.join(mismatch)}")
        self.student = student
        self.teacher = teacher
        self.weights = weights or DiSceneWeights()
        self.num_anchors = num_anchors or s.num_queries
        self.class_rebalance = class_rebalance
        self.anchor_class_weights = anchor_class_weights
        self.adapter = EncoderAdapter([s.neck_channels] * len(s.backbone.out_indices),
                                      [t.neck_channels] * len(t.backbone.out_indices))
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.teacher.eval()

    def train(self, mode: bool = True) -> "DiSceneDistiller":
        super().train(mode)
        self.teacher.eval()  # never dropout / batch statistics in the teacher
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Student and adapter parameters that require gradients (what the optimiser gets)."""
        return [p for m in (self.student, self.adapter) for p in m.parameters() if p.requires_grad]

    def forward(
        self,
        batch: Batch,
        prior_depth: torch.Tensor | None = None,
        teacher_prior_depth: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> DistillOutput:
        """batch on the models' device (labels needed for the anchors); prior_depth (B, N, H, W)
        for a student with the depth branch; teacher_prior_depth for the teacher's (default: the
        same map); generator draws the anchors."""
        w = self.weights
        cams = (batch.images, batch.intrinsics, batch.img_from_raw, batch.ego_from_cam)
        anchors = None
        if w.anchor > 0:
            if batch.semantics is None:
                raise ValueError("anchor-level distillation needs labels (batch.semantics)")
            anchors = sample_anchor_batch(batch.semantics, self.student.grid, self.num_anchors, generator,
                                          self.class_rebalance, classes=self.student.classes,
                                          class_weights=self.anchor_class_weights)

        self.teacher.eval()
        with torch.no_grad():
            teacher_groups = {"anchor": anchors.points} if anchors is not None else {}
            t_out = self.teacher(*cams, prior_depth=prior_depth if teacher_prior_depth is None else teacher_prior_depth,
                                 extra_queries=ExtraQueries(teacher_groups))

        student_groups = dict(teacher_groups)
        if w.prior > 0:
            student_groups["prior"] = t_out.init_points
        s_out = self.student(*cams, prior_depth=prior_depth, extra_queries=ExtraQueries(student_groups))

        terms: dict[str, torch.Tensor] = {}
        total = s_out.init_points.new_zeros(())
        if w.encoder > 0:
            terms["encoder"] = encoder_kd(s_out.image_features, t_out.image_features, self.adapter)
            total = total + w.encoder * terms["encoder"]
        levels = []
        if w.query > 0:
            levels.append(("query", w.query, query_kd(s_out.layers, t_out.layers)))
        if w.prior > 0:
            levels.append(("prior", w.prior, prior_kd(s_out, t_out)))
        if w.anchor > 0:
            levels.append(("anchor", w.anchor, anchor_kd(s_out, t_out, anchors.valid)))
        for name, lam, per_layer in levels:
            level_total = total.new_zeros(())
            for i, (centre, feature) in enumerate(per_layer):
                terms[f"{name}.d{i}.centre"], terms[f"{name}.d{i}.feature"] = centre, feature
                level_total = level_total + w.centre * centre + w.feature * feature
            terms[name] = level_total
            total = total + lam * level_total
        terms["total"] = total
        return DistillOutput(student=s_out, teacher=t_out, anchors=anchors, terms=terms)
