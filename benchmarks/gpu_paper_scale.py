"""Paper-scale (256²) throughput of the bundles' own train/inference configs on one GPU, on a small phantom.

    python benchmarks/gpu_paper_scale.py --work_dir /tmp/paper_scale --n_subjects 6 --iterations 40

Timing only: each network is trained for a few dozen iterations, so the outputs mean nothing; what is measured is
what a user of the paper-scale configs waits for. Steps, each with the paper config and only its length (and, where
stated, its sampler or amp) overridden:

1. phantom (``--n_subjects``) and ``tsgm prepare`` at 256² (skipped when ``--work_dir`` already holds them);
2. CycleGAN training (``cyclegan_brats/configs/train.yaml``, batch 1 as the reference): iterations/s after
   ``--warm_up`` iterations, peak GPU memory;
3. pseudo-pairs (``cyclegan_brats/configs/inference.yaml``): the bundle command's wall time;
4. VE-JP training (``vejp_anomaly/configs/train.yaml``, 65 M parameters, batch 8), float32 and float16 autocast;
5. VE-JP detection of one whole subject (``vejp_anomaly/configs/inference.yaml``, all slices × 4 modalities,
   NIfTI outputs) with each ``--samplers`` entry: the bundle command's wall time, start-up included.

Writes ``benchmarks/results/gpu_paper_scale_<gpu>.{md,json}``. ``--small`` runs the same steps with the bundles'
``cpu.yaml`` overrides (64², small networks, float32 only), on any device: a quick check of the script itself.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import torch
from ignite.engine import Events
from monai.bundle import ConfigParser

from tsgm_components import REPO_ROOT
from tsgm_components.pipeline import BUNDLES, bundle_command

from common import device_label, save_report  # benchmarks/common.py (this script's folder is sys.path[0])

TSGM = [sys.executable, "-m", "tsgm_components.cli"]
DEFAULT_SAMPLERS = ("heun:18", "heun:10")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work_dir", default="/tmp/tsgm_paper_scale")
    parser.add_argument("--n_subjects", type=int, default=6)
    parser.add_argument("--iterations", type=int, default=40, help="training iterations per timed run")
    parser.add_argument("--warm_up", type=int, default=10, help="iterations excluded from the training rate")
    parser.add_argument(
        "--samplers", nargs="+", default=list(DEFAULT_SAMPLERS), help="detection samplers as SAMPLER:N_STEPS (heun, pc); each is timed with amp on"
    )
    parser.add_argument("--small", action="store_true", help="the cpu.yaml configs instead of the paper scale")
    parser.add_argument("--out_dir", default=str(REPO_ROOT / "benchmarks" / "results"))
    return parser.parse_args(argv)


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run_command(command: list[str], cwd: Path) -> float:
    """Runs a command (printed first); returns its wall time; stops the benchmark if it fails."""
    print("$ " + shlex.join(command), flush=True)
    start = time.perf_counter()
    result = subprocess.run(command, cwd=cwd)
    if result.returncode != 0:
        raise SystemExit(f"gpu_paper_scale.py: command failed (exit {result.returncode}): {shlex.join(command)}")
    return time.perf_counter() - start


def time_training(
    bundle: str, configs: Sequence[str], trainer_key: str, run_keys: Sequence[str], overrides: dict[str, Any], iterations: int, warm_up: int
) -> dict[str, Any]:
    """Runs a bundle's training config in this process for ``iterations`` iterations (one epoch) and times them.

    Returns iterations/s after ``warm_up`` iterations (CUDA-synchronised timestamps) and peak GPU memory."""
    parser = ConfigParser()
    parser.read_config([str(BUNDLES / bundle / "configs" / name) for name in configs])
    parser.update({**overrides, f"{trainer_key}#max_epochs": 1, f"{trainer_key}#epoch_length": iterations})
    trainer = parser.get_parsed_content(trainer_key)
    stamps: list[float] = []

    @trainer.on(Events.ITERATION_COMPLETED)
    def _stamp(_engine) -> None:
        synchronize()
        stamps.append(time.perf_counter())

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for key in run_keys:
        parser.get_parsed_content(key)
    rate = (len(stamps) - warm_up) / (stamps[-1] - stamps[warm_up - 1])
    batch = int(parser.get_parsed_content("batch_size"))
    params = sum(p.numel() for p in trainer.network.parameters()) if hasattr(trainer, "network") else None
    return {
        "iterations_per_s": rate,
        "images_per_s": rate * batch,
        "batch_size": batch,
        "iterations": len(stamps),
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "parameters": params,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    if not (torch.cuda.is_available() or args.small):
        raise SystemExit("gpu_paper_scale.py: no CUDA device (--small runs the CPU configs anywhere)")
    train = ["train.yaml", "cpu.yaml"] if args.small else ["train.yaml"]
    infer = ["inference.yaml"] if args.small else ["inference.yaml", "paper_sampler.yaml"]
    image_size = 64 if args.small else 256
    work = Path(args.work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []

    def add(step: str, **values: Any) -> None:
        rows.append({"step": step, **values})
        print(json.dumps(rows[-1]), flush=True)

    if not (work / "prepared" / "volumes.json").exists():
        seconds = run_command(
            TSGM + ["phantom", "--out", str(work / "phantom"), "--n_subjects", str(args.n_subjects), "--workers", str(min(8, os.cpu_count() or 1))],
            work,
        )
        add("phantom dataset", seconds=seconds, detail=f"{args.n_subjects} subjects, 240×240×155")
        seconds = run_command(
            TSGM + ["prepare", "--dataset_dir", str(work / "phantom"), "--out", str(work / "prepared"), "--image_size", str(image_size)], work
        )
        add(f"prepare slices at {image_size}²", seconds=seconds)

    common = {"work_dir": str(work), "num_workers": 4}
    result = time_training(
        "cyclegan_brats", train, "train#trainer", ["initialize", "training"], {**common, "progress_bar": False}, args.iterations, args.warm_up
    )
    add(f"CycleGAN training ({' + '.join(train)})", **result)

    seconds = run_command(bundle_command("inference", "cyclegan_brats", ["inference.yaml"], work, checkpoint=work / "cyclegan" / "model.pt"), work)
    n_pairs = len(json.loads((work / "pseudo_pairs" / "pseudo_pairs.json").read_text()).get("training", []))
    add("pseudo-pairs G_A→B (cyclegan_brats inference.yaml)", seconds=seconds, detail=f"{n_pairs} training pairs, start-up included")

    amps = (False,) if args.small else (False, True)
    for amp in amps:
        result = time_training(
            "vejp_anomaly",
            train,
            "trainer",
            ["initialize", "training"],
            {**common, "amp": amp, "vejp_dir": str(work / f"vejp_amp_{amp}")},
            args.iterations,
            args.warm_up,
        )
        add(f"VE-JP training ({' + '.join(train)}, amp {'on' if amp else 'off'})", **result)

    subject = sorted(p for p in (work / "phantom").iterdir() if p.is_dir())[0]
    for text in args.samplers:
        sampler, n_steps = text.split(":")
        command = bundle_command(
            "inference",
            "vejp_anomaly",
            infer,
            work,
            subject_dir=subject,
            checkpoint=work / f"vejp_amp_{amps[-1]}" / "model.pt",
            sampler=sampler,
            n_steps=n_steps,
            sample_amp=amps[-1],
            detection_dir=work / "detections" / text.replace(":", "_"),
            sample_batch_size=64,
        )
        seconds = run_command(command, work)
        add(
            f"VE-JP detection, one subject ({sampler}, {n_steps} levels, amp {'on' if amps[-1] else 'off'})",
            seconds=seconds,
            detail="whole volume: all slices × 4 modalities, NIfTI outputs; start-up included",
        )

    return {
        "command": "python " + shlex.join(sys.argv),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "scale": "cpu.yaml configs (--small)" if args.small else "paper configs",
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "rows": rows,
    }


def markdown(info: dict[str, Any]) -> str:
    lines = [
        f"# Bundle throughput, {info['scale']}, on {info['gpu']}",
        "",
        f"`{info['command']}`  ",
        f"{info['created']}; torch {info['torch']} (CUDA {info['cuda']}), {info['cpu_count']} CPUs. Timing only "
        "(a few dozen training iterations; outputs not meaningful).",
        "",
        "| step | wall s | iterations/s | images/s | batch | peak GPU GiB | detail |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in info["rows"]:
        cell = lambda key, fmt: format(r[key], fmt) if r.get(key) is not None else ""  # noqa: E731
        lines.append(
            f"| {r['step']} | {cell('seconds', '.1f')} | {cell('iterations_per_s', '.2f')} | "
            f"{cell('images_per_s', '.1f')} | {cell('batch_size', 'd')} | {cell('peak_memory_gib', '.1f')} | "
            f"{r.get('detail', '')} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    info = run(args)
    table = markdown(info)
    save_report(table, info, args.out_dir, f"{'small' if args.small else 'gpu_paper_scale'}_{device_label(info['gpu'])}")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
