"""Atomic, verified checkpoints and preemption handling for the PaddleNLP Trainer stages (SFT, RM).

PaddleNLP 3.0.0b4 writes `checkpoint-N` in place, and `get_last_checkpoint` returns the highest
N whatever its state, so a process killed while saving leaves a directory that the next
`resume_from_checkpoint: true` trusts. Its `save_total_limit` rotation also only runs when
`local_rank == 0`, which a single-process run (local_rank -1) never is. `FaultTolerantTrainerMixin`
fixes these through the Trainer's overridable methods:

- `_save_checkpoint` lets the Trainer write into a hidden staging directory, then publishes it
  (`ppo.checkpoint_files.publish_checkpoint`: manifest of sizes and SHA-256, one rename) and
  rotates, keeping at least the newest complete checkpoint;
- `train` resolves `resume_from_checkpoint` itself (true → newest checkpoint whose files match
  its manifest, falling back past broken ones with a log line) and hands PaddleNLP a path;
- a checkpoint that already holds the last step is loaded without training (PaddleNLP would run
  one step past max_steps);
- a `PreemptionGuard` is installed for the duration of `train`: SIGTERM/SIGINT → checkpoint at
  the next step end, stop; `run_stage` then exits with the resume instructions.
"""

from __future__ import annotations

import os
import shutil
from typing import Optional

import paddle
from paddlenlp.trainer.trainer_callback import TrainerState
from paddlenlp.trainer.trainer_utils import PREFIX_CHECKPOINT_DIR, TrainOutput
from paddlenlp.utils.log import logger

from ppo.checkpoint_files import (
    CHECKPOINT_PREFIX,
    CheckpointPolicy,
    checkpoint_dirs,
    checkpoint_step,
    manifest_or_marker,
    publish_checkpoint,
    remove_stale_staging,
    resolve_resume_request,
    rotate_checkpoints,
    staging_dir,
)
from ppo.preemption import PreemptionCallback, PreemptionGuard

TRAINER_STATE_FILE = "trainer_state.json"
TRAINING_ARGS_FILE = "training_args.bin"
# Trainer checkpoints are only trusted with a manifest: PaddleNLP writes trainer_state.json before
# the optimizer, so no single file of theirs marks a complete checkpoint.
STAGE_POLICY = CheckpointPolicy(legacy_marker=None)

assert PREFIX_CHECKPOINT_DIR + "-" == CHECKPOINT_PREFIX, "PaddleNLP renamed its checkpoint directories"


def resolve_stage_resume(resume_from_checkpoint, output_dir: str) -> Optional[str]:
    return resolve_resume_request(resume_from_checkpoint, output_dir, STAGE_POLICY)


class FaultTolerantTrainerMixin:
    """Mix in before a PaddleNLP `Trainer` subclass (see `with_fault_tolerance`)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        training_args = self.args
        if getattr(training_args, "use_async_save", False) or "async_save" in (
            getattr(training_args, "unified_checkpoint_config", None) or []
        ):
            raise ValueError(
                "use_async_save / unified_checkpoint_config async_save write checkpoint files after the save returns; "
                "atomic checkpoints need them written before it is published: turn async saving off"
            )
        self.preemption_guard = PreemptionGuard()
        self.preemption_callback = PreemptionCallback(self.preemption_guard)
        self.add_callback(self.preemption_callback)

    # ------------------------------------------------------------------------------------------
    # Saving

    def _barrier(self) -> None:
        if self.args.world_size > 1:
            paddle.distributed.barrier()

    def _save_checkpoint(self, model, metrics=None):
        args, step = self.args, self.state.global_step
        run_dir = args.output_dir
        name = f"{CHECKPOINT_PREFIX}{step}"
        staging_root, final = staging_dir(run_dir, step), os.path.join(run_dir, name)
        staged = os.path.join(staging_root, name)
        if args.should_save:
            shutil.rmtree(staging_root, ignore_errors=True)
            os.makedirs(staging_root)
        self._barrier()
        # The Trainer names the folder from output_dir; pointing output_dir at the staging root for
        # the call makes every rank write its files there (rotation waits, see _rotate_checkpoints).
        args.output_dir, self._publishing = staging_root, True
        try:
            super()._save_checkpoint(model, metrics=metrics)
        except BaseException as error:
            args.output_dir = run_dir
            if args.should_save:
                shutil.rmtree(staging_root, ignore_errors=True)
            previous = [os.path.basename(p) for p in checkpoint_dirs(run_dir)]
            logger.error(
                f"saving {name} failed ({error!r}); nothing was published"
                + (f", {previous[0]} is untouched" if previous else "")
                + ". Free the disk / fix output_dir and resume with resume_from_checkpoint true."
            )
            raise
        finally:
            args.output_dir, self._publishing = run_dir, False
        self._barrier()
        if args.should_save:
            self._repoint_staged_state(staged, final)
            publish_checkpoint(staged, final)
            shutil.rmtree(staging_root, ignore_errors=True)
            logger.info(f"published checkpoint {final}")
            self._rotate_complete_checkpoints()
        self._barrier()

    def _repoint_staged_state(self, staged: str, final: str) -> None:
        """The Trainer recorded paths inside the staging directory; make them name `final`."""
        if self.state.best_model_checkpoint and os.path.abspath(self.state.best_model_checkpoint) == os.path.abspath(staged):
            self.state.best_model_checkpoint = final
            self.state.save_to_json(os.path.join(staged, TRAINER_STATE_FILE))
        if os.path.isfile(os.path.join(staged, TRAINING_ARGS_FILE)):
            paddle.save(self.args, os.path.join(staged, TRAINING_ARGS_FILE))

    def _rotate_checkpoints(self, use_mtime=False, output_dir=None) -> None:
        # PaddleNLP's own rotation (called inside _save_checkpoint) would run before the new
        # checkpoint is published; ours runs after it.
        if not getattr(self, "_publishing", False):
            self._rotate_complete_checkpoints()

    def _rotate_complete_checkpoints(self) -> None:
        keep = [self.state.best_model_checkpoint] if self.state.best_model_checkpoint else []
        for path in rotate_checkpoints(self.args.output_dir, self.args.save_total_limit, manifest_or_marker(None), keep):
            logger.info(f"deleted {path} (save_total_limit={self.args.save_total_limit})")

    def checkpoint_current_step(self) -> Optional[str]:
        """The published checkpoint of the current step, saving it first if there is none."""
        step = self.state.global_step
        existing = [p for p in checkpoint_dirs(self.args.output_dir) if checkpoint_step(p) == step]
        if not existing and step > 0:
            self._save_checkpoint(self.model_wrapped)
        path = os.path.join(self.args.output_dir, f"{CHECKPOINT_PREFIX}{step}")
        return path if os.path.isdir(path) else None

    # ------------------------------------------------------------------------------------------
    # Resuming and preemption

    def train(self, resume_from_checkpoint=None, **kwargs):
        path = resolve_stage_resume(resume_from_checkpoint, self.args.output_dir)
        if self.args.should_save:
            for name in remove_stale_staging(self.args.output_dir):
                logger.info(f"removed {name}, left by a save that did not finish")
        if path is not None:
            logger.info(f"resuming from {path}")
            finished = self._finished_state(path)
            if finished is not None:
                logger.info(f"{path} holds step {finished.global_step}, the last one: loading it, no training left")
                self._load_from_checkpoint(path)
                self.state = finished
                return TrainOutput(finished.global_step, 0.0, {"train_runtime": 0.0})
        with self.preemption_guard:
            return super().train(resume_from_checkpoint=path, **kwargs)

    def _finished_state(self, path: str) -> Optional[TrainerState]:
        """The checkpoint's TrainerState when it is at or past this run's last step, else None."""
        state = TrainerState.load_from_json(os.path.join(path, TRAINER_STATE_FILE))
        args = self.args
        if args.max_steps > 0:
            max_steps = args.max_steps
        else:  # as Trainer.train counts them
            per_epoch = max(len(self.get_train_dataloader()) // args.gradient_accumulation_steps, 1)
            max_steps = int(per_epoch * args.num_train_epochs)
        return state if state.global_step >= max_steps else None

    @property
    def preempted(self) -> bool:
        return self.preemption_guard.requested


def with_fault_tolerance(trainer_class):
    """`trainer_class` with FaultTolerantTrainerMixin in front (the class itself if it has it)."""
    if issubclass(trainer_class, FaultTolerantTrainerMixin):
        return trainer_class
    return type(trainer_class.__name__, (FaultTolerantTrainerMixin, trainer_class), {"__module__": trainer_class.__module__, "__doc__": trainer_class.__doc__})
