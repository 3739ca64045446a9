"""Choosing a model: a closed mapping from a ``kind`` string to its config class and constructor.

No registry is filled by import side effects: adding a model kind is one entry in
:data:`MODEL_KINDS`, one field (named after the kind) in :class:`ModelConfig` and the kind in its
``Literal``. "Go to definition" on a YAML ``kind:`` lands here and then on the class.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal

from torch import nn

from occdistill.models.dense import DenseStudent, DenseStudentConfig
from occdistill.models.gaussian import GaussianTeacher, GaussianTeacherConfig
from occdistill.models.sparse import SparseOccConfig, SparseOccStudent

# kind -> (config class, constructor taking that config)
MODEL_KINDS: dict[str, tuple[type, Callable[..., nn.Module]]] = {
    "dense": (DenseStudentConfig, DenseStudent),  # FlashOcc-style BEV student (or a scaled-up dense teacher)
    "gaussian": (GaussianTeacherConfig, GaussianTeacher),  # GaussianFormer-2-style teacher
    "sparse": (SparseOccConfig, SparseOccStudent),  # OPUS-style sparse-query student / teacher
}

ModelKind = Literal["dense", "gaussian", "sparse"]
SelectedConfig = DenseStudentConfig | GaussianTeacherConfig | SparseOccConfig


@dataclass(frozen=True)
class ModelConfig:
    """The model section of a training config: ``kind`` selects the sub-section that configures
    the model (``model.dense`` for ``kind: dense``); the sections of other kinds are ignored."""

    kind: ModelKind = "dense"
    dense: DenseStudentConfig = field(default_factory=DenseStudentConfig)
    gaussian: GaussianTeacherConfig = field(default_factory=GaussianTeacherConfig)
    sparse: SparseOccConfig = field(default_factory=SparseOccConfig)

    def __post_init__(self) -> None:
        if self.kind not in MODEL_KINDS:
            raise ValueError(f"model kind {self.kind!r} is not one of {sorted(MODEL_KINDS)}")
        cfg_cls = MODEL_KINDS[self.kind][0]
        if not isinstance(self.selected, cfg_cls):
            raise ValueError(f"model.{self.kind} must be a {cfg_cls.__name__}")

    @property
    def selected(self) -> SelectedConfig:
        """The config of the selected kind."""
        return getattr(self, self.kind)


def build_model(cfg: ModelConfig) -> nn.Module:
    """A freshly initialised model of ``cfg.kind`` (weights from the current torch RNG state)."""
    return MODEL_KINDS[cfg.kind][1](cfg.selected)
