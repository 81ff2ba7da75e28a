"""Supervised fine-tuning end to end with `sft/run_sft.py`."""

import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest
from paddlenlp.transformers import AutoModelForCausalLM, AutoTokenizer

from ppo.models import AutoModelForScore
from ppo.tiny import _DEFAULT_WORDS


def alpaca_rows(num_rows, seed):
    """Alpaca-schema rows with a learnable answer: the words of the instruction, repeated."""
    rng = random.Random(seed)
    rows = []
    for _ in range(num_rows):
        words = " ".join(rng.choice(_DEFAULT_WORDS) for _ in range(rng.randint(2, 5)))
        rows.append({"instruction": f"repeat: {words}", "input": "", "output": words})
    return rows


def run(command, cwd):
    return subprocess.run(
        command, cwd=cwd, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300
    )


def read_json(path):
    with open(path) as f:
        return json.load(f)


def test_sft_lowers_eval_loss_and_saves_a_loadable_model(tmp_path, repo_root, tiny_llama_dir):
    for split, num_rows, seed in (("train", 128, 0), ("test", 32, 1)):
        with open(tmp_path / f"{split}.jsonl", "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in alpaca_rows(num_rows, seed))
    values = {
        "model_name_or_path": tiny_llama_dir,
        "train_datasets": f"alpaca:1:{tmp_path / 'train.jsonl'}",
        "eval_datasets": f"alpaca:1:{tmp_path / 'test.jsonl'}",
        "output_dir": str(tmp_path / "sft"),
        "max_length": 64,
        "per_device_train_batch_size": 8,
        "per_device_eval_batch_size": 32,
        "learning_rate": 2e-3,
        "num_train_epochs": 2,
        "logging_steps": 8,
        "save_strategy": "no",
        "do_train": True,
        "report_to": "none",
    }
    config = tmp_path / "sft_argument.json"
    config.write_text(json.dumps(values, indent=2))

    # The untrained model's eval loss, through the same entry point (evaluation only).
    baseline = run(
        [sys.executable, "run_sft.py", str(config), "--do_train", "false", "--output_dir", str(tmp_path / "base")],
        cwd=os.path.join(repo_root, "sft"),
    )
    assert baseline.returncode == 0, baseline.stderr[-3000:]
    before = read_json(tmp_path / "base" / "eval_results.json")["eval_loss"]

    trained = run([sys.executable, "sft/run_sft.py", str(config)], cwd=repo_root)
    assert trained.returncode == 0, trained.stderr[-3000:]
    output_dir = values["output_dir"]
    results = read_json(os.path.join(output_dir, "eval_results.json"))
    print(f"tiny SFT: eval_loss {before:.3f} -> {results['eval_loss']:.3f}")
    assert results["eval_loss"] < before - 0.5
    assert results["eval_ppl"] == pytest.approx(np.exp(results["eval_loss"]), rel=1e-6)
    assert "train_loss" in read_json(os.path.join(output_dir, "all_results.json"))

    # A normal PaddleNLP model directory: causal LM + tokenizer, and the start of a reward model.
    model = AutoModelForCausalLM.from_pretrained(output_dir)
    AutoTokenizer.from_pretrained(output_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    changed = any(
        not np.array_equal(value.numpy(), base.state_dict()[name].numpy()) for name, value in model.state_dict().items()
    )
    assert changed
    score_model = AutoModelForScore.from_pretrained(output_dir)
    np.testing.assert_array_equal(
        score_model.llama.embed_tokens.weight.numpy(), model.llama.embed_tokens.weight.numpy()
    )
