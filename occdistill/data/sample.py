"""The data contract between readers and models: one frame (:class:`Sample`) and a stacked batch
(:class:`Batch`, leading dimension B).

Frames (DESIGN.md section 3):
- ``keyego_from_cam`` maps camera points to the ego frame at the keyframe (LiDAR) time, through the
  camera-time ego pose; it is the raw calibration, before BEV augmentation.
- ``bda`` (4, 4) maps that key ego frame to the augmented ego frame (identity at evaluation). It is
  a similarity (rotation, uniform scale, mirror), not always rigid.
- Everything describing the world content of the sample -- ``semantics``, the masks,
  ``lidar_origin`` -- lives in the augmented ego frame, so the model's camera pose is
  ``ego_from_cam = bda @ keyego_from_cam`` (property below).
- ``global_from_ego`` is the raw key ego pose (so ``global_from_augego = global_from_ego @ inv(bda)``).
  It stays float64: global translations are kilometres, where float32 rounds to centimetres;
  compose relative poses in float64 and cast after.
- Pixels: ``img_from_raw`` (N, 3, 3) is the image augmentation, ``intrinsics`` the raw K, so the
  augmented intrinsics are ``img_from_raw @ intrinsics`` (property ``aug_intrinsics``). Images,
  depth and semantic maps are all in augmented pixels.

Letters: B batch, N cameras, H W image, X Y Z voxels.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence

import torch

from occdistill.errors import DataError

_MASKS = ("mask_camera", "mask_lidar", "mask_known")
_META = ("token", "scene_name", "timestamp", "frame_index", "camera_names")


@dataclass
class Sample:
    """One frame, ready for the model. Tensors are on the CPU as produced by the readers.

    images (N, 3, H, W) float32 in [0, 1] (normalisation is the model's job);
    intrinsics (N, 3, 3) float32 raw K; img_from_raw (N, 3, 3) float32;
    keyego_from_cam (N, 4, 4) float32; bda (4, 4) float32; global_from_ego (4, 4) float64;
    lidar_origin (3,) float32: origin of the range sensor in the augmented ego frame (LiDAR on
    Occ3D, used for RayIoU; the camera centre on Occ-ScanNet);
    semantics (X, Y, Z) int64 class ids (Occ-ScanNet keeps 255 = unknown);
    mask_camera / mask_lidar (X, Y, Z) bool (Occ3D; None elsewhere);
    mask_known (X, Y, Z) bool, labels != 255 (Occ-ScanNet: ignored in training, counted as empty
    by the ISO metric; None on Occ3D);
    depth (N, H, W) float32 metres, 0 = no target;
    semantic_maps (N, H, W) int64 class ids per pixel, 255 where unknown (synthetic data only).
    """

    token: str
    scene_name: str
    timestamp: int  # microseconds on nuScenes; the frame number on Occ-ScanNet
    frame_index: int  # position in the dataset (frames sorted by scene, then time)
    camera_names: tuple[str, ...]
    images: torch.Tensor
    intrinsics: torch.Tensor
    img_from_raw: torch.Tensor
    keyego_from_cam: torch.Tensor
    bda: torch.Tensor
    global_from_ego: torch.Tensor
    lidar_origin: torch.Tensor
    semantics: torch.Tensor | None = None
    mask_camera: torch.Tensor | None = None
    mask_lidar: torch.Tensor | None = None
    mask_known: torch.Tensor | None = None
    depth: torch.Tensor | None = None
    semantic_maps: torch.Tensor | None = None

    def __post_init__(self) -> None:
        n, c, h, w = self.images.shape
        expect = {
            "images": ((n, 3, h, w), torch.float32),
            "intrinsics": ((n, 3, 3), torch.float32),
            "img_from_raw": ((n, 3, 3), torch.float32),
            "keyego_from_cam": ((n, 4, 4), torch.float32),
            "bda": ((4, 4), torch.float32),
            "global_from_ego": ((4, 4), torch.float64),
            "lidar_origin": ((3,), torch.float32),
            "depth": ((n, h, w), torch.float32),
            "semantic_maps": ((n, h, w), torch.int64),
        }
        if self.semantics is not None:
            expect["semantics"] = (tuple(self.semantics.shape), torch.int64)
            for name in _MASKS:
                expect[name] = (tuple(self.semantics.shape), torch.bool)
        if len(self.camera_names) != n:
            raise ValueError(f"sample {self.token}: {len(self.camera_names)} camera names for {n} images")
        for name, (shape, dtype) in expect.items():
            t = getattr(self, name)
            if t is None:
                continue
            if tuple(t.shape) != shape or t.dtype != dtype:
                raise ValueError(
                    f"sample {self.token}: {name} is {tuple(t.shape)} {t.dtype}, expected {shape} {dtype}"
                )
        if self.semantics is None and any(getattr(self, k) is not None for k in _MASKS):
            raise ValueError(f"sample {self.token}: masks given without semantics")

    @property
    def ego_from_cam(self) -> torch.Tensor:
        """(N, 4, 4) camera -> augmented ego: the pose the model must use."""
        return self.bda @ self.keyego_from_cam

    @property
    def aug_intrinsics(self) -> torch.Tensor:
        """(N, 3, 3) intrinsics of the augmented images."""
        return self.img_from_raw @ self.intrinsics


@dataclass
class Batch:
    """Samples stacked along a leading B; field meanings, frames and dtypes as in :class:`Sample`.

    images (B, N, 3, H, W); intrinsics, img_from_raw (B, N, 3, 3); keyego_from_cam (B, N, 4, 4);
    bda (B, 4, 4); global_from_ego (B, 4, 4) float64; lidar_origin (B, 3);
    semantics, masks (B, X, Y, Z); depth, semantic_maps (B, N, H, W);
    timestamps, frame_indices (B,) int64.
    """

    tokens: tuple[str, ...]
    scene_names: tuple[str, ...]
    timestamps: torch.Tensor
    frame_indices: torch.Tensor
    camera_names: tuple[tuple[str, ...], ...]
    images: torch.Tensor
    intrinsics: torch.Tensor
    img_from_raw: torch.Tensor
    keyego_from_cam: torch.Tensor
    bda: torch.Tensor
    global_from_ego: torch.Tensor
    lidar_origin: torch.Tensor
    semantics: torch.Tensor | None = None
    mask_camera: torch.Tensor | None = None
    mask_lidar: torch.Tensor | None = None
    mask_known: torch.Tensor | None = None
    depth: torch.Tensor | None = None
    semantic_maps: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def ego_from_cam(self) -> torch.Tensor:
        """(B, N, 4, 4) camera -> augmented ego."""
        return self.bda[:, None] @ self.keyego_from_cam

    @property
    def aug_intrinsics(self) -> torch.Tensor:
        """(B, N, 3, 3)."""
        return self.img_from_raw @ self.intrinsics

    def _map_tensors(self, fn) -> "Batch":
        changes = {
            f.name: fn(getattr(self, f.name))
            for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        return dataclasses.replace(self, **changes)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        """A copy with every tensor on ``device``; dtypes are kept (global_from_ego stays float64)."""
        return self._map_tensors(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "Batch":
        """Called by ``DataLoader(pin_memory=True)``."""
        return self._map_tensors(lambda t: t.pin_memory())


def collate(samples: Sequence[Sample]) -> Batch:
    """Stack samples into a :class:`Batch` (use as ``DataLoader(collate_fn=collate)``).

    Optional fields must be present in all samples or in none, and shapes must agree; otherwise a
    :class:`DataError` names the offending sample.
    """
    if not samples:
        raise DataError("collate: empty list of samples")
    first = samples[0]
    stacked = {}
    tensor_fields = [f.name for f in dataclasses.fields(Sample) if f.name not in _META]
    for name in tensor_fields:
        values = [getattr(s, name) for s in samples]
        present = [v is not None for v in values]
        if not any(present):
            stacked[name] = None
            continue
        if not all(present):
            bad = samples[present.index(False)]
            raise DataError(f"collate: sample {bad.token} has no {name} but sample {first.token} has one")
        for s, v in zip(samples, values):
            if v.shape != values[0].shape:
                raise DataError(
                    f"collate: sample {s.token} has {name} of shape {tuple(v.shape)}, "
                    f"sample {first.token} has {tuple(values[0].shape)}"
                )
        stacked[name] = torch.stack(values)
    return Batch(
        tokens=tuple(s.token for s in samples),
        scene_names=tuple(s.scene_name for s in samples),
        timestamps=torch.tensor([s.timestamp for s in samples], dtype=torch.int64),
        frame_indices=torch.tensor([s.frame_index for s in samples], dtype=torch.int64),
        camera_names=tuple(s.camera_names for s in samples),
        **stacked,
    )
