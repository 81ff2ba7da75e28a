"""`scripts/fault_injection.py` end to end: runs SIGKILLed at random moments and during
checkpoint saves resume from the newest complete checkpoint and continue exactly like an
uninterrupted run (metrics and final weights), for every stage."""

import json
import subprocess
import sys

import pytest


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["sft", "rm", "ppo"])
def test_killed_runs_resume_exactly(stage, tmp_path, repo_root):
    summary = tmp_path / "summary.json"
    command = [
        sys.executable, str(repo_root / "scripts" / "fault_injection.py"), "--stage", stage, "--runs", "4",
        "--max-steps", "8", "--save-steps", "2", "--seed", "1", "--workdir", str(tmp_path / "work"), "--summary", str(summary),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    counts = json.loads(summary.read_text())
    assert counts["runs"] == 4 and counts["lost_something"] == 0
    assert counts["metrics_equal"] == counts["weights_equal"] == counts["resumed_from_newest_complete"] == 4
    assert counts["half_written_checkpoints_left"] == 0
    assert counts["killed_during_save"] + counts["killed_elsewhere"] >= 3  # the kills did happen
