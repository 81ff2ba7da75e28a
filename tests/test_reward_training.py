"""Reward-model training end to end: `rm/run_reward.py` on a learnable preference file, the
trainer hooks in-process, and the saved model reloaded."""

import json
import os
import random
import subprocess
import sys

import numpy as np
import paddle
import pytest
from paddlenlp.trainer import EvalPrediction

from ppo.data import PreferenceDataset
from ppo.models import AutoModelForScore, sequence_wise_loss
from ppo.tiny import _DEFAULT_WORDS
from rm.reward_trainer import RewardArguments, RewardTrainer, compute_reward_metrics

PAIR_KINDS = ("better", "worse")
MARKER = "thank"  # the preferred answer always contains it, the other never does
NUM_TRAIN_PAIRS = 256


def preference_rows(num_pairs, seed):
    """PKU-SafeRLHF-schema rows whose preference is learnable from the marker word alone."""
    rng = random.Random(seed)
    words = [word for word in _DEFAULT_WORDS if word != MARKER]
    rows = []
    for _ in range(num_pairs):
        prompt = " ".join(rng.choice(words) for _ in range(rng.randint(3, 6))) + "?"
        length = rng.randint(3, 7)
        worse = [rng.choice(words) for _ in range(length)]
        better = [rng.choice(words) for _ in range(length - 1)]
        better.insert(rng.randint(0, len(better)), MARKER)
        better_id = rng.randint(0, 1)
        responses = [" ".join(better), " ".join(worse)][:: 1 if better_id == 0 else -1]
        rows.append(
            {
                "prompt": prompt,
                "response_0": responses[0],
                "response_1": responses[1],
                "is_response_0_safe": True,
                "is_response_1_safe": True,
                "better_response_id": better_id,
                "safer_response_id": better_id,
            }
        )
    return rows


@pytest.fixture(scope="module")
def preference_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("preference")
    for split, num_pairs, seed in (("train", NUM_TRAIN_PAIRS, 0), ("test", 64, 1)):
        with open(path / f"{split}.jsonl", "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in preference_rows(num_pairs, seed))
    return path


def reward_config(tmp_path, model_dir, preference_dir, **overrides):
    values = {
        "model_name_or_path": model_dir,
        "train_datasets": f"PKU-SafeRLHF/train:1:{preference_dir / 'train.jsonl'}",
        "eval_datasets": f"PKU-SafeRLHF/test:1:{preference_dir / 'test.jsonl'}",
        "output_dir": str(tmp_path / "rm"),
        "max_length": 64,
        "per_device_train_batch_size": 8,
        "per_device_eval_batch_size": 32,
        "learning_rate": 1e-3,
        "warmup_ratio": 0.05,
        "num_train_epochs": 1,
        "logging_steps": 8,
        "save_strategy": "no",
        "do_train": True,
        "do_eval": True,
        "evaluation_strategy": "epoch",
        "report_to": "none",
        "seed": 42,
    }
    values.update(overrides)
    path = tmp_path / "rm_argument.json"
    path.write_text(json.dumps(values, indent=2))
    return str(path), values


def run(command, cwd, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    return result


def launch_failure_report(result, log_dir):
    """The launcher's stderr and the end of every worker log (where the worker tracebacks are)."""
    parts = [f"exit code {result.returncode}", result.stderr[-2000:]]
    for name in sorted(os.listdir(log_dir)) if os.path.isdir(log_dir) else []:
        if name.startswith("workerlog"):
            with open(os.path.join(log_dir, name), errors="replace") as f:
                parts.append(f"--- {name}\n{f.read()[-2000:]}")
    return "\n".join(parts)


def read_json(path):
    with open(path) as f:
        return json.load(f)


def end_scores_on(model, dataset):
    collator = dataset.get_collator()
    batch = collator([dataset[i] for i in range(len(dataset))])
    model.eval()
    with paddle.no_grad():
        better = model(batch["better_input_ids"], batch["better_attention_mask"]).end_scores
        worse = model(batch["worse_input_ids"], batch["worse_attention_mask"]).end_scores
    return better.numpy()[:, 0].astype(np.float64), worse.numpy()[:, 0].astype(np.float64)


def test_run_reward_learns_a_learnable_preference(tmp_path, repo_root, tiny_llama_dir, preference_dir):
    config, values = reward_config(tmp_path, tiny_llama_dir, preference_dir, normalizer_type="ExponentialMovingAverage")
    result = run([sys.executable, "rm/run_reward.py", config], cwd=repo_root)
    assert result.returncode == 0, result.stderr[-3000:]

    output_dir = values["output_dir"]
    eval_results = read_json(os.path.join(output_dir, "eval_results.json"))
    all_results = read_json(os.path.join(output_dir, "all_results.json"))
    print(f"tiny RM (sequence-wise, 1 epoch): eval_accuracy = {eval_results['eval_accuracy']:.3f}")
    assert eval_results["eval_accuracy"] >= 0.85  # chance is 0.5
    assert {"eval_rewards_mean", "eval_rewards_std", "eval_loss"} <= set(eval_results)
    assert {"train_loss", "eval_accuracy"} <= set(all_results)
    saved = read_json(os.path.join(output_dir, "config.json"))
    # Statistics are tracked for PPO's normalize_reward even though training used raw scores.
    assert saved["do_normalize"] is False and saved["normalizer_type"] == "ExponentialMovingAverage"
    assert saved["count"] == 2 * NUM_TRAIN_PAIRS and saved["var"][0] > 0

    # The saved directory reloads with the tokenizer and reproduces the evaluated scores.
    from paddlenlp.transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    model = AutoModelForScore.from_pretrained(output_dir)
    dataset = PreferenceDataset(values["eval_datasets"], tokenizer, max_length=values["max_length"])
    better, worse = end_scores_on(model, dataset)
    scores = np.concatenate([better, worse])
    assert np.mean(better > worse) == pytest.approx(eval_results["eval_accuracy"])
    assert scores.mean() == pytest.approx(eval_results["eval_rewards_mean"], abs=1e-4)
    assert scores.std() == pytest.approx(eval_results["eval_rewards_std"], rel=1e-4)


@pytest.mark.distributed
@pytest.mark.parametrize("processes", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_token_wise_with_normalizer_under_distributed_launch(
    tmp_path, repo_root, tiny_llama_dir, preference_dir, processes
):
    config, values = reward_config(
        tmp_path,
        tiny_llama_dir,
        preference_dir,
        loss_type="token-wise",
        normalize_score_during_training=True,
        normalizer_type="RunningMeanStd",
        evaluation_strategy="no",
        do_eval=False,
    )
    # Started from inside rm/, like the seed's instructions.
    command = [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", str(processes)]
    command += ["--log_dir", str(tmp_path / "launch_log"), "run_reward.py", config]
    result = run(command, cwd=os.path.join(repo_root, "rm"))
    assert result.returncode == 0, launch_failure_report(result, tmp_path / "launch_log")

    output_dir = values["output_dir"]
    eval_results = read_json(os.path.join(output_dir, "eval_results.json"))
    accuracy = eval_results["eval_accuracy"]
    print(f"tiny RM (token-wise, normalised, 1 epoch, {processes} process(es)): eval_accuracy = {accuracy:.3f}")
    assert eval_results["eval_accuracy"] >= 0.85
    saved = read_json(os.path.join(output_dir, "config.json"))
    assert saved["do_normalize"] is True and saved["normalizer_type"] == "RunningMeanStd"
    # Every better and worse end score once: with 2 processes each sees half and they all-gather.
    assert saved["count"] == 2 * NUM_TRAIN_PAIRS
    assert saved["var"][0] > 0


def test_unknown_config_key_fails_before_training(tmp_path, repo_root, tiny_llama_dir, preference_dir):
    config, _ = reward_config(tmp_path, tiny_llama_dir, preference_dir, loss_typ="token-wise")
    result = run([sys.executable, "run_reward.py", config], cwd=os.path.join(repo_root, "rm"))
    assert result.returncode != 0
    assert "unknown keys" in result.stderr and "'loss_typ' (did you mean 'loss_type'?)" in result.stderr
    assert not os.path.exists(tmp_path / "rm")


# ---------------------------------------------------------------------------- in-process hooks


@pytest.fixture()
def trainer_parts(tmp_path, tiny_llama_dir, tiny_tokenizer, preference_dir):
    def build(**overrides):
        values = dict(
            output_dir=str(tmp_path / "out"),
            model_name_or_path=tiny_llama_dir,
            train_datasets=f"PKU-SafeRLHF/train:#8:{preference_dir / 'train.jsonl'}",
            do_train=True,
            report_to=["none"],
        )
        values.update(overrides)
        args = RewardArguments(**values)
        model = AutoModelForScore.from_pretrained(
            tiny_llama_dir,
            do_normalize=args.normalize_score_during_training,
            normalizer_type=args.normalizer_type,
        )
        dataset = PreferenceDataset(args.train_datasets, tiny_tokenizer, max_length=64)
        batch = dataset.get_collator()([dataset[i] for i in range(len(dataset))])
        trainer = RewardTrainer(model=model, args=args, train_dataset=dataset, data_collator=dataset.get_collator())
        return trainer, model, batch

    return build


def test_training_step_updates_normalizer_from_raw_end_scores(trainer_parts):
    trainer, model, batch = trainer_parts(normalize_score_during_training=True, normalizer_type="RunningMeanStd")
    model.train()
    with paddle.no_grad():
        raw = model(
            paddle.concat([batch["better_input_ids"], batch["worse_input_ids"]]),
            paddle.concat([batch["better_attention_mask"], batch["worse_attention_mask"]]),
            normalize=False,
        ).end_scores.numpy()
    raw_loss = sequence_wise_loss(paddle.to_tensor(raw[:8, 0]), paddle.to_tensor(raw[8:, 0]), 0.001)
    loss = trainer.compute_loss(model, batch)
    # The loss sees scores normalised with the statistics that include this batch.
    assert float(loss) != pytest.approx(float(raw_loss), rel=1e-3)
    assert model.normalizer.count == 16 and model.config.count == 16
    np.testing.assert_allclose(model.normalizer.mean, raw.mean(axis=0), rtol=1e-5)
    np.testing.assert_allclose(model.config.var, raw.var(axis=0), rtol=1e-4)
    normalised = (raw - model.normalizer.mean) / np.sqrt(model.normalizer.var + 1e-8)
    expected = sequence_wise_loss(paddle.to_tensor(normalised[:8, 0]), paddle.to_tensor(normalised[8:, 0]), 0.001)
    assert float(loss) == pytest.approx(float(expected), rel=1e-4)
    # Evaluation does not move the statistics.
    model.eval()
    trainer.prediction_step(model, batch, prediction_loss_only=False)
    assert model.normalizer.count == 16


def test_statistics_are_tracked_without_normalising_the_loss(trainer_parts):
    trainer, model, batch = trainer_parts(normalizer_type="ExponentialMovingAverage")
    model.train()
    with paddle.no_grad():
        raw = [model(batch[f"{kind}_input_ids"], batch[f"{kind}_attention_mask"]).end_scores for kind in PAIR_KINDS]
    loss = trainer.compute_loss(model, batch)
    assert float(loss) == pytest.approx(float(sequence_wise_loss(raw[0][:, 0], raw[1][:, 0], 0.001)), rel=1e-4)
    assert model.normalizer.count == 16 and model.config.do_normalize is False


def test_prediction_step_and_metrics(trainer_parts):
    trainer, model, batch = trainer_parts()
    loss, predictions, labels = trainer.prediction_step(model, batch, prediction_loss_only=False)
    assert list(predictions.shape) == [8, 2] and labels.tolist() == [0] * 8
    better, worse = predictions.numpy()[:, 0], predictions.numpy()[:, 1]
    expected = -np.mean(np.log(1 / (1 + np.exp(-(better - worse))))) + 0.001 * (np.mean(better**2) + np.mean(worse**2))
    assert float(loss) == pytest.approx(expected, rel=1e-4)

    metrics = compute_reward_metrics(
        EvalPrediction(predictions=np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 1.0], [1.0, 1.0]]), label_ids=np.zeros(4))
    )
    assert metrics["accuracy"] == 0.5  # ties count as wrong
    assert metrics["pairs"] == 4
    assert metrics["rewards_mean"] == pytest.approx(1.125)
    assert metrics["rewards_std"] == pytest.approx(np.std([1, 0, 0, 2, 3, 1, 1, 1]))


def test_non_finite_loss_is_a_clear_error(trainer_parts):
    trainer, model, batch = trainer_parts()
    with paddle.no_grad():
        model.score_head.weight.set_value(paddle.full(model.score_head.weight.shape, float("nan")))
    with pytest.raises(FloatingPointError, match="reward loss is nan"):
        trainer.compute_loss(model, batch)
