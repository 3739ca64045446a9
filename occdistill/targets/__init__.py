"""Teacher targets (DESIGN.md section 6): dump formats, manifest, dumping, checking and loading.

- :mod:`~occdistill.targets.dump`: :func:`dump_targets` runs any ``predict(sample)`` callable
  over a split (resumable, sharded) and writes the targets and ``manifest_<split>.json``.
- :mod:`~occdistill.targets.compact` / :mod:`~occdistill.targets.seed_format`: our compact
  codec and the seed-compatible fp16 npz files.
- :mod:`~occdistill.targets.collapse`: BEV collapse by top-down compositing.
- :mod:`~occdistill.targets.check`: ``check-dump``'s validation, typed problems.
- :mod:`~occdistill.targets.loader`: targets paired with dataset samples and BEV-augmented.
- :mod:`~occdistill.targets.external`: GaussianFormer-2-style outputs -> a dump.
- :mod:`~occdistill.targets.checkpoint_dump`: a trained teacher checkpoint -> a dump (imported on
  its own: it needs the engine, which imports this package).

Format spec and usage: docs/teacher_targets.md.
"""

from occdistill.targets.check import Problem, check_dump
from occdistill.targets.collapse import collapse_bev
from occdistill.targets.dump import DumpOptions, DumpResult, DumpWriter, TeacherPrediction, dump_targets
from occdistill.targets.external import convert_external
from occdistill.targets.loader import (
    DistillSample,
    TargetBatch,
    TargetSample,
    TeacherTargets,
    WithTeacherTargets,
    augment_targets,
    collate_distill,
)
from occdistill.targets.manifest import Manifest, SampleEntry, TeacherInfo

__all__ = [
    "DistillSample", "DumpOptions", "DumpResult", "DumpWriter", "Manifest", "Problem", "SampleEntry",
    "TargetBatch", "TargetSample", "TeacherInfo", "TeacherPrediction", "TeacherTargets", "WithTeacherTargets",
    "augment_targets", "check_dump", "collapse_bev", "collate_distill", "convert_external", "dump_targets",
]
