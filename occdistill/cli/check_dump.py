"""``occdistill check-dump``: validate a teacher dump against a dataset.

    occdistill check-dump DUMP --data ROOT --infos INFOS.pkl [--split NAME] [--json OUT.json]
    occdistill check-dump DUMP --format occscannet --data ROOT [--infos SPLIT_LIST.txt]

Finds missing samples, wrong shapes, NaN/inf, probabilities that do not sum to 1, targets computed
for other labels (GT hash mismatch: misalignment) and a wrong grid or class table. Prints one line
per problem (``<key>: <kind>: <message>``) and exits 1 when there is any, 0 otherwise.
"""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "validate a teacher dump against a dataset (missing, shapes, NaN, sums, GT hash, grid, classes)"


def open_eval_dataset(fmt: str, data: Path, infos: Path | None):
    """An evaluation-mode dataset: occ3d from an info pickle; occscannet from a split list or,
    without one, every frame under the root. Also used by ``dump-teacher --external``."""
    from occdistill.data.build import classes_for, open_dataset
    from occdistill.data.occscannet import OccScanNetDataset

    if fmt == "occscannet" and infos is not None:
        return OccScanNetDataset(data, split_file=infos, classes=classes_for("occscannet"))
    return open_dataset(fmt, data, infos)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dump", type=Path, help="dump directory (holds manifest_<split>.json)")
    parser.add_argument("--format", choices=("occ3d", "occscannet"), default="occ3d",
                        help="dataset format (default occ3d)")
    parser.add_argument("--data", required=True, type=Path, help="dataset root")
    parser.add_argument("--infos", type=Path, help="occ3d: the info pickle of the split (required); "
                                                   "occscannet: a split list (default: all frames)")
    parser.add_argument("--split", help="split name of the manifest (default: the directory's only one)")
    parser.add_argument("--json", type=Path, help="also write the problems to this JSON file")
    parser.add_argument("--workers", type=int, default=0, help="processes checking samples in parallel (default 0)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from occdistill.errors import OccDistillError
    from occdistill.io import atomic_write_json
    from occdistill.targets.check import check_dump
    from occdistill.targets.pairing import sample_keys

    if args.workers < 0:
        raise OccDistillError("--workers must be >= 0")
    dataset = open_eval_dataset(args.format, args.data, args.infos)
    problems = check_dump(args.dump, dataset, args.split, workers=args.workers, progress=not args.no_progress)
    for p in problems:
        print(p)
    n = len(sample_keys(dataset))
    bad = len({p.key for p in problems})
    summary = (f"{args.dump}: OK, {n} samples checked" if not problems else
               f"{args.dump}: {len(problems)} problem(s) in {bad} sample(s) of {n}")
    print(summary)
    if args.json is not None:
        atomic_write_json(args.json, {"dump": str(args.dump), "split": args.split, "samples": n, "ok": not problems,
                                      "problems": [p.to_json() for p in problems]})
    return 1 if problems else 0
