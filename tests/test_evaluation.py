"""Evaluation: ensemble calibration, metrics against independent implementations, report, bundle run (tiny, CPU)."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import matplotlib.image
import nibabel as nib
import numpy as np
import pytest
import torch
from monai.metrics import DiceMetric, MeanIoU
from scipy import ndimage
from sklearn.metrics import average_precision_score

from tsgm_components import REPO_ROOT
from tsgm_components.data.brats import MODALITIES
from tsgm_components.detection.masking import Calibration
from tsgm_components.detection.ensembling import (
    BrainVoxels,
    fixed_mask,
    min_component_pixels,
    otsu_mask,
    otsu_threshold,
    search_weights,
    select_threshold,
    simplex_grid,
)
from tsgm_components.errors import TsgmInputError
from tsgm_components.evaluation.harness import (
    Case,
    CalibrationSettings,
    calibrate,
    load_cases,
    predict,
    read_prepared,
    run_evaluation,
    validation_reconstruction,
)
from tsgm_components.evaluation.metrics import average_precision, evaluate_case, overlap_metrics, region_diagonal_mm

BUNDLE = REPO_ROOT / "bundles" / "tsgm_evaluation"
SHAPE = (24, 24, 12)
SPACING = (5.0, 4.0, 6.0)  # anisotropic; Otsu components > 400 mm² = 20 px here
Z_MIN, Z_MAX = 2, 9


# ---------------------------------------------------------------- ensembling


def test_simplex_grid_covers_the_simplex():
    grid = simplex_grid(4, 0.05)
    assert grid.shape == (1771, 4)
    np.testing.assert_allclose(grid.sum(axis=1), 1.0)
    assert (grid >= 0).all() and len(np.unique(np.round(grid * 20).astype(int), axis=0)) == 1771
    with pytest.raises(ValueError, match="divide 1"):
        simplex_grid(4, 0.3)


def _signal_volumes(rng: np.random.Generator, signal_column: int, n_volumes: int = 4, n: int = 3000) -> list[BrainVoxels]:
    volumes = []
    for _ in range(n_volumes):
        target = rng.random(n) < 0.1
        maps = 0.5 * rng.random((n, 4)).astype(np.float32)
        maps[:, signal_column] = np.where(target, 0.3, 0.0) + 0.5 * rng.random(n)  # overlapping: noise only hurts
        volumes.append(BrainVoxels(maps, target))
    return volumes


@pytest.mark.parametrize("objective", ["dice", "auprc"])
def test_weight_search_puts_all_weight_on_the_informative_modality(objective):
    volumes = _signal_volumes(np.random.default_rng(0), signal_column=2)
    search = search_weights(volumes, step=0.1, objective=objective)
    np.testing.assert_allclose(search.weights, [0, 0, 1, 0])
    assert search.objective_value > 0.7
    # a tenth of the voxels still finds (nearly) the same answer
    assert search_weights(volumes, 0.1, objective, max_voxels=1200).weights[2] >= 0.9


def test_modality_tolerance_trades_a_little_objective_for_fewer_weighted_modalities():
    rng = np.random.default_rng(3)
    volumes = []
    for _ in range(4):  # two noisy copies of the signal: both together beat either alone, by a little
        target = rng.random(4000) < 0.1
        maps = 0.5 * rng.random((4000, 4)).astype(np.float32)
        for column in (2, 3):
            maps[:, column] = np.where(target, 0.3, 0.0) + 0.5 * rng.random(4000)
        volumes.append(BrainVoxels(maps, target))
    best = search_weights(volumes, step=0.1)
    assert (best.weights[2:] > 0).all() and best.objective_value == best.values.max()
    cheap = search_weights(volumes, step=0.1, modality_tolerance=0.2)
    assert (cheap.weights > 0).sum() == 1 and cheap.objective_value >= best.objective_value - 0.2
    assert cheap.objective_value < best.objective_value  # the trade is real, and bounded by the tolerance
    assert search_weights(volumes, step=0.1, modality_tolerance=1e-9).weights.tolist() == best.weights.tolist()


def test_modality_tolerance_applies_only_to_methods_that_sample(monkeypatch):
    """A method without sampling (CycleGAN, the oracle) pays nothing per modality: it always gets the best weights."""
    import tsgm_components.evaluation.harness as evaluation

    seen = []
    # calibrate(cases, mode, objective, weight_step, fixed_weights, search_bins, threshold_bins, max_voxels, seed,
    # modality_tolerance, healthy_fpr_limit)
    monkeypatch.setattr(evaluation, "calibrate", lambda cases, *args: seen.append(args[8]) or {})
    settings = CalibrationSettings(modality_tolerance=0.02)
    settings.calibrate_method({"name": "tsgm", "detection_dir": ".", "sampled": True}, [])
    settings.calibrate_method({"name": "cyclegan", "detection_dir": "."}, [])
    assert seen == [0.02, 0.0]


def test_threshold_lands_in_the_gap_between_classes():
    rng = np.random.default_rng(1)
    volumes = []
    for _ in range(3):
        target = rng.random(2000) < 0.2
        score = np.where(target, 0.7, 0.2) + 0.1 * rng.random(2000)  # healthy in [0.2, 0.3), tumour in [0.7, 0.8)
        volumes.append(BrainVoxels(np.repeat(score[:, None], 4, axis=1).astype(np.float32), target))
    threshold, dice = select_threshold(volumes, np.full(4, 0.25))
    assert 0.45 <= threshold <= 0.55 and dice == pytest.approx(1.0)  # the middle of the gap
    for volume in volumes:  # the mask rule (score > t) reproduces the perfect split
        np.testing.assert_array_equal(fixed_mask(volume.maps[:, 0], threshold).astype(bool), volume.target)


def _tumour_and_healthy_volumes(rng: np.random.Generator, healthy_columns: list[float]) -> list[BrainVoxels]:
    """Two tumour volumes (tumour scores in [0.5, 1), normal tissue in [0, 0.55)) and one tumour-free volume whose
    modality column k flags 20 % of its voxels in [0.5, 0.9) times ``healthy_columns[k]`` (0: clean)."""
    volumes = []
    for _ in range(2):
        target = rng.random(4000) < 0.2
        score = np.where(target, 0.5 + 0.5 * rng.random(4000), 0.55 * rng.random(4000))
        volumes.append(BrainVoxels(np.repeat(score[:, None], len(healthy_columns), axis=1).astype(np.float32), target))
    hot = rng.random(4000) < 0.2
    base = 0.3 * rng.random(4000)
    columns = [np.where(hot & (factor > 0), 0.5 + 0.4 * rng.random(4000), base) for factor in healthy_columns]
    volumes.append(BrainVoxels(np.stack(columns, axis=1).astype(np.float32), np.zeros(4000, dtype=bool)))
    return volumes


def test_healthy_volumes_pay_for_false_positives_in_the_threshold():
    """With healthy_fpr_limit the threshold flags at most that fraction of the tumour-free volume (brute force), and
    is the best mean Dice among the thresholds that do; without it the tumour volumes alone decide."""
    volumes = _tumour_and_healthy_volumes(np.random.default_rng(3), [1.0])
    free, _ = select_threshold(volumes, np.ones(1), n_bins=20000)
    bounded, dice = select_threshold(volumes, np.ones(1), n_bins=20000, healthy_fpr_limit=0.05)
    healthy = volumes[-1].maps[:, 0]
    assert free < 0.6 and (healthy > free).mean() > 0.15  # the unconstrained rule flags most of the hot healthy region
    assert (healthy > bounded).mean() <= 0.05 < (healthy > bounded - 0.01).mean()  # at the bound: 0.2·(0.9 − t)/0.4
    assert bounded == pytest.approx(0.8, abs=0.01)
    tumour_dice = np.mean([2 * (v.target & (v.maps[:, 0] > bounded)).sum() / (v.target.sum() + (v.maps[:, 0] > bounded).sum()) for v in volumes[:2]])
    assert dice == pytest.approx(tumour_dice, abs=1e-9)


def test_weight_search_prefers_the_modality_that_leaves_healthy_volumes_clean():
    """Modality 0 fires on the tumour-free volume, modality 1 does not; both separate the tumours equally: only the
    constrained search must choose modality 1 (the unconstrained one takes the first grid point of the tie)."""
    volumes = _tumour_and_healthy_volumes(np.random.default_rng(4), [1.0, 0.0])
    free = search_weights(volumes, step=0.5, n_bins=2000)
    bounded = search_weights(volumes, step=0.5, n_bins=2000, healthy_fpr_limit=0.01)
    assert free.weights[0] > 0
    np.testing.assert_allclose(bounded.weights, [0.0, 1.0])


def test_selected_threshold_matches_brute_force_mean_dice():
    rng = np.random.default_rng(2)
    volumes = []
    for _ in range(3):
        target = rng.random(500) < 0.15
        score = rng.random(500) + 0.6 * target
        volumes.append(BrainVoxels(score[:, None].astype(np.float32), target))

    def mean_dice(t: float) -> float:
        return float(np.mean([2 * (v.target & (v.maps[:, 0] > t)).sum() / (v.target.sum() + (v.maps[:, 0] > t).sum()) for v in volumes]))

    best = max(mean_dice(t) for t in np.unique(np.concatenate([v.maps[:, 0] for v in volumes])))
    threshold, dice = select_threshold(volumes, np.ones(1), n_bins=20000)
    assert dice == pytest.approx(mean_dice(threshold), abs=1e-12)  # the reported Dice is that of the threshold
    assert best - 0.01 <= dice <= best + 1e-12


def test_otsu_threshold_and_mask_keep_only_large_components():
    rng = np.random.default_rng(3)
    values = np.concatenate([0.1 + 0.05 * rng.random(900), 0.8 + 0.05 * rng.random(100)])
    assert 0.15 <= otsu_threshold(values) < 0.8
    score = 0.1 * rng.random((24, 24, 2)).astype(np.float32)
    score[3:9, 3:9, 0] = 0.9  # 36 px > 20 px: kept
    score[15:18, 15:18, 0] = 0.9  # 9 px: dropped
    score[::5, ::5, 1] = 0.9
    brain = np.ones(score.shape, dtype=bool)
    mask = otsu_mask(score, brain, min_component_pixels(SPACING[:2]))
    assert min_component_pixels(SPACING[:2]) == pytest.approx(20.0)
    assert mask[3:9, 3:9, 0].all() and mask[:, :, 0].sum() == 36
    assert not mask[:, :, 1].any()  # isolated bright pixels: Otsu finds them, all are too small


# ---------------------------------------------------------------- metrics


def test_average_precision_matches_scikit_learn():
    rng = np.random.default_rng(4)
    for _ in range(5):
        target = rng.random(400) < 0.3
        score = np.round(rng.random(400) + 0.4 * target, 1)  # many ties
        assert average_precision(score, target) == pytest.approx(average_precision_score(target, score), abs=1e-12)
    assert math.isnan(average_precision(np.ones(5), np.zeros(5, bool)))


def _brute_hd95(a: np.ndarray, b: np.ndarray, spacing) -> float:
    """MONAI's definition: boundary = mask XOR erosion; max of the two directed 95th percentiles."""
    coords = [np.argwhere(m ^ ndimage.binary_erosion(m)) * np.asarray(spacing) for m in (a, b)]
    distances = np.sqrt(((coords[0][:, None] - coords[1][None]) ** 2).sum(-1))
    return max(np.percentile(distances.min(axis=1), 95), np.percentile(distances.min(axis=0), 95))


def test_overlap_metrics_match_hand_computed_and_brute_force_hd95():
    prediction = np.zeros((14, 12, 7), bool)
    target = prediction.copy()
    prediction[2:7, 3:8, 1:4] = True
    target[4:11, 2:6, 2:6] = True
    target[12, 10, 6] = True  # an isolated voxel makes the directed distances asymmetric
    result = overlap_metrics(prediction[None], target[None], SPACING)
    tp, n_pred, n_true = (prediction & target).sum(), prediction.sum(), target.sum()
    assert result["dice"][0] == pytest.approx(2 * tp / (n_pred + n_true))
    assert result["iou"][0] == pytest.approx(tp / (prediction | target).sum())
    assert result["precision"][0] == pytest.approx(tp / n_pred)
    assert result["recall"][0] == pytest.approx(tp / n_true)
    assert result["hd95"][0] == pytest.approx(_brute_hd95(prediction, target, SPACING), rel=1e-5)
    tensors = [torch.from_numpy(m[None, None].astype(np.float32)) for m in (prediction, target)]
    assert result["dice"][0] == pytest.approx(float(DiceMetric(include_background=True)(*tensors)))
    assert result["iou"][0] == pytest.approx(float(MeanIoU(include_background=True)(*tensors)))
    plane = overlap_metrics(prediction[None, :, :, 3], target[None, :, :, 3], SPACING[:2])
    assert plane["hd95"][0] == pytest.approx(_brute_hd95(prediction[:, :, 3], target[:, :, 3], SPACING[:2]), rel=1e-5)
    at_border = np.zeros_like(prediction)  # masks touching the image border: the border counts as surface
    at_border[:4, :, 0:3] = True
    result = overlap_metrics(np.stack([at_border, prediction]), np.stack([target, at_border]), SPACING)
    np.testing.assert_allclose(result["hd95"], [_brute_hd95(at_border, target, SPACING), _brute_hd95(prediction, at_border, SPACING)], rtol=1e-5)


def test_empty_mask_conventions():
    target = np.zeros((1, 10, 8), bool)
    target[0, 2:5, 2:5] = True
    empty = overlap_metrics(np.zeros_like(target), target, (2.0, 3.0))
    assert [empty[m][0] for m in ("dice", "iou", "precision", "recall")] == [0, 0, 0, 0]
    assert empty["hd95"][0] == pytest.approx(region_diagonal_mm((10, 8), (2.0, 3.0))) == pytest.approx(math.hypot(20, 24))
    assert empty["empty_prediction"][0]
    with pytest.raises(ValueError, match="non-empty target"):
        overlap_metrics(target, np.zeros_like(target), (1.0, 1.0))

    # one subject: slice 0 tumour (missed), slice 1 healthy with a false positive, slice 2 healthy and clean
    brain = np.ones((10, 8, 3), bool)
    truth = np.zeros((10, 8, 3), bool)
    truth[2:5, 2:5, 0] = True
    mask = np.zeros((10, 8, 3), np.uint8)
    mask[0, 0, 1] = 1
    volume, slices, healthy = evaluate_case(mask.astype(np.float32), mask, truth, brain, (2.0, 3.0, 4.0), [40, 41, 42])
    assert volume["dice"] == 0 and not volume["empty_prediction"]  # the volume has a (wrong) prediction
    assert [s["z"] for s in slices] == [40] and slices[0]["empty_prediction"]
    assert slices[0]["hd95"] == pytest.approx(math.hypot(20, 24))
    assert [(h["z"], h["false_positive"], h["healthy_dice"]) for h in healthy] == [(41, True, 0.0), (42, False, 1.0)]
    assert healthy[0]["fp_fraction"] == pytest.approx(1 / 80)
    assert evaluate_case(mask.astype(np.float32), mask, np.zeros_like(truth), brain, (2.0, 3.0, 4.0), [40, 41, 42])[0] is None


# ---------------------------------------------------------------- harness, report and bundle on tiny synthetic folders


def _save(array: np.ndarray, path: Path, dtype=np.float32) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array.astype(dtype), np.diag([*SPACING, 1.0])), str(path))


def _make_subject(root: Path, subject: str, rng: np.random.Generator, tumour: bool) -> dict[str, str]:
    yy, xx = np.mgrid[: SHAPE[0], : SHAPE[1]]
    brain = np.repeat((((yy - 11.5) / 10) ** 2 + ((xx - 11.5) / 9) ** 2 < 1)[:, :, None], SHAPE[2], axis=2)
    seg = np.zeros(SHAPE, np.uint8)
    if tumour:
        cy, cx = rng.integers(7, 15, size=2)
        seg[cy - 3 : cy + 3, cx - 3 : cx + 3, 3:8] = 2
        seg[cy - 1 : cy + 1, cx - 1 : cx + 1, 4:6] = 1
    item = {"subject": subject}
    for modality in MODALITIES:
        item[modality] = str(root / "data" / subject / f"{subject}_{modality}.nii.gz")
        _save(brain * (100 + 20 * rng.random(SHAPE) + 80 * (seg > 0)), Path(item[modality]))
    item["seg"] = str(root / "data" / subject / f"{subject}_seg.nii.gz")
    _save(seg, Path(item["seg"]), np.uint8)
    return item


def _write_detection(out: Path, item: dict[str, str], rng: np.random.Generator, signal: str, strength: float) -> None:
    """A detection folder in the contract's format whose ``signal`` modality carries the tumour."""
    subject = item["subject"]
    truth = np.asarray(nib.load(item["seg"]).dataobj) > 0
    brain = np.asarray(nib.load(item["flair"]).dataobj) > 0
    support = np.zeros(SHAPE, bool)
    support[:, :, Z_MIN : Z_MAX + 1] = brain[:, :, Z_MIN : Z_MAX + 1]
    folder = out / subject
    for modality in MODALITIES:
        anomaly = 0.3 * rng.random(SHAPE) + (strength * truth if modality == signal else 0.0)
        _save(np.clip(anomaly, 0, 1) * support, folder / f"{subject}_anomaly_{modality}.nii.gz")
        _save(0.5 * brain, folder / f"{subject}_healthy_{modality}.nii.gz")
    record = {"method": out.parent.name, "subject": subject, "seconds": {"total": 2.5}, "reconstruction": {"nfe_per_slice": 35}}
    (folder / f"{subject}_detection.json").write_text(json.dumps(record))


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    """work_dir with prepared/{volumes,prepare_config}.json and detections/{good,weak}/{validation,test}."""
    root = tmp_path_factory.mktemp("evaluation")
    rng = np.random.default_rng(5)
    volumes = {"training": [], "validation": [], "test": []}
    for split, n in (("validation", 3), ("test", 3)):
        for i in range(n):
            volumes[split].append(_make_subject(root, f"{split}_{i}", rng, tumour=not (split == "test" and i == 2)))
    prepared = root / "prepared"
    prepared.mkdir()
    (prepared / "volumes.json").write_text(json.dumps(volumes))
    config = {
        "z_min": Z_MIN,
        "z_max": Z_MAX,
        "image_size": 24,
        "pad_to": 24,
        "lower_percentile": 1,
        "upper_percentile": 99,
        "min_brain_fraction": 0.01,
        "orientation": None,
        "voxel_size": None,
        "volume_shape": None,
    }  # no training grid recorded
    (prepared / "prepare_config.json").write_text(json.dumps(config))
    for method, strength in (("good", 0.25), ("weak", 0.1)):
        for split in ("validation", "test"):
            for item in volumes[split]:
                _write_detection(root / "detections" / method / split, item, rng, "t2", strength)
    return root


def test_calibration_on_synthetic_detections(synthetic):
    volumes, preprocess, _ = read_prepared(synthetic / "prepared")
    cases = load_cases(synthetic / "detections" / "good" / "validation", volumes["validation"], preprocess)
    assert cases[0].maps.shape[1] == 4 and cases[0].brain.shape == (24, 24, Z_MAX - Z_MIN + 1)
    calibration = calibrate(cases, weight_step=0.1)
    assert calibration["weights"]["t2"] == 1.0 and calibration["chosen_on"] == "validation"
    # t2 anomaly: healthy voxels uniform on [0, 0.3), tumour on [0.25, 0.55): the best cut is near 0.3
    assert 0.27 <= calibration["threshold"] <= 0.32 and calibration["validation_dice"] > 0.85
    otsu = calibrate(cases, mode="otsu", weight_step=0.1)  # per-slice Otsu also cuts the uniform healthy noise
    assert otsu["mode"] == "otsu" and otsu["threshold"] is None and 0 < otsu["validation_dice"] < calibration["validation_dice"]


def test_missing_anomaly_map_is_a_clear_error(synthetic, tmp_path):
    volumes, preprocess, _ = read_prepared(synthetic / "prepared")
    with pytest.raises(TsgmInputError, match="anomaly map missing"):
        load_cases(tmp_path, volumes["validation"], preprocess)
    with pytest.raises(TsgmInputError, match="volumes.json"):
        read_prepared(tmp_path)


def test_test_maps_without_weight_need_not_exist(synthetic, tmp_path):
    """Detection with reconstruct_modalities "weighted" writes no maps for zero-weight modalities: the test split
    is scored from the weighted ones alone, with the same result; a weighted map missing is still an error."""
    detections = tmp_path / "good"
    shutil.copytree(synthetic / "detections" / "good", detections)
    full = json.loads(
        run_evaluation(
            synthetic / "prepared", [{"name": "good", "detection_dir": str(detections)}], tmp_path / "full", CalibrationSettings(weight_step=0.1)
        )
        and (tmp_path / "full" / "summary.json").read_text()
    )
    assert json.loads((tmp_path / "full" / "good" / "calibration.json").read_text())["weights"]["t2"] == 1.0
    for path in (detections / "test").glob("*/*_anomaly_*.nii.gz"):
        if not path.name.endswith("_t2.nii.gz"):
            path.unlink()
    run_evaluation(
        synthetic / "prepared", [{"name": "good", "detection_dir": str(detections)}], tmp_path / "t2", CalibrationSettings(weight_step=0.1)
    )
    assert json.loads((tmp_path / "t2" / "summary.json").read_text())["good"]["volume"] == full["good"]["volume"]
    volumes, preprocess, _ = read_prepared(synthetic / "prepared")
    case = load_cases(detections / "test", volumes["test"], preprocess, modalities=["t2"])[0]
    assert not case.maps[:, [0, 1, 3]].any() and case.maps[:, 2].any()
    for path in (detections / "test").glob("*/*_anomaly_t2.nii.gz"):
        path.unlink()
    with pytest.raises(TsgmInputError, match="anomaly map missing"):
        run_evaluation(
            synthetic / "prepared", [{"name": "good", "detection_dir": str(detections)}], tmp_path / "none", CalibrationSettings(weight_step=0.1)
        )


def test_bundle_evaluating_writes_calibration_and_report(synthetic):
    from monai.bundle import run

    configs = [str(BUNDLE / "configs" / "evaluate.yaml"), str(BUNDLE / "configs" / "cpu.yaml")]
    methods = [
        {"name": "good", "detection_dir": str(synthetic / "detections" / "good")},
        {"name": "weak", "detection_dir": str(synthetic / "detections" / "weak"), "mode": "otsu"},
        {
            "name": "t1_only",
            "detection_dir": str(synthetic / "detections" / "good"),
            "fixed_weights": {"t1": 1.0, "t1ce": 0.0, "t2": 0.0, "flair": 0.0},
        },
    ]
    for run_id in ("calibrating", "evaluating"):  # calibrating: validation only, before test detection
        run(
            run_id,
            config_file=configs,
            logging_file=str(BUNDLE / "configs" / "logging.conf"),
            meta_file=str(BUNDLE / "configs" / "metadata.json"),
            work_dir=str(synthetic),
            methods=methods,
        )
    out = synthetic / "evaluation"
    for method in methods:  # the same calibration either way
        assert json.loads((synthetic / "calibration" / method["name"] / "calibration.json").read_text()) == json.loads(
            (out / method["name"] / "calibration.json").read_text()
        )
    calibration = json.loads((out / "good" / "calibration.json").read_text())
    assert calibration["weights"]["t2"] == 1.0 and calibration["mode"] == "fixed" and calibration["n_validation_subjects"] == 3
    assert json.loads((out / "weak" / "calibration.json").read_text())["mode"] == "otsu"
    # the contract with VE-JP inference: detection reads these files back
    loaded = Calibration.load(out / "good" / "calibration.json")
    assert loaded.weights == calibration["weights"] and loaded.threshold == calibration["threshold"] and loaded.mode == "fixed"
    assert loaded.reconstruction is None and loaded.to_json() == calibration  # not sampled; written back unchanged
    weak = Calibration.load(out / "weak" / "calibration.json")
    assert (weak.threshold, weak.mode) == (None, "otsu")
    assert json.loads((out / "t1_only" / "calibration.json").read_text())["weights"]["t1"] == 1.0

    summary = json.loads((out / "summary.json").read_text(), parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert list(summary) == ["good", "weak", "t1_only"]
    good = summary["good"]
    assert good["volume"]["dice"]["mean"] > 0.8 and good["volume"]["dice"]["n"] == 2
    assert good["counts"]["test_volumes_without_tumour"] == 1 and good["nfe_per_slice"] == 35
    assert good["healthy_slices"]["n"] > 0 and good["oracle_test_threshold"]["volume_dice"] >= good["volume"]["dice"]["mean"] - 1e-9
    assert summary["t1_only"]["volume"]["auprc"]["mean"] < 0.5 < good["volume"]["auprc"]["mean"]

    with open(out / "per_case.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 3 * 3 and {r["method"] for r in rows} == {"good", "weak", "t1_only"}
    with open(out / "per_slice.csv") as handle:
        kinds = {r["kind"] for r in csv.DictReader(handle)}
    assert kinds == {"tumour", "healthy"}
    markdown = (out / "results.md").read_text()
    assert (
        "| method | volume DSC | slice DSC | AUPRC | IoU | precision | recall | HD95 (mm) | healthy-volume FPR | "
        "healthy-volume FP voxels | healthy-slice FPR | NFE | s / volume |"
    ) in markdown
    # test_2 has no tumour: a healthy volume, a false positive when any voxel is predicted
    volumes, preprocess, _ = read_prepared(synthetic / "prepared")
    healthy_case = load_cases(synthetic / "detections" / "good" / "test", volumes["test"][2:], preprocess)[0]
    assert good["healthy_volumes"]["n"] == 1
    healthy_mask = predict(healthy_case, loaded)[1]
    assert good["healthy_volumes"]["false_positive_rate"] == float(healthy_mask.any())
    assert good["healthy_volumes"]["fp_voxel_fraction"] == pytest.approx(healthy_mask[healthy_case.brain].mean())
    assert sorted(good["per_subject_volume_dice"]) == ["test_0", "test_1"] and "| test_0 |" in markdown
    assert good["role"] is None and "CEILING" not in markdown
    assert "oracle (upper bound, NOT a result" in markdown and "| good |" in markdown
    for figure in ("boxplots.png", "examples.png"):
        image = matplotlib.image.imread(out / "figures" / figure)
        assert image.ndim == 3 and min(image.shape[:2]) > 100


def test_baseline_bundle_writes_detection_folders(synthetic, tmp_path):
    from monai.bundle import run

    from tsgm_components.data.preprocessing import normalize_volume
    from tsgm_components.networks.cyclegan import ResnetGenerator
    from tsgm_components.checkpoints import SPEC_KEY, CycleGANSpec

    shutil.copytree(synthetic / "prepared", tmp_path / "prepared")
    torch.manual_seed(0)
    (tmp_path / "cyclegan").mkdir()
    # a 4-channel generator (the four modalities of a slice together, as cpu.yaml trains), with the spec of its
    # training data: the configs build the generator from it
    generator = ResnetGenerator(4, 4, ngf=4, n_blocks=1)
    spec = CycleGANSpec(read_prepared(tmp_path / "prepared")[1], generator.config)
    checkpoint = tmp_path / "cyclegan" / "model.pt"
    torch.save({"G_BA": generator.state_dict(), SPEC_KEY: spec.state_dict()}, checkpoint)
    configs = [str(BUNDLE / "configs" / "baselines.yaml"), str(BUNDLE / "configs" / "cpu.yaml")]
    for run_id in ("flair_threshold", "cyclegan"):
        run(
            run_id,
            config_file=configs,
            logging_file=str(BUNDLE / "configs" / "logging.conf"),
            meta_file=str(BUNDLE / "configs" / "metadata.json"),
            work_dir=str(tmp_path),
            cyclegan_checkpoint=str(checkpoint),
        )
    volumes, preprocess, _ = read_prepared(tmp_path / "prepared")
    for split in ("validation", "test"):
        for item in volumes[split]:
            subject = item["subject"]
            for method, nfe in (("flair_threshold", 0), ("cyclegan", 1)):
                folder = tmp_path / "detections" / method / split / subject
                names = [f"{subject}_{kind}_{m}.nii.gz" for kind in ("healthy", "anomaly") for m in MODALITIES]
                assert all((folder / name).is_file() for name in names + [f"{subject}_anomaly.nii.gz", f"{subject}_overlay.png"])
                assert json.loads((folder / f"{subject}_detection.json").read_text())["reconstruction"]["nfe_per_slice"] == nfe
    # FLAIR thresholding: the anomaly map is the normalised FLAIR itself on the processed slices
    item = volumes["test"][0]
    flair = np.asarray(nib.load(item["flair"]).dataobj, dtype=np.float32)
    expected = normalize_volume(flair, flair > 0, preprocess)[:, :, Z_MIN : Z_MAX + 1]
    anomaly = nib.load(tmp_path / "detections" / "flair_threshold" / "test" / item["subject"] / f"{item['subject']}_anomaly_flair.nii.gz")
    np.testing.assert_allclose(np.asarray(anomaly.dataobj)[:, :, Z_MIN : Z_MAX + 1], expected, atol=1e-5)
    assert not np.asarray(anomaly.dataobj)[:, :, Z_MAX + 1 :].any()


def test_bundle_configs_load_and_metadata_is_valid():
    import jsonschema
    from monai.bundle import ConfigParser

    for names in (["evaluate.yaml"], ["evaluate.yaml", "cpu.yaml"], ["baselines.yaml"], ["baselines.yaml", "cpu.yaml"]):
        parser = ConfigParser()
        parser.read_config([str(BUNDLE / "configs" / n) for n in names])
        parser.parse()
        assert parser.get_parsed_content("weight_step" if names[0] == "evaluate.yaml" else "splits") is not None
    schema = json.loads((REPO_ROOT / "bundles" / "meta_schema_20240725.json").read_text())
    jsonschema.validate(json.loads((BUNDLE / "configs" / "metadata.json").read_text()), schema)
    for path in ("LICENSE", "docs/README.md", "configs/logging.conf"):
        assert (BUNDLE / path).is_file()


def test_calibration_records_the_sampler_and_refuses_mixed_validation_folders():
    """The threshold depends on the reconstructions: a calibration records the sampler settings of its validation
    detections, and a folder whose subjects were sampled differently (resumed with another sampler) is an error."""

    def case(subject: str, **sampler) -> Case:
        empty = np.zeros((2, 2, 1), bool)
        record = {"reconstruction": {"sampler": "posterior_mean", "n_draws": 1, "nfe_per_slice": 1, "seconds": 3.0, **sampler}}
        return Case(subject, np.zeros((0, 4), np.float32), empty, empty, (1.0, 1.0, 1.0), range(1), record)

    settings = validation_reconstruction([case("a"), case("b", seconds=9.0)], "D")  # run details do not count
    assert settings["sampler"] == "posterior_mean" and settings["n_draws"] == 1 and "seconds" not in settings
    not_sampled = Case("c", np.zeros((0, 4), np.float32), np.zeros((2, 2, 1), bool), np.zeros((2, 2, 1), bool), (1.0,) * 3, range(1))
    assert validation_reconstruction([not_sampled], "D") is None
    with pytest.raises(TsgmInputError, match=r"D/validation: .*different sampler settings"):
        validation_reconstruction([case("a"), case("b", sampler="heun", n_steps=4, n_draws=2)], "D")


def test_paired_bootstrap_known_answers_and_the_report_table():
    from tsgm_components.evaluation.metrics import paired_bootstrap
    from tsgm_components.evaluation.report import confidence_table

    constant = paired_bootstrap({"a": 0.9, "b": 0.7, "c": 0.5}, {"a": 0.8, "b": 0.6, "c": 0.4, "d": 0.1})
    assert constant["n"] == 3 and constant["difference"] == pytest.approx(0.1)
    assert constant["low"] == pytest.approx(0.1) and constant["high"] == pytest.approx(0.1)
    spread = paired_bootstrap({"a": 1.0, "b": 0.0}, {"a": 0.0, "b": 0.0})
    assert spread["difference"] == 0.5 and spread["low"] == 0.0 and spread["high"] == 1.0  # resamples: 0, 0.5, 1
    one = paired_bootstrap({"a": 0.5, "b": float("nan")}, {"a": 0.25, "b": 0.3})
    assert one["n"] == 1 and one["difference"] == 0.25 and math.isnan(one["low"])
    summaries = {
        name: {"per_subject_volume_dice": dice, "per_subject_auprc": dice}
        for name, dice in (("tsgm", {"a": 0.9, "b": 0.7}), ("flair_threshold", {"a": 0.8, "b": 0.6}))
    }
    table = "\n".join(confidence_table(summaries))
    assert "| tsgm | +0.100 [+0.100, +0.100] | +0.100 [+0.100, +0.100] | — | — |" in table
    assert "| flair_threshold | — | — | -0.100 [-0.100, -0.100] | -0.100 [-0.100, -0.100] |" in table


def test_every_test_split_evaluation_is_logged_and_validation_ones_are_not(synthetic, test_reads_log, tmp_path):
    """The test-read log gets one line per evaluation of a test split (commit, dataset, split source, methods);
    an in-sample validation evaluation adds none and says it is in-sample."""
    before = test_reads_log.read_text().count("\n") if test_reads_log.exists() else 0
    methods = [{"name": "good", "detection_dir": str(synthetic / "detections" / "good")}]
    validation = run_evaluation(synthetic / "prepared", methods, tmp_path / "v", CalibrationSettings(weight_step=0.1), evaluated_split="validation")
    assert validation.startswith("**Validation split, in-sample**")
    assert (test_reads_log.read_text().count("\n") if test_reads_log.exists() else 0) == before
    run_evaluation(synthetic / "prepared", methods, tmp_path / "t", CalibrationSettings(weight_step=0.1))
    lines = test_reads_log.read_text().splitlines()
    assert len(lines) == (before or 6) + 1 and lines[-1].endswith(f"| good | {tmp_path / 't'} |")
    with pytest.raises(TsgmInputError, match="must be 'test' or 'validation'"):
        run_evaluation(synthetic / "prepared", methods, tmp_path / "x", CalibrationSettings(weight_step=0.1), evaluated_split="train")


def test_the_note_under_a_table_names_only_its_rows():
    """A real-data table (no twins) has CONTROL rows but no CEILING or true-pairs row: its note says nothing of them."""
    from tsgm_components.evaluation.report import ladder_note

    real = ladder_note({"tsgm": {"role": None}, "regression": {"role": "control"}, "cyclegan": {"role": None}})
    assert "CONTROL rows" in real and "regression is" in real and "cyclegan is stage 1 alone" in real
    assert "CEILING" not in real and "vejp_true_pairs" not in real and "oracle" not in real
    phantom = ladder_note({"oracle_reconstruction": {"role": "ceiling"}, "vejp_true_pairs": {"role": "reference"}})
    assert phantom.startswith("CEILING rows are upper bounds by construction") and "REFERENCE rows" in phantom


def test_table_iii_rows_from_one_methods_maps(synthetic):
    """modalities.yaml: each modality alone, equal weights and validation weights from one detection folder whose
    tumour signal is in T2 only: T2 alone and the validation-weighted ensemble (which puts all weight on T2) agree,
    the equal-weight ensemble dilutes the signal, T1 alone carries none."""
    from monai.bundle import run

    configs = [str(BUNDLE / "configs" / name) for name in ("evaluate.yaml", "cpu.yaml", "modalities.yaml")]
    run(
        "evaluating",
        config_file=configs,
        logging_file=str(BUNDLE / "configs" / "logging.conf"),
        meta_file=str(BUNDLE / "configs" / "metadata.json"),
        work_dir=str(synthetic),
        table_iii_methods=[{"name": "good", "detection_dir": str(synthetic / "detections" / "good")}],
    )
    summary = json.loads((synthetic / "table_iii" / "summary.json").read_text())
    assert list(summary) == [f"good_{m}_only" for m in MODALITIES] + ["good_equal_weights", "good_validation_weights"]
    assert summary["good_equal_weights"]["calibration"]["weights"] == {m: 0.25 for m in MODALITIES}
    assert summary["good_validation_weights"]["calibration"]["weights"]["t2"] == 1.0
    auprc = {name: row["volume"]["auprc"]["mean"] for name, row in summary.items()}
    assert auprc["good_validation_weights"] == auprc["good_t2_only"] > auprc["good_equal_weights"] > auprc["good_t1_only"]


def test_uncertainty_maps_are_the_runs_mean_and_variance(synthetic, tmp_path):
    """uncertainty.yaml (Fig. 8): three runs whose ensemble maps differ by known noise give NIfTI mean and variance
    (ddof 1) equal to numpy's, in the runs' geometry; identical runs agree perfectly and have variance 0."""
    from monai.bundle import run

    calibration = Calibration.from_json({"weights": {"t1": 0.0, "t1ce": 0.0, "t2": 1.0, "flair": 0.0}, "threshold": 0.3, "mode": "fixed"})
    calibration.save(tmp_path / "calibration.json")
    rng = np.random.default_rng(0)
    detections = tmp_path / "detections"
    source = synthetic / "detections" / "good" / "validation"
    for run_index, noise in enumerate((0.0, 0.05, 0.1)):
        for folder in source.iterdir():
            target = detections / f"pc_seed{run_index}" / "validation" / folder.name
            shutil.copytree(folder, target)
            t2 = nib.load(str(target / f"{folder.name}_anomaly_t2.nii.gz"))
            noisy = np.asarray(t2.dataobj, np.float32) + noise * rng.random(t2.shape).astype(np.float32) * (np.asarray(t2.dataobj) > 0)
            for name in ("t2", ""):
                nib.save(nib.Nifti1Image(noisy, t2.affine), str(target / f"{folder.name}_anomaly{'_' + name if name else ''}.nii.gz"))
    runs = [f"pc_seed{k}" for k in range(3)]
    common = dict(
        config_file=str(BUNDLE / "configs" / "uncertainty.yaml"),
        logging_file=str(BUNDLE / "configs" / "logging.conf"),
        meta_file=str(BUNDLE / "configs" / "metadata.json"),
        work_dir=str(synthetic),
        detections_dir=str(detections),
        calibration_file=str(tmp_path / "calibration.json"),
        deterministic="$None",
    )
    run("uncertainty", runs=runs, uncertainty_dir=str(tmp_path / "noisy"), **common)
    subject = sorted(p.name for p in source.iterdir())[0]
    stack = np.stack([np.asarray(nib.load(str(detections / r / "validation" / subject / f"{subject}_anomaly.nii.gz")).dataobj) for r in runs])
    mean = nib.load(str(tmp_path / "noisy" / subject / f"{subject}_anomaly_mean.nii.gz"))
    variance = np.asarray(nib.load(str(tmp_path / "noisy" / subject / f"{subject}_anomaly_variance.nii.gz")).dataobj)
    np.testing.assert_allclose(np.asarray(mean.dataobj), stack.mean(0), atol=1e-6)
    np.testing.assert_allclose(variance, stack.var(0, ddof=1), atol=1e-6)
    np.testing.assert_array_equal(mean.affine, nib.load(str(detections / runs[0] / "validation" / subject / f"{subject}_anomaly.nii.gz")).affine)
    noisy = json.loads((tmp_path / "noisy" / "summary.json").read_text())["subjects"][subject]
    assert noisy["mean_std_healthy_brain"] > 0 and len(noisy["auprc"]) == 3 and len(noisy["dice_between_runs"]) == 3
    assert matplotlib.image.imread(tmp_path / "noisy" / "figures" / "uncertainty.png").ndim == 3
    run("uncertainty", runs=[runs[0], runs[0]], uncertainty_dir=str(tmp_path / "same"), **common)
    same = json.loads((tmp_path / "same" / "summary.json").read_text())["subjects"][subject]
    assert same["dice_between_runs"] == [1.0] and same["mean_std_healthy_brain"] == 0.0 and same["auprc"][0] == same["auprc"][1]
    assert not np.asarray(nib.load(str(tmp_path / "same" / subject / f"{subject}_anomaly_variance.nii.gz")).dataobj).any()
