"""Pieces the PPO orchestration is built from: the two PaddleNLP Trainers (actor and critic)
with their loss hooks, the optimizer step, a resumable sampler and metric accumulation.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional

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
            args.clip_range_ratio,
            reduction=args.loss_reduction,
        )
        with paddle.no_grad():
            stats.values["actor_loss"] = float(loss)
            stats.values["approx_kl"] = float(approx_kl(log_probs, experience.old_log_probs, mask))
            stats.values["clipfrac"] = float(
                clip_fraction(log_probs, experience.old_log_probs, mask, args.clip_range_ratio)
            )
            stats.values["entropy"] = float(entropy_from_logits(logits, mask))
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


def optimizer_step(trainer: Trainer) -> None:
    """One optimizer + scheduler step of a Trainer whose gradients were accumulated by
    `training_step`, then clear the gradients. Mirrors what PaddleNLP's own loop does for the
    plain, AMP-scaled and fleet-wrapped optimizers."""
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
    optimizer.clear_grad()


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
