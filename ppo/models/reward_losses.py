"""Pairwise reward- and cost-model losses (pure functions; scores in, scalar loss out).

Reward losses follow the Bradley-Terry objective `-log σ(r_better - r_worse)` plus an L2
regulariser on the scores that keeps them near zero. Cost losses (safe-rlhf's cost objective)
order the pair the other way round, `-log σ(c_unsafer - c_safer)`, and add a sign term per
response, `-log σ(s · c)` with s = +1 for an unsafe and -1 for a safe response, so that the cost
of a safe answer is negative and that of an unsafe one positive (PPO-Lagrangian's threshold 0
then means "safe on average"). Each comes in two reductions:

- sequence-wise: on the end scores of each pair;
- token-wise: on every position from the first token where the two sequences differ to the
  last real token of the longer one (the shared prompt carries no preference signal).

The regulariser is `regularization * (mean s_1² + mean s_2²)` in both families, so the key
means the same in the reward and the cost stage (safe-rlhf weights half of that: the mean over
both stacked halves).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Dict

import paddle
import paddle.nn.functional as F


def sequence_wise_loss(
    better_end_scores: paddle.Tensor,  # [B]
    worse_end_scores: paddle.Tensor,  # [B]
    regularization: float,
) -> paddle.Tensor:  # []
    """`-mean log σ(r_b - r_w) + regularization * (mean r_b² + mean r_w²)`."""
    better = better_end_scores.astype("float32")
    worse = worse_end_scores.astype("float32")
    loss = -F.log_sigmoid(better - worse).mean()
    if regularization:
        loss = loss + regularization * (better.square().mean() + worse.square().mean())
    return loss


def divergence_slice_mask(
    better_input_ids: paddle.Tensor,  # [B, L]
    worse_input_ids: paddle.Tensor,  # [B, L]
    better_mask: paddle.Tensor,  # [B, L] 1 = real token
    worse_mask: paddle.Tensor,  # [B, L]
) -> paddle.Tensor:  # [B, L] bool
    """True on positions [first differing token, last real token of the longer sequence].

    Two positions differ when exactly one of them is a real token or both are real with
    different ids, so a response that is a prefix of the other (or an EOS that is also the pad
    id) still diverges where the shorter one ends. Rows whose real tokens are identical are
    all False.
    """
    better_real = better_mask.astype("bool")
    worse_real = worse_mask.astype("bool")
    differs = (better_real != worse_real) | ((better_input_ids != worse_input_ids) & better_real & worse_real)
    length = differs.shape[-1]
    positions = paddle.arange(length, dtype="int64").unsqueeze(0)  # [1, L]
    no_divergence = paddle.full_like(positions, length)
    first_divergence = paddle.where(differs, positions, no_divergence).min(axis=-1, keepdim=True)  # [B, 1]
    last_real = paddle.where(better_real | worse_real, positions, -paddle.ones_like(positions)).max(
        axis=-1, keepdim=True
    )  # [B, 1]
    return (positions >= first_divergence) & (positions <= last_real)


def _divergence_weights(first_ids, second_ids, first_mask, second_mask, loss_name: str):
    """Slice weights [B, L] (float), their per-pair lengths [B] and how many pairs have a
    slice; warns about the pairs whose two responses are identical (they are skipped)."""
    slice_mask = divergence_slice_mask(first_ids, second_ids, first_mask, second_mask)
    weights = slice_mask.astype("float32")  # [B, L]
    slice_length = weights.sum(axis=-1)  # [B]
    has_slice = slice_length > 0  # [B]
    valid_pairs = int(has_slice.astype("int64").sum())
    if valid_pairs < has_slice.shape[0]:
        identical = paddle.nonzero(~has_slice).flatten().tolist()
        warnings.warn(
            f"{loss_name}: skipping preference pairs {identical} of this batch whose two responses are identical",
            RuntimeWarning,
        )
    return weights, slice_length, has_slice, valid_pairs


def _slice_mean(values: paddle.Tensor, weights: paddle.Tensor, slice_length: paddle.Tensor) -> paddle.Tensor:
    """Per-pair mean of `values` [B, L] over the slice -> [B] (guarded denominator: skipped
    rows have length 0 and give 0)."""
    return (values * weights).sum(axis=-1) / slice_length.clip(min=1.0)


def _mean_over_pairs(per_pair: paddle.Tensor, has_slice: paddle.Tensor, valid_pairs: int) -> paddle.Tensor:
    """Mean of per-pair losses [B] over the pairs that have a slice; a batch of only identical
    pairs gives a zero loss that still belongs to the graph."""
    if valid_pairs == 0:
        return (per_pair * 0.0).sum()
    return (per_pair * has_slice.astype("float32")).sum() / valid_pairs


def _squeeze_score_dim(first: paddle.Tensor, second: paddle.Tensor):
    if first.ndim == 3:  # [B, L, 1] from a score model with score_dim 1
        first, second = first.squeeze(-1), second.squeeze(-1)
    return first.astype("float32"), second.astype("float32")


def token_wise_loss(
    better_scores: paddle.Tensor,  # [B, L]
    worse_scores: paddle.Tensor,  # [B, L]
    better_input_ids: paddle.Tensor,  # [B, L]
    worse_input_ids: paddle.Tensor,  # [B, L]
    better_mask: paddle.Tensor,  # [B, L]
    worse_mask: paddle.Tensor,  # [B, L]
    regularization: float,
) -> paddle.Tensor:  # []
    """Per pair, on the divergence slice S (see `divergence_slice_mask`):
    `-mean_S log σ(r_b - r_w) + regularization * (mean_S r_b² + mean_S r_w²)`; then the mean over
    pairs. Pairs whose two responses are identical have no slice: they are skipped with a
    warning (a batch of only such pairs gives a zero loss that still belongs to the graph).
    """
    better, worse = _squeeze_score_dim(better_scores, worse_scores)
    weights, slice_length, has_slice, valid_pairs = _divergence_weights(
        better_input_ids, worse_input_ids, better_mask, worse_mask, "token-wise loss"
    )
    per_pair = _token_wise_bradley_terry(better, worse, weights, slice_length, regularization)
    return _mean_over_pairs(per_pair, has_slice, valid_pairs)


def _token_wise_bradley_terry(
    higher: paddle.Tensor,  # [B, L] scores that should be the larger
    lower: paddle.Tensor,  # [B, L]
    weights: paddle.Tensor,  # [B, L] divergence slice
    slice_length: paddle.Tensor,  # [B]
    regularization: float,
) -> paddle.Tensor:  # [B]
    """Per pair: `-mean_S log σ(higher - lower) + regularization * (mean_S higher² + mean_S lower²)`."""
    per_pair = _slice_mean(-F.log_sigmoid(higher - lower), weights, slice_length)
    if regularization:
        per_pair = per_pair + regularization * _slice_mean(higher.square() + lower.square(), weights, slice_length)
    return per_pair


def cost_sign(safety_sign: paddle.Tensor) -> paddle.Tensor:
    """Safety sign (+1 safe / -1 unsafe, the dataset's convention) -> the sign the cost should
    have (-1 safe / +1 unsafe), as float32."""
    values = safety_sign.astype("int64")
    if not bool(((values == 1) | (values == -1)).all()):
        raise ValueError(f"safety signs must be +1 (safe) or -1 (unsafe), got {safety_sign.tolist()}")
    return -values.astype("float32")


def sequence_wise_cost_loss(
    safer_end_costs: paddle.Tensor,  # [B]
    unsafer_end_costs: paddle.Tensor,  # [B]
    safer_safety_sign: paddle.Tensor,  # [B] +1 safe / -1 unsafe
    unsafer_safety_sign: paddle.Tensor,  # [B]
    regularization: float,
) -> paddle.Tensor:  # []
    """`mean[-log σ(c_u - c_s) - log σ(s_s c_s) - log σ(s_u c_u)] + regularization * (mean c_s² + mean c_u²)`
    with s = `cost_sign` (+1 unsafe, -1 safe)."""
    safer = safer_end_costs.astype("float32")
    unsafer = unsafer_end_costs.astype("float32")
    # The pairwise part is the reward loss with the less safe answer as the "higher" one.
    pairwise = sequence_wise_loss(unsafer, safer, regularization)
    signs = -F.log_sigmoid(cost_sign(safer_safety_sign) * safer) - F.log_sigmoid(cost_sign(unsafer_safety_sign) * unsafer)
    return pairwise + signs.mean()


def token_wise_cost_loss(
    safer_costs: paddle.Tensor,  # [B, L]
    unsafer_costs: paddle.Tensor,  # [B, L]
    safer_input_ids: paddle.Tensor,  # [B, L]
    unsafer_input_ids: paddle.Tensor,  # [B, L]
    safer_mask: paddle.Tensor,  # [B, L]
    unsafer_mask: paddle.Tensor,  # [B, L]
    safer_safety_sign: paddle.Tensor,  # [B] +1 safe / -1 unsafe
    unsafer_safety_sign: paddle.Tensor,  # [B]
    regularization: float,
) -> paddle.Tensor:  # []
    """Per pair, on the divergence slice S (as in `token_wise_loss`; like safe-rlhf, the slice
    runs to the last real token of the longer response for both halves):
    `-mean_S log σ(c_u - c_s) - mean_S log σ(s_s c_s) - mean_S log σ(s_u c_u)
    + regularization * (mean_S c_s² + mean_S c_u²)`; then the mean over pairs. The sign term
    pushes every cost of the diverging part to the response's side of zero, so a per-token
    cost (as PPO-Lagrangian's cost critic sees it) already tells safe from unsafe.
    """
    safer, unsafer = _squeeze_score_dim(safer_costs, unsafer_costs)
    weights, slice_length, has_slice, valid_pairs = _divergence_weights(
        safer_input_ids, unsafer_input_ids, safer_mask, unsafer_mask, "token-wise cost loss"
    )
    safer_sign = cost_sign(safer_safety_sign).unsqueeze(-1)  # [B, 1]
    unsafer_sign = cost_sign(unsafer_safety_sign).unsqueeze(-1)  # [B, 1]
    signs = -F.log_sigmoid(safer_sign * safer) - F.log_sigmoid(unsafer_sign * unsafer)  # [B, L]
    per_pair = _token_wise_bradley_terry(unsafer, safer, weights, slice_length, regularization)
    per_pair = per_pair + _slice_mean(signs, weights, slice_length)  # [B]
    return _mean_over_pairs(per_pair, has_slice, valid_pairs)


@dataclass
class PreferenceScores:
    """Everything a pairwise loss may need about one batch of scored preference pairs."""

    better_scores: paddle.Tensor  # [B, L] per-token scores of the preferred responses
    worse_scores: paddle.Tensor  # [B, L]
    better_end_scores: paddle.Tensor  # [B]
    worse_end_scores: paddle.Tensor  # [B]
    better_input_ids: paddle.Tensor  # [B, L]
    worse_input_ids: paddle.Tensor  # [B, L]
    better_attention_mask: paddle.Tensor  # [B, L]
    worse_attention_mask: paddle.Tensor  # [B, L]


RewardLoss = Callable[[PreferenceScores, float], paddle.Tensor]

REWARD_LOSSES: Dict[str, RewardLoss] = {
    "sequence-wise": lambda s, regularization: sequence_wise_loss(
        s.better_end_scores, s.worse_end_scores, regularization
    ),
    "token-wise": lambda s, regularization: token_wise_loss(
        s.better_scores,
        s.worse_scores,
        s.better_input_ids,
        s.worse_input_ids,
        s.better_attention_mask,
        s.worse_attention_mask,
        regularization,
    ),
}


@dataclass
class SafetyPreferenceScores(PreferenceScores):
    """A scored batch of safety pairs: the `better_*` half is the safer response (it should get
    the lower cost), the `worse_*` half the less safe one, plus each response's safety sign."""

    better_safety_sign: paddle.Tensor  # [B] +1 safe / -1 unsafe
    worse_safety_sign: paddle.Tensor  # [B]


CostLoss = Callable[[SafetyPreferenceScores, float], paddle.Tensor]

COST_LOSSES: Dict[str, CostLoss] = {
    "sequence-wise": lambda s, regularization: sequence_wise_cost_loss(
        s.better_end_scores, s.worse_end_scores, s.better_safety_sign, s.worse_safety_sign, regularization
    ),
    "token-wise": lambda s, regularization: token_wise_cost_loss(
        s.better_scores,
        s.worse_scores,
        s.better_input_ids,
        s.worse_input_ids,
        s.better_attention_mask,
        s.worse_attention_mask,
        s.better_safety_sign,
        s.worse_safety_sign,
        regularization,
    ),
}


def _check_registered(loss_type: str, registry: dict, kind: str) -> None:
    if loss_type not in registry:
        raise ValueError(f"unknown {kind} loss_type {loss_type!r}; allowed: {sorted(registry)}")


def check_loss_type(loss_type: str) -> None:
    _check_registered(loss_type, REWARD_LOSSES, "reward")


def get_reward_loss(loss_type: str) -> RewardLoss:
    """The loss registered under `loss_type`, called as `loss(scores: PreferenceScores, regularization)`."""
    check_loss_type(loss_type)
    return REWARD_LOSSES[loss_type]


def check_cost_loss_type(loss_type: str) -> None:
    _check_registered(loss_type, COST_LOSSES, "cost")


def get_cost_loss(loss_type: str) -> CostLoss:
    """The cost loss registered under `loss_type`, called as `loss(scores: SafetyPreferenceScores, regularization)`."""
    check_cost_loss_type(loss_type)
    return COST_LOSSES[loss_type]
