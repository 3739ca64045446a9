"""How a dump pairs with a dataset: sample keys and the hash of the labels a target was made for.

The key of a sample is its token (Occ3D: the nuScenes sample token; Occ-ScanNet:
``<scene>/<frame>``). The GT hash is SHA-256 over the label *array* -- its shape and its uint8
bytes in C order -- not over the file, so recompressing or re-saving ``labels.npz`` does not
change it, while a target paired with another sample's labels (an off-by-one in an index, a
shuffled list) always does.

Keys and labels are read without images, so pairing a whole split costs only the label reads.
"""

from __future__ import annotations

import hashlib
import re

import numpy as np

from occdistill.data.labels import load_occ3d_labels
from occdistill.data.occ3d import Occ3DDataset
from occdistill.data.occscannet import OccScanNetDataset
from occdistill.errors import DataError

# Keys become file names (``<key>_3d_logits_fp16.npz``): path segments of safe characters only.
_KEY = re.compile(r"[A-Za-z0-9_.\-]+(/[A-Za-z0-9_.\-]+)*")


def check_key(key: str, where: str) -> str:
    """A key usable as a relative file path (no ``..``, no absolute path, no odd characters)."""
    if not isinstance(key, str) or not _KEY.fullmatch(key) or any(s in (".", "..") for s in key.split("/")):
        raise DataError(f"{where}: sample key {key!r} cannot name a file (letters, digits, _ . - and / only)")
    return key


def sample_keys(dataset) -> list[str]:
    """The key of every sample of ``dataset``, in dataset order, without loading images."""
    if isinstance(dataset, Occ3DDataset):
        keys = [f.token for f in dataset.infos.frames]
    elif isinstance(dataset, OccScanNetDataset):
        # The token OccScanNetDataset.load gives its samples.
        keys = [f"{p.parent.name}/{p.stem}" for p in dataset.paths]
    else:
        keys = [dataset[i].token for i in range(len(dataset))]
    seen: set[str] = set()
    for k in keys:
        check_key(k, "dataset")
        if k in seen:
            raise DataError(f"dataset: sample key {k!r} appears twice; teacher targets could not be paired")
        seen.add(k)
    return keys


def gt_semantics(dataset, index: int) -> np.ndarray | None:
    """The raw (un-augmented) label array of sample ``index``, or None when the dataset has none."""
    if isinstance(dataset, Occ3DDataset):
        if not dataset.with_labels:
            return None
        frame = dataset.frame(index)
        return load_occ3d_labels(dataset.label_path(frame), dataset.grid.shape, dataset.classes).semantics
    if isinstance(dataset, OccScanNetDataset):
        if not dataset.with_labels:
            return None
        return np.asarray(dataset.read_record(index)["target_1_4"])
    sem = dataset[index].semantics
    return None if sem is None else sem.numpy()


def gt_sha256(semantics: np.ndarray) -> str:
    """SHA-256 of a label array (shape + uint8 values in C order); ids must lie in 0..255."""
    sem = np.asarray(semantics)
    if sem.size and (sem.min() < 0 or sem.max() > 255):
        raise DataError(f"labels hold ids outside 0..255 ([{sem.min()}, {sem.max()}]); cannot hash them as uint8")
    h = hashlib.sha256(("x".join(str(s) for s in sem.shape) + ":").encode("ascii"))
    h.update(np.ascontiguousarray(sem, dtype=np.uint8).tobytes())
    return h.hexdigest()


def dataset_gt_sha256(dataset, index: int) -> str | None:
    sem = gt_semantics(dataset, index)
    return None if sem is None else gt_sha256(sem)
