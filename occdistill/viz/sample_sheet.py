"""One picture per sample: every camera with its GT voxels overlaid, plus the BEV label map."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from occdistill.data.classes import ClassTable
from occdistill.data.consistency import cam_from_ego, occupied_voxels
from occdistill.data.sample import Sample
from occdistill.geometry.grid import VoxelGrid
from occdistill.io import atomic_write_bytes
from occdistill.viz.overlay import bev_image, camera_sheet, overlay_voxels


def render_sample(sample: Sample, grid: VoxelGrid, classes: ClassTable, title: str) -> Image.Image:
    """The visual check of one sample as a PIL image."""
    centers, labels = occupied_voxels(sample, grid, classes)
    palette = classes.palette()
    k_aug = sample.aug_intrinsics.double().numpy()
    cams = cam_from_ego(sample)
    images = (sample.images.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    overlays = [
        overlay_voxels(images[n], centers, labels, cams[n], k_aug[n], palette) for n in range(images.shape[0])
    ]
    sem = sample.semantics.numpy()
    if classes.ignore_index is not None:
        sem = np.where(sem == classes.ignore_index, classes.free_index, sem)
    observed = sample.mask_camera.numpy() if sample.mask_camera is not None else None
    bev = bev_image(sem, classes.free_index, palette, observed)
    legend = [(k, n) for k, n in enumerate(classes.names) if k != classes.free_index]
    return camera_sheet(overlays, list(sample.camera_names), bev, legend, palette, title)


def write_sample_pngs(dataset, classes: ClassTable, out: Path, limit: int | None = None) -> list[Path]:
    """Render the first ``limit`` samples (all by default) of a dataset to ``out/<scene>__<token>.png``."""
    n = len(dataset) if limit is None else min(limit, len(dataset))
    paths = []
    for i in tqdm(range(n), desc="viz", unit="sample"):
        sample = dataset[i]
        name = f"{sample.scene_name}__{sample.token}".replace("/", "_")
        image = render_sample(sample, dataset.grid, classes, f"{sample.scene_name}  {sample.token}")
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        paths.append(atomic_write_bytes(out / f"{name}.png", buf.getvalue()))
    return paths
