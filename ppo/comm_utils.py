"""Cross-process helpers (metric reduction, agreement on skipping a step) and offloading.

Everything here degrades to a no-op in a single process, so the trainer calls it unconditionally.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Mapping, Tuple

import paddle
import paddle.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_distributed() -> bool:
    return world_size() > 1


def all_reduce_mean(values: Mapping[str, float]) -> Dict[str, float]:
    """Average scalar metrics over all ranks (identity in a single process)."""
    if not values or not is_distributed():
        return dict(values)
    names = sorted(values)
    stacked = paddle.to_tensor([float(values[name]) for name in names], dtype="float64")
    dist.all_reduce(stacked)
    return {name: float(v) / world_size() for name, v in zip(names, stacked.numpy().tolist())}


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


# --------------------------------------------------------------------------------------------
# Offloading


Mover = Tuple[Callable[[], None], Callable[[], None]]  # (offload, reload)

# What each offload_level token may move off the device.
OFFLOAD_GROUPS = {
    "freeze_model": ("reference_model", "reward_model"),
    "optimizer": ("actor_optimizer", "critic_optimizer"),
    "train_model": ("actor_model", "critic_model"),
}


@dataclass
class OffloadManager:
    """Keeps each offloadable object on the device exactly in the phases that use it.

    `movers` maps an object name (see OFFLOAD_GROUPS) to its (offload, reload) functions. Only the
    names selected by `offload_level` are ever moved; everything else stays resident. Every move is
    recorded in `events` so the schedule can be checked (on a CPU-only machine the movers are
    no-ops, but the schedule is the same as on GPU).
    """

    offload_level: Iterable[str]
    movers: Dict[str, Mover]
    events: List[Tuple[str, str, str]] = field(default_factory=list)  # (phase, "offload"/"reload", name)

    def __post_init__(self):
        self.managed = [name for token in self.offload_level for name in OFFLOAD_GROUPS[token] if name in self.movers]
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
        if paddle.is_compiled_with_cuda() and paddle.get_device().startswith("gpu"):
            for tensor in tensors():
                _share_buffer(tensor.pin_memory(), tensor)

    def reload():
        if paddle.is_compiled_with_cuda() and paddle.get_device().startswith("gpu"):
            for tensor in tensors():
                _share_buffer(tensor.cuda(), tensor)

    return offload, reload


def optimizer_movers(optimizer) -> Mover:
    """(offload, reload) for an optimizer's accumulators (moments) and master weights."""

    def apply(to_host: bool):
        if not (paddle.is_compiled_with_cuda() and paddle.get_device().startswith("gpu")):
            return
        inner = getattr(optimizer, "_inner_opt", optimizer)
        stores = list(getattr(inner, "_accumulators", {}).values()) + [getattr(inner, "_master_weights", {})]
        for store in stores:
            for key, value in store.items():
                store[key] = value.pin_memory() if to_host else value.cuda()

    return (lambda: apply(True)), (lambda: apply(False))
