"""The shared machinery of the two guided-diffusion peers (DPM_classifier, DPM_classifier_free): DDIM encoding and
decoding as the probability-flow ODE of the project's VE score models, and DDPM noise levels mapped to VE σ.

DDIM in VE coordinates. A DDPM state x_t = √ᾱ_t·x_0 + √(1 − ᾱ_t)·ε, divided by √ᾱ_t, is x_0 + σ_t·ε with
σ_t² = (1 − ᾱ_t)/ᾱ_t: a VE state of the same signal-to-noise ratio ᾱ_t/(1 − ᾱ_t) = 1/σ_t². Deterministic DDIM
(η = 0) is the Euler discretisation of the probability-flow ODE dx/dσ = −σ·∇log p_σ(x) in these coordinates (Song
et al. 2021, DDIM §4.3; Karras et al. 2022, EDM §3), so "DDIM-encode to step L, decode back" is: integrate the ODE
from the image up to σ_L, then back down to 0. Here both directions take Heun steps over one Karras grid.

Guidance in score form. The reference samplers guide ε; with ε = −√(1 − ᾱ)·∇log p they are, on the score,
s̃ = s + scale·∇log p(healthy | x) (Wolleb's ``condition_score2``) and s̃ = (1 + w)·s(x | healthy) − w·s(x | ∅)
(classifier-free), and both forms are unchanged by the VP → VE change of coordinates and by a linear rescaling of
the intensities (score and class gradient scale alike), so the references' guidance scales carry over.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Callable

import torch
from torch import Tensor

from tsgm_components.diffusion.sampling import SampleOutput, ScoreFn, karras_sigmas, sample_heun

#: denoise(x (B,1,H,W), sigma (B,)) -> D (B,1,H,W) ≈ E[x_0 | x]; e.g. a bound ``ScoreUNet.denoise``
DenoiseFn = Callable[[Tensor, Tensor], Tensor]


def ddpm_sigma(timestep: int, n_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02, data_range: float = 2.0) -> float:
    """The VE noise level on the [0, 1] intensity scale with the signal-to-noise ratio of DDPM step ``timestep``.

    ᾱ_L = Π_{i=1..L} (1 − β_i) over the linear schedule β_i = ``linspace(beta_start, beta_end, n_timesteps)``
    (Ho et al. 2020; the guided-diffusion code of both references); σ_L = √((1 − ᾱ_L)/ᾱ_L) on the DDPM's [-1, 1]
    data, divided by ``data_range`` (2) for [0, 1] intensities. Wolleb et al.'s L = 500 gives 1.71, Sanchez et al.'s
    L = 750 (0.75 of 1000) 8.62, L = 200 0.360.
    """
    if not 1 <= timestep <= n_timesteps:
        raise ValueError(f"timestep must be in 1..{n_timesteps}, got {timestep}")
    betas = torch.linspace(beta_start, beta_end, n_timesteps, dtype=torch.float64)
    alpha_bar = float(torch.prod(1.0 - betas[:timestep]))
    return math.sqrt((1.0 - alpha_bar) / alpha_bar) / data_range


def denoiser_score(denoise: DenoiseFn, clip_denoised: bool = False) -> ScoreFn:
    """The score (D(x, σ) − x)/σ² of a denoiser; ``clip_denoised`` clamps D to [0, 1] first, as the references'
    ``clip_denoised=True`` clamps the predicted x_0 to the data range at every DDIM step."""

    def score(x: Tensor, sigma: Tensor) -> Tensor:
        denoised = denoise(x, sigma)
        if clip_denoised:
            denoised = denoised.clamp(0.0, 1.0)
        return (denoised - x) / sigma.to(x.dtype)[:, None, None, None] ** 2

    return score


def ode_encode(score_fn: ScoreFn, x: Tensor, sigmas_ascending: Tensor) -> SampleOutput:
    """DDIM inversion: Heun steps of dx/dσ = −σ·s(x, σ) *up* an increasing grid, from x at sigmas_ascending[0] to
    the last level; the mirror of :func:`~tsgm_components.diffusion.sampling.sample_heun`. 2 score evaluations per
    step: NFE = 2(n − 1) for n levels.

    Args:
        x: (B, 1, H, W) state at the first level (a clean image, taken as the state at the lowest level σ_min).
        sigmas_ascending: (n,) strictly increasing positive levels.
    """
    levels = [float(s) for s in sigmas_ascending]
    if levels[0] <= 0 or any(b <= a for a, b in zip(levels, levels[1:])):
        raise ValueError("sigmas_ascending must be strictly increasing and positive")
    for sigma, sigma_next in zip(levels, levels[1:]):
        d = -sigma * score_fn(x, torch.full((x.shape[0],), sigma, device=x.device))
        x_euler = x + (sigma_next - sigma) * d
        d_next = -sigma_next * score_fn(x_euler, torch.full((x.shape[0],), sigma_next, device=x.device))
        x = x + (sigma_next - sigma) * 0.5 * (d + d_next)
    return SampleOutput(x, 2 * (len(levels) - 1))


def encode_decode(encode_score: ScoreFn, decode_score: ScoreFn, x: Tensor, sigmas: Tensor) -> SampleOutput:
    """The counterfactual of the two references: ``x`` (B, 1, H, W), taken as the state at the lowest positive level
    of ``sigmas``, ODE-encoded with ``encode_score`` up to sigmas[0] = σ_L, then decoded back to σ = 0 with
    ``decode_score`` (:func:`sample_heun`, churn 0: deterministic). sigmas: (n + 1,) decreasing, ending at 0
    (``karras_sigmas``). NFE (of the score functions) = 2(n − 1) + 2n − 1."""
    latent = ode_encode(encode_score, x, sigmas[:-1].flip(0))
    decoded = sample_heun(decode_score, latent.sample, sigmas)
    return SampleOutput(decoded.sample, latent.nfe + decoded.nfe)


class GuidedODEReconstructor(ABC):
    """Reconstructor (``slices (N, 1, s, s) in [0, 1] -> healthy (N, 1, s, s) in [0, 1]``) of the encode/decode
    peers: each chunk of ``batch_size`` slices goes through :func:`encode_decode` with the subclass's
    ``encode_score`` and ``decode_score`` over ``karras_sigmas(n_steps, sigma_min, sigma_start)``; the output is
    clamped to [0, 1]. Deterministic: no noise is drawn.

    Args:
        sigma_start: σ_L, the level the slices are encoded to (:func:`ddpm_sigma` of the reference's L).
        n_steps: positive levels of the Karras grid (Heun steps per direction).
        sigma_min: the lowest level (the score model's σ_min); the input is taken as the state there.
        batch_size: slices per pass.
        device: where the networks run (the output is on the CPU).
    """

    def __init__(self, sigma_start: float, n_steps: int, sigma_min: float, batch_size: int = 32, device: torch.device | str = "cpu"):
        if not 0 < sigma_min < sigma_start:
            raise ValueError(f"need 0 < sigma_min < sigma_start, got {sigma_min}, {sigma_start}")
        if n_steps < 2:
            raise ValueError(f"n_steps must be >= 2, got {n_steps}")
        self.sigmas = karras_sigmas(int(n_steps), float(sigma_min), float(sigma_start))
        self.batch_size = int(batch_size)
        self.device = torch.device(device)

    @abstractmethod
    def encode_score(self, x: Tensor, sigma: Tensor) -> Tensor:
        """The score the slices are encoded with: (B, 1, H, W) from x (B, 1, H, W) and sigma (B,)."""

    @abstractmethod
    def decode_score(self, x: Tensor, sigma: Tensor) -> Tensor:
        """The guided score the latents are decoded with: (B, 1, H, W) from x (B, 1, H, W) and sigma (B,)."""

    def __call__(self, slices: Tensor) -> Tensor:
        if slices.ndim != 4 or slices.shape[1] != 1:
            raise ValueError(f"slices must be (N, 1, s, s), got {tuple(slices.shape)}")
        healthy = []
        for chunk in slices.split(self.batch_size):
            with torch.no_grad():
                out = encode_decode(self.encode_score, self.decode_score, chunk.to(self.device, torch.float32), self.sigmas)
            healthy.append(out.sample.clamp(0.0, 1.0).cpu())
        return torch.cat(healthy) if healthy else slices.float().clone()
