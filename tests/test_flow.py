"""Flow math and the solver on a toy distribution whose exact velocity field is known."""

import math
from dataclasses import replace

import pytest
import torch

from vigu_cli.core.flow import (
    FlowSolver,
    Stream,
    interpolate,
    predicted_data,
    sample_sigmas,
    shift_sigma,
    text_weight,
    time_grid,
    unified_loss,
    velocity_target,
)
from vigu_cli.core.text import EmbeddingTextFlow
from vigu_cli.recipe import FlowSection

MU, STD = 2.0, 0.5  # data ~ N(MU, STD^2 I); noise ~ N(0, I)


def exact_velocity(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """E[noise - data | x_sigma] for Gaussian data on the linear path x = (1-sigma) data + sigma noise."""
    a = 1.0 - sigma
    var = a * a * STD * STD + sigma * sigma
    return (sigma - a * STD * STD) * (x - a * MU) / var - MU


def toy_model(x_v, x_t, t_v, t_t, condition):
    """The exact field for every stream that is present (timesteps are 1000 * sigma, per sample)."""
    out_v = exact_velocity(x_v, float(t_v[0]) / 1000.0) if x_v is not None else None
    out_t = exact_velocity(x_t, float(t_t[0]) / 1000.0) if x_t is not None else None
    return out_v, out_t


def solve_error(method: str, steps: int, shift: float = 1.0) -> float:
    noise = torch.randn(64, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out, _ = FlowSolver(steps, method, shift)(toy_model, Stream(noise.clone()), None)
    exact = MU + STD * noise  # the ODE's exact endpoint: x(0) = MU + STD * x(1)
    return float((out - exact).abs().max())


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_euler_and_heun_converge_and_heun_is_more_accurate(shift):
    euler = [solve_error("euler", n, shift) for n in (10, 40, 160)]
    heun = [solve_error("heun", n, shift) for n in (10, 40, 160)]
    assert euler[0] > euler[1] > euler[2] and euler[2] < 0.05
    assert heun[0] > heun[1] > heun[2] and heun[2] < 2e-3
    for e, h in zip(euler, heun):
        assert h < e
    # Heun is second order: quadrupling the steps cuts its error far more than Euler's
    assert heun[1] / heun[0] < euler[1] / euler[0]


def test_time_grid_matches_diffusers_scheduler_layout():
    sigmas, timesteps = time_grid(5, 3.0)
    assert sigmas.shape == (6,) and timesteps.shape == (5,)
    assert sigmas[0] == 1.0 and sigmas[-1] == 0.0
    assert torch.all(sigmas[1:] < sigmas[:-1])
    assert torch.allclose(timesteps, sigmas[:-1] * 1000)


def test_frozen_stream_is_untouched_and_seen_clean():
    seen = []

    def model(x_v, x_t, t_v, t_t, condition):
        seen.append((t_v.clone(), t_t.clone()))
        return exact_velocity(x_v, float(t_v[0]) / 1000), torch.ones_like(x_t)

    video, text = torch.randn(3, 4), torch.randn(3, 5, 2)
    out_v, out_t = FlowSolver(4, "heun", 3.0)(model, Stream(video), Stream(text, frozen=True), EmbeddingTextFlow())
    assert torch.equal(out_t, text)
    assert not torch.equal(out_v, video)
    assert all(torch.equal(t_t, torch.zeros(3)) for _, t_t in seen)
    assert len(seen) == 4 * 2 - 1  # Heun: two evaluations per step, one on the last step to sigma 0


def test_joint_streams_both_flow_to_the_data():
    noise = torch.randn(16, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    text_noise = torch.randn(16, 3, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    out_v, out_t = FlowSolver(80, "heun", 1.0)(toy_model, Stream(noise), Stream(text_noise), EmbeddingTextFlow())
    assert torch.allclose(out_v, MU + STD * noise, atol=5e-3)
    assert torch.allclose(out_t, MU + STD * text_noise, atol=5e-3)


def test_guidance_scale_per_stream():
    def model(x_v, x_t, t_v, t_t, condition):
        return torch.full_like(x_v, condition), torch.full_like(x_t, 10 * condition)

    solver = FlowSolver(1, "euler", 1.0)  # one step from sigma 1 to 0: out = x - pred
    out_v, out_t = solver(
        model, Stream(torch.zeros(1, 2)), Stream(torch.zeros(1, 2, 2)), EmbeddingTextFlow(),
        condition=1.0, uncondition=0.0, guidance_video=3.0, guidance_text=1.0,
    )
    assert torch.allclose(out_v, torch.full((1, 2), -3.0))  # 0 + 3 * (1 - 0)
    assert torch.allclose(out_t, torch.full((1, 2, 2), -10.0))  # scale 1: the conditional prediction


@pytest.mark.parametrize("eta", [0.5, 1.0])
def test_video_eta_steps_stay_on_the_paths_marginals(eta):
    """DDIM's stochastic step with the exact field: the samples reach the data distribution (mean and spread)
    as the steps grow, though each one ends elsewhere than the deterministic flow's."""
    noise = torch.randn(4096, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sample = lambda steps: FlowSolver(steps, "euler", 3.0, video_eta=eta)(  # noqa: E731
        toy_model, Stream(noise.clone()), None, generator=torch.Generator().manual_seed(1))[0]
    out, coarse = sample(400), sample(25)
    assert abs(float(out.mean()) - MU) < 0.02 and abs(float(out.std()) - STD) < 0.02
    assert abs(float(coarse.std()) - STD) > abs(float(out.std()) - STD)  # a coarse grid loses spread; steps converge
    deterministic, _ = FlowSolver(400, "euler", 3.0)(toy_model, Stream(noise.clone()), None)
    assert float((out - deterministic).abs().mean()) > 0.1  # the fresh noise moved the samples
    assert torch.equal(out, sample(400))  # the same generator, the same samples


def test_video_eta_step_by_hand():
    x, v = torch.randn(2, 3, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)
    sigma, sigma_next = torch.tensor(0.8, dtype=torch.float64), torch.tensor(0.5, dtype=torch.float64)
    data, noise = x - sigma * v, x + (1 - sigma) * v
    c = 0.6 * 0.5 * math.sqrt(1 - (0.2 * 0.5 / (0.5 * 0.8)) ** 2)
    fresh = torch.randn(2, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    step = FlowSolver(4, "euler", video_eta=0.6).video_step(x, v, sigma, sigma_next, torch.Generator().manual_seed(4))
    assert torch.allclose(step, 0.5 * data + math.sqrt(0.25 - c * c) * noise + c * fresh)
    euler = FlowSolver(4, "euler").video_step(x, v, sigma, sigma_next)
    assert torch.equal(euler, x + (sigma_next - sigma) * v)  # eta 0: Euler, bit for bit
    assert torch.equal(FlowSolver(4, "euler", video_eta=0.6).video_step(x, v, sigma, torch.tensor(0.0)), x - sigma * v)
    with pytest.raises(ValueError, match="video_eta needs the euler solver"):
        FlowSolver(4, "heun", video_eta=0.5)
    with pytest.raises(ValueError, match="the time grid's shift must be above 0"):
        FlowSolver(4, "euler", shift=0.0)
    with pytest.raises(ValueError, match="video_eta must be between 0 and 1"):
        FlowSolver(4, "euler", video_eta=1.5)


def test_interpolation_target_and_prediction_inverse():
    data, noise = torch.randn(4, 3, 2), torch.randn(4, 3, 2)
    sigma = torch.tensor([0.0, 0.25, 0.5, 1.0])
    x = interpolate(data, noise, sigma)
    assert torch.allclose(x[0], data[0]) and torch.allclose(x[3], noise[3])
    assert torch.allclose(predicted_data(x, velocity_target(data, noise), sigma), data, atol=1e-6)
    assert math.isclose(float(shift_sigma(torch.tensor(0.5), 3.0)), 0.75)


@pytest.mark.parametrize("kind", ["uniform", "logit_normal", "shifted"])
def test_sigma_sampling_is_independent_per_stream(kind):
    cfg = FlowSection(tau_sampling=kind, tau_shift=3.0)
    sigma_v, sigma_t = sample_sigmas(20000, cfg, torch.Generator().manual_seed(0))
    assert sigma_v.min() >= 0 and sigma_v.max() <= 1
    assert abs(float(torch.corrcoef(torch.stack([sigma_v, sigma_t]))[0, 1])) < 0.03
    expected_mean = {"uniform": 0.5, "logit_normal": 0.5, "shifted": 1.5 * (1 - math.log(3) / 2)}[kind]
    assert abs(float(sigma_v.mean()) - expected_mean) < 0.01


def test_task_corners():
    cfg = FlowSection(corner_prob=0.4)
    sigma_v, sigma_t = sample_sigmas(20000, cfg, torch.Generator().manual_seed(0))
    understanding, generation = (sigma_v == 0).float().mean(), (sigma_t == 0).float().mean()
    assert abs(float(understanding) - 0.2) < 0.015 and abs(float(generation) - 0.2) < 0.015
    assert not torch.any((sigma_v == 0) & (sigma_t == 0))
    sigma_v, sigma_t = sample_sigmas(20000, replace(cfg, understanding_share=0.75), torch.Generator().manual_seed(0))
    understanding, generation = (sigma_v == 0).float().mean(), (sigma_t == 0).float().mean()
    assert abs(float(understanding) - 0.3) < 0.015 and abs(float(generation) - 0.1) < 0.015


def test_unified_loss_weights():
    cfg = FlowSection()
    video, text = torch.tensor([1.0, 3.0]), torch.tensor([2.0, 4.0])
    total, parts = unified_loss(video, text, cfg, num_video_tokens=1000, num_text_tokens=10)
    assert math.isclose(float(total), 2.0 + 3.0)  # auto: per-token means added with equal weight
    assert parts["loss_video"] == 2.0 and parts["loss_text"] == 3.0
    # lambda_t on summed errors (paper) = weight lambda_t * |z_t| / |z_v| on the mean
    assert math.isclose(text_weight(100.0, 1000, 10), 1.0)
    total, _ = unified_loss(video, text, FlowSection(lambda_text=50.0), 1000, 10)
    assert math.isclose(float(total), 2.0 + 0.5 * 3.0)
    # a clean stream (task corner) is not supervised
    total, parts = unified_loss(video, text, cfg, 1000, 10, video_weight=torch.tensor([0.0, 1.0]))
    assert parts["loss_video"] == 1.5
    with pytest.raises(ValueError):
        unified_loss(None, None, cfg, 1, 1)


def test_task_corners_only_where_both_streams_train():
    """Stage `base` (video alone) never draws a clean video: a corner is a task of two streams."""
    from diffusers import WanTransformer3DModel

    from vigu_cli.core.model import UniViGUTransformer
    from vigu_cli.core.objective import unified_objective

    torch.manual_seed(0)
    wan = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4,
                                out_channels=4, text_dim=8, freq_dim=16, ffn_dim=32, num_layers=1)
    model = UniViGUTransformer.from_wan(wan, text_vocab_size=12, text_latent_dim=4, text_max_length=8)
    seen = []
    model.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs["timestep"]), with_kwargs=True)
    cfg = FlowSection(corner_prob=1.0)
    latents, condition = torch.randn(64, 4, 1, 4, 4), torch.randn(64, 3, 8)
    unified_objective(model, EmbeddingTextFlow(), cfg, latents, None, condition,
                      torch.Generator().manual_seed(0))
    assert seen[-1].min() > 0  # with corners, half of these would be 0
    ids = torch.randint(0, 12, (64, 8))
    unified_objective(model, EmbeddingTextFlow(), cfg, latents, ids, condition,
                      torch.Generator().manual_seed(0))
    assert 0.3 < float((seen[-1] == 0).float().mean()) < 0.7


def test_each_stream_walks_its_own_time_grid():
    """The text stream steps through the grid of `text_shift`, the video through that of `shift`; without
    a text shift both walk the video's."""
    seen = []

    def model_fn(x_v, x_t, t_v, t_t, condition):
        seen.append((float(t_v[0]), float(t_t[0])))
        return torch.zeros_like(x_v), torch.zeros_like(x_t)

    video, text = Stream(torch.zeros(1, 4)), Stream(torch.zeros(1, 3, 2))
    FlowSolver(6, "euler", 3.0, text_shift=0.5)(model_fn, video, text, EmbeddingTextFlow())
    assert seen == list(zip(time_grid(6, 3.0)[1].tolist(), time_grid(6, 0.5)[1].tolist()))
    assert seen[1][1] < seen[1][0]  # a shift below 1 spends the steps nearer clean text
    seen.clear()
    FlowSolver(6, "euler", 3.0)(model_fn, video, text, EmbeddingTextFlow())
    assert seen == [(t, t) for t in time_grid(6, 3.0)[1].tolist()]
