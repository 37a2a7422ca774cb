"""Pseudo-pair datalist (CycleGAN inference -> VE-JP training) and the transforms that load a pair.

``PAIRS/pseudo_pairs.json`` (docs/architecture.md): ``{"training": [...], "validation": [...]}`` with items
``{"image": x_A .npy, "condition": x_B~ .npy, "subject", "modality", "z"}``, paths relative to ``PAIRS``. The
four-channel stage 2 (``channels=4``) reads the four modalities' pairs of an axial slice as one sample.

Lesion blending (:func:`blend_lesions`, off by default; the paper uses G_A→B(x_A) as it is): at the 64² demo scale
G_A→B adds a lesion but also rewrites the texture of all normal tissue (median change 0.057 on a brain median of
0.4, ``benchmarks/results/cyclegan_probe_shipped.md``), so VE-JP learns not to copy its condition finely and normal
tissue becomes false positives (the denoiser probe of the model then shipped, commit 3f40ed7's
``benchmarks/results/probe_shipped_on_pseudo_pairs.md``). Blending keeps x_A outside
the region where G_A→B put its hyperintense lesion and G_A→B's output inside it.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from monai.transforms import Compose, ConcatItemsd, DeleteItemsd, EnsureChannelFirstd, EnsureTyped, LoadImaged
from scipy import ndimage as ndi

from tsgm_components.data.brats import MODALITIES
from tsgm_components.data.unpaired import axial_slices
from tsgm_components.errors import TsgmInputError

PAIR_KEYS = ("image", "condition")


def load_pseudo_pairs(pairs_dir: str | Path, split: str = "training", image_size: int | None = None, channels: int = 1) -> list[dict[str, Any]]:
    """Items of ``split`` in ``pairs_dir/pseudo_pairs.json`` with absolute ``image``/``condition`` paths.

    When ``image_size`` is given, the first pair's slices must be (image_size, image_size): a config built
    for another size fails here with the file named, not deep inside the network. ``channels`` 1: one item per
    modality slice; 4: one item per axial slice (:func:`stack_pairs`).
    """
    if channels not in (1, len(MODALITIES)):
        raise ValueError(f"channels must be 1 (modality slices as samples) or {len(MODALITIES)} (stacked {list(MODALITIES)}), got {channels}")
    pairs_dir = Path(pairs_dir).resolve()
    path = pairs_dir / "pseudo_pairs.json"
    if not path.is_file():
        raise TsgmInputError(path, "not found: run the cyclegan_brats bundle's inference (it writes the pseudo-pairs) first")
    try:
        datalist = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise TsgmInputError(path, f"cannot read pseudo-pair JSON ({type(error).__name__}: {error})") from error
    items = []
    for item in datalist.get(split, []):
        missing = [k for k in PAIR_KEYS if k not in item]
        if missing:
            raise TsgmInputError(path, f"{split} item {item} lacks keys {missing}")
        items.append(dict(item, **{k: str(pairs_dir / item[k]) for k in PAIR_KEYS}))
    if not items:
        raise TsgmInputError(path, f"split '{split}' has no pseudo-pairs")
    if image_size is not None:
        for key in PAIR_KEYS:
            try:
                shape = np.load(items[0][key], mmap_mode="r").shape
            except (OSError, ValueError) as error:
                raise TsgmInputError(items[0][key], f"cannot read slice ({type(error).__name__}: {error})") from error
            if shape != (image_size, image_size):
                raise TsgmInputError(items[0][key], f"slice shape {shape} does not match the config's image_size={image_size}")
    return items if channels == 1 else stack_pairs(items, path)


def stacked_key(key: str, modality: str) -> str:
    """The item key of one modality's slice path in a stacked pair: ``image_flair``, ``condition_t1``."""
    return f"{key}_{modality}"


def stack_pairs(items: list[dict[str, Any]], source: str | Path = "pseudo_pairs.json") -> list[dict[str, Any]]:
    """Group per-modality pairs by (subject, z): one item per axial slice with the four modalities' ``image`` and
    ``condition`` paths under :func:`stacked_key` (``MODALITIES`` order), plus ``subject`` and ``z``.

    Raises TsgmInputError naming ``source`` if a slice lacks a modality's pair.
    """
    return [
        dict({stacked_key(key, m): by_modality[m][key] for key in PAIR_KEYS for m in MODALITIES}, subject=subject, z=z)
        for subject, z, by_modality in axial_slices(items, source, lacking="the pairs of")
    ]


def pair_transforms(keys: tuple[str, ...] = PAIR_KEYS, channels: int = 1) -> Compose:
    """Load ``keys`` (.npy slices) as (channels, H, W) float32 tensors in [0, 1]: with ``channels`` 4 each key is
    the concatenation of the four modalities' slices of a :func:`stack_pairs` item, in ``MODALITIES`` order."""
    if channels == 1:
        loaded = list(keys)
        stacking = []
    else:
        loaded = [stacked_key(key, m) for key in keys for m in MODALITIES]
        stacking = [ConcatItemsd(keys=[stacked_key(key, m) for m in MODALITIES], name=key, dim=0) for key in keys]
        stacking.append(DeleteItemsd(keys=loaded))
    return Compose(
        [
            LoadImaged(keys=loaded, reader="NumpyReader", image_only=True),
            EnsureChannelFirstd(keys=loaded, channel_dim="no_channel"),
            *stacking,
            EnsureTyped(keys=list(keys), dtype=torch.float32, track_meta=False),
        ]
    )


#: Modalities in which G_A→B's synthetic lesions are hyperintense: where they change, the lesion is (module doc).
LESION_EVIDENCE = ("flair", "t2")


def lesion_weights(changes: Mapping[str, np.ndarray], threshold: float, sigma: float = 2.0, min_pixels: int = 10, margin: int = 2) -> np.ndarray:
    """Where G_A→B put a lesion into one axial slice: (H, W) float32 weights in [0, 1].

    changes: modality -> (H, W) signed change G_A→B(x_A) − x_A (only :data:`LESION_EVIDENCE` are read). A pixel is
    lesion where a Gaussian-smoothed (``sigma`` px) FLAIR or T2 change exceeds ``threshold``; components of at least
    ``min_pixels`` are kept, dilated by ``margin`` px, and their edge feathered (Gaussian σ 1 px, cut at 4 px) so the
    blend has no seam; weights are exactly 0 further than ``margin`` + 4 px from the evidence.
    """
    evidence = np.zeros(next(iter(changes.values())).shape, dtype=bool)
    for modality in LESION_EVIDENCE:
        evidence |= ndi.gaussian_filter(changes[modality].astype(np.float32), sigma) > threshold
    labels, n = ndi.label(evidence)
    if n:
        sizes = ndi.sum(evidence, labels, index=np.arange(1, n + 1))
        evidence = np.isin(labels, 1 + np.flatnonzero(sizes >= min_pixels))
    if margin:
        evidence = ndi.binary_dilation(evidence, iterations=margin)
    return np.clip(ndi.gaussian_filter(evidence.astype(np.float32), 1.0), 0.0, 1.0)


#: Where a blended lesion goes: where G_A→B put it, or moved to a random place in the brain (:func:`random_shift`).
LESION_PLACEMENTS = ("generator", "random")


def placement_seed(lesion_blend_threshold: float | None, lesion_placement: str, lesion_placement_seed: int) -> int | None:
    """Checks a pair treatment (the keys of the same names of the CycleGAN inference and ceilings configs) and returns
    the seed of random lesion placement, or None when the lesions stay where they are."""
    if lesion_placement not in LESION_PLACEMENTS:
        raise ValueError(f"lesion_placement must be one of {LESION_PLACEMENTS}, got {lesion_placement!r}")
    if lesion_placement != "generator" and lesion_blend_threshold is None:
        raise ValueError("lesion_placement 'random' moves the blended lesion region: it needs a lesion_blend_threshold")
    return None if lesion_placement == "generator" else int(lesion_placement_seed)


def random_shift(weights: np.ndarray, brain: np.ndarray, rng: np.random.Generator, min_inside: float = 0.9, tries: int = 20) -> tuple[int, int]:
    """An integer (rows, columns) shift that moves the lesion ``weights`` ((H, W) in [0, 1]) so that its centroid lands
    on a random pixel of ``brain`` ((H, W) bool) and at least ``min_inside`` of its weight stays inside the brain;
    (0, 0) when ``tries`` draws find none (the lesion stays where it is)."""
    rows, cols = np.nonzero(brain)
    total = float(weights.sum())
    if total == 0 or rows.size == 0:
        return 0, 0
    grid = np.indices(weights.shape)
    centroid = [float((g * weights).sum()) / total for g in grid]
    for _ in range(tries):
        k = int(rng.integers(rows.size))
        shift = (int(round(rows[k] - centroid[0])), int(round(cols[k] - centroid[1])))
        if float((_shifted(weights, shift) * brain).sum()) >= min_inside * total:
            return shift
    return 0, 0


def _shifted(image: np.ndarray, shift: tuple[int, int]) -> np.ndarray:
    """``image`` moved by whole pixels, zero where nothing moves in."""
    return ndi.shift(image, shift, order=0, mode="constant", cval=0.0)


def blend_lesions(
    healthy: Mapping[str, np.ndarray], translated: Mapping[str, np.ndarray], threshold: float, rng: np.random.Generator | None = None
) -> dict[str, np.ndarray]:
    """Pseudo-pair conditions that keep x_A's normal tissue exactly and take G_A→B's lesion:
    ``x_A + w · (G_A→B(x_A) − x_A)`` with ``w`` = :func:`lesion_weights` of the slice, the same region in every
    modality. With ``rng`` (placement "random") the lesion region of G_A→B(x_A) and its weights are moved together
    by :func:`random_shift` (the same shift in every modality), taking only brain and landing only in brain:
    ``x_A + w' · (shift(G_A→B(x_A)) − x_A)``, ``w' = shift(w · brain) · brain``. healthy, translated: modality -> (H, W) in [0, 1]; returns
    modality -> (H, W) float32 in [0, 1]."""
    weights = lesion_weights({m: translated[m] - healthy[m] for m in translated}, threshold)
    lesion = dict(translated)
    if rng is not None and weights.any():
        brain = np.any([healthy[m] > 0 for m in healthy], axis=0)
        weights = weights * brain  # what is moved is brain (lesion and its margin), never background
        shift = random_shift(weights, brain, rng)
        weights = _shifted(weights, shift) * brain
        lesion = {m: _shifted(translated[m], shift) for m in translated}
    return {m: np.clip(healthy[m] + weights * (lesion[m] - healthy[m]), 0.0, 1.0).astype(np.float32) for m in translated}


def blend_slice(
    subject: str, z: int, healthy: Mapping[str, np.ndarray], lesioned: Mapping[str, np.ndarray], threshold: float, seed: int | None
) -> dict[str, np.ndarray]:
    """:func:`blend_lesions` of one axial slice's four modalities; with ``seed`` (see :func:`placement_seed`) its lesion
    is moved at random, drawn from (seed, subject, z) only, so a rerun writes the same pairs whatever the slice order."""
    if sorted(healthy) != sorted(MODALITIES) or sorted(lesioned) != sorted(MODALITIES):
        raise TsgmInputError(f"{subject} z={z}", f"lesion blending needs all four modalities of a slice, got {sorted(lesioned)}")
    rng = None if seed is None else np.random.default_rng([int(seed), zlib.crc32(str(subject).encode()), int(z)])
    return blend_lesions(healthy, lesioned, threshold, rng)
