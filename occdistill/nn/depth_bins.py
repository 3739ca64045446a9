"""Depth bins shared by the LSS lift (where features are placed) and the depth loss (targets).

``dbound = (dmin, dmax, step)``: D = (dmax - dmin) / step bins, bin k covers the metric z-depth
interval ``[dmin + k*step, dmin + (k+1)*step)``. Frustum features of bin k are placed at the bin
centre ``dmin + (k + 0.5) * step``. (BEVDet/FlashOcc place them at the lower edge ``dmin + k*step``
while their depth targets use the same half-open bins: half a bin nearer than the bin's mean
depth. Using the centre keeps the lift and the loss consistent; it only matters for loading
FlashOcc checkpoints, which this project does not do.)

FlashOcc M0: (1, 45, 1.0) -> 44 bins; M1: (1, 45, 0.5) -> 88 bins.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DepthBins:
    dmin: float
    dmax: float
    step: float

    def __post_init__(self) -> None:
        for name in ("dmin", "dmax", "step"):
            object.__setattr__(self, name, float(getattr(self, name)))
        n = (self.dmax - self.dmin) / self.step if self.step > 0 else 0.0
        if self.dmin <= 0 or n < 1 or abs(n - round(n)) > 1e-6:
            raise ValueError(
                f"depth bins (dmin={self.dmin}, dmax={self.dmax}, step={self.step}) need 0 < dmin < dmax "
                "and a whole number of steps"
            )

    @property
    def num_bins(self) -> int:
        return round((self.dmax - self.dmin) / self.step)

    def centers(self, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> torch.Tensor:
        """(D,) metric depth at which each bin's features are placed."""
        return self.dmin + (torch.arange(self.num_bins, dtype=dtype, device=device) + 0.5) * self.step

    def index(self, depth: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Metric depths (...) -> (bin index (...) int64, valid (...) bool).

        Valid means ``dmin <= depth < dmax``; invalid entries (including 0 = "no target") get
        index 0 and must be masked by the caller.
        """
        pos = (depth - self.dmin) / self.step
        valid = (pos >= 0) & (pos < self.num_bins)
        idx = torch.where(valid, pos, torch.zeros_like(pos)).floor().long().clamp(max=self.num_bins - 1)
        return idx, valid
