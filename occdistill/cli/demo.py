"""``occdistill demo``: the main job on the built-in synthetic world.

It generates a street (Occ3D-nuScenes layout) and a room (Occ-ScanNet layout) dataset, reads them
back through the real-format readers, measures projection consistency with and without
augmentation, draws the visual checks, trains and evaluates the dense student, profiles it, exports
it (ONNX parity, engines side by side, a navigation costmap), trains the dense teacher, dumps and
checks its targets, trains the distilled student and compares the three, and trains the sparse-query
student on the room; see occdistill.pipeline.demo.
"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="outputs/demo", help="report folder (default outputs/demo)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="DemoConfig overrides, e.g. street_scenes=3")


def run(args: argparse.Namespace) -> int:
    import os
    from pathlib import Path

    # Before torch loads its OpenMP runtime: busy-waiting worker threads make the latency tables
    # many times slower on a loaded machine (as in `occdistill bench --side-by-side`).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

    from occdistill.config import load_config
    from occdistill.pipeline.demo import DemoConfig, run_demo

    cfg = load_config(DemoConfig, None, args.overrides)
    report = run_demo(cfg, Path(args.out))
    print(f"report: {report}")
    return 0
