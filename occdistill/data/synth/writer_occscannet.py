"""Occ-ScanNet on-disk layout of the room preset (paths relative to the output root)::

    train_subscenes.txt, val_subscenes.txt         split lists, one frame pickle per line (ISO names)
    gathered_data/<scene>/<frame:05d>.pkl          per-frame pickle (fields below)
    posed_images/<scene>/<frame:05d>.jpg           RGB image
    posed_images/<scene>/<frame:05d>.png           uint16 z-depth in mm (0 = no return)
    semantic/<scene>/<frame:05d>.png               uint8 Occ-ScanNet class ids

Frame pickle fields: ``img`` and ``depth_gt`` (relative paths of the image and the depth PNG,
as ISO's loader reads them), ``semantic_path``, ``intrinsic`` (3, 3) for the written image
size, ``cam_pose`` (4, 4) camera-to-world (OpenCV camera axes), ``voxel_origin`` (3,) world
position of the grid's minimum corner, ``target_1_4`` (60, 60, 36) uint8 indexed [x, y, z] in
world axes (0 empty, 1..11 classes, 255 unknown), ``target_1_16`` (15, 15, 9) uint8, ``name``
("<scene>/<frame:05d>"), ``scene_name``, and, an occdistill addition, ``mask_camera`` (60, 60,
36) uint8 0/1: voxels observed by the camera's rays (Occ3D's definition).

The frame pickle is written last, so it marks a complete frame.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from occdistill.data.synth.room_frame import RoomFrame
from occdistill.data.synth.writer_occ3d import write_image
from occdistill.io import atomic_write_pickle, atomic_write_text

SPLIT_LISTS = {"train": "train_subscenes.txt", "val": "val_subscenes.txt"}


@dataclass(frozen=True)
class RoomPaths:
    image: str
    depth: str
    semantic: str
    pickle: str

    def all(self) -> list[str]:
        return [self.image, self.depth, self.semantic, self.pickle]


def room_paths(scene_name: str, frame: int) -> RoomPaths:
    stem = f"{scene_name}/{frame:05d}"
    return RoomPaths(f"posed_images/{stem}.jpg", f"posed_images/{stem}.png", f"semantic/{stem}.png", f"gathered_data/{stem}.pkl")


def write_room_frame(root: Path, scene_name: str, frame: int, data: RoomFrame, jpeg_quality: int) -> None:
    paths = room_paths(scene_name, frame)
    write_image(root / paths.image, data.rgb, "JPEG", quality=jpeg_quality)
    write_image(root / paths.depth, data.depth_mm, "PNG", compress_level=1)
    write_image(root / paths.semantic, data.semantic, "PNG", compress_level=1)
    atomic_write_pickle(root / paths.pickle, {
        "img": paths.image,
        "depth_gt": paths.depth,
        "semantic_path": paths.semantic,
        "intrinsic": data.intrinsic,
        "cam_pose": data.cam_pose,
        "voxel_origin": data.voxel_origin,
        "target_1_4": data.target_1_4,
        "target_1_16": data.target_1_16,
        "mask_camera": data.mask_camera,
        "name": f"{scene_name}/{frame:05d}",
        "scene_name": scene_name,
    })


def write_split_list(root: Path, split: str, pickles: list[str]) -> Path:
    return atomic_write_text(root / SPLIT_LISTS[split], "".join(f"{p}\n" for p in pickles))
