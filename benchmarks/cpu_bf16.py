"""bfloat16 autocast on the CPU: what it gains and what it changes, for the demo's two trained networks.

    python benchmarks/cpu_bf16.py --work_dir runs/demo [--threads 2] [--slices 24] [--repeats 3]

Side by side in one process, float32 against bfloat16 autocast (the CPU configs turn it on where
``tsgm_components.cpu_has_fast_bf16()`` finds AVX512-BF16/AMX):

- CycleGAN training: seconds per iteration of ``CycleGANTrainer`` with the demo's CPU config (4-channel samples,
  batch 4, the trained networks as the starting point, image pools of 50), ``--repeats`` runs of 20 iterations each.
- VE-JP sampling: the demo's inference config (its sampler as ``cpu.yaml`` sets it) on ``--slices`` tumour
  slices of the test split (FLAIR), same seed: seconds, mean and largest |bfloat16 − float32| of the healthy
  reconstructions, next to the mean residual |input − reconstruction|, and the AUPRC of the residual for the
  tumour voxels with each.

Writes ``benchmarks/results/cpu_bf16.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from monai.bundle import ConfigParser

from tsgm_components import REPO_ROOT, cpu_has_fast_bf16
from tsgm_components.evaluation.metrics import average_precision

from common import save_report  # benchmarks/common.py (this script's folder is sys.path[0])

CYCLEGAN = REPO_ROOT / "bundles" / "cyclegan_brats" / "configs"
VEJP = REPO_ROOT / "bundles" / "vejp_anomaly" / "configs"


def cyclegan_seconds_per_iteration(work_dir: Path, bf16: bool, iterations: int) -> float:
    config = ConfigParser()
    config.read_config([str(CYCLEGAN / "train.yaml"), str(CYCLEGAN / "cpu.yaml")])
    config.update(
        {
            "work_dir": str(work_dir),
            "amp": bf16,
            "epoch_length": iterations,
            "n_epochs": 1,
            "n_epochs_decay": 0,
            "progress_bar": False,
            "train#handlers": [],
            "summary_writer#_disabled_": True,
        }
    )
    trainer = config.get_parsed_content("train#trainer")
    weights = torch.load(work_dir / "cyclegan" / "model.pt", weights_only=True)
    for name, network in (("G_AB", trainer.g_ab), ("G_BA", trainer.g_ba), ("D_A", trainer.d_a), ("D_B", trainer.d_b)):
        network.load_state_dict(weights[name])
    start = time.perf_counter()
    trainer.run()
    return (time.perf_counter() - start) / iterations


def sample(work_dir: Path, amp: bool, slices: torch.Tensor) -> tuple[torch.Tensor, float, str]:
    """(healthy reconstructions, seconds, "sampler, NFE") of the demo's inference config on ``slices``."""
    config = ConfigParser()
    config.read_config([str(VEJP / "inference.yaml")])
    config.update({"work_dir": str(work_dir), "checkpoint": str(work_dir / "vejp" / "model.pt"), "sample_amp": amp})
    network, inferer = config.get_parsed_content("network"), config.get_parsed_content("slice_inferer")
    start = time.perf_counter()
    with torch.no_grad():
        healthy = inferer(slices, network)
    return healthy, time.perf_counter() - start, f"{inferer.sampler}, {inferer.nfe_per_slice} NFE"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work_dir", required=True, help="a finished demo work dir (prepared/, cyclegan/, vejp/)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--slices", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out_dir", default=str(REPO_ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    work = Path(args.work_dir).resolve()

    cyclegan = {False: [], True: []}
    for _ in range(args.repeats):  # interleaved, so drifts of a noisy machine hit both alike
        for bf16 in (False, True):
            cyclegan[bf16].append(cyclegan_seconds_per_iteration(work, bf16, 20))

    prepared = work / "prepared"
    items = [i for i in json.loads((prepared / "datalist.json").read_text())["test"] if i["modality"] == "flair" and i["tumour"]]
    items = [items[k] for k in np.linspace(0, len(items) - 1, min(args.slices, len(items))).round().astype(int)]
    slices = torch.stack([torch.from_numpy(np.load(prepared / i["image"])).float()[None] for i in items])
    labels = np.stack([np.load(prepared / i["label"]) for i in items]) > 0
    runs = {False: [], True: []}
    for _ in range(args.repeats):
        for amp in (False, True):
            runs[amp].append(sample(work, amp, slices))
    healthy = {amp: runs[amp][0][0] for amp in runs}
    seconds = {amp: min(run[1] for run in runs[amp]) for amp in runs}
    sampler = runs[False][0][2]
    brain = slices[:, 0].numpy() > 0
    residual = {amp: (slices - healthy[amp]).abs()[:, 0].numpy() for amp in runs}
    auprc = {amp: average_precision(residual[amp][brain], labels[brain]) for amp in runs}
    difference = (healthy[True] - healthy[False]).abs()

    gan = {bf16: min(v) for bf16, v in cyclegan.items()}
    rows = [
        ("CycleGAN training, s / iteration (batch 4, 4 × 64²)", f"{gan[False]:.3f}", f"{gan[True]:.3f}", f"{gan[False] / gan[True]:.2f}×"),
        (
            f"VE-JP sampling ({sampler}), s for {len(items)} slices",
            f"{seconds[False]:.1f}",
            f"{seconds[True]:.1f}",
            f"{seconds[False] / seconds[True]:.2f}×",
        ),
        ("AUPRC of the residual map (tumour voxels)", f"{auprc[False]:.4f}", f"{auprc[True]:.4f}", ""),
    ]
    table = "\n".join(
        [
            f"# bfloat16 autocast on the CPU (`{' '.join(['python', *sys.argv])}`)",
            "",
            f"{platform.processor() or platform.machine()}, {args.threads} threads, native bfloat16: {cpu_has_fast_bf16()}; "
            f"best of {args.repeats} interleaved runs.",
            "",
            "| measure | float32 | bfloat16 autocast | speed-up |",
            "|---|---:|---:|---:|",
            *[f"| {' | '.join(row)} |" for row in rows],
            "",
            f"Reconstructions, bfloat16 vs float32 (same seed): mean |difference| {float(difference.mean()):.2e}, largest "
            f"{float(difference.max()):.2e}; mean residual |x − healthy| {float(residual[False].mean()):.4f}.",
            "",
        ]
    )
    record = {
        "command": "python " + shlex.join(sys.argv),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cpu_count": os.cpu_count(),
        "threads": args.threads,
        "torch": torch.__version__,
        "native_bf16": cpu_has_fast_bf16(),
        "cyclegan_seconds_per_iteration": {"float32": cyclegan[False], "bfloat16": cyclegan[True]},
        "sampling_seconds": {"float32": [run[1] for run in runs[False]], "bfloat16": [run[1] for run in runs[True]]},
        "sampler": sampler,
        "auprc": {"float32": auprc[False], "bfloat16": auprc[True]},
        "reconstruction_difference": {"mean": float(difference.mean()), "max": float(difference.max())},
        "mean_residual": float(residual[False].mean()),
        "slices": [f"{i['subject']} z{i['z']}" for i in items],
    }
    print(table)
    save_report(table, record, args.out_dir, "cpu_bf16")
    return 0


if __name__ == "__main__":
    sys.exit(main())
