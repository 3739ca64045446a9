"""Drawing of projected voxels and BEV maps with numpy + PIL (no plotting library needed).

These pictures are the human check of the data geometry: if the coloured voxel dots do not sit on
the objects of their class, the calibration chain or an augmentation is wrong.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from occdistill.geometry.camera import project
from occdistill.geometry.transforms import transform_points

# nuScenes-style sheet: front cameras on the top row, rear ones below (as seen from the car).
_SHEET_ORDER = ("CAM_FRONT_LEFT", "CAM_FRONT", "CAM_FRONT_RIGHT", "CAM_BACK_LEFT", "CAM_BACK", "CAM_BACK_RIGHT")


def overlay_voxels(
    image: np.ndarray,
    centers_ego: np.ndarray,
    labels: np.ndarray,
    cam_from_ego: np.ndarray,
    intrinsic: np.ndarray,
    palette: np.ndarray,
    alpha: float = 0.6,
    radius: int = 1,
) -> np.ndarray:
    """Blend class colours of voxel centres into an image, nearest voxel in front.

    image (H, W, 3) uint8; centers_ego (P, 3) voxel centres in the ego frame the camera transform
    expects; labels (P,) class ids; cam_from_ego (4, 4); intrinsic (3, 3) including augmentation.
    Each voxel paints a (2r+1)^2 square; a z-buffer keeps the nearest voxel per pixel.
    """
    h, w = image.shape[:2]
    out = image.astype(np.float32).copy()
    pts_cam = transform_points(cam_from_ego, centers_ego.astype(np.float64))
    uv, depth = project(pts_cam, intrinsic)
    keep = depth > 0.1
    uv, depth, labels = uv[keep], depth[keep], labels[keep]
    cols = np.floor(uv[:, 0]).astype(np.int64)
    rows = np.floor(uv[:, 1]).astype(np.int64)
    offsets = np.arange(-radius, radius + 1)
    dr, dc = np.meshgrid(offsets, offsets, indexing="ij")
    # (P, S) pixel footprint of every voxel, S = (2r+1)^2.
    rr = (rows[:, None] + dr.reshape(1, -1)).reshape(-1)
    cc = (cols[:, None] + dc.reshape(1, -1)).reshape(-1)
    dd = np.repeat(depth, dr.size)
    ll = np.repeat(labels, dr.size)
    inside = (rr >= 0) & (rr < h) & (cc >= 0) & (cc < w)
    rr, cc, dd, ll = rr[inside], cc[inside], dd[inside], ll[inside]
    order = np.argsort(dd, kind="stable")  # nearest first, so np.unique keeps it
    flat = rr[order] * w + cc[order]
    _, first = np.unique(flat, return_index=True)
    sel = order[first]
    colours = palette[ll[sel]].astype(np.float32)
    out[rr[sel], cc[sel]] = (1 - alpha) * out[rr[sel], cc[sel]] + alpha * colours
    return out.clip(0, 255).astype(np.uint8)


def bev_image(
    semantics: np.ndarray,
    free_index: int,
    palette: np.ndarray,
    observed: np.ndarray | None = None,
) -> np.ndarray:
    """Top-down label map (X, Y) -> (X, Y, 3) uint8 image with x forward pointing up, y left to the left.

    Each column shows its highest non-free voxel; free columns are dark grey, and columns with no
    observed voxel (``observed`` (X, Y, Z) bool, e.g. mask_camera) are black.
    """
    x, y, z = semantics.shape
    occupied = semantics != free_index
    # Index of the highest occupied voxel per column: argmax over the z-reversed occupancy.
    top = z - 1 - np.argmax(occupied[:, :, ::-1], axis=2)
    top_label = np.take_along_axis(semantics, top[..., None], axis=2)[..., 0]
    img = palette[top_label].copy()
    img[~occupied.any(axis=2)] = (60, 60, 60)
    if observed is not None:
        img[~observed.any(axis=2)] = (0, 0, 0)
    # Array [x, y] with x forward, y left -> image rows top = +x, columns left = +y.
    return img[::-1, ::-1]


def camera_sheet(
    images: Sequence[np.ndarray],
    names: Sequence[str],
    bev: np.ndarray,
    legend: Sequence[tuple[int, str]],
    palette: np.ndarray,
    title: str,
    bev_size: int = 360,
) -> Image.Image:
    """Compose camera overlays (nuScenes order when the names match), the BEV map and a legend of
    (class id, name) entries coloured by ``palette``."""
    order = [names.index(n) for n in _SHEET_ORDER if n in names] or list(range(len(names)))
    order += [i for i in range(len(names)) if i not in order]
    h, w = images[0].shape[:2]
    ncols = min(3, len(order))
    nrows = (len(order) + ncols - 1) // ncols
    pad, header = 4, 22
    legend_w = 170
    sheet_w = ncols * (w + pad) + bev_size + legend_w + 2 * pad
    sheet_h = header + max(nrows * (h + pad + 14), bev_size + 14, (len(legend) + 1) * 14)
    sheet = Image.new("RGB", (sheet_w, sheet_h), (25, 25, 25))
    draw = ImageDraw.Draw(sheet)
    draw.text((pad, 4), title, fill=(255, 255, 255))
    for slot, i in enumerate(order):
        r, c = divmod(slot, ncols)
        x0, y0 = c * (w + pad) + pad, header + r * (h + pad + 14)
        draw.text((x0, y0), names[i], fill=(220, 220, 220))
        sheet.paste(Image.fromarray(images[i]), (x0, y0 + 14))
    bx = ncols * (w + pad) + pad
    draw.text((bx, header), "BEV labels (x forward = up)", fill=(220, 220, 220))
    sheet.paste(Image.fromarray(bev).resize((bev_size, bev_size), Image.NEAREST), (bx, header + 14))
    lx = bx + bev_size + pad
    for row, (k, name) in enumerate(legend):
        yy = header + 14 + row * 14
        draw.rectangle((lx, yy + 2, lx + 10, yy + 12), fill=tuple(int(v) for v in palette[k]))
        draw.text((lx + 14, yy), f"{k} {name}", fill=(220, 220, 220))
    return sheet
