"""Directories built once and shared by every process of the machine (converted models, the
compiled CPU extension): `$PADDLE_RLHF_CACHE` (default `~/.cache/paddle-rlhf`).

An entry is written into a private staging directory and renamed into place when complete, so
a crash never leaves half an entry and concurrent ranks (`paddle.distributed.launch`) agree on
one result: a lock lets one process build while the others wait, and where locking is
unavailable (some network file systems) the first rename wins and the other copies are
discarded. Not `ppo.checkpoint.atomic_directory`: that one replaces an existing target, which
would pull a finished entry from under a process that is already reading it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import uuid
from typing import Iterator

CACHE_ENV = "PADDLE_RLHF_CACHE"


def cache_base() -> str:
    return os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "paddle-rlhf")


@contextlib.contextmanager
def directory_lock(final_dir: str) -> Iterator[None]:
    """One builder per entry among processes of this machine. Only an optimisation (N ranks
    would otherwise each build the entry): correctness comes from the rename in
    `publish_directory`."""
    lock_path = os.path.join(os.path.dirname(final_dir), f".{os.path.basename(final_dir)}.lock")
    try:
        handle = open(lock_path, "a+")
    except OSError:
        yield
        return
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError:
            pass  # no locking on this file system: fall back to racing on the rename
        yield


def staging_directory(final_dir: str) -> str:
    """A fresh private directory beside `final_dir`, to build the entry in."""
    staging = os.path.join(os.path.dirname(final_dir), f".{os.path.basename(final_dir)}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    os.makedirs(staging)
    return staging


def publish_directory(staging: str, final_dir: str) -> bool:
    """Rename the complete staging directory into place. False when another process won."""
    try:
        os.rename(staging, final_dir)
        return True
    except OSError:
        if os.path.isdir(final_dir):
            shutil.rmtree(staging, ignore_errors=True)
            return False
        raise
