"""Evaluation harness: detection folders + ground truth -> calibration on validation, metrics on test.

For each method, the per-modality anomaly maps of its validation detection folder fix the ensemble weights and the
binarisation (:func:`calibrate`, written as ``calibration.json``); the same calibration is then applied, unchanged,
to its test detection folder (:func:`evaluate_cases`). Everything is scored in the input geometry, on the
processed axial range ``z_min..z_max`` of ``prepare_config.json`` (slices outside it are never reconstructed).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import nibabel as nib
import numpy as np

from tsgm_components import REPO_ROOT, git_commit
from tsgm_components.data.brats import MODALITIES, SEG, VolumeGeometry, load_subject
from tsgm_components.data.prepare import read_prepare_config, read_prepare_record, read_volumes_split
from tsgm_components.data.preprocessing import PreprocessConfig, normalize_volume
from tsgm_components.detection.ensembling import (
    MASK_MODES,
    OBJECTIVES,
    OTSU_MIN_COMPONENT_MM2,
    BrainVoxels,
    check_weights,
    search_weights,
    select_threshold,
    weighted_anomaly,
)
from tsgm_components.errors import TsgmInputError
from tsgm_components.io import atomic_dir, check_not_over_inputs
from tsgm_components.detection.masking import Calibration, reconstruction_settings
from tsgm_components.evaluation.metrics import evaluate_case, overlap_metrics
from tsgm_components.evaluation.report import write_report
from tsgm_components.evaluation.results import MethodResult

logger = logging.getLogger(__name__)


@dataclass
class Case:
    """One subject as the evaluation sees it, cropped to the evaluated axial range.

    maps: (N, M) float32 per-modality anomaly at the N brain voxels (columns follow ``MODALITIES``);
    brain, target: (H, W, Z) bool brain mask and whole-tumour ground truth; spacing: (sx, sy, sz) mm;
    z_indices: input axial index of each of the Z slices; record: the subject's ``_detection.json`` (or {}).
    """

    subject: str
    maps: np.ndarray
    brain: np.ndarray
    target: np.ndarray
    spacing: tuple[float, float, float]
    z_indices: range
    record: dict[str, Any] = field(default_factory=dict)

    def score(self, weights: Mapping[str, float]) -> np.ndarray:
        """(H, W, Z) float32 weighted anomaly Σ w_m · anomaly_m (0 outside the brain)."""
        volume = np.zeros(self.brain.shape, dtype=np.float32)
        volume[self.brain] = weighted_anomaly(self.maps, weights)
        return volume

    def voxels(self) -> BrainVoxels:
        return BrainVoxels(self.maps, self.target[self.brain])


def read_prepared(prepared_dir: str | Path) -> tuple[dict[str, Any], PreprocessConfig, float]:
    """``(volumes.json, PreprocessConfig, min_brain_fraction)`` of a prepared dataset folder."""
    path = Path(prepared_dir) / "volumes.json"
    try:
        volumes = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise TsgmInputError(path, f"cannot read ({type(error).__name__}: {error}); run `tsgm prepare` first") from error
    record = read_prepare_record(prepared_dir)
    return volumes, read_prepare_config(prepared_dir), float(record.get("min_brain_fraction", 0.01))


def _anomaly_path(detection_dir: Path, subject: str, modality: str) -> Path:
    return detection_dir / subject / f"{subject}_anomaly_{modality}.nii.gz"


@dataclass
class GroundTruth:
    """A subject's evaluation region: brain and whole-tumour masks (H, W, Z) cropped to z_min..z_max (model orientation),
    spacing (mm) and the input geometry (maps are read in the input's voxel order and reoriented with it)."""

    shape: tuple[int, int, int]
    brain: np.ndarray
    target: np.ndarray
    spacing: tuple[float, float, float]
    geometry: VolumeGeometry


def load_ground_truth(item: Mapping[str, Any], preprocess: PreprocessConfig) -> GroundTruth:
    """Brain mask (any modality non-zero) and ``seg > 0`` of a volumes.json item, validated by ``load_subject``."""
    subject = str(item["subject"])
    if not item.get(SEG):
        raise TsgmInputError(f"{subject} (volumes.json)", "no 'seg' path: evaluation needs the ground truth")
    inputs = load_subject(item, preprocess)
    z = slice(preprocess.z_min, preprocess.z_max + 1)
    geometry = inputs.geometry
    return GroundTruth(geometry.shape, inputs.brain_mask[:, :, z], inputs.seg[:, :, z] > 0, geometry.training_voxel_size, geometry)


def load_case(
    detection_dir: str | Path,
    item: Mapping[str, Any],
    preprocess: PreprocessConfig,
    truth: GroundTruth | None = None,
    modalities: Sequence[str] = MODALITIES,
) -> Case:
    """One subject: its anomaly maps from ``detection_dir/<id>/`` and its ground truth (loaded unless given).

    Only the maps of ``modalities`` are read (and must exist); the others are zero columns (modalities with weight 0
    under the calibration applied, which detection may not have reconstructed).
    """
    detection_dir, subject = Path(detection_dir), str(item["subject"])
    truth = truth or load_ground_truth(item, preprocess)
    z = slice(preprocess.z_min, preprocess.z_max + 1)
    columns = []
    for modality in MODALITIES:
        if modality not in modalities:
            columns.append(np.zeros(int(truth.brain.sum()), dtype=np.float32))
            continue
        path = _anomaly_path(detection_dir, subject, modality)
        if not path.is_file():
            raise TsgmInputError(path, f"anomaly map missing: run the detection of this method for subject {subject}")
        try:
            image = nib.load(str(path))
            if image.shape != truth.shape:
                raise TsgmInputError(path, f"shape {image.shape} differs from the subject's input shape {truth.shape}")
            array = truth.geometry.to_training(np.asarray(image.dataobj, dtype=np.float32))[:, :, z]
        except TsgmInputError:
            raise
        except Exception as error:  # nibabel raises many types for bad files
            raise TsgmInputError(path, f"cannot read as NIfTI ({type(error).__name__}: {error})") from error
        if not np.isfinite(array).all():
            raise TsgmInputError(path, "contains non-finite values")
        columns.append(array[truth.brain])
    record_path = detection_dir / subject / f"{subject}_detection.json"
    try:
        record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    except (OSError, ValueError) as error:
        raise TsgmInputError(record_path, f"cannot read the detection record ({type(error).__name__}: {error})") from error
    return Case(subject, np.stack(columns, axis=1), truth.brain, truth.target, truth.spacing, preprocess.z_range, record)


def load_cases(
    detection_dir: str | Path,
    items: Sequence[Mapping[str, Any]],
    preprocess: PreprocessConfig,
    truths: dict[str, GroundTruth] | None = None,
    modalities: Sequence[str] = MODALITIES,
) -> list[Case]:
    """:func:`load_case` (of ``modalities``) for every volumes.json item of a split; an empty split is an error.

    ``truths`` (subject -> GroundTruth) is filled and reused, so several methods read each subject's inputs once.
    """
    if not items:
        raise TsgmInputError(detection_dir, "the split has no subjects to evaluate")
    if not Path(detection_dir).is_dir():
        raise TsgmInputError(detection_dir, "detection folder does not exist: run the method's detection on this split")
    truths = {} if truths is None else truths
    cases = []
    for item in items:
        subject = str(item["subject"])
        if subject not in truths:
            truths[subject] = load_ground_truth(item, preprocess)
        cases.append(load_case(detection_dir, item, preprocess, truths[subject], modalities))
    return cases


def predict(case: Case, calibration: Calibration) -> tuple[np.ndarray, np.ndarray]:
    """(score float32, mask uint8) of a case, both (H, W, Z), under a calibration."""
    score = case.score(calibration.weights)
    return score, calibration.mask(score, case.brain, case.spacing)


def mean_volume_dice(cases: Sequence[Case], calibration: Calibration) -> float:
    """Exact mean per-volume Dice over the cases with tumour in range (NaN when none has tumour)."""
    values = []
    for case in cases:
        if case.target.any():
            _, mask = predict(case, calibration)
            values.append(float(overlap_metrics(mask[None], case.target[None], case.spacing, include_hd95=False)["dice"][0]))
    return float(np.mean(values)) if values else math.nan


def calibrate(
    cases: Sequence[Case],
    mode: str = "fixed",
    objective: str = "dice",
    weight_step: float = 0.05,
    fixed_weights: Mapping[str, float] | None = None,
    search_bins: int = 1000,
    threshold_bins: int = 10000,
    max_voxels: int = 1_000_000,
    seed: int = 0,
    modality_tolerance: float = 0.0,
    healthy_fpr_limit: float | None = None,
) -> dict[str, Any]:
    """Ensemble weights and binarisation from validation cases: the content of ``calibration.json``.

    Weights: simplex grid search (``weight_step``) maximising ``objective`` (see
    :func:`tsgm_components.detection.ensembling.search_weights`; ``modality_tolerance``: objective given up for fewer weighted
    modalities), or ``fixed_weights`` when given (no search).
    Threshold: maximum mean per-volume Dice over ``threshold_bins`` thresholds on all validation voxels; it is
    the mask rule in ``"fixed"`` mode and recorded (but unused) in ``"otsu"`` mode, which thresholds per slice.
    ``healthy_fpr_limit``: the tumour-free validation volumes pay for false positives: weights and threshold are chosen
    among the thresholds flagging at most this mean fraction of their brain voxels (``ensembling.select_threshold``).
    ``validation_dice`` is the exact mean per-volume Dice of the final rule on these cases.
    """
    if mode not in MASK_MODES:
        raise ValueError(f"mode must be one of {MASK_MODES}, got {mode!r}")
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    voxels = [case.voxels() for case in cases]
    if not any(v.target.any() for v in voxels):
        raise TsgmInputError(", ".join(c.subject for c in cases), "no tumour voxel in the validation split's evaluated slices: cannot calibrate")
    if fixed_weights is not None:
        weights = check_weights(fixed_weights, source="fixed_weights")
        search_record: Any = "fixed (not searched)"
    else:
        search = search_weights(voxels, weight_step, objective, search_bins, max_voxels, seed, modality_tolerance, healthy_fpr_limit)
        weights = {m: round(float(w), 6) for m, w in zip(MODALITIES, search.weights)}
        search_record = {
            "grid_step": weight_step,
            "grid_points": len(search.grid),
            "objective": objective,
            "objective_value": search.objective_value,
            "best_objective_value": float(search.values.max()),
            "modality_tolerance": modality_tolerance,
            "voxels_used": min(max_voxels, sum(len(v.target) for v in voxels)),
            "threshold_levels": search_bins,
        }
    threshold, _ = select_threshold(voxels, np.asarray([weights[m] for m in MODALITIES]), threshold_bins, healthy_fpr_limit)
    calibration: dict[str, Any] = {
        "weights": weights,
        "threshold": float(threshold) if mode == "fixed" else None,
        "mode": mode,
        "chosen_on": "validation",
        "objective": objective if fixed_weights is None else "dice (threshold only)",
        "validation_dice": math.nan,  # set below, once the rule is complete
        "n_validation_subjects": len(cases),
        "validation_subjects": [case.subject for case in cases],
        "fixed_threshold_on_validation": float(threshold),
        "healthy_fpr_limit": healthy_fpr_limit,
        "weights_search": search_record,
    }
    if mode == "otsu":
        calibration["min_component_mm2"] = OTSU_MIN_COMPONENT_MM2
    calibration["validation_dice"] = mean_volume_dice(cases, Calibration.from_json(calibration))
    return calibration


def _record_value(records: Sequence[Mapping[str, Any]], *path: str) -> float | None:
    """Mean of a numeric field (``path`` of keys) over the detection records that have it, else None."""
    values = []
    for record in records:
        value: Any = record
        for key in path:
            value = value.get(key) if isinstance(value, Mapping) else None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            values.append(float(value))
    return float(np.mean(values)) if values else None


def evaluate_cases(
    name: str, cases: Sequence[Case], calibration: Calibration, min_brain_fraction: float = 0.01, role: str | None = None
) -> MethodResult:
    """Apply ``calibration`` unchanged to the (test) cases and score them (see :mod:`tsgm_components.evaluation.metrics`).

    Slices whose brain covers less than ``min_brain_fraction`` of the plane are skipped by the slice-level metrics,
    as they were by ``tsgm prepare``. A volume without tumour in the evaluated slices is a healthy volume: it is a
    false positive when any voxel is predicted. The oracle is the best mean volume Dice of a global threshold
    chosen on these very cases: an upper bound, never a result. ``role``: :data:`ROLES` (how the row is labelled).
    """
    volume_rows, slice_rows, healthy_rows, healthy_volume_rows = [], [], [], []
    for case in cases:
        score, mask = predict(case, calibration)
        evaluated = case.brain.mean(axis=(0, 1)) >= min_brain_fraction
        volume, slices, healthy = evaluate_case(score, mask, case.target, case.brain, case.spacing, case.z_indices, evaluated)
        if volume is None:
            predicted = int(np.count_nonzero(mask))
            healthy_volume_rows.append({"subject": case.subject, "false_positive": predicted > 0, "fp_fraction": predicted / int(case.brain.sum())})
        else:
            volume_rows.append({"subject": case.subject, **volume})
        slice_rows += [{"subject": case.subject, **row} for row in slices]
        healthy_rows += [{"subject": case.subject, **row} for row in healthy]
    oracle_threshold, oracle_dice = select_threshold([case.voxels() for case in cases], np.asarray([calibration.weights[m] for m in MODALITIES]))
    records = [case.record for case in cases]
    return MethodResult(
        name=name,
        calibration=calibration.to_json(),
        volume_rows=volume_rows,
        slice_rows=slice_rows,
        healthy_rows=healthy_rows,
        healthy_volume_rows=healthy_volume_rows,
        oracle={"threshold": oracle_threshold, "volume_dice": oracle_dice},
        nfe_per_slice=_record_value(records, "reconstruction", "nfe_per_slice"),
        seconds_per_volume=_record_value(records, "seconds", "total"),
        role=role,
    )


def example_slice(cases: Sequence[Case]) -> tuple[str, int]:
    """(subject, input z index) of the axial slice with the largest tumour area among ``cases``."""
    best = max(
        ((int(case.target[:, :, k].sum()), case.subject, k) for case in cases for k in range(case.target.shape[2])),
        key=lambda entry: entry[0],
    )
    case = next(c for c in cases if c.subject == best[1])
    return case.subject, case.z_indices[best[2]]


def example_panels(
    case: Case, calibration: Calibration, detection_dir: str | Path, flair: np.ndarray, z: int, geometry: VolumeGeometry
) -> dict[str, np.ndarray | None]:
    """The five 2D panels of one method at slice ``z``: flair is the normalised (H, W, D) input FLAIR (model orientation),
    ``geometry`` the subject's (the written healthy map is in the input's voxel order)."""
    k = case.z_indices.index(z)
    score, mask = predict(case, calibration)
    healthy_path = Path(detection_dir) / case.subject / f"{case.subject}_healthy_flair.nii.gz"
    healthy = geometry.to_training(np.asarray(nib.load(str(healthy_path)).dataobj, dtype=np.float32))[:, :, z] if healthy_path.is_file() else None
    return {
        "input FLAIR": flair[:, :, z],
        "healthy FLAIR": healthy,
        "anomaly map": score[:, :, k],
        "mask": mask[:, :, k].astype(np.float32),
        "ground truth": case.target[:, :, k].astype(np.float32),
    }


@dataclass(frozen=True)
class CalibrationSettings:
    """How every method is calibrated on the validation split: the keyword arguments of :func:`calibrate` that the
    evaluation bundle sets once for all methods (a method entry may override ``mode`` and give ``fixed_weights``)."""

    mode: str = "fixed"
    objective: str = "dice"
    weight_step: float = 0.05
    search_bins: int = 1000
    threshold_bins: int = 10000
    max_voxels: int = 1_000_000
    seed: int = 0
    modality_tolerance: float = 0.0
    healthy_fpr_limit: float | None = None

    def calibrate_method(self, method: Mapping[str, Any], validation: Sequence[Case]) -> dict[str, Any]:
        """``calibration.json`` of one ``methods`` entry from its validation cases. ``modality_tolerance`` applies to
        the entries marked ``"sampled": true`` (each weighted modality costs them a sampling pass); the others get
        the best weights."""
        tolerance = self.modality_tolerance if method.get("sampled", False) else 0.0
        calibration = calibrate(
            validation,
            method.get("mode", self.mode),
            self.objective,
            self.weight_step,
            method.get("fixed_weights"),
            self.search_bins,
            self.threshold_bins,
            self.max_voxels,
            self.seed,
            tolerance,
            self.healthy_fpr_limit,
        )
        calibration["method"] = str(method["name"])
        calibration["detection_dir"] = str(Path(method["detection_dir"]).resolve())
        calibration["reconstruction"] = validation_reconstruction(validation, method["detection_dir"])
        return calibration


def validation_reconstruction(validation: Sequence[Case], detection_dir: str | Path) -> dict[str, Any] | None:
    """The sampler settings (:func:`~tsgm_components.detection.masking.reconstruction_settings`) of a method's validation
    detections, recorded in its calibration; None for methods that do not sample. Raises TsgmInputError if the
    subjects were reconstructed with different settings (e.g. a folder resumed with another sampler): one threshold
    cannot fit both."""
    settings = {json.dumps(reconstruction_settings(case.record.get("reconstruction")), sort_keys=True) for case in validation}
    if len(settings) > 1:
        raise TsgmInputError(
            Path(detection_dir) / "validation",
            f"subjects were reconstructed with different sampler settings: {sorted(settings)}; detect them again with one setting (--overwrite True)",
        )
    return json.loads(settings.pop()) if settings else None


#: What a row that is not a method is, as labelled in the tables.
ROLES = ("ceiling", "reference", "control")


def _check_methods(methods: Sequence[Mapping[str, Any]]) -> None:
    names = [str(method["name"]) for method in methods]
    if not names or len(set(names)) != len(names):
        raise ValueError(f"methods need distinct names, got {names}")
    for method in methods:
        if method.get("role") is not None and method["role"] not in ROLES:
            raise ValueError(f"method {method['name']}: role must be one of {ROLES} or absent, got {method['role']!r}")


def run_calibration(
    prepared_dir: str | Path,
    methods: Sequence[Mapping[str, Any]],
    out_dir: str | Path,
    settings: CalibrationSettings,
    overwrite: bool = False,
) -> str:
    """Bundle entry point (run ``calibrating``): every method's ``calibration.json`` from its validation detections
    only, in ``out_dir/<name>/``, so that test detection can sample only the weighted modalities
    (``--calibration_file OUT/<name>/calibration.json --reconstruct_modalities weighted``). The same calibration as
    :func:`run_evaluation` computes (deterministic). Returns a one-line summary per method."""
    volumes, preprocess, _ = read_prepared(prepared_dir)
    validation_items = read_volumes_split(volumes, "validation")
    _check_methods(methods)
    check_not_over_inputs(out_dir, [prepared_dir, *(method["detection_dir"] for method in methods)])
    lines, truths = [], {}
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        for method in methods:
            validation = load_cases(Path(method["detection_dir"]) / "validation", validation_items, preprocess, truths)
            calibration = Calibration.from_json(settings.calibrate_method(method, validation), f"{method['name']} (validation)")
            calibration.save(tmp / str(method["name"]) / "calibration.json")
            lines.append(
                f"{method['name']}: weights {dict(calibration.weights)}, threshold {calibration.threshold}, "
                f"validation volume Dice {calibration.details['validation_dice']:.3f}"
            )
    return "\n".join(lines)


def run_evaluation(
    prepared_dir: str | Path,
    methods: Sequence[Mapping[str, Any]],
    out_dir: str | Path,
    settings: CalibrationSettings,
    overwrite: bool = False,
    evaluated_split: str = "test",
) -> str:
    """Bundle entry point: calibrate every method on validation, score it on test, write the report; return markdown.

    ``evaluated_split`` "validation" scores the validation split itself (in-sample: its thresholds and weights were
    chosen there), the way settings are compared during development without reading test. Every evaluation of
    "test" is appended to the test-read log (:func:`log_test_read`).

    methods: ``[{"name": str, "detection_dir": path with validation/ and test/ sub-folders,
    optional "mode": "fixed"|"otsu", optional "fixed_weights": {mod: w} (skips the weight search),
    optional "role": one of :data:`ROLES` (the row's label: "ceiling", an upper bound by construction that reads what no
    method may; "reference", a model given what no method has, not an upper bound; "control", what a part of TSGM
    must beat),
    optional "sampled": true (a method that samples each weighted modality: ``settings.modality_tolerance`` applies)}]``.
    Writes ``out_dir/<name>/calibration.json`` per method (what VE-JP inference reads for "tsgm") and the report
    files of :mod:`tsgm_components.evaluation.report` in ``out_dir``. The whole folder appears at the end, atomically. Validation
    needs every modality's maps (the weight search); test only those the calibration weights.
    """
    if evaluated_split not in ("test", "validation"):
        raise TsgmInputError("evaluated_split", f"must be 'test' or 'validation', got {evaluated_split!r}")
    volumes, preprocess, min_brain_fraction = read_prepared(prepared_dir)
    splits = {split: read_volumes_split(volumes, split) for split in ("validation", evaluated_split)}
    _check_methods(methods)
    check_not_over_inputs(out_dir, [prepared_dir, *(method["detection_dir"] for method in methods)])
    results, examples, example, truths = [], {}, None, {}
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        for method in methods:
            name, detection_dir = str(method["name"]), Path(method["detection_dir"])
            validation = load_cases(detection_dir / "validation", splits["validation"], preprocess, truths)
            calibration = Calibration.from_json(settings.calibrate_method(method, validation), f"{name} (validation)")
            calibration.save(tmp / name / "calibration.json")
            logger.info("%s: calibrated on %d validation subjects: %s", name, len(validation), dict(calibration.weights))
            del validation
            # the test maps a method's calibration gives no weight are not needed (detection may have skipped them)
            test = load_cases(detection_dir / evaluated_split, splits[evaluated_split], preprocess, truths, calibration.weighted)
            results.append(evaluate_cases(name, test, calibration, min_brain_fraction, method.get("role")))
            if example is None:
                example = example_slice(test)
                item = next(i for i in splits[evaluated_split] if i["subject"] == example[0])
                example_case = load_subject({**item, SEG: None}, preprocess)
                flair = normalize_volume(example_case.arrays["flair"], example_case.brain_mask, preprocess)
            case = next(c for c in test if c.subject == example[0])
            examples[name] = example_panels(case, calibration, detection_dir / evaluated_split, flair, example[1], example_case.geometry)
            logger.info("%s: evaluated %d test subjects", name, len(test))
        markdown = write_report(results, tmp, examples, f"{evaluated_split} subject {example[0]}, axial slice z={example[1]}")
        if evaluated_split == "validation":
            markdown = VALIDATION_NOTE + markdown
            (tmp / "results.md").write_text(markdown)
    if evaluated_split == "test":
        log_test_read(prepared_dir, out_dir, [str(m["name"]) for m in methods])
    return markdown


VALIDATION_NOTE = (
    "**Validation split, in-sample**: every method's weights and threshold were chosen on these same subjects; "
    'read the rows against each other, not as test results ("test" below means the evaluated split).\n\n'
)
#: Every evaluation of a test split is appended here (the project's own table commands run from this checkout), or to
#: the file the environment variable TEST_READS_ENV names (the test suite points it elsewhere).
TEST_READS = REPO_ROOT / "benchmarks" / "results" / "test_reads.md"
TEST_READS_ENV = "TSGM_TEST_READS_LOG"


def log_test_read(prepared_dir: str | Path, out_dir: str | Path, methods: Sequence[str], log: Path | None = None) -> None:
    """Append one line (UTC date, commit, prepared dataset and its split source, methods, report folder) to ``log``
    (default: :data:`TEST_READS`, or $TSGM_TEST_READS_LOG) when its folder exists (a checkout of the repository), so
    that how often a test split was read is on record."""
    log = Path(os.environ.get(TEST_READS_ENV, TEST_READS)) if log is None else log
    if not log.parent.is_dir():
        return
    record = read_prepare_record(prepared_dir)
    header = "| date (UTC) | commit | dataset | split | methods | report |\n|---|---|---|---|---|---|\n"
    line = (
        f"| {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} | {git_commit()} | {record.get('dataset_dir', '?')} | "
        f"{record.get('split_source', '?')} | {', '.join(methods)} | {Path(out_dir).resolve()} |\n"
    )
    with log.open("a") as handle:
        if handle.tell() == 0:
            handle.write(
                "# Test-split reads\n\nAppended by every evaluation of a test split "
                "(`tsgm_components.evaluation.harness.log_test_read`).\n\n" + header
            )
        handle.write(line)
