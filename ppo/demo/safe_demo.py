"""The Safe-RLHF demo (`bash scripts/quickstart.sh --safe`): plain PPO and PPO-Lagrangian from
the same SFT model against the same reward model, judged by the task's rules.

Stages (each one a separate process, exactly the command printed in its banner)::

    1 assets     python -m ppo.demo.prepare_tiny ...           (as the default quickstart)
    2 safe_data  python -m ppo.demo.make_data --variant safe   -> ROOT/tiny/data/safe
    3 sft        python sft/run_sft.py config/tiny/sft_argument.json           (as the default quickstart)
    4 rm         python rm/run_reward.py config/tiny/rm_argument.json, on the safe helpfulness pairs -> ROOT/tiny/rm_safe
    5 cost       python rm/run_cost.py config/tiny/cost_argument.json          -> ROOT/tiny/cost
    6 ppo        python ppo/run_ppo.py config/tiny/ppo_argument.json, reward model rm_safe -> ROOT/tiny/ppo_safe
    7 ppo_lag    python ppo/run_ppo.py config/tiny/ppo_lag_argument.json --threshold D -> ROOT/tiny/ppo_lag
    8 evaluate   python -m ppo.demo.safe_evaluate ...                          -> ROOT/quickstart-safe

The safe helpfulness labels pay the right colour plus *any* closing, so the reward model gives
plain PPO no reason to avoid rude closings ("go away."); the cost model learnt from the safety
labels that rude answers are unsafe, and PPO-Lagrangian keeps its mean cost under the threshold.

The threshold comes from a target unsafe share. The cost model gives safe answers negative and
unsafe ones positive costs; with its held-out class means c_safe and c_unsafe, a policy whose
answers are unsafe with probability p has mean cost c_safe + p·(c_unsafe − c_safe). So the
threshold D for a share p* is c_safe + p*·(c_unsafe − c_safe), computed from the cost stage's
`all_results.json` when the PPO-Lag stage starts (the banner shows it).

Results: ROOT/quickstart-safe/summary.json, curves.png (PPO-Lag: reward, cost, λ, KL, losses),
curves_ppo.png (plain PPO), evaluation.json, generations.jsonl, logs/<stage>.log.
"""

from __future__ import annotations

import json
import math
import os
import sys
import textwrap
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

from ppo.demo.quickstart import (
    CONFIG_DIR,
    CURVE_PANELS,
    EVALUATION_SAMPLES_PER_PROMPT,
    FAST_OVERRIDES,
    Layout,
    Stage,
    aggregate_seeds,
    as_flags,
    banner,
    build_stages,
    check_summary,
    config_overrides,
    format_seconds,
    load_config,
    ppo_curve_summary,
    read_json,
    rerooted_value,
    run_stage,
    seeds_table,
    shown_path,
)

RESULTS_DIR = "quickstart-safe"
# Output directories under ROOT/tiny (the safe RM and plain PPO get their own, so a default
# quickstart under the same root keeps its rm/ and ppo/).
STAGE_DIRS = {"rm": "rm_safe", "cost": "cost", "ppo": "ppo_safe", "ppo_lag": "ppo_lag"}

# The unsafe share PPO-Lag must stay under on held-out prompts (the SFT model's is ~0.3: its data
# close rudely 30% of the time) and the share its cost threshold is set for. The threshold aims
# below the target because λ reacts to the cost only after it has risen above the threshold.
TARGET_UNSAFE_SHARE = 0.10
THRESHOLD_UNSAFE_SHARE = 0.05
# Helpfulness (right colour + any closing) must still rise by this much over the SFT model.
TARGET_HELPFULNESS_GAIN = 0.15
TARGET_WALL_SECONDS = 1200.0

# After one epoch of the 2000 pairs the cost model's sign is right on 99-100% of the held-out
# answers (README, "Cost model"); more epochs sharpen the pair ordering, which the demo does not
# use, and cost minutes per seed.
COST_EPOCHS = "1"

SAFE_FAST_OVERRIDES = {
    "rm": {"max_steps": "6", "logging_steps": "2", "eval_datasets": "PKU-SafeRLHF/test:0.1:{data}/safe/preference/test.jsonl"},
    "cost": {"max_steps": "6", "logging_steps": "2", "eval_datasets": "PKU-SafeRLHF/test:0.1:{data}/safe/preference/test.jsonl"},
    "ppo": FAST_OVERRIDES["ppo"],
    "ppo_lag": FAST_OVERRIDES["ppo"],
    "evaluate": FAST_OVERRIDES["evaluate"],
}  # fmt: skip

EXPECTED_SECONDS = {"assets": 8, "safe_data": 2, "sft": 70, "rm": 170, "cost": 35, "ppo": 40, "ppo_lag": 60, "evaluate": 40}
EXPECTED_SECONDS_FAST = {"assets": 6, "safe_data": 2, "sft": 12, "rm": 12, "cost": 12, "ppo": 20, "ppo_lag": 25, "evaluate": 15}

LAG_CURVE_PANELS = (
    ("reward (RM score)", ("train/reward", "eval/reward")),
    ("cost (cost-model score)", ("train/cost", "train/episode_cost", "eval/cost")),
    ("Lagrange multiplier λ", ("train/lambda",)),
    ("KL to reference (per response)", ("train/kl_divergence",)),
    ("critic losses", ("train/reward_critic_loss", "train/cost_critic_loss")),
    ("actor loss", ("train/actor_loss",)),
)


@dataclass
class SafeStage(Stage):
    # Flags known only once earlier stages have run (PPO-Lag's threshold); added to `command`
    # just before the stage starts, so the banner shows them.
    late_flags: Optional[Callable[[], Dict[str, str]]] = None


# ------------------------------------------------------------------------------------------------
# Plan


def threshold_for_share(cost_results: dict, unsafe_share: float, source: str = "cost results") -> float:
    """The mean cost of answers unsafe with probability `unsafe_share`, from the cost model's
    held-out class means: c_safe + share·(c_unsafe − c_safe)."""
    if not 0.0 <= unsafe_share <= 1.0:
        raise ValueError(f"unsafe_share must be in [0, 1], got {unsafe_share}")
    missing = [key for key in ("eval_safe_cost_mean", "eval_unsafe_cost_mean") if key not in cost_results]
    if missing:
        raise ValueError(f"{source} lacks {missing}: the cost model's eval set needs safe and unsafe answers")
    safe, unsafe = cost_results["eval_safe_cost_mean"], cost_results["eval_unsafe_cost_mean"]
    return safe + unsafe_share * (unsafe - safe)


def lag_threshold_flags(cost_dir: str) -> Callable[[], Dict[str, str]]:
    def flags():
        path = os.path.join(cost_dir, "all_results.json")
        return {"threshold": f"{threshold_for_share(read_json(path), THRESHOLD_UNSAFE_SHARE, path):.4f}"}

    return flags


def build_safe_stages(layout: Layout, seed: int, fast: bool) -> List[Stage]:
    python = [sys.executable, "-u"]
    default = {stage.name: stage for stage in build_stages(layout, seed, fast)}
    dirs = {name: layout.stage_dir(directory) for name, directory in STAGE_DIRS.items()}
    cost_config = load_config("cost_argument.json")
    safe_pairs = {key: rerooted_value(cost_config[key], layout.root) for key in ("train_datasets", "eval_datasets")}

    def command(name, script, config_name, extra):
        fast_flags = {key: value.format(data=layout.data) for key, value in SAFE_FAST_OVERRIDES[name].items()} if fast else {}
        overrides = {**config_overrides(load_config(config_name), layout, seed), **extra, **fast_flags}
        return python + [script, os.path.join(CONFIG_DIR, config_name)] + as_flags(overrides)

    evaluate_options = {
        "sft": layout.stage_dir("sft"),
        "ppo": os.path.join(dirs["ppo"], "policy"),
        "ppo-lag": os.path.join(dirs["ppo_lag"], "policy"),
        "reward-model": dirs["rm"],
        "cost-model": dirs["cost"],
        "prompts": rerooted_value(load_config("ppo_argument.json")["eval_datasets"], layout.root),
        "samples-per-prompt": str(EVALUATION_SAMPLES_PER_PROMPT),
        "seed": str(seed),
        "output": layout.result("evaluation.json"),
        "generations": layout.result("generations.jsonl"),
        **(SAFE_FAST_OVERRIDES["evaluate"] if fast else {}),
    }
    reward_model = {"reward_model_name_or_path": dirs["rm"]}
    return [
        default["assets"],
        SafeStage("safe_data", "safety variant of the demo data: helpfulness and safety labels",
                  python + ["-m", "ppo.demo.make_data", "--variant", "safe", "--output-dir", os.path.join(layout.data, "safe"),
                            "--seed", str(seed)]),
        default["sft"],
        SafeStage("rm", "reward model on the safe helpfulness pairs (rude and polite closings paid alike)",
                  command("rm", "rm/run_reward.py", "rm_argument.json", {**safe_pairs, "output_dir": dirs["rm"]}),
                  clears=dirs["rm"]),
        SafeStage("cost", "cost model on the safety labels (rude closings unsafe)",
                  command("cost", "rm/run_cost.py", "cost_argument.json", {"num_train_epochs": COST_EPOCHS}),
                  clears=dirs["cost"]),
        SafeStage("ppo", "plain PPO against the reward model alone",
                  command("ppo", "ppo/run_ppo.py", "ppo_argument.json", {**reward_model, "output_dir": dirs["ppo"]}),
                  clears=dirs["ppo"]),
        SafeStage("ppo_lag", f"PPO-Lagrangian: the same reward model, cost threshold at a {THRESHOLD_UNSAFE_SHARE:.0%} unsafe share",
                  command("ppo_lag", "ppo/run_ppo.py", "ppo_lag_argument.json", {}),
                  clears=dirs["ppo_lag"], late_flags=lag_threshold_flags(dirs["cost"])),
        SafeStage("evaluate", "judge SFT, PPO and PPO-Lag by the rules on held-out prompts",
                  python + ["-m", "ppo.demo.safe_evaluate"] + as_flags(evaluate_options)),
    ]  # fmt: skip


def safe_layout(output_root: str) -> Layout:
    layout = Layout(output_root)
    layout.quickstart = os.path.join(layout.root, RESULTS_DIR)
    return layout


# ------------------------------------------------------------------------------------------------
# Results


def lag_curve_summary(metrics_path: str) -> dict:
    """λ and the cost at the end of PPO-Lag (and λ's largest value)."""
    from ppo.plotting import read_metrics

    records = read_metrics(metrics_path)
    summary = {}
    for key, name in (("train/lambda", "lambda"), ("train/episode_cost", "episode_cost"), ("train/cost", "train_cost"), ("eval/cost", "eval_cost")):
        values = [record[key] for record in records if key in record]
        if values:
            summary[f"{name}_first"], summary[f"{name}_last"] = values[0], values[-1]
            summary[f"{name}_max"] = max(values)
    return summary


POLICY_NUMBERS = ("unsafe_share", "helpfulness", "judge_score", "colour_accuracy", "closing_rate", "politeness_rate",
                  "reward", "cost", "well_formed_rate", "mean_length")  # fmt: skip


def stage_threshold(stages: Sequence[Stage]) -> float:
    """The threshold the PPO-Lag stage ran with (its late flag)."""
    command = next(stage for stage in stages if stage.name == "ppo_lag").command
    return float(command[command.index("--threshold") + 1])


def build_safe_summary(layout: Layout, stages: Sequence[Stage], seed: int, fast: bool, wall_seconds: float, load: dict) -> dict:
    rm_results = read_json(os.path.join(layout.stage_dir(STAGE_DIRS["rm"]), "all_results.json"))
    cost_results = read_json(os.path.join(layout.stage_dir(STAGE_DIRS["cost"]), "all_results.json"))
    evaluation = read_json(layout.result("evaluation.json"))
    threshold = stage_threshold(stages)
    summary = {
        "rm_eval_accuracy": rm_results["eval_accuracy"],
        "cost_eval_accuracy_sign": cost_results["eval_accuracy_sign"],
        "cost_eval_safe_mean": cost_results["eval_safe_cost_mean"],
        "cost_eval_unsafe_mean": cost_results["eval_unsafe_cost_mean"],
        "threshold": threshold,
        "threshold_unsafe_share": THRESHOLD_UNSAFE_SHARE,
    }
    for policy in ("sft", "ppo", "ppo_lag"):
        for number in POLICY_NUMBERS:
            summary[f"{number}_{policy}"] = evaluation[policy][number]
        for number in ("unsafe_share", "helpfulness", "judge_score"):
            summary[f"greedy_{number}_{policy}"] = evaluation[f"{policy}_greedy"][number]
    for policy in ("ppo", "ppo_lag"):
        summary[f"kl_to_reference_{policy}"] = evaluation[policy]["kl_to_reference"]
    summary["helpfulness_gain_ppo"] = summary["helpfulness_ppo"] - summary["helpfulness_sft"]
    summary["helpfulness_gain_ppo_lag"] = summary["helpfulness_ppo_lag"] - summary["helpfulness_sft"]
    lag_metrics = os.path.join(layout.stage_dir(STAGE_DIRS["ppo_lag"]), "ppo_metrics.jsonl")
    summary.update(lag_curve_summary(lag_metrics))
    summary["ppo_steps"] = ppo_curve_summary(os.path.join(layout.stage_dir(STAGE_DIRS["ppo"]), "ppo_metrics.jsonl"))["ppo_steps"]
    summary["ppo_lag_steps"] = ppo_curve_summary(lag_metrics)["ppo_steps"]
    summary.update({
        "wall_seconds": wall_seconds,
        "stage_seconds": {stage.name: stage.seconds for stage in stages},
        "evaluation": evaluation["settings"],
        "seed": seed,
        "fast": fast,
        "load_average_1min": load,
        "output_root": layout.root,
    })  # fmt: skip
    summary["targets"] = {
        # What the demo is about: plain PPO, paid for rude and polite closings alike, does not
        # keep the SFT model's share of rude answers down.
        "unsafe_share_ppo > unsafe_share_sft": summary["unsafe_share_ppo"] > summary["unsafe_share_sft"],
        f"unsafe_share_ppo_lag <= {TARGET_UNSAFE_SHARE}": summary["unsafe_share_ppo_lag"] <= TARGET_UNSAFE_SHARE,
        f"helpfulness_ppo_lag - helpfulness_sft >= {TARGET_HELPFULNESS_GAIN}": summary["helpfulness_gain_ppo_lag"] >= TARGET_HELPFULNESS_GAIN,
        f"wall_seconds <= {TARGET_WALL_SECONDS:g}": wall_seconds <= TARGET_WALL_SECONDS,
    }
    summary["samples"] = evaluation["samples"]
    return summary


def safe_results_table(summary: dict) -> str:
    rows = [
        ("unsafe share (rude closing)", "unsafe_share", "{:.3f}"),
        ("helpfulness (colour + any closing)", "helpfulness", "{:.3f}"),
        ("  right colour", "colour_accuracy", "{:.3f}"),
        ("  any closing", "closing_rate", "{:.3f}"),
        ("default judge (colour + polite)", "judge_score", "{:.3f}"),
        ("unsafe share, greedy decoding", "greedy_unsafe_share", "{:.3f}"),
        ("helpfulness, greedy decoding", "greedy_helpfulness", "{:.3f}"),
        ("reward-model score", "reward", "{:+.3f}"),
        ("cost-model score", "cost", "{:+.3f}"),
        ("well-formed answers", "well_formed_rate", "{:.3f}"),
    ]
    lines = [f"{'':<38}{'SFT':>12}{'PPO':>12}{'PPO-Lag':>12}", "-" * 74]
    for label, key, number in rows:
        lines.append(f"{label:<38}" + "".join(f"{number.format(summary[f'{key}_{p}']):>12}" for p in ("sft", "ppo", "ppo_lag")))
    lines.append("-" * 74)
    lines.append(f"KL to SFT per response: PPO {summary['kl_to_reference_ppo']:.3f}, PPO-Lag {summary['kl_to_reference_ppo_lag']:.3f} nats")
    lines.append(
        f"cost threshold {summary['threshold']:+.3f} (a {summary['threshold_unsafe_share']:.0%} unsafe mix of the cost model's "
        f"held-out means {summary['cost_eval_safe_mean']:+.2f} safe / {summary['cost_eval_unsafe_mean']:+.2f} unsafe); "
        f"λ at the end {summary.get('lambda_last', math.nan):.3f} (largest {summary.get('lambda_max', math.nan):.3f})"
    )
    lines.append(f"reward-model accuracy {summary['rm_eval_accuracy']:.3f}, cost-model sign accuracy {summary['cost_eval_accuracy_sign']:.3f} (held-out pairs)")
    stage_times = ", ".join(f"{name} {format_seconds(seconds)}" for name, seconds in summary["stage_seconds"].items())
    lines.append(f"wall time {format_seconds(summary['wall_seconds'])} ({stage_times})")
    lines.append("")
    lines.append("Sample answers to held-out prompts ([unsafe] marks a rude closing):")
    for sample in summary["samples"]:
        lines.append(f"  USER: {sample['prompt']}")
        for name in ("sft", "ppo", "ppo_lag"):
            flag = "[unsafe]" if sample[f"{name}_unsafe"] else "[safe]  "
            lines.append("    " + textwrap.shorten(f"{name.upper():<8}{flag} {sample[name]!r}", 100))
    for target, met in summary["targets"].items():
        lines.append(f"target {target}: {'met' if met else 'NOT met'}")
    return "\n".join(lines)


def write_safe_curves(layout: Layout, seed: int, threshold: float) -> None:
    from ppo.plotting import plot_training_curves

    plot_training_curves(
        os.path.join(layout.stage_dir(STAGE_DIRS["ppo_lag"]), "ppo_metrics.jsonl"), layout.result("curves.png"),
        panels=LAG_CURVE_PANELS, title=f"Safe demo: PPO-Lagrangian, cost threshold {threshold:+.2f} (seed {seed})",
    )  # fmt: skip
    plot_training_curves(
        os.path.join(layout.stage_dir(STAGE_DIRS["ppo"]), "ppo_metrics.jsonl"), layout.result("curves_ppo.png"),
        panels=CURVE_PANELS, title=f"Safe demo: plain PPO, reward model only (seed {seed})",
    )  # fmt: skip


# ------------------------------------------------------------------------------------------------
# Entry points


def write_json(path: str, value: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w", encoding="utf-8") as handle:
        json.dump(value, handle, indent=2)
        handle.write("\n")
    os.replace(path + ".tmp", path)


def run_safe(output_root: str, seed: int = 0, fast: bool = False) -> dict:
    layout = safe_layout(output_root)
    os.makedirs(os.path.join(layout.quickstart, "logs"), exist_ok=True)
    for stale in ("summary.json", "curves.png", "curves_ppo.png", "evaluation.json", "generations.jsonl"):
        if os.path.exists(layout.result(stale)):
            os.remove(layout.result(stale))
    stages = build_safe_stages(layout, seed, fast)
    expected = EXPECTED_SECONDS_FAST if fast else EXPECTED_SECONDS
    load = {"start": os.getloadavg()[0]}
    print(
        f"quickstart --safe: SFT -> reward model + cost model -> PPO and PPO-Lagrangian, seed {seed}"
        f"{' (--fast: wiring check only)' if fast else ''}\n  output root {shown_path(layout.root)}; expected "
        f"~{format_seconds(sum(expected.values()))} on 2 idle CPU cores (load average now {load['start']:.2f})",
        flush=True,
    )
    started = time.time()
    for index, stage in enumerate(stages):
        if getattr(stage, "late_flags", None) is not None:
            stage.command = stage.command + as_flags(stage.late_flags())
        load[stage.name] = os.getloadavg()[0]
        log_path = os.path.join(layout.quickstart, "logs", f"{stage.name}.log")
        banner(stage, index, stages, started, expected, log_path)
        stage.seconds = run_stage(stage, log_path)
        print(f"[{stage.name}] done in {format_seconds(stage.seconds)}", flush=True)
    write_safe_curves(layout, seed, stage_threshold(stages))
    wall_seconds = time.time() - started
    load["end"] = os.getloadavg()[0]
    summary = build_safe_summary(layout, stages, seed, fast, wall_seconds, load)
    check_summary(summary)
    write_json(layout.result("summary.json"), summary)
    print("\n" + "=" * 100 + "\nRESULTS (held-out prompts, judged by the rules)\n" + "=" * 100)
    print(safe_results_table(summary))
    print(f"\nsummary: {layout.result('summary.json')}\ncurves:  {layout.result('curves.png')}", flush=True)
    return summary


# Numbers aggregated over seeds (mean, minimum, maximum).
SAFE_SEED_METRICS = (
    "unsafe_share_sft", "unsafe_share_ppo", "unsafe_share_ppo_lag",
    "helpfulness_sft", "helpfulness_ppo", "helpfulness_ppo_lag",
    "judge_score_sft", "judge_score_ppo", "judge_score_ppo_lag",
    "greedy_unsafe_share_ppo", "greedy_unsafe_share_ppo_lag",
    "cost_sft", "cost_ppo", "cost_ppo_lag", "threshold", "lambda_last", "lambda_max",
    "kl_to_reference_ppo", "kl_to_reference_ppo_lag", "rm_eval_accuracy", "cost_eval_accuracy_sign", "wall_seconds",
)  # fmt: skip


def run_safe_seeds(output_root: str, seeds: Sequence[int], fast: bool = False) -> dict:
    """The safe pipeline once per seed, each under ROOT/seed-N, then the aggregate in
    ROOT/quickstart-safe/seeds.json."""
    summaries = []
    for index, seed in enumerate(seeds):
        print(f"\n{'#' * 100}\n# seed {seed} ({index + 1} of {len(seeds)})\n{'#' * 100}", flush=True)
        summaries.append(run_safe(os.path.join(output_root, f"seed-{seed}"), seed=seed, fast=fast))
    aggregated = aggregate_seeds(summaries, SAFE_SEED_METRICS)
    path = safe_layout(output_root).result("seeds.json")
    write_json(path, aggregated)
    print("\n" + "=" * 100 + f"\nRESULTS OVER SEEDS {list(seeds)}\n" + "=" * 100)
    print(seeds_table(aggregated))
    print(f"\nper-seed outputs: {shown_path(output_root)}/seed-N/{RESULTS_DIR}/\naggregate: {path}", flush=True)
    return aggregated
