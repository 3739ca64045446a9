"""External teachers: convert per-frame outputs of another code base (GaussianFormer-2) into a dump.

GaussianFormer-2's head returns ``pred_occ[-1]`` of shape (1, K, X*Y*Z): probabilities
``[P_occ * e_0 .. P_occ * e_{K-2}, 1 - P_occ]`` (free *last*), with the voxel axis the C-order
flatten of its (X, Y, Z) query grid (``huang-yh/GaussianFormer`` ``model/head/gaussian_head.py``:
``prediction.append(geosem[None].transpose(1, 2))``). A user saves that array per frame (``.npy``,
or a key of an ``.npz``) and writes a frame list; :func:`convert_external` then

1. reads the frame list: one line per frame, ``<file> <token>`` (whitespace separated, ``#``
   comments), file paths relative to the input directory;
2. pairs each token with the dataset sample of that key (unknown tokens are errors);
3. brings every array to (X, Y, Z, K): (K, X*Y*Z) [optionally with a leading batch of 1],
   (X*Y*Z, K) and (X, Y, Z, K) are accepted and told apart by the grid and class count;
4. maps "free last" onto the dataset's class table: the free probability goes to the table's free
   index (Occ3D: 17, already last; Occ-ScanNet: 0), the others keep their order;
5. checks probabilities (non-negative, sums within 1e-2 of 1, else an error suggesting
   ``value_kind="logit"``) and renormalises them exactly (fp16-saved inputs are off by ~1e-3);
6. writes the targets and the manifest through the same writer as ``dump-teacher``
   (formats, sharding, resumption, GT hashes).

The arrays must already be on the dataset's grid (Occ3D: ego frame, 200x200x16 at 0.4 m from
(-40, -40, -1)); docs/teacher_targets.md explains how to run GaussianFormer-2 that way.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from occdistill.errors import DataError
from occdistill.targets.dump import DumpOptions, DumpResult, TeacherPrediction, run_dump
from occdistill.targets.manifest import TeacherInfo
from occdistill.targets.pairing import check_key, sample_keys

EXTERNAL_SUM_TOLERANCE = 1e-2


@dataclass(frozen=True)
class ExternalFrame:
    path: Path
    key: str


def read_frame_list(list_file: str | Path, input_dir: str | Path) -> list[ExternalFrame]:
    """Parse ``<file> <token>`` lines; relative files are taken under ``input_dir``."""
    list_file, input_dir = Path(list_file), Path(input_dir)
    if not list_file.is_file():
        raise DataError(f"{list_file}: frame list not found")
    frames, seen = [], {}
    for n, raw in enumerate(list_file.read_text(encoding="utf-8").splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2:
            raise DataError(f"{list_file}:{n}: expected '<file> <token>', got {raw.strip()!r}")
        file, key = parts
        check_key(key, f"{list_file}:{n}")
        if key in seen:
            raise DataError(f"{list_file}:{n}: token {key} already listed on line {seen[key]}")
        seen[key] = n
        path = Path(file)
        frames.append(ExternalFrame(path if path.is_absolute() else input_dir / path, key))
    if not frames:
        raise DataError(f"{list_file}: no frames listed")
    return frames


def load_external_array(path: Path, array_key: str | None = None) -> np.ndarray:
    """A ``.npy`` file, or one array of an ``.npz`` (``array_key``, or its only array)."""
    if not path.is_file():
        raise DataError(f"{path}: teacher output not found")
    try:
        loaded = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise DataError(f"{path}: not a readable .npy/.npz ({exc})") from exc
    if isinstance(loaded, np.ndarray):
        return loaded
    with loaded as npz:
        if array_key is None:
            if len(npz.files) != 1:
                raise DataError(f"{path}: holds arrays {npz.files}; name one (array key)")
            array_key = npz.files[0]
        if array_key not in npz.files:
            raise DataError(f"{path}: no array {array_key!r} (has {npz.files})")
        return npz[array_key]


def to_grid_layout(arr: np.ndarray, grid_shape: tuple[int, int, int], k: int, where: str) -> np.ndarray:
    """(K, X*Y*Z), (1, K, X*Y*Z), (X*Y*Z, K), (X, Y, Z, K) [or (1, X, Y, Z, K)] -> (X, Y, Z, K) float32."""
    x, y, z = grid_shape
    n = x * y * z
    a = np.asarray(arr)
    if a.ndim in (3, 5) and a.shape[0] == 1:
        a = a[0]  # a batch of one
    if a.shape == (k, n):
        out = a.T.reshape(x, y, z, k)
    elif a.shape == (n, k):
        out = a.reshape(x, y, z, k)
    elif a.shape == (x, y, z, k):
        out = a
    else:
        raise DataError(f"{where}: array of shape {list(np.shape(arr))} is none of (K, X*Y*Z) = ({k}, {n}), "
                        f"(X*Y*Z, K) = ({n}, {k}) or (X, Y, Z, K) = ({x}, {y}, {z}, {k})")
    if not np.issubdtype(out.dtype, np.floating):
        raise DataError(f"{where}: values must be floating point, got {out.dtype}")
    return np.ascontiguousarray(out, dtype=np.float32)


def free_last_to_table(values: np.ndarray, free_index: int) -> np.ndarray:
    """(..., K) with free last -> the table order: free at ``free_index``, others in order."""
    k = values.shape[-1]
    order = np.empty(k, dtype=np.int64)
    order[free_index] = k - 1
    order[np.arange(k) != free_index] = np.arange(k - 1)
    return values[..., order]


def check_probabilities(p: np.ndarray, where: str) -> np.ndarray:
    """Non-negative with sums near 1 (else a DataError), renormalised exactly."""
    if not np.isfinite(p).all():
        raise DataError(f"{where}: {int((~np.isfinite(p)).sum())} NaN/inf values")
    sums = p.sum(axis=-1, dtype=np.float64)
    err = float(np.abs(sums - 1.0).max())
    if float(p.min()) < -1e-6 or err > EXTERNAL_SUM_TOLERANCE:
        raise DataError(f"{where}: not probabilities (min {float(p.min()):.3g}, max |sum - 1| {err:.3g}); "
                        "if these are logits, convert with value kind 'logit'")
    return (np.maximum(p, 0.0) / np.maximum(sums, 1e-12)[..., None]).astype(np.float32)


def convert_external(
    frame_list: str | Path,
    input_dir: str | Path,
    dataset,
    out_dir: str | Path,
    teacher: TeacherInfo,
    options: DumpOptions,
    *,
    array_key: str | None = None,
) -> DumpResult:
    """Convert the listed frames (see the module docstring) into a dump of ``dataset``'s grid."""
    frames = read_frame_list(frame_list, input_dir)
    index_of = {k: i for i, k in enumerate(sample_keys(dataset))}
    unknown = [f.key for f in frames if f.key not in index_of]
    if unknown:
        raise DataError(f"{frame_list}: {len(unknown)} token(s) are not samples of the dataset (first: {unknown[0]})")
    by_index = {index_of[f.key]: f for f in frames}
    k, free = dataset.classes.num_classes, dataset.classes.free_index

    def items(todo):
        for i in todo:
            yield i, by_index[i]

    def produce(frame: ExternalFrame) -> TeacherPrediction:
        where = f"{frame.path} (token {frame.key})"
        values = to_grid_layout(load_external_array(frame.path, array_key), dataset.grid.shape, k, where)
        values = free_last_to_table(values, free)
        if teacher.value_kind == "prob":
            values = check_probabilities(values, where)
        return TeacherPrediction(voxel=torch.from_numpy(values), value_kind=teacher.value_kind)

    return run_dump(produce, items, dataset, out_dir, teacher, options, sorted(by_index))
