"""``occdistill dump-teacher``: run a teacher over a split and write its targets + manifest.

A trained checkpoint (its config names the dataset and the image pipeline)::

    occdistill dump-teacher --checkpoint runs/teacher --split train --out teacher_dump [--formats compact,seed]
        [--bev-feature] [--procs 4 | --shard 0/4] [--device cuda]

An external teacher's saved outputs (GaussianFormer-2: (K, X*Y*Z) or (X, Y, Z, K) probabilities,
free last) and a ``<file> <token>`` frame list::

    occdistill dump-teacher --external gf2_out/ --frame-list frames.txt --teacher-checkpoint gf2.pth \\
        --format occ3d --data data/nuscenes --infos infos_val.pkl --split-name val --out teacher_dump

Deterministic (eval mode, no augmentation, per-sample seeds from the key), resumable (completed
samples are skipped, files are written atomically), parallel (``--procs N`` starts N processes,
one GPU each when there are GPUs; ``--shard i/n`` runs one share; under torchrun each rank takes
its share). The manifest ``OUT/manifest_<split>.json`` appears when every sample is done.
Format spec: docs/teacher_targets.md.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

HELP = "run a teacher over a split (or convert GaussianFormer-2 outputs) and write targets + manifest"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    src = parser.add_argument_group("teacher (one of)")
    src.add_argument("--checkpoint", type=Path, help="teacher checkpoint directory, or a run directory (its latest)")
    src.add_argument("--external", type=Path, metavar="DIR", help="directory of an external teacher's per-frame arrays")
    parser.add_argument("--out", required=True, type=Path, help="dump directory")
    parser.add_argument("--formats", default="compact",
                        help="comma-separated: compact (ours, default) and/or seed (fp16 npz of seed 000)")
    parser.add_argument("--split-name", help="split name in the dump (default: train/val, or the split file's stem)")
    parser.add_argument("--codec", choices=("dense-u8", "topset-u8"), default="dense-u8",
                        help="compact probability codec: dense-u8 (default: decodes fast for every teacher) or "
                             "topset-u8 (smaller for very confident teachers, slow for soft ones)")
    parser.add_argument("--tau", type=float,
                        help="compact codec error bound parameter (default: 1/255 for dense-u8, 2/255 for topset-u8)")
    parser.add_argument("--z-band", metavar="LO:HI", help="BEV collapse over z-layers LO..HI-1 only (default: all)")
    parser.add_argument("--seed", type=int, default=0, help="base of the per-sample seeds (default 0)")
    parser.add_argument("--shard", metavar="I/N", help="dump the I-th of N shares of the split (0-based)")
    parser.add_argument("--procs", type=int, default=1, help="start N processes, each dumping one share (default 1)")
    parser.add_argument("--workers", type=int, default=2, help="data loader processes per dumping process (default 2)")
    parser.add_argument("--overwrite", action="store_true", help="redo samples already dumped (also: another teacher)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    ck = parser.add_argument_group("--checkpoint")
    ck.add_argument("--split", default="train",
                    help="train or val (the config's splits), or an info pickle / split list (default train)")
    ck.add_argument("--weights", choices=("ema", "model"), default="ema",
                    help="the EMA weights (default, when the checkpoint has them) or the raw weights")
    ck.add_argument("--bev-feature", action="store_true", help="also store the teacher's BEV feature (C, X, Y)")
    ck.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    ex = parser.add_argument_group("--external")
    ex.add_argument("--frame-list", type=Path, help="text file of '<file> <token>' lines")
    ex.add_argument("--teacher-checkpoint", help="the external teacher's checkpoint file (hashed) or its SHA-256")
    ex.add_argument("--teacher-name", default="gaussianformer-2", help="teacher name in the manifest")
    ex.add_argument("--value-kind", choices=("prob", "logit"), default="prob",
                    help="what the arrays hold (GaussianFormer-2: prob, default; GaussianWorld ce_input: logit)")
    ex.add_argument("--array-key", help="array key inside .npz inputs (default: their only array)")
    data = parser.add_argument_group("dataset")
    data.add_argument("--data", type=Path, help="dataset root (--checkpoint: default the config's data.root)")
    data.add_argument("--format", choices=("occ3d", "occscannet"), default="occ3d",
                      help="--external: dataset format (default occ3d)")
    data.add_argument("--infos", type=Path,
                      help="--external: occ3d info pickle of the split; occscannet split list (default all frames)")


def _shard(text: str | None):
    from occdistill.errors import OccDistillError

    if text is None:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        return (int(os.environ.get("RANK", "0")), world) if world > 1 else (0, 1)
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise OccDistillError(f"--shard {text!r}: expected I/N, e.g. 0/4") from None
    if not (n >= 1 and 0 <= i < n):
        raise OccDistillError(f"--shard {text}: need 0 <= I < N")
    return i, n


def _options(args: argparse.Namespace, split: str, shard, bev_channels: int | None):
    from occdistill.errors import OccDistillError
    from occdistill.targets.dump import DumpOptions

    band = None
    if args.z_band:
        try:
            lo, hi = (int(v) for v in args.z_band.split(":"))
        except ValueError:
            raise OccDistillError(f"--z-band {args.z_band!r}: expected LO:HI, e.g. 1:8") from None
        band = (lo, hi)
    if args.workers < 0:
        raise OccDistillError("--workers must be >= 0")
    return DumpOptions(
        split=split, formats=tuple(f.strip() for f in args.formats.split(",") if f.strip()),
        bev_feature_channels=bev_channels, codec=args.codec, tau=args.tau, z_band=band,
        seed=args.seed, shard=shard, workers=args.workers, overwrite=args.overwrite,
        progress=not args.no_progress,
    )


def _split_name(args: argparse.Namespace, stored: str | None) -> str:
    if args.split_name:
        return args.split_name
    if stored in ("train", "val"):
        return stored
    return Path(stored).stem if stored else "all"


def _stored_split(args: argparse.Namespace) -> str | None:
    if args.checkpoint is not None:
        return args.split
    return None if args.infos is None else str(args.infos)


def _dump_checkpoint(args: argparse.Namespace, shard):
    """One share of a checkpoint teacher's dump."""
    from occdistill.targets.checkpoint_dump import dump_checkpoint

    options = _options(args, _split_name(args, _stored_split(args)), shard, None)
    return dump_checkpoint(args.checkpoint, args.split, args.out, options, bev_feature=args.bev_feature,
                           weights=args.weights, device=args.device, data_root=args.data)


def _dump_external(args: argparse.Namespace, shard):
    from occdistill.cli.check_dump import open_eval_dataset
    from occdistill.errors import OccDistillError
    from occdistill.io import file_sha256
    from occdistill.targets.external import convert_external
    from occdistill.targets.manifest import TeacherInfo

    if args.frame_list is None or args.teacher_checkpoint is None or args.data is None:
        raise OccDistillError("--external needs --frame-list, --teacher-checkpoint and --data (and --infos for occ3d)")
    ck = args.teacher_checkpoint
    if Path(ck).is_file():
        sha = file_sha256(Path(ck))
    elif len(ck) == 64 and all(c in "0123456789abcdef" for c in ck.lower()):
        sha = ck.lower()
    else:
        raise OccDistillError(f"--teacher-checkpoint {ck!r}: neither a file nor a SHA-256 (64 hex digits)")
    teacher = TeacherInfo(name=args.teacher_name, checkpoint=ck, checkpoint_sha256=sha, value_kind=args.value_kind)
    dataset = open_eval_dataset(args.format, args.data, args.infos)
    options = _options(args, _split_name(args, _stored_split(args)), shard, None)
    return convert_external(args.frame_list, args.external, dataset, args.out, teacher, options,
                            array_key=args.array_key)


def _run_share(args: argparse.Namespace, shard):
    if args.checkpoint is not None:
        return _dump_checkpoint(args, shard)
    return _dump_external(args, shard)


def _child(args: argparse.Namespace, i: int, n: int) -> None:
    """Entry point of a ``--procs`` child: one share, one GPU (round robin) when there are GPUs."""
    import sys

    import torch

    from occdistill.errors import OccDistillError

    if args.checkpoint is not None and args.device in ("auto", "cuda") and torch.cuda.is_available():
        args.device = f"cuda:{i % torch.cuda.device_count()}"
    args.no_progress = args.no_progress or i > 0  # one progress bar: shard 0's
    try:
        _run_share(args, (i, n))
    except OccDistillError as exc:
        print(f"occdistill dump-teacher (share {i}/{n}): error: {exc}", file=sys.stderr)
        sys.exit(2)


def run(args: argparse.Namespace) -> int:
    from multiprocessing import get_context

    from occdistill.errors import OccDistillError
    from occdistill.targets.manifest import Manifest

    if (args.checkpoint is None) == (args.external is None):
        raise OccDistillError("give exactly one teacher: --checkpoint CKPT or --external DIR")
    if args.procs < 1:
        raise OccDistillError("--procs must be >= 1")
    if args.procs > 1:
        if args.shard is not None:
            raise OccDistillError("--procs and --shard exclude each other")
        # spawn: CUDA cannot be used in forked children.
        ctx = get_context("spawn")
        procs = [ctx.Process(target=_child, args=(args, i, args.procs)) for i in range(args.procs)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        failed = [i for i, p in enumerate(procs) if p.exitcode != 0]
        if failed:
            raise OccDistillError(f"dump processes for shares {failed} of {args.procs} failed (see above); "
                                  "re-run the same command to finish")
        manifest = Manifest.path_for(args.out, _split_name(args, _stored_split(args)))
        if not manifest.is_file():
            raise OccDistillError(f"{manifest}: not written; re-run the same command to finish")
        print(f"dump complete: {manifest}")
        return 0
    result = _run_share(args, _shard(args.shard))
    print(f"{args.out}: {result.written} sample(s) written, {result.skipped} already done")
    if result.manifest is not None:
        print(f"dump complete: {result.manifest}")
    else:
        print(f"{result.remaining} sample(s) of the split still to do (other shares, or re-run to finish)")
    return 0
