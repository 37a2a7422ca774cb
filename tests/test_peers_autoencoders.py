"""Autoencoder-family peers (``vae``, ``fanogan``): the networks' reference layout, known answers of the losses and
the reparameterisation, f-AnoGAN's frozen encoder phase, the Reconstructor, checkpoints, and tiny bundle runs
(training, resume, detecting) on a tiny prepared dataset (32² slices, two 20×24×8 subjects)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser, run

import tsgm_components
from tsgm_components.checkpoints import load_score_weights
from tsgm_components.data.brats import MODALITIES
from tsgm_components.engines.autoencoders import FAnoGANTrainer
from tsgm_components.errors import TsgmInputError
from tsgm_components.networks.autoencoders import DenseVAE, FAnoGAN, reparameterize
from tsgm_components.peers.autoencoders import AutoencoderReconstructor, AutoencoderSpec, read_autoencoder_spec
from tsgm_components.peers.fanogan import critic_loss, gradient_penalty, izif_loss
from tsgm_components.peers.vae import vae_loss

CONFIGS = Path(tsgm_components.bundle_dir("peer_methods")) / "configs"
SHAPE = (20, 24, 8)
AFFINE = np.diag([1.0, 1.0, 2.0, 1.0])
PREPROCESS = dict(
    z_min=2,
    z_max=5,
    image_size=32,
    pad_to=32,
    normalization="brain_median",
    median_target=0.4,
    lower_percentile=1.0,
    upper_percentile=99.0,
    orientation=None,
    voxel_size=None,
    volume_shape=None,
)
TINY = dict(image_size=32, batch_size=4, num_workers=0, epoch_length=2, log_interval=1, reconstruct_batch_size=5)
TINY_TRAIN = {"vae": dict(TINY, max_epochs=1), "fanogan": dict(TINY, wgan_epochs=1, encoder_epochs=1, n_critic=2)}


def configs(peer: str, cpu: bool = False) -> list[str]:
    return [str(CONFIGS / f"{peer}.yaml")] + ([str(CONFIGS / f"{peer}_cpu.yaml")] if cpu else [])


def run_bundle(run_id: str, peer: str, **overrides) -> None:
    run(run_id, config_file=configs(peer), logging_file=False, **overrides)


def write_subject(folder: Path, seed: int) -> dict[str, str]:
    """A BraTS-layout subject: an ellipsoid brain with a bright blob in T2/FLAIR."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in SHAPE], indexing="ij"))
    brain = (grid**2).sum(0) < 0.9
    blob = ((grid - np.array([0.3, 0.2, 0.0])[:, None, None, None]) ** 2).sum(0) < 0.08
    item = {"subject": folder.name}
    for i, modality in enumerate(MODALITIES):
        data = brain * (100 + 10 * i + 5 * rng.standard_normal(SHAPE)) + blob * 60 * (modality in ("t2", "flair"))
        item[modality] = str(folder / f"{folder.name}_{modality}.nii.gz")
        nib.save(nib.Nifti1Image(data.astype(np.float32), AFFINE), item[modality])
    return item


@pytest.fixture(scope="module")
def work_dir(tmp_path_factory) -> Path:
    """prepared/ with its config, a datalist of 10 healthy and 4 tumour slices, and volumes.json (one validation and
    one test subject), as ``tsgm prepare`` leaves them."""
    work = tmp_path_factory.mktemp("peers_ae") / "work"
    prepared = work / "prepared"
    (prepared / "slices" / "S0").mkdir(parents=True)
    (prepared / "prepare_config.json").write_text(json.dumps(dict(PREPROCESS, seed=0)))
    rng = np.random.default_rng(0)
    items = []
    for i in range(14):
        name = f"slices/S0/{MODALITIES[i % 4]}_z{i:03d}.npy"
        np.save(prepared / name, rng.random((32, 32)).astype(np.float32))
        items.append({"image": name, "subject": "S0", "modality": MODALITIES[i % 4], "z": i, "tumour": int(i >= 10)})
    (prepared / "datalist.json").write_text(json.dumps({"training": items, "validation": [], "test": []}))
    volumes = {"training": [], "validation": [write_subject(work / "data" / "V0", 1)], "test": [write_subject(work / "data" / "T0", 2)]}
    (prepared / "volumes.json").write_text(json.dumps(volumes))
    return work


@pytest.fixture(scope="module", params=["vae", "fanogan"])
def trained(request, work_dir) -> tuple[str, Path]:
    peer = request.param
    run_bundle("training", peer, work_dir=str(work_dir), **TINY_TRAIN[peer])
    return peer, work_dir


# ---------------------------------------------------------------- networks: the reference layout


def test_vae_follows_the_reference_layout():
    """128² input, r = 8 (mains/main_VAE.py): encoder 32-64-128-128 filters of 5×5 stride 2, a 1×1 conv to 16
    channels, 16·8·8 = 1024 features to z = 128; decoder 128-64-32-32 transposed convs and a 1×1 output conv."""
    vae = DenseVAE(128)
    encoder = [block.conv for block in vae.encoder]
    assert [c.out_channels for c in encoder] == [32, 64, 128, 128]
    assert all(c.kernel_size == (5, 5) and c.stride == (2, 2) for c in encoder)
    assert vae.reduce.out_channels == 16 and vae.mu.in_features == 1024 and vae.mu.out_features == 128
    assert vae.from_latent.dense.out_features == 1024 and vae.from_latent.expand.out_channels == 128
    assert [block.conv.out_channels for block in list(vae.decoder)[1:-1]] == [128, 64, 32, 32]
    assert isinstance(vae.decoder[-1], torch.nn.Conv2d) and vae.decoder[-1].kernel_size == (1, 1)
    assert all(isinstance(m, torch.nn.BatchNorm2d) for m in vae.modules() if "Norm" in type(m).__name__)


def test_fanogan_follows_the_reference_layout():
    """128² input, r = 16 (mains/main_fAnoGAN.py): three stride-2 levels; the critic's features are 128×16×16 with
    layer norm (no batch statistics); the generator's dense layer maps z = 128 to 16·16·16 = 4096."""
    net = FAnoGAN(128).eval()
    x = torch.rand(2, 1, 128, 128)
    assert net.critic.features(x).shape == (2, 128, 16, 16) and net.critic(x).shape == (2,)
    assert net.generator.from_latent.dense.in_features == 128 and net.generator.from_latent.dense.out_features == 4096
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in (*net.critic.modules(), *net.generator.modules()))
    assert isinstance(net.encoder.features[0].adn.N, torch.nn.BatchNorm2d)
    z = net.encoder(x)
    assert z.shape == (2, 128) and z.abs().max() <= 1.0  # tanh code
    image = net.reconstruct(x)
    assert image.shape == x.shape and image.min() >= 0.0 and image.max() <= 1.0  # sigmoid output


def test_networks_refuse_sizes_that_are_not_powers_of_two():
    with pytest.raises(ValueError, match="powers of two"):
        DenseVAE(48)
    with pytest.raises(ValueError, match="powers of two"):
        FAnoGAN(16, intermediate_resolution=16)


# ---------------------------------------------------------------- VAE: loss and reparameterisation


def test_vae_loss_known_answers():
    x = torch.zeros(2, 1, 4, 4)
    x_hat = torch.full_like(x, 0.5)
    zero = vae_loss(x, x_hat, torch.zeros(2, 3), torch.zeros(2, 3))
    assert zero["kl"].item() == 0.0  # N(0, I) against itself
    assert zero["reconstruction"].item() == pytest.approx(16 * 0.5)  # summed L1 over 16 pixels
    assert zero["loss"].item() == pytest.approx(8.0)
    # μ = 1, σ = 2 in each of 3 dimensions: ½ (1 + 4 − log 4 − 1) per dimension
    kl = vae_loss(x, x, torch.ones(2, 3), torch.full((2, 3), math.log(2.0)))
    assert kl["kl"].item() == pytest.approx(3 * 0.5 * (4.0 - math.log(4.0)), rel=1e-6)
    assert kl["reconstruction"].item() == 0.0 and kl["loss"].item() == pytest.approx(kl["kl"].item())


def test_reparameterisation_has_the_encoded_mean_and_variance():
    mu = torch.tensor([1.0, -2.0, 0.0]).expand(200_000, 3)
    log_sigma = torch.log(torch.tensor([1.0, 0.5, 3.0])).expand(200_000, 3)
    z = reparameterize(mu, log_sigma, torch.Generator().manual_seed(0))
    torch.testing.assert_close(z.mean(0), torch.tensor([1.0, -2.0, 0.0]), atol=0.02, rtol=0)
    torch.testing.assert_close(z.std(0), torch.tensor([1.0, 0.5, 3.0]), atol=0.0, rtol=0.01)
    torch.testing.assert_close(reparameterize(mu, log_sigma, torch.Generator().manual_seed(0)), z)  # the generator's stream


def test_vae_reconstruction_is_the_decoded_mean():
    torch.manual_seed(0)
    vae = DenseVAE(32).eval()
    x = torch.rand(3, 1, 32, 32)
    with torch.no_grad():
        mu, _ = vae.encode(x)
        torch.testing.assert_close(vae.reconstruct(x), vae.decode(mu))
        assert not torch.equal(vae(x)[0], vae.decode(mu))  # training pass: a sampled z


# ---------------------------------------------------------------- f-AnoGAN: gradient penalty and encoder phase


def test_gradient_penalty_is_zero_for_a_unit_norm_linear_critic():
    """D(x) = <w, x> has gradient w everywhere: penalty (‖w‖ − 1)², zero for ‖w‖ = 1, 1 for ‖w‖ = 2."""
    generator = torch.Generator().manual_seed(0)
    w = torch.randn(1, 1, 8, 8, generator=generator)
    w = w / w.norm()
    real, fake = torch.rand(4, 1, 8, 8, generator=generator), torch.rand(4, 1, 8, 8, generator=generator)
    assert gradient_penalty(lambda x: (w * x).flatten(1).sum(1), real, fake, generator).item() == pytest.approx(0.0, abs=1e-10)
    assert gradient_penalty(lambda x: (2 * w * x).flatten(1).sum(1), real, fake, generator).item() == pytest.approx(1.0, rel=1e-5)
    losses = critic_loss(lambda x: (w * x).flatten(1).sum(1), real, fake, 10.0, generator)
    expected = ((w * real).sum() - (w * fake).sum()) / 4
    assert losses["wasserstein"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert losses["loss"].item() == pytest.approx(-expected.item(), abs=1e-5)


def test_gradient_penalty_trains_the_critic():
    critic = FAnoGAN(32).critic
    penalty = gradient_penalty(critic, torch.rand(2, 1, 32, 32), torch.rand(2, 1, 32, 32))
    penalty.backward()
    assert penalty.item() > 0 and critic.head.weight.grad is not None  # (the read-out's bias does not move ∇_x D)
    assert all(p.grad is not None for p in critic.encoder.parameters())


def _tiny_fanogan_trainer() -> FAnoGANTrainer:
    torch.manual_seed(0)
    net = FAnoGAN(32)
    batch = [{"image": torch.rand(4, 1, 32, 32)}]

    def adam(module: torch.nn.Module) -> torch.optim.Adam:
        return torch.optim.Adam(module.parameters(), 1e-3, betas=(0.5, 0.9))

    return FAnoGANTrainer("cpu", 2, batch, net, adam(net.generator), adam(net.critic), adam(net.encoder), wgan_epochs=1, n_critic=2)


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _changed(before: dict[str, torch.Tensor], module: torch.nn.Module) -> bool:
    return any(not torch.equal(before[k], v) for k, v in module.state_dict().items())


def test_encoder_phase_trains_only_the_encoder():
    trainer = _tiny_fanogan_trainer()
    net = trainer.network
    image = torch.rand(4, 1, 32, 32)
    before = {name: _snapshot(getattr(net, name)) for name in ("encoder", "generator", "critic")}
    output = trainer.wgan_step(image)
    assert output["phase"] == "wgan" and _changed(before["generator"], net.generator) and _changed(before["critic"], net.critic)
    assert not _changed(before["encoder"], net.encoder)
    for module in (net.generator, net.critic, net.encoder):
        module.zero_grad(set_to_none=True)
    before = {name: _snapshot(getattr(net, name)) for name in ("encoder", "generator", "critic")}
    output = trainer.encoder_step(image)
    assert output["phase"] == "encoder" and _changed(before["encoder"], net.encoder)
    assert not _changed(before["generator"], net.generator) and not _changed(before["critic"], net.critic)
    assert all(p.grad is None for p in (*net.generator.parameters(), *net.critic.parameters()))
    assert all(p.grad is not None for p in net.encoder.parameters())


def test_izif_loss_known_answer_for_a_perfect_encoder_generator_pair():
    """G(E(x)) = x gives zero image and feature residuals; κ weights only the feature term."""
    net = FAnoGAN(32).eval()
    net.encoder.forward = lambda image: torch.zeros(len(image), net.latent_size)  # type: ignore[method-assign]
    target = net.generator(torch.zeros(2, net.latent_size)).detach()
    zero = izif_loss(net, target, kappa=5.0)
    assert zero["loss"].item() == pytest.approx(0.0, abs=1e-12)
    shifted = izif_loss(net, target + 0.1, kappa=0.0)
    assert shifted["image"].item() == pytest.approx(0.01, rel=1e-5) and shifted["loss"].item() == pytest.approx(0.01, rel=1e-5)


def test_fanogan_trainer_needs_an_encoder_phase():
    net = FAnoGAN(32)
    adam = torch.optim.Adam(net.parameters())
    with pytest.raises(ValueError, match="wgan_epochs"):
        FAnoGANTrainer("cpu", 2, [], net, adam, adam, adam, wgan_epochs=2)


# ---------------------------------------------------------------- Reconstructor


@pytest.mark.parametrize("network", [DenseVAE(32), FAnoGAN(32)], ids=["vae", "fanogan"])
def test_reconstructor_output_is_a_deterministic_image_in_unit_range(network):
    slices = torch.rand(7, 1, 32, 32)
    healthy = AutoencoderReconstructor(network, batch_size=3)(slices)
    assert healthy.shape == slices.shape and healthy.dtype == torch.float32
    assert healthy.min() >= 0.0 and healthy.max() <= 1.0
    torch.testing.assert_close(AutoencoderReconstructor(network, batch_size=64)(slices), healthy)  # chunking, eval mode
    with torch.no_grad():
        torch.testing.assert_close(healthy, network.reconstruct(slices).clamp(0, 1))


# ---------------------------------------------------------------- bundles


@pytest.mark.parametrize("peer", ["vae", "fanogan"])
def test_paper_and_cpu_configs_build_their_networks(peer):
    for cpu, size in ((False, 256), (True, 64)):
        parser = ConfigParser()
        parser.read_config(configs(peer, cpu))
        network = parser.get_parsed_content("network_def")
        assert network.config["image_size"] == size and network.config["latent_size"] == 128
        assert parser.get_parsed_content("setting_key") is None and parser.get_parsed_content("method") == peer


def test_training_writes_a_model_that_loads_and_detecting_writes_maps(trained):
    peer, work = trained
    checkpoint = work / peer / "model.pt"
    spec = read_autoencoder_spec(checkpoint, peer)
    assert spec.preprocess.image_size == 32 and spec.network["latent_size"] == 128
    network = DenseVAE(**spec.network) if peer == "vae" else FAnoGAN(**spec.network)
    load_score_weights(network, checkpoint, spec)
    saved = torch.load(checkpoint, weights_only=True)["model"]
    assert all(torch.equal(saved[k], v) for k, v in network.state_dict().items())  # round trip
    with pytest.raises(TsgmInputError, match="not a"):
        read_autoencoder_spec(checkpoint, "fanogan" if peer == "vae" else "vae")
    with pytest.raises(TsgmInputError, match="latent_size"):
        other = dict(spec.network, latent_size=64)
        load_score_weights(network, checkpoint, AutoencoderSpec(peer, spec.preprocess, other))

    run_bundle("detecting", peer, work_dir=str(work), **TINY_TRAIN[peer])
    for split, subject in (("validation", "V0"), ("test", "T0")):
        folder = work / "detections" / peer / split / subject
        record = json.loads((folder / f"{subject}_detection.json").read_text())
        assert record["reconstruction"]["nfe_per_slice"] == 1 and record["method"] == peer
        healthy = np.asarray(nib.load(folder / f"{subject}_healthy_flair.nii.gz").dataobj)
        anomaly = np.asarray(nib.load(folder / f"{subject}_anomaly_flair.nii.gz").dataobj)
        assert healthy.shape == anomaly.shape == SHAPE and healthy.min() >= 0 and healthy.max() <= 1 and anomaly.max() > 0
    # a second method name (the compare driver's per-setting folders) and skip_existing
    run_bundle("detecting", peer, work_dir=str(work), method=f"{peer}_copy", splits=["test"], **TINY_TRAIN[peer])
    assert (work / "detections" / f"{peer}_copy" / "test" / "T0").is_dir()
    run_bundle("detecting", peer, work_dir=str(work), skip_existing=True, **TINY_TRAIN[peer])


def input_error(excinfo: pytest.ExceptionInfo) -> TsgmInputError:
    """The TsgmInputError behind an exception raised through MONAI's config evaluation (which wraps errors)."""
    error: BaseException | None = excinfo.value
    while error is not None and not isinstance(error, TsgmInputError):
        error = error.__cause__ or error.__context__
    assert error is not None, f"no TsgmInputError behind {excinfo.value!r}"
    return error


def test_training_resumes_and_refuses_to_start_over(trained):
    """A second run refuses to mix with the first run's checkpoints; --resume True continues it (f-AnoGAN: into a
    longer encoder phase, after the finished WGAN phase)."""
    peer, work = trained
    final = work / peer / "checkpoints" / "checkpoint_final.pt"
    first = torch.load(final, weights_only=True)
    assert first["trainer"]["iteration"] == TINY["epoch_length"] * (1 if peer == "vae" else 2)
    with pytest.raises(Exception) as excinfo:
        run_bundle("training", peer, work_dir=str(work), **TINY_TRAIN[peer])
    assert "--resume True" in str(input_error(excinfo))
    longer = dict(TINY_TRAIN[peer], **({"max_epochs": 2} if peer == "vae" else {"encoder_epochs": 2}))
    run_bundle("training", peer, work_dir=str(work), resume=True, **longer)
    resumed = torch.load(final, weights_only=True)
    assert resumed["trainer"]["iteration"] == TINY["epoch_length"] * (2 if peer == "vae" else 3)
    changed = [k for k in first["network"] if not torch.equal(first["network"][k], resumed["network"][k])]
    if peer == "fanogan":  # the resumed epoch is an encoder epoch: only E moves
        assert changed and all(k.startswith("encoder.") for k in changed)
    else:
        assert changed
