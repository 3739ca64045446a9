"""Dump a trained teacher checkpoint's targets: what ``occdistill dump-teacher --checkpoint`` and
the main job run. The checkpoint's config names the dataset and the image pipeline; the teacher
runs in eval mode under no_grad; :func:`occdistill.targets.dump.dump_targets` does the writing
(resumable, sharded, atomic)."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch

from occdistill.data.sample import collate
from occdistill.engine.checkpoint import EMA_WEIGHTS, META, WEIGHTS, load_checkpoint, load_weights
from occdistill.engine.data import model_grid, open_split
from occdistill.engine.distributed import DistContext, resolve_device
from occdistill.engine.objective import forward_batch
from occdistill.engine.precision import autocast
from occdistill.errors import OccDistillError
from occdistill.models.build import build_model
from occdistill.targets.dump import DumpOptions, DumpResult, TeacherPrediction, dump_targets
from occdistill.targets.manifest import TeacherInfo


def dump_checkpoint(
    checkpoint: str | Path,
    split: str,
    out: str | Path,
    options: DumpOptions,
    *,
    bev_feature: bool = False,
    weights: str = "ema",
    device: str = "auto",
    data_root: str | Path | None = None,
) -> DumpResult:
    """One share (``options.shard``) of the dump of ``checkpoint`` (a checkpoint directory, or a run
    directory: its latest) over ``split`` ("train" / "val": the config's splits, else an info pickle
    or split list) into ``out``. ``bev_feature``: also store the teacher's BEV feature (its channels
    are read from a probe forward; ``options.bev_feature_channels`` is set from them). ``weights``:
    "ema" (when the checkpoint has them) or "model". ``data_root``: replaces the config's data.root."""
    ckpt = load_checkpoint(checkpoint)
    cfg = ckpt.config
    grid = model_grid(cfg.model)
    if split in ("train", "val"):
        dataset = open_split(cfg.data, split, augment=False, grid=grid, root=data_root)
    else:
        dataset = open_split(cfg.data, "val", augment=False, grid=grid, root=data_root, split_path=split)
    model = build_model(cfg.model)
    use_ema = weights == "ema" and ckpt.ema_weights is not None
    load_weights(model, ckpt.ema_weights if use_ema else ckpt.weights, ckpt.path)
    dev = resolve_device(device, DistContext(local_rank=int(os.environ.get("LOCAL_RANK", "0"))))
    model.eval().to(dev)

    @torch.no_grad()
    def forward(sample):
        with autocast(dev, cfg.runtime.amp):
            return forward_batch(model, collate([sample]).to(dev))

    # One probe forward tells what the model emits (probabilities, e.g. a Gaussian teacher, or
    # logits) and the BEV feature's channels, whatever the model kind.
    probe = forward(dataset[0])
    probs_out = getattr(probe, "voxel_probs", None) is not None
    bev_channels = None
    if bev_feature:
        feature = getattr(probe, "bev_feature", None)
        if feature is None:
            raise OccDistillError(f"{ckpt.path}: model kind {cfg.model.kind!r} has no BEV feature to store")
        bev_channels = int(feature.shape[1])
    meta = json.loads((ckpt.path / META).read_text())
    teacher = TeacherInfo(
        name=f"{cfg.model.kind} step {ckpt.step} ({'ema' if use_ema else 'model'} weights)",
        checkpoint=str(ckpt.path),
        checkpoint_sha256=meta["sha256"][EMA_WEIGHTS if use_ema else WEIGHTS],
        value_kind="prob" if probs_out else "logit",
    )

    def predict(sample):
        out = forward(sample)
        voxel = (out.voxel_probs if probs_out else out.voxel_logits)[0].float()
        if probs_out:  # reduced-precision (amp) probabilities: restore exact sums
            voxel = voxel.clamp_min(0) / voxel.clamp_min(0).sum(dim=-1, keepdim=True)
        feature = out.bev_feature[0].float() if bev_channels is not None else None
        return TeacherPrediction(voxel=voxel, value_kind=teacher.value_kind, bev_feature=feature)

    options = dataclasses.replace(options, bev_feature_channels=bev_channels)
    return dump_targets(predict, dataset, out, teacher, options)
