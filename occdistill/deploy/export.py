"""ONNX export of the dense student for ONE fixed camera rig, the onnxruntime runtime and the parity check.

The exported graph takes images only. Everything that depends on the calibration is computed once
from the rig and baked into the graph as constants:

- the BEV pooling plan (:class:`occdistill.nn.bev_pool.PrecomputedBEVPool`: Gather + CumSum, no
  scatter, no plugin: the op FlashOcc needs a custom TensorRT ``bev_pool_v2`` plugin for);
- the camera-parameter vector of the camera-aware depth net (its MLP folds into constants).

So an exported file is valid for that rig only: the rig's hash, camera names (in input order), image
sizes and full matrices are stored in the model's ``metadata_props`` and in a sidecar JSON, and
:class:`OnnxOccModel` refuses inputs whose calibration moves the frustum points by more than a
tolerance (:func:`compare_rig`). This is the FlashOcc deployment pitfall made explicit: their
TensorRT scripts reuse one calibration for every frame silently (research/kd_deploy.md B1). A
dataset may hold several rigs (per-scene camera mounts): :func:`select_rig_frames` finds the frames
an export accepts from their calibrations alone, and :func:`dataset_subset` keeps those for evaluation.

Graph contract (``input_format``):

- ``uint8`` (default): ``images`` (B, N, H, W, 3) uint8 RGB as decoded and resized/cropped by the
  evaluation transform; the graph converts to float, divides by 255 and normalises. Host-side
  preprocessing is then decode + resize only, and the input is 4x smaller;
- ``float32``: ``images`` (B, N, 3, H, W) float32 in [0, 1], the model's own contract.

Outputs: ``logits`` (B, X, Y, Z, K) float32 and ``labels`` (B, X, Y, Z) uint8 (argmax in the
graph). Shapes are static (batch fixed at export), as TensorRT and INT8 calibration prefer.

Temporal dense student (``cfg.temporal_frames`` F > 0): a second input ``history`` (B, F, C, X, Y)
float32 (:data:`HISTORY_NAME`): the F earlier frames' lifted BEVs, newest first, ALREADY warped into
the current ego frame, zeros where a slot has no usable earlier frame; and a third output
``lifted_bev`` (B, C, X, Y) float32 (:data:`LIFTED_BEV_NAME`): this frame's pooled BEV before the
fusion, the next frame's newest slot. The warp, the reset rule and the pose bookkeeping stay on the
host (:class:`occdistill.nn.temporal.BEVHistory`, played by :class:`occdistill.deploy.stream.StreamRunner`),
like the voxel filter: the reset rule compares scene names (strings) and the ego-motion transform
is composed in float64 (global translations are kilometres, where float32 rounds to centimetres),
neither of which a float32 graph can take; the graph keeps what is per-pixel work. Both are
described in the sidecar (``extra_inputs``, ``extra_outputs``).

Sparse (OPUS-style) student: exports with the dynamo exporter when the rig is fixed (the ego ->
image projection is precomputed: ``torch.linalg.inv`` has no ONNX op), voxelisation included
(boolean masks -> NonZero, ``index_add_`` -> ScatterND with reduction add, opset >= 16; both
data-dependent, so TensorRT needs a recent version or plugins). Not with the TorchScript exporter
(tensor-valued reshape sizes), and not with fewer than 26 queries (``torch.cdist`` then dispatches
``aten._cdist_forward``, which has no ONNX translation). Its ``logits`` output is the final
decoder layer's per-point class logits; ``engine.evaluate`` has no sparse path, so no mIoU here.
A sparse student with the DiScene† depth branch (``cfg.depth_prior``) takes a second input,
``prior_depth`` (B, N, H, W) float32 metres in network-input pixels (after the evaluation
transform, like the images), 0 where there is no prior: the depth map the robot's depth source
gives for each camera (its shape and meaning are in the sidecar's ``extra_inputs``).

Letters: B batch, N cameras, H W image, X Y Z voxels, K classes, D depth bins, h w feature map.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence, Union

import numpy as np
import torch
from torch import nn

from occdistill.deploy.rig import Rig
from occdistill.errors import OccDistillError
from occdistill.geometry.grid import VoxelGrid
from occdistill.io import atomic_write_bytes, atomic_write_json, file_sha256
from occdistill.models.dense import DenseStudent

FORMAT = "occdistill-onnx"
FORMAT_VERSION = 1
INPUT_FORMATS = ("uint8", "float32")
EXPORTERS = ("dynamo", "torchscript")
INPUT_NAME = "images"
PRIOR_DEPTH_NAME = "prior_depth"  # second input of a sparse student with the depth branch
HISTORY_NAME = "history"  # second input of a temporal dense student: earlier lifted BEVs, already warped
OUTPUT_NAMES = ("logits", "labels")
LIFTED_BEV_NAME = "lifted_bev"  # third output of a temporal dense student: this frame's BEV for the history
META_PREFIX = "occdistill."
RIG_WARNING = (
    "camera rig baked in: this model is valid ONLY for the calibration (intrinsics, image transform, "
    "camera poses, camera order, image size) it was exported with; re-export for another rig"
)
TEMPORAL_NOTE = (
    f"temporal: the graph takes the {HISTORY_NAME} input (earlier lifted BEVs already warped into this frame, zeros "
    f"= none) and returns {LIFTED_BEV_NAME}; the warp and reset rule run on the host (occdistill.nn.temporal."
    "BEVHistory; occdistill.deploy.stream.StreamRunner plays a scene)"
)
# Parity bounds of an FP32 export against eager PyTorch: |logit diff| <= LOGIT_TOLERANCE x
# max(1, max |logit|), argmax agreement >= 99.9% (the deployment issue's bound).
LOGIT_TOLERANCE = 1e-4
MIN_ARGMAX_AGREEMENT = 0.999


# ---------------------------------------------------------------------------------------------
# the rig: serialisation, hash, comparison


def rig_to_dict(rig: Rig, image_size: tuple[int, int]) -> dict[str, Any]:
    """JSON-able description of a rig at the network input ``image_size`` (H, W)."""
    return {
        "camera_names": list(rig.camera_names),
        "image_size": [int(image_size[0]), int(image_size[1])],
        "raw_size": [int(rig.raw_size[0]), int(rig.raw_size[1])],
        "intrinsics": rig.intrinsics.double().tolist(),
        "img_from_raw": rig.img_from_raw.double().tolist(),
        "ego_from_cam": rig.ego_from_cam.double().tolist(),
        "source": rig.source,
    }


def rig_from_dict(d: dict[str, Any]) -> Rig:
    as_t = lambda key: torch.tensor(d[key], dtype=torch.float32)  # noqa: E731
    return Rig(as_t("intrinsics"), as_t("img_from_raw"), as_t("ego_from_cam"), str(d.get("source", "")),
               tuple(d["camera_names"]), tuple(d["raw_size"]))


def rig_hash(rig: Rig, image_size: tuple[int, int]) -> str:
    """16 hex digits of SHA-256 over the camera names, sizes and matrices (float32 values rounded
    to 6 decimals, so that a float32 -> JSON -> float32 round trip keeps the hash)."""
    h = hashlib.sha256()
    h.update(json.dumps({"cameras": list(rig.camera_names), "image_size": list(image_size),
                         "raw_size": list(rig.raw_size)}, sort_keys=True).encode())
    for t in rig[:3]:
        h.update(np.round(t.detach().cpu().float().double().numpy(), 6).astype("<f8").tobytes())
    return h.hexdigest()[:16]


def rig_from_sample(sample: Any, raw_size: tuple[int, int] | None = None, source: str = "") -> Rig:
    """The rig of one dataset :class:`~occdistill.data.sample.Sample` (``ego_from_cam`` = bda @
    keyego_from_cam: identity bda under the evaluation transform)."""
    raw = tuple(raw_size) if raw_size is not None else tuple(sample.images.shape[-2:])
    return Rig(sample.intrinsics.float(), sample.img_from_raw.float(), sample.ego_from_cam.float(),
               source or f"sample {sample.token} ({sample.scene_name})", tuple(sample.camera_names), raw)


def raw_image_size(dataset: Any, index: int = 0) -> tuple[int, int]:
    """(H, W) of the first camera image of frame ``index`` of an Occ3D-layout dataset, before resizing."""
    from PIL import Image

    from occdistill.data.infos import resolve_data_path

    frame = dataset.frame(index)
    path = resolve_data_path(dataset.data_root, frame.camera(dataset.camera_names[0]).image_path)
    with Image.open(path) as img:
        return img.height, img.width


def rig_from_dataset(dataset: Any, index: int = 0) -> Rig:
    """The rig of frame ``index`` of an evaluation-mode (no augmentation) Occ3D-layout dataset."""
    if getattr(dataset, "augment", False):
        raise OccDistillError("take the rig from a dataset without augmentation (the deterministic eval transform)")
    if not 0 <= index < len(dataset):
        raise OccDistillError(f"rig frame {index} is outside the dataset ({len(dataset)} frames)")
    frame = dataset.frame(index)
    return rig_from_sample(dataset[index], raw_image_size(dataset, index),
                           source=f"{dataset.data_root} frame {index} ({frame.scene_name}/{frame.token})")


@dataclass(frozen=True)
class FrustumSpec:
    """What the rig comparison needs of the model: the frustum (feature cells x depth bins) and the grid."""

    image_size: tuple[int, int]
    feature_stride: int
    depth_bins: tuple[float, float, float]  # (min, max, step) metres
    grid_range: tuple[float, ...]
    voxel_size: tuple[float, ...]

    @classmethod
    def of(cls, model: nn.Module) -> "FrustumSpec":
        """The dense student's own frustum; for the sparse student (no frustum) rays through a
        16-pixel grid, sampled every voxel size out to the far corner of the grid."""
        cfg = model.cfg
        if isinstance(model, DenseStudent):
            return cls(tuple(cfg.image_size), cfg.feature_stride, tuple(cfg.depth_bins), tuple(cfg.grid.range),
                       tuple(cfg.grid.voxel_size))
        lo, hi = np.array(cfg.grid.range[:3]), np.array(cfg.grid.range[3:])
        step = float(min(cfg.grid.voxel_size))
        far = step * np.ceil(float(np.linalg.norm(hi - lo)) / step)
        return cls(tuple(cfg.image_size), 16, (step / 2, far + step / 2, step), tuple(cfg.grid.range),
                   tuple(cfg.grid.voxel_size))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "FrustumSpec":
        return cls(tuple(d["image_size"]), int(d["feature_stride"]), tuple(d["depth_bins"]), tuple(d["grid_range"]),
                   tuple(d["voxel_size"]))

    def points(self, intrinsics: Any, img_from_raw: Any, ego_from_cam: Any, corners: bool = False) -> np.ndarray:
        """Ego positions (N, D, h, w, 3) float64 of the frustum points, as the LSS lift places them:
        feature cell (i, j) looks along input pixel ((j + 0.5) s, (i + 0.5) s), bin k at its centre depth.

        ``corners``: only the 4 corner cells at the nearest and farthest bin, (N, 2, 2, 2, 3). Every
        frustum point is d (u, v, 1) mapped by the same affine map, so their convex hull holds all
        the others, and the largest displacement between two rigs (a convex function of d (u, v, 1))
        is taken at one of them (:func:`max_frustum_shift`)."""
        k = np.asarray(intrinsics, dtype=np.float64)
        aug = np.asarray(img_from_raw, dtype=np.float64)
        pose = np.asarray(ego_from_cam, dtype=np.float64)
        s = self.feature_stride
        h, w = self.image_size[0] // s, self.image_size[1] // s
        dmin, dmax, step = self.depth_bins
        d = dmin + (np.arange(round((dmax - dmin) / step)) + 0.5) * step
        u, v = (np.arange(w) + 0.5) * s, (np.arange(h) + 0.5) * s
        if corners:
            d, u, v = d[[0, -1]], u[[0, -1]], v[[0, -1]]
            h = w = 2
        pix = np.stack(np.broadcast_arrays(u[None, None, :] * d[:, None, None], v[None, :, None] * d[:, None, None],
                                           d[:, None, None] * np.ones((1, h, w))), axis=-1)  # (D, h, w, 3)
        ego_from_pix = pose[:, :3, :3] @ np.linalg.inv(aug @ k)  # (N, 3, 3)
        return np.einsum("nij,dhwj->ndhwi", ego_from_pix, pix) + pose[:, None, None, None, :3, 3]

    def bev_cells(self, points: np.ndarray) -> np.ndarray:
        """Flat BEV cell of every point, -1 where the pooling drops it (same rule as ``bev_cell_index``)."""
        grid = VoxelGrid(self.grid_range, self.voxel_size)
        nx, ny, _ = grid.shape
        xmin, ymin, zmin, _, _, zmax = self.grid_range
        fx = (points[..., 0] - xmin) / self.voxel_size[0]
        fy = (points[..., 1] - ymin) / self.voxel_size[1]
        z = points[..., 2]
        kept = (fx >= 0) & (fx < nx) & (fy >= 0) & (fy < ny) & (z >= zmin) & (z < zmax)
        cell = np.floor(np.where(kept, fx, 0)).astype(np.int64) * ny + np.floor(np.where(kept, fy, 0)).astype(np.int64)
        return np.where(kept, cell, -1)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


@dataclass(frozen=True)
class RigCheck:
    """How far a rig is from the baked one.

    ``max_shift_m``: largest displacement of any frustum point (all cameras, feature cells and
    depth bins) between the two rigs; ``moved_fraction``: share of the frustum points that the
    pooling keeps under either rig and that land in another BEV cell (or are dropped by one rig
    only). ``ok``: same camera names and image size and ``max_shift_m <= tolerance_m``.
    """

    ok: bool
    max_shift_m: float
    moved_fraction: float
    tolerance_m: float
    reason: str


def default_rig_tolerance(spec: FrustumSpec) -> float:
    """Half the BEV cell: a frustum point moved less than that changes cell only near cell borders."""
    return 0.5 * min(spec.voxel_size[0], spec.voxel_size[1])


def compare_rig(
    baked: Rig, spec: FrustumSpec, intrinsics: Any, img_from_raw: Any, ego_from_cam: Any,
    camera_names: Sequence[str] | None = None, tolerance_m: float | None = None,
) -> RigCheck:
    """Compare one frame's calibration ((N, 3, 3), (N, 3, 3), (N, 4, 4)) with the baked rig."""
    tol = default_rig_tolerance(spec) if tolerance_m is None else float(tolerance_m)
    def to_np(t: Any) -> np.ndarray:
        return t.detach().cpu().double().numpy() if isinstance(t, torch.Tensor) else np.asarray(t, np.float64)

    k, aug, pose = to_np(intrinsics), to_np(img_from_raw), to_np(ego_from_cam)
    n = baked.intrinsics.shape[0]
    if camera_names is not None and tuple(camera_names) != tuple(baked.camera_names):
        return RigCheck(False, float("inf"), 1.0, tol, f"cameras {list(camera_names)} differ from the baked "
                        f"{list(baked.camera_names)} (names and order must match)")
    if k.shape != (n, 3, 3) or aug.shape != (n, 3, 3) or pose.shape != (n, 4, 4):
        return RigCheck(False, float("inf"), 1.0, tol, f"{k.shape[0]} cameras given, the model was exported for {n}")
    ref = spec.points(baked.intrinsics, baked.img_from_raw, baked.ego_from_cam)
    pts = spec.points(k, aug, pose)
    shift = float(np.linalg.norm(pts - ref, axis=-1).max())
    cells_ref, cells = spec.bev_cells(ref), spec.bev_cells(pts)
    either = (cells_ref >= 0) | (cells >= 0)
    moved = float(((cells_ref != cells) & either).sum() / max(int(either.sum()), 1))
    ok = shift <= tol
    reason = "" if ok else (f"the calibration moves frustum points by up to {shift:.3f} m (tolerance {tol:.3f} m; "
                            f"{100 * moved:.2f}% change BEV cell): re-export for this rig or raise the tolerance")
    return RigCheck(ok, shift, moved, tol, reason)


def max_frustum_shift(baked: Rig, spec: FrustumSpec, intrinsics: Any, img_from_raw: Any, ego_from_cam: Any) -> float:
    """``compare_rig``'s ``max_shift_m`` from the frustum's corner points only (exact: see
    :meth:`FrustumSpec.points`), for same-shaped calibrations: cheap enough to scan a whole split."""
    ref = spec.points(baked.intrinsics, baked.img_from_raw, baked.ego_from_cam, corners=True)
    pts = spec.points(intrinsics, img_from_raw, ego_from_cam, corners=True)
    return float(np.linalg.norm(pts - ref, axis=-1).max())


def frame_calibration(dataset: Any, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[str, ...]]:
    """(intrinsics, img_from_raw, ego_from_cam, camera names) of frame ``index`` of an eval-mode
    dataset, the float32 values its sample carries. Occ3D layout: from the info record and the image
    headers, without decoding pixels or reading labels; other datasets: from the loaded sample."""
    from occdistill.data.occ3d import Occ3DDataset

    if getattr(dataset, "augment", False):
        raise OccDistillError("check the rig of frames under the deterministic eval transform (augment=False)")
    if not isinstance(dataset, Occ3DDataset):
        s = dataset[index]
        return s.intrinsics, s.img_from_raw, s.ego_from_cam, tuple(s.camera_names)
    from PIL import Image

    from occdistill.data.augment import ImageAug, sample_image_aug
    from occdistill.data.infos import resolve_data_path

    frame = dataset.frame(index)
    cams = [frame.camera(n) for n in dataset.camera_names]
    augs = []
    for c in cams:
        with Image.open(resolve_data_path(dataset.data_root, c.image_path)) as img:  # reads the header only
            raw = (img.height, img.width)
        cfg = dataset.image_aug
        augs.append(ImageAug.identity(raw) if cfg is None else sample_image_aug(cfg, raw, None))

    def f32(arrays: Any) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(np.stack(arrays), dtype=np.float32))

    # eval mode: identity BEV augmentation, so ego_from_cam = keyego_from_cam (Sample.ego_from_cam)
    return (f32([c.intrinsic for c in cams]), f32([a.img_from_raw for a in augs]),
            f32([c.keyego_from_cam for c in cams]), tuple(dataset.camera_names))


@dataclass(frozen=True)
class RigFrames:
    """Which frames of a split share the baked rig: their calibration passes the runtime's check
    (same camera names/order and count, frustum moved by <= ``tolerance_m``). ``kept`` and
    ``skipped`` are dataset indices; ``skipped_shift_m`` is the (min, max) frustum shift of the
    geometrically skipped frames (None if none), ``structural`` the reason of frames skipped for
    their cameras (empty if none)."""

    kept: tuple[int, ...]
    skipped: tuple[int, ...]
    tolerance_m: float
    kept_max_shift_m: float
    skipped_shift_m: tuple[float, float] | None
    kept_scenes: tuple[str, ...]
    skipped_scenes: tuple[str, ...]
    structural: str = ""

    @property
    def checked(self) -> int:
        return len(self.kept) + len(self.skipped)

    def skip_reason(self) -> str:
        """Why the skipped frames were skipped, in a few words ("" if none were)."""
        parts = []
        if self.skipped_shift_m is not None:
            lo, hi = self.skipped_shift_m
            span = f"{lo:.3f} m" if abs(hi - lo) < 5e-4 else f"{lo:.3f}-{hi:.3f} m"
            parts.append(f"their calibration moves the frustum points by {span} (tolerance {self.tolerance_m:.3f} m)")
        if self.structural:
            parts.append(self.structural)
        return "; ".join(parts)

    def summary(self, what: str = "frames") -> str:
        """One line: how many frames share the rig and how many were skipped, and why."""
        def scenes(names: tuple[str, ...]) -> str:
            shown = ", ".join(names[:4]) + (f", ... ({len(names)} scenes)" if len(names) > 4 else "")
            return f"scene{'s' if len(names) > 1 else ''} {shown}" if names else "no scene"

        text = (f"{len(self.kept)} of {self.checked} {what} share the baked rig ({scenes(self.kept_scenes)}; max "
                f"frustum shift {self.kept_max_shift_m:.3f} m)")
        if self.skipped:
            text += f"; {len(self.skipped)} skipped ({scenes(self.skipped_scenes)}): {self.skip_reason()}"
        return text

    def to_dict(self) -> dict[str, Any]:
        return {"kept": len(self.kept), "skipped": len(self.skipped), "tolerance_m": self.tolerance_m,
                "kept_max_shift_m": round(self.kept_max_shift_m, 4),
                "skipped_shift_m": None if self.skipped_shift_m is None else [round(x, 4)
                                                                              for x in self.skipped_shift_m],
                "kept_scenes": list(self.kept_scenes), "skipped_scenes": list(self.skipped_scenes),
                "skip_reason": self.skip_reason()}


def select_rig_frames(baked: Rig, spec: FrustumSpec, dataset: Any, *, tolerance_m: float | None = None,
                      indices: Sequence[int] | None = None) -> RigFrames:
    """The frames of ``dataset`` (eval mode; ``indices``, default all) whose calibration the baked rig's
    check accepts (:func:`compare_rig`'s rule, default tolerance half a BEV cell). Reads calibrations
    only (:func:`frame_calibration`): parity and evaluation of a fixed-rig export use these frames, as
    a dataset whose scenes have their own camera mounts (nuScenes logs, the synthetic street's
    ``rig.mount_jitter_deg``) holds frames of several rigs."""
    tol = default_rig_tolerance(spec) if tolerance_m is None else float(tolerance_m)
    picks = range(len(dataset)) if indices is None else indices
    kept, skipped, kept_scenes, skipped_scenes, shifts = [], [], {}, {}, []
    kept_max, structural = 0.0, ""
    n = baked.intrinsics.shape[0]
    for i in picks:
        i = int(i)
        k, aug, pose, names = frame_calibration(dataset, i)
        scene = dataset.frame(i).scene_name if hasattr(dataset, "frame") else ""
        if tuple(names) != tuple(baked.camera_names) or tuple(k.shape) != (n, 3, 3) or tuple(pose.shape) != (n, 4, 4):
            structural = structural or compare_rig(baked, spec, k, aug, pose, names, tol).reason
            skipped.append(i)
            skipped_scenes[scene] = None
            continue
        shift = max_frustum_shift(baked, spec, k, aug, pose)
        if shift <= tol:
            kept.append(i)
            kept_scenes[scene] = None
            kept_max = max(kept_max, shift)
        else:
            skipped.append(i)
            skipped_scenes[scene] = None
            shifts.append(shift)
    clean = lambda d: tuple(s for s in d if s)  # noqa: E731
    return RigFrames(tuple(kept), tuple(skipped), tol, kept_max, (min(shifts), max(shifts)) if shifts else None,
                     clean(kept_scenes), clean(skipped_scenes), structural)


def dataset_subset(dataset: Any, indices: Sequence[int]) -> Any:
    """``dataset`` restricted to ``indices`` (in order) as a dataset of the same type, so that
    ``engine.evaluate`` still treats it as an Occ3D split (metrics, scenes, time order)."""
    import copy
    import dataclasses

    from occdistill.data.infos import InfoSet
    from occdistill.data.occ3d import Occ3DDataset

    idx = [int(i) for i in indices]
    if idx == list(range(len(dataset))):
        return dataset
    if not isinstance(dataset, Occ3DDataset):
        raise OccDistillError(f"a subset of a {type(dataset).__name__} is not supported (Occ3D-layout splits only)")
    frames = tuple(dataclasses.replace(dataset.frame(i), index=k) for k, i in enumerate(idx))
    sub = copy.copy(dataset)
    sub.infos = InfoSet(path=dataset.infos.path, frames=frames, metadata=dataset.infos.metadata)
    return sub


def synthetic_prior_depth(grid_range: Sequence[float], shape: Sequence[int], generator: torch.Generator,
                          device: str | torch.device = "cpu") -> tuple[torch.Tensor, str]:
    """A random prior depth map of ``shape`` (B, N, H, W) metres and its description: uniform
    between 0.5 m and the length of the grid's diagonal (every projected point a camera can see
    inside the grid lies in that range). The branch's cost does not depend on the values (the
    lookup and the MLP run on every point), so this times it as real depth maps would."""
    lower, upper = np.asarray(grid_range[:3], dtype=np.float64), np.asarray(grid_range[3:], dtype=np.float64)
    far = float(np.linalg.norm(upper - lower))
    depth = 0.5 + (far - 0.5) * torch.rand(*shape, generator=generator)
    return depth.to(device), f"synthetic prior depth map, uniform random in [0.5, {far:.1f}] m"



# ---------------------------------------------------------------------------------------------
# the exported module


def _model_kind(model: nn.Module) -> str:
    if isinstance(model, DenseStudent):
        return "dense"
    from occdistill.models.sparse import SparseOccStudent

    if isinstance(model, SparseOccStudent):
        return "sparse"
    raise OccDistillError(f"ONNX export supports the dense and sparse students; got a {type(model).__name__}")


class ExportWrapper(nn.Module):
    """A student with its rig baked in: images -> (logits, labels (B, X, Y, Z) uint8).

    Dense student: ``logits`` are the voxel logits (B, X, Y, Z, K); the model is switched to the
    rig's precomputed pooling plan (it stays in that deployment mode afterwards) and the camera
    matrices become (B, N, ...) buffers that the camera-aware depth net's MLP folds into constants.
    A temporal one (``cfg.temporal_frames`` F > 0) takes ``history`` (B, F, C, X, Y) too
    (:data:`HISTORY_NAME`) and returns ``lifted_bev`` (B, C, X, Y) third (:data:`LIFTED_BEV_NAME`).
    Sparse student: ``logits`` are the final decoder layer's per-point class logits (B, Q, R, K_occ);
    the ego -> image projection is precomputed (its ``linalg.inv`` has no ONNX op) and the
    voxelisation (score threshold, index_add scatter, closing) is part of the graph. With the depth
    branch (``cfg.depth_prior``) the forward takes ``prior_depth`` (B, N, H, W) metres too
    (:data:`PRIOR_DEPTH_NAME`). ``batch`` fixes B.

    The forward's parameter names are the graph's input names (:attr:`input_names`): call it with
    :meth:`feeds` of the inputs in that order.
    """

    def __init__(self, model: nn.Module, rig: Rig, *, batch: int = 1, input_format: str = "uint8"):
        super().__init__()
        self.kind = _model_kind(model)
        if input_format not in INPUT_FORMATS:
            raise OccDistillError(f"input format {input_format!r} is not one of {', '.join(INPUT_FORMATS)}")
        if batch < 1:
            raise OccDistillError(f"batch must be >= 1, got {batch}")
        self.model = model
        self.input_format = input_format
        self.batch = batch
        self.cameras = int(rig.intrinsics.shape[0])
        self.image_size = tuple(model.cfg.image_size)
        device = model.pixel_mean.device
        cams = [t.to(device).float() for t in rig[:3]]
        if self.kind == "dense":
            model.set_fixed_rig(*cams)
            for name, t in zip(("intrinsics", "img_from_raw", "ego_from_cam"), cams):
                self.register_buffer(name, t[None].expand(batch, *t.shape).contiguous(), persistent=False)
        else:
            proj = type(model).img_from_ego(*(t[None] for t in cams))  # (1, N, 3, 4)
            self.register_buffer("img_from_ego", proj.expand(batch, *proj.shape[1:]).contiguous(), persistent=False)

    @property
    def prior_depth(self) -> bool:
        """The graph takes :data:`PRIOR_DEPTH_NAME` after the images (sparse depth branch)."""
        return self.kind == "sparse" and self.model.cfg.depth_prior

    @property
    def temporal_frames(self) -> int:
        """F earlier frames in the :data:`HISTORY_NAME` input (0: a single-frame graph, no history)."""
        return self.model.cfg.temporal_frames if self.kind == "dense" else 0

    @property
    def input_names(self) -> tuple[str, ...]:
        return ((INPUT_NAME,) + ((PRIOR_DEPTH_NAME,) if self.prior_depth else ())
                + ((HISTORY_NAME,) if self.temporal_frames else ()))

    @property
    def output_names(self) -> tuple[str, ...]:
        return OUTPUT_NAMES + ((LIFTED_BEV_NAME,) if self.temporal_frames else ())

    def input_shape(self) -> tuple[int, ...]:
        h, w = self.image_size
        if self.input_format == "uint8":
            return (self.batch, self.cameras, h, w, 3)
        return (self.batch, self.cameras, 3, h, w)

    def prior_depth_shape(self) -> tuple[int, int, int, int]:
        """(B, N, H, W) of the prior depth input: one depth per network-input pixel and camera."""
        return (self.batch, self.cameras, *self.image_size)

    def history_shape(self) -> tuple[int, int, int, int, int]:
        """(B, F, C, X, Y) of the history input: F earlier lifted BEVs of C context channels."""
        num_x, num_y, _ = self.model.grid.shape
        return (self.batch, self.temporal_frames, self.model.cfg.context_channels, num_x, num_y)

    def example_input(self, seed: int = 0) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        if self.input_format == "uint8":
            x = torch.randint(0, 256, self.input_shape(), generator=gen, dtype=torch.uint8)
        else:
            x = torch.rand(self.input_shape(), generator=gen)
        return x.to(self.model.pixel_mean.device)

    def example_inputs(self, seed: int = 0) -> tuple[torch.Tensor, ...]:
        """Random graph inputs, in :attr:`input_names` order: images, for the depth branch a random
        prior depth map (:func:`synthetic_prior_depth`), for a temporal model a standard-normal
        history (not zeros: a parity check on it must exercise the fusion's history weights)."""
        images = self.example_input(seed)
        extra = []
        if self.prior_depth:
            gen = torch.Generator().manual_seed(seed + 1)
            depth, _ = synthetic_prior_depth(self.model.cfg.grid.range, self.prior_depth_shape(), gen, images.device)
            extra.append(depth)
        if self.temporal_frames:
            gen = torch.Generator().manual_seed(seed + 2)
            extra.append(torch.randn(self.history_shape(), generator=gen).to(images.device))
        return (images, *extra)

    def feeds(self, inputs: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Graph inputs in :attr:`input_names` order -> the forward's keyword arguments."""
        if len(inputs) != len(self.input_names):
            raise OccDistillError(f"this export takes {len(self.input_names)} input(s) "
                                  f"({', '.join(self.input_names)}), got {len(inputs)}")
        return dict(zip(self.input_names, inputs))

    def to_model_images(self, images: torch.Tensor) -> torch.Tensor:
        """Graph input -> (B, N, 3, H, W) float32 in [0, 1], exactly as the data pipeline makes it."""
        if self.input_format == "uint8":
            # (B, N, H, W, 3) -> (B, N, 3, H, W); x / 255 in float32 as the dataset's np.asarray(...) / 255
            return images.permute(0, 1, 4, 2, 3).float() / 255.0
        return images

    def forward(self, images: torch.Tensor, prior_depth: torch.Tensor | None = None,
                history: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """images in the input format; prior_depth (B, N, H, W) metres for the depth branch only;
        history (B, F, C, X, Y) for a temporal dense student only -> :attr:`output_names` in order."""
        if (prior_depth is not None) != self.prior_depth:
            raise OccDistillError("the sparse depth-prior model takes images and prior_depth" if self.prior_depth
                                  else "this model takes no prior_depth input")
        if (history is not None) != bool(self.temporal_frames):
            raise OccDistillError("the temporal dense student takes images and history" if self.temporal_frames
                                  else "this model takes no history input (a single-frame graph)")
        x = self.to_model_images(images)
        if self.kind == "dense":
            out = self.model(x, self.intrinsics, self.img_from_raw, self.ego_from_cam, history)
            labels = out.voxel_logits.argmax(dim=-1).to(torch.uint8)
            if self.temporal_frames:
                return out.voxel_logits, labels, out.lifted_bev
            return out.voxel_logits, labels
        from occdistill.models.sparse import SparseOutput

        m = self.model
        feats = m.image_features(x)
        init = m.initial_points(x.shape[0])
        layers = m.decode(init, feats, self.img_from_ego, prior_depth)
        out = SparseOutput(init_points=init, layers=layers, image_features=feats, extra={}, grid=m.grid,
                           classes=m.classes)
        return layers[-1].logits, m.voxelize(out).to(torch.uint8)


class ExportSoftplus(nn.Module):
    """``nn.Softplus`` as ``(relu(b x) + log1p(exp(-|b x|))) / b``: equal in float32 (the threshold
    branch of ``nn.Softplus`` differs by < 2e-9 relative) but exported as vectorised elementwise ops.
    The exporters lower ``nn.Softplus`` to ONNX Softplus + Greater + Where, and onnxruntime's CPU
    Softplus kernel is scalar: 17% of the street-tiny graph's time, for FlashOcc's head MLP alone."""

    def __init__(self, beta: float = 1.0):
        super().__init__()
        self.beta = float(beta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bx = x * self.beta if self.beta != 1.0 else x
        out = torch.relu(bx) + torch.log1p(torch.exp(-bx.abs()))
        return out / self.beta if self.beta != 1.0 else out


class ExportLinear(nn.Module):
    """``nn.Linear`` with the bias as one more input row: ``[x, 1] @ [W^T; b]``. Same sums (the bias
    joins the dot product), but one MatMul instead of MatMul + a broadcast bias pass over the output:
    FlashOcc's head MLP writes Z*K = 288 logits per BEV cell (11.5 MB for street-tiny), and
    onnxruntime's bias pass over them cost as much as the matmul itself (~2 ms of 33)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach()
        b = linear.bias.detach() if linear.bias is not None else w.new_zeros(w.shape[0])
        self.register_buffer("weight_t", torch.cat([w, b[:, None]], dim=1).t().contiguous())  # (in + 1, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ones = torch.ones(*x.shape[:-1], 1, dtype=x.dtype, device=x.device)
        return torch.cat([x, ones], dim=-1) @ self.weight_t


class GatheredPool(nn.Module):
    """The fixed-rig pooling with the depth x context product taken for the P pooled points only
    instead of all R frustum points (FastBEV++'s index-gather): the products are the same float32
    multiplications, so the pooled sums are bitwise those of
    :func:`occdistill.nn.bev_pool.bev_pool_precomputed`, whose run-sum arithmetic this repeats.
    Replaces ``fixed_pool`` of an export copy (same module name, so the precision converters find
    it): depth (B, N, D, h, w), context (B, N, C, h, w) -> (B, C, X, Y)."""

    def __init__(self, pool: nn.Module):
        super().__init__()
        self.frustum_shape, self.grid_shape = pool.frustum_shape, pool.grid_shape
        cams, bins, h, w = pool.frustum_shape
        rows = pool.point_index
        self.register_buffer("point_index", rows, persistent=False)
        # frustum row ((n * D + d) * h + i) * w + j -> feature cell (n * h + i) * w + j
        self.register_buffer("cell_index", (rows // (bins * h * w)) * (h * w) + rows % (h * w), persistent=False)
        self.register_buffer("interval_end", pool.interval_end, persistent=False)
        self.register_buffer("cell_interval", pool.cell_interval, persistent=False)

    def forward(self, depth: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        batch, cams, _, h, w = depth.shape
        channels = context.shape[2]
        num_x, num_y = self.grid_shape
        depth_p = depth.float().reshape(batch, -1)[:, self.point_index]  # (B, P)
        # (B, N, C, h, w) -> (B, N*h*w, C), rows gathered at each point's feature cell -> (B, P, C)
        ctx_p = context.float().permute(0, 1, 3, 4, 2).reshape(batch, cams * h * w, channels)[:, self.cell_index]
        values = (ctx_p * depth_p[..., None]).permute(1, 0, 2).reshape(-1, batch * channels)  # (P, B*C)
        centre = values.mean(dim=0, keepdim=True)
        ends = (values - centre).cumsum(0)[self.interval_end]
        counts = self.interval_end - torch.cat([self.interval_end.new_full((1,), -1), self.interval_end[:-1]])
        runs = torch.cat([ends[:1], ends[1:] - ends[:-1]], dim=0) + counts[:, None].to(values.dtype) * centre
        sums = torch.cat([runs.new_zeros(1, batch * channels), runs], dim=0)
        out = sums[self.cell_interval]  # (X*Y, B*C)
        return out.view(num_x, num_y, batch, channels).permute(2, 3, 0, 1).contiguous()


def _gathered_splat(vt: nn.Module, depth: torch.Tensor, context: torch.Tensor, *cams: torch.Tensor) -> torch.Tensor:
    return vt.fixed_pool(depth, context)


def exportable_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with export-friendly equivalents of slow-to-run parts; the caller's
    model is left as it is. :class:`ExportSoftplus` for ``nn.Softplus``; for the dense student also
    :class:`ExportLinear` in the occupancy head's per-cell MLP and, once a fixed rig is set on the
    copy, :class:`GatheredPool` (call :func:`enable_gathered_splat` after ``set_fixed_rig``)."""
    import copy

    clone = copy.deepcopy(model)
    for name, module in list(clone.named_modules()):
        parent = clone.get_submodule(name.rsplit(".", 1)[0]) if "." in name else clone
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(module, nn.Softplus):
            setattr(parent, leaf, ExportSoftplus(module.beta))
        elif isinstance(module, nn.Linear) and isinstance(clone, DenseStudent) and name.startswith("head."):
            setattr(parent, leaf, ExportLinear(module))
    return clone


def enable_gathered_splat(model: DenseStudent) -> None:
    """Switch a fixed-rig dense model (an export copy) to :class:`GatheredPool`."""
    import types

    vt = model.view_transform
    if vt.fixed_pool is None:
        raise ValueError("set the fixed rig first")
    vt.fixed_pool = GatheredPool(vt.fixed_pool)
    vt.splat = types.MethodType(_gathered_splat, vt)


SPARSE_TORCHSCRIPT_REASON = (
    "the sparse student exports with the dynamo exporter only: the TorchScript tracer cannot export "
    "AdaptiveMixing's reshape to sizes read from tensors (nn/sparse_decoder.py) nor the boolean-mask "
    "compaction of the voxelisation"
)



@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: str


@dataclass(frozen=True)
class ExportInfo:
    """What :func:`export_onnx` wrote. ``sha256`` is the ONNX file's; ``sidecar`` the JSON beside it."""

    path: Path
    sidecar: Path
    opset: int
    exporter: str
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    input_format: str
    rig_hash: str
    camera_names: tuple[str, ...]
    image_size: tuple[int, int]
    sha256: str
    size_bytes: int
    seconds: float
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["path"], d["sidecar"] = str(self.path), str(self.sidecar)
        return d


def sidecar_path(path: str | Path) -> Path:
    """``model.onnx`` -> ``model.onnx.json``."""
    p = Path(path)
    return p.with_name(p.name + ".json")


def _numpy_dtype_name(elem_type: int) -> str:
    import onnx

    return str(onnx.helper.tensor_dtype_to_np_dtype(elem_type))


def _io_info(values: Any) -> tuple[TensorInfo, ...]:
    out = []
    for v in values:
        t = v.type.tensor_type
        out.append(TensorInfo(v.name, tuple(int(d.dim_value) for d in t.shape.dim), _numpy_dtype_name(t.elem_type)))
    return tuple(out)


def _history_input(batch: int, frames: int, channels: int, grid_shape: Sequence[int]) -> dict[str, Any]:
    """Sidecar description of a temporal dense student's :data:`HISTORY_NAME` input."""
    return {
        "name": HISTORY_NAME, "shape": [batch, frames, channels, grid_shape[0], grid_shape[1]], "dtype": "float32",
        "layout": "B,F,C,X,Y (earlier frames newest first; C context channels; BEV cells indexed [x, y] like the "
                  "voxel grid)",
        "meaning": (f"the lifted BEVs ({LIFTED_BEV_NAME} output) of the F earlier frames of the stream, warped into "
                    "the current frame's ego frame by the ego motion (occdistill.nn.temporal.BEVHistory.warped: "
                    "bilinear, planar at z = 0); zeros = no usable earlier frame (scene start, another scene, "
                    "implausible ego motion: BEVHistory's reset rule)"),
        "frames": frames,
    }


def _lifted_bev_output(batch: int, channels: int, grid_shape: Sequence[int]) -> dict[str, Any]:
    """Sidecar description of a temporal dense student's :data:`LIFTED_BEV_NAME` output."""
    return {
        "name": LIFTED_BEV_NAME, "shape": [batch, channels, grid_shape[0], grid_shape[1]], "dtype": "float32",
        "layout": "B,C,X,Y",
        "meaning": (f"this frame's pooled BEV before the temporal fusion, in this frame's ego frame: push it with this "
                    f"frame's key ego pose into the history (BEVHistory.push) to build the next frame's "
                    f"{HISTORY_NAME} input"),
    }


def export_metadata(model: nn.Module, rig: Rig, *, input_format: str, batch: int, exporter: str, opset: int,
                    model_name: str = "dense") -> dict[str, Any]:
    """Everything a runtime needs to use (or refuse) the exported file, JSON-able. ``extra_inputs``
    describes the inputs after the images (the sparse depth branch's prior depth map, a temporal
    dense student's BEV history), in order; ``extra_outputs`` the outputs after logits and labels
    (a temporal dense student's lifted BEV)."""
    cfg = model.cfg
    kind = _model_kind(model)
    extra_inputs, extra_outputs = [], []
    if kind == "sparse" and cfg.depth_prior:
        extra_inputs.append({
            "name": PRIOR_DEPTH_NAME, "shape": [batch, len(rig.camera_names), *cfg.image_size], "dtype": "float32",
            "layout": "B,N,H,W (cameras in camera_names order)",
            "meaning": ("prior depth map per camera in metres (z in the camera frame), in network-input pixels "
                        "(the evaluation transform of the images applied to the depth map, nearest), 0 = no prior "
                        "depth at that pixel"),
        })
    if kind == "dense" and cfg.temporal_frames:
        extra_inputs.append(_history_input(batch, cfg.temporal_frames, cfg.context_channels, model.grid.shape))
        extra_outputs.append(_lifted_bev_output(batch, cfg.context_channels, model.grid.shape))
    return {
        "model_kind": kind,
        "logits": "voxel logits (B,X,Y,Z,K)" if kind == "dense" else "final-layer point class logits (B,Q,R,K_occ)",
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "warning": RIG_WARNING,
        "rig_hash": rig_hash(rig, cfg.image_size),
        "camera_names": list(rig.camera_names),
        "image_size": list(cfg.image_size),
        "batch": batch,
        "input_format": input_format,
        "input_layout": "B,N,H,W,3 uint8 RGB" if input_format == "uint8" else "B,N,3,H,W float32 in [0,1]",
        "extra_inputs": extra_inputs,
        "extra_outputs": extra_outputs,
        "rig": rig_to_dict(rig, cfg.image_size),
        "frustum": FrustumSpec.of(model).to_dict(),
        "grid_shape": list(model.grid.shape),
        "num_classes": cfg.num_classes,
        "model": model_name,
        "exporter": exporter,
        "opset": opset,
        "torch": torch.__version__,
    }


def _export_graph(wrapper: ExportWrapper, example: tuple[torch.Tensor, ...], path: Path, exporter: str,
                  opset: int) -> None:
    names = dict(input_names=list(wrapper.input_names), output_names=list(wrapper.output_names), opset_version=opset)
    # The inputs after the images go by keyword: the forward's optional parameters (prior_depth,
    # history) are named like the graph inputs, so either may come second.
    feeds = wrapper.feeds(example)
    args, kwargs = (feeds.pop(INPUT_NAME),), feeds
    if exporter == "dynamo":
        program = torch.onnx.export(wrapper, args, kwargs=kwargs, dynamo=True, external_data=False, optimize=True,
                                    **names)
        program.save(str(path))
    else:
        torch.onnx.export(wrapper, args, str(path), kwargs=kwargs, dynamo=False, do_constant_folding=True, **names)


def export_onnx(
    model: nn.Module,
    rig: Rig,
    path: str | Path,
    *,
    opset: int = 18,
    exporter: str = "dynamo",
    input_format: str = "uint8",
    batch: int = 1,
    model_name: str = "dense",
    extra_metadata: dict[str, Any] | None = None,
) -> ExportInfo:
    """Export ``model`` (dense or sparse student) with ``rig`` baked in to ``path`` (written
    atomically) + ``path.json``; the caller's model is not modified (an export copy is).

    ``exporter``: "dynamo" (torch.export -> onnxscript, the default of torch >= 2.9) or
    "torchscript" (the legacy tracer; dense student only). Raises :class:`OccDistillError` on an
    unsupported model/exporter or opset < 17.
    """
    import onnx

    if exporter not in EXPORTERS:
        raise OccDistillError(f"exporter {exporter!r} is not one of {', '.join(EXPORTERS)}")
    if opset < 17:
        raise OccDistillError(f"opset {opset}: the export needs opset >= 17")
    if rig.intrinsics.shape[0] != len(rig.camera_names):
        raise OccDistillError(f"rig has {rig.intrinsics.shape[0]} cameras but {len(rig.camera_names)} camera names")
    start = time.perf_counter()
    path = Path(path)
    if _model_kind(model) == "sparse" and exporter != "dynamo":
        raise OccDistillError(SPARSE_TORCHSCRIPT_REASON)
    wrapper = ExportWrapper(exportable_copy(model).eval(), rig, batch=batch, input_format=input_format).eval()
    if wrapper.kind == "dense":
        enable_gathered_splat(wrapper.model)
    example = wrapper.example_inputs()
    meta = export_metadata(model, rig, input_format=input_format, batch=batch, exporter=exporter, opset=opset,
                           model_name=model_name)
    meta.update(extra_metadata or {})
    with tempfile.TemporaryDirectory(prefix=".export.", dir=path.parent if path.parent.exists() else None) as tmp:
        raw = Path(tmp) / "model.onnx"
        with torch.no_grad():
            try:
                _export_graph(wrapper, example, raw, exporter, opset)
            except Exception as exc:  # exporter internals raise many types; name the cause in one line
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise OccDistillError(f"{exporter} ONNX export failed: {first}") from exc
        proto = onnx.load(str(raw))
    reshaped = transposes_to_reshapes(proto)
    onnx.checker.check_model(proto)
    del proto.metadata_props[:]
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key = META_PREFIX + key
        entry.value = value if isinstance(value, str) else json.dumps(value)
    proto.doc_string = RIG_WARNING
    actual_opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), opset)
    atomic_write_bytes(path, proto.SerializeToString())
    notes = [RIG_WARNING, f"{reshaped} size-1 Transpose(s) rewritten as Reshape",
             "nn.Softplus exported as relu(x) + log1p(exp(-|x|)) (vectorised ops)",
             "dense: head Linear layers with the bias as an extra input row (one MatMul, no bias pass); "
             "depth x context taken for the pooled points only (gather, then multiply)"]
    if wrapper.temporal_frames:
        notes.append(TEMPORAL_NOTE)
    info = ExportInfo(
        path=path, sidecar=sidecar_path(path), opset=int(actual_opset), exporter=exporter,
        inputs=_io_info(proto.graph.input), outputs=_io_info(proto.graph.output), input_format=input_format,
        rig_hash=meta["rig_hash"], camera_names=tuple(rig.camera_names), image_size=tuple(model.cfg.image_size),
        sha256=file_sha256(path), size_bytes=path.stat().st_size, seconds=round(time.perf_counter() - start, 2),
        notes=tuple(notes),
    )
    atomic_write_json(info.sidecar, {**meta, "file": path.name, "sha256": info.sha256, "size_bytes": info.size_bytes,
                                     "inputs": [asdict(t) for t in info.inputs],
                                     "outputs": [asdict(t) for t in info.outputs]})
    return info


def transposes_to_reshapes(proto: Any) -> int:
    """Replace every Transpose that only moves size-1 axes (e.g. (1, R, C) -> (R, 1, C) in the
    pooling at batch 1) by a Reshape: same data order, no copy. onnxruntime executes such a
    Transpose as a full copy (0.85 ms of 32 in street-tiny). Needs static shapes; returns the count."""
    import onnx
    from onnx import numpy_helper

    inferred = onnx.shape_inference.infer_shapes(proto)
    shapes = {}
    for v in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
        dims = v.type.tensor_type.shape.dim
        if dims and all(d.HasField("dim_value") for d in dims):
            shapes[v.name] = [int(d.dim_value) for d in dims]
    count = 0
    for node in proto.graph.node:
        if node.op_type != "Transpose" or node.input[0] not in shapes:
            continue
        shape = shapes[node.input[0]]
        perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), list(range(len(shape)))[::-1])
        moved = [p for p in perm if shape[p] != 1]
        if moved != sorted(moved):
            continue
        target = f"{node.output[0]}__reshape_to"
        proto.graph.initializer.append(numpy_helper.from_array(np.array([shape[p] for p in perm], np.int64), target))
        node.op_type = "Reshape"
        del node.attribute[:]
        node.input.append(target)
        count += 1
    return count


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The ``occdistill.*`` metadata of an exported file (values JSON-decoded)."""
    import onnx

    p = Path(path)
    if not p.is_file():
        raise OccDistillError(f"{p}: ONNX file not found")
    try:
        proto = onnx.load(str(p), load_external_data=False)
    except Exception as exc:  # protobuf DecodeError and friends
        raise OccDistillError(f"{p}: not a readable ONNX file ({type(exc).__name__})") from exc
    meta = {}
    for entry in proto.metadata_props:
        if entry.key.startswith(META_PREFIX):
            key = entry.key[len(META_PREFIX):]
            try:
                meta[key] = json.loads(entry.value)
            except ValueError:
                meta[key] = entry.value
    if meta.get("format") != FORMAT:
        raise OccDistillError(f"{p}: not an occdistill export (no {META_PREFIX}format metadata)")
    return meta


# ---------------------------------------------------------------------------------------------
# host-side preprocessing for the uint8 input


class FramePreprocessor:
    """Decode + resize/crop of one frame's camera images to the network input as uint8 (N, H, W, 3):
    the evaluation transform of ``image_aug`` (an :class:`~occdistill.data.augment.ImageAugConfig`),
    the same PIL operations as :meth:`~occdistill.data.augment.ImageAug.apply_image` without the
    float conversion, so ``load(paths) / 255`` equals the dataset's images exactly (tested)."""

    def __init__(self, image_aug: Any):
        self.image_aug = image_aug
        self._augs: dict[tuple[int, int], Any] = {}

    def _aug(self, raw_size: tuple[int, int]) -> Any:
        if raw_size not in self._augs:
            from occdistill.data.augment import sample_image_aug

            self._augs[raw_size] = sample_image_aug(self.image_aug, raw_size, None)
        return self._augs[raw_size]

    def load_image(self, path: str | Path) -> np.ndarray:
        from PIL import Image

        from occdistill.geometry import resize_matrix

        with Image.open(path) as img:
            img = img.convert("RGB")
        aug = self._aug((img.height, img.width))
        (rh, rw), (oh, ow) = aug.resize_size, aug.out_size
        if (rh, rw) != aug.raw_size:
            img = img.resize((rw, rh), Image.BILINEAR)
        post = aug.img_from_raw @ np.linalg.inv(resize_matrix(rw / aug.raw_size[1], rh / aug.raw_size[0]))
        if (oh, ow) != (rh, rw) or not np.allclose(post, np.eye(3), atol=1e-12):
            data = tuple(np.linalg.inv(post)[:2].reshape(6))
            img = img.transform((ow, oh), Image.AFFINE, data, resample=Image.BILINEAR, fillcolor=(0, 0, 0))
        return np.asarray(img, dtype=np.uint8)

    def load(self, paths: Sequence[str | Path]) -> np.ndarray:
        """(N, H, W, 3) uint8, cameras in the order of ``paths``."""
        return np.stack([self.load_image(p) for p in paths])


def frame_image_paths(dataset: Any, index: int) -> list[Path]:
    """Camera image files of frame ``index`` of an Occ3D-layout dataset, in its camera order."""
    from occdistill.data.infos import resolve_data_path

    frame = dataset.frame(index)
    return [resolve_data_path(dataset.data_root, frame.camera(n).image_path) for n in dataset.camera_names]


# ---------------------------------------------------------------------------------------------
# the onnxruntime side


def make_session(path: str | Path, threads: int | None = None, optimization: str = "all", spin: bool = True) -> Any:
    """An onnxruntime CPU session: graph optimisation ``optimization`` (disable/basic/extended/all),
    ``threads`` intra-op threads (None: onnxruntime's choice, one per physical core), sequential
    execution. ``spin=False`` lets idle pool threads sleep instead of busy-waiting for the next
    run: slightly slower per run, but it does not steal the cores from other work in the process
    (other engines in an interleaved benchmark, the robot's other nodes)."""
    import onnxruntime as ort

    levels = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
              "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
              "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
    if optimization not in levels:
        raise OccDistillError(f"optimization {optimization!r} is not one of {', '.join(levels)}")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = levels[optimization]
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.inter_op_num_threads = 1
    if threads:
        opts.intra_op_num_threads = int(threads)
    opts.log_severity_level = 3
    if not spin:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
        raise OccDistillError(f"{path}: onnxruntime cannot load it ({str(exc).strip().splitlines()[0]})") from exc


@dataclass(frozen=True)
class _ExtraInput:
    """An optional graph input after the images, as the runtime's errors name it."""

    name: str
    what: str
    detail: str


_PRIOR_DEPTH_INPUT = _ExtraInput(PRIOR_DEPTH_NAME, "a prior depth map", f"{PRIOR_DEPTH_NAME}, metres")
_HISTORY_INPUT = _ExtraInput(HISTORY_NAME, "a BEV history", f"{HISTORY_NAME}: B, F, C, X, Y, the earlier frames' "
                             "lifted BEVs warped into this frame, zeros = no usable earlier frame")


class OnnxOccModel:
    """An exported student in onnxruntime, with its baked rig.

    :meth:`run` takes images in the export's ``input_format`` (and, for a sparse student with the
    depth branch, the prior depth map: :attr:`prior_depth_shape`; for a temporal dense student the
    warped BEV history: :attr:`history_shape`, streamed by :class:`occdistill.deploy.stream.StreamRunner`);
    :meth:`check_rig` refuses a frame calibration that differs from the baked rig (names/order,
    count, or geometry beyond ``rig_tolerance_m``, default half a BEV cell).
    """

    def __init__(self, path: str | Path, *, threads: int | None = None, optimization: str = "all",
                 spin: bool = True, rig_tolerance_m: float | None = None):
        self.path = Path(path)
        self.meta = read_metadata(self.path)
        self.rig = rig_from_dict(self.meta["rig"])
        self.rig_hash = self.meta["rig_hash"]
        self.input_format = self.meta["input_format"]
        self.image_size = tuple(self.meta["image_size"])
        self.frustum = FrustumSpec.from_dict(self.meta["frustum"])
        self.rig_tolerance_m = default_rig_tolerance(self.frustum) if rig_tolerance_m is None else rig_tolerance_m
        self.session = make_session(self.path, threads, optimization, spin)
        inputs = self.session.get_inputs()
        self.input_name, self.input_shape = inputs[0].name, tuple(inputs[0].shape)
        self.input_names = tuple(i.name for i in inputs)
        # The inputs after the images, when the graph has them: the depth branch's prior depth map,
        # a temporal student's BEV history.
        extra = {i.name: tuple(i.shape) for i in inputs[1:]}
        self.prior_depth_shape = extra.get(PRIOR_DEPTH_NAME)
        self.history_shape = extra.get(HISTORY_NAME)
        self.output_names = [o.name for o in self.session.get_outputs()]

    @property
    def grid(self) -> VoxelGrid:
        """The voxel grid of the outputs (and of the BEV history's cells)."""
        return VoxelGrid(self.frustum.grid_range, self.frustum.voxel_size)

    def check_rig(self, intrinsics: Any, img_from_raw: Any, ego_from_cam: Any,
                  camera_names: Sequence[str] | None = None) -> RigCheck:
        """Raise :class:`OccDistillError` unless one frame's calibration matches the baked rig."""
        check = compare_rig(self.rig, self.frustum, intrinsics, img_from_raw, ego_from_cam, camera_names,
                            self.rig_tolerance_m)
        if not check.ok:
            raise OccDistillError(f"{self.path.name} (rig {self.rig_hash}) refuses this input: {check.reason}")
        return check

    def rig_frames(self, dataset: Any, indices: Sequence[int] | None = None) -> RigFrames:
        """The frames of ``dataset`` that :meth:`check_rig` accepts (:func:`select_rig_frames`)."""
        return select_rig_frames(self.rig, self.frustum, dataset, tolerance_m=self.rig_tolerance_m, indices=indices)

    def check_dataset(self, dataset: Any) -> None:
        """Camera names/order and image size of a dataset against the baked rig (geometry is checked per frame)."""
        names = tuple(getattr(dataset, "camera_names", ()) or ())
        if names and names != tuple(self.rig.camera_names):
            raise OccDistillError(f"{self.path.name} (rig {self.rig_hash}) was exported for cameras "
                                  f"{list(self.rig.camera_names)}, the dataset has {list(names)}")
        aug = getattr(dataset, "image_aug", None)
        if aug is not None and tuple(aug.final_size) != self.image_size:
            raise OccDistillError(f"{self.path.name}: exported for {self.image_size[0]}x{self.image_size[1]} images, "
                                  f"the dataset makes {aug.final_size[0]}x{aug.final_size[1]}")

    def prepare(self, images: torch.Tensor | np.ndarray) -> np.ndarray:
        """(B, N, 3, H, W) float32 in [0, 1] (the dataset's images) -> the graph's input layout."""
        x = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
        if self.input_format == "uint8":
            if x.dtype == np.uint8:
                return x
            # The dataset's floats are uint8 / 255 exactly: rounding recovers the bytes.
            return np.ascontiguousarray(np.rint(x.transpose(0, 1, 3, 4, 2) * 255.0).clip(0, 255).astype(np.uint8))
        return np.ascontiguousarray(x, dtype=np.float32)

    def _extra_feed(self, spec: _ExtraInput, expected: tuple[int, ...] | None,
                    value: np.ndarray | None) -> np.ndarray | None:
        """One input after the images, checked against the graph: present exactly when the graph
        takes it (``expected`` its shape, None: not taken), of that shape; as float32."""
        if expected is None:
            if value is not None:
                raise OccDistillError(f"{self.path.name}: the export has no {spec.name} input (it takes "
                                      f"{', '.join(self.input_names)})")
            return None
        if value is None:
            raise OccDistillError(f"{self.path.name}: the export takes {spec.what} {expected} ({spec.detail}) besides "
                                  "the images")
        if tuple(value.shape) != expected:
            raise OccDistillError(f"{self.path.name}: {spec.name} {tuple(value.shape)}, the export takes {expected} "
                                  f"({spec.detail})")
        return np.ascontiguousarray(value, dtype=np.float32)

    def run(self, images: np.ndarray, outputs: Sequence[str] | None = None,
            prior_depth: np.ndarray | None = None, history: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Graph input (already in the export's layout), for the depth branch the prior depth map
        (B, N, H, W) metres, for a temporal student the BEV history (B, F, C, X, Y) (earlier
        lifted BEVs warped into this frame, zeros = none) -> {output name: array}."""
        if tuple(images.shape) != self.input_shape:
            raise OccDistillError(f"{self.path.name}: input {tuple(images.shape)}, the export takes {self.input_shape}")
        feed = {self.input_name: images}
        for spec, expected, value in ((_PRIOR_DEPTH_INPUT, self.prior_depth_shape, prior_depth),
                                      (_HISTORY_INPUT, self.history_shape, history)):
            array = self._extra_feed(spec, expected, value)
            if array is not None:
                feed[spec.name] = array
        names = list(outputs) if outputs is not None else self.output_names
        return dict(zip(names, self.session.run(names, feed)))


@dataclass
class _Logits:
    voxel_logits: torch.Tensor


class OnnxEvalAdapter(nn.Module):
    """An :class:`OnnxOccModel` behind the model interface ``engine.evaluate`` calls
    (``model(images, intrinsics, img_from_raw, ego_from_cam).voxel_logits``), checking the rig of
    every batch. A batch shorter than the export's is padded."""

    def __init__(self, onnx_model: OnnxOccModel):
        super().__init__()
        self.onnx_model = onnx_model
        self.max_shift_m = 0.0

    def forward(self, images: torch.Tensor, intrinsics: torch.Tensor, img_from_raw: torch.Tensor,
                ego_from_cam: torch.Tensor) -> _Logits:
        for b in range(images.shape[0]):
            check = self.onnx_model.check_rig(intrinsics[b], img_from_raw[b], ego_from_cam[b])
            self.max_shift_m = max(self.max_shift_m, check.max_shift_m)
        x = self.onnx_model.prepare(images)
        batch = self.onnx_model.input_shape[0]
        if x.shape[0] < batch:  # the last, short batch of a split: pad with its last frame
            x = np.concatenate([x, np.repeat(x[-1:], batch - x.shape[0], axis=0)])
        out = self.onnx_model.run(x, ["logits"])["logits"][: images.shape[0]]
        return _Logits(torch.from_numpy(out))


def evaluate_onnx(onnx_model: OnnxOccModel, dataset: Any, *, rayiou: bool = False,
                  progress: bool = False) -> dict[str, Any]:
    """The metrics report of ``engine.evaluate`` for an exported model on an (eval-mode) dataset;
    refuses a dataset whose rig differs from the baked one. Adds ``rig_max_shift_m``."""
    from occdistill.engine.evaluate import evaluate

    if onnx_model.meta.get("model_kind", "dense") != "dense":
        raise OccDistillError(f"{onnx_model.path.name}: evaluation of exported {onnx_model.meta['model_kind']} "
                              "students is not supported (engine.evaluate reads voxel logits)")
    if onnx_model.history_shape is not None:
        raise OccDistillError(f"{onnx_model.path.name}: evaluation of an exported temporal student is not supported "
                              f"(engine.evaluate cannot stream its {HISTORY_NAME} input frame by frame); play its "
                              "scenes with occdistill.deploy.stream.StreamRunner")
    onnx_model.check_dataset(dataset)
    adapter = OnnxEvalAdapter(onnx_model)
    report = evaluate(adapter, dataset, torch.device("cpu"), batch_size=onnx_model.input_shape[0], rayiou=rayiou,
                      progress=progress)
    report["rig_max_shift_m"] = round(adapter.max_shift_m, 4)
    return report


# ---------------------------------------------------------------------------------------------
# parity


@dataclass(frozen=True)
class Parity:
    """onnxruntime vs eager PyTorch (same rig, same inputs): largest and mean |logit difference|,
    largest |logit| (the scale), share of voxels whose argmax agrees, over how many voxels/frames;
    for a temporal graph also the largest |lifted_bev difference| and |lifted_bev| (None otherwise:
    that output feeds the next frame's history, so its error would carry over).

    ``ok``: max |diff| <= ``logit_tolerance`` x max(1, max |logit|) (float32 reassociation errors
    grow with the logits' scale: ~2e-5 relative for trained street-tiny, whose logits reach ~40),
    the same relative bound on the lifted BEV, and agreement >= ``agreement_bound``; a None bound
    is not checked."""

    max_abs_logit_diff: float
    mean_abs_logit_diff: float
    max_abs_logit: float
    argmax_agreement: float
    voxels: int
    frames: int
    logit_tolerance: float | None = LOGIT_TOLERANCE
    agreement_bound: float | None = MIN_ARGMAX_AGREEMENT
    max_abs_bev_diff: float | None = None
    max_abs_bev: float | None = None

    @property
    def allowed_logit_diff(self) -> float | None:
        return None if self.logit_tolerance is None else self.logit_tolerance * max(1.0, self.max_abs_logit)

    @property
    def allowed_bev_diff(self) -> float | None:
        if self.logit_tolerance is None or self.max_abs_bev is None:
            return None
        return self.logit_tolerance * max(1.0, self.max_abs_bev)

    @property
    def ok(self) -> bool:
        bev_ok = self.allowed_bev_diff is None or self.max_abs_bev_diff <= self.allowed_bev_diff
        return ((self.logit_tolerance is None or self.max_abs_logit_diff <= self.allowed_logit_diff) and bev_ok
                and (self.agreement_bound is None or self.argmax_agreement >= self.agreement_bound))

    def summary(self) -> str:
        bounds = []
        if self.logit_tolerance is not None:
            bounds.append(f"|diff| <= {self.allowed_logit_diff:.3g} = {self.logit_tolerance:g} x max(1, max|logit|)")
        if self.allowed_bev_diff is not None:
            bounds.append(f"|{LIFTED_BEV_NAME} diff| <= {self.allowed_bev_diff:.3g}")
        if self.agreement_bound is not None:
            bounds.append(f"agreement >= {100 * self.agreement_bound:.1f}%")
        verdict = (("PASS" if self.ok else "FAIL") + f" ({', '.join(bounds)})") if bounds else "not checked"
        bev = ("" if self.max_abs_bev_diff is None else f", max |{LIFTED_BEV_NAME} diff| {self.max_abs_bev_diff:.3g} "
               f"(max |{LIFTED_BEV_NAME}| {self.max_abs_bev:.3g})")
        return (f"parity over {self.frames} frame(s), {self.voxels} voxels: max |logit diff| "
                f"{self.max_abs_logit_diff:.3g} (max |logit| {self.max_abs_logit:.3g}), mean "
                f"{self.mean_abs_logit_diff:.3g}, argmax agreement {100 * self.argmax_agreement:.4f}%{bev} "
                f"-> {verdict}")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "allowed_logit_diff": self.allowed_logit_diff,
                "allowed_bev_diff": self.allowed_bev_diff, "ok": self.ok}


GraphInput = Union[torch.Tensor, np.ndarray, tuple[Union[torch.Tensor, np.ndarray], ...]]


def _arrays(x: GraphInput) -> tuple[np.ndarray, ...]:
    """One parity input -> its graph arrays in the graph's input order: the images alone, or a tuple
    (images, prior depth map) / (images, history)."""
    parts = x if isinstance(x, tuple) else (x,)
    return tuple(t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t) for t in parts)


def check_parity(
    model: nn.Module,
    onnx_model: OnnxOccModel | str | Path,
    inputs: Sequence[GraphInput],
    *,
    logit_tolerance: float | None = LOGIT_TOLERANCE,
    agreement_bound: float | None = MIN_ARGMAX_AGREEMENT,
    threads: int | None = None,
    raise_on_failure: bool = True,
    verbose: bool = True,
) -> Parity:
    """Run the eager model (a copy switched to the export's baked rig) and onnxruntime on the same
    ``inputs`` (each the graph inputs in the export's layout and input order: the images, or for
    the sparse depth branch (images, prior depth map), for a temporal student (images, history))
    and compare the logits, labels and (temporal) lifted BEVs.

    Prints :meth:`Parity.summary` (``verbose``) and raises :class:`OccDistillError` outside the
    bounds when ``raise_on_failure``. Pass None bounds for reduced-precision variants (reported only).
    """
    import copy

    ort_model = onnx_model if isinstance(onnx_model, OnnxOccModel) else OnnxOccModel(onnx_model, threads=threads)
    device = model.pixel_mean.device
    model.eval()
    # A copy: the wrapper switches its model to the baked rig's pooling; the caller's stays as it is.
    wrapper = ExportWrapper(copy.deepcopy(model), ort_model.rig, batch=ort_model.input_shape[0],
                            input_format=ort_model.input_format).eval()
    temporal = bool(wrapper.temporal_frames)
    max_diff, sum_diff, logits_n, max_logit, agree, voxels = 0.0, 0.0, 0, 0.0, 0, 0
    max_bev_diff, max_bev = (0.0, 0.0) if temporal else (None, None)
    for x in inputs:
        arrays = _arrays(x)
        feeds = wrapper.feeds(tuple(torch.from_numpy(a).to(device) for a in arrays))
        with torch.inference_mode():
            ref_out = [t.cpu().numpy() for t in wrapper(**feeds)]  # wrapper.output_names, in order
        named = dict(zip(wrapper.input_names, arrays))
        got = ort_model.run(named[INPUT_NAME], prior_depth=named.get(PRIOR_DEPTH_NAME),
                            history=named.get(HISTORY_NAME))
        ref = ref_out[0].astype(np.float64)
        diff = np.abs(got["logits"].astype(np.float64) - ref)
        max_diff = max(max_diff, float(diff.max()))
        max_logit = max(max_logit, float(np.abs(ref).max()))
        sum_diff += float(diff.sum())
        logits_n += diff.size
        agree += int((got["labels"] == ref_out[1]).sum())
        voxels += int(got["labels"].size)
        if temporal:
            ref_bev = ref_out[2].astype(np.float64)
            max_bev_diff = max(max_bev_diff, float(np.abs(got[LIFTED_BEV_NAME].astype(np.float64) - ref_bev).max()))
            max_bev = max(max_bev, float(np.abs(ref_bev).max()))
    parity = Parity(max_diff, sum_diff / max(logits_n, 1), max_logit, agree / max(voxels, 1), voxels, len(inputs),
                    logit_tolerance, agreement_bound, max_bev_diff, max_bev)
    if verbose:
        print(f"{ort_model.path.name}: {parity.summary()}")
    if raise_on_failure and not parity.ok:
        raise OccDistillError(f"{ort_model.path}: {parity.summary()}")
    return parity


__all__ = [
    "EXPORTERS", "ExportInfo", "ExportLinear", "ExportSoftplus", "ExportWrapper", "FramePreprocessor", "FrustumSpec",
    "GatheredPool", "GraphInput", "HISTORY_NAME", "INPUT_FORMATS", "LIFTED_BEV_NAME", "OnnxEvalAdapter",
    "OnnxOccModel", "PRIOR_DEPTH_NAME", "Parity", "RIG_WARNING", "RigCheck", "TEMPORAL_NOTE",
    "RigFrames", "SPARSE_TORCHSCRIPT_REASON", "TensorInfo", "check_parity", "compare_rig", "dataset_subset",
    "default_rig_tolerance", "enable_gathered_splat", "evaluate_onnx", "export_metadata", "export_onnx",
    "exportable_copy", "frame_calibration", "frame_image_paths", "make_session", "max_frustum_shift",
    "raw_image_size", "read_metadata", "rig_from_dataset", "rig_from_dict", "rig_from_sample", "rig_hash",
    "rig_to_dict", "select_rig_frames", "sidecar_path", "synthetic_prior_depth", "transposes_to_reshapes",
]
