"""Learning-rate schedule: linear warm-up, then cosine decay or constant.

The rate is a pure function of the optimiser step (nanoGPT's ``get_lr``): the loop sets it on every
step, so the schedule has no state of its own to save, and a resumed run gets the same rate as an
uninterrupted one by construction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class LRSchedule:
    base_lr: float
    total_steps: int
    warmup_steps: int = 0
    warmup_ratio: float = 1e-3  # the first step runs at base_lr * warmup_ratio (mmcv "linear" warm-up)
    kind: Literal["cosine", "constant"] = "cosine"
    min_lr_ratio: float = 0.0  # the cosine reaches base_lr * min_lr_ratio at total_steps

    def __call__(self, step: int) -> float:
        """Rate of optimiser step ``step`` (0-based)."""
        if step < self.warmup_steps:
            return self.base_lr * (self.warmup_ratio + (1.0 - self.warmup_ratio) * step / self.warmup_steps)
        if self.kind == "constant":
            return self.base_lr
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.base_lr * (self.min_lr_ratio + (1.0 - self.min_lr_ratio) * cosine)
