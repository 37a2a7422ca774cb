"""Unpaired healthy/tumour slice sampling for CycleGAN training (domain A = healthy, B = tumour).

Reads a prepared dataset (``datalist.json``, see docs/architecture.md). With ``in_channels=1`` (the paper's
set-up) every modality slice is an independent 1-channel sample; with ``in_channels=4`` the four modalities of one
axial slice are one 4-channel sample (channels in ``MODALITIES`` order), so every iteration shows each modality
its lesion, four times the per-modality samples of the 1-channel set-up for the same compute. As in the reference
``UnalignedDataset``, an epoch has ``max(|A|, |B|)`` items; item ``i`` is A sample ``i mod |A|`` with a B sample
drawn uniformly at random (seeded, different per DataLoader worker and per distributed rank).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from monai.data import CacheDataset
from monai.transforms import (
    Compose,
    ConcatItemsd,
    DeleteItemsd,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    RandFlipd,
    Randomizable,
)

from tsgm_components.data.brats import MODALITIES
from tsgm_components.data.prepare import PREPARE_CONFIG, read_prepare_config
from tsgm_components.errors import TsgmInputError

__all__ = [
    "load_slice_items",
    "axial_slices",
    "stack_modalities",
    "lesion_fraction",
    "check_in_channels",
    "slice_transforms",
    "UnpairedSliceDataset",
    "fixed_examples",
]

SPLITS = ("training", "validation", "test")
#: Item keys of the per-modality slice paths of a stacked (4-channel) sample, in ``MODALITIES`` order.
STACK_KEYS = tuple(f"image_{m}" for m in MODALITIES)


def load_slice_items(prepared_dir: str | Path, split: str, image_size: int | None = None) -> list[dict[str, Any]]:
    """Items of ``split`` in ``prepared_dir/datalist.json`` with ``image``/``label`` made absolute.

    If ``image_size`` is given it must match the prepared set's ``prepare_config.json`` (the networks of a
    config are built for that size).
    """
    prepared_dir = Path(prepared_dir).resolve()
    datalist_path = prepared_dir / "datalist.json"
    if not datalist_path.is_file():
        raise TsgmInputError(datalist_path, "not found: run `tsgm prepare` first or point prepared_dir at a prepared dataset")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    try:
        datalist = json.loads(datalist_path.read_text())
    except json.JSONDecodeError as error:
        raise TsgmInputError(datalist_path, f"invalid JSON ({error})") from error
    if image_size is not None and (prepared_dir / PREPARE_CONFIG).is_file():
        read_prepare_config(prepared_dir, image_size)  # the networks of a config are built for one slice size
    items = []
    for item in datalist.get(split, []):
        missing = {"image", "subject", "modality", "z", "tumour"} - set(item)
        if missing:
            raise TsgmInputError(datalist_path, f"{split} item {item} lacks keys {sorted(missing)}")
        item = dict(item, image=str(prepared_dir / item["image"]))
        if "label" in item:
            item["label"] = str(prepared_dir / item["label"])
        items.append(item)
    return items


def check_in_channels(in_channels: int) -> int:
    """``in_channels`` of a CycleGAN: 1 (one modality slice per sample) or 4 (the modalities stacked)."""
    if int(in_channels) not in (1, len(MODALITIES)):
        raise ValueError(
            f"in_channels must be 1 (modality slices as separate samples) or {len(MODALITIES)} (stacked {list(MODALITIES)}), got {in_channels}"
        )
    return int(in_channels)


def axial_slices(items: list[dict[str, Any]], source: str | Path, lacking: str = "modalities") -> list[tuple[str, int, dict[str, dict[str, Any]]]]:
    """Per-modality items (``subject``, ``z``, ``modality`` keys) grouped by axial slice: sorted
    ``(subject, z, {modality: item})`` with all four modalities each.

    Raises TsgmInputError naming ``source`` if a slice lacks a modality ("slice z=Z of S lacks ``lacking`` [...]").
    """
    groups: dict[tuple[str, int], dict[str, dict[str, Any]]] = {}
    for item in items:
        groups.setdefault((str(item["subject"]), int(item["z"])), {})[str(item["modality"])] = item
    slices = []
    for (subject, z), by_modality in sorted(groups.items()):
        missing = [m for m in MODALITIES if m not in by_modality]
        if missing:
            raise TsgmInputError(source, f"slice z={z} of {subject} lacks {lacking} {missing} (4-channel stacking needs all of {list(MODALITIES)})")
        slices.append((subject, z, by_modality))
    return slices


def stack_modalities(items: list[dict[str, Any]], source: str | Path = "datalist.json") -> list[dict[str, Any]]:
    """Group per-modality slice items by (subject, z) (:func:`axial_slices`): one item per axial slice with the four
    slice paths under :data:`STACK_KEYS`, plus ``subject``, ``z``, ``tumour`` (and ``label`` if the items have one).

    Raises TsgmInputError naming ``source`` if a slice lacks a modality.
    """
    stacked = []
    for subject, z, by_modality in axial_slices(items, source):
        first = by_modality[MODALITIES[0]]
        item = {key: by_modality[m]["image"] for key, m in zip(STACK_KEYS, MODALITIES)}
        item.update(subject=subject, z=z, tumour=int(first["tumour"]))
        if "label" in first:
            item["label"] = first["label"]
        stacked.append(item)
    return stacked


def lesion_fraction(item: dict[str, Any]) -> float:
    """Fraction of a slice's brain (voxels non-zero in any of its images) inside its tumour ``label``; a slice
    item of :func:`load_slice_items` or :func:`stack_modalities`. 0 for an item without a label."""
    if "label" not in item:
        return 0.0
    paths = [item[key] for key in STACK_KEYS] if STACK_KEYS[0] in item else [item["image"]]
    brain = np.any([np.load(path) > 0 for path in paths], axis=0)
    return float((np.load(item["label"]) > 0).sum() / max(1, int(brain.sum())))


def slice_transforms(flip: bool = False, in_channels: int = 1) -> Compose:
    """Load a prepared sample as an (in_channels, H, W) float32 tensor in [0, 1]; optional random left-right flip.

    ``in_channels=1``: ``image`` is one ``.npy`` slice; 4: the four paths of :func:`stack_modalities` are loaded
    and concatenated into ``image``.
    Slices are ``volume[:, :, z]``, so spatial axis 0 is the volume's first (left-right in BraTS) axis.
    """
    if check_in_channels(in_channels) == 1:
        transforms = [
            LoadImaged(keys="image", reader="NumpyReader", image_only=True),
            EnsureChannelFirstd(keys="image", channel_dim="no_channel"),
        ]
    else:
        transforms = [
            LoadImaged(keys=STACK_KEYS, reader="NumpyReader", image_only=True),
            EnsureChannelFirstd(keys=STACK_KEYS, channel_dim="no_channel"),
            ConcatItemsd(keys=STACK_KEYS, name="image", dim=0),
            DeleteItemsd(keys=STACK_KEYS),
        ]
    if flip:
        transforms.append(RandFlipd(keys="image", prob=0.5, spatial_axis=0))
    # plain tensors: no per-slice metadata to carry, and checkpoints (image pools) stay loadable with weights_only
    transforms.append(EnsureTyped(keys="image", dtype=torch.float32, track_meta=False))
    return Compose(transforms)


class UnpairedSliceDataset(torch.utils.data.Dataset, Randomizable):
    """``{"A": (C, H, W), "B": (C, H, W)}`` float32 in [0, 1]: a healthy sample and a random tumour sample.

    Args:
        prepared_dir: output folder of ``tsgm prepare``.
        split: datalist split to draw from.
        image_size: expected slice size (checked against ``prepare_config.json``); None skips the check.
        flip: random left-right flips (the reference trains with flips).
        in_channels: C; 1 = every modality slice is a sample (paper), 4 = the modalities of an axial slice are
            stacked (``MODALITIES`` order; a slice counts as tumour if its label has tumour voxels).
        min_tumour_fraction: domain B keeps only tumour slices whose lesion covers at least this fraction of the
            brain (:func:`lesion_fraction`); slices with a few lesion voxels look healthy and blur the domain.
            A slice-level selection, like the healthy/tumour label itself; 0 keeps every tumour slice (paper).
        cache_rate: fraction of each domain kept in memory (MONAI ``CacheDataset``); 0 reads from disk.
        seed: seeds the B draws and flips (offset by the distributed rank; DataLoader workers are reseeded by
            MONAI's ``worker_init_fn``).
    """

    def __init__(
        self,
        prepared_dir: str | Path,
        split: str = "training",
        image_size: int | None = None,
        flip: bool = False,
        cache_rate: float = 1.0,
        seed: int = 0,
        in_channels: int = 1,
        min_tumour_fraction: float = 0.0,
    ):
        items = load_slice_items(prepared_dir, split, image_size)
        if check_in_channels(in_channels) > 1:
            items = stack_modalities(items, Path(prepared_dir) / "datalist.json")
        healthy = [item for item in items if int(item["tumour"]) == 0]
        tumour = [item for item in items if int(item["tumour"]) == 1]
        if min_tumour_fraction > 0:
            tumour = [item for item in tumour if lesion_fraction(item) >= min_tumour_fraction]
        for name, domain in (("healthy (A)", healthy), (f"tumour (B, lesion >= {min_tumour_fraction:g} of the brain)", tumour)):
            if not domain:
                raise TsgmInputError(Path(prepared_dir) / "datalist.json", f"split '{split}' has no {name} slices")
        transform = slice_transforms(flip, in_channels)
        self.domain_a = CacheDataset(healthy, transform, cache_rate=cache_rate, progress=False)
        self.domain_b = CacheDataset(tumour, transform, cache_rate=cache_rate, progress=False)
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        self.set_random_state(seed=seed + 1000 * rank)

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None) -> "UnpairedSliceDataset":
        super().set_random_state(seed, state)
        # also reseed the flips, which MONAI's `set_rnd` does not reach once it stops at this object
        for domain in (self.domain_a, self.domain_b):
            domain.transform.set_random_state(seed=int(self.R.randint(2**31)))
        return self

    def randomize(self, data: Any = None) -> None:
        self._index_b = int(self.R.randint(len(self.domain_b)))

    def __len__(self) -> int:
        return max(len(self.domain_a), len(self.domain_b))

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        self.randomize()
        return {"A": self.domain_a[index % len(self.domain_a)]["image"], "B": self.domain_b[self._index_b]["image"]}


def fixed_examples(prepared_dir: str | Path, split: str = "validation", n: int = 4, in_channels: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` evenly spaced healthy and ``n`` tumour samples of ``split`` as (n, in_channels, H, W) tensors in [0, 1].

    Used to show the same translations every epoch. Falls back to the training split when ``split`` lacks
    slices of a domain (e.g. a tiny validation split); fewer than ``n`` are returned if a domain is smaller.
    """
    source = Path(prepared_dir) / "datalist.json"

    def samples(split_name: str) -> list[dict[str, Any]]:
        items = load_slice_items(prepared_dir, split_name)
        return stack_modalities(items, source) if check_in_channels(in_channels) > 1 else items

    examples = []
    for tumour in (0, 1):
        items = [item for item in samples(split) if int(item["tumour"]) == tumour]
        if not items:
            items = [item for item in samples("training") if int(item["tumour"]) == tumour]
        if not items:
            raise TsgmInputError(source, f"no slices with tumour={tumour}")
        picks = np.unique(np.linspace(0, len(items) - 1, min(n, len(items))).round().astype(int))
        load = slice_transforms(flip=False, in_channels=in_channels)
        examples.append(torch.stack([load(items[i])["image"] for i in picks]))
    return examples[0], examples[1]
