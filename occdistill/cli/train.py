"""``occdistill train``: train a model from a config, resumably.

    occdistill train street-tiny data.root=data/street optim.epochs=4 --out runs/street-tiny
    occdistill train --resume --out runs/street-tiny             # continue after an interruption
    torchrun --nproc_per_node 4 -m occdistill train flashocc-m0  # multi-GPU (multi-node: torchrun flags)

CONFIG is a built-in config name (see ``--list``) or a YAML path; ``key=value`` overrides follow.
The run directory receives the resolved ``config.yaml``, ``log.jsonl``, ``curves.png``,
``checkpoints/`` (safetensors weights + resume state), ``eval/`` and ``metrics.json``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "train a model from a config (resumable; multi-GPU through torchrun)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="built-in config name (e.g. street-tiny) or YAML path; "
                        "optional with --resume (the run's own config is used)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. optim.lr=1.0e-3")
    parser.add_argument("--out", type=Path, help="run directory (default: runs/<config name>)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    parser.add_argument("--list", action="store_true", help="list the built-in configs and exit")


def run(args: argparse.Namespace) -> int:
    import os

    from occdistill.config import load_config
    from occdistill.engine.config import TrainConfig, builtin_configs, load_train_config
    from occdistill.engine.loop import train
    from occdistill.errors import OccDistillError

    if args.list:
        print("\n".join(builtin_configs()))
        return 0
    # argparse cannot tell a config name from an override when the config is omitted.
    if args.config is not None and "=" in args.config:
        args.overrides, args.config = [args.config, *args.overrides], None
    if args.config is None:
        if not args.resume:
            raise OccDistillError(
                "give a CONFIG (a built-in name such as street-tiny, or a YAML path), or --resume --out RUN"
            )
        if args.out is None:
            raise OccDistillError("--resume without a CONFIG needs --out RUN (the run directory to continue)")
        saved = args.out / "config.yaml"
        if not saved.is_file():
            raise OccDistillError(f"{saved}: not found; is {args.out} a run directory?")
        cfg = load_config(TrainConfig, saved, args.overrides)
    else:
        cfg = load_train_config(args.config, args.overrides)
    out = args.out if args.out is not None else Path("runs") / Path(args.config).stem
    result = train(cfg, out, resume=args.resume)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun rank 0 reports
        return 0
    if result.metrics is not None:
        from occdistill.metrics import format_table

        print(format_table(result.metrics))
    print(f"run: {out}  (step {result.step}, {result.seconds:.0f} s of training, {result.bad_steps} skipped steps)")
    return 0
