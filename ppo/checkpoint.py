"""Atomic checkpoint directories and the PPO-level state that travels with them.

A checkpoint is written into a temporary sibling directory and published (`publish_checkpoint`:
manifest of sizes and checksums, then one rename) only when it is complete, so an interrupted
save never leaves a half-written checkpoint that a resume would trust; `ppo.checkpoint_files`
holds the directory mechanics shared with the SFT / reward-model stages.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import random
import shutil
from dataclasses import asdict, dataclass, field
from typing import Iterator, Optional

import numpy as np
import paddle

from ppo.checkpoint_files import (  # noqa: F401 (CHECKPOINT_PREFIX, checkpoint_step, publish_checkpoint: used by the PPO trainer)
    CHECKPOINT_PREFIX,
    CheckpointPolicy,
    checkpoint_step,
    manifest_or_marker,
    newest_resumable_checkpoint,
    publish_checkpoint,
    resolve_resume_request,
)
from ppo.checkpoint_files import rotate_checkpoints as rotate_files

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


# A PPO checkpoint written before manifests existed is complete when its state file is there.
PPO_POLICY = CheckpointPolicy(legacy_marker=PPO_STATE_NAME)


def latest_checkpoint(output_dir: str) -> Optional[str]:
    """The newest complete PPO checkpoint of output_dir (newer broken ones skipped with a log line)."""
    return newest_resumable_checkpoint(output_dir, PPO_POLICY)


def resolve_resume_path(resume_from_checkpoint, output_dir: str) -> Optional[str]:
    """`True`/"true"/"latest" → newest complete checkpoint in output_dir; a path must be complete."""
    return resolve_resume_request(resume_from_checkpoint, output_dir, PPO_POLICY, kind="PPO ")


def rotate_checkpoints(output_dir: str, save_total_limit: Optional[int]) -> None:
    """Delete checkpoints older than the newest `save_total_limit` complete ones (call it after
    `publish_checkpoint`, so the one just written counts)."""
    rotate_files(output_dir, save_total_limit, manifest_or_marker(PPO_STATE_NAME))


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
