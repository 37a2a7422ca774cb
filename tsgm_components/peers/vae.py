"""Peer ``vae``: Baur et al.'s dense VAE (MedIA 2021; reference StefanDenn3r/Unsupervised_Anomaly_Detection_Brain_MRI,
``models/variational_autoencoder.py``, ``trainers/VAE.py``, ``mains/main_VAE.py``) with z = 128, as the TSGM paper's
Table II uses it. Network: :class:`tsgm_components.networks.autoencoders.DenseVAE`; training:
:class:`tsgm_components.engines.autoencoders.VAETrainer`; detection: decoder(μ(x)) through
:class:`tsgm_components.peers.autoencoders.AutoencoderReconstructor`.
"""

from __future__ import annotations

import torch
from torch import Tensor


def vae_loss(x: Tensor, x_hat: Tensor, mu: Tensor, log_sigma: Tensor) -> dict[str, Tensor]:
    """The reference's negative ELBO (``trainers/VAE.py``): per sample the summed L1 reconstruction error plus the KL
    divergence KL(N(μ, σ²) ‖ N(0, I)) = ½ Σ (μ² + σ² − log σ² − 1), both with weight 1, averaged over the batch.

    x, x_hat: (N, C, s, s); mu, log_sigma: (N, z) (log σ, not log σ²). Returns ``loss``, ``reconstruction``, ``kl``
    (batch means, scalars).
    """
    reconstruction = (x - x_hat).abs().flatten(1).sum(dim=1)
    kl = 0.5 * (mu.square() + torch.exp(2.0 * log_sigma) - 2.0 * log_sigma - 1.0).sum(dim=1)
    return {"loss": (reconstruction + kl).mean(), "reconstruction": reconstruction.mean(), "kl": kl.mean()}
