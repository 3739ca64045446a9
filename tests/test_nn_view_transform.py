"""LSS view transformer: hand-computed geometry, projection round trip, shapes, fixed-rig path."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from occdistill.geometry import VoxelGrid, invert_rigid, project, resize_matrix
from occdistill.nn.depth_bins import DepthBins
from occdistill.nn.view_transform import NUM_CAMERA_PARAMS, LSSViewTransformer, camera_parameters

# Camera frame x right, y down, z forward; ego x forward, y left, z up. A camera looking along
# +x: cam z -> ego x, cam x -> ego -y, cam y -> ego -z.
CAM_TO_EGO_ROT = np.array([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])


def forward_camera(translation=(0.5, 0.2, 1.5)):
    """Raw 128x64 camera (fx = fy = 200, cx = 64, cy = 32) resized by 0.5 to the 64x32 input."""
    k_raw = torch.tensor([[200.0, 0.0, 64.0], [0.0, 200.0, 32.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    img_from_raw = torch.from_numpy(resize_matrix(0.5))
    ego_from_cam = torch.eye(4, dtype=torch.float64)
    ego_from_cam[:3, :3] = torch.from_numpy(CAM_TO_EGO_ROT)
    ego_from_cam[:3, 3] = torch.tensor(translation, dtype=torch.float64)
    return k_raw[None, None], img_from_raw[None, None], ego_from_cam[None, None]


GRID = VoxelGrid(range=(0.0, -6.0, -1.0, 16.0, 6.0, 3.0), voxel_size=(1.0, 1.0, 0.5))  # X=16, Y=12
BINS = DepthBins(1.0, 21.0, 2.0)  # 10 bins, centres 2, 4, ..., 20


def make_vt(**kwargs):
    args = dict(in_channels=8, context_channels=2, image_size=(32, 64), feature_stride=16, depth_bins=BINS,
                grid=GRID, mid_channels=8)
    args.update(kwargs)
    return LSSViewTransformer(**args)


def test_single_camera_splat_by_hand():
    vt = make_vt()
    k, aug, pose = forward_camera()
    assert vt.feature_size == (2, 4)
    depth = torch.zeros(1, 1, 10, 2, 4)
    depth[:, :, 4] = 1.0  # all mass in bin 4: centre 1 + 4.5 * 2 = 10 m
    context = torch.zeros(1, 1, 2, 2, 4)
    context[0, 0, :, 1, 3] = torch.tensor([3.0, -1.0])
    context[0, 0, :, 0, 0] = torch.tensor([5.0, 7.0])
    bev = vt.splat(depth, context, k, aug, pose)
    assert bev.shape == (1, 2, 16, 12) and bev.dtype == torch.float32
    # K_aug = resize(0.5) @ K_raw: fx = fy = 100, cx = 32, cy = 16.
    # Cell (i=1, j=3) at stride 16 looks through input pixel (56, 24):
    #   ray (56-32)/100 = 0.24, (24-16)/100 = 0.08 -> p_cam = 10 * (0.24, 0.08, 1) = (2.4, 0.8, 10)
    #   p_ego = (10, -2.4, -0.8) + (0.5, 0.2, 1.5) = (10.5, -2.2, 0.7) -> cell x 10, y floor(3.8) = 3
    # Cell (0, 0) looks through pixel (8, 8): ray (-0.24, -0.08) -> p_cam (-2.4, -0.8, 10)
    #   p_ego = (10.5, 2.6, 2.3) -> cell x 10, y floor(8.6) = 8
    expected = torch.zeros(1, 2, 16, 12)
    expected[0, :, 10, 3] = torch.tensor([3.0, -1.0])
    expected[0, :, 10, 8] = torch.tensor([5.0, 7.0])
    torch.testing.assert_close(bev, expected)


def test_points_below_ground_or_beyond_range_are_dropped():
    vt = make_vt()
    k, aug, pose = forward_camera(translation=(0.5, 0.2, -0.2))
    context = torch.ones(1, 1, 2, 2, 4)

    def splat_bin(b):
        depth = torch.zeros(1, 1, 10, 2, 4)
        depth[:, :, b] = 1.0
        return vt.splat(depth, context, k, aug, pose)

    # Rows look through v = 8 (ray y = -0.08) and v = 24 (+0.08); ego z = -0.2 - cam y, so at
    # depth d the top row is at z = -0.2 + 0.08 d and the bottom row at z = -0.2 - 0.08 d.
    assert not splat_bin(9).any()  # 20 m: ego x = 20.5 is beyond the 16 m grid for every cell
    # 6 m: z = 0.28 (top) and -0.68 (bottom), all 8 cells kept, 2 channels of 1 each
    assert torch.isclose(splat_bin(2).sum(), torch.tensor(16.0))
    # 14 m: top z = 0.92 kept, bottom z = -1.32 < -1 dropped (no pooling below the grid)
    bev = splat_bin(6)
    assert torch.isclose(bev.sum(), torch.tensor(8.0))
    assert bev[0, 0, 14].sum() == 4  # x = 14.5 -> cell 14


def test_ego_points_project_back_to_cell_centres():
    vt = make_vt(image_size=(64, 96), feature_stride=16)
    k, aug, pose = forward_camera()
    yaw = torch.tensor([[np.cos(0.3), -np.sin(0.3), 0, 0], [np.sin(0.3), np.cos(0.3), 0, 0], [0, 0, 1, 0],
                        [0, 0, 0, 1]], dtype=torch.float64)
    pose = yaw @ pose  # a rotated camera (as a BEV rotation would give)
    points = vt.ego_points(k, aug, pose)[0, 0].double()  # (D, h, w, 3)
    cam = points @ invert_rigid(pose[0, 0])[:3, :3].T + invert_rigid(pose[0, 0])[:3, 3]
    uv, z = project(cam, aug[0, 0] @ k[0, 0])
    h, w = vt.feature_size
    expected_u = (torch.arange(w, dtype=torch.float64) + 0.5) * 16
    expected_v = (torch.arange(h, dtype=torch.float64) + 0.5) * 16
    torch.testing.assert_close(uv[..., 0], expected_u.expand(10, h, w), atol=1e-4, rtol=0)
    torch.testing.assert_close(uv[..., 1], expected_v[:, None].expand(10, h, w), atol=1e-4, rtol=0)
    torch.testing.assert_close(z, BINS.centers(torch.float64)[:, None, None].expand(10, h, w), atol=1e-5, rtol=1e-6)


@pytest.mark.parametrize("camera_aware", [True, False])
def test_forward_shapes_and_fixed_rig_path(camera_aware):
    torch.manual_seed(0)
    vt = make_vt(camera_aware=camera_aware).eval()
    k, aug, pose = forward_camera()
    # Two cameras: the forward one and one looking backwards, batch of 2 with the same rig.
    back = pose.clone()
    back[..., :3, :3] = torch.diag(torch.tensor([-1.0, -1.0, 1.0], dtype=torch.float64)) @ pose[..., :3, :3]
    k2, aug2, pose2 = (torch.cat([t, u], dim=1).expand(2, -1, -1, -1) for t, u in ((k, k), (aug, aug), (pose, back)))
    feats = torch.randn(2, 2, 8, 2, 4)
    out = vt(feats, k2, aug2, pose2)
    assert out.bev.shape == (2, 2, 16, 12) and out.bev.dtype == torch.float32
    assert out.depth.shape == (2, 2, 10, 2, 4) and out.depth.dtype == torch.float32
    torch.testing.assert_close(out.depth.sum(dim=2), torch.ones(2, 2, 2, 4))
    vt.set_fixed_rig(k2[0], aug2[0], pose2[0])
    fixed = vt(feats, k2, aug2, pose2)
    torch.testing.assert_close(fixed.bev, out.bev, rtol=1e-5, atol=1e-6)
    vt.clear_fixed_rig()
    torch.testing.assert_close(vt(feats, k2, aug2, pose2).bev, out.bev)


def test_camera_parameters_and_errors():
    k, aug, pose = forward_camera()
    params = camera_parameters(k, aug, pose, (32, 64))
    assert params.shape == (1, 1, NUM_CAMERA_PARAMS) and params.dtype == torch.float32
    torch.testing.assert_close(params[0, 0, :4], torch.tensor([100 / 64, 100 / 32, 32 / 64, 16 / 32]))
    with pytest.raises(ValueError, match="multiple of the feature stride"):
        make_vt(image_size=(30, 64))
    with pytest.raises(ValueError, match="expected"):
        make_vt()(torch.randn(1, 1, 8, 3, 4), k, aug, pose)
