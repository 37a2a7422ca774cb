"""The paper's Table III (modalities and their ensembles) as rows of the evaluation harness.

One method's detections (a folder whose validation *and* test subjects hold all four modalities' anomaly maps:
VE-JP inference with ``--reconstruct_modalities all``, or CycleGAN-only, which always translates all four) give six
rows that differ only in their modality weights: each modality alone, the equal-weight ensemble and the ensemble
whose weights the validation split chooses (the harness's weight search). Every row's threshold is chosen on
validation, like any method's. Rows are named ``<method>_<t1|t1ce|t2|flair>_only``, ``<method>_equal_weights`` and
``<method>_validation_weights``.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from tsgm_components.data.brats import MODALITIES


def modality_rows(name: str, detection_dir: str, modalities: Sequence[str] = MODALITIES) -> list[dict[str, Any]]:
    """Table III's rows for one method's detections (harness ``methods`` entries, see module docstring)."""
    rows: list[dict[str, Any]] = [
        {"name": f"{name}_{only}_only", "detection_dir": detection_dir, "fixed_weights": {m: float(m == only) for m in modalities}}
        for only in modalities
    ]
    rows.append({"name": f"{name}_equal_weights", "detection_dir": detection_dir, "fixed_weights": {m: 1.0 / len(modalities) for m in modalities}})
    rows.append({"name": f"{name}_validation_weights", "detection_dir": detection_dir})
    return rows


def table_iii_rows(methods: Sequence[Mapping[str, str]]) -> list[dict[str, Any]]:
    """:func:`modality_rows` of every ``{"name", "detection_dir"}`` in ``methods``, in order."""
    return [row for method in methods for row in modality_rows(str(method["name"]), str(method["detection_dir"]))]
