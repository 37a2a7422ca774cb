"""The base of both training engines: MONAI's ``Trainer`` with tsgm's one meaning of ``amp``."""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any, Callable, Sequence

import torch
from monai.engines import Trainer
from monai.engines.utils import default_prepare_batch

from tsgm_components.diffusion.precision import autocast, grad_scaler


class MixedPrecisionTrainer(Trainer):
    """``monai.engines.Trainer`` (outputs not decollated) whose ``amp`` is :mod:`tsgm_components.diffusion.precision`'s:
    :meth:`autocast` around the network passes, :meth:`backward_step` through a loss scaler when there is one
    (float16 on CUDA), :meth:`update_loss_scale` once per iteration. Subclasses write ``_iteration``.

    Args:
        device, max_epochs, train_data_loader, epoch_length, non_blocking, prepare_batch, train_handlers, to_kwargs:
            as in ``monai.engines.SupervisedTrainer``.
        amp: mixed precision (float16 + ``GradScaler`` on CUDA, bfloat16 on the CPU).
    """

    def __init__(
        self,
        device: torch.device | str,
        max_epochs: int,
        train_data_loader: Any,
        epoch_length: int | None = None,
        non_blocking: bool = False,
        prepare_batch: Callable = default_prepare_batch,
        train_handlers: Sequence | None = None,
        amp: bool = False,
        to_kwargs: dict | None = None,
    ):
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            data_loader=train_data_loader,
            epoch_length=epoch_length,
            non_blocking=non_blocking,
            prepare_batch=prepare_batch,
            handlers=train_handlers,
            decollate=False,
            to_kwargs=to_kwargs,
        )
        # not MONAI's `amp` attribute: its Trainer.run() would make a CUDA GradScaler of it
        self.mixed_precision = bool(amp)
        self.loss_scaler = grad_scaler(self.state.device, self.mixed_precision)

    def autocast(self) -> AbstractContextManager:
        """The autocast context of the network passes (disabled without ``amp``)."""
        return autocast(self.state.device, self.mixed_precision)

    def backward_step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer, clip: Callable[[], Any] | None = None) -> None:
        """``loss.backward()``, ``clip()`` on the unscaled gradients, ``optimizer.step()``; through the loss scaler when
        there is one (it skips the step when the scaled gradients overflowed)."""
        if self.loss_scaler is None:
            loss.backward()
        else:
            self.loss_scaler.scale(loss).backward()
            if clip is not None:
                self.loss_scaler.unscale_(optimizer)
        if clip is not None:
            clip()
        if self.loss_scaler is None:
            optimizer.step()
        else:
            self.loss_scaler.step(optimizer)

    def update_loss_scale(self) -> None:
        """Once per iteration, after every :meth:`backward_step`."""
        if self.loss_scaler is not None:
            self.loss_scaler.update()
