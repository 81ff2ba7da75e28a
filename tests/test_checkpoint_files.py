"""Checkpoint directory mechanics: manifest, publishing, choosing the newest complete checkpoint,
rotation (`ppo.checkpoint_files`, and the PPO view of it in `ppo.checkpoint`)."""

import json
import os

import pytest

from ppo.checkpoint import PPO_STATE_NAME, latest_checkpoint, resolve_resume_path
from ppo.checkpoint import rotate_checkpoints as rotate_ppo_checkpoints
from ppo.checkpoint_files import (
    MANIFEST_NAME,
    CheckpointError,
    CheckpointPolicy,
    manifest_or_marker,
    newest_resumable_checkpoint,
    publish_checkpoint,
    remove_stale_staging,
    resolve_resume_request,
    rotate_checkpoints,
    staging_dir,
    verify_manifest,
    write_manifest,
)

STRICT = CheckpointPolicy()


def write_files(directory, files):
    for rel, content in files.items():
        path = os.path.join(directory, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(content)


def publish(output_dir, step, files=None):
    """A checkpoint-`step` written the way the trainers write one: staged, then published."""
    staging = staging_dir(str(output_dir), step)
    os.makedirs(staging)
    write_files(staging, files or {"weights.bin": bytes(range(256)) * 8, "policy/config.json": b'{"step": %d}' % step})
    final = os.path.join(str(output_dir), f"checkpoint-{step}")
    publish_checkpoint(staging, final)
    return final


def test_manifest_lists_sizes_and_checksums_of_every_file(tmp_path):
    write_files(tmp_path, {"a.bin": b"x" * 10, "sub/b.json": b"{}"})
    manifest = write_manifest(str(tmp_path))
    assert sorted(manifest["files"]) == ["a.bin", "sub/b.json"]
    assert manifest["files"]["a.bin"]["size"] == 10
    assert json.loads((tmp_path / MANIFEST_NAME).read_text()) == manifest
    verify_manifest(str(tmp_path))


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: open(d / "a.bin", "r+b").truncate(3), r"a.bin is 3 bytes, checkpoint_manifest.json says 10: truncated"),
        (lambda d: (d / "a.bin").write_bytes(b"y" * 10), r"a.bin does not match its SHA-256 .*corrupted"),
        (lambda d: os.remove(d / "sub" / "b.json"), r"b.json is missing"),
        (lambda d: (d / MANIFEST_NAME).write_text('{"files": '), r"checkpoint_manifest.json is unreadable"),
        (lambda d: os.remove(d / MANIFEST_NAME), r"checkpoint_manifest.json is missing: the checkpoint was not completely written"),
    ],
)
def test_a_damaged_checkpoint_is_an_error_naming_the_file(tmp_path, damage, message):
    write_files(tmp_path, {"a.bin": b"x" * 10, "sub/b.json": b"{}"})
    write_manifest(str(tmp_path))
    damage(tmp_path)
    with pytest.raises(CheckpointError, match=message):
        verify_manifest(str(tmp_path))


def test_same_size_corruption_passes_the_size_check_only(tmp_path):
    write_files(tmp_path, {"a.bin": b"x" * 10})
    write_manifest(str(tmp_path))
    (tmp_path / "a.bin").write_bytes(b"y" * 10)
    verify_manifest(str(tmp_path), checksums=False)
    with pytest.raises(CheckpointError, match="SHA-256"):
        verify_manifest(str(tmp_path))


def test_publishing_the_same_step_again_replaces_it_whole(tmp_path):
    first = publish(tmp_path, 2, {"old.bin": b"1"})
    publish(tmp_path, 2, {"new.bin": b"2"})
    assert sorted(os.listdir(first)) == [MANIFEST_NAME, "new.bin"]
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-2"]


def test_resume_true_falls_back_past_broken_checkpoints_and_says_so(tmp_path, caplog):
    publish(tmp_path, 2)
    newest = publish(tmp_path, 6)
    publish(tmp_path, 4)
    with open(os.path.join(newest, "weights.bin"), "r+b") as f:
        f.truncate(7)
    os.makedirs(tmp_path / "checkpoint-8")  # killed before anything was published: no manifest
    (tmp_path / "checkpoint-8" / "weights.bin").write_bytes(b"half")
    path = resolve_resume_request(True, str(tmp_path), STRICT)
    assert path == str(tmp_path / "checkpoint-4")
    log = caplog.text
    assert "not resuming from checkpoint-8" in log and "falling back to checkpoint-6" in log
    assert "not resuming from checkpoint-6" in log and "weights.bin is 7 bytes" in log and "falling back to checkpoint-4" in log


def test_resume_errors_name_what_is_wrong(tmp_path):
    with pytest.raises(FileNotFoundError, match="has none"):
        resolve_resume_request("true", str(tmp_path), STRICT)
    os.makedirs(tmp_path / "checkpoint-3")
    with pytest.raises(CheckpointError, match="no usable checkpoint.*checkpoint-3.*not completely written"):
        resolve_resume_request("latest", str(tmp_path), STRICT)
    # An explicit path is checked, never silently replaced by another checkpoint.
    good = publish(tmp_path, 1)
    broken = publish(tmp_path, 2)
    (tmp_path / "checkpoint-2" / "weights.bin").write_bytes(b"z")
    with pytest.raises(CheckpointError, match=r"resume_from_checkpoint=.*checkpoint-2.*weights.bin is 1 bytes"):
        resolve_resume_request(broken, str(tmp_path), STRICT)
    assert resolve_resume_request(good, str(tmp_path), STRICT) == good
    with pytest.raises(FileNotFoundError, match=r"\(no such directory\); available: \['checkpoint-3', 'checkpoint-2', 'checkpoint-1'\]"):
        resolve_resume_request(str(tmp_path / "checkpoint-9"), str(tmp_path), STRICT)
    assert resolve_resume_request(None, str(tmp_path), STRICT) is None
    assert resolve_resume_request("false", str(tmp_path), STRICT) is None


def test_ppo_checkpoints_without_manifest_are_accepted_by_their_state_file(tmp_path):
    # Written before manifests existed: the state file was written last and marks completeness.
    legacy = tmp_path / "checkpoint-3"
    legacy.mkdir()
    (legacy / PPO_STATE_NAME).write_text("{}")
    (tmp_path / "checkpoint-5").mkdir()  # no state file: incomplete
    assert latest_checkpoint(str(tmp_path)) == str(legacy)
    assert resolve_resume_path("true", str(tmp_path)) == str(legacy)
    with pytest.raises(CheckpointError, match="not a complete PPO checkpoint"):
        resolve_resume_path(str(tmp_path / "checkpoint-5"), str(tmp_path))
    published = publish(tmp_path, 7, {PPO_STATE_NAME: b"{}", "actor_optimizer.rank0.pdopt": b"o" * 100})
    assert latest_checkpoint(str(tmp_path)) == published
    open(os.path.join(published, "actor_optimizer.rank0.pdopt"), "r+b").truncate(50)
    assert latest_checkpoint(str(tmp_path)) == str(legacy)


def test_rotation_keeps_the_newest_complete_checkpoints(tmp_path):
    for step in (1, 2, 3):
        publish(tmp_path, step)
    (tmp_path / "checkpoint-4").mkdir()  # incomplete and newest: must not count as one of the kept
    deleted = rotate_checkpoints(str(tmp_path), 1, manifest_or_marker(None))
    assert sorted(os.path.basename(p) for p in deleted) == ["checkpoint-1", "checkpoint-2"]
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-3", "checkpoint-4"]
    # Nothing to rotate while the number of complete ones is within the limit.
    assert rotate_checkpoints(str(tmp_path), 1, manifest_or_marker(None)) == []
    assert rotate_checkpoints(str(tmp_path), None, manifest_or_marker(None)) == []


def test_rotation_spares_protected_checkpoints(tmp_path):
    best = publish(tmp_path, 1)
    for step in (2, 3):
        publish(tmp_path, step)
    rotate_checkpoints(str(tmp_path), 1, manifest_or_marker(None), keep=[best])
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-1", "checkpoint-3"]


def test_ppo_rotation_counts_legacy_and_published_checkpoints(tmp_path):
    legacy = tmp_path / "checkpoint-1"
    legacy.mkdir()
    (legacy / PPO_STATE_NAME).write_text("{}")
    publish(tmp_path, 2, {PPO_STATE_NAME: b"{}"})
    rotate_ppo_checkpoints(str(tmp_path), 1)
    assert os.listdir(tmp_path) == ["checkpoint-2"]


def test_stale_staging_directories_are_removed(tmp_path):
    os.makedirs(staging_dir(str(tmp_path), 5))
    os.makedirs(tmp_path / ".checkpoint-4.replaced")
    os.makedirs(tmp_path / ".checkpoint-1.deleting")  # rotation killed half-way through a deletion
    publish(tmp_path, 3)
    assert remove_stale_staging(str(tmp_path)) == [".checkpoint-1.deleting", ".checkpoint-4.replaced", ".checkpoint-5.staging"]
    assert os.listdir(tmp_path) == ["checkpoint-3"]
    assert newest_resumable_checkpoint(str(tmp_path / "missing"), STRICT) is None


def test_a_half_written_trainer_checkpoint_is_skipped_where_paddlenlp_would_pick_it(tmp_path):
    from paddlenlp.trainer.trainer_utils import get_last_checkpoint

    from ppo.stage_checkpoints import resolve_stage_resume

    complete = publish(tmp_path, 2, {"model_state.pdparams": b"w" * 64, "trainer_state.json": b"{}"})
    half = tmp_path / "checkpoint-4"  # PaddleNLP writes in place: killed after the weights, before the optimizer
    half.mkdir()
    (half / "model_state.pdparams").write_bytes(b"w" * 64)
    (half / "trainer_state.json").write_text("{}")
    assert get_last_checkpoint(str(tmp_path)) == str(half)
    assert resolve_stage_resume(True, str(tmp_path)) == complete
