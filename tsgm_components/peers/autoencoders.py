"""What the autoencoder-family peers (``vae``, ``fanogan``) share: their checkpoint spec and their Reconstructor.

Both reconstruct a slice in one network pass (the VAE: decoder(μ(x)); f-AnoGAN: G(E(x))); the anomaly map is the
project's residual |x − reconstruction| (``detection.anomaly``), like every other method's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from tsgm_components.checkpoints import SPEC_KEY, CheckpointSpec, read_checkpoint
from tsgm_components.data.preprocessing import PreprocessConfig
from tsgm_components.errors import TsgmInputError

#: the peers of this family, by method name
AUTOENCODER_PEERS = ("vae", "fanogan")


class AutoencoderSpec(CheckpointSpec):
    """A ``vae`` or ``fanogan`` checkpoint's spec: ``method`` (the peer), ``preprocess`` (PreprocessConfig dict of the
    training slices) and ``network`` (the network's keyword arguments, its ``config``)."""

    bundle = "peer_methods"

    def __init__(self, method: str, preprocess: PreprocessConfig | Mapping[str, Any], network: Mapping[str, Any]):
        if method not in AUTOENCODER_PEERS:
            raise ValueError(f"method must be one of {AUTOENCODER_PEERS}, got {method!r}")
        super().__init__({"method": method, "preprocess": preprocess, "network": dict(network)})

    def matches(self, saved: Any) -> bool:
        return isinstance(saved, Mapping) and saved.get("method") == self.spec["method"] and "network" in saved

    @property
    def preprocess(self) -> PreprocessConfig:
        return PreprocessConfig.from_dict(self.spec["preprocess"])

    @property
    def network(self) -> dict[str, Any]:
        return dict(self.spec["network"])


def read_autoencoder_spec(checkpoint: str | Path, method: str) -> AutoencoderSpec:
    """The spec stored in a ``method`` checkpoint (what detection builds its network and preprocessing from, so one
    config serves checkpoints of every scale); TsgmInputError if the file is not one."""
    saved = read_checkpoint(checkpoint).get(SPEC_KEY)
    if not isinstance(saved, Mapping) or saved.get("method") != method or "network" not in saved or "preprocess" not in saved:
        raise TsgmInputError(checkpoint, f"no '{SPEC_KEY}' entry of a {method} model: not a {method} checkpoint of the peer_methods bundle")
    return AutoencoderSpec(method, saved["preprocess"], saved["network"])


class AutoencoderReconstructor:
    """:data:`~tsgm_components.detection.detector.Reconstructor` of a network with ``reconstruct(x)``: (N, 1, s, s)
    slices in [0, 1] -> ``network.reconstruct`` in chunks of ``batch_size`` on ``device`` (eval mode: no dropout,
    batch-norm running statistics), clamped to [0, 1], float32 on the CPU. One network pass per slice."""

    nfe_per_slice = 1

    def __init__(self, network: nn.Module, batch_size: int = 64, device: str | torch.device = "cpu"):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device)
        self.network = network.to(self.device).eval()
        self.batch_size = int(batch_size)

    @torch.no_grad()
    def __call__(self, slices: Tensor) -> Tensor:
        chunks = [self.network.reconstruct(chunk.to(self.device, torch.float32)).float().cpu() for chunk in slices.split(self.batch_size)]
        return torch.cat(chunks).clamp(0.0, 1.0)
