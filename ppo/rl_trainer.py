"""The RL loop every algorithm shares: rollout → scoring → (algorithm) experience → updates, with
logging, evaluation, checkpoints and exact resume.

`RLTrainer` owns the models and everything that does not depend on the algorithm: generation, the
frozen models' scores (reference log-probs, reward), the trained models' rollout-time outputs
(old log-probs, old values), the optimizer-step loop over accumulated micro-batches, metrics,
evaluation, offloading and checkpoints. A subclass is the algorithm: `build_experience` turns a
scored rollout into advantages and targets, and the role Trainers' `compute_loss` hooks
(`ppo.trainer_utils`) turn experience into losses. `PPOTrainer` (`ppo.ppo_trainer`) is PPO and
the critic-free estimators of `ppo.models.advantages`.

Trained models ("roles"): the actor, and one value model per entry of `critics` (PPO's critic,
role "critic"). Each is driven by its own PaddleNLP `Trainer` (own optimizer, scheduler, AMP
scaler and distributed wrapping) through its public hooks: `create_optimizer_and_scheduler`,
`training_step` (which calls our `compute_loss`) and `log`. The loop below is RL's own: it is not
a copy of `Trainer.train`. Frozen models: the reference (only with a KL term) and the reward model
(none when rule-based `reward_functions` alone score).

Step accounting: one *optimizer step* = `gradient_accumulation_steps` micro-batches of
`per_device_train_batch_size` responses. `global_step`, `max_steps`, `logging_steps`,
`save_steps` and `eval_steps` all count optimizer steps. A rollout of
`per_device_prompt_batch_size × num_return_sequences` responses gives
`update_iters × micro_batches / gradient_accumulation_steps` optimizer steps.

Several processes (`paddle.distributed.launch`): each data-parallel replica takes its own slice of
every global prompt batch and samples from its own RNG stream; rollout statistics, whitening and
logged metrics are reduced across replicas so that every rank logs the values one process would
log for the whole global batch; only rank 0 writes logs and checkpoint files shared by all ranks.
Under pipeline parallel (and sharding stage3) the trained models cannot generate: a rollout copy
(`RolloutCopy`) generates and scores, refreshed from the trained weights before each rollout.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import shutil
import time
from dataclasses import dataclass, fields
from typing import Dict, List, Optional, Tuple

import paddle
import paddle.distributed as dist
from paddlenlp.trainer import PrinterCallback, ProgressCallback
from paddlenlp.utils.log import logger
from tqdm.auto import tqdm

from ppo.arguments import GLOBAL_TOKEN_MEAN, PPOTrainingArguments
from ppo.checkpoint import (
    CHECKPOINT_PREFIX,
    PPO_STATE_NAME,
    PPOState,
    load_portable_optimizer_state,
    load_rng_state,
    portable_optimizer_state,
    publish_checkpoint,
    resolve_resume_path,
    rotate_checkpoints,
    save_rng_state,
)
from ppo.checkpoint_files import remove_stale_staging, staging_dir
from ppo.comm_utils import (
    OffloadManager,
    all_reduce_max,
    all_reduce_sum,
    is_distributed,
    layer_movers,
    managed_offload_objects,
    optimizer_movers,
    reduce_metrics,
)
from ppo.experience import Experience, PromptBatch
from ppo.infer_utils import RolloutEngine, RolloutOutput
from ppo.metrics import MetricTracker, mean_stats, rollout_metrics, rollout_sums
from ppo.model_io import load_model_weights, save_model_dir, tokenizers_match
from ppo.models.ppo_model_utils import ResponseWindow, action_mask_from, make_position_ids, response_lengths
from ppo.plotting import plot_training_curves
from ppo.preemption import PreemptionGuard
from ppo.reward_scoring import RewardScorer, SequenceScorer, exclude_nonfinite_rewards
from ppo.rollout_copies import RolloutCopy, check_rollout_copies, uses_sharding_stage3, weight_refresher
from ppo.sampling import EpochSampler, RolloutRandomState, batch_iterator
from ppo.tokenizer_io import decode
from ppo import values_from_update
from ppo.trainer_utils import (
    GradientSync,
    NonFiniteLossError,
    PolicyTrainer,
    StepStats,
    ValueTrainer,
    current_learning_rate,
    optimizer_step,
    pipeline_step_stats,
    response_log_probs,
    response_values,
)

METRICS_FILE = "ppo_metrics.jsonl"
CURVES_FILE = "training_curves.png"
PENDING_EXPERIENCE_NAME = "pending_experience.pdparams"
ROLLOUT_RNG_NAME = "rollout_rng_state"
ALGORITHM_STATE_NAME = "algorithm_state.json"
SCALER_NAME = "{role}_scaler.pdparams"
RNG_TRACKER_NAME = "model_parallel_rng_tracker.rank{rank}.pkl"
EVAL_SEED_OFFSET = 1_000_003  # evaluation's sampling stream: seed + this (+ data-parallel rank)
# Largest float32 logits tensor [rows, L, V] one scoring forward may make (64 Mi elements = 256 MiB).
SCORING_CHUNK_ELEMENTS = 1 << 26


@dataclass
class ScoredRollout:
    """A rollout scored by every model (`RLTrainer.score_rollout`), before its experience is built."""

    scored: Dict[str, paddle.Tensor]
    prompt_length: int
    breakdown: Dict[str, List[float]]  # reward function -> this rank's scores
    nonfinite: int  # responses left out for a NaN/inf score


@dataclass
class RolloutWork:
    """One rollout's experience and how far the updates on it have got. With `pending` the
    critics' old values are still to come from their first training forward (see
    `ppo.values_from_update`): `experience` then holds the token rewards, but its values,
    advantages and returns are placeholders until the first update replaces it."""

    experience: Experience
    update_iter: int = 0
    micro_batch: int = 0
    pending: Optional[ScoredRollout] = None


@dataclass
class CriticRole:
    """A trained value model: its rollout copy (or None), the Experience fields of its values at
    rollout time and of its targets, and the name its loss is logged under."""

    model: object
    rollout_model: Optional[object] = None
    old_values_field: str = "old_values"
    returns_field: str = "returns"
    token_rewards_field: str = "rewards"  # what its values estimate (PPO-Lagrangian's cost critic: "costs")
    loss_name: str = "reward_critic_loss"


class RLTrainer:
    """The shared RL loop; subclasses implement `build_experience` (see the module docstring)."""

    #: Output directory name of each trained role's final model ("policy", "value" as PaddleNLP's
    #: alignment example writes them).
    OUTPUT_NAMES = {"actor": "policy", "critic": "value"}
    #: What `build_experience` returns (pending experience is restored as this on resume).
    EXPERIENCE_CLASS = Experience

    def __init__(
        self,
        args: PPOTrainingArguments,
        actor_model,
        reference_model,
        reward_model,
        tokenizer,
        train_dataset,
        max_length: int,
        critics: Optional[Dict[str, CriticRole]] = None,
        reward_tokenizer=None,
        eval_dataset=None,
        ptx_dataset=None,
        callbacks=None,
        actor_rollout_model=None,
        max_new_tokens: Optional[int] = None,
    ):
        """`critics`: role -> trained value model (PPO: {"critic": ...}; none for critic-free
        algorithms). `actor_rollout_model` and each critic's `rollout_model`: optional non-training
        copies that generate and score rollouts instead of the trained models (required under
        pipeline parallel, see `ppo.run_ppo.build_models`); they are refreshed from the trained
        weights before every rollout that follows an optimizer step.

        `max_new_tokens`: the response budget of every rollout and evaluation batch (prompts must
        then fit in `max_length - max_new_tokens`); None: `max_length` minus the longest prompt of
        the global batch, or of the whole eval set (see `response_budget`)."""
        self.args = args
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.max_new_tokens = max_new_tokens
        self.actor_model, self.reference_model, self.reward_model = actor_model, reference_model, reward_model
        self.critics: Dict[str, CriticRole] = dict(critics or {})
        self._wrapped: Dict[str, object] = {}  # role -> the model as wrapped for training (see `train`)
        self.rollout_copies: Dict[str, RolloutCopy] = {}
        for role, source, copy in (
            ("actor", actor_model, actor_rollout_model),
            *((role, critic.model, critic.rollout_model) for role, critic in self.critics.items()),
        ):
            if copy is not None and source is not None:
                self.rollout_copies[role] = RolloutCopy(copy, weight_refresher(args, role, source, copy, self._wrapped))
        check_rollout_copies(args, self.rollout_copies)
        # Frozen models are never wrapped for data/sharding parallelism: only the role Trainers wrap.
        for frozen in self.frozen_models():
            frozen.eval()
            for parameter in frozen.parameters():
                parameter.stop_gradient = True
        # A response ends at the prompts' template's end-of-turn token (and EOS), in generation
        # and in every mask built from the rollout.
        self.template = getattr(train_dataset, "template", None)
        self.stop_token_ids = self.template.stop_token_ids if self.template is not None else (tokenizer.eos_token_id,)
        self.reward_scorer = RewardScorer(
            self.score_model_reader(reward_model, reward_tokenizer, (train_dataset, eval_dataset), "reward model"),
            tokenizer,
            self.stop_token_ids,
            args.reward_functions,
            args.reward_function_weights,
            args.reward_model_weight,
            (train_dataset, eval_dataset),
        )

        self.actor_trainer = PolicyTrainer(model=actor_model, args=args, tokenizer=tokenizer, callbacks=callbacks)
        self.critic_trainers = {
            role: ValueTrainer(
                model=critic.model, args=self.critic_arguments(role), tokenizer=tokenizer,
                values_field=critic.old_values_field, returns_field=critic.returns_field, loss_name=critic.loss_name,
            )  # fmt: skip
            for role, critic in self.critics.items()
        }
        for trainer in self.trainers.values():
            # We print our own log lines and progress bar; keep only reporting integrations.
            trainer.pop_callback(PrinterCallback)
            trainer.pop_callback(ProgressCallback)

        self.engine = RolloutEngine(
            self.rollout_model("actor"),
            eos_token_id=self.stop_token_ids,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
            use_fusemt=args.use_fusemt,
        )

        self.train_dataset, self.eval_dataset, self.ptx_dataset = train_dataset, eval_dataset, ptx_dataset
        self.prompt_sampler = EpochSampler(
            len(train_dataset), args.per_device_prompt_batch_size, seed=args.seed,
            rank=args.dataset_rank, num_replicas=args.dataset_world_size,
        )
        self.prompt_batches = batch_iterator(train_dataset, self.prompt_sampler, train_dataset.get_collator())
        self.ptx_sampler = self.ptx_batches = None
        if ptx_dataset is not None and args.ptx_coeff > 0:
            self.ptx_sampler = EpochSampler(
                len(ptx_dataset), args.per_device_train_batch_size, seed=args.seed + 1,
                rank=args.dataset_rank, num_replicas=args.dataset_world_size,
            )
            self.ptx_batches = batch_iterator(ptx_dataset, self.ptx_sampler, ptx_dataset.get_collator())

        # One stream per data-parallel replica (see RolloutRandomState); single process: args.seed.
        self.rollout_rng = RolloutRandomState(args.seed + args.dataset_rank)
        self.state = PPOState()
        self.tracker = MetricTracker()
        self.max_steps = self._resolve_max_steps()
        self.offload = None  # built once the optimizers exist (see `train`)
        self._gradient_sync: Dict[str, GradientSync] = {}
        self._preemption: Optional[PreemptionGuard] = None  # installed while `train` runs
        self._stop_requested = False
        self._preempted_checkpoint: Optional[str] = None
        self._saved_step: Optional[int] = None
        # Decided once: an impossible `old_values_from_update: true` fails here, before any work.
        self.values_from_update = values_from_update.decide(
            args.old_values_from_update,
            values_from_update.blockers(args, {role: critic.model for role, critic in self.critics.items()}, self.rollout_copies),
        )

    # ------------------------------------------------------------------------------------------
    # What an algorithm defines

    def build_experience(self, scored: Dict[str, paddle.Tensor], prompt_length: int) -> Experience:
        """The experience of a scored rollout: `scored` has input_ids, attention_mask,
        old_log_probs, reference_log_probs (with a reference), each critic's old values and
        reward_scores, all [B, ...] over this rank's rollout."""
        raise NotImplementedError

    def observe_rollout(self, scored: Dict[str, paddle.Tensor], prompt_length: int) -> None:
        """Algorithm state that follows each rollout once (PPO-Lagrangian's λ), before
        `build_experience`, which may then run more than once on the rollout (see
        `ppo.values_from_update`)."""

    def critic_arguments(self, role: str) -> PPOTrainingArguments:
        """The Trainer arguments of a critic role (PPO: the `critic_*` overrides)."""
        return self.args.critic_arguments()

    def extra_scores(self, input_ids, attention_mask, prompt_length: int) -> Dict[str, paddle.Tensor]:
        """Further per-sequence scores of a rollout chunk the algorithm needs (e.g. a cost model's)."""
        return {}

    # ------------------------------------------------------------------------------------------
    # Set-up

    def frozen_models(self) -> List[object]:
        """Models that are never trained: reference, reward model, rollout copies."""
        models = [self.reference_model, self.reward_model, *(copy.model for copy in self.rollout_copies.values())]
        return [model for model in models if model is not None]

    def score_model_reader(self, model, score_tokenizer, prompt_datasets, name: str) -> Optional[SequenceScorer]:
        """A `SequenceScorer` for a frozen score model (None for no model); it re-tokenises only
        when the model's vocabulary differs from the actor's."""
        if model is None:
            return None
        if score_tokenizer is not None and tokenizers_match(self.tokenizer, score_tokenizer):
            score_tokenizer = None
        object_name = name.replace(" ", "_")
        return SequenceScorer(
            model,
            self.tokenizer,
            score_tokenizer,
            self.template,
            self.stop_token_ids,
            prompt_datasets,
            autocast=lambda: self.actor_trainer.autocast_smart_context_manager(),
            before_use=lambda: self._require(object_name),
            name=name,
        )

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps of one pass over the prompt dataset (its rollouts' updates included)."""
        return self.prompt_sampler.batches_per_epoch * self.args.optimizer_steps_per_rollout

    def _resolve_max_steps(self) -> int:
        args = self.args
        if args.max_steps > 0:
            return args.max_steps
        rollouts = int(args.num_train_epochs * self.prompt_sampler.batches_per_epoch)
        steps = rollouts * args.optimizer_steps_per_rollout
        if steps < 1:
            raise ValueError("num_train_epochs gives no optimizer step; raise it or set max_steps")
        return steps

    @property
    def trainers(self) -> Dict[str, object]:
        """role -> PaddleNLP Trainer of every trained model: "actor", then each critic role."""
        return {"actor": self.actor_trainer, **self.critic_trainers}

    @property
    def trained_models(self) -> Dict[str, object]:
        """Output directory name -> trained model ("policy", "value", ...)."""
        models = {self.OUTPUT_NAMES.get("actor", "actor"): self.actor_model}
        for role, critic in self.critics.items():
            models[self.OUTPUT_NAMES.get(role, role)] = critic.model
        return models

    @property
    def is_main_process(self) -> bool:
        return self.args.process_index == 0

    def rollout_model(self, role: str):
        """The model that plays `role` in rollouts: its rollout copy, else the trained model."""
        if role in self.rollout_copies:
            return self.rollout_copies[role].model
        return self.actor_model if role == "actor" else self.critics[role].model

    def phase_needs(self, phase: str) -> Tuple[str, ...]:
        """Which offloadable objects each phase uses (see `OffloadManager`); "<role>_rollout_model"
        is a role's rollout copy, or the trained model itself without one."""
        roles = list(self.trainers)
        rollout_models = tuple(f"{role}_rollout_model" for role in roles)
        trained = tuple(name for role in roles for name in (f"{role}_model", f"{role}_optimizer"))
        return {
            "rollout": ("actor_rollout_model",),
            "score": (*rollout_models, "reference_model", "reward_model", *self.extra_frozen_names()),
            "train": trained,
            "eval": ("actor_rollout_model", "reward_model", *self.extra_frozen_names()),
            "save": trained,
            "refresh": (*(f"{role}_model" for role in roles), *rollout_models),
        }[phase]

    def extra_frozen_names(self) -> Tuple[str, ...]:
        """Offload names of further frozen models the algorithm scores with (e.g. "cost_model")."""
        return ()

    def offloadable_models(self) -> Dict[str, object]:
        models = {"actor_model": self.actor_model, "reference_model": self.reference_model, "reward_model": self.reward_model}
        models.update({f"{role}_model": critic.model for role, critic in self.critics.items()})
        return models

    def _build_offload_manager(self) -> OffloadManager:
        movers = {name: layer_movers(model) for name, model in self.offloadable_models().items() if model is not None}
        for role, trainer in self.trainers.items():
            movers[f"{role}_optimizer"] = optimizer_movers(trainer.optimizer)
        for role, copy in self.rollout_copies.items():
            movers[f"{role}_rollout_model"] = layer_movers(copy.model)
        args = self.args
        managed = managed_offload_objects(args.offload_targets, args.sharding, args.offload_optim)
        return OffloadManager(managed, movers)

    def _object_name(self, name: str) -> str:
        """Without a rollout copy, the rollout role is played by the trained model itself."""
        if name.endswith("_rollout_model"):
            role = name[: -len("_rollout_model")]
            if role not in self.rollout_copies:
                return f"{role}_model"
        return name

    def _enter(self, phase: str) -> None:
        if self.offload is not None:
            self.offload.enter(phase, [self._object_name(name) for name in self.phase_needs(phase)])

    def _require(self, *names: str) -> None:
        if self.offload is not None:  # None until `train` (or a caller) builds the manager
            self.offload.require(*(self._object_name(name) for name in names))

    def _refresh_rollout_copies(self) -> None:
        """Before a rollout or evaluation: bring stale copies up to date (same point on all ranks)."""
        if any(copy.stale for copy in self.rollout_copies.values()):
            self._enter("refresh")
            for copy in self.rollout_copies.values():
                copy.refresh()

    def _wrap_for_training(self, role: str, trainer):
        # PaddleNLP has no public API for "wrap this model for the configured AMP (fp16/bf16 O2
        # decoration, amp_master_grad) and data/sharding/pipeline parallelism"; `_wrap_model` is what
        # its own loop calls, in one process too, used here and only here.
        model = trainer._wrap_model(trainer.model)
        self._wrapped[role] = model
        self._gradient_sync[role] = GradientSync(model, recompute=trainer.args.recompute)
        return model

    # ------------------------------------------------------------------------------------------
    # Rollout and scoring

    @property
    def fixed_response_budget(self) -> bool:
        """Whether every batch gets `max_new_tokens` (else the budget follows the longest prompt)."""
        return self.max_new_tokens is not None

    def response_budget(self, prompt_batch: PromptBatch, longest_prompt: Optional[int] = None) -> int:
        """New tokens a batch may generate. With `max_new_tokens` it is that, whatever prompts
        share the batch. Without it: max_length - `longest_prompt` (default: this batch's padded
        prompt width); callers pass a length that does not depend on how the prompts are split
        over processes, so that 1 and N processes give responses the same budget."""
        if self.fixed_response_budget:
            if prompt_batch.prompt_length + self.max_new_tokens > self.max_length:
                raise ValueError(
                    f"prompts of {prompt_batch.prompt_length} tokens + max_new_tokens={self.max_new_tokens} exceed "
                    f"max_length={self.max_length}; build the prompt datasets with max_prompt_length <= "
                    f"{self.max_length - self.max_new_tokens} (ppo.run_ppo does)"
                )
            return self.max_new_tokens
        prompt_length = longest_prompt if longest_prompt is not None else prompt_batch.prompt_length
        if self.max_length - prompt_length < 1:
            raise ValueError(
                f"prompts of {prompt_length} tokens leave no room to generate within max_length={self.max_length}"
            )
        return self.max_length - prompt_length

    @property
    def old_log_probs_from_rollout(self) -> bool:
        """Whether the actor's old log-probs are the rollout engine's, sparing the actor's scoring
        forward. Only our decoder backend returns them. `old_log_probs_from_rollout` in the
        arguments decides when set; unset (None), they are used when the engine's numerics are
        the scoring forward's: float32 weights without AMP, where the two agree to float32
        rounding (max 1e-6 at SmolLM2 shapes, `tests/test_fast_paths.py`). Under fp16/bf16 the
        scoring forward runs in half precision and the recomputation is kept."""
        if self.engine.backend != "decoder":
            return False
        setting = self.args.old_log_probs_from_rollout
        if setting is not None:
            return bool(setting)
        if self.args.fp16 or self.args.bf16:
            return False
        parameter = next(iter(self.rollout_model("actor").parameters()), None)
        return parameter is not None and parameter.dtype == paddle.float32

    @paddle.no_grad()
    def generate(
        self,
        prompt_batch: PromptBatch,
        num_return_sequences: int,
        longest_prompt: Optional[int] = None,
        rng: Optional[RolloutRandomState] = None,
    ) -> RolloutOutput:
        """Sample `response_budget(prompt_batch, longest_prompt)` new tokens at most per response,
        drawing from `rng` (default: the rollout stream)."""
        max_new_tokens = self.response_budget(prompt_batch, longest_prompt)
        self._require("actor_rollout_model")
        self.rollout_model("actor").eval()
        with (rng or self.rollout_rng).active():
            return self.engine.generate(
                prompt_batch.input_ids,
                prompt_batch.attention_mask,
                max_new_tokens=max_new_tokens,
                num_return_sequences=num_return_sequences,
                do_sample=True,
                temperature=self.args.temperature,
                top_p=self.args.top_p,
                repetition_penalty=self.args.repetition_penalty,
                # Training rollouts only: evaluation never reads them.
                return_log_probs=rng is None and self.old_log_probs_from_rollout,
            )

    def _token_log_probs(self, model, input_ids, attention_mask, position_ids, window: ResponseWindow) -> paddle.Tensor:  # [B, L-1]
        """Log-probs of the response tokens under `model` (0 at prompt and padding columns), from a
        forward over the rows' own longest response with the LM head on response positions only."""
        with self.actor_trainer.autocast_smart_context_manager():
            log_probs, _ = response_log_probs(model, input_ids, attention_mask, position_ids, window, self.args.temperature)
        return window.to_full(log_probs)

    def _token_values(self, model, input_ids, attention_mask, position_ids, window: ResponseWindow) -> paddle.Tensor:  # [B, L-1]
        """A value model's scores at the positions that predict response tokens (0 elsewhere)."""
        with self.actor_trainer.autocast_smart_context_manager():
            values = response_values(model, input_ids, attention_mask, position_ids, window)
        return window.to_full(values)

    def reward_scores(self, input_ids, attention_mask, prompt_length: Optional[int] = None, breakdown=None) -> paddle.Tensor:
        """Rewards [B] of whole sequences (see `ppo.reward_scoring.RewardScorer`)."""
        return self.reward_scorer(input_ids, attention_mask, prompt_length, breakdown)

    def scoring_chunk_rows(self, sequence_length: int) -> int:
        """Rows per scoring forward: as many multiples of per_device_train_batch_size as keep one
        chunk's float32 [rows, L, vocab + intermediate] within `SCORING_CHUNK_ELEMENTS` (fewer,
        larger forwards where the memory allows; at least one micro-batch)."""
        size = self.args.per_device_train_batch_size
        config = getattr(self.rollout_model("actor"), "config", None)
        # Per position: the logits, and the MLP activation as a stand-in for the other activations.
        width = (getattr(config, "vocab_size", 0) or 0) + (getattr(config, "intermediate_size", 0) or 0)
        multiples = max(1, SCORING_CHUNK_ELEMENTS // max(1, size * sequence_length * width))
        return size * multiples

    @paddle.no_grad()
    def score_rollout(
        self, rollout: RolloutOutput, breakdown: Dict[str, List[float]], with_critics: bool = True
    ) -> Dict[str, paddle.Tensor]:
        """Every model's rollout-time output, in chunks of `scoring_chunk_rows` rows; per-token
        outputs are [B, L-1] with 0 outside the response positions. Without `with_critics` the
        critics' old values are zeros, to be replaced by their first training forward's."""
        self._enter("score")
        self._require(*self.phase_needs("score"))
        for role in self.critics:
            self.rollout_model(role).eval()
        prompt_length = rollout.prompt_length
        rollout_log_probs = None
        if rollout.log_probs is not None:
            # The engine's log-probs of response column j predict token P + j: per-token column P-1+j.
            window = ResponseWindow(prompt_length, rollout.log_probs.shape[1], rollout.sequences.shape[1] - 1)
            rollout_log_probs = window.to_full(rollout.log_probs)
        chunks = []
        size = self.scoring_chunk_rows(rollout.sequences.shape[1])
        for start in range(0, rollout.sequences.shape[0], size):
            input_ids = rollout.sequences[start : start + size]
            attention_mask = rollout.attention_mask[start : start + size]
            position_ids = make_position_ids(attention_mask)
            window = ResponseWindow.of(attention_mask, prompt_length)  # shared by every model below
            chunk = dict(input_ids=input_ids, attention_mask=attention_mask)
            values = {
                critic.old_values_field: (
                    self._token_values(self.rollout_model(role), input_ids, attention_mask, position_ids, window)
                    if with_critics
                    else paddle.zeros([input_ids.shape[0], input_ids.shape[1] - 1], dtype="float32")
                )
                for role, critic in self.critics.items()
            }
            if rollout_log_probs is not None:
                chunk["old_log_probs"] = rollout_log_probs[start : start + size]
            else:
                chunk["old_log_probs"] = self._token_log_probs(
                    self.rollout_model("actor"), input_ids, attention_mask, position_ids, window
                )
            if self.reference_model is not None:
                chunk["reference_log_probs"] = self._token_log_probs(
                    self.reference_model, input_ids, attention_mask, position_ids, window
                )
            chunk.update(values)
            chunk["reward_scores"] = self.reward_scores(input_ids, attention_mask, prompt_length, breakdown)
            chunk.update(self.extra_scores(input_ids, attention_mask, prompt_length))
            chunks.append(chunk)
        return {name: paddle.concat([chunk[name] for chunk in chunks], axis=0) for name in chunks[0]}

    @paddle.no_grad()
    def make_experience(self, prompt_batch: PromptBatch) -> Experience:
        """Rollout, score with every model, and let the algorithm build the experience."""
        rollout = self._scored_rollout(prompt_batch, with_critics=True)
        self.observe_rollout(rollout.scored, rollout.prompt_length)
        return self._experience_of(rollout)

    def start_rollout(self, prompt_batch: PromptBatch) -> RolloutWork:
        """The work of one rollout: its experience, or (with `values_from_update`) its scores
        and the placeholder experience the critics train on first."""
        if not self.values_from_update:
            return RolloutWork(self.make_experience(prompt_batch))
        with paddle.no_grad():
            scored = self._scored_rollout(prompt_batch, with_critics=False)
            self.observe_rollout(scored.scored, scored.prompt_length)
            placeholder = self.build_experience(scored.scored, scored.prompt_length)
        return RolloutWork(placeholder, pending=scored)

    def _scored_rollout(self, prompt_batch: PromptBatch, with_critics: bool) -> ScoredRollout:
        self._refresh_rollout_copies()
        self._enter("rollout")
        # Without max_new_tokens: the longest prompt of the global batch (all replicas), as one
        # process would see it (every rank takes the same branch: the config is the same).
        longest_prompt = None if self.fixed_response_budget else int(all_reduce_max(float(prompt_batch.prompt_length)))
        rollout = self.generate(prompt_batch, self.args.num_return_sequences, longest_prompt)
        breakdown: Dict[str, List[float]] = {}
        scored = self.score_rollout(rollout, breakdown, with_critics=with_critics)
        nonfinite = self.exclude_nonfinite(scored, rollout.prompt_length)
        if nonfinite:
            logger.warning(f"{nonfinite} responses of this rollout have a NaN/inf reward: left out of the update")
        return ScoredRollout(scored, rollout.prompt_length, breakdown, nonfinite)

    def _experience_of(self, rollout: ScoredRollout) -> Experience:
        """The algorithm's experience of an observed scored rollout, its rollout metrics recorded."""
        experience = self.build_experience(rollout.scored, rollout.prompt_length)
        self._record_rollout_metrics(experience, rollout.breakdown, rollout.nonfinite)
        return experience

    def extra_rollout_metrics(self, sums: Dict[str, float]) -> Dict[str, float]:
        """Algorithm metrics from the globally summed `rollout_metric_sums` (e.g. train/cost)."""
        return {}

    def exclude_nonfinite(self, scored: Dict[str, paddle.Tensor], prompt_length: int) -> int:
        """Leave responses with a NaN/inf reward out of the update (see `exclude_nonfinite_rewards`);
        returns how many on this rank."""
        scored["reward_scores"], scored["attention_mask"], count = exclude_nonfinite_rewards(
            scored["reward_scores"], scored["attention_mask"], prompt_length, self.args.num_return_sequences
        )
        return count

    def rollout_metric_sums(self, experience: Experience) -> Dict[str, float]:
        """Additive statistics of this rank's rollout (see `ppo.metrics.rollout_sums`)."""
        return rollout_sums(experience, self.args.kl_estimator, with_critic="critic" in self.critics)

    def _record_rollout_metrics(
        self, experience: Experience, breakdown: Optional[Dict[str, List[float]]] = None, nonfinite: int = 0
    ) -> None:
        """Metrics of the global rollout (all replicas), identical on every rank; with reward
        functions also each one's mean finite score (train/reward_fn/<name>); the count of
        responses left out for a NaN/inf reward (train/nonfinite_rewards)."""
        local = self.rollout_metric_sums(experience)
        local["nonfinite_rewards"] = float(nonfinite)
        for name, values in (breakdown or {}).items():
            local[f"reward_fn/{name}"] = float(sum(value for value in values if math.isfinite(value)))
        names = sorted(local)
        sums = dict(zip(names, all_reduce_sum([local[name] for name in names])))
        metrics = rollout_metrics(sums)
        metrics["train/nonfinite_rewards"] = sums["nonfinite_rewards"]
        metrics.update(self.extra_rollout_metrics(sums))
        for name in breakdown or {}:
            metrics[f"train/reward_fn/{name}"] = sums[f"reward_fn/{name}"] / max(sums["responses"], 1.0)
        metrics["train/max_generated_length"] = all_reduce_max(float(response_lengths(experience.action_mask).max()))
        self.tracker.add({name: value for name, value in metrics.items() if name != "train/max_generated_length"})
        self.tracker.add_max({"train/max_generated_length": metrics["train/max_generated_length"]})
        self.state.latest_rollout_metrics = metrics

    # ------------------------------------------------------------------------------------------
    # Updates

    def role_inputs(self, role: str, experience: Experience, stats: StepStats) -> dict:
        """What a role's `compute_loss` reads for one micro-batch; the actor also gets the next
        supervised (ptx) batch when there is a ptx dataset."""
        inputs = {"experience": experience, "stats": stats}
        if role == "actor":
            inputs["ptx_batch"] = next(self.ptx_batches) if self.ptx_batches is not None else None
        return inputs

    def global_token_scale(self, micro_batches: List[Experience]) -> float:
        """loss_reduction global-token-mean: each micro-batch's loss is its token sum x this, so that
        after PaddleNLP's 1/gradient_accumulation_steps and the data-parallel gradient mean over
        ranks the step's gradient is that of (sum over every action token of the step, all
        micro-batches and ranks) / (their count). All-rank sums count a replica's tokens once per
        tensor/pipeline rank, as the world size does, so the ratio holds under hybrid parallel."""
        local = sum(float(experience.action_mask.astype("float32").sum()) for experience in micro_batches)
        (tokens,) = all_reduce_sum([local])
        return self.args.gradient_accumulation_steps * max(self.args.world_size, 1) / max(tokens, 1.0)

    def _update(self, micro_batches: List[Experience], wrapped: Dict[str, object], work: Optional[RolloutWork] = None) -> bool:
        """One optimizer step of every trained role over accumulated micro-batches (`work` with
        pending old values: the critics train first and fill them in, see `_train_critics_first`).
        Returns False (and leaves the weights untouched) when a loss was not finite."""
        self._require(*self.phase_needs("train"))
        losses = {}
        stats = [StepStats() for _ in micro_batches]
        token_scale = self.global_token_scale(micro_batches) if self.args.loss_reduction == GLOBAL_TOKEN_MEAN else None
        roles = list(self.trainers)
        try:
            if work is not None and work.pending is not None:
                micro_batches = self._train_critics_first(work, micro_batches, wrapped, stats, token_scale)
                roles = [role for role in roles if role not in self.critics]
            for index, experience in enumerate(micro_batches):
                is_last = index == len(micro_batches) - 1
                for role in roles:
                    inputs = self.role_inputs(role, experience, stats[index])
                    if token_scale is not None:
                        inputs["token_scale"] = token_scale
                    with self._gradient_sync[role].during(is_last):
                        losses[role] = self.trainers[role].training_step(wrapped[role], inputs)
            step_stats = [micro_batch_stats.values for micro_batch_stats in stats]
            if self.args.pipeline_parallel_degree > 1:
                # PaddleNLP's pipeline path buffers the micro-batches and runs forward and backward
                # in the last training_step; our loss hooks never run, so check the losses it returns.
                step_stats = [pipeline_step_stats(losses)]
            for sync in self._gradient_sync.values():
                sync.finish()
        except NonFiniteLossError as error:
            for trainer in self.trainers.values():
                trainer.optimizer.clear_grad()
            self.state.consecutive_nonfinite_steps += 1
            logger.warning(
                f"skipped an update at step {self.state.global_step + 1}: {error} "
                f"({self.state.consecutive_nonfinite_steps} in a row)"
            )
            if self.state.consecutive_nonfinite_steps >= self.args.max_consecutive_nonfinite_steps:
                raise RuntimeError(
                    f"{self.state.consecutive_nonfinite_steps} consecutive updates had a NaN/inf loss; stopping. "
                    "Lower the learning rates, check the reward scale (clip_range_score, normalize_reward) "
                    "or use fp32/bf16 instead of fp16."
                ) from error
            return False
        for trainer in self.trainers.values():
            optimizer_step(trainer)
        for copy in self.rollout_copies.values():
            copy.stale = True
        self.state.consecutive_nonfinite_steps = 0
        # Reduced per step so that every rank's tracker (saved by rank 0 in checkpoints) is the same.
        self.tracker.add({f"train/{name}": value for name, value in reduce_metrics(mean_stats(step_stats)).items()})
        return True

    def _train_critics_first(
        self, work: RolloutWork, micro_batches: List[Experience], wrapped: Dict[str, object],
        stats: List[StepStats], token_scale: Optional[float],
    ) -> List[Experience]:  # fmt: skip
        """Each critic's forward/backward over the whole rollout (one optimizer step's micro-batches),
        its detached values taken as the old values and the GAE returns of its token rewards as
        targets; then the rollout's experience with those values (its metrics recorded), split into
        the same micro-batches for the actor. `work.experience` becomes that experience."""
        if len(micro_batches) != math.ceil(work.experience.batch_size / self.args.per_device_train_batch_size):
            raise RuntimeError("old values from the update need the whole rollout in one optimizer step")
        old_values = {critic.old_values_field: [] for critic in self.critics.values()}
        for role, critic in self.critics.items():
            for index, experience in enumerate(micro_batches):
                inputs = {
                    "experience": experience,
                    "stats": stats[index],
                    "targets_from_values": self._critic_targets(critic, experience, old_values[critic.old_values_field]),
                }
                if token_scale is not None:
                    inputs["token_scale"] = token_scale
                with self._gradient_sync[role].during(index == len(micro_batches) - 1):
                    self.trainers[role].training_step(wrapped[role], inputs)
        pending = work.pending
        scored = dict(pending.scored, **{name: paddle.concat(parts, axis=0) for name, parts in old_values.items()})
        with paddle.no_grad():
            work.experience = self._experience_of(ScoredRollout(scored, pending.prompt_length, pending.breakdown, pending.nonfinite))
        work.pending = None
        return work.experience.split(self.args.per_device_train_batch_size)

    def _critic_targets(self, critic: CriticRole, experience: Experience, sink: List[paddle.Tensor]):
        """For `ValueTrainer.compute_loss`: old values [b, L-1] of this forward -> its returns; each
        call's old values are kept in `sink` (micro-batch order)."""
        args = self.args

        def targets(old_values: paddle.Tensor) -> paddle.Tensor:
            sink.append(old_values)
            return values_from_update.critic_returns(
                old_values, getattr(experience, critic.token_rewards_field), experience.action_mask, args.gamma, args.gae_lambda
            )

        return targets

    def _train_on(self, work: RolloutWork, wrapped: Dict[str, object], progress) -> bool:
        """Run the optimizer steps of one rollout; returns True when the rollout is used up."""
        args = self.args
        micro_batches = work.experience.split(args.per_device_train_batch_size)
        accumulation = args.gradient_accumulation_steps
        while work.update_iter < args.update_iters:
            while work.micro_batch < len(micro_batches):
                if self.state.global_step >= self.max_steps:
                    return False
                self._enter("train")
                group = micro_batches[work.micro_batch : work.micro_batch + accumulation]
                stepped = self._update(group, wrapped, work)
                work.micro_batch += accumulation
                if stepped:
                    self.state.global_step += 1
                    progress.update(1)
                    self._after_step(work, progress)
                    if self._preemption_due(work):
                        return False
            work.update_iter, work.micro_batch = work.update_iter + 1, 0
        return True

    def _preemption_due(self, work: RolloutWork) -> bool:
        """After an optimizer step: on SIGTERM/SIGINT (any rank), checkpoint this step and stop."""
        guard = self._preemption
        if guard is None or not guard.should_stop(self.args.world_size):
            return False
        self._stop_requested = True
        final = os.path.join(self.args.output_dir, f"{CHECKPOINT_PREFIX}{self.state.global_step}")
        # The step may have been saved by save_strategy already; else save it now.
        self._preempted_checkpoint = final if os.path.isdir(final) and self._saved_step == self.state.global_step else self.save_checkpoint(work)
        return True

    def step_logs(self) -> Dict[str, float]:
        """The metrics of one log point: the rollout being trained on, the tracked means, the
        learning rates (`train/actor_lr`, `train/critic_lr`, `train/<role>_lr`)."""
        # A log window inside one rollout has no new rollout: report the rollout being trained on.
        logs = {**self.state.latest_rollout_metrics, **self.tracker.pop()}
        for role, trainer in self.trainers.items():
            logs[f"train/{role}_lr"] = current_learning_rate(trainer)
        return logs

    def _after_step(self, work: Optional[RolloutWork], progress) -> None:
        args, step = self.args, self.state.global_step
        if step % max(args.logging_steps, 1) == 0 or step == self.max_steps:
            logs = self.step_logs()
            self.log(logs)  # already identical on every rank (see _record_rollout_metrics, _update)
            progress.set_postfix(
                reward=f"{logs.get('train/reward', float('nan')):.3f}",
                kl=f"{logs.get('train/kl_divergence', float('nan')):.3f}",
            )
        if self.eval_dataset is not None and _is_due(args.evaluation_strategy, args.eval_steps, step, self.steps_per_epoch):
            self.log(self.evaluate())
        if _is_due(args.save_strategy, args.save_steps, step, self.steps_per_epoch):
            self.save_checkpoint(work)

    # ------------------------------------------------------------------------------------------
    # The loop

    def train(self, resume_from_checkpoint=None) -> Dict[str, float]:
        args = self.args
        resume_path = resolve_resume_path(resume_from_checkpoint, args.output_dir)
        if resume_path and uses_sharding_stage3(args):
            raise NotImplementedError(
                "resuming PPO under sharding stage3 is not supported: the saved full weights cannot be written into the "
                "parameter shards; start a new run from the saved policy/value directories instead"
            )
        for trainer in self.trainers.values():
            trainer.create_optimizer_and_scheduler(num_training_steps=self.max_steps)
        wrapped = {role: self._wrap_for_training(role, trainer) for role, trainer in self.trainers.items()}
        self.offload = self._build_offload_manager()
        work = self.load_checkpoint(resume_path) if resume_path else None
        if self.is_main_process:
            os.makedirs(args.output_dir, exist_ok=True)
            for name in remove_stale_staging(args.output_dir):
                logger.info(f"removed {name}, left by a run that stopped while saving")
            self._truncate_metrics_file()

        if args.pipeline_parallel_degree > 1:
            logger.warning(
                "pipeline parallel: the loss hooks run inside the Pipe model's last stage, so approx_kl, clipfrac, "
                "entropy, kl_loss and ptx_loss are not logged; train/actor_pipeline_loss is the actor's whole loss "
                "(ptx_coeff x ptx loss included)"
            )
        self.actor_trainer.state.max_steps = self.max_steps
        self.actor_trainer.callback_handler.on_train_begin(args, self.actor_trainer.state, self.actor_trainer.control)
        logger.info(
            f"{args.rl_algorithm.upper()}: {self.max_steps} optimizer steps, {args.optimizer_steps_per_rollout} per "
            f"rollout of {args.per_device_prompt_batch_size} prompts x {args.num_return_sequences} responses per device"
            + (f"; resuming at step {self.state.global_step} from {resume_path}" if resume_path else "")
        )
        progress = tqdm(
            total=self.max_steps, initial=self.state.global_step, desc=args.rl_algorithm.upper(),
            disable=args.disable_tqdm or not self.is_main_process, dynamic_ncols=True,
        )
        start = time.time()
        with PreemptionGuard() as guard:
            self._preemption = guard
            while self.state.global_step < self.max_steps and not self._stop_requested:
                if work is None:
                    prompt_batch = PromptBatch.from_collated(next(self.prompt_batches))
                    work = self.start_rollout(prompt_batch)
                    self.state.rollouts_done += 1
                if self._train_on(work, wrapped, progress):
                    work = None
        self._preemption = None
        progress.close()
        if self._stop_requested:
            # SIGTERM / SIGINT: the checkpoint of the step just finished is written; no final models.
            logger.warning(guard.resume_message(self.state.global_step, self._preempted_checkpoint))
            raise SystemExit(guard.exit_code)
        self.save_final_models()
        self.actor_trainer.callback_handler.on_train_end(args, self.actor_trainer.state, self.actor_trainer.control)
        if self.is_main_process:
            self._plot_curves()
        return {"global_step": self.state.global_step, "train_runtime": time.time() - start}

    # ------------------------------------------------------------------------------------------
    # Evaluation

    @paddle.no_grad()
    def evaluate(self) -> Dict[str, float]:
        """Mean reward-model score of the actor's generations on the eval prompts (each
        data-parallel replica takes its share; means over all of them); a few samples go to
        output_dir/eval_samples/."""
        args = self.args
        self._refresh_rollout_copies()
        self._enter("eval")
        dataset = self.eval_dataset
        indices = list(range(args.dataset_rank, len(dataset), args.dataset_world_size))
        collate = dataset.get_collator()
        # One budget for the whole eval set, whatever batches this rank happens to form.
        longest_prompt = None if self.fixed_response_budget else max(len(dataset[i]["input_ids"]) for i in range(len(dataset)))
        # Its own stream, the same at every evaluation: evaluating never moves the rollout stream
        # (turning evaluation on or changing eval_steps leaves training unchanged), and two
        # evaluations differ only by the policy.
        rng = RolloutRandomState(args.seed + EVAL_SEED_OFFSET + args.dataset_rank)
        score_sum, length_sum, samples, extra_sums = 0.0, 0.0, [], {}
        for start in range(0, len(indices), args.per_device_eval_batch_size):
            batch = collate([dataset[i] for i in indices[start : start + args.per_device_eval_batch_size]])
            rollout = self.generate(
                PromptBatch.from_collated(batch), num_return_sequences=1, longest_prompt=longest_prompt, rng=rng
            )
            batch_scores = self.reward_scores(rollout.sequences, rollout.attention_mask, rollout.prompt_length)
            score_sum += float(batch_scores.astype("float64").sum())
            for name, value in self.eval_batch_sums(rollout).items():
                extra_sums[name] = extra_sums.get(name, 0.0) + value
            action_mask = action_mask_from(rollout.attention_mask, rollout.prompt_length)
            length_sum += float(response_lengths(action_mask).astype("float64").sum())
            if len(samples) < args.num_eval_samples_to_save:
                samples.extend(self._decode_samples(rollout, batch_scores))
        # Tensor/pipeline ranks of one replica repeat its sums; the ratios are unchanged.
        extra_names = sorted(extra_sums)
        score_sum, length_sum, count, *extra = all_reduce_sum(
            [score_sum, length_sum, float(len(indices))] + [extra_sums[name] for name in extra_names]
        )
        metrics = {"eval/reward": score_sum / max(count, 1.0), "eval/mean_generated_length": length_sum / max(count, 1.0)}
        metrics.update({f"eval/{name}": value / max(count, 1.0) for name, value in zip(extra_names, extra)})
        if self.is_main_process:
            directory = os.path.join(args.output_dir, "eval_samples")
            os.makedirs(directory, exist_ok=True)
            with open(os.path.join(directory, f"step-{self.state.global_step}.jsonl"), "w", encoding="utf-8") as f:
                for sample in samples[: args.num_eval_samples_to_save]:
                    f.write(json.dumps(sample, ensure_ascii=False) + "\n")
        return metrics

    def eval_batch_sums(self, rollout: RolloutOutput) -> Dict[str, float]:
        """Sums over an evaluation batch's responses of further per-response metrics (logged as
        eval/<name>, means over the eval set), e.g. the cost."""
        return {}

    def _decode_samples(self, rollout: RolloutOutput, scores: paddle.Tensor) -> List[dict]:
        samples = []
        prompt_length = rollout.prompt_length
        for ids, mask, score in zip(rollout.sequences.tolist(), rollout.attention_mask.tolist(), scores.tolist()):
            prompt = [t for t, keep in zip(ids[:prompt_length], mask[:prompt_length]) if keep]
            response = [t for t, keep in zip(ids[prompt_length:], mask[prompt_length:]) if keep]
            samples.append(
                {
                    "prompt": decode(self.tokenizer, prompt, skip_special_tokens=True),
                    "response": decode(self.tokenizer, response, skip_special_tokens=True),
                    "reward": score,
                }
            )
        return samples

    # ------------------------------------------------------------------------------------------
    # Logging

    def log(self, logs: Dict[str, float]) -> None:
        step = self.state.global_step
        if self.is_main_process:
            with open(os.path.join(self.args.output_dir, METRICS_FILE), "a", encoding="utf-8") as f:
                f.write(json.dumps({"step": step, **logs}) + "\n")
            logger.info(f"step {step}: " + ", ".join(f"{name}={value:.4g}" for name, value in sorted(logs.items())))
        # PaddleNLP's reporting callbacks add the train/ or eval/ namespace themselves.
        plain = {
            (f"eval_{name[len('eval/'):]}" if name.startswith("eval/") else name.split("/", 1)[-1]): value
            for name, value in logs.items()
        }
        self.actor_trainer.state.global_step = step
        self.actor_trainer.log(plain)

    def _truncate_metrics_file(self) -> None:
        """After a resume, drop lines logged past the checkpoint so the file reads as one run."""
        path = os.path.join(self.args.output_dir, METRICS_FILE)
        if not os.path.exists(path):
            return
        with open(path, encoding="utf-8") as f:
            kept = [line for line in f if line.strip() and json.loads(line)["step"] <= self.state.global_step]
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(kept)

    def _plot_curves(self) -> None:
        path = os.path.join(self.args.output_dir, METRICS_FILE)
        if os.path.exists(path):
            plot_training_curves(path, os.path.join(self.args.output_dir, CURVES_FILE))

    # ------------------------------------------------------------------------------------------
    # Checkpoints

    def save_final_models(self) -> None:
        """output_dir/policy and output_dir/value: plain model directories for PaddleNLP."""
        self._enter("save")
        self._gather_sharded_parameters()
        for name, model in self.trained_models.items():
            save_model_dir(model, self.tokenizer, os.path.join(self.args.output_dir, name), self.args)

    def _gather_sharded_parameters(self) -> None:
        """Sharding stage3 keeps parameter shards; like PaddleNLP's own `save_model`, gather full
        host copies into the layers' parameters before saving them (collective)."""
        if uses_sharding_stage3(self.args):
            for wrapped in self._wrapped.values():
                wrapped.get_all_parameters(convert2cpu=True)

    def extra_state(self) -> dict:
        """Algorithm state that must travel with checkpoints (JSON-serialisable)."""
        return {}

    def load_extra_state(self, state: dict) -> None:
        """Restore what `extra_state` returned."""

    def save_checkpoint(self, work: Optional[RolloutWork]) -> str:
        """Everything needed to continue exactly: models, optimizers, schedulers, RNG, sampler
        positions, pending experience. Staged in a temporary directory and renamed into place."""
        args = self.args
        self._enter("save")
        self._gather_sharded_parameters()
        final = os.path.join(args.output_dir, f"{CHECKPOINT_PREFIX}{self.state.global_step}")
        staging = staging_dir(args.output_dir, self.state.global_step)
        rank = args.process_index
        if self.is_main_process:
            shutil.rmtree(staging, ignore_errors=True)
            os.makedirs(staging)
        _barrier()
        for name, model in self.trained_models.items():
            save_model_dir(model, self.tokenizer, os.path.join(staging, name), args, atomic=False)
        for role, trainer in self.trainers.items():
            paddle.save(
                portable_optimizer_state(trainer.optimizer, trainer.model),
                os.path.join(staging, f"{role}_optimizer.rank{rank}.pdopt"),
            )
            if self.is_main_process:
                paddle.save(trainer.lr_scheduler.state_dict(), os.path.join(staging, f"{role}_scheduler.pdparams"))
            if trainer.do_grad_scaling:  # fp16: the loss scale and its growth counters
                paddle.save(trainer.scaler.state_dict(), os.path.join(staging, SCALER_NAME.format(role=role) + f".rank{rank}"))
        save_rng_state(os.path.join(staging, f"rng_state.rank{rank}.pkl"))
        tracker_states = model_parallel_rng_tracker().get_states_tracker()
        if tracker_states:  # tensor-parallel dropout streams
            with open(os.path.join(staging, RNG_TRACKER_NAME.format(rank=rank)), "wb") as f:
                pickle.dump(tracker_states, f)
        with open(os.path.join(staging, f"{ROLLOUT_RNG_NAME}.rank{rank}.pkl"), "wb") as f:
            pickle.dump(self.rollout_rng.state, f)
        if work is not None:
            experience = {f.name: getattr(work.experience, f.name) for f in fields(work.experience)}
            paddle.save(experience, os.path.join(staging, f"{PENDING_EXPERIENCE_NAME}.rank{rank}"))
        _barrier()
        if self.is_main_process:
            self.state.prompt_sampler = self.prompt_sampler.state
            if self.ptx_sampler is not None:
                self.state.ptx_sampler = self.ptx_sampler.state
            self.state.pending_update_iter = None if work is None else work.update_iter
            self.state.pending_micro_batch = None if work is None else work.micro_batch
            self.state.metric_tracker = self.tracker.state_dict()
            extra = self.extra_state()
            if extra:
                with open(os.path.join(staging, ALGORITHM_STATE_NAME), "w", encoding="utf-8") as f:
                    json.dump(extra, f)
            with open(os.path.join(staging, PPO_STATE_NAME), "w", encoding="utf-8") as f:
                f.write(self.state.to_json())
            # Manifest (sizes, checksums) last, then one rename: resume verifies it and never picks a
            # half-written or damaged checkpoint; rotation runs only once the new one is in place.
            publish_checkpoint(staging, final)
            rotate_checkpoints(args.output_dir, args.save_total_limit)
            logger.info(f"saved checkpoint {final}")
        _barrier()
        self._saved_step = self.state.global_step
        return final

    def load_checkpoint(self, path: str) -> Optional[RolloutWork]:
        rank = self.args.process_index
        with open(os.path.join(path, PPO_STATE_NAME), encoding="utf-8") as f:
            self.state = PPOState.from_json(f.read())
        for name, model in self.trained_models.items():
            load_model_weights(model, os.path.join(path, name))
        for role, trainer in self.trainers.items():
            optimizer_file = os.path.join(path, f"{role}_optimizer.rank{rank}.pdopt")
            if not os.path.exists(optimizer_file):
                raise FileNotFoundError(
                    f"{optimizer_file} is missing: the checkpoint was written by a different number of processes"
                )
            load_portable_optimizer_state(trainer.optimizer, trainer.model, paddle.load(optimizer_file))
            trainer.lr_scheduler.set_state_dict(paddle.load(os.path.join(path, f"{role}_scheduler.pdparams")))
            scaler_file = os.path.join(path, SCALER_NAME.format(role=role) + f".rank{rank}")
            if trainer.do_grad_scaling and os.path.exists(scaler_file):
                trainer.scaler.load_state_dict(paddle.load(scaler_file))
        load_rng_state(os.path.join(path, f"rng_state.rank{rank}.pkl"))
        tracker_file = os.path.join(path, RNG_TRACKER_NAME.format(rank=rank))
        if os.path.exists(tracker_file):
            with open(tracker_file, "rb") as f:
                model_parallel_rng_tracker().set_states_tracker(pickle.load(f))
        with open(os.path.join(path, f"{ROLLOUT_RNG_NAME}.rank{rank}.pkl"), "rb") as f:
            self.rollout_rng.state = pickle.load(f)  # written by save_checkpoint above
        for copy in self.rollout_copies.values():
            copy.stale = True
        self.prompt_sampler.state = self.state.prompt_sampler
        if self.ptx_sampler is not None:
            self.ptx_sampler.state = self.state.ptx_sampler
        self.tracker.load_state_dict(self.state.metric_tracker)
        extra_path = os.path.join(path, ALGORITHM_STATE_NAME)
        if os.path.exists(extra_path):
            with open(extra_path, encoding="utf-8") as f:
                self.load_extra_state(json.load(f))
        if self.state.pending_update_iter is None:
            return None
        experience = self.EXPERIENCE_CLASS(**paddle.load(os.path.join(path, f"{PENDING_EXPERIENCE_NAME}.rank{rank}")))
        return RolloutWork(experience, self.state.pending_update_iter, self.state.pending_micro_batch)


def _is_due(strategy, every: Optional[int], step: int, steps_per_epoch: int) -> bool:
    """Whether a "steps" (every `every` steps) or "epoch" (at the end of each pass over the prompt
    dataset) strategy fires after optimizer step `step`."""
    strategy = str(getattr(strategy, "value", strategy))
    if strategy == "epoch":
        return step % steps_per_epoch == 0
    return strategy == "steps" and bool(every) and step % every == 0


def model_parallel_rng_tracker():
    """Fleet's tracker of the tensor-parallel RNG streams (dropout inside model-parallel layers)."""
    from paddle.distributed.fleet.meta_parallel import get_rng_state_tracker

    return get_rng_state_tracker()


def _barrier() -> None:
    if is_distributed():
        dist.barrier()
