"""``occdistill viz``: one PNG per sample with GT voxels drawn over every camera and a BEV map."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--format", choices=("occ3d", "occscannet"), default="occ3d", help="dataset layout")
    p.add_argument("--data-root", required=True, help="dataset root")
    p.add_argument("--infos", help="info pickle (occ3d), absolute or relative to the data root")
    p.add_argument("--out", required=True, help="folder for the PNGs")
    p.add_argument("--limit", type=int, default=None, help="draw only the first N samples")
    p.add_argument("--augment", action="store_true", help="apply strong training augmentation first (checks it)")
    p.add_argument("--seed", type=int, default=0, help="augmentation seed")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from occdistill.data.build import classes_for, open_dataset
    from occdistill.viz.sample_sheet import write_sample_pngs

    ds = open_dataset(args.format, args.data_root, args.infos, check_aug=args.augment, seed=args.seed)
    paths = write_sample_pngs(ds, classes_for(args.format), Path(args.out), args.limit)
    print(f"wrote {len(paths)} PNGs to {args.out}")
    return 0
