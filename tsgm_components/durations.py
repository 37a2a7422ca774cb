"""Expected training time, printed by ``tsgm run`` and ``tsgm demo`` before each training step starts.

Iterations come from the step's own configs (epochs, epoch length, batch size) and the prepared dataset's slice
counts; seconds per iteration were measured on one reference machine per scale (:data:`REFERENCE_RATES`). Another
machine scales the figure by its speed; the estimate says which machine it is for.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

import yaml

MODALITY_COUNT = 4
#: scale -> (reference machine and where the rates were measured, {model kind: seconds per training iteration})
REFERENCE_RATES: dict[str, tuple[str, dict[str, float]]] = {
    # the training logs of the shipped real weights' `tsgm run DATA/brats18_sample W --scale cpu ...` on an idle
    # 2-core AMD EPYC, one training at a time: 0.139 s per CycleGAN iteration, 0.253-0.259 s per score-model
    # iteration (benchmarks/results/real_cpu_training.md)
    "cpu": ("a 2-core x86-64 CPU", {"cyclegan": 0.14, "score": 0.26}),
    # benchmarks/results/gpu_paper_scale_nvidia_h100_80gb_hbm3.md: 11.70 and 5.34 iterations/s
    "paper": ("one NVIDIA H100", {"cyclegan": 1 / 11.70, "score": 1 / 5.34}),
}


def flat_config(files: Sequence[str | Path]) -> dict[str, Any]:
    """The top-level keys of bundle config files merged in order (later files win), as MONAI's parser merges them."""
    merged: dict[str, Any] = {}
    for path in files:
        merged.update(yaml.safe_load(Path(path).read_text()) or {})
    return merged


def training_iterations(kind: str, config: dict[str, Any], counts: dict[str, int]) -> int:
    """Iterations a training run will take. kind: "cyclegan" or "score"; counts: the prepared training split's
    ``healthy_slices`` and ``tumour_slices`` (per modality). Epochs without an ``epoch_length`` are one pass over the
    data: CycleGAN over max(|A|, |B|) samples, a score model over its healthy slices (one sample per modality and
    slice for 1-channel models)."""
    per_slice = MODALITY_COUNT if int(config.get("in_channels", 1)) == 1 else 1
    if kind == "cyclegan":
        epochs = int(config["n_epochs"]) + int(config["n_epochs_decay"])
        samples = per_slice * max(counts["healthy_slices"], counts["tumour_slices"])
    else:
        epochs = int(config["max_epochs"])
        samples = MODALITY_COUNT * counts["healthy_slices"]
    length = config.get("epoch_length")
    return epochs * (int(length) if length else math.ceil(samples / int(config["batch_size"])))


def training_estimate(
    kind: str,
    config_files: Sequence[str | Path],
    prepared_dir: str | Path,
    scale: str,
    overrides: dict[str, Any] | None = None,
) -> str:
    """One line: the expected duration of a training step on the scale's reference machine, and how it was made.
    overrides: the step's command-line config overrides (e.g. ``max_epochs``), applied over the config files."""
    # the record tsgm prepare writes (read here without the data package, which imports torch)
    counts = json.loads((Path(prepared_dir) / "prepare_config.json").read_text())["counts"]["train"]
    iterations = training_iterations(kind, {**flat_config(config_files), **(overrides or {})}, counts)
    machine, rates = REFERENCE_RATES[scale]
    seconds = iterations * rates[kind]
    return f"expected ≈ {seconds / 60:.0f} min on {machine} ({iterations:,} iterations × {rates[kind]:.3f} s)"
