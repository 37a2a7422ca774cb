"""Ensemble weights and mask rule of a detection: reading a ``calibration.json`` and resolving explicit values.

The evaluation bundle writes ``calibration.json`` (weights and threshold chosen on the validation split); detection
(:mod:`tsgm_components.detection.detector`), the MONAI Label transforms (:mod:`tsgm_components.monai_label`) and baselines take
one :class:`MaskSettings`, whose :meth:`MaskSettings.mask` is :func:`~tsgm_components.detection.ensembling.score_to_mask`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from tsgm_components.detection.ensembling import MASK_MODES, OTSU_MIN_COMPONENT_MM2, PAPER_WEIGHTS, check_weights, score_to_mask
from tsgm_components.errors import TsgmInputError


#: the reconstruction settings a threshold depends on: a calibration records those of the validation detections it
#: was chosen on (``calibration.json`` "reconstruction"), and detection warns when it applies it to other ones
RECONSTRUCTION_KEYS = ("sampler", "n_steps", "n_draws", "snr", "n_corrector_steps", "sdedit_sigma_start", "churn")


def reconstruction_settings(provenance: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The :data:`RECONSTRUCTION_KEYS` of a detection's ``reconstruction`` provenance, or None for a method that does
    not sample (baselines, ceilings)."""
    if not provenance or "sampler" not in provenance:
        return None
    return {key: provenance.get(key) for key in RECONSTRUCTION_KEYS}


def calibration_beside(checkpoint: str | Path) -> str | None:
    """``<checkpoint stem>_calibration.json`` next to a checkpoint (how the shipped weights carry the weights and
    threshold chosen on their validation split), or None if there is none: then no mask unless one is asked for."""
    path = Path(checkpoint).with_name(Path(checkpoint).stem + "_calibration.json")
    return str(path) if path.is_file() else None


def load_calibration(path: str | Path) -> tuple[dict[str, float], float | None, str, dict[str, Any] | None]:
    """Read the evaluation bundle's ``calibration.json``: ``(weights, threshold, mode, reconstruction)``.

    ``{"weights": {mod: w}, "threshold": t, "mode": "fixed" | "otsu", "reconstruction": {sampler settings} | null,
    ...}``; ``threshold`` may be null in Otsu mode, ``reconstruction`` absent (files written before it was recorded).
    Raises TsgmInputError naming the file on any problem.
    """
    path = Path(path)
    try:
        calibration = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise TsgmInputError(path, f"cannot read calibration JSON ({type(error).__name__}: {error})") from error
    if not isinstance(calibration, dict) or "weights" not in calibration or not isinstance(calibration["weights"], dict):
        raise TsgmInputError(path, 'expected {"weights": {modality: weight}, "threshold": t, "mode": "fixed"|"otsu"}')
    mode = calibration.get("mode", "fixed")
    if mode not in MASK_MODES:
        raise TsgmInputError(path, f"mode must be one of {MASK_MODES}, got {mode!r}")
    try:
        weights = check_weights(calibration["weights"], source="weights")
    except ValueError as error:
        raise TsgmInputError(path, str(error)) from error
    threshold = calibration.get("threshold")
    if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold)):
        raise TsgmInputError(path, f"threshold must be a finite number, got {threshold!r}")
    if mode == "fixed" and threshold is None:
        raise TsgmInputError(path, 'mode "fixed" needs a numeric "threshold"')
    reconstruction = calibration.get("reconstruction")
    if reconstruction is not None and not isinstance(reconstruction, dict):
        raise TsgmInputError(path, f"reconstruction must be an object of sampler settings or null, got {reconstruction!r}")
    return weights, (None if threshold is None else float(threshold)), mode, reconstruction


@dataclasses.dataclass(frozen=True)
class MaskSettings:
    """Ensemble weights and mask rule of a detection, with where each came from (recorded in ``_detection.json``).

    weights: modality -> w (Σ = 1); mode: "fixed" (``threshold`` needed), "otsu", or None (anomaly maps only, no mask).
    calibrated_reconstruction: the sampler settings (:func:`reconstruction_settings`) of the detections a calibrated
    threshold was chosen on, or None.
    """

    weights: Mapping[str, float]
    mode: str | None = None
    threshold: float | None = None
    weights_source: str = "given"
    threshold_source: str | None = None
    calibrated_reconstruction: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "weights", check_weights(self.weights, source=f"weights ({self.weights_source})"))
        if self.mode not in (None, *MASK_MODES):
            raise ValueError(f"mask_mode must be one of {MASK_MODES} or None, got {self.mode!r}")
        if self.mode == "fixed" and self.threshold is None:
            raise ValueError('mask_mode "fixed" needs a threshold (explicit or from a calibration file)')

    def mask(self, score: np.ndarray, brain: np.ndarray, spacing_mm: Sequence[float], z_indices: range) -> np.ndarray | None:
        """uint8 (H, W, D) mask of an ensemble ``score`` by :func:`~tsgm_components.detection.ensembling.score_to_mask`, or None."""
        return None if self.mode is None else score_to_mask(score, brain, self.mode, self.threshold, spacing_mm, z_indices)

    def record(self) -> dict[str, Any]:
        """The ``weights``, ``weights_source`` and ``mask`` entries of ``_detection.json``."""
        mask = None if self.mode is None else {"mode": self.mode, "threshold": self.threshold, "threshold_source": self.threshold_source or "given"}
        return {"weights": dict(self.weights), "weights_source": self.weights_source, "mask": mask}


#: Maps without a mask, paper weights for the stored combined map: what baselines and ceilings write (the evaluation
#: bundle calibrates weights and threshold on validation)
MAPS_ONLY = MaskSettings(PAPER_WEIGHTS, weights_source="baseline default (the evaluation bundle calibrates)")


def resolve_mask_settings(
    calibration_file: str | Path | None = None,
    weights: Mapping[str, float] | None = None,
    threshold: float | None = None,
    mask_mode: str | None = None,
) -> MaskSettings:
    """Ensemble weights and mask rule from a calibration file and/or explicit values (explicit values win).

    Without calibration, threshold or Otsu mode no mask is made, and the paper's weights are used unless given.
    """
    resolved_weights, weights_source = dict(PAPER_WEIGHTS), "paper (T1 .07, T1ce .19, T2 .30, FLAIR .44)"
    threshold_source = None if threshold is None else "explicit"
    calibrated_reconstruction = None
    if calibration_file is not None:
        cal_weights, cal_threshold, cal_mode, calibrated_reconstruction = load_calibration(calibration_file)
        source = f"calibration {Path(calibration_file).resolve()}"
        resolved_weights, weights_source = cal_weights, source
        if threshold is None and mask_mode in (None, cal_mode):
            threshold, threshold_source = cal_threshold, source
        mask_mode = mask_mode or ("fixed" if threshold_source == "explicit" else cal_mode)
    if weights is not None:
        resolved_weights, weights_source = check_weights(dict(weights), source="explicit weights"), "explicit"
    if mask_mode is None and threshold is not None:
        mask_mode = "fixed"
    if mask_mode == "otsu":
        threshold, threshold_source = None, f"per-slice Otsu + components > {OTSU_MIN_COMPONENT_MM2:g} mm²"
    return MaskSettings(
        resolved_weights, mask_mode, None if threshold is None else float(threshold), weights_source, threshold_source, calibrated_reconstruction
    )
