"""Whole-volume sampling time of the paper-scale VE-JP model: every processed slice × 4 modalities per volume.

    python benchmarks/gpu_volume_time.py                      # CUDA, the paper-scale model of train.yaml, random weights
    python benchmarks/gpu_volume_time.py --batch_sizes 64 196 --amp off on

Timing only: random (seeded) weights and inputs. One volume = 49 slices × 4 modalities (196 network inputs), one batched
``DiffusionSamplerInferer`` call per sampler setting, after a warm-up call; the 2000-NFE reference is extrapolated from
``--reference_probe_nfe`` PC passes unless ``--full_reference``. With ``--amp off on`` the float16 Heun output is compared
with float32 (max |difference|). Writes ``benchmarks/results/gpu_volume_time_<device>.{md,json}``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Sequence

import torch
from monai.bundle import ConfigParser

from common import RESULTS, command_line, device_label, machine, parse_setting, save_report, timed
from tsgm_components import bundle_dir
from tsgm_components.data.preprocessing import PreprocessConfig
from tsgm_components.diffusion.inferers import DiffusionSamplerInferer

CONFIGS = Path(bundle_dir("vejp_anomaly")) / "configs"
REFERENCE = "pc:n_corrector_steps=1,snr=0.075"  # the paper's sampler: 1000 levels + one Langevin step, 2000 NFE
SAMPLERS = ("heun:n_steps=18", "heun:n_steps=10", "pc:n_steps=25", "sdedit:sdedit_sigma_start=1.0,n_steps=10,n_corrector_steps=0")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_config", nargs="+", default=[str(CONFIGS / "train.yaml")], help="configs that build the timed network")
    parser.add_argument("--config_file", nargs="+", default=[str(CONFIGS / "inference.yaml"), str(CONFIGS / "paper_sampler.yaml")])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--samplers", nargs="+", default=list(SAMPLERS), help='"name:key=value,...", the keys of inference.yaml')
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=None, help="chunk sizes (default: the config's sample_batch_size)")
    parser.add_argument("--amp", nargs="+", choices=("off", "on"), default=None, help="float16 autocast (default: both on CUDA, off elsewhere)")
    parser.add_argument("--slices", type=int, default=None, help="network inputs per volume (default: 4 × z range)")
    parser.add_argument("--reference_probe_nfe", type=int, default=40, help="PC passes timed to extrapolate PC-2000")
    parser.add_argument("--full_reference", action="store_true", help="run the 2000-NFE reference in full")
    parser.add_argument("--out_dir", default=str(RESULTS))
    args = parser.parse_args(argv)
    cuda = torch.device(args.device).type == "cuda"
    args.amp = args.amp or (["off", "on"] if cuda else ["off"])
    if "on" in args.amp and not cuda:
        parser.error("--amp on needs --device cuda (the inferer's autocast is float16 on CUDA only)")
    return args


def run(args: argparse.Namespace, argv: Sequence[str] | None = None) -> dict[str, Any]:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_volume_time.py: --device cuda but torch sees no CUDA device (use --device cpu to try it)")
    model, config = ConfigParser(), ConfigParser()
    model.read_config(list(args.model_config)), config.read_config(list(args.config_file))
    torch.manual_seed(0)
    network = model.get_parsed_content("network_def").to(device).eval()
    with torch.no_grad():  # MONAI zero-initialises the output layer: the fp16-vs-fp32 check would compare zeros
        for p in network.unet.out.parameters():
            p.normal_(0.0, 0.02)
    image_size = int(model.get_parsed_content("image_size"))
    n_inputs = args.slices or 4 * len(PreprocessConfig(image_size=image_size).z_range)
    inputs = torch.rand((n_inputs, 1, image_size, image_size), generator=torch.Generator().manual_seed(0)).to(device)
    base = {"sde": model.get_parsed_content("sde"), "conditional": network.condition_channels > 0, "seed": 0}
    base |= {key: config.get_parsed_content(key) for key in ("snr", "n_corrector_steps")}

    def inferer(text: str, **settings: Any) -> DiffusionSamplerInferer:
        return DiffusionSamplerInferer(**{**base, **settings, **parse_setting(text)})

    rows, healthy = [], {}  # healthy: (sampler, batch size, amp) -> reconstruction
    for batch_size in args.batch_sizes or [int(config.get_parsed_content("sample_batch_size"))]:
        for amp in args.amp:
            settings = {"batch_size": batch_size, "amp": amp == "on"}
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            timed(inferer("heun:n_steps=1", **settings), inputs, network)  # warm-up
            reference = inferer(REFERENCE, **settings)
            if args.full_reference:
                seconds, how = timed(reference, inputs, network)[1], "measured"
            else:
                probe = inferer(f"pc:n_steps={max(1, args.reference_probe_nfe // 2)},n_corrector_steps=1", **settings)
                seconds = timed(probe, inputs, network)[1] / probe.nfe_per_slice * reference.nfe_per_slice
                how = f"extrapolated from {probe.nfe_per_slice} passes"
            group = [row(REFERENCE, reference.nfe_per_slice, seconds, batch_size, amp, n_inputs, how)]
            for text in args.samplers:
                sampler, how = inferer(text, **settings), "measured"
                if sampler.compile:  # the first call compiles the network for this input shape
                    how = f"measured after a first call of {timed(sampler, inputs, network)[1]:.0f} s (compilation)"
                out, seconds = timed(sampler, inputs, network)
                healthy[(text, batch_size, amp)] = out.float().cpu()
                group.append(row(text, sampler.nfe_per_slice, seconds, batch_size, amp, n_inputs, how))
            peak = round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None
            for r in group:
                r |= {"peak_memory_gib": peak, "speedup_vs_reference": group[0]["seconds_per_volume"] / r["seconds_per_volume"]}
                fp32 = healthy.get((r["sampler"], batch_size, "off"))
                if amp == "on" and r["sampler"].startswith("heun") and fp32 is not None:
                    r["amp_max_abs_diff"] = float((healthy[(r["sampler"], batch_size, amp)] - fp32).abs().max())
            rows += group
    return {
        "command": command_line(__file__, argv),
        **machine(),
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "config_files": [str(Path(f).resolve()) for f in (*args.model_config, *args.config_file)],
        "network_parameters": sum(p.numel() for p in network.parameters()),
        "image_size": image_size,
        "inputs_per_volume": n_inputs,
        "weights": "random (seeded): timing only",
        "rows": rows,
    }


def row(sampler: str, nfe: int, seconds: float, batch_size: int, amp: str, n_inputs: int, how: str) -> dict[str, Any]:
    print(f"{sampler} (batch {batch_size}, amp {amp}): {nfe} NFE, {seconds:.2f} s per volume ({how})", flush=True)
    return dict(
        sampler=sampler, nfe=nfe, batch_size=batch_size, amp=amp, seconds_per_volume=seconds, seconds_per_slice=seconds / n_inputs, timing=how
    )


def markdown(info: dict[str, Any]) -> str:
    lines = [
        f"# Whole-volume sampling time ({info['gpu'] or info['device']})",
        "",
        f"`{info['command']}`  ",
        f"{info['created']}; torch {info['torch']} (CUDA {info['cuda']}), {info['cpu_count']} CPUs; {info['network_parameters']:,}-parameter "
        f"network at {info['image_size']}², {info['weights']}; {info['inputs_per_volume']} network inputs per volume.",
        "",
        "| sampler | NFE/slice | batch | amp | s/volume | s/slice | speed-up | peak GiB | fp16 vs fp32 max abs diff | timing |",
        "|---|---:|---:|:---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in info["rows"]:
        diff = f"{r['amp_max_abs_diff']:.2g}" if "amp_max_abs_diff" in r else ""
        lines.append(
            f"| {r['sampler']} | {r['nfe']} | {r['batch_size']} | {r['amp']} | {r['seconds_per_volume']:.1f} | {r['seconds_per_slice']:.3g} | "
            f"{r['speedup_vs_reference']:.0f}× | {r['peak_memory_gib'] or ''} | {diff} | {r['timing']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    print(table := markdown(info := run(args, argv)))
    save_report(table, info, args.out_dir, f"gpu_volume_time_{device_label(info['gpu'] or info['device'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
