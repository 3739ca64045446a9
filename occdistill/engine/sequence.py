"""Scene-ordered sampling for temporal models and temporal metrics: whole scenes, frames in time
order, optionally the order of the scenes shuffled per epoch, sharded across processes by whole
scenes so that no scene is split between ranks.

Both datasets keep their frames sorted by scene, then time (``InfoSet`` and Occ-ScanNet's frame
numbers), so a scene's frames are its dataset indices in increasing order;
:func:`scene_names_of` reads the scene of every index.

Use (streaming evaluation with ``BEVHistory`` and ``FlickerAccumulator``)::

    sampler = SceneSequenceSampler(scene_names_of(dataset), ctx)
    loader = DataLoader(dataset, batch_size=1, sampler=sampler, collate_fn=collate)

For training with shuffled scenes, ``shuffle=True, seed=...`` and ``set_epoch(epoch, skip)`` as
:class:`occdistill.engine.distributed.ResumableSampler`; with several processes, ``equal_length``
cuts every rank to the shortest rank's count so that all take the same number of steps.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler

from occdistill.data.build import Dataset
from occdistill.data.occ3d import Occ3DDataset
from occdistill.engine.distributed import DistContext


def scene_names_of(dataset: Dataset) -> list[str]:
    """The scene name of every index of an Occ3D-layout or Occ-ScanNet dataset (no file read)."""
    if isinstance(dataset, Occ3DDataset):
        return [f.scene_name for f in dataset.infos.frames]
    return [dataset.scene_name(i) for i in range(len(dataset))]


def group_scenes(scene_names: Sequence[str]) -> list[list[int]]:
    """Per-index scene names -> the indices of each scene, scenes in order of first appearance.

    Each scene must be one contiguous run of indices (the datasets' scene-then-time order);
    a scene in two runs means the frames are not in that order, and a ValueError says where.
    """
    scenes: dict[str, list[int]] = {}
    for i, name in enumerate(scene_names):
        run = scenes.setdefault(name, [])
        if run and run[-1] != i - 1:
            raise ValueError(f"scene {name!r} is not contiguous (index {run[-1]}, then {i}): "
                             "frames must be sorted by scene, then time")
        run.append(i)
    return list(scenes.values())


def shard_scenes(scenes: Sequence[Sequence[int]], world_size: int) -> list[list[int]]:
    """Deal whole scenes to ``world_size`` ranks: each scene, in the given order, goes to the rank
    with the fewest frames so far (lowest rank on ties). Returns each rank's scene positions.

    Greedy by frames rather than round-robin by scenes: scenes differ in length (nuScenes 35-41
    keyframes), and the slowest rank sets the pace."""
    load = [0] * world_size
    shards: list[list[int]] = [[] for _ in range(world_size)]
    for pos, frames in enumerate(scenes):
        rank = min(range(world_size), key=lambda r: (load[r], r))
        shards[rank].append(pos)
        load[rank] += len(frames)
    return shards


class SceneSequenceSampler(Sampler[int]):
    """This rank's frames, scene by scene, in time order.

    Args:
        scene_names: the scene of every dataset index (:func:`scene_names_of`).
        ctx: rank and world size; scenes are dealt by :func:`shard_scenes`.
        shuffle: permute the scenes (not the frames) per epoch with ``seed`` + epoch.
        seed: shuffling seed; the order depends only on (seed, epoch, rank, world size).
        equal_length: every rank yields as many frames as the rank with the fewest (the tail of
            its last scene is cut): distributed training needs equal step counts. Off for
            evaluation, where nothing may be dropped.
    """

    def __init__(
        self,
        scene_names: Sequence[str],
        ctx: DistContext = DistContext(),
        shuffle: bool = False,
        seed: int = 0,
        equal_length: bool = False,
    ):
        self.scenes = group_scenes(scene_names)
        if len(self.scenes) < ctx.world_size:
            raise ValueError(f"{len(self.scenes)} scenes cannot be sharded by whole scenes over {ctx.world_size} ranks")
        self.ctx, self.shuffle, self.seed, self.equal_length = ctx, shuffle, seed, equal_length
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Scene order of ``epoch``; start ``skip`` frames into this rank's sequence (resume)."""
        self.epoch, self.skip = int(epoch), int(skip)

    def scene_order(self) -> list[int]:
        """Positions (in :attr:`scenes`) of all scenes in this epoch's order."""
        if not self.shuffle:
            return list(range(len(self.scenes)))
        return np.random.default_rng((self.seed, self.epoch)).permutation(len(self.scenes)).tolist()

    def _rank_sequences(self) -> list[list[int]]:
        order = self.scene_order()
        ordered = [self.scenes[p] for p in order]
        return [[i for p in shard for i in ordered[p]] for shard in shard_scenes(ordered, self.ctx.world_size)]

    def _sequence(self) -> list[int]:
        sequences = self._rank_sequences()
        mine = sequences[self.ctx.rank]
        if self.equal_length:
            mine = mine[: min(len(s) for s in sequences)]
        return mine

    def __iter__(self) -> Iterator[int]:
        return iter(self._sequence()[self.skip :])

    def __len__(self) -> int:
        return len(self._sequence()) - self.skip
