"""DPM_classifier (Wolleb et al., MICCAI 2022, "Diffusion Models for Medical Anomaly Detection"; reference code
JuliaWolleb/diffusion-anomaly) on the project's VE machinery.

A score model trained on healthy AND tumour slices (no label) and a noise-aware classifier p(tumour | x_σ, σ);
a slice is ODE-encoded (DDIM inversion) to σ_L and decoded with the classifier-guided score
s̃(x, σ) = s(x, σ) + scale·∇_x log p(healthy | x, σ), i.e. the denoiser D̃ = D + scale·σ²·∇_x log p(healthy | x, σ)
(the reference's ``condition_score2``: ε̃ = ε − √(1 − ᾱ)·scale·∇ log p, in score form).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present

from tsgm_components.checkpoints import SPEC_KEY, WEIGHT_KEYS, CheckpointSpec, read_checkpoint
from tsgm_components.data.preprocessing import PreprocessConfig
from tsgm_components.errors import TsgmInputError
from tsgm_components.networks.noisy_classifier import NoisyClassifier
from tsgm_components.networks.score import ScoreUNet
from tsgm_components.peers.guided_diffusion import GuidedODEReconstructor, denoiser_score

#: the class the decoding is guided towards (the datalist's ``tumour`` = 0)
HEALTHY = 0


class ClassifierSpec(CheckpointSpec):
    """A noise-aware classifier's spec: ``preprocess`` (its training slices), ``classifier`` (``NoisyClassifier``
    arguments), ``sde`` (``sigma_min``, ``sigma_max`` of the σ range it was trained on)."""

    bundle = "peer_methods (dpm_classifier classifier)"

    def __init__(self, preprocess: PreprocessConfig | Mapping[str, Any], classifier: Mapping[str, Any], sde: Mapping[str, Any]):
        super().__init__({"preprocess": preprocess, "classifier": dict(classifier), "sde": dict(sde)})

    def matches(self, saved: Any) -> bool:
        return isinstance(saved, Mapping) and "classifier" in saved and "sde" in saved

    @property
    def preprocess(self) -> PreprocessConfig:
        return PreprocessConfig.from_dict(self.spec["preprocess"])

    @property
    def classifier(self) -> dict[str, Any]:
        """``NoisyClassifier`` keyword arguments."""
        return dict(self.spec["classifier"])


def read_classifier_spec(checkpoint: str | Path) -> ClassifierSpec:
    """The ``ClassifierSpec`` stored in a classifier checkpoint; TsgmInputError if there is none."""
    saved = read_checkpoint(checkpoint).get(SPEC_KEY)
    if not (isinstance(saved, Mapping) and "classifier" in saved and "sde" in saved and "preprocess" in saved):
        raise TsgmInputError(checkpoint, f"no classifier '{SPEC_KEY}' entry: not a dpm_classifier classifier checkpoint")
    return ClassifierSpec(saved["preprocess"], saved["classifier"], saved["sde"])


def load_classifier(checkpoint: str | Path, preprocess: PreprocessConfig) -> NoisyClassifier:
    """The classifier of ``checkpoint`` (built from its spec, weights ``model``, else ``network``) in eval mode.
    TsgmInputError naming the file if it was trained on slices prepared otherwise than ``preprocess`` (the score
    model's) or its weights do not fit."""
    spec = read_classifier_spec(checkpoint)
    if spec.preprocess != preprocess:
        raise TsgmInputError(checkpoint, f"classifier trained on slices prepared as {spec.preprocess}, but the score model's are {preprocess}")
    state = read_checkpoint(checkpoint)
    key = next((k for k in WEIGHT_KEYS if k in state), None)
    if key is None:
        raise TsgmInputError(checkpoint, f"no classifier weights (expected one of {WEIGHT_KEYS}, found {sorted(state)})")
    weights = dict(state[key])
    consume_prefix_in_state_dict_if_present(weights, "module.")
    classifier = NoisyClassifier(**spec.classifier)
    try:
        classifier.load_state_dict(weights)
    except RuntimeError as error:
        raise TsgmInputError(checkpoint, f"weights '{key}' do not fit the classifier: {error}") from error
    return classifier.eval()


class ClassifierGuidedReconstructor(GuidedODEReconstructor):
    """DPM_classifier's healthy reconstruction: encode with the unguided score of ``score_model`` (an unconditional
    ``ScoreUNet`` trained on both domains), decode with s + ``scale``·∇ log p(``target`` | x, σ).

    ``scale = 0`` is exactly the unguided ODE decoding (the classifier is not called). Score evaluations per slice:
    ``nfe_per_slice`` = 2(n − 1) + 2n − 1, plus one classifier forward and backward per decoding evaluation.

    Args:
        score_model: unconditional ``ScoreUNet`` (eval mode, on ``device``).
        classifier: ``NoisyClassifier`` (eval mode, on ``device``).
        scale: the guidance scale s ≥ 0 (the reference's ``classifier_scale``, 100 for BraTS).
        target: the class guided towards (0 = healthy).
        clip_denoised: clamp the denoised estimate to [0, 1] at every evaluation (the reference's default).
        sigma_start, n_steps, sigma_min, batch_size, device: as :class:`GuidedODEReconstructor`.
    """

    def __init__(
        self,
        score_model: ScoreUNet,
        classifier: NoisyClassifier,
        sigma_start: float,
        scale: float,
        n_steps: int = 20,
        sigma_min: float = 0.01,
        target: int = HEALTHY,
        clip_denoised: bool = True,
        batch_size: int = 32,
        device: torch.device | str = "cpu",
    ):
        super().__init__(sigma_start, n_steps, sigma_min, batch_size, device)
        if score_model.conditional or score_model.num_classes:
            raise ValueError("DPM_classifier needs an unconditional ScoreUNet (condition_channels = 0, num_classes = 0)")
        if scale < 0:
            raise ValueError(f"scale must be >= 0, got {scale}")
        self.score_model = score_model.eval()
        self.classifier = classifier.eval()
        self.scale = float(scale)
        self.target = int(target)
        self._score = denoiser_score(self.score_model.denoise, clip_denoised)
        n = len(self.sigmas) - 1
        self.nfe_per_slice = 2 * (n - 1) + 2 * n - 1

    def encode_score(self, x: Tensor, sigma: Tensor) -> Tensor:
        return self._score(x, sigma)

    def decode_score(self, x: Tensor, sigma: Tensor) -> Tensor:
        score = self._score(x, sigma)
        if self.scale == 0.0:
            return score
        return score + self.scale * self.classifier.log_prob_gradient(x, sigma, self.target).to(score.dtype)
