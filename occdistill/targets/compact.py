"""The compact teacher-target codecs (format spec: docs/teacher_targets.md).

Two codecs store class probabilities (..., K); the header of every file names its codec, so
:func:`decode_probs` reads either, whatever a dump's writer chose.

``dense-u8`` (the default). Every distribution (voxel) is K uint8 values q in 255ths that sum to
exactly 255, decoded as q / 255:

- classes with probability >= tau ("stored") are rounded cumulatively (q_i = round(255 cumsum_i) -
  round(255 cumsum_{i-1}) over the stored classes, the others counting 0), so each is within 1/255
  of its probability;
- the 255ths left over, R = 255 - sum(stored q), are shared by the m other classes: R // m each, and
  one more for R % m of them: the most probable ones, or the first in class order when that
  compresses better (the encoder compresses both and keeps the smaller; noisy teachers, whose
  ranking is noise, need class order). Their probabilities lie in [0, tau), the decoded values in
  [0, tau + 1/255);
- background voxels (free probability >= 1 - tau): layout "rows" stores every voxel; layout
  "masked", chosen when under 1/4 of the voxels are not background, stores a bitmask of the others
  and one shared row for the background ones, their mean distribution quantised as above (every
  background class lies within tau of that mean).

Decoding is a float32 cast and one multiplication by 1/255 (no per-class scatter, no remainder to
broadcast), plus a matrix-vector product that checks that every row sums to exactly 255; "masked"
copies blocks of the background row and puts the stored rows in place. Error bound (per class,
absolute, against the input normalised to sum 1): stored classes of stored voxels <= 1/255,
everything else < tau + 1/255; overall < tau + 1/255 (default tau 1/255: 2/255). Every decoded
distribution is finite, non-negative and sums to 1 up to float32 rounding.

Payload: a zstd frame (content size and checksum included) of, layout "rows", the (N, K) uint8
array in C order; layout "masked": bitmask of the stored voxels (ceil(N/8) bytes, ``np.packbits``)
| background row (K uint8) | stored rows (M, K uint8). Header (JSON): codec, shape, tau, scale
(255), layout, stored (M, "masked" only). The frame checksum costs ~1 ms per Occ3D frame (13% of
inflating it) and is kept: without it 0.4% of single-bit flips in a file decoded silently to other
valid distributions (the row sums still held); with it none did (measured).

``topset-u8`` (the previous default; still written on request and read). Background voxels (free
probability >= 1 - tau) store nothing: a bitmask marks the others, and background voxels decode to
one shared distribution, free = the mean free probability of the background voxels, the rest
spread uniformly over the other classes. Every other voxel stores the classes whose probability is
>= tau (at least its top class, since tau <= 1/K), as uint8 class ids and uint8 probabilities in
255ths; the remaining mass is spread uniformly over the classes not stored. Error bounds: background
voxels <= tau; stored classes <= 1/255 (cumulative rounding keeps each stored prefix sum within
1/510, so the stored total never exceeds 1); classes not stored <= tau + 1/510. Overall <=
max(1/255, tau + 1/510). Payload (before zlib): stored-voxel bitmask (ceil(N/8) bytes,
``np.packbits``) | counts (M uint8, classes stored per stored voxel) | ids (E uint8) | q (E uint8),
E = sum(counts), entries in C order of the voxels and ascending class id within a voxel. Header:
codec, shape, free index, tau, M, E and the background free probability. Smaller than ``dense-u8``
for confident teachers, it decodes 1.5-2.6x slower when most voxels hold several classes (the real
teacher of benchmarks/bench_targets.py: 44 vs 17 ms per Occ3D frame).

``affine-u8`` (a float tensor (C, ...), the optional teacher BEV feature): uint8 with a per-channel
offset and step, error <= step / 2 = (max - min) / 510 per channel. Payload (zlib): offsets (C
float32) | steps (C float32) | values (uint8).

Container (all codecs): ``MAGIC`` (8 bytes) | header length (uint32 little-endian) | header
(UTF-8 JSON) | compressed payload. Decoding is vectorised numpy: no Python loop per voxel.
"""

from __future__ import annotations

import json
import struct
import threading
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import zstandard

MAGIC = b"OCDTGT01"
DENSE_CODEC = "dense-u8"
TOPSET_CODEC = "topset-u8"
PROBS_CODECS = (DENSE_CODEC, TOPSET_CODEC)  # what decode_probs reads; the first is the default
FEATURE_CODEC = "affine-u8"
DEFAULT_TAUS = {DENSE_CODEC: 1.0 / 255.0, TOPSET_CODEC: 2.0 / 255.0}  # error bounds 2/255 and 2.5/255
DEFAULT_LEVEL = 6  # zlib (topset-u8, affine-u8); level 9 saved only 2-4% on teacher-like targets
DENSE_SCALE = 255  # dense-u8 values are q / 255

# zstd levels of dense-u8. Level 9 encodes an Occ3D voxel file in ~0.2 s. On noisy teachers (more
# than _NOISY_BYTES compressed bytes per distribution at level 9) level 16, whose optimal parsing
# finds longer matches, makes the file ~27% smaller and 15-40% faster to inflate (the benchmark's
# blurry and soft teachers), at ~25x the encoding time (4-7 s per Occ3D voxel file); on the real
# teacher's frames (below the threshold) it saved 15% of the bytes and no decoding time.
DENSE_LEVEL, DENSE_LEVEL_NOISY, _NOISY_BYTES = 9, 16, 2.0

_CHUNK_ROWS = 32768  # topset-u8: rows per chunk of the output pass (2.4 MB at K = 18: cache-resident)
_SPARSE_BELOW = 5  # topset-u8: under 1/5 stored voxels, background blocks then the stored rows
# dense-u8: values per chunk of the output pass (512 kB of float32: in L2 while cast, checked and
# scaled). Also keeps each row-sum product well below the size at which OpenBLAS splits a
# matrix-vector product over threads (measured between 300k and 600k values here), which would
# only add CPU time.
_DENSE_CHUNK_VALUES = 131072
_ENCODE_ROWS = 65536  # dense-u8 encoder: rows quantised at a time (bounds its float64 temporaries)
# dense-u8: the masked layout under 1/4 non-background voxels. Measured on Occ3D frames: at 8-13%
# non-background it decodes 1.5-1.8x faster than rows, at 26-27% about as fast, at 87-92% 1.5-1.7x
# slower.
_MASK_BELOW = 4
# A zstd block of up to 128 KiB can be a 4-byte run-length block: no frame inflates more than 32768x.
_ZSTD_MAX_RATIO = 32768


class _Scratch(threading.local):
    """Work buffers of :func:`decode_probs`, kept per thread and reused from call to call.

    Fresh temporaries of a few MB cost more than the arithmetic on them: glibc returns such
    blocks to the kernel when they are freed, so every call page-faults them in again (4 kB
    pages, ~3.5 us each on the project's VM: up to ~25 ms per blurry Occ3D frame). Reused
    buffers are faulted in once. They grow to the largest target decoded in the thread (topset-u8:
    8 bytes per voxel + 32 per stored voxel + 12 per entry, ~28 MB for a blurry Occ3D frame;
    dense-u8: three chunks of 0.5 MB); :func:`release_scratch` frees them. The thread's zstd
    decompression context is kept too (contexts are not thread-safe).
    """

    def __init__(self) -> None:
        self.buffers: dict[str, np.ndarray] = {}
        self.zstd = zstandard.ZstdDecompressor()

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


def _container(header: dict[str, Any], body: bytes) -> bytes:
    head = json.dumps(header, sort_keys=True).encode("utf-8")
    return MAGIC + struct.pack("<I", len(head)) + head + body


def pack(header: dict[str, Any], payload: bytes, level: int = DEFAULT_LEVEL) -> bytes:
    """A zlib-compressed container (``topset-u8``, ``affine-u8``)."""
    return _container(header, zlib.compress(payload, level))


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
    """Header and inflated payload of a zlib container (``topset-u8``, ``affine-u8``)."""
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


def encode_probs(probs: np.ndarray, free_index: int, tau: float | None = None, codec: str = DENSE_CODEC) -> bytes:
    """(..., K) probabilities (each row sums to 1) -> compact bytes of ``codec``.

    ``tau`` (default: the codec's, :data:`DEFAULT_TAUS`): classes below it are not stored; it sets
    the error bound (module docstring). Must be in (0, 1/K].
    """
    probs = np.asarray(probs, dtype=np.float32)
    k = probs.shape[-1] if probs.ndim else 0
    if codec not in PROBS_CODECS:
        raise ValueError(f"unknown probability codec {codec!r} (known: {', '.join(PROBS_CODECS)})")
    tau = DEFAULT_TAUS[codec] if tau is None else float(tau)
    if not 2 <= k <= 255:
        raise ValueError(f"{codec} stores K = {k} classes per voxel: K must be in 2..255")
    if not 0 <= free_index < k:
        raise ValueError(f"free index {free_index} outside 0..{k - 1}")
    if not 0.0 < tau <= 1.0 / k:
        # tau <= 1/K guarantees that the top class of every voxel is stored.
        raise ValueError(f"tau must be in (0, 1/K = {1.0 / k:.4f}], got {tau}")
    if codec == DENSE_CODEC:
        return _encode_dense(probs, free_index, tau)
    return _encode_topset(probs, free_index, tau)


def decode_probs(data: bytes, out: np.ndarray | None = None) -> np.ndarray:
    """Compact probability bytes (any codec of :data:`PROBS_CODECS`) -> (..., K) float32.

    ``out``: an optional writeable C-contiguous float32 array with as many values as the target
    (any shape), e.g. a buffer reused from sample to sample, to decode into; the result is then
    a view of it. Without it the result is a new array.
    """
    h, body = _split(data)
    if h["codec"] not in PROBS_CODECS:
        raise CodecError(f"expected a probability codec ({', '.join(PROBS_CODECS)}), found {h['codec']}")
    shape = _shape(h)
    n, k = int(np.prod(shape[:-1])), shape[-1]
    if out is not None and not (isinstance(out, np.ndarray) and out.dtype == np.float32 and out.size == n * k
                                and out.flags.c_contiguous and out.flags.writeable):
        raise ValueError(f"out must be a writeable C-contiguous float32 array of {n} x {k} values")
    decode = _decode_dense if h["codec"] == DENSE_CODEC else _decode_topset
    return decode(h, body, shape, out)


def _shape(h: dict[str, Any]) -> tuple[int, ...]:
    """The header's shape, checked: positive integers, K in 2..255."""
    shape = h["shape"]
    if not (isinstance(shape, list) and shape and all(type(s) is int and s > 0 for s in shape)
            and 2 <= shape[-1] <= 255):
        raise CodecError(f"corrupt {h['codec']} header: shape {shape!r}")
    return tuple(shape)


# dense-u8


def _encode_dense(probs: np.ndarray, free_index: int, tau: float) -> bytes:
    shape, k = probs.shape, probs.shape[-1]
    rows = probs.reshape(-1, k)  # (N, K)
    n = rows.shape[0]
    total = rows.sum(axis=1, dtype=np.float64)  # (N,)
    if not (np.isfinite(rows).all() and rows.min(initial=0.0) >= 0.0 and (total > 0.0).all()):
        raise ValueError("dense-u8 encodes finite, non-negative distributions with a positive sum")
    background = rows[:, free_index] / total >= 1.0 - tau  # (N,)
    stored = np.flatnonzero(~background)
    header = {"codec": DENSE_CODEC, "shape": list(shape), "tau": tau, "scale": DENSE_SCALE}
    if stored.size * _MASK_BELOW < n:
        header |= {"layout": "masked", "stored": int(stored.size)}
        # One shared row for the background voxels: their mean distribution, quantised.
        weights = np.where(background, 1.0 / total, 0.0) / background.sum()  # (N,) float64
        mean = sum(weights[a : a + _ENCODE_ROWS] @ rows[a : a + _ENCODE_ROWS].astype(np.float64)
                   for a in range(0, n, _ENCODE_ROWS))  # (K,)
        prefix = np.packbits(~background).tobytes() + _quantise_dense(mean[None, :], tau, True).tobytes()
        rows = rows[stored]  # (M, K)
    else:
        header |= {"layout": "rows"}
        prefix = b""
    # The extra 255ths of each row go to its most probable classes not stored (a smaller error and
    # KL: mean KL 0.006 vs 0.017 on the real teacher, and 2% fewer bytes), or, when that compresses
    # worse (noisy teachers, whose ranking is noise: 35-75% more bytes), to the first in class
    # order. The decoder reads the values either way.
    bodies = []
    for by_probability in (True, False):
        q = np.empty(rows.shape, dtype=np.uint8)
        for a in range(0, rows.shape[0], _ENCODE_ROWS):
            q[a : a + _ENCODE_ROWS] = _quantise_dense(rows[a : a + _ENCODE_ROWS], tau, by_probability)
        raw = prefix + q.tobytes()
        bodies.append((len(zstandard.ZstdCompressor(level=DENSE_LEVEL).compress(raw)), raw))
    size, raw = min(bodies, key=lambda b: b[0])
    level = DENSE_LEVEL_NOISY if size > _NOISY_BYTES * n else DENSE_LEVEL
    return _container(header, zstandard.ZstdCompressor(level=level, write_checksum=True).compress(raw))


def _quantise_dense(rows: np.ndarray, tau: float, by_probability: bool) -> np.ndarray:
    """(n, K) non-negative rows with positive sums -> (n, K) uint8 that sum to DENSE_SCALE per row
    (module docstring); the extra 255ths go to the most probable classes not stored, or the first."""
    p = rows.astype(np.float64)
    p /= p.sum(axis=1, keepdims=True)
    keep = p >= tau  # (n, K) the stored classes
    qcum = np.rint(np.cumsum(np.where(keep, p, 0.0), axis=1) * DENSE_SCALE)
    np.minimum(qcum, DENSE_SCALE, out=qcum)
    rest = ~keep
    m = rest.sum(axis=1, keepdims=True)  # (n, 1) classes not stored
    # A row that stores every class sums to 1 (normalised): its rounded total is the whole scale.
    qcum[m[:, 0] == 0, -1] = DENSE_SCALE
    q = np.diff(qcum, axis=1, prepend=0.0).astype(np.int64)  # (n, K), 0 where not stored
    left = DENSE_SCALE - q.sum(axis=1, keepdims=True)  # (n, 1) 255ths for the classes not stored
    share, extra = np.divmod(left, np.maximum(m, 1))
    if by_probability:
        # Rank of each class not stored among them, most probable first (ties: lower class first);
        # the stored ones rank after them.
        order = np.argsort(np.where(keep, np.inf, -p), axis=1, kind="stable")  # (n, K)
        rank = np.empty_like(order)
        np.put_along_axis(rank, order, np.arange(p.shape[1]), axis=1)
    else:
        rank = np.cumsum(rest, axis=1) - 1  # (n, K) rank in class order
    return np.where(keep, q, share + (rank < extra)).astype(np.uint8)


def _decode_dense(h: dict[str, Any], body: memoryview, shape: tuple[int, ...], out: np.ndarray | None) -> np.ndarray:
    n, k = int(np.prod(shape[:-1])), shape[-1]
    scale, layout, m = h.get("scale"), h.get("layout"), h.get("stored", n)
    if not (type(scale) is int and 1 <= scale <= 255):
        raise CodecError(f"corrupt {DENSE_CODEC} header: scale {scale!r}")
    masked = layout == "masked"
    if not (layout in ("rows", "masked") and type(m) is int and 0 <= m <= n):
        raise CodecError(f"corrupt {DENSE_CODEC} header: layout {layout!r}, {m!r} stored of {n}")
    nb = (n + 7) // 8
    size = nb + k + m * k if masked else n * k  # of the payload
    # Refuse an announced size no frame of this length can hold before allocating for it.
    if size > _ZSTD_MAX_RATIO * len(body):
        raise CodecError(f"corrupt {DENSE_CODEC} payload: a {len(body)}-byte file cannot hold shape {shape}")
    scratch = _SCRATCH
    try:
        announced = zstandard.frame_content_size(body)
        if announced != size:
            raise CodecError(f"corrupt {DENSE_CODEC} payload: {announced} bytes for shape {shape}, {m} stored")
        # One call: it fails on a truncated frame and verifies the frame's checksum (a streaming
        # reader stops quietly at the end of its input). The new bytes object costs no page faults
        # from call to call (measured): glibc keeps such blocks once one has been freed.
        raw = np.frombuffer(scratch.zstd.decompress(body), dtype=np.uint8)
    except zstandard.ZstdError as exc:
        raise CodecError(f"corrupt compact target ({exc})") from exc
    if raw.size != size:
        raise CodecError(f"corrupt {DENSE_CODEC} payload: {raw.size} bytes for shape {shape}, {m} stored")
    if out is None:
        out = np.empty(shape, dtype=np.float32)
    dec = out.reshape(n, k)
    chunk = max(1, _DENSE_CHUNK_VALUES // k)  # rows per chunk
    if not masked:
        _convert_rows(raw.reshape(n, k), scale, dec, 0, None)
        return out.reshape(shape)
    rows = np.flatnonzero(np.unpackbits(raw[:nb], count=n).view(bool))  # (M,) the stored voxels
    if rows.size != m:
        raise CodecError(f"corrupt {DENSE_CODEC} payload: the mask holds {rows.size} voxels, the header {m}")
    # Background voxels: one converted row, repeated into a block that is copied chunk by chunk
    # (a plain memory copy), then the stored rows are converted and put in place.
    block = scratch.get("dense_block", min(n, chunk) * k, np.float32).reshape(-1, k)
    _convert_rows(raw[nb : nb + k].reshape(1, k), scale, block[:1], -1, None)
    block[1:] = block[0]
    for a in range(0, n, chunk):
        dec[a : a + chunk] = block[: min(chunk, n - a)]
    if m:
        stored = scratch.get("dense_rows", min(m, chunk) * k, np.float32).reshape(-1, k)
        _convert_rows(raw[nb + k :].reshape(m, k), scale, stored, 0, (dec, rows))
    return out.reshape(shape)


def _convert_rows(q: np.ndarray, scale: int, dst: np.ndarray, first: int,
                  scatter: tuple[np.ndarray, np.ndarray] | None) -> None:
    """(r, K) uint8 rows that must each sum to ``scale`` -> float32 q / scale, chunk by chunk (the
    chunk stays in cache while it is cast, checked and scaled). Without ``scatter`` into ``dst``
    (r, K); with ``scatter`` = (output, row indices) through ``dst`` (a chunk-sized buffer) into
    output[row indices]. ``first``: index of q's first row in the file, for error messages (-1:
    the background row; with ``scatter`` the row indices name the voxels)."""
    r, k = q.shape
    chunk = max(1, _DENSE_CHUNK_VALUES // k)
    sums = _SCRATCH.get("dense_sums", min(r, chunk), np.float32)
    ones, full, inv = np.ones(k, dtype=np.float32), np.float32(scale), np.float32(1.0 / scale)
    for a in range(0, r, chunk):
        block = dst[: min(chunk, r - a)] if scatter else dst[a : a + chunk]  # (c, K)
        s = sums[: block.shape[0]]
        np.copyto(block, q[a : a + chunk], casting="unsafe")
        # Row sums of integers <= 255 * 255: exact in float32 whatever the summation order.
        np.matmul(block, ones, out=s)
        if not (s == full).all():
            bad = int(np.flatnonzero(s != full)[0])
            voxel = int(scatter[1][a + bad]) if scatter else first + a + bad
            which = "the background row" if first < 0 else f"distribution {voxel}"
            raise CodecError(f"corrupt {DENSE_CODEC} payload: {which} sums to {int(s[bad])}/{scale}, not 1")
        np.multiply(block, inv, out=block)
        if scatter:
            output, index = scatter
            output[index[a : a + chunk]] = block


# topset-u8


def _encode_topset(probs: np.ndarray, free_index: int, tau: float) -> bytes:
    """Background voxels (free within tau) store nothing; the others their classes >= tau."""
    shape, k = probs.shape, probs.shape[-1]
    p = probs.reshape(-1, k)
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
        "codec": TOPSET_CODEC,
        "shape": list(shape),
        "free_index": int(free_index),
        "tau": float(tau),
        "stored": int(rows.size),
        "entries": int(ids.size),
        "background_free": free_bg,
    }
    payload = np.packbits(~trivial).tobytes() + counts.tobytes() + ids.tobytes() + qs.tobytes()
    return pack(header, payload)


def _decode_topset(h: dict[str, Any], body: memoryview, shape: tuple[int, ...], out: np.ndarray | None) -> np.ndarray:
    """Bit for bit the output of the direct decoder (fill every row with its uniform remainder, set
    the background rows' free entry, scatter the stored entries; kept in
    tests/test_targets_codec.py), computed with fewer and cheaper passes: the output is written in
    one pass over chunks of rows that stay in cache, and the temporaries live in per-thread buffers
    reused between calls (:class:`_Scratch`)."""
    k, n, free = shape[-1], int(np.prod(shape[:-1])), int(h["free_index"])
    m, e, nb = int(h["stored"]), int(h["entries"]), (int(np.prod(shape[:-1])) + 7) // 8
    size = nb + m + 2 * e  # of the payload
    # zlib inflates at most 1032 bytes per input byte: refuse a larger announced size before
    # allocating for it.
    if m < 0 or e < 0 or size > 1032 * len(body) + 64:
        raise CodecError(f"corrupt {TOPSET_CODEC} payload: a {len(body)}-byte file cannot hold {m} rows, {e} entries "
                         f"for shape {shape}")
    try:
        payload = zlib.decompress(body, bufsize=max(size, 1))  # one buffer of the right size
    except zlib.error as exc:
        raise CodecError(f"corrupt compact target ({exc})") from exc
    if len(payload) != size:
        raise CodecError(f"corrupt {TOPSET_CODEC} payload: {len(payload)} bytes for shape {shape}, {e} entries")
    scratch = _SCRATCH
    buf = np.frombuffer(payload, dtype=np.uint8)
    c, ids, qs = buf[nb : nb + m], buf[nb + m : nb + m + e], buf[nb + m + e :]
    rows = np.flatnonzero(np.unpackbits(buf[:nb], count=n).view(bool))  # stored voxels
    if rows.size != m or int(c.sum(dtype=np.int64)) != e or (e and (int(ids.max()) >= k or int(c.min()) == 0)):
        raise CodecError(f"corrupt {TOPSET_CODEC} payload: mask and counts do not match {m} rows, {e} entries")
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
        raise CodecError(f"corrupt {TOPSET_CODEC} target: free index {free}, background {free_bg}, "
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
