"""Scene-ordered sampler: whole scenes in time order, per-epoch scene shuffling, sharding by
whole scenes, resuming."""

from __future__ import annotations

import numpy as np
import pytest

from occdistill.engine.distributed import DistContext
from occdistill.engine.sequence import SceneSequenceSampler, group_scenes, shard_scenes

SCENES = ["a"] * 3 + ["b"] * 5 + ["c"] * 2 + ["d"] * 4  # indices 0-2, 3-7, 8-9, 10-13


def test_sampler_yields_whole_scenes_in_time_order():
    assert list(SceneSequenceSampler(SCENES)) == list(range(14))
    sampler = SceneSequenceSampler(SCENES, shuffle=True, seed=3)
    orders = []
    for epoch in range(4):
        sampler.set_epoch(epoch)
        seq = list(sampler)
        assert sorted(seq) == list(range(14))
        runs = group_scenes([SCENES[i] for i in seq])  # each scene one run ...
        assert all(np.all(np.diff([seq[p] for p in run]) == 1) for run in runs)  # ... in time order
        orders.append(seq)
    assert len({tuple(o) for o in orders}) > 1  # the scene order changes between epochs
    again = SceneSequenceSampler(SCENES, shuffle=True, seed=3)
    again.set_epoch(2)
    assert list(again) == orders[2]


def test_sampler_shards_whole_scenes_and_resumes():
    shards = [list(SceneSequenceSampler(SCENES, DistContext(rank=r, world_size=2))) for r in range(2)]
    # greedy by frames: a(3) -> 0, b(5) -> 1, c(2) -> 0, d(4) -> 0 (5 vs 5: lowest rank)
    assert shards == [[0, 1, 2, 8, 9, 10, 11, 12, 13], [3, 4, 5, 6, 7]]
    equal = [list(SceneSequenceSampler(SCENES, DistContext(rank=r, world_size=2), equal_length=True)) for r in range(2)]
    assert equal == [[0, 1, 2, 8, 9], [3, 4, 5, 6, 7]]
    sampler = SceneSequenceSampler(SCENES, DistContext(rank=0, world_size=2), shuffle=True, seed=1)
    sampler.set_epoch(5)
    full = list(sampler)
    sampler.set_epoch(5, skip=4)
    assert list(sampler) == full[4:] and len(sampler) == len(full) - 4
    assert shard_scenes([[0] * 3, [0] * 3, [0]], 2) == [[0, 2], [1]]
    with pytest.raises(ValueError, match="2 scenes"):
        SceneSequenceSampler(["a", "b"], DistContext(rank=0, world_size=3))


def test_sampler_rejects_frames_out_of_scene_order():
    with pytest.raises(ValueError, match="not contiguous"):
        group_scenes(["a", "b", "a"])
