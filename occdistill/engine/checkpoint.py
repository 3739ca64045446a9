"""Checkpoints: one directory per saved step, written atomically and verified when read.

Layout of ``RUN/checkpoints/step_000120/``:

- ``model.safetensors``: the trained weights (parameters and buffers), safetensors format;
- ``ema.safetensors``: the averaged weights, when EMA is on;
- ``state.pt``: everything else a resume needs -- optimiser, gradient scaler, RNG states (python,
  numpy, torch CPU and CUDA), step, non-finite step count, EMA update count, world size; read
  with ``torch.load(weights_only=True)``, so a checkpoint cannot run code;
- ``config.yaml``: the resolved training config (evaluation needs nothing else);
- ``meta.json``: format, version, step and the SHA-256 of every file above.

The directory is assembled under a temporary name and renamed into place, and
``checkpoints/latest.json`` (itself written atomically) is updated last: a crash at any moment
leaves the previous checkpoint intact and ``latest.json`` pointing at a complete one.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from occdistill.config import dump_config, load_config
from occdistill.engine.config import TrainConfig
from occdistill.errors import OccDistillError
from occdistill.io import atomic_write_bytes, atomic_write_json

FORMAT = "occdistill-checkpoint"
VERSION = 1
WEIGHTS, EMA_WEIGHTS, STATE = "model.safetensors", "ema.safetensors", "state.pt"
CONFIG, META = "config.yaml", "meta.json"
LATEST = "latest.json"


@dataclass
class Checkpoint:
    path: Path
    step: int
    config: TrainConfig
    weights: dict[str, torch.Tensor]
    ema_weights: dict[str, torch.Tensor] | None
    state: dict[str, Any] | None  # None unless loaded with ``with_state``


def rng_state() -> dict[str, Any]:
    """Every global RNG, in a form ``torch.load(weights_only=True)`` accepts."""
    np_state = np.random.get_state(legacy=False)
    return {
        "python": random.getstate(),
        "numpy": {
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np_state = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": "MT19937",
            "state": {"key": np_state["key"].numpy().astype(np.uint32), "pos": np_state["pos"]},
            "has_gauss": np_state["has_gauss"],
            "gauss": np_state["gauss"],
        }
    )
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _weights_bytes(module: nn.Module, step: int, kind: str) -> bytes:
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in module.state_dict().items()}
    return save_safetensors(tensors, metadata={"format": FORMAT, "step": str(step), "model_kind": kind})


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable (POSIX; other systems have no directory handles)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(
    root: Path,
    step: int,
    *,
    model: nn.Module,
    ema: nn.Module | None,
    config: TrainConfig,
    state: dict[str, Any],
    keep: int = 2,
) -> Path:
    """Write ``root/step_{step:06d}`` atomically, point ``root/latest.json`` at it and keep the
    ``keep`` most recent checkpoints. ``model``/``ema`` are unwrapped modules (no DDP)."""
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:06d}"
    state_buf = _torch_bytes(state)
    files = {WEIGHTS: _weights_bytes(model, step, config.model.kind), STATE: state_buf,
             CONFIG: dump_config(config).encode("utf-8")}
    if ema is not None:
        files[EMA_WEIGHTS] = _weights_bytes(ema, step, config.model.kind)
    meta = {"format": FORMAT, "version": VERSION, "step": step, "sha256": {k: _sha256(v) for k, v in files.items()}}
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=root))
    try:
        for fname, data in files.items():
            atomic_write_bytes(tmp / fname, data)
        atomic_write_json(tmp / META, meta)
        final = root / name
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(root)
    atomic_write_json(root / LATEST, {"step": step, "path": name})
    _prune(root, keep, final)
    return final


def _torch_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _prune(root: Path, keep: int, current: Path) -> None:
    saved = sorted(p for p in root.glob("step_*") if p.is_dir())
    for old in saved[:-keep]:
        if old != current:
            shutil.rmtree(old, ignore_errors=True)


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory as given, or the latest checkpoint of a run directory (or of its
    ``checkpoints`` folder)."""
    path = Path(path)
    if not path.exists():
        raise OccDistillError(f"{path}: checkpoint not found")
    if (path / META).is_file():
        return path
    for root in (path / "checkpoints", path):
        latest = root / LATEST
        if latest.is_file():
            try:
                target = root / json.loads(latest.read_text())["path"]
            except (ValueError, KeyError, TypeError) as exc:
                raise OccDistillError(f"{latest}: unreadable ({exc})") from exc
            if not (target / META).is_file():
                raise OccDistillError(f"{latest}: points at {target}, which is not a complete checkpoint")
            return target
    raise OccDistillError(
        f"{path}: not a checkpoint directory (no {META}) nor a run directory with checkpoints/{LATEST}"
    )


def _read_verified(ckpt: Path, fname: str, meta: dict) -> bytes:
    f = ckpt / fname
    if not f.is_file():
        raise OccDistillError(f"{f}: missing (incomplete checkpoint)")
    data = f.read_bytes()
    if _sha256(data) != meta["sha256"][fname]:
        raise OccDistillError(f"{f}: checksum mismatch; the file is corrupt or belongs to another checkpoint")
    return data


def _read_weights(ckpt: Path, fname: str, meta: dict) -> dict[str, torch.Tensor]:
    data = _read_verified(ckpt, fname, meta)
    try:
        return load_safetensors(data)
    except (SafetensorError, ValueError) as exc:
        raise OccDistillError(f"{ckpt / fname}: not a valid safetensors file ({exc})") from exc


def load_checkpoint(path: str | Path, *, with_state: bool = False) -> Checkpoint:
    """Read and verify a checkpoint (a checkpoint directory or a run directory: see
    :func:`find_checkpoint`). ``with_state`` also reads the optimiser/RNG state for resuming."""
    ckpt = find_checkpoint(path)
    try:
        meta = json.loads((ckpt / META).read_text())
    except ValueError as exc:
        raise OccDistillError(f"{ckpt / META}: not valid JSON ({exc})") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or "sha256" not in meta:
        raise OccDistillError(f"{ckpt / META}: not an occdistill checkpoint")
    if meta.get("version") != VERSION:
        raise OccDistillError(
            f"{ckpt / META}: checkpoint format version {meta.get('version')}, this code reads {VERSION}"
        )
    _read_verified(ckpt, CONFIG, meta)
    config = load_config(TrainConfig, ckpt / CONFIG)
    state = None
    if with_state:
        try:
            state = torch.load(io.BytesIO(_read_verified(ckpt, STATE, meta)), weights_only=True)
        except (RuntimeError, EOFError, ValueError) as exc:
            raise OccDistillError(f"{ckpt / STATE}: unreadable ({exc})") from exc
    return Checkpoint(
        path=ckpt,
        step=int(meta["step"]),
        config=config,
        weights=_read_weights(ckpt, WEIGHTS, meta),
        ema_weights=_read_weights(ckpt, EMA_WEIGHTS, meta) if EMA_WEIGHTS in meta["sha256"] else None,
        state=state,
    )


def load_weights(module: nn.Module, weights: dict[str, torch.Tensor], where: Path) -> None:
    """``load_state_dict(strict=True)`` with a one-line error naming the checkpoint."""
    try:
        result = module.load_state_dict(weights, strict=False)
    except RuntimeError as exc:  # shape mismatches
        first = str(exc).strip().splitlines()
        detail = " ".join(first[1:3]).strip() or first[0]
        raise OccDistillError(f"{where}: weights do not fit the model ({detail})") from exc
    if result.missing_keys or result.unexpected_keys:
        raise OccDistillError(
            f"{where}: weights do not fit the model ({len(result.missing_keys)} missing, e.g. "
            f"{result.missing_keys[:3]}; {len(result.unexpected_keys)} unexpected, e.g. {result.unexpected_keys[:3]})"
        )


@dataclass
class TrainedModel:
    """A model rebuilt from a checkpoint's config with its weights loaded (CPU, eval mode)."""

    model: nn.Module
    checkpoint: Checkpoint
    ema: bool  # the EMA weights were loaded (else the raw weights)


def load_trained_model(path: str | Path, weights: str = "ema") -> TrainedModel:
    """The model of a checkpoint or run directory: its EMA weights when ``weights == "ema"`` and
    it has them, else the raw weights."""
    from occdistill.models.build import build_model

    if weights not in ("ema", "model"):
        raise ValueError(f"weights must be 'ema' or 'model', got {weights!r}")
    ckpt = load_checkpoint(path)
    model = build_model(ckpt.config.model)
    use_ema = weights == "ema" and ckpt.ema_weights is not None
    load_weights(model, ckpt.ema_weights if use_ema else ckpt.weights, ckpt.path)
    return TrainedModel(model.eval(), ckpt, use_ema)
