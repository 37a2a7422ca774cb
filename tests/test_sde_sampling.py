"""VE SDE schedule, samplers against the exact score of Gaussian data, DSM loss minimum, and the sampler inferer."""

import math

import pytest
import torch
from torch import nn

from tsgm_components.diffusion.inferers import DiffusionSamplerInferer
from tsgm_components.losses.score_matching import dsm_loss, regression_loss
from tsgm_components.diffusion.noise import randn
from tsgm_components.diffusion.sampling import (
    LangevinCorrector,
    ReverseDiffusionPredictor,
    geometric_sigmas,
    karras_sigmas,
    sample_heun,
    sample_pc,
    sample_posterior_mean,
    sample_regression,
    sample_sdedit,
)
from tsgm_components.diffusion.sde import VESDE

MU, STD = 0.4, 0.15  # Gaussian "data": every pixel i.i.d. N(MU, STD²)
SHAPE = (2, 1, 32, 32)


def gaussian_score(x: torch.Tensor, sigma: torch.Tensor, mu=MU) -> torch.Tensor:
    """Exact score of N(mu, STD²) noised by N(0, σ²): −(x − mu)/(STD² + σ²)."""
    return -(x - mu) / (STD**2 + sigma[:, None, None, None] ** 2)


class CountingScore:
    def __init__(self, fn=gaussian_score):
        self.fn, self.calls = fn, 0

    def __call__(self, x, sigma):
        self.calls += 1
        return self.fn(x, sigma)


def assert_gaussian(sample: torch.Tensor, mean_tol=0.02, std_rel_tol=0.08):
    assert torch.isfinite(sample).all()
    assert abs(sample.mean().item() - MU) < mean_tol
    assert abs(sample.std().item() / STD - 1) < std_rel_tol


# --- schedule ---------------------------------------------------------------------------------------------------


def test_sigma_schedule_matches_closed_form():
    sde = VESDE(sigma_min=0.01, sigma_max=348.0, n_scales=1000)
    t = torch.tensor([0.0, 0.25, 0.5, 1.0], dtype=torch.float64)
    expected = 0.01 * (348.0 / 0.01) ** t
    torch.testing.assert_close(sde.sigma(t), expected)
    torch.testing.assert_close(sde.t_of_sigma(sde.sigma(t)), t)
    sigmas = sde.discrete_sigmas().double()
    assert sigmas.shape == (1000,)
    assert sigmas[0].item() == pytest.approx(0.01) and sigmas[-1].item() == pytest.approx(348.0, rel=1e-5)
    ratios = sigmas[1:] / sigmas[:-1]
    torch.testing.assert_close(ratios, torch.full_like(ratios, (348.0 / 0.01) ** (1 / 999)), rtol=1e-5, atol=0)


def test_prior_and_training_times():
    sde = VESDE()
    prior = sde.prior_sample((4, 1, 64, 64), torch.Generator().manual_seed(0))
    assert prior.std().item() == pytest.approx(348.0, rel=0.03)
    t = sde.sample_t(10_000, torch.Generator().manual_seed(0))
    assert t.min() >= sde.eps and t.max() <= 1.0
    assert t.mean().item() == pytest.approx(0.5, abs=0.02)


def test_sigma_grids():
    geo = geometric_sigmas(5, 0.01, 100.0)
    torch.testing.assert_close(geo, torch.tensor([100.0, 10.0, 1.0, 0.1, 0.01]))
    k = karras_sigmas(18, 0.01, 348.0)
    assert k.shape == (19,) and k[-1] == 0
    assert k[0].item() == pytest.approx(348.0, rel=1e-6) and k[-2].item() == pytest.approx(0.01, rel=1e-5)
    assert (k[1:] < k[:-1]).all()


# --- samplers on Gaussian data with the exact score -------------------------------------------------------------


def test_pc_full_paper_sampler_reproduces_data():
    sde = VESDE()
    g = torch.Generator().manual_seed(1)
    score = CountingScore()
    out = sample_pc(score, sde.prior_sample(SHAPE, g), sde.discrete_sigmas().flip(0), generator=g)
    assert out.nfe == 2000 == score.calls
    assert_gaussian(out.sample)


@pytest.mark.parametrize("corrector", [LangevinCorrector(snr=0.075, n_steps=1), None])
def test_pc_fewer_steps_reproduces_data(corrector):
    sde = VESDE()
    g = torch.Generator().manual_seed(2)
    score = CountingScore()
    x_init = sde.prior_sample(SHAPE, g)
    out = sample_pc(score, x_init, geometric_sigmas(100, 0.01, 348.0), corrector=corrector, generator=g)
    assert out.nfe == score.calls == (200 if corrector else 100)
    assert_gaussian(out.sample)


def test_sdedit_keeps_data_distribution_and_stays_close_for_small_noise():
    g = torch.Generator().manual_seed(3)
    data = MU + STD * torch.randn(SHAPE, generator=g)
    score = CountingScore()
    out = sample_sdedit(score, data, geometric_sigmas(50, 0.01, 1.0), generator=g)
    assert out.nfe == score.calls == 100
    assert_gaussian(out.sample)
    # barely noised: the edit stays near its input (the data term dominates the posterior)
    near = sample_sdedit(gaussian_score, data, geometric_sigmas(20, 0.01, 0.03), corrector=None, generator=g).sample
    assert (near - data).abs().mean() < 0.05
    assert (out.sample - data).abs().mean() > 0.1  # σ_start = 1 ≫ STD: a fresh draw


def test_heun_follows_the_exact_probability_flow():
    sde = VESDE()
    x_init = sde.prior_sample(SHAPE, torch.Generator().manual_seed(4)).double()
    # closed-form ODE solution for Gaussian data: x(0) − μ = (x(σ_max) − μ) · s / sqrt(s² + σ_max²)
    exact = MU + (x_init - MU) * STD / math.sqrt(STD**2 + 348.0**2)
    score = CountingScore()
    out = sample_heun(score, x_init, karras_sigmas(70, 0.01, 348.0).double())
    assert out.nfe == score.calls == 139
    torch.testing.assert_close(out.sample, exact, rtol=0, atol=0.01 * STD * 4)
    default = sample_heun(gaussian_score, x_init.float(), karras_sigmas(18, 0.01, 348.0))
    assert default.nfe == 35
    assert_gaussian(default.sample, std_rel_tol=0.2)


@pytest.mark.parametrize("churn", [5.0, 40.0])
def test_stochastic_heun_reproduces_data_and_is_seeded(churn):
    sde = VESDE()
    grid = karras_sigmas(40, 0.01, 348.0)  # churn adds discretisation error to the variance: 18 levels give +18 %

    def run(seeds):
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        return sample_heun(gaussian_score, sde.prior_sample((len(seeds), 1, 32, 32), gens), grid, churn, gens)

    out = run([0, 1])
    assert out.nfe == 79  # churn adds noise, not score evaluations
    assert_gaussian(out.sample)
    torch.testing.assert_close(out.sample, run([0, 1]).sample, rtol=0, atol=0)
    torch.testing.assert_close(out.sample[1:], run([1]).sample, rtol=0, atol=0)
    # the churn noise is really drawn: same prior, other noise -> other sample
    x_init = sde.prior_sample((1, 1, 32, 32), torch.Generator().manual_seed(0))
    a = sample_heun(gaussian_score, x_init, grid, churn, torch.Generator().manual_seed(1)).sample
    b = sample_heun(gaussian_score, x_init, grid, churn, torch.Generator().manual_seed(2)).sample
    assert (a - b).abs().mean() > 0.01
    with pytest.raises(ValueError, match="churn"):
        sample_heun(gaussian_score, x_init, grid, -1.0)


def test_same_seed_same_sample_and_per_sample_generators_ignore_batch():
    sde = VESDE()
    grid = geometric_sigmas(30, 0.01, 348.0)

    def run(seeds):
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        x = sde.prior_sample((len(seeds), 1, 8, 8), gens)
        return sample_pc(gaussian_score, x, grid, generator=gens).sample

    torch.testing.assert_close(run([7, 8, 9]), run([7, 8, 9]), rtol=0, atol=0)
    torch.testing.assert_close(run([7, 8, 9])[1:2], run([8]), rtol=0, atol=0)
    assert not torch.equal(run([7]), run([8]))
    with pytest.raises(ValueError, match="per-sample generators"):
        randn((3, 1, 2, 2), [torch.Generator()])


def test_langevin_step_size_uses_per_sample_norms():
    corrector = LangevinCorrector(snr=0.1, n_steps=1)
    x = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    x[1] *= 100  # a very different second sample must not change the first one's step
    gens = [torch.Generator().manual_seed(s) for s in (5, 6)]
    _, x_mean = corrector(gaussian_score, x, 0.5, gens)
    z0 = torch.randn(1, 4, 4, generator=torch.Generator().manual_seed(5))
    g0 = gaussian_score(x[:1], torch.tensor([0.5]))[0]
    step = 2 * (0.1 * z0.norm() / g0.norm()) ** 2
    torch.testing.assert_close(x_mean[0], x[0] + step * g0)


def test_reverse_diffusion_predictor_formula():
    x = torch.ones(1, 1, 2, 2)
    x_new, x_mean = ReverseDiffusionPredictor()(gaussian_score, x, 2.0, 1.0, torch.Generator().manual_seed(0))
    expected_mean = x + 3.0 * gaussian_score(x, torch.tensor([2.0]))
    torch.testing.assert_close(x_mean, expected_mean)
    z = torch.randn(1, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(x_new, expected_mean + math.sqrt(3.0) * z)


# --- DSM loss ---------------------------------------------------------------------------------------------------


class ScaledGaussianScore(nn.Module):
    """The exact Gaussian score times ``factor``, with the network call signature (x_t, sigma, condition)."""

    def __init__(self, factor: float = 1.0):
        super().__init__()
        self.factor = factor

    def forward(self, x, sigma, condition=None):
        return self.factor * gaussian_score(x, sigma)


def test_dsm_loss_of_exact_score_is_the_closed_form_minimum():
    sde = VESDE()
    x0 = MU + STD * torch.randn(20_000, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    # For Gaussian data E‖σ s* + z‖² = s²/(s²+σ²) per pixel; averaged over t ~ U(eps, 1) with u = σ(t)²:
    # 1/((1−eps)·2 ln(σmax/σmin)) · [ln(u/(s²+u))] from u(eps) to u(1).
    u0 = sde.sigma(torch.tensor(sde.eps, dtype=torch.float64)) ** 2
    u1 = torch.tensor(sde.sigma_max**2, dtype=torch.float64)
    primitive = lambda u: torch.log(u / (STD**2 + u))  # noqa: E731
    minimum = (primitive(u1) - primitive(u0)) / ((1 - sde.eps) * 2 * math.log(sde.sigma_max / sde.sigma_min))
    exact_loss = dsm_loss(ScaledGaussianScore(1.0), x0, None, sde, torch.Generator().manual_seed(1))
    assert exact_loss.item() == pytest.approx(minimum.item(), abs=0.01)
    for factor in (0.9, 1.1):
        perturbed = dsm_loss(ScaledGaussianScore(factor), x0, None, sde, torch.Generator().manual_seed(1))
        assert perturbed > exact_loss + 0.002


def test_dsm_loss_never_noises_the_condition():
    seen = {}

    def network(x_t, sigma, condition):
        seen["condition"] = condition
        return torch.zeros_like(x_t)

    condition = torch.rand(3, 1, 4, 4)
    loss = dsm_loss(network, torch.rand(3, 1, 4, 4), condition, VESDE(), torch.Generator().manual_seed(0))
    assert seen["condition"] is condition
    assert loss.item() == pytest.approx(1.0, abs=0.35)  # zero score: the loss is E z² = 1


# --- inferer ----------------------------------------------------------------------------------------------------


class ConditionalGaussianScore(nn.Module):
    """Exact score of N(condition, STD²) per pixel: the 'healthy' image is the condition plus Gaussian texture."""

    def __init__(self, condition_channels: int = 1):
        super().__init__()
        self.condition_channels = condition_channels
        self.calls = 0

    def forward(self, x, sigma, condition=None):
        self.calls += 1
        mu = condition if self.condition_channels else torch.full_like(x, MU)
        return gaussian_score(x, sigma, mu)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(sampler="pc", n_steps=20),
        dict(sampler="heun", n_steps=20),
        dict(sampler="heun", n_steps=20, churn=5.0),
        dict(sampler="sdedit", n_steps=10, sdedit_sigma_start=0.5, n_corrector_steps=0),
    ],
)
def test_inferer_chunking_seed_and_nfe(kwargs):
    inputs = torch.rand(5, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 0.6 + 0.2
    network = ConditionalGaussianScore()
    whole = DiffusionSamplerInferer(VESDE(), seed=3, batch_size=64, **kwargs)
    chunked = DiffusionSamplerInferer(VESDE(), seed=3, batch_size=2, **kwargs)
    out = whole(inputs, network)
    assert network.calls == whole.nfe_per_slice
    assert out.shape == inputs.shape and out.min() >= 0 and out.max() <= 1
    torch.testing.assert_close(chunked(inputs, network), out, rtol=0, atol=1e-6)
    if kwargs["sampler"] != "heun" or kwargs.get("churn"):  # without churn heun is fixed by the prior draw
        assert not torch.equal(DiffusionSamplerInferer(VESDE(), seed=4, **kwargs)(inputs, network), out)
    # the reconstruction follows the condition (the healthy mean of this toy model)
    assert (out - inputs).abs().mean() < 0.2


def test_a_sampler_is_one_registry_entry(monkeypatch):
    """Adding a sampler = one SAMPLERS entry: the inferer validates, grids, runs and counts it from the entry alone,
    and refuses a run whose reported NFE differs from the entry's (the recorded nfe_per_slice must be what ran)."""
    from tsgm_components.diffusion import inferers
    from tsgm_components.diffusion.sampling import SampleOutput

    def euler(inf, score_fn, chunk, generators, progress):  # probability-flow Euler from the prior
        x = inf.sde.prior_sample(chunk.shape, generators, chunk.device)
        levels = [*inf.sigmas.tolist(), 0.0]
        for sigma, below in zip(levels[:-1], levels[1:]):
            x = x + (sigma - below) * sigma * score_fn(x, torch.full((x.shape[0],), sigma))
        return SampleOutput(x, len(inf.sigmas))

    monkeypatch.setitem(
        inferers.SAMPLERS,
        "euler",
        inferers.Sampler(
            sigmas=lambda sde, n_steps, start: karras_sigmas(n_steps or 40, sde.sigma_min, sde.sigma_max)[:-1],
            run=euler,
            nfe=lambda inf: len(inf.sigmas),
        ),
    )
    inputs = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 0.6 + 0.2
    network = ConditionalGaussianScore()
    inferer = DiffusionSamplerInferer(VESDE(), sampler="euler", n_steps=200, seed=1)
    out = inferer(inputs, network)
    assert network.calls == inferer.nfe_per_slice == 200
    assert (out - inputs).abs().mean() < 0.2  # it follows the condition like the other samplers
    with pytest.raises(ValueError, match=r"churn .* is for sampler in \['heun'\] only"):
        DiffusionSamplerInferer(VESDE(), sampler="euler", churn=1.0)
    with pytest.raises(ValueError, match=r"unconditional model reconstructs only with sampler in \['sdedit'\]"):
        DiffusionSamplerInferer(VESDE(), sampler="euler", conditional=False)
    monkeypatch.setitem(
        inferers.SAMPLERS,
        "euler",
        inferers.Sampler(
            sigmas=inferers.SAMPLERS["euler"].sigmas,
            run=euler,
            nfe=lambda inf: len(inf.sigmas) + 1,
        ),
    )
    with pytest.raises(RuntimeError, match="made 200 score evaluations per draw, expected 201"):
        DiffusionSamplerInferer(VESDE(), sampler="euler", n_steps=200)(inputs, network)


def test_inferer_averages_independent_draws():
    """n_draws: the mean of draws 0..k-1, each drawn from its own (seed, slice, draw) stream and clamped; draw 0 is
    the single-draw result. For the toy model (healthy = condition + N(0, STD²) texture) the residual noise of the
    mean of 4 draws is half that of one draw."""
    from tsgm_components.diffusion.inferers import slice_generator

    sde = VESDE()
    inputs = torch.rand(8, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 0.6 + 0.2
    network = ConditionalGaussianScore()
    kwargs = dict(sampler="heun", n_steps=20, seed=3)
    single = DiffusionSamplerInferer(sde, **kwargs)
    averaged = DiffusionSamplerInferer(sde, n_draws=4, batch_size=5, **kwargs)  # chunks split draws apart
    assert averaged.nfe_per_slice == 4 * single.nfe_per_slice == 4 * 39
    out = averaged(inputs, network)
    torch.testing.assert_close(DiffusionSamplerInferer(sde, n_draws=4, **kwargs)(inputs, network), out, rtol=0, atol=1e-6)

    def draw(k):
        generators = [slice_generator(3, i, "cpu", k) for i in range(len(inputs))]
        x_init = sde.prior_sample(inputs.shape, generators)
        return sample_heun(lambda x, s: network(x, s, inputs), x_init, single.sigmas).sample.clamp(0, 1)

    torch.testing.assert_close(single(inputs, network), draw(0), rtol=0, atol=1e-6)
    torch.testing.assert_close(out, torch.stack([draw(k) for k in range(4)]).mean(0), rtol=0, atol=1e-6)
    assert (single(inputs, network) - inputs).std().item() == pytest.approx(STD, rel=0.1)
    assert (out - inputs).std().item() == pytest.approx(STD / 2, rel=0.1)
    with pytest.raises(ValueError, match="n_draws >= 1"):
        DiffusionSamplerInferer(sde, n_draws=0)
    with pytest.raises(ValueError, match="churn"):
        DiffusionSamplerInferer(sde, sampler="pc", churn=1.0)


def test_inferer_compile_pads_the_last_chunk_to_one_shape(monkeypatch):
    """compile=True: the network is compiled once, every call sees one batch shape (the short last chunk is padded
    and its extra rows dropped), and the result is the uncompiled one."""
    compiled, shapes = [], []

    class ShapeRecorder(nn.Module):
        def __init__(self, network):
            super().__init__()
            self.network = network

        def forward(self, x, sigma, condition=None):
            shapes.append(tuple(x.shape))
            return self.network(x, sigma, condition)

    monkeypatch.setattr(torch, "compile", lambda network, **kwargs: compiled.append(kwargs) or ShapeRecorder(network))
    inputs = torch.rand(5, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 0.6 + 0.2
    network = ConditionalGaussianScore()
    kwargs = dict(sampler="heun", n_steps=4, seed=1, batch_size=2, n_draws=2)  # 10 units: 5 chunks of 2
    inferer = DiffusionSamplerInferer(VESDE(), compile=True, **kwargs)
    out = inferer(inputs, network)
    inferer(inputs[:3], network)  # 6 units: 3 chunks of 2
    assert compiled == [{"dynamic": False}] and set(shapes) == {(2, 1, 8, 8)}
    torch.testing.assert_close(out, DiffusionSamplerInferer(VESDE(), **kwargs)(inputs, network), rtol=0, atol=1e-6)
    shapes.clear()
    odd = DiffusionSamplerInferer(VESDE(), compile=True, **{**kwargs, "batch_size": 4})(inputs, network)  # 4+4+2
    assert set(shapes) == {(4, 1, 8, 8)}
    torch.testing.assert_close(odd, out, rtol=0, atol=1e-6)


def test_inferer_compile_of_a_real_score_network_matches_eager():
    """torch.compile of a (tiny) ScoreUNet through the inferer: same reconstructions as eager (≈1 min of
    compilation on a 2-core CPU)."""
    from tsgm_components.networks.score import ScoreUNet

    torch.manual_seed(0)
    network = ScoreUNet(
        condition_channels=1, channels=[8, 16], attention_levels=[False, False], num_res_blocks=1, num_head_channels=8, norm_num_groups=8
    ).eval()
    with torch.no_grad():  # MONAI zero-initialises the output layer: make the network's output depend on its input
        for parameter in network.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    inputs = torch.rand(6, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    kwargs = dict(sampler="heun", n_steps=3, batch_size=4)
    eager = DiffusionSamplerInferer(VESDE(sigma_max=20.0), **kwargs)(inputs, network)
    compiled = DiffusionSamplerInferer(VESDE(sigma_max=20.0), compile=True, **kwargs)(inputs, network)
    assert eager.std() > 0.1
    torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-4)


def test_posterior_mean_is_tweedies_closed_form():
    """For N(MU, STD²) data noised to σ, E[x_0 | x_σ] = MU + STD²/(STD² + σ²)·(x_σ − MU): one score evaluation gives it
    exactly, from the prior it is ≈ MU (the MMSE estimate), and it equals one Heun level (an Euler step to 0)."""
    sigma = 20.0
    x_init = sigma * torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    score = CountingScore()
    out = sample_posterior_mean(score, x_init, sigma)
    torch.testing.assert_close(out.sample, MU + STD**2 / (STD**2 + sigma**2) * (x_init - MU))
    assert out.nfe == score.calls == 1
    assert (out.sample - MU).abs().max() < 0.01
    torch.testing.assert_close(sample_heun(gaussian_score, x_init, karras_sigmas(1, 0.01, sigma)).sample, out.sample)
    with pytest.raises(ValueError, match="sigma must be > 0"):
        sample_posterior_mean(gaussian_score, x_init, 0.0)


def test_posterior_mean_inferer_follows_the_condition():
    """The conditional toy model's posterior mean is its condition (to within σ_max's leftover weight STD²/σ_max²):
    one network call per slice and draw, no n_steps."""
    inputs = torch.rand(5, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 0.6 + 0.2
    network = ConditionalGaussianScore()
    inferer = DiffusionSamplerInferer(VESDE(sigma_max=20.0), sampler="posterior_mean", n_draws=2)
    out = inferer(inputs, network)
    assert inferer.nfe_per_slice == 2 and network.calls == 1  # the two draws of every slice share one batched call
    torch.testing.assert_close(out, inputs, rtol=0, atol=5e-3)  # leftover STD²/σ_max²·σ_max·z ≈ 1e-3·z
    with pytest.raises(ValueError, match="takes no n_steps"):
        DiffusionSamplerInferer(VESDE(), sampler="posterior_mean", n_steps=4)
    with pytest.raises(ValueError, match="unconditional model reconstructs only"):
        DiffusionSamplerInferer(VESDE(), sampler="posterior_mean", conditional=False)


def test_regression_control_reads_the_network_at_a_zero_input():
    """The regression sampler is D(0, σ_max): for the toy model whose healthy image is condition + N(0, STD²) texture
    that is condition·σ_max²/(σ_max² + STD²), exactly, with no randomness; regression_loss is that output's squared
    error to x0 (0 for x0 = the output), and its gradient reaches the network."""
    inputs = torch.rand(5, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 0.6 + 0.2
    sde, network = VESDE(sigma_max=20.0), ConditionalGaussianScore()
    shrink = 20.0**2 / (20.0**2 + STD**2)
    out = sample_regression(lambda x, s: network(x, s, inputs), inputs, 20.0)
    torch.testing.assert_close(out.sample, inputs * shrink)
    assert out.nfe == 1
    inferer = DiffusionSamplerInferer(sde, sampler="regression", n_draws=2)
    torch.testing.assert_close(inferer(inputs, network), inputs * shrink)
    assert inferer.nfe_per_slice == 2
    assert regression_loss(network, inputs * shrink, inputs, sde).item() == pytest.approx(0.0, abs=1e-12)
    assert regression_loss(network, inputs * shrink + 0.1, inputs, sde).item() == pytest.approx(0.01, rel=1e-4)
    conv = nn.Conv2d(2, 1, 1)
    loss = regression_loss(lambda x, s, c: conv(torch.cat([x, c], 1)), inputs, inputs, sde)
    loss.backward()
    assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0


def test_inferer_paper_defaults_and_modes():
    sde = VESDE()
    assert DiffusionSamplerInferer(sde).nfe_per_slice == 2000
    assert DiffusionSamplerInferer(sde, sampler="heun").nfe_per_slice == 35
    sdedit = DiffusionSamplerInferer(sde, sampler="sdedit", sdedit_sigma_start=1.0, n_corrector_steps=0)
    assert sdedit.sigmas[0].item() == pytest.approx(1.0) and sdedit.sigmas[-1].item() == pytest.approx(0.01)
    with pytest.raises(ValueError, match="sdedit"):
        DiffusionSamplerInferer(sde, sampler="pc", conditional=False)
    with pytest.raises(ValueError, match="sdedit_sigma_start"):
        DiffusionSamplerInferer(sde, sampler="sdedit")
    with pytest.raises(ValueError, match="condition_channels=1"):
        DiffusionSamplerInferer(sde, n_steps=2)(torch.rand(1, 1, 4, 4), ConditionalGaussianScore(0))
    unconditional = DiffusionSamplerInferer(sde, sampler="sdedit", n_steps=10, sdedit_sigma_start=0.3, conditional=False)
    out = unconditional(torch.full((2, 1, 8, 8), MU), ConditionalGaussianScore(0))
    assert out.shape == (2, 1, 8, 8) and abs(out.mean().item() - MU) < 0.05


def test_inferer_rejects_unnormalised_or_nan_inputs_and_reports_progress(caplog):
    inferer = DiffusionSamplerInferer(VESDE(), n_steps=4, progress=True)
    with pytest.raises(ValueError, match=r"in \[0, 1\], got values in \[0, 250"):
        inferer(torch.full((1, 1, 4, 4), 250.0).index_fill_(2, torch.tensor([0]), 0.0), ConditionalGaussianScore())
    with pytest.raises(ValueError, match="NaN"):
        inferer(torch.full((1, 1, 4, 4), float("nan")), ConditionalGaussianScore())
    with caplog.at_level("INFO", logger="tsgm_components.diffusion.inferers"):
        inferer(torch.rand(1, 1, 4, 4), ConditionalGaussianScore())
    assert "pc sampling slices 1-1 of 1: step 4/4" in caplog.text
    with caplog.at_level("INFO", logger="tsgm_components.diffusion.inferers"):
        DiffusionSamplerInferer(VESDE(), n_steps=4, n_draws=3, progress=True)(torch.rand(2, 1, 4, 4), ConditionalGaussianScore())
    assert "pc sampling slice draws 1-6 of 6: step 4/4" in caplog.text
    caplog.clear()  # a log file gets a line per PROGRESS_SECONDS and the end of the stack, not one per step or chunk
    with caplog.at_level("INFO", logger="tsgm_components.diffusion.inferers"):
        DiffusionSamplerInferer(VESDE(), n_steps=4, batch_size=1, progress=True)(torch.rand(3, 1, 4, 4), ConditionalGaussianScore())
    assert caplog.messages == ["pc sampling slices 3-3 of 3: step 4/4"]


def test_inferer_amp_runs_the_network_under_bfloat16_on_cpu():
    modes = []

    class RecordingScore(ConditionalGaussianScore):
        def forward(self, x, sigma, condition=None):
            modes.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
            return super().forward(x, sigma, condition)

    inputs = torch.rand(2, 1, 4, 4)
    mixed = DiffusionSamplerInferer(VESDE(), sampler="heun", n_steps=4, amp=True)(inputs, RecordingScore())
    exact = DiffusionSamplerInferer(VESDE(), sampler="heun", n_steps=4)(inputs, ConditionalGaussianScore())
    assert len(modes) == 7 and set(modes) == {(True, torch.bfloat16)}
    assert mixed.dtype == torch.float32  # the sampler's state stays float32 (the analytic score has no
    torch.testing.assert_close(mixed, exact)  # autocast-eligible op, so here the result is the float32 one)


def test_sampler_progress_callback_sees_every_step():
    steps = []
    grid = geometric_sigmas(5, 0.01, 1.0)
    sample_pc(gaussian_score, torch.zeros(1, 1, 2, 2), grid, progress=lambda i, n: steps.append((i, n)))
    assert steps == [(i, 5) for i in range(1, 6)]


def test_max_pairwise_distance_is_exact_and_chunk_independent():
    from tsgm_components.diffusion.sde import max_pairwise_distance

    images = torch.rand(7, 1, 5, 5, generator=torch.Generator().manual_seed(0))
    brute = max((a - b).norm().item() for a in images for b in images)
    assert max_pairwise_distance(images, chunk_size=3) == pytest.approx(brute, rel=1e-6)
    extremes = torch.stack([torch.zeros(1, 8, 8), torch.ones(1, 8, 8), torch.full((1, 8, 8), 0.5)])
    assert max_pairwise_distance(extremes) == pytest.approx(8.0)  # sqrt(64 pixels)
    with pytest.raises(ValueError, match="at least 2"):
        max_pairwise_distance(images[:1])


def test_channels_last_layout_changes_only_rounding():
    """channels_last (cpu.yaml) converts a real ScoreUNet and its inputs to channels-last: same reconstructions."""
    from tsgm_components.networks.score import ScoreUNet

    torch.manual_seed(0)
    network = ScoreUNet(channels=(8, 16), attention_levels=(False, False), num_res_blocks=1, num_head_channels=8, norm_num_groups=8).eval()
    inputs = torch.rand(6, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    kwargs = dict(sampler="heun", n_steps=3, seed=2, batch_size=4)
    plain = DiffusionSamplerInferer(VESDE(sigma_max=20.0), **kwargs)(inputs, network)
    converted = DiffusionSamplerInferer(VESDE(sigma_max=20.0), channels_last=True, **kwargs)(inputs, network)
    assert network.unet.conv_in.conv.weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(converted, plain, rtol=0, atol=1e-4)


def test_a_sampler_setting_is_declared_once():
    """The sampler settings are the inferer's arguments before its run options: the bundle config passes its
    sampler_settings mapping as it is, keeps the top-level keys users override, and records every setting (defaults
    included) in the detection provenance, which is what a calibration compares."""
    from monai.bundle import ConfigParser

    from tsgm_components import REPO_ROOT
    from tsgm_components.detection.masking import reconstruction_settings
    from tsgm_components.diffusion.inferers import SAMPLER_SETTINGS

    assert SAMPLER_SETTINGS == ("sampler", "n_steps", "snr", "n_corrector_steps", "sdedit_sigma_start", "churn", "n_draws")
    inferer = DiffusionSamplerInferer.from_settings(VESDE(), {"sampler": "heun", "n_steps": 4}, seed=3)
    assert inferer.settings == {
        "sampler": "heun",
        "n_steps": 4,
        "snr": 0.075,
        "n_corrector_steps": 1,
        "sdedit_sigma_start": None,
        "churn": 0.0,
        "n_draws": 1,
    }
    with pytest.raises(ValueError, match="unknown sampler settings \\['steps'\\]"):
        DiffusionSamplerInferer.from_settings(VESDE(), {"steps": 4})
    with pytest.raises(TypeError):  # run options are keyword-only, never taken for a setting
        DiffusionSamplerInferer(VESDE(), "pc", None, 0.075, 1, None, 0.0, 1, True)
    configs = REPO_ROOT / "bundles" / "vejp_anomaly" / "configs"
    parser = ConfigParser()
    parser.read_config(str(configs / "inference.yaml"))
    parser.update({"checkpoint": str(configs.parent / "models" / "phantom.pt"), "sampler": "heun", "n_steps": 4, "n_draws": 2, "churn": 0.5})
    provenance = parser.get_parsed_content("provenance")
    assert reconstruction_settings(provenance) == parser.get_parsed_content("slice_inferer").settings
    assert (provenance["sampler"], provenance["n_steps"], provenance["n_draws"], provenance["churn"]) == ("heun", 4, 2, 0.5)
    assert provenance["nfe_per_slice"] == 2 * (2 * 4 - 1) and provenance["seed"] == 0
    # every top-level sampler key is used once, in sampler_settings
    text = (configs / "inference.yaml").read_text()
    for key in parser["sampler_settings"]:
        assert text.count(f'"@{key}"') == 1, key
