"""4-channel CycleGAN (`in_channels: 4`): the modalities of an axial slice stacked as channels, through training
data, bfloat16 training, snapshots, pseudo-pairs, the CycleGAN-only baseline and volume translation."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

from test_cyclegan import MODS, make_prepared
from tsgm_components.evaluation.baselines import GeneratorReconstructor
from tsgm_components.data.unpaired import UnpairedSliceDataset, fixed_examples, lesion_fraction, load_slice_items, stack_modalities
from tsgm_components.engines.cyclegan import CycleGANTrainer, TranslationSnapshots
from tsgm_components.errors import TsgmInputError
from tsgm_components.losses.gan import ImagePool
from tsgm_components.networks.cyclegan import PatchDiscriminator, ResnetGenerator
from tsgm_components.stage1.translation import translate_modalities, translate_subject, translate_volume, write_pseudo_pairs


class ChannelOffset(nn.Module):
    """Stand-in 4-channel generator with a known answer: output channel c = 0.5 · input channel c + 0.1 · c, so a
    modality written to or read from the wrong channel shows."""

    config = {"in_channels": 4, "out_channels": 4, "ngf": 0, "n_blocks": 0}

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.shape[1] == 4
        return self.scale * x + 0.1 * torch.arange(4, dtype=x.dtype).view(1, 4, 1, 1)


@pytest.fixture(scope="module")
def stacked_prepared(tmp_path_factory):
    return make_prepared(tmp_path_factory.mktemp("stacked") / "prepared", size=32, n_subjects=3, n_z=4)


def test_stacked_dataset_channels_follow_modalities(stacked_prepared):
    dataset = UnpairedSliceDataset(stacked_prepared, image_size=32, in_channels=4, seed=0)
    assert len(dataset) == 4  # 2 training subjects x 2 healthy (and 2 tumour) axial slices
    sample = dataset[1]
    assert sample["A"].shape == sample["B"].shape == (4, 32, 32) and type(sample["A"]) is torch.Tensor
    healthy = [i for i in load_slice_items(stacked_prepared, "training") if i["tumour"] == 0]
    first = stack_modalities(healthy)[1]
    for channel, modality in enumerate(MODS):
        path = next(i["image"] for i in healthy if (i["subject"], i["z"], i["modality"]) == (first["subject"], first["z"], modality))
        torch.testing.assert_close(sample["A"][channel], torch.from_numpy(np.load(path)))
    examples_a, examples_b = fixed_examples(stacked_prepared, "validation", 2, in_channels=4)
    assert examples_a.shape == examples_b.shape == (2, 4, 32, 32)
    with pytest.raises(ValueError, match="in_channels must be 1"):
        UnpairedSliceDataset(stacked_prepared, in_channels=3)
    without_t2 = [i for i in healthy if not (i["modality"] == "t2" and i["z"] == 82)]
    with pytest.raises(TsgmInputError, match=r"z=82 of sub0 lacks modalities \['t2'\]"):
        stack_modalities(without_t2, "datalist.json")


def test_bf16_training_iteration_and_snapshot_grid(stacked_prepared, tmp_path):
    torch.manual_seed(0)
    g_ab, g_ba = ResnetGenerator(4, 4, ngf=4, n_blocks=1), ResnetGenerator(4, 4, ngf=4, n_blocks=1)
    d_a, d_b = PatchDiscriminator(4, ndf=4, n_layers=2), PatchDiscriminator(4, ndf=4, n_layers=2)
    g_opt = torch.optim.Adam(list(g_ab.parameters()) + list(g_ba.parameters()), lr=2e-4)
    d_opt = torch.optim.Adam(list(d_a.parameters()) + list(d_b.parameters()), lr=2e-4)
    loader = torch.utils.data.DataLoader(UnpairedSliceDataset(stacked_prepared, image_size=32, in_channels=4), batch_size=2)
    trainer = CycleGANTrainer("cpu", 1, loader, g_ab, g_ba, d_a, d_b, g_opt, d_opt, ImagePool(2, 0), ImagePool(2, 1), amp=True, epoch_length=2)
    before = [p.detach().clone() for p in g_ab.parameters()]
    trainer.run()
    assert all(np.isfinite(v) for v in trainer.state.output.values())
    assert any(not torch.equal(a, b) for a, b in zip(before, g_ab.parameters()))
    assert all(p.dtype == torch.float32 for p in g_ab.parameters())  # autocast leaves the weights in float32
    assert trainer.pool_a.images[0].dtype == torch.float32
    snapshots = TranslationSnapshots(g_ab, g_ba, fixed_examples(stacked_prepared, "validation", 2, in_channels=4), tmp_path)
    assert snapshots.grid().shape == (6 * 32, 2 * 4 * 32)  # 6 rows; 2 examples x 4 channels side by side


def test_stacked_pseudo_pairs_write_each_channel_to_its_modality(stacked_prepared, tmp_path):
    counts = write_pseudo_pairs(ChannelOffset(), stacked_prepared, tmp_path / "pairs", image_size=32, batch_size=3)
    pairs = json.loads((tmp_path / "pairs" / "pseudo_pairs.json").read_text())
    for split in ("training", "validation"):
        healthy = [i for i in load_slice_items(stacked_prepared, split) if i["tumour"] == 0]
        assert counts[split] == len(pairs[split]) == len(healthy)
        assert sorted(p["image"] for p in pairs[split]) == sorted(i["image"] for i in healthy)
    for pair in pairs["training"] + pairs["validation"]:
        expected = 0.5 * np.load(pair["image"]) + 0.1 * MODS.index(pair["modality"])
        assert pair["condition"] == f"slices/{pair['subject']}/{pair['modality']}_z{pair['z']:03d}.npy"
        np.testing.assert_allclose(np.load(tmp_path / "pairs" / pair["condition"]), expected, atol=1e-6)


def test_translate_modalities_and_cyclegan_baseline_keep_the_harness_order():
    slices = torch.rand(4 * 3, 1, 8, 8)  # 3 axial slices of t1, then of t1ce, t2, flair (the detection harness's order)
    expected = 0.5 * slices + 0.1 * torch.arange(4).repeat_interleave(3).view(-1, 1, 1, 1)
    torch.testing.assert_close(translate_modalities(ChannelOffset(), slices, batch_size=2), expected)
    torch.testing.assert_close(GeneratorReconstructor(ChannelOffset(), batch_size=2)(slices), expected)
    with pytest.raises(ValueError, match=r"expected \(4·S, 1, H, W\)"):
        translate_modalities(ChannelOffset(), torch.rand(5, 1, 8, 8))


def test_stacked_volume_translation(phantom_dir, prepared_dir, tmp_path):
    source = sorted(phantom_dir.glob("*/*_flair.nii*"))[0]
    with pytest.raises(TsgmInputError, match="use translate_subject"):
        translate_volume(ChannelOffset(), source, tmp_path / "x.nii.gz", prepared_dir / "prepare_config.json")
    assert not (tmp_path / "x.nii.gz").exists()
    written = translate_subject(ChannelOffset(), source.parent, tmp_path / "subject", prepared_dir / "prepare_config.json", "AB")
    assert sorted(p.split("/")[-1] for p in written) == sorted(f"{source.parent.name}_{m}_AB.nii.gz" for m in MODS)
    # outside the brain the input is 0, so each output shows its channel's offset there (processed slices only)
    background = nib.load(str(source)).get_fdata()[:, :, 80:129] == 0
    for path in written:
        modality = path.split("_")[-2]
        output = nib.load(path).get_fdata()[:, :, 80:129]
        assert np.median(output[background]) == pytest.approx(0.1 * MODS.index(modality), abs=1e-3)


def test_min_tumour_fraction_keeps_only_clearly_tumorous_slices(stacked_prepared):
    items = load_slice_items(stacked_prepared, "training")
    tumour = [i for i in items if i["tumour"] == 1]
    first = tumour[0]
    image, label = np.load(first["image"]), np.load(first["label"])
    assert lesion_fraction(first) == pytest.approx((label > 0).sum() / (image > 0).sum())
    stacked = stack_modalities(tumour)[0]
    brain = np.any([np.load(stacked[f"image_{m}"]) > 0 for m in MODS], axis=0)
    assert lesion_fraction(stacked) == pytest.approx((np.load(stacked["label"]) > 0).sum() / brain.sum())
    fractions = sorted(lesion_fraction(i) for i in stack_modalities(tumour))
    threshold = (fractions[0] + fractions[-1]) / 2
    assert fractions[0] < threshold < fractions[-1]
    kept = UnpairedSliceDataset(stacked_prepared, in_channels=4, min_tumour_fraction=threshold).domain_b.data
    assert len(kept) == sum(f >= threshold for f in fractions) and all(lesion_fraction(i) >= threshold for i in kept)
    with pytest.raises(TsgmInputError, match=r"no tumour \(B, lesion >= 0.99 of the brain\) slices"):
        UnpairedSliceDataset(stacked_prepared, min_tumour_fraction=0.99)


# ---------------------------------------------------------------- four-channel stage 2 (Table III)


class ChannelOffsetDenoiser(nn.Module):
    """Stand-in four-channel score model whose denoiser is known: D(x, σ, c) = 0.5·c + 0.1·channel, whatever x and σ,
    so the regression sampler's output D(0, σ_max) shows which modality ended in which channel."""

    image_channels = condition_channels = 4

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        assert x.shape[1] == condition.shape[1] == 4
        denoised = 0.5 * condition + 0.1 * torch.arange(4, dtype=x.dtype).view(1, 4, 1, 1)
        return (denoised - x) / sigma.view(-1, 1, 1, 1) ** 2


def test_four_channel_score_model_reconstructs_the_modalities_of_a_slice_together():
    from tsgm_components.detection.detector import InfererReconstructor
    from tsgm_components.diffusion.inferers import DiffusionSamplerInferer
    from tsgm_components.diffusion.sde import VESDE
    from tsgm_components.networks.score import ScoreUNet

    network = ScoreUNet(condition_channels=4, image_channels=4, channels=(8, 8), attention_levels=(False, False), num_res_blocks=1,
                        num_head_channels=8, norm_num_groups=4)  # fmt: skip
    x = torch.rand(2, 4, 16, 16)
    assert network(x, torch.tensor([0.5, 2.0]), torch.rand(2, 4, 16, 16)).shape == (2, 4, 16, 16)
    assert network.unet.conv_in.conv.in_channels == 8 and network.unet.out[-1].conv.out_channels == 4
    with pytest.raises(ValueError, match=r"x must be \(B, 4, H, W\)"):
        network(torch.rand(2, 1, 16, 16), torch.tensor([0.5, 2.0]), torch.rand(2, 4, 16, 16))

    slices = torch.rand(4 * 3, 1, 8, 8)  # 3 axial slices of t1, then of t1ce, t2, flair (the detection harness's order)
    expected = 0.5 * slices + 0.1 * torch.arange(4).repeat_interleave(3).view(-1, 1, 1, 1)
    inferer = DiffusionSamplerInferer(VESDE(0.01, 20.0, 10), sampler="regression", batch_size=2)
    torch.testing.assert_close(inferer(slices, ChannelOffsetDenoiser()), expected)
    reconstruct = InfererReconstructor(inferer, ChannelOffsetDenoiser())
    assert reconstruct.all_modalities
    torch.testing.assert_close(reconstruct(slices), expected)
    with pytest.raises(ValueError, match=r"4-channel network reconstructs the modalities of each axial slice together"):
        inferer(torch.rand(6, 1, 8, 8), ChannelOffsetDenoiser())


def test_four_channel_pseudo_pairs_stack_each_slices_modalities(stacked_prepared, tmp_path):
    from tsgm_components.data.pseudo_pairs import load_pseudo_pairs, pair_transforms, stack_pairs

    write_pseudo_pairs(ChannelOffset(), stacked_prepared, tmp_path / "pairs", image_size=32, batch_size=3)
    single = load_pseudo_pairs(tmp_path / "pairs", "training", 32)
    stacked = load_pseudo_pairs(tmp_path / "pairs", "training", 32, channels=4)
    assert len(stacked) == 4 and len(single) == 4 * 4  # 2 training subjects x 2 healthy axial slices (x 4 modalities)
    sample = pair_transforms(channels=4)(stacked[0])
    assert set(sample) >= {"image", "condition"} and sample["image"].shape == sample["condition"].shape == (4, 32, 32)
    for channel, modality in enumerate(MODS):
        pair = next(p for p in single if (p["subject"], p["z"], p["modality"]) == (stacked[0]["subject"], stacked[0]["z"], modality))
        torch.testing.assert_close(sample["image"][channel], torch.from_numpy(np.load(pair["image"])))
    torch.testing.assert_close(sample["condition"], 0.5 * sample["image"] + 0.1 * torch.arange(4.0).view(4, 1, 1), atol=1e-6, rtol=0)
    first = (single[0]["subject"], single[0]["z"])
    without_flair = [p for p in single if not (p["modality"] == "flair" and (p["subject"], p["z"]) == first)]
    with pytest.raises(TsgmInputError, match=rf"z={first[1]} of {first[0]} lacks the pairs of \['flair'\]"):
        stack_pairs(without_flair)
    with pytest.raises(ValueError, match="channels must be 1"):
        load_pseudo_pairs(tmp_path / "pairs", "training", channels=2)
