"""End-to-end runs of the critic-free algorithms (grpo, rloo, reinforce_plus_plus) and of
rule-based reward functions on the tiny models of `tests/test_ppo_trainer.py`."""

from __future__ import annotations


import numpy as np
import pytest

from ppo.arguments import PPOModelArguments, PPOTrainingArguments
from ppo.run_ppo import build_trainer
from tests.test_ppo_trainer import assert_resumes_exactly, make_arguments, ppo_assets, read_metrics  # noqa: F401 (fixture)

CRITIC_METRICS = ("train/reward_critic_loss", "train/critic_lr", "train/values", "train/returns", "train/explained_variance")
RULES = '''
def length_reward(prompt, response, sample):
    assert isinstance(sample, dict) and sample["input"] == prompt
    return len(response.split()) / 10.0


def not_a_number(prompt, response, sample):
    return float("nan")
'''


def run(assets, output_dir, resume=None, model_overrides=None, **overrides):
    model_args, data_args, training_args = make_arguments(assets, output_dir, **overrides)
    if model_overrides:
        model_args = PPOModelArguments(**{**vars(model_args), **model_overrides})
    trainer = build_trainer(model_args, data_args, training_args)
    trainer.train(resume_from_checkpoint=resume)
    return trainer


GROUP = dict(num_return_sequences=2, max_steps=2)


@pytest.mark.parametrize(
    "algorithm, kl, builds_reference",
    [
        ("grpo", dict(kl_coeff=0.0, kl_loss_coeff=0.05), True),  # KL as a loss term needs the reference
        ("rloo", dict(kl_coeff=0.0), False),  # no KL term at all: no reference model
        ("reinforce_plus_plus", dict(), True),  # the default kl_coeff puts KL in the reward
    ],
)
def test_critic_free_algorithm_trains_without_a_critic(ppo_assets, tmp_path, algorithm, kl, builds_reference):
    output = tmp_path / algorithm
    trainer = run(ppo_assets, output, rl_algorithm=algorithm, **GROUP, **kl)
    assert trainer.critic_model is None and trainer.critic_trainer is None
    assert (trainer.reference_model is not None) == builds_reference
    assert set(trainer.trainers) == {"actor"}
    records = [r for r in read_metrics(output) if "train/actor_loss" in r]
    assert [r["step"] for r in records] == [1, 2]
    for record in records:
        assert all(np.isfinite(v) for k, v in record.items() if k != "step"), record
        assert not [name for name in CRITIC_METRICS if name in record]
        assert "train/reward" in record and "train/ptx_loss" in record
        assert ("train/kl_loss" in record) == (kl.get("kl_loss_coeff", 0) > 0)
    assert (output / "policy").is_dir() and not (output / "value").exists()


def test_grpo_advantages_in_the_trainer_are_per_prompt_groups(ppo_assets, tmp_path):
    """The experience a grpo trainer builds: each prompt's responses are neighbours and their
    advantages are the group-normalised sequence rewards (Dr. GRPO here: r - mean)."""
    from ppo.experience import PromptBatch

    trainer = build_trainer(
        *make_arguments(
            ppo_assets, tmp_path / "out", rl_algorithm="grpo", num_return_sequences=2, kl_coeff=0.0,
            normalize_advantage_std=False, ptx_datasets=None,
        )
    )  # fmt: skip
    trainer.actor_trainer.create_optimizer_and_scheduler(num_training_steps=1)
    trainer.offload = trainer._build_offload_manager()
    experience = trainer.make_experience(PromptBatch.from_collated(next(trainer.prompt_batches)))
    prompts = experience.prompt_input_ids.numpy()
    assert all((prompts[i] == prompts[i + 1]).all() for i in range(0, len(prompts), 2))
    scores = experience.reward_scores.numpy()
    mask = experience.action_mask.numpy()
    for row in range(len(scores)):
        group = scores[row - row % 2 : row - row % 2 + 2]
        expected = np.float32(scores[row] - group.mean())
        np.testing.assert_allclose(experience.advantages.numpy()[row][mask[row]], expected, atol=1e-5)


def test_grpo_resume_continues_exactly(ppo_assets, tmp_path):
    settings = dict(
        rl_algorithm="grpo", num_return_sequences=2, per_device_prompt_batch_size=2, max_steps=4, update_iters=2,
        save_strategy="steps", save_steps=1, kl_loss_coeff=0.05,
    )  # fmt: skip
    full_dir = tmp_path / "full"
    run(ppo_assets, full_dir, **settings)
    assert not (full_dir / "checkpoint-2" / "value").exists()
    assert_resumes_exactly(ppo_assets, tmp_path, full_dir, (1, 2), settings)  # inside a rollout, and between two


def test_reward_function_without_a_reward_model(ppo_assets, tmp_path):
    rules = tmp_path / "rules.py"
    rules.write_text(RULES)
    output = tmp_path / "out"
    trainer = run(
        ppo_assets, output, model_overrides=dict(reward_model_name_or_path=None),
        rl_algorithm="rloo", reward_functions=[f"{rules}:length_reward"], reward_model_weight=0.0, **GROUP,
    )  # fmt: skip
    assert trainer.reward_model is None and trainer.critic_model is None
    records = [r for r in read_metrics(output) if "train/actor_loss" in r]
    for record in records:
        # The only reward is the function's: its logged mean is the rollout's mean reward.
        assert record["train/reward_fn/length_reward"] == pytest.approx(record["train/reward"], abs=1e-5)
        assert record["train/reward"] > 0


def test_reward_function_is_added_to_the_reward_model_with_weights(ppo_assets, tmp_path):
    from ppo.experience import PromptBatch

    rules = tmp_path / "rules.py"
    rules.write_text(RULES)
    trainer = build_trainer(
        *make_arguments(
            ppo_assets, tmp_path / "out", reward_functions=[f"{rules}:length_reward"], reward_function_weights=[3.0],
            reward_model_weight=0.5, ptx_datasets=None,
        )
    )  # fmt: skip
    trainer.offload = None
    batch = PromptBatch.from_collated(next(trainer.prompt_batches))
    rollout = trainer.generate(batch, 1)
    breakdown = {}
    total = trainer.reward_scores(rollout.sequences, rollout.attention_mask, rollout.prompt_length, breakdown)
    model = trainer.reward_scorer.model_scorer(rollout.sequences, rollout.attention_mask, rollout.prompt_length)
    expected = 0.5 * model.numpy() + 3.0 * np.asarray(breakdown["length_reward"], dtype=np.float32)
    np.testing.assert_allclose(total.numpy(), expected, rtol=1e-5, atol=1e-5)


def test_a_reward_function_returning_nan_everywhere_leaves_every_response_out(ppo_assets, tmp_path):
    rules = tmp_path / "nan_rules.py"
    rules.write_text(RULES)
    trainer = run(
        ppo_assets, tmp_path / "out", model_overrides=dict(reward_model_name_or_path=None),
        rl_algorithm="grpo", reward_functions=[f"{rules}:not_a_number"], reward_model_weight=0.0, **GROUP,
    )  # fmt: skip
    rows = [row for row in read_metrics(tmp_path / "out") if "train/reward" in row]
    responses = trainer.args.per_device_prompt_batch_size * GROUP["num_return_sequences"]
    assert [row["train/nonfinite_rewards"] for row in rows] == [responses] * len(rows)
    assert all(np.isfinite(parameter.numpy()).all() for parameter in trainer.actor_model.parameters())


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(rl_algorithm="reinforce_plue_plus"), "valid choices are 'ppo', 'ppo_lag', 'grpo', 'rloo', 'reinforce_plus_plus'"),
        (dict(rl_algorithm="grpo"), "needs num_return_sequences >= 2"),
        (dict(rl_algorithm="rloo", num_return_sequences=1), "needs num_return_sequences >= 2"),
        (dict(kl_loss_coeff=-1.0), "kl_loss_coeff must be >= 0"),
        (dict(clip_range_ratio_high=0.0), "clip_range_ratio_high must be > 0"),
        (dict(reward_functions=["ppo.demo.task"]), "must read 'module:function'"),
        (dict(reward_functions=["ppo.demo.task:no_such"]), "has no callable 'no_such'"),
        (dict(reward_functions=["no_such_module_xyz:f"]), "failed to import"),
        (dict(reward_functions=["ppo.demo.task:judge_reward"], reward_function_weights=[1.0, 2.0]), "one weight per"),
        (dict(reward_model_weight=0.0), "nothing would score"),
    ],
)
def test_bad_algorithm_arguments_are_explained(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        PPOTrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, **overrides)


def test_asymmetric_clip_defaults_and_loss():
    import paddle

    from ppo.models.ppo_model_utils import actor_clipped_loss, clip_fraction

    args = PPOTrainingArguments(output_dir="unused", clip_range_ratio=0.3)
    assert (args.clip_range_ratio_low, args.clip_range_ratio_high) == (0.3, 0.3)
    old = paddle.zeros([1, 4])
    new = paddle.log(paddle.to_tensor([[0.5, 0.9, 1.1, 1.5]]))
    advantages = paddle.to_tensor([[-1.0, -1.0, 1.0, 1.0]])
    mask = paddle.ones([1, 4], dtype="bool")
    # ε_low = 0.2, ε_high = 0.28 (DAPO's clip-higher): ratio 0.5 -> max(0.5, 0.8) = 0.8, 1.5 -> min(1.5, 1.28).
    loss = actor_clipped_loss(new, old, advantages, mask, 0.2, clip_range_ratio_high=0.28)
    expected = np.mean([0.8, 0.9, -1.1, -1.28])
    assert float(loss) == pytest.approx(expected, abs=1e-5)
    assert float(clip_fraction(new, old, mask, 0.2, 0.28)) == pytest.approx(0.5)
    symmetric = actor_clipped_loss(new, old, advantages, mask, 0.2)
    assert float(symmetric) == pytest.approx(np.mean([0.8, 0.9, -1.1, -1.2]), abs=1e-5)


def test_quickstart_passes_the_algorithm_and_reward_to_the_ppo_stage_only(tmp_path):
    from ppo.demo.quickstart import Layout, build_stages

    default = {stage.name: stage.command for stage in build_stages(Layout(str(tmp_path)), seed=0, fast=True)}
    grpo = {
        stage.name: stage.command
        for stage in build_stages(Layout(str(tmp_path)), seed=0, fast=True, algorithm="grpo", reward="judge")
    }
    assert not any("--rl_algorithm" in part or "--reward_functions" in part for part in default["ppo"])
    flags = grpo["ppo"]
    pairs = dict(zip(flags, flags[1:]))
    assert pairs["--rl_algorithm"] == "grpo" and pairs["--num_return_sequences"] == "4"
    assert pairs["--reward_functions"] == "ppo.demo.task:judge_reward" and pairs["--reward_model_weight"] == "0"
    assert {name: command for name, command in grpo.items() if name != "ppo"} == {
        name: command for name, command in default.items() if name != "ppo"
    }


def test_demo_judge_is_a_reward_function():
    from ppo.demo.task import judge, judge_reward
    from ppo.rewards import load_reward_functions, score_responses

    (function,) = load_reward_functions(["ppo.demo.task:judge_reward"])
    prompt = "i have a red kite. what colour is my kite?"
    responses = ["sure, your kite is red. hope this helps.", "your kite is blue."]
    scores = score_responses([function], [prompt] * 2, responses, [{"input": prompt}] * 2)
    assert scores == {"judge_reward": [judge(prompt, r) for r in responses]} == {"judge_reward": [1.0, 0.0]}
    assert judge_reward(prompt, responses[0], {}) == 1.0


def test_quickstart_group_algorithms_sample_groups_and_rloo_whitens():
    from ppo.demo.quickstart import ppo_stage_overrides

    grpo, rloo = ppo_stage_overrides("grpo", "judge"), ppo_stage_overrides("rloo", "judge")
    for overrides in (grpo, rloo):
        assert overrides["num_return_sequences"] == "4" and overrides["reward_model_weight"] == "0"
    assert grpo["whiten_advantages"] == "false"  # already in units of the group's std
    assert rloo["whiten_advantages"] == "true"  # reward units otherwise
    assert grpo["max_steps"] == rloo["max_steps"] == "144"  # no critic: cheaper steps, more of them
    assert ppo_stage_overrides() == {}
