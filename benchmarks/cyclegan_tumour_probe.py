"""Does a trained CycleGAN translate tumours? The check to run before training VE-JP on its pseudo-pairs.

    python benchmarks/cyclegan_tumour_probe.py --work_dir runs/demo [--checkpoint runs/demo/cyclegan/model.pt]

TSGM learns "remove what G_A→B adds": if G_A→B adds no tumour-like change to healthy slices, the pseudo-pairs teach
VE-JP to copy its condition, tumour included, and no sampler can fix that. On FLAIR slices of the prepared dataset
(training and validation; up to ``--n_slices`` healthy and as many tumour slices) this prints:

- the fraction of brain voxels brighter than the 99th percentile of healthy brain, in healthy slices, tumour slices,
  G_A→B(healthy) (should approach the tumour slices' value) and G_B→A(tumour) (should approach the healthy value),
  and the part of it in connected bright regions of at least ``MIN_REGION`` pixels (lesions rather than speckle);
- the mean brain intensity outside tumours of the same four (per-volume percentile normalisation makes the normal
  tissue of tumour volumes darker; a generator may learn that global shift instead of lesions);
- mean |G_B→A(x) − x| inside and outside the tumour of tumour slices (a tumour-removing G_B→A changes the inside far
  more than the outside), and the median |G_A→B(x) − x| over the brain of healthy slices (what G_A→B does to normal
  tissue: the pseudo-pairs pass it on to VE-JP as a condition that differs from x_A everywhere);
- AUPRC of |x − G_B→A(x)| for the tumour voxels over brain voxels (the CycleGAN-only baseline's FLAIR map), next to
  that of the FLAIR intensity itself (what thresholding gets) and the tumour prevalence (chance level).

Writes nothing unless ``--figure PNG`` (the first ``--n_figure`` slices of each kind: healthy x_A, G_A→B(x_A), their
difference; tumour x_B, G_B→A(x_B), their difference; FLAIR) or ``--out NAME`` (the numbers as
``benchmarks/results/NAME.{md,json}``); the config used is the bundle's ``inference.yaml`` (``--config_file`` to change).
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

from tsgm_components import REPO_ROOT
from tsgm_components.evaluation.metrics import average_precision
from tsgm_components.data.brats import MODALITIES
from tsgm_components.data.prepare import read_prepare_config
from tsgm_components.stage1.translation import load_generator, translate_modalities

from common import save_report  # benchmarks/common.py (this script's folder is sys.path[0])

#: a bright region this large (4-connected pixels of the slice) counts as lesion-like, smaller ones as speckle
MIN_REGION = 10
CONFIGS = REPO_ROOT / "bundles" / "cyclegan_brats" / "configs"


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
    config.read_config(args.config_file)
    config.update({"checkpoint": checkpoint})
    size = int(config.get_parsed_content("image_size"))

    datalist = json.loads((prepared / "datalist.json").read_text())
    items = datalist["training"] + datalist["validation"]
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
    # lazy=False: two generator objects (the parser caches parsed content, so a second plain get_parsed_content would
    # return the first object and G_BA's weights would overwrite G_AB's: this probe once reported G_B→A(healthy) as
    # "G_A→B(healthy)")
    g_ab = load_generator(config.get_parsed_content("network_def", lazy=False), checkpoint, "AB", preprocess)
    g_ba = load_generator(config.get_parsed_content("network_def", lazy=False), checkpoint, "BA", preprocess)
    if g_ab is g_ba:
        raise RuntimeError("the config returned one generator object for both directions")
    fake_b, fake_a = translate_flair(g_ab, healthy), translate_flair(g_ba, tumour)
    bright = torch.quantile(x_a[brain_a], 0.99)
    frac = lambda x, brain: float((x[brain] > bright).float().mean())  # noqa: E731

    def compact_frac(x: torch.Tensor, brain: torch.Tensor) -> float:
        """Fraction of brain voxels that are bright and in a connected bright region of >= MIN_REGION pixels (a
        lesion, not speckle)."""
        compact = 0
        for image, mask in zip(x[:, 0].numpy(), brain[:, 0].numpy()):
            labels, _ = ndimage.label((image > float(bright)) & mask)
            sizes = np.bincount(labels.ravel())
            compact += int(sizes[1:][sizes[1:] >= MIN_REGION].sum())
        return compact / max(1, int(brain.sum()))

    residual = (x_b - fake_a).abs()
    target = seg_b[brain_b].numpy()
    mean = lambda x, where: float(x[where].mean())  # noqa: E731
    record = {
        "checkpoint": checkpoint,
        "n_healthy": len(healthy),
        "n_tumour": len(tumour),
        "image_size": size,
        "bright_fraction": {
            "healthy": frac(x_a, brain_a),
            "tumour": frac(x_b, brain_b),
            "G_AB(healthy)": frac(fake_b, brain_a),
            "G_BA(tumour)": frac(fake_a, brain_b),
        },
        "compact_bright_fraction": {
            "healthy": compact_frac(x_a, brain_a),
            "tumour": compact_frac(x_b, brain_b),
            "G_AB(healthy)": compact_frac(fake_b, brain_a),
            "G_BA(tumour)": compact_frac(fake_a, brain_b),
        },
        "normal_tissue_mean": {
            "healthy": mean(x_a, brain_a),
            "tumour": mean(x_b, brain_b & ~seg_b),
            "G_AB(healthy)": mean(fake_b, brain_a),
            "G_BA(tumour)": mean(fake_a, brain_b & ~seg_b),
        },
        "G_BA_change": {"inside_tumour": float(residual[seg_b].mean()), "outside": float(residual[brain_b & ~seg_b].mean())},
        "G_AB_change_median": float((fake_b - x_a).abs()[brain_a].median()),
        "auprc": {
            "G_BA_residual": average_precision(residual[brain_b].numpy(), target),
            "flair_intensity": average_precision(x_b[brain_b].numpy(), target),
            "chance": float(target.mean()),
        },
    }
    b, m, c, a = record["bright_fraction"], record["normal_tissue_mean"], record["G_BA_change"], record["auprc"]
    k = record["compact_bright_fraction"]
    lines = [
        f"{checkpoint}: {len(healthy)} healthy and {len(tumour)} tumour FLAIR slices at {size}²",
        f"bright-voxel fraction: healthy {b['healthy']:.4f}, tumour {b['tumour']:.4f}, "
        f"G_A→B(healthy) {b['G_AB(healthy)']:.4f}, G_B→A(tumour) {b['G_BA(tumour)']:.4f}",
        f"  of it in bright regions of >= {MIN_REGION} pixels: healthy {k['healthy']:.4f}, tumour {k['tumour']:.4f}, "
        f"G_A→B(healthy) {k['G_AB(healthy)']:.4f}, G_B→A(tumour) {k['G_BA(tumour)']:.4f}",
        f"mean brain intensity outside tumours: healthy {m['healthy']:.3f}, tumour slices {m['tumour']:.3f}, "
        f"G_A→B(healthy) {m['G_AB(healthy)']:.3f}, G_B→A(tumour) {m['G_BA(tumour)']:.3f}",
        f"mean |G_B→A(x) − x| on tumour slices: inside the tumour {c['inside_tumour']:.4f}, outside {c['outside']:.4f}",
        f"median |G_A→B(x) − x| over the brain of healthy slices (change to normal tissue): {record['G_AB_change_median']:.4f}",
        f"AUPRC over brain voxels: |x − G_B→A(x)| {a['G_BA_residual']:.3f}, FLAIR intensity {a['flair_intensity']:.3f}, chance {a['chance']:.3f}",
    ]
    print("\n".join(lines))
    if args.figure:
        n = min(args.n_figure, len(healthy), len(tumour))
        rows = [
            ("healthy x_A", x_a),
            ("G_A→B(x_A)", fake_b),
            ("G_A→B(x_A) − x_A", fake_b - x_a),
            ("tumour x_B", x_b),
            ("G_B→A(x_B)", fake_a),
            ("x_B − G_B→A(x_B)", x_b - fake_a),
        ]
        plot_translations([(name, images[:n, 0].numpy()) for name, images in rows], Path(args.figure))
        print(f"wrote {args.figure}")
    if args.out:
        command = "python benchmarks/cyclegan_tumour_probe.py " + " ".join(argv if argv is not None else sys.argv[1:])
        table = "\n".join(["# CycleGAN tumour probe (`benchmarks/cyclegan_tumour_probe.py`)", "", f"`{command}`", "", "```", *lines, "```", ""])
        print(f"wrote {save_report(table, dict(record, command=command), REPO_ROOT / 'benchmarks' / 'results', args.out)}.md")
    return 0


def plot_translations(rows: list[tuple[str, np.ndarray]], path: Path) -> None:
    """One row per (name, (n, H, W) images): intensities in [0, 1] in grey, differences in a diverging map (±0.5)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = rows[0][1].shape[0]
    figure, axes = plt.subplots(len(rows), n, figsize=(1.6 * n, 1.7 * len(rows)), squeeze=False)
    for r, (name, images) in enumerate(rows):
        difference = "−" in name
        for k in range(n):
            axis = axes[r][k]
            axis.imshow(
                np.rot90(images[k]), cmap="RdBu_r" if difference else "gray", vmin=-0.5 if difference else 0.0, vmax=0.5 if difference else 1.0
            )
            axis.set_xticks([]), axis.set_yticks([])
        axes[r][0].set_ylabel(name, fontsize=7)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


if __name__ == "__main__":
    sys.exit(main())
