"""VE-JP bundle: configs, training/resume, inference outputs in input geometry, calibration, bad inputs.

Everything runs in one process through ``monai.bundle.run`` on tiny synthetic data (32² slices, 4 axial slices,
a 20×24×8 subject), except one subprocess that checks the command-line exit status.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import ignite.distributed as idist
import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser, run

import tsgm_components
from tsgm_components.checkpoints import ModelSpec, read_model_spec
from tsgm_components.data.brats import MODALITIES
from tsgm_components.detection.ensembling import PAPER_WEIGHTS
from tsgm_components.errors import TsgmInputError

CONFIGS = Path(tsgm_components.bundle_dir("vejp_anomaly")) / "configs"
TRAIN, CPU, INFER = CONFIGS / "train.yaml", CONFIGS / "cpu.yaml", CONFIGS / "inference.yaml"
UNCONDITIONAL, MULTI_GPU = CONFIGS / "train_unconditional.yaml", CONFIGS / "multi_gpu_train.yaml"
FOUR_CHANNEL = CONFIGS / "four_channel.yaml"

SHAPE = (20, 24, 8)
AFFINE = np.array([[-1.0, 0, 0, 10], [0, -1.2, 0, 14], [0, 0, 2.0, -6], [0, 0, 0, 1]])
PREPROCESS = dict(
    z_min=2,
    z_max=5,
    image_size=32,
    pad_to=32,
    normalization="brain_median",
    median_target=0.4,
    lower_percentile=1.0,
    upper_percentile=99.0,
    orientation=None,
    voxel_size=None,
    volume_shape=None,
)
N_PAIRS, BATCH = 8, 4
TINY_TRAIN = dict(image_size=32, max_epochs=1, epoch_length="$None", batch_size=BATCH, warmup_steps=2, log_interval=1)
TINY_SAMPLER = dict(sampler="heun", n_steps=3, n_draws=2, sample_batch_size=16)


def run_bundle(run_id: str, configs: list[Path], **overrides) -> None:
    run(run_id, config_file=[str(c) for c in configs], logging_file=False, **overrides)


def input_error(excinfo: pytest.ExceptionInfo) -> TsgmInputError:
    """The TsgmInputError behind an exception raised through MONAI's config evaluation (which wraps errors)."""
    error: BaseException | None = excinfo.value
    while error is not None and not isinstance(error, TsgmInputError):
        error = error.__cause__ or error.__context__
    assert error is not None, f"no TsgmInputError behind {excinfo.value!r}"
    return error


def write_subject(folder: Path, shape=SHAPE, affine=AFFINE) -> Path:
    """A BraTS-layout subject: an ellipsoid brain with a bright blob (the 'tumour') in T2/FLAIR."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    brain = (grid**2).sum(0) < 0.9
    blob = ((grid - np.array([0.3, 0.2, 0.0])[:, None, None, None]) ** 2).sum(0) < 0.08
    for i, modality in enumerate(MODALITIES):
        data = brain * (100 + 10 * i + 5 * rng.standard_normal(shape)) + blob * 60 * (modality in ("t2", "flair"))
        nib.save(nib.Nifti1Image(data.astype(np.float32), affine), str(folder / f"{folder.name}_{modality}.nii.gz"))
    return folder


@pytest.fixture(scope="module")
def work_dir(tmp_path_factory) -> Path:
    """A work dir with prepared/ (config + datalist) and pseudo_pairs/ as the earlier pipeline steps leave them."""
    work = tmp_path_factory.mktemp("vejp") / "work"
    prepared, pairs = work / "prepared", work / "pseudo_pairs"
    (prepared / "slices" / "S0").mkdir(parents=True)
    (pairs / "slices" / "S0").mkdir(parents=True)
    (prepared / "prepare_config.json").write_text(json.dumps(dict(PREPROCESS, seed=0)))
    rng = np.random.default_rng(0)
    pair_items, slice_items = [], []
    for i in range(N_PAIRS):
        healthy = rng.random((32, 32)).astype(np.float32)
        name = f"slices/S0/t1_z{i:03d}.npy"
        np.save(prepared / name, healthy)
        np.save(pairs / name, np.clip(healthy + 0.5 * (rng.random((32, 32)) > 0.9), 0, 1).astype(np.float32))
        pair_items.append({"image": str(prepared / name), "condition": name, "subject": "S0", "modality": "t1", "z": i})
        slice_items.append({"image": name, "subject": "S0", "modality": "t1", "z": i, "tumour": int(i % 2)})
    (pairs / "pseudo_pairs.json").write_text(json.dumps({"training": pair_items, "validation": pair_items[:2]}))
    (prepared / "datalist.json").write_text(json.dumps({"training": slice_items, "validation": [], "test": []}))
    return work


@pytest.fixture(scope="module")
def trained(work_dir) -> Path:
    run_bundle("training", [TRAIN, CPU], work_dir=str(work_dir), **TINY_TRAIN)
    return work_dir


def infer(work: Path, *extra_configs: Path, **overrides) -> Path:
    """Run the inference bundle with the model trained in WORK (mean of 2 draws of 5 NFE per slice) and return its
    detection folder."""
    out = work / "detections" / overrides.pop("name", "run")
    overrides = {"checkpoint": str(work / "vejp" / "model.pt"), **TINY_SAMPLER, **overrides}
    run_bundle("inference", [INFER, *extra_configs], work_dir=str(work), detection_dir=str(out), **overrides)
    return out


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


# ---------------------------------------------------------------- configs


def test_paper_and_cpu_configs_build_their_networks():
    paper = ConfigParser()
    paper.read_config([str(TRAIN)])
    network = paper.get_parsed_content("network_def")
    assert network.condition_channels == 1 and paper["image_size"] == 256 and paper["sigma_min"] == 0.01
    assert 60e6 < sum(p.numel() for p in network.parameters()) < 70e6  # the paper-scale UNet, not run here
    cpu = ConfigParser()
    cpu.read_config([str(TRAIN), str(CPU)])
    small = cpu.get_parsed_content("network_def")
    assert sum(p.numel() for p in small.parameters()) < 2e6
    x = torch.rand(2, 1, 64, 64)
    assert small(x, torch.tensor([0.1, 10.0]), x).shape == (2, 1, 64, 64)


@pytest.mark.parametrize("overrides", [[], [CPU], [CPU, UNCONDITIONAL]])
def test_inference_builds_the_model_its_checkpoint_records(overrides, tmp_path):
    """Image size, network and σ range come from the checkpoint's model_spec: one inference config for every scale."""
    train = ConfigParser()
    train.read_config([str(TRAIN), *map(str, overrides)])
    keys = ("image_size", "network_args", "sigma_min", "sigma_max", "n_scales")
    trained = {k: train.get_parsed_content(k) for k in keys}
    spec = ModelSpec(
        dict(PREPROCESS, image_size=trained["image_size"], pad_to=trained["image_size"]),
        trained["network_args"],
        {"sigma_min": trained["sigma_min"], "sigma_max": trained["sigma_max"]},
    )
    torch.save({"model_spec": spec.state_dict()}, tmp_path / "model.pt")
    inference = ConfigParser()
    inference.read_config([str(INFER)])
    inference.update({"checkpoint": str(tmp_path / "model.pt")})
    assert {k: inference.get_parsed_content(k) for k in keys} == trained
    assert inference.get_parsed_content("network_def").condition_channels == (0 if UNCONDITIONAL in overrides else 1)


def test_fine_tuning_starts_from_a_finished_models_weights_and_refuses_another_spec(tmp_path):
    """init_checkpoint (train.yaml): the training network starts with the given model's weights, in train mode; a
    model of another spec is refused naming the differing key; None keeps the fresh initialisation."""
    from tsgm_components.checkpoints import initial_score_weights
    from tsgm_components.networks.score import ScoreUNet

    network_args = dict(
        condition_channels=1,
        channels=[8, 16],
        attention_levels=[False, False],
        num_res_blocks=1,
        num_head_channels=8,
        norm_num_groups=8,
        sigma_data=0.5,
    )
    spec = ModelSpec(dict(z_min=2, z_max=5, image_size=16, pad_to=16), network_args, {"sigma_min": 0.01, "sigma_max": 20.0})
    torch.manual_seed(0)
    finished = ScoreUNet(**network_args)
    torch.save({"model": finished.state_dict(), "model_spec": spec.state_dict()}, tmp_path / "model.pt")
    torch.manual_seed(1)
    fresh = ScoreUNet(**network_args)
    assert initial_score_weights(fresh, None, spec) is fresh
    started = initial_score_weights(ScoreUNet(**network_args), tmp_path / "model.pt", spec)
    assert started.training and all(torch.equal(a, b) for a, b in zip(started.state_dict().values(), finished.state_dict().values()))
    other = ModelSpec(dict(z_min=2, z_max=5, image_size=16, pad_to=16), network_args, {"sigma_min": 0.01, "sigma_max": 30.0})
    with pytest.raises(TsgmInputError, match="sigma_max"):
        initial_score_weights(ScoreUNet(**network_args), tmp_path / "model.pt", other)


def test_weights_of_the_other_data_kind_warn(caplog):
    """Phantom weights on a real scan, or real weights on a phantom volume (its header says so), log a warning."""
    from tsgm_components.data.phantom import PHANTOM_DESCRIPTION
    from tsgm_components.detection.detector import warn_on_data_mismatch

    real = nib.Nifti1Image(np.zeros((2, 2, 2), np.float32), np.eye(4))
    phantom = nib.Nifti1Image(np.zeros((2, 2, 2), np.float32), np.eye(4))
    phantom.header["descrip"] = PHANTOM_DESCRIPTION
    with caplog.at_level(logging.WARNING):
        assert warn_on_data_mismatch("phantom", real, "case_a")
        assert "case_a: weights trained on the phantom applied to a real-looking scan" in caplog.text
        assert warn_on_data_mismatch("real", phantom, "case_b") and "case_b: weights trained on real scans applied to a phantom scan" in caplog.text
        assert not any(
            warn_on_data_mismatch(kind, image, "c") for kind, image in (("phantom", phantom), ("real", real), (None, real), (None, phantom))
        )


def test_inference_defaults_to_the_shipped_weights():
    inference = ConfigParser()
    inference.read_config([str(INFER)])
    assert Path(inference.get_parsed_content("checkpoint")) == CONFIGS.parent / "models" / "model.pt"
    for overlay, name in (("sdedit.yaml", "unconditional.pt"), ("true_pairs.yaml", "phantom_true_pairs.pt")):
        inference = ConfigParser()
        inference.read_config([str(INFER), str(CONFIGS / overlay)])
        assert Path(inference.get_parsed_content("checkpoint")) == CONFIGS.parent / "models" / name


def test_multi_gpu_config_merges():
    parser = ConfigParser()
    parser.read_config([str(TRAIN), str(CPU), str(MULTI_GPU)])
    assert parser["train_sampler"]["_target_"] == "DistributedSampler"
    assert any("init_process_group" in step for step in parser["initialize"])


# ---------------------------------------------------------------- training


def test_training_writes_checkpoints_and_resume_continues(trained):
    final = trained / "vejp" / "checkpoints" / "checkpoint_final.pt"
    state = torch.load(final, weights_only=True)
    assert state["trainer"]["iteration"] == N_PAIRS // BATCH
    assert state["model_spec"]["preprocess"] == PREPROCESS
    assert {"network", "network_ema", "optimizer", "lr_scheduler", "rng"} <= set(state)
    model = torch.load(trained / "vejp" / "model.pt", weights_only=True)
    assert set(model) == {"model", "model_spec"}
    assert torch.equal(model["model"]["unet.conv_in.conv.weight"], state["network_ema"]["unet.conv_in.conv.weight"])

    with pytest.raises(Exception) as excinfo:  # a fresh run would mix with the earlier run's checkpoints
        run_bundle("training", [TRAIN, CPU], work_dir=str(trained), **TINY_TRAIN)
    assert "--resume True" in str(input_error(excinfo))

    run_bundle("training", [TRAIN, CPU], work_dir=str(trained), resume=True, **dict(TINY_TRAIN, max_epochs=2))
    resumed = torch.load(final, weights_only=True)
    assert resumed["trainer"]["iteration"] == 2 * N_PAIRS // BATCH
    assert not torch.equal(resumed["network"]["unet.conv_in.conv.weight"], state["network"]["unet.conv_in.conv.weight"])


def test_unconditional_training_uses_healthy_slices_only(work_dir):
    run_bundle("training", [TRAIN, CPU, UNCONDITIONAL], work_dir=str(work_dir), **dict(TINY_TRAIN, batch_size=2))
    state = torch.load(work_dir / "vejp_unconditional" / "model.pt", weights_only=True)
    assert state["model_spec"]["network"]["condition_channels"] == 0
    final = torch.load(work_dir / "vejp_unconditional" / "checkpoints" / "checkpoint_final.pt", weights_only=True)
    assert final["trainer"]["iteration"] == (N_PAIRS // 2) // 2  # 4 healthy slices, batch 2


def test_four_channel_model_trains_on_stacked_pairs_and_detects_all_modalities(work_dir, tmp_path):
    """Table III's four-channel stage 2: trained on the four modalities' pairs of each axial slice, then detection
    reconstructs all four modalities even when asked for the weighted ones only (its samples hold all four)."""
    pairs = work_dir / "pseudo_pairs"
    items = json.loads((pairs / "pseudo_pairs.json").read_text())["training"]
    stacked = []
    for item in items[:3]:  # 3 axial slices: t1 exists; add the other modalities' pairs (copies: content is not the point)
        for modality in MODALITIES[1:]:
            name = item["condition"].replace("/t1_", f"/{modality}_")
            np.save(pairs / name, np.load(pairs / item["condition"]))
            np.save(work_dir / "prepared" / name, np.load(item["image"]))
            stacked.append(dict(item, image=str(work_dir / "prepared" / name), condition=name, modality=modality))
    four = tmp_path / "work"
    four.mkdir()
    (four / "prepared").symlink_to(work_dir / "prepared")
    (four / "pseudo_pairs").mkdir()
    (four / "pseudo_pairs" / "slices").symlink_to(pairs / "slices")
    (four / "pseudo_pairs" / "pseudo_pairs.json").write_text(json.dumps({"training": items[:3] + stacked, "validation": items[:1]}))
    run_bundle("training", [TRAIN, CPU, FOUR_CHANNEL], work_dir=str(four), **dict(TINY_TRAIN, batch_size=1))
    state = torch.load(four / "vejp_four_channel" / "model.pt", weights_only=True)
    assert state["model_spec"]["network"]["image_channels"] == state["model_spec"]["network"]["condition_channels"] == 4
    assert state["model"]["unet.conv_in.conv.weight"].shape[1] == 8  # 4 noisy healthy + 4 condition channels
    final = torch.load(four / "vejp_four_channel" / "checkpoints" / "checkpoint_final.pt", weights_only=True)
    assert final["trainer"]["iteration"] == 3  # one sample per axial slice, batch 1

    subject = write_subject(tmp_path / "data" / "S001")
    calibration = tmp_path / "calibration.json"
    calibration.write_text(json.dumps({"weights": {"t1": 0.0, "t1ce": 0.0, "t2": 0.0, "flair": 1.0}, "threshold": 0.05, "mode": "fixed"}))
    out = tmp_path / "detections"
    run_bundle("inference", [INFER], work_dir=str(four), detection_dir=str(out), checkpoint=str(four / "vejp_four_channel" / "model.pt"),
               subject_dir=str(subject), calibration_file=str(calibration), reconstruct_modalities="weighted", **TINY_SAMPLER)  # fmt: skip
    record = json.loads((out / "S001" / "S001_detection.json").read_text())
    assert record["reconstructed_modalities"] == list(MODALITIES)
    assert {p.name for p in (out / "S001").glob("S001_healthy_*.nii.gz")} == {f"S001_healthy_{m}.nii.gz" for m in MODALITIES}


# ---------------------------------------------------------------- inference


@pytest.fixture(scope="module")
def subject(trained) -> Path:
    return write_subject(trained / "data" / "S001")


def test_inference_writes_maps_in_input_geometry_without_mask(trained, subject, caplog):
    before = digest(subject)
    with caplog.at_level(logging.WARNING, logger="tsgm_components.detection.detector"):
        out = infer(trained, subject_dir=str(subject), name="plain") / "S001"
    assert "NO binary mask" in caplog.text
    assert digest(subject) == before  # inputs untouched
    expected = {f"S001_{kind}_{m}.nii.gz" for kind in ("healthy", "anomaly") for m in MODALITIES}
    expected |= {"S001_anomaly.nii.gz", "S001_overlay.png", "S001_detection.json"}
    assert {p.name for p in out.iterdir()} == expected
    reference = nib.load(str(subject / "S001_t1.nii.gz"))
    maps = {}
    for name in sorted(expected - {"S001_overlay.png", "S001_detection.json"}):
        image = nib.load(str(out / name))
        assert image.shape == SHAPE and np.array_equal(image.affine, reference.affine)
        assert np.array_equal(image.header.get_zooms(), reference.header.get_zooms())
        for field in ("qform_code", "sform_code", "xyzt_units", "dim_info"):
            assert image.header[field] == reference.header[field]
        maps[name] = image.get_fdata(dtype=np.float32)
    brain = reference.get_fdata() != 0
    for m in MODALITIES:
        anomaly = maps[f"S001_anomaly_{m}.nii.gz"]
        assert 0 <= anomaly.min() and anomaly.max() <= 1 and anomaly.max() > 0
        assert not anomaly[:, :, [0, 1, 6, 7]].any() and not anomaly[~brain].any()  # outside z 2..5 and the brain
        healthy = maps[f"S001_healthy_{m}.nii.gz"]
        assert healthy.min() >= 0 and healthy.max() <= 1
    weighted = sum(PAPER_WEIGHTS[m] * maps[f"S001_anomaly_{m}.nii.gz"] for m in MODALITIES)
    np.testing.assert_allclose(maps["S001_anomaly.nii.gz"], weighted, atol=1e-6)
    record = json.loads((out / "S001_detection.json").read_text())
    assert record["method"] == "tsgm" and record["mask"] is None and record["weights"] == PAPER_WEIGHTS
    assert record["reconstruction"]["sampler"] == "heun" and record["reconstruction"]["nfe_per_slice"] == 2 * 5
    assert record["reconstruction"]["n_draws"] == 2 and record["reconstruction"]["churn"] == 0.0
    assert record["preprocess"] == PREPROCESS and record["seconds"]["total"] > 0

    with pytest.raises(Exception) as excinfo:  # existing results are never replaced silently
        infer(trained, subject_dir=str(subject), name="plain")
    assert "already exists" in str(excinfo.value.__cause__ or excinfo.value)


def test_inference_with_calibration_writes_mask(trained, subject, tmp_path, caplog):
    calibration = tmp_path / "calibration.json"
    weights = {"t1": 0.1, "t1ce": 0.1, "t2": 0.4, "flair": 0.4}
    # chosen on posterior-mean reconstructions; this run samples Heun draws: the threshold is applied, with a warning
    chosen_with = {
        "sampler": "posterior_mean",
        "n_steps": None,
        "n_draws": 1,
        "snr": 0.075,
        "n_corrector_steps": 1,
        "sdedit_sigma_start": None,
        "churn": 0.0,
    }
    calibration.write_text(
        json.dumps({"weights": weights, "threshold": 0.05, "mode": "fixed", "chosen_on": "validation", "reconstruction": chosen_with})
    )
    files = {m: str(subject / f"S001_{m}.nii.gz") for m in MODALITIES}
    with caplog.at_level(logging.WARNING, logger="tsgm_components.detection.detector"):
        out = infer(trained, calibration_file=str(calibration), name="calibrated", **files) / "S001"
    assert "other sampler settings" in caplog.text and "'posterior_mean', 'heun'" in caplog.text
    mask = nib.load(str(out / "S001_mask.nii.gz"))
    anomaly = nib.load(str(out / "S001_anomaly.nii.gz")).get_fdata(dtype=np.float32)
    brain = nib.load(files["t1"]).get_fdata() != 0
    assert mask.get_data_dtype() == np.uint8 and np.array_equal(mask.affine, nib.load(files["t1"]).affine)
    np.testing.assert_array_equal(np.asarray(mask.dataobj), (anomaly > 0.05) & brain)
    record = json.loads((out / "S001_detection.json").read_text())
    assert record["weights"] == weights and record["mask"]["threshold"] == 0.05
    assert str(calibration) in record["mask"]["threshold_source"]


def test_weighted_reconstruction_skips_zero_weight_modalities(trained, subject, tmp_path):
    calibration = tmp_path / "calibration.json"
    weights = {"t1": 0.0, "t1ce": 0.0, "t2": 0.4, "flair": 0.6}
    calibration.write_text(json.dumps({"weights": weights, "threshold": 0.05, "mode": "fixed"}))
    out = infer(trained, calibration_file=str(calibration), name="weighted", subject_dir=str(subject), reconstruct_modalities="weighted") / "S001"
    record = json.loads((out / "S001_detection.json").read_text())
    assert record["reconstructed_modalities"] == ["t2", "flair"]
    assert {p.name for p in out.glob("S001_*_*.nii.gz")} == {f"S001_{k}_{m}.nii.gz" for k in ("healthy", "anomaly") for m in ("t2", "flair")}
    maps = {m: nib.load(str(out / f"S001_anomaly_{m}.nii.gz")).get_fdata(dtype=np.float32) for m in ("t2", "flair")}
    anomaly = nib.load(str(out / "S001_anomaly.nii.gz")).get_fdata(dtype=np.float32)
    np.testing.assert_allclose(anomaly, 0.4 * maps["t2"] + 0.6 * maps["flair"], atol=1e-6)
    brain = nib.load(str(subject / "S001_t1.nii.gz")).get_fdata() != 0
    np.testing.assert_array_equal(np.asarray(nib.load(str(out / "S001_mask.nii.gz")).dataobj), (anomaly > 0.05) & brain)
    with pytest.raises(Exception) as excinfo:
        infer(trained, calibration_file=str(calibration), name="bad", subject_dir=str(subject), reconstruct_modalities="some")
    assert "reconstruct_modalities must be one of" in str(excinfo.value.__cause__ or excinfo.value)


def test_monai_label_style_pipeline(trained, subject, tmp_path):
    """What MONAI Label's BundleInferTask does: preprocessing -> inferer(image[None], network)[0] -> postprocessing."""
    stacked = np.stack([nib.load(str(subject / f"S001_{m}.nii.gz")).get_fdata(dtype=np.float32) for m in MODALITIES], -1)
    path = tmp_path / "S001_4ch.nii.gz"
    nib.save(nib.Nifti1Image(stacked, AFFINE), str(path))
    parser = ConfigParser()
    parser.read_config([str(INFER)])
    parser.update({"work_dir": str(trained), "checkpoint": str(trained / "vejp" / "model.pt"), **TINY_SAMPLER})
    network = parser.get_parsed_content("network_def")
    network.load_state_dict(torch.load(parser.get_parsed_content("checkpoint"), weights_only=True)["model"])
    data = parser.get_parsed_content("preprocessing")({"image": str(path)})
    assert data["image"].shape == (4, 4, 32, 32)
    data["pred"] = parser.get_parsed_content("inferer")(data["image"][None], network.eval())[0]
    data = parser.get_parsed_content("postprocessing")(data)
    pred = data["pred"]
    assert pred.shape == (1, *SHAPE) and np.allclose(pred.affine.numpy(), AFFINE)
    assert torch.isfinite(pred).all() and pred.max() > 0 and not pred[0, :, :, :2].any()


# ---------------------------------------------------------------- bad input: clear error, nothing written


def damage(folder: Path, case: str) -> str:
    """Break one file of a valid subject; return the name the error must mention."""
    path = lambda m: folder / f"{folder.name}_{m}.nii.gz"  # noqa: E731
    valid = nib.load(str(path("t1"))).get_fdata(dtype=np.float32)
    if case == "missing":
        path("flair").unlink()
    elif case == "shape":
        nib.save(nib.Nifti1Image(np.ones((20, 24, 9), np.float32), AFFINE), str(path("t2")))
    elif case == "affine":
        nib.save(nib.Nifti1Image(valid, AFFINE + np.diag([0, 0, 0.5, 0])), str(path("t1ce")))
    elif case == "nan":
        valid[5, 5, 3] = np.nan
        nib.save(nib.Nifti1Image(valid, AFFINE), str(path("flair")))
    elif case == "2d":
        nib.save(nib.Nifti1Image(valid[:, :, 0], AFFINE), str(path("t1")))
    elif case == "unreadable":
        path("t2").write_bytes(b"not a nifti file")
    return {"missing": "flair", "shape": "t2", "affine": "t1ce", "nan": "flair", "2d": "t1", "unreadable": "t2"}[case]


@pytest.mark.parametrize("case", ["missing", "shape", "affine", "nan", "2d", "unreadable"])
def test_bad_subject_gives_clear_error_and_no_output(trained, case, tmp_path):
    folder = write_subject(tmp_path / "BAD")
    modality = damage(folder, case)
    with pytest.raises(Exception) as excinfo:
        infer(trained, subject_dir=str(folder), name=f"bad_{case}")
    assert f"BAD_{modality}.nii.gz" in str(input_error(excinfo))
    out = trained / "detections" / f"bad_{case}"
    assert not out.exists() or not any(out.iterdir())


def test_numeric_subject_id_stays_a_name(trained, subject):
    """`monai.bundle run` parses `--subject 12345` with fire into an int: it must still name the outputs."""
    out = infer(trained, subject_dir=str(subject), name="numeric", subject=12345, n_draws=1)
    assert {p.name for p in out.iterdir()} == {"12345"}
    assert json.loads((out / "12345" / "12345_detection.json").read_text())["subject"] == "12345"


def test_checkpoint_of_another_model_is_named(trained, subject):
    checkpoint = trained / "vejp" / "model.pt"
    with pytest.raises(Exception) as excinfo:
        network_args = dict(read_model_spec(checkpoint).network, channels=[32, 32, 64])
        infer(trained, subject_dir=str(subject), name="bad_arch", network_args=network_args)
    error = input_error(excinfo)
    assert error.path == str(checkpoint) and "network.channels" in error.problem
    with pytest.raises(Exception) as excinfo:
        infer(trained, subject_dir=str(subject), name="bad_size", image_size=64)
    assert input_error(excinfo).path == str(checkpoint) and "image_size=32" in str(excinfo.value.__cause__ or excinfo.value)
    assert not (trained / "detections" / "bad_arch").exists() and not (trained / "detections" / "bad_size").exists()


def test_command_line_exits_non_zero_on_bad_input(trained, tmp_path):
    folder = write_subject(tmp_path / "CLI")
    damage(folder, "missing")
    out = tmp_path / "out"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "monai.bundle",
            "run",
            "inference",
            "--config_file",
            str(INFER),
            "--work_dir",
            str(trained),
            "--checkpoint",
            str(trained / "vejp" / "model.pt"),
            "--subject_dir",
            str(folder),
            "--detection_dir",
            str(out),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=dict(os.environ, PYTHONWARNINGS="ignore"),
    )
    assert result.returncode != 0
    assert "CLI_flair.nii.gz: missing flair file" in result.stderr
    assert not out.exists() or not any(out.iterdir())


def test_multi_gpu_config_trains_with_one_gloo_process(work_dir, tmp_path, monkeypatch):
    """The DDP config end to end at world size 1 (gloo on CPU): DistributedSampler, rank-0 saving, plain EMA keys."""
    for key, value in dict(MASTER_ADDR="127.0.0.1", MASTER_PORT="29571", RANK="0", LOCAL_RANK="0", WORLD_SIZE="1").items():
        monkeypatch.setenv(key, value)
    run_bundle("training", [TRAIN, CPU, MULTI_GPU], work_dir=str(work_dir), vejp_dir=str(tmp_path / "ddp"), **dict(TINY_TRAIN, epoch_length=1))
    assert not torch.distributed.is_initialized()
    # ignite forgot the group too: its handlers in this process (checkpoint savers) would otherwise ask it for the rank
    assert idist.model_name() == "serial" and idist.get_rank() == 0
    model = torch.load(tmp_path / "ddp" / "model.pt", weights_only=True)["model"]
    assert "unet.conv_in.conv.weight" in model
    final = torch.load(tmp_path / "ddp" / "checkpoints" / "checkpoint_final.pt", weights_only=True)
    assert final["trainer"]["iteration"] == 1


def test_numeric_work_dir_stays_a_path():
    """`--work_dir 2024` arrives as an int through fire: every folder a config derives from it is still a path."""
    checked = 0
    for config in sorted((tsgm_components.REPO_ROOT / "bundles").glob("*/configs/*.yaml")):
        parser = ConfigParser()
        try:
            parser.read_config(str(config))
        except KeyError:  # an overlay of another config (keys such as `train#...`), read only on top of it
            continue
        keys = [k for k, v in parser.get().items() if isinstance(v, str) and v.startswith("$str(@work_dir) + '/") and "@" not in v[16:]]
        parser["work_dir"] = 2024
        for key in keys:
            value = parser.get_parsed_content(key)
            assert isinstance(value, str) and value.startswith("2024/"), (config.name, key, value)
            checked += 1
    assert checked >= 15


def test_model_zoo_checks_pass_for_the_shipped_score_network():
    """MONAI's verify_metadata and verify_net_in_out on the shipped phantom network (the default real one has the same
    format): x_t in, a score of the same shape out, σ and the condition through extra_forward_args."""
    from monai.bundle import verify_metadata, verify_net_in_out

    verify_metadata(meta_file=str(CONFIGS / "metadata.json"), filepath=str(CONFIGS.parents[1] / "meta_schema_20240725.json"))
    verify_net_in_out(
        "network_def",
        meta_file=str(CONFIGS / "metadata.json"),
        config_file=str(INFER),
        device="cpu",
        checkpoint=str(CONFIGS.parent / "models" / "phantom.pt"),
        extra_forward_args={"sigma": torch.tensor([1.0]), "condition": torch.rand(1, 1, 64, 64)},
    )
