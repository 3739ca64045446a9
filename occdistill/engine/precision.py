"""Mixed precision: autocast contexts and the gradient scaler, from the ``runtime.amp`` setting.

bf16 needs no loss scaling; fp16 does (GradScaler). Losses are computed in float32 whatever the
setting (occdistill.losses), and a scaler that is not needed is a disabled one, so the loop calls
the same four scaler methods in every mode.
"""

from __future__ import annotations

import contextlib
from typing import ContextManager

import torch

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, amp: str) -> ContextManager:
    if amp == "off":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=_DTYPES[amp])


def grad_scaler(device: torch.device, amp: str) -> torch.amp.GradScaler:
    return torch.amp.GradScaler(device.type, enabled=amp == "fp16")
