"""Unpaired healthy/tumour slice sampling for CycleGAN training (domain A = healthy, B = tumour).

Reads a prepared dataset (``datalist.json``, see docs/architecture.md). Every modality slice is an independent
1-channel sample. As in the reference ``UnalignedDataset``, an epoch has ``max(|A|, |B|)`` items; item ``i`` is
A slice ``i mod |A|`` with a B slice drawn uniformly at random (seeded, different per DataLoader worker and per
distributed rank).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from monai.data import CacheDataset
from monai.transforms import Compose, EnsureChannelFirstd, EnsureTyped, LoadImaged, RandFlipd, Randomizable

from tsgm_components.errors import TsgmInputError

__all__ = ["load_slice_items", "slice_transforms", "UnpairedSliceDataset", "fixed_examples"]

SPLITS = ("training", "validation", "test")


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
    if image_size is not None:
        config_path = prepared_dir / "prepare_config.json"
        prepared_size = json.loads(config_path.read_text()).get("image_size") if config_path.is_file() else None
        if prepared_size is not None and int(prepared_size) != int(image_size):
            raise TsgmInputError(
                config_path,
                f"slices were prepared at image_size={prepared_size} but the config expects image_size={image_size} "
                f"(override --image_size {prepared_size}, or prepare the data again at {image_size})",
            )
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


def slice_transforms(flip: bool = False) -> Compose:
    """Load a prepared ``.npy`` slice as a (1, H, W) float32 tensor in [0, 1]; optional random left-right flip.

    Slices are ``volume[:, :, z]``, so spatial axis 0 is the volume's first (left-right in BraTS) axis.
    """
    transforms = [
        LoadImaged(keys="image", reader="NumpyReader", image_only=True),
        EnsureChannelFirstd(keys="image", channel_dim="no_channel"),
    ]
    if flip:
        transforms.append(RandFlipd(keys="image", prob=0.5, spatial_axis=0))
    # plain tensors: no per-slice metadata to carry, and checkpoints (image pools) stay loadable with weights_only
    transforms.append(EnsureTyped(keys="image", dtype=torch.float32, track_meta=False))
    return Compose(transforms)


class UnpairedSliceDataset(torch.utils.data.Dataset, Randomizable):
    """``{"A": (1, H, W), "B": (1, H, W)}`` float32 in [0, 1]: a healthy slice and a random tumour slice.

    Args:
        prepared_dir: output folder of ``tsgm prepare``.
        split: datalist split to draw from.
        image_size: expected slice size (checked against ``prepare_config.json``); None skips the check.
        flip: random left-right flips (the reference trains with flips).
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
    ):
        items = load_slice_items(prepared_dir, split, image_size)
        healthy = [item for item in items if int(item["tumour"]) == 0]
        tumour = [item for item in items if int(item["tumour"]) == 1]
        for name, domain in (("healthy (A)", healthy), ("tumour (B)", tumour)):
            if not domain:
                raise TsgmInputError(Path(prepared_dir) / "datalist.json", f"split '{split}' has no {name} slices")
        transform = slice_transforms(flip)
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


def fixed_examples(prepared_dir: str | Path, split: str = "validation", n: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` evenly spaced healthy and ``n`` tumour slices of ``split`` as (n, 1, H, W) tensors in [0, 1].

    Used to show the same translations every epoch. Falls back to the training split when ``split`` lacks
    slices of a domain (e.g. a tiny validation split); fewer than ``n`` are returned if a domain is smaller.
    """
    examples = []
    for tumour in (0, 1):
        items = [item for item in load_slice_items(prepared_dir, split) if int(item["tumour"]) == tumour]
        if not items:
            items = [item for item in load_slice_items(prepared_dir, "training") if int(item["tumour"]) == tumour]
        if not items:
            raise TsgmInputError(Path(prepared_dir) / "datalist.json", f"no slices with tumour={tumour}")
        picks = np.unique(np.linspace(0, len(items) - 1, min(n, len(items))).round().astype(int))
        load = slice_transforms(flip=False)
        examples.append(torch.stack([load(items[i])["image"] for i in picks]))
    return examples[0], examples[1]
