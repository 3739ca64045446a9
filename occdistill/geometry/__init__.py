"""Pure geometry: rigid transforms named ``b_from_a``, camera projection, image-augmentation
matrices and the voxel grid spec (DESIGN.md section 3). Works on numpy float64 and on torch tensors.
"""

from occdistill.geometry.camera import (
    crop_matrix,
    hflip_matrix,
    img_from_ego_matrices,
    project,
    resize_matrix,
    rotate_matrix,
    unproject,
)
from occdistill.geometry.grid import OCC3D_GRID, VoxelGrid
from occdistill.geometry.transforms import (
    check_rigid,
    invert_rigid,
    make_transform,
    quat_to_rotmat,
    rotmat_to_quat,
    transform_from_quat,
    transform_points,
    yaw_transform,
)

__all__ = [
    "OCC3D_GRID", "VoxelGrid", "check_rigid", "crop_matrix", "hflip_matrix", "img_from_ego_matrices", "invert_rigid",
    "make_transform", "project", "quat_to_rotmat", "resize_matrix", "rotate_matrix",
    "rotmat_to_quat", "transform_from_quat", "transform_points", "unproject", "yaw_transform",
]
