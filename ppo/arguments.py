"""Arguments of the PPO stage: one dataclass per concern, validated once in `__post_init__`.

Every key of `config/*/ppo_argument.json` maps 1:1 to a field here or in PaddleNLP's
`TrainingArguments`; the latter apply to both the actor and the critic, except the `critic_*`
fields which override them for the critic.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import List, Optional

from paddlenlp.trainer import TrainingArguments

from ppo.data.arguments import ConversationDataArguments
from ppo.data.truncation import check_max_prompt_length
from ppo.models.advantages import AdvantageEstimator, EstimatorSpec, advantage_estimator
from ppo.models.lagrangian import LagrangianArguments
from ppo.models.ppo_model_utils import KLEstimator, Reduction
from ppo.rewards import load_reward_functions

OFFLOAD_TOKENS = ("freeze_model", "optimizer", "train_model")
EVAL_MODES = (None, "single", "tensor_parallel")


@dataclass
class PPOModelArguments:
    actor_model_name_or_path: str = field(
        metadata={"help": "SFT model that initialises the actor and serves as the frozen reference."}
    )
    reward_model_name_or_path: Optional[str] = field(
        default=None,
        metadata={"help": "Trained reward (score) model, kept frozen. Optional when reward_functions score the "
                          "responses and reward_model_weight is 0."},
    )
    reward_critic_model_name_or_path: Optional[str] = field(
        default=None,
        metadata={"help": "Initialisation of the critic (value) model; defaults to the reward model."},
    )
    cost_model_name_or_path: Optional[str] = field(
        default=None, metadata={"help": "rl_algorithm ppo_lag: trained cost (score) model, kept frozen."}
    )
    cost_critic_model_name_or_path: Optional[str] = field(
        default=None,
        metadata={"help": "rl_algorithm ppo_lag: initialisation of the cost critic; defaults to the cost model."},
    )

    def __post_init__(self):
        if self.reward_critic_model_name_or_path is None:
            self.reward_critic_model_name_or_path = self.reward_model_name_or_path
        if self.cost_critic_model_name_or_path is None:
            self.cost_critic_model_name_or_path = self.cost_model_name_or_path


@dataclass
class PPODataArguments(ConversationDataArguments):
    train_datasets: str = field(metadata={"help": "Prompt datasets, e.g. 'PKU-SafeRLHF/train' or 'name:0.5:path'."})
    eval_datasets: Optional[str] = field(default=None, metadata={"help": "Prompt datasets for evaluation."})
    ptx_datasets: Optional[str] = field(
        default=None, metadata={"help": "Supervised datasets for the ptx (language-model) loss; None disables it."}
    )
    max_length: int = field(
        default=512,
        metadata={"help": "Maximum total tokens of prompt + response (the cap of every sequence)."},
    )
    max_new_tokens: Optional[int] = field(
        default=None,
        metadata={"help": "Response budget of every rollout and evaluation, whatever prompts share the batch; prompts "
                          "then get max_length - max_new_tokens tokens. Default: max_length - the longest prompt of "
                          "the global batch (of the whole eval set in evaluation)."},
    )

    def __post_init__(self):
        self.check_conversation_data()
        new = self.max_new_tokens
        if new is not None and (isinstance(new, bool) or not isinstance(new, int) or not 1 <= new < self.max_length):
            raise ValueError(
                f"max_new_tokens must be an integer from 1 to max_length - 1 = {self.max_length - 1} "
                f"(prompts need at least one token), got {new!r}"
            )
        room = self.response_room
        check_max_prompt_length(
            self.max_prompt_length,
            self.max_length - room,
            f"max_prompt_length + {'max_new_tokens' if new is not None else 'one response token'} = "
            f"{(self.max_prompt_length or 0) + room} exceeds max_length = {self.max_length}; raise max_length or "
            "lower one of them",
        )

    @property
    def response_room(self) -> int:
        """Tokens a rollout prompt leaves free within max_length: max_new_tokens, or at least one."""
        return self.max_new_tokens if self.max_new_tokens is not None else 1


@dataclass
class PPOTrainingArguments(TrainingArguments, LagrangianArguments):
    # Rollout
    per_device_prompt_batch_size: int = field(default=16, metadata={"help": "Prompts per device per rollout."})
    num_return_sequences: int = field(default=1, metadata={"help": "Responses sampled per prompt; all are trained on."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature of the rollout."})
    top_p: float = field(default=0.8, metadata={"help": "Top-p (nucleus) threshold of the rollout."})
    repetition_penalty: float = field(default=1.0, metadata={"help": "Repetition penalty of the rollout (1 = off)."})
    use_fusemt: bool = field(
        default=True, metadata={"help": "Use PaddleNLP's fused inference model for rollout when paddlenlp_ops exists."}
    )
    eval_mode: Optional[str] = field(
        default=None,
        metadata={"help": "Rollout model under pipeline parallel: None, 'single' or 'tensor_parallel'."},
    )
    # Algorithm
    rl_algorithm: str = field(
        default="ppo",
        metadata={"help": "ppo (GAE with a critic), grpo, rloo or reinforce_plus_plus (critic-free); see "
                          "ppo.models.advantages."},
    )
    normalize_advantage_std: bool = field(
        default=True, metadata={"help": "grpo: divide by the group's std; false gives Dr. GRPO (r - mean)."}
    )
    kl_loss_coeff: float = field(
        default=0.0, metadata={"help": "Weight of a k3 KL(actor || reference) loss term (GRPO-style); 0 = none."}
    )
    clip_range_ratio_low: Optional[float] = field(
        default=None, metadata={"help": "Lower ratio clip: ratio >= 1 - this. Default: clip_range_ratio."}
    )
    clip_range_ratio_high: Optional[float] = field(
        default=None, metadata={"help": "Upper ratio clip: ratio <= 1 + this. Default: clip_range_ratio."}
    )
    # PPO
    update_iters: int = field(default=1, metadata={"help": "Passes over each rollout's experience."})
    kl_coeff: float = field(default=0.02, metadata={"help": "Coefficient of the per-token KL penalty in the reward."})
    kl_estimator: str = field(default="k1", metadata={"help": "KL estimator of the penalty: k1, k2 or k3."})
    clip_range_score: float = field(default=50.0, metadata={"help": "Reward-model scores are clipped to ±this."})
    clip_range_value: float = field(default=5.0, metadata={"help": "Critic values may move ±this from the old values."})
    clip_range_ratio: float = field(default=0.2, metadata={"help": "PPO ratio clip ε: ratio kept in [1-ε, 1+ε]."})
    gamma: float = field(default=1.0, metadata={"help": "Discount factor of GAE."})
    gae_lambda: float = field(default=0.95, metadata={"help": "λ of GAE."})
    whiten_advantages: bool = field(default=False, metadata={"help": "Normalise advantages to zero mean, unit std."})
    loss_reduction: str = field(
        default="token-mean",
        metadata={"help": "Masked reduction of the actor/critic losses: token-mean (per micro-batch, then averaged over "
                          "accumulation steps and ranks), seq-mean-token-mean, or global-token-mean (every action token "
                          "of the optimizer step weighs the same, across micro-batches and ranks)."},
    )
    ptx_coeff: float = field(default=16.0, metadata={"help": "Weight of the ptx language-model loss."})
    reward_functions: Optional[List[str]] = field(
        default=None,
        metadata={"help": "Rule-based rewards 'module:function', each called as f(prompt, response, raw_sample) -> "
                          "float and added to the reward model's score (see ppo.rewards)."},
    )
    reward_function_weights: Optional[List[float]] = field(
        default=None, metadata={"help": "One weight per reward function (default 1.0 each)."}
    )
    reward_model_weight: float = field(
        default=1.0,
        metadata={"help": "Weight of the reward model's score in the total reward; 0 with reward_functions needs no "
                          "reward model."},
    )
    normalize_reward: bool = field(
        default=False, metadata={"help": "Normalise reward scores with the statistics saved in the reward model."}
    )
    max_consecutive_nonfinite_steps: int = field(
        default=3, metadata={"help": "Stop after this many consecutive updates with NaN/inf loss (each is skipped)."}
    )
    num_eval_samples_to_save: int = field(default=8, metadata={"help": "Generations written per evaluation."})
    old_log_probs_from_rollout: Optional[bool] = field(
        default=None,
        metadata={"help": "Take the actor's old log-probs from the rollout engine (one actor forward less per rollout). "
                          "Unset: when the run is fp32 without AMP, where they equal the recomputation to float32 "
                          "rounding; false: always recompute."},
    )
    old_values_from_update: Optional[bool] = field(
        default=None,
        metadata={"help": "Take the critics' old values from their first training forward (one critic forward less per "
                          "rollout); possible when a rollout is one optimizer step (update_iters 1, every micro-batch "
                          "accumulated), without pipeline parallel, critic rollout copies or critic dropout. Unset: "
                          "whenever possible; true: required (an error says what prevents it); false: score with the critic."},
    )
    # Critic overrides of the TrainingArguments
    critic_learning_rate: float = field(default=5e-6, metadata={"help": "Learning rate of the critic."})
    critic_weight_decay: float = field(default=0.0, metadata={"help": "Weight decay of the critic."})
    critic_lr_scheduler_type: str = field(default="constant", metadata={"help": "LR scheduler of the critic."})
    critic_warmup_ratio: float = field(default=0.03, metadata={"help": "Warmup ratio of the critic's scheduler."})
    critic_recompute: bool = field(default=False, metadata={"help": "Activation recomputation for the critic."})
    # Memory
    offload_level: str = field(
        default="",
        metadata={"help": "Space-separated subset of 'freeze_model optimizer train_model' to offload between phases."},
    )

    def __post_init__(self):
        super().__post_init__()
        self.check_lagrangian_arguments()
        if self.eval_mode == "":
            self.eval_mode = None  # the seed's example config writes "" for "not set"
        _check(self.per_device_prompt_batch_size >= 1, "per_device_prompt_batch_size must be >= 1")
        _check(self.num_return_sequences >= 1, "num_return_sequences must be >= 1")
        _check(self.temperature > 0, f"temperature must be > 0, got {self.temperature}")
        _check(0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}")
        _check(self.repetition_penalty > 0, f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        _check(self.update_iters >= 1, "update_iters must be >= 1")
        _check(self.kl_coeff >= 0, "kl_coeff must be >= 0")
        _check(self.kl_loss_coeff >= 0, f"kl_loss_coeff must be >= 0, got {self.kl_loss_coeff}")
        self.estimator  # unknown rl_algorithm: the error lists the valid ones
        if self.estimator.needs_groups and self.num_return_sequences < 2:
            raise ValueError(
                f"rl_algorithm={self.rl_algorithm!r} compares each response with the other responses to the same "
                f"prompt, so it needs num_return_sequences >= 2 (got {self.num_return_sequences}); with one "
                "response per prompt every advantage would be 0"
            )
        if isinstance(self.reward_functions, str):
            self.reward_functions = [part.strip() for part in self.reward_functions.split(",") if part.strip()]
        load_reward_functions(self.reward_functions, self.reward_function_weights)  # fails here on every rank
        _check(
            self.reward_model_weight != 0 or bool(self.reward_functions),
            "reward_model_weight is 0 and no reward_functions are given: nothing would score the responses",
        )
        if self.clip_range_ratio_low is None:
            self.clip_range_ratio_low = self.clip_range_ratio
        if self.clip_range_ratio_high is None:
            self.clip_range_ratio_high = self.clip_range_ratio
        if self.pipeline_parallel_degree > 1:
            # The Pipe policy's last-stage loss (ppo.models.model_pp) knows only the PPO objective.
            _check(
                self.rl_algorithm == AdvantageEstimator.PPO.value
                and self.kl_loss_coeff == 0
                and self.clip_range_ratio_low == self.clip_range_ratio_high,
                f"pipeline parallel supports rl_algorithm='ppo' with kl_loss_coeff=0 and symmetric clipping only (got "
                f"rl_algorithm={self.rl_algorithm!r}, kl_loss_coeff={self.kl_loss_coeff}, clip_range_ratio_low/high="
                f"{self.clip_range_ratio_low}/{self.clip_range_ratio_high})",
            )
        for name in ("clip_range_score", "clip_range_value", "clip_range_ratio", "clip_range_ratio_low", "clip_range_ratio_high"):
            _check(getattr(self, name) > 0, f"{name} must be > 0, got {getattr(self, name)}")
        _check(0 <= self.gamma <= 1 and 0 <= self.gae_lambda <= 1, "gamma and gae_lambda must lie in [0, 1]")
        _check(self.ptx_coeff >= 0, "ptx_coeff must be >= 0")
        _check(self.max_consecutive_nonfinite_steps >= 1, "max_consecutive_nonfinite_steps must be >= 1")
        for name, allowed in (("kl_estimator", [choice.value for choice in KLEstimator]), ("loss_reduction", LOSS_REDUCTIONS)):
            _check(getattr(self, name) in allowed, f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        check_pipeline_loss_reduction(self)
        _check(
            self.eval_mode in EVAL_MODES,
            f"eval_mode must be one of {EVAL_MODES}, got {self.eval_mode!r}",
        )
        unknown = [token for token in self.offload_level.split() if token not in OFFLOAD_TOKENS]
        _check(
            not unknown,
            f"offload_level has unknown entries {unknown}; use a space-separated subset of {list(OFFLOAD_TOKENS)}",
        )
        rollout_size = self.per_device_prompt_batch_size * self.num_return_sequences
        _check(
            rollout_size % self.per_device_train_batch_size == 0,
            f"per_device_prompt_batch_size * num_return_sequences = {rollout_size} responses per rollout must be "
            f"divisible by per_device_train_batch_size = {self.per_device_train_batch_size}",
        )
        micro_batches = rollout_size // self.per_device_train_batch_size
        _check(
            micro_batches % self.gradient_accumulation_steps == 0,
            f"each rollout gives {micro_batches} micro-batches of per_device_train_batch_size, which must be "
            f"divisible by gradient_accumulation_steps = {self.gradient_accumulation_steps} so that no optimizer step "
            "mixes two rollouts",
        )

    @property
    def estimator(self) -> EstimatorSpec:
        """The registered advantage estimator of `rl_algorithm` (what it needs: critic, groups)."""
        return advantage_estimator(self.rl_algorithm)

    @property
    def uses_critic(self) -> bool:
        return self.estimator.needs_critic

    @property
    def uses_cost_model(self) -> bool:
        """PPO-Lagrangian: a frozen cost model and a trained cost critic."""
        return self.rl_algorithm == AdvantageEstimator.PPO_LAG.value

    @property
    def uses_reference(self) -> bool:
        """Whether the frozen reference model is built: for any KL term (in the reward or as a loss).
        PPO keeps it even without one, as before, so its logged kl_divergence stays measured."""
        return self.kl_coeff > 0 or self.kl_loss_coeff > 0 or self.rl_algorithm in PPO_FAMILY

    @property
    def loss_math_reduction(self) -> str:
        """The reduction of `ppo.models.ppo_model_utils.masked_mean` each micro-batch loss uses;
        global-token-mean sums, and the trainer divides by the optimizer step's token count."""
        return Reduction.TOKEN_SUM.value if self.loss_reduction == GLOBAL_TOKEN_MEAN else self.loss_reduction

    @property
    def offload_targets(self) -> frozenset:
        return frozenset(self.offload_level.split())

    @property
    def micro_batches_per_rollout(self) -> int:
        return self.per_device_prompt_batch_size * self.num_return_sequences // self.per_device_train_batch_size

    @property
    def optimizer_steps_per_rollout(self) -> int:
        return self.update_iters * self.micro_batches_per_rollout // self.gradient_accumulation_steps

    def critic_arguments(self) -> "PPOTrainingArguments":
        """The same arguments with the `critic_*` overrides applied (the critic logs nothing itself)."""
        critic = copy.copy(self)
        critic.learning_rate = self.critic_learning_rate
        critic.weight_decay = self.critic_weight_decay
        critic.lr_scheduler_type = self.critic_lr_scheduler_type
        critic.warmup_ratio = self.critic_warmup_ratio
        # PaddleNLP prefers warmup_steps over warmup_ratio: the actor's steps must not override
        # critic_warmup_ratio.
        critic.warmup_steps = 0
        critic.recompute = self.critic_recompute
        critic.report_to = []
        return critic


GLOBAL_TOKEN_MEAN = "global-token-mean"
# Algorithms that keep the reference (and log its KL) even without a KL term.
PPO_FAMILY = (AdvantageEstimator.PPO.value, AdvantageEstimator.PPO_LAG.value)
LOSS_REDUCTIONS = [Reduction.TOKEN_MEAN.value, Reduction.SEQ_MEAN_TOKEN_MEAN.value, GLOBAL_TOKEN_MEAN]


def check_pipeline_loss_reduction(args) -> None:
    """The Pipe models' last-stage loss reduces one micro-batch: no global token mean there."""
    _check(
        not (args.pipeline_parallel_degree > 1 and args.loss_reduction == GLOBAL_TOKEN_MEAN),
        f"loss_reduction={GLOBAL_TOKEN_MEAN!r} is not supported under pipeline parallel (the Pipe loss sees one "
        "micro-batch); use token-mean or seq-mean-token-mean",
    )


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)
