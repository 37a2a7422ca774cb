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
from tsgm_components.checkpoints import checked_provenance
from tsgm_components.errors import TsgmInputError
from tsgm_components.pipeline import WEIGHT_SETS
from tsgm_components.stage1.translation import load_generator, saved_cyclegan_spec
from tsgm_components.weights import MAX_BYTES, calibration_target

BUNDLES = REPO_ROOT / "bundles"
VEJP = BUNDLES / "vejp_anomaly" / "configs"
PHANTOM = {folder: BUNDLES / target for folder, target in WEIGHT_SETS["phantom"].items()}
#: the known answer: the shipped phantom TSGM model (default sampler, the posterior mean) reconstructs the healthy twin
#: of a phantom tumour slice (FLAIR, brain voxels outside the lesion) with mean error 0.019 and a residual 6.96× larger
#: inside the lesion than outside; the same network with random weights: 0.101 and 2.00 (its output is nearly
#: constant, so the residual is the input itself). The bounds sit between the two.
MAX_HEALTHY_ERROR = 0.05
MIN_LESION_CONTRAST = 4.0
SHIPPED = [(weights, target) for weights, targets in WEIGHT_SETS.items() for target in targets.values()]


@pytest.mark.parametrize("weights, target", SHIPPED)
def test_shipped_file_matches_its_provenance_and_size_limit(weights, target):
    path = BUNDLES / target
    provenance = checked_provenance(path)  # the SHA-256 check inference runs
    assert path.stat().st_size <= MAX_BYTES
    assert provenance["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest() and provenance["file"] == target
    assert provenance["data_kind"] == weights and provenance["iterations"] > 0
    assert provenance["command"].startswith("tsgm build_weights" if weights == "phantom" else "tsgm real_data")
    assert ("not for real scans" in provenance["trained_on"]) == (weights == "phantom")
    if target.endswith("vejp_anomaly/models/" + Path(WEIGHT_SETS[weights]["vejp"]).name):
        assert (BUNDLES / calibration_target(target)).is_file()


def test_a_damaged_shipped_file_is_refused_at_load_with_one_line(tmp_path):
    for name in ("phantom.pt", "phantom_provenance.json"):
        (tmp_path / name).write_bytes((BUNDLES / "vejp_anomaly" / "models" / name).read_bytes())
    data = bytearray((tmp_path / "phantom.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (tmp_path / "phantom.pt").write_bytes(bytes(data))
    with pytest.raises(TsgmInputError, match=r"phantom\.pt: the file differs from the one phantom_provenance\.json records"):
        checked_provenance(tmp_path / "phantom.pt")


@pytest.mark.parametrize(
    "overlay, checkpoint",
    [([], None), (["sdedit.yaml"], None), (["true_pairs.yaml"], None), ([], PHANTOM["vejp"]), (["sdedit.yaml"], PHANTOM["vejp_unconditional"])],
)
def test_shipped_score_models_load_through_the_inference_config(overlay, checkpoint):
    """The configs' defaults are the real set (the true-pairs model exists for the phantom only); --checkpoint names
    the phantom set."""
    parser = ConfigParser()
    parser.read_config([str(VEJP / "inference.yaml"), *(str(VEJP / name) for name in overlay)])
    parser.update({"device": "$torch.device('cpu')", **({"checkpoint": str(checkpoint)} if checkpoint else {})})
    network = parser.get_parsed_content("network")  # the spec and SHA-256 checks run here
    path = Path(parser.get_parsed_content("checkpoint"))
    expected = {(): "model.pt", ("sdedit.yaml",): "unconditional.pt", ("true_pairs.yaml",): "phantom_true_pairs.pt"}
    assert path == (checkpoint or BUNDLES / "vejp_anomaly" / "models" / expected[tuple(overlay)])
    assert parser.get_parsed_content("image_size") == read_model_spec(path).preprocess.image_size == 64
    assert network.condition_channels == (0 if overlay == ["sdedit.yaml"] else 1)
    assert parser.get_parsed_content("weights_data") == ("phantom" if "phantom" in path.name else "real")


@pytest.mark.parametrize("weights", sorted(WEIGHT_SETS))
def test_shipped_generators_load_through_the_cyclegan_config(weights):
    checkpoint = BUNDLES / WEIGHT_SETS[weights]["cyclegan"]
    parser = ConfigParser()
    parser.read_config(str(BUNDLES / "cyclegan_brats" / "configs" / "inference.yaml"))
    parser.update({"checkpoint": str(checkpoint)})
    assert parser.get_parsed_content("network_def").config == saved_cyclegan_spec(checkpoint)["generator"]
    preprocess = read_model_spec(BUNDLES / WEIGHT_SETS[weights]["vejp"]).preprocess
    for direction in ("AB", "BA"):
        load_generator(parser.get_parsed_content("network_def", lazy=False), checkpoint, direction, preprocess)


def test_shipped_model_reconstructs_a_phantom_brain_and_removes_its_lesion(phantom_dir, twins_dir):
    """Known answer: a tumour subject's FLAIR slices through its lesion, reconstructed by the shipped TSGM model
    (the default sampler), are close to the subject's healthy twin outside the lesion and differ from
    the input inside it. Fails if the weights stop reconstructing (noise reconstructions miss both bounds)."""
    parser = ConfigParser()
    parser.read_config(str(VEJP / "inference.yaml"))
    parser.update({"device": "$torch.device('cpu')", "checkpoint": str(PHANTOM["vejp"])})
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


def test_single_subject_inference_with_the_shipped_weights_and_calibration(phantom_dir, tmp_path, monkeypatch, caplog):
    """The README's out-of-the-box command (the default sampler), from a folder with no work dir, with the phantom set
    named as the demo names it: maps and a mask, its calibration read beside it. The default (real) weights on the
    same phantom subject warn that they meet a scan of the other kind."""
    monkeypatch.chdir(tmp_path)
    subject = sorted(p for p in phantom_dir.iterdir() if p.is_dir())[0]
    out = tmp_path / "out"
    with caplog.at_level("INFO"):
        run(
            "inference",
            config_file=str(VEJP / "inference.yaml"),
            logging_file=False,
            subject_dir=str(subject),
            detection_dir=str(out),
            device="$torch.device('cpu')",
            checkpoint=str(PHANTOM["vejp"]),
        )
    assert "trained on the phantom dataset" in caplog.text and "applied to a" not in caplog.text
    folder = out / subject.name
    mask = nib.load(str(folder / f"{subject.name}_mask.nii.gz"))
    assert mask.shape == nib.load(str(subject / f"{subject.name}_t1.nii.gz")).shape
    record = json.loads((folder / f"{subject.name}_detection.json").read_text())
    calibration = BUNDLES / calibration_target(WEIGHT_SETS["phantom"]["vejp"])
    assert record["mask"]["threshold_source"].endswith(calibration.name)
    weighted = [m for m in MODALITIES if json.loads(calibration.read_text())["weights"][m] > 0]
    # only the modalities the shipped calibration weighs (chosen on validation with modality_tolerance)
    assert record["reconstructed_modalities"] == weighted and len(weighted) < len(MODALITIES)
    assert record["reconstruction"]["sampler"] == "posterior_mean" and record["reconstruction"]["nfe_per_slice"] == 1
    assert {m for m in MODALITIES if (folder / f"{subject.name}_healthy_{m}.nii.gz").is_file()} == set(weighted)
    assert not (tmp_path / "tsgm_work").exists()  # nothing written outside the detection folder
    caplog.clear()
    with caplog.at_level("INFO"):
        run(
            "inference",
            config_file=str(VEJP / "inference.yaml"),
            logging_file=False,
            subject_dir=str(subject),
            detection_dir=str(tmp_path / "real_weights"),
            device="$torch.device('cpu')",
        )
    assert "trained on 20 real BraTS 2018" in caplog.text
    assert "weights trained on real scans applied to a phantom scan" in caplog.text
