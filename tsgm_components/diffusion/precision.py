"""Mixed precision: one meaning of ``amp`` in every trainer and inferer of tsgm.

``amp=True`` runs the network passes under ``torch.autocast`` in the device's mixed-precision dtype
(:func:`amp_dtype`): float16 on CUDA, where training scales the loss with a ``GradScaler`` (:func:`grad_scaler`), and
bfloat16 on the CPU, which needs no scaler (its exponent range is float32's). Losses, optimiser states, EMA weights
and sampler states stay float32. bfloat16 pays off only on CPUs with native support (AVX512-BF16/AMX,
:func:`tsgm_components.cpu_has_fast_bf16`; ``benchmarks/cpu_bf16.py``); every config keeps ``amp`` off, so results do
not depend on the processor.
"""

from __future__ import annotations

import torch


def amp_dtype(device: torch.device | str) -> torch.dtype:
    """float16 on CUDA, bfloat16 elsewhere."""
    return torch.float16 if torch.device(device).type == "cuda" else torch.bfloat16


def autocast(device: torch.device | str, amp: bool) -> torch.autocast:
    """``torch.autocast`` of ``device`` in :func:`amp_dtype`, enabled when ``amp``."""
    device = torch.device(device)
    return torch.autocast(device.type, dtype=amp_dtype(device), enabled=bool(amp))


def grad_scaler(device: torch.device | str, amp: bool) -> torch.amp.GradScaler | None:
    """The loss scaler float16 training needs (``amp`` on CUDA), else None."""
    device = torch.device(device)
    return torch.amp.GradScaler(device.type) if amp and device.type == "cuda" else None
