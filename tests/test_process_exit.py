"""How entry points leave the process (ppo/process_exit.py): a multi-process CPU run runs its exit
handlers and leaves with the given code without native teardown; a single process returns."""

import subprocess
import sys
import textwrap

from ppo.process_exit import is_multiprocess_cpu_run

from conftest import REPO_ROOT


def test_only_a_multiprocess_cpu_run_leaves_early():
    assert not is_multiprocess_cpu_run({})
    assert not is_multiprocess_cpu_run({"PADDLE_TRAINERS_NUM": "1"})
    assert not is_multiprocess_cpu_run({"PADDLE_TRAINERS_NUM": "not a number"})
    assert is_multiprocess_cpu_run({"PADDLE_TRAINERS_NUM": "2"})  # this machine has no GPU


def run_child(tmp_path, processes: str) -> subprocess.CompletedProcess:
    script = textwrap.dedent(f"""
        import atexit, os, sys
        sys.path.insert(0, {str(REPO_ROOT)!r})
        os.environ["PADDLE_TRAINERS_NUM"] = {processes!r}
        from ppo.process_exit import finish_process
        atexit.register(lambda: open({str(tmp_path / "handler-ran")!r}, "w").write("yes"))
        finish_process(0)
        print("returned", flush=True)
    """)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)


def test_exit_handlers_run_before_leaving(tmp_path):
    result = run_child(tmp_path, "2")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "returned" not in result.stdout  # left inside finish_process
    assert (tmp_path / "handler-ran").read_text() == "yes"


def test_a_single_process_returns_normally(tmp_path):
    result = run_child(tmp_path, "1")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "returned" in result.stdout
    assert (tmp_path / "handler-ran").read_text() == "yes"  # at normal interpreter exit
