"""The compact teacher-target codecs (format spec: docs/teacher_targets.md).

Teacher probabilities are peaked and most voxels are confidently free, so per voxel we keep only
the smallest set of classes that covers ``1 - tau`` of its mass, each as a class id and an 8-bit
probability, and spread what is left uniformly over the other classes. Voxels whose covering set
is the free class alone ("trivial", most of a street scene) store nothing: they decode to the
file's background distribution, the mean of the trivial voxels. The planes are then zlib'd.

Error bounds (per class, absolute): trivial voxels <= tau (all of them lie within tau of the
background); stored classes <= 1/255 (cumulative rounding keeps the stored sum within 1/510 of the
true one); other classes <= tau + 1/510. Every decoded distribution sums to 1 up to float32 rounding.

``topset-u8`` layout after the header (see :func:`encode_probs`): counts (N uint8, 0 = trivial,
N = number of distributions), ids (E uint8), q (E uint8 = round-to-cumulative 255ths), with
E = sum(counts); entries in C order of the distributions, by decreasing probability within one.

``affine-u8`` stores a float tensor (C, ...) as uint8 with a per-channel offset and step (the
optional teacher BEV feature): error <= step / 2 = (max - min) / 510 per channel.

Container (both codecs): ``MAGIC`` (8 bytes) | header length (uint32 little-endian) | header
(UTF-8 JSON) | zlib-compressed payload. Decoding is vectorised numpy: no Python loop per voxel.
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np

MAGIC = b"OCDTGT01"
PROBS_CODEC = "topset-u8"
FEATURE_CODEC = "affine-u8"
DEFAULT_TAU = 2.0 / 255.0
DEFAULT_LEVEL = 6  # zlib: level 9 is ~2% smaller here and several times slower to write


class CodecError(ValueError):
    """A blob that is not a valid compact target (truncated, another format, inconsistent)."""


@dataclass(frozen=True)
class Blob:
    header: dict[str, Any]
    payload: bytes  # uncompressed


def pack(header: dict[str, Any], payload: bytes, level: int = DEFAULT_LEVEL) -> bytes:
    head = json.dumps(header, sort_keys=True).encode("utf-8")
    return MAGIC + struct.pack("<I", len(head)) + head + zlib.compress(payload, level)


def unpack(data: bytes) -> Blob:
    if len(data) < len(MAGIC) + 4 or data[: len(MAGIC)] != MAGIC:
        raise CodecError("not an occdistill compact target (bad magic)")
    (n,) = struct.unpack_from("<I", data, len(MAGIC))
    start = len(MAGIC) + 4
    try:
        header = json.loads(data[start : start + n].decode("utf-8"))
        payload = zlib.decompress(data[start + n :])
    except (UnicodeDecodeError, ValueError, zlib.error) as exc:
        raise CodecError(f"corrupt compact target ({exc})") from exc
    if not isinstance(header, dict) or "codec" not in header or "shape" not in header:
        raise CodecError("corrupt compact target (header lacks codec/shape)")
    return Blob(header, payload)


def read_header(data: bytes) -> dict[str, Any]:
    """The header alone (no decompression): codec, shape, ..."""
    if len(data) < len(MAGIC) + 4 or data[: len(MAGIC)] != MAGIC:
        raise CodecError("not an occdistill compact target (bad magic)")
    (n,) = struct.unpack_from("<I", data, len(MAGIC))
    try:
        return json.loads(data[len(MAGIC) + 4 : len(MAGIC) + 4 + n].decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise CodecError(f"corrupt compact target header ({exc})") from exc


# ----------------------------------------------------------------------------- probabilities


def encode_probs(probs: np.ndarray, free_index: int, tau: float = DEFAULT_TAU, level: int = DEFAULT_LEVEL) -> bytes:
    """(..., K) probabilities (each row sums to 1) -> ``topset-u8`` bytes.

    ``tau``: classes below it are not stored; it bounds the error of the uniform remainder.
    """
    probs = np.asarray(probs, dtype=np.float32)
    shape, k = probs.shape, probs.shape[-1]
    if not 2 <= k <= 255:
        raise ValueError(f"topset-u8 stores class ids as uint8: K = {k} must be in 2..255")
    if not 0 <= free_index < k:
        raise ValueError(f"free index {free_index} outside 0..{k - 1}")
    if not 0.0 < tau <= 1.0 / k:
        # tau <= 1/K guarantees that the top class of every voxel is stored.
        raise ValueError(f"tau must be in (0, 1/K = {1.0 / k:.4f}], got {tau}")
    p = probs.reshape(-1, k)
    n = p.shape[0]
    # Background voxels: free up to the 8-bit resolution (the bulk of a street scene).
    trivial = p[:, free_index] >= 1.0 - 0.5 / 255.0
    free_bg = float(p[trivial, free_index].astype(np.float64).mean()) if trivial.any() else 1.0
    rows = np.flatnonzero(~trivial)
    sub = p[rows]  # (M, K)
    keep = sub >= tau  # (M, K), row-major = entry order
    # Cumulative rounding over the stored classes: each stored value is within 1/255 of the
    # truth, every prefix sum within 1/510, and the stored total never exceeds 255.
    qcum = np.rint(np.cumsum(np.where(keep, sub, 0.0).astype(np.float64), axis=1) * 255.0).astype(np.int64)
    q = np.diff(np.minimum(qcum, 255), axis=1, prepend=0)
    counts = keep.sum(axis=1).astype(np.uint8)
    ids = np.nonzero(keep)[1].astype(np.uint8)
    qs = q[keep].astype(np.uint8)
    header = {
        "codec": PROBS_CODEC,
        "shape": list(shape),
        "free_index": int(free_index),
        "tau": float(tau),
        "stored": int(rows.size),
        "entries": int(ids.size),
        "background_free": free_bg,
    }
    payload = np.packbits(~trivial).tobytes() + counts.tobytes() + ids.tobytes() + qs.tobytes()
    return pack(header, payload, level)


def decode_probs(data: bytes) -> np.ndarray:
    """``topset-u8`` bytes -> (..., K) float32 probabilities."""
    blob = unpack(data)
    h = blob.header
    if h["codec"] != PROBS_CODEC:
        raise CodecError(f"expected codec {PROBS_CODEC}, found {h['codec']}")
    shape = tuple(int(s) for s in h["shape"])
    k, n, free = shape[-1], int(np.prod(shape[:-1])), int(h["free_index"])
    m, e, nb = int(h["stored"]), int(h["entries"]), (int(np.prod(shape[:-1])) + 7) // 8
    if len(blob.payload) != nb + m + 2 * e:
        raise CodecError(f"corrupt {PROBS_CODEC} payload: {len(blob.payload)} bytes for shape {shape}, {e} entries")
    buf = np.frombuffer(blob.payload, dtype=np.uint8)
    stored_mask = np.unpackbits(buf[:nb], count=n).view(bool)
    c, ids, qs = buf[nb : nb + m].astype(np.int64), buf[nb + m : nb + m + e], buf[nb + m + e :]
    rows = np.flatnonzero(stored_mask)
    if rows.size != m or int(c.sum()) != e or (e and (int(ids.max()) >= k or int(c.min()) == 0)):
        raise CodecError(f"corrupt {PROBS_CODEC} payload: mask and counts do not match {m} rows, {e} entries")
    q = qs.astype(np.float32) * np.float32(1.0 / 255.0)
    mass = np.add.reduceat(q, np.cumsum(c) - c) if e else np.zeros(0, np.float32)  # stored mass per row
    # Every row is "uniform remainder + stored entries"; background rows store one entry (free).
    free_bg = np.float32(h["background_free"])
    rest = np.full(n, (1.0 - free_bg) / (k - 1), dtype=np.float32)
    rest[rows] = np.maximum(1.0 - mass, 0.0) / np.maximum(k - c, 1)
    out = np.empty((n, k), dtype=np.float32)
    out[:] = rest[:, None]
    np.copyto(out[:, free], free_bg, where=~stored_mask)
    out.reshape(-1)[np.repeat(rows * k, c) + ids] = q
    return out.reshape(shape)


# ----------------------------------------------------------------------------- float features


def encode_feature(feature: np.ndarray, level: int = DEFAULT_LEVEL) -> bytes:
    """(C, ...) float tensor -> ``affine-u8`` bytes (per-channel min and step)."""
    x = np.asarray(feature, dtype=np.float32)
    if x.ndim < 2 or not np.isfinite(x).all():
        raise ValueError(f"feature must be a finite (C, ...) array, got shape {x.shape}")
    flat = x.reshape(x.shape[0], -1)
    lo = flat.min(axis=1)
    step = (flat.max(axis=1) - lo) / 255.0
    step = np.where(step > 0, step, 1.0).astype(np.float32)
    u = np.rint((flat - lo[:, None]) / step[:, None]).clip(0, 255).astype(np.uint8)
    header = {"codec": FEATURE_CODEC, "shape": list(x.shape)}
    return pack(header, lo.astype(np.float32).tobytes() + step.tobytes() + u.tobytes(), level)


def decode_feature(data: bytes) -> np.ndarray:
    """``affine-u8`` bytes -> (C, ...) float32."""
    blob = unpack(data)
    h = blob.header
    if h["codec"] != FEATURE_CODEC:
        raise CodecError(f"expected codec {FEATURE_CODEC}, found {h['codec']}")
    shape = tuple(int(s) for s in h["shape"])
    c, n = shape[0], int(np.prod(shape[1:]))
    if len(blob.payload) != 8 * c + c * n:
        raise CodecError(f"corrupt {FEATURE_CODEC} payload: {len(blob.payload)} bytes for shape {shape}")
    lo = np.frombuffer(blob.payload, dtype=np.float32, count=c)
    step = np.frombuffer(blob.payload, dtype=np.float32, count=c, offset=4 * c)
    u = np.frombuffer(blob.payload, dtype=np.uint8, offset=8 * c).reshape(c, n)
    return (lo[:, None] + step[:, None] * u).astype(np.float32).reshape(shape)
