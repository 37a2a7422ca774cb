"""AnoDDPM (Wyatt et al., CVPR-W 2022): a diffusion model trained on healthy slices with multi-octave simplex noise
instead of white Gaussian noise, so that it learns to remove low-frequency structure such as a lesion; detection
noises the input with simplex noise to a partial level λ and reconstructs it.

Expressed on the project's VE machinery: the unconditional ``ScoreUNet`` (EDM preconditioning) trained by ``dsm_loss``
with ``noise=SimplexNoise(...)``, the DDPM level λ mapped to the VE σ of the same signal-to-noise ratio
(:func:`ddpm_sigma`), and the reverse-diffusion predictor of ``diffusion/sampling.py`` drawing simplex noise, as the
reference's ``sample_p`` does. The DDPM↔VE mapping and the checkpoint spec are shared with pDDPM (``peers.pddpm``).
"""

from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from tsgm_components.checkpoints import SPEC_KEY, CheckpointSpec, ModelSpec, read_checkpoint
from tsgm_components.data.preprocessing import PreprocessConfig
from tsgm_components.diffusion.inferers import slice_generator
from tsgm_components.diffusion.noise import GeneratorLike, NoiseFn, randn
from tsgm_components.diffusion.sampling import ReverseDiffusionPredictor, ScoreFn, geometric_sigmas, sample_sdedit
from tsgm_components.errors import TsgmInputError

# ---------------------------------------------------------------- DDPM noise levels as VE σ

#: DDPM β schedules of the references (T steps): ``"linear"``: β from 1e-4·1000/T to 0.02·1000/T (Ho et al. 2020;
#: AnoDDPM ``GaussianDiffusion.get_beta_schedule``, its args ``beta_schedule: linear``); ``"cosine"``: ᾱ(t) ∝
#: cos²((t/T + 0.008)/1.008 · π/2), β ≤ 0.999 (Nichol & Dhariwal 2021; pDDPM's ``GaussianDiffusion`` default).
DDPM_SCHEDULES = ("linear", "cosine")
#: DDPM steps of both references
DDPM_TIMESTEPS = 1000


def ddpm_alphas_cumprod(schedule: str = "linear", n_timesteps: int = DDPM_TIMESTEPS) -> Tensor:
    """ᾱ_t = Π_{s ≤ t} (1 − β_s) for t = 1..T, float64 (T,) (index t − 1, the references' ``alphas_cumprod``)."""
    if schedule == "linear":
        scale = 1000.0 / n_timesteps
        betas = torch.linspace(scale * 1e-4, scale * 0.02, n_timesteps, dtype=torch.float64)
    elif schedule == "cosine":
        steps = torch.arange(n_timesteps + 1, dtype=torch.float64)
        f = torch.cos((steps / n_timesteps + 0.008) / 1.008 * math.pi / 2) ** 2
        betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
    else:
        raise ValueError(f"schedule must be one of {DDPM_SCHEDULES}, got {schedule!r}")
    return torch.cumprod(1 - betas, dim=0)


def ddpm_sigma(t: int, schedule: str = "linear", n_timesteps: int = DDPM_TIMESTEPS) -> float:
    """The VE noise level σ (on the [0, 1] image scale) with the signal-to-noise ratio of DDPM step ``t``.

    DDPM noises y0 = 2·x0 − 1 ∈ [−1, 1] as y_t = √ᾱ_t·y0 + √(1 − ᾱ_t)·ε; rescaled, (y_t/√ᾱ_t + 1)/2 = x0 + σ·ε with
    σ = ½·√((1 − ᾱ_t)/ᾱ_t). The halving is the [−1, 1] → [0, 1] rescale of ``ScoreUNet``'s data scale.

    Args:
        t: 1-based step, 1 ≤ t ≤ T: AnoDDPM's ``t_distance`` λ and pDDPM's ``test_timesteps`` (both references
            noise with ``alphas_cumprod[t − 1]``).
    """
    if not 1 <= int(t) <= n_timesteps:
        raise ValueError(f"DDPM step t must be in [1, {n_timesteps}], got {t}")
    alpha_bar = float(ddpm_alphas_cumprod(schedule, n_timesteps)[int(t) - 1])
    return 0.5 * math.sqrt((1.0 - alpha_bar) / alpha_bar)


def ddpm_sigmas(t: int, schedule: str = "linear", n_timesteps: int = DDPM_TIMESTEPS) -> Tensor:
    """The reference's reverse steps as VE levels, descending: σ(t), σ(t − 1), ..., σ(1), float32 (t,)."""
    return torch.tensor([ddpm_sigma(s, schedule, n_timesteps) for s in range(int(t), 0, -1)], dtype=torch.float32)


def partial_sigmas(t: int, schedule: str = "linear", n_steps: int | None = None, sigma_min: float | None = None) -> Tensor:
    """Descending levels of the partial reverse process from DDPM step ``t``: the reference's t steps
    (:func:`ddpm_sigmas`, ``n_steps`` None) or ``n_steps`` geometric levels from σ(t) down to ``sigma_min``."""
    if n_steps is None:
        return ddpm_sigmas(t, schedule)
    if sigma_min is None:
        raise ValueError("n_steps geometric levels need sigma_min")
    return geometric_sigmas(int(n_steps), float(sigma_min), ddpm_sigma(t, schedule))


# ---------------------------------------------------------------- simplex noise

_F2 = (math.sqrt(3.0) - 1.0) / 2.0  # skews the plane so that the simplex (triangle) lattice becomes Z²
_G2 = (3.0 - math.sqrt(3.0)) / 6.0  # unskews
#: squared radius of a corner's kernel (0.5 − r²)⁴: it vanishes at the triangles' height √0.5, so only the three
#: corners of the triangle holding a point contribute (OpenSimplex/Gustavson 2D simplex noise)
_KERNEL_R2 = 0.5


def _corners(fx: Tensor, fy: Tensor) -> list[tuple[Tensor | int, Tensor | int, Tensor, Tensor]]:
    """The three corners of the triangle that holds points at fractional skewed coordinates (fx, fy) ∈ [0, 1)²: per
    corner its lattice offset (di, dj) from the cell origin and the point's unskewed displacement (dx, dy) from it."""
    lower = (fx > fy).long()  # triangle (0,0)-(1,0)-(1,1), else (0,0)-(0,1)-(1,1)
    unskew = (fx + fy) * _G2
    dx0, dy0 = fx - unskew, fy - unskew
    return [
        (0, 0, dx0, dy0),
        (lower, 1 - lower, dx0 - lower + _G2, dy0 - (1 - lower) + _G2),
        (1, 1, dx0 - 1 + 2 * _G2, dy0 - 1 + 2 * _G2),
    ]


@lru_cache(maxsize=1)
def simplex_octave_variance(resolution: int = 512) -> float:
    """Variance of one octave of :class:`SimplexNoise` (before normalisation), exactly from the kernel.

    With independent uniformly random unit gradients g at the corners, E[(g·d)²] = |d|²/2 and the corners are
    uncorrelated, so the variance at a point is Σ_corners (0.5 − r²)₊⁸·r²/2. A random offset per draw makes every
    position within a cell equally likely (uniform in the skewed cell is uniform in the plane: the skew is linear),
    so the per-pixel variance over draws is that sum's mean over the cell (midpoint rule, ``resolution``²).
    """
    u = (torch.arange(resolution, dtype=torch.float64) + 0.5) / resolution
    fy, fx = torch.meshgrid(u, u, indexing="ij")
    total = torch.zeros_like(fx)
    for _, _, dx, dy in _corners(fx, fy):
        r2 = dx**2 + dy**2
        total += (_KERNEL_R2 - r2).clamp_min(0) ** 8 * r2 / 2
    return float(total.mean())


class SimplexNoise:
    """Multi-octave 2D simplex noise with zero mean and unit variance per pixel: a :data:`NoiseFn` like ``noise.randn``.

    The sum over octaves k = 0..octaves−1 of persistence^k · simplex(pixel / (frequency / 2^k)), as the reference's
    ``Simplex_CLASS.rand_2d_octaves`` (AnoDDPM ``simplex.py``; ``frequency`` is the first octave's period in pixels,
    halved per octave), divided by its standard deviation (:func:`simplex_octave_variance` · Σ persistence^2k, exact),
    so that σ keeps its meaning as the noise's standard deviation. Each octave of each map draws its own random unit
    gradient per lattice corner and a random offset of the lattice, so octaves are independent and the noise is
    stationary: the reference instead shares one permutation table between octaves anchored at the image corner
    (its "directional artifacts in the top left"), and its noise is not normalised (std ≈ 0.5-0.6).

    Vectorised in torch, drawn from a ``torch.Generator`` (or one generator per sample, like ``noise.randn``).

    Args:
        octaves: number of octaves (reference: 6).
        persistence: amplitude ratio of consecutive octaves, in (0, 1] (reference: 0.8).
        frequency: period of the first octave in pixels (reference: 64 at 256²; scale it with the image side).
    """

    def __init__(self, octaves: int = 6, persistence: float = 0.8, frequency: float = 64.0):
        if octaves < 1 or not 0 < persistence <= 1 or frequency <= 0:
            raise ValueError(f"need octaves >= 1, 0 < persistence <= 1, frequency > 0; got {octaves}, {persistence}, {frequency}")
        self.octaves = int(octaves)
        self.persistence = float(persistence)
        self.frequency = float(frequency)
        self.std = math.sqrt(simplex_octave_variance() * sum(self.persistence ** (2 * k) for k in range(self.octaves)))

    def __repr__(self) -> str:
        return f"SimplexNoise(octaves={self.octaves}, persistence={self.persistence}, frequency={self.frequency})"

    def __call__(self, shape: Sequence[int], generator: GeneratorLike = None, device: torch.device | str | None = None) -> Tensor:
        """float32 noise of ``shape`` (..., H, W) on ``device``; with a sequence of generators row i comes from
        generator[i] alone."""
        shape = tuple(int(s) for s in shape)
        if len(shape) < 2:
            raise ValueError(f"simplex noise needs a (..., H, W) shape, got {shape}")
        if generator is None or isinstance(generator, torch.Generator):
            return self._draw(shape, generator, device).to(device)
        if len(generator) != shape[0]:
            raise ValueError(f"got {len(generator)} per-sample generators for a batch of {shape[0]}")
        return torch.stack([self._draw(shape[1:], g, g.device) for g in generator]).to(device)

    def _draw(self, shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device | str | None) -> Tensor:
        gen_device = generator.device if generator is not None else device
        n_maps, (height, width) = math.prod(shape[:-2]), shape[-2:]
        total = torch.zeros(n_maps, height, width, device=gen_device)
        for k in range(self.octaves):
            total += self.persistence**k * self._octave(n_maps, height, width, self.frequency / 2**k, generator, gen_device)
        return (total / self.std).reshape(shape)

    @staticmethod
    def _octave(n_maps: int, height: int, width: int, period: float, generator: torch.Generator | None, device: Any) -> Tensor:
        """(n_maps, height, width) float32 simplex noise of one period (pixels per lattice unit), not normalised."""
        y = torch.arange(height, dtype=torch.float32, device=device)[:, None] / period
        x = torch.arange(width, dtype=torch.float32, device=device)[None, :] / period
        skew = (x + y) * _F2
        # lattice corners used: 0 .. floor(max skewed coordinate + offset) + 1 (offset < 1)
        size = int(max((width - 1) / period, (height - 1) / period) + ((width - 1) + (height - 1)) / period * _F2) + 3
        offset = torch.rand(n_maps, 2, 1, 1, generator=generator, device=device)
        angles = 2 * math.pi * torch.rand(n_maps, size * size, generator=generator, device=device)
        grad_x, grad_y = torch.cos(angles), torch.sin(angles)
        sx, sy = x + skew + offset[:, 0], y + skew + offset[:, 1]
        i, j = sx.floor(), sy.floor()
        cell = i.long() * size + j.long()
        total = torch.zeros_like(sx)
        for di, dj, dx, dy in _corners(sx - i, sy - j):
            index = (cell + (di * size + dj)).flatten(1)
            gx, gy = grad_x.gather(1, index).view_as(dx), grad_y.gather(1, index).view_as(dx)
            total += (_KERNEL_R2 - dx * dx - dy * dy).clamp_min(0) ** 4 * (gx * dx + gy * dy)
        return total


#: noise kinds a peer checkpoint can record (``DiffusionPeerSpec.noise``)
NOISE_KINDS = ("simplex", "gaussian")


def make_noise(kind: str = "simplex", octaves: int = 6, persistence: float = 0.8, frequency: float = 64.0) -> NoiseFn:
    """The noise a checkpoint's ``noise`` section describes: :class:`SimplexNoise` or white Gaussian (``noise.randn``,
    which has no octave settings)."""
    if kind == "simplex":
        return SimplexNoise(octaves, persistence, frequency)
    if kind == "gaussian":
        return randn
    raise ValueError(f"noise kind must be one of {NOISE_KINDS}, got {kind!r}")


# ---------------------------------------------------------------- checkpoint spec


class DiffusionPeerSpec(ModelSpec):
    """Spec of a diffusion peer's checkpoint (AnoDDPM, pDDPM): ``peer`` (the method name), ``preprocess``
    (PreprocessConfig dict), ``network`` (``ScoreUNet`` kwargs), ``sde`` (``sigma_min``, ``sigma_max``), ``noise``
    (:func:`make_noise` kwargs) and, for pDDPM, ``patch`` (``patch_size``, ``patch_stride``). Detection rebuilds the
    network, noise and patches from it, so one detection config serves checkpoints of every scale. A score model's
    spec (``ModelSpec``'s ``preprocess``, ``network``, ``sde``) with the peer's sections added."""

    bundle = "peer_methods"

    def __init__(
        self,
        peer: str,
        preprocess: PreprocessConfig | Mapping[str, Any],
        network: Mapping[str, Any],
        sde: Mapping[str, Any],
        noise: Mapping[str, Any],
        patch: Mapping[str, Any] | None = None,
    ):
        make_noise(**noise)  # refuse a spec whose noise cannot be built
        CheckpointSpec.__init__(
            self,
            {
                "peer": peer,
                "preprocess": preprocess,
                "network": dict(network),
                "sde": dict(sde),
                "noise": dict(noise),
                "patch": None if patch is None else dict(patch),
            },
        )

    def matches(self, saved: Any) -> bool:
        return isinstance(saved, Mapping) and saved.get("peer") == self.spec["peer"]

    @classmethod
    def read(cls, checkpoint: str | Path, peer: str) -> DiffusionPeerSpec:
        """The spec stored in ``checkpoint``; TsgmInputError naming it if it is not a ``peer`` checkpoint."""
        saved = read_checkpoint(checkpoint).get(SPEC_KEY)
        if not isinstance(saved, Mapping) or saved.get("peer") != peer:
            found = saved.get("peer") if isinstance(saved, Mapping) else None
            raise TsgmInputError(checkpoint, f"not a {peer} checkpoint of the {cls.bundle} bundle ('{SPEC_KEY}' peer: {found!r})")
        return cls(saved["peer"], saved["preprocess"], saved["network"], saved["sde"], saved["noise"], saved.get("patch"))

    @property
    def noise(self) -> NoiseFn:
        """The training noise, rebuilt (:func:`make_noise`)."""
        return make_noise(**self.spec["noise"])

    @property
    def patch(self) -> dict[str, int]:
        if "patch" not in self.spec:
            raise ValueError(f"the {self.spec['peer']} spec records no patch settings")
        return dict(self.spec["patch"])


# ---------------------------------------------------------------- reconstruction


class AnoDDPMReconstructor:
    """AnoDDPM's healthy reconstruction (a ``Reconstructor``): noise each slice with simplex noise to σ_L = sigmas[0],
    x = slice + σ_L·n, then run the reverse-diffusion predictor down ``sigmas`` to σ = 0, each step adding fresh
    simplex noise (``sample_sdedit`` with ``ReverseDiffusionPredictor(noise)``, no corrector: the reference's
    ``forward_backward``/``sample_p`` with its simplex ``denoise_fn``). Output clipped to [0, 1].

    Each slice draws from its own generator (``slice_generator(seed, index)``), so results do not depend on batching.

    Args:
        score_fn: the unconditional score model, ``score_fn(x (B,1,H,W), sigma (B,)) -> score``; a ``ScoreUNet``.
        noise: the training noise (``SimplexNoise``).
        sigmas: (n,) strictly decreasing levels from σ_L (:func:`partial_sigmas`); n score evaluations per slice.
        seed: noise seed.
        batch_size: slices per network call.
        device: where the network runs.
    """

    def __init__(self, score_fn: ScoreFn, noise: NoiseFn, sigmas: Tensor, seed: int = 0, batch_size: int = 32, device: torch.device | str = "cpu"):
        self.score_fn = score_fn
        self.noise = noise
        self.sigmas = torch.as_tensor(sigmas, dtype=torch.float32)
        self.predictor = ReverseDiffusionPredictor(noise)
        self.seed = int(seed)
        self.batch_size = int(batch_size)
        self.device = torch.device(device)

    @property
    def nfe_per_slice(self) -> int:
        return len(self.sigmas)

    @torch.no_grad()
    def __call__(self, slices: Tensor) -> Tensor:
        """slices (N, 1, H, W) in [0, 1] -> reconstructions (N, 1, H, W) in [0, 1], float32 on the CPU."""
        slices = slices.to(self.device, torch.float32)
        outputs = []
        for first in range(0, slices.shape[0], self.batch_size):
            chunk = slices[first : first + self.batch_size]
            generators = [slice_generator(self.seed, first + i, self.device) for i in range(chunk.shape[0])]
            out = sample_sdedit(self.score_fn, chunk, self.sigmas, generators, noise=self.noise, predictor=self.predictor, corrector=None)
            outputs.append(out.sample.clamp(0.0, 1.0))
        return torch.cat(outputs).cpu()
