"""AnoDDPM and pDDPM peers: DDPM→VE noise levels, simplex noise, patch grid and noising, the two reconstructors, and
a tiny training → detecting run of both bundle configs on the phantom (32², a 2-level UNet)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser, run

import tsgm_components
from tsgm_components.checkpoints import load_score_weights
from tsgm_components.diffusion.noise import randn
from tsgm_components.diffusion.sde import VESDE
from tsgm_components.errors import TsgmInputError
from tsgm_components.losses.score_matching import dsm_loss
from tsgm_components.networks.score import ScoreUNet
from tsgm_components.peers.anoddpm import (
    AnoDDPMReconstructor,
    DiffusionPeerSpec,
    SimplexNoise,
    ddpm_sigma,
    ddpm_sigmas,
    partial_sigmas,
    simplex_octave_variance,
)
from tsgm_components.peers.pddpm import PatchedReconstructor, PatchRegion, noise_patch, patch_grid, patch_masks

CONFIGS = Path(tsgm_components.bundle_dir("peer_methods")) / "configs"
TINY_NET = dict(condition_channels=0, channels=[16, 32], attention_levels=[False, False], num_res_blocks=1, num_head_channels=16, norm_num_groups=8)


def lag1_correlation(z: torch.Tensor) -> float:
    """Correlation of horizontally adjacent pixels over all maps."""
    a, b = z[..., :-1].flatten(), z[..., 1:].flatten()
    return float(torch.corrcoef(torch.stack([a, b]))[0, 1])


# ---------------------------------------------------------------- DDPM levels as VE σ


def test_ddpm_sigma_has_the_signal_to_noise_ratio_of_the_ddpm_step():
    # linear schedule (AnoDDPM): ᾱ_250 = Π_{s<250} (1 − β_s), β = linspace(1e-4, 0.02, 1000)
    alpha_bar = float(np.prod(1 - np.linspace(1e-4, 0.02, 1000)[:250]))
    assert ddpm_sigma(250) == pytest.approx(0.5 * math.sqrt((1 - alpha_bar) / alpha_bar), rel=1e-9)
    assert ddpm_sigma(250) == pytest.approx(0.4765, abs=1e-4)
    # cosine schedule (pDDPM): the β product telescopes to f(t)/f(0) while no β is clipped
    f = lambda t: math.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    alpha_bar = f(500) / f(0)
    assert ddpm_sigma(500, "cosine") == pytest.approx(0.5 * math.sqrt((1 - alpha_bar) / alpha_bar), rel=1e-9)
    # the VP sample, rescaled to [0, 1], is x0 + σ·ε exactly
    x0, eps = torch.rand(2, 1, 8, 8, dtype=torch.float64), torch.randn(2, 1, 8, 8, dtype=torch.float64)
    y_t = math.sqrt(alpha_bar) * (2 * x0 - 1) + math.sqrt(1 - alpha_bar) * eps
    torch.testing.assert_close((y_t / math.sqrt(alpha_bar) + 1) / 2, x0 + ddpm_sigma(500, "cosine") * eps)
    with pytest.raises(ValueError, match="in \\[1, 1000\\]"):
        ddpm_sigma(0)
    with pytest.raises(ValueError, match="schedule"):
        ddpm_sigma(10, "quadratic")


def test_partial_sigmas_are_the_reference_steps_or_a_geometric_grid():
    steps = ddpm_sigmas(250)
    assert steps.shape == (250,) and bool((steps[1:] < steps[:-1]).all())
    assert float(steps[0]) == pytest.approx(ddpm_sigma(250)) and float(steps[-1]) == pytest.approx(ddpm_sigma(1))
    torch.testing.assert_close(partial_sigmas(250), steps)
    grid = partial_sigmas(250, n_steps=5, sigma_min=0.01)
    assert grid.shape == (5,) and float(grid[0]) == pytest.approx(ddpm_sigma(250)) and float(grid[-1]) == pytest.approx(0.01)


# ---------------------------------------------------------------- simplex noise


def test_simplex_noise_is_zero_mean_unit_variance_and_spatially_correlated():
    noise = SimplexNoise(octaves=3, persistence=0.8, frequency=8.0)
    z = noise((256, 1, 32, 32), torch.Generator().manual_seed(0))
    assert z.shape == (256, 1, 32, 32) and z.dtype == torch.float32
    assert abs(float(z.mean())) < 0.03 and float(z.var()) == pytest.approx(1.0, abs=0.03)
    # one octave alone: the exact variance of the kernel is what normalises it
    single = SimplexNoise(octaves=1, frequency=4.0)((256, 1, 32, 32), torch.Generator().manual_seed(1))
    assert float(single.var()) == pytest.approx(1.0, abs=0.03)
    assert simplex_octave_variance() == pytest.approx(2.952e-5, rel=1e-3)
    # low-frequency structure: neighbours are strongly correlated, white noise's are not
    assert lag1_correlation(z) > 0.4
    assert abs(lag1_correlation(torch.randn(256, 1, 32, 32, generator=torch.Generator().manual_seed(0)))) < 0.02


def test_simplex_noise_is_deterministic_per_seed_and_per_sample():
    noise = SimplexNoise(octaves=4, persistence=0.8, frequency=16.0)
    a = noise((3, 1, 24, 40), torch.Generator().manual_seed(5))
    torch.testing.assert_close(a, noise((3, 1, 24, 40), torch.Generator().manual_seed(5)), rtol=0, atol=0)
    assert not torch.equal(a, noise((3, 1, 24, 40), torch.Generator().manual_seed(6)))
    # with one generator per sample, row i depends on its generator alone
    rows = noise((3, 1, 24, 40), [torch.Generator().manual_seed(s) for s in (7, 8, 9)])
    torch.testing.assert_close(rows[1:2], noise((1, 1, 24, 40), [torch.Generator().manual_seed(8)]), rtol=0, atol=0)
    with pytest.raises(ValueError, match="per-sample generators"):
        noise((2, 1, 8, 8), [torch.Generator()])


# ---------------------------------------------------------------- DSM loss with simplex noise and a patch region


class RecordingNet(torch.nn.Module):
    """score(x, σ) = (target − x)/σ², the exact score of a point mass at ``target``; records its inputs."""

    def __init__(self, target: torch.Tensor):
        super().__init__()
        self.target, self.inputs = target, []

    def forward(self, x, sigma, condition=None):
        self.inputs.append(x.detach().clone())
        return (self.target - x) / sigma[:, None, None, None] ** 2


def test_dsm_loss_with_simplex_noise_vanishes_for_the_exact_denoiser():
    x0 = torch.rand(4, 1, 16, 16)
    noise = SimplexNoise(octaves=2, frequency=8.0)
    loss = dsm_loss(RecordingNet(x0), x0, None, VESDE(0.01, 10.0), torch.Generator().manual_seed(0), noise=noise)
    assert float(loss) == pytest.approx(0.0, abs=1e-8)
    # and with a zero score the loss is the mean of z² for the simplex draw that follows t
    zero = lambda x, sigma, condition: torch.zeros_like(x)  # noqa: E731
    g = torch.Generator().manual_seed(1)
    loss = dsm_loss(zero, x0, None, VESDE(0.01, 10.0), g, noise=noise)
    g = torch.Generator().manual_seed(1)
    VESDE(0.01, 10.0).sample_t(4, g)
    assert float(loss) == pytest.approx(float((noise(x0.shape, g) ** 2).mean()), rel=1e-5)


def test_dsm_loss_with_a_patch_region_noises_and_scores_the_patch_only():
    x0, sde = torch.rand(3, 1, 16, 16), VESDE(0.01, 10.0)
    net, region = RecordingNet(torch.zeros(3, 1, 16, 16)), PatchRegion(8, 8)
    zero = lambda x, sigma, condition: torch.zeros_like(x)  # noqa: E731
    dsm_loss(net, x0, None, sde, torch.Generator().manual_seed(2), region=region)
    loss = dsm_loss(zero, x0, None, sde, torch.Generator().manual_seed(2), region=region)
    g = torch.Generator().manual_seed(2)  # the same draws: t, z, then the patch
    sde.sample_t(3, g)
    z = randn(x0.shape, g)
    mask = region(x0, g)
    assert torch.equal(mask.sum((1, 2, 3)), torch.full((3,), 64.0))
    outside = mask == 0
    assert torch.equal(net.inputs[0][outside], x0[outside]) and not torch.equal(net.inputs[0][~outside], x0[~outside])
    assert float(loss) == pytest.approx(float((z**2)[~outside].mean()), rel=1e-5)


# ---------------------------------------------------------------- patches


def coverage(height: int, width: int, patch: int, stride: int) -> torch.Tensor:
    boxes = torch.tensor(patch_grid(height, width, patch, stride))
    return patch_masks(height, width, boxes[:, 0], boxes[:, 1], patch).sum(0)[0]


def test_patch_grid_tiles_the_image_like_the_reference():
    # the reference's 96² slices, patch 48, stride 48: a 2×2 grid, every pixel in exactly one patch
    assert patch_grid(96, 96, 48, 48) == [(0, 0), (0, 48), (48, 0), (48, 48)]
    assert torch.equal(coverage(96, 96, 48, 48), torch.ones(96, 96))
    assert torch.equal(coverage(64, 64, 32, 32), torch.ones(64, 64))
    # a stride that does not divide: a last patch flush with the far edge, every pixel covered
    grid = patch_grid(40, 64, 24, 20)
    assert grid[-1] == (16, 40) and int(coverage(40, 64, 24, 20).min()) >= 1
    with pytest.raises(ValueError, match="stride"):
        patch_grid(64, 64, 16, 32)


def test_patch_region_draws_grid_patches_and_random_patches_inside():
    x0 = torch.zeros(64, 1, 32, 32)
    grid_masks = PatchRegion(16, 16)(x0, torch.Generator().manual_seed(0))
    corners = {(int(m[0].nonzero()[0, 0]), int(m[0].nonzero()[0, 1])) for m in grid_masks}
    assert corners == set(patch_grid(32, 32, 16, 16))
    free = PatchRegion(10, 10, on_grid=False)(x0, torch.Generator().manual_seed(0))
    assert torch.equal(free.sum((1, 2, 3)), torch.full((64,), 100.0))
    assert len({tuple(m[0].nonzero()[0].tolist()) for m in free}) > 20


def test_noising_a_patch_leaves_every_other_pixel_unchanged():
    x, z = torch.rand(2, 1, 32, 32), torch.randn(2, 1, 32, 32)
    mask = patch_masks(32, 32, torch.tensor([16]), torch.tensor([0]), 16)
    noised = noise_patch(x, z, 0.5, mask)
    inside = mask.expand_as(x) > 0
    assert torch.equal(noised[~inside], x[~inside])
    torch.testing.assert_close(noised[inside], (x + 0.5 * z)[inside])


# ---------------------------------------------------------------- reconstructors


def test_patched_reconstruction_stitches_every_pixel_once():
    slices = torch.rand(3, 1, 32, 32)
    identity = lambda x, sigma: x  # noqa: E731
    for patch, stride in ((16, 16), (12, 10)):  # exact tiling, and an overlapping grid (averaged)
        out = PatchedReconstructor(identity, randn, 0.0, patch, stride)(slices)
        torch.testing.assert_close(out, slices, rtol=0, atol=1e-7)
    # a constant slice comes back when the denoiser restores the clean value from the context (the median: more than
    # half of the pixels are outside the patch): the noise stays inside the noised patch
    constant = torch.full((2, 1, 32, 32), 0.3)
    median = lambda x, sigma: torch.full_like(x, float(x.median()))  # noqa: E731
    out = PatchedReconstructor(median, SimplexNoise(3, 0.8, 16.0), 0.5, 16, 16)(constant)
    torch.testing.assert_close(out, constant, rtol=0, atol=1e-7)


def test_patched_reconstruction_does_not_depend_on_batching():
    slices = torch.rand(5, 1, 16, 16)
    shrink = lambda x, sigma: 0.5 * x  # noqa: E731
    one = PatchedReconstructor(shrink, SimplexNoise(2, 0.8, 8.0), 0.3, 8, 8, seed=3, batch_size=1)(slices)
    all_ = PatchedReconstructor(shrink, SimplexNoise(2, 0.8, 8.0), 0.3, 8, 8, seed=3, batch_size=5)(slices)
    torch.testing.assert_close(one, all_, rtol=0, atol=0)
    assert one.shape == slices.shape and float(one.min()) >= 0 and float(one.max()) <= 1


def test_anoddpm_reconstructs_the_data_point_of_an_exact_score():
    """With the exact score of a point mass at c, every reverse step contracts towards c and the last one lands on it,
    whatever simplex noise was added on the way."""
    c = torch.full((3, 1, 16, 16), 0.6)
    point_mass = lambda x, sigma: (c[: x.shape[0]] - x) / sigma[:, None, None, None] ** 2  # noqa: E731
    recon = AnoDDPMReconstructor(point_mass, SimplexNoise(2, 0.8, 8.0), partial_sigmas(250, n_steps=6, sigma_min=0.01))
    torch.testing.assert_close(recon(torch.rand(3, 1, 16, 16)), c, rtol=0, atol=1e-5)
    assert recon.nfe_per_slice == 6


def test_anoddpm_reconstruction_shape_range_and_batching():
    torch.manual_seed(0)
    net = ScoreUNet(**TINY_NET).eval()
    slices = torch.rand(5, 1, 16, 16)
    sigmas = partial_sigmas(150, n_steps=3, sigma_min=0.005)
    one = AnoDDPMReconstructor(net, SimplexNoise(2, 0.8, 8.0), sigmas, seed=1, batch_size=2)(slices)
    all_ = AnoDDPMReconstructor(net, SimplexNoise(2, 0.8, 8.0), sigmas, seed=1, batch_size=5)(slices)
    assert one.shape == (5, 1, 16, 16) and one.dtype == torch.float32
    assert float(one.min()) >= 0 and float(one.max()) <= 1
    torch.testing.assert_close(one, all_, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- bundle: training -> detecting on the phantom


def run_bundle(run_id: str, peer: str, **overrides) -> None:
    run(run_id, config_file=[str(CONFIGS / f"{peer}.yaml"), str(CONFIGS / f"{peer}_cpu.yaml")], logging_file=False, **overrides)


def tiny_training(work: Path, prepared: Path, **extra) -> dict:
    overrides = dict(work_dir=str(work), prepared_dir=str(prepared), image_size=32, network_args=TINY_NET, max_epochs=1, epoch_length=2)
    return dict(overrides, batch_size=4, warmup_steps=1, log_interval=1, **extra)


PATCH_32 = dict(patch_size=16, patch_stride=16, noise_settings={"kind": "simplex", "octaves": 4, "persistence": 0.8, "frequency": 21.3})


@pytest.fixture(scope="module")
def trained(prepared_dir, tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("peers_ddpm")
    run_bundle("training", "anoddpm", **tiny_training(work, prepared_dir))
    run_bundle("training", "pddpm", **tiny_training(work, prepared_dir, **PATCH_32))
    return work


def test_configs_declare_their_setting_and_both_scales():
    for peer, key, default in (("anoddpm", "noise_t", 250), ("pddpm", "noise_t", 500)):
        parser = ConfigParser()
        parser.read_config(str(CONFIGS / f"{peer}.yaml"))
        assert parser["setting_key"] == key and parser[key] == default and default in parser["setting_candidates"]
        assert parser["image_size"] == 256 and parser["network_args"]["condition_channels"] == 0
        cpu = ConfigParser()
        cpu.read_config([str(CONFIGS / f"{peer}.yaml"), str(CONFIGS / f"{peer}_cpu.yaml")])
        assert cpu["image_size"] == 64 and cpu.get_parsed_content("device") == torch.device("cpu")
    assert ConfigParser.load_config_file(str(CONFIGS / "anoddpm.yaml"))["noise_settings"]["frequency"] == 64.0


def test_training_writes_the_checkpoint_and_resumes(trained, prepared_dir):
    for peer in ("anoddpm", "pddpm"):
        state = torch.load(trained / peer / "model.pt", weights_only=True)
        spec = DiffusionPeerSpec.read(trained / peer / "model.pt", peer)
        assert state["model_spec"]["peer"] == peer and spec.network["condition_channels"] == 0
        assert spec.sde["sigma_min"] == pytest.approx(ddpm_sigma(1, "linear" if peer == "anoddpm" else "cosine"))
    assert DiffusionPeerSpec.read(trained / "pddpm" / "model.pt", "pddpm").patch == {"patch_size": 16, "patch_stride": 16}
    assert DiffusionPeerSpec.read(trained / "anoddpm" / "model.pt", "anoddpm").spec["noise"]["octaves"] == 4  # the CPU overlay's
    run_bundle("training", "anoddpm", **tiny_training(trained, prepared_dir, resume=True, max_epochs=2))
    final = torch.load(trained / "anoddpm" / "checkpoints" / "checkpoint_final.pt", weights_only=True)
    assert final["trainer"]["iteration"] == 4


def test_checkpoint_round_trip_and_wrong_peer(trained):
    path = trained / "pddpm" / "model.pt"
    spec = DiffusionPeerSpec.read(path, "pddpm")
    net = load_score_weights(ScoreUNet(**spec.network), path, spec)
    saved = torch.load(path, weights_only=True)["model"]
    assert all(torch.equal(value, saved[key]) for key, value in net.state_dict().items())
    with pytest.raises(TsgmInputError, match="not a anoddpm checkpoint"):
        DiffusionPeerSpec.read(path, "anoddpm")


@pytest.mark.parametrize("peer", ["anoddpm", "pddpm"])
def test_detecting_writes_maps_for_a_setting_candidate(trained, prepared_dir, peer):
    value = ConfigParser.load_config_file(str(CONFIGS / f"{peer}.yaml"))["setting_candidates"][0]
    method = f"{peer}_{value}"
    extra = {"n_steps": 3} if peer == "anoddpm" else {}
    run_bundle("detecting", peer, work_dir=str(trained), prepared_dir=str(prepared_dir), splits=["validation"], method=method, noise_t=value, **extra)
    subject = json.loads((prepared_dir / "volumes.json").read_text())["validation"][0]["subject"]
    folder = trained / "detections" / method / "validation" / subject
    record = json.loads((folder / f"{subject}_detection.json").read_text())
    assert record["method"] == method and record["reconstruction"]["noise_t"] == value
    assert record["reconstruction"]["nfe_per_slice"] == (3 if peer == "anoddpm" else 4)
    assert (folder / f"{subject}_healthy_flair.nii.gz").is_file() and (folder / f"{subject}_anomaly.nii.gz").is_file()
