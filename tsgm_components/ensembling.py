"""Weighted residual ensemble and binary masks from anomaly maps (fixed threshold or per-slice Otsu + CC).

Owned by the evaluation part (weight search and threshold selection belong here too); detection imports it.
"""

from __future__ import annotations

import math
from typing import Mapping

import numpy as np
from scipy import ndimage

from tsgm_components.data.brats import MODALITIES

#: The paper's final ensemble weights (grid search on their training data), Σ = 1.
PAPER_WEIGHTS: dict[str, float] = {"t1": 0.07, "t1ce": 0.19, "t2": 0.30, "flair": 0.44}
#: Authors' Otsu mode: keep 8-connected components larger than this many pixels at 1 mm in-plane (256² padded slices).
OTSU_MIN_COMPONENT_MM2 = 400.0
WEIGHT_SUM_ATOL = 1e-6


def check_weights(weights: Mapping[str, float], source: str = "weights") -> dict[str, float]:
    """Return ``weights`` as a plain dict after checking it names exactly the four modalities, w ≥ 0 and Σ w = 1.

    Raises ValueError naming ``source`` (e.g. the calibration file) and the problem.
    """
    names = set(weights)
    if names != set(MODALITIES):
        raise ValueError(
            f"{source}: ensemble weights must name exactly the modalities {list(MODALITIES)}, got {sorted(names)}"
        )
    values = {m: float(weights[m]) for m in MODALITIES}
    if any(not math.isfinite(w) or w < 0 for w in values.values()):
        raise ValueError(f"{source}: ensemble weights must be finite and non-negative, got {values}")
    total = sum(values.values())
    if abs(total - 1.0) > WEIGHT_SUM_ATOL:
        raise ValueError(f"{source}: ensemble weights must sum to 1, got {total:.6g} ({values})")
    return values


def weighted_anomaly(maps: Mapping[str, np.ndarray], weights: Mapping[str, float]) -> np.ndarray:
    """Σ_m w_m · maps[m] over the four modalities; maps: modality -> array (any equal shape), float32 out."""
    weights = check_weights(weights)
    missing = [m for m in MODALITIES if m not in maps]
    if missing:
        raise ValueError(f"anomaly maps missing for modalities {missing}")
    total = np.zeros(np.shape(maps[MODALITIES[0]]), dtype=np.float32)
    for modality in MODALITIES:
        total += np.float32(weights[modality]) * np.asarray(maps[modality], dtype=np.float32)
    return total


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of a 1-D sample: the histogram cut maximising the between-class variance.

    Returns the upper edge of the last bin of the lower class (values > threshold form the upper class).
    A constant sample returns its value (so nothing is above it).
    """
    values = np.asarray(values, dtype=np.float64).ravel()
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return high
    counts, edges = np.histogram(values, bins=bins, range=(low, high))
    centres = 0.5 * (edges[:-1] + edges[1:])
    weight_low = np.cumsum(counts)[:-1]
    weight_high = values.size - weight_low
    sum_low = np.cumsum(counts * centres)[:-1]
    mean_low = sum_low / np.maximum(weight_low, 1)
    mean_high = (np.sum(counts * centres) - sum_low) / np.maximum(weight_high, 1)
    between = weight_low * weight_high * (mean_low - mean_high) ** 2
    return float(edges[1 + int(np.argmax(between))])


def remove_small_components(mask: np.ndarray, min_pixels: float) -> np.ndarray:
    """Keep the 8-connected components of a 2-D bool mask with more than ``min_pixels`` pixels."""
    labels, n = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    if n == 0:
        return np.zeros(mask.shape, dtype=bool)
    sizes = np.bincount(labels.ravel())
    keep = sizes > min_pixels
    keep[0] = False
    return keep[labels]


def otsu_mask(
    anomaly: np.ndarray, brain_mask: np.ndarray, min_component_pixels: float, z_indices: range | None = None
) -> np.ndarray:
    """Authors' mode: per axial slice, Otsu's threshold of the anomaly over brain pixels, then drop small components.

    anomaly, brain_mask: (H, W, D); slices ``volume[:, :, z]`` for z in ``z_indices`` (all when None) are
    thresholded, the rest stay 0. The authors thresholded whole padded slices; restricting Otsu to brain
    pixels keeps the zero background from pulling the threshold down. Returns uint8 (H, W, D) in {0, 1}.
    """
    out = np.zeros(anomaly.shape, dtype=np.uint8)
    for z in z_indices if z_indices is not None else range(anomaly.shape[2]):
        brain = brain_mask[:, :, z]
        if not brain.any():
            continue
        plane = anomaly[:, :, z]
        above = (plane > otsu_threshold(plane[brain])) & brain
        out[:, :, z] = remove_small_components(above, min_component_pixels)
    return out


def fixed_mask(anomaly: np.ndarray, threshold: float, brain_mask: np.ndarray | None = None) -> np.ndarray:
    """uint8 mask of ``anomaly > threshold`` (inside ``brain_mask`` when given)."""
    mask = anomaly > threshold
    if brain_mask is not None:
        mask &= brain_mask
    return mask.astype(np.uint8)
