"""Start-up checks of output_dir, run before any model is loaded: a run that cannot write its
checkpoints should fail in a second, not after an hour of training.

`check_output_dir` creates output_dir, writes, flushes and deletes a probe file (catches
read-only mounts, permissions, quota and a full disk), and compares the free space with an
estimate of what the run writes: one checkpoint (weights + AdamW moments, + fp32 master weights
when training in 16 bits) and the final model, per trained model, from the size of its weight
files when it is a local directory; a fixed minimum otherwise.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from typing import Iterable, Optional

MIN_FREE_BYTES = 64 << 20  # logs, metrics, tokenizer files: needed even when nothing is estimated
PROBE_BYTES = 64 << 10
WEIGHT_SUFFIXES = (".pdparams", ".safetensors", ".bin", ".pt", ".pth", ".gguf")
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}
ADAM_MOMENT_BYTES = 8  # two fp32 moments per parameter


class OutputDirError(OSError):
    """output_dir cannot take this run's output; the message says why and what is needed."""


def weight_bytes(model_dir: str) -> Optional[int]:
    """Total size of the weight files of a local model directory; None when it is not one."""
    if not model_dir or not os.path.isdir(model_dir):
        return None
    total = sum(
        os.path.getsize(os.path.join(model_dir, name))
        for name in os.listdir(model_dir)
        if name.endswith(WEIGHT_SUFFIXES) and os.path.isfile(os.path.join(model_dir, name))
    )
    return total or None


def stored_dtype(model_dir: str) -> str:
    try:
        with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as handle:
            config = json.load(handle)
    except (OSError, ValueError):
        return "float32"
    dtype = config.get("dtype") or config.get("torch_dtype") or "float32"
    return dtype if dtype in DTYPE_BYTES else "float32"


def estimate_run_bytes(trained_model_dirs: Iterable[str], train_dtype: str = "float32", saves_checkpoints: bool = True) -> int:
    """Bytes a training run writes at least: for every trained model its final weights and, with
    checkpoints, one checkpoint of weights + optimizer state (parameter count from the weight
    files and the dtype they are stored in)."""
    train_bytes = DTYPE_BYTES.get(train_dtype, 4)
    per_parameter = train_bytes
    if saves_checkpoints:
        per_parameter += train_bytes + ADAM_MOMENT_BYTES + (4 if train_bytes < 4 else 0)
    total = 0
    for model_dir in trained_model_dirs:
        size = weight_bytes(model_dir)
        if size is not None:
            total += size // DTYPE_BYTES[stored_dtype(model_dir)] * per_parameter
    return max(total, MIN_FREE_BYTES)


def _gib(size: int) -> str:
    return f"{size / (1 << 30):.2f} GiB"


def check_output_dir(output_dir: str, needed_bytes: int = MIN_FREE_BYTES, what: str = "this run") -> None:
    """Raise OutputDirError unless output_dir can be created, written to and has `needed_bytes` free."""
    if not output_dir:
        raise OutputDirError(errno.EINVAL, "output_dir is empty: name the directory the run writes to")
    path = os.path.abspath(output_dir)
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as error:
        raise OutputDirError(error.errno, f"output_dir {path} cannot be created: {error.strerror or error}") from None
    probe = os.path.join(path, f".write-probe-{os.getpid()}")
    try:
        with open(probe, "wb") as handle:
            handle.write(b"\0" * PROBE_BYTES)
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as error:
        raise OutputDirError(error.errno, f"output_dir {path} is not writable: {error.strerror or error}") from None
    finally:
        if os.path.exists(probe):
            os.remove(probe)
    free = shutil.disk_usage(path).free
    if free < needed_bytes:
        raise OutputDirError(
            errno.ENOSPC,
            f"output_dir {path} has {_gib(free)} free, {what} needs about {_gib(needed_bytes)} "
            f"(one checkpoint and the final model): free some space or choose another output_dir",
        )


def check_training_output_dir(output_dir: str, trained_model_dirs: Iterable[str], train_dtype: str, saves_checkpoints: bool) -> int:
    """`check_output_dir` with the space estimated for training these models; returns the estimate."""
    needed = estimate_run_bytes(list(trained_model_dirs), train_dtype, saves_checkpoints)
    check_output_dir(output_dir, needed, what="training")
    return needed
