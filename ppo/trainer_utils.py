"""PaddleNLP Trainer patches and tools of the RL loop: the role Trainers (policy and value) with
their loss hooks, gradient synchronisation and the optimizer step as PaddleNLP's own loop does it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import ContextManager, Dict

import paddle
from paddlenlp.trainer import Trainer

from ppo.comm_utils import all_ranks_finite
from ppo.experience import Experience
from ppo.grad_clip import SkipClipWithinNormMixin
from ppo.models.ppo_model_utils import (
    ResponseWindow,
    actor_clipped_loss,
    as_float32,
    approx_kl,
    clip_fraction,
    critic_clipped_loss,
    entropy_from_logits,
    gather_log_probs,
    kl_divergence_per_token,
    masked_mean,
    supervised_lm_loss,
)
from ppo.models.response_head import head_on_columns


def logits_of(outputs) -> paddle.Tensor:
    """PaddleNLP causal LMs return a tuple or a ModelOutput depending on `return_dict`."""
    return outputs[0] if isinstance(outputs, (tuple, list)) else outputs.logits


def response_log_probs(
    model, input_ids, attention_mask, position_ids, window: ResponseWindow, temperature: float
) -> tuple:  # ([B, W] float32 log-probs of the response tokens, [B, W, V] float32 logits / temperature)
    """One forward of a causal LM over the window's columns, its LM head on the W positions that
    predict response tokens only (`head_on_columns`), and log softmax(logits / temperature) at
    the sampled tokens: the distribution the rollout sampled from (before top-p)."""
    with head_on_columns(model, window.start, window.end) as narrowed:
        logits = logits_of(_windowed_forward(model, input_ids, attention_mask, position_ids, window))
    if not narrowed:
        logits = logits[:, window.start : window.end]
    logits = as_float32(logits)
    if temperature != 1.0:
        logits = logits / temperature
    return gather_log_probs(logits, window.labels(input_ids)), logits


def response_values(model, input_ids, attention_mask, position_ids, window: ResponseWindow) -> paddle.Tensor:  # [B, W]
    """A value model's float32 scores at the W positions that predict response tokens."""
    scores = _windowed_forward(model, input_ids, attention_mask, position_ids, window).scores
    return as_float32(scores[:, window.start : window.end, 0])


def _windowed_forward(model, input_ids, attention_mask, position_ids, window: ResponseWindow):
    """`model` on the window's columns [0, P+W) only."""
    return model(
        input_ids=window.inputs(input_ids),
        attention_mask=window.inputs(attention_mask).astype("int64"),
        position_ids=window.inputs(position_ids),
    )


class NonFiniteLossError(RuntimeError):
    """The loss of a micro-batch is NaN or inf on at least one rank; the update is skipped."""


@dataclass
class StepStats:
    """Scalars a loss hook reports back to the orchestration for one micro-batch."""

    values: Dict[str, float] = field(default_factory=dict)


class PolicyTrainer(SkipClipWithinNormMixin, Trainer):
    """Trains the actor: PPO clipped objective plus, when a supervised batch is given, the ptx loss.

    Both terms go into ONE backward pass, so adding ptx never rescales the PPO gradient.
    """

    def compute_loss(self, model, inputs, return_outputs=False):
        experience: Experience = inputs["experience"]
        stats: StepStats = inputs["stats"]
        args = self.args
        # Only this micro-batch's response columns: the inputs end at its longest response and
        # the LM head, log-softmax and entropy run on response positions only. Prompt columns of
        # the per-token fields are outside the action mask, so every reduction is unchanged.
        window = ResponseWindow.of(experience.attention_mask, experience.prompt_length)
        log_probs, logits = response_log_probs(
            model, experience.input_ids, experience.attention_mask, experience.position_ids, window, args.temperature
        )
        mask = window.tokens(experience.action_mask)
        old_log_probs = window.tokens(experience.old_log_probs)
        token_scale = inputs.get("token_scale", 1.0)  # global-token-mean: step token count (see RLTrainer._update)
        loss = token_scale * actor_clipped_loss(
            log_probs,
            old_log_probs,
            window.tokens(experience.advantages),
            mask,
            args.clip_range_ratio_low,
            reduction=args.loss_math_reduction,
            clip_range_ratio_high=args.clip_range_ratio_high,
        )
        with paddle.no_grad():
            stats.values["actor_loss"] = float(loss)
            stats.values["approx_kl"] = float(approx_kl(log_probs, old_log_probs, mask))
            stats.values["clipfrac"] = float(
                clip_fraction(log_probs, old_log_probs, mask, args.clip_range_ratio_low, args.clip_range_ratio_high)
            )
            stats.values["entropy"] = float(entropy_from_logits(logits, mask))
        if args.kl_loss_coeff > 0:
            # GRPO-style: KL(π || π_ref) as a loss term (k3, unbiased and ≥ 0) instead of in the reward.
            kl_loss = token_scale * masked_mean(
                kl_divergence_per_token(log_probs, window.tokens(experience.reference_log_probs), "k3"),
                mask,
                args.loss_math_reduction,
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


class ValueTrainer(SkipClipWithinNormMixin, Trainer):
    """Trains a value model with the clipped value loss on the same experience: PPO's critic on
    (old_values, returns), logged as reward_critic_loss; PPO-Lagrangian's cost critic on its own
    fields (`values_field`, `returns_field`, `loss_name`)."""

    def __init__(self, *args, values_field: str = "old_values", returns_field: str = "returns",
                 loss_name: str = "reward_critic_loss", **kwargs):  # fmt: skip
        super().__init__(*args, **kwargs)
        self.values_field, self.returns_field, self.loss_name = values_field, returns_field, loss_name

    def compute_loss(self, model, inputs, return_outputs=False):
        experience: Experience = inputs["experience"]
        stats: StepStats = inputs["stats"]
        window = ResponseWindow.of(experience.attention_mask, experience.prompt_length)  # see PolicyTrainer
        values = response_values(model, experience.input_ids, experience.attention_mask, experience.position_ids, window)
        targets_from_values = inputs.get("targets_from_values")
        if targets_from_values is None:
            old_values, returns = getattr(experience, self.values_field), getattr(experience, self.returns_field)
        else:
            # This forward is the rollout-time one (`ppo.values_from_update`): its values are the old values.
            old_values = window.to_full(values.detach().astype("float32"))
            returns = targets_from_values(old_values)
        loss = inputs.get("token_scale", 1.0) * critic_clipped_loss(
            values,
            window.tokens(old_values),
            window.tokens(returns),
            window.tokens(experience.action_mask),
            self.args.clip_range_value,
            reduction=self.args.loss_math_reduction,
        )
        stats.values[self.loss_name] = float(loss)
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
    accumulation = trainer.args.gradient_accumulation_steps
    if accumulation > 1 and trainer._enable_delay_scale_loss():
        # With `enable_delay_scale_loss` (tensor/pipeline_parallel_config) PaddleNLP's training_step
        # leaves the loss undivided and its own loop rescales the gradients before stepping.
        scale_gradients(trainer.model, 1.0 / accumulation)
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


@paddle.no_grad()
def scale_gradients(model, factor: float) -> None:
    """Multiply every accumulated gradient (`main_grad` under amp_master_grad) by `factor` in place."""
    for parameter in model.parameters():
        main_grad = getattr(parameter, "main_grad", None)
        if main_grad is not None:
            main_grad.scale_(factor)
        elif parameter.grad is not None:
            parameter.grad.scale_(factor)


def current_learning_rate(trainer: Trainer) -> float:
    return float(trainer.lr_scheduler.get_lr()) if trainer.lr_scheduler is not None else float(trainer.args.learning_rate)


def pipeline_step_stats(losses: Dict[str, paddle.Tensor]) -> Dict[str, float]:
    """role -> the loss PaddleNLP's pipeline path returned (the same value on every stage), checked
    on all ranks before anyone steps. The actor's includes ptx_coeff x the ptx loss: the Pipe policy
    computes both in one last-stage loss. Logged as `<role>_pipeline_loss` (the critic's as
    `reward_critic_loss`, which it is)."""
    stats = {}
    for role, loss in losses.items():
        if not all_ranks_finite(loss):
            raise NonFiniteLossError(f"non-finite {role} pipeline loss {float(loss)}")
        stats["reward_critic_loss" if role == "critic" else f"{role}_pipeline_loss"] = float(loss)
    return stats
