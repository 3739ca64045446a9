"""Camera rigs for benchmarks and deployment: the real nuScenes 6-camera rig, or a nuScenes-like one.

A :class:`Rig` holds one rig's cameras as the model takes them (no batch dimension):
intrinsics (N, 3, 3) raw K, img_from_raw (N, 3, 3) the test-time resize + crop to the network
input, ego_from_cam (N, 4, 4), all float32 like :class:`occdistill.data.sample.Sample`.

Test-time image transform (FlashOcc / BEVDet): scale by ``max(H / H_raw, W / W_raw)`` so the
input is covered, keep the bottom rows (nuScenes' content is there) and centre horizontally.
At 1600x900 -> 256x704 this is FlashOcc's resize 0.44 + top crop of 140 rows.

The real calibration comes from ``realdata/nuscenes_bevdet_trt_sample0_scene0003/sample0000.yaml``
in the shared folder beside the repository (DESIGN.md section 10); without it a synthetic rig with
nuScenes' mounting yaws and focal length is generated, and :attr:`Rig.source` says which.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from occdistill.geometry import crop_matrix, resize_matrix, transform_from_quat, yaw_transform

NUSCENES_CAMERAS = ("CAM_FRONT_LEFT", "CAM_FRONT", "CAM_FRONT_RIGHT", "CAM_BACK_LEFT", "CAM_BACK", "CAM_BACK_RIGHT")
NUSCENES_RAW_SIZE = (900, 1600)  # (H, W)
REALDATA_SAMPLE = Path("nuscenes_bevdet_trt_sample0_scene0003") / "sample0000.yaml"


def default_realdata_dir() -> Path:
    """``<repository>/../shared/realdata`` (the folder the project's tests read)."""
    return Path(__file__).resolve().parents[2].parent / "shared" / "realdata"


class Rig(NamedTuple):
    """One camera rig: ``model.set_fixed_rig(*rig[:3])``.

    A named tuple so that scripts written against the plain ``(intrinsics, img_from_raw,
    ego_from_cam, source)`` tuple this replaced (``rig[:3]``, ``rig[3]``) keep working.
    """

    intrinsics: torch.Tensor  # (N, 3, 3) float32, raw K
    img_from_raw: torch.Tensor  # (N, 3, 3) float32, test-time resize + crop
    ego_from_cam: torch.Tensor  # (N, 4, 4) float32
    source: str
    camera_names: tuple[str, ...] = NUSCENES_CAMERAS
    raw_size: tuple[int, int] = NUSCENES_RAW_SIZE  # (H, W) before img_from_raw

    def batched(
        self, batch: int, device: torch.device | str = "cpu"
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, N, 3, 3), (B, N, 3, 3), (B, N, 4, 4) copies of the rig for a batch of ``batch`` samples."""
        return tuple(t.to(device)[None].expand(batch, *t.shape).contiguous() for t in self[:3])


def eval_image_transform(raw_size: tuple[int, int], image_size: tuple[int, int]) -> np.ndarray:
    """``img_from_raw`` (3, 3) float64: cover-resize, bottom-aligned, horizontally centred crop."""
    raw_h, raw_w = raw_size
    h, w = image_size
    scale = max(h / raw_h, w / raw_w)
    new_h, new_w = int(round(raw_h * scale)), int(round(raw_w * scale))
    return crop_matrix((new_w - w) / 2.0, new_h - h) @ resize_matrix(scale)


def _synthetic_cameras() -> tuple[list[np.ndarray], list[np.ndarray]]:
    """nuScenes-like K and sensor->ego poses: yaws 55, 0, -55, 110, 180, -110 deg (camera order
    of :data:`NUSCENES_CAMERAS`), 1 m from the ego origin, 1.5 m high, optical axis level."""
    k = np.array([[1266.4, 0.0, 816.3], [0.0, 1266.4, 491.5], [0.0, 0.0, 1.0]])
    # OpenCV camera axes (x right, y down, z forward) -> ego (x forward, y left, z up).
    ego_from_opencv = np.array(
        [[0.0, 0.0, 1.0, 0.0], [-1.0, 0.0, 0.0, 0.0], [0.0, -1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]]
    )
    yaws = np.deg2rad([55.0, 0.0, -55.0, 110.0, 180.0, -110.0])
    poses = [yaw_transform(y, 1.0 * np.cos(y), 1.0 * np.sin(y), 1.5) @ ego_from_opencv for y in yaws]
    return [k] * len(yaws), poses


def nuscenes_rig(image_size: tuple[int, int] = (256, 704), realdata_dir: str | Path | None = None) -> Rig:
    """The 6-camera nuScenes rig at network input ``image_size`` (H, W).

    Real calibration from ``realdata_dir`` (default :func:`default_realdata_dir`) when the sample
    file is there, else the synthetic rig of :func:`_synthetic_cameras`.
    """
    path = Path(realdata_dir if realdata_dir is not None else default_realdata_dir()) / REALDATA_SAMPLE
    if path.is_file():
        import yaml

        cams = yaml.safe_load(path.read_text())["cams"]
        ks = [np.asarray(cams[c]["cam_intrinsic"], dtype=np.float64) for c in NUSCENES_CAMERAS]
        poses = [transform_from_quat(cams[c]["sensor2ego_rotation"], cams[c]["sensor2ego_translation"])
                 for c in NUSCENES_CAMERAS]
        source = f"real nuScenes calibration ({path.parent.name})"
    else:
        ks, poses = _synthetic_cameras()
        source = "synthetic nuScenes-like rig (realdata folder absent)"
    aug = eval_image_transform(NUSCENES_RAW_SIZE, image_size)
    as_tensor = lambda arrays: torch.from_numpy(np.stack(arrays)).float()  # noqa: E731
    return Rig(as_tensor(ks), as_tensor([aug] * len(ks)), as_tensor(poses), source)
