"""What keeps multi-day training runs safe: atomic checkpoints, no final model from a failed run, and a clear stop
on a non-finite loss.

MONAI's ``CheckpointSaver`` (1.6) writes with ignite's ``DiskSaver(atomic=False)`` straight to the final path, lets
ignite delete the previous checkpoint *before* writing the next one, and writes its "final" checkpoint also when
training raises. A kill during a save could therefore leave a truncated newest checkpoint (or none at all with
``n_saved=1``), and a diverged or crashed run would leave a ``model.pt`` that the later stages take for a finished
model. :class:`TrainingCheckpointSaver` fixes all three and is otherwise MONAI's handler.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch
from ignite.engine import Engine
from ignite.handlers import DiskSaver
from monai.handlers import CheckpointSaver

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


class TrainingCheckpointSaver(CheckpointSaver):
    """MONAI ``CheckpointSaver`` (same arguments) whose files are written atomically, whose outdated checkpoints are
    removed only once their successor is complete, and whose final checkpoint (``save_final``) is written only when
    training completes: an exception (a non-finite loss, a crash) leaves the regular checkpoints as they were and
    writes nothing."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        for checkpoint in (self._final_checkpoint, self._key_metric_checkpoint, self._interval_checkpoint):
            if checkpoint is not None:
                checkpoint.save_handler = _SafeDiskSaver(self.save_dir, checkpoint.save_handler.filename)

    def exception_raised(self, engine: Engine, e: Exception) -> None:
        last = None if self._interval_checkpoint is None else self._interval_checkpoint.last_checkpoint
        if self._final_checkpoint is not None:
            self.logger.error(
                f"Training failed: no final checkpoint written to {self.save_dir}"
                + (f"; last regular checkpoint of this run: {last}" if last else "")
            )
        raise e
