"""CycleGAN training engine (MONAI/Ignite), its learning-rate schedule and its per-epoch translation snapshots.

One iteration follows the reference ``CycleGANModel.optimize_parameters``: forward both cycles, update both
generators (adversarial + cycle + identity terms, discriminators frozen), then update both discriminators on
real images and on fakes drawn from the image pools. All images are in [0, 1] (see ``networks.cyclegan``).
"""

from __future__ import annotations

from operator import itemgetter
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.distributed as dist
from ignite.engine import Engine, Events
from ignite.metrics import Average
from monai.engines.utils import default_prepare_batch
from monai.transforms import Randomizable
from PIL import Image
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from tsgm_components.engines.fault_tolerance import check_finite_losses
from tsgm_components.engines.trainer import MixedPrecisionTrainer
from tsgm_components.io import atomic_path
from tsgm_components.losses.gan import CycleGANLossWeights, ImagePool, discriminator_loss

__all__ = ["CycleGANTrainer", "LinearDecayLR", "EpochLossMeans", "TranslationSnapshots", "CycleGANRNGState"]


def _unwrap(network: nn.Module) -> nn.Module:
    return network.module if isinstance(network, DistributedDataParallel) else network


def _set_requires_grad(networks: Sequence[nn.Module], flag: bool) -> None:
    for network in networks:
        for parameter in network.parameters():
            parameter.requires_grad_(flag)


class CycleGANTrainer(MixedPrecisionTrainer):
    """Trains G_AB (A→B), G_BA (B→A), D_A (judges domain A) and D_B (judges domain B) jointly.

    Batches are ``{"A": (B, C, H, W), "B": (B, C, H, W)}`` in [0, 1] (see ``data.unpaired``).
    ``engine.state.output`` is a dict of floats: ``loss_gan_AB``, ``loss_gan_BA``, ``loss_cycle_A``,
    ``loss_cycle_B``, ``loss_idt_AB``, ``loss_idt_BA`` (when identity > 0), ``loss_G``, ``loss_D_A``, ``loss_D_B``
    and the generators' learning rate ``lr``, so StatsHandler, TensorBoardStatsHandler and :class:`~tsgm_components.engines.progress.TerminalProgressBar`
    show every term. A NaN/Inf loss raises ``NonFiniteLossError`` (iteration and loss named) before it updates
    any weights.

    Args:
        device: where the networks live and the batches go.
        max_epochs: total epochs (reference: n_epochs + n_epochs_decay).
        train_data_loader: yields the unpaired batches.
        g_ab, g_ba, d_a, d_b: the four networks (may be ``DistributedDataParallel``-wrapped).
        g_optimizer: optimises both generators (reference: one Adam over G_AB and G_BA).
        d_optimizer: optimises both discriminators.
        pool_a, pool_b: image pools of generated A and B images (fed to D_A and D_B).
        loss_weights: cycle/identity weights.
        amp: mixed precision as everywhere in tsgm (:mod:`tsgm_components.diffusion.precision`): the network passes under
            bfloat16 autocast on the CPU (1.4× faster for the demo's CPU config on a CPU with AVX512-BF16 at commit
            ce3ee16; ``benchmarks/cpu_bf16.py`` measures it), float16 with a ``GradScaler`` on CUDA; losses, image pools and weights stay
            float32.
        epoch_length, non_blocking, prepare_batch, train_handlers, optim_set_to_none, to_kwargs: as in MONAI
            ``SupervisedTrainer``.
    """

    def __init__(
        self,
        device: torch.device | str,
        max_epochs: int,
        train_data_loader: Any,
        g_ab: nn.Module,
        g_ba: nn.Module,
        d_a: nn.Module,
        d_b: nn.Module,
        g_optimizer: torch.optim.Optimizer,
        d_optimizer: torch.optim.Optimizer,
        pool_a: ImagePool,
        pool_b: ImagePool,
        loss_weights: CycleGANLossWeights | None = None,
        amp: bool = False,
        epoch_length: int | None = None,
        non_blocking: bool = False,
        prepare_batch: Callable = default_prepare_batch,
        train_handlers: Sequence | None = None,
        optim_set_to_none: bool = False,
        to_kwargs: dict | None = None,
    ):
        super().__init__(device, max_epochs, train_data_loader, epoch_length, non_blocking, prepare_batch, train_handlers, amp, to_kwargs)
        self.g_ab, self.g_ba, self.d_a, self.d_b = g_ab, g_ba, d_a, d_b
        self.g_optimizer, self.d_optimizer = g_optimizer, d_optimizer
        self.pool_a, self.pool_b = pool_a, pool_b
        self.loss_weights = CycleGANLossWeights() if loss_weights is None else loss_weights
        self.optim_set_to_none = optim_set_to_none

    def _iteration(self, engine: "CycleGANTrainer", batchdata: dict[str, torch.Tensor]) -> dict[str, float]:
        if batchdata is None:
            raise ValueError("must provide batch data for current iteration.")
        real_a = batchdata["A"].to(engine.state.device, non_blocking=engine.non_blocking, **engine.to_kwargs)
        real_b = batchdata["B"].to(engine.state.device, non_blocking=engine.non_blocking, **engine.to_kwargs)
        for network in (engine.g_ab, engine.g_ba, engine.d_a, engine.d_b):
            network.train()

        def run(network: nn.Module, images: torch.Tensor) -> torch.Tensor:
            with engine.autocast():
                return network(images).float()

        fake_b = run(engine.g_ab, real_a)
        rec_a = run(engine.g_ba, fake_b)
        fake_a = run(engine.g_ba, real_b)
        rec_b = run(engine.g_ab, fake_a)

        # generators; the discriminators are frozen and called without their DDP wrapper (no gradient sync)
        _set_requires_grad([engine.d_a, engine.d_b], False)
        engine.g_optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        with_identity = engine.loss_weights.identity > 0
        losses = engine.loss_weights.generator_losses(
            real_a=real_a,
            real_b=real_b,
            rec_a=rec_a,
            rec_b=rec_b,
            idt_a=run(engine.g_ab, real_b) if with_identity else None,
            idt_b=run(engine.g_ba, real_a) if with_identity else None,
            d_b_fake_b=run(_unwrap(engine.d_b), fake_b),
            d_a_fake_a=run(_unwrap(engine.d_a), fake_a),
            fake_b=fake_b,
        )
        check_finite_losses(engine, losses)
        engine.backward_step(losses["loss_G"], engine.g_optimizer)

        # discriminators, on real images and on pooled (detached) fakes
        _set_requires_grad([engine.d_a, engine.d_b], True)
        engine.d_optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        losses["loss_D_A"] = discriminator_loss(run(engine.d_a, real_a), run(engine.d_a, engine.pool_a.query(fake_a)))
        losses["loss_D_B"] = discriminator_loss(run(engine.d_b, real_b), run(engine.d_b, engine.pool_b.query(fake_b)))
        check_finite_losses(engine, {key: losses[key] for key in ("loss_D_A", "loss_D_B")})
        engine.backward_step(losses["loss_D_A"] + losses["loss_D_B"], engine.d_optimizer)
        engine.update_loss_scale()  # one scaler for both optimisers (PyTorch's AMP recipe)
        output = {name: float(value.detach()) for name, value in losses.items()}
        output["lr"] = float(engine.g_optimizer.param_groups[0]["lr"])
        return output


class CycleGANRNGState:
    """Checkpointable random state of a CycleGAN run, so a resumed run draws what the uninterrupted one would have:
    torch's global CPU RNG (shuffling; it also seeds DataLoader workers) and the NumPy ``RandomState`` of every MONAI
    ``Randomizable`` in ``dataset`` (``UnpairedSliceDataset``: B draws, flips). Restored at the start of a resumed
    run by ``CheckpointLoader``; the image pools checkpoint their own generators."""

    def __init__(self, dataset: Any = None):
        self.randomizables: list[Randomizable] = []
        if isinstance(dataset, Randomizable):
            self.randomizables.append(dataset)
        for domain in (getattr(dataset, "domain_a", None), getattr(dataset, "domain_b", None)):
            transforms = getattr(getattr(domain, "transform", None), "transforms", ())
            self.randomizables += [t for t in transforms if isinstance(t, Randomizable)]

    def state_dict(self) -> dict[str, Any]:
        numpy_states = []
        for randomizable in self.randomizables:
            _, keys, pos, has_gauss, cached = randomizable.R.get_state()
            numpy_states.append(
                {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)}
            )
        return {"torch_cpu": torch.get_rng_state(), "numpy": numpy_states}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if len(state["numpy"]) != len(self.randomizables):
            raise ValueError(
                f"checkpoint has {len(state['numpy'])} dataset random states, this dataset has {len(self.randomizables)} (flip setting changed?)"
            )
        torch.set_rng_state(state["torch_cpu"].cpu())
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        for randomizable, saved in zip(self.randomizables, state["numpy"]):
            keys = saved["keys"].cpu().numpy().astype(np.uint32)
            randomizable.R.set_state(("MT19937", keys, saved["pos"], saved["has_gauss"], saved["cached"]))
            if rank:  # the checkpoint holds rank 0's streams: other ranks get their own (still seeded) B draws/flips
                randomizable.R.seed([rank, *keys[:4].tolist()])


class LinearDecayLR:
    """LambdaLR factor of the reference ``linear`` policy, stepped once per epoch.

    ``factor(e) = 1 - max(0, e + 1 - n_epochs) / (n_epochs_decay + 1)`` where ``e`` is the number of completed
    epochs: epochs 1..n_epochs use the full rate, epoch ``n_epochs + k`` uses ``1 - k / (n_epochs_decay + 1)``
    (the rate would reach 0 at the epoch after the last one). A class rather than a lambda so that
    ``LambdaLR.state_dict`` checkpoints it.
    """

    def __init__(self, n_epochs: int, n_epochs_decay: int):
        if n_epochs < 0 or n_epochs_decay < 0:
            raise ValueError(f"n_epochs and n_epochs_decay must be >= 0, got {n_epochs}, {n_epochs_decay}")
        self.n_epochs, self.n_epochs_decay = n_epochs, n_epochs_decay

    def __call__(self, completed_epochs: int) -> float:
        return 1.0 - max(0, completed_epochs + 1 - self.n_epochs) / float(self.n_epochs_decay + 1)


class EpochLossMeans:
    """Epoch means of the trainer's loss terms as ``engine.state.metrics["mean_<key>"]`` (ignite ``Average``).

    Attach it before StatsHandler/TensorBoardStatsHandler so their epoch-level logs include the means.
    """

    def __init__(self, keys: Sequence[str] = ("loss_G", "loss_cycle_A", "loss_cycle_B", "loss_gan_AB", "loss_gan_BA", "loss_D_A", "loss_D_B")):
        self.keys = tuple(keys)

    def attach(self, engine: Engine) -> None:
        for key in self.keys:
            Average(output_transform=itemgetter(key)).attach(engine, f"mean_{key}")


class TranslationSnapshots:
    """After every ``interval`` epochs, translate fixed examples and save the grid as PNG (and to TensorBoard).

    Grid rows: A, G_AB(A), G_BA(G_AB(A)), B, G_BA(B), G_AB(G_BA(B)); one column per example and channel.
    Files: ``output_dir/epoch_XXXX.png`` (8-bit grey, [0, 1] -> 0..255).

    Args:
        g_ab, g_ba: the generators.
        examples: A and B examples, each (n, C, H, W) in [0, 1] (see ``data.unpaired.fixed_examples``).
        output_dir: where the PNGs go.
        summary_writer: optional TensorBoard ``SummaryWriter``; the grid is logged as ``translations``.
        interval: epochs between snapshots.
    """

    def __init__(
        self,
        g_ab: nn.Module,
        g_ba: nn.Module,
        examples: tuple[torch.Tensor, torch.Tensor],
        output_dir: str | Path,
        summary_writer: Any = None,
        interval: int = 1,
    ):
        self.g_ab, self.g_ba = g_ab, g_ba
        self.examples_a, self.examples_b = examples
        self.output_dir = Path(output_dir)
        self.summary_writer = summary_writer
        self.interval = interval

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.interval), self)

    @torch.no_grad()
    def grid(self) -> np.ndarray:
        """(6·H, n·C·W) float32 image in [0, 1]."""
        g_ab, g_ba = _unwrap(self.g_ab), _unwrap(self.g_ba)
        device = next(g_ab.parameters()).device
        modes = (g_ab.training, g_ba.training)
        g_ab.eval(), g_ba.eval()
        real_a, real_b = self.examples_a.to(device), self.examples_b.to(device)
        fake_b, fake_a = g_ab(real_a), g_ba(real_b)
        rows = [real_a, fake_b, g_ba(fake_b), real_b, fake_a, g_ab(fake_a)]
        g_ab.train(modes[0]), g_ba.train(modes[1])
        # (n, C, H, W) rows -> (H, n*C*W) each (examples side by side, channels side by side), stacked vertically
        return torch.cat([torch.cat(list(row.flatten(0, 1)), dim=1) for row in rows], dim=0).clamp(0, 1).cpu().numpy()

    def __call__(self, engine: Engine) -> None:
        image = self.grid()
        path = self.output_dir / f"epoch_{engine.state.epoch:04d}.png"
        with atomic_path(path, overwrite=True) as tmp:
            Image.fromarray(np.round(image * 255).astype(np.uint8)).save(tmp, format="PNG")
        if self.summary_writer is not None:
            self.summary_writer.add_image("translations", image[None], engine.state.epoch)
            self.summary_writer.flush()
