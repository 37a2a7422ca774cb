"""Seeded Gaussian noise, drawn either for a whole batch or per sample from per-sample generators.

Per-sample generators make a sampler's result for one slice independent of which other slices share its
batch, so chunked and unchunked inference agree exactly (see ``DiffusionSamplerInferer``).
"""

from __future__ import annotations

from typing import Callable, Sequence, Union

import torch
from torch import Tensor

#: One generator for the batch, one per sample (length = batch size), or None (global RNG).
GeneratorLike = Union[torch.Generator, Sequence[torch.Generator], None]
#: noise(shape, generator, device) -> float32 tensor of ``shape``, zero mean and unit variance per pixel: :func:`randn`
#: (white Gaussian) or a structured noise such as AnoDDPM's simplex noise (``peers.anoddpm.SimplexNoise``).
NoiseFn = Callable[[Sequence[int], GeneratorLike, Union[torch.device, str, None]], Tensor]


def randn(shape: Sequence[int], generator: GeneratorLike = None, device: torch.device | str | None = None) -> Tensor:
    """Standard normal float32 tensor of ``shape`` on ``device``.

    With a sequence of generators, row ``i`` (``shape[0]`` rows) is drawn from ``generator[i]`` alone.
    Noise is drawn on each generator's own device, then moved to ``device``.
    """
    shape = tuple(int(s) for s in shape)
    if generator is None or isinstance(generator, torch.Generator):
        gen_device = generator.device if generator is not None else device
        return torch.randn(shape, generator=generator, device=gen_device).to(device)
    if len(generator) != shape[0]:
        raise ValueError(f"got {len(generator)} per-sample generators for a batch of {shape[0]}")
    rows = [torch.randn(shape[1:], generator=g, device=g.device) for g in generator]
    return torch.stack(rows).to(device)
