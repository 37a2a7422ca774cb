"""Sampling speed: whole-volume detection is one batched reconstruction call; benchmarks/sampling.py and
benchmarks/gpu_volume_time.py end to end with a tiny random-weight VE-JP model."""

import json
import sys

import numpy as np
import nibabel as nib
import pytest
import torch

from tsgm_components import REPO_ROOT
from tsgm_components.checkpoints import ModelSpec
from tsgm_components.data.prepare import read_prepare_config
from tsgm_components.data.brats import MODALITIES, subject_files
from tsgm_components.data.preprocessing import PreprocessConfig
from tsgm_components.detection.detector import Detector, detect_subject
from tsgm_components.detection.masking import MaskSettings
from tsgm_components.detection.ensembling import PAPER_WEIGHTS
from tsgm_components.networks.score import ScoreUNet

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
import gpu_volume_time  # noqa: E402
import sampling as sampling_benchmark  # noqa: E402

CONFIGS = REPO_ROOT / "bundles" / "vejp_anomaly" / "configs"
TINY = dict(condition_channels=1, channels=[8, 16], attention_levels=[False, False], num_res_blocks=1, num_head_channels=8, norm_num_groups=8)
TINY_YAML = """image_size: 32
network_args: {condition_channels: 1, channels: [8, 16], attention_levels: [false, false], num_res_blocks: 1,
               num_head_channels: 8, norm_num_groups: 8}
device: "$torch.device('cpu')"
"""
# predictor-only reference: Langevin steps with a random network diverge
FAST = ["--reference", "pc:n_steps=4,n_corrector_steps=0", "--samplers", "heun:n_steps=2", "sdedit:t0=0.2,n_steps=2,n_corrector_steps=0"]


class BlockReconstructor:
    """Records each call's input shape; the "healthy" slice of stack position i is the constant (i // per_block) / 10."""

    def __init__(self, per_block: int):
        self.per_block, self.shapes = per_block, []

    def __call__(self, slices):
        self.shapes.append(tuple(slices.shape))
        block = torch.arange(len(slices), dtype=torch.float32) // self.per_block
        return (block / 10)[:, None, None, None].expand_as(slices).clone()


def test_detection_reconstructs_all_modalities_of_a_volume_in_one_call(phantom_dir, tmp_path):
    preprocess = PreprocessConfig(image_size=32)
    n_slices = preprocess.z_max - preprocess.z_min + 1
    reconstruct = BlockReconstructor(n_slices)
    files = subject_files(phantom_dir / "BraTS20_Training_001", require_seg=False)
    out = detect_subject(files, tmp_path, Detector(reconstruct, preprocess, MaskSettings(PAPER_WEIGHTS), "blocks"))
    assert reconstruct.shapes == [(4 * n_slices, 1, 32, 32)]
    brain = np.asarray(nib.load(str(files.paths["t1"])).dataobj) != 0  # any modality: t1 covers the phantom brain
    for index, modality in enumerate(MODALITIES):  # the stack is split back in MODALITIES order
        healthy = np.asarray(nib.load(str(out / f"{out.name}_healthy_{modality}.nii.gz")).dataobj)
        inside = healthy[:, :, preprocess.z_min : preprocess.z_max + 1][brain[:, :, preprocess.z_min : preprocess.z_max + 1]]
        np.testing.assert_allclose(np.median(inside), index / 10, atol=1e-6)


@pytest.fixture(scope="module")
def bench(prepared_dir, tmp_path_factory):
    """A work dir like the demo's (prepared/ + vejp/model.pt with its model_spec) and the config list for it."""
    work = tmp_path_factory.mktemp("bench")
    (work / "prepared").symlink_to(prepared_dir)
    (work / "tiny.yaml").write_text(TINY_YAML)
    configs = [str(CONFIGS / "inference.yaml"), str(work / "tiny.yaml")]
    sde = {"sigma_min": 0.01, "sigma_max": 20.0}
    torch.manual_seed(0)
    spec = ModelSpec(read_prepare_config(prepared_dir, 32), TINY, sde)
    (work / "vejp").mkdir()
    torch.save({"model": ScoreUNet(**TINY).state_dict(), "model_spec": spec.state_dict()}, work / "vejp" / "model.pt")
    return work, configs


def run_benchmark(work, configs, out, *extra):
    argv = [
        "--work_dir",
        str(work),
        "--config_file",
        *configs,
        "--subjects",
        "1",
        "--slices_per_subject",
        "2",
        "--validation_slices_per_subject",
        "3",
        "--repeats",
        "2",
        "--out_dir",
        str(out),
        *FAST,
        *extra,
    ]
    return sampling_benchmark.main(argv)


def test_sampling_benchmark_compares_samplers_on_tumour_slices_and_calibrates_on_validation(bench, tmp_path):
    work, configs = bench
    assert run_benchmark(work, configs, tmp_path) == 0
    report = json.loads((tmp_path / "sampling_cpu.json").read_text())
    assert "| heun:n_steps=2 | 3 | 1× |" in (tmp_path / "sampling_cpu.md").read_text()

    volumes = json.loads((work / "prepared" / "volumes.json").read_text())
    validation = volumes["validation"]
    scored = validation[0]  # selection on validation only: the scored slices come from the validation split
    seg = np.asarray(nib.load(scored["seg"]).dataobj)
    rows = report["reference"]["slices"]
    # only the modalities with a non-zero calibrated weight are reconstructed: the others cannot change the score
    weighted = [m for m in MODALITIES if report["calibration"]["weights"][m] > 0]
    assert report["modalities"] == weighted and len(weighted) >= 1
    assert len(rows) == report["n_slices"] == 2 and report["n_modality_slices"] == 2 * len(weighted)
    assert all(r["subject"] == scored["subject"] and (seg[:, :, r["z"]] > 0).any() for r in rows)
    # no calibration file and no validation detections: chosen here, on the validation subjects only
    assert "validation" in report["calibration_source"] and report["calibration"]["mode"] == "fixed"
    assert report["calibration_subjects"] == [v["subject"] for v in validation]
    assert not any(item["subject"] in json.dumps(report) for item in volumes["test"])  # the test split is never read

    assert report["reference"]["nfe"] == 4
    heun, sdedit = report["samplers"]
    assert (heun["nfe"], sdedit["nfe"]) == (3, 2)
    assert heun["nfe_ratio"] == pytest.approx(4 / 3) and sdedit["nfe_ratio"] == pytest.approx(2)
    for row in (heun, sdedit):
        assert row["repeats_identical"] and not row["diverged"] and len(row["seconds_all_runs"]) == 2
        assert row["dice_delta"] == pytest.approx(row["slice_dice"] - report["reference"]["slice_dice"])
        assert row["speedup"] == pytest.approx(report["reference"]["seconds"] / row["seconds"])
        assert 0 <= row["slice_dice"] <= 1 and 0 <= row["auprc"] <= 1 and row["healthy_mae"] > 0
        assert not row["meets_target"]  # 2× fewer NFE is far from the 40× target


def test_sampling_benchmark_averages_over_seeds_and_caches_each_reference_draw(bench, tmp_path):
    work, configs = bench
    cache = tmp_path / "cache"
    extra = ["--seeds", "0", "1", "--modalities", "all", "--reference_cache", str(cache)]
    assert run_benchmark(work, configs, tmp_path, *extra) == 0
    report = json.loads((tmp_path / "sampling_cpu.json").read_text())
    assert report["seeds"] == [0, 1] and report["n_modality_slices"] == 8
    assert sorted(f.name for f in cache.iterdir()) == ["reference_seed0.pt", "reference_seed1.pt"]
    for row in [report["reference"], *report["samplers"]]:
        per_seed = row["per_seed"]
        assert [figures["seed"] for figures in per_seed] == [0, 1]
        for key in ("slice_dice", "subset_dice", "auprc"):
            assert row[key] == pytest.approx(np.mean([figures[key] for figures in per_seed]))
        subset = [figures["subset_dice"] for figures in per_seed]
        assert row["subset_dice_spread"] == pytest.approx(max(subset) - min(subset))
    for row in report["samplers"]:
        assert len(row["seconds_all_runs"]) == 4  # 2 repeats × 2 seeds
        assert row["subset_dice_delta"] == pytest.approx(row["subset_dice"] - report["reference"]["subset_dice"])
    # a second run takes both reference draws from the cache and says so
    assert run_benchmark(work, configs, tmp_path, *extra) == 0
    again = json.loads((tmp_path / "sampling_cpu.json").read_text())
    assert again["reference"]["timing"].count("from the cache") == 2
    assert again["reference"]["subset_dice"] == report["reference"]["subset_dice"]


def test_sampling_benchmark_applies_the_calibration_file(bench, tmp_path):
    work, configs = bench
    calibration = tmp_path / "calibration.json"
    weights = {"t1": 0.0, "t1ce": 0.0, "t2": 0.0, "flair": 1.0}
    calibration.write_text(json.dumps({"weights": weights, "threshold": 1e6, "mode": "fixed"}))
    assert run_benchmark(work, configs, tmp_path, "--calibration", str(calibration)) == 0
    report = json.loads((tmp_path / "sampling_cpu.json").read_text())
    assert report["calibration_source"] == f"file {calibration}"
    assert report["calibration"] == {"weights": weights, "threshold": 1e6, "mode": "fixed"}
    assert report["modalities"] == ["flair"] and report["n_modality_slices"] == 2
    # nothing exceeds the threshold: every Dice is 0, the threshold-free AUPRC is not
    assert all(row["slice_dice"] == 0 for row in [report["reference"], *report["samplers"]])
    assert report["reference"]["auprc"] > 0


def test_sampling_benchmark_reports_a_diverged_reference_instead_of_failing(bench, tmp_path, monkeypatch):
    work, configs = bench
    timed = sampling_benchmark.timed

    def nan_for_pc(inferer, inputs, network):
        healthy, seconds = timed(inferer, inputs, network)
        return (torch.full_like(healthy, float("nan")) if inferer.sampler == "pc" else healthy), seconds

    monkeypatch.setattr(sampling_benchmark, "timed", nan_for_pc)
    assert run_benchmark(work, configs, tmp_path) == 0
    report = json.loads((tmp_path / "sampling_cpu.json").read_text())
    assert report["reference"]["diverged"] and "slice_dice" not in report["reference"]
    for row in report["samplers"]:
        assert not row["diverged"] and 0 <= row["slice_dice"] <= 1 and "dice_delta" not in row
        assert not row["meets_target"]
    assert "| diverged |" in (tmp_path / "sampling_cpu.md").read_text()


def test_sampling_benchmark_bad_inputs(bench, tmp_path, capsys):
    work, configs = bench
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "prepared").symlink_to(work / "prepared")
    assert run_benchmark(empty, configs, tmp_path) == 2
    assert "model.pt: checkpoint not found" in capsys.readouterr().err
    with pytest.raises(ValueError, match="expected key=value"):
        sampling_benchmark.SamplerSpec.parse("heun:steps=3")
    spec = sampling_benchmark.SamplerSpec.parse("heun:n_steps=5,n_draws=3,churn=0.5,compile=True")
    assert spec.overrides == {"n_steps": 5, "n_draws": 3, "churn": 0.5, "compile": True}
    with pytest.raises(ValueError, match="True or False"):
        sampling_benchmark.SamplerSpec.parse("heun:compile=1")
    with pytest.raises(SystemExit):  # checked before anything is loaded
        sampling_benchmark.parse_args(["--work_dir", str(work), "--samplers", "ddim:n_steps=3"])
    assert "the sampler must be one of" in capsys.readouterr().err
    assert not (tmp_path / "sampling_cpu.json").exists()


def test_gpu_volume_time_runs_on_cpu_and_extrapolates_the_reference(bench, tmp_path):
    work, _ = bench
    argv = [
        "--device",
        "cpu",
        "--model_config",
        str(CONFIGS / "train.yaml"),
        str(work / "tiny.yaml"),
        "--slices",
        "2",
        "--reference_probe_nfe",
        "2",
        "--samplers",
        "heun:n_steps=2",
        "--out_dir",
        str(tmp_path),
    ]
    assert gpu_volume_time.main(argv) == 0
    info = json.loads((tmp_path / "gpu_volume_time_cpu.json").read_text())
    reference, heun = info["rows"]
    assert reference["nfe"] == 2000 and reference["timing"] == "extrapolated from 2 passes"
    assert heun["nfe"] == 3 and heun["timing"] == "measured" and info["inputs_per_volume"] == 2
    assert info["weights"].startswith("random")
    with pytest.raises(SystemExit):
        gpu_volume_time.parse_args(["--device", "cpu", "--amp", "on"])
