"""``occdistill score``: devkit-style evaluation of saved prediction files against GT files.

Occ3D-nuScenes::

    occdistill score --format occ3d --data-root ROOT --infos INFOS.pkl --pred PRED_DIR --json OUT.json

GT ``ROOT/gts/<scene>/<token>/labels.npz`` (found through each info's ``occ_path`` tail), predictions
``PRED_DIR/<token>.npz`` with key ``semantics`` (uint8, X, Y, Z). Reports the devkit mIoU with
``mask_camera``, geometry IoU and RayIoU at 1, 2, 4 m (origins from the infos' poses); with
``--ranges 10,20`` also mIoU, IoU and per-class IoU in rings of distance from the ego (``by_range``).

Occ-ScanNet::

    occdistill score --format occscannet --data-root ROOT --pred PRED_DIR --json OUT.json

GT ``ROOT/<scene>/<frame>.pkl`` (key ``target_1_4``), predictions ``PRED_DIR/<scene>/<frame>.npz``
(key ``semantics``, 60x60x36, same axis order as ``target_1_4``). ISO protocol by default.

A prediction that is missing, unreadable, of the wrong shape or dtype, or with labels outside the
class table is an error naming the sample; with ``--invalid-as-free`` it is scored as an all-free
(all-empty) prediction instead and listed under ``invalid_predictions`` in the JSON.
"""

from __future__ import annotations

import argparse
import pickle
import sys
import zipfile
from pathlib import Path
from typing import Any

HELP = "evaluate saved prediction files against GT files"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--format", required=True, choices=("occ3d", "occscannet"), help="dataset format")
    parser.add_argument("--data-root", required=True, type=Path, help="dataset root holding the GT files")
    parser.add_argument("--infos", type=Path, help="info pickle listing the samples (required for occ3d)")
    parser.add_argument("--pred", required=True, type=Path, help="directory of prediction .npz files")
    parser.add_argument("--json", type=Path, help="write the metrics (percent) to this JSON file")
    parser.add_argument("--pred-key", default="semantics", help="array key in the prediction files (default: semantics)")
    parser.add_argument(
        "--invalid-as-free",
        action="store_true",
        help="score a missing or invalid prediction as all-free and list it in the JSON, instead of failing",
    )
    parser.add_argument("--no-rayiou", action="store_true", help="occ3d: skip RayIoU (voxel metrics only)")
    parser.add_argument("--ranges", metavar="D1,D2,...",
                        help="occ3d: also score rings of horizontal distance from the ego, split at these metres "
                        "(e.g. 10,20: 0-10, 10-20, >= 20 m); JSON key by_range")
    parser.add_argument(
        "--protocol",
        choices=("iso", "monoscene"),
        default="iso",
        help="occscannet: 'iso' counts unknown (255) voxels as empty (ISO), 'monoscene' excludes them",
    )
    parser.add_argument("--device", default="cpu", help="torch device for the metric computation (default: cpu)")


def run(args: argparse.Namespace) -> int:
    from occdistill.errors import OccDistillError
    from occdistill.io import atomic_write_json
    from occdistill.metrics.report import format_table

    if not args.pred.is_dir():
        raise OccDistillError(f"{args.pred}: prediction directory not found")
    if not args.data_root.is_dir():
        raise OccDistillError(f"{args.data_root}: data root not found")
    if args.ranges and args.format != "occ3d":
        raise OccDistillError("--ranges scores rings around the ego of an Occ3D grid; it needs --format occ3d")
    if args.format == "occ3d":
        if args.infos is None:
            raise OccDistillError("--format occ3d needs --infos INFOS.pkl")
        report = _score_occ3d(args)
    else:
        report = _score_occscannet(args)
    print(format_table(report))
    if args.json is not None:
        atomic_write_json(args.json, report)
        print(f"wrote {args.json}")
    return 0


def load_prediction(
    path: Path, key: str, shape: tuple[int, ...], num_classes: int
) -> tuple[Any, str | None]:
    """Read and check one prediction file. Returns (array, None) or (None, problem)."""
    import numpy as np

    if not path.is_file():
        return None, f"prediction file {path} not found"
    try:
        with np.load(path, allow_pickle=False) as npz:
            if key not in npz.files:
                return None, f"prediction {path} has no key {key!r} (keys: {sorted(npz.files)})"
            arr = npz[key]
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        return None, f"prediction {path} is not a readable .npz ({exc})"
    if tuple(arr.shape) != tuple(shape):
        return None, f"prediction {path} has shape {tuple(arr.shape)}, expected {tuple(shape)}"
    if not np.issubdtype(arr.dtype, np.integer):
        return None, f"prediction {path} must hold integer class ids, got dtype {arr.dtype}"
    if arr.size:
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi >= num_classes:
            return None, f"prediction {path} has labels in [{lo}, {hi}], outside 0..{num_classes - 1}"
    return arr, None


def _progress(items: list, desc: str):
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="sample", file=sys.stderr, dynamic_ncols=True)


def _score_occ3d(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np

    from occdistill.data.classes import OCC3D_NUSCENES
    from occdistill.data.infos import grid_from_metadata, load_infos, resolve_data_path
    from occdistill.data.labels import load_occ3d_labels
    from occdistill.errors import DataError, OccDistillError
    from occdistill.geometry.grid import OCC3D_GRID
    from occdistill.metrics.by_range import RangeAccumulator, range_rings
    from occdistill.metrics.occ3d import Occ3DAccumulator
    from occdistill.metrics.rayiou import RayIoUAccumulator, lidar_origins
    from occdistill.metrics.report import by_range_report, occ3d_report

    classes = OCC3D_NUSCENES
    infos = load_infos(args.infos)
    # Real infos declare no grid (Occ3D's is implied); the synthetic world's declare theirs.
    grid = grid_from_metadata(infos.metadata, str(infos.path)) or OCC3D_GRID
    voxel_acc = Occ3DAccumulator(classes=classes, device=args.device)
    range_acc = None
    if args.ranges:
        try:
            rings = range_rings([float(v) for v in args.ranges.split(",")])
        except ValueError as exc:
            raise OccDistillError(f"--ranges {args.ranges}: {exc}") from None
        range_acc = RangeAccumulator(grid, rings, classes, device=args.device)
    ray_acc = None if args.no_rayiou else RayIoUAccumulator(classes=classes, grid=grid, device=args.device)
    scenes: dict[str, list] = {}
    invalid: list[dict[str, str]] = []
    for frame in _progress(list(infos.frames), "score occ3d"):
        if not frame.occ_path:
            raise DataError(f"sample {frame.token}: the info has no occ_path, so its labels cannot be found")
        gt_path = resolve_data_path(args.data_root, frame.occ_path) / "labels.npz"
        labels = load_occ3d_labels(gt_path, shape=grid.shape, classes=classes)
        pred, problem = load_prediction(
            args.pred / f"{frame.token}.npz", args.pred_key, labels.semantics.shape, classes.num_classes
        )
        if problem is not None:
            if not args.invalid_as_free:
                raise DataError(f"sample {frame.token}: {problem} (use --invalid-as-free to score it as all-free)")
            invalid.append({"sample": frame.token, "problem": problem})
            pred = np.full(labels.semantics.shape, classes.free_index, dtype=np.uint8)
        voxel_acc.update(pred, labels.semantics, labels.mask_camera)
        if range_acc is not None:
            range_acc.update(pred, labels.semantics, labels.mask_camera)
        if ray_acc is not None:
            if frame.scene_name not in scenes:
                scenes[frame.scene_name] = infos.scene_frames(frame.scene_name)
            try:
                origins = lidar_origins(scenes[frame.scene_name], frame)
            except ValueError as exc:
                raise DataError(str(exc)) from exc
            ray_acc.update(pred, labels.semantics, origins)
    report = occ3d_report(voxel_acc.compute(), ray_acc.compute() if ray_acc is not None else None, invalid)
    if range_acc is not None:
        report["by_range"] = by_range_report(range_acc.compute())
    return report


def _frame_order(path: Path) -> tuple:
    stem = path.stem
    return (path.parent.name, not stem.isdigit(), int(stem) if stem.isdigit() else 0, stem)


def _score_occscannet(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np

    from occdistill.data.classes import OCC_SCANNET
    from occdistill.errors import DataError
    from occdistill.metrics.occscannet import OccScanNetAccumulator
    from occdistill.metrics.report import occscannet_report

    classes = OCC_SCANNET
    frames = sorted(args.data_root.glob("*/*.pkl"), key=_frame_order)
    if not frames:
        raise DataError(f"{args.data_root}: no Occ-ScanNet frame pickles (<scene>/<frame>.pkl) found")
    acc = OccScanNetAccumulator(classes=classes, protocol=args.protocol, device=args.device)
    invalid: list[dict[str, str]] = []
    for path in _progress(frames, "score occscannet"):
        name = f"{path.parent.name}/{path.stem}"
        try:
            with open(path, "rb") as f:
                rec = pickle.load(f)
        except Exception as exc:  # unpickling errors come in many types
            raise DataError(f"{path}: cannot unpickle ({type(exc).__name__}: {exc})") from exc
        if not isinstance(rec, dict) or "target_1_4" not in rec:
            keys = sorted(rec) if isinstance(rec, dict) else type(rec).__name__
            raise DataError(f"{path}: no 'target_1_4' label (has {keys})")
        target = np.asarray(rec["target_1_4"])
        if target.ndim != 3 or not np.issubdtype(target.dtype, np.integer):
            raise DataError(f"{path}: target_1_4 must be a 3-D integer array, got {target.dtype} {target.shape}")
        bad = (target < 0) | ((target >= classes.num_classes) & (target != classes.ignore_index))
        if bad.any():
            raise DataError(
                f"{path}: target_1_4 has labels {np.unique(target[bad])[:5].tolist()} outside "
                f"0..{classes.num_classes - 1} and {classes.ignore_index} (unknown)"
            )
        pred, problem = load_prediction(
            args.pred / path.parent.name / f"{path.stem}.npz", args.pred_key, target.shape, classes.num_classes
        )
        if problem is not None:
            if not args.invalid_as_free:
                raise DataError(f"sample {name}: {problem} (use --invalid-as-free to score it as all-empty)")
            invalid.append({"sample": name, "problem": problem})
            pred = np.full(target.shape, classes.free_index, dtype=np.uint8)
        acc.update(pred, target)
    return occscannet_report(acc.compute(), invalid)
