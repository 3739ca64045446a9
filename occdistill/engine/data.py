"""Datasets and loaders of a training config (the data section is read here and nowhere else).

Training order comes from :class:`ResumableSampler` and augmentation draws from
(seed, epoch, index) inside the datasets, so the sample stream is the same whatever the number of
loader workers and whether the run was resumed.
"""

from __future__ import annotations

from pathlib import Path
from dataclasses import dataclass
from typing import Iterator, Literal, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset
from torch.utils.data import Dataset as TorchDataset

from occdistill.data.build import Dataset, classes_for
from occdistill.data.labels import load_occ3d_labels
from occdistill.data.occ3d import Occ3DDataset
from occdistill.data.occscannet import OccScanNetDataset, scannet_grid, scannet_grid_params
from occdistill.data.sample import Batch, Sample, collate
from occdistill.engine.config import DataConfig
from occdistill.engine.distributed import DistContext, ResumableSampler
from occdistill.engine.sequence import group_scenes, scene_names_of, shard_scenes
from occdistill.errors import DataError
from occdistill.geometry.grid import VoxelGrid
from occdistill.models.build import ModelConfig
from occdistill.targets.loader import DistillSample, TargetBatch, collate_distill


def scene_shard(dataset: Dataset, ctx: DistContext) -> list[int]:
    """Evaluation sharding by whole scenes (balanced by frames), each in time order: counts summed
    over ranks are exactly the split's, and no scene is cut between ranks."""
    scenes = group_scenes(scene_names_of(dataset))  # each scene's indices, in time order
    return [i for pos in shard_scenes(scenes, ctx.world_size)[ctx.rank] for i in scenes[pos]]

Split = Literal["train", "val"]


def _split_path(root: Path, stored: str) -> Path:
    path = Path(stored)
    return path if path.is_absolute() or path.exists() else root / path


def model_grid(cfg: ModelConfig) -> VoxelGrid:
    """The voxel grid a model config predicts (``model.<kind>.grid``): the grid its data must have."""
    return cfg.selected.grid.voxel_grid()


def open_split(cfg: DataConfig, split: Split, *, augment: bool, grid: VoxelGrid | None = None, seed: int = 0,
               root: str | Path | None = None, split_path: str | Path | None = None,
               depth_input: bool = False) -> Dataset:
    """The ``split`` dataset of ``cfg``; ``root``/``split_path`` replace the configured ones (eval CLI).

    ``grid``: the model's voxel grid (``model.grid``, or :func:`model_grid` of its config), which the
    labels must fill. Occ-ScanNet frames store no voxel size, so their grid is this one (None: the
    Occ-ScanNet default, 60x60x36 at 0.08 m), checked against the first frame's label shape here;
    Occ3D info pickles that carry a grid in their metadata must agree with it.

    Depth maps (``data.depth``) are a training target, loaded for the train split only, unless
    ``depth_input``: the model reads them as an input (the sparse student's depth prior), on every split."""
    if depth_input and cfg.depth == "none":
        raise DataError("the model takes a prior depth map as input (model.sparse.depth_prior): set data.depth "
                        "(auto, lidar or rendered)")
    data_root = Path(root if root is not None else cfg.root)
    if not data_root.is_dir():
        raise DataError(f"{data_root}: data root not found (data.root)")
    stored = str(split_path) if split_path is not None else (cfg.train_split if split == "train" else cfg.val_split)
    common = dict(image_aug=cfg.image_aug, bev_aug=cfg.bev_aug, augment=augment, seed=seed)
    depth = cfg.depth if split == "train" or depth_input else "none"
    if cfg.format == "occ3d":
        if not stored:
            raise DataError(f"data.{split}_split: occ3d needs an info pickle")
        return Occ3DDataset(
            data_root, _split_path(data_root, stored), depth=depth, cameras=cfg.cameras or None, grid=grid,
            classes=classes_for("occ3d"), **common,
        )
    source = "the model's grid" if grid is not None else "the default Occ-ScanNet grid (no model grid given)"
    shape, voxel_size = scannet_grid_params(grid if grid is not None else scannet_grid(), source)
    dataset = OccScanNetDataset(
        data_root, split_file=_split_path(data_root, stored) if stored else None, load_depth=depth != "none",
        shape=shape, voxel_size=voxel_size, classes=classes_for("occscannet"), **common,
    )
    labels = dataset.label_shape(0)
    if labels != dataset.grid.shape:
        fmt = lambda s: "x".join(map(str, s))  # noqa: E731
        raise DataError(f"{dataset.paths[0]}: target_1_4 is {fmt(labels)} voxels but {source} is "
                        f"{fmt(dataset.grid.shape)} ({voxel_size} m voxels): set model.<kind>.grid (range, "
                        "voxel_size) to the data's grid")
    return dataset


@dataclass
class FramesSample:
    """A sample and its ``F`` earlier keyframes, newest first (see :class:`WithPreviousFrames`)."""

    current: Sample
    previous: tuple[Sample, ...]


@dataclass
class TrainItem:
    """What one loader step delivers to an objective: the batch, the teacher targets of an offline
    dump (or None) and, for temporal models, the batches of the ``F`` earlier keyframes."""

    batch: Batch
    targets: TargetBatch | None = None
    previous: tuple[Batch, ...] = ()

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "TrainItem":
        return TrainItem(
            self.batch.to(device, non_blocking=non_blocking),
            None if self.targets is None else self.targets.to(device, non_blocking=non_blocking),
            tuple(b.to(device, non_blocking=non_blocking) for b in self.previous),
        )


class WithPreviousFrames(TorchDataset):
    """``dataset[i]`` with its ``frames`` earlier keyframes of the same scene, newest first, each
    loaded with sample i's augmentation draws (so one BEV augmentation holds for all of them:
    the temporal warp assumes it) and without labels or depth, which nothing reads for them. A
    missing earlier frame (scene start) repeats the sample itself, which
    :func:`occdistill.models.dense.training_history` turns into a zero history slot."""

    def __init__(self, dataset: Dataset, frames: int) -> None:
        if frames < 1:
            raise ValueError(f"frames must be >= 1, got {frames}")
        self.dataset, self.frames = dataset, frames
        self.inputs = dataset.inputs_only()

    def __len__(self) -> int:
        return len(self.dataset)

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)
        self.inputs.set_epoch(epoch)  # its own copy of the epoch: the same draws as the sample's

    def __getitem__(self, index: int) -> FramesSample:
        previous = []
        for steps in range(1, self.frames + 1):
            earlier = self.dataset.previous(index, steps)
            previous.append(self.inputs.load(index if earlier is None else earlier, aug_index=index))
        return FramesSample(self.dataset[index], tuple(previous))


def collate_item(items: Sequence[Sample | DistillSample | FramesSample]) -> TrainItem:
    """``DataLoader(collate_fn=collate_item)`` for a split, its :class:`WithTeacherTargets` or its
    :class:`WithPreviousFrames` wrapper."""
    first = items[0]
    if isinstance(first, DistillSample):
        batch, targets = collate_distill(items)
        return TrainItem(batch, targets)
    if isinstance(first, FramesSample):
        previous = tuple(collate([it.previous[f] for it in items]) for f in range(len(first.previous)))
        return TrainItem(collate([it.current for it in items]), previous=previous)
    return TrainItem(collate(items))


def train_loader(dataset: Dataset, sampler: ResumableSampler, cfg: DataConfig, seed: int, epoch: int) -> DataLoader:
    """A loader of :class:`TrainItem` for one epoch (workers copy the dataset at start, so one
    loader per epoch after ``set_epoch``). Its own generator keeps the global torch RNG untouched
    by loader start-up."""
    dataset.set_epoch(epoch)
    return DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        sampler=sampler,
        num_workers=cfg.workers,
        collate_fn=collate_item,
        drop_last=True,
        pin_memory=torch.cuda.is_available(),
        generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch),
        persistent_workers=False,
    )


def eval_loader(dataset: Dataset, ctx: DistContext, batch_size: int, workers: int, frames: int = 0) -> DataLoader:
    """This rank's shard of ``dataset`` as :class:`TrainItem`, whole scenes in time order (the
    flicker metric compares consecutive frames), nothing repeated; ``frames`` earlier keyframes
    per sample for temporal models."""
    source = WithPreviousFrames(dataset, frames) if frames else dataset
    return DataLoader(
        Subset(source, scene_shard(dataset, ctx)),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=collate_item,
        pin_memory=torch.cuda.is_available(),
    )


def iter_labels(dataset: Dataset) -> Iterator[tuple[int, np.ndarray, np.ndarray | None]]:
    """(index, semantics (X, Y, Z) int64, mask_camera (X, Y, Z) bool or None) for every sample of a
    split, without augmentation and without reading any image."""
    for i in range(len(dataset)):
        if isinstance(dataset, Occ3DDataset):
            occ = load_occ3d_labels(dataset.label_path(dataset.frame(i)), dataset.grid.shape, dataset.classes)
            yield i, occ.semantics.astype(np.int64), occ.mask_camera
        else:
            rec = dataset.read_record(i)
            mask = np.asarray(rec["mask_camera"]).astype(bool) if "mask_camera" in rec else None
            yield i, np.asarray(rec["target_1_4"]).astype(np.int64), mask


def label_counts(dataset: Dataset, camera_mask: bool) -> np.ndarray:
    """(K,) int64 voxel count per class over a split's labels, inside ``mask_camera`` when
    ``camera_mask``. Unknown (255) voxels are not counted."""
    num_classes = dataset.classes.num_classes
    counts = np.zeros(num_classes, dtype=np.int64)
    for _, sem, mask in iter_labels(dataset):
        values = sem[mask] if camera_mask and mask is not None else sem.reshape(-1)
        counts += np.bincount(values[values < num_classes], minlength=num_classes)
    return counts
