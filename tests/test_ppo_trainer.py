"""End-to-end behaviour of the PPO stage on tiny models: a full run, exact resume, ptx gradient,
NaN handling, offload schedule, reward re-tokenisation and bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import paddle
import pytest

from ppo.arguments import PPODataArguments, PPOModelArguments, PPOTrainingArguments
from ppo.run_ppo import build_trainer

PROMPTS = [
    "what is your favourite colour",
    "tell me about the dog",
    "how do i find the red bird",
    "please explain the tree",
    "can you help me with water",
    "why is the fish blue",
    "give me one good answer",
    "where does the cat live",
]

REQUIRED_METRICS = (
    "train/actor_loss",
    "train/reward_critic_loss",
    "train/ptx_loss",
    "train/reward",
    "train/kl_divergence",
    "train/mean_generated_length",
    "train/max_generated_length",
    "train/actor_lr",
    "train/critic_lr",
    "train/approx_kl",
    "train/clipfrac",
    "train/entropy",
    "train/explained_variance",
)


def _write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


@pytest.fixture(scope="module")
def ppo_assets(tmp_path_factory, tiny_llama_dir):
    """A tiny SFT model (the random tiny Llama), a reward model initialised from it, prompt
    data in the PKU-SafeRLHF schema and supervised data in the alpaca schema."""
    from paddlenlp.transformers import AutoTokenizer

    from ppo.models import AutoModelForScore

    root = tmp_path_factory.mktemp("ppo_assets")
    paddle.seed(7)
    reward_model = AutoModelForScore.from_pretrained(tiny_llama_dir, score_type="reward")
    reward_dir = str(root / "reward")
    reward_model.save_pretrained(reward_dir)
    AutoTokenizer.from_pretrained(tiny_llama_dir).save_pretrained(reward_dir)
    prompts = str(root / "prompts.jsonl")
    _write_jsonl(
        prompts,
        [
            {
                "prompt": prompt,
                "response_0": "yes",
                "response_1": "no",
                "is_response_0_safe": True,
                "is_response_1_safe": True,
                "better_response_id": 0,
                "safer_response_id": 0,
            }
            for prompt in PROMPTS
        ],
    )
    supervised = str(root / "alpaca.jsonl")
    _write_jsonl(
        supervised,
        [{"instruction": prompt, "input": "", "output": "thank you, that is a good question"} for prompt in PROMPTS],
    )
    return {"actor": tiny_llama_dir, "reward": reward_dir, "prompts": prompts, "ptx": supervised}


def make_arguments(assets, output_dir, **overrides):
    data = dict(
        train_datasets=f"PKU-SafeRLHF/train:1:{assets['prompts']}",
        eval_datasets=f"PKU-SafeRLHF/test:1:{assets['prompts']}",
        ptx_datasets=f"alpaca:1:{assets['ptx']}",
        max_length=40,
    )
    training = dict(
        output_dir=str(output_dir),
        max_steps=4,
        per_device_prompt_batch_size=4,
        per_device_train_batch_size=2,
        per_device_eval_batch_size=4,
        learning_rate=1e-3,
        critic_learning_rate=1e-3,
        critic_warmup_ratio=0.0,
        logging_steps=1,
        save_strategy="no",
        evaluation_strategy="no",
        report_to=["none"],
        seed=3,
        top_p=1.0,
        ptx_coeff=0.5,
        disable_tqdm=True,
    )
    for key, value in overrides.items():
        (data if key in data else training)[key] = value
    return (
        PPOModelArguments(
            actor_model_name_or_path=assets["actor"], reward_model_name_or_path=assets["reward"],
            cost_model_name_or_path=assets.get("cost"),
        ),  # fmt: skip
        PPODataArguments(**data),
        PPOTrainingArguments(**training),
    )


def read_metrics(output_dir):
    with open(os.path.join(output_dir, "ppo_metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def run(assets, output_dir, resume=None, **overrides):
    trainer = build_trainer(*make_arguments(assets, output_dir, **overrides))
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def test_full_run_produces_metrics_checkpoints_and_loadable_models(ppo_assets, tmp_path):
    from paddlenlp.transformers import AutoModelForCausalLM

    from ppo.models import AutoModelForScore

    output = tmp_path / "run"
    trainer = run(
        ppo_assets, output, evaluation_strategy="steps", eval_steps=2, num_eval_samples_to_save=3
    )
    records = read_metrics(output)
    train_records = [r for r in records if "train/actor_loss" in r]
    assert [r["step"] for r in train_records] == [1, 2, 3, 4]
    for record in train_records:
        missing = [name for name in REQUIRED_METRICS if name not in record]
        assert not missing, f"metrics missing at step {record['step']}: {missing}"
        assert all(np.isfinite(v) for k, v in record.items() if k != "step")
    # Actor == reference before the first update: the first rollout's KL is 0 up to float32
    # rounding (the old log-probs come from the rollout engine, the reference's from a forward).
    assert abs(train_records[0]["train/kl_divergence"]) < 1e-5
    # ... and the updates move the actor away from the reference.
    assert abs(train_records[-1]["train/kl_divergence"]) > 1e-3
    eval_records = [r for r in records if "eval/reward" in r]
    assert [r["step"] for r in eval_records] == [2, 4]
    with open(output / "eval_samples" / "step-4.jsonl", encoding="utf-8") as f:
        samples = [json.loads(line) for line in f]
    assert len(samples) == 3 and {"prompt", "response", "reward"} <= set(samples[0])
    assert (output / "training_curves.png").stat().st_size > 0

    policy = AutoModelForCausalLM.from_pretrained(str(output / "policy"))
    value = AutoModelForScore.from_pretrained(str(output / "value"))
    input_ids = paddle.to_tensor([[1, 20, 21, 22, 2]])
    policy.eval(), trainer.actor_model.eval()
    np.testing.assert_allclose(policy(input_ids)[0].numpy(), trainer.actor_model(input_ids)[0].numpy(), atol=1e-5)
    assert value.config.score_type == "critic"


def test_resume_continues_exactly_like_an_uninterrupted_run(ppo_assets, tmp_path):
    # 2 micro-batches per rollout and update_iters=2: 4 optimizer steps per rollout, so
    # checkpoint-3 is taken in the middle of a rollout and checkpoint-4 between rollouts.
    settings = dict(max_steps=6, update_iters=2, save_strategy="steps", save_steps=1, logging_steps=1)
    full_dir = tmp_path / "full"
    run(ppo_assets, full_dir, **settings)
    assert_resumes_exactly(ppo_assets, tmp_path, full_dir, (3, 4), settings)


def assert_resumes_exactly(assets, tmp_path, full_dir, resume_steps, settings):
    """Resuming from each of `resume_steps`' checkpoints of the uninterrupted run in `full_dir`
    logs exactly that run's metrics from there on."""
    full = {r["step"]: r for r in read_metrics(full_dir)}
    for resume_step in resume_steps:
        resumed_dir = tmp_path / f"resumed{resume_step}"
        resumed_dir.mkdir()
        # Start from a copy of the uninterrupted run's checkpoint, as a crashed run would.
        subprocess.run(["cp", "-r", str(full_dir / f"checkpoint-{resume_step}"), str(resumed_dir)], check=True)
        run(assets, resumed_dir, resume=str(resumed_dir / f"checkpoint-{resume_step}"), **settings)
        resumed = {r["step"]: r for r in read_metrics(resumed_dir)}
        assert sorted(resumed) == list(range(resume_step + 1, settings["max_steps"] + 1))
        for step, record in resumed.items():
            for name, value in record.items():
                assert value == pytest.approx(full[step][name], rel=1e-5, abs=1e-6), (step, name)


def test_resume_from_missing_path_is_a_clear_error(ppo_assets, tmp_path):
    with pytest.raises(FileNotFoundError, match="not a complete PPO checkpoint"):
        run(ppo_assets, tmp_path / "out", resume=str(tmp_path / "nowhere"))


def test_ptx_adds_its_gradient_without_rescaling_the_ppo_gradient(ppo_assets, tmp_path):
    from ppo.experience import PromptBatch
    from ppo.trainer_utils import StepStats

    trainer = build_trainer(*make_arguments(ppo_assets, tmp_path / "out", ptx_coeff=2.0))
    trainer.actor_trainer.create_optimizer_and_scheduler(num_training_steps=1)
    trainer.critic_trainer.create_optimizer_and_scheduler(num_training_steps=1)
    trainer.offload = trainer._build_offload_manager()
    experience = trainer.make_experience(PromptBatch.from_collated(next(trainer.prompt_batches)))
    micro_batch = experience.split(2)[0]
    ptx_batch = next(trainer.ptx_batches)
    actor = trainer.actor_model

    def gradients(ptx, coeff):
        trainer.args.ptx_coeff = coeff
        actor.clear_gradients()
        trainer.actor_trainer.training_step(actor, {"experience": micro_batch, "stats": StepStats(), "ptx_batch": ptx})
        return [p.grad.numpy().copy() for p in actor.parameters() if p.grad is not None]

    ppo_only = gradients(None, 2.0)
    combined = gradients(ptx_batch, 2.0)
    ptx_unit = gradients(ptx_batch, 1.0)
    for ppo, both, one in zip(ppo_only, combined, ptx_unit):
        ptx_grad = one - ppo  # gradient of the ptx loss alone (coefficient 1)
        np.testing.assert_allclose(both, ppo + 2.0 * ptx_grad, rtol=1e-4, atol=1e-6)


def test_nonfinite_loss_skips_updates_then_stops_clearly(ppo_assets, tmp_path):
    trainer = build_trainer(*make_arguments(ppo_assets, tmp_path / "out", max_consecutive_nonfinite_steps=2))
    # A broken critic (NaN weights) makes values, advantages and both losses NaN.
    head = trainer.critic_model.score_head.weight
    head.set_value(paddle.full(head.shape, float("nan"), dtype=head.dtype))
    actor_before = [p.numpy().copy() for p in trainer.actor_model.parameters()]
    with pytest.raises(RuntimeError, match="consecutive updates had a NaN/inf loss"):
        trainer.train()
    for before, after in zip(actor_before, trainer.actor_model.parameters()):
        np.testing.assert_array_equal(before, after.numpy())
    assert trainer.state.global_step == 0


def test_offload_schedule_moves_each_object_only_when_needed(ppo_assets, tmp_path):
    trainer = run(ppo_assets, tmp_path / "out", max_steps=2, offload_level="freeze_model optimizer train_model")
    events = trainer.offload.events
    # Frozen models live on the device only while scoring.
    for name in ("reference_model", "reward_model"):
        moves = [(phase, action) for phase, action, n in events if n == name]
        assert moves[0] == ("rollout", "offload")
        assert all(phase == "score" for phase, action in moves if action == "reload")
    # Optimizer states come back for training only.
    optimizer_moves = [(phase, action) for phase, action, n in events if n == "actor_optimizer"]
    assert all(phase in ("train", "save") for phase, action in optimizer_moves if action == "reload")
    # Never moved twice in a row the same way (nothing reloaded twice, nothing offloaded twice).
    for name in {n for _, _, n in events}:
        actions = [action for _, action, n in events if n == name]
        assert all(a != b for a, b in zip(actions, actions[1:])), (name, actions)


def test_bad_offload_level_and_batch_sizes_are_rejected(ppo_assets, tmp_path):
    with pytest.raises(ValueError, match="offload_level has unknown entries"):
        make_arguments(ppo_assets, tmp_path, offload_level="freeze_model gpu")
    with pytest.raises(ValueError, match="must be divisible by per_device_train_batch_size"):
        make_arguments(ppo_assets, tmp_path, per_device_prompt_batch_size=3, per_device_train_batch_size=2)
    with pytest.raises(ValueError, match="eval_mode must be one of"):
        make_arguments(ppo_assets, tmp_path, eval_mode="pipeline")


def test_reward_model_must_be_a_score_model(ppo_assets, tmp_path):
    model_args, data_args, training_args = make_arguments(ppo_assets, tmp_path)
    model_args.reward_model_name_or_path = ppo_assets["actor"]  # a causal LM, not a score model
    with pytest.raises(ValueError, match="is not a score model"):
        build_trainer(model_args, data_args, training_args)


def test_reward_retokenised_when_reward_tokenizer_differs(ppo_assets, tmp_path, tiny_llama_dir):
    from paddlenlp.transformers import AutoTokenizer

    from ppo.models import AutoModelForScore
    from ppo.tiny import build_tokenizer, save_tiny_causal_lm

    other_tokenizer_dir = str(tmp_path / "other_tokenizer")
    build_tokenizer(other_tokenizer_dir, vocab_size=400)
    base = str(tmp_path / "other_base")
    save_tiny_causal_lm(base, vocab_size=400, tokenizer_dir=other_tokenizer_dir, seed=5)
    other_reward = str(tmp_path / "other_reward")
    AutoModelForScore.from_pretrained(base, score_type="reward").save_pretrained(other_reward)
    AutoTokenizer.from_pretrained(other_tokenizer_dir).save_pretrained(other_reward)

    model_args, data_args, training_args = make_arguments(ppo_assets, tmp_path / "out")
    model_args.reward_model_name_or_path = other_reward
    model_args.reward_critic_model_name_or_path = ppo_assets["reward"]
    trainer = build_trainer(model_args, data_args, training_args)
    assert trainer.reward_scorer.model_scorer.score_tokenizer is not None

    actor_tokenizer = trainer.tokenizer
    text = "BEGINNING OF CONVERSATION: USER: hello ASSISTANT: thank you"
    ids = actor_tokenizer(text)["input_ids"] + [actor_tokenizer.eos_token_id]
    scores = trainer.reward_scores(paddle.to_tensor([ids]), paddle.ones([1, len(ids)], dtype="bool"))
    reward_tokenizer = AutoTokenizer.from_pretrained(other_reward)
    expected_ids = reward_tokenizer(text)["input_ids"] + [reward_tokenizer.eos_token_id]
    expected = trainer.reward_model(
        paddle.to_tensor([expected_ids]), attention_mask=paddle.ones([1, len(expected_ids)], dtype="int64")
    ).end_scores[:, 0]
    np.testing.assert_allclose(scores.numpy(), expected.numpy(), rtol=1e-5)


def test_cli_runs_from_repo_root_with_distributed_launch(ppo_assets, tmp_path, repo_root):
    model_args, data_args, _ = make_arguments(ppo_assets, tmp_path)
    config = {
        "actor_model_name_or_path": model_args.actor_model_name_or_path,
        "reward_model_name_or_path": model_args.reward_model_name_or_path,
        "train_datasets": data_args.train_datasets,
        "max_length": 40,
        "output_dir": str(tmp_path / "cli"),
        "max_steps": 2,
        "per_device_prompt_batch_size": 4,
        "per_device_train_batch_size": 4,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": ["none"],
    }
    config_path = tmp_path / "ppo_argument.json"
    config_path.write_text(json.dumps(config))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "-m", "paddle.distributed.launch", "--log_dir", str(tmp_path / "logs"),
         "ppo/run_ppo.py", str(config_path)],
        cwd=repo_root, env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert json.loads((tmp_path / "cli" / "all_results.json").read_text())["global_step"] == 2
    assert (tmp_path / "cli" / "policy" / "config.json").exists()
