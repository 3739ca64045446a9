"""Benchmark of the teacher-target formats: bytes per frame and decode time of the compact codecs
(dense-u8, the default, and topset-u8, the previous one) against the seed-compatible fp16 npz
files (DESIGN.md section 6, issue 5), and their error.

    python benchmarks/bench_targets.py [--repeats 15] [--out benchmarks/results/targets.json]
                                       [--frames occ3d-real teacher] [--profiles typical blurry]
                                       [--real-dump outputs/bench/kd_t1224/dump]

Frames, synthetic teachers: the real Occ3D label of ../shared/realdata (200x200x16; its 100x100
centre for the CPU grid) and a synthetic street frame at both grids, softened into teacher-like
probabilities (occdistill.targets.pseudo: box-neighbourhood class fractions x confidence + logit
noise, softmax) at four profiles, from a confident CNN-like teacher to a very soft one. The soft
profile is encoded at tau = 14/255 (the largest tau <= 1/K): at the default taus it is only 5-8x
smaller than (a). The reference is the fp16 value the seed format stores.

Frames, a real teacher: the dump of a dense teacher trained by this project (--real-dump, written
by dump-teacher with --formats compact,seed: 100x100x16 frames, fp16 logits in (a)). Nothing is
upsampled: ``teacher@100x100x16`` decodes 4 of its frames as they are; ``teacher@200x200x16`` is the
Occ3D-grid case, each frame 4 different 100x100 frames tiled 2x2 (distinct frames, so that no
compressor finds a repeat the real data would not have), 2 such frames; its (a) files are the
tiled fp16 logits and BEV written as dump-teacher writes them. Reference: the softmax of the fp16
logits and the fp16 BEV, i.e. what the seed files hold.

Per frame = voxel (X, Y, Z, 18) + BEV (X, Y, 18) files. Decode = file bytes -> float32 arrays,
median over repeats, wall and CPU (process) time, and minor page faults; the load average is
recorded per case. Variants, interleaved repeat by repeat so that they see the same load: each
codec into new arrays (what a reader gets) and into reused buffers (what TeacherTargets.load does
when it moves the targets). Targets: compact <= 1/10 of (a)'s bytes, decode < 20 ms per frame at
the Occ3D grid (also reported at the CPU grid). Prints one JSON line and a table; writes the JSON
(command, machine) to --out.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from occdistill.io import atomic_write_json
from occdistill.targets import compact
from occdistill.targets.collapse import collapse_bev
from occdistill.targets.pseudo import label_teacher_probs

REPO = Path(__file__).resolve().parents[1]
REAL_LABEL = REPO.parent / "shared" / "realdata" / "occ3d_openocc_occupancy_vis_demo" / "3D_occupancy_data.npz"
REAL_DUMP = REPO / "outputs" / "bench" / "kd_t1224" / "dump"
K, FREE = 18, 17
PROFILES = {  # name: (confidence, radius, noise)
    "sharp": (14.0, 1, 0.3),
    "typical": (10.0, 1, 0.5),
    "blurry": (8.0, 2, 0.5),
    "soft": (6.0, 1, 1.0),
}
CODECS = compact.PROBS_CODECS
SOFT_TAU = 14 / 255
TAU_SWEEP = (2 / 255, 4 / 255)  # typical teacher, both codecs, beside the default taus
MAX_DECODE_MS, MIN_RATIO = 20.0, 10.0



@dataclass(frozen=True)
class Frame:
    """The targets of one benchmark frame: ``voxel`` (X, Y, Z, K) and ``bev`` (X, Y, K) float32
    probabilities (the reference errors are measured against), and the bytes of the seed files (a)."""

    voxel: np.ndarray
    bev: np.ndarray
    seed_files: tuple[bytes, bytes]


def synthetic_labels() -> dict[str, np.ndarray]:
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


def synthetic_frame(labels: np.ndarray, profile: str) -> Frame:
    conf, radius, noise = PROFILES[profile]
    gen = torch.Generator().manual_seed(0)
    probs = label_teacher_probs(torch.from_numpy(labels.astype(np.int64)), K, FREE, confidence=conf, radius=radius,
                                noise=noise, generator=gen).numpy()
    ref = probs.astype(np.float16).astype(np.float32)  # what the seed format holds
    bev = collapse_bev(probs, FREE).astype(np.float16).astype(np.float32)
    return Frame(ref, bev, (npz_bytes(ref, "prob"), npz_bytes(bev, "prob")))


def real_teacher_frames(dump: Path) -> dict[str, list[Frame]]:
    """The real teacher's frames at the CPU grid (as dumped) and at the Occ3D grid (2x2 tiles of
    distinct frames); empty when the dump is not there."""
    manifest = dump / "manifest_train.json"
    if not manifest.is_file():
        return {}
    samples = json.loads(manifest.read_text())["samples"][:8]
    tiles = []
    for s in samples:
        files = s["files"]
        with np.load(dump / files["voxel_fp16"]) as npz:
            logits = npz["logits"]  # (100, 100, 16, K) float16
        with np.load(dump / files["bev_fp16"]) as npz:
            bev = npz["prob"]  # (100, 100, K) float16
        seed = ((dump / files["voxel_fp16"]).read_bytes(), (dump / files["bev_fp16"]).read_bytes())
        tiles.append((logits, bev, seed))
    if len(tiles) < 8:
        return {}

    def frame(logits: np.ndarray, bev: np.ndarray, seed: tuple[bytes, bytes]) -> Frame:
        probs = torch.from_numpy(logits.astype(np.float32)).softmax(-1).numpy()
        return Frame(probs, bev.astype(np.float32), seed)

    def tiled(group: list) -> Frame:
        # (2, 2) tiles of (100, 100, ...) -> (200, 200, ...): rows of tiles along x, then y.
        logits = np.concatenate([np.concatenate([group[0][0], group[1][0]], 1),
                                 np.concatenate([group[2][0], group[3][0]], 1)], 0)
        bev = np.concatenate([np.concatenate([group[0][1], group[1][1]], 1),
                              np.concatenate([group[2][1], group[3][1]], 1)], 0)
        return frame(logits, bev, (npz_bytes(logits, "logits"), npz_bytes(bev, "prob")))

    return {"teacher@100x100x16": [frame(*t) for t in tiles[:4]],
            "teacher@200x200x16": [tiled(tiles[:4]), tiled(tiles[4:])]}


def npz_bytes(array: np.ndarray, key: str) -> bytes:
    """A seed-format file: ``np.savez_compressed`` float16, as dump-teacher writes it."""
    buf = io.BytesIO()
    np.savez_compressed(buf, **{key: array.astype(np.float16)})
    return buf.getvalue()


def npz_decode(data: bytes) -> np.ndarray:
    with np.load(io.BytesIO(data)) as npz:
        return npz[npz.files[0]].astype(np.float32)


def timed_interleaved(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, dict[str, list[float]]]:
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


def errors(ref: np.ndarray, dec: np.ndarray) -> dict:
    """max |dec - ref| and KL(ref || dec) per voxel (probabilities clamped at 1e-6, as the losses do)."""
    kl = (ref * (np.log(np.maximum(ref, 1e-6)) - np.log(np.maximum(dec, 1e-6)))).sum(-1)
    return {"max_abs": float(np.abs(dec - ref).max()), "kl_mean": float(kl.mean()), "kl_max": float(kl.max())}


def error_bound(codec: str, tau: float) -> float:
    """The codec's bound on the per-class absolute error (compact module docstring)."""
    return tau + 1 / 255 if codec == compact.DENSE_CODEC else max(1 / 255, tau + 0.5 / 255)


def case(frames: list[Frame], taus: dict[str, float], repeats: int) -> dict:
    """Both codecs on ``frames`` (per-frame numbers: bytes averaged, decode time per frame)."""
    seed = sum(len(b) for f in frames for b in f.seed_files) / len(frames)
    fns, codecs = {}, {}
    for codec in CODECS:
        start = time.process_time()
        blobs = [(compact.encode_probs(f.voxel, FREE, taus[codec], codec),
                  compact.encode_probs(f.bev, FREE, taus[codec], codec)) for f in frames]
        encode_s = (time.process_time() - start) / len(frames)
        reused = [(np.empty(f.voxel.size, np.float32), np.empty(f.bev.size, np.float32)) for f in frames]
        fns[codec] = lambda blobs=blobs: [compact.decode_probs(b) for pair in blobs for b in pair]
        fns[codec + " reused"] = lambda blobs=blobs, reused=reused: [
            compact.decode_probs(b, out=o) for pair, outs in zip(blobs, reused) for b, o in zip(pair, outs)]
        voxel_err = [errors(f.voxel, compact.decode_probs(v)) for f, (v, _) in zip(frames, blobs)]
        bev_err = [errors(f.bev, compact.decode_probs(b)) for f, (_, b) in zip(frames, blobs)]
        size = sum(len(v) + len(b) for v, b in blobs) / len(frames)
        codecs[codec] = {
            "tau": taus[codec],
            "bytes_per_frame": size,
            "voxel_bytes": sum(len(v) for v, _ in blobs) / len(frames),
            "bev_bytes": sum(len(b) for _, b in blobs) / len(frames),
            "voxel_layouts": [compact.read_header(v).get("layout") for v, _ in blobs],  # dense-u8: rows / masked
            "ratio_vs_seed": seed / size,
            "encode_cpu_s_per_frame": encode_s,
            "voxel_error_vs_reference": {k: max(e[k] for e in voxel_err) for k in ("max_abs", "kl_max")}
            | {"kl_mean": statistics.mean(e["kl_mean"] for e in voxel_err)},
            "bev_error_vs_reference": {k: max(e[k] for e in bev_err) for k in ("max_abs", "kl_max")}
            | {"kl_mean": statistics.mean(e["kl_mean"] for e in bev_err)},
            "error_bound": error_bound(codec, taus[codec]),
        }
    runs = timed_interleaved(fns, repeats)
    per_frame = {name: {key: [v / len(frames) for v in r[key]] for key in r} for name, r in runs.items()}
    for codec, c in codecs.items():
        new, reused = per_frame[codec], per_frame[codec + " reused"]
        c["decode_ms"] = {"cpu": statistics.median(new["cpu"]), "wall": statistics.median(new["wall"]),
                          "cpu_min": min(new["cpu"]), "cpu_reused_buffers": statistics.median(reused["cpu"]),
                          "wall_reused_buffers": statistics.median(reused["wall"])}
        c["decode_minor_faults"] = {"new": statistics.median(new["faults"]),
                                    "reused_buffers": statistics.median(reused["faults"])}
        d = c["decode_ms"]
        c["meets"] = {"ratio>=10": c["ratio_vs_seed"] >= MIN_RATIO, "decode<20ms_cpu": d["cpu"] < MAX_DECODE_MS,
                      "decode<20ms_wall": d["wall"] < MAX_DECODE_MS,
                      "decode<20ms_cpu_reused_buffers": d["cpu_reused_buffers"] < MAX_DECODE_MS,
                      "error<=bound": c["voxel_error_vs_reference"]["max_abs"] <= c["error_bound"] + 1e-6}
    wall0, cpu0 = time.perf_counter(), time.process_time()
    seed_repeats = max(3, repeats // 5)
    for _ in range(seed_repeats):
        for f in frames:
            for data in f.seed_files:
                npz_decode(data)
    seed_ms = [1e3 * (now - then) / (seed_repeats * len(frames))
               for now, then in ((time.perf_counter(), wall0), (time.process_time(), cpu0))]
    return {"frames": len(frames), "seed_bytes_per_frame": seed,
            "seed_decode_ms": {"wall": seed_ms[0], "cpu": seed_ms[1]},
            "load_average_1min": (loadavg() or [None])[0], "codecs": codecs}


def machine() -> dict:
    cpu = "unknown"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import zstandard

    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "decode_threads": "1 (numpy)", "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
            "zstandard": zstandard.__version__}


def loadavg() -> list[float] | None:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return None


def plan(args: argparse.Namespace) -> list[tuple[str, str, list[Frame], dict[str, float]]]:
    """(frame name, teacher, frames, tau per codec) of every case to run."""
    defaults = dict(compact.DEFAULT_TAUS)
    wanted = lambda name: not args.frames or any(f in name for f in args.frames)  # noqa: E731
    cases = []
    for name, frames in real_teacher_frames(args.real_dump).items():
        if wanted(name):
            cases.append((name, "real (dense teacher, kd_t1224)", frames, defaults))
    for name, labels in synthetic_labels().items():
        if not wanted(name):
            continue
        for profile in args.profiles or PROFILES:
            frames = [synthetic_frame(labels, profile)]
            taus = dict.fromkeys(CODECS, SOFT_TAU) if profile == "soft" else defaults
            cases.append((name, profile, frames, taus))
            if profile == "typical":
                cases += [(name, profile, frames, dict.fromkeys(CODECS, tau)) for tau in TAU_SWEEP]
    return cases


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=15, help="decode repeats per case (median)")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "targets.json")
    ap.add_argument("--frames", nargs="*", help="only frames whose name contains one of these (a partial run)")
    ap.add_argument("--profiles", nargs="*", choices=sorted(PROFILES), help="only these synthetic teacher profiles")
    ap.add_argument("--real-dump", type=Path, default=REAL_DUMP,
                    help="dump-teacher output with compact and seed files of a real teacher (skipped when absent)")
    args = ap.parse_args(argv)
    load_before = loadavg()
    cases = []
    for name, teacher, frames, taus in plan(args):
        r = {"frame": name, "grid": list(frames[0].voxel.shape[:3]), "teacher": teacher, **case(frames, taus, args.repeats)}
        cases.append(r)
        line = "  ".join(f"{codec} tau {c['tau'] * 255:.0f}/255 {c['bytes_per_frame'] / 1e3:6.0f} kB x{c['ratio_vs_seed']:5.1f}"
                         f" cpu {c['decode_ms']['cpu']:5.1f} wall {c['decode_ms']['wall']:5.1f} ms"
                         for codec, c in r["codecs"].items())
        print(f"{name:<24}{teacher[:8]:>9}  {line}  load {r['load_average_1min']}", file=sys.stderr)

    def default(c: dict) -> bool:  # the case run at each codec's default tau (soft: its own)
        return c["teacher"] == "soft" or all(c["codecs"][k]["tau"] == compact.DEFAULT_TAUS[k] for k in CODECS)

    summary = {
        f"{c['frame']} {c['teacher']}": {
            codec: {"ratio": round(x["ratio_vs_seed"], 1), "kB_per_frame": round(x["bytes_per_frame"] / 1e3),
                    "decode_ms_cpu": round(x["decode_ms"]["cpu"], 1), "decode_ms_wall": round(x["decode_ms"]["wall"], 1),
                    "decode_ms_cpu_reused_buffers": round(x["decode_ms"]["cpu_reused_buffers"], 1),
                    "max_abs_error": round(x["voxel_error_vs_reference"]["max_abs"], 4),
                    "error_bound": round(x["error_bound"], 4), "tau_255ths": round(x["tau"] * 255, 2),
                    "meets_both_targets_cpu": x["meets"]["ratio>=10"] and x["meets"]["decode<20ms_cpu"],
                    "meets_both_targets_wall": x["meets"]["ratio>=10"] and x["meets"]["decode<20ms_wall"]}
            for codec, x in c["codecs"].items()}
        for c in cases if default(c)
    }
    result = {
        "benchmark": "teacher targets",
        "command": " ".join(["python benchmarks/bench_targets.py", *(sys.argv[1:] if argv is None else argv)]),
        "machine": machine(),
        "load_average_before": load_before,
        "load_average_after": loadavg(),
        "codecs": {compact.DENSE_CODEC: {"default_tau": compact.DEFAULT_TAUS[compact.DENSE_CODEC], "compression": "zstd",
                                         "zstd_level": compact.DENSE_LEVEL, "zstd_level_noisy": compact.DENSE_LEVEL_NOISY},
                   compact.TOPSET_CODEC: {"default_tau": compact.DEFAULT_TAUS[compact.TOPSET_CODEC],
                                          "compression": "zlib", "zlib_level": compact.DEFAULT_LEVEL}},
        "seed_format": "np.savez_compressed float16, voxel + BEV file (real teacher: its logits, as dumped)",
        "soft_tau": SOFT_TAU,
        "cases": cases,
        "summary_default_taus": summary,
        # None: no Occ3D-grid case in this (partial) run.
        "all_occ3d_grid_cases_meet_both_targets_cpu": {
            codec: all(s[codec]["meets_both_targets_cpu"] for s in occ3d) if occ3d else None
            for codec in CODECS for occ3d in [[s for name, s in summary.items() if "@200x200" in name]]},
        "error_within_bound_all_cases": all(x["meets"]["error<=bound"] for c in cases for x in c["codecs"].values()),
    }
    atomic_write_json(args.out, result)
    print(json.dumps(result))
    print()
    print(f"{'frame':<24}{'teacher':>9}{'codec':>11}{'tau':>8}{'(a) MB':>8}{'kB':>8}{'ratio':>7}"
          f"{'cpu ms':>8}{'wall':>7}{'reused':>8}{'(a) ms':>8}{'max err':>9}{'bound':>8}{'KL mean':>9}")
    for c in cases:
        for codec, x in c["codecs"].items():
            d = x["decode_ms"]
            print(f"{c['frame']:<24}{c['teacher'][:8]:>9}{codec:>11}{x['tau'] * 255:>5.0f}/255"
                  f"{c['seed_bytes_per_frame'] / 1e6:>6.2f}{x['bytes_per_frame'] / 1e3:>8.0f}{x['ratio_vs_seed']:>7.1f}"
                  f"{d['cpu']:>8.1f}{d['wall']:>7.1f}{d['cpu_reused_buffers']:>8.1f}{c['seed_decode_ms']['wall']:>8.0f}"
                  f"{x['voxel_error_vs_reference']['max_abs']:>9.4f}{x['error_bound']:>8.4f}"
                  f"{x['voxel_error_vs_reference']['kl_mean']:>9.1e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
