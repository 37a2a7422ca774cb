"""Data layer: BraTS loading/validation, preprocessing geometry, phantom, prepare, CLI errors."""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from tsgm_components.data.brats import MODALITIES, find_subjects, load_subject, subject_files
from tsgm_components.data.preprocessing import PreprocessConfig, normalize_volume, slices_to_volume, volume_to_slices
from tsgm_components.errors import TsgmInputError

SMALL_SHAPE = (12, 10, 8)
AFFINE = np.diag([-1.0, -1.0, 1.0, 1.0])


def write_subject(root: Path, name: str = "S001", shape=SMALL_SHAPE, seg: bool = True, suffix: str = ".nii.gz") -> Path:
    """A small valid subject in BraTS layout; returns its folder."""
    rng = np.random.default_rng(0)
    folder = root / name
    folder.mkdir(parents=True)
    for i, modality in enumerate(MODALITIES):
        data = (rng.random(shape) * 100 + i).astype(np.float32)
        data[0] = 0  # background
        nib.save(nib.Nifti1Image(data, AFFINE), str(folder / f"{name}_{modality}{suffix}"))
    if seg:
        labels = np.zeros(shape, np.uint8)
        labels[3:6, 3:6, 2:4] = 2
        labels[4, 4, 3] = 4
        nib.save(nib.Nifti1Image(labels, AFFINE), str(folder / f"{name}_seg{suffix}"))
    return folder


def replace_volume(folder: Path, key: str, data: np.ndarray, affine=AFFINE) -> Path:
    path = folder / f"{folder.name}_{key}.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


# ---------------------------------------------------------------- BraTS layout and validation


def test_find_subjects_and_files(tmp_path):
    write_subject(tmp_path, "S002")
    write_subject(tmp_path, "S001", seg=False, suffix=".nii")
    (tmp_path / "notes").mkdir()
    assert find_subjects(tmp_path) == ["S001", "S002"]
    files = subject_files(tmp_path / "S001", require_seg=False)
    assert sorted(files) == sorted(MODALITIES) and files["t1"].name == "S001_t1.nii"
    assert "seg" in subject_files(tmp_path / "S002", require_seg=True)
    with pytest.raises(TsgmInputError, match="S001_seg.nii.gz: missing seg file for subject S001"):
        subject_files(tmp_path / "S001", require_seg=True)


def test_find_subjects_missing_or_empty(tmp_path):
    with pytest.raises(TsgmInputError, match="does not exist"):
        find_subjects(tmp_path / "nope")
    with pytest.raises(TsgmInputError, match="no BraTS subjects"):
        find_subjects(tmp_path)


def test_load_subject_valid(tmp_path):
    folder = write_subject(tmp_path)
    subject = load_subject(subject_files(folder, require_seg=True))
    assert set(subject.arrays) == set(MODALITIES)
    assert all(a.dtype == np.float32 and a.shape == SMALL_SHAPE for a in subject.arrays.values())
    assert subject.seg.dtype == np.uint8 and set(np.unique(subject.seg)) == {0, 2, 4}
    np.testing.assert_array_equal(subject.reference.affine, AFFINE)
    assert not subject.brain_mask[0].any() and subject.brain_mask[1:].all()


def test_integer_volume_loads_as_float_without_overflow(tmp_path):
    folder = write_subject(tmp_path)
    data = np.full(SMALL_SHAPE, 30000, np.int16)
    replace_volume(folder, "t2", data)
    subject = load_subject(subject_files(folder, require_seg=True))
    assert subject.arrays["t2"].dtype == np.float32
    assert float(subject.arrays["t2"].sum()) == pytest.approx(30000.0 * data.size)


def _bad_inputs():
    """(name, function that damages a subject folder and returns the damaged file, expected message)."""
    shape4 = SMALL_SHAPE + (1,)
    return [
        ("shape", lambda f: replace_volume(f, "t2", np.ones((12, 10, 9), np.float32)), "shape"),
        ("affine", lambda f: replace_volume(f, "flair", np.ones(SMALL_SHAPE, np.float32), np.diag([1.0, -1, 1, 1])), "affine differs"),
        ("nan", lambda f: replace_volume(f, "t1ce", np.where(np.eye(12, 10)[..., None] > 0, np.nan, 1.0).astype(np.float32) * np.ones(SMALL_SHAPE, np.float32)), "NaN"),
        ("inf", lambda f: replace_volume(f, "t1", np.full(SMALL_SHAPE, np.inf, np.float32)), "Inf"),
        ("2d", lambda f: replace_volume(f, "t1", np.ones((12, 10), np.float32)), "2D"),
        ("4d", lambda f: replace_volume(f, "t1ce", np.ones(shape4, np.float32)), "4D"),
        ("zero", lambda f: replace_volume(f, "t2", np.zeros(SMALL_SHAPE, np.float32)), "all zero"),
        ("labels", lambda f: replace_volume(f, "seg", np.full(SMALL_SHAPE, 3, np.uint8)), "not BraTS labels"),
        ("truncated", _truncate, "truncated or corrupt|cannot read"),
        ("unreadable", _garbage, "cannot read as NIfTI"),
    ]


def _truncate(folder: Path) -> Path:
    path = folder / f"{folder.name}_flair.nii.gz"
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    return path


def _garbage(folder: Path) -> Path:
    path = folder / f"{folder.name}_t2.nii.gz"
    path.write_bytes(gzip.compress(b"this is not a nifti file"))
    return path


@pytest.mark.parametrize("name, damage, message", _bad_inputs(), ids=[b[0] for b in _bad_inputs()])
def test_bad_input_names_the_file(tmp_path, name, damage, message):
    folder = write_subject(tmp_path)
    damaged = damage(folder)
    with pytest.raises(TsgmInputError, match=message) as info:
        load_subject(subject_files(folder, require_seg=True))
    assert info.value.path == str(damaged)


def test_missing_modality_names_subject_and_file(tmp_path):
    folder = write_subject(tmp_path)
    (folder / "S001_t1ce.nii.gz").unlink()
    with pytest.raises(TsgmInputError, match="S001_t1ce.nii.gz: missing t1ce file for subject S001"):
        subject_files(folder, require_seg=False)


# ---------------------------------------------------------------- preprocessing


def test_config_dict_round_trip():
    cfg = PreprocessConfig(z_min=2, z_max=5, image_size=64)
    assert PreprocessConfig.from_dict({**cfg.to_dict(), "seed": 3}) == cfg
    with pytest.raises(ValueError):
        PreprocessConfig(z_min=5, z_max=2)


def test_normalize_volume_percentiles_and_background():
    rng = np.random.default_rng(1)
    volume = rng.normal(100, 20, (20, 20, 10)).astype(np.float32)
    mask = np.zeros(volume.shape, bool)
    mask[2:18, 2:18] = True
    volume[mask.nonzero()[0][0], mask.nonzero()[1][0], 0] = 1e6  # outlier, clipped away
    out = normalize_volume(volume, mask, 1.0, 99.0)
    assert out.dtype == np.float32 and out.min() == 0.0 and out.max() == 1.0
    assert not out[~mask].any()
    low, high = np.percentile(volume[mask], [1, 99])
    expected = (np.clip(volume[mask], low, high) - low) / (high - low)
    np.testing.assert_allclose(out[mask], expected, atol=1e-6)
    assert (out[mask] == 1.0).mean() == pytest.approx(0.01, abs=0.005)


def test_slices_round_trip_exact_at_full_size():
    cfg = PreprocessConfig(z_min=3, z_max=9, image_size=256, pad_to=256)
    rng = np.random.default_rng(2)
    volume = rng.random((240, 240, 12)).astype(np.float32)
    slices = volume_to_slices(volume, cfg)
    assert slices.shape == (7, 256, 256) and slices.dtype == np.float32
    np.testing.assert_array_equal(slices[0, 8:248, 8:248], volume[:, :, 3])
    assert not slices[:, :8].any() and not slices[:, :, 248:].any()
    back = slices_to_volume(slices, volume.shape, cfg)
    np.testing.assert_array_equal(back[:, :, 3:10], volume[:, :, 3:10])
    assert not back[:, :, :3].any() and not back[:, :, 10:].any()


def test_slices_geometry_at_reduced_size():
    cfg = PreprocessConfig(z_min=1, z_max=2, image_size=64, pad_to=256)
    volume = np.zeros((240, 240, 4), np.float32)
    volume[40:80, 120:200, 1] = 1.0  # a block; 240 -> 256 pads 8 each side, then /4
    seg = (volume > 0).astype(np.uint8)
    slices = volume_to_slices(volume, cfg)
    masks = volume_to_slices(seg, cfg, is_mask=True)
    assert slices.shape == (2, 64, 64) and masks.dtype == np.uint8
    np.testing.assert_array_equal(slices[0, 12:22, 32:52], 1.0)  # (40+8)/4=12 .. (80+8)/4=22
    assert slices[0].sum() == pytest.approx(10 * 20) and not slices[1].any()
    np.testing.assert_array_equal(masks[0], slices[0] > 0.5)
    back = slices_to_volume(slices, volume.shape, cfg)
    assert back.shape == volume.shape and not back[:, :, [0, 2, 3]].any()
    np.testing.assert_allclose(back[44:76, 124:196, 1], 1.0, atol=1e-6)  # interior exact, edges blurred
    back_mask = slices_to_volume(masks, volume.shape, cfg, is_mask=True)
    np.testing.assert_array_equal(back_mask, seg)


def test_volume_shape_checks():
    cfg = PreprocessConfig(z_min=80, z_max=128, image_size=32, pad_to=256)
    with pytest.raises(ValueError, match="z_max=128"):
        volume_to_slices(np.zeros((240, 240, 100), np.float32), cfg)
    with pytest.raises(ValueError, match="exceeds pad_to"):
        volume_to_slices(np.zeros((300, 240, 155), np.float32), cfg)
