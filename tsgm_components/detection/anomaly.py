"""Healthy reconstruction -> anomaly maps: the residual |input − healthy| of the processed slices, mapped to the input
grid, and the weighted ensemble. The one implementation behind detection (:mod:`tsgm_components.detection.detector`) and the
MONAI Label transforms (:mod:`tsgm_components.monai_label`).
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from tsgm_components.data.preprocessing import PreprocessConfig, slices_to_volume
from tsgm_components.detection.ensembling import weighted_anomaly


def anomaly_support(brain_mask: np.ndarray, preprocess: PreprocessConfig) -> np.ndarray:
    """(H, W, D) bool: brain voxels of the processed slices ``z_min..z_max``, where anomaly maps may be non-zero."""
    support = np.zeros(brain_mask.shape, dtype=bool)
    support[:, :, preprocess.z_min : preprocess.z_max + 1] = brain_mask[:, :, preprocess.z_min : preprocess.z_max + 1]
    return support


def residual_volume(slices: np.ndarray, healthy: np.ndarray, support: np.ndarray, preprocess: PreprocessConfig) -> np.ndarray:
    """|input − healthy| of (S, s, s) slice stacks at the model's resolution, mapped to the (H, W, D) input
    geometry and zeroed outside ``support`` (identical to a voxel-wise residual when image_size == pad_to)."""
    return slices_to_volume(np.abs(slices - healthy), support.shape, preprocess) * support


def anomaly_maps(
    slices: Mapping[str, np.ndarray],
    healthy: Mapping[str, np.ndarray],
    brain_mask: np.ndarray,
    preprocess: PreprocessConfig,
    weights: Mapping[str, float],
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Per-modality anomaly maps and their weighted ensemble.

    slices, healthy: modality -> (S, s, s) processed input and its healthy reconstruction in [0, 1] (the modalities
    reconstructed; those with a non-zero weight must be among them); brain_mask: (H, W, D) bool, model orientation.
    Returns (modality -> (H, W, D) |input − healthy| in the input grid, 0 outside :func:`anomaly_support`; the (H, W, D)
    float32 Σ w_m · anomaly_m).
    """
    support = anomaly_support(brain_mask, preprocess)
    maps = {m: residual_volume(slices[m], np.clip(healthy[m], 0.0, 1.0), support, preprocess) for m in healthy}
    return maps, weighted_anomaly(maps, weights)
