"""Teacher targets in the student's data pipeline: paired by key, verified, decoded, augmented.

``TeacherTargets(dump_dir, dataset)`` checks once that the dump fits the dataset (grid, class
table, a target for every sample) and then ``load(index, bda)`` returns one sample's targets:

- paired by the dataset's key for ``index`` and verified against the manifest: the hash of the
  sample's labels must equal the one the target was computed for (checked the first time each
  index is loaded in a process), shapes must match, values must be finite probabilities;
- decoded from the compact files (preferred) or the seed fp16 files (logits through a softmax);
- moved by the sample's BEV augmentation exactly as its labels are
  (:func:`occdistill.data.augment.apply_bev_aug`: every output voxel takes the voxel containing
  ``inv(bda) @ centre``; voxels pulled from outside the grid become free and are marked invalid).

``WithTeacherTargets(dataset, targets)`` wraps a dataset so that each item carries its sample and
its targets (:class:`DistillSample`), and :func:`collate_distill` stacks them for a DataLoader.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from occdistill.data.sample import Batch, Sample, collate
from occdistill.errors import DataError
from occdistill.geometry.grid import VoxelGrid
from occdistill.geometry.transforms import transform_points
from occdistill.targets import compact, seed_format
from occdistill.targets.check import check_array, read_artefact
from occdistill.targets.collapse import collapse_bev, parse_rule
from occdistill.targets.manifest import BEV, BEV_FEATURE, BEV_FP16, VOXEL, VOXEL_FP16, Manifest
from occdistill.targets.pairing import dataset_gt_sha256, sample_keys

Source = Literal["auto", "compact", "fp16"]


@dataclass
class TargetSample:
    """One sample's teacher targets, in the augmented ego frame of the sample.

    voxel_probs (X, Y, Z, K) float32; bev_probs (X, Y, K) float32; valid (X, Y, Z) bool (False
    where the augmentation pulled the voxel from outside the grid: no teacher there);
    bev_feature (C, X, Y) float32 or None.
    """

    key: str
    voxel_probs: torch.Tensor
    bev_probs: torch.Tensor
    valid: torch.Tensor
    bev_feature: torch.Tensor | None = None


@dataclass
class TargetBatch:
    """:class:`TargetSample` fields stacked along a leading B."""

    keys: tuple[str, ...]
    voxel_probs: torch.Tensor
    bev_probs: torch.Tensor
    valid: torch.Tensor
    bev_feature: torch.Tensor | None = None

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "TargetBatch":
        move = lambda t: None if t is None else t.to(device, non_blocking=non_blocking)  # noqa: E731
        return TargetBatch(self.keys, move(self.voxel_probs), move(self.bev_probs), move(self.valid),
                           move(self.bev_feature))


class TeacherTargets:
    """The targets of one dump split, for one dataset (see the module docstring).

    ``source``: "compact", "fp16" (seed format) or "auto" (compact when present).
    ``with_bev_feature``: also load the teacher BEV feature (the dump must have it).
    ``verify_gt``: compare label hashes (one label read per sample and process).
    """

    def __init__(
        self,
        dump_dir: str | Path,
        dataset,
        split: str | None = None,
        *,
        source: Source = "auto",
        with_bev_feature: bool = False,
        verify_gt: bool = True,
    ) -> None:
        self.dump_dir = Path(dump_dir)
        self.manifest = Manifest.load(self.dump_dir, split)
        self.dataset = dataset
        m = self.manifest
        for diff in (m.grid.differs_from(dataset.grid), m.classes.differs_from(dataset.classes)):
            if diff:
                raise DataError(f"{self.dump_dir}: {diff}")
        arts = m.artefacts
        if source == "auto":
            source = "compact" if VOXEL in arts else "fp16"
        self.voxel_art, self.bev_art = (VOXEL, BEV) if source == "compact" else (VOXEL_FP16, BEV_FP16)
        for name in (self.voxel_art, self.bev_art) + ((BEV_FEATURE,) if with_bev_feature else ()):
            if name not in arts:
                raise DataError(f"{self.dump_dir}: the {m.split!r} dump has no {name!r} files (has {sorted(arts)})")
        self.with_bev_feature = with_bev_feature
        self.verify_gt = verify_gt
        self.keys = sample_keys(dataset)
        entries = m.sample_map()
        missing = [k for k in self.keys if k not in entries]
        if missing:
            raise DataError(f"{self.dump_dir}: no teacher target for {len(missing)} of {len(self.keys)} samples "
                            f"(first: {missing[0]}); run occdistill check-dump")
        self.entries = [entries[k] for k in self.keys]
        self.grid = dataset.grid
        self._verified: set[int] = set()

    def __len__(self) -> int:
        return len(self.keys)

    def _read(self, name: str, index: int, reuse: bool = False) -> np.ndarray:
        """Decoded, checked float32 array of one artefact (probabilities for voxel/BEV).

        ``reuse``: decode a compact probability file into this thread's reused buffer (see
        :func:`_decode_reusing`); only for a caller that copies the array before the next read."""
        entry, art = self.entries[index], self.manifest.artefacts[name]
        path = self.dump_dir / entry.files[name]
        where = f"teacher target {path} (sample {entry.key})"
        if not path.is_file():
            raise DataError(f"{where}: file not found")
        try:
            if reuse and art.encoding in compact.PROBS_CODECS:
                arr = _decode_reusing(path.read_bytes(), art.shape)
            else:
                arr = read_artefact(path, art)
        except (DataError, compact.CodecError, OSError) as exc:
            raise DataError(f"{where}: {exc}") from exc
        # The compact decoder guarantees finite, normalised values (it rejects corrupt files);
        # fp16 files are checked here (check-dump checks everything).
        problems = check_array(arr, art, name, entry.key) if art.encoding == seed_format.ENCODING else (
            [] if arr.shape == art.shape else check_array(arr, art, name, entry.key))
        if problems:
            raise DataError(f"{where}: {problems[0].kind}: {problems[0].message}")
        if art.value == "logit":
            arr = torch.from_numpy(arr).softmax(dim=-1).numpy()
        return arr

    def load(self, index: int, bda: np.ndarray | torch.Tensor | None = None) -> TargetSample:
        """Targets of dataset sample ``index``, moved by ``bda`` (the sample's (4, 4) BEV
        augmentation; None or identity leaves them as stored)."""
        entry = self.entries[index]
        if self.verify_gt and index not in self._verified:
            gt = dataset_gt_sha256(self.dataset, index)
            if entry.gt_sha256 is not None and gt is not None and gt != entry.gt_sha256:
                raise DataError(f"{self.dump_dir}: teacher target of sample {entry.key} was computed for other labels "
                                f"(GT sha256 {entry.gt_sha256[:12]}.. in the manifest, {gt[:12]}.. in the dataset): "
                                "the dump is misaligned with this dataset")
            self._verified.add(index)
        bda = None if bda is None else np.asarray(bda, dtype=np.float64)
        moved = not (bda is None or np.allclose(bda, np.eye(4), atol=1e-6))
        # When the targets are moved, augment_targets copies the voxels into a new array, so they
        # can be decoded into a buffer reused from sample to sample (no 46 MB allocation per load).
        voxel = self._read(self.voxel_art, index, reuse=moved)
        bev = self._read(self.bev_art, index)
        feature = self._read(BEV_FEATURE, index) if self.with_bev_feature else None
        free = self.manifest.classes.free_index
        if not moved:
            valid = np.ones(voxel.shape[:3], dtype=bool)
        else:
            voxel, bev, valid, feature = augment_targets(bda, self.grid, voxel, bev, feature, free,
                                                         parse_rule(self.manifest.bev_rule))
        return TargetSample(
            key=entry.key,
            voxel_probs=torch.from_numpy(voxel),
            bev_probs=torch.from_numpy(np.ascontiguousarray(bev)),
            valid=torch.from_numpy(valid),
            bev_feature=None if feature is None else torch.from_numpy(np.ascontiguousarray(feature)),
        )


_DECODE_BUFFERS = threading.local()


def _decode_reusing(data: bytes, shape: tuple[int, ...]) -> np.ndarray:
    """Decode compact probability bytes (any codec) into the calling thread's reused float32
    buffer (one per thread, as large as the largest target decoded so: 46 MB at the Occ3D grid).
    The result is overwritten by the next call in the thread. A file whose shape is not ``shape``
    is decoded into a new array (the caller reports the mismatch)."""
    header = compact.read_header(data)
    try:
        fits = [int(s) for s in header["shape"]] == list(shape)
    except (KeyError, TypeError, ValueError):
        fits = False
    if not fits:
        return compact.decode_probs(data)
    size = int(np.prod(shape))
    buf = getattr(_DECODE_BUFFERS, "voxel", None)
    if buf is None or buf.size < size:
        buf = _DECODE_BUFFERS.voxel = np.empty(size, dtype=np.float32)
    return compact.decode_probs(data, out=buf[:size])


def _xy_source(bda: np.ndarray, grid: VoxelGrid) -> tuple[np.ndarray, np.ndarray]:
    """Flat (X*Y) source column index of every output column and whether it lies inside.

    A BEV augmentation (rotation about z, uniform scale, x/y mirror) maps x, y independently of z,
    so the column map is the same at every height."""
    x, y, _ = grid.shape
    centres = grid.centers()[:, :, 0].reshape(-1, 3)  # (X*Y, 3), any z will do for x, y
    src = transform_points(np.linalg.inv(bda), centres)[:, :2]
    idx = np.floor((src - grid.lower[:2]) / grid.size[:2]).astype(np.int64)
    inside = np.all((idx >= 0) & (idx < np.array([x, y])), axis=1)
    idx = np.clip(idx, 0, np.array([x - 1, y - 1]))
    return idx[:, 0] * y + idx[:, 1], inside


def augment_targets(
    bda: np.ndarray,
    grid: VoxelGrid,
    voxel: np.ndarray,
    bev: np.ndarray,
    feature: np.ndarray | None,
    free_index: int,
    z_band: tuple[int, int] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """Resample targets into the augmented ego frame, nearest neighbour, as labels are.

    voxel (X, Y, Z, K) -> same, free one-hot where the source is outside the grid; valid (X, Y, Z).
    bev (X, Y, K): when ``bda`` keeps z (rotation/mirror only) every output column is one source
    column, so the stored BEV is moved column-wise (identical to collapsing the moved volume);
    a scale also stretches the columns, so the moved volume is collapsed again.
    feature (C, X, Y): moved column-wise, zero outside.
    """
    k = voxel.shape[-1]
    src = transform_points(np.linalg.inv(bda), grid.centers().reshape(-1, 3))
    idx, inside = grid.point_to_index(src)
    flat = np.ravel_multi_index(tuple(idx.T), grid.shape)
    out = np.take(voxel.reshape(-1, k), flat, axis=0)  # a new array (np.take copies rows faster than [flat])
    out[~inside] = np.eye(k, dtype=out.dtype)[free_index]
    out = out.reshape(voxel.shape)
    valid = inside.reshape(grid.shape)
    cols, col_inside = _xy_source(bda, grid)
    if np.allclose(bda[2], [0.0, 0.0, 1.0, 0.0], atol=1e-9) and np.allclose(bda[:2, 2], 0.0, atol=1e-9):
        new_bev = np.take(bev.reshape(-1, k), cols, axis=0)
        new_bev[~col_inside] = np.eye(k, dtype=new_bev.dtype)[free_index]
        new_bev = new_bev.reshape(bev.shape)
    else:
        new_bev = collapse_bev(out, free_index, z_band)
    if feature is not None:
        c = feature.shape[0]
        moved = np.take(feature.reshape(c, -1), cols, axis=1)
        moved[:, ~col_inside] = 0.0
        feature = moved.reshape(feature.shape)
    return out, new_bev, valid, feature


# ----------------------------------------------------------------------------- dataset wrapper


@dataclass
class DistillSample:
    sample: Sample
    target: TargetSample


class WithTeacherTargets(Dataset):
    """``dataset[i]`` together with its teacher targets, moved by the sample's own ``bda``."""

    def __init__(self, dataset, targets: TeacherTargets) -> None:
        if targets.dataset is not dataset:
            raise ValueError("the targets were paired with another dataset object")
        self.dataset = dataset
        self.targets = targets

    def __len__(self) -> int:
        return len(self.dataset)

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)

    def __getitem__(self, index: int) -> DistillSample:
        sample = self.dataset[index]
        target = self.targets.load(index, sample.bda.numpy())
        if target.key != sample.token:
            raise DataError(f"sample {index}: token {sample.token!r} but teacher target {target.key!r}")
        return DistillSample(sample, target)


def collate_distill(items: Sequence[DistillSample]) -> tuple[Batch, TargetBatch]:
    """``DataLoader(collate_fn=collate_distill)`` for :class:`WithTeacherTargets`."""
    batch = collate([it.sample for it in items])
    targets = [it.target for it in items]
    feats = [t.bev_feature for t in targets]
    return batch, TargetBatch(
        keys=tuple(t.key for t in targets),
        voxel_probs=torch.stack([t.voxel_probs for t in targets]),
        bev_probs=torch.stack([t.bev_probs for t in targets]),
        valid=torch.stack([t.valid for t in targets]),
        bev_feature=None if feats[0] is None else torch.stack(feats),
    )
