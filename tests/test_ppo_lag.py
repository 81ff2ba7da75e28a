"""PPO-Lagrangian on the tiny models of `tests/test_ppo_trainer.py`: the split KL penalty, the
multiplier's response to costs, what is logged and saved, exact resume, and bad input."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import paddle
import pytest

from ppo.models.ppo_model_utils import reward_and_cost_token_rewards
from tests.test_ppo_trainer import assert_resumes_exactly, make_arguments, ppo_assets, read_metrics, run  # noqa: F401


@pytest.fixture(scope="module")
def lag_assets(ppo_assets, tmp_path_factory, tiny_llama_dir):
    """ppo_assets plus a cost model (a score model of type cost, initialised from the tiny Llama)."""
    from paddlenlp.transformers import AutoTokenizer

    from ppo.models import AutoModelForScore

    paddle.seed(11)
    cost_dir = str(tmp_path_factory.mktemp("cost") / "cost")
    AutoModelForScore.from_pretrained(tiny_llama_dir, score_type="cost").save_pretrained(cost_dir)
    AutoTokenizer.from_pretrained(tiny_llama_dir).save_pretrained(cost_dir)
    return {**ppo_assets, "cost": cost_dir}


LAG = dict(rl_algorithm="ppo_lag", lambda_lr=0.5, lambda_init=1.0, episode_cost_window_size=8)


def test_token_rewards_and_costs_share_the_kl_penalty():
    log_probs = paddle.to_tensor([[0.0, -1.0, -2.0, 0.0]])
    reference = paddle.to_tensor([[0.0, -1.5, -1.0, 0.0]])
    mask = paddle.to_tensor([[False, True, True, False]])
    rewards, costs = reward_and_cost_token_rewards(
        paddle.to_tensor([2.0]), paddle.to_tensor([-3.0]), log_probs, reference, mask, kl_coeff=0.4, clip_range_score=2.5
    )
    # k1 KL per token: 0.5 and -1.0; half of kl_coeff on each side.
    np.testing.assert_allclose(rewards.numpy(), [[0.0, -0.2 * 0.5, -0.2 * -1.0 + 2.0, 0.0]], rtol=1e-6)
    np.testing.assert_allclose(costs.numpy(), [[0.0, 0.2 * 0.5, 0.2 * -1.0 - 2.5, 0.0]], rtol=1e-6)  # cost clipped
    # Together, A_r - λ·A_c over 1 + λ carries the whole penalty: r - c at λ = 1 is (score terms) - 0.4·KL.
    np.testing.assert_allclose((rewards - costs).numpy()[0, 1], -0.4 * 0.5, rtol=1e-6)


def test_ppo_lag_trains_logs_and_saves_the_cost_side(lag_assets, tmp_path):
    output = tmp_path / "out"
    # Every cost (about 0) is above the threshold: λ must grow at each rollout.
    # offload_level freeze_model: the cost model is offloaded outside the phases that score with it
    # (a no-op move on CPU, but the schedule is checked: a use while offloaded raises).
    trainer = run(
        lag_assets, output, threshold=-1.0, evaluation_strategy="steps", eval_steps=2, offload_level="freeze_model", **LAG
    )
    rows = read_metrics(output)
    train = [row for row in rows if "train/reward" in row]
    for name in ("train/cost", "train/episode_cost", "train/lambda", "train/cost_critic_loss", "train/cost_critic_lr",
                 "train/reward_critic_loss", "train/actor_loss"):
        assert all(math.isfinite(row[name]) for row in train), name
    lambdas = [row["train/lambda"] for row in train]
    assert lambdas[0] > 1.0 and lambdas == sorted(lambdas) and lambdas[-1] > lambdas[0]
    assert all("eval/cost" in row for row in rows if "eval/reward" in row)
    for name in ("policy", "value", "cost_value"):
        assert os.path.isfile(output / name / "config.json"), name
    with open(output / "cost_value" / "config.json", encoding="utf-8") as f:
        assert json.load(f)["score_type"] == "critic"
    assert trainer.lagrange.value == pytest.approx(lambdas[-1])


def test_lambda_falls_when_costs_are_under_the_threshold(lag_assets, tmp_path):
    run(lag_assets, tmp_path / "out", threshold=1.0, **LAG)
    lambdas = [row["train/lambda"] for row in read_metrics(tmp_path / "out") if "train/lambda" in row]
    assert lambdas[0] < 1.0 and lambdas[-1] < lambdas[0]


def test_lambda_waits_for_the_update_delay_and_stops_at_lambda_max(lag_assets, tmp_path):
    run(lag_assets, tmp_path / "delay", threshold=-1.0, lambda_update_delay_steps=2, lambda_max=1.5, **LAG)
    lambdas = [row["train/lambda"] for row in read_metrics(tmp_path / "delay") if "train/lambda" in row]
    # Rollouts at steps 0 and 2 (two optimizer steps each): the first is before the delay.
    assert lambdas[:2] == [1.0, 1.0] and lambdas[2:] == [1.5, 1.5]


def test_ppo_lag_resumes_exactly(lag_assets, tmp_path):
    settings = dict(max_steps=6, save_strategy="steps", save_steps=1, save_total_limit=None, threshold=-1.0, **LAG)
    full_dir = tmp_path / "full"
    run(lag_assets, full_dir, **settings)
    assert os.path.isfile(full_dir / "checkpoint-3" / "algorithm_state.json")
    # Step 3 is mid-rollout (pending experience with its λ), step 4 a rollout boundary.
    assert_resumes_exactly(lag_assets, tmp_path, full_dir, (3, 4), settings)


def test_ppo_lag_needs_a_cost_model(ppo_assets, tmp_path):
    from ppo.run_ppo import build_trainer

    with pytest.raises(ValueError, match="needs cost_model_name_or_path"):
        build_trainer(*make_arguments(ppo_assets, tmp_path, **LAG))
    model_args, data_args, training_args = make_arguments(ppo_assets, tmp_path, **LAG)
    model_args.cost_model_name_or_path = model_args.cost_critic_model_name_or_path = ppo_assets["actor"]
    with pytest.raises(ValueError, match="is not a score model"):
        build_trainer(model_args, data_args, training_args)
    with pytest.raises(ValueError, match="lambda_init must be a finite number > 0"):
        make_arguments(ppo_assets, tmp_path, **{**LAG, "lambda_init": 0.0})
