"""The one-command quickstart: a shortened end-to-end run through scripts/quickstart.sh, the
evaluation on real tiny models, and the orchestration helpers."""

import json
import math
import os
import random
import subprocess

import pytest

from ppo.demo import task
from ppo.demo.evaluate import ScoredResponse, SamplingSettings, aggregate, side_by_side
from ppo.demo.quickstart import (
    REPO_ROOT,
    SEED_METRICS,
    ConsoleFilter,
    Layout,
    Stage,
    aggregate_seeds,
    build_stages,
    config_overrides,
    env_flag,
    eta_seconds,
    parse_seeds,
    rerooted_value,
    seeds_table,
)

REQUIRED_SUMMARY_KEYS = (
    "rm_eval_accuracy",
    "judge_score_sft",
    "judge_score_ppo",
    "reward_sft",
    "reward_ppo",
    "kl_to_reference",
    "wall_seconds",
)
STAGES = ("assets", "sft", "rm", "ppo", "evaluate")


# ---------------------------------------------------------------- shortened end-to-end run


@pytest.fixture(scope="module")
def fast_run(tmp_path_factory):
    """`bash scripts/quickstart.sh --fast` started from a directory outside the repository with a
    relative --output-root (which must resolve against that directory)."""
    workdir = tmp_path_factory.mktemp("quickstart")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("QUICKSTART_OUTPUT_ROOT", None)
    completed = subprocess.run(
        ["bash", os.path.join(REPO_ROOT, "scripts", "quickstart.sh"), "--fast", "--seed", "3", "--output-root", "out"],
        cwd=workdir, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    return workdir / "out", completed.stdout


def test_fast_run_writes_a_complete_finite_summary(fast_run):
    root, _ = fast_run
    with open(root / "quickstart" / "summary.json", encoding="utf-8") as handle:
        summary = json.load(handle)
    for key in REQUIRED_SUMMARY_KEYS:
        assert key in summary, f"summary.json lacks {key}"
        assert isinstance(summary[key], float) and math.isfinite(summary[key]), (key, summary[key])
    for key in ("judge_score_sft", "judge_score_ppo", "greedy_judge_score_sft", "greedy_judge_score_ppo"):
        assert 0.0 <= summary[key] <= 1.0, (key, summary[key])
    assert 0.0 <= summary["rm_eval_accuracy"] <= 1.0
    assert summary["judge_gain"] == pytest.approx(summary["judge_score_ppo"] - summary["judge_score_sft"])
    # The judge's two halves add up to its score (correctness and politeness weigh 0.5 each).
    for side in ("sft", "ppo"):
        assert summary[f"judge_score_{side}"] == pytest.approx(
            0.5 * summary[f"colour_accuracy_{side}"] + 0.5 * summary[f"politeness_rate_{side}"]
        )
    assert list(summary["stage_seconds"]) == list(STAGES)
    assert all(seconds > 0 for seconds in summary["stage_seconds"].values())
    assert summary["wall_seconds"] >= sum(summary["stage_seconds"].values())
    assert summary["seed"] == 3 and summary["fast"] is True
    assert summary["ppo_steps"] == 4  # the --fast override reached run_ppo.py
    assert summary["evaluation"]["prompts"] == 8 and summary["evaluation"]["samples_per_prompt"] == 2
    assert set(summary["targets"]) and all(isinstance(met, bool) for met in summary["targets"].values())


def test_fast_run_writes_curves_and_stage_outputs(fast_run):
    root, _ = fast_run
    with open(root / "quickstart" / "curves.png", "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"
    for directory in ("tiny/data", "tiny/tokenizer", "tiny/base", "tiny/sft", "tiny/rm", "tiny/ppo/policy"):
        assert (root / directory).is_dir(), directory
    metrics = [json.loads(line) for line in open(root / "tiny" / "ppo" / "ppo_metrics.jsonl", encoding="utf-8")]
    assert [record["step"] for record in metrics if "train/reward" in record] == [1, 2, 3, 4]
    generations = [json.loads(line) for line in open(root / "quickstart" / "generations.jsonl", encoding="utf-8")]
    # 8 prompts x 2 samples, sampled, plus one greedy answer each, for both policies.
    assert len(generations) == 2 * (8 * 2 + 8)
    for stage in STAGES:
        assert (root / "quickstart" / "logs" / f"{stage}.log").stat().st_size > 0


def test_fast_run_uses_the_repository_entry_points_and_configs(fast_run):
    root, _ = fast_run
    for stage, script, config in (
        ("sft", "sft/run_sft.py", "config/tiny/sft_argument.json"),
        ("rm", "rm/run_reward.py", "config/tiny/rm_argument.json"),
        ("ppo", "ppo/run_ppo.py", "config/tiny/ppo_argument.json"),
    ):
        with open(root / "quickstart" / "logs" / f"{stage}.log", encoding="utf-8") as handle:
            first_line = handle.readline()
        assert f" {script} {config} " in first_line, first_line
        assert f"--output_dir {root / 'tiny' / stage}" in first_line


def test_fast_run_prints_banners_and_the_before_after_table(fast_run):
    _, stdout = fast_run
    for index, stage in enumerate(STAGES, start=1):
        assert f"[{index}/5] {stage.upper()}:" in stdout
    assert "ETA for the rest of the pipeline" in stdout
    assert "RESULTS (before = SFT model, after = PPO policy)" in stdout
    table = stdout[stdout.index("RESULTS") :]
    for label in ("judge score (0-1, held-out prompts)", "reward-model score", "KL(PPO policy || SFT)", "wall time"):
        assert label in table
    assert table.count("USER: ") == 3
    assert table.count("SFT sampled") == 3 and table.count("PPO greedy") == 3
    # The training-argument dump is kept out of the console (it stays in the logs).
    assert "Training Configuration Arguments" not in stdout


def test_quickstart_rejects_unknown_options():
    completed = subprocess.run(
        ["bash", os.path.join(REPO_ROOT, "scripts", "quickstart.sh"), "--fsat"], capture_output=True, text=True, timeout=60
    )
    assert completed.returncode == 2
    assert "--fsat" in completed.stderr and "--fast" in completed.stderr


# ---------------------------------------------------------------- evaluation on real tiny models


@pytest.fixture(scope="module")
def demo_prompts_spec(tmp_path_factory):
    rng = random.Random(0)
    _, test_prompts = task.split_prompts(seed=0)
    path = tmp_path_factory.mktemp("demo_prompts") / "prompts.jsonl"
    with open(path, "w", encoding="utf-8") as handle:
        for row in task.prompt_rows(rng, test_prompts, count=5):
            handle.write(json.dumps(row) + "\n")
    return f"PKU-SafeRLHF/test:1:{path}"


def test_sample_and_score_is_seeded_and_a_policy_has_no_kl_to_itself(tiny_llama_dir, demo_prompts_spec):
    from ppo.demo.evaluate import PromptSet, load_causal_lm, sample_and_score
    from ppo.model_io import load_tokenizer
    from ppo.models import AutoModelForScore

    tokenizer = load_tokenizer(tiny_llama_dir)
    policy = load_causal_lm(tiny_llama_dir)
    reward_model = AutoModelForScore.from_pretrained(tiny_llama_dir, score_type="reward")
    reward_model.eval()
    prompts = PromptSet.load(demo_prompts_spec, tokenizer, max_length=48)
    assert len(prompts.texts) == 5 and all(task.prompt_colour(text) for text in prompts.texts)
    settings = SamplingSettings(samples_per_prompt=3, max_new_tokens=6, prompts_per_batch=2, seed=7)

    first = sample_and_score(policy, prompts, tokenizer, reward_model, settings, reference=policy)
    again = sample_and_score(policy, prompts, tokenizer, reward_model, settings)
    assert len(first) == 15
    assert [r.prompt for r in first] == [text for text in prompts.texts for _ in range(3)]
    assert [r.response for r in first] == [r.response for r in again]  # same seed, same answers
    assert [r.reward for r in first] == pytest.approx([r.reward for r in again], abs=1e-5)
    assert all(r.kl_to_reference == pytest.approx(0.0, abs=1e-5) for r in first)
    assert all(r.kl_to_reference is None for r in again)
    assert all(1 <= r.length <= 6 and r.judge == task.judge(r.prompt, r.response) for r in first)


def test_prompt_set_rejects_prompts_outside_the_demo_task(tiny_llama_dir, test_data_dir):
    from ppo.demo.evaluate import PromptSet
    from ppo.model_io import load_tokenizer

    spec = f"PKU-SafeRLHF/test:1:{test_data_dir / 'PKU-Alignment' / 'PKU-SafeRLHF' / 'test.jsonl'}"
    with pytest.raises(ValueError, match="names exactly one colour"):
        PromptSet.load(spec, load_tokenizer(tiny_llama_dir), max_length=200)


# ---------------------------------------------------------------- aggregation and the sample table


def scored(prompt, response, reward=0.0, kl=None):
    return ScoredResponse(
        prompt=prompt, response=response, judge=task.judge(prompt, response),
        correct_colour=task.is_correct(prompt, response), polite=task.is_polite(response),
        well_formed=task.is_well_formed(response), finished=True, length=5, reward=reward, kl_to_reference=kl,
    )  # fmt: skip


def test_aggregate_means_and_kl():
    prompt = "i have a red kite. what colour is my kite?"
    responses = [
        scored(prompt, "your kite is red. thank you!", reward=2.0, kl=0.5),
        scored(prompt, "your kite is blue.", reward=-1.0, kl=1.5),
    ]
    summary = aggregate(responses)
    assert summary["judge_score"] == 0.5 and summary["colour_accuracy"] == 0.5 and summary["politeness_rate"] == 0.5
    assert summary["reward"] == 0.5 and summary["kl_to_reference"] == 1.0 and summary["responses"] == 2
    assert "kl_to_reference" not in aggregate([scored(prompt, "red")])
    with pytest.raises(ValueError, match="at least one"):
        aggregate([])


def test_side_by_side_takes_fixed_prompts_and_both_decodings():
    prompts = [f"what colour is the {colour} cat?" for colour in task.COLOURS[:5]]
    runs = {
        ("sft", "sampled"): [scored(p, f"sample {i}") for p in prompts for i in range(2)],
        ("ppo", "sampled"): [scored(p, f"it is {p.split()[4]}. thank you!") for p in prompts for _ in range(2)],
        ("sft", "greedy"): [scored(p, "greedy") for p in prompts],
        ("ppo", "greedy"): [scored(p, "greedy ppo") for p in prompts],
    }
    rows = side_by_side(runs, copies=2, count=3)
    assert [row["prompt"] for row in rows] == [prompts[0], prompts[2], prompts[4]]
    assert rows[0]["sft"] == "sample 0" and rows[0]["ppo_judge"] == 1.0 and rows[0]["sft_greedy"] == "greedy"
    runs[("ppo", "sampled")] = runs[("ppo", "sampled")][:-1]
    with pytest.raises(ValueError, match="as many PPO answers"):
        side_by_side(runs, copies=2, count=3)


def test_sampling_settings_reject_bad_values():
    with pytest.raises(ValueError, match="samples_per_prompt"):
        SamplingSettings(samples_per_prompt=0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingSettings(top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingSettings(temperature=0.0)


# ---------------------------------------------------------------- orchestration helpers


def test_rerooted_value_moves_paths_and_dataset_spec_paths_only():
    assert rerooted_value("output/tiny/sft", "/r") == "/r/tiny/sft"
    assert rerooted_value("alpaca:1:output/tiny/data/sft.jsonl", "/r/") == "alpaca:1:/r/tiny/data/sft.jsonl"
    assert rerooted_value("a:1:output/x.jsonl,b:0.5:output/y.jsonl", "/r") == "a:1:/r/x.jsonl,b:0.5:/r/y.jsonl"
    assert rerooted_value("my_output/tiny", "/r") == "my_output/tiny"
    assert rerooted_value("PKU-SafeRLHF/train", "/r") == "PKU-SafeRLHF/train"


def test_output_root_with_a_spec_separator_is_refused():
    with pytest.raises(ValueError, match="contains ':' or ','"):
        Layout("runs/a:b")


def test_config_overrides_only_when_root_or_seed_differ():
    config = {"output_dir": "output/tiny/sft", "learning_rate": 0.1, "seed": 0}
    assert config_overrides(config, Layout(os.path.join(REPO_ROOT, "output")), seed=0) == {}
    assert config_overrides(config, Layout("/elsewhere"), seed=5) == {"output_dir": "/elsewhere/tiny/sft", "seed": "5"}


def test_stages_run_the_entry_points_with_the_tiny_configs(tmp_path):
    stages = build_stages(Layout(str(tmp_path)), seed=0, fast=True)
    assert [stage.name for stage in stages] == list(STAGES)
    sft = stages[1].command
    assert sft[2:4] == ["sft/run_sft.py", os.path.join("config", "tiny", "sft_argument.json")]
    # A key given by both the re-rooting and --fast appears once, with the --fast value.
    assert sft.count("--eval_datasets") == 1
    assert sft[sft.index("--eval_datasets") + 1] == f"alpaca:0.02:{tmp_path}/tiny/data/sft.jsonl"
    assert stages[3].clears == os.path.join(str(tmp_path), "tiny", "ppo")
    evaluate = stages[4].command
    assert evaluate[evaluate.index("--samples-per-prompt") + 1] == "2"
    # --fast keeps its short PPO stage whatever the algorithm's own step count; a full run uses it.
    for fast, steps in ((True, "4"), (False, "144")):
        ppo = build_stages(Layout(str(tmp_path)), seed=0, fast=fast, algorithm="grpo", reward="judge")[3].command
        assert ppo.count("--max_steps") == 1 and ppo[ppo.index("--max_steps") + 1] == steps


def test_eta_scales_with_the_speed_of_finished_stages():
    expected = {"a": 10, "b": 20, "c": 30}
    stages = [Stage("a", "", []), Stage("b", "", []), Stage("c", "", [])]
    assert eta_seconds(stages, 0, expected) == 60
    stages[0].seconds = 20.0  # twice as slow as expected
    assert eta_seconds(stages, 1, expected) == 100


def test_console_filter_shows_bars_and_tagged_lines_only():
    console = ConsoleFilter()
    shown = console.feed(b"\x1b[35m[2026-01-01 00:00:00,000] [   DEBUG]\x1b[0m - adam_beta1 : 0.9\n[prepare_tiny] keep me\n")
    assert shown == b"[prepare_tiny] keep me\n"
    assert console.feed(b"\rPPO:  50%|#####") == b"\rPPO:  50%|#####"  # no newline yet, shown at once
    assert console.feed(b"[2026] [    INFO] - half a li") == b""
    assert console.feed(b"ne\n") == b""
    noise = (
        b"/usr/lib/python3.11/site-packages/paddle/utils/cpp_extension/extension_utils.py:712: UserWarning: No ccache found.\n"
        b"  warnings.warn(warning_message)\n"
        b"/x/site-packages/_distutils_hack/__init__.py:33: UserWarning: Setuptools is replacing distutils.\n"
        b"\x1b[32m[2026-12-01 12:43:10,879] [    INFO]\x1b[0m - Loading configuration file output/tiny/base/config.json\n"
        b"If your task is similar to the task the model of the checkpoint was trained on, ...\n"
        b"Generating train split: 0 examples [00:00, ? examples/s]\rGenerating train split: 2000 examples [00:00]\n"
    )
    assert console.feed(noise) == b""
    assert console.flush() == b"\n"  # the PPO bar's line is ended before the quickstart prints


def test_console_filter_keeps_a_bar_live_when_a_log_record_lands_on_its_line():
    console = ConsoleFilter()
    line = b"\rTrainProcess:   6%|6  | 20/315 [00:03<00:55][2026-12-01 12:43:15,526] [    INFO] - loss: 4.51\n"
    assert console.feed(line) == b"\rTrainProcess:   6%|6  | 20/315 [00:03<00:55]"  # no newline: the bar goes on
    assert console.feed(b"\rTrainProcess: 100%|##| 315/315 [01:01<00:00]\n") == b"\rTrainProcess: 100%|##| 315/315 [01:01<00:00]\n"
    nested = b"\rPredictProcess:  50%|#####     | 2/4 [00:00<00:00]\x1b[A\n"
    assert console.feed(nested) == b""
    error = b"\x1b[31m[2026-12-01 12:43:15,526] [   ERROR]\x1b[0m - it broke\nTraceback (most recent call last):\nValueError: bad\n"
    assert console.feed(error) == b"[2026-12-01 12:43:15,526] [   ERROR] - it broke\nTraceback (most recent call last):\nValueError: bad\n"


@pytest.mark.parametrize("value, expected", [("", False), ("0", False), ("no", False), ("1", True), ("true", True)])
def test_env_flag(monkeypatch, value, expected):
    monkeypatch.setenv("QUICKSTART_FAST", value)
    assert env_flag("QUICKSTART_FAST") is expected


def test_env_flag_rejects_other_values(monkeypatch):
    monkeypatch.setenv("QUICKSTART_FAST", "maybe")
    with pytest.raises(SystemExit, match="not a boolean"):
        env_flag("QUICKSTART_FAST")


@pytest.mark.parametrize("text, seeds", [("0,1,2,3,4", [0, 1, 2, 3, 4]), ("0-4", [0, 1, 2, 3, 4]), ("3, 7-8", [3, 7, 8])])
def test_parse_seeds(text, seeds):
    assert parse_seeds(text) == seeds


@pytest.mark.parametrize("text", ["", "a", "1,,2", "2-", "1,1"])
def test_parse_seeds_rejects_bad_lists(text):
    with pytest.raises(ValueError, match="--seeds"):
        parse_seeds(text)


def test_seed_aggregate_reports_mean_minimum_and_every_target_per_seed():
    def summary(seed, gain):
        numbers = {key: 0.5 for key in SEED_METRICS}
        numbers.update(seed=seed, judge_gain=gain, targets={"gain >= 0.25": gain >= 0.25})
        return numbers

    aggregated = aggregate_seeds([summary(0, 0.4), summary(1, 0.2), summary(2, 0.3)])
    gain = aggregated["metrics"]["judge_gain"]
    assert math.isclose(gain["mean"], 0.3) and gain["min"] == 0.2 and gain["max"] == 0.4 and gain["values"] == [0.4, 0.2, 0.3]
    assert aggregated["targets"]["gain >= 0.25"] == {"0": True, "1": False, "2": True}
    assert aggregated["all_targets_met"] is False
    assert "NOT met for seeds 1" in seeds_table(aggregated)
