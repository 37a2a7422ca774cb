"""MONAI inferer that turns condition slices into healthy reconstructions with a VE score model."""

from __future__ import annotations

import inspect
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

import numpy as np
import torch
from monai.inferers import Inferer
from monai.utils import convert_to_tensor
from torch import Tensor, nn

from tsgm_components.diffusion.precision import autocast
from tsgm_components.diffusion.sampling import (
    LangevinCorrector,
    ProgressFn,
    ReverseDiffusionPredictor,
    SampleOutput,
    ScoreFn,
    karras_sigmas,
    geometric_sigmas,
    sample_heun,
    sample_pc,
    sample_posterior_mean,
    sample_regression,
    sample_sdedit,
)
from tsgm_components.diffusion.sde import VESDE

logger = logging.getLogger(__name__)

#: Heun steps when ``n_steps`` is None: 18 levels, 35 NFE (EDM's default budget).
DEFAULT_HEUN_STEPS = 18
#: inputs may exceed [0, 1] by this much (resampling overshoot); more means they were not normalised
INPUT_RANGE_TOLERANCE = 1e-3
#: At most one sampling progress line per this many seconds (plus the last step of a stack)
PROGRESS_SECONDS = 10.0


def slice_generator(seed: int, index: int, device: torch.device | str, draw: int = 0) -> torch.Generator:
    """The generator of draw ``draw`` of slice ``index`` for ``seed``: seeded from NumPy's SeedSequence([seed, index])
    (draw 0) or SeedSequence([seed, index, draw]), so streams of different (seed, index, draw) are independent and
    a slice's noise does not depend on batching."""
    entropy = [int(seed), int(index)] + ([int(draw)] if draw else [])
    state = int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0])
    return torch.Generator(device=device).manual_seed(state)


def _levels(sde: VESDE, top: float, n_steps: Optional[int]) -> Tensor:
    """σ levels from ``top`` down: ``n_steps`` geometric levels to σ_min, or the SDE's discrete scales below ``top``."""
    if n_steps is not None:
        return geometric_sigmas(n_steps, sde.sigma_min, top)
    discrete = sde.discrete_sigmas().flip(0)
    return torch.cat([torch.tensor([top]), discrete[discrete < top * (1 - 1e-6)]])


def _pc_nfe(inferer: "DiffusionSamplerInferer") -> int:
    corrector = inferer.corrector.nfe if inferer.corrector is not None else 0
    return len(inferer.sigmas) * (inferer.predictor.nfe + corrector)


@dataclass(frozen=True)
class Sampler:
    """One entry of :data:`SAMPLERS`: what the inferer needs to run a sampler of ``sampling.py``.

    sigmas(sde, n_steps, sigma_start): its descending σ levels; run(inferer, score_fn, chunk, generators, progress):
    one draw for a (B, 1, H, W) chunk of inputs; nfe(inferer): score evaluations per draw (checked against what the
    run reports); from_input: starts from the noised input (the only kind an unconditional model can use); churn:
    accepts EDM's ``churn > 0``; steps: takes ``n_steps``.
    """

    sigmas: Callable[[VESDE, Optional[int], Optional[float]], Tensor]
    run: Callable[..., SampleOutput]
    nfe: Callable[["DiffusionSamplerInferer"], int]
    from_input: bool = False
    churn: bool = False
    steps: bool = True


#: The samplers by name: add one here (and its config entry) to make it available everywhere.
SAMPLERS: dict[str, Sampler] = {
    "pc": Sampler(
        sigmas=lambda sde, n_steps, start: _levels(sde, sde.sigma_max, n_steps),
        run=lambda inf, score_fn, chunk, gens, progress: sample_pc(
            score_fn, inf.sde.prior_sample(chunk.shape, gens, chunk.device), inf.sigmas, inf.predictor, inf.corrector, gens, progress
        ),
        nfe=_pc_nfe,
    ),
    "sdedit": Sampler(
        sigmas=lambda sde, n_steps, start: _levels(sde, float(start), n_steps),
        run=lambda inf, score_fn, chunk, gens, progress: sample_sdedit(
            score_fn, chunk, inf.sigmas, gens, predictor=inf.predictor, corrector=inf.corrector, progress=progress
        ),
        nfe=_pc_nfe,
        from_input=True,
    ),
    "heun": Sampler(
        sigmas=lambda sde, n_steps, start: karras_sigmas(n_steps or DEFAULT_HEUN_STEPS, sde.sigma_min, sde.sigma_max),
        run=lambda inf, score_fn, chunk, gens, progress: sample_heun(
            score_fn, inf.sde.prior_sample(chunk.shape, gens, chunk.device), inf.sigmas, inf.churn, gens, progress
        ),
        nfe=lambda inf: 2 * (len(inf.sigmas) - 1) - 1,
        churn=True,
    ),
    "posterior_mean": Sampler(
        sigmas=lambda sde, n_steps, start: torch.tensor([float(sde.sigma_max)]),
        run=lambda inf, score_fn, chunk, gens, progress: sample_posterior_mean(
            score_fn, inf.sde.prior_sample(chunk.shape, gens, chunk.device), float(inf.sigmas[0])
        ),
        nfe=lambda inf: 1,
        steps=False,
    ),
    "regression": Sampler(
        sigmas=lambda sde, n_steps, start: torch.tensor([float(sde.sigma_max)]),
        run=lambda inf, score_fn, chunk, gens, progress: sample_regression(score_fn, chunk, float(inf.sigmas[0])),
        nfe=lambda inf: 1,
        steps=False,
    ),
}


class DiffusionSamplerInferer(Inferer):
    """Healthy reconstruction of input slices by reverse diffusion with a ``ScoreUNet``.

    Samplers:
        ``"pc"``: predictor-corrector (reverse diffusion + Langevin, snr ``snr``, ``n_corrector_steps``) from the
            prior σ_max·N(0, I) down the SDE's N discrete scales (the paper's sampler, NFE = N·(1 + corrector
            steps) = 2000), or down ``n_steps`` geometric levels when ``n_steps`` is given.
        ``"sdedit"``: the input noised to ``sdedit_sigma_start``, then PC (predictor-only if
            ``n_corrector_steps = 0``) from σ_start down the SDE's discrete scales below it (or down ``n_steps``
            geometric levels from σ_start to σ_min).
        ``"heun"``: probability-flow ODE, Heun steps on ``karras_sigmas(n_steps or 18, σ_min, σ_max)``;
            deterministic given the prior draw, or EDM's stochastic sampler with ``churn > 0`` (same NFE).
        ``"posterior_mean"``: Tweedie's denoiser D(x, σ_max) of a prior draw, 1 NFE: the model's estimate of
            E[healthy | condition] (``sampling.sample_posterior_mean``); no ``n_steps``.
        ``"regression"``: D(0, σ_max), 1 NFE, for the regression control trained with ``regression_loss``
            (``sampling.sample_regression``); no ``n_steps``.

    Averaging: with ``n_draws > 1`` the reconstruction is the mean of that many independent draws (each clamped to
    [0, 1]), NFE = n_draws × the sampler's NFE. One draw of a stochastic sampler carries sampling noise into the
    residual |input − healthy| in healthy tissue; the mean of a few cheap draws estimates the posterior mean
    instead (``benchmarks/sampler_validation.py`` compares settings through the whole detection pipeline).

    Conditional mode (VE-JP): the condition of every network call is the real input slice (never noised); the state
    starts from the prior (pc, heun) or from the noised input (sdedit). Unconditional mode (a network with
    ``condition_channels = 0``, trained on healthy slices only) supports sdedit only: a reconstruction must start
    from the input.

    Reproducibility: draw k of slice i of an input batch takes all its noise from ``slice_generator(seed, i, k)``,
    so its result depends on (seed, i, k) only, not on ``batch_size`` chunking (up to floating-point rounding of
    batched network calls). Output: the final denoised mean clamped to [0, 1] (the authors min-max rescale each
    reconstruction instead, which changes intensities slice by slice).

    Mixed precision: ``amp=True`` runs the network calls under autocast, float16 on CUDA and bfloat16 on the CPU
    (:mod:`tsgm_components.diffusion.precision`; the sampler's state and updates stay float32, scores are cast back to float32). bfloat16 pays off on CPUs with
    AVX512-BF16/AMX (1.9× for the demo's model of commit ce3ee16 on a 2-core AMD EPYC, reconstructions within 2e-4
    of float32 on average; ``benchmarks/cpu_bf16.py`` measures it) and is slower on CPUs without.

    Compilation: ``compile=True`` runs the network through ``torch.compile`` (compiled once per network and input
    shape; the last chunk of a stack is padded to the chunk size so that a stack needs one shape). On an H100 this
    made a paper-scale network evaluation 2.8× faster in float16 after about 85 s of compilation
    (``benchmarks/results/gpu_forward_variants_h100.md``): worth it for many volumes, not for one.

    Memory layout: ``channels_last=True`` converts the network (in place) and its inputs to channels-last, which
    oneDNN's CPU convolutions run faster (the demo's 64² model on 2 cores: ``benchmarks/cpu_detection_speed.py``);
    the numbers change only by floating-point rounding.

    Settings: the arguments before ``*`` are the sampler settings (:data:`SAMPLER_SETTINGS`): what a reconstruction,
    and so a calibrated threshold, depends on. A new setting is one argument there (and, for a bundle config key, its
    default in ``sampler_settings`` of ``inference.yaml``); the keyword-only ones after it are run options.

    Attributes:
        nfe_per_slice: score evaluations per slice of the configured sampler.
        settings: the sampler settings of this inferer (every one, defaults included): what detection records.
    """

    def __init__(
        self,
        sde: VESDE,
        sampler: str = "pc",
        n_steps: Optional[int] = None,
        snr: float = 0.075,
        n_corrector_steps: int = 1,
        sdedit_sigma_start: Optional[float] = None,
        churn: float = 0.0,
        n_draws: int = 1,
        *,
        conditional: bool = True,
        seed: int = 0,
        batch_size: int = 64,
        progress: bool = False,
        amp: bool = False,
        compile: bool = False,
        channels_last: bool = False,
    ):
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {sorted(SAMPLERS)}, got {sampler!r}")
        entry = SAMPLERS[sampler]
        starters = sorted(name for name, other in SAMPLERS.items() if other.from_input)
        if not conditional and not entry.from_input:
            raise ValueError(f"an unconditional model reconstructs only with sampler in {starters} (it must start from the input)")
        if entry.from_input:
            if sdedit_sigma_start is None or not sde.sigma_min < sdedit_sigma_start <= sde.sigma_max:
                raise ValueError(f"sampler={sampler!r} needs sdedit_sigma_start in ({sde.sigma_min}, {sde.sigma_max}], got {sdedit_sigma_start}")
        if churn < 0 or (churn > 0 and not entry.churn):
            churners = sorted(name for name, other in SAMPLERS.items() if other.churn)
            raise ValueError(f"churn (EDM's S_churn) must be >= 0 and is for sampler in {churners} only, got {churn}, {sampler!r}")
        if n_steps is not None and n_steps < 1:
            raise ValueError(f"n_steps must be >= 1, got {n_steps}")
        if n_steps is not None and not entry.steps:
            raise ValueError(f"sampler={sampler!r} takes no n_steps (one network evaluation), got n_steps={n_steps}")
        if n_corrector_steps < 0 or batch_size < 1 or n_draws < 1:
            raise ValueError(f"need n_corrector_steps >= 0, batch_size >= 1 and n_draws >= 1, got {n_corrector_steps}, {batch_size}, {n_draws}")
        self.sde = sde
        self.sampler = sampler
        self.conditional = conditional
        self.seed = int(seed)
        self.batch_size = int(batch_size)
        self.progress = progress
        self.amp = amp
        self.compile = compile
        self.channels_last = bool(channels_last)
        self._last_progress = time.monotonic()
        self._compiled_source: Optional[nn.Module] = None
        self._compiled_network: Optional[nn.Module] = None
        self.churn = float(churn)
        self.n_draws = int(n_draws)
        self.predictor = ReverseDiffusionPredictor()
        self.corrector = LangevinCorrector(snr, n_corrector_steps) if n_corrector_steps > 0 else None
        self.sigmas = entry.sigmas(sde, n_steps, sdedit_sigma_start)
        self.nfe_per_draw = entry.nfe(self)
        self.nfe_per_slice = self.n_draws * self.nfe_per_draw
        arguments = locals()
        self.settings = {name: arguments[name] for name in SAMPLER_SETTINGS}

    @classmethod
    def from_settings(cls, sde: VESDE, sampler_settings: Mapping[str, Any], **options: Any) -> "DiffusionSamplerInferer":
        """``cls(sde, **sampler_settings, **options)``: the bundle configs' form, the sampler settings as one mapping
        (``sampler_settings`` of ``inference.yaml``, recorded as :attr:`settings` in every detection's provenance)."""
        unknown = sorted(set(sampler_settings) - set(SAMPLER_SETTINGS))
        if unknown:
            raise ValueError(f"unknown sampler settings {unknown}: the settings are {list(SAMPLER_SETTINGS)}")
        return cls(sde, **sampler_settings, **options)

    def _score_fn(self, network: nn.Module, condition: Optional[Tensor]) -> ScoreFn:
        layout = torch.channels_last if self.channels_last else torch.contiguous_format
        if condition is not None:
            condition = condition.contiguous(memory_format=layout)

        def score_fn(x: Tensor, sigma: Tensor) -> Tensor:
            x = x.contiguous(memory_format=layout)
            with autocast(x.device, self.amp):
                return network(x, sigma, condition).float()

        return score_fn

    def _progress(self, first: int, count: int, total: int) -> Optional[ProgressFn]:
        """Logs the sampling of slices (slice draws when ``n_draws > 1``) first+1..first+count of ``total``: at most
        one line per ``PROGRESS_SECONDS`` (a log file holds a few lines per volume, not one per step) and the last
        step of the stack; None if not wanted."""
        if not self.progress:
            return None
        what = "slices" if self.n_draws == 1 else "slice draws"

        def report(step: int, steps: int) -> None:
            now = time.monotonic()
            if now - self._last_progress >= PROGRESS_SECONDS or (step == steps and first + count == total):
                self._last_progress = now
                logger.info("%s sampling %s %d-%d of %d: step %d/%d", self.sampler, what, first + 1, first + count, total, step, steps)

        return report

    @torch.no_grad()
    def __call__(self, inputs: Tensor, network: nn.Module, *args: Any, **kwargs: Any) -> Tensor:
        """Healthy reconstructions of ``inputs``.

        Args:
            inputs: (B, 1, H, W) slices in [0, 1] (the tumour-domain images to be made healthy). For a network with
                ``image_channels`` C > 1 (the four-channel model), B = C·S: the S slices of each modality stacked in
                ``MODALITIES`` order, as the detection harness passes them; the C modalities of each axial slice
                are then reconstructed together, as one C-channel sample conditioned on all of them.
            network: a ``ScoreUNet`` (its EMA weights for a trained model) whose ``condition_channels`` is its
                ``image_channels`` in conditional mode and 0 in unconditional mode.

        Returns:
            (B, 1, H, W) healthy reconstructions in [0, 1], float32, on the inputs' device, in the inputs' order
            (the mean of ``n_draws`` draws).
        """
        inputs = convert_to_tensor(inputs, dtype=torch.float32, track_meta=False)
        if inputs.ndim != 4 or inputs.shape[1] != 1:
            raise ValueError(f"inputs must be (B, 1, H, W), got {tuple(inputs.shape)}")
        if not torch.isfinite(inputs).all():
            raise ValueError("inputs contain NaN or infinite values")
        low, high = inputs.min().item(), inputs.max().item()
        if low < -INPUT_RANGE_TOLERANCE or high > 1 + INPUT_RANGE_TOLERANCE:
            raise ValueError(f"inputs must be normalised slices in [0, 1], got values in [{low:.4g}, {high:.4g}]")
        channels = int(getattr(network, "image_channels", 1))
        expected = channels if self.conditional else 0
        got = getattr(network, "condition_channels", None)
        if got != expected:
            raise ValueError(
                f"{'conditional' if self.conditional else 'unconditional'} sampling needs a network with condition_channels={expected}, got {got}"
            )
        if inputs.shape[0] % channels:
            raise ValueError(
                f"a {channels}-channel network reconstructs the modalities of each axial slice together: inputs must be "
                f"({channels}·S, 1, H, W), the S slices of each modality stacked in MODALITIES order, got {tuple(inputs.shape)}"
            )
        # (C·S, 1, H, W) modality-major -> (S, C, H, W): one sample per axial slice (a no-op for C = 1)
        samples = inputs.reshape(channels, -1, *inputs.shape[2:]).transpose(0, 1)
        if self.channels_last:
            network = network.to(memory_format=torch.channels_last)
        if self.compile:
            network = self._compiled(network)
        # the draws of all slices form one stack (draw-major), chunked like the slices of a single draw
        n_slices = samples.shape[0]
        units = samples.repeat(self.n_draws, 1, 1, 1)
        chunk_size = min(self.batch_size, units.shape[0])
        outputs = []
        for first in range(0, units.shape[0], chunk_size):
            chunk = units[first : first + chunk_size]
            count = chunk.shape[0]
            if self.compile and count < chunk_size:  # one input shape for the compiled network; extra rows dropped
                chunk = torch.cat([chunk, chunk[-1:].expand(chunk_size - count, -1, -1, -1)])
            generators = [slice_generator(self.seed, u % n_slices, inputs.device, u // n_slices) for u in range(first, first + chunk.shape[0])]
            progress = self._progress(first, count, units.shape[0])
            outputs.append(self._sample(chunk, network, generators, progress)[:count].clamp_(0.0, 1.0))
        healthy = torch.cat(outputs).view(self.n_draws, *samples.shape).mean(0)
        return healthy.transpose(0, 1).reshape(inputs.shape)

    def _compiled(self, network: nn.Module) -> nn.Module:
        """``torch.compile(network)``, compiled once per network object."""
        if self._compiled_source is not network:
            self._compiled_source, self._compiled_network = network, torch.compile(network, dynamic=False)
        return self._compiled_network

    def _sample(self, chunk: Tensor, network: nn.Module, generators: list[torch.Generator], progress: Optional[ProgressFn]) -> Tensor:
        score_fn = self._score_fn(network, chunk if self.conditional else None)
        out = SAMPLERS[self.sampler].run(self, score_fn, chunk, generators, progress)
        if out.nfe != self.nfe_per_draw:  # the recorded nfe_per_slice must be what was run
            raise RuntimeError(f"sampler {self.sampler!r} made {out.nfe} score evaluations per draw, expected {self.nfe_per_draw}")
        return out.sample


#: The sampler settings: :class:`DiffusionSamplerInferer`'s arguments before its keyword-only run options. Every
#: detection records them (``_detection.json`` "reconstruction"), a calibration those of the detections it was chosen
#: on, and detection warns when they differ.
SAMPLER_SETTINGS: tuple[str, ...] = tuple(
    name
    for name, parameter in inspect.signature(DiffusionSamplerInferer.__init__).parameters.items()
    if parameter.kind is parameter.POSITIONAL_OR_KEYWORD
)[2:]  # after self and sde
