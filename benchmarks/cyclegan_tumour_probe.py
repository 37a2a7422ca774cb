"""Does a trained CycleGAN translate tumours? The check to run before training VE-JP on its pseudo-pairs.

    python benchmarks/cyclegan_tumour_probe.py --work_dir runs/demo [--checkpoint runs/demo/cyclegan/model.pt]

TSGM learns "remove what G_A→B adds": if G_A→B adds nothing tumour-like to healthy slices, no sampler can fix it. On
up to ``--n_slices`` healthy and tumour FLAIR slices of WORK_DIR/prepared (training + validation): bright-voxel fractions
(> the healthy brain's 99th percentile; and in regions of >= ``MIN_REGION`` pixels: lesions, not speckle) and normal
tissue of x_A, x_B, G_A→B(x_A), G_B→A(x_B); |G_B→A(x) − x| in and outside tumours; the median |G_A→B(x) − x| over healthy
brain; the AUPRC of |x − G_B→A(x)| next to FLAIR intensity and chance. ``--figure PNG``: example translations;
``--out NAME``: ``benchmarks/results/NAME.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
from scipy import ndimage
import torch
from monai.bundle import ConfigParser

from tsgm_components import bundle_dir
from tsgm_components.evaluation.metrics import average_precision
from tsgm_components.data.brats import MODALITIES
from tsgm_components.data.prepare import read_prepare_config
from tsgm_components.stage1.translation import load_generator, translate_modalities

from common import RESULTS, command_line, save_report  # benchmarks/common.py (this script's folder is sys.path[0])

#: a bright region this large (4-connected pixels of the slice) counts as lesion-like, smaller ones as speckle
MIN_REGION = 10
CONFIGS = Path(bundle_dir("cyclegan_brats")) / "configs"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work_dir", required=True, help="folder with prepared/ and cyclegan/model.pt")
    parser.add_argument("--checkpoint", default=None, help="default: WORK_DIR/cyclegan/model.pt")
    parser.add_argument("--config_file", nargs="+", default=[str(CONFIGS / "inference.yaml")])
    parser.add_argument("--n_slices", type=int, default=150)
    parser.add_argument("--figure", default=None, help="PNG of example translations")
    parser.add_argument("--n_figure", type=int, default=6)
    parser.add_argument("--out", default=None, help="also write benchmarks/results/OUT.{md,json}")
    args = parser.parse_args(argv)
    work = Path(args.work_dir)
    checkpoint = args.checkpoint or str(work / "cyclegan" / "model.pt")
    prepared = work / "prepared"
    config = ConfigParser()
    config.read_config(args.config_file), config.update({"checkpoint": checkpoint})
    size = int(config.get_parsed_content("image_size"))

    items = [item for split in ("training", "validation") for item in json.loads((prepared / "datalist.json").read_text())[split]]
    by_slice = {(i["subject"], i["z"], i["modality"]): i for i in items}
    flair = [i for i in items if i["modality"] == "flair"]
    healthy = [i for i in flair if int(i["tumour"]) == 0][: args.n_slices]
    tumour = [i for i in flair if int(i["tumour"]) == 1][: args.n_slices]

    def stack(items: list[dict], key: str) -> torch.Tensor:
        return torch.stack([torch.from_numpy(np.load(prepared / i[key])).float().reshape(1, size, size) for i in items])

    def translate_flair(generator: torch.nn.Module, items: list[dict]) -> torch.Tensor:
        """G(FLAIR slices), given all four modalities of each slice (a 4-channel generator sees them together)."""
        modalities = torch.cat([stack([by_slice[(i["subject"], i["z"], m)] for i in items], "image") for m in MODALITIES])
        return translate_modalities(generator, modalities)[MODALITIES.index("flair") * len(items) :]

    x_a, x_b, seg_b = stack(healthy, "image"), stack(tumour, "image"), stack(tumour, "label") > 0.5
    brain_a, brain_b = x_a > 0, x_b > 0
    preprocess = read_prepare_config(prepared, size)
    # lazy=False: two generator objects (a cached one would get G_BA's weights over G_AB's, as this probe once did)
    g_ab, g_ba = (load_generator(config.get_parsed_content("network_def", lazy=False), checkpoint, d, preprocess) for d in ("AB", "BA"))
    fake_b, fake_a = translate_flair(g_ab, healthy), translate_flair(g_ba, tumour)
    bright = torch.quantile(x_a[brain_a], 0.99)

    def compact_frac(x: torch.Tensor, brain: torch.Tensor) -> float:
        """Fraction of brain voxels that are bright and in a connected bright region of >= MIN_REGION pixels."""
        compact = 0
        for image, mask in zip(x[:, 0].numpy(), brain[:, 0].numpy()):
            labels, _ = ndimage.label((image > float(bright)) & mask)
            sizes = np.bincount(labels.ravel())
            compact += int(sizes[1:][sizes[1:] >= MIN_REGION].sum())
        return compact / max(1, int(brain.sum()))

    residual = (x_b - fake_a).abs()
    target = seg_b[brain_b].numpy()
    images = {"healthy": (x_a, brain_a), "tumour": (x_b, brain_b), "G_AB(healthy)": (fake_b, brain_a), "G_BA(tumour)": (fake_a, brain_b)}
    normal = {name: brain & ~seg_b if name in ("tumour", "G_BA(tumour)") else brain for name, (_, brain) in images.items()}
    record = {
        "checkpoint": checkpoint,
        "n_healthy": len(healthy),
        "n_tumour": len(tumour),
        "image_size": size,
        "bright_fraction": {name: float((x[brain] > bright).float().mean()) for name, (x, brain) in images.items()},
        "compact_bright_fraction": {name: compact_frac(x, brain) for name, (x, brain) in images.items()},
        "normal_tissue_mean": {name: float(x[normal[name]].mean()) for name, (x, _) in images.items()},
        "G_BA_change": {"inside_tumour": float(residual[seg_b].mean()), "outside": float(residual[brain_b & ~seg_b].mean())},
        "G_AB_change_median": float((fake_b - x_a).abs()[brain_a].median()),
        "auprc": {
            "G_BA_residual": average_precision(residual[brain_b].numpy(), target),
            "flair_intensity": average_precision(x_b[brain_b].numpy(), target),
            "chance": float(target.mean()),
        },
    }
    c, a = record["G_BA_change"], record["auprc"]
    four = lambda key, digits, tumour="tumour": ", ".join(  # noqa: E731
        f"{label} {record[key][name]:.{digits}f}" for name, label in zip(images, ("healthy", tumour, "G_A→B(healthy)", "G_B→A(tumour)"))
    )
    lines = [
        f"{checkpoint}: {len(healthy)} healthy and {len(tumour)} tumour FLAIR slices at {size}²",
        f"bright-voxel fraction: {four('bright_fraction', 4)}",
        f"  of it in bright regions of >= {MIN_REGION} pixels: {four('compact_bright_fraction', 4)}",
        f"mean brain intensity outside tumours: {four('normal_tissue_mean', 3, 'tumour slices')}",
        f"mean |G_B→A(x) − x| on tumour slices: inside the tumour {c['inside_tumour']:.4f}, outside {c['outside']:.4f}",
        f"median |G_A→B(x) − x| over the brain of healthy slices (change to normal tissue): {record['G_AB_change_median']:.4f}",
        f"AUPRC over brain voxels: |x − G_B→A(x)| {a['G_BA_residual']:.3f}, FLAIR intensity {a['flair_intensity']:.3f}, chance {a['chance']:.3f}",
    ]
    print("\n".join(lines))
    if args.figure:
        n = min(args.n_figure, len(healthy), len(tumour))
        rows = [("healthy x_A", x_a), ("G_A→B(x_A)", fake_b), ("G_A→B(x_A) − x_A", fake_b - x_a)]
        rows += [("tumour x_B", x_b), ("G_B→A(x_B)", fake_a), ("x_B − G_B→A(x_B)", x_b - fake_a)]
        plot_translations([(name, images[:n, 0].numpy()) for name, images in rows], Path(args.figure))
        print(f"wrote {args.figure}")
    if args.out:
        command = command_line(__file__, argv)
        table = "\n".join(["# CycleGAN tumour probe (`benchmarks/cyclegan_tumour_probe.py`)", "", f"`{command}`", "", "```", *lines, "```", ""])
        print(f"wrote {save_report(table, dict(record, command=command), RESULTS, args.out)}.md")
    return 0


def plot_translations(rows: list[tuple[str, np.ndarray]], path: Path) -> None:
    """One row per (name, (n, H, W) images): intensities in [0, 1] in grey, differences in a diverging map (±0.5)."""
    import matplotlib.pyplot as plt

    n = rows[0][1].shape[0]
    figure, axes = plt.subplots(len(rows), n, figsize=(1.6 * n, 1.7 * len(rows)), squeeze=False)
    for r, (name, images) in enumerate(rows):
        kind = dict(cmap="RdBu_r", vmin=-0.5, vmax=0.5) if "−" in name else dict(cmap="gray", vmin=0.0, vmax=1.0)
        for axis, image in zip(axes[r], images):
            axis.imshow(np.rot90(image), **kind), axis.set_xticks([]), axis.set_yticks([])
        axes[r][0].set_ylabel(name, fontsize=7)
    figure.tight_layout(), path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110), plt.close(figure)


if __name__ == "__main__":
    sys.exit(main())
