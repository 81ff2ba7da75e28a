"""PromptBatch and Experience: built from a real tiny tokenizer and a real tiny Llama rollout."""

import dataclasses

import numpy as np
import paddle
import pytest

from ppo.experience import Experience, PromptBatch
from ppo.models.ppo_model_utils import (
    action_mask_from,
    gae_advantages_and_returns,
    gather_log_probs,
    generated_tokens_mask,
    make_position_ids,
    masked_mean,
)

PROMPTS = [
    "BEGINNING OF CONVERSATION: USER: hi ASSISTANT:",
    "BEGINNING OF CONVERSATION: USER: tell me a long story about a cat and a dog ASSISTANT:",
    "BEGINNING OF CONVERSATION: USER: why is the sky blue ASSISTANT:",
]
MAX_NEW_TOKENS = 6


def collate(tokenizer, prompts=PROMPTS):
    encoded = tokenizer(prompts, padding=True, return_attention_mask=True, return_tensors="np")
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}


@pytest.fixture(scope="module")
def tiny_actor(tiny_llama_dir):
    from paddlenlp.transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    model.eval()
    return model


def sequence_log_probs(model, input_ids, attention_mask):  # -> [B, L-1]
    with paddle.no_grad():
        outputs = model(
            input_ids=input_ids,
            attention_mask=attention_mask.astype("int64"),
            position_ids=make_position_ids(attention_mask),
        )
    logits = outputs[0] if isinstance(outputs, (tuple, list)) else outputs.logits
    return gather_log_probs(logits[:, :-1], input_ids[:, 1:])


def rollout(model, tokenizer, num_return_sequences=2, seed=0):
    """Sample responses, then force the edge cases pad == eos makes hard: an EOS-only response
    (row 0) and an early EOS (row 1); the other rows hit the length limit or end naturally."""
    prompts = PromptBatch.from_collated(collate(tokenizer)).repeat_interleave(num_return_sequences)
    eos = tokenizer.eos_token_id
    paddle.seed(seed)
    with paddle.no_grad():
        response, _ = model.generate(
            input_ids=prompts.input_ids,
            attention_mask=prompts.attention_mask.astype("int64"),
            position_ids=prompts.position_ids,
            max_new_tokens=MAX_NEW_TOKENS,
            decode_strategy="sampling",
            top_p=0.9,
            temperature=1.0,
            eos_token_id=eos,
            pad_token_id=eos,  # pad == eos: the case that must not lose the EOS
        )
    response = response.numpy()
    response = np.pad(response, ((0, 0), (0, MAX_NEW_TOKENS - response.shape[1])),
                      constant_values=eos)
    response[0, :] = eos
    response[1, 2:] = eos
    response = paddle.to_tensor(response)
    input_ids = paddle.concat([prompts.input_ids, response], axis=1)
    attention_mask = paddle.concat(
        [prompts.attention_mask, generated_tokens_mask(response, eos)], axis=1
    )
    return prompts, input_ids, attention_mask


@pytest.fixture(scope="module")
def built(tiny_actor, tiny_tokenizer_dir):
    from paddlenlp.transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    prompts, input_ids, attention_mask = rollout(tiny_actor, tokenizer)
    log_probs = sequence_log_probs(tiny_actor, input_ids, attention_mask)
    # The reference model starts as the actor: the same weights give the same log-probs.
    reference_log_probs = sequence_log_probs(tiny_actor, input_ids, attention_mask)
    rng = np.random.default_rng(0)
    values = paddle.to_tensor(rng.normal(size=log_probs.shape).astype("float32"))
    scores = paddle.to_tensor(rng.normal(scale=3.0, size=[input_ids.shape[0]]).astype("float32"))
    experience = Experience.build(
        input_ids, attention_mask, prompts.prompt_length, log_probs, reference_log_probs, values,
        scores, kl_coeff=0.02, clip_range_score=2.0, gamma=1.0, gae_lambda=0.95,
    )
    return prompts, experience


# ------------------------------------------------------------------------------ PromptBatch


def test_prompt_batch_from_collator_and_repeat(tiny_tokenizer):
    batch = PromptBatch.from_collated(collate(tiny_tokenizer))
    assert batch.batch_size == 3 and batch.attention_mask.dtype == paddle.bool
    assert batch.input_ids.dtype == paddle.int64
    lengths = batch.attention_mask.astype("int64").sum(axis=-1).numpy()
    assert lengths.max() == batch.prompt_length and len(set(lengths)) == 3
    np.testing.assert_array_equal(batch.position_ids.numpy(),
                                  make_position_ids(batch.attention_mask).numpy())

    repeated = batch.repeat_interleave(3)
    assert repeated.batch_size == 9
    for row in range(9):
        np.testing.assert_array_equal(repeated.input_ids[row].numpy(),
                                      batch.input_ids[row // 3].numpy())
    assert batch.repeat_interleave(1) is batch
    with pytest.raises(ValueError, match="num_return_sequences"):
        batch.repeat_interleave(0)


def test_prompt_batch_rejects_bad_input(tiny_tokenizer):
    tiny_tokenizer.padding_side = "right"
    with pytest.raises(ValueError, match="left-padded"):
        PromptBatch.from_collated(collate(tiny_tokenizer))
    with pytest.raises(KeyError, match="attention_mask"):
        PromptBatch.from_collated({"input_ids": np.ones((2, 3), dtype=np.int64)})
    with pytest.raises(ValueError, match="0/1"):
        PromptBatch(paddle.ones([2, 3], dtype="int64"), paddle.full([2, 3], 2, dtype="int64"))
    with pytest.raises(ValueError, match="must match"):
        PromptBatch(paddle.ones([2, 3], dtype="int64"), paddle.ones([2, 4], dtype="bool"))


# ------------------------------------------------------------------------------ Experience.build


def test_build_from_real_rollout(built, tiny_tokenizer_dir):
    prompts, experience = built
    eos = 2
    batch_size, length = experience.input_ids.shape
    assert batch_size == 6 and length == prompts.prompt_length + MAX_NEW_TOKENS
    np.testing.assert_array_equal(experience.prompt_input_ids.numpy(), prompts.input_ids.numpy())

    action_mask = experience.action_mask.numpy()
    np.testing.assert_array_equal(
        action_mask,
        action_mask_from(experience.attention_mask, experience.prompt_length).numpy(),
    )
    # EOS counts as a response token even though pad == eos.
    lengths = experience.response_lengths.numpy()
    assert lengths[0] == 1 and lengths[1] == 3
    response = experience.response_input_ids.numpy()
    for row in range(batch_size):
        if lengths[row] < MAX_NEW_TOKENS:
            assert response[row, lengths[row] - 1] == eos  # it ended on its EOS
    assert experience.num_action_tokens() == lengths.sum()

    # Actor == reference at step 0: KL is exactly 0, so the reward is only the clipped score,
    # on the last response token (the EOS, or the last token when the limit was hit).
    np.testing.assert_array_equal(experience.old_log_probs.numpy(),
                                  experience.reference_log_probs.numpy())
    rewards = experience.rewards.numpy()
    scores = np.clip(experience.reward_scores.numpy(), -2.0, 2.0)
    for row in range(batch_size):
        last = experience.prompt_length - 1 + lengths[row] - 1
        expected = np.zeros(length - 1, dtype=np.float32)
        expected[last] = scores[row]
        np.testing.assert_array_equal(rewards[row], expected)

    advantages, returns = gae_advantages_and_returns(
        experience.old_values, experience.rewards, experience.action_mask, 1.0, 0.95
    )
    np.testing.assert_allclose(experience.advantages.numpy(), advantages.numpy(), atol=1e-6)
    np.testing.assert_allclose(experience.returns.numpy(), returns.numpy(), atol=1e-6)
    log_probs = experience.old_log_probs.numpy()
    assert np.isfinite(log_probs).all() and (log_probs[action_mask] < 0).all()


def test_build_whitens_advantages_on_request(built):
    _, experience = built
    whitened = Experience.build(
        experience.input_ids, experience.attention_mask, experience.prompt_length,
        experience.old_log_probs, experience.reference_log_probs, experience.old_values,
        experience.reward_scores, kl_coeff=0.02, clip_range_score=2.0, gamma=1.0,
        gae_lambda=0.95, whiten_advantages=True,
    )
    mask = experience.action_mask
    assert abs(masked_mean(whitened.advantages, mask).item()) < 1e-5
    assert masked_mean(whitened.advantages**2, mask).item() == pytest.approx(1.0, abs=1e-4)
    np.testing.assert_allclose(whitened.returns.numpy(), experience.returns.numpy())


# ------------------------------------------------------------------------------ batch operations


def assert_same(a: Experience, b: Experience):
    assert a.prompt_length == b.prompt_length
    for name in ("input_ids", "attention_mask", "position_ids", "action_mask", "old_log_probs",
                 "reference_log_probs", "old_values", "rewards", "advantages", "returns",
                 "reward_scores"):
        left, right = getattr(a, name), getattr(b, name)
        assert left.dtype == right.dtype, name
        np.testing.assert_array_equal(left.numpy(), right.numpy(), err_msg=name)


def test_split_concat_select_round_trip(built):
    _, experience = built
    parts = experience.split(4)
    assert [len(part) for part in parts] == [4, 2]
    assert_same(Experience.concat(parts), experience)

    permutation = np.random.default_rng(1).permutation(len(experience))
    shuffled = experience.select(permutation.tolist())
    np.testing.assert_array_equal(shuffled.rewards[0].numpy(),
                                  experience.rewards[int(permutation[0])].numpy())
    assert_same(shuffled.select(paddle.to_tensor(np.argsort(permutation))), experience)
    assert_same(experience.to("cpu"), experience)

    with pytest.raises(ValueError, match="micro_batch_size"):
        experience.split(0)
    with pytest.raises(IndexError, match="row indices"):
        experience.select([0, 6])
    with pytest.raises(ValueError, match="at least one"):
        Experience.concat([])


def test_concat_right_pads_shorter_rollouts(built, tiny_actor, tiny_tokenizer_dir):
    _, experience = built
    # A second rollout chunk that stopped two tokens earlier.
    shorter = experience.select([1, 0])
    cut = experience.sequence_length - 2
    shorter = Experience(
        input_ids=shorter.input_ids[:, :cut],
        attention_mask=shorter.attention_mask[:, :cut],
        position_ids=shorter.position_ids[:, :cut],
        prompt_length=shorter.prompt_length,
        **{name: getattr(shorter, name)[:, : cut - 1] for name in (
            "action_mask", "old_log_probs", "reference_log_probs", "old_values", "rewards",
            "advantages", "returns")},
        reward_scores=shorter.reward_scores,
    )
    with pytest.raises(ValueError, match="pad_token_id"):
        Experience.concat([experience, shorter])
    merged = Experience.concat([experience, shorter], pad_token_id=2)
    assert len(merged) == 8 and merged.sequence_length == experience.sequence_length
    # Rows 1 and 0 ended within the kept columns, so padding restores every id, mask and
    # per-sequence field, and every per-token field on the action positions.
    restored, original = merged.select([6, 7]), experience.select([1, 0])
    for name in ("input_ids", "attention_mask", "position_ids", "action_mask", "reward_scores"):
        np.testing.assert_array_equal(getattr(restored, name).numpy(),
                                      getattr(original, name).numpy(), err_msg=name)
    kept = original.action_mask.numpy()
    for name in ("old_log_probs", "reference_log_probs", "old_values", "rewards", "advantages",
                 "returns"):
        padded = getattr(restored, name).numpy()
        np.testing.assert_array_equal(padded[kept], getattr(original, name).numpy()[kept])
        assert not padded[:, cut - 1 :].any(), name
    # Padded positions are masked, zero, and keep the model's log-probs consistent.
    recomputed = sequence_log_probs(tiny_actor, merged.input_ids, merged.attention_mask)
    mask = merged.action_mask.numpy()
    np.testing.assert_allclose(recomputed.numpy()[mask], merged.old_log_probs.numpy()[mask],
                               atol=1e-5)

    other_prompt = Experience.concat([experience.select([0])])
    other_prompt.prompt_length = experience.prompt_length - 1
    with pytest.raises(ValueError, match="different prompt_length"):
        Experience.concat([experience, other_prompt])


def test_experience_validates_fields_and_detaches(built):
    _, experience = built
    fields = {field.name: getattr(experience, field.name) for field in dataclasses.fields(experience)}

    with pytest.raises(ValueError, match=r"rewards \[6, 3\]"):
        Experience(**{**fields, "rewards": fields["rewards"][:, :3]})
    with pytest.raises(ValueError, match="reward_scores"):
        Experience(**{**fields, "reward_scores": fields["reward_scores"].unsqueeze(-1)})
    with pytest.raises(TypeError, match="action_mask must be bool"):
        Experience(**{**fields, "action_mask": fields["action_mask"].astype("int64")})
    with pytest.raises(ValueError, match="prompt_length"):
        Experience(**{**fields, "prompt_length": 0})
    with pytest.raises(TypeError, match="paddle.Tensor"):
        Experience(**{**fields, "advantages": fields["advantages"].numpy()})

    # old_log_probs computed with gradient must not let the update backpropagate into targets.
    live = fields["old_log_probs"].clone()
    live.stop_gradient = False
    assert Experience(**{**fields, "old_log_probs": live}).old_log_probs.stop_gradient
