"""The split manifests shipped in ``data_manifests/``, built by code.

Regenerate them with ``python -m tsgm_components.data.manifests`` (tests check the shipped files equal
what this module builds).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tsgm_components import REPO_ROOT
from tsgm_components.data.phantom import PhantomConfig, phantom_record
from tsgm_components.data.prepare import BRATS2020_SPLIT, split_subjects

MANIFEST_DIR = REPO_ROOT / "data_manifests"
#: The 369 subjects of the BraTS2020 training set.
BRATS2020_SUBJECTS = [f"BraTS20_Training_{i:03d}" for i in range(1, 370)]
SPLIT_SEED, VAL_FRACTION, TEST_FRACTION = 0, 0.1, 0.1
#: The demo's split of the phantom (tsgm demo --split_fraction 0.2): 6 tumour + 2 healthy subjects in validation
#: and in test.
DEMO_FRACTION = 0.2
SPLIT_RULE = (
    "tsgm_components.data.prepare.split_subjects: within each stratum (healthy / tumour subject; BraTS2020 has "
    "tumour subjects only), sort the subject ids, permute them with numpy.random.default_rng(seed).permutation; "
    "the first round(n * test_fraction) are test, the next round(n * val_fraction) validation, the rest training "
    "(9:1 train/test as in the paper, validation carved out of the training part)"
)


def _split_record(
    subjects: list[str],
    strata: dict[str, str] | None = None,
    val_fraction: float = VAL_FRACTION,
    test_fraction: float = TEST_FRACTION,
) -> dict[str, Any]:
    split = split_subjects(subjects, SPLIT_SEED, val_fraction, test_fraction, strata)
    record: dict[str, Any] = {
        "seed": SPLIT_SEED,
        "val_fraction": val_fraction,
        "test_fraction": test_fraction,
        "rule": SPLIT_RULE,
        "counts": {name: len(ids) for name, ids in split.items()},
        "split": split,
    }
    if strata is not None:
        record["healthy_counts"] = {name: sum(strata[s] == "healthy" for s in ids) for name, ids in split.items()}
    return record


def brats2020_manifest() -> dict[str, Any]:
    """Subject-level split of the BraTS2020 training set (used by ``tsgm prepare`` when the ids match)."""
    return {
        "dataset": "BraTS2020 training set (369 subjects, BraTS20_Training_001..369)",
        "regenerate": "python -m tsgm_components.data.manifests",
        **_split_record(BRATS2020_SUBJECTS),
    }


def phantom_manifest() -> dict[str, Any]:
    """The default phantom dataset (``tsgm phantom --out DIR``): generation parameters and the demo's split
    (``tsgm prepare ... --val_fraction 0.2 --test_fraction 0.2``, stratified by healthy/tumour subject)."""
    cfg = PhantomConfig()
    record = phantom_record(cfg)
    healthy = set(record["healthy_subjects"])
    strata = {s: "healthy" if s in healthy else "tumour" for s in record["subjects"]}
    return {
        "dataset": "tsgm default phantom (tsgm phantom --out DIR), split as in tsgm demo",
        "regenerate": "python -m tsgm_components.data.manifests",
        "phantom": record,
        **_split_record(record["subjects"], strata, DEMO_FRACTION, DEMO_FRACTION),
    }


def build_manifests() -> dict[str, dict[str, Any]]:
    """File name -> content of every shipped manifest."""
    return {BRATS2020_SPLIT.name: brats2020_manifest(), "phantom_default.json": phantom_manifest()}


def write_manifests(folder: Path = MANIFEST_DIR) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in build_manifests().items():
        (folder / name).write_text(json.dumps(content, indent=1) + "\n")
        print(f"wrote {folder / name}")


if __name__ == "__main__":
    write_manifests()
