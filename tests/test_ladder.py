"""The evaluation ladder end to end on the tiny session phantom (32², float32): healthy twins → true pairs → VE-JP →
detection (oracle reconstruction, VE-JP on true pairs, FLAIR thresholding) → calibration on validation → test
metrics, with the rows labelled, and the numbers pinned.

The pinned values are what this code prints on the 2-core development machine; they must hold on any CPU within
``TOLERANCE`` (float32 everywhere; only the rounding of different CPU kernels may differ). The README's demo table
carries the same promise at full size.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from monai.bundle import run

from tsgm_components import REPO_ROOT
from tsgm_components.evaluation.references import ORACLE_METHOD, detect_oracle_splits, twin_slices, write_true_pairs
from tsgm_components.evaluation.harness import CalibrationSettings, read_prepared, run_evaluation

VEJP = REPO_ROOT / "bundles" / "vejp_anomaly" / "configs"
EVALUATION = REPO_ROOT / "bundles" / "tsgm_evaluation" / "configs"
TINY_NETWORK = dict(
    condition_channels=1, channels=[8, 16], attention_levels=[False, False], num_res_blocks=1, num_head_channels=8, norm_num_groups=8, sigma_data=0.5
)
TINY_TRAIN = dict(
    image_size=32, batch_size=8, epoch_length=10, max_epochs=2, warmup_steps=5, log_interval=10, ema_decay=0.98, network_args=TINY_NETWORK
)  # an EMA horizon (50 steps) for a 20-step run
TINY_SAMPLER = dict(image_size=32, network_args=TINY_NETWORK, sampler="heun", n_steps=2, n_draws=1)
#: Absolute tolerance of the pinned metrics across CPUs.
TOLERANCE = 0.01
#: method -> (test volume Dice, test AUPRC) printed by this pipeline (see module docstring).
PINNED = {
    "oracle_reconstruction": (0.847, 0.954),
    "vejp_true_pairs": (0.192, 0.143),
    "flair_threshold": (0.833, 0.867),
}


@pytest.fixture(scope="module")
def ladder(phantom_dir, prepared_dir, twins_dir, tmp_path_factory) -> Path:
    """WORK_DIR of the tiny ladder run: prepared/, true_pairs/, vejp_true_pairs/, detections/, evaluation/."""
    work = tmp_path_factory.mktemp("ladder")
    (work / "prepared").symlink_to(prepared_dir, target_is_directory=True)
    write_true_pairs(twins_dir, prepared_dir, work / "true_pairs")
    configs = [str(VEJP / name) for name in ("train.yaml", "cpu.yaml", "train_true_pairs.yaml")]
    run("training", config_file=configs, logging_file=False, work_dir=str(work), **TINY_TRAIN)
    inference = [str(VEJP / name) for name in ("inference.yaml", "true_pairs.yaml")]
    for split in ("validation", "test"):
        run(
            "inference",
            config_file=inference,
            logging_file=False,
            work_dir=str(work),
            checkpoint=str(work / "vejp_true_pairs" / "model.pt"),
            datalist=str(prepared_dir / "volumes.json"),
            split=split,
            **TINY_SAMPLER,
        )
    baselines = [str(EVALUATION / "baselines.yaml")]
    run("flair_threshold", config_file=baselines, logging_file=False, work_dir=str(work))
    detect_oracle_splits(twins_dir, prepared_dir / "volumes.json", work / "detections", read_prepared(prepared_dir)[1])
    methods = [
        {"name": ORACLE_METHOD, "detection_dir": str(work / "detections" / ORACLE_METHOD), "role": "ceiling"},
        {"name": "vejp_true_pairs", "detection_dir": str(work / "detections" / "vejp_true_pairs"), "role": "reference"},
        {
            "name": "flair_threshold",
            "detection_dir": str(work / "detections" / "flair_threshold"),
            "fixed_weights": {"t1": 0.0, "t1ce": 0.0, "t2": 0.0, "flair": 1.0},
        },
    ]
    run_evaluation(prepared_dir, methods, work / "evaluation", CalibrationSettings(weight_step=0.25, search_bins=200, threshold_bins=500))
    return work


def test_true_pairs_pair_each_real_slice_with_its_twin(ladder, prepared_dir, twins_dir):
    pairs = json.loads((ladder / "true_pairs" / "pseudo_pairs.json").read_text())
    datalist = json.loads((prepared_dir / "datalist.json").read_text())
    assert len(pairs["training"]) == len(datalist["training"]) and len(pairs["validation"]) == len(datalist["validation"])
    volumes, preprocess, _ = read_prepared(prepared_dir)
    item = next(i for i in volumes["training"] if (twins_dir / i["subject"]).is_dir())  # a tumour subject
    twin = twin_slices(twins_dir, item["subject"], item, preprocess)
    pair = next(p for p in pairs["training"] if p["subject"] == item["subject"] and p["modality"] == "flair")
    np.testing.assert_array_equal(np.load(ladder / "true_pairs" / pair["image"]), twin["flair"][pair["z"] - preprocess.z_min])
    assert pair["condition"] == str(prepared_dir.resolve() / f"slices/{item['subject']}/flair_z{pair['z']:03d}.npy")


def test_true_pairs_get_the_pseudo_pairs_lesion_blending_and_placement(prepared_dir, twins_dir, tmp_path):
    """With the demo's treatment the condition keeps the twin's tissue outside the lesion region and takes the real
    lesion, moved to a random place of the brain (the same shift in every modality, the same files on a rerun)."""
    kwargs = dict(splits=("training",), lesion_blend_threshold=0.1)
    write_true_pairs(twins_dir, prepared_dir, tmp_path / "in_place", **kwargs)
    write_true_pairs(twins_dir, prepared_dir, tmp_path / "random", lesion_placement="random", **kwargs)
    write_true_pairs(twins_dir, prepared_dir, tmp_path / "again", lesion_placement="random", **kwargs)
    pairs = {name: json.loads((tmp_path / name / "pseudo_pairs.json").read_text())["training"] for name in ("in_place", "random", "again")}
    flair = [k for k, p in enumerate(pairs["random"]) if p["modality"] == "flair"]
    moved = 0
    for k in flair:
        pair = pairs["random"][k]
        twin = np.load(tmp_path / "random" / pair["image"])
        real = np.load(prepared_dir / f"slices/{pair['subject']}/flair_z{pair['z']:03d}.npy")
        in_place = np.load(tmp_path / "in_place" / pairs["in_place"][k]["condition"])
        condition = np.load(tmp_path / "random" / pair["condition"])
        np.testing.assert_array_equal(condition, np.load(tmp_path / "again" / pairs["again"][k]["condition"]))
        lesion = np.abs(in_place - twin) > 0
        # in place: the real lesion inside the blended region (far closer to the real slice than the twin is), the twin
        # elsewhere
        np.testing.assert_array_equal(in_place[~lesion], twin[~lesion])
        if lesion.any():
            assert np.abs(in_place - real)[lesion].mean() < 0.5 * np.abs(twin - real)[lesion].mean()
        if lesion.sum() > 20:
            changed = np.abs(condition - twin) > 0
            moved += int(not np.array_equal(changed, lesion))
            assert (twin[changed] > 0).all()  # the moved lesion lands in brain
    assert moved > 0
    with pytest.raises(ValueError, match="needs a lesion_blend_threshold"):
        write_true_pairs(twins_dir, prepared_dir, tmp_path / "bad", lesion_placement="random")


def test_oracle_reconstruction_is_the_twin_and_zero_on_healthy_tissue(ladder, prepared_dir, twins_dir):
    import nibabel as nib

    volumes, preprocess, _ = read_prepared(prepared_dir)
    for split in ("validation", "test"):
        for item in volumes[split]:
            folder = ladder / "detections" / ORACLE_METHOD / split / item["subject"]
            record = json.loads((folder / f"{item['subject']}_detection.json").read_text())
            assert "CEILING" in record["reconstruction"]["reconstruction"]
            anomaly = np.asarray(nib.load(str(folder / f"{item['subject']}_anomaly_flair.nii.gz")).dataobj)
            seg = np.asarray(nib.load(item["seg"]).dataobj) > 0
            if not seg.any():  # a healthy subject is its own twin: nothing to find
                assert not anomaly.any()


def test_ladder_rows_are_labelled_and_pinned(ladder):
    summary = json.loads((ladder / "evaluation" / "summary.json").read_text())
    markdown = (ladder / "evaluation" / "results.md").read_text()
    assert "oracle_reconstruction (CEILING)" in markdown and "vejp_true_pairs (REFERENCE)" in markdown
    assert "| flair_threshold |" in markdown and "CEILING rows are upper bounds by construction" in markdown
    assert [summary[m]["role"] for m in PINNED] == ["ceiling", "reference", None]
    measured = {m: (summary[m]["volume"]["dice"]["mean"], summary[m]["volume"]["auprc"]["mean"]) for m in PINNED}
    print("measured (volume Dice, AUPRC):", json.dumps(measured))
    for method, (dice, auprc) in PINNED.items():
        assert measured[method][0] == pytest.approx(dice, abs=TOLERANCE), method
        assert measured[method][1] == pytest.approx(auprc, abs=TOLERANCE), method
    # the oracle reconstruction bounds every learned row's threshold-free score on this data
    assert measured["oracle_reconstruction"][1] >= measured["vejp_true_pairs"][1] - TOLERANCE
