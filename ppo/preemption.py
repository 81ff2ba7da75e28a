"""Preemption (SIGTERM) and Ctrl-C (SIGINT): finish the current step, checkpoint, exit cleanly.

`PreemptionGuard` turns the first signal into a flag that the training loop reads at each step
boundary; a second signal aborts at once (the previous handler runs). The PaddleNLP Trainer
stages read it through `PreemptionCallback`; the PPO loop reads `guard.should_stop()` itself.
"""

from __future__ import annotations

import signal
import threading
from typing import Optional, Sequence

from paddlenlp.trainer import TrainerCallback
from paddlenlp.utils.log import logger

DEFAULT_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class PreemptionGuard:
    """While installed (`with guard:`), SIGTERM/SIGINT set `requested` instead of killing the
    process. Reusable: leaving the `with` block restores the previous handlers."""

    def __init__(self, signals: Sequence[int] = DEFAULT_SIGNALS):
        self.signals = tuple(signals)
        self.signal_number: Optional[int] = None
        self._previous = {}

    @property
    def requested(self) -> bool:
        return self.signal_number is not None

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signal_number).name if self.requested else ""

    @property
    def exit_code(self) -> int:
        """The shell's convention for death by a signal (130 for SIGINT, 143 for SIGTERM): a
        pipeline (`sft && rm && ppo`) must not go on with an unfinished model."""
        return 128 + self.signal_number if self.requested else 0

    def _handle(self, number, frame) -> None:
        if self.requested:
            # Second signal: the user insists. Put the old handler back and let it act.
            logger.warning(f"{signal.Signals(number).name} again: stopping without waiting for the checkpoint")
            self.uninstall()
            signal.raise_signal(number)
            return
        self.signal_number = number
        logger.warning(
            f"{signal.Signals(number).name} received: saving a checkpoint after the current step, then stopping "
            f"(send it again to stop at once)"
        )

    def install(self) -> "PreemptionGuard":
        if threading.current_thread() is not threading.main_thread():
            logger.warning("signal handlers can only be installed from the main thread: preemption is not handled")
            return self
        self.signal_number = None
        for number in self.signals:
            self._previous[number] = signal.signal(number, self._handle)
        return self

    def uninstall(self) -> None:
        for number, previous in self._previous.items():
            signal.signal(number, previous)
        self._previous = {}

    def __enter__(self) -> "PreemptionGuard":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.uninstall()

    def should_stop(self, world_size: int = 1) -> bool:
        """`requested` on any rank (collective when world_size > 1: every rank calls it at the same
        step, so that all of them stop at the same step)."""
        if world_size <= 1:
            return self.requested
        import paddle
        import paddle.distributed as dist

        flag = paddle.to_tensor([1 if self.requested else 0], dtype="int32")
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if int(flag.item()) and not self.requested:
            self.signal_number = signal.SIGTERM  # another rank was signalled
        return bool(int(flag.item()))

    def resume_message(self, step: int, checkpoint: Optional[str]) -> str:
        where = f"checkpoint {checkpoint} holds step {step}" if checkpoint else f"no checkpoint could be written at step {step}"
        return (
            f"stopped on {self.signal_name} at step {step}; {where}. To continue, run the same command again with "
            f"resume_from_checkpoint set to true (`--resume_from_checkpoint true`, or \"resume_from_checkpoint\": true "
            f"in the config)."
        )


class PreemptionCallback(TrainerCallback):
    """Ask the PaddleNLP Trainer for a checkpoint and a stop at the first step end after a signal.

    The Trainer evaluates/saves in `_maybe_log_save_evaluate` right after `on_step_end`, so the
    checkpoint is the state after that step; the evaluation or save an `epoch` strategy would add
    after the loop is broken off is skipped (the grace period of a preemption is short)."""

    def __init__(self, guard: PreemptionGuard):
        self.guard = guard
        self.stopped_at: Optional[int] = None
        self._saved_step: Optional[int] = None

    def on_step_end(self, args, state, control, **kwargs):
        if self.guard.should_stop(args.world_size):
            self.stopped_at = state.global_step
            control.should_save = True
            control.should_training_stop = True
        return control

    def on_save(self, args, state, control, **kwargs):
        self._saved_step = state.global_step
        return control

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.stopped_at is not None:
            control.should_evaluate = False
            control.should_save = self._saved_step != state.global_step
        return control
