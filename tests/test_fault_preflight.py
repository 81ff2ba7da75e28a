"""Start-up refusal of an output_dir that cannot take the run (`ppo.preflight`), before any model
is loaded."""

import errno
import json
import os
import shutil
from collections import namedtuple

import pytest

from ppo.preflight import MIN_FREE_BYTES, OutputDirError, check_output_dir, estimate_run_bytes, weight_bytes

Usage = namedtuple("Usage", "total used free")


def fake_free_space(monkeypatch, free):
    """The disk reports `free` bytes (a full disk cannot be made without root; the probe write and
    the comparison are the real code)."""
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10 * free + 1, 9 * free + 1, free))


def test_a_writable_directory_is_created_and_left_clean(tmp_path):
    target = tmp_path / "a" / "b"
    check_output_dir(str(target))
    assert target.is_dir() and os.listdir(target) == []


def test_output_dir_under_a_file_is_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputDirError, match=r"output_dir .*file/out cannot be created"):
        check_output_dir(str(tmp_path / "file" / "out"))


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through directory permissions")
def test_read_only_directory_is_refused(tmp_path):
    tmp_path.chmod(0o555)
    try:
        with pytest.raises(OutputDirError, match="not writable|cannot be created"):
            check_output_dir(str(tmp_path / "out"))
    finally:
        tmp_path.chmod(0o755)


def test_read_only_mount_is_refused():
    if not os.path.isdir("/sys/kernel"):
        pytest.skip("no sysfs here (it takes no new directories, root or not)")
    with pytest.raises(OutputDirError, match="output_dir /sys/kernel/.* cannot be created"):
        check_output_dir("/sys/kernel/paddle-rlhf-output")


def test_a_full_disk_is_refused_with_the_numbers(tmp_path, monkeypatch):
    fake_free_space(monkeypatch, 10 << 20)
    with pytest.raises(OutputDirError, match=r"has 0.01 GiB free, training needs about 1.00 GiB") as error:
        check_output_dir(str(tmp_path), needed_bytes=1 << 30, what="training")
    assert error.value.errno == errno.ENOSPC


def test_estimate_follows_the_weight_files_and_dtypes(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    parameters = 50_000_000
    with open(model / "model_state.pdparams", "wb") as f:
        f.truncate(parameters * 4)  # a sparse file: 200 MB of fp32 weights, no disk used
    (model / "config.json").write_text(json.dumps({"dtype": "float32"}))
    assert weight_bytes(str(model)) == parameters * 4
    # fp32: final weights 4 + checkpoint (weights 4 + AdamW moments 8) bytes per parameter.
    assert estimate_run_bytes([str(model)], "float32") == parameters * 16
    assert estimate_run_bytes([str(model)], "float32", saves_checkpoints=False) == parameters * 4
    # bf16: 2 + (2 + 8 + fp32 master weights 4).
    assert estimate_run_bytes([str(model)], "bfloat16") == parameters * 16
    assert estimate_run_bytes([str(model), str(model)], "float32") == 2 * parameters * 16
    # Not a local directory (a hub name): the minimum.
    assert estimate_run_bytes(["org/some-model"]) == MIN_FREE_BYTES


def test_sft_arguments_refuse_before_a_model_is_loaded(tmp_path, tiny_llama_dir, monkeypatch):
    from sft.run_sft import SftArguments

    common = dict(model_name_or_path=tiny_llama_dir, train_datasets="alpaca:1:unused.jsonl", do_train=True, report_to="none")
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputDirError, match="cannot be created"):
        SftArguments(output_dir=str(tmp_path / "file" / "out"), **common)
    # The tiny model needs about 16 bytes per parameter; a disk with less free space is refused.
    fake_free_space(monkeypatch, weight_bytes(tiny_llama_dir))
    with pytest.raises(OutputDirError, match="training needs about"):
        SftArguments(output_dir=str(tmp_path / "out"), **common)
    monkeypatch.undo()
    assert SftArguments(output_dir=str(tmp_path / "out"), **common).output_dir == str(tmp_path / "out")
