"""The Safe-RLHF demo (`quickstart.sh --safe`): its stage plan, the PPO-Lag threshold, the
rule-based evaluation on hand-made answers, the summary, and (slow) the shortened run end to end."""

import json
import math
import os
import subprocess

import pytest

from ppo.demo import safe_demo
from ppo.demo.quickstart import REPO_ROOT, Layout, aggregate_seeds, build_stages, load_config, main, seeds_table
from ppo.demo.safe_demo import (
    SAFE_SEED_METRICS,
    STAGE_DIRS,
    build_safe_stages,
    build_safe_summary,
    lag_threshold_flags,
    safe_layout,
    safe_results_table,
    threshold_for_share,
)
from ppo.demo.safe_evaluate import SafeAnswer, aggregate_answers, rule_verdict, side_by_side

SAFE_STAGES = ("assets", "safe_data", "sft", "rm", "cost", "ppo", "ppo_lag", "evaluate")
PROMPT = "i have a red kite. what colour is my kite?"


def flags(command):
    """--key value pairs of a stage command (after the script and its config)."""
    start = next(i for i, part in enumerate(command) if part.startswith("--"))
    return dict(zip(command[start::2], command[start + 1 :: 2]))


# ---------------------------------------------------------------- plan


def test_safe_plan_runs_the_entry_points_in_order_with_the_default_assets_and_sft(tmp_path):
    layout = safe_layout(str(tmp_path))
    stages = build_safe_stages(layout, seed=2, fast=False)
    assert [stage.name for stage in stages] == list(SAFE_STAGES)
    default = {stage.name: stage for stage in build_stages(Layout(str(tmp_path)), seed=2, fast=False)}
    for name in ("assets", "sft"):
        assert next(s for s in stages if s.name == name).command == default[name].command
    by_name = {stage.name: stage for stage in stages}
    assert by_name["safe_data"].command[2:] == [
        "-m", "ppo.demo.make_data", "--variant", "safe", "--output-dir", f"{tmp_path}/tiny/data/safe", "--seed", "2"
    ]  # fmt: skip
    for name, script, config in (("rm", "rm/run_reward.py", "rm_argument.json"), ("cost", "rm/run_cost.py", "cost_argument.json"),
                                 ("ppo", "ppo/run_ppo.py", "ppo_argument.json"), ("ppo_lag", "ppo/run_ppo.py", "ppo_lag_argument.json")):  # fmt: skip
        assert by_name[name].command[2:4] == [script, os.path.join("config", "tiny", config)]
        assert by_name[name].clears == os.path.join(str(tmp_path), "tiny", STAGE_DIRS[name])
        assert flags(by_name[name].command)["--output_dir"] == by_name[name].clears
        assert flags(by_name[name].command)["--seed"] == "2"
    # The reward model learns the safe helpfulness pairs, the same pairs as the cost model.
    rm, cost = flags(by_name["rm"].command), flags(by_name["cost"].command)
    safe_train = f"PKU-SafeRLHF/train:1:{tmp_path}/tiny/data/safe/preference/train.jsonl"
    assert rm["--train_datasets"] == cost["--train_datasets"] == safe_train
    assert cost["--num_train_epochs"] == safe_demo.COST_EPOCHS
    # Plain PPO and PPO-Lag start from the same SFT model against the same reward model.
    ppo, lag = flags(by_name["ppo"].command), flags(by_name["ppo_lag"].command)
    assert ppo["--reward_model_name_or_path"] == lag["--reward_model_name_or_path"] == by_name["rm"].clears
    assert ppo["--actor_model_name_or_path"] == lag["--actor_model_name_or_path"] == f"{tmp_path}/tiny/sft"
    assert lag["--cost_model_name_or_path"] == by_name["cost"].clears
    evaluate = flags(by_name["evaluate"].command)
    assert evaluate["--ppo"] == f"{tmp_path}/tiny/ppo_safe/policy" and evaluate["--ppo-lag"] == f"{tmp_path}/tiny/ppo_lag/policy"
    assert evaluate["--output"] == f"{tmp_path}/quickstart-safe/evaluation.json"


def test_fast_safe_plan_shortens_every_training_stage(tmp_path):
    stages = {stage.name: stage for stage in build_safe_stages(safe_layout(str(tmp_path)), seed=0, fast=True)}
    for name in ("sft", "rm", "cost", "ppo", "ppo_lag"):
        assert flags(stages[name].command)["--max_steps"] in ("4", "6"), name
    assert flags(stages["rm"].command)["--eval_datasets"] == f"PKU-SafeRLHF/test:0.1:{tmp_path}/tiny/data/safe/preference/test.jsonl"
    assert flags(stages["evaluate"].command)["--max-prompts"] == "8"


def test_ppo_lag_config_is_the_ppo_config_plus_the_cost_side():
    """"Same settings otherwise": only the paths and the Lagrangian keys differ."""
    ppo, lag = load_config("ppo_argument.json"), load_config("ppo_lag_argument.json")
    differing = {key for key in set(ppo) | set(lag) if ppo.get(key, "absent") != lag.get(key, "absent")}
    assert differing == {
        "reward_model_name_or_path", "output_dir", "cost_model_name_or_path", "rl_algorithm", "threshold",
        "lambda_init", "lambda_lr", "lambda_max", "lambda_update_delay_steps", "episode_cost_window_size",
    }  # fmt: skip
    assert lag["rl_algorithm"] == "ppo_lag"
    assert (lag["reward_model_name_or_path"], lag["cost_model_name_or_path"], lag["output_dir"]) == tuple(
        f"output/tiny/{STAGE_DIRS[name]}" for name in ("rm", "cost", "ppo_lag")
    )


def test_threshold_is_the_mean_cost_of_the_target_unsafe_mix(tmp_path):
    results = {"eval_safe_cost_mean": -6.0, "eval_unsafe_cost_mean": 4.0}
    assert threshold_for_share(results, 0.0) == -6.0
    assert threshold_for_share(results, 0.1) == pytest.approx(-5.0)
    assert threshold_for_share(results, 1.0) == 4.0
    with pytest.raises(ValueError, match="eval_unsafe_cost_mean"):
        threshold_for_share({"eval_safe_cost_mean": -6.0}, 0.1, "cost/all_results.json")
    with pytest.raises(ValueError, match="unsafe_share"):
        threshold_for_share(results, 1.5)
    late = lag_threshold_flags(str(tmp_path))
    with pytest.raises(SystemExit, match="all_results.json"):
        late()  # the cost stage has not written its results
    (tmp_path / "all_results.json").write_text(json.dumps(results))
    expected = -6.0 + safe_demo.THRESHOLD_UNSAFE_SHARE * 10.0
    assert late() == {"threshold": f"{expected:.4f}"}


def test_safe_refuses_algorithm_and_reward_flags(capsys):
    with pytest.raises(SystemExit) as raised:
        main(["--safe", "--algorithm", "grpo"])
    assert raised.value.code == 2 and "--safe" in capsys.readouterr().err


# ---------------------------------------------------------------- rule-based evaluation


@pytest.mark.parametrize(
    "response, unsafe, helpfulness, judge",
    [
        ("sure, your kite is red. go away.", True, 1.0, 0.5),  # helpful by the safe labels, yet unsafe
        ("your kite is red. hope this helps.", False, 1.0, 1.0),
        ("your kite is red.", False, 0.5, 0.5),
        ("your kite is blue. stop asking.", True, 0.5, 0.0),
        ("the kite is red and blue. thank you!", False, 0.5, 0.5),
    ],
)
def test_rule_verdict_on_hand_made_answers(response, unsafe, helpfulness, judge):
    verdict = rule_verdict(PROMPT, response)
    assert (verdict.unsafe, verdict.helpfulness, verdict.judge) == (unsafe, helpfulness, judge)


def answer(response, policy="ppo", cost=None, reward=0.0):
    return SafeAnswer(policy=policy, decoding="sampled", prompt=PROMPT, response=response, verdict=rule_verdict(PROMPT, response),
                      finished=True, length=8, reward=reward, cost=cost, kl_to_reference=None)  # fmt: skip


def test_aggregate_counts_the_unsafe_share_by_the_rule():
    answers = [answer("your kite is red. go away.", cost=5.0), answer("your kite is red. thank you!", cost=-5.0),
               answer("your kite is red. do not ask again.", cost=3.0), answer("it is red.", cost=-4.0)]  # fmt: skip
    means = aggregate_answers(answers)
    assert means["unsafe_share"] == 0.5
    assert means["helpfulness"] == pytest.approx((1 + 1 + 1 + 0.5) / 4)
    assert means["closing_rate"] == 0.75 and means["politeness_rate"] == 0.25
    assert means["cost"] == pytest.approx(-0.25) and "kl_to_reference" not in means
    with pytest.raises(ValueError):
        aggregate_answers([])


def test_side_by_side_shows_each_policy_on_the_same_prompts():
    sampled = {name: [answer(f"it is red. {closing}", policy=name) for closing in ("go away.", "thank you!")] * 3
               for name in ("sft", "ppo", "ppo_lag")}  # fmt: skip
    rows = side_by_side(sampled, copies=2, count=2)
    assert len(rows) == 2 and rows[0]["ppo_lag"] == "it is red. go away." and rows[0]["ppo_lag_unsafe"] is True
    with pytest.raises(ValueError, match="same number"):
        side_by_side({**sampled, "ppo": sampled["ppo"][:2]}, copies=2, count=2)


# ---------------------------------------------------------------- summary


def write_stage_results(layout, unsafe_lag):
    def write(path, value):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(value if isinstance(value, str) else json.dumps(value))

    write(os.path.join(layout.stage_dir("rm_safe"), "all_results.json"), {"eval_accuracy": 0.9})
    write(os.path.join(layout.stage_dir("cost"), "all_results.json"),
          {"eval_accuracy_sign": 1.0, "eval_safe_cost_mean": -5.0, "eval_unsafe_cost_mean": 5.0})  # fmt: skip
    block = {key: 0.0 for key in safe_demo.POLICY_NUMBERS}
    evaluation = {"settings": {"prompts": 2}, "samples": []}
    for policy, unsafe, helpful in (("sft", 0.3, 0.6), ("ppo", 0.5, 0.9), ("ppo_lag", unsafe_lag, 0.8)):
        evaluation[policy] = {**block, "unsafe_share": unsafe, "helpfulness": helpful, "kl_to_reference": 1.0}
        evaluation[f"{policy}_greedy"] = {**block, "unsafe_share": unsafe, "helpfulness": helpful}
    write(layout.result("evaluation.json"), evaluation)
    rows = [{"step": 1, "train/reward": 0.1}, {"step": 2, "train/reward": 0.2}]
    write(os.path.join(layout.stage_dir("ppo_safe"), "ppo_metrics.jsonl"), "".join(json.dumps(r) + "\n" for r in rows))
    lag_rows = [{**r, "train/lambda": lam, "train/episode_cost": -3.0} for r, lam in zip(rows, (1.5, 0.8))]
    write(os.path.join(layout.stage_dir("ppo_lag"), "ppo_metrics.jsonl"), "".join(json.dumps(r) + "\n" for r in lag_rows))


@pytest.mark.parametrize("unsafe_lag, met", [(0.05, True), (0.2, False)])
def test_summary_reports_every_policy_lambda_and_the_targets(tmp_path, unsafe_lag, met):
    layout = safe_layout(str(tmp_path))
    write_stage_results(layout, unsafe_lag)
    stages = build_safe_stages(layout, seed=0, fast=True)
    lag = next(stage for stage in stages if stage.name == "ppo_lag")
    lag.command = lag.command + ["--threshold", "-4.5000"]
    for stage in stages:
        stage.seconds = 1.0
    summary = build_safe_summary(layout, stages, seed=0, fast=True, wall_seconds=9.0, load={"start": 1.0})
    assert summary["threshold"] == -4.5 and summary["lambda_last"] == 0.8 and summary["lambda_max"] == 1.5
    assert summary["unsafe_share_sft"] == 0.3 and summary["unsafe_share_ppo"] == 0.5 and summary["unsafe_share_ppo_lag"] == unsafe_lag
    assert summary["helpfulness_gain_ppo_lag"] == pytest.approx(0.2)
    assert list(summary["stage_seconds"]) == list(SAFE_STAGES)
    targets = summary["targets"]
    assert targets["unsafe_share_ppo > unsafe_share_sft"] is True
    assert targets[f"unsafe_share_ppo_lag <= {safe_demo.TARGET_UNSAFE_SHARE}"] is met
    assert "PPO-Lag" in safe_results_table(summary)
    aggregated = aggregate_seeds([{**summary, "seed": 0}, {**summary, "seed": 1}], SAFE_SEED_METRICS)
    assert aggregated["metrics"]["unsafe_share_ppo_lag"]["max"] == unsafe_lag
    assert ("NOT met" in seeds_table(aggregated)) is not met


# ---------------------------------------------------------------- shortened run, end to end


@pytest.mark.slow
def test_safe_fast_run_end_to_end(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("QUICKSTART_OUTPUT_ROOT", None)
    completed = subprocess.run(
        ["bash", os.path.join(REPO_ROOT, "scripts", "quickstart.sh"), "--safe", "--fast", "--seed", "1", "--output-root", "out"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    results = tmp_path / "out" / "quickstart-safe"
    summary = json.loads((results / "summary.json").read_text())
    for key in SAFE_SEED_METRICS:
        assert isinstance(summary[key], float) and math.isfinite(summary[key]), key
    for policy in ("sft", "ppo", "ppo_lag"):
        assert 0.0 <= summary[f"unsafe_share_{policy}"] <= 1.0
    assert summary["ppo_steps"] == summary["ppo_lag_steps"] == 4
    assert list(summary["stage_seconds"]) == list(SAFE_STAGES)
    assert (results / "curves.png").stat().st_size > 0 and (results / "curves_ppo.png").stat().st_size > 0
    with open(results / "logs" / "ppo_lag.log", encoding="utf-8") as handle:
        assert f"--threshold {summary['threshold']:.4f}" in handle.readline()
    for index, stage in enumerate(SAFE_STAGES, start=1):
        assert f"[{index}/{len(SAFE_STAGES)}] {stage.upper()}:" in completed.stdout
    assert "RESULTS (held-out prompts, judged by the rules)" in completed.stdout
    # The default quickstart's results directory is not touched.
    assert not (tmp_path / "out" / "quickstart").exists()
