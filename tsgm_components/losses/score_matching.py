"""Denoising score matching (Song et al. 2021, continuous VE), σ²-weighted, optionally reweighted per σ (EDM)."""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from tsgm_components.diffusion.noise import GeneratorLike, NoiseFn, randn
from tsgm_components.diffusion.sde import VESDE

#: network(x_t (B,1,H,W), sigma (B,), condition (B,C,H,W) | None) -> score (B,1,H,W); e.g. ``ScoreUNet``.
ScoreNetwork = Callable[[Tensor, Tensor, "Tensor | None"], Tensor]
#: region(x0 (B,1,H,W), generator) -> (B,1,H,W) mask in {0, 1}: the pixels to noise (e.g. one patch per image).
RegionFn = Callable[[Tensor, GeneratorLike], Tensor]


def dsm_loss(
    network: ScoreNetwork,
    x0: Tensor,
    condition: Tensor | None,
    sde: VESDE,
    generator=None,
    loss_weight: Optional[Callable[[Tensor], Tensor]] = None,
    noise: NoiseFn = randn,
    region: Optional[RegionFn] = None,
) -> Tensor:
    """Scalar loss, mean over batch and pixels of w(σ)·(σ·s_θ(x0 + σz, σ, condition) + z)², t ~ U(eps, 1),
    σ = σ(t) (log-uniform on [σ_min, σ_max]), z ~ N(0, I) (``noise``).

    For any zero-mean noise z the residual is σ·s + z = (D(x_t) − x0)/σ with D = x_t + σ²·s, so a structured
    ``noise`` (AnoDDPM's simplex noise) trains the denoiser to remove that noise instead. With ``region`` only the
    masked pixels are noised (z·m) and the mean runs over them alone (patched DDPM: the rest of the image is clean
    context, its reconstruction not trained).

    The σ² factor (inside the square) is score-SDE's weighting; any positive w(σ) keeps the minimiser, the score
    of the noised marginal, and only moves effort between noise levels (``ScoreUNet.loss_weight`` makes every σ
    count equally for the UNet's own output). The condition is passed unchanged (never noised).

    Args:
        network: the score model.
        x0: clean images (B, 1, H, W) in [0, 1] (x_A, healthy).
        condition: (B, C, H, W) in [0, 1] (x_B~), or None for an unconditional model.
        sde: supplies σ(t) and the t distribution.
        generator: a ``torch.Generator`` for t and z (on any device), or None for the global RNG.
        loss_weight: w(σ), (B,) → (B,); None for w = 1 (score-SDE's σ²-weighted loss).
        noise: draws z (after t, from the same generator).
        region: draws the noised pixels' mask (after z), or None for the whole image.
    """
    t = sde.sample_t(x0.shape[0], generator, device=x0.device)
    sigma = sde.sigma(t)
    z = noise(x0.shape, generator, x0.device).to(x0.dtype)
    mask = None if region is None else region(x0, generator).to(x0.dtype)
    if mask is not None:
        z = mask * z
    x_t = x0 + sigma[:, None, None, None] * z
    score = network(x_t, sigma, condition)
    squared = (sigma[:, None, None, None] * score + z) ** 2
    if loss_weight is not None:
        squared = loss_weight(sigma)[:, None, None, None] * squared
    if mask is None:
        return squared.mean()
    return (squared * mask).sum() / mask.sum().clamp_min(1.0)


def regression_loss(
    network: ScoreNetwork,
    x0: Tensor,
    condition: Tensor | None,
    sde: VESDE,
    generator=None,
    loss_weight: Optional[Callable[[Tensor], Tensor]] = None,
) -> Tensor:
    """The regression control's loss: mean of (D(0, σ_max | condition) − x0)², D(x, σ) = x + σ²·s_θ(x, σ, condition)
    (Tweedie's denoiser, the output :func:`~tsgm_components.diffusion.sampling.sample_regression` reads).

    The same network and trainer as :func:`dsm_loss` (same signature; ``generator`` and ``loss_weight`` unused), but
    no noise input: the network learns condition → healthy slice by plain L2, one fixed input. If TSGM's diffusion
    training detects no better than this, its gain comes from the pseudo-pairs, not from the score model.
    """
    del generator, loss_weight
    sigma = x0.new_full((x0.shape[0],), float(sde.sigma_max))
    denoised = sde.sigma_max**2 * network(torch.zeros_like(x0), sigma, condition)
    return ((denoised - x0) ** 2).mean()
