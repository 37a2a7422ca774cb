"""Variance-exploding SDE (Song et al. 2021): noise scale σ(t), its discrete scales, the prior, and t sampling."""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from tsgm_components.diffusion.noise import GeneratorLike, randn


class VESDE:
    """VE SDE dx = sqrt(d[σ²]/dt) dw with σ(t) = σ_min (σ_max/σ_min)^t, t ∈ [eps, 1].

    Defaults follow the authors' code (σ_min = 0.01; the paper text says 0.1), σ_max = 348 and N = 1000 scales.
    σ_max = 348 belongs to 256×256 slices; see :func:`max_pairwise_distance` for other data.

    Prior choice: ``prior_sample`` draws from σ_max·N(0, I), the standard VE prior (the marginal of any data in
    [0, 1] at σ_max is ≈ N(0, σ_max² I)). The authors' code starts sampling from N(0, I) instead, which is
    inconsistent with the score model's training distribution at σ_max; we do not copy that quirk.
    """

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 348.0, n_scales: int = 1000, eps: float = 1e-5):
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        if n_scales < 2:
            raise ValueError(f"n_scales must be >= 2, got {n_scales}")
        if not 0 <= eps < 1:
            raise ValueError(f"eps must be in [0, 1), got {eps}")
        self.sigma_min = float(sigma_min)
        self.sigma_max = float(sigma_max)
        self.n_scales = int(n_scales)
        self.eps = float(eps)
        self._log_ratio = math.log(self.sigma_max / self.sigma_min)

    def sigma(self, t: Tensor) -> Tensor:
        """σ(t) = σ_min (σ_max/σ_min)^t, elementwise; same shape as ``t``."""
        return self.sigma_min * torch.exp(t * self._log_ratio)

    def t_of_sigma(self, sigma: Tensor) -> Tensor:
        """Inverse of :meth:`sigma`: t = ln(σ/σ_min) / ln(σ_max/σ_min)."""
        return torch.log(sigma / self.sigma_min) / self._log_ratio

    def discrete_sigmas(self) -> Tensor:
        """The N discrete noise scales, shape (N,), increasing geometrically from σ_min to σ_max."""
        return torch.exp(torch.linspace(math.log(self.sigma_min), math.log(self.sigma_max), self.n_scales))

    def prior_sample(self, shape: Sequence[int], generator: GeneratorLike = None, device: torch.device | str | None = None) -> Tensor:
        """A draw from the prior σ_max·N(0, I) of ``shape`` (per-sample generators allowed, see ``noise.randn``)."""
        return self.sigma_max * randn(shape, generator, device)

    def sample_t(self, batch: int, generator: torch.Generator | None = None, device: torch.device | str | None = None) -> Tensor:
        """Training times t ~ U(eps, 1), shape (batch,)."""
        gen_device = generator.device if generator is not None else device
        u = torch.rand(batch, generator=generator, device=gen_device).to(device)
        return self.eps + (1.0 - self.eps) * u

    def __repr__(self) -> str:
        return f"VESDE(sigma_min={self.sigma_min}, sigma_max={self.sigma_max}, n_scales={self.n_scales}, eps={self.eps})"


def max_pairwise_distance(images: Tensor, chunk_size: int = 1024) -> float:
    """Largest Euclidean distance between two of ``images`` (N, ...): Song & Ermon (2020, technique 1) choose
    σ_max this large so that the prior covers every pair of training images; 348 is this rule's value for the
    paper's 256×256 BraTS slices. Distances grow with the square root of the pixel count, so smaller images
    (CPU configurations) need a proportionally smaller σ_max. Exact, in ``chunk_size`` blocks of rows.
    """
    flat = images.reshape(images.shape[0], -1).double()
    if flat.shape[0] < 2:
        raise ValueError(f"need at least 2 images, got {flat.shape[0]}")
    largest = 0.0
    for start in range(0, flat.shape[0], chunk_size):
        largest = max(largest, torch.cdist(flat[start : start + chunk_size], flat).max().item())
    return largest
