"""Guided-diffusion peers (DPM_classifier, DPM_classifier_free): known answers of the DDPM -> VE noise mapping,
the ODE encoding/decoding, both guidances and the label dropout; the class input of ScoreUNet; tiny bundle runs
(training, resume, detecting) on the phantom fixture."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import run
from torch import Tensor, nn

import tsgm_components
from tsgm_components.data.brats import MODALITIES
from tsgm_components.checkpoints import load_score_weights, read_model_spec
from tsgm_components.diffusion.sampling import karras_sigmas
from tsgm_components.engines.guided_diffusion import ClassConditionalScoreTrainer, drop_labels
from tsgm_components.diffusion.sde import VESDE
from tsgm_components.errors import TsgmInputError
from tsgm_components.networks.noisy_classifier import NoisyClassifier
from tsgm_components.networks.score import ScoreUNet
from tsgm_components.peers.dpm_classifier import ClassifierGuidedReconstructor, load_classifier, read_classifier_spec
from tsgm_components.peers.dpm_classifier_free import ClassifierFreeReconstructor
from tsgm_components.peers.guided_diffusion import ddpm_sigma, denoiser_score, encode_decode, ode_encode

CONFIGS = Path(tsgm_components.bundle_dir("peer_methods")) / "configs"
TINY_UNET = dict(condition_channels=0, channels=[8, 16], attention_levels=[False, False], num_res_blocks=1, num_head_channels=8, norm_num_groups=8)
TINY_CLASSIFIER = dict(image_size=16, channels=[8, 16], attention_levels=[False, False], num_res_blocks=1, num_head_channels=8, norm_num_groups=8)
MU, TAU, SIGMA_MIN = 0.5, 0.25, 0.01


class GaussianScoreModel(nn.Module):
    """Exact model of Gaussian data x_0 ~ N(mean, TAU² I) (mean per class for a class-conditional one): its denoiser
    E[x_0 | x_σ] = mean + TAU²/(TAU² + σ²)·(x − mean) in ``ScoreUNet``'s interface."""

    conditional = False

    def __init__(self, class_means: tuple[float, ...] = ()):
        super().__init__()
        self.class_means = class_means
        self.num_classes = max(len(class_means) - 1, 0)  # the last mean is the null class's (the mixture)
        self.null_class = self.num_classes

    def denoise(self, x: Tensor, sigma: Tensor, condition: Tensor | None = None, class_labels: Tensor | None = None) -> Tensor:
        mean = MU if class_labels is None else torch.tensor(self.class_means, dtype=x.dtype)[class_labels][:, None, None, None]
        shrink = (TAU**2 / (TAU**2 + sigma.to(x.dtype) ** 2))[:, None, None, None]
        return mean + shrink * (x - mean)


class MeanIntensityClassifier(NoisyClassifier):
    """Toy classifier: logits (−k·m, k·m), m = mean intensity, so p(healthy | x) = sigmoid(−2k·m) and
    ∇_x log p(healthy | x) = −2k·sigmoid(2k·m)/P per pixel (P pixels): darker means healthier."""

    K = 3.0

    def forward(self, x: Tensor, sigma: Tensor) -> Tensor:
        m = x.flatten(1).mean(1)
        return torch.stack([-self.K * m, self.K * m], dim=1)


def gaussian_slices(n: int = 4, size: int = 16, seed: int = 0) -> Tensor:
    return MU + TAU * torch.randn(n, 1, size, size, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- known answers


def test_ddpm_sigma_has_the_snr_of_the_linear_beta_schedule():
    """σ_L = √((1 − ᾱ_L)/ᾱ_L)/2: step 1 in closed form, L = 500 / 750 against an independent cumulative product."""
    assert ddpm_sigma(1) == pytest.approx(math.sqrt(1e-4 / (1 - 1e-4)) / 2, rel=1e-9)
    alpha_bar = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))
    for step in (200, 500, 750):
        assert ddpm_sigma(step) == pytest.approx(math.sqrt((1 - alpha_bar[step - 1]) / alpha_bar[step - 1]) / 2, rel=1e-9)
    assert ddpm_sigma(500) == pytest.approx(1.712, abs=1e-3) and ddpm_sigma(750) == pytest.approx(8.623, abs=1e-3)
    with pytest.raises(ValueError):
        ddpm_sigma(0)


def test_ode_encoding_follows_the_exact_gaussian_flow_and_decoding_inverts_it():
    """For Gaussian data the probability-flow ODE is x(σ) = μ + (x − μ)·√((τ² + σ²)/(τ² + σ_0²)); encoding to σ_L
    lands there, and decoding back returns the input (up to the final denoising step at σ_min)."""
    score = denoiser_score(GaussianScoreModel().denoise)
    x = gaussian_slices()
    expected = MU + (x - MU) * math.sqrt((TAU**2 + 1.712**2) / (TAU**2 + SIGMA_MIN**2))
    errors = {}
    for n in (20, 40):
        latent = ode_encode(score, x, karras_sigmas(n, SIGMA_MIN, 1.712)[:-1].flip(0))
        errors[n] = ((latent.sample - expected).abs().max() / (expected - MU).abs().max()).item()
        assert latent.nfe == 2 * (n - 1)
    assert errors[20] < 0.01 and errors[40] < errors[20] / 3.5  # Heun: second order
    sigmas = karras_sigmas(20, SIGMA_MIN, 1.712)
    decoded = encode_decode(score, score, x, sigmas)
    final_denoise = MU + TAU**2 / (TAU**2 + SIGMA_MIN**2) * (x - MU)  # the last Euler step to σ = 0 is D(x, σ_min)
    assert decoded.nfe == 38 + 39 and torch.allclose(decoded.sample, final_denoise, atol=1e-3)
    assert (decoded.sample - x).abs().max() < 3e-3


def test_classifier_gradient_points_to_healthy_and_guidance_darkens_the_decoding():
    classifier = MeanIntensityClassifier(**TINY_CLASSIFIER)
    x = gaussian_slices()
    gradient = classifier.log_prob_gradient(x, torch.full((4,), 0.5), target=0)
    m = x.flatten(1).mean(1)
    expected = (-2 * classifier.K * torch.sigmoid(2 * classifier.K * m) / x[0].numel())[:, None, None, None].expand_as(x)
    assert torch.allclose(gradient, expected, rtol=1e-5) and (gradient < 0).all()
    assert (classifier.log_prob_gradient(x, torch.full((4,), 0.5), target=1) > 0).all()

    def reconstruct(scale: float) -> Tensor:
        reconstructor = ClassifierGuidedReconstructor(
            GaussianScoreModel(), classifier, 1.712, scale, n_steps=10, sigma_min=SIGMA_MIN, clip_denoised=False
        )
        return reconstructor(x.clamp(0, 1))

    unguided, guided = reconstruct(0.0), reconstruct(200.0)
    assert (guided.flatten(1).mean(1) < unguided.flatten(1).mean(1) - 0.01).all()
    assert (unguided - x.clamp(0, 1)).abs().max() < 3e-3  # no guidance: the input back (exact score)


def test_guidance_scale_zero_is_exactly_the_unguided_ode_decoding():
    torch.manual_seed(0)
    model, classifier = ScoreUNet(**TINY_UNET).eval(), NoisyClassifier(**TINY_CLASSIFIER).eval()
    x = torch.rand(3, 1, 16, 16)
    reconstructor = ClassifierGuidedReconstructor(model, classifier, 1.712, 0.0, n_steps=4, sigma_min=SIGMA_MIN)
    score = denoiser_score(model.denoise, clip_denoised=True)
    with torch.no_grad():
        plain = encode_decode(score, score, x, karras_sigmas(4, SIGMA_MIN, 1.712)).sample.clamp(0, 1)
    assert torch.equal(reconstructor(x), plain) and reconstructor.nfe_per_slice == 6 + 7
    guided = ClassifierGuidedReconstructor(model, classifier, 1.712, 100.0, n_steps=4, sigma_min=SIGMA_MIN)(x)
    assert guided.shape == x.shape and 0 <= guided.min() and guided.max() <= 1 and not torch.equal(guided, plain)


def test_classifier_free_guidance_combines_the_scores_and_w_zero_is_the_healthy_decoding():
    """Exact class-conditional Gaussian model (healthy mean 0.4, tumour 0.7, null 0.55): the decoding score is
    (1 + w)·s(x | healthy) − w·s(x | null); w = 0 decodes with s(x | healthy) alone, after encoding with s(x | null)."""
    model = GaussianScoreModel(class_means=(0.4, 0.7, 0.55))
    x, sigma = gaussian_slices(), torch.full((4,), 0.8)
    guided = ClassifierFreeReconstructor(model, 1.712, 2.0, n_steps=6, sigma_min=SIGMA_MIN, clip_denoised=False)
    healthy, null = guided.class_score(x, sigma, 0), guided.class_score(x, sigma, 2)
    assert torch.allclose(guided.decode_score(x, sigma), 3.0 * healthy - 2.0 * null)
    assert torch.equal(guided.encode_score(x, sigma), null) and guided.nfe_per_slice == 10 + 2 * 11

    plain = ClassifierFreeReconstructor(model, 1.712, 0.0, n_steps=6, sigma_min=SIGMA_MIN, clip_denoised=False)
    expected = encode_decode(lambda v, s: plain.class_score(v, s, 2), lambda v, s: plain.class_score(v, s, 0), x, plain.sigmas)
    assert torch.equal(plain(x), expected.sample.clamp(0, 1))
    # guidance moves the decoding past the healthy-conditional one, away from the null (mixture) mean
    assert guided(x).mean() < plain(x).mean() < 0.55


def test_label_dropout_rate_over_many_batches_and_in_the_trainer():
    labels = torch.randint(0, 2, (64,), generator=torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(1)
    dropped = torch.stack([drop_labels(labels, 2, 0.35, generator) for _ in range(300)])
    assert (dropped == 2).float().mean().item() == pytest.approx(0.35, abs=0.01)  # 19 200 draws: sd 0.0034
    kept = dropped != 2
    assert torch.equal(dropped[kept], labels.expand_as(dropped)[kept])

    network = ScoreUNet(**dict(TINY_UNET, num_classes=2))
    seen = []
    network.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs["class_labels"].clone()), with_kwargs=True)
    batches = [{"image": torch.rand(32, 1, 16, 16), "tumour": torch.arange(32) % 2} for _ in range(12)]
    trainer = ClassConditionalScoreTrainer(
        "cpu", 1, batches, network, torch.optim.Adam(network.parameters(), 1e-4), VESDE(0.01, 20.0), label_dropout=0.35, seed=0
    )
    trainer.run()
    seen = torch.cat(seen)
    assert len(seen) == 12 * 32 and (seen == 2).float().mean().item() == pytest.approx(0.35, abs=0.08)
    assert torch.equal(seen[seen != 2], (torch.arange(32) % 2).repeat(12)[seen != 2])


def test_score_unet_class_input_is_backwards_compatible():
    torch.manual_seed(0)
    plain = ScoreUNet(**TINY_UNET)
    assert not any("class_embedding" in key for key in plain.state_dict())
    torch.manual_seed(0)
    classed = ScoreUNet(**dict(TINY_UNET, num_classes=2))
    assert classed.state_dict()["unet.class_embedding.weight"].shape[0] == 3 and classed.null_class == 2
    x, sigma = torch.rand(2, 1, 16, 16), torch.tensor([0.1, 1.0])
    assert classed(x, sigma, class_labels=torch.tensor([0, 2])).shape == (2, 1, 16, 16)
    for bad in (None, torch.tensor([0, 3])):
        with pytest.raises(ValueError, match="class_labels"):
            classed(x, sigma, class_labels=bad)
    with pytest.raises(ValueError, match="no class input"):
        plain(x, sigma, class_labels=torch.tensor([0, 1]))


# ---------------------------------------------------------------- bundles

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
N_SLICES, SHAPE = 8, (20, 24, 8)
TINY_RUN = dict(image_size=32, max_epochs=1, epoch_length=2, batch_size=4, warmup_steps=2, log_interval=1)


@pytest.fixture(scope="module")
def work_dir(tmp_path_factory) -> Path:
    """A work dir with prepared/ as ``tsgm prepare`` leaves it: 8 labelled 32² training slices (healthy and tumour)
    and one 20×24×8 validation subject (an ellipsoid brain, a bright blob in T2/FLAIR) in volumes.json."""
    work = tmp_path_factory.mktemp("guided") / "work"
    prepared, subject = work / "prepared", work / "dataset" / "S1"
    (prepared / "slices" / "S0").mkdir(parents=True)
    subject.mkdir(parents=True)
    (prepared / "prepare_config.json").write_text(json.dumps(dict(PREPROCESS, seed=0)))
    rng = np.random.default_rng(0)
    items = []
    for i in range(N_SLICES):
        name = f"slices/S0/t1_z{i:03d}.npy"
        np.save(prepared / name, rng.random((32, 32)).astype(np.float32))
        items.append({"image": name, "subject": "S0", "modality": "t1", "z": i, "tumour": i % 2})
    (prepared / "datalist.json").write_text(json.dumps({"training": items, "validation": [], "test": []}))
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in SHAPE], indexing="ij"))
    brain, blob = (grid**2).sum(0) < 0.9, ((grid - np.array([0.3, 0.2, 0.0])[:, None, None, None]) ** 2).sum(0) < 0.08
    volume = {"subject": "S1"}
    for i, modality in enumerate(MODALITIES):
        data = brain * (100 + 10 * i + 5 * rng.standard_normal(SHAPE)) + blob * 60 * (modality in ("t2", "flair"))
        volume[modality] = str(subject / f"S1_{modality}.nii.gz")
        nib.save(nib.Nifti1Image(data.astype(np.float32), np.eye(4)), volume[modality])
    (prepared / "volumes.json").write_text(json.dumps({"validation": [volume], "test": []}))
    return work


def run_bundle(run_id: str, configs: list[str], **overrides) -> None:
    run(run_id, config_file=[str(CONFIGS / c) for c in configs], logging_file=False, **overrides)


def input_error(excinfo: pytest.ExceptionInfo) -> TsgmInputError:
    """The TsgmInputError behind an exception raised through MONAI's config evaluation (which wraps errors)."""
    error: BaseException | None = excinfo.value
    while error is not None and not isinstance(error, TsgmInputError):
        error = error.__cause__ or error.__context__
    assert error is not None, f"no TsgmInputError behind {excinfo.value!r}"
    return error


@pytest.mark.parametrize("peer", ["dpm_classifier", "dpm_classifier_free"])
def test_bundle_trains_resumes_and_detects(peer, work_dir):
    configs = [f"{peer}.yaml", f"{peer}_cpu.yaml"]
    common = dict(work_dir=str(work_dir))
    run_bundle("training", configs, **common, **TINY_RUN)
    model = work_dir / peer / "model.pt"
    spec = read_model_spec(model)
    assert spec.network.get("num_classes", 0) == (2 if peer == "dpm_classifier_free" else 0) and spec.preprocess.image_size == 32
    load_score_weights(ScoreUNet(**spec.network), model, spec)
    with pytest.raises(Exception) as excinfo:
        run_bundle("training", configs, **common, **TINY_RUN)
    assert "--resume True" in str(input_error(excinfo))
    run_bundle("training", configs, **common, **dict(TINY_RUN, max_epochs=2), resume=True)
    final = torch.load(work_dir / peer / "checkpoints" / "checkpoint_final.pt", weights_only=True)
    assert final["trainer"]["iteration"] == 4

    if peer == "dpm_classifier":
        classifier_run = dict(TINY_RUN, classifier_max_epochs=1, classifier_epoch_length=2, classifier_batch_size=4)
        run_bundle("training_classifier", configs, **common, **classifier_run)
        classifier_file = work_dir / peer / "classifier.pt"
        classifier = load_classifier(classifier_file, spec.preprocess)
        saved = torch.load(classifier_file, weights_only=True)["model"]
        assert all(torch.equal(value, saved[key]) for key, value in classifier.state_dict().items())
        assert read_classifier_spec(classifier_file).classifier["image_size"] == 32
        with pytest.raises(TsgmInputError, match="prepared as"):
            load_classifier(classifier_file, dataclasses.replace(spec.preprocess, image_size=64))
        run_bundle("training_classifier", configs, **common, **dict(classifier_run, classifier_max_epochs=2), resume=True)
        resumed = torch.load(work_dir / peer / "classifier_checkpoints" / "checkpoint_final.pt", weights_only=True)
        assert resumed["trainer"]["iteration"] == 4

    setting = {"dpm_classifier": "guidance_scale", "dpm_classifier_free": "guidance"}[peer]
    run_bundle("detecting", configs, **common, splits=["validation"], n_steps=2, method=f"{peer}_1", **{setting: 1.0})
    folder = work_dir / "detections" / f"{peer}_1" / "validation" / "S1"
    record = json.loads((folder / "S1_detection.json").read_text())
    reconstruction = record["reconstruction"]
    assert reconstruction[setting] == 1.0 and reconstruction["sigma_start"] == ddpm_sigma(500 if peer == "dpm_classifier" else 750)
    for modality in MODALITIES:
        healthy = nib.load(folder / f"S1_healthy_{modality}.nii.gz").get_fdata()
        assert healthy.shape == SHAPE and 0 <= healthy.min() and healthy.max() <= 1


@pytest.mark.parametrize("peer", ["dpm_classifier", "dpm_classifier_free"])
def test_configs_declare_the_tuned_setting_and_build_the_paper_networks(peer):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(CONFIGS / f"{peer}.yaml")])
    key = parser["setting_key"]
    assert key in parser and parser[key] in parser["setting_candidates"]
    assert parser["image_size"] == 256 and parser["method"] == peer
    network = ScoreUNet(**parser.get_parsed_content("network_args"))
    assert network.num_classes == (2 if peer == "dpm_classifier_free" else 0)
    cpu = ConfigParser()
    cpu.read_config([str(CONFIGS / f"{peer}.yaml"), str(CONFIGS / f"{peer}_cpu.yaml")])
    assert cpu["image_size"] == 64 and sum(p.numel() for p in ScoreUNet(**cpu.get_parsed_content("network_args")).parameters()) < 2e6
