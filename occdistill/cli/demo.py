"""``occdistill demo``: the main job on the built-in synthetic world.

Today it generates a street (Occ3D-nuScenes layout) and a room (Occ-ScanNet layout) dataset, reads
them back through the real-format readers, measures projection consistency with and without
augmentation, and draws the visual checks; later stages join as they land.
"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="outputs/demo", help="report folder (default outputs/demo)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="DemoConfig overrides, e.g. street_scenes=3")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from occdistill.config import load_config
    from occdistill.pipeline.demo import DemoConfig, run_demo

    cfg = load_config(DemoConfig, None, args.overrides)
    report = run_demo(cfg, Path(args.out))
    print(f"report: {report}")
    return 0
