"""Atomic checkpoint directories and the PPO-level state that travels with them.

A checkpoint is written into a temporary sibling directory and renamed into place only when it
is complete, so an interrupted save never leaves a half-written checkpoint that a resume would
trust.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import random
import re
import shutil
from dataclasses import asdict, dataclass, field
from typing import Iterator, Optional

import numpy as np
import paddle

CHECKPOINT_PREFIX = "checkpoint-"
PPO_STATE_NAME = "ppo_state.json"


@contextlib.contextmanager
def atomic_directory(final_path: str) -> Iterator[str]:
    """Yield a temporary directory; on success it replaces `final_path` in one rename."""
    parent = os.path.dirname(os.path.abspath(final_path))
    os.makedirs(parent, exist_ok=True)
    temporary = os.path.join(parent, f".{os.path.basename(final_path)}.tmp-{os.getpid()}")
    shutil.rmtree(temporary, ignore_errors=True)
    os.makedirs(temporary)
    try:
        yield temporary
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    previous = None
    if os.path.exists(final_path):
        previous = os.path.join(parent, f".{os.path.basename(final_path)}.old-{os.getpid()}")
        shutil.rmtree(previous, ignore_errors=True)
        os.rename(final_path, previous)
    os.rename(temporary, final_path)
    if previous is not None:
        shutil.rmtree(previous, ignore_errors=True)


@dataclass
class SamplerState:
    """Where a deterministic epoch-shuffled sampler stands: epoch number and next batch index."""

    epoch: int = 0
    batch_index: int = 0


@dataclass
class PPOState:
    """Everything besides model/optimizer tensors that a resumed run needs to continue exactly."""

    global_step: int = 0
    rollouts_done: int = 0
    prompt_sampler: SamplerState = field(default_factory=SamplerState)
    ptx_sampler: SamplerState = field(default_factory=SamplerState)
    # Position inside the rollout being trained on when the checkpoint was taken (None = between rollouts).
    pending_update_iter: Optional[int] = None
    pending_micro_batch: Optional[int] = None
    consecutive_nonfinite_steps: int = 0
    metric_tracker: dict = field(default_factory=dict)
    latest_rollout_metrics: dict = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "PPOState":
        raw = json.loads(text)
        raw["prompt_sampler"] = SamplerState(**raw["prompt_sampler"])
        raw["ptx_sampler"] = SamplerState(**raw["ptx_sampler"])
        return cls(**raw)


def save_rng_state(path: str) -> None:
    state = {"paddle": paddle.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    with open(path, "wb") as f:
        pickle.dump(state, f)


def load_rng_state(path: str) -> None:
    with open(path, "rb") as f:
        state = pickle.load(f)  # written by save_rng_state of this project, not user data
    paddle.set_rng_state(state["paddle"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def checkpoint_step(path: str) -> Optional[int]:
    match = re.fullmatch(CHECKPOINT_PREFIX + r"(\d+)", os.path.basename(os.path.normpath(path)))
    return int(match.group(1)) if match else None


def latest_checkpoint(output_dir: str) -> Optional[str]:
    if not os.path.isdir(output_dir):
        return None
    steps = [(checkpoint_step(name), name) for name in os.listdir(output_dir)]
    complete = [
        (step, name)
        for step, name in steps
        if step is not None and os.path.isfile(os.path.join(output_dir, name, PPO_STATE_NAME))
    ]
    return os.path.join(output_dir, max(complete)[1]) if complete else None


def resolve_resume_path(resume_from_checkpoint, output_dir: str) -> Optional[str]:
    """`True`/"true"/"latest" → newest complete checkpoint in output_dir; a path must exist."""
    if resume_from_checkpoint in (None, False, "", "false", "False"):
        return None
    if resume_from_checkpoint in (True, "true", "True", "latest"):
        path = latest_checkpoint(output_dir)
        if path is None:
            raise FileNotFoundError(f"resume_from_checkpoint asks for the latest checkpoint, but {output_dir} has none")
        return path
    path = str(resume_from_checkpoint)
    if not os.path.isfile(os.path.join(path, PPO_STATE_NAME)):
        raise FileNotFoundError(
            f"resume_from_checkpoint={path!r} is not a complete PPO checkpoint (no {PPO_STATE_NAME} there); "
            f"available: {sorted(n for n in os.listdir(output_dir) if checkpoint_step(n) is not None) if os.path.isdir(output_dir) else []}"
        )
    return path


def rotate_checkpoints(output_dir: str, save_total_limit: Optional[int]) -> None:
    if not save_total_limit or save_total_limit <= 0:
        return
    steps = sorted(
        (step, name) for name in os.listdir(output_dir) if (step := checkpoint_step(name)) is not None
    )
    for _, name in steps[:-save_total_limit]:
        shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)


def _rename_optimizer_state(state: dict, renames: dict) -> dict:
    """Rename the keys of an optimizer state dict whose names start with a parameter name.

    Accumulators are stored as f"{param.name}_{kind}_{index}" and master weights under the
    parameter name; the longest matching parameter name wins.
    """
    ordered = sorted(renames, key=len, reverse=True)

    def rename(key: str) -> str:
        for old in ordered:
            if key == old or key.startswith(old + "_"):
                return renames[old] + key[len(old):]
        return key

    converted = {}
    for key, value in state.items():
        if key == "master_weights" and isinstance(value, dict):
            converted[key] = {rename(k): v for k, v in value.items()}
        elif key == "LR_Scheduler":
            converted[key] = value
        else:
            converted[rename(key)] = value
    return converted


def portable_optimizer_state(optimizer, model) -> dict:
    """The optimizer state keyed by structural parameter names (`llama.layers.0.mlp...`).

    Paddle names parameters from global counters (`linear_12.w_0`), so the same model built in a
    new process, or after other models, gets other names; structural names do not change.
    """
    renames = {parameter.name: "@" + structural for structural, parameter in model.named_parameters()}
    return _rename_optimizer_state(optimizer.state_dict(), renames)


def load_portable_optimizer_state(optimizer, model, state: dict) -> None:
    renames = {"@" + structural: parameter.name for structural, parameter in model.named_parameters()}
    optimizer.set_state_dict(_rename_optimizer_state(state, renames))
