"""Teacher-target encodings: the compact codecs' error bounds and corrupt-file checks, the seed fp16
files, BEV collapse."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import zstandard

from occdistill.errors import DataError
from occdistill.targets import compact, seed_format
from occdistill.targets.collapse import collapse_bev, parse_rule, rule_name
from occdistill.targets.pseudo import label_teacher_probs

REAL_LABELS = (Path(__file__).resolve().parents[2] / "shared" / "realdata" / "occ3d_openocc_occupancy_vis_demo"
               / "3D_occupancy_data.npz")


def _peaked(shape, k, free, seed=0, sharp=6.0):
    """Softmax of random logits with a dominant class per voxel, free dominating most voxels."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 1.5, size=(*shape, k))
    top = np.where(rng.random(shape) < 0.7, free, rng.integers(0, k, size=shape))
    np.put_along_axis(logits, top[..., None], sharp + rng.normal(0, 2, size=(*shape, 1)), axis=-1)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("tau", [1 / 255, 2 / 255, 4 / 255])
def test_topset_round_trip_stays_within_its_error_bound(tau):
    p = _peaked((12, 10, 6), 18, 17)
    blob = compact.encode_probs(p, free_index=17, tau=tau, codec=compact.TOPSET_CODEC)
    assert compact.read_header(blob)["codec"] == "topset-u8"
    dec = compact.decode_probs(blob)
    assert dec.shape == p.shape and dec.dtype == np.float32
    err = np.abs(dec - p)
    # Bound from the module docstring: stored classes 1/255, the uniform remainder tau + 1/510.
    assert err.max() <= max(1 / 255, tau + 0.5 / 255) + 1e-6, err.max()
    np.testing.assert_allclose(dec.sum(-1), 1.0, atol=1e-5)
    assert dec.min() >= 0
    kl = (p * (np.log(np.maximum(p, 1e-6)) - np.log(np.maximum(dec, 1e-6)))).sum(-1)
    assert kl.mean() < 0.02


@pytest.mark.parametrize("codec", compact.PROBS_CODECS)
def test_compact_is_exact_on_one_hot_and_handles_any_leading_shape_and_free_index(codec):
    labels = np.random.default_rng(1).integers(0, 12, size=(7, 5))
    p = np.eye(12, dtype=np.float32)[labels]
    for free in (0, 11):
        dec = compact.decode_probs(compact.encode_probs(p, free_index=free, codec=codec))
        np.testing.assert_array_equal(dec, p)
    flat = _peaked((50,), 12, 0, seed=3)
    dec = compact.decode_probs(compact.encode_probs(flat, free_index=0, codec=codec))
    assert dec.shape == (50, 12) and np.abs(dec - flat).max() < 0.011


@pytest.mark.parametrize("codec", compact.PROBS_CODECS)
def test_compact_is_at_least_ten_times_smaller_than_the_seed_format_on_teacher_like_probabilities(codec):
    if REAL_LABELS.is_file():
        with np.load(REAL_LABELS) as npz:
            sem = npz["semantics"][50:150, 50:150].astype(np.int64)  # a 100x100x16 crop of a real frame
    else:  # a street-like fallback: ground, a few boxes, free above
        sem = np.full((100, 100, 16), 17)
        sem[:, :, 2] = 11
        sem[40:60, 20:30, 3:6] = 4
    gen = torch.Generator().manual_seed(0)
    p = label_teacher_probs(torch.from_numpy(sem), 18, 17, generator=gen).numpy()
    seed_bytes = len(seed_format.encode_fp16_npz(p, "prob"))
    ref = p.astype(np.float16).astype(np.float32)
    blob = compact.encode_probs(ref, 17, codec=codec)
    assert len(blob) * 10 <= seed_bytes, (len(blob), seed_bytes)
    bound = {compact.DENSE_CODEC: 2 / 255, compact.TOPSET_CODEC: 2.5 / 255}[codec]  # at the default taus
    assert np.abs(compact.decode_probs(blob) - ref).max() <= bound + 1e-6


def test_topset_rejects_corrupt_or_foreign_bytes():
    blob = compact.encode_probs(_peaked((4, 4), 5, 4), free_index=4, codec=compact.TOPSET_CODEC)
    with pytest.raises(compact.CodecError, match="bad magic"):
        compact.decode_probs(b"PK\x03\x04" + blob[4:])
    with pytest.raises(compact.CodecError, match="corrupt"):
        compact.decode_probs(blob[:-6])
    with pytest.raises(compact.CodecError, match="expected codec"):
        compact.decode_feature(blob)
    blob_parts = compact.unpack(blob)
    header = dict(blob_parts.header, background_free=1.5)
    with pytest.raises(compact.CodecError, match="background 1.5"):
        compact.decode_probs(compact.pack(header, blob_parts.payload))
    payload = bytearray(blob_parts.payload)
    e = blob_parts.header["entries"]
    payload[-e:] = b"\xff" * e  # every stored probability 1: voxels with two entries hold mass 2
    with pytest.raises(compact.CodecError, match="stored mass"):
        compact.decode_probs(compact.pack(blob_parts.header, bytes(payload)))
    for codec in compact.PROBS_CODECS:
        with pytest.raises(ValueError, match="tau"):
            compact.encode_probs(_peaked((4,), 5, 4), free_index=4, tau=0.3, codec=codec)
    with pytest.raises(ValueError, match="unknown probability codec"):
        compact.encode_probs(_peaked((4,), 5, 4), free_index=4, codec="topset-u4")


def _reference_decode(data: bytes) -> np.ndarray:
    """The direct ``topset-u8`` decoder (the codec's first implementation), kept as the reference
    the fast decoder must match bit for bit."""
    blob = compact.unpack(data)
    h = blob.header
    shape = tuple(int(s) for s in h["shape"])
    k, n, free = shape[-1], int(np.prod(shape[:-1])), int(h["free_index"])
    m, e, nb = int(h["stored"]), int(h["entries"]), (int(np.prod(shape[:-1])) + 7) // 8
    assert len(blob.payload) == nb + m + 2 * e
    buf = np.frombuffer(blob.payload, dtype=np.uint8)
    stored_mask = np.unpackbits(buf[:nb], count=n).view(bool)
    c, ids, qs = buf[nb : nb + m].astype(np.int64), buf[nb + m : nb + m + e], buf[nb + m + e :]
    rows = np.flatnonzero(stored_mask)
    q = qs.astype(np.float32) * np.float32(1.0 / 255.0)
    mass = np.add.reduceat(q, np.cumsum(c) - c) if e else np.zeros(0, np.float32)
    free_bg = np.float32(h["background_free"])
    rest = np.full(n, (1.0 - free_bg) / (k - 1), dtype=np.float32)
    rest[rows] = np.maximum(1.0 - mass, 0.0) / np.maximum(k - c, 1)
    out = np.empty((n, k), dtype=np.float32)
    out[:] = rest[:, None]
    np.copyto(out[:, free], free_bg, where=~stored_mask)
    out.reshape(-1)[np.repeat(rows * k, c) + ids] = q
    return out.reshape(shape)


def _random_blob(rng, shape, k, free, stored_frac, max_count) -> bytes:
    """A valid ``topset-u8`` file built from random parts (not through the encoder): any mask,
    1..max_count distinct classes per stored voxel in any order, stored values summing to <= 255."""
    n = int(np.prod(shape))
    mask = rng.random(n) < stored_frac
    m = int(mask.sum())
    counts = rng.integers(1, max_count + 1, size=m)
    ids = [rng.permutation(k)[:cnt] for cnt in counts]
    qs = [rng.multinomial(int(rng.integers(0, 256)), np.full(cnt, 1.0 / cnt)) for cnt in counts]
    flat = lambda parts: np.concatenate(parts).astype(np.uint8) if m else np.zeros(0, np.uint8)  # noqa: E731
    header = {"codec": compact.TOPSET_CODEC, "shape": [*shape, k], "free_index": free, "tau": 2 / 255,
              "stored": m, "entries": int(counts.sum()), "background_free": float(rng.uniform(0.9, 1.0))}
    payload = (np.packbits(mask).tobytes() + counts.astype(np.uint8).tobytes() + flat(ids).tobytes()
               + flat(qs).tobytes())
    return compact.pack(header, payload)


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return (a.shape == b.shape and a.dtype == b.dtype == np.float32
            and np.array_equal(a.view(np.uint32), b.view(np.uint32)))


def test_fast_topset_decoder_equals_the_reference_decoder_bit_for_bit(monkeypatch):
    # Small chunks, so that a file spans many of them (and their bounds fall anywhere).
    monkeypatch.setattr(compact, "_CHUNK_ROWS", 40)
    rng = np.random.default_rng(7)
    cases = [((9, 7, 5), 18, 17, 0.5, 3), ((9, 7, 5), 18, 17, 0.9, 18), ((13, 3), 5, 0, 0.3, 5),
             ((301,), 40, 39, 0.7, 40), ((40, 8), 255, 254, 0.4, 255), ((6, 6), 18, 17, 0.0, 1),
             ((6, 6), 18, 3, 1.0, 18), ((1,), 2, 1, 1.0, 2), ((57, 3), 18, 17, 0.05, 2)]
    for shape, k, free, frac, max_count in cases:
        for _ in range(3):
            blob = _random_blob(rng, shape, k, free, frac, max_count)
            ref = _reference_decode(blob)
            assert _same_bits(compact.decode_probs(blob), ref), (shape, k, frac)
            out = np.full(ref.size, np.nan, dtype=np.float32)  # every value must be written
            got = compact.decode_probs(blob, out=out)
            assert _same_bits(got, ref) and np.shares_memory(got, out)
    # Encoder output of teacher-like probabilities, at every tau, with the default chunk sizes too.
    monkeypatch.undo()
    for tau in (1 / 255, 2 / 255, 4 / 255):
        for shape in ((12, 10, 6), (70, 60, 16)):
            blob = compact.encode_probs(_peaked(shape, 18, 17, seed=5, sharp=3.0), 17, tau, compact.TOPSET_CODEC)
            assert _same_bits(compact.decode_probs(blob), _reference_decode(blob))


def test_decoding_in_threads_and_into_a_reused_buffer_gives_each_file_its_own_result():
    rng = np.random.default_rng(8)
    blobs = [_random_blob(rng, (20, 9, 4), 18, 17, frac, 18) for frac in (0.2, 0.8, 0.5, 1.0)]
    refs = [_reference_decode(b) for b in blobs]
    for frac in (1.0, 0.1):  # dense-u8 files of the same shape (both layouts), decoded into the same buffers
        blob, q = _random_dense_file(rng, (20, 9, 4, 18), 255, frac)
        blobs.append(blob)
        refs.append((q.astype(np.float32) * np.float32(1 / 255)).reshape(20, 9, 4, 18))
    errors = []

    def work(order):
        buf = np.empty(refs[0].size, dtype=np.float32)
        for i in order * 5:
            try:
                same = (_same_bits(compact.decode_probs(blobs[i]), refs[i])
                        and _same_bits(compact.decode_probs(blobs[i], out=buf), refs[i]))
            except Exception as exc:  # noqa: BLE001 (a thread's exception would be lost)
                same = exc
            if same is not True:
                errors.append((i, same))

    threads = [threading.Thread(target=work, args=(order,)) for order in ([0, 4, 1, 2, 5, 3], [3, 5, 2, 1, 4, 0])]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    with pytest.raises(ValueError, match="out must be"):
        compact.decode_probs(blobs[0], out=np.empty(refs[0].size + 1, dtype=np.float32))
    with pytest.raises(ValueError, match="out must be"):
        compact.decode_probs(blobs[0], out=np.empty(refs[0].size, dtype=np.float64))
    compact.release_scratch()
    assert _same_bits(compact.decode_probs(blobs[1]), refs[1])


def test_topset_decoder_rejects_payloads_of_another_size_than_the_header_says():
    blob = compact.encode_probs(_peaked((6, 5, 4), 18, 17), free_index=17, codec=compact.TOPSET_CODEC)
    parts = compact.unpack(blob)
    size = len(parts.payload)
    with pytest.raises(compact.CodecError, match=f"corrupt topset-u8 payload: {size + 1} bytes"):
        compact.decode_probs(compact.pack(parts.header, parts.payload + b"\x01"))
    with pytest.raises(compact.CodecError, match=f"corrupt topset-u8 payload: {size - 1} bytes"):
        compact.decode_probs(compact.pack(parts.header, parts.payload[:-1]))
    for entries in (10**12, -1):  # refused before anything of that size is allocated
        with pytest.raises(compact.CodecError, match="cannot hold"):
            compact.decode_probs(compact.pack(dict(parts.header, entries=entries), parts.payload))
    bad = bytearray(blob)
    bad[-1] ^= 0xFF  # the zlib checksum
    with pytest.raises(compact.CodecError, match="corrupt compact target"):
        compact.decode_probs(bytes(bad))


# ----------------------------------------------------------------------------- dense-u8


def _dense_values(blob: bytes) -> np.ndarray:
    """The stored (N, K) uint8 values of a dense-u8 file."""
    header, body = compact._split(blob)
    assert header["codec"] == "dense-u8"
    return np.frombuffer(zstandard.ZstdDecompressor().decompress(body), dtype=np.uint8).reshape(-1, header["shape"][-1])


def _dense_blob(payload: np.ndarray | bytes, shape, scale: int = 255, **header) -> bytes:
    """A dense-u8 file holding ``payload`` as it is (not through the encoder): the (N, K) uint8
    values (layout "rows", the default) or the bytes of another layout given in ``header``."""
    raw = payload if isinstance(payload, bytes) else np.ascontiguousarray(payload, np.uint8).tobytes()
    body = zstandard.ZstdCompressor(level=3, write_checksum=True).compress(raw)
    return compact._container({"codec": "dense-u8", "shape": list(shape), "tau": 1 / 255, "scale": scale,
                               "layout": "rows", **header}, body)


def _random_dense_file(rng, shape, scale: int, stored_frac: float) -> tuple[bytes, np.ndarray]:
    """A valid dense-u8 file from random parts and the (N, K) values it holds: layout "rows" when
    ``stored_frac`` is 1, else "masked" (random mask, background row and stored rows)."""
    n, k = int(np.prod(shape[:-1])), shape[-1]
    q = _random_dense_rows(rng, n, k, scale)
    if stored_frac == 1.0:
        return _dense_blob(q, shape, scale), q
    mask = rng.random(n) < stored_frac
    q[~mask] = _random_dense_rows(rng, 1, k, scale)[0]
    background = q[~mask][0] if (~mask).any() else _random_dense_rows(rng, 1, k, scale)[0]
    payload = np.packbits(mask).tobytes() + background.tobytes() + q[mask].tobytes()
    return _dense_blob(payload, shape, scale, layout="masked", stored=int(mask.sum())), q


def _random_dense_rows(rng, n: int, k: int, scale: int) -> np.ndarray:
    """(n, k) uint8 rows summing to ``scale``: a few classes hold most, as in a teacher's output."""
    weights = rng.dirichlet(np.full(k, 0.3), size=n)
    return np.stack([rng.multinomial(scale, w) for w in weights]).astype(np.uint8)


def test_dense_quantisation_matches_hand_computed_values():
    p = np.array([[0.52, 0.30, 0.11, 0.07], [0.91, 0.02, 0.03, 0.04], [0.91, 0.03, 0.03, 0.03]], dtype=np.float32)
    blob = compact.encode_probs(p, free_index=3, tau=0.1)
    # Row 0 stores 0.52, 0.30, 0.11 (>= tau): cumulative 255 * (0.52, 0.82, 0.93) = 132.6, 209.1,
    # 237.15 -> 133, 209, 237, so q = 133, 76, 28; the 18 left go to class 3.
    # Row 1 stores 0.91: 232.05 -> 232; the 23 left are shared by 3 classes: 7 each, and one more
    # for the 23 % 3 = 2 most probable of them (0.04 and 0.03). Row 2: the same, a tie, broken in
    # class order.
    q = [[133, 76, 28, 18], [232, 7, 8, 8], [232, 8, 8, 7]]
    np.testing.assert_array_equal(_dense_values(blob), q)
    assert _same_bits(compact.decode_probs(blob), np.array(q, dtype=np.float32) * np.float32(1 / 255))
    assert compact.read_header(blob) == {"codec": "dense-u8", "shape": [3, 4], "tau": 0.1, "scale": 255,
                                         "layout": "rows"}


@pytest.mark.parametrize("tau", [1 / 255, 2 / 255, 4 / 255, 1 / 18])
@pytest.mark.parametrize("sharp,free_rows,layout", [(3.0, 0, "rows"), (14.0, 8, "masked")])
def test_dense_round_trip_stays_within_its_error_bound(tau, sharp, free_rows, layout):
    # sharp 3: soft, many classes on both sides of tau; sharp 14 with 8 of 10 rows free: confident,
    # most voxels background.
    p = _peaked((12, 10, 6), 18, 17, sharp=sharp)
    p[0, 0, :3] = np.eye(18)[17]  # exactly free voxels: background in both layouts
    p[:, :free_rows] = np.eye(18)[17]
    blob = compact.encode_probs(p, free_index=17, tau=tau)
    assert compact.read_header(blob)["layout"] == layout
    dec = compact.decode_probs(blob)
    assert dec.shape == p.shape and dec.dtype == np.float32
    stored = p >= tau
    background = p[..., 17] >= 1 - tau
    err = np.abs(dec - p)
    # Bounds from the module docstring: stored classes of stored voxels 1/255, everything else
    # below tau + 1/255.
    assert err[stored & ~background[..., None]].max() <= 1 / 255 + 1e-6
    assert err.max() < tau + 1 / 255
    assert 0 < stored.mean() < 1 and 0 < background.mean() < 1
    np.testing.assert_allclose(dec.sum(-1), 1.0, atol=1e-6)
    assert dec.min() >= 0


def test_dense_decoder_is_q_over_scale_bit_for_bit_for_any_valid_file(monkeypatch):
    monkeypatch.setattr(compact, "_DENSE_CHUNK_VALUES", 90)  # a file spans many chunks of the output pass
    rng = np.random.default_rng(11)
    for shape, scale in (((9, 7, 5, 18), 255), ((13, 3, 5), 255), ((301, 2), 255), ((40, 255), 255),
                         ((6, 6, 18), 100), ((1, 2), 1)):
        for frac in (1.0, 0.5, 0.05, 0.0):  # layout rows; masked with half, few, no stored voxels
            blob, q = _random_dense_file(rng, shape, scale, frac)
            ref = (q.astype(np.float32) * np.float32(1 / scale)).reshape(shape)
            assert _same_bits(compact.decode_probs(blob), ref), (shape, frac)
            out = np.full(ref.size, np.nan, dtype=np.float32)  # every value must be written
            got = compact.decode_probs(blob, out=out)
            assert _same_bits(got, ref) and np.shares_memory(got, out)


def test_dense_decoder_rejects_corrupt_files_with_a_clear_error():
    rng = np.random.default_rng(12)
    q = _random_dense_rows(rng, 24, 18, 255)
    good = _dense_blob(q, (4, 6, 18))
    assert compact.decode_probs(good).shape == (4, 6, 18)
    for delta in (1, -1):  # one distribution holding 256 or 254 255ths
        bad = q.astype(np.int64)
        bad[7, int(np.argmax(bad[7]))] += delta
        with pytest.raises(compact.CodecError, match=f"distribution 7 sums to {255 + delta}/255, not 1"):
            compact.decode_probs(_dense_blob(bad, (4, 6, 18)))
    for cut in (1, 4, 9):  # truncated frames: within the checksum, at its start, within the data
        with pytest.raises(compact.CodecError, match="corrupt compact target"):
            compact.decode_probs(good[:-cut])
    flipped = bytearray(good)
    flipped[-1] ^= 0xFF  # the frame's checksum
    with pytest.raises(compact.CodecError, match="corrupt compact target.*checksum"):
        compact.decode_probs(bytes(flipped))
    # Any single-bit flip in the payload is an error or changes nothing (a flag the frame ignores):
    # never another valid-looking distribution.
    ref, start = compact.decode_probs(good), len(good) - len(compact._split(good)[1])
    for i in range(start, len(good)):
        for bit in (0x01, 0x10, 0x80):
            flipped = bytearray(good)
            flipped[i] ^= bit
            try:
                assert _same_bits(compact.decode_probs(bytes(flipped)), ref), (i, bit)
            except compact.CodecError:
                pass
    with pytest.raises(compact.CodecError, match="432 bytes for shape"):
        compact.decode_probs(_dense_blob(q, (4, 5, 18)))  # the header's shape is not the frame's
    with pytest.raises(compact.CodecError, match="cannot hold shape"):  # refused before allocating 18 GB
        compact.decode_probs(_dense_blob(q, (10**9, 18)))
    for scale in (0, 256, "255"):
        with pytest.raises(compact.CodecError, match="scale"):
            compact.decode_probs(_dense_blob(q, (4, 6, 18), scale))
    for shape in ([4, 6, 1], [4, -6, 18], [4.0, 6, 18]):
        with pytest.raises(compact.CodecError, match="shape"):
            compact.decode_probs(_dense_blob(q, shape))
    with pytest.raises(compact.CodecError, match="corrupt compact target"):
        compact.decode_probs(compact._container(compact.read_header(good), b"not a zstd frame"))
    for header in ({"layout": "planes"}, {"layout": "masked", "stored": 25}, {"layout": "masked", "stored": -1}):
        with pytest.raises(compact.CodecError, match="layout"):
            compact.decode_probs(_dense_blob(q, (4, 6, 18), **header))
    # The masked layout: mask | background row | stored rows.
    mask = np.zeros(24, dtype=bool)
    mask[[2, 5, 11]] = True
    parts = [np.packbits(mask).tobytes(), q[0].tobytes(), q[mask].tobytes()]
    masked = _dense_blob(b"".join(parts), (4, 6, 18), layout="masked", stored=3)
    expected = np.where(mask[:, None], q, q[0]).astype(np.float32) * np.float32(1 / 255)
    assert _same_bits(compact.decode_probs(masked).reshape(24, 18), expected)
    with pytest.raises(compact.CodecError, match="the mask holds 3 voxels, the header 2"):
        compact.decode_probs(_dense_blob(b"".join(parts)[:-18], (4, 6, 18), layout="masked", stored=2))
    bad_background = (q[0].astype(np.int64) + np.eye(18, dtype=np.int64)[4]).astype(np.uint8).tobytes()
    with pytest.raises(compact.CodecError, match="the background row sums to 256/255"):
        compact.decode_probs(_dense_blob(parts[0] + bad_background + parts[2], (4, 6, 18), layout="masked", stored=3))
    bad_rows = q[mask].astype(np.int64)
    bad_rows[1, int(np.argmax(bad_rows[1]))] -= 2
    with pytest.raises(compact.CodecError, match="distribution 5 sums to 253/255"):  # the 2nd stored voxel
        compact.decode_probs(_dense_blob(parts[0] + parts[1] + bad_rows.astype(np.uint8).tobytes(), (4, 6, 18),
                                         layout="masked", stored=3))
    with pytest.raises(ValueError, match="non-negative"):
        compact.encode_probs(np.array([[0.5, -0.1, 0.6]], dtype=np.float32), free_index=2)


def test_dense_encoder_recompresses_noisy_files_harder_without_changing_their_values(monkeypatch):
    p = _peaked((30, 20, 8), 18, 17, sharp=1.0)  # very soft and noisy
    files = {}
    for noisy_bytes in (float("inf"), 0.0):  # never / always the noisy level
        monkeypatch.setattr(compact, "_NOISY_BYTES", noisy_bytes)
        files[noisy_bytes] = compact.encode_probs(p, free_index=17)
    assert len(files[0.0]) < len(files[float("inf")])
    np.testing.assert_array_equal(_dense_values(files[0.0]), _dense_values(files[float("inf")]))


def test_feature_codec_error_is_at_most_half_a_step_per_channel():
    rng = np.random.default_rng(2)
    f = (rng.normal(size=(6, 9, 7)) * np.arange(1, 7)[:, None, None]).astype(np.float32)
    f[3] = 2.5  # a constant channel is exact
    dec = compact.decode_feature(compact.encode_feature(f))
    step = (f.reshape(6, -1).max(1) - f.reshape(6, -1).min(1)) / 255
    assert np.all(np.abs(dec - f).reshape(6, -1).max(1) <= step / 2 + 1e-5)
    np.testing.assert_array_equal(dec[3], f[3])


def test_seed_fp16_npz_round_trip_names_its_array_and_clips_to_fp16(tmp_path):
    logits = np.array([[[[1e6, -3.0, 0.5]]]], dtype=np.float32)
    path = tmp_path / "k_3d_logits_fp16.npz"
    seed_format.write_fp16_npz(path, logits, seed_format.voxel_array_key("logit"))
    with np.load(path) as npz:  # what the seed's loader does
        assert npz.files == ["logits"] and npz["logits"].dtype == np.float16
    back = seed_format.read_fp16_npz(path, "logits")
    assert back[0, 0, 0, 0] == np.finfo(np.float16).max and back[0, 0, 0, 1] == -3.0
    assert seed_format.voxel_array_key("prob") == "prob"
    with pytest.raises(DataError, match="no array 'prob'"):
        seed_format.read_fp16_npz(path, "prob")
    with pytest.raises(DataError, match="not found"):
        seed_format.read_fp16_npz(tmp_path / "missing.npz", "prob")


# ----------------------------------------------------------------------------- BEV collapse


def _column() -> np.ndarray:
    """One column, z=0 bottom .. z=2 top, classes (car, road, free)."""
    col = np.array([[0.0, 0.8, 0.2], [0.2, 0.3, 0.5], [0.1, 0.0, 0.9]], dtype=np.float64)
    return col[None, None]  # (1, 1, Z=3, K=3)


def test_collapse_matches_hand_computed_top_down_compositing():
    # a = 1 - p_free = (0.8, 0.5, 0.1) bottom..top; weights from the top: w2 = 0.1,
    # w1 = 0.5 * 0.9 = 0.45, w0 = 0.8 * 0.9 * 0.5 = 0.36; free = 0.9 * 0.5 * 0.2 = 0.09;
    # car = 0.1 * 1 + 0.45 * 0.4 = 0.28; road = 0.45 * 0.6 + 0.36 * 1 = 0.63.
    bev = collapse_bev(_column(), free_index=2)
    np.testing.assert_allclose(bev[0, 0], [0.28, 0.63, 0.09], atol=1e-12)
    # Only layers 0..1: free = 0.5 * 0.2 = 0.1, car = 0.5 * 0.4 = 0.2, road = 0.5 * 0.6 + 0.8 * 0.5 = 0.7.
    np.testing.assert_allclose(collapse_bev(_column(), 2, z_band=(0, 2))[0, 0], [0.2, 0.7, 0.1], atol=1e-12)
    # Free first (Occ-ScanNet's convention) is the same distribution, permuted.
    perm = [2, 0, 1]
    np.testing.assert_allclose(collapse_bev(_column()[..., perm], 0)[0, 0], [0.09, 0.28, 0.63], atol=1e-12)


def test_collapse_sums_to_one_keeps_type_and_its_hard_version_is_the_topmost_occupied_label():
    p = torch.from_numpy(_peaked((2, 5, 4, 8), 6, 5, seed=4))  # (B, X, Y, Z, K)
    bev = collapse_bev(p, 5)
    assert isinstance(bev, torch.Tensor) and bev.shape == (2, 5, 4, 6) and bev.dtype == torch.float32
    torch.testing.assert_close(bev.sum(-1), torch.ones(2, 5, 4), atol=1e-6, rtol=0)
    labels = np.random.default_rng(5).choice([0, 3, 5, 5, 5], size=(6, 6, 8))
    hard = collapse_bev(np.eye(6)[labels], 5).argmax(-1)
    occupied = labels != 5
    top = 7 - occupied[..., ::-1].argmax(-1)  # highest occupied layer of each column
    expected = np.where(occupied.any(-1), np.take_along_axis(labels, top[..., None], -1)[..., 0], 5)
    np.testing.assert_array_equal(hard, expected)


def test_bev_rule_strings_round_trip():
    assert parse_rule(rule_name(None)) is None
    assert parse_rule(rule_name((1, 8))) == (1, 8)
    with pytest.raises(ValueError, match="unknown BEV rule"):
        parse_rule("max")
