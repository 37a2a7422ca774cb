"""Sampling speed: whole-volume detection is one batched reconstruction call; benchmarks/gpu_volume_time.py end to end
with a tiny random-weight VE-JP model."""

import json
import sys

import numpy as np
import nibabel as nib
import pytest
import torch

from tsgm_components import REPO_ROOT
from tsgm_components.data.brats import MODALITIES, subject_files
from tsgm_components.data.preprocessing import PreprocessConfig
from tsgm_components.detection.detector import Detector, detect_subject
from tsgm_components.detection.masking import MaskSettings
from tsgm_components.detection.ensembling import PAPER_WEIGHTS

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
import gpu_volume_time  # noqa: E402

CONFIGS = REPO_ROOT / "bundles" / "vejp_anomaly" / "configs"
TINY_YAML = """image_size: 32
network_args: {condition_channels: 1, channels: [8, 16], attention_levels: [false, false], num_res_blocks: 1,
               num_head_channels: 8, norm_num_groups: 8}
device: "$torch.device('cpu')"
"""


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


@pytest.fixture
def tiny_yaml(tmp_path):
    """A vejp_anomaly config override that makes the timed network tiny."""
    (tmp_path / "tiny.yaml").write_text(TINY_YAML)
    return tmp_path / "tiny.yaml"


def test_gpu_volume_time_runs_on_cpu_and_extrapolates_the_reference(tiny_yaml, tmp_path):
    argv = [
        "--device",
        "cpu",
        "--model_config",
        str(CONFIGS / "train.yaml"),
        str(tiny_yaml),
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
