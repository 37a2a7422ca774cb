"""Weighted residual ensemble, binary masks (fixed threshold or per-slice Otsu + CC) and their calibration.

Anomaly score of a voxel = Σ_m w_m · |x_m − healthy_m| with Σ w_m = 1 (paper eq. 9). Two binarisation modes:

- ``"fixed"``: one global threshold ``t`` (mask = score > t inside the brain), chosen on the validation split;
- ``"otsu"``: the authors' rule: Otsu's threshold per axial slice (over that slice's brain pixels), then only the
  8-connected components larger than 400 mm² are kept (400 px of the authors' 1 mm, 256² padded slices).

Calibration (:func:`search_weights`, :func:`select_threshold`) runs on the validation split only: one weight vector
on a simplex grid maximises the validation objective (the paper averaged per-subject optima found on training data).
Tumour-free validation volumes pay for their false positives: a threshold is admissible only when the mean fraction
of their brain voxels it flags is at most ``healthy_fpr_limit`` (:func:`healthy_fpr_curve`; None: no constraint).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
from scipy import ndimage

from tsgm_components.data.brats import MODALITIES

#: The paper's final ensemble weights (grid search on their training data), Σ = 1.
PAPER_WEIGHTS: dict[str, float] = {"t1": 0.07, "t1ce": 0.19, "t2": 0.30, "flair": 0.44}
#: Authors' Otsu mode: keep 8-connected components larger than this many pixels at 1 mm in-plane (256² padded slices).
OTSU_MIN_COMPONENT_MM2 = 400.0
WEIGHT_SUM_ATOL = 1e-6
#: Weight-search objectives (see :func:`search_weights`).
OBJECTIVES = ("dice", "auprc")
#: Binarisation modes (module doc): the one definition every reader of a calibration or mask setting checks against.
MASK_MODES = ("fixed", "otsu")


def check_weights(weights: Mapping[str, float], source: str = "weights") -> dict[str, float]:
    """Return ``weights`` as a plain dict after checking it names exactly the four modalities, w ≥ 0 and Σ w = 1.

    Raises ValueError naming ``source`` (e.g. the calibration file) and the problem.
    """
    names = set(weights)
    if names != set(MODALITIES):
        raise ValueError(f"{source}: ensemble weights must name exactly the modalities {list(MODALITIES)}, got {sorted(names)}")
    values = {m: float(weights[m]) for m in MODALITIES}
    if any(not math.isfinite(w) or w < 0 for w in values.values()):
        raise ValueError(f"{source}: ensemble weights must be finite and non-negative, got {values}")
    total = sum(values.values())
    if abs(total - 1.0) > WEIGHT_SUM_ATOL:
        raise ValueError(f"{source}: ensemble weights must sum to 1, got {total:.6g} ({values})")
    return values


def weighted_anomaly(maps: Mapping[str, np.ndarray] | np.ndarray, weights: Mapping[str, float] | np.ndarray) -> np.ndarray:
    """Σ_m w_m · maps_m, float32: the one weighted sum of per-modality anomaly (detection, the MONAI Label transforms,
    the evaluation and the calibration search).

    maps: modality -> array (any equal shape; a modality with weight 0 may be absent: detection skips reconstructing
    it), with ``weights`` modality -> w (Σ = 1); or an (..., M) array whose last axis are the modalities, with
    ``weights`` (M,) (or modality -> w for M = 4 in ``MODALITIES`` order). One float32 matrix-vector product.
    """
    if isinstance(maps, Mapping):
        weights = check_weights(weights)
        missing = [m for m in MODALITIES if m not in maps and weights[m] > 0]
        if missing:
            raise ValueError(f"anomaly maps missing for modalities {missing}")
        used = [m for m in MODALITIES if weights[m] > 0]
        return weighted_anomaly(np.stack([np.asarray(maps[m], dtype=np.float32) for m in used], axis=-1), [weights[m] for m in used])
    vector = np.asarray([weights[m] for m in MODALITIES] if isinstance(weights, Mapping) else weights, dtype=np.float32)
    maps = np.asarray(maps, dtype=np.float32)
    if maps.shape[-1] != len(vector):
        raise ValueError(f"anomaly maps have {maps.shape[-1]} modality columns, weights {len(vector)}")
    flat = maps if maps.ndim == 2 else maps.reshape(-1, len(vector))
    return (flat @ vector).reshape(maps.shape[:-1])


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


def otsu_mask(anomaly: np.ndarray, brain_mask: np.ndarray, min_component_pixels: float, z_indices: range | None = None) -> np.ndarray:
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


def score_to_mask(
    score: np.ndarray,
    brain: np.ndarray,
    mode: str,
    threshold: float | None,
    spacing_mm: Sequence[float],
    z_indices: range | None = None,
) -> np.ndarray:
    """The one path from an ensemble score to a mask (detection, the MONAI Label transforms and evaluation use it).

    score, brain: (H, W, D); ``mode`` "fixed" (``score > threshold`` in the brain) or "otsu" (per slice of
    ``z_indices``, all when None; components smaller than 400 mm² at the in-plane ``spacing_mm[:2]`` dropped).
    Returns uint8 (H, W, D) in {0, 1}.
    """
    if mode == "fixed":
        if threshold is None:
            raise ValueError('mask mode "fixed" needs a threshold')
        return fixed_mask(score, float(threshold), brain)
    if mode == "otsu":
        return otsu_mask(score, brain, min_component_pixels(spacing_mm[:2]), z_indices)
    raise ValueError(f"mask mode must be one of {MASK_MODES}, got {mode!r}")


def min_component_pixels(pixel_spacing_mm: Sequence[float]) -> float:
    """Otsu-mode minimum component size in pixels for in-plane spacing (sx, sy) mm: 400 mm² / (sx · sy)."""
    area = float(pixel_spacing_mm[0]) * float(pixel_spacing_mm[1])
    if not area > 0:
        raise ValueError(f"pixel spacing must be positive, got {tuple(pixel_spacing_mm)}")
    return OTSU_MIN_COMPONENT_MM2 / area


def simplex_grid(n_modalities: int, step: float) -> np.ndarray:
    """All weight vectors whose entries are multiples of ``step`` and sum to 1.

    Returns (K, n_modalities) float64, K = C(1/step + n − 1, n − 1): 1771 for 4 modalities at step 0.05.
    """
    n_steps = round(1.0 / step)
    if n_steps < 1 or abs(n_steps * step - 1.0) > 1e-9:
        raise ValueError(f"weight step must divide 1 exactly, got {step}")

    def compositions(total: int, parts: int) -> list[list[int]]:
        if parts == 1:
            return [[total]]
        return [[first] + rest for first in range(total, -1, -1) for rest in compositions(total - first, parts - 1)]

    return np.asarray(compositions(n_steps, n_modalities), dtype=np.float64) / n_steps


@dataclass
class BrainVoxels:
    """One volume's brain voxels (inside the evaluated z range) as the calibration sees them.

    maps: (N, M) float32 per-modality anomaly values; target: (N,) bool ground-truth tumour.
    """

    maps: np.ndarray
    target: np.ndarray


@dataclass
class _Pooled:
    """Volumes concatenated for vectorised counting on a grid of ``n_bins`` thresholds.

    maps_t: (M, N) float32 (modality-major: the weighted sum is one fast vector-matrix product);
    offset: (N,) int64 = volume index · (n_bins + 1); tumour: indices of tumour voxels; n_tumour, n_voxels: (V,)
    tumour and brain voxels per volume.
    """

    maps_t: np.ndarray
    offset: np.ndarray
    tumour: np.ndarray
    n_tumour: np.ndarray
    n_voxels: np.ndarray
    n_bins: int

    @classmethod
    def of(cls, volumes: Sequence[BrainVoxels], n_bins: int) -> "_Pooled":
        maps_t = np.ascontiguousarray(np.concatenate([v.maps for v in volumes]).T, dtype=np.float32)
        offset = np.concatenate([np.full(len(v.target), i * (n_bins + 1), dtype=np.int64) for i, v in enumerate(volumes)])
        target = np.concatenate([v.target for v in volumes]).astype(bool, copy=False)
        n_tumour = np.asarray([float(v.target.sum()) for v in volumes])
        n_voxels = np.asarray([float(len(v.target)) for v in volumes])
        return cls(maps_t, offset, np.flatnonzero(target), n_tumour, n_voxels, n_bins)


def _binned_counts(pooled: _Pooled, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-volume counts of the weighted score above each threshold t_j = j · max / n_bins, j = 0..n_bins−1.

    Returns (thresholds (n_bins,), true_pos (V, n_bins), predicted (V, n_bins)): tumour voxels and all voxels with
    score > t_j, per volume (``score > t_j`` ⇔ ceil(score / max · n_bins) ≥ j + 1, counted by one bincount).
    """
    n_bins, n_volumes = pooled.n_bins, len(pooled.n_tumour)
    score = weighted_anomaly(pooled.maps_t.T, weights)
    top = float(score.max()) if score.size else 0.0
    scale = n_bins / top if top > 0 else 0.0
    score *= scale
    np.ceil(score, out=score)
    np.minimum(score, n_bins, out=score)
    key = score.astype(np.int64)  # level 0..n_bins
    key += pooled.offset
    shape = (n_volumes, n_bins + 1)
    at_level_all = np.bincount(key, minlength=n_volumes * (n_bins + 1)).reshape(shape)
    at_level_tumour = np.bincount(key[pooled.tumour], minlength=n_volumes * (n_bins + 1)).reshape(shape)
    predicted = np.cumsum(at_level_all[:, ::-1], axis=1)[:, ::-1][:, 1:]  # Σ_{level ≥ j+1}
    true_pos = np.cumsum(at_level_tumour[:, ::-1], axis=1)[:, ::-1][:, 1:]
    thresholds = np.arange(n_bins) / scale if scale else np.zeros(n_bins)
    return thresholds, true_pos.astype(np.float64), predicted.astype(np.float64)


def _objective_curves(true_pos: np.ndarray, predicted: np.ndarray, n_tumour: np.ndarray) -> tuple[np.ndarray, float]:
    """Mean per-volume Dice at every grid threshold, and the pooled average precision of the binned score.

    true_pos, predicted: (V, n_bins) counts above each threshold; n_tumour: (V,) tumour voxels per volume.
    Volumes without tumour have no Dice and are left out of the mean (their false positives still count in AP).
    """
    has_tumour = n_tumour > 0
    if not has_tumour.any():
        return np.zeros(true_pos.shape[1]), 0.0
    dice = 2 * true_pos[has_tumour] / (predicted[has_tumour] + n_tumour[has_tumour, None])
    pooled_tp, pooled_predicted = true_pos.sum(axis=0), predicted.sum(axis=0)
    precision = pooled_tp / np.maximum(pooled_predicted, 1)
    recall = pooled_tp / n_tumour.sum()
    recall_gain = recall - np.append(recall[1:], 0.0)  # thresholds ascend with j, recall descends
    return dice.mean(axis=0), float((recall_gain * precision).sum())


def healthy_fpr_curve(predicted: np.ndarray, n_tumour: np.ndarray, n_voxels: np.ndarray) -> np.ndarray | None:
    """Mean fraction of brain voxels flagged in the tumour-free volumes at every grid threshold, shape (n_bins,).

    predicted: (V, n_bins) voxels above each threshold; n_tumour, n_voxels: (V,). None when every volume has tumour.
    """
    healthy = n_tumour == 0
    if not healthy.any():
        return None
    return (predicted[healthy] / n_voxels[healthy, None]).mean(axis=0)


def _admissible(predicted: np.ndarray, pooled: _Pooled, healthy_fpr_limit: float | None) -> np.ndarray:
    """(n_bins,) bool: thresholds whose healthy-volume false-positive fraction is within the limit (all without one;
    the highest threshold when none is: it flags the fewest voxels)."""
    fpr = None if healthy_fpr_limit is None else healthy_fpr_curve(predicted, pooled.n_tumour, pooled.n_voxels)
    if fpr is None:
        return np.ones(predicted.shape[1], dtype=bool)
    admissible = fpr <= healthy_fpr_limit
    admissible[-1] |= not admissible.any()
    return admissible


def select_threshold(
    volumes: Sequence[BrainVoxels], weights: np.ndarray, n_bins: int = 10000, healthy_fpr_limit: float | None = None
) -> tuple[float, float]:
    """Threshold maximising the mean per-volume Dice over ``volumes`` for the weighted score (mask = score > t).

    Args:
        volumes: validation volumes (brain voxels in the evaluated z range).
        weights: (M,) ensemble weights.
        n_bins: thresholds searched, evenly spaced on [0, max score).
        healthy_fpr_limit: only thresholds that flag at most this mean fraction of the tumour-free volumes' brain
            voxels are admissible (the highest when none is); None: all are.
    Returns:
        (threshold, mean Dice at that threshold).
    """
    pooled = _Pooled.of(volumes, n_bins)
    thresholds, true_pos, predicted = _binned_counts(pooled, weights)
    mean_dice, _ = _objective_curves(true_pos, predicted, pooled.n_tumour)
    mean_dice = np.where(_admissible(predicted, pooled, healthy_fpr_limit), mean_dice, -np.inf)
    # middle of the first run of grid thresholds that reach the maximum: a clean gap between the classes is
    # split in the middle instead of being hugged at its lower end
    at_best = mean_dice >= mean_dice.max() - 1e-12
    first = int(np.argmax(at_best))
    run_length = int(np.argmin(at_best[first:])) if not at_best[first:].all() else len(at_best) - first
    best = first + (run_length - 1) // 2
    return float(thresholds[best]), float(mean_dice[best])


def subsample(volumes: Sequence[BrainVoxels], max_voxels: int, seed: int = 0) -> list[BrainVoxels]:
    """The same random fraction of every volume's voxels so that at most ``max_voxels`` remain in total."""
    total = sum(len(v.target) for v in volumes)
    if total <= max_voxels:
        return list(volumes)
    fraction = max_voxels / total
    rng = np.random.default_rng(seed)
    kept = []
    for volume in volumes:
        keep = rng.random(len(volume.target)) < fraction
        kept.append(BrainVoxels(volume.maps[keep], volume.target[keep]))
    return kept


@dataclass
class WeightSearch:
    """Result of :func:`search_weights`: the best weights, their objective value, and every grid point's value."""

    weights: np.ndarray
    objective_value: float
    grid: np.ndarray
    values: np.ndarray


def search_weights(
    volumes: Sequence[BrainVoxels],
    step: float = 0.05,
    objective: str = "dice",
    n_bins: int = 1000,
    max_voxels: int = 1_000_000,
    seed: int = 0,
    modality_tolerance: float = 0.0,
    healthy_fpr_limit: float | None = None,
) -> WeightSearch:
    """Grid search of the ensemble weights on the simplex.

    Objective ``"dice"``: mean per-volume Dice at the best threshold of a grid of ``n_bins`` thresholds (the
    threshold is then re-selected on all voxels by :func:`select_threshold`). Objective ``"auprc"``: average
    precision of the weighted score pooled over all voxels, with scores binned to ``n_bins`` levels. Both are
    computed on a random subsample of at most ``max_voxels`` voxels (same fraction per volume); ties between grid
    points go to the first in grid order. ``modality_tolerance`` > 0 trades objective for speed: among the grid points
    within that much of the best value, the best of those that weigh the fewest modalities (each weighted modality
    costs a detection one full sampling pass; the others are not reconstructed). ``healthy_fpr_limit``: the Dice
    objective's best threshold is taken among the admissible ones (see :func:`select_threshold`); average precision
    already counts the tumour-free volumes' voxels as false positives.

    Args:
        volumes: validation volumes; every ``maps`` has the same number M of modality columns.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    if not volumes:
        raise ValueError("no validation volumes to search the ensemble weights on")
    pooled = _Pooled.of(subsample(volumes, max_voxels, seed), n_bins)
    grid = simplex_grid(pooled.maps_t.shape[0], step)
    values = np.empty(len(grid))
    for index, weights in enumerate(grid):
        _, true_pos, predicted = _binned_counts(pooled, weights)
        mean_dice, average_precision = _objective_curves(true_pos, predicted, pooled.n_tumour)
        if objective == "dice":
            values[index] = mean_dice[_admissible(predicted, pooled, healthy_fpr_limit)].max()
        else:
            values[index] = average_precision
    best = int(np.argmax(values))
    if modality_tolerance > 0:
        n_weighted = (grid > 0).sum(axis=1)
        near = values >= values[best] - modality_tolerance
        cheapest = np.flatnonzero(near & (n_weighted == n_weighted[near].min()))
        best = int(cheapest[np.argmax(values[cheapest])])
    return WeightSearch(grid[best], float(values[best]), grid, values)
