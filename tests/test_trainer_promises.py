"""TrainingArguments keys that the RL trainer must honour as PaddleNLP does (or refuse), and the
trainer's handling of NaN/inf rewards; on the tiny models of `tests/test_ppo_trainer.py`."""

from __future__ import annotations

import json
import os

import numpy as np
import paddle
import pytest

from ppo.experience import PromptBatch
from ppo.run_ppo import build_trainer
from tests.test_ppo_trainer import make_arguments, ppo_assets, read_metrics, run  # noqa: F401 (fixture)


def prepared(assets, output_dir, **overrides):
    """A trainer with optimizers and wrapped models, as `train` sets them up, and its wrapped models."""
    trainer = build_trainer(*make_arguments(assets, output_dir, **overrides))
    for role_trainer in trainer.trainers.values():
        role_trainer.create_optimizer_and_scheduler(num_training_steps=trainer.max_steps)
    wrapped = {role: trainer._wrap_for_training(role, role_trainer) for role, role_trainer in trainer.trainers.items()}
    trainer.offload = trainer._build_offload_manager()
    return trainer, wrapped


def gradients_at_step(trainer, wrapped, micro_batches):
    """The actor's and critic's gradients as the optimizers see them in `step()` of one update."""
    seen = {}
    for role, role_trainer in trainer.trainers.items():
        optimizer = role_trainer.optimizer
        step = optimizer.step

        def recording_step(*args, _role=role, _model=role_trainer.model, _step=step, **kwargs):
            seen[_role] = [p.grad.numpy().copy() for p in _model.parameters() if p.grad is not None]
            return _step(*args, **kwargs)

        optimizer.step = recording_step
    assert trainer._update(micro_batches, wrapped)
    return seen


def assert_same_gradients(first, second, rtol=2e-4, atol=1e-7):
    assert sorted(first) == sorted(second)
    for role in first:
        assert len(first[role]) == len(second[role]) > 0
        for a, b in zip(first[role], second[role]):
            np.testing.assert_allclose(a, b, rtol=rtol, atol=atol)


def rollout(trainer):
    return trainer.make_experience(PromptBatch.from_collated(next(trainer.prompt_batches)))


# ---------------------------------------------------------------- enable_delay_scale_loss


def test_delay_scale_loss_gives_the_same_gradients_as_dividing_the_loss(ppo_assets, tmp_path):
    settings = dict(gradient_accumulation_steps=2, ptx_coeff=0.0, max_grad_norm=0.0)
    plain, plain_wrapped = prepared(ppo_assets, tmp_path / "plain", **settings)
    delayed, delayed_wrapped = prepared(ppo_assets, tmp_path / "delayed", **settings)
    # What PaddleNLP decides from tensor/pipeline_parallel_config "enable_delay_scale_loss" (only
    # readable with several processes): training_step then leaves the loss undivided.
    for role_trainer in delayed.trainers.values():
        role_trainer._enable_delay_scale_loss = lambda: True
    experience = rollout(plain)
    micro_batches = experience.split(2)
    assert len(micro_batches) == 2
    assert_same_gradients(
        gradients_at_step(plain, plain_wrapped, micro_batches),
        gradients_at_step(delayed, delayed_wrapped, micro_batches),
    )


# ---------------------------------------------------------------- critic warmup


def test_critic_warmup_ratio_is_not_overridden_by_the_actors_warmup_steps(ppo_assets, tmp_path):
    trainer, _ = prepared(
        ppo_assets, tmp_path / "out", warmup_steps=4, lr_scheduler_type="constant_with_warmup",
        critic_lr_scheduler_type="constant_with_warmup", critic_warmup_ratio=0.0, learning_rate=1e-3,
        critic_learning_rate=5e-4,
    )  # fmt: skip
    assert trainer.actor_trainer.lr_scheduler.get_lr() == 0.0  # 4 warmup steps for the actor
    assert trainer.critic_trainer.lr_scheduler.get_lr() == pytest.approx(5e-4)  # no warmup for the critic


# ---------------------------------------------------------------- "epoch" strategies


def test_epoch_strategies_evaluate_and_save_after_each_pass_over_the_prompts(ppo_assets, tmp_path):
    # 8 prompts, 4 per rollout: 2 rollouts per epoch, each 4 responses / 2 per micro-batch = 2 steps.
    output = tmp_path / "out"
    trainer = run(ppo_assets, output, max_steps=8, evaluation_strategy="epoch", save_strategy="epoch", save_total_limit=None)
    assert trainer.steps_per_epoch == 4
    eval_steps = [row["step"] for row in read_metrics(output) if "eval/reward" in row]
    assert eval_steps == [4, 8]
    assert sorted(name for name in os.listdir(output) if name.startswith("checkpoint-")) == ["checkpoint-4", "checkpoint-8"]


# ---------------------------------------------------------------- evaluation randomness


def test_evaluation_does_not_change_the_training_run(ppo_assets, tmp_path):
    without = run(ppo_assets, tmp_path / "without", max_steps=4)
    with_eval = run(ppo_assets, tmp_path / "with", max_steps=4, evaluation_strategy="steps", eval_steps=1)
    train_rows = lambda output: [{k: v for k, v in row.items() if not k.startswith("eval/")} for row in read_metrics(output) if "train/reward" in row]  # noqa: E731
    assert train_rows(tmp_path / "with") == train_rows(tmp_path / "without")
    evaluations = [row["eval/reward"] for row in read_metrics(tmp_path / "with") if "eval/reward" in row]
    assert len(evaluations) == 4
    del without, with_eval


# ---------------------------------------------------------------- global token mean


def test_global_token_mean_weighs_every_token_of_the_step_the_same(ppo_assets, tmp_path):
    settings = dict(ptx_coeff=0.0, max_grad_norm=0.0, per_device_prompt_batch_size=4, per_device_train_batch_size=2)
    accumulated, accumulated_wrapped = prepared(
        ppo_assets, tmp_path / "global", loss_reduction="global-token-mean", gradient_accumulation_steps=2, **settings
    )
    per_micro_batch, per_micro_batch_wrapped = prepared(
        ppo_assets, tmp_path / "token", loss_reduction="token-mean", gradient_accumulation_steps=2, **settings
    )
    whole, whole_wrapped = prepared(
        ppo_assets, tmp_path / "whole", loss_reduction="token-mean", **{**settings, "per_device_train_batch_size": 4}
    )
    experience = rollout(accumulated)
    halves = experience.split(2)
    tokens = [int(half.action_mask.astype("int64").sum()) for half in halves]
    assert tokens[0] != tokens[1], "the check needs micro-batches with different token counts"
    reference = gradients_at_step(whole, whole_wrapped, [experience])  # token mean over the whole step
    assert_same_gradients(gradients_at_step(accumulated, accumulated_wrapped, halves), reference)
    # The per-micro-batch token mean weighs the tokens of the shorter micro-batch more.
    token_mean = gradients_at_step(per_micro_batch, per_micro_batch_wrapped, halves)
    with pytest.raises(AssertionError):
        assert_same_gradients(token_mean, reference)


def test_global_token_mean_is_refused_under_pipeline_parallel(ppo_assets, tmp_path):
    from types import SimpleNamespace

    from ppo.arguments import check_pipeline_loss_reduction

    # One process cannot hold pipeline_parallel_degree 2 (PaddleNLP resets it), so the check is called directly.
    check_pipeline_loss_reduction(SimpleNamespace(pipeline_parallel_degree=2, loss_reduction="token-mean"))
    with pytest.raises(ValueError, match="global-token-mean.*pipeline parallel"):
        check_pipeline_loss_reduction(SimpleNamespace(pipeline_parallel_degree=2, loss_reduction="global-token-mean"))
    with pytest.raises(ValueError, match="loss_reduction must be one of"):
        make_arguments(ppo_assets, tmp_path, loss_reduction="global-mean")


# ---------------------------------------------------------------- resume state of fp16 and tensor parallel


class RecordingScaler:
    """Stands in for paddle.amp.GradScaler, which is disabled on CPU (its state_dict is empty there)."""

    def __init__(self, scale):
        self.scale = scale

    def state_dict(self):
        return {"scale": np.array([self.scale], dtype="float32"), "incr_count": 3}

    def load_state_dict(self, state):
        self.scale = float(np.asarray(state["scale"])[0])


def test_checkpoints_carry_the_loss_scale_and_the_model_parallel_rng_streams(ppo_assets, tmp_path):
    from ppo.rl_trainer import model_parallel_rng_tracker

    output = tmp_path / "out"
    trainer, _ = prepared(ppo_assets, output)
    for role_trainer in trainer.trainers.values():
        role_trainer.do_grad_scaling, role_trainer.scaler = True, RecordingScaler(2.0**15)
    tracker = model_parallel_rng_tracker()
    tracker.reset()
    tracker.add("model_parallel_rng", 1234)
    os.makedirs(output, exist_ok=True)
    path = trainer.save_checkpoint(None)
    with tracker.rng_state("model_parallel_rng"):
        after_save = paddle.rand([4]).numpy()

    resumed, _ = prepared(ppo_assets, tmp_path / "resumed")
    for role_trainer in resumed.trainers.values():
        role_trainer.do_grad_scaling, role_trainer.scaler = True, RecordingScaler(1.0)
    tracker.reset()
    tracker.add("model_parallel_rng", 999)
    resumed.load_checkpoint(path)
    with tracker.rng_state("model_parallel_rng"):
        np.testing.assert_array_equal(paddle.rand([4]).numpy(), after_save)
    assert [t.scaler.scale for t in resumed.trainers.values()] == [2.0**15, 2.0**15]
    tracker.reset()


# ---------------------------------------------------------------- NaN / inf rewards


def test_nonfinite_rewards_are_masked_out_with_their_group_mean():
    from ppo.reward_scoring import exclude_nonfinite_rewards

    scores = paddle.to_tensor([1.0, float("nan"), 3.0, 5.0, float("inf"), float("nan")])
    mask = paddle.ones([6, 5], dtype="bool")
    replaced, kept, count = exclude_nonfinite_rewards(scores, mask, prompt_length=2, group_size=3)
    assert count == 3
    np.testing.assert_allclose(replaced.numpy(), [1.0, 2.0, 3.0, 5.0, 5.0, 5.0])
    expected = np.ones([6, 5], dtype=bool)
    expected[[1, 4, 5], 2:] = False  # the prompt columns stay
    np.testing.assert_array_equal(kept.numpy(), expected)
    same, same_mask, none = exclude_nonfinite_rewards(paddle.to_tensor([1.0, 2.0]), paddle.ones([2, 3], dtype="bool"), 1)
    assert none == 0 and same_mask.numpy().all()


NAN_RULES = '''
import math

def nan_for_odd_lengths(prompt, response, sample):
    return float("nan") if len(response.split()) % 2 else 1.0
'''


def test_nonfinite_rewards_are_left_out_counted_and_the_run_goes_on(ppo_assets, tmp_path):
    rules = tmp_path / "nan_rules.py"
    rules.write_text(NAN_RULES)
    output = tmp_path / "out"
    trainer = run(ppo_assets, output, reward_functions=[f"{rules}:nan_for_odd_lengths"], max_steps=4)
    rows = [row for row in read_metrics(output) if "train/reward" in row]
    assert len(rows) == 4
    assert sum(row["train/nonfinite_rewards"] for row in rows) > 0
    for row in rows:
        assert all(np.isfinite(value) for value in row.values()), row
    for parameter in trainer.actor_model.parameters():
        assert np.isfinite(parameter.numpy()).all()
    assert json.dumps(rows)  # plain numbers only


# ---------------------------------------------------------------- re-tokenising for another score model


@pytest.fixture(scope="module")
def two_tokenizers(tmp_path_factory):
    from paddlenlp.transformers import AutoTokenizer

    from ppo.tiny import build_tokenizer

    root = tmp_path_factory.mktemp("tokenizers")
    build_tokenizer(str(root / "actor"), vocab_size=512)
    build_tokenizer(str(root / "score"), vocab_size=400)
    return AutoTokenizer.from_pretrained(str(root / "actor")), AutoTokenizer.from_pretrained(str(root / "score"))


def test_plain_text_retokenising_keeps_turn_ends_and_adds_no_second_eos(two_tokenizers):
    from ppo.reward_scoring import SequenceScorer

    actor, score = two_tokenizers
    scorer = SequenceScorer(None, actor, score, stop_token_ids=(actor.eos_token_id,))
    first, second = "BEGINNING OF CONVERSATION: USER: hello ASSISTANT: thank you", "USER: and the dog ASSISTANT: a good dog"
    encode = lambda tokenizer, text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    ids = [actor.bos_token_id] + encode(actor, first) + [actor.eos_token_id] + encode(actor, second) + [actor.eos_token_id]
    rows, mask = scorer.retokenize(paddle.to_tensor([ids]), paddle.ones([1, len(ids)], dtype="bool"))
    expected = [score.bos_token_id] + encode(score, first) + [score.eos_token_id] + encode(score, second) + [score.eos_token_id]
    assert rows.numpy().tolist() == [expected]
    assert mask.numpy().all()
    # A response cut at the length limit gets no EOS.
    cut = ids[:-3]
    rows, _ = scorer.retokenize(paddle.to_tensor([cut]), paddle.ones([1, len(cut)], dtype="bool"))
    assert rows.numpy().tolist()[0].count(score.eos_token_id) == 1


def test_retokenised_sequences_longer_than_the_score_model_keep_their_end(two_tokenizers, caplog):
    from ppo.reward_scoring import SequenceScorer

    actor, score = two_tokenizers
    scorer = SequenceScorer(None, actor, score, stop_token_ids=(actor.eos_token_id,))
    scorer.max_length = 6
    text = "USER: tell me about the red bird and the blue fish ASSISTANT: the bird is red"
    ids = actor(text)["input_ids"] + [actor.eos_token_id]
    rows, mask = scorer.retokenize(paddle.to_tensor([ids, ids]), paddle.ones([2, len(ids)], dtype="bool"))
    full = [score.bos_token_id] + score(text, add_special_tokens=False)["input_ids"] + [score.eos_token_id]
    assert rows.shape == [2, 6] and rows.numpy().tolist()[0] == full[-6:]
    assert scorer.truncated == 2


# ---------------------------------------------------------------- preemption and preflight


def test_sigterm_checkpoints_the_step_and_exits_with_the_resume_hint(ppo_assets, tmp_path, caplog):
    import signal

    output = tmp_path / "out"
    trainer = build_trainer(*make_arguments(ppo_assets, output, max_steps=4))
    step = trainer._after_step

    def signal_after_step_two(work, progress):
        step(work, progress)
        if trainer.state.global_step == 2:
            signal.raise_signal(signal.SIGTERM)

    trainer._after_step = signal_after_step_two
    with pytest.raises(SystemExit) as stopped:
        trainer.train()
    assert stopped.value.code == 128 + signal.SIGTERM
    assert sorted(name for name in os.listdir(output) if name.startswith("checkpoint-")) == ["checkpoint-2"]
    assert not os.path.exists(output / "policy")  # no final model from an unfinished run
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored
    resumed = run(ppo_assets, output, resume=True, max_steps=4)
    uninterrupted = run(ppo_assets, tmp_path / "reference", max_steps=4)
    assert resumed.state.global_step == 4
    assert read_metrics(output) == read_metrics(tmp_path / "reference")
    del uninterrupted


def test_unwritable_output_dir_is_refused_before_models_load(ppo_assets, tmp_path, monkeypatch):
    from ppo import run_ppo
    from ppo.preflight import OutputDirError

    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the output directory should be")
    loaded = []
    monkeypatch.setattr(run_ppo, "build_models", lambda *a, **k: loaded.append(1))
    with pytest.raises(OutputDirError, match="cannot be created"):
        build_trainer(*make_arguments(ppo_assets, blocked / "out"))
    assert not loaded
