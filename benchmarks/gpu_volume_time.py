"""Whole-volume sampling time of the paper-scale VE-JP model: every processed slice × 4 modalities per volume.

    python benchmarks/gpu_volume_time.py                      # CUDA, the paper-scale model of train.yaml, random weights
    python benchmarks/gpu_volume_time.py --batch_sizes 64 196 --amp off on

Timing only: the network has random weights (seeded) and the inputs are random images in [0, 1], so no trained
model or data is needed and the numbers say nothing about quality. One volume = (z_max − z_min + 1) slices × 4
modalities (49 × 4 = 196 network inputs with the default preprocessing), reconstructed by one batched inferer call
(chunked by ``--batch_sizes``). Each sampler is run in full after a warm-up call, except the 2000-NFE reference,
whose time is extrapolated from ``--reference_probe_nfe`` PC network passes (per-pass cost × 2000; the table marks
it) unless ``--full_reference`` is given. With ``--amp off on`` the deterministic Heun sampler's float16 output is
compared with its float32 output (max |difference| on the [0, 1] scale), a check that autocast does not break the
arithmetic (a check on random weights only). Writes ``benchmarks/results/gpu_volume_time_<device>.{md,json}``.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import torch
from monai.bundle import ConfigParser

from tsgm_components import REPO_ROOT
from tsgm_components.data.preprocessing import PreprocessConfig

from common import device_label, save_report, timed  # benchmarks/common.py (this script's folder is sys.path[0])

from sampling import REFERENCE_SPEC as REFERENCE, SamplerSpec, build_inferer  # benchmarks/sampling.py (this script's folder is sys.path[0])

logger = logging.getLogger("benchmarks.gpu_volume_time")

VEJP_CONFIGS = REPO_ROOT / "bundles" / "vejp_anomaly" / "configs"
#: the model: what a training config builds (the inference config builds it from a checkpoint, which timing lacks)
DEFAULT_MODEL_CONFIGS = [str(VEJP_CONFIGS / "train.yaml")]
#: the sampler settings (snr, Langevin steps, chunk size): the paper's sampler
DEFAULT_CONFIGS = [str(VEJP_CONFIGS / "inference.yaml"), str(VEJP_CONFIGS / "paper_sampler.yaml")]
DEFAULT_SAMPLERS = (
    "heun:n_steps=18",
    "heun:n_steps=10",
    "pc:n_steps=25",
    "sdedit:sdedit_sigma_start=1.0,n_steps=10,n_corrector_steps=0",
    "heun:n_steps=4,n_draws=4",
    "heun:n_steps=4,n_draws=3",
    "heun:n_steps=4,n_draws=4,compile=True",
)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model_config",
        nargs="+",
        default=DEFAULT_MODEL_CONFIGS,
        help="vejp_anomaly training configs that build the timed network (default: train.yaml)",
    )
    parser.add_argument(
        "--config_file",
        nargs="+",
        default=DEFAULT_CONFIGS,
        help="vejp_anomaly inference configs with the sampler settings (default: inference.yaml paper_sampler.yaml)",
    )
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--samplers", nargs="+", default=list(DEFAULT_SAMPLERS), help='"name:key=value,..." as in benchmarks/sampling.py')
    parser.add_argument(
        "--batch_sizes", type=int, nargs="+", default=None, help="inferer chunk sizes to time (default: the config's sample_batch_size)"
    )
    parser.add_argument(
        "--amp",
        nargs="+",
        choices=("off", "on"),
        default=None,
        help="float16 autocast off and/or on (default: both on CUDA, off elsewhere; on needs CUDA)",
    )
    parser.add_argument("--slices", type=int, default=None, help="network inputs per volume (default: 4 × z range)")
    parser.add_argument("--reference_probe_nfe", type=int, default=40, help="PC passes timed to extrapolate PC-2000")
    parser.add_argument("--full_reference", action="store_true", help="run the 2000-NFE reference in full")
    parser.add_argument("--out_dir", default=str(REPO_ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    cuda = torch.device(args.device).type == "cuda"
    args.amp = args.amp or (["off", "on"] if cuda else ["off"])
    if "on" in args.amp and not cuda:
        parser.error("--amp on needs --device cuda (the inferer's autocast is float16 on CUDA only)")
    return args


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_volume_time.py: --device cuda but torch sees no CUDA device (use --device cpu to try it)")
    model = ConfigParser()
    model.read_config(list(args.model_config))
    parser = ConfigParser()
    parser.read_config(list(args.config_file))
    torch.manual_seed(0)
    network = model.get_parsed_content("network_def").to(device).eval()  # random weights: timing only
    with torch.no_grad():  # MONAI zero-initialises the output layer: without this the UNet's output is 0 whatever
        for p in network.unet.out.parameters():  # the precision, and the fp16-vs-fp32 check would be vacuous
            p.normal_(0.0, 0.02)
    sde = model.get_parsed_content("sde")
    image_size = int(model.get_parsed_content("image_size"))
    z_range = PreprocessConfig(image_size=image_size).z_range  # default z_min..z_max of the paper
    n_inputs = args.slices or 4 * len(z_range)
    inputs = torch.rand((n_inputs, 1, image_size, image_size), generator=torch.Generator().manual_seed(0)).to(device)
    base = {
        "sde": sde,
        "snr": parser.get_parsed_content("snr"),
        "n_corrector_steps": parser.get_parsed_content("n_corrector_steps"),
        "n_steps": None,
        "conditional": network.condition_channels > 0,
        "seed": 0,
    }
    batch_sizes = args.batch_sizes or [int(parser.get_parsed_content("sample_batch_size"))]
    probe_steps = max(1, args.reference_probe_nfe // 2)
    rows = []
    for batch_size in batch_sizes:
        for amp in args.amp:
            settings = {**base, "batch_size": batch_size, "amp": amp == "on"}
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            timed(build_inferer(SamplerSpec.parse("heun:n_steps=1"), settings), inputs, network)  # warm-up
            reference = build_inferer(SamplerSpec.parse(REFERENCE), settings)
            if args.full_reference:
                _, seconds = timed(reference, inputs, network)
                rows.append(_row(REFERENCE, reference.nfe_per_slice, seconds, batch_size, amp, n_inputs, "measured"))
            else:
                probe = build_inferer(SamplerSpec.parse(f"pc:n_steps={probe_steps},n_corrector_steps=1"), settings)
                _, seconds = timed(probe, inputs, network)
                per_pass = seconds / probe.nfe_per_slice
                rows.append(
                    _row(
                        REFERENCE,
                        reference.nfe_per_slice,
                        per_pass * reference.nfe_per_slice,
                        batch_size,
                        amp,
                        n_inputs,
                        f"extrapolated from {probe.nfe_per_slice} passes",
                    )
                )
            for text in args.samplers:
                inferer = build_inferer(SamplerSpec.parse(text), settings)
                how = "measured"
                if inferer.compile:  # the first call compiles the network for this input shape
                    _, first_call = timed(inferer, inputs, network)
                    how = f"measured after a first call of {first_call:.0f} s (compilation)"
                healthy, seconds = timed(inferer, inputs, network)
                row = _row(text, inferer.nfe_per_slice, seconds, batch_size, amp, n_inputs, how)
                if text.startswith("heun") and len(args.amp) == 2:
                    row["_healthy"] = healthy.float().cpu()
                rows.append(row)
            if device.type == "cuda":
                peak = torch.cuda.max_memory_allocated(device) / 2**30
                for row in rows:
                    if row["batch_size"] == batch_size and row["amp"] == amp:
                        row["peak_memory_gib"] = round(peak, 2)
                logger.info("batch %d amp %s: peak %.1f GiB", batch_size, amp, peak)
    _compare_amp(rows)
    reference_seconds = {(r["batch_size"], r["amp"]): r["seconds_per_volume"] for r in rows if r["sampler"] == REFERENCE}
    for row in rows:
        row["speedup_vs_reference"] = reference_seconds[(row["batch_size"], row["amp"])] / row["seconds_per_volume"]
    info = {
        "command": "python " + shlex.join(sys.argv),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "config_files": [str(Path(f).resolve()) for f in (*args.model_config, *args.config_file)],
        "network_parameters": sum(p.numel() for p in network.parameters()),
        "image_size": image_size,
        "inputs_per_volume": n_inputs,
        "weights": "random (seeded): timing only",
        "rows": rows,
    }
    return info


def _row(sampler: str, nfe: int, seconds: float, batch_size: int, amp: str, n_inputs: int, how: str) -> dict[str, Any]:
    logger.info("%s (batch %d, amp %s): %d NFE, %.2f s per volume (%s)", sampler, batch_size, amp, nfe, seconds, how)
    return {
        "sampler": sampler,
        "nfe": nfe,
        "batch_size": batch_size,
        "amp": amp,
        "seconds_per_volume": seconds,
        "seconds_per_slice": seconds / n_inputs,
        "timing": how,
    }


def _compare_amp(rows: list[dict[str, Any]]) -> None:
    """Adds ``amp_max_abs_diff`` to float16 Heun rows: max |fp16 − fp32| of the same (deterministic) run."""
    fp32 = {(r["sampler"], r["batch_size"]): r.pop("_healthy") for r in rows if "_healthy" in r and r["amp"] == "off"}
    for row in rows:
        healthy = row.pop("_healthy", None)
        key = (row["sampler"], row["batch_size"])
        if healthy is not None and row["amp"] == "on" and key in fp32:
            row["amp_max_abs_diff"] = float((healthy - fp32[key]).abs().max())


def markdown(info: dict[str, Any]) -> str:
    lines = [
        f"# Whole-volume sampling time ({info['gpu'] or info['device']})",
        "",
        f"`{info['command']}`  ",
        f"{info['created']}; torch {info['torch']} (CUDA {info['cuda']}), {info['cpu_count']} CPUs; "
        f"{info['network_parameters']:,}-parameter network at {info['image_size']}², {info['weights']}; "
        f"{info['inputs_per_volume']} network inputs per volume.",
        "",
        "| sampler | NFE/slice | batch | amp | s/volume | s/slice | speed-up | peak GiB | fp16 vs fp32 max abs diff | timing |",
        "|---|---:|---:|:---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in info["rows"]:
        diff = f"{r['amp_max_abs_diff']:.2g}" if "amp_max_abs_diff" in r else ""
        lines.append(
            f"| {r['sampler']} | {r['nfe']} | {r['batch_size']} | {r['amp']} | {r['seconds_per_volume']:.1f} | "
            f"{r['seconds_per_slice']:.3g} | {r['speedup_vs_reference']:.0f}× | {r.get('peak_memory_gib', '')} | {diff} | {r['timing']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args = parse_args(argv)
    info = run(args)
    table = markdown(info)
    save_report(table, info, args.out_dir, f"gpu_volume_time_{device_label(info['gpu'] or info['device'])}")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
