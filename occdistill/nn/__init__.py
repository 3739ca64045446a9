"""Reusable network blocks of the dense (FlashOcc-style) student.

backbone (ResNet) -> neck (FPNNeck) -> view_transform (LSSViewTransformer: depth net, lift,
bev_pool splat) -> bev_encoder (BEVEncoder) -> occ_head (BEVOccHead, Channel-to-Height).
Blocks take plain typed arguments; building them from a config is the model layer's job.
"""

from occdistill.nn.backbone import BasicBlock, Bottleneck, ResNet
from occdistill.nn.bev_encoder import BEVEncoder, BEVResNet, FPNLSSNeck
from occdistill.nn.bev_pool import (
    BEVPoolIndices,
    PrecomputedBEVPool,
    bev_cell_index,
    bev_pool_precomputed,
    bev_pool_scatter,
    precompute_pool_indices,
)
from occdistill.nn.depth_bins import DepthBins
from occdistill.nn.neck import FPNNeck
from occdistill.nn.occ_head import BEVOccHead
from occdistill.nn.view_transform import (
    NUM_CAMERA_PARAMS,
    DepthNet,
    LSSViewTransformer,
    ViewTransformOutput,
    camera_parameters,
)

__all__ = [
    "BEVEncoder", "BEVOccHead", "BEVPoolIndices", "BEVResNet", "BasicBlock", "Bottleneck", "DepthBins",
    "DepthNet", "FPNLSSNeck", "FPNNeck", "LSSViewTransformer", "NUM_CAMERA_PARAMS", "PrecomputedBEVPool",
    "ResNet", "ViewTransformOutput", "bev_cell_index", "bev_pool_precomputed", "bev_pool_scatter",
    "camera_parameters", "precompute_pool_indices",
]
