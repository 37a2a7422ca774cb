"""Applying a trained CycleGAN generator: slice batches, pseudo-pair sets and whole NIfTI volumes.

All images are in [0, 1] (prepared-slice range); generators map [0, 1] -> [0, 1] (see ``networks.cyclegan``).
A generator with 4 input channels translates the four modalities of an axial slice together (``MODALITIES`` order,
see ``data.unpaired``); :func:`generator_channels` tells which kind a generator is.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from monai.data import DataLoader, Dataset
from torch import nn

from tsgm_components.checkpoints import SPEC_KEY, CycleGANSpec, checked_provenance, read_checkpoint
from tsgm_components.data.brats import MODALITIES, load_subject, load_volume, subject_files
from tsgm_components.data.prepare import read_prepare_config
from tsgm_components.data.preprocessing import PreprocessConfig, preprocess_volume, slices_to_volume
from tsgm_components.data.pseudo_pairs import blend_slice, placement_seed
from tsgm_components.data.unpaired import STACK_KEYS, check_in_channels, load_slice_items, slice_transforms, stack_modalities
from tsgm_components.errors import TsgmInputError
from tsgm_components.io import atomic_dir, check_can_write, check_not_over_inputs, save_json, save_nifti_like

__all__ = [
    "saved_cyclegan_spec",
    "load_generator",
    "generator_channels",
    "translate_slices",
    "translate_modalities",
    "write_pseudo_pairs",
    "translate_volume",
    "translate_subject",
]

logger = logging.getLogger(__name__)

DIRECTIONS = ("AB", "BA")


def saved_cyclegan_spec(checkpoint: str | Path) -> dict[str, Any]:
    """The ``model_spec`` a cyclegan_brats checkpoint records: ``generator`` (``ResnetGenerator.config``, what the
    configs build the generator from, so one config serves checkpoints of every scale) and ``preprocess``."""
    spec = read_checkpoint(checkpoint).get(SPEC_KEY)
    if not isinstance(spec, dict) or not isinstance(spec.get("generator"), dict):
        raise TsgmInputError(checkpoint, f"no '{SPEC_KEY}' entry with the generator's arguments: not a cyclegan_brats checkpoint")
    return dict(spec)


def load_generator(generator: nn.Module, checkpoint: str | Path, direction: str = "AB", preprocess: PreprocessConfig | None = None) -> nn.Module:
    """Load ``G_<direction>`` weights from a training checkpoint into ``generator`` and return it in eval mode.

    direction: ``"AB"`` (healthy -> tumour, used for pseudo-pairs) or ``"BA"`` (tumour -> healthy).
    preprocess: the preprocessing the caller will apply to the slices it translates (normalisation, slice range,
    image size). A checkpoint of the training bundle stores its ``model_spec`` (``CycleGANSpec``); a generator
    built with other arguments (``generator.config``) or trained on data prepared differently is refused with a
    TsgmInputError naming the checkpoint and every differing key. Checkpoints without a spec are loaded if the
    weights fit.
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    state = read_checkpoint(checkpoint)
    checked_provenance(checkpoint)
    key = f"G_{direction}"
    if key not in state:
        raise TsgmInputError(checkpoint, f"no '{key}' entry (found {sorted(state)}): not a cyclegan_brats checkpoint")
    saved_spec = state.get(SPEC_KEY)
    if saved_spec is not None and hasattr(generator, "config"):
        CycleGANSpec(preprocess, generator.config).check(saved_spec, checkpoint)
    try:
        generator.load_state_dict(state[key])
    except RuntimeError as error:
        raise TsgmInputError(checkpoint, f"'{key}' does not fit the configured generator (ngf/n_blocks?): {error}") from error
    return generator.eval()


def generator_channels(generator: nn.Module) -> int:
    """1 (translates single modality slices) or 4 (translates the four modalities stacked), from ``generator.config``."""
    return check_in_channels(getattr(generator, "config", {}).get("in_channels", 1))


@torch.no_grad()
def translate_slices(generator: nn.Module, slices: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
    """Translate (S, C, H, W) slices in [0, 1] with ``generator`` (C: its channels); returns (S, C, H, W) in [0, 1].

    Runs in eval mode on the generator's device, ``batch_size`` slices at a time; the result is on the
    device of ``slices``. H and W must be multiples of 4.
    """
    if slices.ndim != 4:
        raise ValueError(f"expected (S, C, H, W) slices, got shape {tuple(slices.shape)}")
    if slices.shape[-1] % 4 or slices.shape[-2] % 4:
        raise ValueError(f"slice size {tuple(slices.shape[-2:])} must be a multiple of 4 for the generator")
    device = next(generator.parameters()).device
    was_training = generator.training
    generator.eval()
    try:
        out = [generator(chunk.to(device, torch.float32)).to(slices.device) for chunk in slices.split(batch_size)]
    finally:
        generator.train(was_training)
    return torch.cat(out) if out else slices.new_zeros(slices.shape)


def translate_modalities(generator: nn.Module, slices: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
    """Translate (4·S, 1, H, W) slices of all modalities, stacked in ``MODALITIES`` order (S slices each), with a
    1- or 4-channel generator; returns (4·S, 1, H, W) in [0, 1] in the same order. A 4-channel generator sees the
    four modalities of each axial slice together."""
    if generator_channels(generator) == 1:
        return translate_slices(generator, slices, batch_size)
    n_modalities = len(MODALITIES)
    if slices.ndim != 4 or slices.shape[1] != 1 or slices.shape[0] % n_modalities:
        raise ValueError(f"expected ({n_modalities}·S, 1, H, W) slices in {list(MODALITIES)} order, got shape {tuple(slices.shape)}")
    stacked = slices.reshape(n_modalities, -1, *slices.shape[2:]).transpose(0, 1)  # (S, 4, H, W)
    return translate_slices(generator, stacked, batch_size).transpose(0, 1).reshape(slices.shape)


def write_pseudo_pairs(
    generator: nn.Module,
    prepared_dir: str | Path,
    output_dir: str | Path,
    splits: Sequence[str] = ("training", "validation"),
    image_size: int | None = None,
    batch_size: int = 16,
    num_workers: int = 0,
    overwrite: bool = False,
    lesion_blend_threshold: float | None = None,
    lesion_placement: str = "generator",
    lesion_placement_seed: int = 0,
) -> dict[str, int]:
    """Write the pseudo-pair set (docs/architecture.md) for every healthy slice of ``splits``.

    For each healthy slice x_A (every modality), x_B~ = G_AB(x_A) is saved as
    ``output_dir/slices/<id>/<mod>_zZZZ.npy`` ((H, W) float32 in [0, 1]) and listed in
    ``output_dir/pseudo_pairs.json`` with ``image`` = absolute path of x_A and ``condition`` = path of x_B~
    relative to ``output_dir``. A 4-channel generator translates the modalities of each axial slice together
    and its channels are written as the four modalities' pairs. The folder is written atomically (complete or
    not at all). Returns the number of pairs per split.

    ``lesion_blend_threshold``: None (the paper) keeps x_B~ = G_AB(x_A); a value replaces every axial slice's four
    conditions by :func:`~tsgm_components.data.pseudo_pairs.blend_lesions` of it (x_A outside G_AB's lesion);
    ``lesion_placement`` "random" moves each slice's blended lesion to a random place in its brain, drawn from
    (``lesion_placement_seed``, subject, z), so the same call writes the same pairs.
    """
    seed = placement_seed(lesion_blend_threshold, lesion_placement, lesion_placement_seed)
    output_dir = check_can_write(check_not_over_inputs(output_dir, [prepared_dir]), overwrite)
    datalist = Path(prepared_dir) / "datalist.json"
    in_channels = generator_channels(generator)
    healthy = {split: [item for item in load_slice_items(prepared_dir, split, image_size) if int(item["tumour"]) == 0] for split in splits}
    if not any(healthy.values()):
        raise TsgmInputError(datalist, f"no healthy slices in splits {list(splits)}")
    for item in (item for items in healthy.values() for item in items):  # all present before the first is written
        if not Path(item["image"]).is_file():
            raise TsgmInputError(item["image"], f"slice file not found (listed in {datalist})")
    # one sample per modality slice, or per axial slice with its modalities as channels; paths kept for the listing
    if in_channels == 1:
        samples = {split: [dict(item, paths=[item["image"]], modalities=[item["modality"]]) for item in items] for split, items in healthy.items()}
    else:
        samples = {
            split: [dict(item, paths=[item[key] for key in STACK_KEYS], modalities=list(MODALITIES)) for item in stack_modalities(items, datalist)]
            for split, items in healthy.items()
        }
    pairs: dict[str, list[dict]] = {split: [] for split in splits}
    with atomic_dir(output_dir, overwrite=overwrite) as tmp:
        for split, items in samples.items():
            loader = DataLoader(Dataset(items, slice_transforms(flip=False, in_channels=in_channels)), batch_size=batch_size, num_workers=num_workers)
            for batch in loader:
                fakes = translate_slices(generator, batch["image"], batch_size).numpy()
                for k, fake in enumerate(fakes):
                    subject, z = batch["subject"][k], int(batch["z"][k])
                    for channel, (modality, path) in enumerate(zip(batch["modalities"], batch["paths"])):
                        modality, path = modality[k], path[k]  # default collation transposes the lists
                        condition = f"slices/{subject}/{modality}_z{z:03d}.npy"
                        (tmp / condition).parent.mkdir(parents=True, exist_ok=True)
                        np.save(tmp / condition, fake[channel].astype(np.float32))
                        pairs[split].append({"image": path, "condition": condition, "subject": subject, "modality": modality, "z": z})
            logger.info("pseudo-pairs: %d %s slices translated", len(pairs[split]), split)
        if lesion_blend_threshold is not None:
            _blend_in_place(tmp, [item for items in pairs.values() for item in items], float(lesion_blend_threshold), seed)
        save_json(pairs, tmp / "pseudo_pairs.json")
    return {split: len(p) for split, p in pairs.items()}


def _blend_in_place(folder: Path, items: Sequence[Mapping[str, Any]], threshold: float, seed: int | None = None) -> None:
    """Replace the written conditions of every axial slice (its four modalities together) by their lesion blend;
    ``seed`` not None: each slice's lesion moved to a random place, drawn from (seed, subject, z)."""
    slices: dict[tuple[str, int], dict[str, Mapping[str, Any]]] = {}
    for item in items:
        slices.setdefault((item["subject"], int(item["z"])), {})[item["modality"]] = item
    for (subject, z), by_modality in slices.items():
        healthy = {m: np.load(item["image"]) for m, item in by_modality.items()}
        translated = {m: np.load(folder / item["condition"]) for m, item in by_modality.items()}
        blended = blend_slice(subject, z, healthy, translated, threshold, seed)
        for modality, item in by_modality.items():
            np.save(folder / item["condition"], blended[modality])
    placement = "where G_AB put them" if seed is None else f"moved at random (seed {seed})"
    logger.info("pseudo-pairs: conditions of %d axial slices blended (threshold %g), lesions %s", len(slices), threshold, placement)


def _translate_arrays(
    generator: nn.Module, volumes: dict[str, np.ndarray], brain_mask: np.ndarray, cfg: PreprocessConfig, batch_size: int
) -> dict[str, np.ndarray]:
    """modality -> (H, W, D) raw intensities to modality -> (H, W, D) translated, normalised [0, 1], 0 outside
    z_min..z_max. A 1-channel generator translates each modality alone, a 4-channel one all four together."""
    slices = {m: preprocess_volume(v, brain_mask, cfg)[1] for m, v in volumes.items()}
    if generator_channels(generator) == 1:
        translated = {m: translate_slices(generator, torch.from_numpy(s)[:, None], batch_size)[:, 0].numpy() for m, s in slices.items()}
    else:
        stacked = torch.from_numpy(np.concatenate([slices[m] for m in MODALITIES]))[:, None]
        parts = translate_modalities(generator, stacked, batch_size)[:, 0].numpy()
        translated = dict(zip(MODALITIES, np.split(parts, len(MODALITIES))))
    return {m: slices_to_volume(t, brain_mask.shape, cfg) for m, t in translated.items()}


def translate_volume(
    generator: nn.Module,
    image: str | Path,
    output: str | Path,
    prepare_config: str | Path,
    batch_size: int = 16,
    overwrite: bool = False,
) -> None:
    """Translate one single-modality NIfTI volume and save it with the input's affine and header.

    The volume is normalised and sliced exactly as in training (``prepare_config.json`` of the prepared set),
    translated slice by slice and put back in the input geometry: the output is in normalised [0, 1] intensity,
    0 outside the processed axial range ``z_min..z_max``. The brain is the volume's non-zero voxels.
    """
    if image is None or output is None:
        raise TsgmInputError("translate_volume", "give --input_image <NIfTI volume> and --output_image <NIfTI path>")
    if generator_channels(generator) > 1:
        raise TsgmInputError(
            "translate_volume", "this generator translates the four modalities together (in_channels 4): use translate_subject with --input_subject"
        )
    image = Path(image)
    if not image.is_file():
        raise TsgmInputError(image, "input volume not found")
    check_can_write(check_not_over_inputs(output, [image, prepare_config]), overwrite)
    cfg = read_prepare_config(prepare_config)
    reference, geometry, volume = load_volume(image, cfg)
    translated = _translate_arrays(generator, {"volume": volume}, volume != 0, cfg, batch_size)["volume"]
    save_nifti_like(geometry.to_input(translated), reference, output, overwrite=overwrite)


def translate_subject(
    generator: nn.Module,
    subject_dir: str | Path,
    output_dir: str | Path,
    prepare_config: str | Path,
    direction: str = "AB",
    batch_size: int = 16,
    overwrite: bool = False,
) -> list[str]:
    """Translate the four modalities of a BraTS-layout subject folder.

    Writes ``output_dir/<id>_<mod>_<direction>.nii.gz`` (e.g. ``BraTS20_Training_001_flair_AB.nii.gz``) in the
    input geometry, atomically as one folder. The brain mask is shared by all modalities, as in ``tsgm prepare``.
    Returns the written paths.
    """
    if subject_dir is None or output_dir is None:
        raise TsgmInputError("translate_subject", "give --input_subject <BraTS subject folder> and --output_dir <folder>")
    subject_dir = Path(subject_dir)
    check_can_write(check_not_over_inputs(output_dir, [subject_dir, prepare_config]), overwrite)
    cfg = read_prepare_config(prepare_config)
    files = subject_files(subject_dir, require_seg=False)
    volumes = load_subject(files, cfg)
    translated = _translate_arrays(generator, {m: volumes.arrays[m] for m in MODALITIES}, volumes.brain_mask, cfg, batch_size)
    written = []
    with atomic_dir(output_dir, overwrite=overwrite) as tmp:
        for modality in MODALITIES:
            name = f"{files.subject}_{modality}_{direction}.nii.gz"
            volumes.save(translated[modality], tmp / name)
            written.append(str(Path(output_dir) / name))
    return written
