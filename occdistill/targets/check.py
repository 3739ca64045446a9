"""Validate a teacher dump against a dataset: every problem, per sample, with a clear message.

Problems found (``Problem.kind``):
- ``manifest``: no readable, valid manifest;
- ``grid`` / ``classes``: the dump was made for another grid or class table (then the per-sample
  checks are skipped: every file would fail them);
- ``missing``: a dataset sample without an entry, or an entry whose file does not exist;
- ``extra``: an entry for a key the dataset does not have;
- ``unreadable``: a file that does not decode;
- ``shape``: an array of another shape than the manifest states;
- ``nonfinite``: NaN or inf values;
- ``not_normalized``: probabilities that are negative or do not sum to 1 (tolerance per encoding:
  fp16 rounding allows 2e-3, the compact decoder is exact to 1e-4);
- ``gt_mismatch``: the target was computed for other labels than the dataset sample's
  (the dump and the dataset are misaligned).
"""

from __future__ import annotations

import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from tqdm import tqdm

from occdistill.errors import DataError
from occdistill.targets import compact, seed_format
from occdistill.targets.manifest import Artefact, Manifest, SampleEntry
from occdistill.targets.pairing import dataset_gt_sha256, sample_keys

SUM_TOLERANCE = {**dict.fromkeys(compact.PROBS_CODECS, 1e-4), seed_format.ENCODING: 2e-3}


@dataclass(frozen=True)
class Problem:
    key: str | None  # None: the dump as a whole
    kind: str
    message: str

    def __str__(self) -> str:
        return f"{self.key or '<dump>'}: {self.kind}: {self.message}"

    def to_json(self) -> dict:
        return asdict(self)


def _where(flat_index: int, shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(str(int(v)) for v in np.unravel_index(flat_index, shape)) + ")"


def check_array(arr: np.ndarray, art: Artefact, name: str, key: str) -> list[Problem]:
    """Shape, finiteness and normalisation of one decoded artefact."""
    if arr.shape != art.shape:
        return [Problem(key, "shape", f"{name}: shape {list(arr.shape)}, expected {list(art.shape)}")]
    bad = ~np.isfinite(arr)
    if bad.any():
        first = _where(int(np.flatnonzero(bad)[0]), arr.shape)
        return [Problem(key, "nonfinite", f"{name}: {int(bad.sum())} NaN/inf values (first at {first})")]
    if art.value != "prob":
        return []
    sums = arr.sum(axis=-1, dtype=np.float64)
    err = np.abs(sums - 1.0)
    worst = int(err.argmax())
    tol = SUM_TOLERANCE[art.encoding]
    problems = []
    if err.flat[worst] > tol:
        problems.append(Problem(key, "not_normalized", (
            f"{name}: probabilities sum to {sums.flat[worst]:.4f} at {_where(worst, sums.shape)} "
            f"({int((err > tol).sum())} cells beyond the tolerance {tol:g})")))
    if arr.min() < 0:
        problems.append(Problem(key, "not_normalized", f"{name}: negative probabilities (min {arr.min():.3g})"))
    return problems


def read_artefact(path: Path, art: Artefact) -> np.ndarray:
    """Decode one file as float32 (no checks); DataError/CodecError when it cannot be read."""
    if art.encoding == seed_format.ENCODING:
        return seed_format.read_fp16_npz(path, art.array_key).astype(np.float32)
    data = path.read_bytes()
    return compact.decode_feature(data) if art.value == "feature" else compact.decode_probs(data)


def check_entry(dump_dir: Path, manifest: Manifest, entry: SampleEntry, gt: str | None) -> list[Problem]:
    """Every file of one sample, and its GT hash against ``gt`` (the dataset's)."""
    problems = []
    if entry.gt_sha256 is not None and gt is not None and gt != entry.gt_sha256:
        problems.append(Problem(entry.key, "gt_mismatch", (
            f"target computed for other labels (GT sha256 {entry.gt_sha256[:12]}.. in the manifest, "
            f"{gt[:12]}.. in the dataset): the dump is misaligned with the dataset")))
    for name, art in manifest.artefacts.items():
        rel = entry.files.get(name)
        if rel is None:
            problems.append(Problem(entry.key, "missing", f"{name}: no file listed in the manifest"))
            continue
        path = dump_dir / rel
        if not path.is_file():
            problems.append(Problem(entry.key, "missing", f"{name}: file {rel} not found"))
            continue
        try:
            arr = read_artefact(path, art)
        except (DataError, compact.CodecError, OSError) as exc:
            problems.append(Problem(entry.key, "unreadable", f"{name}: {rel}: {exc}"))
            continue
        problems += check_array(arr, art, name, entry.key)
    return problems


# Worker state for the process pool: set in the parent before forking, inherited by the children.
_JOB: tuple | None = None


def _check_one(i: int) -> list[Problem]:
    dump_dir, manifest, dataset, work = _JOB
    entry, index = work[i]
    try:
        gt = dataset_gt_sha256(dataset, index)
    except DataError as exc:
        return [Problem(entry.key, "unreadable", f"dataset labels: {exc}")]
    return check_entry(dump_dir, manifest, entry, gt)


def check_dump(
    dump_dir: str | Path,
    dataset,
    split: str | None = None,
    *,
    workers: int = 0,
    progress: bool = False,
) -> list[Problem]:
    """All problems of the dump ``dump_dir`` (split ``split``, or its only one) against ``dataset``."""
    global _JOB
    dump_dir = Path(dump_dir)
    try:
        manifest = Manifest.load(dump_dir, split)
    except DataError as exc:
        return [Problem(None, "manifest", str(exc))]
    problems = []
    grid_diff = manifest.grid.differs_from(dataset.grid)
    class_diff = manifest.classes.differs_from(dataset.classes)
    if grid_diff:
        problems.append(Problem(None, "grid", grid_diff))
    if class_diff:
        problems.append(Problem(None, "classes", class_diff))
    if problems:
        return problems

    keys = sample_keys(dataset)
    entries = manifest.sample_map()
    index_of = {k: i for i, k in enumerate(keys)}
    problems += [Problem(k, "missing", "no teacher target in the manifest") for k in keys if k not in entries]
    problems += [Problem(k, "extra", "in the manifest but not in the dataset") for k in entries if k not in index_of]
    work = [(e, index_of[e.key]) for e in manifest.samples if e.key in index_of]
    _JOB = (dump_dir, manifest, dataset, work)
    try:
        bar = dict(total=len(work), desc="check-dump", unit="sample", file=sys.stderr, disable=not progress,
                   dynamic_ncols=True)
        if workers > 0:
            with ProcessPoolExecutor(workers, mp_context=get_context("fork")) as pool:
                results = list(tqdm(pool.map(_check_one, range(len(work)), chunksize=4), **bar))
        else:
            results = [_check_one(i) for i in tqdm(range(len(work)), **bar)]
    finally:
        _JOB = None
    for r in results:
        problems += r
    return problems
