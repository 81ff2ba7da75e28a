"""PPO-Lagrangian math against hand-computed values."""

import json
import math

import numpy as np
import paddle
import pytest

from ppo.models.lagrangian import LagrangeMultiplier, LagrangianArguments, lagrangian_advantages


def test_defaults_are_safe_rlhfs():
    args = LagrangianArguments()
    assert (args.threshold, args.lambda_init, args.lambda_lr, args.lambda_max) == (0.0, 1.0, 0.1, None)
    assert (args.lambda_update_delay_steps, args.episode_cost_window_size) == (0, 128)


def test_advantage_combination_hand_computed():
    reward, cost = paddle.to_tensor([[1.0, 2.0]]), paddle.to_tensor([[0.5, -1.0]])
    # λ = 3: ((1 - 1.5) / 4, (2 + 3) / 4)
    np.testing.assert_allclose(lagrangian_advantages(reward, cost, 3.0).numpy(), [[-0.125, 1.25]], rtol=1e-6)
    # λ = 0 is plain PPO on the reward advantages.
    np.testing.assert_allclose(lagrangian_advantages(reward, cost, 0.0).numpy(), reward.numpy())
    with pytest.raises(ValueError, match=">= 0"):
        lagrangian_advantages(reward, cost, -0.1)
    with pytest.raises(ValueError, match="one shape"):
        lagrangian_advantages(reward, cost[:, :1], 1.0)


def test_update_hand_computed_with_window():
    multiplier = LagrangeMultiplier(LagrangianArguments(lambda_init=1.0, lambda_lr=0.1, threshold=0.0, episode_cost_window_size=2))
    multiplier.add_episode_costs([0.5, 1.5])  # J_c = 1.0
    assert multiplier.update(global_step=0)
    # log λ = 0 + 0.1 · (1.0 − 0) · 1 = 0.1
    assert multiplier.log_lambda == pytest.approx(0.1)
    assert multiplier.value == pytest.approx(math.exp(0.1))
    multiplier.add_episode_costs(paddle.to_tensor([-3.0]))  # window of 2: [1.5, -3.0], J_c = -0.75
    assert multiplier.mean_episode_cost() == pytest.approx(-0.75)
    multiplier.update(global_step=1)
    # log λ = 0.1 + 0.1 · (−0.75) · e^0.1
    assert multiplier.log_lambda == pytest.approx(0.1 - 0.075 * math.exp(0.1))
    # A cost under the threshold lowers λ, but it never reaches 0 (the step shrinks with λ).
    for step in range(2, 200):
        multiplier.update(step, mean_episode_cost=-5.0)
    assert 0.0 < multiplier.value < 0.02


def test_update_is_safe_rlhfs_sgd_step_on_the_lambda_loss():
    """The closed form equals SGD on −(J_c − d)·exp(log λ), as safe-rlhf computes it."""
    args = LagrangianArguments(lambda_init=0.7, lambda_lr=0.05, threshold=0.3)
    multiplier = LagrangeMultiplier(args)
    log_lambda = paddle.create_parameter([1], "float64", default_initializer=paddle.nn.initializer.Constant(math.log(0.7)))
    optimizer = paddle.optimizer.SGD(learning_rate=args.lambda_lr, parameters=[log_lambda])
    for step, episode_cost in enumerate([1.2, 0.9, -0.4, 2.5]):
        multiplier.update(step, mean_episode_cost=episode_cost)
        lambda_loss = -(episode_cost - args.threshold) * log_lambda.exp()
        lambda_loss.backward()
        optimizer.step()
        optimizer.clear_grad()
        assert multiplier.log_lambda == pytest.approx(float(log_lambda), rel=1e-12)


def test_lambda_max_clamps_and_delay_holds():
    multiplier = LagrangeMultiplier(LagrangianArguments(lambda_max=1.05, lambda_update_delay_steps=2))
    multiplier.add_episode_costs([1.0])
    assert not multiplier.update(0) and not multiplier.update(1)
    assert multiplier.value == 1.0 and multiplier.num_updates == 0
    assert multiplier.update(2)
    # Unclamped: log λ = 0.1 (λ ≈ 1.105); clamped to λ_max.
    assert multiplier.value == pytest.approx(1.05)


def test_update_without_costs_is_an_error():
    with pytest.raises(ValueError, match="no episode costs yet"):
        LagrangeMultiplier(LagrangianArguments()).update(0)


def test_state_dict_resumes_exactly():
    args = LagrangianArguments(lambda_init=2.0, lambda_lr=0.2, threshold=0.1, episode_cost_window_size=3, lambda_max=50.0)
    batches = [[0.4, 0.9], [-0.2], [1.3, 0.0, 0.6], [-1.0, -0.5], [0.2]]
    straight = LagrangeMultiplier(args)
    for step, costs in enumerate(batches[:2]):
        straight.add_episode_costs(costs)
        straight.update(step)
    saved = json.loads(json.dumps(straight.state_dict()))  # survives a JSON round trip
    resumed = LagrangeMultiplier(args)
    resumed.load_state_dict(saved)
    for step, costs in enumerate(batches[2:], start=2):
        for multiplier in (straight, resumed):
            multiplier.add_episode_costs(costs)
            multiplier.update(step)
        assert resumed.log_lambda == straight.log_lambda
        assert list(resumed.episode_costs) == list(straight.episode_costs)
    assert resumed.num_updates == straight.num_updates == len(batches)

    other_window = LagrangeMultiplier(LagrangianArguments(episode_cost_window_size=4))
    with pytest.raises(ValueError, match="holds 3 episodes but episode_cost_window_size is 4"):
        other_window.load_state_dict(saved)
    with pytest.raises(KeyError, match="episode_costs"):
        resumed.load_state_dict({"log_lambda": 0.0, "optimizer": {}, "episode_cost_window_size": 3})


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"lambda_init": 0.0}, "lambda_init must be a finite number > 0"),
        ({"lambda_lr": -1.0}, "lambda_lr must be >= 0"),
        ({"lambda_max": 0.5}, "lambda_max must be None or >= lambda_init = 1.0"),
        ({"lambda_update_delay_steps": -1}, "lambda_update_delay_steps must be an integer >= 0"),
        ({"episode_cost_window_size": 0}, "episode_cost_window_size must be an integer >= 1"),
        ({"threshold": float("nan")}, "threshold must be a finite number"),
    ],
)
def test_bad_arguments_are_explained(overrides, message):
    with pytest.raises(ValueError, match=message):
        LagrangianArguments(**overrides)
