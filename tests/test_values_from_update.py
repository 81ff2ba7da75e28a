"""Old values from the critic's first training forward (`ppo.values_from_update`): the run it
gives matches the run that scores with the critic, it resumes exactly, PPO-Lagrangian's λ steps
once per rollout, and what prevents it is said (or, left unset, silently falls back)."""

from __future__ import annotations

import numpy as np
import paddle
import pytest

from ppo import values_from_update
from ppo.experience import PromptBatch
from ppo.run_ppo import build_trainer
from tests.test_ppo_trainer import assert_resumes_exactly, make_arguments, ppo_assets, read_metrics, run  # noqa: F401
from tests.test_ppo_lag import LAG, lag_assets  # noqa: F401 (fixture)

# 4 prompts x 1 response in micro-batches of 2, both accumulated: one optimizer step per rollout.
ONE_STEP = dict(gradient_accumulation_steps=2, max_steps=3, ptx_coeff=0.0)
# Logged per step; the critic's are the ones the shortcut computes differently.
COMPARED = ("train/reward", "train/values", "train/returns", "train/explained_variance", "train/reward_critic_loss",
            "train/actor_loss", "train/approx_kl", "train/kl_divergence")  # fmt: skip


def _weights(model) -> dict:
    return {name: value.numpy().copy() for name, value in model.state_dict().items()}


def test_critic_targets_are_the_experience_returns(ppo_assets, tmp_path):
    """The per-micro-batch targets equal what `build_experience` puts in the experience for the
    same values: GAE is per row."""
    trainer = build_trainer(*make_arguments(ppo_assets, tmp_path / "out", old_values_from_update=False, **ONE_STEP))
    trainer.offload = trainer._build_offload_manager()
    experience = trainer.make_experience(PromptBatch.from_collated(next(trainer.prompt_batches)))
    critic = trainer.critics["critic"]
    for micro_batch in experience.split(2):
        returns = values_from_update.critic_returns(
            micro_batch.old_values, micro_batch.rewards, micro_batch.action_mask, trainer.args.gamma, trainer.args.gae_lambda
        )
        np.testing.assert_allclose(returns.numpy(), micro_batch.returns.numpy(), rtol=0, atol=0)
    assert critic.token_rewards_field == "rewards"


def test_matches_the_run_that_scores_with_the_critic(ppo_assets, tmp_path):
    scored = run(ppo_assets, tmp_path / "scored", old_values_from_update=False, **ONE_STEP)
    shortcut = run(ppo_assets, tmp_path / "shortcut", **ONE_STEP)  # unset: taken whenever possible
    assert shortcut.values_from_update and not scored.values_from_update
    a, b = read_metrics(tmp_path / "scored"), read_metrics(tmp_path / "shortcut")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3]
    for expected, actual in zip(a, b):
        for name in COMPARED:
            # Train-mode vs eval-mode forward, micro-batch vs scoring chunk: float32 rounding only.
            assert actual[name] == pytest.approx(expected[name], rel=1e-4, abs=1e-5), (expected["step"], name)
    for role in ("actor_model", "critic_model"):
        expected, actual = _weights(getattr(scored, role)), _weights(getattr(shortcut, role))
        for name in expected:
            np.testing.assert_allclose(actual[name], expected[name], rtol=1e-4, atol=1e-5, err_msg=f"{role} {name}")


def test_the_critic_is_not_run_while_scoring(ppo_assets, tmp_path):
    trainer = build_trainer(*make_arguments(ppo_assets, tmp_path / "out", **ONE_STEP))
    assert trainer.values_from_update
    calls = {"score": 0, "train": 0}
    critic = trainer.critic_model
    forward = critic.forward

    def counted(*args, **kwargs):
        calls["train" if critic.training else "score"] += 1
        return forward(*args, **kwargs)

    critic.forward = counted
    trainer.train()
    assert calls["score"] == 0
    assert calls["train"] == 2 * ONE_STEP["max_steps"]  # one forward per micro-batch, 2 per step


def test_resumes_exactly(ppo_assets, tmp_path):
    settings = dict(ONE_STEP, max_steps=4, save_strategy="steps", save_steps=1)
    full_dir = tmp_path / "full"
    run(ppo_assets, full_dir, **settings)
    assert_resumes_exactly(ppo_assets, tmp_path, full_dir, (2,), settings)


def test_ppo_lag_matches_and_steps_lambda_once_per_rollout(lag_assets, tmp_path):
    settings = dict(LAG, threshold=-1.0, **ONE_STEP)
    scored = run(lag_assets, tmp_path / "scored", old_values_from_update=False, **settings)
    shortcut = run(lag_assets, tmp_path / "shortcut", **settings)
    assert shortcut.values_from_update
    a, b = read_metrics(tmp_path / "scored"), read_metrics(tmp_path / "shortcut")
    for expected, actual in zip(a, b):
        for name in ("train/lambda", "train/episode_cost", "train/cost_critic_loss", "train/reward_critic_loss", "train/actor_loss"):
            assert actual[name] == pytest.approx(expected[name], rel=1e-4, abs=1e-5), (expected["step"], name)
    assert shortcut.lagrange.value == pytest.approx(scored.lagrange.value, rel=1e-6)
    assert len(shortcut.lagrange.episode_costs) == len(scored.lagrange.episode_costs)


@pytest.mark.parametrize(
    "overrides, reason",
    [
        (dict(update_iters=2), "update_iters=2"),
        (dict(gradient_accumulation_steps=1), "several optimizer steps"),
    ],
)
def test_what_prevents_it_is_said_or_falls_back(ppo_assets, tmp_path, overrides, reason):
    settings = dict(ONE_STEP, **overrides)
    assert not build_trainer(*make_arguments(ppo_assets, tmp_path / "unset", **settings)).values_from_update
    with pytest.raises(ValueError, match=reason):
        build_trainer(*make_arguments(ppo_assets, tmp_path / "required", old_values_from_update=True, **settings))


def test_critic_dropout_prevents_it():
    class Config:
        def to_dict(self):
            return {"hidden_dropout_prob": 0.1, "attention_dropout": 0.0}

    class Critic:
        config = Config()

    class Args:
        update_iters, micro_batches_per_rollout, gradient_accumulation_steps, pipeline_parallel_degree = 1, 2, 2, 1

    reasons = values_from_update.blockers(Args(), {"critic": Critic()}, [])
    assert reasons == ["critic has dropout {'hidden_dropout_prob': 0.1} (its training forward is not the rollout-time one)"]
    assert values_from_update.blockers(Args(), {}, []) == ["the algorithm has no critic"]
    assert values_from_update.decide(None, reasons) is False
    assert values_from_update.decide(False, []) is False
    assert values_from_update.decide(None, []) is True
    with pytest.raises(ValueError, match="hidden_dropout_prob"):
        values_from_update.decide(True, reasons)
