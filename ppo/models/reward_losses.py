"""Pairwise reward-model losses (pure functions; scores in, scalar loss out).

Both follow the Bradley-Terry objective `-log σ(r_better - r_worse)` plus an L2 regulariser on
the scores that keeps them near zero:

- sequence-wise: on the end scores of each pair;
- token-wise: on every position from the first token where the two sequences differ to the
  last real token of the longer one (the shared prompt carries no preference signal).
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
    if better_scores.ndim == 3:  # [B, L, 1] from a score model with score_dim 1
        better_scores, worse_scores = better_scores.squeeze(-1), worse_scores.squeeze(-1)
    slice_mask = divergence_slice_mask(better_input_ids, worse_input_ids, better_mask, worse_mask)
    weights = slice_mask.astype("float32")  # [B, L]
    slice_length = weights.sum(axis=-1)  # [B]
    has_slice = slice_length > 0  # [B]
    valid_pairs = int(has_slice.astype("int64").sum())
    if valid_pairs < has_slice.shape[0]:
        identical = paddle.nonzero(~has_slice).flatten().tolist()
        warnings.warn(
            f"token-wise loss: skipping preference pairs {identical} of this batch whose two responses are identical",
            RuntimeWarning,
        )

    better = better_scores.astype("float32")
    worse = worse_scores.astype("float32")
    # Per-sequence means over the slice (guarded denominator: skipped rows have length 0).
    denominator = slice_length.clip(min=1.0)
    per_pair = (-F.log_sigmoid(better - worse) * weights).sum(axis=-1) / denominator  # [B]
    if regularization:
        squares = ((better.square() + worse.square()) * weights).sum(axis=-1) / denominator
        per_pair = per_pair + regularization * squares
    if valid_pairs == 0:
        return (per_pair * 0.0).sum()
    return (per_pair * has_slice.astype("float32")).sum() / valid_pairs


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


def check_loss_type(loss_type: str) -> None:
    if loss_type not in REWARD_LOSSES:
        raise ValueError(f"unknown loss_type {loss_type!r}; allowed: {sorted(REWARD_LOSSES)}")


def get_reward_loss(loss_type: str) -> RewardLoss:
    """The loss registered under `loss_type`, called as `loss(scores: PreferenceScores, regularization)`."""
    check_loss_type(loss_type)
    return REWARD_LOSSES[loss_type]
