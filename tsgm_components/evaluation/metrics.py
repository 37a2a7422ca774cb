"""Detection metrics per 3D volume, per tumour slice and on healthy slices (standard definitions, MONAI where it has them).

Definitions (all on one subject, restricted to the processed axial range ``z_min..z_max``):

- Dice, IoU, precision, recall: MONAI's confusion-matrix metrics (F1 score = Dice, threat score = IoU; the same
  values as ``DiceMetric``/``MeanIoU``, which the tests check, from one pass over the masks instead of three).
- HD95 (mm): MONAI ``HausdorffDistanceMetric(percentile=95)`` with the voxel spacing: boundary voxels are
  ``mask XOR binary_erosion(mask)`` (scipy's cross-shaped structuring element), Euclidean distances from each
  boundary voxel of one mask to the nearest boundary voxel of the other, and the result is the **larger of the two
  directed 95th percentiles** (linear interpolation), not the percentile of their union.
- AUPRC: average precision of the continuous anomaly score over brain voxels, AP = Σ_n (R_n − R_{n−1}) P_n over
  the distinct score values in decreasing order (scikit-learn's ``average_precision_score`` definition).

Empty-mask conventions (MONAI returns inf/NaN there and its mean would silently drop them):

- tumour present, prediction empty: Dice = IoU = precision = recall = 0, HD95 = the diagonal of the evaluated
  region in mm (slice: H·W plane; volume: H·W·(z_max − z_min + 1) box); counted in ``empty_prediction``;
- no tumour in the region: the case is not a tumour case. A volume without tumour in ``z_min..z_max`` is left out
  of the volume metrics (counted), and slices without tumour are scored only as healthy slices: "any voxel
  predicted" (false-positive slice) and the fraction of brain voxels predicted. Dice of two empty masks (= 1) is
  reported only there, as ``healthy_dice`` (1 when nothing is predicted, else 0).
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from monai.metrics import HausdorffDistanceMetric, compute_confusion_matrix_metric, get_confusion_matrix

#: Metrics of a tumour case (volume or slice), in report order.
OVERLAP_METRICS = ("dice", "iou", "precision", "recall", "hd95")


def average_precision(score: np.ndarray, target: np.ndarray) -> float:
    """Step-wise average precision of ``score`` for the binary ``target`` (same shape, any dims).

    Returns NaN when ``target`` has no positive element (AP is undefined).
    """
    score = np.asarray(score, dtype=np.float64).ravel()
    target = np.asarray(target, dtype=bool).ravel()
    n_positive = int(target.sum())
    if n_positive == 0:
        return math.nan
    order = np.argsort(-score, kind="stable")
    score, target = score[order], target[order]
    last_of_each_value = np.append(np.flatnonzero(np.diff(score)), score.size - 1)
    true_pos = np.cumsum(target)[last_of_each_value]
    precision = true_pos / (last_of_each_value + 1)
    recall = true_pos / n_positive
    return float(np.sum(np.diff(recall, prepend=0.0) * precision))


def region_diagonal_mm(shape: Sequence[int], spacing: Sequence[float]) -> float:
    """Diagonal of a box of ``shape`` voxels with ``spacing`` mm: the HD95 assigned to an empty prediction."""
    return float(np.sqrt(np.sum((np.asarray(shape, dtype=np.float64) * np.asarray(spacing, dtype=np.float64)) ** 2)))


def overlap_metrics(prediction: np.ndarray, target: np.ndarray, spacing: Sequence[float], include_hd95: bool = True) -> dict[str, np.ndarray]:
    """Dice, IoU, precision, recall and HD95 (mm) of a batch of tumour cases.

    Args:
        prediction, target: (B, *spatial) binary arrays (2D slices or 3D volumes); every target is non-empty.
        spacing: voxel size in mm per spatial axis.
        include_hd95: False skips the (slow) surface distances and leaves ``hd95`` out.
    Returns:
        metric name -> (B,) float64, plus ``empty_prediction`` (B,) bool. Empty predictions follow the module's
        convention (0 overlap, HD95 = region diagonal).
    """
    prediction = np.asarray(prediction).astype(bool)
    target = np.asarray(target).astype(bool)
    if prediction.shape != target.shape:
        raise ValueError(f"prediction shape {prediction.shape} differs from target shape {target.shape}")
    spatial_axes = tuple(range(1, target.ndim))
    if not target.any(axis=spatial_axes).all():
        raise ValueError("overlap metrics need a non-empty target in every case (score empty ones as healthy)")
    y_pred = torch.from_numpy(prediction[:, None])
    y = torch.from_numpy(target[:, None])
    empty = ~prediction.any(axis=spatial_axes)
    confusion = get_confusion_matrix(y_pred.float(), y.float(), include_background=True)
    out = {
        name: np.nan_to_num(compute_confusion_matrix_metric(monai_name, confusion)[:, 0].double().numpy(), nan=0.0)
        for name, monai_name in (("dice", "f1 score"), ("iou", "threat score"), ("precision", "precision"), ("recall", "recall"))
    }  # only precision can be 0/0 (empty prediction): 0 by convention
    if include_hd95:
        hd95 = np.full(len(target), region_diagonal_mm(target.shape[1:], spacing))
        if (~empty).any():
            # distances are translation invariant and erosion sees zeros beyond the border: cropping to the
            # union's bounding box plus one voxel leaves HD95 unchanged and makes MONAI's edge search cheap
            union = (prediction | target).any(axis=0)
            box = (slice(None), slice(None)) + tuple(slice(max(int(idx.min()) - 1, 0), int(idx.max()) + 2) for idx in np.nonzero(union))
            with warnings.catch_warnings():  # MONAI warns on empty masks; those cases are not passed to it
                warnings.simplefilter("ignore")
                metric = HausdorffDistanceMetric(include_background=True, percentile=95, reduction="none")
                distances = metric(y_pred[~empty][box].float(), y[~empty][box].float(), spacing=list(map(float, spacing)))
            hd95[~empty] = distances[:, 0].double().numpy()
        out["hd95"] = hd95
    out["empty_prediction"] = empty
    return out


def evaluate_case(
    score: np.ndarray,
    mask: np.ndarray,
    target: np.ndarray,
    brain: np.ndarray,
    spacing: Sequence[float],
    z_indices: Sequence[int],
    evaluated_slices: np.ndarray | None = None,
) -> tuple[dict[str, Any] | None, list[dict[str, Any]], list[dict[str, Any]]]:
    """Metrics of one subject over the evaluated axial range.

    Args:
        score: (H, W, Z) continuous anomaly map; mask: (H, W, Z) binary prediction; target: (H, W, Z) binary ground
            truth; brain: (H, W, Z) bool; all cropped to the evaluated slices, whose indices are ``z_indices``.
        spacing: (sx, sy, sz) mm.
        evaluated_slices: (Z,) bool, the slices scored by the slice-level metrics (default: those with brain).
    Returns:
        (volume row or None when the range holds no tumour, tumour-slice rows, healthy-slice rows). Rows are dicts:
        volume/slice rows hold ``OVERLAP_METRICS`` + ``auprc`` + ``empty_prediction`` (+ ``z`` for slices);
        healthy rows hold ``z``, ``false_positive`` (any voxel predicted), ``fp_fraction`` (predicted / brain
        voxels), ``healthy_dice``.
    """
    mask, target, brain = np.asarray(mask).astype(bool), np.asarray(target).astype(bool), np.asarray(brain).astype(bool)
    volume_row = None
    if target.any():
        volume = overlap_metrics(mask[None], target[None], spacing)
        volume_row = {name: float(volume[name][0]) for name in OVERLAP_METRICS}
        volume_row["auprc"] = average_precision(score[brain], target[brain])
        volume_row["empty_prediction"] = bool(volume["empty_prediction"][0])

    has_tumour = target.any(axis=(0, 1))
    if evaluated_slices is None:
        evaluated_slices = brain.any(axis=(0, 1))
    evaluated_slices = np.asarray(evaluated_slices, dtype=bool) & brain.any(axis=(0, 1))
    tumour_slices = np.flatnonzero(has_tumour & evaluated_slices)
    slice_rows: list[dict[str, Any]] = []
    if tumour_slices.size:
        planes = overlap_metrics(np.moveaxis(mask[:, :, tumour_slices], -1, 0), np.moveaxis(target[:, :, tumour_slices], -1, 0), spacing[:2])
        for row_index, k in enumerate(tumour_slices):
            row = {"z": int(z_indices[k])}
            row.update({name: float(planes[name][row_index]) for name in OVERLAP_METRICS})
            inside = brain[:, :, k]
            row["auprc"] = average_precision(score[:, :, k][inside], target[:, :, k][inside])
            row["empty_prediction"] = bool(planes["empty_prediction"][row_index])
            slice_rows.append(row)

    healthy_rows = []
    for k in np.flatnonzero(~has_tumour & evaluated_slices):
        predicted = int(mask[:, :, k].sum())
        healthy_rows.append(
            {
                "z": int(z_indices[k]),
                "false_positive": predicted > 0,
                "fp_fraction": predicted / int(brain[:, :, k].sum()),
                "healthy_dice": float(predicted == 0),
            }
        )
    return volume_row, slice_rows, healthy_rows


def mean_std(values: Sequence[float]) -> dict[str, float | int]:
    """``{"mean", "std", "n"}`` of the finite values (population std); NaN mean/std when there are none."""
    array = np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=np.float64)
    if array.size == 0:
        return {"mean": math.nan, "std": math.nan, "n": 0}
    return {"mean": float(array.mean()), "std": float(array.std()), "n": int(array.size)}


def paired_bootstrap(
    values: Mapping[str, float], reference: Mapping[str, float], n_resamples: int = 10_000, seed: int = 0, level: float = 0.95
) -> dict[str, float | int]:
    """Percentile bootstrap CI of the mean paired difference ``values − reference`` over their common subjects.

    values, reference: subject -> metric (non-finite entries dropped). Subjects are resampled with replacement
    ``n_resamples`` times (``numpy.random.default_rng(seed)``). Returns ``{"n", "difference", "low", "high"}``;
    NaN bounds for fewer than 2 subjects.
    """
    subjects = sorted(
        s
        for s in set(values) & set(reference)
        if values[s] is not None and reference[s] is not None and np.isfinite(values[s]) and np.isfinite(reference[s])
    )
    differences = np.asarray([values[s] - reference[s] for s in subjects], dtype=np.float64)
    if differences.size == 0:
        return {"n": 0, "difference": math.nan, "low": math.nan, "high": math.nan}
    if differences.size < 2:
        return {"n": 1, "difference": float(differences[0]), "low": math.nan, "high": math.nan}
    rng = np.random.default_rng(seed)
    means = differences[rng.integers(0, differences.size, size=(n_resamples, differences.size))].mean(axis=1)
    alpha = (1 - level) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha])
    return {"n": int(differences.size), "difference": float(differences.mean()), "low": float(low), "high": float(high)}
