"""Peer ``fanogan``: f-AnoGAN (Schlegl et al., MedIA 2019) as Baur et al. configure it with z = 128 (MedIA 2021;
reference StefanDenn3r/Unsupervised_Anomaly_Detection_Brain_MRI, ``models/fanogan.py``, ``trainers/fAnoGAN.py``,
``mains/main_fAnoGAN.py``; Schlegl's own code tSchlegl/f-AnoGAN, ``wgangp_64x64.py``, ``z_encoding_izif.py``).

Two training phases (:class:`tsgm_components.engines.autoencoders.FAnoGANTrainer`): a WGAN-GP on healthy slices
(:func:`critic_loss`, :func:`generator_loss`), then the izi_f encoder with generator and critic frozen
(:func:`izif_loss`). Detection: G(E(x)) through :class:`tsgm_components.peers.autoencoders.AutoencoderReconstructor`.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from tsgm_components.networks.autoencoders import FAnoGAN


def sample_latent(n: int, latent_size: int, device: torch.device | str, generator: torch.Generator | None = None) -> Tensor:
    """(n, latent_size) standard-normal codes: the generator's prior (reference ``sample_z``: ``np.random.normal``)."""
    return torch.randn(n, latent_size, generator=generator, device=device)


def gradient_penalty(critic: Callable[[Tensor], Tensor], real: Tensor, fake: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """WGAN-GP penalty (Gulrajani et al. 2017): mean over the batch of (‖∇_x̂ D(x̂)‖₂ − 1)², x̂ = x + α(x̃ − x) with
    α ~ U(0, 1) per sample; the norm is over each sample's whole image (Schlegl's ``wgangp_64x64.py`` ``slopes``).

    critic: (N, C, s, s) -> (N,) scores; real, fake: (N, C, s, s) (fake detached by the caller). Returns a scalar
    that keeps the graph (``create_graph``), so it trains the critic.
    """
    alpha = torch.rand(real.shape[0], *([1] * (real.dim() - 1)), generator=generator, device=real.device, dtype=real.dtype)
    interpolated = (real + alpha * (fake - real)).requires_grad_(True)
    (gradient,) = torch.autograd.grad(critic(interpolated).sum(), interpolated, create_graph=True)
    return (gradient.flatten(1).norm(dim=1) - 1.0).square().mean()


def critic_loss(
    critic: Callable[[Tensor], Tensor], real: Tensor, fake: Tensor, gp_weight: float = 10.0, generator: torch.Generator | None = None
) -> dict[str, Tensor]:
    """Critic objective D(x̃) − D(x) + λ·GP (batch means), λ = ``gp_weight`` (reference ``scale`` = 10).
    Returns ``loss``, ``wasserstein`` (the estimate D(x) − D(x̃)) and ``gradient_penalty``."""
    wasserstein = critic(real).mean() - critic(fake).mean()
    penalty = gradient_penalty(critic, real, fake, generator)
    return {"loss": -wasserstein + gp_weight * penalty, "wasserstein": wasserstein.detach(), "gradient_penalty": penalty.detach()}


def generator_loss(critic: Callable[[Tensor], Tensor], fake: Tensor) -> Tensor:
    """Generator objective −D(G(z)) (batch mean)."""
    return -critic(fake).mean()


def izif_loss(network: FAnoGAN, x: Tensor, kappa: float = 1.0) -> dict[str, Tensor]:
    """izi_f encoder objective (Schlegl et al. 2019, eq. 6; reference ``trainers/fAnoGAN.py`` ``enc_loss``):
    MSE(x, G(E(x))) + κ·MSE(f(G(E(x))), f(x)), f the critic's feature map, both means over all elements.

    Gradients reach only the encoder's parameters when the caller has frozen G and D (their ``requires_grad`` off);
    f(x) of the real image is computed without a graph. Returns ``loss``, ``image``, ``features`` (scalars).
    """
    reconstruction = network.generator(network.encoder(x))
    with torch.no_grad():
        real_features = network.critic.features(x)
    image = (reconstruction - x).square().mean()
    features = (network.critic.features(reconstruction) - real_features).square().mean()
    return {"loss": image + kappa * features, "image": image.detach(), "features": features.detach()}
