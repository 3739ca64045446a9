"""The compact teacher-target codecs (format spec: docs/teacher_targets.md).

``topset-u8`` (class probabilities, (..., K)). Teacher probabilities are peaked and most voxels of a
street scene are confidently free, so:

- background voxels (free probability >= 1 - tau) store nothing: a bitmask marks the others, and
  background voxels decode to one shared distribution, free = the mean free probability of the
  background voxels, the rest spread uniformly over the other classes;
- every other voxel stores the classes whose probability is >= tau (at least its top class, since
  tau <= 1/K), as uint8 class ids and uint8 probabilities in 255ths; the remaining mass is spread
  uniformly over the classes not stored.

Error bounds (per class, absolute, against the encoded input): background voxels <= tau; stored
classes <= 1/255 (cumulative rounding keeps each stored prefix sum within 1/510, so the stored
total never exceeds 1); classes not stored <= tau + 1/510 (true values lie in [0, tau), the decoded
value is their mean up to the 1/510 rounding of the remainder). Overall <= max(1/255, tau + 1/510).
Every decoded distribution is finite, non-negative and sums to 1 up to float32 rounding; the
decoder rejects files that would break this.

Payload (before zlib): stored-voxel bitmask (ceil(N/8) bytes, ``np.packbits``, N = number of
distributions) | counts (M uint8, classes stored per stored voxel) | ids (E uint8) | q (E uint8),
E = sum(counts), entries in C order of the voxels and ascending class id within a voxel. The
header (JSON) holds codec, shape, free index, tau, M, E and the background free probability.

``affine-u8`` (a float tensor (C, ...), the optional teacher BEV feature): uint8 with a per-channel
offset and step, error <= step / 2 = (max - min) / 510 per channel. Payload: offsets (C float32) |
steps (C float32) | values (uint8).

Container (both codecs): ``MAGIC`` (8 bytes) | header length (uint32 little-endian) | header
(UTF-8 JSON) | zlib-compressed payload. Decoding is vectorised numpy: no Python loop per voxel.
"""

from __future__ import annotations

import json
import struct
import threading
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np

MAGIC = b"OCDTGT01"
PROBS_CODEC = "topset-u8"
FEATURE_CODEC = "affine-u8"
DEFAULT_TAU = 2.0 / 255.0
DEFAULT_LEVEL = 6  # zlib; level 9 saved only 2-4% on teacher-like targets


_CHUNK_ROWS = 32768  # rows per chunk of the output pass (2.4 MB at K = 18: cache-resident while written)
_SPARSE_BELOW = 5  # under 1/5 stored voxels: background blocks, then the stored rows (crossover ~1/4)


class _Scratch(threading.local):
    """Work buffers of :func:`decode_probs`, kept per thread and reused from call to call.

    Fresh temporaries of a few MB cost more than the arithmetic on them: glibc returns such
    blocks to the kernel when they are freed, so every call page-faults them in again (4 kB
    pages, ~3.5 us each on the project's VM: up to ~25 ms per blurry Occ3D frame). Reused
    buffers are faulted in once. They grow to the largest target decoded in the thread, 8 bytes
    per voxel + 32 per stored voxel + 12 per entry (~28 MB for a blurry Occ3D frame, ~70 MB for a
    very soft one); :func:`release_scratch` frees them.
    """

    def __init__(self) -> None:
        self.buffers: dict[str, np.ndarray] = {}

    def get(self, name: str, size: int, dtype: Any) -> np.ndarray:
        dtype = np.dtype(dtype)
        nbytes = size * dtype.itemsize
        buf = self.buffers.get(name)
        if buf is None or buf.size < nbytes:
            buf = np.empty(nbytes + nbytes // 4, dtype=np.uint8)  # headroom for the next, larger file
            self.buffers[name] = buf
        return buf[:nbytes].view(dtype)


_SCRATCH = _Scratch()


def release_scratch() -> None:
    """Free the calling thread's decode buffers (they are reallocated by the next decode)."""
    _SCRATCH.buffers.clear()


class CodecError(ValueError):
    """A blob that is not a valid compact target (truncated, another format, inconsistent)."""


@dataclass(frozen=True)
class Blob:
    header: dict[str, Any]
    payload: bytes  # uncompressed


def pack(header: dict[str, Any], payload: bytes, level: int = DEFAULT_LEVEL) -> bytes:
    head = json.dumps(header, sort_keys=True).encode("utf-8")
    return MAGIC + struct.pack("<I", len(head)) + head + zlib.compress(payload, level)


def _split(data: bytes) -> tuple[dict[str, Any], memoryview]:
    """Header (checked for codec and shape) and the compressed payload, not inflated."""
    if len(data) < len(MAGIC) + 4 or data[: len(MAGIC)] != MAGIC:
        raise CodecError("not an occdistill compact target (bad magic)")
    (n,) = struct.unpack_from("<I", data, len(MAGIC))
    start = len(MAGIC) + 4
    try:
        header = json.loads(bytes(data[start : start + n]).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise CodecError(f"corrupt compact target ({exc})") from exc
    if not isinstance(header, dict) or "codec" not in header or "shape" not in header:
        raise CodecError("corrupt compact target (header lacks codec/shape)")
    return header, memoryview(data)[start + n :]


def unpack(data: bytes) -> Blob:
    header, body = _split(data)
    try:
        payload = zlib.decompress(body)
    except zlib.error as exc:
        raise CodecError(f"corrupt compact target ({exc})") from exc
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

    ``tau``: classes below it are not stored, voxels free within it are background; it sets the
    error bound (module docstring).
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
    # Background voxels (the bulk of a street scene): free within tau. They decode to one shared
    # distribution (mean free probability, the rest uniform), which is within tau of each of them.
    trivial = p[:, free_index] >= 1.0 - tau
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


def decode_probs(data: bytes, out: np.ndarray | None = None) -> np.ndarray:
    """``topset-u8`` bytes -> (..., K) float32 probabilities.

    ``out``: an optional writeable C-contiguous float32 array with as many values as the target
    (any shape), e.g. a buffer reused from sample to sample, to decode into; the result is then
    a view of it. Without it the result is a new array.

    Bit for bit the output of the direct decoder (fill every row with its uniform remainder, set
    the background rows' free entry, scatter the stored entries; kept in
    tests/test_targets_codec.py), computed with fewer and cheaper passes: the output is written in
    one pass over chunks of rows that stay in cache, and the temporaries live in per-thread buffers
    reused between calls (:class:`_Scratch`).
    """
    h, body = _split(data)
    if h["codec"] != PROBS_CODEC:
        raise CodecError(f"expected codec {PROBS_CODEC}, found {h['codec']}")
    shape = tuple(int(s) for s in h["shape"])
    k, n, free = shape[-1], int(np.prod(shape[:-1])), int(h["free_index"])
    m, e, nb = int(h["stored"]), int(h["entries"]), (int(np.prod(shape[:-1])) + 7) // 8
    size = nb + m + 2 * e  # of the payload
    # zlib inflates at most 1032 bytes per input byte: refuse a larger announced size before
    # allocating for it.
    if m < 0 or e < 0 or size > 1032 * len(body) + 64:
        raise CodecError(f"corrupt {PROBS_CODEC} payload: a {len(body)}-byte file cannot hold {m} rows, {e} entries "
                         f"for shape {shape}")
    if out is not None and not (isinstance(out, np.ndarray) and out.dtype == np.float32 and out.size == n * k
                                and out.flags.c_contiguous and out.flags.writeable):
        raise ValueError(f"out must be a writeable C-contiguous float32 array of {n} x {k} values")
    try:
        payload = zlib.decompress(body, bufsize=max(size, 1))  # one buffer of the right size
    except zlib.error as exc:
        raise CodecError(f"corrupt compact target ({exc})") from exc
    if len(payload) != size:
        raise CodecError(f"corrupt {PROBS_CODEC} payload: {len(payload)} bytes for shape {shape}, {e} entries")
    scratch = _SCRATCH
    buf = np.frombuffer(payload, dtype=np.uint8)
    c, ids, qs = buf[nb : nb + m], buf[nb + m : nb + m + e], buf[nb + m + e :]
    rows = np.flatnonzero(np.unpackbits(buf[:nb], count=n).view(bool))  # stored voxels
    if rows.size != m or int(c.sum(dtype=np.int64)) != e or (e and (int(ids.max()) >= k or int(c.min()) == 0)):
        raise CodecError(f"corrupt {PROBS_CODEC} payload: mask and counts do not match {m} rows, {e} entries")
    counts = scratch.get("counts", m, np.int64)
    np.copyto(counts, c)
    q = scratch.get("q", e, np.float32)
    np.multiply(qs, np.float32(1.0 / 255.0), out=q)  # = qs.astype(float32) * float32(1 / 255)
    ends = scratch.get("ends", m, np.int64)  # entry range of stored row j: ends[j] - c[j] .. ends[j]
    np.cumsum(counts, out=ends)
    starts = scratch.get("starts", m, np.int64)
    np.subtract(ends, counts, out=starts)
    mass = scratch.get("mass", m, np.float32)  # stored mass per row (np.add.reduceat: numpy's summation order)
    if m:
        np.add.reduceat(q, starts, out=mass)
    free_bg = np.float32(h["background_free"])
    # With these checks every decoded row is finite, non-negative and sums to 1 by construction.
    if not (0 <= free < k and 0.0 <= free_bg <= 1.0) or (m and float(mass.max()) > 1.0 + 1e-6):
        raise CodecError(f"corrupt {PROBS_CODEC} target: free index {free}, background {free_bg}, "
                         f"stored mass up to {float(mass.max()) if m else 0:.4f}")
    # Uniform remainder of each stored row, max(1 - mass, 0) / max(K - count, 1). Divided in
    # float32: the same bits as the float64 quotient rounded to float32 (53 >= 2 * 24 + 2 bits
    # make that double rounding exact), which numpy computes for float32 / int64.
    vals = scratch.get("vals", m, np.float32)
    np.subtract(1.0, mass, out=vals)
    np.maximum(vals, 0.0, out=vals)
    tmp = counts  # the counts are not needed any more
    np.subtract(k, counts, out=tmp)
    np.maximum(tmp, 1, out=tmp)
    np.divide(vals, tmp, out=vals, dtype=np.float32)
    # Flat output index of every entry, row * K + id: the row offsets as the running sum of their
    # steps, placed at each row's first entry (cheaper than np.repeat), plus the ids.
    idx = scratch.get("idx", e, np.int64)
    if m:
        idx.fill(0)
        idx[0] = rows[0] * k
        step = tmp[: m - 1]
        np.subtract(rows[1:], rows[:-1], out=step)
        np.multiply(step, k, out=step)
        idx[starts[1:]] = step
        np.cumsum(idx, out=idx)
        np.add(idx, ids, out=idx)
    if out is None:
        out = np.empty((n, k), dtype=np.float32)
    dec = out.reshape(n, k)
    flat = dec.reshape(-1)
    bg = (1.0 - free_bg) / (k - 1)  # every class but the free one of a background voxel
    # One pass over the output in chunks of rows (the chunk stays in cache): every class of a row
    # gets its remainder (stored rows: vals, background rows: bg), the free class of a background
    # row free_bg, then the chunk's stored entries (in row order: one contiguous range) are set.
    bounds = list(range(0, n, _CHUNK_ROWS)) + [n]
    below = np.searchsorted(rows, bounds)  # stored rows before each bound
    row_bounds = below.tolist()
    entry_bounds = np.where(below > 0, ends.take(np.maximum(below - 1, 0)), 0).tolist() if m else [0] * len(bounds)
    sparse = m * _SPARSE_BELOW < n
    if sparse:
        # Mostly background: copy a block of background rows (a plain memory copy), then overwrite
        # the few stored rows whole.
        block = scratch.get("block", min(n, _CHUNK_ROWS) * k, np.float32).reshape(-1, k)
        block.fill(bg)
        block[:, free] = free_bg
    else:
        # Per-voxel remainder (rest) and free-class value (fcol), broadcast over each row.
        rest = scratch.get("rest", n, np.float32)
        rest.fill(bg)
        rest[rows] = vals
        fcol = scratch.get("fcol", n, np.float32)
        fcol.fill(free_bg)
        fcol[rows] = vals
    for i in range(len(bounds) - 1):
        a, b = bounds[i], bounds[i + 1]
        if sparse:
            dec[a:b] = block[: b - a]
            r0, r1 = row_bounds[i], row_bounds[i + 1]
            dec[rows[r0:r1]] = vals[r0:r1, None]
        else:
            dec[a:b] = rest[a:b, None]
            dec[a:b, free] = fcol[a:b]
        e0, e1 = entry_bounds[i], entry_bounds[i + 1]
        if e1 > e0:
            flat[idx[e0:e1]] = q[e0:e1]
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
    if not (np.isfinite(lo).all() and np.isfinite(step).all()):
        raise CodecError(f"corrupt {FEATURE_CODEC} target: non-finite channel offsets or steps")
    u = np.frombuffer(blob.payload, dtype=np.uint8, offset=8 * c).reshape(c, n)
    return (lo[:, None] + step[:, None] * u).astype(np.float32).reshape(shape)
