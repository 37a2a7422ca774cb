"""DPM_classifier_free (Sanchez et al., DGM4MICCAI 2022, "What is healthy? Generative counterfactual diffusion for
lesion localization"; reference code vios-s/Diff-SCM, ``diff_scm/sampling/sampling_utils.py``) on the project's VE
machinery.

One class-conditional score model (class 0 healthy, 1 tumour, 2 the null class of the unconditional score, learned
with label dropout: ``engines.guided_diffusion.ClassConditionalScoreTrainer``). A slice is ODE-encoded (DDIM
inversion) to σ_L with the unconditional score, as the reference abducts the noise with the null label, and decoded
with the classifier-free guided score s̃ = (1 + w)·s(x | healthy) − w·s(x | ∅) (the reference's
``uncond + norm_cond_scale·(cond − uncond)`` with ``norm_cond_scale`` = 1 + w).
"""

from __future__ import annotations

import torch
from torch import Tensor

from tsgm_components.networks.score import ScoreUNet
from tsgm_components.peers.guided_diffusion import GuidedODEReconstructor, denoiser_score

#: the class the decoding is conditioned on (the datalist's ``tumour`` = 0)
HEALTHY = 0


class ClassifierFreeReconstructor(GuidedODEReconstructor):
    """DPM_classifier_free's healthy reconstruction with a class-conditional ``ScoreUNet`` (``num_classes`` = 2).

    ``guidance = 0`` is exactly the decoding with the healthy-conditional score (the null label is not evaluated).
    Score evaluations per slice: ``nfe_per_slice`` = 2(n − 1) + (2n − 1)·(2 if guidance else 1).

    Args:
        score_model: class-conditional ``ScoreUNet`` (eval mode, on ``device``).
        guidance: w ≥ 0 (the reference's ``norm_cond_scale`` 3.0 is w = 2).
        target: the class decoded towards (0 = healthy).
        encode_class: the label the slices are encoded with; None: the null class (the reference), or e.g. 1 to
            encode under "tumour".
        clip_denoised: clamp every denoised estimate to [0, 1] (the reference's default).
        sigma_start, n_steps, sigma_min, batch_size, device: as :class:`GuidedODEReconstructor`.
    """

    def __init__(
        self,
        score_model: ScoreUNet,
        sigma_start: float,
        guidance: float,
        n_steps: int = 20,
        sigma_min: float = 0.01,
        target: int = HEALTHY,
        encode_class: int | None = None,
        clip_denoised: bool = True,
        batch_size: int = 32,
        device: torch.device | str = "cpu",
    ):
        super().__init__(sigma_start, n_steps, sigma_min, batch_size, device)
        if score_model.conditional or not score_model.num_classes:
            raise ValueError("DPM_classifier_free needs a class-conditional ScoreUNet (num_classes > 0, condition_channels = 0)")
        if guidance < 0:
            raise ValueError(f"guidance must be >= 0, got {guidance}")
        null = score_model.null_class
        for name, label in (("target", target), ("encode_class", encode_class)):
            if label is not None and not 0 <= label < null:
                raise ValueError(f"{name} must be a class in 0..{null - 1}, got {label}")
        self.score_model = score_model.eval()
        self.guidance = float(guidance)
        self.clip_denoised = bool(clip_denoised)
        self.target = int(target)
        self.encode_class = null if encode_class is None else int(encode_class)
        self.null_class = null
        n = len(self.sigmas) - 1
        self.nfe_per_slice = 2 * (n - 1) + (2 * n - 1) * (2 if self.guidance else 1)

    def class_score(self, x: Tensor, sigma: Tensor, label: int) -> Tensor:
        """s(x | label): (B, 1, H, W) for x (B, 1, H, W), sigma (B,); label in 0..null_class."""
        labels = torch.full((x.shape[0],), label, dtype=torch.long, device=x.device)
        return denoiser_score(lambda x_, s_: self.score_model.denoise(x_, s_, class_labels=labels), self.clip_denoised)(x, sigma)

    def encode_score(self, x: Tensor, sigma: Tensor) -> Tensor:
        return self.class_score(x, sigma, self.encode_class)

    def decode_score(self, x: Tensor, sigma: Tensor) -> Tensor:
        conditional = self.class_score(x, sigma, self.target)
        if self.guidance == 0.0:
            return conditional
        return (1.0 + self.guidance) * conditional - self.guidance * self.class_score(x, sigma, self.null_class)
