"""ScoreUNet wiring and size, and the DSM trainer: one step, EMA, warm-up, checkpoint/resume."""

import pytest
import torch
import yaml
from ignite.engine import Events
from monai.handlers import CheckpointLoader, CheckpointSaver

from tsgm_components import REPO_ROOT
from tsgm_components.engines.score import ScoreMatchingTrainer, linear_warmup
from tsgm_components.losses.score_matching import dsm_loss
from tsgm_components.networks.score import NOISE_LABEL_SCALE, PAPER_PRESET, ScoreUNet
from tsgm_components.diffusion.sde import VESDE

TINY = dict(channels=(32, 32), attention_levels=(False, True), num_res_blocks=1, num_head_channels=32)


def n_params(module):
    return sum(p.numel() for p in module.parameters())


def test_score_unet_shapes_and_condition_checks():
    torch.manual_seed(0)
    x, c, sigma = torch.rand(3, 1, 16, 16), torch.rand(3, 1, 16, 16), torch.tensor([0.01, 1.0, 300.0])
    conditional, unconditional = ScoreUNet(1, **TINY), ScoreUNet(0, **TINY)
    assert conditional(x, sigma, c).shape == (3, 1, 16, 16)
    assert unconditional(x, sigma).shape == (3, 1, 16, 16)
    assert conditional.unet.conv_in.conv.in_channels == 2 and unconditional.unet.conv_in.conv.in_channels == 1
    with pytest.raises(ValueError, match="condition must be"):
        conditional(x, sigma)
    with pytest.raises(ValueError, match="unconditional"):
        unconditional(x, sigma, c)
    with pytest.raises(ValueError, match="divisible by 2"):
        conditional(torch.rand(3, 1, 15, 16), sigma, c)


def test_score_unet_is_the_edm_preconditioned_denoiser():
    torch.manual_seed(0)
    net = ScoreUNet(1, **TINY).eval()
    with torch.no_grad():  # MONAI zero-initialises the output convolution; make the output non-trivial
        for p in net.unet.out.parameters():
            p.normal_(0, 0.1)
    x, c = torch.rand(2, 1, 16, 16), torch.rand(2, 1, 16, 16)
    sigma = torch.tensor([0.05, 20.0])
    s_y, s_d = 2 * sigma[:, None, None, None], 0.5  # noise on the [-1, 1] scale; EDM's sigma_data
    y = 2 * x - 1
    with torch.no_grad():
        raw = net.unet(torch.cat([y / (s_y**2 + s_d**2).sqrt(), 2 * c - 1], 1), NOISE_LABEL_SCALE * torch.log(sigma))
        denoised_y = s_d**2 / (s_y**2 + s_d**2) * y + s_y * s_d / (s_y**2 + s_d**2).sqrt() * raw
        expected_denoised = (denoised_y + 1) / 2
        torch.testing.assert_close(net.denoise(x, sigma, c), expected_denoised)
        torch.testing.assert_close(net(x, sigma, c), (expected_denoised - x) / sigma[:, None, None, None] ** 2, rtol=1e-4, atol=1e-4)
        # at a tiny sigma D is close to the identity (c_skip -> 1, c_out -> 0)
        torch.testing.assert_close(net.denoise(x, torch.tensor(1e-4), c), x, atol=1e-3, rtol=0)
        # the condition matters; a scalar sigma broadcasts
        assert not torch.allclose(net(x, sigma, c), net(x, sigma, 1 - c))
        torch.testing.assert_close(net.denoise(x, torch.tensor(0.05), c)[:1], net.denoise(x[:1], sigma[:1], c[:1]))


def test_loss_weight_makes_the_dsm_loss_the_unet_output_mse():
    """w(σ)·(σ·s + z)² equals (F − F_target)², F_target = (y_0 − c_skip·y_t)/c_out, at every σ."""
    torch.manual_seed(0)
    net = ScoreUNet(1, **TINY).eval()
    with torch.no_grad():
        for p in net.unet.out.parameters():
            p.normal_(0, 0.1)
    x0, c = torch.rand(4, 1, 16, 16), torch.rand(4, 1, 16, 16)
    sde = VESDE(sigma_min=0.01, sigma_max=50.0)
    with torch.no_grad():
        loss = dsm_loss(net, x0, c, sde, torch.Generator().manual_seed(3), net.loss_weight)
        g = torch.Generator().manual_seed(3)  # the same draws as inside dsm_loss
        sigma = sde.sigma(sde.sample_t(4, g))
        z = torch.randn(x0.shape, generator=g)
        s_y, s_d = 2 * sigma[:, None, None, None], 0.5
        y0, y_t = 2 * x0 - 1, 2 * (x0 + sigma[:, None, None, None] * z) - 1
        raw = net.unet(torch.cat([y_t / (s_y**2 + s_d**2).sqrt(), 2 * c - 1], 1), NOISE_LABEL_SCALE * torch.log(sigma))
        target = (y0 - s_d**2 / (s_y**2 + s_d**2) * y_t) / (s_y * s_d / (s_y**2 + s_d**2).sqrt())
    torch.testing.assert_close(loss, ((raw - target) ** 2).mean(), rtol=1e-4, atol=1e-6)


def test_network_parameter_counts_of_both_scales():
    with torch.device("meta"):  # shapes only: no memory, no init time
        paper = ScoreUNet(1, **PAPER_PRESET)
    assert n_params(paper) == 65_345_153  # method notes: MONAI DiffusionModelUNet in the paper layout
    cpu_args = yaml.safe_load((REPO_ROOT / "bundles" / "vejp_anomaly" / "configs" / "cpu.yaml").read_text())["network_args"]
    assert n_params(ScoreUNet(**cpu_args)) == 704_289  # the 64² demo network (the shipped model's)


def pair_batches(n, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"image": torch.rand(2, 1, size, size, generator=g), "condition": torch.rand(2, 1, size, size, generator=g)} for _ in range(n)]


def make_trainer(data, max_epochs, condition_channels=1, seed=0, warmup=3):
    torch.manual_seed(seed)
    net = ScoreUNet(condition_channels, **TINY)
    opt = torch.optim.Adam(net.parameters(), lr=2e-4)
    return ScoreMatchingTrainer(
        device="cpu",
        max_epochs=max_epochs,
        train_data_loader=data,
        network=net,
        optimizer=opt,
        sde=VESDE(),
        lr_scheduler=linear_warmup(opt, warmup),
        seed=seed,
        loss_weight=net.loss_weight,
    )


def flat(module):
    return torch.cat([p.detach().flatten() for p in module.parameters()])


@pytest.mark.parametrize("condition_channels", [1, 0])
def test_one_step_updates_weights_and_ema(condition_channels):
    trainer = make_trainer(pair_batches(1), max_epochs=1, condition_channels=condition_channels)
    before = flat(trainer.network).clone()
    torch.testing.assert_close(flat(trainer.ema_network.module), before)
    trainer.run()
    after = flat(trainer.network)
    assert not torch.equal(after, before)
    torch.testing.assert_close(flat(trainer.ema_network.module), before + (1 - 0.999) * (after - before))
    loss = trainer.state.output["loss"]
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert trainer.state.iteration == 1


def test_linear_warmup_reaches_the_base_rate():
    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=2e-4)
    sched = linear_warmup(opt, 4)
    rates = []
    for _ in range(6):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert rates[0] == pytest.approx(0.5e-4) and rates[3:] == pytest.approx([2e-4] * 3)
    assert rates[0] < rates[1] < rates[2] < rates[3]


def test_checkpoint_resume_matches_uninterrupted_training(tmp_path):
    data = pair_batches(1)
    uninterrupted = make_trainer(data, max_epochs=2)
    uninterrupted.run()

    first = make_trainer(data, max_epochs=1)
    CheckpointSaver(str(tmp_path), first.checkpoint_objects, save_final=True, final_filename="last.pt").attach(first)
    first.run()
    resumed = make_trainer(data, max_epochs=2, seed=123)  # different init and seed: all must come from the file
    resumed.add_event_handler(Events.STARTED, CheckpointLoader(str(tmp_path / "last.pt"), resumed.checkpoint_objects))
    resumed.run()

    assert resumed.state.iteration == uninterrupted.state.iteration == 2
    torch.testing.assert_close(flat(resumed.network), flat(uninterrupted.network), rtol=0, atol=0)
    torch.testing.assert_close(flat(resumed.ema_network.module), flat(uninterrupted.ema_network.module), rtol=0, atol=0)
    assert resumed.lr_scheduler.state_dict() == uninterrupted.lr_scheduler.state_dict()
    exp_avg = lambda t: t.optimizer.state_dict()["state"][0]["exp_avg"]  # noqa: E731
    torch.testing.assert_close(exp_avg(resumed), exp_avg(uninterrupted), rtol=0, atol=0)
    # the saved EMA loads into a plain ScoreUNet for sampling
    sampling_net = ScoreUNet(1, **TINY)
    sampling_net.load_state_dict(torch.load(tmp_path / "last.pt", weights_only=True)["network_ema"])


def test_inferer_runs_a_real_score_unet():
    from tsgm_components.diffusion.inferers import DiffusionSamplerInferer

    torch.manual_seed(0)
    net = ScoreUNet(1, **TINY).eval()
    with torch.no_grad():  # a non-zero output layer, so the network shapes the samples
        for p in net.unet.out.parameters():
            p.normal_(0, 0.02)
    inputs = torch.rand(3, 1, 16, 16)
    settings = dict(sampler="sdedit", n_steps=3, sdedit_sigma_start=1.0, seed=5)
    out = DiffusionSamplerInferer(VESDE(), batch_size=2, **settings)(inputs, net)
    assert out.shape == (3, 1, 16, 16) and out.min() >= 0 and out.max() <= 1
    # chunking changes only the floating-point rounding of batched convolutions
    unchunked = DiffusionSamplerInferer(VESDE(), batch_size=3, **settings)(inputs, net)
    torch.testing.assert_close(unchunked, out, rtol=0, atol=1e-4)


def test_amp_means_bfloat16_autocast_without_a_scaler_on_the_cpu():
    """amp has one meaning (tsgm_components.diffusion.precision): float16 + GradScaler on CUDA, bfloat16 on the CPU."""
    net = ScoreUNet(1, **TINY)
    trainer = ScoreMatchingTrainer("cpu", 1, pair_batches(1), net, torch.optim.Adam(net.parameters()), VESDE(), loss_weight=net.loss_weight, amp=True)
    seen = []
    net.unet.register_forward_hook(lambda module, args, out: seen.append((torch.is_autocast_enabled("cpu"), out.dtype)))
    before = flat(net)
    trainer.run()
    assert trainer.loss_scaler is None and "scaler" not in trainer.checkpoint_objects
    assert seen == [(True, torch.bfloat16)]
    assert torch.isfinite(trainer.state.output["loss"]) and not torch.equal(flat(net), before)
    assert all(p.dtype == torch.float32 for p in net.parameters())


def test_training_reduces_the_dsm_loss():
    """A zero-initialised output layer leaves D = c_skip·y_t, far from the data at large σ; a few steps must at
    least halve the trained (EDM-weighted) loss on held-out pairs."""
    g = torch.Generator().manual_seed(0)

    def pair(batch):
        condition = torch.rand(batch, 1, 16, 16, generator=g)
        return {"image": 0.5 * condition + 0.25, "condition": condition}

    held_out = pair(32)

    def eval_loss(net):
        with torch.no_grad():
            return dsm_loss(net, held_out["image"], held_out["condition"], VESDE(), torch.Generator().manual_seed(1), net.loss_weight)

    torch.manual_seed(0)
    net = ScoreUNet(1, **TINY)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    before = eval_loss(net)
    ScoreMatchingTrainer("cpu", 1, [pair(4) for _ in range(20)], net, opt, VESDE(), linear_warmup(opt, 5), loss_weight=net.loss_weight).run()
    after = eval_loss(net)
    assert before > 0.3 and after < 0.5 * before, (before, after)


def test_prepare_pair_batch_strips_metadata_and_names_missing_keys():
    from monai.data import MetaTensor

    from tsgm_components.engines.score import prepare_pair_batch

    image, condition = prepare_pair_batch(
        {"image": MetaTensor(torch.rand(2, 1, 4, 4)), "condition": torch.rand(2, 1, 4, 4, dtype=torch.float64)}, "cpu"
    )
    assert type(image) is torch.Tensor and image.dtype == condition.dtype == torch.float32
    assert prepare_pair_batch({"image": torch.rand(1, 1, 4, 4)}, "cpu")[1] is None
    with pytest.raises(KeyError, match="'image'"):
        prepare_pair_batch({"condition": torch.rand(1, 1, 4, 4)}, "cpu")
