"""The manifest of a teacher dump: what the targets are, for which grid/classes, and for which GT.

One manifest per split, ``<dump>/manifest_<split>.json`` (JSON, written atomically), holding:
format and version; the teacher (name, checkpoint path and SHA-256, value kind of its output:
``prob`` or ``logit``); the grid (range, voxel size, shape); the class table (name, names, free
index); the BEV rule; the per-sample seed base; the artefacts (per artefact: file template,
encoding, stored value kind, array key where the container has keys, shape); and per sample its
key, dataset index, the SHA-256 of the GT labels it was computed for (:mod:`pairing`) and its
files. ``Manifest.from_json`` validates all of it and names the file and field on error.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

from occdistill.data.classes import ClassTable
from occdistill.errors import DataError
from occdistill.geometry.grid import VoxelGrid
from occdistill.io import atomic_write_json
from occdistill.targets import compact, seed_format
from occdistill.targets.collapse import parse_rule
from occdistill.targets.pairing import check_key

FORMAT = "occdistill-teacher-targets"
VERSION = 1
MANIFEST_PREFIX = "manifest_"

# Artefact names. "voxel"/"bev" are the compact probabilities, "*_fp16" the seed-compatible files.
VOXEL, BEV, VOXEL_FP16, BEV_FP16, BEV_FEATURE = "voxel", "bev", "voxel_fp16", "bev_fp16", "bev_feature"
ENCODINGS = {*compact.PROBS_CODECS, compact.FEATURE_CODEC, seed_format.ENCODING}
TeacherValue = Literal["prob", "logit"]


@dataclass(frozen=True)
class TeacherInfo:
    """Who made the targets. ``value_kind``: what the teacher outputs per voxel (GaussianFormer-2:
    probabilities; our models: logits)."""

    name: str
    checkpoint: str
    checkpoint_sha256: str
    value_kind: TeacherValue


@dataclass(frozen=True)
class GridSpec:
    range: tuple[float, ...]
    voxel_size: tuple[float, ...]
    shape: tuple[int, ...]

    @classmethod
    def of(cls, grid: VoxelGrid) -> "GridSpec":
        return cls(tuple(grid.range), tuple(grid.voxel_size), tuple(grid.shape))

    def differs_from(self, grid: VoxelGrid, tol: float = 1e-6) -> str | None:
        """None when equal to ``grid``, else a one-line description of the difference."""
        other = GridSpec.of(grid)
        close = all(abs(a - b) <= tol for a, b in zip(self.range + self.voxel_size, other.range + other.voxel_size))
        if close and self.shape == other.shape:
            return None
        return (f"dump grid {_fmt_grid(self)} differs from the dataset grid {_fmt_grid(other)}")


def _fmt_grid(g: GridSpec) -> str:
    return f"{'x'.join(map(str, g.shape))} range {list(g.range)} voxel {list(g.voxel_size)}"


@dataclass(frozen=True)
class ClassSpec:
    name: str
    names: tuple[str, ...]
    free_index: int

    @classmethod
    def of(cls, table: ClassTable) -> "ClassSpec":
        return cls(table.name, tuple(table.names), table.free_index)

    @property
    def num_classes(self) -> int:
        return len(self.names)

    def differs_from(self, table: ClassTable) -> str | None:
        if self.names == tuple(table.names) and self.free_index == table.free_index:
            return None
        return (f"dump class table {self.name!r} ({self.num_classes} classes, free {self.free_index}) differs from "
                f"the dataset's {table.name!r} ({table.num_classes} classes, free {table.free_index})")


@dataclass(frozen=True)
class Artefact:
    """One kind of file per sample. ``path``: template with ``{split}`` and ``{key}``;
    ``value``: what the file stores (``prob``, ``logit`` or ``feature``); ``array_key``: the
    array's name in npz files; ``tau``: the error bound parameter of compact probability files."""

    path: str
    encoding: str
    value: Literal["prob", "logit", "feature"]
    shape: tuple[int, ...]
    array_key: str | None = None
    tau: float | None = None

    def file(self, split: str, key: str) -> str:
        return self.path.format(split=split, key=key)


@dataclass(frozen=True)
class SampleEntry:
    key: str
    index: int  # position in the dataset the dump was made from
    gt_sha256: str | None  # None: the dataset had no labels
    files: dict[str, str]  # artefact name -> path relative to the dump directory


@dataclass(frozen=True)
class Manifest:
    split: str
    teacher: TeacherInfo
    grid: GridSpec
    classes: ClassSpec
    artefacts: dict[str, Artefact]
    bev_rule: str  # "topdown" or "topdown z=lo:hi" (collapse.collapse_bev)
    seed: int
    samples: tuple[SampleEntry, ...] = ()
    format: str = FORMAT
    version: int = VERSION

    def header(self) -> "Manifest":
        """Everything but the samples: what every shard of one dump must agree on."""
        return replace(self, samples=())

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        head = {"format": d.pop("format"), "version": d.pop("version")}
        return {**head, **d, "samples": [asdict(s) for s in self.samples]}

    @classmethod
    def from_json(cls, obj: Any, where: str) -> "Manifest":
        return _parse(obj, where)

    @staticmethod
    def path_for(dump_dir: str | Path, split: str) -> Path:
        return Path(dump_dir) / f"{MANIFEST_PREFIX}{split}.json"

    def save(self, dump_dir: str | Path) -> Path:
        return atomic_write_json(self.path_for(dump_dir, self.split), self.to_json())

    @classmethod
    def load(cls, dump_dir: str | Path, split: str | None = None) -> "Manifest":
        """The manifest of ``split``; without a split, the only manifest of the directory."""
        dump_dir = Path(dump_dir)
        if not dump_dir.is_dir():
            raise DataError(f"{dump_dir}: teacher dump directory not found")
        if split is None:
            found = sorted(dump_dir.glob(f"{MANIFEST_PREFIX}*.json"))
            if len(found) != 1:
                names = [p.name for p in found]
                raise DataError(
                    f"{dump_dir}: {'no manifest' if not found else f'several manifests {names}'} "
                    f"({MANIFEST_PREFIX}<split>.json); {'is the dump complete?' if not found else 'name the split'}"
                )
            path = found[0]
        else:
            path = cls.path_for(dump_dir, split)
            if not path.is_file():
                raise DataError(f"{path}: manifest not found (is the dump of split {split!r} complete?)")
        try:
            obj = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise DataError(f"{path}: unreadable manifest ({exc})") from exc
        return cls.from_json(obj, str(path))

    def sample_map(self) -> dict[str, SampleEntry]:
        return {s.key: s for s in self.samples}


def expected_shapes(grid: GridSpec, classes: ClassSpec) -> dict[str, tuple[int, ...]]:
    x, y, z = grid.shape
    k = classes.num_classes
    return {VOXEL: (x, y, z, k), VOXEL_FP16: (x, y, z, k), BEV: (x, y, k), BEV_FP16: (x, y, k)}


# ----------------------------------------------------------------------------- parsing


def _field(d: dict, key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if not isinstance(d, dict) or key not in d:
        raise DataError(f"{where}: missing field {key!r}")
    value = d[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise DataError(f"{where}: field {key!r} must be {names}, got {type(value).__name__}")
    return value


def _numbers(d: dict, key: str, n: int, where: str, integer: bool = False) -> tuple:
    values = _field(d, key, list, where)
    kinds = int if integer else (int, float)
    ok = len(values) == n and all(isinstance(v, kinds) and not isinstance(v, bool) for v in values)
    if not ok:
        raise DataError(f"{where}: field {key!r} must be {n} {'integers' if integer else 'numbers'}, got {values!r}")
    return tuple(int(v) for v in values) if integer else tuple(float(v) for v in values)


def _parse(obj: Any, where: str) -> Manifest:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: a manifest is a JSON object, got {type(obj).__name__}")
    fmt = _field(obj, "format", str, where)
    if fmt != FORMAT:
        raise DataError(f"{where}: format {fmt!r} is not {FORMAT!r}")
    version = _field(obj, "version", int, where)
    if version != VERSION:
        raise DataError(f"{where}: manifest version {version}, this code reads version {VERSION}")
    split = _field(obj, "split", str, where)
    check_key(split, f"{where} split")

    t = _field(obj, "teacher", dict, where)
    teacher = TeacherInfo(
        name=_field(t, "name", str, f"{where} teacher"),
        checkpoint=_field(t, "checkpoint", str, f"{where} teacher"),
        checkpoint_sha256=_field(t, "checkpoint_sha256", str, f"{where} teacher"),
        value_kind=_field(t, "value_kind", str, f"{where} teacher"),
    )
    if teacher.value_kind not in ("prob", "logit"):
        raise DataError(f"{where}: teacher value_kind {teacher.value_kind!r} is not 'prob' or 'logit'")

    g = _field(obj, "grid", dict, where)
    grid = GridSpec(_numbers(g, "range", 6, f"{where} grid"), _numbers(g, "voxel_size", 3, f"{where} grid"),
                    _numbers(g, "shape", 3, f"{where} grid", integer=True))
    try:
        if VoxelGrid(grid.range, grid.voxel_size).shape != grid.shape:
            raise DataError(f"{where}: grid shape {list(grid.shape)} does not follow from its range and voxel size")
    except ValueError as exc:
        raise DataError(f"{where}: invalid grid ({exc})") from exc

    c = _field(obj, "classes", dict, where)
    names = _field(c, "names", list, f"{where} classes")
    if len(names) < 2 or not all(isinstance(n, str) for n in names):
        raise DataError(f"{where}: classes.names must list at least two class names")
    classes = ClassSpec(_field(c, "name", str, f"{where} classes"), tuple(names),
                        _field(c, "free_index", int, f"{where} classes"))
    if not 0 <= classes.free_index < classes.num_classes:
        raise DataError(f"{where}: free_index {classes.free_index} outside 0..{classes.num_classes - 1}")

    shapes = expected_shapes(grid, classes)
    artefacts = {}
    for name, a in _field(obj, "artefacts", dict, where).items():
        w = f"{where} artefact {name!r}"
        art = Artefact(
            path=_field(a, "path", str, w),
            encoding=_field(a, "encoding", str, w),
            value=_field(a, "value", str, w),
            shape=_numbers(a, "shape", len(_field(a, "shape", list, w)), w, integer=True),
            array_key=a.get("array_key"),
            tau=a.get("tau"),
        )
        if art.encoding not in ENCODINGS:
            raise DataError(f"{w}: unknown encoding {art.encoding!r} (known: {sorted(ENCODINGS)})")
        if art.value not in ("prob", "logit", "feature"):
            raise DataError(f"{w}: value {art.value!r} is not prob, logit or feature")
        if "{key}" not in art.path or ".." in art.path.split("/") or art.path.startswith("/"):
            raise DataError(f"{w}: path template {art.path!r} must be relative and contain {{key}}")
        if name in shapes and art.shape != shapes[name]:
            raise DataError(f"{w}: shape {list(art.shape)} does not match the grid and classes {list(shapes[name])}")
        if name == BEV_FEATURE and (len(art.shape) != 3 or art.shape[1:] != grid.shape[:2]):
            raise DataError(f"{w}: shape {list(art.shape)} is not (C, {grid.shape[0]}, {grid.shape[1]})")
        if art.encoding == seed_format.ENCODING and not art.array_key:
            raise DataError(f"{w}: npz artefacts need an array_key")
        if art.encoding in compact.PROBS_CODECS and not (isinstance(art.tau, float) and 0 < art.tau < 0.5):
            raise DataError(f"{w}: {art.encoding} artefacts need their tau (0 < tau < 0.5)")
        artefacts[name] = art
    if not artefacts:
        raise DataError(f"{where}: no artefacts")

    samples, seen = [], set()
    for i, s in enumerate(_field(obj, "samples", list, where)):
        w = f"{where} samples[{i}]"
        key = check_key(_field(s, "key", str, w), w)
        if key in seen:
            raise DataError(f"{w}: key {key!r} appears twice")
        seen.add(key)
        gt = s.get("gt_sha256") if isinstance(s, dict) else None
        if gt is not None and not (isinstance(gt, str) and len(gt) == 64):
            raise DataError(f"{w}: gt_sha256 must be 64 hex digits or null")
        files = _field(s, "files", dict, w)
        unknown = sorted(set(files) - set(artefacts))
        if unknown:
            raise DataError(f"{w}: files of unknown artefacts {unknown}")
        samples.append(SampleEntry(key=key, index=_field(s, "index", int, w), gt_sha256=gt, files=dict(files)))
    bev_rule = _field(obj, "bev_rule", str, where)
    try:
        band = parse_rule(bev_rule)
    except ValueError as exc:
        raise DataError(f"{where}: {exc}") from exc
    if band is not None and band[1] > grid.shape[2]:
        raise DataError(f"{where}: BEV rule {bev_rule!r} reaches beyond the grid's {grid.shape[2]} layers")
    return Manifest(
        split=split, teacher=teacher, grid=grid, classes=classes, artefacts=artefacts,
        bev_rule=bev_rule, seed=_field(obj, "seed", int, where),
        samples=tuple(samples),
    )
