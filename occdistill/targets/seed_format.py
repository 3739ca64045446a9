"""The seed-compatible teacher dump (DESIGN.md section 6; seed 000, Fig. 3-4).

Per sample, fp16 ``.npz`` files laid out as in the seed's dump tree::

    occ3d_logits/<split>/<key>_3d_logits_fp16.npz   voxel values (X, Y, Z, K)
    bev_prob/<split>/<key>_bev_prob_fp16.npz        BEV probabilities (X, Y, K)

Despite the seed's file name, the voxel file holds whatever the teacher produced: logits (array
key ``logits``) or probabilities (array key ``prob``, GaussianFormer-2). The manifest records
which; a reader must never guess. The BEV file is always probabilities (key ``prob``).
Files are ``np.savez_compressed`` (zlib): 1.2-2x smaller than stored, and the seed's readers
(``np.load``) read both.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path
from typing import Literal

import numpy as np

from occdistill.errors import DataError
from occdistill.io import atomic_write_bytes

ValueKind = Literal["prob", "logit"]

VOXEL_TEMPLATE = "occ3d_logits/{split}/{key}_3d_logits_fp16.npz"
BEV_TEMPLATE = "bev_prob/{split}/{key}_bev_prob_fp16.npz"
ENCODING = "npz-fp16"


def voxel_array_key(value_kind: ValueKind) -> str:
    return "logits" if value_kind == "logit" else "prob"


BEV_ARRAY_KEY = "prob"


def encode_fp16_npz(array: np.ndarray, array_key: str) -> bytes:
    """A float array -> the bytes of a compressed ``.npz`` holding it as float16 under ``array_key``.

    Values beyond the float16 range (|x| > 65504, only possible for logits) are clipped rather than
    turned into inf.
    """
    a = np.asarray(array, dtype=np.float32)
    fmax = float(np.finfo(np.float16).max)
    buf = io.BytesIO()
    np.savez_compressed(buf, **{array_key: np.clip(a, -fmax, fmax).astype(np.float16)})
    return buf.getvalue()


def write_fp16_npz(path: str | Path, array: np.ndarray, array_key: str) -> int:
    """Write atomically; returns the file size in bytes."""
    data = encode_fp16_npz(array, array_key)
    atomic_write_bytes(path, data)
    return len(data)


def read_fp16_npz(path: str | Path, array_key: str) -> np.ndarray:
    """The float16 array stored under ``array_key``; a :class:`DataError` names the file otherwise."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: teacher target file not found")
    try:
        with np.load(path) as npz:
            if array_key not in npz.files:
                raise DataError(f"{path}: no array {array_key!r} (has {npz.files})")
            return npz[array_key]
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(f"{path}: not a readable .npz ({exc})") from exc
