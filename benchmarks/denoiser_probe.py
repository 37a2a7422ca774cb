"""How well does a trained VE-JP model denoise, per noise level? The check before blaming (or tuning) a sampler.

    python benchmarks/denoiser_probe.py --work_dir runs/demo
    python benchmarks/denoiser_probe.py --work_dir runs/demo --pairs true_pairs \
        --checkpoints "runs/demo/curve/checkpoints/checkpoint_epoch=*.pt" --out probe_curve

On validation pairs (x_A, x_B~) of WORK_DIR/PAIRS (CycleGAN's pseudo-pairs, or the phantom's true pairs): noise x_A
at each σ, ask the model for its clean estimate D(x_A + σz, σ, x_B~) (``ScoreUNet.denoise``; EMA weights, loaded by
the inference config exactly as the bundle does), and report mean |D − x_A| on the [0, 1] scale next to the
copy-the-condition error |x_B~ − x_A|, over all pixels and over the *changed* pixels (|x_B~ − x_A| > 0.1: what stage 1
added, or the lesion for true pairs). Samplers that start from the prior pass through every σ; a model whose error at
large σ is far above the copy-the-condition error gives poor healthy reconstructions whatever the sampler. With
several ``--checkpoints`` (training checkpoints hold the EMA weights too) the rows are a training curve.

``--stacked``: the probe's samples are axial slices with all four modalities' pairs (pixels of every modality), which a
four-channel model (``four_channel.yaml``) denoises as one sample and a single-channel model modality by modality: the
two kinds of model on the same pixels and noise. A four-channel checkpoint needs it.

    python benchmarks/denoiser_probe.py --work_dir runs/real --stacked \
        --checkpoints runs/real/vejp/model.pt runs/real/vejp_four_channel/model.pt --out probe_four_channel
"""

from __future__ import annotations

import argparse
import glob
import platform
import shlex
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from monai.bundle import ConfigParser

from tsgm_components import REPO_ROOT
from tsgm_components.checkpoints import read_checkpoint
from tsgm_components.data.brats import MODALITIES
from tsgm_components.data.pseudo_pairs import PAIR_KEYS, load_pseudo_pairs, stacked_key

from common import save_report  # benchmarks/common.py (this script's folder is sys.path[0])

CONFIGS = REPO_ROOT / "bundles" / "vejp_anomaly" / "configs"
RESULTS = Path(__file__).resolve().parent / "results"
CHANGED = 0.1  # |x_B~ − x_A| above this on the [0, 1] scale: a changed (lesion) pixel


def _iteration(checkpoint: Path) -> int | None:
    trainer = read_checkpoint(checkpoint).get("trainer")
    return int(trainer["iteration"]) if trainer else None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work_dir", required=True, help="folder with PAIRS/ and vejp/model.pt")
    parser.add_argument("--config_file", nargs="+", default=[str(CONFIGS / "inference.yaml")])
    parser.add_argument("--pairs", default="pseudo_pairs", help="pairs folder in WORK_DIR (pseudo_pairs, true_pairs)")
    parser.add_argument(
        "--checkpoints", nargs="+", default=None, help="model.pt or training checkpoint files / glob patterns (default: WORK_DIR/vejp/model.pt)"
    )
    parser.add_argument("--sigmas", type=float, nargs="+", default=[0.02, 0.1, 0.3, 1.0, 3.0, 10.0, 20.0])
    parser.add_argument("--n_pairs", type=int, default=32, help="validation pairs with changed pixels, evenly spaced")
    parser.add_argument("--stacked", action="store_true", help="samples are axial slices of all four modalities (module doc)")
    parser.add_argument("--out", default=None, help="also write benchmarks/results/OUT.md and .json")
    args = parser.parse_args(argv)
    work = Path(args.work_dir).resolve()
    patterns = args.checkpoints or [str(work / "vejp" / "model.pt")]
    checkpoints = [Path(p) for pattern in patterns for p in sorted(glob.glob(pattern)) or [pattern]]
    config = ConfigParser()
    config.read_config(args.config_file)
    config.update({"work_dir": str(work), "device": "$torch.device('cpu')", "checkpoint": str(checkpoints[0])})
    size = int(config.get_parsed_content("image_size"))
    channels = len(MODALITIES) if args.stacked else 1
    items = load_pseudo_pairs(work / args.pairs, "validation", size, channels)
    keys = {key: [stacked_key(key, m) for m in MODALITIES] if args.stacked else [key] for key in PAIR_KEYS}

    def load(item: dict, key: str) -> torch.Tensor:
        return torch.stack([torch.from_numpy(np.load(item[k])).float() for k in keys[key]])

    changed_items = [i for i in items if bool(((load(i, "condition") - load(i, "image")).abs() > CHANGED).any())]
    pool = changed_items or items
    pool = pool[:: max(1, len(pool) // args.n_pairs)][: args.n_pairs]
    x_a = torch.stack([load(i, "image") for i in pool])
    condition = torch.stack([load(i, "condition") for i in pool])
    changed = (condition - x_a).abs() > CHANGED
    copy_all = float((condition - x_a).abs().mean())
    copy_changed = float((condition - x_a).abs()[changed].mean()) if changed.any() else float("nan")
    noises = [s * torch.randn(x_a.shape, generator=torch.Generator().manual_seed(k)) for k, s in enumerate(args.sigmas)]

    rows = []
    for checkpoint in sorted(checkpoints, key=lambda c: (_iteration(c) or 0, str(c))):
        config.update({"checkpoint": str(checkpoint)})
        network = config.get_parsed_content("network", lazy=False)
        if network.image_channels not in (1, channels):
            raise SystemExit(f"{checkpoint}: a {network.image_channels}-channel model needs --stacked (samples of all four modalities)")
        # a single-channel model denoises each modality of a stacked sample as its own sample
        as_samples = (lambda x: x) if network.image_channels == channels else (lambda x: x.reshape(-1, 1, size, size))
        errors_all, errors_changed = [], []
        with torch.no_grad():
            for sigma, noise in zip(args.sigmas, noises):
                cond = as_samples(condition) if network.conditional else None
                denoised = network.denoise(as_samples(x_a + noise), torch.tensor(sigma), cond).reshape(x_a.shape)
                error = (denoised - x_a).abs()
                errors_all.append(round(float(error.mean()), 4))
                errors_changed.append(round(float(error[changed].mean()), 4) if changed.any() else None)
        rows.append({"checkpoint": str(checkpoint), "iteration": _iteration(checkpoint), "error_all": errors_all, "error_changed": errors_changed})
        print(f"{checkpoint.name} (iteration {rows[-1]['iteration']}): all {errors_all} changed {errors_changed}", flush=True)

    sigma_cols = " | ".join(f"σ={s:g}" for s in args.sigmas)
    header = f"| checkpoint | iteration | pixels | {sigma_cols} |\n|---|---|---|" + "---|" * len(args.sigmas)
    lines = [
        f"# Denoiser probe: mean |D(x_A + σz, σ, x_B~) − x_A| on the [0, 1] scale ({args.pairs})",
        "",
        f"Command: `{shlex.join(['python', 'benchmarks/denoiser_probe.py', *(argv if argv is not None else sys.argv[1:])])}`",
        f"Machine: {platform.machine()}, torch {torch.__version__}; {len(pool)} validation "
        f"{'axial slices (all four modalities)' if args.stacked else 'pairs'} at {size}² with changed "
        f"pixels (|x_B~ − x_A| > {CHANGED}); EMA weights through the inference config ({', '.join(Path(c).name for c in args.config_file)}).",
        "",
        f"Copy the condition (D = x_B~): all pixels {copy_all:.4f}, changed pixels {copy_changed:.4f}. A model that beats "
        "it on the changed pixels at large σ removes what stage 1 added instead of copying it.",
        "",
        header,
    ]
    files = {row["checkpoint"] for row in rows}
    ambiguous = len({Path(c).name for c in files}) < len(files)  # e.g. two model.pt: name them by their path
    for row in rows:
        name = row["checkpoint"] if ambiguous else Path(row["checkpoint"]).name
        lines.append(f"| {name} | {row['iteration']} | all | " + " | ".join(f"{e:.4f}" for e in row["error_all"]) + " |")
        if row["error_changed"][0] is not None:
            lines.append(f"| {name} | {row['iteration']} | changed | " + " | ".join(f"{e:.4f}" for e in row["error_changed"]) + " |")
    table = "\n".join(lines) + "\n"
    print(table)
    if args.out:
        record = {
            "command": lines[2],
            "pairs": args.pairs,
            "sigmas": args.sigmas,
            "n_pairs": len(pool),
            "image_size": size,
            "copy_condition_all": copy_all,
            "copy_condition_changed": copy_changed,
            "rows": rows,
        }
        print(f"wrote {save_report(table, record, RESULTS, args.out)}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
