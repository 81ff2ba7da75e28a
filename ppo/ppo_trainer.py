"""PPO, and the critic-free estimators on the same core: GRPO, RLOO, REINFORCE++.

`PPOTrainer` is the algorithm part on top of `ppo.rl_trainer.RLTrainer` (which owns rollout,
scoring, the update loop, evaluation, logging and checkpoints). Four models: the actor (trained)
and the frozen reference both start from the SFT model; the frozen reward model and the trained
critic start from the reward model. Which of them exist is the algorithm's (`rl_algorithm`, see
`ppo.models.advantages`): critic-free estimators have no critic, no critic trainer and no value
checkpoint; without a KL term they have no reference either; with `reward_functions` and
`reward_model_weight: 0` no reward model.

What is PPO's here: the experience of a scored rollout — KL-penalised token rewards, then the
registered estimator's advantages and returns (GAE with the critic's values for `ppo`), whitened
over the global batch when asked — and the losses of the role Trainers (`ppo.trainer_utils`:
clipped policy objective with optional k3 KL loss and ptx term; clipped value loss).
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Optional

import paddle

from ppo.arguments import PPOTrainingArguments
from ppo.comm_utils import global_masked_whiten
from ppo.experience import Experience
from ppo.rl_trainer import CriticRole, RLTrainer


class PPOTrainer(RLTrainer):
    def __init__(
        self,
        args: PPOTrainingArguments,
        actor_model,
        reference_model,
        reward_model,
        critic_model,
        tokenizer,
        train_dataset,
        max_length: int,
        reward_tokenizer=None,
        eval_dataset=None,
        ptx_dataset=None,
        callbacks=None,
        actor_rollout_model=None,
        critic_rollout_model=None,
        max_new_tokens: Optional[int] = None,
    ):
        """`critic_model` None for critic-free algorithms; see `RLTrainer` for the rest."""
        critics = self._critic_roles(critic_model, critic_rollout_model)
        super().__init__(
            args, actor_model, reference_model, reward_model, tokenizer, train_dataset, max_length,
            critics=critics, reward_tokenizer=reward_tokenizer, eval_dataset=eval_dataset, ptx_dataset=ptx_dataset,
            callbacks=callbacks, actor_rollout_model=actor_rollout_model, max_new_tokens=max_new_tokens,
        )  # fmt: skip

    def _critic_roles(self, critic_model, critic_rollout_model) -> Dict[str, CriticRole]:
        """The trained value models: PPO's critic (none for critic-free algorithms)."""
        return {"critic": CriticRole(critic_model, critic_rollout_model)} if critic_model is not None else {}

    @property
    def critic_model(self):
        return self.critics["critic"].model if "critic" in self.critics else None

    @property
    def critic_trainer(self):
        return self.critic_trainers.get("critic")

    def build_experience(self, scored: Dict[str, paddle.Tensor], prompt_length: int) -> Experience:
        args = self.args
        # Rows stay prompt-major ([p0, p0, p1, p1, ...], see RolloutEngine): a prompt's group is
        # on the rank that rolled it out, so group statistics need no communication.
        experience = Experience.build(
            scored["input_ids"],
            scored["attention_mask"],
            prompt_length,
            scored["old_log_probs"],
            scored.get("reference_log_probs"),
            scored.get("old_values"),
            scored["reward_scores"],
            kl_coeff=args.kl_coeff,
            clip_range_score=args.clip_range_score,
            gamma=args.gamma,
            gae_lambda=args.gae_lambda,
            kl_estimator=args.kl_estimator,
            rl_algorithm=args.rl_algorithm,
            group_size=args.num_return_sequences,
            normalize_advantage_std=args.normalize_advantage_std,
            whiten=global_masked_whiten,
        )
        if args.whiten_advantages and not args.estimator.whitens:
            # Over the action tokens of every replica's rollout, as one process would on the whole batch.
            experience = dataclasses.replace(
                experience, advantages=global_masked_whiten(experience.advantages, experience.action_mask)
            )
        return experience
