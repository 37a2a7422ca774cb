"""Conditional score network for VE-JP: a MONAI ``DiffusionModelUNet`` wrapped as s_θ(x_t, σ, condition)."""

from __future__ import annotations

from typing import Sequence

import torch
from monai.networks.nets import DiffusionModelUNet
from torch import Tensor, nn

#: Paper scale (256×256): the NCSN++ layout of the authors (nf 128, ch_mult (1,1,2,2,2,2,2), 2 res blocks per
#: level, attention at 16×16, residual up/down-sampling) expressed with MONAI blocks.
PAPER_PRESET: dict = dict(
    channels=(128, 128, 256, 256, 256, 256, 256),
    attention_levels=(False, False, False, False, True, False, False),
    num_res_blocks=2,
    num_head_channels=64,
    norm_num_groups=32,
)

#: CPU scale (64×64): three levels (64, 32, 16), attention at 16×16, one res block per level.
CPU_PRESET: dict = dict(
    channels=(32, 64, 64),
    attention_levels=(False, False, True),
    num_res_blocks=1,
    num_head_channels=32,
    norm_num_groups=32,
)

#: Noise conditioning: the timestep fed to MONAI's sinusoidal embedding is NOISE_LABEL_SCALE · ln σ.
#: EDM's c_noise = ¼ ln σ, multiplied by 1000 to match the DDPM timestep range (0..1000) that the embedding's
#: frequencies (1 down to 1e-4 rad per unit) are laid out for; its finest frequency then resolves σ to ≈0.4 %.
NOISE_LABEL_SCALE = 250.0


class ScoreUNet(nn.Module):
    """s_θ(x_t, σ, condition) ≈ ∇ log p_σ(x_t | condition), the score of the noised healthy image.

    Inside: images in [0, 1] are mapped to [-1, 1] by 2x − 1 (the noisy state x_t and the condition alike; x_t is
    not otherwise rescaled, as in score-SDE's NCSN++), the condition is concatenated as extra channels, σ enters
    as the timestep embedding of ``NOISE_LABEL_SCALE · ln σ``, and the UNet output is divided by σ
    (``scale_by_sigma``: the DSM target −z/σ has magnitude 1/σ). The authors' NCSN++ embeds ln σ with Gaussian
    Fourier features instead; MONAI's sinusoidal embedding plays the same role.

    Args:
        condition_channels: channels of the condition image (1 for VE-JP: the pseudo-tumour slice x_B~);
            0 for an unconditional model (healthy-only SDEdit baseline).
        channels, attention_levels, num_res_blocks, num_head_channels, norm_num_groups: the
            ``DiffusionModelUNet`` layout; defaults are ``PAPER_PRESET``. Image sides must be divisible by
            2^(len(channels) − 1).
    """

    def __init__(
        self,
        condition_channels: int = 1,
        channels: Sequence[int] = PAPER_PRESET["channels"],
        attention_levels: Sequence[bool] = PAPER_PRESET["attention_levels"],
        num_res_blocks: int | Sequence[int] = PAPER_PRESET["num_res_blocks"],
        num_head_channels: int | Sequence[int] = PAPER_PRESET["num_head_channels"],
        norm_num_groups: int = PAPER_PRESET["norm_num_groups"],
    ):
        super().__init__()
        if condition_channels < 0:
            raise ValueError(f"condition_channels must be >= 0, got {condition_channels}")
        self.condition_channels = int(condition_channels)
        self.size_multiple = 2 ** (len(channels) - 1)
        self.unet = DiffusionModelUNet(
            spatial_dims=2,
            in_channels=1 + self.condition_channels,
            out_channels=1,
            channels=tuple(channels),
            attention_levels=tuple(attention_levels),
            num_res_blocks=num_res_blocks,
            num_head_channels=num_head_channels,
            norm_num_groups=norm_num_groups,
            resblock_updown=True,
        )

    @property
    def conditional(self) -> bool:
        return self.condition_channels > 0

    def forward(self, x: Tensor, sigma: Tensor, condition: Tensor | None = None) -> Tensor:
        """Score estimate.

        Args:
            x: noisy state x_t, (B, 1, H, W), data scale [0, 1] plus noise of std ``sigma``.
            sigma: noise level, (B,) (or a scalar, broadcast to the batch), > 0.
            condition: (B, condition_channels, H, W) in [0, 1], never noised; None for an unconditional model.

        Returns:
            (B, 1, H, W) score, the estimate of ∇_x log p_σ(x | condition), in units of 1/intensity.
        """
        if x.ndim != 4 or x.shape[1] != 1:
            raise ValueError(f"x must be (B, 1, H, W), got {tuple(x.shape)}")
        if x.shape[-2] % self.size_multiple or x.shape[-1] % self.size_multiple:
            raise ValueError(f"image sides {tuple(x.shape[-2:])} must be divisible by {self.size_multiple}")
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
        if sigma.ndim == 0:
            sigma = sigma.expand(x.shape[0])
        if sigma.shape != (x.shape[0],):
            raise ValueError(f"sigma must be (B,) = ({x.shape[0]},), got {tuple(sigma.shape)}")
        net_in = 2.0 * x - 1.0
        if self.conditional:
            if condition is None or condition.shape != (x.shape[0], self.condition_channels, *x.shape[2:]):
                got = None if condition is None else tuple(condition.shape)
                raise ValueError(
                    f"condition must be (B, {self.condition_channels}, H, W) matching x {tuple(x.shape)}, got {got}"
                )
            net_in = torch.cat([net_in, 2.0 * condition.to(x.dtype) - 1.0], dim=1)
        elif condition is not None:
            raise ValueError("this ScoreUNet is unconditional (condition_channels=0) but a condition was given")
        out = self.unet(net_in, NOISE_LABEL_SCALE * torch.log(sigma))
        return out / sigma.to(out.dtype)[:, None, None, None]
