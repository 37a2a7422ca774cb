"""The weights the bundles ship (bundles/*/models): they match their provenance, load through each bundle's config,
run single-subject inference with no work dir, and still reconstruct a brain (a known-answer check)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser, run

from tsgm_components import REPO_ROOT
from tsgm_components.checkpoints import read_model_spec
from tsgm_components.data.brats import MODALITIES, load_subject, subject_files
from tsgm_components.data.preprocessing import preprocess_volume, volume_to_slices
from tsgm_components.translation import load_generator, saved_cyclegan_spec
from tsgm_components.weights import CALIBRATION, MAX_BYTES, SHIPPED

BUNDLES = REPO_ROOT / "bundles"
VEJP = BUNDLES / "vejp_anomaly" / "configs"
#: the known answer: the shipped TSGM model (default sampler, the posterior mean) reconstructs the healthy twin of a
#: phantom tumour slice (FLAIR, brain voxels outside the lesion) with mean error 0.019 and a residual 6.96× larger
#: inside the lesion than outside; the same network with random weights: 0.101 and 2.00 (its output is nearly
#: constant, so the residual is the input itself). The bounds sit between the two.
MAX_HEALTHY_ERROR = 0.05
MIN_LESION_CONTRAST = 4.0


@pytest.mark.parametrize("target", SHIPPED)
def test_shipped_file_matches_its_provenance_and_size_limit(target):
    path = BUNDLES / target
    provenance = json.loads(path.with_name(path.stem + "_provenance.json").read_text())
    assert path.stat().st_size <= MAX_BYTES
    assert provenance["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert provenance["command"].startswith("tsgm build_weights") and provenance["iterations"] > 0
    assert "not for real scans" in provenance["trained_on"]


@pytest.mark.parametrize("overlay, target", [([], "model.pt"), (["sdedit.yaml"], "unconditional.pt"),
                                             (["true_pairs.yaml"], "true_pairs.pt")])
def test_shipped_score_models_load_through_the_inference_config(overlay, target):
    parser = ConfigParser()
    parser.read_config([str(VEJP / "inference.yaml"), *(str(VEJP / name) for name in overlay)])
    parser.update({"device": "$torch.device('cpu')"})
    network = parser.get_parsed_content("network")  # the spec check runs here
    spec = read_model_spec(BUNDLES / "vejp_anomaly" / "models" / target)
    assert parser.get_parsed_content("image_size") == spec.preprocess.image_size == 64
    assert network.condition_channels == (0 if target == "unconditional.pt" else 1)


def test_shipped_generators_load_through_the_cyclegan_config():
    checkpoint = BUNDLES / "cyclegan_brats" / "models" / "model.pt"
    parser = ConfigParser()
    parser.read_config(str(BUNDLES / "cyclegan_brats" / "configs" / "inference.yaml"))
    assert parser.get_parsed_content("network_def").config == saved_cyclegan_spec(checkpoint)["generator"]
    preprocess = read_model_spec(BUNDLES / "vejp_anomaly" / "models" / "model.pt").preprocess
    for direction in ("AB", "BA"):
        load_generator(parser.get_parsed_content("network_def", lazy=False), checkpoint, direction, preprocess)


def test_shipped_model_reconstructs_a_phantom_brain_and_removes_its_lesion(phantom_dir, twins_dir):
    """Known answer: a tumour subject's FLAIR slices through its lesion, reconstructed by the shipped TSGM model
    (the default sampler), are close to the subject's healthy twin outside the lesion and differ from
    the input inside it. Fails if the weights stop reconstructing (noise reconstructions miss both bounds)."""
    parser = ConfigParser()
    parser.read_config(str(VEJP / "inference.yaml"))
    parser.update({"device": "$torch.device('cpu')"})
    network, inferer = parser.get_parsed_content("network"), parser.get_parsed_content("slice_inferer")
    preprocess = parser.get_parsed_content("preprocess")
    subject = sorted(p.name for p in twins_dir.iterdir() if p.is_dir())[0]
    real = load_subject(subject_files(phantom_dir / subject, require_seg=True), preprocess)
    twin = load_subject(subject_files(twins_dir / subject, require_seg=False), preprocess)
    flair = preprocess_volume(real.arrays["flair"], real.brain_mask, preprocess)[1]
    healthy_twin = preprocess_volume(twin.arrays["flair"], twin.brain_mask, preprocess)[1]
    lesion = volume_to_slices((real.seg > 0).astype(np.uint8), preprocess, is_mask=True) > 0
    rows = np.flatnonzero(lesion.reshape(len(lesion), -1).any(1))[::3][:6]
    assert len(rows) >= 3
    with torch.no_grad():
        healthy = inferer(torch.from_numpy(flair[rows, None]), network)[:, 0].numpy()
    inside, outside = lesion[rows], (flair[rows] > 0) & ~lesion[rows]
    healthy_error = float(np.abs(healthy - healthy_twin[rows])[outside].mean())
    residual = np.abs(flair[rows] - healthy)
    contrast = float(residual[inside].mean() / residual[outside].mean())
    assert healthy_error < MAX_HEALTHY_ERROR, healthy_error
    assert contrast > MIN_LESION_CONTRAST, contrast


def test_single_subject_inference_with_the_shipped_weights_and_calibration(phantom_dir, tmp_path, monkeypatch):
    """The README's out-of-the-box command (the default sampler), from a folder with no work dir: maps and a mask."""
    monkeypatch.chdir(tmp_path)
    subject = sorted(p for p in phantom_dir.iterdir() if p.is_dir())[0]
    out = tmp_path / "out"
    run("inference", config_file=str(VEJP / "inference.yaml"), logging_file=False, subject_dir=str(subject),
        detection_dir=str(out), device="$torch.device('cpu')")
    folder = out / subject.name
    mask = nib.load(str(folder / f"{subject.name}_mask.nii.gz"))
    assert mask.shape == nib.load(str(subject / f"{subject.name}_t1.nii.gz")).shape
    record = json.loads((folder / f"{subject.name}_detection.json").read_text())
    assert record["mask"]["threshold_source"].endswith(Path(CALIBRATION[1]).name)
    weighted = [m for m in MODALITIES if json.loads((REPO_ROOT / "bundles" / CALIBRATION[1]).read_text())["weights"][m] > 0]
    # only the modalities the shipped calibration weighs (chosen on validation with modality_tolerance)
    assert record["reconstructed_modalities"] == weighted and len(weighted) < len(MODALITIES)
    assert record["reconstruction"]["sampler"] == "posterior_mean" and record["reconstruction"]["nfe_per_slice"] == 1
    assert {m for m in MODALITIES if (folder / f"{subject.name}_healthy_{m}.nii.gz").is_file()} == set(weighted)
    assert not (tmp_path / "tsgm_work").exists()  # nothing written outside the detection folder
