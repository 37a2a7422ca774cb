"""Paper-scale (256²) throughput of the bundles' own train/inference configs on one GPU, on a small phantom.

    python benchmarks/gpu_paper_scale.py --work_dir /tmp/paper_scale --n_subjects 6 --iterations 40

Timing only (a few dozen iterations per network: the outputs mean nothing). Each step runs a bundle's paper config
with only its length (and, where stated, sampler or amp) overridden: phantom + ``tsgm prepare`` at 256² (skipped when
``--work_dir`` holds them); CycleGAN training (iterations/s after ``--warm_up``, peak GPU memory); the pseudo-pair
command; VE-JP training in float32 and float16 autocast; VE-JP detection of one whole subject (NIfTI in and out) with
each ``--samplers`` entry. Writes ``benchmarks/results/gpu_paper_scale_<gpu>.{md,json}``; ``--small`` runs the same
steps with the bundles' ``cpu.yaml`` (64², small networks, float32) on any device, a quick check of the script.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from ignite.engine import Events

from common import RESULTS, command_line, device_label, machine, run_command, run_training, save_report, synchronize
from tsgm_components.pipeline import bundle_command

TSGM = [sys.executable, "-m", "tsgm_components.cli"]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work_dir", default="/tmp/tsgm_paper_scale")
    parser.add_argument("--n_subjects", type=int, default=6)
    parser.add_argument("--iterations", type=int, default=40, help="training iterations per timed run")
    parser.add_argument("--warm_up", type=int, default=10, help="iterations excluded from the training rate")
    parser.add_argument("--samplers", nargs="+", default=["heun:18", "heun:10"], help="detection samplers as SAMPLER:N_STEPS (heun, pc)")
    parser.add_argument("--small", action="store_true", help="the cpu.yaml configs instead of the paper scale")
    parser.add_argument("--out_dir", default=str(RESULTS))
    return parser.parse_args(argv)


def time_training(bundle: str, configs: Sequence[str], trainer_key: str, overrides: dict[str, Any], iterations: int, warm_up: int) -> dict[str, Any]:
    """A bundle's training config for ``iterations`` iterations (one epoch): iterations/s after ``warm_up`` iterations
    (CUDA-synchronised timestamps) and peak GPU memory."""
    stamps: list[float] = []

    def attach(trainer: Any) -> None:
        trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda _: (synchronize(), stamps.append(time.perf_counter())))

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    overrides = {**overrides, f"{trainer_key}#max_epochs": 1, f"{trainer_key}#epoch_length": iterations}
    parser, trainer, _ = run_training(bundle, configs, trainer_key, overrides, attach)
    rate = (len(stamps) - warm_up) / (stamps[-1] - stamps[warm_up - 1])
    batch = int(parser.get_parsed_content("batch_size"))
    return {
        "iterations_per_s": rate,
        "images_per_s": rate * batch,
        "batch_size": batch,
        "iterations": len(stamps),
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
        "parameters": sum(p.numel() for p in trainer.network.parameters()) if hasattr(trainer, "network") else None,
    }


def run(args: argparse.Namespace, argv: Sequence[str] | None = None) -> dict[str, Any]:
    if not (torch.cuda.is_available() or args.small):
        raise SystemExit("gpu_paper_scale.py: no CUDA device (--small runs the CPU configs anywhere)")
    train = ["train.yaml", "cpu.yaml"] if args.small else ["train.yaml"]
    infer = ["inference.yaml"] if args.small else ["inference.yaml", "paper_sampler.yaml"]
    size = 64 if args.small else 256
    work = Path(args.work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []

    def add(step: str, **values: Any) -> None:
        rows.append({"step": step, **values})
        print(json.dumps(rows[-1]), flush=True)

    if not (work / "prepared" / "volumes.json").exists():
        workers = str(min(8, os.cpu_count() or 1))
        seconds = run_command(TSGM + ["phantom", "--out", str(work / "phantom"), "--n_subjects", str(args.n_subjects), "--workers", workers], work)
        add("phantom dataset", seconds=seconds, detail=f"{args.n_subjects} subjects, 240×240×155")
        seconds = run_command(
            TSGM + ["prepare", "--dataset_dir", str(work / "phantom"), "--out", str(work / "prepared"), "--image_size", str(size)], work
        )
        add(f"prepare slices at {size}²", seconds=seconds)

    common = {"work_dir": str(work), "num_workers": 4}
    result = time_training("cyclegan_brats", train, "train#trainer", {**common, "progress_bar": False}, args.iterations, args.warm_up)
    add(f"CycleGAN training ({' + '.join(train)})", **result)
    seconds = run_command(bundle_command("inference", "cyclegan_brats", ["inference.yaml"], work, checkpoint=work / "cyclegan" / "model.pt"), work)
    n_pairs = len(json.loads((work / "pseudo_pairs" / "pseudo_pairs.json").read_text()).get("training", []))
    add("pseudo-pairs G_A→B (cyclegan_brats inference.yaml)", seconds=seconds, detail=f"{n_pairs} training pairs, start-up included")

    amps = (False,) if args.small else (False, True)
    for amp in amps:
        overrides = {**common, "amp": amp, "vejp_dir": str(work / f"vejp_amp_{amp}")}
        result = time_training("vejp_anomaly", train, "trainer", overrides, args.iterations, args.warm_up)
        add(f"VE-JP training ({' + '.join(train)}, amp {'on' if amp else 'off'})", **result)

    subject = sorted(p for p in (work / "phantom").iterdir() if p.is_dir())[0]
    for text in args.samplers:
        sampler, n_steps = text.split(":")
        checkpoint, detections = work / f"vejp_amp_{amps[-1]}" / "model.pt", work / "detections" / text.replace(":", "_")
        overrides = dict(subject_dir=subject, checkpoint=checkpoint, sampler=sampler, n_steps=n_steps, sample_amp=amps[-1], detection_dir=detections)
        seconds = run_command(bundle_command("inference", "vejp_anomaly", infer, work, sample_batch_size=64, **overrides), work)
        step = f"VE-JP detection, one subject ({sampler}, {n_steps} levels, amp {'on' if amps[-1] else 'off'})"
        add(step, seconds=seconds, detail="whole volume: all slices × 4 modalities, NIfTI outputs; start-up included")
    scale = "cpu.yaml configs (--small)" if args.small else "paper configs"
    return {"command": command_line(__file__, argv), **machine(), "gpu": machine()["gpu"] or "cpu", "scale": scale, "rows": rows}


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
        cells = [
            cell("seconds", ".1f"),
            cell("iterations_per_s", ".2f"),
            cell("images_per_s", ".1f"),
            cell("batch_size", "d"),
            cell("peak_memory_gib", ".1f"),
        ]
        lines.append(f"| {r['step']} | {' | '.join(cells)} | {r.get('detail', '')} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    print(table := markdown(info := run(args, argv)))
    save_report(table, info, args.out_dir, f"{'small' if args.small else 'gpu_paper_scale'}_{device_label(info['gpu'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
