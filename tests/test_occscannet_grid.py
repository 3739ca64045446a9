"""The Occ-ScanNet grid comes from the model config, not from a hard-coded 60x60x36 at 0.08 m: a
room world synthesised at another grid loads, trains and evaluates with a model config of that
grid, and any disagreement between the model's grid and the data's labels is a one-line error
naming the frame file and both shapes."""

from __future__ import annotations

from pathlib import Path

import pytest

from occdistill.data.occscannet import scannet_grid, scannet_grid_params
from occdistill.data.synth import generate
from occdistill.engine.config import load_train_config
from occdistill.engine.data import model_grid, open_split
from occdistill.engine.loop import train
from occdistill.errors import DataError
from occdistill.geometry.grid import VoxelGrid

# 20x20x12 voxels of 0.12 m (2.4 x 2.4 x 1.44 m): neither the default shape nor the default size.
SHAPE, VOXEL = (20, 20, 12), 0.12
SYNTH = ["camera.width=64", "camera.height=48", "split.val_scenes=1", f"grid.shape=[{','.join(map(str, SHAPE))}]",
         f"grid.voxel_size={VOXEL}"]
MODEL_GRID = ["model.sparse.grid.range=[-1.2,-1.2,0.0,1.2,1.2,1.44]", "model.sparse.grid.voxel_size=[0.12,0.12,0.12]"]
SMALL = [
    "data.image_aug.final_size=[48,64]", "model.sparse.image_size=[48,64]", "model.sparse.backbone.base_width=8",
    "model.sparse.neck_channels=16", "model.sparse.embed_dims=16", "model.sparse.num_heads=2",
    "model.sparse.num_queries=8", "model.sparse.points_per_layer=[1,2]", "model.sparse.sampling_points=2",
    "model.sparse.mixing_out_points=4", "model.sparse.ffn_channels=32", "loss.sparse.max_gt_points=256",
    "optim.max_steps=1", "optim.warmup_steps=0", "data.batch_size=1", "data.workers=0", "runtime.threads=1",
    "runtime.progress=false",
]


@pytest.fixture(scope="module")
def room(tmp_path_factory) -> Path:
    """2 rooms x 1 frame at a 20x20x12 grid of 0.12 m voxels: one training, one validation frame."""
    return generate("room", tmp_path_factory.mktemp("room_grid"), 2, 1, seed=7, overrides=SYNTH, progress=False).out


def test_the_split_takes_the_model_configs_grid(room):
    cfg = load_train_config("room-sparse", [f"data.root={room}", *MODEL_GRID])
    dataset = open_split(cfg.data, "train", augment=False, grid=model_grid(cfg.model))
    assert dataset.grid.shape == SHAPE and dataset.grid.voxel_size == (VOXEL,) * 3
    sample = dataset[0]
    assert tuple(sample.semantics.shape) == SHAPE and tuple(sample.mask_camera.shape) == SHAPE


@pytest.mark.parametrize("grid, named", [(None, "the default Occ-ScanNet grid"), (scannet_grid(), "the model's grid")])
def test_a_grid_that_disagrees_with_the_labels_names_the_file_and_both_shapes(room, grid, named):
    cfg = load_train_config("room-sparse", [f"data.root={room}"])
    with pytest.raises(DataError) as err:
        open_split(cfg.data, "val", augment=False, grid=grid)
    message = str(err.value)
    first = (room / cfg.data.val_split).read_text().split()[0]
    assert first in message and "20x20x12" in message and "60x60x36" in message and named in message
    assert "model.<kind>.grid" in message


def test_a_grid_outside_the_occscannet_ego_frame_is_refused(room):
    shifted = VoxelGrid((-1.0, -1.2, 0.0, 1.4, 1.2, 1.44), (0.12,) * 3)  # not centred on the ego origin in x
    cfg = load_train_config("room-sparse", [f"data.root={room}"])
    with pytest.raises(DataError, match=r"not an Occ-ScanNet label grid .*range \(-1\.2, -1\.2, 0\.0"):
        open_split(cfg.data, "train", augment=False, grid=shifted)
    assert scannet_grid_params(scannet_grid(SHAPE, VOXEL)) == (SHAPE, VOXEL)


def test_a_sparse_student_trains_and_evaluates_at_the_non_default_grid(room, tmp_path):
    cfg = load_train_config("room-sparse", [f"data.root={room}", *MODEL_GRID, *SMALL])
    result = train(cfg, tmp_path / "run")
    assert result.step == 1 and result.bad_steps == 0
    assert result.metrics["num_samples"] == 1 and result.metrics["format"] == "occscannet"
    # The engine's training refuses a model whose grid is not the data's, with the same one-line cause.
    with pytest.raises(DataError, match=r"target_1_4 is 20x20x12 voxels but the model's grid is 60x60x36"):
        train(load_train_config("room-sparse", [f"data.root={room}", *SMALL]), tmp_path / "default_grid")
