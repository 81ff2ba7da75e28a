"""Old values from the critic's first training forward, instead of a scoring forward of its own.

When a rollout is exactly one optimizer step (update_iters 1 and every micro-batch accumulated
into it), the critic's first training forward on a micro-batch runs the very weights that the
rollout would have been scored with: its values *are* the old values. The critic then trains
first, per micro-batch — forward, old values = its detached values, returns by GAE over that
row's token rewards, clipped value loss (inactive: V = V_old), backward — and the experience
(advantages from those old values, whitened over the batch) is built afterwards for the actor.
This spares one critic forward over the whole rollout (~7 % of a PPO step at SmolLM2-135M).

What the two paths differ by is the forward itself: train mode instead of eval mode, and the
training micro-batch's shape instead of the scoring chunk's. Without dropout the difference is
float32 rounding (`tests/test_values_from_update.py` compares the two runs); with dropout, or a separate
rollout copy of the critic, or pipeline parallel (whose loss hooks run inside the Pipe model),
the shortcut does not apply.
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Optional

import paddle

from ppo.models.ppo_model_utils import gae_advantages_and_returns


def _dropout_settings(model) -> Dict[str, float]:
    """The non-zero dropout probabilities of a model's config (`hidden_dropout_prob`, ...)."""
    config = getattr(model, "config", None)
    if config is None:
        return {}
    settings = config.to_dict() if hasattr(config, "to_dict") else vars(config)
    found = {}
    for name, value in settings.items():
        if "dropout" in name and isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
            found[name] = float(value)
    return found


def blockers(args, critic_models: Dict[str, object], roles_with_rollout_copies: Iterable[str]) -> List[str]:
    """Why the critics' old values cannot come from their update in this run (empty: they can)."""
    if not critic_models:
        return ["the algorithm has no critic"]
    reasons = []
    if args.update_iters != 1:
        reasons.append(f"update_iters={args.update_iters} (the later passes need the rollout-time values)")
    micro_batches = args.micro_batches_per_rollout
    if micro_batches > args.gradient_accumulation_steps:
        reasons.append(
            f"a rollout's {micro_batches} micro-batches make several optimizer steps "
            f"(gradient_accumulation_steps={args.gradient_accumulation_steps})"
        )
    if args.pipeline_parallel_degree > 1:
        reasons.append("pipeline parallel")
    copies = sorted(set(roles_with_rollout_copies) & set(critic_models))
    if copies:
        reasons.append(f"rollout copies score for {copies}")
    for role, model in critic_models.items():
        dropout = _dropout_settings(model)
        if dropout:
            reasons.append(f"{role} has dropout {dropout} (its training forward is not the rollout-time one)")
    return reasons


def decide(setting: Optional[bool], reasons: List[str]) -> bool:
    """`old_values_from_update`: None = whenever possible, True = required, False = never."""
    if setting is False:
        return False
    if reasons:
        if setting:
            raise ValueError("old_values_from_update=true is not possible in this run: " + "; ".join(reasons))
        return False
    return True


def critic_returns(
    old_values: paddle.Tensor,  # [B, L-1] the critic's detached values of this forward
    token_rewards: paddle.Tensor,  # [B, L-1] the rewards its values estimate (rewards, or costs)
    action_mask: paddle.Tensor,  # [B, L-1] bool
    gamma: float,
    gae_lambda: float,
) -> paddle.Tensor:  # [B, L-1]
    """The value targets the experience would hold for these rows: GAE returns A + V (GAE is per
    row, so a micro-batch's rows give what the whole batch gives for them)."""
    _, returns = gae_advantages_and_returns(old_values, token_rewards, action_mask, gamma=gamma, gae_lambda=gae_lambda)
    return returns
