"""Samplers for VE score models, written as short functions over ``score_fn(x, sigma)``.

``score_fn`` maps a state x (B, 1, H, W) and noise levels sigma (B,) to the score ∇_x log p_σ(x) (B, 1, H, W);
a conditional model is wrapped so that the fixed condition is re-attached on every call (see ``inferers.py``).
Noise levels are explicit descending grids, so the same functions run the paper's 1000-scale PC sampler, shorter
PC grids, SDEdit-style partial noising, and the probability-flow ODE on an EDM grid. Every sampler returns the
sample together with its number of function (score) evaluations per sample, NFE.

Randomness comes from a ``torch.Generator`` or from one generator per sample (``noise.randn``).
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Optional

import torch
from torch import Tensor

from tsgm_components.diffusion.noise import GeneratorLike, NoiseFn, randn

#: score_fn(x (B,1,H,W), sigma (B,)) -> score (B,1,H,W)
ScoreFn = Callable[[Tensor, Tensor], Tensor]
#: progress(step, total), called after each step (1-based)
ProgressFn = Callable[[int, int], None]


class SampleOutput(NamedTuple):
    """A sampler's result: the sample (B, 1, H, W) and the score evaluations it used per sample."""

    sample: Tensor
    nfe: int


def geometric_sigmas(n: int, sigma_min: float, sigma_max: float) -> Tensor:
    """n noise levels spaced geometrically, *descending* from sigma_max to sigma_min, shape (n,)."""
    if n < 1:
        raise ValueError(f"need n >= 1 noise levels, got {n}")
    if n == 1:
        return torch.tensor([float(sigma_max)])
    return torch.exp(torch.linspace(math.log(sigma_max), math.log(sigma_min), n))


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """EDM noise levels (Karras et al. 2022, eq. 5): n levels descending from sigma_max to sigma_min, then 0.

    Shape (n + 1,). ``rho = 7`` concentrates steps at small σ.
    """
    if n < 1:
        raise ValueError(f"need n >= 1 noise levels, got {n}")
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (hi + ramp * (lo - hi)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)]).float()


def _batch(sigma: Tensor | float, x: Tensor) -> Tensor:
    return torch.full((x.shape[0],), float(sigma), dtype=torch.float32, device=x.device)


def _per_sample(v: Tensor) -> Tensor:
    return v[:, None, None, None]


class ReverseDiffusionPredictor:
    """Reverse-diffusion predictor (score-SDE) for VE, from σ to σ_next < σ:

    x_mean = x + (σ² − σ_next²) s(x, σ);  x = x_mean + sqrt(σ² − σ_next²) z.  One score evaluation.

    z is ``noise(shape, generator, device)``: white Gaussian (``noise.randn``) by default; a model trained on
    another zero-mean, unit-variance noise (AnoDDPM's simplex noise) is sampled with that noise, as its reference does.
    """

    nfe = 1

    def __init__(self, noise: NoiseFn = randn):
        self.noise = noise

    def __call__(self, score_fn: ScoreFn, x: Tensor, sigma: float, sigma_next: float, generator: GeneratorLike = None) -> tuple[Tensor, Tensor]:
        """Returns (x, x_mean), both (B, 1, H, W)."""
        variance = sigma**2 - sigma_next**2
        x_mean = x + variance * score_fn(x, _batch(sigma, x))
        return x_mean + math.sqrt(variance) * self.noise(x.shape, generator, x.device), x_mean


class LangevinCorrector:
    """Langevin corrector (score-SDE) at fixed σ, ``n_steps`` times:

    g = s(x, σ); ε = 2 (snr ‖z‖ / ‖g‖)²; x_mean = x + ε g; x = x_mean + sqrt(2ε) z.

    Norms are taken per sample (score-SDE averages them over the batch), so a slice's trajectory does not depend on
    the other slices of its batch. ``n_steps`` score evaluations.
    """

    def __init__(self, snr: float = 0.075, n_steps: int = 1):
        if snr <= 0 or n_steps < 1:
            raise ValueError(f"need snr > 0 and n_steps >= 1, got snr={snr}, n_steps={n_steps}")
        self.snr = float(snr)
        self.n_steps = int(n_steps)

    @property
    def nfe(self) -> int:
        return self.n_steps

    def __call__(self, score_fn: ScoreFn, x: Tensor, sigma: float, generator: GeneratorLike = None) -> tuple[Tensor, Tensor]:
        """Returns (x, x_mean), both (B, 1, H, W)."""
        x_mean = x
        for _ in range(self.n_steps):
            grad = score_fn(x, _batch(sigma, x))
            z = randn(x.shape, generator, x.device)
            grad_norm = grad.flatten(1).norm(dim=1).clamp_min(torch.finfo(grad.dtype).tiny)
            step = 2 * (self.snr * z.flatten(1).norm(dim=1) / grad_norm) ** 2
            x_mean = x + _per_sample(step) * grad
            x = x_mean + _per_sample(torch.sqrt(2 * step)) * z
        return x, x_mean


def sample_pc(
    score_fn: ScoreFn,
    x_init: Tensor,
    sigmas_desc: Tensor,
    predictor: ReverseDiffusionPredictor = ReverseDiffusionPredictor(),
    corrector: Optional[LangevinCorrector] = LangevinCorrector(),
    generator: GeneratorLike = None,
    progress: Optional[ProgressFn] = None,
) -> SampleOutput:
    """Predictor-corrector sampling down ``sigmas_desc`` (score-SDE ``pc_sampler``).

    For each σ_i of the descending grid: corrector at σ_i, then predictor from σ_i to the next level (0 after the
    last), returning the final predictor mean (no noise added at the end). With the VE SDE's 1000 discrete scales
    (``sde.discrete_sigmas().flip(0)``) and one corrector step this is the paper's sampler, NFE = 2000; a shorter
    geometric grid gives a cheaper PC sampler.

    Args:
        x_init: (B, 1, H, W) state at σ = sigmas_desc[0], e.g. ``sde.prior_sample``.
        sigmas_desc: (n,) strictly decreasing positive noise levels.
        corrector: None for predictor-only sampling.
    """
    sigmas = [float(s) for s in sigmas_desc]
    if any(s <= 0 for s in sigmas) or any(b >= a for a, b in zip(sigmas, sigmas[1:])):
        raise ValueError("sigmas_desc must be strictly decreasing and positive")
    x, x_mean = x_init, x_init
    for i, sigma in enumerate(sigmas):
        if corrector is not None:
            x, x_mean = corrector(score_fn, x, sigma, generator)
        sigma_next = sigmas[i + 1] if i + 1 < len(sigmas) else 0.0
        x, x_mean = predictor(score_fn, x, sigma, sigma_next, generator)
        if progress is not None:
            progress(i + 1, len(sigmas))
    nfe = len(sigmas) * (predictor.nfe + (corrector.nfe if corrector is not None else 0))
    return SampleOutput(x_mean, nfe)


def sample_sdedit(
    score_fn: ScoreFn,
    x_input: Tensor,
    sigmas_desc: Tensor,
    generator: GeneratorLike = None,
    noise: NoiseFn = randn,
    **pc_options: Any,
) -> SampleOutput:
    """SDEdit (Meng et al. 2022; AnoDDPM-style partial noising): noise the real input to σ_start = sigmas_desc[0],
    x = x_input + σ_start z, then run :func:`sample_pc` down ``sigmas_desc``.

    Args:
        x_input: (B, 1, H, W) real images in [0, 1].
        sigmas_desc: (n,) strictly decreasing positive noise levels starting at σ_start.
        noise: draws z, ``noise(shape, generator, device)`` (white Gaussian by default; AnoDDPM: simplex noise, with
            ``predictor=ReverseDiffusionPredictor(noise)``).
        pc_options: :func:`sample_pc`'s ``predictor``, ``corrector`` (None: predictor only) and ``progress``.
    """
    x_init = x_input + float(sigmas_desc[0]) * noise(x_input.shape, generator, x_input.device)
    return sample_pc(score_fn, x_init, sigmas_desc, generator=generator, **pc_options)


def sample_posterior_mean(score_fn: ScoreFn, x_init: Tensor, sigma: float) -> SampleOutput:
    """Tweedie's denoiser at one level: D(x, σ) = x + σ²·s(x, σ) = E[x_0 | x_σ = x] under the model. One score
    evaluation.

    From the prior at σ = σ_max, x_σ carries almost no information about x_0, so for a conditional model D is its
    estimate of E[healthy | condition]: the MMSE reconstruction that averaging infinitely many exact draws would
    approach (sampling noise none; sharp where the condition determines the tissue, smooth where it does not, as in
    a lesion). The paper draws one sample instead; which detects better is a measured choice
    (``benchmarks/sampler_validation.py``).

    Args:
        x_init: (B, 1, H, W) state at σ, e.g. ``sde.prior_sample`` for σ = σ_max.
        sigma: the level of ``x_init`` (> 0).
    """
    if sigma <= 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    return SampleOutput(x_init + sigma**2 * score_fn(x_init, _batch(sigma, x_init)), 1)


def sample_regression(score_fn: ScoreFn, x_like: Tensor, sigma_max: float) -> SampleOutput:
    """The regression control's output: D(0, σ_max) (one score evaluation at a zero input), the fixed input its
    ``regression_loss`` trained. x_like: (B, 1, H, W), only its shape, dtype and device are used."""
    return sample_posterior_mean(score_fn, torch.zeros_like(x_like), sigma_max)


def sample_heun(
    score_fn: ScoreFn,
    x_init: Tensor,
    sigmas: Tensor,
    churn: float = 0.0,
    generator: GeneratorLike = None,
    progress: Optional[ProgressFn] = None,
) -> SampleOutput:
    """Heun's 2nd-order steps on the probability-flow ODE dx/dσ = −σ·s(x, σ) (EDM Algorithms 1 and 2).

    ``churn = 0``: the deterministic ODE solver (Algorithm 1), determined by ``x_init``. ``churn > 0``: EDM's
    stochastic sampler (Algorithm 2, S_tmin = 0, S_tmax = ∞, S_noise = 1; k-diffusion's ``sample_heun``): before
    each step, fresh noise raises the level from σ to σ̂ = min(σ(1 + γ), σ_0), γ = min(churn / n, √2 − 1) (never
    above the first level, where the model's training range ends), and the step runs from σ̂. The added noise lets
    the sampler correct the errors of an imperfect score model on the way, as the Langevin corrector of the PC
    sampler does, at no extra score evaluation.

    Each step to a σ_next > 0 takes 2 score evaluations, the final step to σ = 0 an Euler step with 1:
    NFE = 2n − 1 for n positive levels (35 for ``karras_sigmas(18, ...)``).

    Args:
        x_init: (B, 1, H, W) state at σ = sigmas[0], e.g. ``sde.prior_sample`` (σ_max·N(0, I)).
        sigmas: (n + 1,) decreasing levels ending at 0, e.g. ``karras_sigmas(n, σ_min, σ_max)``.
        churn: EDM's S_churn ≥ 0 (γ saturates at √2 − 1 from churn = 0.414·n on).
        generator: noise source for ``churn > 0`` (one generator, one per sample, or None).
    """
    levels = [float(s) for s in sigmas]
    if levels[-1] != 0.0 or any(b >= a for a, b in zip(levels, levels[1:])) or levels[0] <= 0:
        raise ValueError("sigmas must be strictly decreasing, positive, and end with 0")
    if churn < 0:
        raise ValueError(f"churn must be >= 0, got {churn}")
    x = x_init
    nfe = 0
    n_steps = len(levels) - 1
    gamma = min(churn / n_steps, math.sqrt(2) - 1)
    for i in range(n_steps):
        sigma, sigma_next = levels[i], levels[i + 1]
        sigma_hat = min(sigma * (1 + gamma), levels[0])
        if sigma_hat > sigma:
            x = x + math.sqrt(sigma_hat**2 - sigma**2) * randn(x.shape, generator, x.device)
            sigma = sigma_hat
        d = -sigma * score_fn(x, _batch(sigma, x))
        x_euler = x + (sigma_next - sigma) * d
        nfe += 1
        if sigma_next > 0:
            d_next = -sigma_next * score_fn(x_euler, _batch(sigma_next, x))
            nfe += 1
            x = x + (sigma_next - sigma) * 0.5 * (d + d_next)
        else:
            x = x_euler
        if progress is not None:
            progress(i + 1, n_steps)
    return SampleOutput(x, nfe)
