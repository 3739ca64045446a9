"""Loading teacher targets: paired by key, verified, and moved by the same BEV augmentation as the
labels (compared with flipping by hand and with the augmented labels themselves)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from occdistill.data.augment import BevAugConfig
from occdistill.data.occ3d import Occ3DDataset
from occdistill.data.synth import generate
from occdistill.errors import DataError
from occdistill.targets import (
    DumpOptions,
    TeacherInfo,
    TeacherPrediction,
    TeacherTargets,
    WithTeacherTargets,
    collate_distill,
    dump_targets,
)
from occdistill.targets import compact
from occdistill.targets.collapse import collapse_bev
from occdistill.targets.pseudo import label_teacher_logits, label_teacher_probs

SYNTH = ["rig.width=64", "rig.height=36", "rig.cameras=[CAM_FRONT]", "lidar.azimuths=256",
         "grid.range=[-9.6,-9.6,-1,9.6,9.6,5.4]", "grid.voxel_size=[0.8,0.8,0.8]"]
C = 2


def one_hot_teacher(sample) -> TeacherPrediction:
    """Exactly the labels as probabilities (so the augmented targets must equal the augmented
    labels), and a BEV feature that encodes the column position."""
    probs = label_teacher_probs(sample.semantics, 18, 17, confidence=60.0, radius=0, noise=0.0)
    x, y, _ = sample.semantics.shape
    feature = torch.stack(torch.meshgrid(torch.arange(x) + 1.0, torch.arange(y) + 1.0, indexing="ij"))
    return TeacherPrediction(probs, "prob", bev_feature=feature)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader")
    street = generate("street", root / "street", 1, 2, seed=5, overrides=SYNTH, progress=False)
    dataset = Occ3DDataset(street.out, street.splits["train"])
    dump_targets(one_hot_teacher, dataset, root / "onehot", TeacherInfo("labels", "none", "d" * 64, "prob"),
                 DumpOptions(split="train", bev_feature_channels=C, progress=False))
    logit = lambda s: TeacherPrediction(label_teacher_logits(s.semantics, 18, 17), "logit")  # noqa: E731
    dump_targets(logit, dataset, root / "logit", TeacherInfo("soft", "none", "e" * 64, "logit"),
                 DumpOptions(split="train", formats=("compact", "seed"), progress=False))
    return street, root


def augmented(street, **bev) -> Occ3DDataset:
    return Occ3DDataset(street.out, street.splits["train"], bev_aug=BevAugConfig(**bev), augment=True)


def test_a_bev_flip_moves_targets_as_a_flip_by_hand_and_as_the_labels(world):
    street, root = world
    plain = Occ3DDataset(street.out, street.splits["train"])
    flipped = augmented(street, flip_x_prob=1.0)
    targets = TeacherTargets(root / "onehot", flipped, with_bev_feature=True)
    reference = TeacherTargets(root / "onehot", plain, with_bev_feature=True).load(1)
    sample = flipped[1]
    assert np.allclose(sample.bda.numpy(), np.diag([-1.0, 1, 1, 1]))
    t = targets.load(1, sample.bda)
    torch.testing.assert_close(t.voxel_probs, reference.voxel_probs.flip(0), rtol=0, atol=0)
    torch.testing.assert_close(t.bev_probs, reference.bev_probs.flip(0), rtol=0, atol=0)
    torch.testing.assert_close(t.bev_feature, reference.bev_feature.flip(1), rtol=0, atol=0)
    assert t.valid.all() and torch.equal(t.voxel_probs.argmax(-1), sample.semantics)


@pytest.mark.parametrize("bev", [dict(rotate_range_deg=(30.0, 30.0)), dict(scale_range=(0.87, 0.87), flip_y_prob=1.0)])
def test_rotated_or_scaled_targets_equal_the_augmented_labels_and_their_bev_is_the_collapse(world, bev):
    street, root = world
    dataset = augmented(street, **bev)
    targets = TeacherTargets(root / "onehot", dataset, with_bev_feature=True)
    sample = dataset[0]
    t = targets.load(0, sample.bda)
    assert torch.equal(t.voxel_probs.argmax(-1), sample.semantics)
    assert not t.valid.all() and (t.voxel_probs[~t.valid][:, 17] == 1).all()  # from outside: free
    torch.testing.assert_close(t.bev_probs, collapse_bev(t.voxel_probs, 17), rtol=0, atol=1e-6)
    outside = t.bev_feature[0] == 0  # columns pulled from outside the grid carry no feature
    assert outside.any() and (t.bev_probs[outside][:, 17] == 1).all()


def test_fp16_and_compact_sources_agree_and_logits_go_through_a_softmax(world):
    street, root = world
    dataset = Occ3DDataset(street.out, street.splits["train"])
    a = TeacherTargets(root / "logit", dataset, source="compact").load(0)
    b = TeacherTargets(root / "logit", dataset, source="fp16").load(0)
    assert (b.voxel_probs.sum(-1) - 1).abs().max() < 1e-5
    assert (a.voxel_probs - b.voxel_probs).abs().max() < 2.5 / 255 + 2e-3
    assert (a.bev_probs - b.bev_probs).abs().max() < 2.5 / 255 + 2e-3


def test_moved_targets_are_decoded_exactly_and_do_not_share_the_reused_decode_buffer(world):
    street, root = world
    dataset = augmented(street, flip_x_prob=1.0)
    targets = TeacherTargets(root / "logit", dataset, source="compact")
    first = targets.load(0, dataset[0].bda)
    kept = first.voxel_probs.clone()
    second = targets.load(1, dataset[1].bda)  # decoded into the same buffer as the first
    torch.testing.assert_close(first.voxel_probs, kept, rtol=0, atol=0)
    assert not np.shares_memory(first.voxel_probs.numpy(), second.voxel_probs.numpy())
    for index, t in ((0, first), (1, second)):
        entry = targets.entries[index]
        stored = compact.decode_probs((root / "logit" / entry.files["voxel"]).read_bytes())
        torch.testing.assert_close(t.voxel_probs, torch.from_numpy(stored).flip(0), rtol=0, atol=0)


def test_dataloader_wrapper_pairs_and_stacks_samples_with_their_targets(world):
    street, root = world
    dataset = augmented(street, flip_y_prob=1.0)
    wrapped = WithTeacherTargets(dataset, TeacherTargets(root / "onehot", dataset))
    batch, targets = next(iter(DataLoader(wrapped, batch_size=2, collate_fn=collate_distill)))
    assert targets.keys == batch.tokens and targets.voxel_probs.shape == (2, 24, 24, 8, 18)
    assert targets.bev_probs.shape == (2, 24, 24, 18) and targets.bev_feature is None
    assert torch.equal(targets.voxel_probs.argmax(-1), batch.semantics)
    assert targets.to("cpu").valid.dtype == torch.bool


def test_misaligned_incomplete_or_mismatched_dumps_are_refused(world, tmp_path):
    street, root = world
    data = tmp_path / "street"
    shutil.copytree(street.out, data)
    dataset = Occ3DDataset(data, street.splits["train"].name)
    path = dataset.label_path(dataset.frame(1))
    with np.load(path) as npz:
        arrays = {k: npz[k].copy() for k in npz.files}
    arrays["semantics"][3, 3, 3] = 4 if arrays["semantics"][3, 3, 3] != 4 else 1
    np.savez_compressed(path, **arrays)
    targets = TeacherTargets(root / "onehot", dataset)
    targets.load(0)
    with pytest.raises(DataError, match=f"sample {dataset.frame(1).token} was computed for other labels"):
        targets.load(1)
    with pytest.raises(DataError, match="has no 'voxel_fp16' files"):
        TeacherTargets(root / "onehot", dataset, source="fp16")
    with pytest.raises(DataError, match="has no 'bev_feature' files"):
        TeacherTargets(root / "logit", dataset, with_bev_feature=True)
    dump = tmp_path / "dump"
    shutil.copytree(root / "onehot", dump)
    manifest = json.loads((dump / "manifest_train.json").read_text())
    manifest["samples"].pop()
    (dump / "manifest_train.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="no teacher target for 1 of 2 samples"):
        TeacherTargets(dump, dataset)
    manifest = json.loads((root / "onehot" / "manifest_train.json").read_text())
    manifest["classes"]["free_index"] = 0
    (dump / "manifest_train.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="class table"):
        TeacherTargets(dump, dataset)
