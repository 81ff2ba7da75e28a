"""Cross-process helpers (metric reduction, agreement on skipping a step) and offloading.

Everything here degrades to a no-op in a single process, so the trainer calls it unconditionally.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Mapping, Sequence, Tuple

import paddle
import paddle.distributed as dist

from ppo.models.ppo_model_utils import masked_whiten


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_distributed() -> bool:
    return world_size() > 1


def all_reduce_sum(values: Sequence[float]) -> List[float]:
    """Element-wise sum of a list of scalars over all ranks (float64; identity in one process)."""
    if not is_distributed():
        return [float(v) for v in values]
    stacked = paddle.to_tensor([float(v) for v in values], dtype="float64")
    dist.all_reduce(stacked)
    return [float(v) for v in stacked.numpy().tolist()]


def reduce_metrics(values: Mapping[str, float], maxima: Iterable[str] = ()) -> Dict[str, float]:
    """Scalar metrics agreed by all ranks: the mean over the ranks that report a name, or the
    maximum for the names in `maxima`. Identity in a single process.

    Ranks may report different names (a non-finite value is dropped on the rank where it
    occurred), so the names are gathered first; every rank then reduces the same vector.
    """
    if not is_distributed():
        return dict(values)
    gathered: List[List[str]] = []
    dist.all_gather_object(gathered, sorted(values))
    names = sorted(set().union(*gathered))
    maxima = set(maxima)
    mean_names = [name for name in names if name not in maxima]
    max_names = [name for name in names if name in maxima]
    result: Dict[str, float] = {}
    if mean_names:
        sums = all_reduce_sum(
            [float(values.get(name, 0.0)) for name in mean_names] + [float(name in values) for name in mean_names]
        )
        for i, name in enumerate(mean_names):
            result[name] = sums[i] / sums[len(mean_names) + i]
    if max_names:
        stacked = paddle.to_tensor([float(values.get(name, -math.inf)) for name in max_names], dtype="float64")
        dist.all_reduce(stacked, op=dist.ReduceOp.MAX)
        result.update(zip(max_names, (float(v) for v in stacked.numpy().tolist())))
    return result


def all_reduce_max(value: float) -> float:
    if not is_distributed():
        return value
    tensor = paddle.to_tensor([value], dtype="float64")
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return float(tensor.numpy()[0])


def all_ranks_finite(loss: paddle.Tensor) -> bool:
    """True when the loss is finite on every rank.

    Ranks must agree before backward: under data parallel a rank that skips backward would leave
    the others waiting in the gradient all-reduce forever.
    """
    local = 0.0 if math.isfinite(float(loss)) else 1.0
    return all_reduce_max(local) == 0.0


def all_gather_concat(tensor: paddle.Tensor) -> paddle.Tensor:
    """Concatenate a per-rank tensor along axis 0 from every rank (same shape on all ranks)."""
    if not is_distributed():
        return tensor
    gathered: List[paddle.Tensor] = []
    dist.all_gather(gathered, tensor)
    return paddle.concat(gathered, axis=0)


def global_masked_whiten(
    x: paddle.Tensor,  # [B, T]
    mask: paddle.Tensor,  # [B, T] bool
    eps: float = 1e-8,
) -> paddle.Tensor:  # [B, T] float32
    """`masked_whiten` with the token mean and population variance of the valid tokens of ALL
    ranks, so that data-parallel ranks whiten exactly as one process would on the whole batch.
    Invalid positions are 0. Identical to `masked_whiten` in a single process."""
    if not is_distributed():
        return masked_whiten(x, mask, eps=eps)
    values = x.astype("float32")
    valid = mask.astype("bool")
    zeros = paddle.zeros_like(values)
    total, count = all_reduce_sum([float(paddle.where(valid, values, zeros).astype("float64").sum()), float(valid.sum())])
    mean = total / max(count, 1.0)
    (squares,) = all_reduce_sum([float(paddle.where(valid, paddle.square(values - mean), zeros).astype("float64").sum())])
    variance = squares / max(count, 1.0)
    whitened = (values - mean) / math.sqrt(variance + eps)
    return paddle.where(valid, whitened, zeros)


# --------------------------------------------------------------------------------------------
# Offloading


Mover = Tuple[Callable[[], None], Callable[[], None]]  # (offload, reload)

# What each offload_level token may move off the device. The rollout copies (non-training copies
# of the actor/critic that generate and score under pipeline parallel or sharding stage3) are as
# large as the trained models and go with them.
OFFLOAD_GROUPS = {
    "freeze_model": ("reference_model", "reward_model", "cost_model"),
    "optimizer": ("actor_optimizer", "critic_optimizer", "cost_critic_optimizer"),
    "train_model": (
        "actor_model", "critic_model", "cost_critic_model", "actor_rollout_model", "critic_rollout_model",
        "cost_critic_rollout_model",
    ),
}


def _sharding_options(sharding) -> frozenset:
    """{"stage1", "stage2", "stage3", "offload"} subset from TrainingArguments.sharding (a list of
    ShardingOption after PaddleNLP's parsing, or a string)."""
    if isinstance(sharding, str):
        sharding = sharding.split()
    return frozenset(str(getattr(option, "value", option)) for option in sharding or ())


def managed_offload_objects(offload_level: Iterable[str], sharding=(), offload_optim: bool = False) -> List[str]:
    """The objects the PPO trainer moves itself for `offload_level`, given what Paddle already
    keeps on the host: with `sharding: "stage2 offload"` / `"stage3 offload"` the group-sharded
    optimizer holds its states on the host (and stage3 also its parameter shards), so moving them
    again would be a second offload of the same tensors. PaddleNLP's `offload_optim` flag is
    honoured as the "optimizer" token (its own loop is not used here).
    """
    tokens = list(dict.fromkeys(offload_level))
    if offload_optim and "optimizer" not in tokens:
        tokens.append("optimizer")
    options = _sharding_options(sharding)
    names = [name for token in tokens for name in OFFLOAD_GROUPS[token]]
    handled_by_paddle = set()
    if "offload" in options:
        handled_by_paddle |= set(OFFLOAD_GROUPS["optimizer"])
        if "stage3" in options:
            handled_by_paddle |= {"actor_model", "critic_model", "cost_critic_model"}
    elif "stage3" in options and "train_model" in tokens:
        raise ValueError(
            "offload_level 'train_model' cannot move the parameters of a sharding stage3 model (each rank holds "
            "shards that Paddle re-gathers in every forward); use sharding \"stage3 offload\" for that, and keep "
            "'train_model' out of offload_level"
        )
    return [name for name in names if name not in handled_by_paddle]


@dataclass
class OffloadManager:
    """Keeps each offloadable object on the device exactly in the phases that use it.

    `managed` names the objects this manager moves (see `managed_offload_objects`); `movers` maps
    an object name to its (offload, reload) functions. Objects without a mover are ignored and
    everything unmanaged stays resident. Every move is recorded in `events` so the schedule can be
    checked (on a CPU-only machine the movers are no-ops, but the schedule is the same as on GPU).
    """

    managed: Iterable[str]
    movers: Dict[str, Mover]
    events: List[Tuple[str, str, str]] = field(default_factory=list)  # (phase, "offload"/"reload", name)

    def __post_init__(self):
        self.managed = [name for name in dict.fromkeys(self.managed) if name in self.movers]
        self.resident = {name: True for name in self.movers}

    def enter(self, phase: str, needs: Iterable[str]) -> None:
        """Make exactly the managed objects in `needs` resident; offload the other managed ones."""
        needs = set(needs)
        for name in self.managed:
            if name in needs and not self.resident[name]:
                self.movers[name][1]()
                self.resident[name] = True
                self.events.append((phase, "reload", name))
            elif name not in needs and self.resident[name]:
                self.movers[name][0]()
                self.resident[name] = False
                self.events.append((phase, "offload", name))

    def require(self, *names: str) -> None:
        """Guard against using an object while it is offloaded."""
        missing = [name for name in names if not self.resident.get(name, True)]
        if missing:
            raise RuntimeError(f"{missing} used while offloaded; the phase table of the trainer is wrong")


def _on_gpu() -> bool:
    return paddle.is_compiled_with_cuda() and paddle.get_device().startswith("gpu")


def _share_buffer(source: paddle.Tensor, target: paddle.Tensor) -> None:
    # Paddle has no public API to move a parameter in place; `_share_buffer_to` keeps the same
    # Parameter object (so optimizers and engines that hold it keep working) on new storage.
    source._share_buffer_to(target)


def layer_movers(layer: paddle.nn.Layer) -> Mover:
    """(offload, reload) for a layer's parameters and buffers between device memory and host."""

    def tensors():
        yield from layer.parameters()
        yield from (b for b in layer.buffers() if b is not None)

    def offload():
        if _on_gpu():
            for tensor in tensors():
                _share_buffer(tensor.pin_memory(), tensor)

    def reload():
        if _on_gpu():
            for tensor in tensors():
                _share_buffer(tensor.cuda(), tensor)

    return offload, reload


def innermost_optimizer(optimizer):
    """The optimizer that owns the states, under fleet's wrappers (HybridParallelOptimizer ->
    DygraphShardingOptimizer -> AdamW; group-sharded stage2 keeps it in `_optim`)."""
    seen = set()
    while id(optimizer) not in seen:
        seen.add(id(optimizer))
        inner = optimizer.__dict__.get("_inner_opt") or optimizer.__dict__.get("_optim")
        if inner is None:
            break
        optimizer = inner
    return optimizer


def optimizer_movers(optimizer) -> Mover:
    """(offload, reload) for an optimizer's accumulators (moments) and master weights."""

    def apply(to_host: bool):
        if not _on_gpu():
            return
        inner = innermost_optimizer(optimizer)
        stores = list(getattr(inner, "_accumulators", {}).values()) + [getattr(inner, "_master_weights", {})]
        for store in stores:
            for key, value in store.items():
                store[key] = value.pin_memory() if to_host else value.cuda()

    return (lambda: apply(True)), (lambda: apply(False))
