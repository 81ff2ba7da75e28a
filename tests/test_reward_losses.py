"""Pairwise reward and cost losses against hand-computed values."""

import math
import warnings

import numpy as np
import paddle
import pytest

from ppo.models.reward_losses import (
    COST_LOSSES,
    REWARD_LOSSES,
    PreferenceScores,
    SafetyPreferenceScores,
    divergence_slice_mask,
    get_cost_loss,
    get_reward_loss,
    sequence_wise_cost_loss,
    sequence_wise_loss,
    token_wise_cost_loss,
    token_wise_loss,
)


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def t(values, dtype="float32"):
    return paddle.to_tensor(values, dtype=dtype)


def test_sequence_wise_loss_hand_computed():
    better, worse, reg = [1.0, 0.0, 0.5], [0.0, 2.0, -0.5], 0.1
    expected = -np.mean([log_sigmoid(b - w) for b, w in zip(better, worse)]) + reg * (
        np.mean(np.square(better)) + np.mean(np.square(worse))
    )
    assert float(sequence_wise_loss(t(better), t(worse), reg)) == pytest.approx(expected, rel=1e-6)
    # No regulariser: the plain Bradley-Terry term.
    assert float(sequence_wise_loss(t([2.0]), t([0.0]), 0.0)) == pytest.approx(-log_sigmoid(2.0), rel=1e-6)


# Three right-padded pairs (pad id 3, eos id 2):
#  row 0: responses differ at position 3; better is longer (last real 4), worse ends at 3
#  row 1: pad == eos: the ids are identical everywhere, only the masks say that better has a
#         real EOS at position 3 where worse has padding -> the slice is exactly [3]
#  row 2: both responses have the same length and differ at position 2 -> slice [2, 4]
BETTER_IDS = [[1, 5, 6, 7, 8, 3], [1, 5, 6, 2, 2, 2], [1, 5, 9, 7, 2, 3]]
BETTER_MASK = [[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0]]
WORSE_IDS = [[1, 5, 6, 9, 3, 3], [1, 5, 6, 2, 2, 2], [1, 5, 4, 7, 2, 3]]
WORSE_MASK = [[1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]]
EXPECTED_SLICES = [(3, 4), (3, 3), (2, 4)]  # inclusive [first divergence, last real of longer]


def pair_tensors():
    """(better ids, worse ids, better mask, worse mask) of the three pairs above."""
    return tuple(t(values, "int64") for values in (BETTER_IDS, WORSE_IDS, BETTER_MASK, WORSE_MASK))


def _scores(seed):
    return np.random.default_rng(seed).normal(size=(3, 6)).astype(np.float32)


def test_divergence_slice_boundaries():
    mask = divergence_slice_mask(*pair_tensors())
    expected = np.zeros((3, 6), dtype=bool)
    for row, (start, end) in enumerate(EXPECTED_SLICES):
        expected[row, start : end + 1] = True
    np.testing.assert_array_equal(mask.numpy(), expected)


def test_token_wise_loss_hand_computed():
    better, worse, reg = _scores(0), _scores(1), 0.05
    per_pair = []
    for row, (start, end) in enumerate(EXPECTED_SLICES):
        b, w = better[row, start : end + 1].astype(np.float64), worse[row, start : end + 1].astype(np.float64)
        bt = -np.mean([log_sigmoid(x) for x in b - w])
        per_pair.append(bt + reg * (np.mean(b**2) + np.mean(w**2)))
    loss = token_wise_loss(t(better), t(worse), *pair_tensors(), reg)
    assert float(loss) == pytest.approx(np.mean(per_pair), rel=1e-5)


def test_token_wise_gradient_only_reaches_the_slice():
    better = paddle.to_tensor(_scores(2), stop_gradient=False)
    worse = paddle.to_tensor(_scores(3), stop_gradient=False)
    loss = token_wise_loss(better, worse, *pair_tensors(), 0.01)
    loss.backward()
    touched = (better.grad.numpy() != 0) | (worse.grad.numpy() != 0)
    for row, (start, end) in enumerate(EXPECTED_SLICES):
        assert touched[row, start : end + 1].all()
        assert not touched[row, :start].any() and not touched[row, end + 1 :].any()


def test_identical_pair_is_skipped_with_warning_and_never_nan():
    better, worse = _scores(4), _scores(5)
    ids, mask = [row[:] for row in BETTER_IDS], [row[:] for row in BETTER_MASK]
    ids[1], mask[1] = BETTER_IDS[0], BETTER_MASK[0]  # pair 1 compares response 0 with itself
    args = (t(ids, "int64"), t([BETTER_IDS[0]] * 3, "int64"), t(mask, "int64"), t([BETTER_MASK[0]] * 3, "int64"))
    with pytest.warns(RuntimeWarning, match=r"pairs \[0, 1\] .* identical"):
        loss = token_wise_loss(t(better), t(worse), *args, 0.0)
    # Pairs 0 and 1 both compare response 0 with itself: only pair 2 counts.
    start, end = 2, 4
    expected = -np.mean([log_sigmoid(x) for x in (better[2] - worse[2])[start : end + 1].astype(np.float64)])
    assert float(loss) == pytest.approx(expected, rel=1e-5)

    # A batch made only of identical pairs: zero loss, finite gradient, still a warning.
    scores = paddle.to_tensor(_scores(6), stop_gradient=False)
    same = (t(BETTER_IDS, "int64"), t(BETTER_IDS, "int64"), t(BETTER_MASK, "int64"), t(BETTER_MASK, "int64"))
    with pytest.warns(RuntimeWarning, match=r"\[0, 1, 2\]"):
        loss = token_wise_loss(scores, scores * 0.5, *same, 0.1)
    loss.backward()
    assert float(loss) == 0.0 and np.isfinite(scores.grad.numpy()).all()


def test_token_wise_accepts_trailing_score_dim():
    better, worse = _scores(7), _scores(8)
    args = (*pair_tensors(), 0.0)
    flat = token_wise_loss(t(better), t(worse), *args)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        stacked = token_wise_loss(t(better[..., None]), t(worse[..., None]), *args)
    assert float(flat) == pytest.approx(float(stacked), rel=1e-6)


def test_loss_registry():
    assert set(REWARD_LOSSES) == {"sequence-wise", "token-wise"}
    scores = PreferenceScores(
        better_scores=t(_scores(0)),
        worse_scores=t(_scores(1)),
        better_end_scores=t([1.0, 2.0, 0.0]),
        worse_end_scores=t([0.0, 0.0, 1.0]),
        better_input_ids=t(BETTER_IDS, "int64"),
        worse_input_ids=t(WORSE_IDS, "int64"),
        better_attention_mask=t(BETTER_MASK, "int64"),
        worse_attention_mask=t(WORSE_MASK, "int64"),
    )
    direct = token_wise_loss(scores.better_scores, scores.worse_scores, *pair_tensors(), 0.0)
    assert float(get_reward_loss("sequence-wise")(scores, 0.0)) == pytest.approx(
        -np.mean([log_sigmoid(1.0), log_sigmoid(2.0), log_sigmoid(-1.0)]), rel=1e-6
    )
    assert float(get_reward_loss("token-wise")(scores, 0.0)) == pytest.approx(float(direct), rel=1e-6)
    with pytest.raises(ValueError, match=r"'sequence-wise', 'token-wise'"):
        get_reward_loss("pairwise")


# ---------------------------------------------------------------- cost losses
# Safety signs of the three pairs (+1 safe / -1 unsafe): a safe-vs-unsafe pair, two unsafe
# answers, two safe answers. The cost should be negative on safe, positive on unsafe answers.
SAFER_SIGN = [1, -1, 1]
UNSAFER_SIGN = [-1, -1, 1]


def test_sequence_wise_cost_loss_hand_computed():
    safer, unsafer, reg = [-1.0, 0.5, 0.0], [2.0, 1.0, -0.5], 0.1
    expected = []
    for c_s, c_u, s_s, s_u in zip(safer, unsafer, SAFER_SIGN, UNSAFER_SIGN):
        # the cost's sign is the negated safety sign
        expected.append(-log_sigmoid(c_u - c_s) - log_sigmoid(-s_s * c_s) - log_sigmoid(-s_u * c_u))
    expected = np.mean(expected) + reg * (np.mean(np.square(safer)) + np.mean(np.square(unsafer)))
    loss = sequence_wise_cost_loss(t(safer), t(unsafer), t(SAFER_SIGN, "int64"), t(UNSAFER_SIGN, "int64"), reg)
    assert float(loss) == pytest.approx(expected, rel=1e-6)
    # One pair by hand: c_s = 0, c_u = 0, safe vs unsafe -> three terms of log 2 each.
    single = sequence_wise_cost_loss(t([0.0]), t([0.0]), t([1], "int64"), t([-1], "int64"), 0.0)
    assert float(single) == pytest.approx(3 * math.log(2.0), rel=1e-6)


def test_cost_loss_rewards_the_right_signs():
    """Costs on the right side of zero give a lower loss than the same costs mirrored."""
    signs = (t([1], "int64"), t([-1], "int64"))
    right = sequence_wise_cost_loss(t([-2.0]), t([2.0]), *signs, 0.0)
    shifted = sequence_wise_cost_loss(t([2.0]), t([6.0]), *signs, 0.0)  # same gap, safe answer positive
    assert float(right) < float(shifted)


def test_cost_loss_rejects_bad_signs():
    with pytest.raises(ValueError, match=r"\+1 \(safe\) or -1 \(unsafe\), got \[0\]"):
        sequence_wise_cost_loss(t([0.0]), t([1.0]), t([0], "int64"), t([-1], "int64"), 0.0)


def test_token_wise_cost_loss_hand_computed():
    safer, unsafer, reg = _scores(10), _scores(11), 0.05
    per_pair = []
    for row, (start, end) in enumerate(EXPECTED_SLICES):
        c_s = safer[row, start : end + 1].astype(np.float64)
        c_u = unsafer[row, start : end + 1].astype(np.float64)
        s_s, s_u = -SAFER_SIGN[row], -UNSAFER_SIGN[row]
        terms = (
            -np.mean([log_sigmoid(x) for x in c_u - c_s])
            - np.mean([log_sigmoid(s_s * x) for x in c_s])
            - np.mean([log_sigmoid(s_u * x) for x in c_u])
        )
        per_pair.append(terms + reg * (np.mean(c_s**2) + np.mean(c_u**2)))
    signs = (t(SAFER_SIGN, "int64"), t(UNSAFER_SIGN, "int64"))
    loss = token_wise_cost_loss(t(safer), t(unsafer), *pair_tensors(), *signs, reg)
    assert float(loss) == pytest.approx(np.mean(per_pair), rel=1e-5)
    # A trailing score dimension of 1 is the same loss.
    stacked = token_wise_cost_loss(t(safer[..., None]), t(unsafer[..., None]), *pair_tensors(), *signs, reg)
    assert float(stacked) == pytest.approx(float(loss), rel=1e-6)


def test_token_wise_cost_loss_skips_identical_pairs():
    costs = paddle.to_tensor(_scores(12), stop_gradient=False)
    same = (t(BETTER_IDS, "int64"), t(BETTER_IDS, "int64"), t(BETTER_MASK, "int64"), t(BETTER_MASK, "int64"))
    signs = (t(SAFER_SIGN, "int64"), t(UNSAFER_SIGN, "int64"))
    with pytest.warns(RuntimeWarning, match=r"token-wise cost loss: skipping preference pairs \[0, 1, 2\]"):
        loss = token_wise_cost_loss(costs, costs * 0.5, *same, *signs, 0.1)
    loss.backward()
    assert float(loss) == 0.0 and np.isfinite(costs.grad.numpy()).all()


def test_cost_loss_registry():
    assert set(COST_LOSSES) == set(REWARD_LOSSES)
    scores = SafetyPreferenceScores(
        better_scores=t(_scores(10)),
        worse_scores=t(_scores(11)),
        better_end_scores=t([-1.0, 0.5, 0.0]),
        worse_end_scores=t([2.0, 1.0, -0.5]),
        better_input_ids=t(BETTER_IDS, "int64"),
        worse_input_ids=t(WORSE_IDS, "int64"),
        better_attention_mask=t(BETTER_MASK, "int64"),
        worse_attention_mask=t(WORSE_MASK, "int64"),
        better_safety_sign=t(SAFER_SIGN, "int64"),
        worse_safety_sign=t(UNSAFER_SIGN, "int64"),
    )
    signs = (scores.better_safety_sign, scores.worse_safety_sign)
    sequence = sequence_wise_cost_loss(scores.better_end_scores, scores.worse_end_scores, *signs, 0.2)
    token = token_wise_cost_loss(scores.better_scores, scores.worse_scores, *pair_tensors(), *signs, 0.2)
    assert float(get_cost_loss("sequence-wise")(scores, 0.2)) == pytest.approx(float(sequence), rel=1e-6)
    assert float(get_cost_loss("token-wise")(scores, 0.2)) == pytest.approx(float(token), rel=1e-6)
    with pytest.raises(ValueError, match=r"unknown cost loss_type 'pairwise'; allowed: \['sequence-wise', 'token-wise'\]"):
        get_cost_loss("pairwise")
