"""``occdistill eval``: evaluate a checkpoint on a dataset.

    occdistill eval --checkpoint runs/street-tiny --json metrics.json [--save-pred preds/]
    occdistill eval --checkpoint runs/street-tiny/checkpoints/step_000960 --data data/street2 \\
        --split occdistill_infos_val.pkl --json out.json

The checkpoint carries its config: the dataset format, image pipeline and (by default) the data
root and validation split come from it. Occ3D: devkit mIoU with ``mask_camera``, geometry IoU,
RayIoU at 1/2/4 m, per class; Occ-ScanNet: ISO IoU/mIoU. ``--save-pred`` writes
``DIR/<token>.npz`` (key ``semantics``, uint8), the files ``occdistill score`` reads.
"""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "evaluate a checkpoint on a dataset (mIoU, IoU, RayIoU, per class; --json)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, type=Path,
                        help="checkpoint directory, or a run directory (its latest checkpoint)")
    parser.add_argument("--data", type=Path, help="dataset root (default: the checkpoint config's data.root)")
    parser.add_argument("--split", help="info pickle / split list (default: the config's data.val_split)")
    parser.add_argument("--json", type=Path, help="write the metrics report (percent) to this JSON file")
    parser.add_argument("--save-pred", type=Path, metavar="DIR",
                        help="also save predictions in the `occdistill score` format")
    parser.add_argument("--weights", choices=("ema", "model"), default="ema",
                        help="evaluate the EMA weights (default, when the checkpoint has them) or the raw weights")
    parser.add_argument("--no-rayiou", action="store_true", help="skip RayIoU (voxel metrics only)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--workers", type=int, default=2, help="data loader processes (default 2)")
    parser.add_argument("--temporal-filter", type=float, default=0.0, metavar="W",
                        help="score the streaming voxel filter's labels: each frame's log-probabilities blended "
                             "with the previous frame's filtered ones (weight W in [0, 1), warped by ego motion; "
                             "Occ3D data, dense or Gaussian models; default 0 = per-frame argmax)")


def run(args: argparse.Namespace) -> int:
    from occdistill.engine.checkpoint import load_trained_model
    from occdistill.engine.data import open_split
    from occdistill.engine.distributed import DistContext, resolve_device
    from occdistill.engine.evaluate import evaluate
    from occdistill.engine.tasks import takes_depth_input
    from occdistill.errors import OccDistillError
    from occdistill.io import atomic_write_json
    from occdistill.metrics import format_table

    if args.batch_size < 1 or args.workers < 0:
        raise OccDistillError("--batch-size must be >= 1 and --workers >= 0")
    if not 0.0 <= args.temporal_filter < 1.0:
        raise OccDistillError(f"--temporal-filter must be in [0, 1), got {args.temporal_filter}")
    trained = load_trained_model(args.checkpoint, args.weights)
    ckpt, model, use_ema = trained.checkpoint, trained.model, trained.ema
    cfg = ckpt.config
    if args.split is None and not cfg.data.val_split:
        raise OccDistillError(f"{ckpt.path}: the config has no data.val_split; pass --split")
    dataset = open_split(cfg.data, "val", augment=False, grid=model.grid, root=args.data, split_path=args.split,
                         depth_input=takes_depth_input(model))
    device = resolve_device(args.device, DistContext())
    report = evaluate(model.to(device), dataset, device, batch_size=args.batch_size, workers=args.workers,
                      rayiou=not args.no_rayiou, amp=cfg.runtime.amp, save_pred=args.save_pred, progress=True,
                      temporal_filter=args.temporal_filter)
    report = {"checkpoint": str(ckpt.path), "step": ckpt.step, "weights": "ema" if use_ema else "model",
              "temporal_filter": args.temporal_filter, **report}
    print(format_table(report))
    if args.json is not None:
        atomic_write_json(args.json, report)
        print(f"wrote {args.json}")
    if args.save_pred is not None:
        print(f"predictions: {args.save_pred}")
    return 0
