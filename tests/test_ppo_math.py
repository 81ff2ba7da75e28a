"""The pure PPO math checked against plain per-token Python loops on random batches.

Batches follow the rollout layout: prompts left-padded to P, responses right-padded after EOS,
with pad == eos so that no mask can be recovered by comparing ids. Every random layout contains a
row whose response is only EOS, a row with no response at all and a row that hit the length
limit without EOS.
"""

import math

import numpy as np
import paddle
import pytest

from ppo.data.base import IGNORE_INDEX
from ppo.models.ppo_model_utils import (
    KL_ESTIMATORS,
    KLEstimator,
    Reduction,
    action_mask_from,
    actor_clipped_loss,
    approx_kl,
    clip_fraction,
    critic_clipped_loss,
    entropy_from_logits,
    explained_variance,
    gae_advantages_and_returns,
    gather_log_probs,
    generated_tokens_mask,
    kl_divergence_per_token,
    kl_penalized_rewards,
    last_action_indices,
    masked_mean,
    masked_sum,
    masked_variance,
    masked_whiten,
    per_sequence_mean,
    response_lengths,
    supervised_lm_loss,
    token_entropy,
)

SEEDS = [0, 1, 2]
EOS = PAD = 2


# ------------------------------------------------------------------------------ fixtures


def random_rollout(seed, batch_size=7, prompt_length=5, max_new_tokens=6, vocab=11):
    """A rollout batch as numpy arrays: ids [B, L], attention mask [B, L], and the lengths.

    Rows 0, 1, 2 are the special cases: response = only EOS, no response, hit max length.
    """
    rng = np.random.default_rng(seed)
    length = prompt_length + max_new_tokens
    input_ids = np.full((batch_size, length), PAD, dtype=np.int64)
    attention = np.zeros((batch_size, length), dtype=bool)
    prompt_lengths = rng.integers(1, prompt_length + 1, size=batch_size)
    # A "response length" counts generated tokens including EOS.
    response_lens = rng.integers(0, max_new_tokens + 1, size=batch_size)
    response_lens[:3] = [1, 0, max_new_tokens]
    for row in range(batch_size):
        start = prompt_length - prompt_lengths[row]
        input_ids[row, start:prompt_length] = rng.integers(3, vocab, size=prompt_lengths[row])
        attention[row, start:prompt_length] = True
        n = response_lens[row]
        tokens = rng.integers(3, vocab, size=n)
        if n > 0 and (row != 2 and rng.random() < 0.8 or row == 0):
            tokens[-1] = EOS  # ended with EOS (row 2 never does: it hit the limit)
        input_ids[row, prompt_length : prompt_length + n] = tokens
        attention[row, prompt_length : prompt_length + n] = True
    return input_ids, attention, response_lens


def reference_action_mask(attention, prompt_length):
    batch_size, length = attention.shape
    mask = np.zeros((batch_size, length - 1), dtype=bool)
    for b in range(batch_size):
        for t in range(length - 1):
            mask[b, t] = (t + 1 >= prompt_length) and attention[b, t + 1]
    return mask


def random_contiguous_mask(seed, batch_size=6, length=9):
    """Each row one run [start, end) at its own columns, including an empty and a full row."""
    rng = np.random.default_rng(seed + 100)
    mask = np.zeros((batch_size, length), dtype=bool)
    for b in range(batch_size):
        if b == 0:
            continue  # empty row
        if b == 1:
            mask[b, :] = True
            continue
        start = rng.integers(0, length)
        end = rng.integers(start + 1, length + 1)
        mask[b, start:end] = True
    return mask


def rollout_action_mask(seed):
    input_ids, attention, _ = random_rollout(seed)
    return reference_action_mask(attention, 5)


def masks_for(seed):
    """Both layouts the math must handle: the rollout layout and free per-row runs."""
    return [rollout_action_mask(seed), random_contiguous_mask(seed)]


def t(array, dtype=None):
    tensor = paddle.to_tensor(array)
    return tensor.astype(dtype) if dtype else tensor


def close(actual, expected, atol=1e-5, rtol=1e-5):
    np.testing.assert_allclose(np.asarray(actual, dtype=np.float64), expected, atol=atol, rtol=rtol)


def log_softmax_ref(z):
    z = np.asarray(z, dtype=np.float64)
    m = z.max()
    return z - (m + math.log(np.exp(z - m).sum()))


# ------------------------------------------------------------------------------ masks


@pytest.mark.parametrize("seed", SEEDS)
def test_action_mask_matches_loop_and_keeps_eos_when_pad_is_eos(seed):
    input_ids, attention, response_lens = random_rollout(seed)
    mask = action_mask_from(t(attention), 5).numpy()
    np.testing.assert_array_equal(mask, reference_action_mask(attention, 5))
    np.testing.assert_array_equal(response_lengths(t(mask)).numpy(), response_lens)
    # Row 0 responded with EOS only (= pad id): it is still exactly one action.
    assert input_ids[0, 5] == EOS and mask[0].sum() == 1 and mask[0, 4]
    assert not mask[1].any()
    assert mask[2, 4:].all()
    # Integer 0/1 masks give the same answer.
    np.testing.assert_array_equal(action_mask_from(t(attention.astype(np.int64)), 5).numpy(), mask)


def test_action_mask_rejects_bad_prompt_length():
    with pytest.raises(ValueError, match="prompt_length"):
        action_mask_from(paddle.ones([2, 4], dtype="bool"), 0)
    with pytest.raises(ValueError, match="prompt_length"):
        action_mask_from(paddle.ones([2, 4], dtype="bool"), 5)


@pytest.mark.parametrize("seed", SEEDS)
def test_generated_tokens_mask_stops_after_first_eos(seed):
    rng = np.random.default_rng(seed)
    response = rng.integers(2, 6, size=(6, 7))  # plenty of EOS (=2), also repeated ones
    response[0] = [EOS] * 7  # EOS first, then pad == eos
    response[1] = [4] * 7  # never ended
    expected = np.zeros_like(response, dtype=bool)
    for b in range(response.shape[0]):
        for k in range(response.shape[1]):
            expected[b, k] = True
            if response[b, k] == EOS:
                break
    np.testing.assert_array_equal(generated_tokens_mask(t(response), EOS).numpy(), expected)


@pytest.mark.parametrize("seed", SEEDS)
def test_last_action_indices(seed):
    for mask in masks_for(seed):
        expected = [max(np.flatnonzero(row), default=-1) for row in mask]
        np.testing.assert_array_equal(last_action_indices(t(mask)).numpy(), expected)


# ------------------------------------------------------------------------------ reductions


@pytest.mark.parametrize("seed", SEEDS)
def test_masked_reductions_match_loops(seed):
    rng = np.random.default_rng(seed)
    for mask in masks_for(seed):
        x = rng.normal(size=mask.shape)
        x[~mask] = 1e6  # garbage outside the mask must not matter
        valid = [x[b, k] for b in range(mask.shape[0]) for k in range(mask.shape[1]) if mask[b, k]]
        row_means = []
        for b in range(mask.shape[0]):
            row = [x[b, k] for k in range(mask.shape[1]) if mask[b, k]]
            row_means.append(sum(row) / len(row) if row else 0.0)
        nonempty = [row_means[b] for b in range(mask.shape[0]) if mask[b].any()]

        close(masked_sum(t(x, "float32"), t(mask)).numpy(), sum(valid), rtol=1e-5)
        close(masked_sum(t(x, "float32"), t(mask), axis=-1).numpy(),
              [sum(x[b][mask[b]]) for b in range(mask.shape[0])])
        close(per_sequence_mean(t(x, "float32"), t(mask)).numpy(), row_means)
        close(masked_mean(t(x, "float32"), t(mask)).numpy(), sum(valid) / len(valid))
        close(masked_mean(t(x, "float32"), t(mask), "seq-mean-token-mean").numpy(),
              sum(nonempty) / len(nonempty))
        mean = sum(valid) / len(valid)
        variance = sum((v - mean) ** 2 for v in valid) / len(valid)
        close(masked_variance(t(x, "float32"), t(mask)).numpy(), variance)
        whitened = np.zeros_like(x)
        shifted_back = np.zeros_like(x)
        for b in range(mask.shape[0]):
            for k in range(mask.shape[1]):
                if mask[b, k]:
                    whitened[b, k] = (x[b, k] - mean) / math.sqrt(variance + 1e-8)
                    shifted_back[b, k] = whitened[b, k] + mean
        close(masked_whiten(t(x, "float32"), t(mask)).numpy(), whitened, atol=1e-4)
        close(masked_whiten(t(x, "float32"), t(mask), shift_mean=False).numpy(), shifted_back,
              atol=1e-4)


def test_reductions_differ_when_lengths_differ():
    x = t([[1.0, 1.0, 1.0], [4.0, 0.0, 0.0]], "float32")
    mask = t([[True, True, True], [True, False, False]])
    assert masked_mean(x, mask, Reduction.TOKEN_MEAN).item() == pytest.approx(7 / 4)
    assert masked_mean(x, mask, Reduction.SEQ_MEAN_TOKEN_MEAN).item() == pytest.approx(5 / 2)


def test_single_valid_token_is_its_own_mean():
    x = t([[3.5, -7.0], [9.0, 9.0]], "float32")
    mask = t([[True, False], [False, False]])
    for reduction in Reduction:
        assert masked_mean(x, mask, reduction).item() == 3.5
    assert masked_variance(x, mask).item() == 0.0


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_empty_mask_gives_zero_not_nan(dtype):
    x = paddle.randn([3, 4]).astype(dtype)
    empty = paddle.zeros([3, 4], dtype="bool")
    for reduction in Reduction:
        value = masked_mean(x, empty, reduction)
        assert value.dtype == paddle.float32 and value.item() == 0.0
    assert masked_sum(x, empty).item() == 0.0
    assert masked_variance(x, empty).item() == 0.0
    assert per_sequence_mean(x, empty).numpy().tolist() == [0.0, 0.0, 0.0]
    assert np.all(masked_whiten(x, empty).numpy() == 0.0)
    logp, old = paddle.randn([3, 4]), paddle.randn([3, 4])
    for value in (
        actor_clipped_loss(logp, old, paddle.randn([3, 4]), empty, 0.2),
        critic_clipped_loss(logp, old, paddle.randn([3, 4]), empty, 5.0),
        approx_kl(logp, old, empty),
        clip_fraction(logp, old, empty, 0.2),
        explained_variance(logp, old, empty),
        entropy_from_logits(paddle.randn([3, 4, 5]), empty),
        supervised_lm_loss(paddle.randn([3, 4, 5]), paddle.full([3, 4], IGNORE_INDEX, "int64")),
    ):
        assert value.item() == 0.0


def test_unknown_names_list_the_valid_choices():
    x, mask = paddle.randn([2, 3]), paddle.ones([2, 3], dtype="bool")
    with pytest.raises(ValueError, match="'token-mean', 'seq-mean-token-mean'"):
        masked_mean(x, mask, "seq-mean")
    with pytest.raises(ValueError, match="'k1', 'k2', 'k3'"):
        kl_divergence_per_token(x, x, "k4")
    with pytest.raises(ValueError, match="shape mismatch"):
        masked_mean(x, paddle.ones([2, 1], dtype="bool"))


# ------------------------------------------------------------------------------ logits


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gather_log_probs_matches_loop(seed, dtype):
    rng = np.random.default_rng(seed)
    logits = t(rng.normal(scale=3.0, size=(3, 5, 13)), dtype)
    labels = rng.integers(0, 13, size=(3, 5))
    as_fp32 = logits.astype("float32").numpy()  # what the low-precision input really holds
    expected = np.zeros(labels.shape)
    for b in range(3):
        for k in range(5):
            expected[b, k] = log_softmax_ref(as_fp32[b, k])[labels[b, k]]
    result = gather_log_probs(logits, t(labels))
    assert result.dtype == paddle.float32
    close(result.numpy(), expected, atol=1e-5)
    # One row per chunk gives the same numbers.
    close(gather_log_probs(logits, t(labels), max_chunk_elements=1).numpy(), expected, atol=1e-5)


def test_gather_log_probs_gradient_is_onehot_minus_softmax():
    rng = np.random.default_rng(0)
    logits = t(rng.normal(size=(4, 3, 7)), "float32")
    logits.stop_gradient = False
    labels = rng.integers(0, 7, size=(4, 3))
    gather_log_probs(logits, t(labels), max_chunk_elements=30).sum().backward()
    z = logits.numpy().astype(np.float64)
    softmax = np.exp(z - z.max(-1, keepdims=True))
    softmax /= softmax.sum(-1, keepdims=True)
    expected = -softmax
    for b in range(4):
        for k in range(3):
            expected[b, k, labels[b, k]] += 1.0
    close(logits.grad.numpy(), expected, atol=1e-5)


def test_gather_log_probs_rejects_misaligned_labels():
    with pytest.raises(ValueError, match="labels"):
        gather_log_probs(paddle.randn([2, 5, 7]), paddle.zeros([2, 4], dtype="int64"))


@pytest.mark.parametrize("scale", [2.0, 40.0])  # 40: near one-hot rows, most probabilities underflow
@pytest.mark.parametrize("seed", SEEDS)
def test_entropy_matches_loop(seed, scale):
    rng = np.random.default_rng(seed)
    logits = rng.normal(scale=scale, size=(7, 10, 9))
    mask = rollout_action_mask(seed)
    per_token = np.zeros(mask.shape)
    for b in range(7):
        for k in range(10):
            logp = log_softmax_ref(logits[b, k])
            per_token[b, k] = -(np.exp(logp) * logp).sum()
    close(token_entropy(t(logits, "float32"), max_chunk_elements=200).numpy(), per_token)
    for reduction in Reduction:
        expected = masked_mean(t(per_token, "float32"), t(mask), reduction).item()
        close(entropy_from_logits(t(logits, "float32"), t(mask), reduction).numpy(), expected)
    valid = per_token[mask]
    close(entropy_from_logits(t(logits, "float32"), t(mask)).numpy(), valid.mean())
    # Uniform logits have the maximal entropy log V.
    uniform = entropy_from_logits(paddle.zeros([2, 3, 9]), paddle.ones([2, 3], dtype="bool"))
    close(uniform.numpy(), math.log(9))


@pytest.mark.parametrize("seed", SEEDS)
def test_supervised_lm_loss_matches_loop(seed):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(4, 6, 8))
    labels = rng.integers(0, 8, size=(4, 6))
    labels[:, :3] = IGNORE_INDEX  # the prompt
    labels[1, :] = IGNORE_INDEX  # a row with nothing supervised
    labels[2, 5] = IGNORE_INDEX  # right padding
    total, count = 0.0, 0
    for b in range(4):
        for k in range(5):
            if labels[b, k + 1] != IGNORE_INDEX:
                total -= log_softmax_ref(logits[b, k])[labels[b, k + 1]]
                count += 1
    tensor_logits = t(logits, "float32")
    tensor_logits.stop_gradient = False
    loss = supervised_lm_loss(tensor_logits, t(labels))
    close(loss.numpy(), total / count)
    loss.backward()
    assert np.isfinite(tensor_logits.grad.numpy()).all()
    # Same as paddle's own cross-entropy summed over the shifted pairs. (Its reduction="mean"
    # divides by ALL labels, ignored ones included, when ignore_index is negative.)
    builtin_sum = paddle.nn.functional.cross_entropy(
        t(logits[:, :-1].reshape(-1, 8), "float32"),
        t(labels[:, 1:].reshape(-1, 1)),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    close(loss.numpy(), builtin_sum.item() / count)


# ------------------------------------------------------------------------------ KL and rewards


def kl_reference(logp, ref, name):
    d = logp - ref
    return {"k1": d, "k2": 0.5 * d * d, "k3": math.exp(-d) - 1 + d}[name]


@pytest.mark.parametrize("seed", SEEDS)
def test_kl_estimators_match_formulas(seed):
    rng = np.random.default_rng(seed)
    logp, ref = rng.normal(size=(3, 4)) - 2, rng.normal(size=(3, 4)) - 2
    assert set(KL_ESTIMATORS) == set(KLEstimator)
    for name in ("k1", "k2", "k3"):
        expected = np.vectorize(lambda a, b: kl_reference(a, b, name))(logp, ref)
        close(kl_divergence_per_token(t(logp, "float32"), t(ref, "float32"), name).numpy(), expected)
    # k2 and k3 are non-negative, and all vanish when the policies agree.
    for name in ("k2", "k3"):
        assert (kl_divergence_per_token(t(logp), t(ref), name).numpy() >= 0).all()
        assert (kl_divergence_per_token(t(logp), t(logp), name).numpy() == 0).all()


def reference_rewards(scores, logp, ref, mask, kl_coeff, clip, name):
    rewards = np.zeros(mask.shape)
    for b in range(mask.shape[0]):
        positions = [k for k in range(mask.shape[1]) if mask[b, k]]
        for k in positions:
            rewards[b, k] = -kl_coeff * kl_reference(logp[b, k], ref[b, k], name)
        if positions:
            rewards[b, positions[-1]] += min(max(scores[b], -clip), clip)
    return rewards


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_penalized_rewards_match_loop(seed, estimator):
    rng = np.random.default_rng(seed)
    for mask in masks_for(seed):
        scores = rng.normal(scale=4.0, size=mask.shape[0])
        logp, ref = rng.normal(size=mask.shape) - 2, rng.normal(size=mask.shape) - 2
        result = kl_penalized_rewards(
            t(scores, "float32"), t(logp, "float32"), t(ref, "float32"), t(mask),
            kl_coeff=0.1, clip_range_score=3.0, kl_estimator=estimator,
        )
        close(result.numpy(), reference_rewards(scores, logp, ref, mask, 0.1, 3.0, estimator))


@pytest.mark.parametrize("seed", SEEDS)
def test_rewards_without_kl_are_the_clipped_score_at_the_last_action(seed):
    rng = np.random.default_rng(seed)
    mask = rollout_action_mask(seed)
    scores = np.array([60.0, -3.0, -80.0, 1.5, 0.25, -49.0, 7.0])
    logp, ref = rng.normal(size=mask.shape), rng.normal(size=mask.shape)
    rewards = kl_penalized_rewards(
        t(scores, "float32"), t(logp, "float32"), t(ref, "float32"), t(mask),
        kl_coeff=0.0, clip_range_score=50.0,
    ).numpy()
    for b in range(mask.shape[0]):
        expected = np.zeros(mask.shape[1])
        if mask[b].any():
            expected[np.flatnonzero(mask[b])[-1]] = np.clip(scores[b], -50.0, 50.0)
        np.testing.assert_array_equal(rewards[b], expected.astype(np.float32))
    # Row 0 answered with EOS only: its score sits on that EOS. Row 1 generated nothing.
    assert rewards[0, 4] == 50.0 and not rewards[1].any()
    # Row 2 hit the length limit: the score sits on its last generated token.
    assert rewards[2, -1] == -50.0


def test_rewards_kl_term_alone_when_score_is_zero():
    mask = rollout_action_mask(0)
    rng = np.random.default_rng(0)
    logp, ref = rng.normal(size=mask.shape), rng.normal(size=mask.shape)
    rewards = kl_penalized_rewards(
        paddle.zeros([mask.shape[0]]), t(logp, "float32"), t(ref, "float32"), t(mask),
        kl_coeff=0.5, clip_range_score=5.0,
    ).numpy()
    close(rewards, np.where(mask, -0.5 * (logp - ref), 0.0))


def test_rewards_reject_bad_arguments():
    mask = paddle.ones([2, 3], dtype="bool")
    logp = paddle.zeros([2, 3])
    with pytest.raises(ValueError, match=r"reward_scores must be \[B\]"):
        kl_penalized_rewards(paddle.zeros([2, 1]), logp, logp, mask, 0.1, 5.0)
    with pytest.raises(ValueError, match="kl_coeff"):
        kl_penalized_rewards(paddle.zeros([2]), logp, logp, mask, -0.1, 5.0)
    with pytest.raises(ValueError, match="clip_range_score"):
        kl_penalized_rewards(paddle.zeros([2]), logp, logp, mask, 0.1, 0.0)


# ------------------------------------------------------------------------------ GAE


def reference_gae(values, rewards, mask, gamma, lam):
    advantages, returns = np.zeros(mask.shape), np.zeros(mask.shape)
    for b in range(mask.shape[0]):
        positions = [k for k in range(mask.shape[1]) if mask[b, k]]
        next_advantage = 0.0
        for i in reversed(range(len(positions))):
            k = positions[i]
            next_value = values[b, positions[i + 1]] if i + 1 < len(positions) else 0.0
            delta = rewards[b, k] + gamma * next_value - values[b, k]
            next_advantage = delta + gamma * lam * next_advantage
            advantages[b, k] = next_advantage
            returns[b, k] = next_advantage + values[b, k]
    return advantages, returns


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.5), (0.99, 0.0), (1.0, 1.0)])
def test_gae_matches_loop(seed, gamma, lam):
    rng = np.random.default_rng(seed)
    for mask in masks_for(seed):
        values, rewards = rng.normal(size=mask.shape), rng.normal(size=mask.shape)
        rewards[~mask] = 0.0
        advantages, returns = gae_advantages_and_returns(
            t(values, "float32"), t(rewards, "float32"), t(mask), gamma, lam
        )
        expected_advantages, expected_returns = reference_gae(values, rewards, mask, gamma, lam)
        close(advantages.numpy(), expected_advantages, atol=1e-5)
        close(returns.numpy(), expected_returns, atol=1e-5)


@pytest.mark.parametrize("seed", SEEDS)
def test_gae_with_unit_gamma_lambda_returns_future_reward_sums(seed):
    rng = np.random.default_rng(seed)
    mask = rollout_action_mask(seed)
    values = rng.normal(size=mask.shape)
    rewards = np.where(mask, rng.normal(size=mask.shape), 0.0)
    _, returns = gae_advantages_and_returns(
        t(values, "float32"), t(rewards, "float32"), t(mask), 1.0, 1.0
    )
    future_sums = np.where(mask, np.cumsum(rewards[:, ::-1], axis=1)[:, ::-1], 0.0)
    close(returns.numpy(), future_sums, atol=1e-5)


def test_gae_bf16_inputs_and_bad_arguments():
    mask = t(rollout_action_mask(0))
    values = paddle.randn(mask.shape).astype("bfloat16")
    advantages, returns = gae_advantages_and_returns(values, paddle.zeros(mask.shape), mask, 1, 0.95)
    assert advantages.dtype == paddle.float32 and np.isfinite(returns.numpy()).all()
    gapped = t([[True, False, True], [True, True, False]])
    with pytest.raises(ValueError, match=r"contiguous.*rows \[0\]"):
        gae_advantages_and_returns(paddle.zeros([2, 3]), paddle.zeros([2, 3]), gapped, 1.0, 0.95)
    with pytest.raises(ValueError, match="gae_lambda"):
        gae_advantages_and_returns(paddle.zeros([2, 3]), paddle.zeros([2, 3]), mask[:2, :3], 1.0, 2)
    empty = paddle.zeros([2, 3], dtype="bool")
    advantages, returns = gae_advantages_and_returns(paddle.ones([2, 3]), paddle.ones([2, 3]),
                                                     empty, 1.0, 0.95)
    assert not advantages.numpy().any() and not returns.numpy().any()


# ------------------------------------------------------------------------------ losses


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("reduction", list(Reduction))
def test_actor_loss_matches_loop_and_has_finite_gradients(seed, reduction):
    rng = np.random.default_rng(seed)
    eps = 0.2
    for mask in masks_for(seed):
        logp = rng.normal(scale=0.3, size=mask.shape) - 1
        old = logp + rng.normal(scale=0.3, size=mask.shape)
        adv = rng.normal(size=mask.shape)
        per_token = np.zeros(mask.shape)
        for b in range(mask.shape[0]):
            for k in range(mask.shape[1]):
                ratio = math.exp(logp[b, k] - old[b, k])
                clipped = min(max(ratio, 1 - eps), 1 + eps)
                per_token[b, k] = max(-adv[b, k] * ratio, -adv[b, k] * clipped)
        expected = masked_mean(t(per_token, "float32"), t(mask), reduction).item()
        logp_tensor = t(logp, "float32")
        logp_tensor.stop_gradient = False
        loss = actor_clipped_loss(logp_tensor, t(old, "float32"), t(adv, "float32"), t(mask), eps,
                                  reduction)
        close(loss.numpy(), expected)
        loss.backward()
        grad = logp_tensor.grad.numpy()
        assert np.isfinite(grad).all() and not grad[~mask].any()


def test_actor_loss_token_mean_by_hand():
    # ratio e^{0.5} ≈ 1.65 with A = 1 is clipped to 1.2; ratio 1 with A = -2 gives 2.
    logp = t([[0.5, 0.0, 9.0]], "float32")
    old = t([[0.0, 0.0, 0.0]], "float32")
    adv = t([[1.0, -2.0, 5.0]], "float32")
    mask = t([[True, True, False]])
    loss = actor_clipped_loss(logp, old, adv, mask, 0.2)
    assert loss.item() == pytest.approx((-1.2 + 2.0) / 2, rel=1e-6)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("reduction", list(Reduction))
def test_critic_loss_matches_loop_and_has_finite_gradients(seed, reduction):
    rng = np.random.default_rng(seed)
    eps = 0.5
    for mask in masks_for(seed):
        values = rng.normal(size=mask.shape)
        old = values + rng.normal(size=mask.shape)
        returns = rng.normal(size=mask.shape)
        per_token = np.zeros(mask.shape)
        for b in range(mask.shape[0]):
            for k in range(mask.shape[1]):
                clipped = min(max(values[b, k], old[b, k] - eps), old[b, k] + eps)
                per_token[b, k] = max((values[b, k] - returns[b, k]) ** 2,
                                      (clipped - returns[b, k]) ** 2)
        expected = 0.5 * masked_mean(t(per_token, "float32"), t(mask), reduction).item()
        values_tensor = t(values, "float32")
        values_tensor.stop_gradient = False
        loss = critic_clipped_loss(values_tensor, t(old, "float32"), t(returns, "float32"),
                                   t(mask), eps, reduction)
        close(loss.numpy(), expected)
        loss.backward()
        grad = values_tensor.grad.numpy()
        assert np.isfinite(grad).all() and not grad[~mask].any()


def test_losses_accept_half_precision_and_reject_bad_ranges():
    mask = t(rollout_action_mask(1))
    logp = (paddle.randn(mask.shape) * 0.1 - 1).astype("bfloat16")
    logp.stop_gradient = False
    loss = actor_clipped_loss(logp, logp.detach(), paddle.randn(mask.shape), mask, 0.2)
    assert loss.dtype == paddle.float32
    loss.backward()
    assert np.isfinite(logp.grad.astype("float32").numpy()).all()
    values = paddle.randn(mask.shape).astype("float16")
    assert critic_clipped_loss(values, values, values, mask, 5.0).item() == 0.0
    with pytest.raises(ValueError, match="clip_range_ratio"):
        actor_clipped_loss(logp, logp, logp, mask, 0.0)
    with pytest.raises(ValueError, match="clip_range_value"):
        critic_clipped_loss(values, values, values, mask, -1.0)


# ------------------------------------------------------------------------------ diagnostics


@pytest.mark.parametrize("seed", SEEDS)
def test_diagnostics_match_loops(seed):
    rng = np.random.default_rng(seed)
    mask = rollout_action_mask(seed)
    logp = rng.normal(scale=0.3, size=mask.shape) - 1
    old = logp + rng.normal(scale=0.2, size=mask.shape)
    values, returns = rng.normal(size=mask.shape), rng.normal(size=mask.shape)
    kl_terms, clipped, v_list, r_list = [], [], [], []
    for b in range(mask.shape[0]):
        for k in range(mask.shape[1]):
            if mask[b, k]:
                ratio = math.exp(logp[b, k] - old[b, k])
                kl_terms.append(ratio - 1 - math.log(ratio))
                clipped.append(abs(ratio - 1) > 0.2)
                v_list.append(values[b, k])
                r_list.append(returns[b, k])
    v_arr, r_arr = np.array(v_list), np.array(r_list)
    lp, old_t, m = t(logp, "float32"), t(old, "float32"), t(mask)
    close(approx_kl(lp, old_t, m).numpy(), np.mean(kl_terms))
    close(clip_fraction(lp, old_t, m, 0.2).numpy(), np.mean(clipped))
    close(explained_variance(t(values, "float32"), t(returns, "float32"), m).numpy(),
          1 - np.var(r_arr - v_arr) / np.var(r_arr), atol=1e-5)
    assert approx_kl(lp, lp, m).item() == 0.0
    assert explained_variance(t(returns, "float32"), t(returns, "float32"), m).item() == 1.0
    constant = paddle.ones(mask.shape)
    assert explained_variance(t(values, "float32"), constant, m).item() == 0.0
