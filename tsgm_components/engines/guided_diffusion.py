"""Trainers of the guided-diffusion peers: a class-conditional score model with label dropout (classifier-free
guidance, Sanchez et al. 2022) and a noise-aware slice classifier (classifier guidance, Wolleb et al. 2022)."""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from monai.utils import CommonKeys, convert_to_tensor
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from tsgm_components.diffusion.noise import randn
from tsgm_components.diffusion.sde import VESDE
from tsgm_components.engines.fault_tolerance import check_finite_losses
from tsgm_components.engines.score import IMAGE_KEY, RNGState, ScoreMatchingTrainer
from tsgm_components.engines.trainer import MixedPrecisionTrainer

#: the slice-level label of the prepared datalist items: 0 healthy, 1 tumour
LABEL_KEY = "tumour"


def prepare_labelled_batch(batchdata: dict, device: torch.device, non_blocking: bool = False, label_key: str = LABEL_KEY, **kwargs: Any):
    """``(image (B, 1, H, W) float32, labels (B,) int64)`` on ``device`` from a slice batch dict."""
    missing = {IMAGE_KEY, label_key} - set(batchdata)
    if missing:
        raise KeyError(f"training batch needs keys {sorted(missing)}, got keys {sorted(batchdata)}")
    image = convert_to_tensor(batchdata[IMAGE_KEY], dtype=torch.float32, track_meta=False).to(device, non_blocking=non_blocking, **kwargs)
    labels = torch.as_tensor(batchdata[label_key]).long().to(device, non_blocking=non_blocking)
    return image, labels


def drop_labels(labels: Tensor, null_class: int, rate: float, generator: torch.Generator | None = None) -> Tensor:
    """Each label replaced by ``null_class`` with probability ``rate``, independently (the unconditional-score
    training of classifier-free guidance). labels: (B,) int64; returns a new (B,) tensor."""
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"rate must be in [0, 1], got {rate}")
    gen_device = generator.device if generator is not None else labels.device
    dropped = torch.rand(labels.shape, generator=generator, device=gen_device).to(labels.device) < rate
    return torch.where(dropped, torch.full_like(labels, null_class), labels)


class ClassConditionalScoreTrainer(ScoreMatchingTrainer):
    """``ScoreMatchingTrainer`` for a class-conditional ``ScoreUNet`` (``num_classes > 0``, no condition image): the
    batch's slice labels (``label_key``) go to the network as ``class_labels``, each replaced by the null class with
    probability ``label_dropout`` (:func:`drop_labels`, from the trainer's seeded generator), so one network learns
    the class-conditional and the unconditional score. Otherwise as ``ScoreMatchingTrainer`` (DSM loss, EMA, clipping,
    warm-up, checkpoint objects).

    Args:
        label_dropout: probability of the null label per sample (Sanchez et al.'s reference: 0.35).
        label_key: batch key of the (B,) labels in 0..num_classes − 1.
        The others: as ``ScoreMatchingTrainer``.
    """

    def __init__(
        self,
        device: torch.device | str,
        max_epochs: int,
        train_data_loader: Iterable,
        network: nn.Module,
        optimizer: Optimizer,
        sde: VESDE,
        label_dropout: float = 0.35,
        label_key: str = LABEL_KEY,
        lr_scheduler: LRScheduler | None = None,
        grad_clip_norm: float | None = 1.0,
        ema_decay: float = 0.999,
        seed: int = 0,
        loss_weight: Callable[[Tensor], Tensor] | None = None,
        epoch_length: int | None = None,
        non_blocking: bool = False,
        train_handlers: Sequence | None = None,
        amp: bool = False,
    ):
        super().__init__(
            device,
            max_epochs,
            train_data_loader,
            network,
            optimizer,
            sde,
            lr_scheduler,
            grad_clip_norm,
            ema_decay,
            seed,
            loss_weight,
            epoch_length,
            non_blocking,
            train_handlers,
            amp,
            prepare_batch=functools.partial(prepare_labelled_batch, label_key=label_key),
        )
        score_net = getattr(network, "module", network)
        if getattr(score_net, "num_classes", 0) < 1 or self.conditional:
            raise ValueError("ClassConditionalScoreTrainer needs a ScoreUNet with num_classes > 0 and condition_channels = 0")
        if not 0.0 <= label_dropout <= 1.0:
            raise ValueError(f"label_dropout must be in [0, 1], got {label_dropout}")
        self.null_class = score_net.null_class
        self.label_dropout = float(label_dropout)

    def _iteration(self, engine: ClassConditionalScoreTrainer, batchdata: dict) -> dict[str, Tensor]:
        image, labels = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)
        if labels.min() < 0 or labels.max() >= engine.null_class:
            raise ValueError(f"training labels must lie in 0..{engine.null_class - 1}, got {labels.tolist()}")
        labels = drop_labels(labels, engine.null_class, engine.label_dropout, engine.generator)
        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=True)
        with engine.autocast():
            network = functools.partial(engine.network, class_labels=labels)
            loss = engine.loss(network, image, None, engine.sde, engine.generator, engine.loss_weight)
        check_finite_losses(engine, {CommonKeys.LOSS: loss})
        engine.backward_step(loss, engine.optimizer, engine._clip_gradients)
        engine.update_loss_scale()
        if engine.lr_scheduler is not None:
            engine.lr_scheduler.step()
        engine.ema_network.update_parameters(engine.network)
        return {CommonKeys.LOSS: loss.detach()}


class NoisyClassifierTrainer(MixedPrecisionTrainer):
    """Trains a ``NoisyClassifier`` on noised slices: σ = σ(t), t ~ U(eps, 1) of the VE SDE (log-uniform σ over the
    score model's range, as Wolleb et al. train on every DDPM step), x_σ = x + σz, cross-entropy against the slice
    label. ``state.output = {"loss", "accuracy"}`` (detached scalars). A NaN/Inf loss raises before the update.

    Args:
        network: the ``NoisyClassifier``; optimizer: e.g. AdamW over its parameters; sde: the σ distribution.
        lr_scheduler: stepped every iteration, or None. grad_clip_norm: max gradient norm (None: no clipping).
        seed: seed of the generator of t and z. label_key: batch key of the (B,) labels.
        device, max_epochs, train_data_loader, epoch_length, non_blocking, train_handlers, amp: as ``ScoreMatchingTrainer``.
    """

    def __init__(
        self,
        device: torch.device | str,
        max_epochs: int,
        train_data_loader: Iterable,
        network: nn.Module,
        optimizer: Optimizer,
        sde: VESDE,
        lr_scheduler: LRScheduler | None = None,
        grad_clip_norm: float | None = None,
        seed: int = 0,
        label_key: str = LABEL_KEY,
        epoch_length: int | None = None,
        non_blocking: bool = False,
        train_handlers: Sequence | None = None,
        amp: bool = False,
    ):
        prepare = functools.partial(prepare_labelled_batch, label_key=label_key)
        super().__init__(device, max_epochs, train_data_loader, epoch_length, non_blocking, prepare, train_handlers, amp)
        self.network = network
        self.optimizer = optimizer
        self.sde = sde
        self.lr_scheduler = lr_scheduler
        self.grad_clip_norm = grad_clip_norm
        self.generator = torch.Generator(device=self.state.device).manual_seed(int(seed))
        self.rng_state = RNGState(self.generator)

    @property
    def checkpoint_objects(self) -> dict[str, Any]:
        """``network``, ``optimizer``, ``lr_scheduler`` (if any), ``scaler`` (if any), ``trainer`` and ``rng``."""
        objects = {"network": self.network, "optimizer": self.optimizer, "trainer": self, "rng": self.rng_state}
        if self.lr_scheduler is not None:
            objects["lr_scheduler"] = self.lr_scheduler
        if self.loss_scaler is not None:
            objects["scaler"] = self.loss_scaler
        return objects

    def _iteration(self, engine: NoisyClassifierTrainer, batchdata: dict) -> dict[str, Tensor]:
        image, labels = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)
        sigma = engine.sde.sigma(engine.sde.sample_t(image.shape[0], engine.generator, device=image.device))
        noised = image + sigma[:, None, None, None] * randn(image.shape, engine.generator, image.device).to(image.dtype)
        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=True)
        with engine.autocast():
            logits = engine.network(noised, sigma).float()
        loss = F.cross_entropy(logits, labels)
        check_finite_losses(engine, {CommonKeys.LOSS: loss})
        engine.backward_step(loss, engine.optimizer, engine._clip_gradients)
        engine.update_loss_scale()
        if engine.lr_scheduler is not None:
            engine.lr_scheduler.step()
        accuracy = (logits.argmax(dim=1) == labels).float().mean()
        return {CommonKeys.LOSS: loss.detach(), "accuracy": accuracy.detach()}

    def _clip_gradients(self) -> None:
        if self.grad_clip_norm is not None:
            nn.utils.clip_grad_norm_(self.network.parameters(), self.grad_clip_norm)
