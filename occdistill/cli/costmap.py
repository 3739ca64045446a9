"""``occdistill costmap``: 3D semantic occupancy -> 2D navigation layers in ROS formats.

    occdistill costmap --labels ROOT/gts/SCENE/TOKEN/labels.npz --grid-from INFOS.pkl --out DIR
    occdistill costmap --pred PRED/*.npz --prob-key probs --out DIR --mcap DIR/costmaps.mcap band_max=1.5
    occdistill costmap --format occscannet --labels ROOT/gathered_data/scene0000_00/00000.pkl --out DIR

Per input ``<name>`` (the token folder of a ``labels.npz``, ``<scene>_<frame>`` of an Occ-ScanNet
pickle, else the file stem): ``<name>.yaml/.pgm`` (map_server, trinary occupancy),
``<name>_risk.yaml/.pgm`` (map_server raw: pixel = risk cost 0..100), ``<name>.png`` (picture),
``<name>_occupancy_grid.json`` and ``<name>_risk_occupancy_grid.json`` (nav_msgs/OccupancyGrid
fields). Once per run: ``costmap_config.yaml`` (resolved settings), ``costmap.json`` (summary:
cell counts, ground estimate, files) and with ``--mcap`` an MCAP file of ROS 2 OccupancyGrid
messages (topics ``<prefix>/occupancy`` and ``<prefix>/risk``, one message per input each).

Observation: ``--labels`` use ``mask_camera`` where the file has it (and Occ-ScanNet's 255 =
unknown); ``--pred`` counts every voxel as observed unless ``--mask-key`` names a mask, and
``--prob-key`` adds the model's free probability (X, Y, Z) or class probabilities (X, Y, Z, K) to
leave uncertain cells unknown. Settings: ``--preset`` (default from ``--format``), ``--config
YAML`` and ``key=value`` overrides of :class:`occdistill.deploy.costmap.CostmapConfig`.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

HELP = "occupancy -> 2D costmap (map_server PGM+YAML, OccupancyGrid, PNG, MCAP) and a dynamic risk layer"

_OVERRIDE = re.compile(r"^[A-Za-z_][\w.]*=")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--labels", nargs="+", type=Path, metavar="PATH",
                     help="GT files: Occ3D labels.npz, Occ-ScanNet .pkl or .npz (observed = mask_camera where present)")
    src.add_argument("--pred", nargs="+", type=Path, metavar="PATH",
                     help="prediction .npz files (every voxel observed unless --mask-key)")
    parser.add_argument("--format", choices=("occ3d", "occscannet"), default="occ3d", help="class table and grid (default occ3d)")
    parser.add_argument("--key", help="semantics array key (default: semantics in .npz, target_1_4 in .pkl)")
    parser.add_argument("--mask-key", help="observation mask key (default: mask_camera for --labels when present, none for --pred)")
    parser.add_argument("--no-mask", action="store_true", help="treat every voxel as observed, even for --labels")
    parser.add_argument("--prob-key", help="--pred: array of free probability (X,Y,Z) or class probabilities (X,Y,Z,K)")
    parser.add_argument("--grid-from", type=Path, metavar="INFOS.pkl",
                        help="take the grid from an info file's metadata (synthetic worlds); real nuScenes infos mean the Occ3D grid")
    parser.add_argument("--range", nargs=6, type=float, metavar=("XMIN", "YMIN", "ZMIN", "XMAX", "YMAX", "ZMAX"),
                        help="grid range in metres (default: Occ3D's, or Occ-ScanNet's bottom-centred grid)")
    parser.add_argument("--voxel-size", type=float, help="voxel size in metres (default 0.4 occ3d, 0.08 occscannet)")
    parser.add_argument("--preset", choices=("outdoor", "indoor"), help="settings preset (default: outdoor for occ3d, indoor for occscannet)")
    parser.add_argument("--config", type=Path, help="YAML of costmap settings on top of the preset")
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--name", help="output name (one input only)")
    parser.add_argument("--mcap", type=Path, help="also write ROS 2 OccupancyGrid messages to this MCAP file (needs occdistill[ros])")
    parser.add_argument("--topic-prefix", default="/occdistill/costmap", help="MCAP topic prefix (default /occdistill/costmap)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="costmap setting overrides, e.g. band_max=1.5")


def _split_overrides(paths: list[Path], overrides: list[str]) -> tuple[list[Path], list[str]]:
    """``--labels a.npz band_max=1`` puts the override into the path list: move it back."""
    keep, extra = [], []
    for p in paths:
        (extra if _OVERRIDE.match(str(p)) and not p.exists() else keep).append(p)
    return keep, [str(e) for e in extra] + list(overrides)


def _input_name(path: Path, fmt: str) -> str:
    if path.name == "labels.npz" and path.parent.name:
        return path.parent.name
    if fmt == "occscannet" and path.parent.name:
        return f"{path.parent.name}_{path.stem}"
    return path.stem


def _read_arrays(path: Path) -> dict:
    """All arrays of a .npz, or the dict of an Occ-ScanNet pickle."""
    import pickle
    import zipfile

    import numpy as np

    from occdistill.errors import DataError

    if not path.is_file():
        raise DataError(f"{path}: file not found")
    if path.suffix == ".pkl":
        try:
            with open(path, "rb") as f:
                obj = pickle.load(f)
        except Exception as exc:  # unpickling errors come in many types
            raise DataError(f"{path}: cannot unpickle ({type(exc).__name__}: {exc})") from exc
        if not isinstance(obj, dict):
            raise DataError(f"{path}: expected a dict of arrays, got {type(obj).__name__}")
        return obj
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(f"{path}: not a readable .npz ({exc})") from exc


def _load_input(path: Path, args: argparse.Namespace, table) -> dict:
    """semantics, observed, free_prob and how the observation was decided, for one file."""
    import numpy as np

    from occdistill.errors import DataError

    arrays = _read_arrays(path)
    key = args.key or ("target_1_4" if path.suffix == ".pkl" else "semantics")
    probs = None
    if args.prob_key:
        if args.prob_key not in arrays:
            raise DataError(f"{path}: no key {args.prob_key!r} (--prob-key; keys: {sorted(arrays)})")
        probs = np.asarray(arrays[args.prob_key], dtype=np.float64)
    if key in arrays:
        sem = np.asarray(arrays[key])
    elif probs is not None and probs.ndim == 4:
        sem = probs.argmax(axis=-1)
    else:
        raise DataError(f"{path}: no key {key!r} (--key; keys: {sorted(arrays)})")
    if sem.ndim != 3:
        raise DataError(f"{path}: {key!r} must be (X, Y, Z), got shape {sem.shape}")
    if not np.issubdtype(sem.dtype, np.integer):
        raise DataError(f"{path}: {key!r} must hold integer class ids, got dtype {sem.dtype}")

    free_prob = None
    if probs is not None:
        if probs.ndim == 4:
            if probs.shape[:3] != sem.shape or probs.shape[3] != table.num_classes:
                raise DataError(f"{path}: {args.prob_key!r} has shape {probs.shape}, expected {sem.shape + (table.num_classes,)}")
            if probs.min() < 0 or np.abs(probs.sum(-1) - 1).max() > 1e-2:
                raise DataError(f"{path}: {args.prob_key!r} must hold class probabilities summing to 1 (softmax), not logits")
            free_prob = probs[..., table.free_index]
        elif probs.shape == sem.shape:
            free_prob = probs
        else:
            raise DataError(f"{path}: {args.prob_key!r} has shape {probs.shape}, expected {sem.shape} or {sem.shape + (table.num_classes,)}")

    mask_key = None if args.no_mask else (args.mask_key or ("mask_camera" if args.labels else None))
    observed, observation = None, "every voxel"
    if mask_key is not None:
        if mask_key in arrays:
            observed = np.asarray(arrays[mask_key])
            if observed.shape != sem.shape:
                raise DataError(f"{path}: {mask_key!r} has shape {observed.shape}, semantics {sem.shape}")
            observation = mask_key
        elif args.mask_key:
            raise DataError(f"{path}: no key {mask_key!r} (--mask-key; keys: {sorted(arrays)})")
    if table.ignore_index is not None:
        observation += f", not {table.ignore_index}"
    if free_prob is not None:
        observation += f", confident {args.prob_key}"
    return {"semantics": sem, "observed": observed, "free_prob": free_prob, "observation": observation, "arrays": arrays}


def _resolve_grid(args: argparse.Namespace, shape: tuple[int, ...], path: Path, infos):
    from occdistill.data.infos import grid_from_metadata
    from occdistill.data.occscannet import scannet_grid
    from occdistill.errors import DataError, OccDistillError
    from occdistill.geometry.grid import OCC3D_GRID, VoxelGrid

    default_size = 0.4 if args.format == "occ3d" else 0.08
    if infos is not None:
        grid = grid_from_metadata(infos.metadata, str(infos.path))
        if grid is None:
            if args.format != "occ3d":
                raise OccDistillError(f"{infos.path}: declares no grid (occ_range); give --range/--voxel-size")
            grid = OCC3D_GRID
    elif args.range is not None:
        try:
            grid = VoxelGrid(range=tuple(args.range), voxel_size=(args.voxel_size or default_size,) * 3)
        except ValueError as exc:
            raise OccDistillError(f"--range/--voxel-size: {exc}") from exc
    elif args.format == "occ3d":
        grid = OCC3D_GRID if args.voxel_size in (None, 0.4) else None
        if grid is None:
            raise OccDistillError("--voxel-size needs --range for occ3d")
    else:
        grid = scannet_grid(tuple(shape), args.voxel_size or default_size)
    if tuple(grid.shape) != tuple(shape):
        raise DataError(f"{path}: semantics has shape {tuple(shape)}, the grid {grid.range} @ {grid.voxel_size[0]} m has {grid.shape} (--grid-from / --range)")
    return grid


def _marker(args: argparse.Namespace, arrays: dict, grid) -> tuple[float, ...] | None:
    """The picture's triangle: the ego origin facing +x (occ3d), the camera and its viewing
    direction (Occ-ScanNet pickle with ``cam_pose`` and ``voxel_origin``)."""
    import numpy as np

    if args.format == "occ3d":
        return (0.0, 0.0)
    if "cam_pose" in arrays and "voxel_origin" in arrays:
        pose = np.asarray(arrays["cam_pose"], dtype=np.float64)
        cam, axis = pose[:3, 3], pose[:3, 2]  # camera-to-world: position, optical axis
        origin = np.asarray(arrays["voxel_origin"], dtype=np.float64).reshape(3)
        centre = origin + np.asarray([grid.shape[0] / 2, grid.shape[1] / 2, 0]) * grid.size
        return (float(cam[0] - centre[0]), float(cam[1] - centre[1]), float(np.arctan2(axis[1], axis[0])))
    return None


def run(args: argparse.Namespace) -> int:
    import sys

    from tqdm import tqdm

    from occdistill.config import save_config, to_dict
    from occdistill.data.infos import load_infos
    from occdistill.deploy.costmap import compute_costmap, costmap_messages, load_costmap_config, write_costmap
    from occdistill.errors import OccDistillError
    from occdistill.io import atomic_write_json

    paths = args.labels if args.labels is not None else args.pred
    paths, overrides = _split_overrides(list(paths), list(args.overrides))
    if not paths:
        raise OccDistillError("no input files (--labels/--pred)")
    if args.name and len(paths) > 1:
        raise OccDistillError("--name works with one input only")
    if args.grid_from is not None and args.range is not None:
        raise OccDistillError("give the grid either by --grid-from or by --range, not both")
    if args.prob_key and args.labels is not None:
        raise OccDistillError("--prob-key applies to --pred")
    preset = args.preset or ("outdoor" if args.format == "occ3d" else "indoor")
    cfg = load_costmap_config(preset, args.config, overrides)
    expected = {"occ3d": "occ3d-nuscenes", "occscannet": "occ-scannet"}[args.format]
    if cfg.classes != expected:
        raise OccDistillError(f"settings use the {cfg.classes} class table but --format {args.format} means {expected} (--preset)")
    infos = load_infos(args.grid_from) if args.grid_from is not None else None
    stamps = {f.token: int(f.timestamp) * 1000 for f in infos.frames} if infos is not None else {}  # us -> ns

    names: list[str] = []
    for p in paths:
        n = args.name or _input_name(p, args.format)
        names.append(n if n not in names else f"{n}_{len(names)}")

    args.out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, args.out / "costmap_config.yaml")
    summary = {"preset": preset, "config": to_dict(cfg), "inputs": []}
    messages = []
    bar = tqdm(list(zip(paths, names)), desc="costmap", unit="frame", file=sys.stderr, disable=args.quiet or len(paths) == 1)
    for index, (path, name) in enumerate(bar):
        data = _load_input(path, args, cfg.table)
        grid = _resolve_grid(args, data["semantics"].shape, path, infos)
        try:
            costmap = compute_costmap(data["semantics"], grid, cfg, data["observed"], data["free_prob"])
        except OccDistillError as exc:
            raise OccDistillError(f"{path}: {exc}") from exc
        stamp = stamps.get(name, index * 1_000_000_000)
        files = write_costmap(costmap, args.out, name, cfg, stamp, _marker(args, data["arrays"], grid))
        msgs = costmap_messages(costmap, stamp)
        messages += [(f"{args.topic_prefix}/occupancy", msgs["occupancy"]), (f"{args.topic_prefix}/risk", msgs["risk"])]
        summary["inputs"].append({
            "name": name,
            "source": str(path),
            "observed": data["observation"],
            "grid": {"range": list(grid.range), "voxel_size": list(grid.voxel_size)},
            "width": costmap.width,
            "height": costmap.height,
            "resolution": costmap.resolution,
            "origin": list(costmap.origin),
            "frame_id": costmap.frame_id,
            "stamp_ns": stamp,
            "cells": costmap.counts(),
            "stats": costmap.stats,
            "files": files,
        })
        c = costmap.counts()
        print(f"{name}: {c['occupied']} occupied, {c['free']} free, {c['unknown']} unknown, {c['risk_cells']} risk cells "
              f"(ground {costmap.ground_height:+.2f} m, {costmap.ground_source}) -> {files['map_yaml']}")
    if args.mcap is not None:
        from occdistill.deploy.ros_io import write_occupancy_grid_mcap

        count = write_occupancy_grid_mcap(args.mcap, messages)
        summary["mcap"] = {"path": str(args.mcap), "messages": count}
        print(f"wrote {count} OccupancyGrid messages to {args.mcap}")
    atomic_write_json(args.out / "costmap.json", summary)
    print(f"wrote {args.out / 'costmap.json'}")
    return 0
