"""PPO-Lagrangian (safe-rlhf's `ppo_lag`): PPO that keeps the expected cost under a threshold.

On top of PPO's four models, a frozen **cost model** scores each response's cost and a trained
**cost critic** (role "cost_critic", saved as `cost_value/`) estimates it per token. Per rollout:

- token rewards and token costs share the KL penalty half and half
  (`ppo.models.ppo_model_utils.reward_and_cost_token_rewards`);
- GAE gives reward advantages/returns (critic) and cost advantages/returns (cost critic);
- the rollout's costs join a window of the last `episode_cost_window_size` episode costs, and the
  multiplier λ takes one ascent step on (window mean − `threshold`) once `global_step` reaches
  `lambda_update_delay_steps` (`ppo.models.lagrangian.LagrangeMultiplier`, log-space λ ≥ 0,
  clamped at `lambda_max`). Data-parallel ranks add their own costs and step on the mean of
  their window means, so λ is the same on every rank. λ moves once per rollout (safe-rlhf moves
  it at each optimizer step, on the same window);
- the actor ascends on (A_r − λ·A_c) / (1 + λ) (`lagrangian_advantages`), whitened over the
  global batch with `whiten_advantages`; the cost critic regresses the cost returns.

Logged: train/cost (mean cost score of the rollout), train/episode_cost (window mean),
train/lambda, train/cost_critic_loss, train/cost_critic_lr; eval/cost with evaluation. λ, its
update count and the cost window travel with checkpoints (exact resume).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Dict, Tuple

import paddle

from ppo.comm_utils import all_reduce_sum, global_masked_whiten
from ppo.experience import Experience
from ppo.infer_utils import RolloutOutput
from ppo.models.lagrangian import LagrangeMultiplier, lagrangian_advantages
from ppo.models.ppo_model_utils import (
    action_mask_from,
    gae_advantages_and_returns,
    make_position_ids,
    reward_and_cost_token_rewards,
)
from ppo.ppo_trainer import PPOTrainer
from ppo.reward_scoring import exclude_nonfinite_rewards
from ppo.rl_trainer import CriticRole


@dataclass
class SafetyExperience(Experience):
    """PPO experience plus the cost side: `advantages` is the Lagrangian combination."""

    old_cost_values: paddle.Tensor  # [B, L-1] f32 cost critic values at rollout time
    costs: paddle.Tensor  # [B, L-1] f32 +½·KL penalty + clipped cost score at the last action position
    cost_returns: paddle.Tensor  # [B, L-1] f32 cost critic targets
    cost_scores: paddle.Tensor  # [B] f32 cost-model end scores

    PER_TOKEN_FIELDS: ClassVar[tuple] = Experience.PER_TOKEN_FIELDS + ("old_cost_values", "costs", "cost_returns")
    PER_SEQUENCE_FIELDS: ClassVar[tuple] = Experience.PER_SEQUENCE_FIELDS + ("cost_scores",)


class PPOLagTrainer(PPOTrainer):
    OUTPUT_NAMES = {**PPOTrainer.OUTPUT_NAMES, "cost_critic": "cost_value"}
    EXPERIENCE_CLASS = SafetyExperience

    def __init__(
        self,
        *args,
        cost_model=None,
        cost_critic_model=None,
        cost_tokenizer=None,
        cost_critic_rollout_model=None,
        **kwargs,
    ):
        """PPOTrainer's arguments plus the frozen `cost_model` (its own tokenizer allowed) and the
        trained `cost_critic_model` (the actor's tokenizer: it scores every actor token)."""
        if cost_model is None or cost_critic_model is None:
            raise ValueError("rl_algorithm ppo_lag needs cost_model_name_or_path (and a cost critic, by default the cost model)")
        self.cost_model = cost_model
        self._cost_critic = CriticRole(
            cost_critic_model, cost_critic_rollout_model, old_values_field="old_cost_values",
            returns_field="cost_returns", token_rewards_field="costs", loss_name="cost_critic_loss",
        )  # fmt: skip
        super().__init__(*args, **kwargs)
        self.cost_scorer = self.score_model_reader(
            cost_model, cost_tokenizer, (self.train_dataset, self.eval_dataset), "cost model"
        )
        self.lagrange = LagrangeMultiplier(self.args)
        self._rollout_lambda = self.lagrange.value  # the λ of the rollout being trained on
        self._episode_cost = 0.0  # all ranks' mean window cost at the last rollout

    # ------------------------------------------------------------------ models

    def _critic_roles(self, critic_model, critic_rollout_model) -> Dict[str, CriticRole]:
        return {**super()._critic_roles(critic_model, critic_rollout_model), "cost_critic": self._cost_critic}

    def frozen_models(self):
        return [*super().frozen_models(), self.cost_model]

    def extra_frozen_names(self) -> Tuple[str, ...]:
        return ("cost_model",)

    def offloadable_models(self):
        return {**super().offloadable_models(), "cost_model": self.cost_model}

    # ------------------------------------------------------------------ scoring and experience

    def extra_scores(self, input_ids, attention_mask, prompt_length: int) -> Dict[str, paddle.Tensor]:
        return {"cost_scores": self.cost_scorer(input_ids, attention_mask, prompt_length)}

    def exclude_nonfinite(self, scored: Dict[str, paddle.Tensor], prompt_length: int) -> int:
        """A response whose reward or cost is NaN/inf is left out of both."""
        reward, cost = scored["reward_scores"], scored["cost_scores"]
        finite = paddle.isfinite(reward) & paddle.isfinite(cost)
        nan = paddle.full_like(reward, float("nan"))
        scored["cost_scores"], _, _ = exclude_nonfinite_rewards(
            paddle.where(finite, cost, nan), scored["attention_mask"], prompt_length, self.args.num_return_sequences
        )
        scored["reward_scores"] = paddle.where(finite, reward, nan)
        return super().exclude_nonfinite(scored, prompt_length)

    def observe_rollout(self, scored: Dict[str, paddle.Tensor], prompt_length: int) -> None:
        """λ steps once per rollout on its episode costs, before the experience is built with it."""
        self._update_multiplier(scored["cost_scores"], action_mask_from(scored["attention_mask"].astype("bool"), prompt_length))

    def build_experience(self, scored: Dict[str, paddle.Tensor], prompt_length: int) -> SafetyExperience:
        args = self.args
        attention_mask = scored["attention_mask"].astype("bool")
        action_mask = action_mask_from(attention_mask, prompt_length)
        rewards, costs = reward_and_cost_token_rewards(
            scored["reward_scores"], scored["cost_scores"], scored["old_log_probs"], scored["reference_log_probs"],
            action_mask, kl_coeff=args.kl_coeff, clip_range_score=args.clip_range_score, kl_estimator=args.kl_estimator,
        )  # fmt: skip
        gae = dict(gamma=args.gamma, gae_lambda=args.gae_lambda)
        reward_advantages, returns = gae_advantages_and_returns(scored["old_values"], rewards, action_mask, **gae)
        cost_advantages, cost_returns = gae_advantages_and_returns(scored["old_cost_values"], costs, action_mask, **gae)
        advantages = lagrangian_advantages(reward_advantages, cost_advantages, self._rollout_lambda)
        if args.whiten_advantages:
            advantages = global_masked_whiten(advantages, action_mask)
        return SafetyExperience(
            input_ids=scored["input_ids"].astype("int64"),
            attention_mask=attention_mask,
            position_ids=make_position_ids(attention_mask),
            prompt_length=prompt_length,
            action_mask=action_mask,
            old_log_probs=scored["old_log_probs"],
            reference_log_probs=scored["reference_log_probs"],
            old_values=scored["old_values"],
            rewards=rewards,
            advantages=advantages,
            returns=returns,
            reward_scores=scored["reward_scores"].astype("float32"),
            old_cost_values=scored["old_cost_values"],
            costs=costs,
            cost_returns=cost_returns,
            cost_scores=scored["cost_scores"].astype("float32"),
        )

    def _update_multiplier(self, cost_scores: paddle.Tensor, action_mask: paddle.Tensor) -> None:
        """This rank's episode costs (responses left out for a NaN/inf score excluded) join the
        window; λ steps on the mean of all ranks' window means."""
        kept = action_mask.any(axis=-1)
        self.lagrange.add_episode_costs([cost for cost, keep in zip(cost_scores.tolist(), kept.tolist()) if keep])
        local_mean = self.lagrange.mean_episode_cost() if self.lagrange.episode_costs else 0.0
        total, ranks = all_reduce_sum([local_mean, 1.0 if self.lagrange.episode_costs else 0.0])
        self._episode_cost = total / max(ranks, 1.0)
        if ranks > 0:
            self.lagrange.update(self.state.global_step, self._episode_cost)
        self._rollout_lambda = self.lagrange.value

    # ------------------------------------------------------------------ metrics and state

    def rollout_metric_sums(self, experience: SafetyExperience) -> Dict[str, float]:
        sums = super().rollout_metric_sums(experience)
        sums["cost"] = float(experience.cost_scores.astype("float64").sum())
        return sums

    def extra_rollout_metrics(self, sums: Dict[str, float]) -> Dict[str, float]:
        return {
            "train/cost": sums["cost"] / max(sums["responses"], 1.0),
            "train/episode_cost": self._episode_cost,
            "train/lambda": self._rollout_lambda,
        }

    def eval_batch_sums(self, rollout: RolloutOutput) -> Dict[str, float]:
        costs = self.cost_scorer(rollout.sequences, rollout.attention_mask, rollout.prompt_length)
        return {"cost": float(costs.astype("float64").sum())}

    def extra_state(self) -> dict:
        return {"lagrange": self.lagrange.state_dict(), "rollout_lambda": self._rollout_lambda}

    def load_extra_state(self, state: dict) -> None:
        self.lagrange.load_state_dict(state["lagrange"])
        self._rollout_lambda = float(state["rollout_lambda"])
