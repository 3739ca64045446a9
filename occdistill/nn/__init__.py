"""Reusable network blocks of the dense (FlashOcc-style) student.

backbone (ResNet) -> neck (FPNNeck) -> view_transform (LSSViewTransformer: depth net, lift,
bev_pool splat) -> [temporal (TemporalFusion of warped earlier BEVs)] -> bev_encoder (BEVEncoder) ->
occ_head (BEVOccHead, Channel-to-Height).
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
from occdistill.nn.temporal import BEVHistory, HistoryLimits, TemporalFusion, cur_from_prev_transform, warp_bev
from occdistill.nn.view_transform import (
    NUM_CAMERA_PARAMS,
    DepthNet,
    LSSViewTransformer,
    ViewTransformOutput,
    camera_parameters,
)

__all__ = [
    "BEVEncoder", "BEVHistory", "BEVOccHead", "BEVPoolIndices", "BEVResNet", "BasicBlock", "Bottleneck",
    "DepthBins", "DepthNet", "FPNLSSNeck", "FPNNeck", "HistoryLimits", "LSSViewTransformer", "NUM_CAMERA_PARAMS",
    "PrecomputedBEVPool", "ResNet", "TemporalFusion", "ViewTransformOutput", "bev_cell_index",
    "bev_pool_precomputed", "bev_pool_scatter", "camera_parameters", "cur_from_prev_transform",
    "precompute_pool_indices", "warp_bev",
]
