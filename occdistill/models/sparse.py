"""The sparse-query student (OPUS style) and its teacher variant, with DiScene's depth-prior branch.

images (B, N, 3, H, W) in [0, 1] -> ResNet -> multi-level FPN (L levels, C_f channels)
-> Q learnable initial points (one per query) -> decoder layers; layer l gives every query a set
of R_l points (coarse to fine, e.g. 1, 2, 4, 8) with class logits over the K_occ occupied classes
-> :func:`voxelize`: points with a confident class near their query centre are scattered into the
voxel grid (score averaging per voxel, morphological closing) -> labels (B, X, Y, Z).

Free space: the model predicts only occupied classes (K_occ = K - 1 channels: the dataset's class
table without its free/empty class). Points exist only where the model believes something is;
every voxel no confident point lands in is free (``free_index``), as in OPUS.

Depth prior (DiScene†, ``cfg.depth_prior``): the decoder adds an MLP feature of (projected depth,
prior depth at the projected pixel) to every query. The prior map is an input, (B, N, H, W) metres:
no pretrained monocular depth network (Depth-Anything-V2, Metric3D) ships with this project or can
be downloaded here, so the map comes from the dataset (the synthetic world's rendered depth, or
Occ-ScanNet's sensor depth) or from a separate depth model run beforehand.

Extra query groups (DiScene prior- and anchor-level distillation) are decoded in separate passes
from the same image features, so they never attend to the main queries and never enter the main
outputs, the task loss or the voxelisation.

Letters: B batch, N cameras, C channels, L levels, Q queries, R points per query, K classes,
X Y Z voxels, H W image, h w feature map.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from occdistill.geometry.grid import VoxelGrid
from occdistill.models.dense import BackboneConfig, GridConfig
from occdistill.nn.backbone import ResNet
from occdistill.nn.sparse_decoder import MultiLevelFPN, SparseDecoderLayer

# ImageNet statistics, as the dense student (a checkpoint trained elsewhere drops in unchanged).
_MEAN = (0.485, 0.456, 0.406)
_STD = (0.229, 0.224, 0.225)


# Nested sections get their own classes because the config loader builds a section from its
# class defaults: ``backbone.depth=18`` must keep four stages, ``grid.voxel_size=...`` the
# Occ-ScanNet range.
@dataclass(frozen=True)
class SparseBackboneConfig(BackboneConfig):
    """ResNet settings; all four stages by default (the decoder samples four FPN levels)."""

    out_indices: tuple[int, ...] = (0, 1, 2, 3)


@dataclass(frozen=True)
class SparseGridConfig(GridConfig):
    """Voxel grid; defaults to the Occ-ScanNet label grid in the project's ego frame
    (``occdistill.data.occscannet.scannet_grid``: 60 x 60 x 36 at 0.08 m, origin at the bottom centre)."""

    range: tuple[float, float, float, float, float, float] = (-2.4, -2.4, 0.0, 2.4, 2.4, 2.88)
    voxel_size: tuple[float, float, float] = (0.08, 0.08, 0.08)


@dataclass(frozen=True)
class SparseOccConfig:
    """Defaults: the DiScene student on Occ-ScanNet (``discene_960x16_student_r50``): R50 + 4-level
    FPN (256), Q = 960, 6 layers with 1, 2, 4, 8, 16, 16 points per query, 4 groups x 16 sampling
    points, 480x640 input, 12-class table with free = 0 (11 predicted classes).
    """

    image_size: tuple[int, int] = (480, 640)  # (H, W) network input
    backbone: SparseBackboneConfig = field(default_factory=SparseBackboneConfig)
    neck_channels: int = 256  # C_f of every FPN level (split into num_groups for sampling)
    num_queries: int = 960
    embed_dims: int = 256
    points_per_layer: tuple[int, ...] = (1, 2, 4, 8, 16, 16)  # R_l; one decoder layer per entry
    num_groups: int = 4  # G sampling groups (feature channels split G ways)
    sampling_points: int = 16  # P sampling points per group and query
    mixing_out_points: int = 32  # AdaMixer point-mixing output size
    num_heads: int = 8
    ffn_channels: int = 512
    dropout: float = 0.1
    offset_scale: float = 0.5  # regressed point offsets (metres) are multiplied by this
    detach_query_features: bool = False  # DiScene† detaches query features between layers
    depth_prior: bool = False  # DiScene† depth branch: forward needs prior_depth
    depth_prior_scale: float = 10.0  # metres; depth inputs of the branch are divided by it
    grid: SparseGridConfig = field(default_factory=SparseGridConfig)
    num_classes: int = 12  # the dataset's class table, free class included
    free_index: int = 0  # Occ-ScanNet empty = 0; Occ3D free = 17
    score_threshold: float = 0.5  # inference: a point/voxel counts when some class prob exceeds this
    centre_distance_threshold: float = 0.6  # inference: metres from the query centre (DiScene 0.6, OPUS 3.0)
    closing: bool = True  # inference: morphological closing of the voxel scores (OPUS "padding")

    def __post_init__(self) -> None:
        if len(self.image_size) != 2 or min(self.image_size) < 1:
            raise ValueError(f"image_size must be (H, W), got {self.image_size}")
        if not self.points_per_layer or min(self.points_per_layer) < 1:
            raise ValueError(f"points_per_layer must be a non-empty tuple of positive counts, got {self.points_per_layer}")
        if self.num_queries < 1 or self.embed_dims < 1:
            raise ValueError("num_queries and embed_dims must be positive")
        if self.neck_channels % self.num_groups:
            raise ValueError(f"neck_channels {self.neck_channels} must be divisible by num_groups {self.num_groups}")
        if self.embed_dims % self.num_heads or self.embed_dims % 2:
            raise ValueError(f"embed_dims {self.embed_dims} must be even and divisible by num_heads {self.num_heads}")
        if not 0 <= self.free_index < self.num_classes or self.num_classes < 2:
            raise ValueError(f"free_index {self.free_index} must index the {self.num_classes}-class table (K >= 2)")
        if not 0.0 < self.score_threshold < 1.0:
            raise ValueError(f"score_threshold must be in (0, 1), got {self.score_threshold}")
        if self.centre_distance_threshold <= 0 or self.depth_prior_scale <= 0 or not 0 <= self.dropout < 1:
            raise ValueError("centre_distance_threshold and depth_prior_scale must be > 0, dropout in [0, 1)")

    @property
    def num_layers(self) -> int:
        return len(self.points_per_layer)


def sparse_teacher_config(student: SparseOccConfig, query_factor: int = 2) -> SparseOccConfig:
    """The teacher preset: the student's decoder (same embed dims, layers, points per query, so
    teacher-guided initialisation copies every decoder tensor) with a deeper backbone (ResNet
    18 -> 34 -> 50 -> 101) and ``query_factor`` times the queries (more points in total).

    DiScene's teacher is InternImage-XL, which needs DCNv3 CUDA ops and pretrained weights; a
    deeper ResNet stands in for it here.
    """
    deeper = {18: 34, 34: 50, 50: 101, 101: 101}[student.backbone.depth]
    return dataclasses.replace(
        student,
        backbone=dataclasses.replace(student.backbone, depth=deeper),
        num_queries=student.num_queries * query_factor,
    )


def tiny_sparse_config(**overrides) -> SparseOccConfig:
    """A CPU-sized student for tests and demos on the synthetic room (96x128 input, Occ-ScanNet
    grid and classes): ResNet-18 at base width 16, 64-channel FPN, 64 queries, 4 layers with
    1, 2, 4, 8 points per query (512 points)."""
    cfg = SparseOccConfig(
        image_size=(96, 128),
        backbone=SparseBackboneConfig(depth=18, base_width=16),
        neck_channels=64,
        num_queries=64,
        embed_dims=64,
        points_per_layer=(1, 2, 4, 8),
        num_groups=4,
        sampling_points=4,
        mixing_out_points=8,
        num_heads=4,
        ffn_channels=128,
    )
    return dataclasses.replace(cfg, **overrides)


@dataclass(frozen=True)
class OccClasses:
    """How the K_occ predicted channels map to the dataset's class table: channel c is the c-th
    label of the table once ``free_index`` is removed. Labels outside 0..K-1 (Occ-ScanNet 255) are
    unknown: neither free nor occupied."""

    num_classes: int
    free_index: int

    @property
    def occupied_labels(self) -> tuple[int, ...]:
        return tuple(c for c in range(self.num_classes) if c != self.free_index)

    @property
    def num_channels(self) -> int:
        return self.num_classes - 1

    def channel_labels(self, device=None) -> torch.Tensor:
        """(K_occ,) int64: dataset label of each channel."""
        return torch.tensor(self.occupied_labels, dtype=torch.int64, device=device)

    def occupied(self, labels: torch.Tensor) -> torch.Tensor:
        """Bool mask of occupied voxels (known, not free)."""
        return (labels >= 0) & (labels < self.num_classes) & (labels != self.free_index)

    def to_channels(self, labels: torch.Tensor) -> torch.Tensor:
        """Dataset labels of occupied voxels -> channel indices (labels above free shift down by 1)."""
        return labels - (labels > self.free_index).long()


@dataclass
class LayerOutput:
    """One decoder layer: points (B, Q, R, 3) metres in the ego frame; logits (B, Q, R, K_occ)
    (sigmoid scores); centres (B, Q, 3) = mean of the query's points; features (B, Q, C)."""

    points: torch.Tensor
    logits: torch.Tensor
    centres: torch.Tensor
    features: torch.Tensor


@dataclass
class QueryGroupOutput:
    """A decoded query group: its initial points (B, Q_g, 3) metres and one output per layer."""

    init_points: torch.Tensor
    layers: list[LayerOutput]


@dataclass
class SparseOutput:
    """Model outputs.

    init_points (B, Q, 3) metres (differentiable w.r.t. the learnable initial points; the decoder
    itself reads them detached, as OPUS); layers: one :class:`LayerOutput` per decoder layer, the
    last is the prediction; image_features: L neck levels (B, N, C_f, h_l, w_l) for encoder-level
    distillation; extra: decoded extra query groups by name (never part of the task loss or the
    prediction); grid and classes: what the points and channels mean.
    """

    init_points: torch.Tensor
    layers: list[LayerOutput]
    image_features: list[torch.Tensor]
    extra: dict[str, QueryGroupOutput]
    grid: VoxelGrid
    classes: OccClasses

    @property
    def final(self) -> LayerOutput:
        return self.layers[-1]


@dataclass
class ExtraQueries:
    """Extra query groups decoded besides the main queries: name -> initial points (B, Q_g, 3) in
    metres in the model's ego frame (e.g. ``prior``: the teacher's initial points; ``anchor``:
    points sampled from GT occupied voxels). Each group starts from zero query features, R = 1."""

    groups: dict[str, torch.Tensor]


class SparseOccStudent(nn.Module):
    """OPUS-style sparse-query occupancy model (student, or teacher with a larger config)."""

    def __init__(self, cfg: SparseOccConfig):
        super().__init__()
        self.cfg = cfg
        self.grid = cfg.grid.voxel_grid()
        self.classes = OccClasses(cfg.num_classes, cfg.free_index)
        self.backbone = ResNet(
            depth=cfg.backbone.depth,
            out_indices=cfg.backbone.out_indices,
            base_width=cfg.backbone.base_width,
            frozen_stages=cfg.backbone.frozen_stages,
            with_checkpoint=cfg.backbone.with_checkpoint,
        )
        self.neck = MultiLevelFPN(self.backbone.out_channels, cfg.neck_channels)
        # Normalised [0, 1]^3 over the grid, uniform at start (OPUS ``init_points``).
        self.init_points = nn.Parameter(torch.rand(cfg.num_queries, 3))
        previous = (1,) + tuple(cfg.points_per_layer[:-1])
        self.decoder = nn.ModuleList(
            SparseDecoderLayer(
                embed_dims=cfg.embed_dims,
                feat_channels=cfg.neck_channels,
                num_classes=self.classes.num_channels,
                num_points_in=r_in,
                num_points_out=r_out,
                num_groups=cfg.num_groups,
                sampling_points=cfg.sampling_points,
                mixing_out_points=cfg.mixing_out_points,
                strides=self.backbone.strides,
                num_heads=cfg.num_heads,
                ffn_channels=cfg.ffn_channels,
                dropout=cfg.dropout,
                offset_scale=cfg.offset_scale,
                grid_lower=self.grid.range[:3],
                grid_upper=self.grid.range[3:],
                image_size=cfg.image_size,
                depth_prior=cfg.depth_prior,
                depth_scale=cfg.depth_prior_scale,
            )
            for r_in, r_out in zip(previous, cfg.points_per_layer)
        )
        self.register_buffer("pixel_mean", torch.tensor(_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(_STD).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("grid_lower", torch.tensor(self.grid.range[:3], dtype=torch.float32), persistent=False)
        self.register_buffer("grid_extent", torch.tensor(self.grid.range[3:], dtype=torch.float32) - self.grid_lower,
                             persistent=False)

    def image_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """(B, N, 3, H, W) in [0, 1] -> L levels (B, N, C_f, h_l, w_l), strides 4 * 2^out_index."""
        batch, cams = images.shape[:2]
        if tuple(images.shape[-2:]) != tuple(self.cfg.image_size):
            raise ValueError(f"images are {tuple(images.shape[-2:])}, the model expects {self.cfg.image_size}")
        x = (images.flatten(0, 1) - self.pixel_mean) / self.pixel_std  # (B*N, 3, H, W)
        feats = self.neck(self.backbone(x))
        return [f.view(batch, cams, *f.shape[1:]) for f in feats]

    def initial_points(self, batch: int) -> torch.Tensor:
        """The learnable initial points in metres, (B, Q, 3)."""
        return (self.grid_lower + self.init_points * self.grid_extent).expand(batch, -1, -1)

    @staticmethod
    def img_from_ego(intrinsics: torch.Tensor, img_from_raw: torch.Tensor, ego_from_cam: torch.Tensor) -> torch.Tensor:
        """(B, N, 3, 4): ego point -> (u z, v z, z) in network pixels. Composed in float64 because
        ``ego_from_cam`` may carry BEV augmentation (a similarity, inverted in full)."""
        k_aug = img_from_raw.double() @ intrinsics.double()
        cam_from_ego = torch.linalg.inv(ego_from_cam.double())[..., :3, :]
        return (k_aug @ cam_from_ego).float()

    def decode(self, init_points: torch.Tensor, features: list[torch.Tensor], img_from_ego: torch.Tensor,
               prior_depth: torch.Tensor | None) -> list[LayerOutput]:
        """Run the decoder from initial points (B, Q, 3) metres with zero query features."""
        batch, num_q = init_points.shape[:2]
        points = init_points[:, :, None]  # (B, Q, 1, 3)
        query = init_points.new_zeros(batch, num_q, self.cfg.embed_dims)
        layers = []
        for i, layer in enumerate(self.decoder):
            # Point positions never carry gradients across layers (OPUS); features may (config).
            if i > 0 and self.cfg.detach_query_features:
                query = query.detach()
            query, new_points, logits = layer(points.detach(), query, features, img_from_ego, prior_depth)
            layers.append(LayerOutput(points=new_points, logits=logits, centres=new_points.mean(dim=2), features=query))
            points = new_points
        return layers

    def forward(
        self,
        images: torch.Tensor,
        intrinsics: torch.Tensor,
        img_from_raw: torch.Tensor,
        ego_from_cam: torch.Tensor,
        prior_depth: torch.Tensor | None = None,
        extra_queries: ExtraQueries | None = None,
    ) -> SparseOutput:
        """images (B, N, 3, H, W); intrinsics, img_from_raw (B, N, 3, 3); ego_from_cam (B, N, 4, 4)
        with the BEV augmentation (``Batch.ego_from_cam``); prior_depth (B, N, H, W) metres, 0 = none
        (needed with ``cfg.depth_prior``, ignored otherwise); extra_queries: groups to decode too."""
        batch = images.shape[0]
        feats = self.image_features(images)
        proj = self.img_from_ego(intrinsics, img_from_raw, ego_from_cam)
        if not self.cfg.depth_prior:
            prior_depth = None
        elif prior_depth is None:
            raise ValueError("this model has a depth-prior branch (cfg.depth_prior): pass prior_depth (B, N, H, W)")
        elif tuple(prior_depth.shape) != (batch, images.shape[1], *self.cfg.image_size):
            expected = (batch, images.shape[1], *self.cfg.image_size)
            raise ValueError(f"prior_depth is {tuple(prior_depth.shape)}, expected {expected}")
        init = self.initial_points(batch)
        layers = self.decode(init, feats, proj, prior_depth)
        extra = {}
        if extra_queries is not None:
            for name, pts in extra_queries.groups.items():
                if pts.dim() != 3 or pts.shape[0] != batch or pts.shape[2] != 3:
                    raise ValueError(f"extra query group {name!r} must be (B={batch}, Q_g, 3), got {tuple(pts.shape)}")
                pts = pts.detach().to(init.dtype)
                extra[name] = QueryGroupOutput(init_points=pts, layers=self.decode(pts, feats, proj, prior_depth))
        return SparseOutput(init_points=init, layers=layers, image_features=feats, extra=extra,
                            grid=self.grid, classes=self.classes)

    def voxelize(self, output: SparseOutput) -> torch.Tensor:
        """Labels (B, X, Y, Z) int64 with this model's inference thresholds."""
        return voxelize(output, score_threshold=self.cfg.score_threshold,
                        centre_distance_threshold=self.cfg.centre_distance_threshold, closing=self.cfg.closing)


def box_max3d(x: torch.Tensor) -> torch.Tensor:
    """3x3x3 maximum filter over the last three axes, cells outside ignored: equal to
    ``F.max_pool3d(x, 3, stride=1, padding=1)`` but as three 1-D passes of shifted maxima
    (about 20x faster on CPU for an Occ-ScanNet volume of 11 channels)."""
    for dim in (-3, -2, -1):
        n = x.shape[dim]
        if n == 1:
            continue
        out = x.clone()
        out.narrow(dim, 1, n - 1).copy_(torch.maximum(out.narrow(dim, 1, n - 1), x.narrow(dim, 0, n - 1)))
        out.narrow(dim, 0, n - 1).copy_(torch.maximum(out.narrow(dim, 0, n - 1), x.narrow(dim, 1, n - 1)))
        x = out
    return x


@torch.no_grad()
def voxelize(
    output: SparseOutput,
    grid: VoxelGrid | None = None,
    *,
    score_threshold: float = 0.5,
    centre_distance_threshold: float = math.inf,
    closing: bool = True,
) -> torch.Tensor:
    """Final-layer points -> voxel labels (B, X, Y, Z) int64 in the dataset's class table.

    OPUS ``get_occ``: keep a point when its distance to its query's centre is below
    ``centre_distance_threshold`` and some class probability exceeds ``score_threshold``; drop
    points outside the grid; per voxel, average the probability vectors of its points. With
    ``closing``, dilate then erode each class channel with a 3x3x3 max filter (space outside the
    grid counts as empty) and keep the original scores where the voxel already had a confident
    point (fills one-voxel gaps between points).
    A voxel is occupied when some class probability exceeds the threshold; its label is the
    arg-max channel's class, every other voxel is free.
    """
    grid = output.grid if grid is None else grid
    final = output.final
    points, probs = final.points.float(), final.logits.float().sigmoid()  # (B, Q, R, 3), (B, Q, R, K)
    batch, num_channels = points.shape[0], probs.shape[-1]
    nx, ny, nz = grid.shape
    channel_labels = output.classes.channel_labels(points.device)
    labels = []
    for b in range(batch):
        pts, p = points[b], probs[b]
        near = (pts - pts.mean(dim=1, keepdim=True)).norm(dim=-1) < centre_distance_threshold
        idx, inside = grid.point_to_index(pts)
        keep = near & inside & (p.amax(dim=-1) > score_threshold)
        flat = (idx[..., 0] * ny + idx[..., 1]) * nz + idx[..., 2]
        flat, p = flat[keep], p[keep]
        # Channel-first (K, X*Y*Z): contiguous for the closing filters and the reductions.
        sums = p.new_zeros(num_channels, nx * ny * nz).index_add_(1, flat, p.T)
        counts = p.new_zeros(nx * ny * nz).index_add_(0, flat, torch.ones_like(flat, dtype=p.dtype))
        scores = (sums / counts.clamp(min=1.0)).view(num_channels, nx, ny, nz)
        if closing:
            # Pad with empty space: outside the grid counts as free for the erosion (OPUS erodes
            # against max_pool's implicit padding, which lets shapes creep onto the border layers).
            padded = F.pad(scores, (1, 1, 1, 1, 1, 1))
            closed = -box_max3d(-box_max3d(padded))[:, 1:-1, 1:-1, 1:-1]
            confident = (scores > score_threshold).any(dim=0, keepdim=True)
            scores = torch.where(confident, scores, closed)
        # Arg-max over channels as a running maximum of contiguous slices (a reduction over the
        # leading axis is several times slower on CPU); ties keep the first channel, as argmax.
        best, arg = scores[0], torch.zeros(scores.shape[1:], dtype=torch.long, device=scores.device)
        for c in range(1, num_channels):
            better = scores[c] > best
            best = torch.where(better, scores[c], best)
            arg = torch.where(better, c, arg)
        free = torch.full_like(arg, output.classes.free_index)
        labels.append(torch.where(best > score_threshold, channel_labels[arg], free))
    return torch.stack(labels)
