"""Entry point of the ``occdistill`` console script.

Each command lives in its own module ``occdistill.cli.<name>`` exposing ``HELP`` (one line),
``add_arguments(parser)`` and ``run(args) -> int``. Command modules import the heavy layers (torch,
datasets) inside ``run`` so that building the parser and ``--help`` stay fast. User errors (:class:`OccDistillError`) print one line
and exit with status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from occdistill import __version__
from occdistill.errors import OccDistillError

# command name -> (module, one-line help). A closed table: adding a command is one line here.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("occdistill.cli.demo", "run the main job on the built-in synthetic world"),
    "synth": ("occdistill.cli.synth", "generate a synthetic dataset in the real on-disk formats"),
    "viz": ("occdistill.cli.viz", "draw GT voxels over camera images and a BEV label map, per sample"),
    "score": ("occdistill.cli.score", "evaluate saved prediction files against GT files"),
    "train": ("occdistill.cli.train", "train a model from a config (resumable; multi-GPU through torchrun)"),
    "eval": ("occdistill.cli.eval", "evaluate a checkpoint on a dataset: mIoU, IoU, RayIoU, per class"),
    "bench": ("occdistill.cli.bench",
              "latency (median, p90), FPS, peak memory, FLOPs and per-stage profile (dense, sparse, gaussian)"),
    "export": ("occdistill.cli.export", "ONNX export (camera rig baked in) + onnxruntime parity, FP16/INT8 variants"),
    "dump-teacher": ("occdistill.cli.dump_teacher", "run a teacher over a split and write targets + manifest"),
    "check-dump": ("occdistill.cli.check_dump", "validate a teacher dump against a dataset"),
    "costmap": ("occdistill.cli.costmap", "occupancy -> 2D costmap (map_server PGM+YAML, OccupancyGrid, MCAP) and dynamic risk layer"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="occdistill", description="Camera-based 3D semantic occupancy, distilled.")
    parser.add_argument("--version", action="version", version=f"occdistill {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse ends a command's trailing key=value list at the first option: overrides written
    # after `--out DIR` come back unparsed. They are still overrides (they follow them in argv).
    if extra and isinstance(getattr(args, "overrides", None), list) and all(
        "=" in e and not e.startswith("-") for e in extra
    ):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except OccDistillError as exc:
        print(f"occdistill {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"occdistill {args.command}: interrupted", file=sys.stderr)
        return 130
