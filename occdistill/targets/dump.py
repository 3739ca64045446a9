"""Dump teacher targets: run a teacher over a split and write its targets plus a manifest.

:func:`dump_targets` takes any ``predict(sample) -> TeacherPrediction`` callable, so the command
line, a training script or the external-teacher converter (:mod:`external`) all share one writer.

Determinism: every sample's prediction runs after seeding python, numpy and torch (CPU and CUDA)
from (seed, key), so a sample's targets do not depend on which process dumps it or in what order.
The caller puts its model in eval mode and its dataset in evaluation mode (checked: no
augmentation).

Resumability and sharding: each sample's files are written atomically, then a marker
``.parts/<split>/samples/<key>.json`` (its manifest entry plus the digest of the dump header).
A sample whose marker carries the current header digest and whose files all exist is complete
and skipped. ``shard=(i, n)`` takes every n-th sample from the i-th, so n processes or GPUs
(``--shard i/n``, torchrun ranks) split a split between them; the header is written by the first
and must be identical for all. Whichever process finds every sample complete writes
``manifest_<split>.json`` (atomically; concurrent writers write identical bytes).
"""

from __future__ import annotations

import hashlib
import json
import random
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Iterable, Literal, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from occdistill.data.sample import Sample
from occdistill.errors import DataError, OccDistillError
from occdistill.io import atomic_write_bytes, atomic_write_json
from occdistill.targets import compact, seed_format
from occdistill.targets.collapse import collapse_bev, parse_rule, rule_name
from occdistill.targets.manifest import (
    BEV,
    BEV_FEATURE,
    BEV_FP16,
    VOXEL,
    VOXEL_FP16,
    Artefact,
    ClassSpec,
    GridSpec,
    Manifest,
    SampleEntry,
    TeacherInfo,
)
from occdistill.targets.pairing import check_key, dataset_gt_sha256, sample_keys

FORMATS: tuple[str, ...] = ("compact", "seed")
PROB_SUM_TOLERANCE = 1e-3  # float32 teacher probabilities: sums within this of 1


@dataclass
class TeacherPrediction:
    """One sample's teacher output. ``voxel`` (X, Y, Z, K) float: probabilities (each voxel sums
    to 1) or logits, as ``value_kind`` says; ``bev_feature`` (C, X, Y) float, optional."""

    voxel: torch.Tensor
    value_kind: Literal["prob", "logit"]
    bev_feature: torch.Tensor | None = None


@dataclass(frozen=True)
class DumpOptions:
    """``formats``: "compact" (ours, what the loader prefers) and/or "seed" (fp16 npz, seed 000).
    ``bev_feature_channels``: C of the teacher BEV feature to store, None for none.
    ``codec``: the compact probability codec (:data:`compact.PROBS_CODECS`; default dense-u8, the
    one that decodes fast for every kind of teacher; topset-u8 is smaller for very confident ones).
    ``tau``: its error bound parameter (None: the codec's default, :data:`compact.DEFAULT_TAUS`).
    ``z_band``: BEV collapse layers.
    ``shard``: (i, n). ``workers``: data loader processes. ``overwrite``: redo samples already done."""

    split: str
    formats: tuple[str, ...] = ("compact",)
    bev_feature_channels: int | None = None
    codec: str = compact.DENSE_CODEC
    tau: float | None = None
    z_band: tuple[int, int] | None = None
    seed: int = 0
    shard: tuple[int, int] = (0, 1)
    workers: int = 0
    overwrite: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        check_key(self.split, "split name")
        if not self.formats or any(f not in FORMATS for f in self.formats):
            raise OccDistillError(f"formats {list(self.formats)} must be a non-empty subset of {list(FORMATS)}")
        i, n = self.shard
        if not (n >= 1 and 0 <= i < n):
            raise OccDistillError(f"shard {i}/{n}: need 0 <= i < n")
        if self.bev_feature_channels is not None and self.bev_feature_channels < 1:
            raise OccDistillError("bev_feature_channels must be >= 1")
        if self.workers < 0:
            raise OccDistillError("workers must be >= 0")
        if self.codec not in compact.PROBS_CODECS:
            raise OccDistillError(f"codec {self.codec!r} must be one of {', '.join(compact.PROBS_CODECS)}")


@dataclass(frozen=True)
class DumpResult:
    written: int
    skipped: int
    remaining: int  # samples of the split (all shards) not complete yet
    manifest: Path | None  # written once every sample is complete


def build_header(dataset, teacher: TeacherInfo, options: DumpOptions) -> Manifest:
    """The manifest without samples, from the dataset's grid and class table and the options."""
    grid, classes = GridSpec.of(dataset.grid), ClassSpec.of(dataset.classes)
    x, y, z = grid.shape
    k = classes.num_classes
    split = options.split
    arts: dict[str, Artefact] = {}
    if "compact" in options.formats:
        codec = options.codec
        tau = compact.DEFAULT_TAUS[codec] if options.tau is None else float(options.tau)
        if not 0 < tau <= 1.0 / k:
            raise OccDistillError(f"tau {tau} must be in (0, 1/K = {1.0 / k:.4f}] for {k} classes")
        arts[VOXEL] = Artefact("compact/{split}/{key}_3d_prob.occt", codec, "prob", (x, y, z, k), tau=tau)
        arts[BEV] = Artefact("compact/{split}/{key}_bev_prob.occt", codec, "prob", (x, y, k), tau=tau)
    if "seed" in options.formats:
        arts[VOXEL_FP16] = Artefact(seed_format.VOXEL_TEMPLATE, seed_format.ENCODING, teacher.value_kind,
                                    (x, y, z, k), seed_format.voxel_array_key(teacher.value_kind))
        arts[BEV_FP16] = Artefact(seed_format.BEV_TEMPLATE, seed_format.ENCODING, "prob", (x, y, k),
                                  seed_format.BEV_ARRAY_KEY)
    if options.bev_feature_channels is not None:
        arts[BEV_FEATURE] = Artefact("bev_feature/{split}/{key}_bev_feature.occt", compact.FEATURE_CODEC,
                                     "feature", (options.bev_feature_channels, x, y))
    if options.z_band is not None:
        lo, hi = options.z_band
        if not 0 <= lo < hi <= z:
            raise OccDistillError(f"z band {lo}:{hi} outside the grid's 0..{z} layers")
    return Manifest(split=split, teacher=teacher, grid=grid, classes=classes, artefacts=arts,
                    bev_rule=rule_name(options.z_band),
                    seed=options.seed)


def sample_seed(seed: int, key: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "little") >> 1


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def _header_digest(header: Manifest) -> str:
    return hashlib.sha256(json.dumps(header.to_json(), sort_keys=True).encode()).hexdigest()


def check_prediction(pred: TeacherPrediction, header: Manifest, key: str) -> None:
    """Shape, finiteness and (for probabilities) normalisation of one prediction."""
    where = f"teacher output for sample {key}"
    want = tuple(header.grid.shape) + (header.classes.num_classes,)
    v = pred.voxel
    if not isinstance(v, torch.Tensor) or tuple(v.shape) != want or not v.is_floating_point():
        got = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
        raise DataError(f"{where}: voxel values are {got}, expected a float tensor of shape {want} (X, Y, Z, K)")
    if pred.value_kind not in ("prob", "logit"):
        raise DataError(f"{where}: value_kind {pred.value_kind!r} is not 'prob' or 'logit'")
    if pred.value_kind != header.teacher.value_kind:
        raise DataError(f"{where}: value kind {pred.value_kind!r}, the dump declares {header.teacher.value_kind!r}")
    if not bool(torch.isfinite(v).all()):
        raise DataError(f"{where}: {int((~torch.isfinite(v)).sum())} NaN/inf voxel values")
    if pred.value_kind == "prob":
        err = float((v.double().sum(-1) - 1).abs().max())
        if float(v.min()) < 0 or err > PROB_SUM_TOLERANCE:
            raise DataError(f"{where}: not probabilities (min {float(v.min()):.3g}, max |sum - 1| {err:.3g}); "
                            "logits must be declared as value kind 'logit'")
    art = header.artefacts.get(BEV_FEATURE)
    if art is not None:
        f = pred.bev_feature
        if f is None or tuple(f.shape) != art.shape:
            got = None if f is None else tuple(f.shape)
            raise DataError(f"{where}: BEV feature is {got}, expected {art.shape} (C, X, Y)")
        if not bool(torch.isfinite(f).all()):
            raise DataError(f"{where}: BEV feature has NaN/inf values")


class DumpWriter:
    """Writes the samples of one dump directory and split, and its manifest once complete."""

    def __init__(self, out_dir: str | Path, header: Manifest, overwrite: bool = False) -> None:
        self.out_dir = Path(out_dir)
        self.header = header.header()
        self.parts = self.out_dir / ".parts" / header.split
        self.digest = _header_digest(self.header)
        stored = self.parts / "header.json"
        if stored.is_file():
            try:
                old = Manifest.from_json(json.loads(stored.read_text()), str(stored))
            except (ValueError, DataError):
                old = None
            if old != self.header and not overwrite:
                diff = _header_diff(old, self.header)
                raise OccDistillError(
                    f"{self.out_dir}: holds a {header.split!r} dump with other settings ({diff}); "
                    "use another --out or --overwrite"
                )
        atomic_write_json(stored, self.header.to_json())

    def marker(self, key: str) -> Path:
        return self.parts / "samples" / f"{key}.json"

    def completed(self, key: str) -> SampleEntry | None:
        """The entry of a sample dumped with this header whose files all exist, else None."""
        path = self.marker(key)
        if not path.is_file():
            return None
        try:
            rec = json.loads(path.read_text())
            if rec.get("header_sha256") != self.digest:
                return None
            entry = SampleEntry(**rec["entry"])
        except (ValueError, TypeError, KeyError):
            return None  # a marker from another version: redo the sample
        if not all((self.out_dir / f).is_file() for f in entry.files.values()):
            return None
        return entry

    def write(self, index: int, key: str, pred: TeacherPrediction, gt: str | None) -> SampleEntry:
        """Encode and write one sample's artefacts, then its marker."""
        check_prediction(pred, self.header, key)
        h = self.header
        voxel = pred.voxel.detach().float()
        probs = voxel.softmax(dim=-1) if pred.value_kind == "logit" else voxel
        z_band = parse_rule(h.bev_rule)
        bev = collapse_bev(probs, h.classes.free_index, z_band).cpu().numpy()
        probs_np = probs.cpu().numpy()
        files: dict[str, str] = {}
        for name, art in h.artefacts.items():
            rel = art.file(h.split, key)
            if name == VOXEL:
                data = compact.encode_probs(probs_np, h.classes.free_index, art.tau, art.encoding)
            elif name == BEV:
                data = compact.encode_probs(bev, h.classes.free_index, art.tau, art.encoding)
            elif name == VOXEL_FP16:
                data = seed_format.encode_fp16_npz(voxel.cpu().numpy(), art.array_key)
            elif name == BEV_FP16:
                data = seed_format.encode_fp16_npz(bev, art.array_key)
            else:
                data = compact.encode_feature(pred.bev_feature.detach().float().cpu().numpy())
            atomic_write_bytes(self.out_dir / rel, data)
            files[name] = rel
        entry = SampleEntry(key=key, index=index, gt_sha256=gt, files=files)
        atomic_write_json(self.marker(key), {"header_sha256": self.digest, "entry": asdict(entry)})
        return entry

    def finalize(self, expected: Sequence[tuple[int, str]]) -> tuple[Path | None, int]:
        """Write the manifest when every (index, key) is complete; returns (path or None, remaining)."""
        entries, remaining = [], 0
        for index, key in expected:
            e = self.completed(key)
            if e is None or e.index != index:
                remaining += 1
            else:
                entries.append(e)
        if remaining:
            return None, remaining
        manifest = replace(self.header, samples=tuple(sorted(entries, key=lambda e: e.index)))
        return manifest.save(self.out_dir), 0

    def clear_manifest(self) -> None:
        """A dump being (re)written has no valid manifest until it is complete again."""
        Manifest.path_for(self.out_dir, self.header.split).unlink(missing_ok=True)


def _header_diff(old: Manifest | None, new: Manifest) -> str:
    if old is None:
        return "unreadable header"
    a, b = old.to_json(), new.to_json()
    return "differs in " + ", ".join(k for k in b if a.get(k) != b.get(k))


def _identity(x):
    return x


def run_dump(
    produce: Callable[[object], TeacherPrediction],
    items: Callable[[Sequence[int]], Iterable[tuple[int, object]]],
    dataset,
    out_dir: str | Path,
    teacher: TeacherInfo,
    options: DumpOptions,
    indices: Sequence[int] | None = None,
) -> DumpResult:
    """Shared driver of :func:`dump_targets` and the external converter.

    ``items(todo)`` yields ``(index, payload)`` for the indices to do, in order; ``produce`` is
    called with the payload under the sample's seed.
    """
    header = build_header(dataset, teacher, options)
    writer = DumpWriter(out_dir, header, options.overwrite)
    keys = sample_keys(dataset)
    indices = list(range(len(keys))) if indices is None else list(indices)
    i, n = options.shard
    mine = indices[i::n]
    todo = [j for j in mine if options.overwrite or writer.completed(keys[j]) is None]
    if todo:
        writer.clear_manifest()
    bar = tqdm(total=len(todo), desc=f"dump {options.split}" + (f" shard {i}/{n}" if n > 1 else ""), unit="sample",
               file=sys.stderr, disable=not options.progress, dynamic_ncols=True)
    written = 0
    for index, payload in items(todo):
        key = keys[index]
        seed_everything(sample_seed(options.seed, key))
        pred = produce(payload)
        writer.write(index, key, pred, dataset_gt_sha256(dataset, index))
        written += 1
        bar.update()
    bar.close()
    path, remaining = writer.finalize([(j, keys[j]) for j in indices])
    return DumpResult(written=written, skipped=len(mine) - len(todo), remaining=remaining, manifest=path)


def dump_targets(
    predict: Callable[[Sample], TeacherPrediction],
    dataset,
    out_dir: str | Path,
    teacher: TeacherInfo,
    options: DumpOptions,
) -> DumpResult:
    """Run ``predict`` on this shard's samples of ``dataset`` (resuming) and write their targets.

    ``dataset``: an evaluation-mode Occ3D/Occ-ScanNet dataset (``augment`` False). Samples are
    read by ``options.workers`` loader processes while the main process runs the teacher.
    """
    if getattr(dataset, "augment", False):
        raise OccDistillError("dump_targets needs an evaluation-mode dataset (augment=False): "
                              "targets must be computed on un-augmented samples")
    keys = sample_keys(dataset)

    def items(todo: Sequence[int]):
        loader = DataLoader(Subset(dataset, list(todo)), batch_size=None, shuffle=False,
                            num_workers=options.workers, collate_fn=_identity)
        for index, sample in zip(todo, loader):
            if sample.token != keys[index]:
                raise DataError(f"dataset sample {index} has token {sample.token!r}, expected {keys[index]!r}")
            yield index, sample

    return run_dump(predict, items, dataset, out_dir, teacher, options)
