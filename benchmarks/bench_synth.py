"""Benchmark: time to generate street frames at the default CPU size (``occdistill synth``).

    .venv/bin/python benchmarks/bench_synth.py [--scenes 5] [--frames 20] [--workers 1] [--out-json PATH]

Renders scenes x frames street frames (100 by default) one by one through the same code path as
``occdistill synth`` (render + write every file), then lets ``generate`` rebuild the info
pickles over the finished directory (every frame is then skipped, so this times the info step).
Reports per-frame median and p90, the total, and frames/s; prints one JSON line and a short
table, and writes the JSON to benchmarks/results/synth.json. Timings on a shared machine are
noisy: the load average at start is recorded with the result.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from occdistill.data.synth.generate import _make_frame, generate, resolve_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenes", type=int, default=5)
    parser.add_argument("--frames", type=int, default=20, help="frames per scene")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=1, help="> 1: time generate() end to end with that many processes")
    parser.add_argument("--out-json", default=str(Path(__file__).parent / "results" / "synth.json"))
    args = parser.parse_args(argv)

    cfg = resolve_config("street", args.scenes, args.frames, args.seed)
    load = os.getloadavg()
    per_frame: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        if args.workers == 1:
            for s in range(cfg.scenes):
                for f in range(cfg.frames):
                    t0 = time.perf_counter()
                    _make_frame(cfg, tmp, s, f)
                    per_frame.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            result = generate("street", tmp, args.scenes, args.frames, args.seed, progress=False)
            info_seconds = time.perf_counter() - t0
        else:
            result = generate("street", tmp, args.scenes, args.frames, args.seed, workers=args.workers, progress=False)
            info_seconds = float("nan")
        total = time.perf_counter() - start
        disk = sum(p.stat().st_size for p in Path(tmp).rglob("*") if p.is_file())
    n = cfg.scenes * cfg.frames
    report = {
        "benchmark": "synth_street",
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "config": {"scenes": cfg.scenes, "frames": cfg.frames, "seed": cfg.seed, "grid_shape": list(cfg.grid.voxel_grid().shape),
                   "cameras": len(cfg.rig.cameras), "image": [cfg.rig.width, cfg.rig.height],
                   "lidar": [cfg.lidar.beams, cfg.lidar.azimuths], "workers": args.workers},
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "python": platform.python_version(), "numpy": np.__version__,
                    "loadavg_at_start": [round(x, 2) for x in load]},
        "frames": n,
        "total_seconds": round(total, 2),
        "frames_per_second": round(n / total, 3),
        "median_frame_seconds": round(float(np.median(per_frame)), 3) if per_frame else None,
        "p90_frame_seconds": round(float(np.percentile(per_frame, 90)), 3) if per_frame else None,
        "info_seconds": round(info_seconds, 2),
        "disk_mb": round(disk / 1e6, 1),
        "under_2_minutes": total < 120.0,
        "generated_in_final_pass": result.generated,
    }
    print(json.dumps(report))
    print(f"{'frames':>8} {'total s':>8} {'frames/s':>9} {'median s':>9} {'p90 s':>7} {'info s':>7} {'MB':>7}")
    print(f"{n:>8} {report['total_seconds']:>8} {report['frames_per_second']:>9} {str(report['median_frame_seconds']):>9} "
          f"{str(report['p90_frame_seconds']):>7} {report['info_seconds']:>7} {report['disk_mb']:>7}")
    out = Path(args.out_json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
