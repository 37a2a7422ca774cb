"""Inference needs only the modalities the calibration weighs: a FLAIR-only (or T1ce-only) folder detects with weights
that weigh that modality alone, and a missing weighted modality is a one-line error naming the file expected."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from monai.bundle import ConfigParser, run

from tsgm_components import REPO_ROOT
from tsgm_components.data.brats import MODALITIES
from tsgm_components.detection.detector import run_detection
from tsgm_components.detection.masking import Calibration
from tsgm_components.errors import TsgmInputError

VEJP = REPO_ROOT / "bundles" / "vejp_anomaly"
PHANTOM_MODEL = VEJP / "models" / "phantom.pt"
#: the shipped default calibration (real weights) weighs T2 and FLAIR
DEFAULT_CALIBRATION = VEJP / "models" / "model_calibration.json"


def _only(subject: Path, modality: str, tmp_path: Path) -> Path:
    """A copy of a phantom subject folder holding only ``modality`` (the other images and the seg deleted)."""
    folder = tmp_path / "only" / subject.name
    folder.mkdir(parents=True)
    shutil.copy(subject / f"{subject.name}_{modality}.nii.gz", folder)
    return folder


def _detect(subject_dir: Path, out: Path, calibration: Path) -> Path:
    run(
        "inference",
        config_file=str(VEJP / "configs" / "inference.yaml"),
        logging_file=False,
        subject_dir=str(subject_dir),
        detection_dir=str(out),
        device="$torch.device('cpu')",
        checkpoint=str(PHANTOM_MODEL),
        calibration_file=str(calibration),
        **{"slice_inferer#progress": False},
    )
    return out / subject_dir.name


@pytest.mark.parametrize("modality", ["flair", "t1ce"])
def test_a_folder_with_the_weighted_modality_alone_gives_the_full_folders_mask(phantom_dir, tmp_path, modality):
    subject = sorted(p for p in phantom_dir.iterdir() if p.is_dir())[0]
    calibration = Calibration.load(VEJP / "models" / "phantom_calibration.json")
    alone = Calibration({m: float(m == modality) for m in MODALITIES}, "fixed", calibration.threshold).save(tmp_path / "calibration.json")
    full = _detect(subject, tmp_path / "full", alone)
    only = _detect(_only(subject, modality, tmp_path), tmp_path / "only_out", alone)
    record = json.loads((only / f"{subject.name}_detection.json").read_text())
    assert record["reconstructed_modalities"] == [modality] and list(record["inputs"]) == [modality]
    for name in ("mask", "anomaly", f"anomaly_{modality}", f"healthy_{modality}"):
        expected = nib.load(str(full / f"{subject.name}_{name}.nii.gz"))
        got = nib.load(str(only / f"{subject.name}_{name}.nii.gz"))
        np.testing.assert_array_equal(np.asarray(got.dataobj), np.asarray(expected.dataobj), err_msg=name)
        np.testing.assert_array_equal(got.affine, expected.affine)
    assert np.asarray(nib.load(str(only / f"{subject.name}_mask.nii.gz")).dataobj).any()


def test_a_missing_weighted_modality_is_named_by_the_bundle_command(phantom_dir, tmp_path):
    """The default calibration weighs T2 and FLAIR: a FLAIR-only folder is refused, exit 2, one line naming the T2 file
    expected and that the calibration weighs it; nothing is written."""
    subject = sorted(p for p in phantom_dir.iterdir() if p.is_dir())[0]
    folder = _only(subject, "flair", tmp_path)
    weights = Calibration.load(DEFAULT_CALIBRATION).weights
    assert weights["t2"] > 0 and weights["flair"] > 0
    out = tmp_path / "detections"
    command = [sys.executable, "-m", "monai.bundle", "run", "inference", "--config_file", str(VEJP / "configs" / "inference.yaml")]
    command += ["--subject_dir", str(folder), "--detection_dir", str(out), "--device", "$torch.device('cpu')"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    expected = folder / f"{subject.name}_t2.nii.gz"
    assert last.startswith(f"tsgm: error: {expected}: missing t2 file for subject {subject.name}"), last
    assert f"the calibration weighs t2 (weight {weights['t2']:g}; calibration {DEFAULT_CALIBRATION.resolve()})" in last, last
    assert not (out / subject.name).exists() and not (tmp_path / "tsgm_work").exists()


def test_explicit_files_need_only_the_weighted_ones(phantom_dir, tmp_path):
    subject = sorted(p for p in phantom_dir.iterdir() if p.is_dir())[0]
    calibration = Calibration({m: float(m == "flair") for m in MODALITIES}, "fixed", 0.2).save(tmp_path / "calibration.json")
    flair = subject / f"{subject.name}_flair.nii.gz"
    common = dict(
        config_file=str(VEJP / "configs" / "inference.yaml"),
        logging_file=False,
        device="$torch.device('cpu')",
        checkpoint=str(PHANTOM_MODEL),
        **{"slice_inferer#progress": False},
    )
    run("inference", flair=str(flair), detection_dir=str(tmp_path / "out"), calibration_file=str(calibration), **common)
    assert (tmp_path / "out" / subject.name / f"{subject.name}_mask.nii.gz").is_file()
    parser = ConfigParser()
    parser.read_config(str(VEJP / "configs" / "inference.yaml"))
    parser.update({"checkpoint": str(PHANTOM_MODEL), "calibration_file": str(DEFAULT_CALIBRATION), "device": "$torch.device('cpu')"})
    t2_weight = json.loads(DEFAULT_CALIBRATION.read_text())["weights"]["t2"]  # the shipped calibration weighs T2
    assert t2_weight > 0
    with pytest.raises(TsgmInputError, match=rf"no t2 file given \(--t2\); the calibration weighs t2 \(weight {t2_weight:g}; calibration "):
        run_detection(tmp_path / "default", parser.get_parsed_content("detector"), files={"flair": str(flair)})
    assert not (tmp_path / "default").exists()
