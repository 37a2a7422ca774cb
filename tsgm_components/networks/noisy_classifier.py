"""Noise-aware slice classifier p(class | x_σ, σ) for classifier guidance: the encoder half of a MONAI
``DiffusionModelUNet`` (``DiffusionModelEncoder``), as Wolleb et al. (2022) guide with the encoder half of their UNet."""

from __future__ import annotations

from typing import Sequence

import torch
from monai.networks.nets.diffusion_model_unet import DiffusionModelEncoder
from torch import Tensor, nn

from tsgm_components.networks.score import NOISE_LABEL_SCALE


class NoisyClassifier(nn.Module):
    """Logits of p(class | x_σ, σ) for a slice x_σ = x_0 + σ z on the [0, 1] data scale.

    The input enters as the score network sees it (``ScoreUNet``): y = 2x − 1 scaled to unit variance,
    c_in·y with c_in = 1/√((2σ)² + σ_d²), and σ as the timestep embedding of ``NOISE_LABEL_SCALE · ln σ``; so one
    network serves every σ from σ_min to σ_max. The encoder's down blocks (residual blocks with the noise embedding,
    attention where ``attention_levels`` says) end in MONAI's flatten + two-layer head.

    Args:
        image_size: slice side (the head is sized for it); divisible by 2^len(channels).
        num_classes: classes (2: healthy = 0, tumour = 1).
        channels, attention_levels, num_res_blocks, num_head_channels, norm_num_groups: the
            ``DiffusionModelEncoder`` layout (each level halves the side, the last one included).
        sigma_data: σ_d of the input scaling (as ``ScoreUNet``).
    """

    def __init__(
        self,
        image_size: int,
        num_classes: int = 2,
        channels: Sequence[int] = (32, 32, 64, 64, 128, 128),
        attention_levels: Sequence[bool] = (False, False, False, True, True, True),
        num_res_blocks: int | Sequence[int] = 4,
        num_head_channels: int | Sequence[int] = 64,
        norm_num_groups: int = 32,
        sigma_data: float = 0.5,
    ):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if image_size % 2 ** len(channels):
            raise ValueError(f"image_size {image_size} must be divisible by 2^len(channels) = {2 ** len(channels)}")
        self.image_size = int(image_size)
        self.num_classes = int(num_classes)
        self.sigma_data = float(sigma_data)
        self.encoder = DiffusionModelEncoder(
            spatial_dims=2,
            in_channels=1,
            out_channels=self.num_classes,
            input_shape=(self.image_size, self.image_size),
            num_res_blocks=num_res_blocks,
            channels=tuple(channels),
            attention_levels=tuple(attention_levels),
            norm_num_groups=norm_num_groups,
            resblock_updown=True,
            num_head_channels=num_head_channels,
        )

    def forward(self, x: Tensor, sigma: Tensor) -> Tensor:
        """Logits (B, num_classes) for x (B, 1, image_size, image_size) at noise levels sigma (B,) (or a scalar), > 0."""
        if x.ndim != 4 or x.shape[1] != 1 or x.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"x must be (B, 1, {self.image_size}, {self.image_size}), got {tuple(x.shape)}")
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).expand(x.shape[0])
        c_in = 1.0 / torch.sqrt((2.0 * sigma.to(x.dtype)) ** 2 + self.sigma_data**2)
        return self.encoder(c_in[:, None, None, None] * (2.0 * x - 1.0), NOISE_LABEL_SCALE * torch.log(sigma))

    def log_prob_gradient(self, x: Tensor, sigma: Tensor, target: int) -> Tensor:
        """∇_x log p(target | x, σ): (B, 1, H, W), per slice (the sum over the batch separates); x as ``forward``."""
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            log_probs = torch.log_softmax(self(x_in, sigma).float(), dim=-1)
            return torch.autograd.grad(log_probs[:, int(target)].sum(), x_in)[0]
