"""Training engines of the autoencoder-family peers: the dense VAE and f-AnoGAN's two phases (MONAI/Ignite).

Both train on batches ``{"image": (B, 1, s, s)}`` of healthy slices in [0, 1] and draw their noise (reparameterisation,
latent codes, interpolation weights) from a seeded generator that, with torch's global CPU RNG (shuffling, dropout),
is checkpointed (:class:`~tsgm_components.engines.score.RNGState`), so a resumed run continues the same streams.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from tsgm_components.engines.fault_tolerance import check_finite_losses
from tsgm_components.engines.score import RNGState, prepare_pair_batch
from tsgm_components.engines.trainer import MixedPrecisionTrainer
from tsgm_components.networks.autoencoders import DenseVAE, FAnoGAN
from tsgm_components.peers.fanogan import critic_loss, generator_loss, izif_loss, sample_latent
from tsgm_components.peers.vae import vae_loss

__all__ = ["VAETrainer", "FAnoGANTrainer", "set_requires_grad"]


def set_requires_grad(modules: Sequence[nn.Module], flag: bool) -> None:
    """Freeze (False) or unfreeze the parameters of ``modules``."""
    for module in modules:
        for parameter in module.parameters():
            parameter.requires_grad_(flag)


class VAETrainer(MixedPrecisionTrainer):
    """Trains a :class:`~tsgm_components.networks.autoencoders.DenseVAE` on the negative ELBO
    (:func:`~tsgm_components.peers.vae.vae_loss`): one Adam step per batch. ``state.output``: ``loss``,
    ``reconstruction``, ``kl`` (detached scalars). A NaN/Inf loss raises ``NonFiniteLossError`` before the step.

    Args:
        device, max_epochs, train_data_loader, epoch_length, non_blocking, train_handlers, amp: as in
            :class:`~tsgm_components.engines.trainer.MixedPrecisionTrainer`.
        network: the VAE (on ``device``).
        optimizer: reference: Adam(lr 1e-4, β₁ 0.5).
        seed: seed of the reparameterisation noise.
    """

    def __init__(
        self,
        device: torch.device | str,
        max_epochs: int,
        train_data_loader: Iterable,
        network: DenseVAE,
        optimizer: Optimizer,
        seed: int = 0,
        epoch_length: int | None = None,
        non_blocking: bool = False,
        train_handlers: Sequence | None = None,
        amp: bool = False,
        prepare_batch: Callable = prepare_pair_batch,
    ):
        super().__init__(device, max_epochs, train_data_loader, epoch_length, non_blocking, prepare_batch, train_handlers, amp)
        self.network = network
        self.optimizer = optimizer
        self.generator = torch.Generator(device=self.state.device).manual_seed(int(seed))
        self.rng_state = RNGState(self.generator)

    @property
    def checkpoint_objects(self) -> dict[str, Any]:
        """``network``, ``optimizer``, ``trainer`` (iteration, epoch), ``rng`` (and ``scaler`` with one): what a resume loads."""
        objects = {"network": self.network, "optimizer": self.optimizer, "trainer": self, "rng": self.rng_state}
        if self.loss_scaler is not None:
            objects["scaler"] = self.loss_scaler
        return objects

    def _iteration(self, engine: "VAETrainer", batchdata: dict) -> dict[str, Tensor]:
        image, _ = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)
        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=True)
        with engine.autocast():
            x_hat, mu, log_sigma = engine.network(image, engine.generator)
        losses = vae_loss(image, x_hat.float(), mu.float(), log_sigma.float())
        check_finite_losses(engine, losses)
        engine.backward_step(losses["loss"], engine.optimizer)
        engine.update_loss_scale()
        return {name: value.detach() for name, value in losses.items()}


class FAnoGANTrainer(MixedPrecisionTrainer):
    """Trains f-AnoGAN in two phases within one run, switching by epoch so that a resume lands in the right phase.

    Epochs 1..``wgan_epochs`` (WGAN-GP, reference ``trainers/fAnoGAN.py``): per batch one generator step
    (−D(G(z)), critic frozen), then ``n_critic`` critic steps on the same real batch with fresh codes
    (D(G(z)) − D(x) + λ·GP). Later epochs (izi_f encoder): generator and critic frozen and in eval mode, one encoder
    step on MSE(x, G(E(x))) + κ·MSE(f(G(E(x))), f(x)). ``state.output`` holds ``loss`` (the critic loss, then the
    encoder loss) and the phase's terms as floats, and ``phase`` ("wgan" or "encoder").

    Args:
        device, max_epochs, train_data_loader, epoch_length, non_blocking, train_handlers, amp: as in
            :class:`~tsgm_components.engines.trainer.MixedPrecisionTrainer`; ``max_epochs`` counts both phases.
        network: the :class:`~tsgm_components.networks.autoencoders.FAnoGAN` (on ``device``).
        generator_optimizer, critic_optimizer, encoder_optimizer: over G, D and E (reference: Adam β = (0.5, 0.9)).
        wgan_epochs: epochs of the WGAN phase (1 <= wgan_epochs < max_epochs).
        n_critic: critic steps per generator step (reference 5).
        gp_weight: λ of the gradient penalty (reference 10).
        kappa: κ of the feature residual (reference 1).
        seed: seed of the latent codes and interpolation weights.
    """

    def __init__(
        self,
        device: torch.device | str,
        max_epochs: int,
        train_data_loader: Iterable,
        network: FAnoGAN,
        generator_optimizer: Optimizer,
        critic_optimizer: Optimizer,
        encoder_optimizer: Optimizer,
        wgan_epochs: int,
        n_critic: int = 5,
        gp_weight: float = 10.0,
        kappa: float = 1.0,
        seed: int = 0,
        epoch_length: int | None = None,
        non_blocking: bool = False,
        train_handlers: Sequence | None = None,
        amp: bool = False,
        prepare_batch: Callable = prepare_pair_batch,
    ):
        super().__init__(device, max_epochs, train_data_loader, epoch_length, non_blocking, prepare_batch, train_handlers, amp)
        if not 1 <= wgan_epochs < max_epochs:
            raise ValueError(f"need 1 <= wgan_epochs < max_epochs (the encoder phase follows the WGAN phase), got {wgan_epochs}, {max_epochs}")
        if n_critic < 1:
            raise ValueError(f"n_critic must be >= 1, got {n_critic}")
        self.network = network
        self.generator_optimizer, self.critic_optimizer, self.encoder_optimizer = generator_optimizer, critic_optimizer, encoder_optimizer
        self.wgan_epochs, self.n_critic, self.gp_weight, self.kappa = int(wgan_epochs), int(n_critic), float(gp_weight), float(kappa)
        self.generator = torch.Generator(device=self.state.device).manual_seed(int(seed))
        self.rng_state = RNGState(self.generator)

    @property
    def checkpoint_objects(self) -> dict[str, Any]:
        """``network`` (E, G, D), the three optimisers, ``trainer`` (iteration, epoch: the phase), ``rng``."""
        objects = {
            "network": self.network,
            "generator_optimizer": self.generator_optimizer,
            "critic_optimizer": self.critic_optimizer,
            "encoder_optimizer": self.encoder_optimizer,
            "trainer": self,
            "rng": self.rng_state,
        }
        if self.loss_scaler is not None:
            objects["scaler"] = self.loss_scaler
        return objects

    def _iteration(self, engine: "FAnoGANTrainer", batchdata: dict) -> dict[str, Any]:
        image, _ = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)
        if engine.state.epoch <= engine.wgan_epochs:
            output = engine.wgan_step(image)
        else:
            output = engine.encoder_step(image)
        engine.update_loss_scale()
        return output

    def _codes(self, n: int) -> Tensor:
        return sample_latent(n, self.network.latent_size, self.state.device, self.generator)

    def wgan_step(self, image: Tensor) -> dict[str, Any]:
        """One generator step, then ``n_critic`` critic steps on ``image`` (B, 1, s, s)."""
        net = self.network
        net.generator.train()
        net.critic.train()
        set_requires_grad([net.critic], False)
        self.generator_optimizer.zero_grad(set_to_none=True)
        with self.autocast():
            loss_g = generator_loss(net.critic, net.generator(self._codes(len(image))).float())
        check_finite_losses(self, {"loss_generator": loss_g})
        self.backward_step(loss_g, self.generator_optimizer)
        set_requires_grad([net.critic], True)
        for _ in range(self.n_critic):
            with torch.no_grad(), self.autocast():
                fake = net.generator(self._codes(len(image))).float()
            self.critic_optimizer.zero_grad(set_to_none=True)
            with self.autocast():
                losses = critic_loss(net.critic, image, fake, self.gp_weight, self.generator)
            check_finite_losses(self, {"loss_critic": losses["loss"]})
            self.backward_step(losses["loss"], self.critic_optimizer)
        return {
            "phase": "wgan",
            "loss": float(losses["loss"].detach()),
            "loss_generator": float(loss_g.detach()),
            "wasserstein": float(losses["wasserstein"]),
            "gradient_penalty": float(losses["gradient_penalty"]),
        }

    def encoder_step(self, image: Tensor) -> dict[str, Any]:
        """One izi_f encoder step on ``image`` (B, 1, s, s); G and D frozen (no gradients, eval mode)."""
        net = self.network
        net.encoder.train()
        net.generator.eval()
        net.critic.eval()
        set_requires_grad([net.generator, net.critic], False)
        self.encoder_optimizer.zero_grad(set_to_none=True)
        with self.autocast():
            losses = izif_loss(net, image, self.kappa)
        check_finite_losses(self, {"loss_encoder": losses["loss"]})
        self.backward_step(losses["loss"], self.encoder_optimizer)
        return {"phase": "encoder", "loss": float(losses["loss"].detach()), "image": float(losses["image"]), "features": float(losses["features"])}
