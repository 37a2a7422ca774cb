"""The real dataset: finding the 20 BraTS 2018 cases under each release's names, laying them out without DeepBrainSeg's
predictions, and the committed volume-stratified split (re-derived from the volumes it records)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from tsgm_components.data import real_brats
from tsgm_components.data.brats import find_dataset
from tsgm_components.data.prepare import load_split_file
from tsgm_components.data.preprocessing import PreprocessConfig
from tsgm_components.errors import TsgmInputError

SHAPE = (6, 6, 8)
BAND = PreprocessConfig(z_min=2, z_max=5, image_size=16, pad_to=16)


def write_case(folder: Path, name: str, lesion_z: int | None) -> None:
    """A tiny case named ``name``: four modalities, a seg with a 2-voxel lesion at axial index ``lesion_z`` (None: no
    lesion), and DeepBrainSeg's two prediction files (whose lesion is everywhere, so reading one would show)."""
    folder.mkdir(parents=True)
    for modality in ("t1", "t1ce", "t2", "flair"):
        nib.save(nib.Nifti1Image(np.full(SHAPE, 5.0, np.float32), np.eye(4)), str(folder / f"{name}_{modality}.nii.gz"))
    seg = np.zeros(SHAPE, np.uint8)
    if lesion_z is not None:
        seg[2:4, 2, lesion_z] = 2
    nib.save(nib.Nifti1Image(seg, np.eye(4)), str(folder / f"{name}_seg.nii.gz"))
    for other in ("DeepBrainSeg_Prediction.nii.gz", "mask.nii.gz"):
        nib.save(nib.Nifti1Image(np.ones(SHAPE, np.uint8), np.eye(4)), str(folder / other))


@pytest.fixture
def deepbrainseg(tmp_path) -> Path:
    """A DeepBrainSeg-like checkout: the 20 cases in sample_volume/brats/, healthy band for the two the issue names."""
    root = tmp_path / "DeepBrainSeg"
    for i, subject in enumerate(real_brats.SUBJECTS):
        healthy_band = subject in ("Brats18_TCIA01_425_1", "Brats18_TCIA01_499_1")
        write_case(root / "sample_volume" / "brats" / subject, subject, 7 if healthy_band else 2 + i % 4)
    (root / "README.md").write_text("not data\n")
    return root


def test_lay_out_copies_the_five_files_per_case_and_never_the_predictions(deepbrainseg, tmp_path):
    out = tmp_path / "brats18"
    cases = real_brats.lay_out(deepbrainseg, out)
    assert sorted(cases) == sorted(real_brats.SUBJECTS)
    for subject in real_brats.SUBJECTS:
        assert sorted(p.name for p in (out / subject).iterdir()) == sorted(f"{subject}_{k}.nii.gz" for k in ("t1", "t1ce", "t2", "flair", "seg"))
    dataset = find_dataset(out, require_seg=True)
    assert dataset.layout == "brats2020" and len(dataset.subjects) == 20
    # the band volumes come from the expert labels: 0 for the two healthy-band cases, 2 voxels for the others
    voxels = real_brats.band_tumour_voxels(out, BAND)
    assert voxels["Brats18_TCIA01_425_1"] == voxels["Brats18_TCIA01_499_1"] == 0
    assert {v for s, v in voxels.items() if s not in ("Brats18_TCIA01_425_1", "Brats18_TCIA01_499_1")} == {2}
    with pytest.raises(FileExistsError):
        real_brats.lay_out(deepbrainseg, out)


def test_cases_are_found_under_the_2019_and_2020_names(tmp_path):
    source = tmp_path / "download"
    renamed = {}
    for i, subject in enumerate(real_brats.SUBJECTS):
        if i % 2:
            name = "BraTS19_" + subject[len("Brats18_") :]
            write_case(source / "HGG" / name, name, 3)
        else:
            name = f"BraTS20_Training_{i:03d}"
            write_case(source / "MICCAI_BraTS2020_TrainingData" / name, name, 3)
            renamed[subject] = name
    rows = "\n".join(f"HGG,{old},{new}" for old, new in renamed.items())
    (source / "MICCAI_BraTS2020_TrainingData" / "name_mapping.csv").write_text(f"Grade,BraTS_2018_subject_ID,BraTS_2020_subject_ID\n{rows}\n")
    located = real_brats.locate_cases(source)
    assert located["Brats18_2013_11_1"].name == "BraTS20_Training_000"
    assert located["Brats18_2013_20_1"].name == "BraTS19_2013_20_1"
    out = tmp_path / "brats18"
    real_brats.lay_out(source, out)
    assert (out / "Brats18_2013_11_1" / "Brats18_2013_11_1_flair.nii.gz").is_file()


def test_missing_cases_and_a_missing_label_are_named_and_nothing_is_written(deepbrainseg, tmp_path):
    import shutil

    shutil.rmtree(deepbrainseg / "sample_volume" / "brats" / "Brats18_2013_3_1")
    with pytest.raises(TsgmInputError, match=r"1 of the 20 cases not found \(e\.g\. \['Brats18_2013_3_1'\]\)"):
        real_brats.lay_out(deepbrainseg, tmp_path / "out")
    write_case(deepbrainseg / "sample_volume" / "brats" / "Brats18_2013_3_1", "Brats18_2013_3_1", 3)
    (deepbrainseg / "sample_volume" / "brats" / "Brats18_2013_3_1" / "Brats18_2013_3_1_seg.nii.gz").unlink()
    # DeepBrainSeg's prediction is never taken for the missing label
    with pytest.raises(TsgmInputError, match="missing seg file for subject Brats18_2013_3_1"):
        real_brats.lay_out(deepbrainseg, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(TsgmInputError, match="outside the source"):
        real_brats.lay_out(deepbrainseg, deepbrainseg / "out")


def test_split_rule_on_known_volumes():
    volumes = {"h1": 0, "h2": 0, **{f"t{i:02d}": 100 * (i + 1) for i in range(18)}}
    split = real_brats.volume_stratified_split(volumes)
    assert [len(split[n]) for n in ("train", "val", "test")] == [12, 4, 4]
    assert sorted(s for n in ("val", "test") for s in split[n] if s.startswith("h")) == ["h1", "h2"]
    assert sum(s.startswith("h") for s in split["val"]) == sum(s.startswith("h") for s in split["test"]) == 1
    terciles = [[f"t{i:02d}" for i in range(k, k + 6)] for k in (0, 6, 12)]
    for name in ("val", "test"):  # one case of each volume tercile
        assert [sum(s in tercile for s in split[name]) for tercile in terciles] == [1, 1, 1]
    assert split == real_brats.volume_stratified_split(dict(reversed(list(volumes.items()))))  # order-free


def test_committed_split_is_the_rule_applied_to_its_recorded_volumes_and_prepare_reads_it():
    manifest = real_brats.read_split_manifest()
    voxels = manifest["band_tumour_voxels"]
    assert sorted(voxels) == sorted(real_brats.SUBJECTS)
    assert manifest == json.loads(json.dumps(real_brats.split_manifest(voxels)))
    assert manifest["counts"] == {"train": 12, "val": 4, "test": 4}
    assert sorted(manifest["healthy_band"]["val"] + manifest["healthy_band"]["test"]) == ["Brats18_TCIA01_425_1", "Brats18_TCIA01_499_1"]
    assert load_split_file(real_brats.SPLIT_FILE, list(real_brats.SUBJECTS)) == manifest["split"]
