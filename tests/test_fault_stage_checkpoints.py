"""SFT / reward-model checkpoints through PaddleNLP's Trainer with `ppo.stage_checkpoints`:
published atomically with a manifest, rotated safely, resumed exactly (falling back past broken
ones), preempted cleanly, and a disk that fills during a save loses nothing."""

import errno
import json
import os
import shutil
import signal

import numpy as np
import paddle
import pytest
from paddlenlp.trainer import TrainerCallback

from ppo.checkpoint_files import MANIFEST_NAME, verify_manifest
from ppo.stage import run_stage
from sft.run_sft import SftArguments, build_trainer
from tests.test_sft_training import alpaca_rows

MAX_STEPS = 6


class LossRecorder(TrainerCallback):
    def __init__(self):
        self.losses = {}

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses[state.global_step] = logs["loss"]


@pytest.fixture(scope="module")
def train_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("sft_data") / "train.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in alpaca_rows(48, seed=0)))
    return str(path)


def train(output_dir, model_dir, train_file, callbacks=(), **overrides):
    """Build the SFT trainer and run the stage as `sft/run_sft.py` does; returns the losses logged."""
    values = dict(
        model_name_or_path=model_dir, train_datasets=f"alpaca:1:{train_file}", output_dir=str(output_dir),
        max_length=48, per_device_train_batch_size=4, learning_rate=2e-3, max_steps=MAX_STEPS, logging_steps=1,
        save_strategy="steps", save_steps=2, save_total_limit=1, do_train=True, report_to="none", seed=3,
        disable_tqdm=True,
    )  # fmt: skip
    values.update(overrides)
    args = SftArguments(**values)
    paddle.seed(args.seed)
    recorder = LossRecorder()
    # Parameter and optimizer-state names come from a global counter; a fresh counter names them
    # as a new process would, which is what a resumed run is.
    with paddle.utils.unique_name.guard():
        trainer = build_trainer(args)
        for callback in (recorder, *callbacks):
            trainer.add_callback(callback)
        run_stage(trainer, args, "SFT")
    return recorder


def final_weights(output_dir):
    return {name: np.asarray(value) for name, value in paddle.load(os.path.join(str(output_dir), "model_state.pdparams")).items()}


def assert_same_run(resumed, reference, resumed_from):
    assert sorted(resumed.losses) == list(range(resumed_from + 1, MAX_STEPS + 1))
    for step, loss in resumed.losses.items():
        assert loss == reference["losses"][step], step


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_llama_dir, train_file):
    """The uninterrupted run: its per-step losses, final weights and directory."""
    output_dir = tmp_path_factory.mktemp("reference")
    recorder = train(output_dir, tiny_llama_dir, train_file)
    return {"losses": recorder.losses, "weights": final_weights(output_dir), "dir": output_dir}


def test_checkpoints_are_published_with_a_manifest_and_rotated(reference):
    output_dir = reference["dir"]
    names = sorted(os.listdir(output_dir))
    # save_total_limit=1 holds in a single process too (PaddleNLP's own rotation skips local_rank -1).
    assert [n for n in names if n.startswith("checkpoint-")] == [f"checkpoint-{MAX_STEPS}"]
    assert not [n for n in names if n.startswith(".")], names
    checkpoint = output_dir / f"checkpoint-{MAX_STEPS}"
    assert {MANIFEST_NAME, "optimizer.pdopt", "trainer_state.json", "model_state.pdparams"} <= set(os.listdir(checkpoint))
    verify_manifest(str(checkpoint))
    assert paddle.load(str(checkpoint / "training_args.bin")).output_dir == str(output_dir)
    assert sorted(reference["losses"]) == list(range(1, MAX_STEPS + 1))


def test_a_disk_full_during_a_save_keeps_the_previous_checkpoint(tmp_path, tiny_llama_dir, train_file, reference, monkeypatch, caplog):
    real_save = paddle.save

    def save_until_the_disk_is_full(obj, path, *args, **kwargs):
        if "checkpoint-4" in str(path) and str(path).endswith("optimizer.pdopt"):
            with open(path, "wb") as f:
                f.write(b"\0" * 1000)  # what fitted before the disk was full
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(paddle, "save", save_until_the_disk_is_full)
    with pytest.raises(OSError, match="No space left on device"):
        train(tmp_path, tiny_llama_dir, train_file)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-2"]  # no checkpoint-4, no staging left behind
    verify_manifest(str(tmp_path / "checkpoint-2"))
    assert "saving checkpoint-4 failed" in caplog.text and "checkpoint-2 is untouched" in caplog.text

    resumed = train(tmp_path, tiny_llama_dir, train_file, resume_from_checkpoint="true")
    assert_same_run(resumed, reference, resumed_from=2)
    for name, value in final_weights(tmp_path).items():
        np.testing.assert_array_equal(value, reference["weights"][name], err_msg=name)


def test_resume_true_falls_back_past_truncated_and_corrupted_checkpoints(tmp_path, tiny_llama_dir, train_file, reference, caplog):
    train(tmp_path, tiny_llama_dir, train_file, save_total_limit=None)
    with open(tmp_path / "checkpoint-6" / "model_state.pdparams", "r+b") as f:
        f.truncate(1234)
    with open(tmp_path / "checkpoint-4" / "optimizer.pdopt", "r+b") as f:
        f.seek(-8, os.SEEK_END)
        f.write(b"\xff" * 8)  # same size, other bytes: only the checksum sees it
    resumed = train(tmp_path, tiny_llama_dir, train_file, resume_from_checkpoint="true")
    assert "not resuming from checkpoint-6" in caplog.text and "model_state.pdparams is 1234 bytes" in caplog.text
    assert "falling back to checkpoint-4" in caplog.text
    assert "checkpoint-4/optimizer.pdopt does not match its SHA-256" in caplog.text
    assert "falling back to checkpoint-2" in caplog.text
    assert_same_run(resumed, reference, resumed_from=2)


class SignalAt(TrainerCallback):
    """Delivers `number` to this process while step `step` runs (as a preemption would)."""

    def __init__(self, step, number):
        self.step, self.number = step, number

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.step:
            os.kill(os.getpid(), self.number)


@pytest.mark.parametrize("number", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_checkpoints_the_step_and_exits_with_resume_instructions(tmp_path, tiny_llama_dir, train_file, reference, caplog, number):
    with pytest.raises(SystemExit) as stopped:
        train(tmp_path, tiny_llama_dir, train_file, callbacks=[SignalAt(3, number)], save_steps=100)
    assert stopped.value.code == 128 + number
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-3"]  # no final model: training did not finish
    verify_manifest(str(tmp_path / "checkpoint-3"))
    assert f"stopped on {signal.Signals(number).name} at step 3" in caplog.text
    assert "--resume_from_checkpoint true" in caplog.text
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers are restored

    resumed = train(tmp_path, tiny_llama_dir, train_file, save_steps=100, resume_from_checkpoint="true")
    assert_same_run(resumed, reference, resumed_from=3)
    for name, value in final_weights(tmp_path).items():
        np.testing.assert_array_equal(value, reference["weights"][name], err_msg=name)


def test_async_saving_is_refused(tmp_path, tiny_llama_dir, train_file):
    with pytest.raises(ValueError, match="async saving off"):
        train(tmp_path, tiny_llama_dir, train_file, unified_checkpoint_config="async_save")


def test_resuming_from_the_last_step_trains_no_further(tmp_path, tiny_llama_dir, train_file, reference):
    # PaddleNLP alone would run a step 7 here (with a schedule whose last rate is not 0, a changed model).
    for name in os.listdir(reference["dir"]):
        if name.startswith("checkpoint-"):
            shutil.copytree(reference["dir"] / name, tmp_path / name)
    resumed = train(tmp_path, tiny_llama_dir, train_file, resume_from_checkpoint="true", lr_scheduler_type="constant")
    assert resumed.losses == {}
    for name, value in final_weights(tmp_path).items():
        np.testing.assert_array_equal(value, reference["weights"][name], err_msg=name)
