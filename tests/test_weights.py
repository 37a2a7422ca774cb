"""Shipped weights: the export of a from-scratch demo run (provenance, size limit, no silent replacement)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from tsgm_components.checkpoints import SPEC_KEY, CycleGANSpec, ModelSpec
from tsgm_components.errors import TsgmInputError
from tsgm_components.networks.cyclegan import ResnetGenerator
from tsgm_components.networks.score import ScoreUNet
from tsgm_components.pipeline import PHANTOM_STEP, STEPS_RECORD, TRAINING_STEPS, WEIGHT_SETS
from tsgm_components.weights import BUILD_COMMANDS, export_weights

PREPROCESS = dict(
    z_min=2, z_max=5, image_size=32, pad_to=32, normalization="brain_median", median_target=0.4, lower_percentile=1.0, upper_percentile=99.0
)
NETWORK = dict(
    condition_channels=1, channels=[8, 16], attention_levels=[False, False], num_res_blocks=1, num_head_channels=8, norm_num_groups=8, sigma_data=0.5
)


@pytest.fixture()
def demo_run(tmp_path) -> Path:
    """A work dir as `tsgm demo --from_scratch True` leaves it, with tiny models."""
    work = tmp_path / "work"
    (work / "prepared").mkdir(parents=True)
    (work / "prepared" / "prepare_config.json").write_text(json.dumps(dict(PREPROCESS, seed=0)))
    torch.manual_seed(0)
    for folder, condition in (("vejp", 1), ("vejp_unconditional", 0), ("vejp_true_pairs", 1), ("vejp_regression", 1)):
        network = dict(NETWORK, condition_channels=condition)
        spec = ModelSpec(PREPROCESS, network, {"sigma_min": 0.01, "sigma_max": 20.0})
        (work / folder / "checkpoints").mkdir(parents=True)
        torch.save({"model": ScoreUNet(**network).state_dict(), "model_spec": spec.state_dict()}, work / folder / "model.pt")
        torch.save({"trainer": {"iteration": 6000, "epoch": 120}}, work / folder / "checkpoints" / "checkpoint_final.pt")
    generator = ResnetGenerator(4, 4, ngf=4, n_blocks=1)
    state = {
        "G_AB": generator.state_dict(),
        "G_BA": generator.state_dict(),
        "D_A": {"w": torch.zeros(3)},
        "optimizer_G": {},
        SPEC_KEY: CycleGANSpec(PREPROCESS, generator.config).state_dict(),
    }
    (work / "cyclegan").mkdir()
    torch.save(state, work / "cyclegan" / "model.pt")
    torch.save({"trainer": {"iteration": 2400, "epoch": 8}}, work / "cyclegan" / "checkpoint_epoch=8.pt")
    (work / "calibration" / "tsgm").mkdir(parents=True)
    (work / "calibration" / "tsgm" / "calibration.json").write_text(json.dumps({"weights": {"flair": 1.0}, "threshold": 0.1}))
    steps = {name: {"command": f"python -m monai.bundle run training ... {folder}", "seconds": 100.0} for folder, name in TRAINING_STEPS.items()}
    steps[PHANTOM_STEP] = {"command": "tsgm phantom --out W/phantom --n_subjects 40 --seed 0", "seconds": 50.0}
    steps[TRAINING_STEPS["vejp"]]["commit"] = "0123abc"  # run_steps records the commit a step started at
    (work / STEPS_RECORD).write_text(json.dumps(steps))
    return work


@pytest.mark.parametrize("weights", ["phantom", "real"])
def test_export_keeps_inference_entries_and_writes_provenance(demo_run, tmp_path, weights):
    bundles = tmp_path / "bundles"
    written = export_weights(demo_run, weights, bundles=bundles)
    shipped = WEIGHT_SETS[weights]
    assert len(written) == 2 * len(shipped) + 1
    cyclegan = torch.load(bundles / shipped["cyclegan"], weights_only=True)
    assert set(cyclegan) == {"G_AB", "G_BA", SPEC_KEY}  # discriminators and optimisers stay behind
    for folder, target in shipped.items():
        path = bundles / target
        provenance = json.loads(path.with_name(path.stem + "_provenance.json").read_text())
        assert provenance["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest() and provenance["data_kind"] == weights
        assert provenance["command"] == BUILD_COMMANDS[weights] and provenance["wall_time_s"] == 100.0
        assert provenance["training_step"].endswith(folder)
        assert provenance["iterations"] == (2400 if folder == "cyclegan" else 6000)
        assert provenance["data"]["phantom"].startswith("tsgm phantom") and provenance["data"]["prepare_config"]["seed"] == 0
        assert provenance["machine"]["torch"] == torch.__version__
        # the commit the model was trained at; a record without one (older runs) gets the code's commit at export
        assert (provenance["commit"] == "0123abc") == (folder == "vejp") and provenance["commit"]
        assert ("not for real scans" in provenance["trained_on"]) == (weights == "phantom")
    calibration = bundles / shipped["vejp"].replace(".pt", "_calibration.json")
    assert json.loads(calibration.read_text())["threshold"] == 0.1

    before = (bundles / shipped["vejp"]).read_bytes()
    with pytest.raises(FileExistsError):  # shipped weights are never replaced silently
        export_weights(demo_run, weights, bundles=bundles)
    assert (bundles / shipped["vejp"]).read_bytes() == before
    export_weights(demo_run, weights, overwrite=True, bundles=bundles)


def test_export_of_some_models_leaves_the_others_shipped(demo_run, tmp_path):
    bundles = tmp_path / "bundles"
    export_weights(demo_run, "real", bundles=bundles)
    kept = {t: (bundles / t).read_bytes() for t in ("vejp_anomaly/models/unconditional.pt", "vejp_anomaly/models/model.pt")}
    kept["calibration"] = (bundles / "vejp_anomaly" / "models" / "model_calibration.json").read_bytes()
    generator = ResnetGenerator(4, 4, ngf=4, n_blocks=1)  # a retrained stage 1
    state = torch.load(demo_run / "cyclegan" / "model.pt", weights_only=True)
    torch.save(dict(state, G_AB=generator.state_dict()), demo_run / "cyclegan" / "model.pt")
    (demo_run / "vejp_unconditional" / "model.pt").unlink()  # not asked for: not needed
    written = export_weights(demo_run, "real", overwrite=True, bundles=bundles, models=["cyclegan"])
    assert [p.name for p in written] == ["model.pt", "model_provenance.json"]
    shipped = torch.load(bundles / "cyclegan_brats" / "models" / "model.pt", weights_only=True)
    assert all(torch.equal(shipped["G_AB"][k], v) for k, v in generator.state_dict().items())
    assert kept == {
        **{t: (bundles / t).read_bytes() for t in kept if t != "calibration"},
        "calibration": (bundles / "vejp_anomaly" / "models" / "model_calibration.json").read_bytes(),
    }
    with pytest.raises(ValueError, match="models must be among"):
        export_weights(demo_run, "real", bundles=bundles, models=["vjep"])
    with pytest.raises(ValueError, match="weights must be one of"):
        export_weights(demo_run, "mni", bundles=bundles)


def test_export_refuses_an_unfinished_run(demo_run, tmp_path):
    (demo_run / "vejp_unconditional" / "model.pt").unlink()
    with pytest.raises(TsgmInputError, match="checkpoint not found"):
        export_weights(demo_run, "phantom", bundles=tmp_path / "bundles")
    assert not (tmp_path / "bundles" / "vejp_anomaly" / "models" / "phantom_unconditional.pt").exists()
