"""Ensemble weights and mask rule of a detection: :class:`Calibration`, the one type for them.

The evaluation bundle writes a :class:`Calibration` as ``calibration.json`` (weights and threshold chosen on the
validation split) and applies it to the test split; detection (:mod:`tsgm_components.detection.detector`), the MONAI
Label transforms (:mod:`tsgm_components.monai_label`) and baselines read and apply one (:func:`resolve_mask_settings`:
a file and/or explicit values). Its :meth:`Calibration.score` is
:func:`~tsgm_components.detection.ensembling.weighted_anomaly` and its :meth:`Calibration.mask`
:func:`~tsgm_components.detection.ensembling.score_to_mask`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from tsgm_components.data.brats import MODALITIES
from tsgm_components.diffusion.inferers import SAMPLER_SETTINGS
from tsgm_components.detection.ensembling import MASK_MODES, OTSU_MIN_COMPONENT_MM2, PAPER_WEIGHTS, check_weights, score_to_mask, weighted_anomaly
from tsgm_components.errors import TsgmInputError
from tsgm_components.io import save_json


def reconstruction_settings(provenance: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The sampler settings (:data:`~tsgm_components.diffusion.inferers.SAMPLER_SETTINGS`) of a detection's
    ``reconstruction`` provenance, or None for a method that does not sample (baselines, ceilings). A threshold depends
    on them: a calibration records those of the validation detections it was chosen on (``calibration.json``
    "reconstruction"), and detection warns when it applies it to other ones."""
    if not provenance or "sampler" not in provenance:
        return None
    return {key: provenance.get(key) for key in SAMPLER_SETTINGS}


def calibration_beside(checkpoint: str | Path) -> str | None:
    """``<checkpoint stem>_calibration.json`` next to a checkpoint (how the shipped weights carry the weights and
    threshold chosen on their validation split), or None if there is none: then no mask unless one is asked for."""
    path = Path(checkpoint).with_name(Path(checkpoint).stem + "_calibration.json")
    return str(path) if path.is_file() else None


#: the threshold source of the Otsu mode (it thresholds per slice)
OTSU_SOURCE = f"per-slice Otsu + components > {OTSU_MIN_COMPONENT_MM2:g} mm²"


def _finite_or_none(value: Any) -> bool:
    return value is None or (not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value))


@dataclasses.dataclass(frozen=True)
class Calibration:
    """The ensemble weights and mask rule of a detection, with where each came from: the one calibration type.

    The evaluation bundle writes it (``calibration.json``, :meth:`save`: weights and threshold chosen on the validation
    split), detection reads it (:meth:`load`, :func:`resolve_mask_settings`: a file and/or explicit values) and
    applies it (:meth:`score`, :meth:`mask`), the MONAI Label transforms and the evaluation of the test split too.

    weights: modality -> w (Σ = 1); mode: "fixed" (``threshold`` needed), "otsu", or None (anomaly maps only, no mask).
    weights_source, threshold_source: where they came from (recorded in ``_detection.json``, not in the file).
    reconstruction: the sampler settings (:func:`reconstruction_settings`) of the detections a calibrated threshold
    was chosen on, or None. details: the file's other entries (chosen_on, objective, validation_dice, ...), written back
    unchanged by :meth:`to_json`.
    """

    weights: Mapping[str, float]
    mode: str | None = None
    threshold: float | None = None
    weights_source: str = "given"
    threshold_source: str | None = None
    reconstruction: Mapping[str, Any] | None = None
    details: Mapping[str, Any] = dataclasses.field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "weights", check_weights(self.weights, source=f"weights ({self.weights_source})"))
        if self.mode not in (None, *MASK_MODES):
            raise ValueError(f"mask_mode must be one of {MASK_MODES} or None, got {self.mode!r}")
        if self.mode == "fixed" and self.threshold is None:
            raise ValueError('mask_mode "fixed" needs a threshold (explicit or from a calibration file)')

    @property
    def weighted(self) -> list[str]:
        """The modalities with a non-zero weight, in ``MODALITIES`` order (the only ones a detection needs)."""
        return [m for m in MODALITIES if self.weights[m] > 0]

    def score(self, maps: Mapping[str, np.ndarray] | np.ndarray) -> np.ndarray:
        """The weighted anomaly Σ w_m · maps_m (:func:`~tsgm_components.detection.ensembling.weighted_anomaly`)."""
        return weighted_anomaly(maps, self.weights)

    def mask(self, score: np.ndarray, brain: np.ndarray, spacing_mm: Sequence[float], z_indices: range | None = None) -> np.ndarray | None:
        """uint8 (H, W, D) mask of an ensemble ``score`` by :func:`~tsgm_components.detection.ensembling.score_to_mask`,
        or None when there is no mask rule (``mode`` None)."""
        return None if self.mode is None else score_to_mask(score, brain, self.mode, self.threshold, spacing_mm, z_indices)

    def detection_record(self) -> dict[str, Any]:
        """The ``weights``, ``weights_source`` and ``mask`` entries of ``_detection.json``."""
        mask = None if self.mode is None else {"mode": self.mode, "threshold": self.threshold, "threshold_source": self.threshold_source or "given"}
        return {"weights": dict(self.weights), "weights_source": self.weights_source, "mask": mask}

    def to_json(self) -> dict[str, Any]:
        """The ``calibration.json`` content: ``{"weights": {mod: w}, "threshold": t | null, "mode": "fixed" | "otsu",
        ..., "reconstruction": {sampler settings} | null}``, the other entries as read or written by the harness."""
        data = dict(self.details)
        data.update(weights=dict(self.weights), threshold=self.threshold, mode=self.mode)
        if self.reconstruction is not None or "reconstruction" in data:
            data["reconstruction"] = None if self.reconstruction is None else dict(self.reconstruction)
        return data

    def save(self, path: str | Path) -> Path:
        """Write :meth:`to_json` to ``path`` atomically; return the path."""
        save_json(self.to_json(), path)
        return Path(path)

    @classmethod
    def from_json(cls, data: Any, source: str | Path = "calibration") -> "Calibration":
        """From ``calibration.json`` content (files of every version: ``mode`` absent reads as "fixed",
        ``reconstruction`` absent as None); ``threshold`` may be null in Otsu mode. Raises TsgmInputError naming
        ``source`` on any problem."""
        if not isinstance(data, Mapping) or not isinstance(data.get("weights"), Mapping):
            raise TsgmInputError(source, 'expected {"weights": {modality: weight}, "threshold": t, "mode": "fixed"|"otsu"}')
        mode, threshold, reconstruction = data.get("mode", "fixed"), data.get("threshold"), data.get("reconstruction")
        if mode not in MASK_MODES:
            raise TsgmInputError(source, f"mode must be one of {MASK_MODES}, got {mode!r}")
        if not _finite_or_none(threshold):
            raise TsgmInputError(source, f"threshold must be a finite number, got {threshold!r}")
        if mode == "fixed" and threshold is None:
            raise TsgmInputError(source, 'mode "fixed" needs a numeric "threshold"')
        if reconstruction is not None and not isinstance(reconstruction, Mapping):
            raise TsgmInputError(source, f"reconstruction must be an object of sampler settings or null, got {reconstruction!r}")
        try:
            weights = check_weights(data["weights"], source="weights")
        except ValueError as error:
            raise TsgmInputError(source, str(error)) from error
        origin = f"calibration {source}"
        threshold_origin = origin if mode == "fixed" else OTSU_SOURCE
        threshold = None if threshold is None else float(threshold)
        return cls(weights, mode, threshold, origin, threshold_origin, None if reconstruction is None else dict(reconstruction), dict(data))

    @classmethod
    def load(cls, path: str | Path) -> "Calibration":
        """Read a ``calibration.json`` (:meth:`from_json`); errors name the file."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            raise TsgmInputError(path, f"cannot read calibration JSON ({type(error).__name__}: {error})") from error
        return cls.from_json(data, path.resolve())


#: the former name of :class:`Calibration` (detection's "mask settings" are a calibration)
MaskSettings = Calibration

#: Maps without a mask, paper weights for the stored combined map: what baselines and ceilings write (the evaluation
#: bundle calibrates weights and threshold on validation)
MAPS_ONLY = Calibration(PAPER_WEIGHTS, weights_source="baseline default (the evaluation bundle calibrates)")


def resolve_mask_settings(
    calibration_file: str | Path | None = None,
    weights: Mapping[str, float] | None = None,
    threshold: float | None = None,
    mask_mode: str | None = None,
) -> Calibration:
    """The :class:`Calibration` a detection applies, from a calibration file and/or explicit values (explicit values
    win; the file's other entries are kept only when nothing overrides it).

    Without calibration, threshold or Otsu mode no mask is made, and the paper's weights are used unless given.
    """
    only_file = calibration_file is not None and weights is None and threshold is None and mask_mode is None
    resolved_weights, weights_source = dict(PAPER_WEIGHTS), "paper (T1 .07, T1ce .19, T2 .30, FLAIR .44)"
    threshold_source = None if threshold is None else "explicit"
    calibrated_reconstruction, details = None, {}
    if calibration_file is not None:
        calibration = Calibration.load(calibration_file)
        calibrated_reconstruction, details = calibration.reconstruction, (calibration.details if only_file else {})
        resolved_weights, weights_source = dict(calibration.weights), calibration.weights_source
        if threshold is None and mask_mode in (None, calibration.mode):
            threshold, threshold_source = calibration.threshold, calibration.threshold_source
        mask_mode = mask_mode or ("fixed" if threshold_source == "explicit" else calibration.mode)
    if weights is not None:
        resolved_weights, weights_source = check_weights(dict(weights), source="explicit weights"), "explicit"
    if mask_mode is None and threshold is not None:
        mask_mode = "fixed"
    if mask_mode == "otsu":
        threshold, threshold_source = None, OTSU_SOURCE
    return Calibration(
        resolved_weights,
        mask_mode,
        None if threshold is None else float(threshold),
        weights_source,
        threshold_source,
        calibrated_reconstruction,
        details,
    )
