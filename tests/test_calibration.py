"""Calibration: the one type the evaluation writes, detection reads and applies; the one weighted sum."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tsgm_components import REPO_ROOT
from tsgm_components.data.brats import MODALITIES
from tsgm_components.detection.ensembling import PAPER_WEIGHTS, score_to_mask, weighted_anomaly
from tsgm_components.detection.masking import OTSU_SOURCE, Calibration, resolve_mask_settings
from tsgm_components.errors import TsgmInputError

SHIPPED = sorted((REPO_ROOT / "bundles" / "vejp_anomaly" / "models").glob("*_calibration.json"))
FLAIR_ONLY = {"t1": 0.0, "t1ce": 0.0, "t2": 0.0, "flair": 1.0}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_calibrations_load_and_write_back_unchanged(path):
    calibration = Calibration.load(path)
    data = json.loads(path.read_text())
    assert calibration.to_json() == data and list(calibration.to_json()) == list(data)
    assert calibration.mode == data["mode"] and calibration.threshold == data["threshold"] and calibration.reconstruction == data["reconstruction"]
    assert calibration.weighted == [m for m in MODALITIES if data["weights"][m] > 0]
    assert calibration.weights_source == calibration.threshold_source == f"calibration {path.resolve()}"
    # what detection applies with the file alone: the same calibration, the same sources
    assert resolve_mask_settings(path) == calibration


def test_files_of_every_version_load(tmp_path):
    """The first calibration.json (weights and threshold only), one before "reconstruction" was recorded, an Otsu one."""
    oldest = tmp_path / "oldest.json"
    oldest.write_text(json.dumps({"weights": PAPER_WEIGHTS, "threshold": 0.2}))
    calibration = Calibration.load(oldest)
    assert (calibration.mode, calibration.threshold, calibration.reconstruction) == ("fixed", 0.2, None)
    assert calibration.to_json() == {"weights": PAPER_WEIGHTS, "threshold": 0.2, "mode": "fixed"}
    before_reconstruction = tmp_path / "v3.json"
    before_reconstruction.write_text(
        json.dumps({"weights": FLAIR_ONLY, "threshold": None, "mode": "otsu", "chosen_on": "validation", "validation_dice": 0.5})
    )
    otsu = Calibration.load(before_reconstruction)
    assert (otsu.mode, otsu.threshold, otsu.threshold_source, otsu.weighted) == ("otsu", None, OTSU_SOURCE, ["flair"])
    assert otsu.details["validation_dice"] == 0.5 and otsu.to_json()["chosen_on"] == "validation"


@pytest.mark.parametrize(
    "content, problem",
    [
        ("{", "cannot read calibration JSON"),
        (json.dumps({"threshold": 0.1}), "expected"),
        (json.dumps({"weights": PAPER_WEIGHTS, "mode": "fixed"}), 'needs a numeric "threshold"'),
        (json.dumps({"weights": PAPER_WEIGHTS, "threshold": 0.1, "mode": "median"}), "mode must be one of"),
        (json.dumps({"weights": {"flair": 1.0}, "threshold": 0.1}), "must name exactly the modalities"),
        (json.dumps({"weights": PAPER_WEIGHTS, "threshold": 0.1, "reconstruction": "heun"}), "reconstruction must be"),
    ],
)
def test_bad_files_are_named(tmp_path, content, problem):
    path = tmp_path / "calibration.json"
    path.write_text(content)
    with pytest.raises(TsgmInputError, match=problem) as raised:
        Calibration.load(path)
    assert str(raised.value).startswith(str(path))


def test_explicit_values_override_the_file(tmp_path):
    path = tmp_path / "calibration.json"
    Calibration(PAPER_WEIGHTS, "fixed", 0.3, details={"chosen_on": "validation"}).save(path)
    assert json.loads(path.read_text()) == {"chosen_on": "validation", "weights": PAPER_WEIGHTS, "threshold": 0.3, "mode": "fixed"}
    explicit = resolve_mask_settings(path, weights=FLAIR_ONLY, threshold=0.1)
    assert (explicit.weights, explicit.threshold, explicit.weights_source, explicit.threshold_source) == (FLAIR_ONLY, 0.1, "explicit", "explicit")
    assert explicit.details == {}  # the file's validation record does not describe these values
    assert resolve_mask_settings(path, mask_mode="otsu").threshold is None
    maps_only = resolve_mask_settings()
    assert maps_only.mode is None and maps_only.mask(np.ones((2, 2, 1)), np.ones((2, 2, 1), bool), (1, 1, 1)) is None


def test_one_weighted_sum_for_dicts_and_stacked_columns():
    rng = np.random.default_rng(0)
    maps = {m: rng.random((5, 6, 3), dtype=np.float32) for m in MODALITIES}
    columns = np.stack([maps[m] for m in MODALITIES], axis=-1)
    weights = {"t1": 0.0, "t1ce": 0.2, "t2": 0.3, "flair": 0.5}
    expected = sum(np.float64(weights[m]) * maps[m] for m in MODALITIES)
    np.testing.assert_allclose(weighted_anomaly(maps, weights), expected, rtol=1e-6)
    np.testing.assert_allclose(weighted_anomaly(columns, weights), expected, rtol=1e-6)
    np.testing.assert_allclose(weighted_anomaly(columns.reshape(-1, 4), [weights[m] for m in MODALITIES]), expected.ravel(), rtol=1e-6)
    # a modality with weight 0 need not be there (detection does not reconstruct it); a weighted one must
    del maps["t1"]
    np.testing.assert_allclose(weighted_anomaly(maps, weights), expected, rtol=1e-6)
    with pytest.raises(ValueError, match="missing for modalities \\['t1ce'\\]"):
        weighted_anomaly({m: maps[m] for m in ("t2", "flair")}, weights)
    calibration = Calibration(weights, "fixed", 0.4)
    brain = np.ones((5, 6, 3), bool)
    score = calibration.score(maps)
    np.testing.assert_array_equal(calibration.mask(score, brain, (1, 1, 1)), score_to_mask(score, brain, "fixed", 0.4, (1, 1, 1)))
