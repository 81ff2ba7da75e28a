"""The one-command CPU quickstart: build the tiny assets, run SFT -> reward model -> PPO with the
repository's own entry points and JSON configs, then judge the policy before and after PPO.

    bash scripts/quickstart.sh [--seed N | --seeds 0,1,2,3,4] [--output-root DIR] [--fast]
    python -m ppo.demo.quickstart [same options]

Stages (each one a separate process, exactly the command printed in its banner)::

    1 assets    python -m ppo.demo.prepare_tiny --output-root ROOT/tiny --seed N --force
    2 sft       python sft/run_sft.py config/tiny/sft_argument.json        -> ROOT/tiny/sft
    3 rm        python rm/run_reward.py config/tiny/rm_argument.json       -> ROOT/tiny/rm
    4 ppo       python ppo/run_ppo.py config/tiny/ppo_argument.json        -> ROOT/tiny/ppo
    5 evaluate  python -m ppo.demo.evaluate ...                            -> ROOT/quickstart

ROOT defaults to `output/` in the repository, where the tiny configs point. With another ROOT
(or another seed) the path (and seed) keys of the configs are overridden with flags after the
JSON file, the way any user would; nothing else changes.

Every run starts fresh: the assets are rebuilt (deterministically: the same seed gives the same
files) and the SFT, RM and PPO output directories are deleted before their stage runs, so a
result never mixes with an earlier run. The quickstart's own results go to ROOT/quickstart/:
`summary.json`, `curves.png`, `evaluation.json`, `generations.jsonl` and `logs/<stage>.log`
(the full output of each stage).

`--fast` (or QUICKSTART_FAST=1) shortens every stage to a few steps: it checks the wiring in
about a minute and proves nothing about learning.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG_DIR = os.path.join("config", "tiny")
# The tiny configs name their files under this directory (relative to the repository root).
CONFIG_OUTPUT_ROOT = "output"
DEFAULT_SEED = 0

# Targets of the quickstart (issue 5); the summary says whether each one was met.
TARGET_WALL_SECONDS = 600.0
TARGET_RM_ACCURACY = 0.85
TARGET_JUDGE_GAIN = 0.25

# Flags that shorten each stage in --fast mode (applied after the JSON config, like any user
# override). Evaluation sets are cut too: evaluation time would otherwise dominate.
FAST_OVERRIDES = {
    "sft": {"max_steps": "6", "logging_steps": "2", "eval_datasets": "alpaca:0.02:{data}/sft.jsonl"},
    "rm": {"max_steps": "6", "logging_steps": "2", "eval_datasets": "PKU-SafeRLHF/test:0.1:{data}/preference/test.jsonl"},
    "ppo": {"max_steps": "4", "logging_steps": "1", "eval_steps": "2", "save_steps": "2",
            "eval_datasets": "PKU-SafeRLHF/test:0.15:{data}/prompts/test.jsonl"},
    "evaluate": {"max-prompts": "8", "samples-per-prompt": "2"},
}  # fmt: skip
# `--algorithm` / `--reward`: flags added to the PPO stage only (none for the default ppo + reward model).
# Critic-free algorithms sample 4 responses for each of 8 prompts: the same 32 responses per rollout
# as PPO's 32 prompts x 1, and a group to compare each response with. GRPO's advantages are already
# in units of the group's std, so they are not whitened again; RLOO's are in reward units (±0.5 for
# the judge), so they are whitened over the batch (sign and order kept, scale 1) — unwhitened, the
# same learning rate moved the judge score by less than 0.3 for two of three seeds. They also run
# 144 steps instead of PPO's 96 (a step costs less without a critic): with 96, one GRPO seed of
# five ended at +0.29.
ALGORITHMS = ("ppo", "grpo", "rloo", "reinforce_plus_plus")
GROUP_OVERRIDES = {"num_return_sequences": "4", "per_device_prompt_batch_size": "8", "whiten_advantages": "false",
                   "max_steps": "144"}
WHITENED_GROUP_ALGORITHMS = ("rloo",)
REWARDS = {
    "model": {},
    "judge": {"reward_functions": "ppo.demo.task:judge_reward", "reward_model_weight": "0"},
    "both": {"reward_functions": "ppo.demo.task:judge_reward"},
}


def ppo_stage_overrides(algorithm: str = "ppo", reward: str = "model") -> Dict[str, str]:
    """Flags that select the RL algorithm and the reward source of the PPO stage."""
    if algorithm not in ALGORITHMS or reward not in REWARDS:
        raise ValueError(f"algorithm must be one of {ALGORITHMS} and reward one of {tuple(REWARDS)}")
    overrides = {} if algorithm == "ppo" else {"rl_algorithm": algorithm}
    if algorithm in ("grpo", "rloo"):
        overrides.update(GROUP_OVERRIDES)
    if algorithm in WHITENED_GROUP_ALGORITHMS:
        overrides["whiten_advantages"] = "true"
    return {**overrides, **REWARDS[reward]}


# 96 held-out prompts x 8 samples = 768 answers per policy: the standard error of a judge score
# is then about 0.015 (answers to one prompt are correlated, so more prompts would help more).
EVALUATION_SAMPLES_PER_PROMPT = 8
# Lines of a failed stage's log shown on the console.
FAILURE_TAIL_LINES = 30

# Seconds each stage took in a full run on 2 lightly loaded CPU cores (used only for the ETA).
EXPECTED_SECONDS = {"assets": 7, "sft": 27, "rm": 55, "ppo": 17, "evaluate": 10}
EXPECTED_SECONDS_FAST = {"assets": 6, "sft": 12, "rm": 12, "ppo": 20, "evaluate": 12}

CURVE_PANELS = (
    ("reward (RM score)", ("train/reward", "eval/reward")),
    ("KL to reference (per response)", ("train/kl_divergence",)),
    ("actor loss", ("train/actor_loss",)),
    ("critic loss", ("train/reward_critic_loss",)),
    ("ptx loss", ("train/ptx_loss",)),
    ("PPO clip fraction / approx KL", ("train/clipfrac", "train/approx_kl")),
)


@dataclass
class Stage:
    name: str
    title: str
    command: List[str]
    clears: Optional[str] = None  # output directory deleted before the stage runs
    seconds: Optional[float] = None


@dataclass
class Layout:
    """Where everything goes under one output root."""

    root: str
    tiny: str = field(init=False)
    data: str = field(init=False)
    quickstart: str = field(init=False)

    def __post_init__(self):
        self.root = os.path.abspath(self.root)
        if any(separator in self.root for separator in ":,"):
            raise ValueError(
                f"output root {self.root!r} contains ':' or ','; dataset specs (name:proportion:path, "
                "comma separated) cannot carry such a path, so choose another directory"
            )
        self.tiny = os.path.join(self.root, "tiny")
        self.data = os.path.join(self.tiny, "data")
        self.quickstart = os.path.join(self.root, "quickstart")

    def stage_dir(self, name: str) -> str:
        return os.path.join(self.tiny, name)

    def result(self, name: str) -> str:
        return os.path.join(self.quickstart, name)


# ------------------------------------------------------------------------------------------------
# Commands


def load_config(name: str) -> dict:
    with open(os.path.join(REPO_ROOT, CONFIG_DIR, name), encoding="utf-8") as handle:
        return json.load(handle)


def rerooted_value(value: str, root: str) -> str:
    """`value` with every path under the configs' `output/` moved to `root` (plain paths and the
    path part of dataset specs such as `name:1:output/tiny/data/x.jsonl`)."""
    return re.sub(rf"(^|[:,]){re.escape(CONFIG_OUTPUT_ROOT)}/", lambda m: m.group(1) + root.rstrip("/") + "/", value)


def config_overrides(config: dict, layout: Layout, seed: int) -> Dict[str, str]:
    """Flag values that point a tiny config at `layout.root` and `seed`; none when they match."""
    overrides = {}
    if layout.root != os.path.join(REPO_ROOT, CONFIG_OUTPUT_ROOT):
        for key, value in config.items():
            if isinstance(value, str) and rerooted_value(value, layout.root) != value:
                overrides[key] = rerooted_value(value, layout.root)
    if config.get("seed") != seed:
        overrides["seed"] = str(seed)
    return overrides


def as_flags(values: Dict[str, str]) -> List[str]:
    return [part for key, value in values.items() for part in (f"--{key}", value)]


def build_stages(layout: Layout, seed: int, fast: bool, algorithm: str = "ppo", reward: str = "model") -> List[Stage]:
    python = [sys.executable, "-u"]
    rl_overrides = ppo_stage_overrides(algorithm, reward)

    def fast_overrides(name):
        return {key: value.format(data=layout.data) for key, value in FAST_OVERRIDES[name].items()} if fast else {}

    def entry_point(name, script, config_name):
        # --fast's short runs win over the algorithm's step count.
        overrides = {**config_overrides(load_config(config_name), layout, seed), **(rl_overrides if name == "ppo" else {}),
                     **fast_overrides(name)}
        return python + [script, os.path.join(CONFIG_DIR, config_name)] + as_flags(overrides)

    evaluate_options = {
        "sft": layout.stage_dir("sft"),
        "policy": os.path.join(layout.stage_dir("ppo"), "policy"),
        "reward-model": layout.stage_dir("rm"),
        # The held-out prompts are the PPO config's eval prompts, never trained on.
        "prompts": rerooted_value(load_config("ppo_argument.json")["eval_datasets"], layout.root),
        "samples-per-prompt": str(EVALUATION_SAMPLES_PER_PROMPT),
        "seed": str(seed),
        "output": layout.result("evaluation.json"),
        "generations": layout.result("generations.jsonl"),
        **fast_overrides("evaluate"),
    }
    return [
        Stage("assets", "tiny assets: demo data, tokenizer, random base model",
              python + ["-m", "ppo.demo.prepare_tiny", "--output-root", layout.tiny, "--seed", str(seed), "--force"]),
        Stage("sft", "supervised fine-tuning of the base model", entry_point("sft", "sft/run_sft.py", "sft_argument.json"),
              clears=layout.stage_dir("sft")),
        Stage("rm", "reward model on the preference pairs", entry_point("rm", "rm/run_reward.py", "rm_argument.json"),
              clears=layout.stage_dir("rm")),
        Stage("ppo", "PPO against the reward model", entry_point("ppo", "ppo/run_ppo.py", "ppo_argument.json"),
              clears=layout.stage_dir("ppo")),
        Stage("evaluate", "judge the SFT model and the PPO policy on held-out prompts",
              python + ["-m", "ppo.demo.evaluate"] + as_flags(evaluate_options)),
    ]  # fmt: skip


# ------------------------------------------------------------------------------------------------
# Running


def format_seconds(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def eta_seconds(stages: Sequence[Stage], index: int, expected: Dict[str, float]) -> float:
    """Seconds left before stage `index` starts running: the expected times of the remaining
    stages, scaled by how fast the finished ones went compared with their expectation."""
    done = [stage for stage in stages[:index] if stage.seconds is not None]
    speed = 1.0
    if done:
        speed = sum(stage.seconds for stage in done) / max(sum(expected[stage.name] for stage in done), 1e-9)
    return speed * sum(expected[stage.name] for stage in stages[index:])


def display_command(command: Sequence[str]) -> str:
    shown = ["python" if i == 0 else part for i, part in enumerate(command) if not (i == 1 and part == "-u")]
    return " ".join(shlex.quote(os.path.relpath(part, REPO_ROOT) if part.startswith(REPO_ROOT + os.sep) else part) for part in shown)


def shown_path(path: str) -> str:
    """`path` relative to the current directory when it lies below it, else absolute."""
    relative = os.path.relpath(path)
    return path if relative.startswith("..") else relative


def banner(stage: Stage, index: int, stages: Sequence[Stage], started: float, expected: Dict[str, float], log_path: str) -> None:
    elapsed = time.time() - started
    remaining = eta_seconds(stages, index, expected)
    rule = "=" * 100
    print(
        f"\n{rule}\n[{index + 1}/{len(stages)}] {stage.name.upper()}: {stage.title}\n"
        f"    $ {display_command(stage.command)}\n"
        f"    elapsed {format_seconds(elapsed)}, ETA for the rest of the pipeline ~{format_seconds(remaining)}"
        f" (full output: {shown_path(log_path)})\n{rule}",
        flush=True,
    )


class ConsoleFilter:
    """What of a stage's output reaches the console; the stage log keeps everything.

    Shown: progress bars (redraws passed through at once so they stay live), this project's
    tagged lines (`[prepare_tiny] ...`), errors and tracebacks. Everything else stays in the log:
    PaddleNLP's DEBUG/INFO/WARNING records (argument dumps, "loading file ..."), Python warnings
    raised inside installed packages ("No ccache found", "Setuptools is replacing distutils"),
    the `datasets` library's "Generating ... split" bars and the evaluation bars nested inside
    training. Colour codes are removed. When a stage fails, `run_stage` prints the log's tail."""

    COLOUR = re.compile(rb"\x1b\[[0-9;]*m")
    BAR = re.compile(rb"\d+%\|")
    HIDDEN_BARS = re.compile(rb"Generating \w+ split|PredictProcess")
    SHOWN_LINES = (
        re.compile(rb"^\[[a-z_]+\] "),  # this project's tagged progress lines
        re.compile(rb"\] \[\s*(?:ERROR|CRITICAL)\]"),
        re.compile(rb"^Traceback |^\w*(?:Error|Exception)\b"),
    )

    def __init__(self):
        self.pending = b""
        self.bar_open = False  # the console's last line is a progress bar without its newline

    # A log record written while a bar is open lands on the bar's line, after its last redraw.
    # So does a Python warning ("/path/module.py:687: SomeWarning: ...").
    LOG_RECORD = re.compile(rb"\[\d{4}-\d\d-\d\d [\d:,]+\] \[|/\S+\.py:\d+: \w*Warning")

    def _bar(self, segment: bytes) -> bytes:
        """The last redraw in `segment` when it is a progress bar to show, else b""."""
        redraws = [part for part in segment.split(b"\r") if part.strip()]
        if not redraws or not self.BAR.search(redraws[-1]) or self.HIDDEN_BARS.search(redraws[-1]):
            return b""
        return b"\r" + redraws[-1].replace(b"\x1b[A", b"").rstrip()

    def _line(self, line: bytes) -> bytes:
        plain = self.COLOUR.sub(b"", line)
        if b"\r" in plain or self.BAR.search(plain):
            record = self.LOG_RECORD.search(plain)
            bar = self._bar(plain[: record.start()] if record else plain)
            # The newline belongs to the log record, not the bar (which keeps redrawing in place),
            # unless the bar itself ended the line (it closed).
            return bar if record else bar + b"\n" if bar else b""
        return plain + b"\n" if any(pattern.search(plain) for pattern in self.SHOWN_LINES) else b""

    def feed(self, chunk: bytes) -> bytes:
        self.pending += chunk
        shown = []
        while b"\n" in self.pending:
            line, self.pending = self.pending.split(b"\n", 1)
            shown.append(self._line(line))
        if b"\r" in self.pending:  # a progress bar redrawing its line, no newline yet
            shown.append(self._bar(self.COLOUR.sub(b"", self.pending)))
            self.pending = b""
        return self._track(b"".join(shown))

    def flush(self) -> bytes:
        """The rest of the output, ending with a newline if anything is left on the last line."""
        rest, self.pending = self.pending, b""
        shown = self._track(self._line(rest).rstrip(b"\n") if rest else b"")
        if self.bar_open:
            shown, self.bar_open = shown + b"\n", False
        return shown

    def _track(self, shown: bytes) -> bytes:
        if shown:
            self.bar_open = not shown.endswith(b"\n")
        return shown


def run_stage(stage: Stage, log_path: str) -> float:
    """Run one stage, streaming its output to the console (progress bars included) and to
    `log_path`; returns its wall seconds. Raises SystemExit naming the log on failure."""
    if stage.clears and os.path.isdir(stage.clears):
        shutil.rmtree(stage.clears)
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONPATH"] = REPO_ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    start = time.time()
    with open(log_path, "wb") as log:
        log.write(("$ " + shlex.join(stage.command) + "\n").encode())
        process = subprocess.Popen(stage.command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        console, console_filter = sys.stdout.buffer, ConsoleFilter()
        while True:
            chunk = process.stdout.read1(65536)
            if not chunk:
                break
            log.write(chunk)
            console.write(console_filter.feed(chunk))
            console.flush()
        console.write(console_filter.flush())
        console.flush()
        code = process.wait()
    seconds = time.time() - start
    if code != 0:
        # The console showed only bars and tagged lines: show how the stage ended.
        with open(log_path, "rb") as log:
            tail = log.read()[-6000:].decode("utf-8", errors="replace").splitlines()[-FAILURE_TAIL_LINES:]
        print("\n".join(["", f"--- last lines of {log_path} ---", *tail, "---"]), flush=True)
        raise SystemExit(f"\nquickstart: stage '{stage.name}' failed (exit code {code}) after {format_seconds(seconds)}; full output in {log_path}")
    return seconds


# ------------------------------------------------------------------------------------------------
# Results


def read_json(path: str) -> dict:
    if not os.path.exists(path):
        raise SystemExit(f"quickstart: expected {path} after the stage that writes it, but it does not exist")
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def ppo_curve_summary(metrics_path: str) -> dict:
    """First and last logged values of the PPO curves (train reward, KL, eval reward)."""
    from ppo.plotting import read_metrics

    records = read_metrics(metrics_path)
    summary = {}
    for key, name in (("train/reward", "ppo_train_reward"), ("train/kl_divergence", "ppo_train_kl"), ("eval/reward", "ppo_eval_reward")):
        values = [record[key] for record in records if key in record]
        if values:
            summary[f"{name}_first"], summary[f"{name}_last"] = values[0], values[-1]
    clipfracs = [record["train/clipfrac"] for record in records if "train/clipfrac" in record]
    if clipfracs:
        summary["ppo_mean_clipfrac"] = sum(clipfracs) / len(clipfracs)
    summary["ppo_steps"] = max((record["step"] for record in records), default=0)
    return summary


def build_summary(layout: Layout, stages: Sequence[Stage], seed: int, fast: bool, wall_seconds: float, load: dict) -> dict:
    rm_results = read_json(os.path.join(layout.stage_dir("rm"), "all_results.json"))
    sft_results = read_json(os.path.join(layout.stage_dir("sft"), "all_results.json"))
    evaluation = read_json(layout.result("evaluation.json"))
    sft, ppo = evaluation["sft"], evaluation["ppo"]
    summary = {
        "rm_eval_accuracy": rm_results["eval_accuracy"],
        "judge_score_sft": sft["judge_score"],
        "judge_score_ppo": ppo["judge_score"],
        "judge_gain": ppo["judge_score"] - sft["judge_score"],
        "reward_sft": sft["reward"],
        "reward_ppo": ppo["reward"],
        "kl_to_reference": ppo["kl_to_reference"],
        "wall_seconds": wall_seconds,
        "stage_seconds": {stage.name: stage.seconds for stage in stages},
        "colour_accuracy_sft": sft["colour_accuracy"],
        "colour_accuracy_ppo": ppo["colour_accuracy"],
        "politeness_rate_sft": sft["politeness_rate"],
        "politeness_rate_ppo": ppo["politeness_rate"],
        "well_formed_rate_sft": sft["well_formed_rate"],
        "well_formed_rate_ppo": ppo["well_formed_rate"],
        "mean_length_sft": sft["mean_length"],
        "mean_length_ppo": ppo["mean_length"],
        "greedy_judge_score_sft": evaluation["sft_greedy"]["judge_score"],
        "greedy_judge_score_ppo": evaluation["ppo_greedy"]["judge_score"],
        "greedy_kl_to_reference": evaluation["ppo_greedy"]["kl_to_reference"],
        "sft_eval_loss": sft_results.get("eval_loss"),
        "rm_eval_reward_margin": rm_results.get("eval_better_rewards_mean", math.nan) - rm_results.get("eval_worse_rewards_mean", math.nan),
        **ppo_curve_summary(os.path.join(layout.stage_dir("ppo"), "ppo_metrics.jsonl")),
        "evaluation": evaluation["settings"],
        "seed": seed,
        "fast": fast,
        "load_average_1min": load,
        "output_root": layout.root,
    }  # fmt: skip
    summary["targets"] = {
        f"wall_seconds <= {TARGET_WALL_SECONDS:g}": wall_seconds <= TARGET_WALL_SECONDS,
        f"rm_eval_accuracy >= {TARGET_RM_ACCURACY}": summary["rm_eval_accuracy"] >= TARGET_RM_ACCURACY,
        f"judge_score_ppo - judge_score_sft >= {TARGET_JUDGE_GAIN}": summary["judge_gain"] >= TARGET_JUDGE_GAIN,
        # The gain must not come from one rule at the expense of the other (reward hacking).
        "colour_accuracy_ppo >= colour_accuracy_sft": summary["colour_accuracy_ppo"] >= summary["colour_accuracy_sft"],
        "politeness_rate_ppo >= politeness_rate_sft": summary["politeness_rate_ppo"] >= summary["politeness_rate_sft"],
    }
    summary["samples"] = evaluation["samples"]
    return summary


def check_summary(summary: dict) -> None:
    """Every number of the summary is finite (a NaN would make the comparison meaningless)."""
    bad = [key for key, value in summary.items() if isinstance(value, float) and not math.isfinite(value)]
    if bad:
        raise SystemExit(f"quickstart: non-finite results for {bad}; see the stage logs")


def results_table(summary: dict) -> str:
    rows = [
        ("judge score (0-1, held-out prompts)", "judge_score_sft", "judge_score_ppo", "{:.3f}"),
        ("  right colour", "colour_accuracy_sft", "colour_accuracy_ppo", "{:.3f}"),
        ("  polite closing", "politeness_rate_sft", "politeness_rate_ppo", "{:.3f}"),
        ("judge score, greedy decoding", "greedy_judge_score_sft", "greedy_judge_score_ppo", "{:.3f}"),
        ("reward-model score", "reward_sft", "reward_ppo", "{:+.3f}"),
        ("well-formed answers", "well_formed_rate_sft", "well_formed_rate_ppo", "{:.3f}"),
        ("mean response tokens", "mean_length_sft", "mean_length_ppo", "{:.1f}"),
    ]
    lines = [f"{'':<38}{'before (SFT)':>14}{'after (PPO)':>14}", "-" * 66]
    for label, before, after, number in rows:
        lines.append(f"{label:<38}{number.format(summary[before]):>14}{number.format(summary[after]):>14}")
    lines.append("-" * 66)
    lines.append(f"KL(PPO policy || SFT) per response: {summary['kl_to_reference']:.3f} nats")
    lines.append(f"reward-model accuracy on held-out pairs: {summary['rm_eval_accuracy']:.3f}")
    stage_times = ", ".join(f"{name} {format_seconds(seconds)}" for name, seconds in summary["stage_seconds"].items())
    lines.append(f"wall time {format_seconds(summary['wall_seconds'])} ({stage_times})")
    lines.append("")
    lines.append("Sample answers to held-out prompts (judge score in brackets):")
    for sample in summary["samples"]:
        lines.append(f"  USER: {sample['prompt']}")
        for name in ("sft", "ppo"):
            for key, decoding in ((name, "sampled"), (f"{name}_greedy", "greedy")):
                lines.append("    " + textwrap.shorten(f"{name.upper()} {decoding:<7} [{sample[key + '_judge']:.1f}] {sample[key]!r}", 100))
    for target, met in summary["targets"].items():
        lines.append(f"target {target}: {'met' if met else 'NOT met'}")
    return "\n".join(lines)


def stage_result(name: str, layout: Layout) -> str:
    """The headline number of a finished stage, for its "done" line."""
    path = os.path.join(layout.stage_dir(name), "all_results.json")
    if not os.path.exists(path):
        return ""
    with open(path, encoding="utf-8") as handle:
        results = json.load(handle)
    shown = {"sft": ("eval_loss", "eval loss {:.3f}"), "rm": ("eval_accuracy", "held-out accuracy {:.3f}"),
             "ppo": ("eval/reward", "eval reward {:+.3f}")}.get(name)  # fmt: skip
    if shown is None or not isinstance(results.get(shown[0]), (int, float)):
        return ""
    return ": " + shown[1].format(results[shown[0]])


def write_curves(layout: Layout, seed: int) -> str:
    from ppo.plotting import plot_training_curves

    return plot_training_curves(
        os.path.join(layout.stage_dir("ppo"), "ppo_metrics.jsonl"),
        layout.result("curves.png"),
        panels=CURVE_PANELS,
        title=f"Quickstart PPO on the demo task (seed {seed})",
    )


# ------------------------------------------------------------------------------------------------
# Entry point


def run(output_root: str, seed: int = DEFAULT_SEED, fast: bool = False, algorithm: str = "ppo", reward: str = "model") -> dict:
    layout = Layout(output_root)
    os.makedirs(os.path.join(layout.quickstart, "logs"), exist_ok=True)
    for stale in ("summary.json", "curves.png", "evaluation.json", "generations.jsonl"):
        if os.path.exists(layout.result(stale)):
            os.remove(layout.result(stale))
    stages = build_stages(layout, seed, fast, algorithm, reward)
    expected = EXPECTED_SECONDS_FAST if fast else EXPECTED_SECONDS
    # Other jobs on the machine slow every stage down: the 1-minute load average at the start of
    # each stage goes into the summary so timings can be read against it.
    load = {"start": os.getloadavg()[0]}
    print(
        f"quickstart: SFT -> reward model -> PPO on the built-in demo task, seed {seed}{' (--fast: wiring check only)' if fast else ''}\n"
        f"  output root {shown_path(layout.root)}; expected ~{format_seconds(sum(expected.values()))} on 2 idle CPU cores"
        f" (load average now {load['start']:.2f})",
        flush=True,
    )
    started = time.time()
    for index, stage in enumerate(stages):
        load[stage.name] = os.getloadavg()[0]
        log_path = os.path.join(layout.quickstart, "logs", f"{stage.name}.log")
        banner(stage, index, stages, started, expected, log_path)
        stage.seconds = run_stage(stage, log_path)
        print(f"[{stage.name}] done in {format_seconds(stage.seconds)}{stage_result(stage.name, layout)}", flush=True)
    write_curves(layout, seed)
    wall_seconds = time.time() - started
    load["end"] = os.getloadavg()[0]
    summary = build_summary(layout, stages, seed, fast, wall_seconds, load)
    check_summary(summary)
    with open(layout.result("summary.json") + ".tmp", "w", encoding="utf-8") as handle:
        json.dump(summary, handle, indent=2)
        handle.write("\n")
    os.replace(layout.result("summary.json") + ".tmp", layout.result("summary.json"))
    print("\n" + "=" * 100 + "\nRESULTS (before = SFT model, after = PPO policy)\n" + "=" * 100)
    print(results_table(summary))
    print(f"\nsummary: {layout.result('summary.json')}\ncurves:  {layout.result('curves.png')}", flush=True)
    return summary


# Numbers of a summary aggregated over seeds (mean, minimum, maximum).
SEED_METRICS = (
    "rm_eval_accuracy", "judge_score_sft", "judge_score_ppo", "judge_gain",
    "colour_accuracy_sft", "colour_accuracy_ppo", "politeness_rate_sft", "politeness_rate_ppo",
    "greedy_judge_score_sft", "greedy_judge_score_ppo", "reward_sft", "reward_ppo",
    "kl_to_reference", "well_formed_rate_ppo", "wall_seconds",
)  # fmt: skip


def parse_seeds(text: str) -> List[int]:
    """"0,1,2" or "0-4" (or a mix) -> distinct seeds in order."""
    seeds = []
    for part in text.split(","):
        part = part.strip()
        first, dash, last = part.partition("-")
        if not part or not first.isdigit() or (dash and not last.isdigit()):
            raise ValueError(f"bad --seeds {text!r}: expected comma-separated seeds or ranges such as 0,1,2 or 0-4")
        seeds.extend(range(int(first), int(last) + 1) if dash else [int(first)])
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds {text!r} names a seed twice")
    return seeds


def aggregate_seeds(summaries: Sequence[dict], metrics: Sequence[str] = SEED_METRICS) -> dict:
    """Mean, minimum and maximum of each `metrics` number, and every target per seed."""
    aggregated = {"seeds": [summary["seed"] for summary in summaries], "metrics": {}, "targets": {}}
    for key in metrics:
        values = [summary[key] for summary in summaries]
        aggregated["metrics"][key] = {"mean": sum(values) / len(values), "min": min(values), "max": max(values), "values": values}
    for target in summaries[0]["targets"]:
        aggregated["targets"][target] = {str(summary["seed"]): summary["targets"][target] for summary in summaries}
    aggregated["all_targets_met"] = all(all(per_seed.values()) for per_seed in aggregated["targets"].values())
    return aggregated


def seeds_table(aggregated: dict) -> str:
    seeds = aggregated["seeds"]
    lines = [f"{'':<28}{'mean':>8}{'min':>8}{'max':>8}   per seed {seeds}", "-" * 100]
    for key, stats in aggregated["metrics"].items():
        number = "{:.0f}" if key == "wall_seconds" else "{:+.2f}" if key.startswith("reward") else "{:.3f}"
        per_seed = " ".join(number.format(value) for value in stats["values"])
        lines.append(f"{key:<28}" + "".join(f"{number.format(stats[s]):>8}" for s in ("mean", "min", "max")) + f"   {per_seed}")
    lines.append("-" * 100)
    for target, per_seed in aggregated["targets"].items():
        missed = [seed for seed, met in per_seed.items() if not met]
        lines.append(f"target {target}: " + ("met for every seed" if not missed else f"NOT met for seeds {', '.join(missed)}"))
    return "\n".join(lines)


def run_seeds(output_root: str, seeds: Sequence[int], fast: bool = False, algorithm: str = "ppo", reward: str = "model") -> dict:
    """The whole pipeline once per seed, each under ROOT/seed-N, then the aggregate in
    ROOT/quickstart/seeds.json."""
    summaries = []
    for index, seed in enumerate(seeds):
        print(f"\n{'#' * 100}\n# seed {seed} ({index + 1} of {len(seeds)})\n{'#' * 100}", flush=True)
        summaries.append(run(os.path.join(output_root, f"seed-{seed}"), seed=seed, fast=fast, algorithm=algorithm, reward=reward))
    aggregated = aggregate_seeds(summaries)
    path = Layout(output_root).result("seeds.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w", encoding="utf-8") as handle:
        json.dump(aggregated, handle, indent=2)
        handle.write("\n")
    os.replace(path + ".tmp", path)
    print("\n" + "=" * 100 + f"\nRESULTS OVER SEEDS {list(seeds)}\n" + "=" * 100)
    print(seeds_table(aggregated))
    print(f"\nper-seed outputs: {shown_path(output_root)}/seed-N/quickstart/\naggregate: {path}", flush=True)
    return aggregated


def env_flag(name: str) -> bool:
    value = os.environ.get(name, "").strip().lower()
    if value in ("", "0", "false", "no"):
        return False
    if value in ("1", "true", "yes"):
        return True
    raise SystemExit(f"quickstart: {name}={value!r} is not a boolean; use 1/0, true/false or yes/no")


def main(argv: Optional[Sequence[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--output-root",
        default=os.environ.get("QUICKSTART_OUTPUT_ROOT") or os.path.join(REPO_ROOT, CONFIG_OUTPUT_ROOT),
        help="where tiny/ (assets and stage outputs) and quickstart/ (results) go; "
        "default $QUICKSTART_OUTPUT_ROOT, else output/ in the repository",
    )
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="seed of the data, the model initialisation, every stage and the evaluation")
    parser.add_argument(
        "--seeds", default=None, metavar="LIST",
        help="run the pipeline once per seed (e.g. 0,1,2,3,4 or 0-4), each under ROOT/seed-N, and print each "
        "number's mean, minimum and maximum (ROOT/quickstart/seeds.json)",
    )  # fmt: skip
    parser.add_argument(
        "--fast", action="store_true", default=env_flag("QUICKSTART_FAST"),
        help="a few steps per stage to check the wiring (also QUICKSTART_FAST=1)",
    )  # fmt: skip
    parser.add_argument(
        "--algorithm", choices=ALGORITHMS, default="ppo",
        help="rl_algorithm of the PPO stage; grpo and rloo sample 4 responses for each of 8 prompts per rollout",
    )  # fmt: skip
    parser.add_argument(
        "--reward", choices=tuple(REWARDS), default="model",
        help="reward of the PPO stage: the reward model (model), the demo judge as a reward function without "
        "the reward model (judge), or their sum (both)",
    )  # fmt: skip
    parser.add_argument(
        "--safe", action="store_true",
        help="the Safe-RLHF demo instead (ppo/demo/safe_demo.py): reward and cost model, plain PPO and "
        "PPO-Lagrangian, judged by the rules; results in ROOT/quickstart-safe",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.safe and (args.algorithm != "ppo" or args.reward != "model"):
        parser.error("--safe compares plain PPO with PPO-Lagrangian on the reward model; it takes no --algorithm or --reward")
    from ppo.runtime import prepare_process

    # Checked once here (a CPU below the floor stops before any stage); the MKL choice is
    # inherited by every stage's process through the environment.
    prepare_process()
    try:
        layout = Layout(args.output_root)
    except ValueError as error:
        parser.error(str(error))
    if args.seeds is not None:
        try:
            seeds = parse_seeds(args.seeds)
        except ValueError as error:
            parser.error(str(error))
        if args.safe:
            from ppo.demo.safe_demo import run_safe_seeds

            return run_safe_seeds(layout.root, seeds, fast=args.fast)
        return run_seeds(layout.root, seeds, fast=args.fast, algorithm=args.algorithm, reward=args.reward)
    if args.safe:
        from ppo.demo.safe_demo import run_safe

        return run_safe(layout.root, seed=args.seed, fast=args.fast)
    return run(layout.root, seed=args.seed, fast=args.fast, algorithm=args.algorithm, reward=args.reward)


if __name__ == "__main__":
    main()
