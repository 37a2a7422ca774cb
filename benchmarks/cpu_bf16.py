"""bfloat16 autocast on the CPU: what it gains and what it changes, for the CPU-scale networks.

    python benchmarks/cpu_bf16.py --work_dir runs/demo [--threads 2] [--slices 24] [--repeats 3] [--setting heun:n_steps=10]

``amp`` is opt-in in every config (``--amp True`` for training, ``--sample_amp True`` for inference); this measures what
it buys, float32 against bfloat16 autocast interleaved in one process (ratios, not absolute times, carry over):

- CycleGAN training: seconds per iteration of the bundle's ``train.yaml`` + ``cpu.yaml`` trainer (4-channel samples,
  batch 4), generators from ``--cyclegan`` (default the shipped phantom set), ``--repeats`` runs of 20 iterations;
- VE-JP sampling: the inference config with ``--checkpoint`` (default the shipped phantom set) and its sampler (or
  ``--setting``) on ``--slices`` FLAIR tumour slices of the validation split, same seed: seconds, mean and largest
  |bfloat16 − float32| of the reconstructions, the mean residual, and the residual's AUPRC for the tumour voxels.

Writes ``benchmarks/results/cpu_bf16.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from monai.bundle import ConfigParser

from common import RESULTS, command_line, machine, parse_setting, save_report
from tsgm_components import bundle_dir, cpu_has_fast_bf16
from tsgm_components.evaluation.metrics import average_precision

CYCLEGAN, VEJP = Path(bundle_dir("cyclegan_brats")), Path(bundle_dir("vejp_anomaly"))


def cyclegan_seconds_per_iteration(work_dir: Path, weights: dict[str, Any], bf16: bool, iterations: int) -> float:
    config = ConfigParser()
    config.read_config([str(CYCLEGAN / "configs" / "train.yaml"), str(CYCLEGAN / "configs" / "cpu.yaml")])
    overrides = {"amp": bf16, "epoch_length": iterations, "n_epochs": 1, "n_epochs_decay": 0, "progress_bar": False}
    config.update({"work_dir": str(work_dir), **overrides, "train#handlers": [], "summary_writer#_disabled_": True})
    trainer = config.get_parsed_content("train#trainer")
    for name in ("G_AB", "G_BA"):  # the discriminators keep their initialisation: timing does not depend on weights
        getattr(trainer, name.lower()).load_state_dict(weights[name])
    start = time.perf_counter()
    trainer.run()
    return (time.perf_counter() - start) / iterations


def sample(work_dir: Path, checkpoint: str, setting: dict[str, Any], amp: bool, slices: torch.Tensor) -> tuple[torch.Tensor, float, str]:
    """(healthy reconstructions, seconds, "sampler, NFE") of the inference config on ``slices``."""
    config = ConfigParser()
    config.read_config([str(VEJP / "configs" / "inference.yaml")])
    config.update({"work_dir": str(work_dir), "checkpoint": checkpoint, "sample_amp": amp, **setting})
    network, inferer = config.get_parsed_content("network"), config.get_parsed_content("slice_inferer")
    start = time.perf_counter()
    with torch.no_grad():
        healthy = inferer(slices, network)
    return healthy, time.perf_counter() - start, f"{inferer.sampler}, {inferer.nfe_per_slice} NFE"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work_dir", required=True, help="a work dir with prepared/ (the demo's)")
    parser.add_argument("--cyclegan", default=str(CYCLEGAN / "models" / "phantom.pt"), help="CycleGAN weights (G_AB, G_BA)")
    parser.add_argument("--checkpoint", default=str(VEJP / "models" / "phantom.pt"), help="VE-JP weights")
    parser.add_argument("--setting", default=None, help='sampler setting "name:key=value,..." (default: the config\'s)')
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--slices", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out_dir", default=str(RESULTS))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    work = Path(args.work_dir).resolve()
    setting = parse_setting(args.setting) if args.setting else {}

    weights = torch.load(args.cyclegan, map_location="cpu", weights_only=True)
    cyclegan: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(args.repeats):  # interleaved, so drifts of a noisy machine hit both alike
        for bf16 in (False, True):
            cyclegan[bf16].append(cyclegan_seconds_per_iteration(work, weights, bf16, 20))

    prepared = work / "prepared"
    items = [i for i in json.loads((prepared / "datalist.json").read_text())["validation"] if i["modality"] == "flair" and i["tumour"]]
    items = [items[k] for k in np.linspace(0, len(items) - 1, min(args.slices, len(items))).round().astype(int)]
    slices = torch.stack([torch.from_numpy(np.load(prepared / i["image"])).float()[None] for i in items])
    labels = np.stack([np.load(prepared / i["label"]) for i in items]) > 0
    runs: dict[bool, list] = {False: [], True: []}
    for _ in range(args.repeats):
        for amp in (False, True):
            runs[amp].append(sample(work, args.checkpoint, setting, amp, slices))
    healthy = {amp: runs[amp][0][0] for amp in runs}
    seconds = {amp: min(run[1] for run in runs[amp]) for amp in runs}
    brain, sampler = slices[:, 0].numpy() > 0, runs[False][0][2]
    residual = {amp: (slices - healthy[amp]).abs()[:, 0].numpy() for amp in runs}
    auprc = {amp: average_precision(residual[amp][brain], labels[brain]) for amp in runs}
    difference = (healthy[True] - healthy[False]).abs()

    gan = {bf16: min(v) for bf16, v in cyclegan.items()}
    rows = [
        ("CycleGAN training, s / iteration (batch 4, 4 × 64²)", f"{gan[False]:.3f}", f"{gan[True]:.3f}", f"{gan[False] / gan[True]:.2f}×"),
        (
            f"VE-JP sampling ({sampler}), s for {len(items)} slices",
            f"{seconds[False]:.2f}",
            f"{seconds[True]:.2f}",
            f"{seconds[False] / seconds[True]:.2f}×",
        ),
        ("AUPRC of the residual map (tumour voxels)", f"{auprc[False]:.4f}", f"{auprc[True]:.4f}", ""),
    ]
    command, info = command_line(__file__, argv), machine()
    table = "\n".join(
        [
            f"# bfloat16 autocast on the CPU (`{command}`)",
            "",
            f"{info['processor']}, {args.threads} threads, native bfloat16: {cpu_has_fast_bf16()}, torch {info['torch']}, {info['created']}; "
            f"weights `{args.cyclegan}`, `{args.checkpoint}`; best of {args.repeats} interleaved runs.",
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
        "command": command,
        **info,
        "threads": args.threads,
        "native_bf16": cpu_has_fast_bf16(),
        "weights": {"cyclegan": args.cyclegan, "vejp": args.checkpoint},
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
