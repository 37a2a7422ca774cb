"""σ²-weighted denoising score matching (Song et al. 2021, continuous VE)."""

from __future__ import annotations

from typing import Callable

from torch import Tensor

from tsgm_components.noise import randn
from tsgm_components.sde import VESDE

#: network(x_t (B,1,H,W), sigma (B,), condition (B,C,H,W) | None) -> score (B,1,H,W); e.g. ``ScoreUNet``.
ScoreNetwork = Callable[[Tensor, Tensor, "Tensor | None"], Tensor]


def dsm_loss(
    network: ScoreNetwork,
    x0: Tensor,
    condition: Tensor | None,
    sde: VESDE,
    generator=None,
) -> Tensor:
    """Scalar loss mean over batch and pixels of (σ·s_θ(x0 + σz, σ, condition) + z)², t ~ U(eps, 1), σ = σ(t),
    z ~ N(0, I).

    Weighting each σ by σ² makes the loss O(1) at every noise level; its minimiser is the score of the noised
    marginal. The condition is passed unchanged (never noised).

    Args:
        network: the score model.
        x0: clean images (B, 1, H, W) in [0, 1] (x_A, healthy).
        condition: (B, C, H, W) in [0, 1] (x_B~), or None for an unconditional model.
        sde: supplies σ(t) and the t distribution.
        generator: a ``torch.Generator`` for t and z (on any device), or None for the global RNG.
    """
    t = sde.sample_t(x0.shape[0], generator, device=x0.device)
    sigma = sde.sigma(t)
    z = randn(x0.shape, generator, device=x0.device).to(x0.dtype)
    x_t = x0 + sigma[:, None, None, None] * z
    score = network(x_t, sigma, condition)
    return ((sigma[:, None, None, None] * score + z) ** 2).mean()
