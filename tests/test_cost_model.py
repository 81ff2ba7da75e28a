"""Cost-model training: `rm/run_cost.py` end to end on a learnable safety file, the trainer hooks
in-process, the metrics by hand, and the shipped cost configs."""

import glob
import json
import os
import random
import subprocess
import sys

import numpy as np
import paddle
import pytest
from paddlenlp.trainer import EvalPrediction

from ppo.cli import check_unknown_keys, load_json_config
from ppo.data import SafetyPreferenceDataset
from ppo.models import AutoModelForScore
from ppo.models.reward_losses import sequence_wise_cost_loss, token_wise_cost_loss
from ppo.tiny import _DEFAULT_WORDS
from rm.cost_trainer import CostArguments, CostTrainer, compute_cost_metrics

UNSAFE_MARKER = "stop"  # an answer is unsafe exactly when it contains this word
NUM_TRAIN_PAIRS = 256


def safety_rows(num_pairs, seed):
    """PKU-SafeRLHF-schema rows whose safety is learnable from the marker word alone: a third of
    the pairs are both safe (the safer one is then the shorter), the rest safe vs unsafe."""
    rng = random.Random(seed)
    words = [word for word in _DEFAULT_WORDS if word != UNSAFE_MARKER]
    rows = []
    for index in range(num_pairs):
        prompt = " ".join(rng.choice(words) for _ in range(rng.randint(3, 6))) + "?"
        first = [rng.choice(words) for _ in range(rng.randint(3, 6))]
        second = [rng.choice(words) for _ in range(len(first) + 1)]
        both_safe = index % 3 == 0
        if not both_safe:
            second.insert(rng.randint(0, len(second)), UNSAFE_MARKER)
        swap = rng.random() < 0.5  # the safer answer is response_1
        responses = [" ".join(second), " ".join(first)] if swap else [" ".join(first), " ".join(second)]
        safe = [True, both_safe][:: -1 if swap else 1]
        rows.append(
            {
                "prompt": prompt,
                "response_0": responses[0],
                "response_1": responses[1],
                "is_response_0_safe": safe[0],
                "is_response_1_safe": safe[1],
                "better_response_id": 1 if swap else 0,
                "safer_response_id": 1 if swap else 0,
            }
        )
    return rows


@pytest.fixture(scope="module")
def safety_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("safety")
    for split, num_pairs, seed in (("train", NUM_TRAIN_PAIRS, 0), ("test", 64, 1)):
        with open(path / f"{split}.jsonl", "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in safety_rows(num_pairs, seed))
    return path


def read_json(path):
    with open(path) as f:
        return json.load(f)


def test_run_cost_learns_safety_and_saves_a_cost_model(tmp_path, repo_root, tiny_llama_dir, safety_dir):
    # The shipped tiny config, pointed at this file and shortened to one epoch.
    values = load_json_config(str(repo_root / "config" / "tiny" / "cost_argument.json"))
    values.update(
        model_name_or_path=tiny_llama_dir,
        train_datasets=f"PKU-SafeRLHF/train:1:{safety_dir / 'train.jsonl'}",
        eval_datasets=f"PKU-SafeRLHF/test:1:{safety_dir / 'test.jsonl'}",
        output_dir=str(tmp_path / "cost"),
        max_length=64,
        per_device_train_batch_size=8,
        learning_rate=1e-3,
        num_train_epochs=1,
        seed=42,
    )
    config = tmp_path / "cost_argument.json"
    config.write_text(json.dumps(values))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "rm/run_cost.py", str(config)], cwd=repo_root, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]

    output_dir = values["output_dir"]
    metrics = read_json(os.path.join(output_dir, "eval_results.json"))
    print(f"tiny cost model (sequence-wise, 1 epoch): accuracy {metrics['eval_accuracy']:.3f}, "
          f"accuracy_sign {metrics['eval_accuracy_sign']:.3f}")  # fmt: skip
    assert metrics["eval_accuracy_sign"] >= 0.85  # chance is 0.5
    assert metrics["eval_unsafe_cost_mean"] > 0 > metrics["eval_safe_cost_mean"]
    assert {"eval_accuracy", "eval_cost_mean", "eval_cost_std", "eval_pairs"} <= set(metrics)

    # It loads as a score model of type "cost" (what PPO-Lagrangian's cost model must be) and
    # reproduces the evaluated costs.
    from paddlenlp.transformers import AutoTokenizer

    model = AutoModelForScore.from_pretrained(output_dir)
    assert model.config.score_type == "cost" and model.config.normalizer_type == "ExponentialMovingAverage"
    dataset = SafetyPreferenceDataset(values["eval_datasets"], AutoTokenizer.from_pretrained(output_dir), max_length=64)
    batch = dataset.get_collator()([dataset[i] for i in range(len(dataset))])
    model.eval()
    with paddle.no_grad():
        costs = [
            model(batch[f"{kind}_input_ids"], batch[f"{kind}_attention_mask"]).end_scores.numpy()[:, 0]
            for kind in ("safer", "unsafer")
        ]
    signs = [batch["safer_safety_sign"].numpy(), batch["unsafer_safety_sign"].numpy()]
    assert np.mean(costs[1] > costs[0]) == pytest.approx(metrics["eval_accuracy"])
    assert np.mean(np.concatenate([c * s < 0 for c, s in zip(costs, signs)])) == pytest.approx(metrics["eval_accuracy_sign"])


# ---------------------------------------------------------------------------- in-process hooks


@pytest.fixture()
def trainer_parts(tmp_path, tiny_llama_dir, tiny_tokenizer, safety_dir):
    def build(**overrides):
        values = dict(
            output_dir=str(tmp_path / "out"),
            model_name_or_path=tiny_llama_dir,
            train_datasets=f"PKU-SafeRLHF/train:#9:{safety_dir / 'train.jsonl'}",
            do_train=True,
            report_to=["none"],
        )
        values.update(overrides)
        args = CostArguments(**values)
        model = AutoModelForScore.from_pretrained(tiny_llama_dir, score_type="cost")
        dataset = SafetyPreferenceDataset(args.train_datasets, tiny_tokenizer, max_length=64)
        batch = dataset.get_collator()([dataset[i] for i in range(len(dataset))])
        trainer = CostTrainer(model=model, args=args, train_dataset=dataset, data_collator=dataset.get_collator())
        return trainer, model, batch

    return build


def raw_costs(model, batch):
    with paddle.no_grad():
        return [model(batch[f"{kind}_input_ids"], batch[f"{kind}_attention_mask"]) for kind in ("safer", "unsafer")]


@pytest.mark.parametrize("loss_type", ["sequence-wise", "token-wise"])
def test_compute_loss_is_the_cost_objective(trainer_parts, loss_type):
    trainer, model, batch = trainer_parts(loss_type=loss_type, regularization=0.01)
    assert sorted(set(batch["unsafer_safety_sign"].tolist())) == [-1, 1]  # both kinds of pair present
    model.eval()  # no dropout in the tiny model; eval keeps the two passes comparable
    safer, unsafer = raw_costs(model, batch)
    signs = (batch["safer_safety_sign"], batch["unsafer_safety_sign"])
    if loss_type == "sequence-wise":
        expected = sequence_wise_cost_loss(safer.end_scores[:, 0], unsafer.end_scores[:, 0], *signs, 0.01)
    else:
        ids_and_masks = (
            batch["safer_input_ids"], batch["unsafer_input_ids"], batch["safer_attention_mask"], batch["unsafer_attention_mask"]
        )  # fmt: skip
        expected = token_wise_cost_loss(safer.scores, unsafer.scores, *ids_and_masks, *signs, 0.01)
    assert float(trainer.compute_loss(model, batch)) == pytest.approx(float(expected), rel=1e-4)


def test_prediction_step_returns_costs_and_signs(trainer_parts):
    trainer, model, batch = trainer_parts()
    model.eval()
    loss, predictions, labels = trainer.prediction_step(model, batch, prediction_loss_only=False)
    safer, unsafer = raw_costs(model, batch)
    assert list(predictions.shape) == [9, 2] and list(labels.shape) == [9, 2]
    np.testing.assert_allclose(predictions.numpy()[:, 0], safer.end_scores.numpy()[:, 0], rtol=1e-5)
    np.testing.assert_allclose(predictions.numpy()[:, 1], unsafer.end_scores.numpy()[:, 0], rtol=1e-5)
    assert labels.numpy()[:, 0].tolist() == batch["safer_safety_sign"].tolist()
    assert labels.numpy()[:, 1].tolist() == batch["unsafer_safety_sign"].tolist()


def test_cost_metrics_hand_computed():
    costs = np.array([[-1.0, 2.0], [0.5, 0.2], [-0.5, -0.1]])  # (safer, less safe) per pair
    signs = np.array([[1, -1], [1, -1], [1, 1]])  # +1 safe / -1 unsafe
    metrics = compute_cost_metrics(EvalPrediction(predictions=costs, label_ids=signs))
    assert metrics["accuracy"] == pytest.approx(2 / 3)  # pair 1 is ordered the wrong way
    # Right signs: -1 (safe), 2 (unsafe), 0.2 (unsafe), -0.5 and -0.1 (safe); 0.5 is safe but positive.
    assert metrics["accuracy_sign"] == pytest.approx(5 / 6)
    assert metrics["cost_mean"] == pytest.approx(costs.mean()) and metrics["cost_std"] == pytest.approx(costs.std())
    assert metrics["safe_cost_mean"] == pytest.approx(np.mean([-1.0, 0.5, -0.5, -0.1]))
    assert metrics["unsafe_cost_mean"] == pytest.approx(np.mean([2.0, 0.2]))
    assert (metrics["pairs"], metrics["safe_answers"]) == (3, 4)
    # Pairs 0 and 1 are safe vs unsafe; of those only pair 0 is ordered.
    assert (metrics["accuracy_safe_vs_unsafe"], metrics["safe_vs_unsafe_pairs"]) == (0.5, 2)
    all_safe = compute_cost_metrics(EvalPrediction(predictions=costs[2:], label_ids=signs[2:]))
    assert not {"accuracy_safe_vs_unsafe", "unsafe_cost_mean"} & set(all_safe)
    with pytest.raises(ValueError, match=r"shape \[N, 2\]"):
        compute_cost_metrics(EvalPrediction(predictions=costs, label_ids=np.zeros(3)))


def test_unknown_cost_loss_type_is_explained(tiny_llama_dir, tmp_path):
    with pytest.raises(ValueError, match=r"unknown cost loss_type 'pairwise'; allowed: \['sequence-wise', 'token-wise'\]"):
        CostArguments(output_dir=str(tmp_path), model_name_or_path=tiny_llama_dir, loss_type="pairwise")


def test_shipped_cost_configs_parse(repo_root, tmp_path):
    paths = sorted(glob.glob(str(repo_root / "config" / "*" / "cost_argument.json")))
    assert {os.path.basename(os.path.dirname(path)) for path in paths} >= {"llama", "tiny"}
    for path in paths:
        config = load_json_config(path)
        check_unknown_keys(config, [CostArguments], path)
        assert "SafeRLHF" in config["train_datasets"] and config["loss_type"] in ("sequence-wise", "token-wise")
