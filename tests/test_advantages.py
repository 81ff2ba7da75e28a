"""Advantage estimators (`ppo.models.advantages`) against plain per-group Python loops."""

from __future__ import annotations

import math

import numpy as np
import paddle
import pytest

from ppo.models.advantages import (
    ADVANTAGE_ESTIMATORS,
    AdvantageEstimator,
    advantage_estimator,
    discounted_returns,
    grpo_advantages,
    reinforce_plus_plus_advantages,
    rloo_advantages,
    sequence_rewards,
)
from ppo.models.ppo_model_utils import kl_penalized_rewards


def _mask(lengths, width=6, start=1):  # contiguous action runs from column `start`
    return paddle.to_tensor([[start <= t < start + n for t in range(width)] for n in lengths])


def _loop_grpo(scores, group, normalize_std, eps=1e-6):
    out = []
    for g in range(0, len(scores), group):
        members = scores[g : g + group]
        mean = sum(members) / group
        if group == 1:
            out += [0.0]
            continue
        std = math.sqrt(sum((r - mean) ** 2 for r in members) / (group - 1))
        out += [(r - mean) / (std + eps) if normalize_std else r - mean for r in members]
    return out


def _loop_rloo(scores, group):
    out = []
    for g in range(0, len(scores), group):
        members = scores[g : g + group]
        for i, r in enumerate(members):
            others = [members[j] for j in range(group) if j != i]
            out.append(r - sum(others) / len(others) if others else 0.0)
    return out


def _check_broadcast(advantages, per_sequence, mask):
    expected = np.where(mask.numpy(), np.asarray(per_sequence, dtype=np.float32)[:, None], 0.0)
    np.testing.assert_allclose(advantages.numpy(), expected, rtol=1e-5, atol=1e-6)


SCORES = [1.0, 3.0, -2.0, 0.5, 0.5, 0.5, 4.0, -1.0]
LENGTHS = [3, 1, 5, 2, 0, 4, 2, 3]


@pytest.mark.parametrize("group", [1, 2, 4, 8])
@pytest.mark.parametrize("normalize_std", [True, False])
def test_grpo_matches_per_group_loop(group, normalize_std):
    mask = _mask(LENGTHS)
    advantages = grpo_advantages(paddle.to_tensor(SCORES), mask, group, normalize_std)
    _check_broadcast(advantages, _loop_grpo(SCORES, group, normalize_std), mask)


def test_grpo_equal_rewards_give_zero_not_nan():
    advantages = grpo_advantages(paddle.to_tensor([2.0, 2.0, 2.0, 2.0]), _mask([2, 2, 2, 2]), 4)
    assert np.all(advantages.numpy() == 0.0)


@pytest.mark.parametrize("group", [1, 2, 4])
def test_rloo_matches_leave_one_out_loop(group):
    mask = _mask(LENGTHS)
    _check_broadcast(rloo_advantages(paddle.to_tensor(SCORES), mask, group), _loop_rloo(SCORES, group), mask)


def test_groups_must_divide_the_batch():
    with pytest.raises(ValueError, match="groups of 3"):
        grpo_advantages(paddle.to_tensor(SCORES), _mask(LENGTHS), 3)


def _token_loop_returns(rewards, mask, gamma):
    rewards, mask = rewards.numpy(), mask.numpy()
    out = np.zeros_like(rewards)
    for b in range(rewards.shape[0]):
        running = 0.0
        for t in reversed(range(rewards.shape[1])):
            if mask[b, t]:
                running = rewards[b, t] + gamma * running
                out[b, t] = running
    return out


@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_reinforce_plus_plus_is_whitened_discounted_kl_penalised_return(gamma):
    paddle.seed(0)
    mask = _mask(LENGTHS)
    log_probs, reference = paddle.randn([8, 6]), paddle.randn([8, 6])
    rewards = kl_penalized_rewards(
        paddle.to_tensor(SCORES), log_probs, reference, mask, kl_coeff=0.1, clip_range_score=3.0, kl_estimator="k1"
    )
    # The per-token rewards really are -kl_coeff * KL_t plus the clipped end score at the last token.
    kl = (log_probs - reference).numpy()
    for b, n in enumerate(LENGTHS):
        for t in range(1, 1 + n):
            expected = -0.1 * kl[b, t] + (float(np.clip(SCORES[b], -3, 3)) if t == n else 0.0)
            assert rewards.numpy()[b, t] == pytest.approx(expected, abs=1e-5)
    raw = _token_loop_returns(rewards, mask, gamma)
    np.testing.assert_allclose(discounted_returns(rewards, mask, gamma).numpy(), raw, rtol=1e-5, atol=1e-5)
    valid = mask.numpy()
    mean, std = raw[valid].mean(), raw[valid].std()  # population std over the batch's tokens
    expected = np.where(valid, (raw - mean) / np.sqrt(std**2 + 1e-8), 0.0)
    advantages = reinforce_plus_plus_advantages(rewards, mask, gamma)
    np.testing.assert_allclose(advantages.numpy(), expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(
        reinforce_plus_plus_advantages(rewards, mask, gamma, whiten=None).numpy(), raw, rtol=1e-5, atol=1e-5
    )


def test_sequence_rewards_sum_the_action_tokens():
    mask = _mask([2, 0])
    rewards = paddle.to_tensor([[9.0, 1.0, 2.0, 9.0, 9.0, 9.0], [9.0] * 6])
    assert sequence_rewards(rewards, mask).tolist() == [3.0, 0.0]


def test_registry_specs_and_clear_error():
    assert set(ADVANTAGE_ESTIMATORS) == set(AdvantageEstimator)
    assert advantage_estimator("ppo").needs_critic
    for name in ("grpo", "rloo", "reinforce_plus_plus"):
        assert not advantage_estimator(name).needs_critic
    assert advantage_estimator("grpo").needs_groups and advantage_estimator("rloo").needs_groups
    assert advantage_estimator("reinforce_plus_plus").whitens
    with pytest.raises(ValueError, match="'ppo', 'ppo_lag', 'grpo', 'rloo', 'reinforce_plus_plus'"):
        advantage_estimator("reinforce_plue_plus")


def test_registered_group_estimator_uses_sequence_reward():
    mask = _mask([2, 3, 1, 2])
    rewards = paddle.where(mask, paddle.full([4, 6], 0.5), paddle.zeros([4, 6]))
    advantages, returns = advantage_estimator("rloo").compute(
        rewards, None, mask, group_size=2, gamma=1.0, gae_lambda=1.0, normalize_std=True
    )
    _check_broadcast(advantages, _loop_rloo([1.0, 1.5, 0.5, 1.0], 2), mask)
    assert np.array_equal(returns.numpy(), advantages.numpy())
