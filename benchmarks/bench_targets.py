"""Benchmark of the teacher-target formats: bytes per frame and decode time of the compact format
against the seed-compatible fp16 npz files (DESIGN.md section 6, issue 5), and its error.

    python benchmarks/bench_targets.py [--repeats 15] [--out benchmarks/results/targets.json]
                                       [--frames occ3d-real] [--profiles typical blurry]

Frames: the real Occ3D label of ../shared/realdata (200x200x16; its 100x100 centre for the CPU
grid) and a synthetic street frame at both grids. Teacher-like probabilities come from the labels
(occdistill.targets.pseudo: box-neighbourhood class fractions x confidence + logit noise, softmax)
at four sharpness profiles, from a confident CNN-like teacher to a very soft one. The reference is
the fp16 value the seed format stores; errors of the compact format are measured against it.

Per frame = voxel (X, Y, Z, 18) + BEV (X, Y, 18) files. Seed format (a): ``np.savez_compressed``
fp16 (as written by dump-teacher; ``stored`` = ``np.savez``, for scale). Decode = file bytes ->
float32 arrays, median over repeats, wall and CPU (process) time, and minor page faults; the load
average is recorded. Compact decode variants, interleaved repeat by repeat so that they see the
same load: ``compact.decode_probs`` into new arrays (what a reader gets), into reused buffers
(what TeacherTargets.load does when it moves the targets), and the previous decoder (kept below),
whose per-repeat time ratio to the current one is the speed-up.
Targets: compact <= 1/10 of (a)'s bytes, decode < 20 ms per frame at the Occ3D grid.
Prints one JSON line and a table; writes the JSON (command, machine) to --out.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from occdistill.io import atomic_write_json
from occdistill.targets import compact, seed_format
from occdistill.targets.collapse import collapse_bev
from occdistill.targets.pseudo import label_teacher_probs

REPO = Path(__file__).resolve().parents[1]
REAL_LABEL = REPO.parent / "shared" / "realdata" / "occ3d_openocc_occupancy_vis_demo" / "3D_occupancy_data.npz"
K, FREE = 18, 17
PROFILES = {  # name: (confidence, radius, noise)
    "sharp": (14.0, 1, 0.3),
    "typical": (10.0, 1, 0.5),
    "blurry": (8.0, 2, 0.5),
    "soft": (6.0, 1, 1.0),
}
TAUS = (1 / 255, 2 / 255, 4 / 255)
MAX_DECODE_MS, MIN_RATIO = 20.0, 10.0


def frames() -> dict[str, np.ndarray]:
    """name -> (X, Y, 16) labels, at the Occ3D grid (200x200) and the CPU grid (100x100)."""
    from occdistill.data.labels import load_occ3d_labels
    from occdistill.data.synth import generate

    out = {}
    if REAL_LABEL.is_file():
        real = load_occ3d_labels(REAL_LABEL).semantics
        out["occ3d-real@200x200x16"] = real
        out["occ3d-real@100x100x16"] = real[50:150, 50:150]
    small = ["rig.width=64", "rig.height=36", "lidar.azimuths=256"]  # labels do not depend on images
    with tempfile.TemporaryDirectory() as tmp:
        for shape, rng in (("200x200x16", "[-40,-40,-1,40,40,5.4]"), ("100x100x16", "[-20,-20,-1,20,20,5.4]")):
            res = generate("street", Path(tmp) / shape, 1, 1, seed=0, overrides=[*small, f"grid.range={rng}"],
                           progress=False)
            out[f"synth-street@{shape}"] = load_occ3d_labels(res.frame_files[0]).semantics
    return out


def timed(fn, repeats: int) -> tuple[float, float]:
    """Median wall and CPU milliseconds of ``fn()``."""
    wall, cpu = [], []
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - w)
        cpu.append(time.process_time() - c)
    return 1e3 * statistics.median(wall), 1e3 * statistics.median(cpu)


def timed_interleaved(fns: dict, repeats: int) -> dict[str, dict[str, list[float]]]:
    """Per variant: wall and CPU milliseconds and minor page faults of every repeat, the
    variants run in turn within each repeat (order alternating) so that they share the load."""
    runs = {name: {"wall": [], "cpu": [], "faults": []} for name in fns}
    for fn in fns.values():  # warm-up: reused buffers grow to size
        fn()
    for r in range(repeats):
        for name in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            w, c = time.perf_counter(), time.process_time()
            fns[name]()
            runs[name]["wall"].append(1e3 * (time.perf_counter() - w))
            runs[name]["cpu"].append(1e3 * (time.process_time() - c))
            runs[name]["faults"].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    return runs


def previous_decode_probs(data: bytes) -> np.ndarray:
    """The ``topset-u8`` decoder before the issue-5 optimisation (same output bit for bit,
    tests/test_targets_codec.py), timed for the speed-up ratio."""
    blob = compact.unpack(data)
    h = blob.header
    shape = tuple(int(s) for s in h["shape"])
    k, n, free = shape[-1], int(np.prod(shape[:-1])), int(h["free_index"])
    m, e, nb = int(h["stored"]), int(h["entries"]), (int(np.prod(shape[:-1])) + 7) // 8
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


def summarize(runs: dict[str, list[float]]) -> dict:
    return {"wall_ms": statistics.median(runs["wall"]), "cpu_ms": statistics.median(runs["cpu"]),
            "minor_faults": statistics.median(runs["faults"])}


def npz_bytes(array: np.ndarray, key: str, compressed: bool) -> bytes:
    buf = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buf, **{key: array.astype(np.float16)})
    return buf.getvalue()


def npz_decode(data: bytes, key: str) -> np.ndarray:
    with np.load(io.BytesIO(data)) as npz:
        return npz[key].astype(np.float32)


def errors(ref: np.ndarray, dec: np.ndarray) -> dict:
    """max |dec - ref| and KL(ref || dec) per voxel (probabilities clamped at 1e-6, as the losses do)."""
    kl = (ref * (np.log(np.maximum(ref, 1e-6)) - np.log(np.maximum(dec, 1e-6)))).sum(-1)
    return {"max_abs": float(np.abs(dec - ref).max()), "kl_mean": float(kl.mean()), "kl_max": float(kl.max())}


def case(labels: np.ndarray, profile: str, tau: float, repeats: int) -> dict:
    conf, radius, noise = PROFILES[profile]
    gen = torch.Generator().manual_seed(0)
    probs = label_teacher_probs(torch.from_numpy(labels.astype(np.int64)), K, FREE, confidence=conf, radius=radius,
                                noise=noise, generator=gen).numpy()
    ref = probs.astype(np.float16).astype(np.float32)  # what the seed format holds
    bev_ref = collapse_bev(probs, FREE).astype(np.float16).astype(np.float32)
    seed_c = [npz_bytes(ref, "prob", True), npz_bytes(bev_ref, "prob", True)]
    seed_s = [npz_bytes(ref, "prob", False), npz_bytes(bev_ref, "prob", False)]
    enc_start = time.perf_counter()
    blobs = [compact.encode_probs(ref, FREE, tau), compact.encode_probs(bev_ref, FREE, tau)]
    encode_ms = 1e3 * (time.perf_counter() - enc_start)
    dec = compact.decode_probs(blobs[0])
    assert all(np.array_equal(compact.decode_probs(b).view(np.uint32), previous_decode_probs(b).view(np.uint32))
               for b in blobs), "the decoder no longer matches the previous one bit for bit"
    reused = [np.empty(int(np.prod(compact.read_header(b)["shape"])), np.float32) for b in blobs]
    runs = timed_interleaved({
        "new": lambda: [compact.decode_probs(b) for b in blobs],
        "reused": lambda: [compact.decode_probs(b, out=o) for b, o in zip(blobs, reused)],
        "previous": lambda: [previous_decode_probs(b) for b in blobs],
        "voxel": lambda: compact.decode_probs(blobs[0]),
    }, repeats)
    new, reuse, prev, vox = (summarize(runs[v]) for v in ("new", "reused", "previous", "voxel"))
    speedup = {t: statistics.median(np.array(runs["previous"][t]) / np.array(runs["new"][t])) for t in ("wall", "cpu")}
    seed_wall, seed_cpu = timed(lambda: [npz_decode(b, "prob") for b in seed_c], max(3, repeats // 3))
    seed_bytes, compact_bytes = sum(map(len, seed_c)), sum(map(len, blobs))
    background = float((ref[..., FREE] >= 1 - tau).mean())  # voxels the codec stores nothing for
    return {
        "teacher": {"profile": profile, "confidence": conf, "radius": radius, "noise": noise,
                    "background_voxels": background},
        "tau": tau,
        "seed_bytes_per_frame": seed_bytes,
        "seed_stored_bytes_per_frame": sum(map(len, seed_s)),
        "compact_bytes_per_frame": compact_bytes,
        "compact_voxel_bytes": len(blobs[0]),
        "compact_bev_bytes": len(blobs[1]),
        "ratio_vs_seed": seed_bytes / compact_bytes,
        "ratio_vs_seed_stored": sum(map(len, seed_s)) / compact_bytes,
        "compact_decode_ms": {"frame_wall": new["wall_ms"], "frame_cpu": new["cpu_ms"], "voxel_wall": vox["wall_ms"],
                              "voxel_cpu": vox["cpu_ms"], "frame_wall_reused_buffers": reuse["wall_ms"],
                              "frame_cpu_reused_buffers": reuse["cpu_ms"], "frame_wall_previous": prev["wall_ms"],
                              "frame_cpu_previous": prev["cpu_ms"]},
        "compact_decode_minor_faults": {"new": new["minor_faults"], "reused_buffers": reuse["minor_faults"],
                                        "previous": prev["minor_faults"]},
        "compact_decode_speedup_vs_previous": {"wall": speedup["wall"], "cpu": speedup["cpu"]},
        "load_average_1min": (loadavg() or [None])[0],
        "seed_decode_ms": {"frame_wall": seed_wall, "frame_cpu": seed_cpu},
        "compact_encode_ms": encode_ms,
        "voxel_error_vs_fp16": errors(ref, dec),
        "bev_error_vs_fp16": errors(bev_ref, compact.decode_probs(blobs[1])),
        "error_bound": max(1 / 255, tau + 0.5 / 255),
    }


def machine() -> dict:
    cpu = "unknown"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "decode_threads": "1 (numpy)", "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__}


def loadavg() -> list[float] | None:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=15, help="decode repeats per case (median)")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "targets.json")
    ap.add_argument("--frames", nargs="*", help="only frames whose name contains one of these (a partial run)")
    ap.add_argument("--profiles", nargs="*", choices=sorted(PROFILES), help="only these teacher profiles")
    args = ap.parse_args(argv)
    load_before = loadavg()
    cases = []
    for name, labels in frames().items():
        if args.frames and not any(f in name for f in args.frames):
            continue
        for profile in args.profiles or PROFILES:
            taus = TAUS if profile == "typical" else (compact.DEFAULT_TAU,)
            for tau in taus:
                r = {"frame": name, "grid": list(labels.shape), **case(labels, profile, tau, args.repeats)}
                cases.append(r)
                d = r["compact_decode_ms"]
                print(f"{name:<24}{profile:>8} tau {tau * 255:.0f}/255  {r['seed_bytes_per_frame'] / 1e6:7.2f} MB"
                      f" -> {r['compact_bytes_per_frame'] / 1e3:7.1f} kB  x{r['ratio_vs_seed']:6.1f}"
                      f"  decode {d['frame_wall']:5.1f} ms (cpu {d['frame_cpu']:.1f},"
                      f" previous {d['frame_wall_previous']:.1f}), load {r['load_average_1min']}", file=sys.stderr)
    occ3d = [c for c in cases if c["tau"] == compact.DEFAULT_TAU and c["grid"][:2] == [200, 200]]

    def fast(group: list[dict], key: str) -> bool:
        return all(c["compact_decode_ms"][key] < MAX_DECODE_MS for c in group)

    result = {
        "benchmark": "teacher targets",
        "command": " ".join(["python benchmarks/bench_targets.py", *(sys.argv[1:] if argv is None else argv)]),
        "machine": machine(),
        "load_average_before": load_before,
        "load_average_after": loadavg(),
        "codec": {"name": compact.PROBS_CODEC, "default_tau": compact.DEFAULT_TAU, "compression": "zlib",
                  "zlib_level": compact.DEFAULT_LEVEL},
        "seed_format": "np.savez_compressed float16, voxel + BEV file",
        "cases": cases,
        "summary_occ3d_grid_default_tau": {
            c["frame"] + " " + c["teacher"]["profile"]: {
                "ratio": round(c["ratio_vs_seed"], 1), "decode_ms_wall": round(c["compact_decode_ms"]["frame_wall"], 1),
                "decode_ms_cpu": round(c["compact_decode_ms"]["frame_cpu"], 1),
                "decode_ms_wall_reused_buffers": round(c["compact_decode_ms"]["frame_wall_reused_buffers"], 1),
                "decode_ms_cpu_reused_buffers": round(c["compact_decode_ms"]["frame_cpu_reused_buffers"], 1),
                "previous_decode_ms_wall": round(c["compact_decode_ms"]["frame_wall_previous"], 1),
                "previous_decode_ms_cpu": round(c["compact_decode_ms"]["frame_cpu_previous"], 1),
                "speedup_cpu": round(c["compact_decode_speedup_vs_previous"]["cpu"], 2),
                "speedup_wall": round(c["compact_decode_speedup_vs_previous"]["wall"], 2),
                "max_abs": round(c["voxel_error_vs_fp16"]["max_abs"], 4)}
            for c in occ3d
        },
        # Per teacher profile, over both frames at the Occ3D grid and the default tau.
        "meets_targets_occ3d_grid": {
            profile: {
                "ratio>=10": all(c["ratio_vs_seed"] >= MIN_RATIO for c in group),
                "decode<20ms_wall": fast(group, "frame_wall"),
                "decode<20ms_cpu": fast(group, "frame_cpu"),
                "decode<20ms_wall_reused_buffers": fast(group, "frame_wall_reused_buffers"),
            } if group else None
            for profile in PROFILES
            for group in [[c for c in occ3d if c["teacher"]["profile"] == profile]]
        },
        "error_within_bound_all_cases": all(c["voxel_error_vs_fp16"]["max_abs"] <= c["error_bound"] + 1e-6
                                            for c in cases),
    }
    atomic_write_json(args.out, result)
    print(json.dumps(result))
    print()
    print(f"{'frame':<24}{'teacher':>8}{'tau':>7}{'(a) MB':>8}{'compact kB':>11}{'ratio':>7}"
          f"{'dec ms':>8}{'cpu':>6}{'reused':>8}{'prev':>7}{'x':>6}{'(a) ms':>8}{'max err':>9}{'KL mean':>9}")
    for c in cases:
        d = c["compact_decode_ms"]
        print(f"{c['frame']:<24}{c['teacher']['profile']:>8}{c['tau'] * 255:>5.0f}/255"[:46].ljust(39)
              + f"{c['seed_bytes_per_frame'] / 1e6:>8.2f}{c['compact_bytes_per_frame'] / 1e3:>11.1f}"
              f"{c['ratio_vs_seed']:>7.1f}{d['frame_wall']:>8.1f}{d['frame_cpu']:>6.1f}"
              f"{d['frame_wall_reused_buffers']:>8.1f}{d['frame_wall_previous']:>7.1f}"
              f"{c['compact_decode_speedup_vs_previous']['cpu']:>6.2f}"
              f"{c['seed_decode_ms']['frame_wall']:>8.1f}{c['voxel_error_vs_fp16']['max_abs']:>9.4f}"
              f"{c['voxel_error_vs_fp16']['kl_mean']:>9.1e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
