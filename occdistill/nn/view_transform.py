"""LSS view transformer: image features -> per-pixel depth distribution x context -> BEV feature.

Lift: a camera-aware depth net predicts, for every feature cell of every camera, a softmax over D
depth bins and C context channels; the frustum feature of (bin, cell) is ``depth * context``.
Splat: each frustum point is placed in the ego frame and summed into its BEV cell
(:mod:`occdistill.nn.bev_pool`).

Geometry (pixel convention of occdistill/geometry/camera.py: pixel (c, r) covers
[c, c+1) x [r, r+1)): feature cell (i, j) at stride s looks along the ray of input pixel
``((j + 0.5) s, (i + 0.5) s)``; bin k puts it at z-depth ``d_k`` (bin centre, see depth_bins.py):

    p_cam = d_k * inv(K_aug) @ (u, v, 1),   K_aug = img_from_raw @ K   (affine image augmentation)
    p_ego = ego_from_cam[:3, :3] @ p_cam + ego_from_cam[:3, 3]

``ego_from_cam`` already includes any BEV augmentation (flip/rotation of the ego frame).

Shapes: B batch, N cameras, C channels, D depth bins, H W input image, h w feature map
(h = H / stride), X Y BEV cells.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from occdistill.geometry import VoxelGrid
from occdistill.nn.backbone import BasicBlock
from occdistill.nn.bev_pool import PrecomputedBEVPool, bev_pool_scatter, precompute_pool_indices
from occdistill.nn.depth_bins import DepthBins
from occdistill.nn.ground_sample import GroundProjection, GroundSampler

NUM_CAMERA_PARAMS = 20
"""Length of the camera-parameter vector of :func:`camera_parameters`."""


def camera_parameters(
    intrinsics: torch.Tensor, img_from_raw: torch.Tensor, ego_from_cam: torch.Tensor, image_size: tuple[int, int]
) -> torch.Tensor:
    """Camera description for the camera-aware depth net: (B, N, 20) float32.

    - augmented intrinsics fx, fy, cx, cy divided by the input width/height (4): with them the
      net can turn apparent size into metric depth whatever the resize/crop was; dividing by the
      image size keeps the values O(1) without batch statistics (BEVDepth's BatchNorm1d needs
      more than one camera per batch in training);
    - the linear 2x2 block of ``img_from_raw`` (4): scale, flip and rotation of the image content
      (its translation, the crop, is already in cx, cy);
    - ``ego_from_cam`` rotation and translation (12): mounting pose, height above ground.
    """
    # float32 throughout: these feed an MLP, and an exported graph must not contain float64 ops
    # (TensorRT has none).
    height, width = image_size
    k_aug = img_from_raw.float() @ intrinsics.float()
    scale = k_aug.new_tensor([width, height, width, height])
    k_vec = torch.stack([k_aug[..., 0, 0], k_aug[..., 1, 1], k_aug[..., 0, 2], k_aug[..., 1, 2]], dim=-1) / scale
    aug_vec = img_from_raw[..., :2, :2].float().flatten(-2)
    pose_vec = ego_from_cam[..., :3, :4].float().flatten(-2)
    return torch.cat([k_vec, aug_vec, pose_vec], dim=-1)


class _CameraGate(nn.Module):
    """SE-style channel gate from the camera parameters (BEVDepth's camera-aware depth net):
    (B', P) -> sigmoid(MLP) in (0, 1) multiplying the (B', C, h, w) features per channel."""

    def __init__(self, num_params: int, channels: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(num_params, channels), nn.ReLU(inplace=True), nn.Linear(channels, channels))

    def forward(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.mlp(params))[:, :, None, None]


class DepthNet(nn.Module):
    """Depth + context prediction from image features.

    reduce (3x3 conv + BN + ReLU) -> [camera gate] -> BasicBlock(s) -> 1x1 conv to D depth logits;
    reduce -> [camera gate] -> 1x1 conv to C context channels. FlashOcc M0/M1 use a single 1x1
    conv (no camera awareness); BEVDepth-style variants add the gate and residual blocks.

    Forward: features (B', C_in, h, w), camera parameters (B', P) or None ->
    (depth logits (B', D, h, w), context (B', C, h, w)).
    """

    def __init__(
        self,
        in_channels: int,
        mid_channels: int,
        num_bins: int,
        context_channels: int,
        camera_aware: bool = True,
        num_blocks: int = 1,
    ):
        super().__init__()
        self.camera_aware = camera_aware
        self.reduce = nn.Sequential(
            nn.Conv2d(in_channels, mid_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(mid_channels),
            nn.ReLU(inplace=True),
        )
        if camera_aware:
            self.depth_gate = _CameraGate(NUM_CAMERA_PARAMS, mid_channels)
            self.context_gate = _CameraGate(NUM_CAMERA_PARAMS, mid_channels)
        self.depth_blocks = nn.Sequential(*(BasicBlock(mid_channels, mid_channels) for _ in range(num_blocks)))
        self.depth_out = nn.Conv2d(mid_channels, num_bins, 1)
        self.context_out = nn.Conv2d(mid_channels, context_channels, 1)

    def forward(self, x: torch.Tensor, camera_params: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.reduce(x)
        depth_in, context_in = x, x
        if self.camera_aware:
            if camera_params is None:
                raise ValueError("a camera-aware DepthNet needs camera parameters")
            depth_in = self.depth_gate(x, camera_params)
            context_in = self.context_gate(x, camera_params)
        return self.depth_out(self.depth_blocks(depth_in)), self.context_out(context_in)


@dataclass(frozen=True)
class FixedRigPlans:
    """What :meth:`LSSViewTransformer.set_fixed_rig` precomputes: the pooling plan and, with the
    ground branch, the ground projection. Both None: per-batch geometry (training path)."""

    pool: PrecomputedBEVPool | None = None
    ground: GroundProjection | None = None


@dataclass
class ViewTransformOutput:
    """bev: (B, C, X, Y) pooled BEV feature; depth: (B, N, D, h, w) softmax over depth bins."""

    bev: torch.Tensor
    depth: torch.Tensor


class LSSViewTransformer(nn.Module):
    """Camera-aware LSS lift + BEV splat.

    Args:
        in_channels: channels of the neck features.
        context_channels: C of the BEV output (FlashOcc M0/M1: 64).
        image_size: (H, W) of the network input (after augmentation), e.g. (256, 704).
        feature_stride: input pixels per feature cell (FlashOcc: 16).
        depth_bins: :class:`DepthBins` (FlashOcc M0: (1, 45, 1.0) = 44 bins).
        grid: BEV grid; its x/y cells are the output cells, its z range the pooled pillar.
        mid_channels: width of the depth net.
        camera_aware: gate the depth net with the camera parameters (BEVDepth).
        num_depth_blocks: residual blocks in the depth branch.
        ground_height: None (FlashOcc), or the ego-frame height (m) of the ground plane whose
            backward projection (:class:`occdistill.nn.ground_sample.GroundSampler`, its own 1x1
            conv of the features) is added to the splat: every camera-visible cell gets the
            features of where its ground point is seen, not only the cells frustum points reach.

    Forward: features (B, N, C_in, h, w), intrinsics (B, N, 3, 3), img_from_raw (B, N, 3, 3),
    ego_from_cam (B, N, 4, 4) -> :class:`ViewTransformOutput`.

    Pooling uses :func:`bev_pool_scatter` on the geometry of the batch, unless a fixed rig was set
    with :meth:`set_fixed_rig`: then the precomputed, ONNX-exportable plan is used and the camera
    matrices only feed the camera-aware gate (they must describe that same rig).

    The frustum feature (B, N, D, h, w, C) is materialised: 47 MB per sample in float32 at
    FlashOcc M0 sizes (6 x 44 x 16 x 44 x 64), twice that at M1.
    """

    def __init__(
        self,
        in_channels: int,
        context_channels: int,
        image_size: tuple[int, int],
        feature_stride: int,
        depth_bins: DepthBins,
        grid: VoxelGrid,
        mid_channels: int = 256,
        camera_aware: bool = True,
        num_depth_blocks: int = 1,
        ground_height: float | None = None,
    ):
        super().__init__()
        height, width = image_size
        if height % feature_stride or width % feature_stride:
            raise ValueError(f"image size {image_size} is not a multiple of the feature stride {feature_stride}")
        self.image_size = (int(height), int(width))
        self.feature_size = (height // feature_stride, width // feature_stride)
        self.feature_stride = feature_stride
        self.depth_bins = depth_bins
        self.grid = grid
        self.context_channels = context_channels
        self.depth_net = DepthNet(
            in_channels, mid_channels, depth_bins.num_bins, context_channels, camera_aware, num_depth_blocks
        )
        self.register_buffer("frustum", self._make_frustum(), persistent=False)
        self.fixed_pool: PrecomputedBEVPool | None = None
        # Created only when on, so that a FlashOcc view transformer keeps its exact state-dict keys.
        self.ground: GroundSampler | None = None
        if ground_height is not None:
            self.ground = GroundSampler(in_channels, context_channels, grid, self.image_size, ground_height)

    def _make_frustum(self) -> torch.Tensor:
        """(D, h, w, 3) homogeneous pixel rays scaled by depth: (u*d, v*d, d) at cell centres."""
        h, w = self.feature_size
        s = self.feature_stride
        d = self.depth_bins.centers(torch.float64).view(-1, 1, 1)
        u = ((torch.arange(w, dtype=torch.float64) + 0.5) * s).view(1, 1, w)
        v = ((torch.arange(h, dtype=torch.float64) + 0.5) * s).view(1, h, 1)
        shape = (d.shape[0], h, w)
        return torch.stack([(u * d).expand(shape), (v * d).expand(shape), d.expand(shape)], dim=-1).float()

    def ego_points(
        self, intrinsics: torch.Tensor, img_from_raw: torch.Tensor, ego_from_cam: torch.Tensor
    ) -> torch.Tensor:
        """Ego positions of all frustum points: (B, N, 3, 3), (B, N, 3, 3), (B, N, 4, 4) -> (B, N, D, h, w, 3).

        The 3x3 chain (augmentation, inverse intrinsics, rotation) is combined in float64, the
        precision the calibration is stored in (DESIGN.md section 3); only the per-point product
        runs in float32.
        """
        k_aug = img_from_raw.double() @ intrinsics.double()
        ego_from_pix = (ego_from_cam[..., :3, :3].double() @ torch.linalg.inv(k_aug)).float()  # (B, N, 3, 3)
        trans = ego_from_cam[..., :3, 3].float()  # (B, N, 3)
        points = torch.einsum("bnij,dhwj->bndhwi", ego_from_pix, self.frustum)
        return points + trans[:, :, None, None, None, :]

    @torch.no_grad()
    def set_fixed_rig(self, intrinsics: torch.Tensor, img_from_raw: torch.Tensor, ego_from_cam: torch.Tensor) -> None:
        """Precompute the pooling plan of one rig: (N, 3, 3), (N, 3, 3), (N, 4, 4). Deployment only.

        The plan is built on the module's device; later ``.to()`` calls move it like any buffer.
        """
        device = self.frustum.device
        cams = (t.to(device)[None] for t in (intrinsics, img_from_raw, ego_from_cam))
        points = self.ego_points(*cams)[0]  # (N, D, h, w, 3)
        self.fixed_pool = PrecomputedBEVPool(precompute_pool_indices(points, self.grid))
        if self.ground is not None:
            self.ground.set_fixed_rig(intrinsics, img_from_raw, ego_from_cam)

    def clear_fixed_rig(self) -> None:
        """Return to per-batch geometry (training path)."""
        self.use_plans(FixedRigPlans())

    def fixed_plans(self) -> FixedRigPlans:
        """The plans in use (to switch between paths and restore them: deploy.bench)."""
        return FixedRigPlans(pool=self.fixed_pool, ground=self.ground.fixed() if self.ground is not None else None)

    def use_plans(self, plans: FixedRigPlans) -> None:
        """Put both paths on ``plans`` (empty: per-batch geometry for the splat and the ground branch)."""
        self.fixed_pool = plans.pool
        if self.ground is not None:
            self.ground.use_fixed(plans.ground)

    def add_ground(self, bev: torch.Tensor, features: torch.Tensor, intrinsics: torch.Tensor,
                   img_from_raw: torch.Tensor, ego_from_cam: torch.Tensor) -> torch.Tensor:
        """The splat (B, C, X, Y) plus the ground-plane sample of the features (B, N, C_in, h, w),
        or the splat unchanged without a ground branch."""
        if self.ground is None:
            return bev
        return bev + self.ground(features, intrinsics, img_from_raw, ego_from_cam).to(bev.dtype)

    def splat(
        self,
        depth: torch.Tensor,
        context: torch.Tensor,
        intrinsics: torch.Tensor,
        img_from_raw: torch.Tensor,
        ego_from_cam: torch.Tensor,
    ) -> torch.Tensor:
        """depth (B, N, D, h, w), context (B, N, C, h, w) + cameras -> BEV (B, C, X, Y).

        Runs in at least float32 (mixed precision must not reach the sums of ~1e5 points).
        """
        dtype = torch.promote_types(depth.dtype, torch.float32)
        # (B, N, C, h, w) -> (B, N, h, w, C); frustum (B, N, 1, h, w, C) * (B, N, D, h, w, 1)
        ctx = context.to(dtype).permute(0, 1, 3, 4, 2)
        frustum = ctx[:, :, None] * depth.to(dtype)[..., None]  # (B, N, D, h, w, C)
        if self.fixed_pool is not None:
            return self.fixed_pool(frustum)
        return bev_pool_scatter(frustum, self.ego_points(intrinsics, img_from_raw, ego_from_cam), self.grid)

    def forward(
        self,
        features: torch.Tensor,
        intrinsics: torch.Tensor,
        img_from_raw: torch.Tensor,
        ego_from_cam: torch.Tensor,
    ) -> ViewTransformOutput:
        batch, cams, channels, h, w = features.shape
        if (h, w) != self.feature_size:
            raise ValueError(f"features are {h}x{w}, expected {self.feature_size} for input {self.image_size} "
                             f"at stride {self.feature_stride}")
        params = None
        if self.depth_net.camera_aware:
            params = camera_parameters(intrinsics, img_from_raw, ego_from_cam, self.image_size)
            params = params.to(features.dtype).reshape(batch * cams, -1)  # (B*N, P)
        depth_logits, context = self.depth_net(features.reshape(batch * cams, channels, h, w), params)
        depth = depth_logits.softmax(dim=1).view(batch, cams, -1, h, w)  # (B*N, D, h, w) -> (B, N, D, h, w)
        context = context.view(batch, cams, self.context_channels, h, w)  # (B*N, C, h, w) -> (B, N, C, h, w)
        bev = self.splat(depth, context, intrinsics, img_from_raw, ego_from_cam)
        bev = self.add_ground(bev, features, intrinsics, img_from_raw, ego_from_cam)
        return ViewTransformOutput(bev=bev, depth=depth)
