"""``occdistill synth``: generate a synthetic dataset in the real on-disk formats.

    occdistill synth --preset street --scenes 2 --frames 6 --out DIR [key=value ...]
    occdistill synth --preset room --scenes 1 --frames 4 --out DIR

Writes ``DIR/config.yaml`` (the resolved config) and prints one JSON line with what was written.
Re-running the same command into the same DIR resumes: complete frames are skipped.
"""

from __future__ import annotations

import argparse
import json

HELP = "generate a synthetic dataset in the real on-disk formats"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", required=True, choices=["street", "room"],
                        help="street: Occ3D-nuScenes layout; room: Occ-ScanNet layout")
    parser.add_argument("--out", required=True, help="output directory (created if missing)")
    parser.add_argument("--scenes", type=int, default=None, help="number of scenes (default: street 2, room 1)")
    parser.add_argument("--frames", type=int, default=None, help="keyframes per scene (default: street 6, room 4)")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default 0); output is deterministic per seed")
    parser.add_argument("--workers", type=int, default=1, help="render frames in this many processes")
    parser.add_argument("--force", action="store_true", help="regenerate every frame, even into a directory made with another config")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, e.g. rig.width=640 grid.range=[-40,-40,-1,40,40,5.4]")


def run(args: argparse.Namespace) -> int:
    from occdistill.data.synth import generate

    result = generate(
        args.preset, args.out, scenes=args.scenes, frames=args.frames, seed=args.seed, overrides=args.overrides,
        force=args.force, workers=args.workers, progress=not args.quiet,
    )
    print(json.dumps({
        "preset": result.preset,
        "out": str(result.out),
        "config": str(result.config_path),
        "splits": {k: str(v) for k, v in result.splits.items()},
        "scenes": result.scenes,
        "frames_per_scene": result.frames_per_scene,
        "generated": result.generated,
        "skipped": result.skipped,
        "seconds": round(result.seconds, 2),
    }))
    return 0
