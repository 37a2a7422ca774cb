"""Baselines as reconstruction functions for the shared detection harness (same outputs, calibration and table as TSGM).

- CycleGAN only: healthy = G_B→A(x), the paper's strongest baseline (:class:`GeneratorReconstructor`).
- FLAIR intensity thresholding: healthy = 0, so the residual is the normalised intensity itself
  (:class:`ZeroReconstructor`); the evaluation fixes its ensemble weights to FLAIR = 1 and only picks the threshold
  on the validation split, like every other method.
- The unconditional VE score model with SDEdit partial noising needs no code here: it is the vejp_anomaly inference
  bundle merged with ``train_unconditional.yaml`` (``DiffusionSamplerInferer(sampler="sdedit", conditional=False)``).

:func:`detect_splits` writes ``detections/<method>/<split>/<id>/...`` for the validation and test splits.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from tsgm_components.data.preprocessing import PreprocessConfig
from tsgm_components.detection.detector import Detector, Reconstructor, detect_datalist
from tsgm_components.detection.masking import MAPS_ONLY, Calibration
from tsgm_components.detection.ensembling import PAPER_WEIGHTS
from tsgm_components.stage1.translation import generator_channels, translate_modalities

#: Ensemble weights of the FLAIR-thresholding baseline (fixed: no weight search).
FLAIR_ONLY: dict[str, float] = {"t1": 0.0, "t1ce": 0.0, "t2": 0.0, "flair": 1.0}


class GeneratorReconstructor:
    """CycleGAN-only healthy reconstruction: ``G_B→A`` applied to the (4·S, 1, s, s) slices in [0, 1] of all
    modalities (``MODALITIES`` order, as the detection harness passes them; one pass each). A 4-channel generator
    sees the four modalities of each axial slice together."""

    nfe_per_slice = 1

    def __init__(self, generator: nn.Module, batch_size: int = 16):
        self.generator = generator.eval()
        self.batch_size = batch_size
        self.all_modalities = generator_channels(generator) > 1  # a 4-channel generator needs the four at once

    def __call__(self, slices: Tensor) -> Tensor:
        return translate_modalities(self.generator, slices, self.batch_size)


class ZeroReconstructor:
    """FLAIR-thresholding baseline: the "healthy" image is 0, so the anomaly map is the normalised input."""

    nfe_per_slice = 0

    def __call__(self, slices: Tensor) -> Tensor:
        return torch.zeros_like(slices)


def native_resolution(preprocess: PreprocessConfig) -> PreprocessConfig:
    """``preprocess`` at image_size = pad_to: no resampling, so intensities reach the residual unchanged."""
    return dataclasses.replace(preprocess, image_size=preprocess.pad_to)


def detect_splits(
    method: str,
    reconstruct: Reconstructor,
    preprocess: PreprocessConfig,
    volumes: str | Path | Mapping[str, Any],
    detections_dir: str | Path,
    splits: Sequence[str] = ("validation", "test"),
    weights: Mapping[str, float] = PAPER_WEIGHTS,
    provenance: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    skip_existing: bool = False,
) -> list[Path]:
    """Detection maps (no mask: the evaluation calibrates) for every subject of ``splits`` of ``volumes.json``.

    Writes ``detections_dir/<method>/<split>/<id>/`` through :func:`tsgm_components.detection.detector.detect_datalist`;
    ``weights`` only shape the stored combined map and overlay. Returns the written subject folders.
    """
    detector = Detector(reconstruct, preprocess, Calibration(weights, weights_source=MAPS_ONLY.weights_source), method, provenance)
    written = []
    for split in splits:
        written += detect_datalist(volumes, split, Path(detections_dir) / method / split, detector, overwrite, skip_existing)
    return written
