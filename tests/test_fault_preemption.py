"""SIGTERM / SIGINT handling: `PreemptionGuard` (used by every stage) on its own."""

import os
import signal

import pytest

from ppo.preemption import PreemptionGuard


def test_first_signal_sets_the_flag_and_leaving_restores_the_handlers():
    before = {number: signal.getsignal(number) for number in (signal.SIGTERM, signal.SIGINT)}
    with PreemptionGuard() as guard:
        assert not guard.requested and guard.exit_code == 0
        os.kill(os.getpid(), signal.SIGTERM)
        assert guard.requested and guard.signal_name == "SIGTERM" and guard.exit_code == 143
        assert guard.should_stop()
    assert {number: signal.getsignal(number) for number in before} == before
    # Installed again, it starts clean.
    with guard:
        assert not guard.requested
        os.kill(os.getpid(), signal.SIGINT)
        assert guard.signal_name == "SIGINT" and guard.exit_code == 130


def test_a_second_signal_hands_over_to_the_previous_handler():
    received = []
    previous = signal.signal(signal.SIGTERM, lambda number, frame: received.append(number))
    try:
        with PreemptionGuard() as guard:
            os.kill(os.getpid(), signal.SIGTERM)
            assert received == []
            os.kill(os.getpid(), signal.SIGTERM)
            assert received == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_a_second_ctrl_c_raises_keyboard_interrupt():
    with pytest.raises(KeyboardInterrupt):
        with PreemptionGuard():
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)


def test_the_message_says_how_to_resume():
    with PreemptionGuard() as guard:
        os.kill(os.getpid(), signal.SIGTERM)
    message = guard.resume_message(12, "out/checkpoint-12")
    assert "stopped on SIGTERM at step 12" in message and "out/checkpoint-12" in message
    assert "--resume_from_checkpoint true" in message
    assert "no checkpoint could be written" in guard.resume_message(0, None)
