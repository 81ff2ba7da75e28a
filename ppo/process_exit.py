"""How an entry point leaves the process once its work is done and saved.

Under `paddle.distributed.launch` on CPU (gloo), the interpreter's teardown after a finished run
sometimes aborts in native code (SIGABRT, the launcher reports "Exit code -6"): every model,
checkpoint and metrics file is already written, yet the job looks failed. Seen in 4 of 7 full
test-suite runs on a 2-core machine (RM and model-parallel PPO launches). So a multi-process CPU
run ends with Python's exit handlers (log flushing included), then `os._exit`, skipping only
the native teardown; a single process, and GPU runs, exit normally.
"""

from __future__ import annotations

import atexit
import os
import sys


def is_multiprocess_cpu_run(environ=None) -> bool:
    environ = os.environ if environ is None else environ
    try:
        processes = int(environ.get("PADDLE_TRAINERS_NUM", "1"))
    except ValueError:
        processes = 1
    if processes <= 1:
        return False
    from ppo.models.kernels import runs_on_cpu

    return runs_on_cpu()


def finish_process(code: int = 0) -> None:
    """Return normally, except in a multi-process CPU run: run the exit handlers, flush, and
    leave without native teardown."""
    if not is_multiprocess_cpu_run():
        return
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
