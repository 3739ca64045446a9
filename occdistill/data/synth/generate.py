"""``generate``: build a synthetic dataset on disk, resumably.

Resume rule: every file is written atomically, and a frame whose files all exist is skipped, so
re-running an interrupted command with the same arguments finishes the job; generation is
deterministic per (seed, scene, frame), so skipped and regenerated frames are identical. The info
pickles / split lists are rebuilt from scratch on every run (cheap: no rendering). Re-running
into a directory that holds a dataset made with a different config is an error unless ``force``
is set, which regenerates every frame (files of frames that are no longer part of the dataset
are left alone and are not listed).
"""

from __future__ import annotations

import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from functools import lru_cache
from multiprocessing import get_all_start_methods, get_context
from pathlib import Path
from typing import Sequence, Union

import numpy as np
from tqdm import tqdm

from occdistill.config import dump_config, load_config, save_config
from occdistill.data.synth.config import PRESETS, RoomConfig, StreetConfig
from occdistill.data.synth.room_frame import render_room_frame
from occdistill.data.synth.scene_room import build_room_scene
from occdistill.data.synth.scene_street import build_street_scene, frame_token, primitives_in_ego
from occdistill.data.synth.street_frame import detection_boxes, render_street_frame, street_calib
from occdistill.data.synth.writer_occ3d import street_info, street_metadata, street_paths, write_infos, write_street_frame
from occdistill.data.synth.writer_occscannet import room_paths, write_room_frame, write_split_list
from occdistill.errors import OccDistillError

SynthConfig = Union[StreetConfig, RoomConfig]


@dataclass(frozen=True)
class SynthResult:
    """What :func:`generate` wrote. ``splits`` maps split name to the info pickle (street) or the
    split list (room); ``frame_files`` lists one file per frame (street: labels.npz, room: the
    frame pickle), in scene then frame order."""

    preset: str
    out: Path
    config_path: Path
    splits: dict[str, Path]
    frame_files: tuple[Path, ...]
    scenes: int
    frames_per_scene: int
    generated: int
    skipped: int
    seconds: float


def resolve_config(
    preset: str,
    scenes: int | None = None,
    frames: int | None = None,
    seed: int | None = None,
    overrides: Sequence[str] = (),
) -> SynthConfig:
    """The preset's config with ``key=value`` overrides, then explicit scenes/frames/seed."""
    if preset not in PRESETS:
        raise OccDistillError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    explicit = [f"{k}={v}" for k, v in (("scenes", scenes), ("frames", frames), ("seed", seed)) if v is not None]
    return load_config(PRESETS[preset], None, [*overrides, *explicit])


def split_scenes(num_scenes: int, val_scenes: int) -> dict[str, list[int]]:
    """The last ``val_scenes`` scenes are val; with too few scenes every scene is in both splits;
    with ``val_scenes = 0`` there is no val split."""
    everything = list(range(num_scenes))
    if val_scenes == 0:
        return {"train": everything}
    if num_scenes <= val_scenes:
        return {"train": everything, "val": everything}
    return {"train": everything[: num_scenes - val_scenes], "val": everything[num_scenes - val_scenes :]}


@lru_cache(maxsize=2)
def _street_scene(cfg: StreetConfig, index: int):
    return build_street_scene(cfg, index)


@lru_cache(maxsize=2)
def _room_scene(cfg: RoomConfig, index: int):
    return build_room_scene(cfg, index)


def _frame_files(cfg: SynthConfig, scene_index: int, frame: int) -> list[str]:
    if isinstance(cfg, StreetConfig):
        scene = _street_scene(cfg, scene_index)
        return street_paths(scene, frame_token(scene, frame), street_calib(cfg, scene, frame)).all()
    return room_paths(_room_scene(cfg, scene_index).name, frame).all()


def _make_frame(cfg: SynthConfig, root: str, scene_index: int, frame: int) -> None:
    """Render and write one frame (runs in a worker process when workers > 1)."""
    root_path = Path(root)
    if isinstance(cfg, StreetConfig):
        scene = _street_scene(cfg, scene_index)
        data = render_street_frame(cfg, scene, frame)
        paths = street_paths(scene, frame_token(scene, frame), data.calib)
        write_street_frame(root_path, paths, data, cfg.render.jpeg_quality)
    else:
        scene = _room_scene(cfg, scene_index)
        write_room_frame(root_path, scene.name, frame, render_room_frame(cfg, scene, frame), cfg.render.jpeg_quality)


def _check_out(out: Path, cfg: SynthConfig, force: bool) -> Path:
    if out.exists() and not out.is_dir():
        raise OccDistillError(f"--out {out} exists and is not a directory")
    cfg_path = out / "config.yaml"
    if cfg_path.is_file() and not force and cfg_path.read_text() != dump_config(cfg):
        raise OccDistillError(
            f"{out} holds a dataset generated with a different config ({cfg_path}); "
            "use a new --out, the same arguments to resume, or --force to regenerate"
        )
    out.mkdir(parents=True, exist_ok=True)
    return save_config(cfg, cfg_path)


def generate(
    preset: str,
    out: str | Path,
    scenes: int | None = None,
    frames: int | None = None,
    seed: int | None = None,
    overrides: Sequence[str] = (),
    *,
    force: bool = False,
    workers: int = 1,
    progress: bool = True,
) -> SynthResult:
    """Generate (or finish) the ``preset`` dataset ("street" or "room") under ``out``.

    ``scenes``/``frames``/``seed`` override the config (default 2 x 6 street frames, 1 x 4 room
    frames, seed 0); ``overrides`` are ``key=value`` config overrides (e.g. ``rig.width=640``).
    ``workers`` > 1 renders frames in that many processes.
    """
    start = time.perf_counter()
    cfg = resolve_config(preset, scenes, frames, seed, overrides)
    if workers < 1:
        raise OccDistillError(f"workers must be >= 1, got {workers}")
    root = Path(out)
    cfg_path = _check_out(root, cfg, force)

    todo, skipped = [], 0
    for s in range(cfg.scenes):
        for f in range(cfg.frames):
            if not force and all((root / p).is_file() for p in _frame_files(cfg, s, f)):
                skipped += 1
            else:
                todo.append((s, f))
    bar = tqdm(total=cfg.scenes * cfg.frames, desc=f"synth {preset}", unit="frame", disable=not progress, initial=skipped)
    try:
        if workers == 1 or len(todo) <= 1:
            for s, f in todo:
                _make_frame(cfg, str(root), s, f)
                bar.update(1)
        else:
            # fork where the platform has it: children only run numpy, and unlike spawn it works
            # from scripts without a __main__ guard.
            method = "fork" if "fork" in get_all_start_methods() else "spawn"
            with ProcessPoolExecutor(max_workers=workers, mp_context=get_context(method)) as pool:
                for fut in as_completed([pool.submit(_make_frame, cfg, str(root), s, f) for s, f in todo]):
                    fut.result()
                    bar.update(1)
    finally:
        bar.close()

    splits = split_scenes(cfg.scenes, cfg.split.val_scenes)
    if isinstance(cfg, StreetConfig):
        split_files, frame_files = _street_infos(cfg, root, splits)
    else:
        split_files, frame_files = _room_lists(cfg, root, splits)
    return SynthResult(preset, root, cfg_path, split_files, tuple(frame_files), cfg.scenes, cfg.frames,
                       len(todo), skipped, time.perf_counter() - start)


def _street_infos(cfg: StreetConfig, root: Path, splits: dict[str, list[int]]) -> tuple[dict[str, Path], list[Path]]:
    grid = cfg.grid.voxel_grid()
    per_scene: dict[int, list[dict]] = {}
    frame_files = []
    for s in range(cfg.scenes):
        scene = _street_scene(cfg, s)
        tokens = [frame_token(scene, f) for f in range(cfg.frames)]
        infos = []
        for f in range(cfg.frames):
            calib = street_calib(cfg, scene, f)
            paths = street_paths(scene, tokens[f], calib)
            view = primitives_in_ego(scene, calib.timestamp, cfg.render.far + 5.0)
            points = np.fromfile(root / paths.lidar, dtype=np.float32).reshape(-1, 5)
            infos.append(street_info(scene, f, tokens[f], tokens[f - 1] if f else "", tokens[f + 1] if f + 1 < cfg.frames else "",
                                     calib, paths, detection_boxes(scene, calib, view.movers), points))
            frame_files.append(root / paths.labels)
        per_scene[s] = infos
    written = {}
    for split, scene_ids in splits.items():
        infos = [info for s in scene_ids for info in per_scene[s]]
        written[split] = write_infos(root, split, infos, street_metadata(grid, cfg.rig.cameras, split))
    return written, frame_files


def _room_lists(cfg: RoomConfig, root: Path, splits: dict[str, list[int]]) -> tuple[dict[str, Path], list[Path]]:
    names = {s: _room_scene(cfg, s).name for s in range(cfg.scenes)}
    frame_files = [root / room_paths(names[s], f).pickle for s in range(cfg.scenes) for f in range(cfg.frames)]
    written = {}
    for split, scene_ids in splits.items():
        written[split] = write_split_list(root, split, [room_paths(names[s], f).pickle for s in scene_ids for f in range(cfg.frames)])
    return written, frame_files
