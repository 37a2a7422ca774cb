"""Ending a ``torchrun`` process group for torch and for ignite (the ``finalize`` of the multi_gpu_train configs)."""

from __future__ import annotations

import ignite.distributed as idist
import torch.distributed as dist

__all__ = ["destroy_process_group"]


def destroy_process_group() -> None:
    """Destroy the default process group, and make ignite forget it.

    Ignite caches the distributed context it saw; after a bare ``dist.destroy_process_group()`` its handlers in the
    same process (MONAI's checkpoint savers, for one) still ask the destroyed group for the rank and fail with
    "Default process group has not been initialized".
    """
    if dist.is_available() and dist.is_initialized():
        # every rank reaches the end before any tears gloo down: a rank that exits while another still talks to it
        # was seen aborting ("terminate called without an active exception") on a loaded 2-core CPU
        dist.barrier()
    if idist.model_name() != "serial":
        idist.finalize()  # destroys the group ignite knows and resets ignite to serial
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
