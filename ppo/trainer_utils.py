"""Pieces the PPO orchestration is built from: the two PaddleNLP Trainers (actor and critic)
with their loss hooks, gradient synchronisation and the optimizer step, a resumable sampler,
rollout statistics that reduce exactly across ranks, metric accumulation, the rollout RNG stream
and rollout copies of the trained models.
"""

from __future__ import annotations

import contextlib
import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, ContextManager, Dict, Iterator, List

import numpy as np
import paddle
from paddlenlp.trainer import Trainer

from ppo.checkpoint import SamplerState
from ppo.comm_utils import all_ranks_finite
from ppo.experience import Experience
from ppo.models.ppo_model_utils import (
    actor_clipped_loss,
    approx_kl,
    clip_fraction,
    critic_clipped_loss,
    entropy_from_logits,
    gather_log_probs,
    kl_divergence_per_token,
    masked_mean,
    response_lengths,
    supervised_lm_loss,
)


def logits_of(outputs) -> paddle.Tensor:
    """PaddleNLP causal LMs return a tuple or a ModelOutput depending on `return_dict`."""
    return outputs[0] if isinstance(outputs, (tuple, list)) else outputs.logits


class NonFiniteLossError(RuntimeError):
    """The loss of a micro-batch is NaN or inf on at least one rank; the update is skipped."""


@dataclass
class StepStats:
    """Scalars a loss hook reports back to the orchestration for one micro-batch."""

    values: Dict[str, float] = field(default_factory=dict)


class PolicyTrainer(Trainer):
    """Trains the actor: PPO clipped objective plus, when a supervised batch is given, the ptx loss.

    Both terms go into ONE backward pass, so adding ptx never rescales the PPO gradient.
    """

    def compute_loss(self, model, inputs, return_outputs=False):
        experience: Experience = inputs["experience"]
        stats: StepStats = inputs["stats"]
        args = self.args
        logits = logits_of(
            model(
                input_ids=experience.input_ids,
                attention_mask=experience.attention_mask.astype("int64"),
                position_ids=experience.position_ids,
            )
        )
        logits = logits[:, :-1].astype("float32") / args.temperature
        log_probs = gather_log_probs(logits, experience.input_ids[:, 1:])  # [B, L-1]
        mask = experience.action_mask
        loss = actor_clipped_loss(
            log_probs,
            experience.old_log_probs,
            experience.advantages,
            mask,
            args.clip_range_ratio_low,
            reduction=args.loss_reduction,
            clip_range_ratio_high=args.clip_range_ratio_high,
        )
        with paddle.no_grad():
            stats.values["actor_loss"] = float(loss)
            stats.values["approx_kl"] = float(approx_kl(log_probs, experience.old_log_probs, mask))
            stats.values["clipfrac"] = float(
                clip_fraction(
                    log_probs, experience.old_log_probs, mask, args.clip_range_ratio_low, args.clip_range_ratio_high
                )
            )
            stats.values["entropy"] = float(entropy_from_logits(logits, mask))
        if args.kl_loss_coeff > 0:
            # GRPO-style: KL(π || π_ref) as a loss term (k3, unbiased and ≥ 0) instead of in the reward.
            kl_loss = masked_mean(
                kl_divergence_per_token(log_probs, experience.reference_log_probs, "k3"), mask, args.loss_reduction
            )
            stats.values["kl_loss"] = float(kl_loss)
            loss = loss + args.kl_loss_coeff * kl_loss
        ptx_batch = inputs.get("ptx_batch")
        if ptx_batch is not None:
            ptx_logits = logits_of(
                model(input_ids=ptx_batch["input_ids"], attention_mask=ptx_batch["attention_mask"])
            ).astype("float32")
            ptx_loss = supervised_lm_loss(ptx_logits, ptx_batch["labels"])
            stats.values["ptx_loss"] = float(ptx_loss)
            loss = loss + args.ptx_coeff * ptx_loss
        _raise_if_nonfinite(loss)
        return loss


class ValueTrainer(Trainer):
    """Trains the critic with the clipped value loss on the same experience."""

    def compute_loss(self, model, inputs, return_outputs=False):
        experience: Experience = inputs["experience"]
        stats: StepStats = inputs["stats"]
        values = model(
            input_ids=experience.input_ids,
            attention_mask=experience.attention_mask.astype("int64"),
            position_ids=experience.position_ids,
        ).scores[:, :-1, 0].astype("float32")
        loss = critic_clipped_loss(
            values,
            experience.old_values,
            experience.returns,
            experience.action_mask,
            self.args.clip_range_value,
            reduction=self.args.loss_reduction,
        )
        stats.values["reward_critic_loss"] = float(loss)
        _raise_if_nonfinite(loss)
        return loss


def _raise_if_nonfinite(loss: paddle.Tensor) -> None:
    if not all_ranks_finite(loss):
        raise NonFiniteLossError(f"non-finite loss {float(loss)}")


class GradientSync:
    """When the data-parallel gradients of one optimizer step are all-reduced, as PaddleNLP's own
    loop does it: `paddle.DataParallel` all-reduces during every backward, which is skipped
    (`no_sync`) for all but the last accumulated micro-batch; with activation recomputation it is
    skipped for all of them and done once by hand (recompute re-runs the forward inside backward,
    which the reducer's hooks do not follow). Fleet's hybrid wrappers (sharding, tensor and
    pipeline parallel) have no `no_sync`: their optimizer reduces the gradients in `step()`.
    """

    def __init__(self, model, recompute: bool):
        self.model = model
        self.available = hasattr(model, "no_sync")
        self.manual = bool(recompute) and self.available

    def during(self, is_last_micro_batch: bool) -> ContextManager:
        if self.available and (self.manual or not is_last_micro_batch):
            return self.model.no_sync()
        return contextlib.nullcontext()

    def finish(self) -> None:
        """Call once after the last micro-batch's backward."""
        if self.manual:
            from paddle.distributed.fleet.utils.hybrid_parallel_util import fused_allreduce_gradients

            fused_allreduce_gradients(list(self.model.parameters()), None)


def optimizer_step(trainer: Trainer) -> None:
    """One optimizer + scheduler step of a Trainer whose gradients were accumulated (and
    synchronised, see `GradientSync`) by `training_step`, then clear the gradients. Mirrors what
    PaddleNLP's own loop does for the plain, AMP-scaled and fleet-wrapped optimizers (fleet's
    `HybridParallelOptimizer.step` reduces sharded / data-parallel gradients itself)."""
    optimizer = trainer.optimizer
    stepped = True
    if trainer.do_grad_scaling:
        trainer.scaler.step(optimizer)
        trainer.scaler.update()
        stepped = not getattr(trainer.scaler, "_cache_found_inf", False)
    else:
        optimizer.step()
    if stepped:
        trainer.lr_scheduler.step()
    # release_grads frees the gradient memory between steps instead of zeroing it.
    optimizer.clear_grad(set_to_zero=not trainer.args.release_grads)


def current_learning_rate(trainer: Trainer) -> float:
    return float(trainer.lr_scheduler.get_lr()) if trainer.lr_scheduler is not None else float(trainer.args.learning_rate)


class EpochSampler:
    """Deterministic batches of dataset indices: a fresh seeded permutation per epoch, this
    rank's share of each global batch, and a position that can be saved and restored.

    A global batch is `batch_size * num_replicas` indices; rank r takes slice r of it, so the
    ranks together see each sample exactly once per epoch. The last incomplete global batch is
    dropped (every rank must take the same number of steps).
    """

    def __init__(self, dataset_size: int, batch_size: int, seed: int, rank: int = 0, num_replicas: int = 1, shuffle: bool = True):
        if dataset_size < batch_size * num_replicas:
            raise ValueError(
                f"the dataset has {dataset_size} samples, fewer than one global batch of "
                f"{batch_size} x {num_replicas} ranks"
            )
        self.dataset_size, self.batch_size, self.seed = dataset_size, batch_size, seed
        self.rank, self.num_replicas, self.shuffle = rank, num_replicas, shuffle
        self.state = SamplerState()

    @property
    def batches_per_epoch(self) -> int:
        return self.dataset_size // (self.batch_size * self.num_replicas)

    def _order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.dataset_size)
        return np.random.default_rng(self.seed + epoch).permutation(self.dataset_size)

    def next_batch(self) -> List[int]:
        if self.state.batch_index >= self.batches_per_epoch:
            self.state = SamplerState(epoch=self.state.epoch + 1, batch_index=0)
        global_size = self.batch_size * self.num_replicas
        start = self.state.batch_index * global_size + self.rank * self.batch_size
        indices = self._order(self.state.epoch)[start : start + self.batch_size].tolist()
        self.state = SamplerState(self.state.epoch, self.state.batch_index + 1)
        return indices


def batch_iterator(dataset, sampler: EpochSampler, collate: Callable) -> Iterator[dict]:
    while True:
        yield collate([dataset[i] for i in sampler.next_batch()])


class MetricTracker:
    """Accumulates scalars between two log points: means for most, maxima for `add_max`."""

    def __init__(self):
        self.sums: Dict[str, float] = defaultdict(float)
        self.counts: Dict[str, int] = defaultdict(int)
        self.maxima: Dict[str, float] = {}

    def add(self, values: Dict[str, float]) -> None:
        for name, value in values.items():
            if value is not None and math.isfinite(value):
                self.sums[name] += float(value)
                self.counts[name] += 1

    def add_max(self, values: Dict[str, float]) -> None:
        for name, value in values.items():
            self.maxima[name] = max(float(value), self.maxima.get(name, -math.inf))

    def pop(self) -> Dict[str, float]:
        result = {name: self.sums[name] / self.counts[name] for name in self.sums}
        result.update(self.maxima)
        self.sums, self.counts, self.maxima = defaultdict(float), defaultdict(int), {}
        return result

    def state_dict(self) -> dict:
        return {"sums": dict(self.sums), "counts": dict(self.counts), "maxima": dict(self.maxima)}

    def load_state_dict(self, state: dict) -> None:
        self.sums = defaultdict(float, state["sums"])
        self.counts = defaultdict(int, state["counts"])
        self.maxima = dict(state["maxima"])


# --------------------------------------------------------------------------------------------
# Rollout statistics: sums that add up across ranks, and the metrics they give


def rollout_sums(experience: Experience, kl_estimator: str, with_critic: bool = True) -> Dict[str, float]:
    """Additive statistics of one rollout: summed over every rank they are exactly the statistics
    of the union of the ranks' rollouts (float64 sums of per-token float32 values). Without a
    critic there are no values, returns or residuals."""
    mask = experience.action_mask
    valid = mask.numpy().astype(bool)

    def token_values(x: paddle.Tensor) -> np.ndarray:  # [B, L-1] -> valid entries, float64
        return x.astype("float32").numpy().astype(np.float64)[valid]

    kl = kl_divergence_per_token(experience.old_log_probs, experience.reference_log_probs, kl_estimator)
    sums = {
        "responses": float(experience.batch_size),
        "tokens": float(valid.sum()),
        "reward": float(experience.reward_scores.astype("float64").sum()),
        "reward_with_kl_penalty": float(token_values(experience.rewards).sum()),
        "kl": float(token_values(kl).sum()),
        "length": float(response_lengths(mask).astype("float64").sum()),
    }
    if not with_critic:
        return sums
    values, returns = token_values(experience.old_values), token_values(experience.returns)
    residual = returns - values
    sums.update(
        values=float(values.sum()),
        returns=float(returns.sum()),
        returns_squared=float(np.square(returns).sum()),
        residual=float(residual.sum()),
        residual_squared=float(np.square(residual).sum()),
    )
    return sums


def rollout_metrics(sums: Dict[str, float]) -> Dict[str, float]:
    """Metrics of a rollout from its (globally summed) `rollout_sums`: per-response means of the
    reward, the KL-penalised reward and KL summed over each response, and the response length;
    token means of values and returns; explained variance 1 - Var[R - V] / Var[R] over tokens
    (0 when Var[R] = 0)."""
    responses, tokens = max(sums["responses"], 1.0), max(sums["tokens"], 1.0)
    metrics = {
        "train/reward": sums["reward"] / responses,
        "train/reward_with_kl_penalty": sums["reward_with_kl_penalty"] / responses,
        "train/kl_divergence": sums["kl"] / responses,
        "train/mean_generated_length": sums["length"] / responses,
    }
    if "values" not in sums:  # critic-free: no value diagnostics
        return metrics

    def variance(total: float, squares: float) -> float:
        return max(squares / tokens - (total / tokens) ** 2, 0.0)

    returns_variance = variance(sums["returns"], sums["returns_squared"])
    residual_variance = variance(sums["residual"], sums["residual_squared"])
    return {
        **metrics,
        "train/values": sums["values"] / tokens,
        "train/returns": sums["returns"] / tokens,
        "train/explained_variance": 1.0 - residual_variance / returns_variance if returns_variance > 0 else 0.0,
    }


def mean_stats(step_stats: List[Dict[str, float]]) -> Dict[str, float]:
    """Per-name mean over the micro-batches of one optimizer step (non-finite values skipped)."""
    tracker = MetricTracker()
    for values in step_stats:
        tracker.add(values)
    return tracker.pop()


# --------------------------------------------------------------------------------------------
# Rollout randomness and rollout copies


class RolloutRandomState:
    """A paddle RNG stream reserved for rollout sampling, seeded per data-parallel replica.

    PaddleNLP seeds the global generator per rank in a way that suits dropout, not rollout: in
    plain data parallel every rank gets the same seed (so all ranks would draw the same noise for
    their different prompts), and under pipeline parallel each stage gets another one (so the
    stages, which all generate the same rollout, would sample different responses). This stream
    depends only on `seed` and the data-parallel rank: the same on all tensor/pipeline ranks of
    one replica, different between replicas. Outside `active()` the global generator is untouched.
    """

    def __init__(self, seed: int):
        saved = paddle.get_rng_state()
        paddle.seed(seed)
        self.state = paddle.get_rng_state()
        paddle.set_rng_state(saved)

    @contextlib.contextmanager
    def active(self):
        saved = paddle.get_rng_state()
        paddle.set_rng_state(self.state)
        try:
            yield
        finally:
            self.state = paddle.get_rng_state()
            paddle.set_rng_state(saved)


@paddle.no_grad()
def copy_parameters(source: paddle.nn.Layer, target: paddle.nn.Layer) -> None:
    """Copy every parameter of `source` into the same-named parameter of `target` (cast to the
    target's dtype). Both must hold complete, identically named parameters."""
    source_state = dict(source.named_parameters())
    target_state = dict(target.named_parameters())
    if sorted(source_state) != sorted(target_state):
        difference = sorted(set(source_state) ^ set(target_state))
        raise ValueError(f"{type(target).__name__} cannot be a copy of {type(source).__name__}: names differ {difference[:5]}")
    for name, parameter in target_state.items():
        value = source_state[name]
        if list(value.shape) != list(parameter.shape):
            raise ValueError(f"{name}: shape {list(value.shape)} cannot be copied into {list(parameter.shape)}")
        parameter.set_value(value.astype(parameter.dtype) if value.dtype != parameter.dtype else value)


@dataclass
class RolloutCopy:
    """A non-training copy of a trained model that generates and scores rollouts, refreshed from
    the trained weights before it is next used after an optimizer step.

    Needed when the trained model cannot run a rollout itself: a pipeline-parallel model holds one
    stage per rank, a sharding stage3 model holds parameter shards. `refresh_weights` is
    collective in those cases, so every rank must call `refresh` at the same points (the PPO loop
    does: before each rollout, evaluation and nothing else).
    """

    model: paddle.nn.Layer
    refresh_weights: Callable[[], None]
    stale: bool = True
    refreshes: int = 0

    def refresh(self) -> bool:
        """Bring the copy up to date; True when weights were copied."""
        if not self.stale:
            return False
        self.refresh_weights()
        self.stale = False
        self.refreshes += 1
        return True


def uses_sharding_stage3(args) -> bool:
    return any(str(getattr(option, "value", option)) == "stage3" for option in (args.sharding or ()))


def check_rollout_copies(args, copies: Dict[str, "RolloutCopy"]) -> None:
    """A pipeline-parallel model holds one stage per rank and cannot generate or score a whole
    sequence; sharding stage3 holds parameter shards that generation would have to re-gather at
    every decoded token."""
    if args.pipeline_parallel_degree > 1 and sorted(copies) != ["actor", "critic"]:
        raise ValueError(
            "pipeline parallel PPO needs actor_rollout_model and critic_rollout_model (non-pipeline models built "
            "with ppo.models.parallel_utils.eval_model_config for eval_mode); ppo.run_ppo.build_models builds them"
        )
    if uses_sharding_stage3(args) and "actor" not in copies:
        raise ValueError(
            "sharding stage3 PPO needs actor_rollout_model: a plain copy of the actor that generates from weights "
            "gathered once per rollout; ppo.run_ppo.build_models builds it"
        )


def weight_refresher(args, role: str, source, copy, wrapped: Dict[str, object]) -> Callable[[], None]:
    """How the rollout copy of `source` gets the trained weights:

    - pipeline parallel: every stage broadcasts its parameters into the copies (collective);
    - sharding stage3: PaddleNLP's save-time gather (`get_all_parameters(convert2cpu=True)`, one
      all-gather into host copies held by the inner layer's parameters, collective), then one
      copy onto the rollout model; generation then needs no collective, so ranks may stop
      decoding at different steps (through the stage3 wrapper every decoded token would all-gather
      every layer, and every rank would have to decode the same number of steps);
    - otherwise a plain parameter copy (e.g. a rollout copy in another dtype).

    `wrapped` maps the role to its training wrapper once the trainer has wrapped it.
    """
    if args.pipeline_parallel_degree > 1:
        from ppo.models.parallel_utils import sync_eval_model_from_pipeline

        return lambda: sync_eval_model_from_pipeline(source, copy, args.eval_mode)
    if uses_sharding_stage3(args):

        def gather_shards():
            wrapped[role].get_all_parameters(convert2cpu=True)
            copy_parameters(source, copy)

        return gather_shards
    return lambda: copy_parameters(source, copy)


def pipeline_step_stats(actor_loss: paddle.Tensor, critic_loss: paddle.Tensor) -> Dict[str, float]:
    """The losses PaddleNLP's pipeline path returns (the same value on every stage), checked on all
    ranks before anyone steps. The actor's includes ptx_coeff x the ptx loss: the Pipe policy
    computes both in one last-stage loss."""
    for name, loss in (("actor", actor_loss), ("critic", critic_loss)):
        if not all_ranks_finite(loss):
            raise NonFiniteLossError(f"non-finite {name} pipeline loss {float(loss)}")
    return {"actor_pipeline_loss": float(actor_loss), "reward_critic_loss": float(critic_loss)}
