"""Ignite/MONAI trainer for the VE-JP score model: DSM steps (EDM-weighted) with warm-up, clipping and EMA."""

from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

import torch
from monai.utils import CommonKeys, convert_to_tensor
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LinearLR, LRScheduler
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from tsgm_components.engines.fault_tolerance import check_finite_losses
from tsgm_components.engines.trainer import MixedPrecisionTrainer
from tsgm_components.losses.score_matching import dsm_loss
from tsgm_components.diffusion.sde import VESDE

IMAGE_KEY = "image"
CONDITION_KEY = "condition"


def linear_warmup(optimizer: Optimizer, warmup_steps: int) -> LinearLR:
    """Learning rate ramped linearly from lr/warmup_steps (first step) to lr at step warmup_steps, then constant."""
    if warmup_steps < 1:
        raise ValueError(f"warmup_steps must be >= 1, got {warmup_steps}")
    return LinearLR(optimizer, start_factor=1.0 / warmup_steps, end_factor=1.0, total_iters=max(warmup_steps - 1, 1))


class RNGState:
    """Checkpointable random state of a training run: the DSM generator (t and z draws) and torch's global CPU RNG
    (data shuffling, augmentation). Has ``state_dict``/``load_state_dict`` for ignite/MONAI checkpoint handlers."""

    def __init__(self, generator: torch.Generator):
        self.generator = generator

    def state_dict(self) -> dict[str, Tensor]:
        return {"dsm_generator": self.generator.get_state(), "torch_cpu": torch.get_rng_state()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.generator.set_state(state["dsm_generator"].cpu())
        torch.set_rng_state(state["torch_cpu"].cpu())


def prepare_pair_batch(batchdata: dict, device: torch.device, non_blocking: bool = False, **kwargs: Any):
    """``(image, condition)`` plain float32 tensors on ``device`` from a pseudo-pair batch dict (MetaTensors lose
    their metadata); condition is None when the batch has none."""
    if IMAGE_KEY not in batchdata:
        raise KeyError(f"training batch needs key '{IMAGE_KEY}', got keys {sorted(batchdata)}")

    def to_device(value: Any) -> Tensor:
        tensor = convert_to_tensor(value, dtype=torch.float32, track_meta=False)
        return tensor.to(device, non_blocking=non_blocking, **kwargs)

    condition = batchdata.get(CONDITION_KEY)
    return to_device(batchdata[IMAGE_KEY]), None if condition is None else to_device(condition)


class ScoreMatchingTrainer(MixedPrecisionTrainer):
    """Trains a ``ScoreUNet`` by denoising score matching (``dsm_loss``) on pseudo-pairs.

    One iteration: t ~ U(eps, 1), z ~ N(0, I) from the trainer's seeded generator; loss on the batch (weighted per σ
    by ``loss_weight``);
    backward; gradient-norm clip; optimiser step; ``lr_scheduler`` step (per iteration, e.g. ``linear_warmup``);
    EMA update ``ema = decay·ema + (1 − decay)·weights``. ``state.output = {"loss": detached scalar}``. A NaN/Inf
    loss raises ``NonFiniteLossError`` (iteration named) before it updates the weights or the EMA.

    The EMA weights (``ema_network``, an ``AveragedModel``; its ``.module`` is a plain ``ScoreUNet``) are the ones
    to sample with; the authors keep an EMA but sample with the raw weights. ``checkpoint_objects`` lists
    everything a resume needs.

    Args:
        device: training device.
        max_epochs: epochs to run.
        train_data_loader: yields dicts with ``image`` (x_A, (B, 1, H, W) in [0, 1]) and, for a conditional
            network, ``condition`` (x_B~, same shape); an unconditional network (``condition_channels = 0``)
            ignores ``condition``.
        network: the ``ScoreUNet`` to train (on ``device``).
        optimizer: e.g. Adam(lr=2e-4) over ``network.parameters()``.
        sde: the ``VESDE``.
        lr_scheduler: stepped every iteration, or None.
        grad_clip_norm: max global gradient norm (None: no clipping).
        ema_decay: EMA decay per iteration.
        seed: seed of the DSM generator.
        loss_weight: w(σ) of :func:`~tsgm_components.losses.score_matching.dsm_loss`, stated by the caller
            (``ScoreUNet.loss_weight``: EDM's λ(σ), what the configs pass); None: w = 1, score-SDE's σ²-weighted loss.
        epoch_length, non_blocking, train_handlers: as in ``monai.engines.SupervisedTrainer``.
        loss: ``dsm_loss`` (default) or ``regression_loss`` (the regression control), same signature.
        amp: mixed precision as everywhere in tsgm (:mod:`tsgm_components.diffusion.precision`): float16 autocast with a
            ``GradScaler`` on CUDA, bfloat16 autocast on the CPU.
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
        grad_clip_norm: float | None = 1.0,
        ema_decay: float = 0.999,
        seed: int = 0,
        loss_weight: Callable[[Tensor], Tensor] | None = None,
        epoch_length: int | None = None,
        non_blocking: bool = False,
        train_handlers: Sequence | None = None,
        amp: bool = False,
        prepare_batch: Callable = prepare_pair_batch,
        loss: Callable[..., Tensor] = dsm_loss,
    ):
        super().__init__(device, max_epochs, train_data_loader, epoch_length, non_blocking, prepare_batch, train_handlers, amp)
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}")
        self.network = network
        self.optimizer = optimizer
        self.sde = sde
        self.lr_scheduler = lr_scheduler
        self.grad_clip_norm = grad_clip_norm
        score_net = getattr(network, "module", network)  # unwrapped from DistributedDataParallel
        self.conditional = getattr(score_net, "condition_channels", 1) > 0
        self.loss_weight = loss_weight
        self.loss = loss
        self.ema_network = AveragedModel(network, multi_avg_fn=get_ema_multi_avg_fn(ema_decay), use_buffers=True)
        self.ema_network.update_parameters(network)  # the first update copies: the EMA starts at the initial weights
        self.generator = torch.Generator(device=self.state.device).manual_seed(int(seed))
        self.rng_state = RNGState(self.generator)

    @property
    def checkpoint_objects(self) -> dict[str, Any]:
        """Objects for ``CheckpointSaver``/``CheckpointLoader``: ``network``, ``network_ema`` (a ``ScoreUNet``, load
        it into the inference network), ``optimizer``, ``lr_scheduler`` (if any), ``trainer`` (iteration, epoch)
        and ``rng``."""
        objects = {
            "network": self.network,
            "network_ema": self.ema_network.module,
            "optimizer": self.optimizer,
            "trainer": self,
            "rng": self.rng_state,
        }
        if self.lr_scheduler is not None:
            objects["lr_scheduler"] = self.lr_scheduler
        if self.loss_scaler is not None:
            objects["scaler"] = self.loss_scaler
        return objects

    def _iteration(self, engine: ScoreMatchingTrainer, batchdata: dict) -> dict[str, Tensor]:
        image, condition = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)
        if engine.conditional and condition is None:
            raise KeyError(f"a conditional score network needs '{CONDITION_KEY}' in every training batch")
        if not engine.conditional:
            condition = None
        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=True)
        with engine.autocast():
            loss = engine.loss(engine.network, image, condition, engine.sde, engine.generator, engine.loss_weight)
        check_finite_losses(engine, {CommonKeys.LOSS: loss})
        engine.backward_step(loss, engine.optimizer, engine._clip_gradients)
        engine.update_loss_scale()
        if engine.lr_scheduler is not None:
            engine.lr_scheduler.step()
        engine.ema_network.update_parameters(engine.network)
        return {CommonKeys.LOSS: loss.detach()}

    def _clip_gradients(self) -> None:
        if self.grad_clip_norm is not None:
            nn.utils.clip_grad_norm_(self.network.parameters(), self.grad_clip_norm)
