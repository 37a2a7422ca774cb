"""Session fixtures shared by all test files: a tiny phantom dataset and its prepared slices."""

from __future__ import annotations

from pathlib import Path

import pytest

from tsgm_components.data.phantom import PhantomConfig, make_phantom
from tsgm_components.data.prepare import prepare
from tsgm_components.data.preprocessing import PreprocessConfig

#: 5 full-size (240x240x155) phantom subjects, seed 0: one healthy (BraTS20_Training_004), four with tumours.
PHANTOM_CONFIG = PhantomConfig(n_subjects=5, seed=0)
#: Prepared at 32x32 (slices 80-128); split (seed 0): train 3 subjects, val 1, test 1.
PREPARE_CONFIG = PreprocessConfig(image_size=32)


@pytest.fixture(scope="session", autouse=True)
def test_reads_log(tmp_path_factory) -> Path:
    """Test-split evaluations of the suite are logged in a temporary file, not in benchmarks/results/test_reads.md
    (the project's record of real reads); subprocesses inherit the variable."""
    import os

    from tsgm_components.evaluation.harness import TEST_READS_ENV

    log = tmp_path_factory.mktemp("test_reads") / "test_reads.md"
    os.environ[TEST_READS_ENV] = str(log)
    return log


@pytest.fixture(scope="session")
def phantom_dir(tmp_path_factory) -> Path:
    """BraTS-layout phantom dataset (read-only for tests: copy it before damaging files); its healthy twins are in
    the sibling folder ``twins`` (fixture ``twins_dir``)."""
    root = tmp_path_factory.mktemp("phantom")
    return make_phantom(root / "dataset", PHANTOM_CONFIG, verbose=False, twins_out=root / "twins")


@pytest.fixture(scope="session")
def twins_dir(phantom_dir) -> Path:
    """Healthy twins of the tumour subjects of ``phantom_dir`` (``tsgm phantom --twins_out``)."""
    return phantom_dir.parent / "twins"


@pytest.fixture(scope="session")
def prepared_dir(phantom_dir, tmp_path_factory) -> Path:
    """``tsgm prepare`` output of ``phantom_dir`` at image_size 32 (layout of docs/architecture.md)."""
    out = tmp_path_factory.mktemp("prepared") / "prepared"
    prepare(phantom_dir, out, PREPARE_CONFIG, seed=0, verbose=False)
    return out
