"""Conditional score network for VE-JP: a MONAI ``DiffusionModelUNet`` wrapped as s_θ(x_t, σ, condition), optionally
also conditioned on a class label (class-conditional peers with a null class for the unconditional score)."""

from __future__ import annotations

from typing import Sequence

import torch
from monai.networks.nets import DiffusionModelUNet
from torch import Tensor, nn

#: Paper scale (256×256): the NCSN++ layout of the authors (nf 128, ch_mult (1,1,2,2,2,2,2), 2 res blocks per
#: level, attention at 16×16, residual up/down-sampling) expressed with MONAI blocks: the constructor's defaults.
#: The training configs state the network (train.yaml: this layout; cpu.yaml: the 64² demo layout) and every
#: checkpoint records it; inference builds the network from the checkpoint.
PAPER_PRESET: dict = dict(
    channels=(128, 128, 256, 256, 256, 256, 256),
    attention_levels=(False, False, False, False, True, False, False),
    num_res_blocks=2,
    num_head_channels=64,
    norm_num_groups=32,
)

#: Noise conditioning: the timestep fed to MONAI's sinusoidal embedding is NOISE_LABEL_SCALE · ln σ.
#: EDM's c_noise = ¼ ln σ, multiplied by 1000 to match the DDPM timestep range (0..1000) that the embedding's
#: frequencies (1 down to 1e-4 rad per unit) are laid out for; its finest frequency then resolves σ to ≈0.4 %.
NOISE_LABEL_SCALE = 250.0


class ScoreUNet(nn.Module):
    """s_θ(x_t, σ, condition) ≈ ∇ log p_σ(x_t | condition), the score of the noised healthy image, computed from a
    preconditioned denoiser (Karras et al. 2022, "EDM", table 1).

    Images in [0, 1] are mapped to y = 2x − 1 in [-1, 1] (so the noise level there is σ_y = 2σ). The UNet F sees
    the noisy state scaled to unit variance, c_in·y_t, with the condition concatenated (2c − 1, never noised), and
    σ as the timestep embedding of ``NOISE_LABEL_SCALE · ln σ``. The denoiser is
    D_y = c_skip·y_t + c_out·F, with c_skip = σ_d²/(σ_y² + σ_d²), c_out = σ_y·σ_d/√(σ_y² + σ_d²),
    c_in = 1/√(σ_y² + σ_d²), σ_d = ``sigma_data``; the score is (D(x_t) − x_t)/σ² (Tweedie).

    Why not the authors' NCSN++ output scaling (raw 2x − 1 input, UNet output / σ): the same score model, but at
    large σ its UNet must undo inputs of magnitude ≈ 2σ (≈ 700 at σ_max = 348), which it learns only after the
    paper's ~10⁶ steps; the EDM form keeps every UNet input and target at unit scale, so a few hundred CPU steps
    already give brain-shaped denoised images. Train it with ``loss_weight`` (EDM's λ(σ)), which gives every σ
    the same weight on the UNet's own output.

    Args:
        condition_channels: channels of the condition image (1 for VE-JP: the pseudo-tumour slice x_B~; 4 for the
            four-channel model); 0 for an unconditional model (healthy-only SDEdit baseline).
        image_channels: channels of the healthy image the model denoises: 1 (the paper: every modality slice a
            sample) or 4 (the four modalities of an axial slice as one sample, in ``MODALITIES`` order: Table III's
            multi-channel stage 2). Checkpoints saved before this option hold 1-channel models.
        channels, attention_levels, num_res_blocks, num_head_channels, norm_num_groups: the
            ``DiffusionModelUNet`` layout; defaults are ``PAPER_PRESET``. Image sides must be divisible by
            2^(len(channels) − 1).
        sigma_data: σ_d, the standard deviation of the data on the [-1, 1] scale assumed by the preconditioning
            (EDM's 0.5).
        num_classes: 0 (default): no class input, the network and its weights as before. K > 0: the UNet's class
            embedding (``num_class_embeds = K + 1``) is added to the noise embedding; labels 0..K−1 are the classes
            and label K (:attr:`null_class`) the "no class" token of classifier-free guidance (Ho & Salimans 2022).
    """

    def __init__(
        self,
        condition_channels: int = 1,
        channels: Sequence[int] = PAPER_PRESET["channels"],
        attention_levels: Sequence[bool] = PAPER_PRESET["attention_levels"],
        num_res_blocks: int | Sequence[int] = PAPER_PRESET["num_res_blocks"],
        num_head_channels: int | Sequence[int] = PAPER_PRESET["num_head_channels"],
        norm_num_groups: int = PAPER_PRESET["norm_num_groups"],
        sigma_data: float = 0.5,
        num_classes: int = 0,
        image_channels: int = 1,
    ):
        super().__init__()
        if image_channels < 1:
            raise ValueError(f"image_channels must be >= 1, got {image_channels}")
        if condition_channels < 0:
            raise ValueError(f"condition_channels must be >= 0, got {condition_channels}")
        if sigma_data <= 0:
            raise ValueError(f"sigma_data must be > 0, got {sigma_data}")
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        self.num_classes = int(num_classes)
        self.condition_channels = int(condition_channels)
        self.image_channels = int(image_channels)
        self.sigma_data = float(sigma_data)
        self.size_multiple = 2 ** (len(channels) - 1)
        self.unet = DiffusionModelUNet(
            spatial_dims=2,
            in_channels=self.image_channels + self.condition_channels,
            out_channels=self.image_channels,
            channels=tuple(channels),
            attention_levels=tuple(attention_levels),
            num_res_blocks=num_res_blocks,
            num_head_channels=num_head_channels,
            norm_num_groups=norm_num_groups,
            resblock_updown=True,
            num_class_embeds=self.num_classes + 1 if self.num_classes else None,
        )

    @property
    def conditional(self) -> bool:
        return self.condition_channels > 0

    @property
    def null_class(self) -> int:
        """The label of the unconditional score of a class-conditional model (``num_classes``)."""
        if not self.num_classes:
            raise ValueError("this ScoreUNet has no class input (num_classes=0)")
        return self.num_classes

    def forward(self, x: Tensor, sigma: Tensor, condition: Tensor | None = None, class_labels: Tensor | None = None) -> Tensor:
        """Score estimate.

        Args:
            x: noisy state x_t, (B, image_channels, H, W), data scale [0, 1] plus noise of std ``sigma``.
            sigma: noise level, (B,) (or a scalar, broadcast to the batch), > 0.
            condition: (B, condition_channels, H, W) in [0, 1], never noised; None for an unconditional model.
            class_labels: (B,) int64 in 0..num_classes (num_classes = :attr:`null_class`) for a class-conditional
                model (``num_classes > 0``); None otherwise.

        Returns:
            (B, image_channels, H, W) score, the estimate of ∇_x log p_σ(x | condition, class), in units of 1/intensity.
        """
        sigma = self._check(x, sigma, condition, class_labels)
        return (self._denoise(x, sigma, condition, class_labels) - x) / sigma.to(x.dtype)[:, None, None, None] ** 2

    def denoise(self, x: Tensor, sigma: Tensor, condition: Tensor | None = None, class_labels: Tensor | None = None) -> Tensor:
        """D(x_t, σ, condition, class) ≈ E[x_0 | x_t, condition, class]: (B, image_channels, H, W) on the [0, 1] data scale;
        arguments as ``forward``."""
        return self._denoise(x, self._check(x, sigma, condition, class_labels), condition, class_labels)

    def _denoise(self, x: Tensor, sigma: Tensor, condition: Tensor | None, class_labels: Tensor | None = None) -> Tensor:
        sigma_y = 2.0 * sigma.to(x.dtype)[:, None, None, None]
        total = torch.sqrt(sigma_y**2 + self.sigma_data**2)
        c_skip, c_out, c_in = self.sigma_data**2 / total**2, sigma_y * self.sigma_data / total, 1.0 / total
        y_t = 2.0 * x - 1.0
        net_in = c_in * y_t
        if self.conditional:
            net_in = torch.cat([net_in, 2.0 * condition.to(x.dtype) - 1.0], dim=1)
        denoised_y = c_skip * y_t + c_out * self.unet(net_in, NOISE_LABEL_SCALE * torch.log(sigma), class_labels=class_labels)
        return (denoised_y + 1.0) / 2.0

    def loss_weight(self, sigma: Tensor) -> Tensor:
        """EDM's λ(σ) for the σ²-weighted DSM residual (σ·s + z)² = ‖D − x_0‖²/σ²: 1 + (2σ/σ_d)² = 1/(4c_out²/σ_y²),
        which turns the loss into the plain mean squared error of the UNet output against its target. (B,) → (B,)."""
        return 1.0 + (2.0 * sigma / self.sigma_data) ** 2

    def _check(self, x: Tensor, sigma: Tensor, condition: Tensor | None, class_labels: Tensor | None = None) -> Tensor:
        """Validates shapes; returns sigma as a float32 (B,) tensor on x's device."""
        if x.ndim != 4 or x.shape[1] != self.image_channels:
            raise ValueError(f"x must be (B, {self.image_channels}, H, W), got {tuple(x.shape)}")
        if x.shape[-2] % self.size_multiple or x.shape[-1] % self.size_multiple:
            raise ValueError(f"image sides {tuple(x.shape[-2:])} must be divisible by {self.size_multiple}")
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
        if sigma.ndim == 0:
            sigma = sigma.expand(x.shape[0])
        if sigma.shape != (x.shape[0],):
            raise ValueError(f"sigma must be (B,) = ({x.shape[0]},), got {tuple(sigma.shape)}")
        if self.conditional:
            if condition is None or condition.shape != (x.shape[0], self.condition_channels, *x.shape[2:]):
                got = None if condition is None else tuple(condition.shape)
                raise ValueError(f"condition must be (B, {self.condition_channels}, H, W) matching x {tuple(x.shape)}, got {got}")
        elif condition is not None:
            raise ValueError("this ScoreUNet is unconditional (condition_channels=0) but a condition was given")
        if self.num_classes:
            if class_labels is None or class_labels.shape != (x.shape[0],):
                got = None if class_labels is None else tuple(class_labels.shape)
                raise ValueError(f"class_labels must be ({x.shape[0]},) for a class-conditional ScoreUNet, got {got}")
            if class_labels.min() < 0 or class_labels.max() > self.num_classes:
                raise ValueError(f"class_labels must lie in 0..{self.num_classes} (the last is the null class)")
        elif class_labels is not None:
            raise ValueError("this ScoreUNet has no class input (num_classes=0) but class_labels were given")
        return sigma
