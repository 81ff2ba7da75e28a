"""Rollout copies: non-training copies of trained models that generate and score rollouts when the
trained model cannot (pipeline parallel, sharding stage3), and how they get the trained weights."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict

import paddle


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
