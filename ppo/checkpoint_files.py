"""Checkpoint directories that a crash cannot leave half-trusted.

A checkpoint is staged in a hidden sibling directory, a manifest of every file's size and SHA-256
is written into it last, and it is renamed into place in one step. A resume takes the newest
`checkpoint-N` whose files match its manifest and falls back, with a log line, past any that do
not; rotation only ever removes checkpoints older than the newest complete ones.

Used by the PPO loop (`ppo.checkpoint`) and by the SFT / reward-model Trainer
(`ppo.stage_checkpoints`); nothing here knows what the files contain.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from typing import Callable, Iterable, List, Optional

from paddlenlp.utils.log import logger

CHECKPOINT_PREFIX = "checkpoint-"
MANIFEST_NAME = "checkpoint_manifest.json"
MANIFEST_FORMAT = 1
_CHUNK = 1 << 20


class CheckpointError(ValueError):
    """A checkpoint directory that must not be resumed from; the message names the file."""


def checkpoint_step(path: str) -> Optional[int]:
    match = re.fullmatch(re.escape(CHECKPOINT_PREFIX) + r"(\d+)", os.path.basename(os.path.normpath(path)))
    return int(match.group(1)) if match else None


def checkpoint_dirs(output_dir: str) -> List[str]:
    """`checkpoint-N` directories of output_dir, newest (highest N) first."""
    if not os.path.isdir(output_dir):
        return []
    found = [
        (step, name)
        for name in os.listdir(output_dir)
        if (step := checkpoint_step(name)) is not None and os.path.isdir(os.path.join(output_dir, name))
    ]
    return [os.path.join(output_dir, name) for _, name in sorted(found, reverse=True)]


def staging_dir(output_dir: str, step: int) -> str:
    """Where checkpoint-`step` is written before it is published; hidden, so that no
    `checkpoint-*` pattern (ours, PaddleNLP's) ever matches it."""
    return os.path.join(output_dir, f".{CHECKPOINT_PREFIX}{step}.staging")


def remove_stale_staging(output_dir: str) -> List[str]:
    """Delete staging directories (and checkpoints half-way through deletion) left by a process
    killed while saving or rotating; returns their names."""
    if not os.path.isdir(output_dir):
        return []
    pattern = re.compile(r"\." + re.escape(CHECKPOINT_PREFIX) + r"\d+\.(staging|replaced|deleting)")
    stale = sorted(name for name in os.listdir(output_dir) if pattern.fullmatch(name))
    for name in stale:
        shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)
    return stale


# ----------------------------------------------------------------------------------------------
# Manifest


def _files_under(directory: str) -> List[str]:
    relative = []
    for root, _, names in os.walk(directory):
        for name in names:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, directory)
            if rel != MANIFEST_NAME and not os.path.islink(path):
                relative.append(rel.replace(os.sep, "/"))
    return sorted(relative)


def _sha256(path: str, sync: bool = False) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
        if sync:
            os.fsync(handle.fileno())
    return digest.hexdigest()


def _fsync_dir(path: str) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_manifest(directory: str) -> dict:
    """Record size and SHA-256 of every file under `directory` in MANIFEST_NAME, flushing each file
    to disk on the way (a checkpoint must survive a power cut, not only a killed process)."""
    files = {}
    for rel in _files_under(directory):
        path = os.path.join(directory, rel)
        files[rel] = {"size": os.path.getsize(path), "sha256": _sha256(path, sync=True)}
    manifest = {"format": MANIFEST_FORMAT, "files": files}
    target = os.path.join(directory, MANIFEST_NAME)
    with open(target + ".partial", "w", encoding="utf-8") as handle:
        json.dump(manifest, handle, indent=1, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(target + ".partial", target)
    for root, _, _ in os.walk(directory):
        _fsync_dir(root)
    return manifest


def has_manifest(directory: str) -> bool:
    return os.path.isfile(os.path.join(directory, MANIFEST_NAME))


def verify_manifest(directory: str, checksums: bool = True) -> None:
    """Raise CheckpointError naming the first file that is missing, of the wrong size or (with
    `checksums`) of the wrong content. Sizes are checked for every file before any is read."""
    manifest_path = os.path.join(directory, MANIFEST_NAME)
    try:
        with open(manifest_path, encoding="utf-8") as handle:
            manifest = json.load(handle)
        files = manifest["files"]
    except FileNotFoundError:
        raise CheckpointError(f"{manifest_path} is missing: the checkpoint was not completely written") from None
    except (ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"{manifest_path} is unreadable ({error}): the checkpoint cannot be verified") from None
    for rel, entry in files.items():
        path = os.path.join(directory, rel)
        if not os.path.isfile(path):
            raise CheckpointError(f"{path} is missing (listed in {MANIFEST_NAME})")
        size = os.path.getsize(path)
        if size != entry["size"]:
            raise CheckpointError(f"{path} is {size} bytes, {MANIFEST_NAME} says {entry['size']}: truncated or overwritten")
    if checksums:
        for rel, entry in files.items():
            path = os.path.join(directory, rel)
            if _sha256(path) != entry["sha256"]:
                raise CheckpointError(f"{path} does not match its SHA-256 in {MANIFEST_NAME}: the file is corrupted")


# ----------------------------------------------------------------------------------------------
# Publishing, choosing, rotating


def publish_checkpoint(staging: str, final: str) -> None:
    """Write the manifest into the fully written `staging` directory and rename it to `final`.

    An existing `final` (the same step saved again) is moved aside first and deleted only after
    the new directory is in place, so some complete copy exists at every instant."""
    write_manifest(staging)
    parent = os.path.dirname(os.path.abspath(final))
    replaced = None
    if os.path.exists(final):
        replaced = os.path.join(parent, f".{os.path.basename(final)}.replaced")
        shutil.rmtree(replaced, ignore_errors=True)
        os.rename(final, replaced)
    os.rename(staging, final)
    _fsync_dir(parent)
    if replaced is not None:
        shutil.rmtree(replaced, ignore_errors=True)


@dataclass
class CheckpointPolicy:
    """What makes a `checkpoint-N` directory resumable.

    `legacy_marker`: a file that, in checkpoints written before manifests existed, was written last;
    such a directory without a manifest is accepted (unverified). None: a manifest is required."""

    legacy_marker: Optional[str] = None
    checksums: bool = True

    def check(self, directory: str) -> None:
        if has_manifest(directory):
            verify_manifest(directory, checksums=self.checksums)
        elif self.legacy_marker is None or not os.path.isfile(os.path.join(directory, self.legacy_marker)):
            raise CheckpointError(
                f"{os.path.join(directory, MANIFEST_NAME)} is missing: the checkpoint was not completely written"
            )
        else:
            logger.warning(f"{directory} has no {MANIFEST_NAME} (written by an older version): its files are not verified")


def newest_resumable_checkpoint(output_dir: str, policy: CheckpointPolicy) -> Optional[str]:
    """The newest checkpoint of output_dir that passes `policy`, logging each newer one skipped and
    why. None when output_dir has no checkpoint at all; CheckpointError when none is usable."""
    candidates = checkpoint_dirs(output_dir)
    problems = []
    for index, path in enumerate(candidates):
        try:
            policy.check(path)
        except CheckpointError as error:
            problems.append(str(error))
            following = candidates[index + 1] if index + 1 < len(candidates) else None
            logger.warning(
                f"not resuming from {os.path.basename(path)}: {error}; "
                + (f"falling back to {os.path.basename(following)}" if following else "no older checkpoint left")
            )
            continue
        if problems:
            logger.warning(f"resuming from {path}, the newest complete checkpoint ({len(problems)} newer skipped)")
        return path
    if problems:
        raise CheckpointError(f"no usable checkpoint in {output_dir}: " + "; ".join(problems))
    return None


def resolve_resume_request(resume_from_checkpoint, output_dir: str, policy: CheckpointPolicy, kind: str = "") -> Optional[str]:
    """`resume_from_checkpoint` as a path: None/False → None; True/"true"/"latest" → the newest
    resumable checkpoint of output_dir (an error when there is none); a path → that checkpoint,
    which must pass `policy`."""
    if resume_from_checkpoint in (None, False, "", "false", "False", "none", "None"):
        return None
    if resume_from_checkpoint in (True, "true", "True", "latest"):
        path = newest_resumable_checkpoint(output_dir, policy)
        if path is None:
            raise FileNotFoundError(f"resume_from_checkpoint asks for the latest checkpoint, but {output_dir} has none")
        return path
    path = str(resume_from_checkpoint)
    if not os.path.isdir(path):
        available = [os.path.basename(p) for p in checkpoint_dirs(output_dir)]
        raise FileNotFoundError(f"resume_from_checkpoint={path!r} is not a complete {kind}checkpoint (no such directory); available: {available}")
    try:
        policy.check(path)
    except CheckpointError as error:
        raise CheckpointError(f"resume_from_checkpoint={path!r} is not a complete {kind}checkpoint: {error}") from None
    return path


def rotate_checkpoints(
    output_dir: str, save_total_limit: Optional[int], is_complete: Callable[[str], bool], keep: Iterable[str] = ()
) -> List[str]:
    """Keep the newest `save_total_limit` complete checkpoints (and those in `keep`); delete the
    older ones. Nothing newer than the oldest kept one is touched, so an incomplete directory never
    displaces a complete one. Returns the deleted paths."""
    if not save_total_limit or save_total_limit <= 0:
        return []
    candidates = checkpoint_dirs(output_dir)
    complete = [path for path in candidates if is_complete(path)]
    if len(complete) <= save_total_limit:
        return []
    oldest_kept = checkpoint_step(complete[save_total_limit - 1])
    protected = {os.path.abspath(path) for path in keep}
    deleted = []
    for path in candidates:
        if checkpoint_step(path) < oldest_kept and os.path.abspath(path) not in protected:
            # Renamed out of the checkpoint-N namespace first: a kill during the deletion leaves a
            # hidden directory (removed by remove_stale_staging), never a half-deleted checkpoint.
            doomed = os.path.join(output_dir, f".{os.path.basename(path)}.deleting")
            shutil.rmtree(doomed, ignore_errors=True)
            os.rename(path, doomed)
            shutil.rmtree(doomed, ignore_errors=True)
            deleted.append(path)
    return deleted


def manifest_or_marker(marker: Optional[str]) -> Callable[[str], bool]:
    """A cheap completeness test for rotation: a manifest, or the legacy marker file."""

    def is_complete(path: str) -> bool:
        return has_manifest(path) or (marker is not None and os.path.isfile(os.path.join(path, marker)))

    return is_complete

