"""Advantage estimators, registered by name: pure functions, no trainer state.

Every estimator reads the same scored rollout and returns ``(advantages, returns)``, both
[B, T] float32 and 0 outside ``action_mask``:

- ``token_rewards`` [B, T]: per-token rewards from `kl_penalized_rewards` (−kl_coeff·KL_t on action
  positions, plus the clipped end score at each row's last action position);
- ``values`` [B, T] or None: critic values (only GAE reads them);
- ``action_mask`` [B, T] bool;
- ``group_size``: responses per prompt. Rows are prompt-major, [p0, p0, …, p1, p1, …], as the
  rollout's ``repeat_interleave`` lays them out, so group g is rows [g·G, (g+1)·G).

The group estimators (GRPO, RLOO) score a response by its sequence reward
``sum_t token_rewards`` (= clipped score − kl_coeff·Σ_t KL_t) and broadcast one advantage over
its response tokens. Critic-free estimators return ``returns = advantages`` (no value target).

`ADVANTAGE_ESTIMATORS` maps each `AdvantageEstimator` to an `EstimatorSpec` saying what the
algorithm needs (a critic, groups of ≥ 2, whitening over the global batch); the trainer and
the model builder ask the spec instead of testing the algorithm's name.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Callable, Optional

import paddle

from ppo.models.ppo_model_utils import (
    _as_bool,
    _check_same_shape,
    _check_unit_interval,
    as_float32,
    _parse_choice,
    gae_advantages_and_returns,
    masked_sum,
    masked_whiten,
)

Whitener = Callable[[paddle.Tensor, paddle.Tensor], paddle.Tensor]


class AdvantageEstimator(str, Enum):
    """The `rl_algorithm` names. PPO uses GAE with a critic; the others are critic-free."""

    PPO = "ppo"
    PPO_LAG = "ppo_lag"  # PPO-Lagrangian: GAE for the reward and for a cost (see ppo.ppo_lag_trainer)
    GRPO = "grpo"
    RLOO = "rloo"
    REINFORCE_PLUS_PLUS = "reinforce_plus_plus"


def sequence_rewards(
    token_rewards: paddle.Tensor,  # [B, T]
    action_mask: paddle.Tensor,  # [B, T] bool
) -> paddle.Tensor:  # [B] float32
    """Σ_t token_rewards over each row's action positions (the end score minus its KL penalty)."""
    _check_same_shape(token_rewards=token_rewards, action_mask=action_mask)
    return masked_sum(token_rewards, action_mask, axis=-1)


def _grouped(scores: paddle.Tensor, group_size: int) -> paddle.Tensor:  # [B] -> [B / G, G]
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size (num_return_sequences) must be an int >= 1, got {group_size!r}")
    if scores.shape[0] % group_size:
        raise ValueError(
            f"{scores.shape[0]} responses do not split into groups of {group_size}: rows must be prompt-major, "
            "num_return_sequences per prompt"
        )
    return as_float32(scores).reshape([-1, group_size])


def _broadcast(per_sequence: paddle.Tensor, action_mask: paddle.Tensor) -> paddle.Tensor:  # [B] -> [B, T]
    mask = _as_bool(action_mask)
    return paddle.where(mask, per_sequence.unsqueeze(-1).expand(mask.shape), paddle.zeros([], dtype="float32"))


@paddle.no_grad()
def grpo_advantages(
    scores: paddle.Tensor,  # [B] sequence rewards, prompt-major groups of `group_size`
    action_mask: paddle.Tensor,  # [B, T] bool
    group_size: int,
    normalize_std: bool = True,
    eps: float = 1e-6,
) -> paddle.Tensor:  # [B, T] float32
    """GRPO: A_i = (r_i − mean_g) / (std_g + eps) on every response token of i, where mean_g and
    std_g are over i's group. std_g is the SAMPLE standard deviation (Bessel's n − 1, as
    `torch.std` in TRL and verl). ``normalize_std=False`` gives Dr. GRPO: A_i = r_i − mean_g.
    A group of one has advantage 0 (no baseline to compare with)."""
    groups = _grouped(scores, group_size)  # [B/G, G]
    if group_size == 1:
        return _broadcast(paddle.zeros([scores.shape[0]], dtype="float32"), action_mask)
    centred = groups - groups.mean(axis=-1, keepdim=True)
    if normalize_std:
        std = paddle.sqrt(paddle.square(centred).sum(axis=-1, keepdim=True) / (group_size - 1))
        centred = centred / (std + eps)
    return _broadcast(centred.flatten(), action_mask)


@paddle.no_grad()
def rloo_advantages(
    scores: paddle.Tensor,  # [B] sequence rewards, prompt-major groups of `group_size`
    action_mask: paddle.Tensor,  # [B, T] bool
    group_size: int,
) -> paddle.Tensor:  # [B, T] float32
    """RLOO: A_i = r_i − mean_{j≠i} r_j over i's group (leave-one-out baseline), on every response
    token of i; = G/(G−1)·(r_i − mean_g). A group of one has advantage 0."""
    groups = _grouped(scores, group_size)
    if group_size == 1:
        return _broadcast(paddle.zeros([scores.shape[0]], dtype="float32"), action_mask)
    others_mean = (groups.sum(axis=-1, keepdim=True) - groups) / (group_size - 1)
    return _broadcast((groups - others_mean).flatten(), action_mask)


@paddle.no_grad()
def discounted_returns(
    token_rewards: paddle.Tensor,  # [B, T]
    action_mask: paddle.Tensor,  # [B, T] bool
    gamma: float,
) -> paddle.Tensor:  # [B, T] float32
    """G_t = r_t + γ·G_{t+1} over each row's action positions (0 after the last one and outside
    the mask): GAE with V ≡ 0 and λ = 1."""
    _check_unit_interval(gamma=gamma)
    zeros = paddle.zeros_like(as_float32(token_rewards))
    returns, _ = gae_advantages_and_returns(zeros, token_rewards, action_mask, gamma=gamma, gae_lambda=1.0)
    return returns


@paddle.no_grad()
def reinforce_plus_plus_advantages(
    token_rewards: paddle.Tensor,  # [B, T] −kl_coeff·KL_t + end score at the last action
    action_mask: paddle.Tensor,  # [B, T] bool
    gamma: float,
    whiten: Optional[Whitener] = masked_whiten,
) -> paddle.Tensor:  # [B, T] float32
    """REINFORCE++: discounted returns of the per-token rewards, whitened over the batch's action
    tokens (token mean, population variance). ``whiten`` is the whitening function: the trainer
    passes the all-rank one (`ppo.comm_utils.global_masked_whiten`); None leaves them raw."""
    returns = discounted_returns(token_rewards, action_mask, gamma)
    return returns if whiten is None else whiten(returns, _as_bool(action_mask))


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EstimatorSpec:
    """What an algorithm needs; `compute(token_rewards, values, action_mask, *, group_size, gamma,
    gae_lambda, normalize_std, whiten) -> (advantages, returns)`."""

    compute: Callable[..., tuple]
    needs_critic: bool
    needs_groups: bool  # a baseline from the other responses of the prompt: num_return_sequences >= 2
    whitens: bool  # advantages already whitened over the batch (whiten_advantages adds nothing)


def _gae(token_rewards, values, action_mask, *, gamma, gae_lambda, **_):
    return gae_advantages_and_returns(values, token_rewards, action_mask, gamma=gamma, gae_lambda=gae_lambda)


def _grpo(token_rewards, values, action_mask, *, group_size, normalize_std, **_):
    advantages = grpo_advantages(sequence_rewards(token_rewards, action_mask), action_mask, group_size, normalize_std)
    return advantages, advantages


def _rloo(token_rewards, values, action_mask, *, group_size, **_):
    advantages = rloo_advantages(sequence_rewards(token_rewards, action_mask), action_mask, group_size)
    return advantages, advantages


def _reinforce_plus_plus(token_rewards, values, action_mask, *, gamma, whiten=masked_whiten, **_):
    advantages = reinforce_plus_plus_advantages(token_rewards, action_mask, gamma, whiten)
    return advantages, advantages


ADVANTAGE_ESTIMATORS: dict[AdvantageEstimator, EstimatorSpec] = {
    AdvantageEstimator.PPO: EstimatorSpec(_gae, needs_critic=True, needs_groups=False, whitens=False),
    AdvantageEstimator.PPO_LAG: EstimatorSpec(_gae, needs_critic=True, needs_groups=False, whitens=False),
    AdvantageEstimator.GRPO: EstimatorSpec(_grpo, needs_critic=False, needs_groups=True, whitens=False),
    AdvantageEstimator.RLOO: EstimatorSpec(_rloo, needs_critic=False, needs_groups=True, whitens=False),
    AdvantageEstimator.REINFORCE_PLUS_PLUS: EstimatorSpec(
        _reinforce_plus_plus, needs_critic=False, needs_groups=False, whitens=True
    ),
}


def advantage_estimator(name: str | AdvantageEstimator) -> EstimatorSpec:
    """The spec registered under `name`; an unknown name lists the valid ones."""
    return ADVANTAGE_ESTIMATORS[_parse_choice(AdvantageEstimator, name, "rl_algorithm")]
