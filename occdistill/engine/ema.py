"""Exponential moving average of the weights (MEGVII / FlashOcc ``MEGVIIEMAHook``).

The averaged copy is what FlashOcc evaluates and releases; its decay ramps up,
``d_n = decay * (1 - exp(-n / ramp_steps))``, so the first updates follow the fast-changing
weights instead of dragging the random initialisation along. Buffers (BatchNorm statistics) are
averaged like parameters; integer buffers (``num_batches_tracked``) are copied.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn


class ModelEMA:
    def __init__(self, model: nn.Module, decay: float, ramp_steps: int = 2000):
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay
        self.ramp_steps = ramp_steps
        self.updates = 0

    def current_decay(self) -> float:
        if self.ramp_steps == 0:
            return self.decay
        return self.decay * (1.0 - math.exp(-self.updates / self.ramp_steps))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Blend ``model`` (the unwrapped training model) into the average."""
        self.updates += 1
        d = self.current_decay()
        live = model.state_dict()
        for name, avg in self.module.state_dict().items():
            if avg.dtype.is_floating_point:
                avg.lerp_(live[name].detach(), 1.0 - d)  # avg = d * avg + (1 - d) * live
            else:
                avg.copy_(live[name])
