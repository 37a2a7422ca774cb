"""Baur et al.'s dense autoencoder family (MedIA 2021, reference code StefanDenn3r/Unsupervised_Anomaly_Detection_Brain_MRI)
in MONAI blocks: the dense VAE and f-AnoGAN's encoder, generator and WGAN critic (Schlegl et al. 2019).

The reference builds every model from one "unified" encoder and decoder (``models/customlayers.py``): stride-2 5×5
convolutions with min(128, 32·2^i) filters, each followed by a normalisation and LeakyReLU, down to an intermediate
resolution r (8 for the VAE, 16 for f-AnoGAN); the decoder mirrors it with max(32, 128 / 2^i) filters of stride-2 5×5
transposed convolutions and ends in a 1×1 convolution. Between them the dense bottleneck: a 1×1 convolution to an
eighth of the channels, a dense layer to the latent code, and back (``models/variational_autoencoder.py``,
``models/fanogan.py``). MONAI's ``VarAutoEncoder`` cannot express that bottleneck (its intermediate layers share the
encoder's kernel size, its dense decoder input is ReLU'd and viewed with the encoder's last channel count, and its
last transposed convolution is the output layer), hence this compact module of MONAI ``Convolution`` and ``ADN``
blocks. Images are (N, C, s, s) with s a power of two; the number of stride-2 levels is log2(s / r), as in the
reference.

Normalisation ``"batch"`` (VAE, f-AnoGAN encoder) is Keras' BatchNormalization (eps 1e-3, momentum 0.99);
``"layer"`` (generator, critic: no batch statistics in a WGAN-GP critic) is Keras' ``LayerNormalization([1, 2])``:
per sample and channel over the spatial axes with an (H, W) affine, i.e. ``nn.LayerNorm((H, W))`` on NCHW.
LeakyReLU slope 0.3 is Keras' default, which the reference uses.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from monai.networks.blocks import ADN, Convolution
from torch import Tensor, nn

__all__ = ["DenseVAE", "FAnoGAN", "FAnoGANEncoder", "FAnoGANGenerator", "WGANCritic", "n_levels", "reparameterize"]

#: Keras' LeakyReLU default slope (the reference's ``LeakyReLU()``)
LEAKY_RELU = ("leakyrelu", {"negative_slope": 0.3})
NORMS = ("batch", "layer")


def n_levels(image_size: int, intermediate_resolution: int) -> int:
    """Stride-2 levels between ``image_size`` and ``intermediate_resolution`` (both powers of two, image larger)."""
    levels = math.log2(image_size) - math.log2(intermediate_resolution)
    if image_size < 2 or intermediate_resolution < 1 or not float(levels).is_integer() or levels < 1 or not math.log2(image_size).is_integer():
        raise ValueError(
            f"image_size ({image_size}) and intermediate_resolution ({intermediate_resolution}) must be powers of two with image_size larger"
        )
    return int(levels)


def encoder_width(level: int) -> int:
    """Filters of encoder level ``level`` (reference: ``min(128, 32 * 2**i)``)."""
    return min(128, 32 * 2**level)


def decoder_width(level: int) -> int:
    """Filters of decoder level ``level`` (reference: ``max(32, 128 / 2**i)``)."""
    return max(32, 128 // 2**level)


def _norm(kind: str, size: int) -> tuple[str, dict[str, Any]]:
    """MONAI norm spec of Keras' BatchNormalization or LayerNormalization([1, 2]) at spatial size ``size``."""
    if kind == "batch":
        return ("batch", {"eps": 1e-3, "momentum": 0.01})
    if kind == "layer":
        return ("layer", {"normalized_shape": (size, size), "eps": 1e-3})
    raise ValueError(f"norm must be one of {NORMS}, got {kind!r}")


def unified_encoder(image_size: int, intermediate_resolution: int, in_channels: int, norm: str) -> nn.Sequential:
    """(N, in_channels, s, s) -> (N, encoder_width(L - 1), r, r): L stride-2 5×5 conv + norm + LeakyReLU levels."""
    layers, channels, size = [], in_channels, image_size
    for level in range(n_levels(image_size, intermediate_resolution)):
        size //= 2
        layers.append(Convolution(2, channels, encoder_width(level), strides=2, kernel_size=5, norm=_norm(norm, size), act=LEAKY_RELU))
        channels = encoder_width(level)
    return nn.Sequential(*layers)


def unified_decoder(image_size: int, intermediate_resolution: int, in_channels: int, out_channels: int, norm: str) -> nn.Sequential:
    """(N, in_channels, r, r) -> (N, out_channels, s, s), no output activation: norm + ReLU, L stride-2 5×5
    transposed conv + norm + LeakyReLU levels, 1×1 conv."""
    layers: list[nn.Module] = [ADN(ordering="NA", in_channels=in_channels, norm=_norm(norm, intermediate_resolution), norm_dim=2, act="relu")]
    channels, size = in_channels, intermediate_resolution
    for level in range(n_levels(image_size, intermediate_resolution)):
        size *= 2
        layers.append(
            Convolution(2, channels, decoder_width(level), strides=2, kernel_size=5, norm=_norm(norm, size), act=LEAKY_RELU, is_transposed=True)
        )
        channels = decoder_width(level)
    layers.append(nn.Conv2d(channels, out_channels, 1))
    return nn.Sequential(*layers)


def reparameterize(mu: Tensor, log_sigma: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """z = μ + σ·ε, σ = exp(log σ), ε ~ N(0, I) drawn from ``generator`` (the reference's ``z_vae``)."""
    eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
    return mu + torch.exp(log_sigma) * eps


def bottleneck_channels(channels: int) -> int:
    """Channels of the 1×1-convolution bottleneck before the dense layers (reference: an eighth, ``// 8``)."""
    return max(channels // 8, 1)


class LatentToFeatures(nn.Module):
    """(N, z) -> (N, c, r, r): dense to c/8·r², dropout, reshape, 1×1 conv to c (the reference's ``dec_dense`` and
    ``intermediate_conv_reverse``)."""

    def __init__(self, latent_size: int, channels: int, resolution: int, dropout: float):
        super().__init__()
        self.shape = (bottleneck_channels(channels), resolution, resolution)
        self.dense = nn.Linear(latent_size, math.prod(self.shape))
        self.dropout = nn.Dropout(dropout)
        self.expand = nn.Conv2d(self.shape[0], channels, 1)

    def forward(self, z: Tensor) -> Tensor:
        return self.expand(self.dropout(self.dense(z)).view(-1, *self.shape))


class DenseVAE(nn.Module):
    """Baur et al.'s dense VAE (reference ``models/variational_autoencoder.py``, ``mains/main_VAE.py``).

    Encoder (batch norm) -> 1×1 conv to c/8 channels -> dense μ and log σ (latent ``latent_size``) -> z -> dense ->
    1×1 conv -> decoder (batch norm) -> 1×1 conv, no output activation. Dropout (rate ``dropout``) on μ, log σ and the
    dense decoder input in training mode, as the reference's training feed.

    Args:
        image_size: s of the (N, in_channels, s, s) input, a power of two.
        latent_size: z (reference 128).
        intermediate_resolution: r (reference 8 for the VAE).
        dropout: reference 0.1.
        in_channels: 1 (one model serves every modality slice).
    """

    def __init__(self, image_size: int, latent_size: int = 128, intermediate_resolution: int = 8, dropout: float = 0.1, in_channels: int = 1):
        super().__init__()
        self.config = dict(
            image_size=image_size, latent_size=latent_size, intermediate_resolution=intermediate_resolution, dropout=dropout, in_channels=in_channels
        )
        self.encoder = unified_encoder(image_size, intermediate_resolution, in_channels, "batch")
        channels = encoder_width(n_levels(image_size, intermediate_resolution) - 1)
        self.reduce = nn.Conv2d(channels, bottleneck_channels(channels), 1)
        flat = bottleneck_channels(channels) * intermediate_resolution**2
        self.mu = nn.Linear(flat, latent_size)
        self.log_sigma = nn.Linear(flat, latent_size)
        self.dropout = nn.Dropout(dropout)
        self.from_latent = LatentToFeatures(latent_size, channels, intermediate_resolution, dropout)
        self.decoder = unified_decoder(image_size, intermediate_resolution, channels, in_channels, "batch")

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(N, C, s, s) -> μ, log σ, each (N, latent_size)."""
        flat = self.reduce(self.encoder(x)).flatten(1)
        return self.dropout(self.mu(flat)), self.dropout(self.log_sigma(flat))

    def decode(self, z: Tensor) -> Tensor:
        """(N, latent_size) -> (N, C, s, s), unbounded (trained towards [0, 1] intensities)."""
        return self.decoder(self.from_latent(z))

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Training pass: (decode(z), μ, log σ) with z = reparameterize(μ, log σ) drawn from ``generator``."""
        mu, log_sigma = self.encode(x)
        return self.decode(reparameterize(mu, log_sigma, generator)), mu, log_sigma

    def reconstruct(self, x: Tensor) -> Tensor:
        """decode(μ(x)): the deterministic reconstruction, (N, C, s, s) unbounded (call in eval mode)."""
        return self.decode(self.encode(x)[0])


class FAnoGANEncoder(nn.Module):
    """f-AnoGAN's izi_f encoder as Baur et al. configure it (reference ``models/fanogan.py`` scope ``Encoder``):
    unified encoder (batch norm) -> 1×1 conv to c/8 -> dense -> dropout -> tanh; (N, C, s, s) -> (N, z) in [-1, 1]."""

    def __init__(self, image_size: int, latent_size: int, intermediate_resolution: int, dropout: float, in_channels: int = 1):
        super().__init__()
        self.features = unified_encoder(image_size, intermediate_resolution, in_channels, "batch")
        channels = encoder_width(n_levels(image_size, intermediate_resolution) - 1)
        self.reduce = nn.Conv2d(channels, bottleneck_channels(channels), 1)
        self.dense = nn.Linear(bottleneck_channels(channels) * intermediate_resolution**2, latent_size)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(self.dropout(self.dense(self.reduce(self.features(x)).flatten(1))))


class FAnoGANGenerator(nn.Module):
    """WGAN generator of Baur et al.'s f-AnoGAN (reference ``models/fanogan.py`` scope ``Generator``): dense ->
    dropout -> (c/8, r, r) -> 1×1 conv to c -> unified decoder with layer norm -> sigmoid; (N, z) -> (N, C, s, s) in
    [0, 1]. c is the encoder's last width, as in the reference."""

    def __init__(self, image_size: int, latent_size: int, intermediate_resolution: int, dropout: float, out_channels: int = 1):
        super().__init__()
        channels = encoder_width(n_levels(image_size, intermediate_resolution) - 1)
        self.from_latent = LatentToFeatures(latent_size, channels, intermediate_resolution, dropout)
        self.decoder = unified_decoder(image_size, intermediate_resolution, channels, out_channels, "layer")

    def forward(self, z: Tensor) -> Tensor:
        return torch.sigmoid(self.decoder(self.from_latent(z)))


class WGANCritic(nn.Module):
    """WGAN-GP critic of Baur et al.'s f-AnoGAN (reference ``models/fanogan.py`` scope ``Discriminator``): the unified
    encoder with layer norm, then a linear read-out at every position (the reference applies ``Dense(1)`` to the 4-D
    feature map) averaged over positions, as its losses average it."""

    def __init__(self, image_size: int, intermediate_resolution: int, in_channels: int = 1):
        super().__init__()
        self.encoder = unified_encoder(image_size, intermediate_resolution, in_channels, "layer")
        self.head = nn.Conv2d(encoder_width(n_levels(image_size, intermediate_resolution) - 1), 1, 1)

    def features(self, x: Tensor) -> Tensor:
        """(N, C, s, s) -> (N, c, r, r): the feature map of f-AnoGAN's κ-weighted feature residual."""
        return self.encoder(x)

    def forward(self, x: Tensor) -> Tensor:
        """(N, C, s, s) -> (N,) critic scores (higher: more like the training data)."""
        return self.head(self.features(x)).mean(dim=(1, 2, 3))


class FAnoGAN(nn.Module):
    """f-AnoGAN's three networks in one module (one checkpoint): ``encoder`` E, ``generator`` G, ``critic`` D.

    Args:
        image_size: s, a power of two.
        latent_size: z (Baur et al.: 128).
        intermediate_resolution: r (Baur et al.'s f-AnoGAN: 16).
        dropout: on the encoder output and the generator's dense layer in training mode (reference 0.1).
        in_channels: 1.
    """

    def __init__(self, image_size: int, latent_size: int = 128, intermediate_resolution: int = 16, dropout: float = 0.1, in_channels: int = 1):
        super().__init__()
        self.config = dict(
            image_size=image_size, latent_size=latent_size, intermediate_resolution=intermediate_resolution, dropout=dropout, in_channels=in_channels
        )
        self.latent_size = latent_size
        self.encoder = FAnoGANEncoder(image_size, latent_size, intermediate_resolution, dropout, in_channels)
        self.generator = FAnoGANGenerator(image_size, latent_size, intermediate_resolution, dropout, in_channels)
        self.critic = WGANCritic(image_size, intermediate_resolution, in_channels)

    def reconstruct(self, x: Tensor) -> Tensor:
        """G(E(x)): (N, C, s, s) in [0, 1] (call in eval mode)."""
        return self.generator(self.encoder(x))
