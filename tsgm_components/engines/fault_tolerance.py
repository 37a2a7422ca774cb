"""What keeps multi-day training runs safe: atomic checkpoints, no final model from a failed run, and a clear stop
on a non-finite loss.

MONAI's ``CheckpointSaver`` (1.6) writes with ignite's ``DiskSaver(atomic=False)`` straight to the final path, lets
ignite delete the previous checkpoint *before* writing the next one, and writes its "final" checkpoint also when
training raises. A kill during a save could therefore leave a truncated newest checkpoint (or none at all with
``n_saved=1``), and a diverged or crashed run would leave a ``model.pt`` that the later stages take for a finished
model. :class:`TrainingCheckpointSaver` fixes all three; it is built on ignite's public ``Checkpoint`` and
``DiskSaver`` and keeps MONAI's argument names and file names (``checkpoint_epoch=N.pt``, ``final_filename``).
"""

from __future__ import annotations

import logging
import math
from typing import Any, Mapping

import torch
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint, DiskSaver

__all__ = ["NonFiniteLossError", "check_finite_losses", "TrainingCheckpointSaver"]


class NonFiniteLossError(FloatingPointError):
    """A training loss became NaN or ±Inf; raised before that loss updates any weights."""


def check_finite_losses(engine: Engine, losses: Mapping[str, Any]) -> None:
    """Raise :class:`NonFiniteLossError` naming the iteration, epoch and every non-finite loss in ``losses``.

    Call it inside the iteration before ``backward``/``step``: the weights in memory and every checkpoint written
    so far stay those of the last good step.
    """
    values = {name: float(value.detach() if isinstance(value, torch.Tensor) else value) for name, value in losses.items()}
    bad = [f"{name} = {value}" for name, value in values.items() if not math.isfinite(value)]
    if bad:
        raise NonFiniteLossError(
            f"training stopped at iteration {engine.state.iteration} (epoch {engine.state.epoch}): non-finite loss "
            f"{', '.join(bad)}. The weights were not updated with it; the checkpoints on disk are from before this "
            "iteration and no final model was written. Check the training data for NaN/Inf, or lower the learning "
            "rate, then resume from the last checkpoint."
        )


class _SafeDiskSaver(DiskSaver):
    """``DiskSaver(atomic=True)``: writes to a temporary file in the target folder, then ``os.replace``; removes an
    outdated checkpoint only after the next one is in place; optionally always writes to one fixed file name."""

    def __init__(self, dirname: str, filename: str | None = None):
        super().__init__(dirname=dirname, atomic=True, require_empty=False)
        self.filename = filename
        self._outdated: list[str] = []

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
        filename = self.filename or filename
        super().__call__(checkpoint, filename, metadata)
        for name in self._outdated:
            if name != filename:
                super().remove(name)
        self._outdated.clear()

    def remove(self, filename: str) -> None:
        # ignite calls this just before saving the next checkpoint: defer it until that one is complete
        self._outdated.append(self.filename or filename)


class TrainingCheckpointSaver:
    """A training-checkpoint handler with MONAI ``CheckpointSaver``'s arguments and file names whose files are written
    atomically, whose outdated checkpoints are removed only once their successor is complete, and whose final
    checkpoint (``save_final``) is written only when training completes: an exception (a non-finite loss, a crash)
    leaves the regular checkpoints as they were and writes nothing.

    Args:
        save_dir: folder of the checkpoint files.
        save_dict: name -> object with ``state_dict`` (what a resume loads with MONAI's ``CheckpointLoader``).
        save_interval: every that many epochs (``epoch_level``) or iterations, ``checkpoint_epoch=N.pt`` /
            ``checkpoint_iteration=N.pt``; 0: none.
        n_saved: how many interval checkpoints to keep (None: all).
        epoch_level: interval in epochs (True) or iterations.
        save_final: write ``final_filename`` when training completes.
        final_filename: the final checkpoint's file name (default ignite's ``checkpoint_final_iteration=N.pt``).
        name: logger name (None: the engine's logger).
    """

    def __init__(
        self,
        save_dir: str,
        save_dict: Mapping[str, Any],
        save_interval: int = 0,
        n_saved: int | None = None,
        epoch_level: bool = True,
        save_final: bool = False,
        final_filename: str | None = None,
        name: str | None = None,
    ):
        if not save_dict:
            raise ValueError("save_dict must name at least one object to save")
        self.save_dir = save_dir
        self.epoch_level = epoch_level
        self.save_interval = save_interval
        self.logger = logging.getLogger(name)
        self._name = name
        self.interval_checkpoint = (
            None
            if save_interval <= 0
            else Checkpoint(
                dict(save_dict),
                _SafeDiskSaver(save_dir),
                score_function=lambda engine: engine.state.epoch if epoch_level else engine.state.iteration,
                score_name="epoch" if epoch_level else "iteration",
                n_saved=n_saved,
            )
        )
        self.final_checkpoint = (
            None
            if not save_final
            else Checkpoint(
                dict(save_dict),
                _SafeDiskSaver(save_dir, final_filename),
                score_function=lambda engine: engine.state.iteration,
                score_name="final_iteration",
            )
        )

    def attach(self, engine: Engine) -> None:
        if self._name is None:
            self.logger = engine.logger
        if self.interval_checkpoint is not None:
            event = Events.EPOCH_COMPLETED if self.epoch_level else Events.ITERATION_COMPLETED
            engine.add_event_handler(event(every=self.save_interval), self.interval_completed)
        if self.final_checkpoint is not None:
            engine.add_event_handler(Events.COMPLETED, self.completed)
            engine.add_event_handler(Events.EXCEPTION_RAISED, self.exception_raised)

    def interval_completed(self, engine: Engine) -> None:
        self.interval_checkpoint(engine)
        self.logger.info(f"Saved checkpoint {self.interval_checkpoint.last_checkpoint}")

    def completed(self, engine: Engine) -> None:
        self.final_checkpoint(engine)
        self.logger.info(f"Train completed, saved final checkpoint: {self.final_checkpoint.last_checkpoint}")

    def exception_raised(self, engine: Engine, e: Exception) -> None:
        last = None if self.interval_checkpoint is None else self.interval_checkpoint.last_checkpoint
        self.logger.error(
            f"Training failed: no final checkpoint written to {self.save_dir}" + (f"; last regular checkpoint of this run: {last}" if last else "")
        )
        raise e
