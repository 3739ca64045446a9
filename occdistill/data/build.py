"""Open a dataset by format name: the one place that maps ``--format`` to a reader class."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from occdistill.data.augment import BevAugConfig, ImageAugConfig
from occdistill.data.classes import OCC3D_NUSCENES, OCC_SCANNET, ClassTable
from occdistill.data.occ3d import Occ3DDataset
from occdistill.data.occscannet import OccScanNetDataset
from occdistill.errors import DataError

DatasetFormat = Literal["occ3d", "occscannet"]
Dataset = Occ3DDataset | OccScanNetDataset


def classes_for(fmt: DatasetFormat) -> ClassTable:
    return OCC3D_NUSCENES if fmt == "occ3d" else OCC_SCANNET


def check_augmentation(raw_size: tuple[int, int]) -> tuple[ImageAugConfig, BevAugConfig]:
    """The BEVDet training ranges (resize -6%..+11%, rotate +-5.4 deg, flip; BEV rotate +-22.5 deg,
    scale 0.95..1.05, flips) plus free crops and colour jitter, keeping the raw image size: used to
    verify that every augmentation moves pixels, labels and matrices together."""
    image = ImageAugConfig(
        final_size=raw_size,
        resize_range=(0.94, 1.11),
        crop_top_range=(0.0, 1.0),
        flip_prob=0.5,
        rotate_range_deg=(-5.4, 5.4),
        color_jitter=0.3,
    )
    bev = BevAugConfig(rotate_range_deg=(-22.5, 22.5), scale_range=(0.95, 1.05), flip_x_prob=0.5, flip_y_prob=0.5)
    return image, bev


def open_dataset(
    fmt: DatasetFormat,
    data_root: str | Path,
    infos: str | Path | None = None,
    *,
    check_aug: bool = False,
    seed: int = 0,
    rendered_maps: bool = False,
) -> Dataset:
    """A dataset in evaluation mode, or with :func:`check_augmentation` when ``check_aug``.

    ``rendered_maps`` loads the synthetic world's per-camera semantic and depth maps.
    """
    if fmt == "occ3d":
        if infos is None:
            raise DataError("format occ3d needs an info pickle (--infos)")
        ds: Dataset = Occ3DDataset(
            data_root, infos, depth="rendered" if rendered_maps else "none", semantic_maps=rendered_maps
        )
    elif fmt == "occscannet":
        ds = OccScanNetDataset(data_root, load_depth=rendered_maps, semantic_maps=rendered_maps)
    else:
        raise DataError(f"unknown dataset format {fmt!r} (occ3d or occscannet)")
    if check_aug:
        # The un-augmented first sample tells the raw image size (both readers keep it then).
        raw_size = tuple(ds[0].images.shape[-2:])
        ds.image_aug, ds.bev_aug = check_augmentation(raw_size)
        ds.augment, ds.seed = True, seed
    return ds
