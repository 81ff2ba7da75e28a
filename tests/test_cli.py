"""JSON/flag configuration parsing shared by the entry points."""

import json
import os
from dataclasses import dataclass, field
from typing import List, Optional

import pytest
from paddlenlp.trainer import TrainingArguments

from ppo.cli import REPO_ROOT, ConfigError, parse_config
from rm.reward_trainer import RewardArguments
from sft.run_sft import SftArguments


@dataclass
class ModelArgs:
    model_name_or_path: str = field(metadata={"help": "required"})
    score_dim: int = 1
    normalizer_type: Optional[str] = "RunningMeanStd"


@dataclass
class DataArgs:
    train_datasets: str = "alpaca"
    max_length: int = 512
    use_cache: bool = False
    tags: List[str] = field(default_factory=lambda: ["a"])


def write_config(tmp_path, values, name="config.json"):
    path = tmp_path / name
    path.write_text(json.dumps(values) if not isinstance(values, str) else values)
    return str(path)


def test_json_values_and_flag_overrides(tmp_path):
    config = write_config(
        tmp_path,
        {"model_name_or_path": "m", "score_dim": 2, "max_length": 64, "use_cache": True, "tags": ["x", "y"]},
    )
    model_args, data_args = parse_config([config, "--max_length", "32"], ModelArgs, DataArgs)
    assert (model_args.model_name_or_path, model_args.score_dim) == ("m", 2)
    assert (data_args.max_length, data_args.use_cache, data_args.tags) == (32, True, ["x", "y"])
    assert data_args.train_datasets == "alpaca"  # default kept


def test_null_and_object_values_reach_the_dataclass_unchanged(tmp_path):
    mix = {"alpaca": 0.75, "PKU-SafeRLHF/train": 0.5}
    config = write_config(
        tmp_path, {"model_name_or_path": "m", "normalizer_type": None, "train_datasets": mix, "tags": []}
    )
    model_args, data_args = parse_config([config], ModelArgs, DataArgs)
    assert model_args.normalizer_type is None
    assert data_args.train_datasets == mix and data_args.tags == []
    # A flag still overrides a null / object value from the file.
    model_args, data_args = parse_config(
        [config, "--normalizer_type", "ExponentialMovingAverage", "--train_datasets", "alpaca:0.1"], ModelArgs, DataArgs
    )
    assert model_args.normalizer_type == "ExponentialMovingAverage" and data_args.train_datasets == "alpaca:0.1"


def test_flags_only():
    (model_args,) = parse_config(["--model_name_or_path", "m", "--score_dim", "3"], ModelArgs)
    assert model_args.score_dim == 3


def test_malformed_json_names_file_and_position(tmp_path):
    config = write_config(tmp_path, '{\n  "model_name_or_path": "m",\n  "score_dim": 2,,\n}')
    with pytest.raises(ConfigError, match=r"config\.json is not valid JSON: .* line 3, column 18"):
        parse_config([config], ModelArgs)
    with pytest.raises(ConfigError, match="must hold a JSON object"):
        parse_config([write_config(tmp_path, [1, 2], "list.json")], ModelArgs)
    with pytest.raises(ConfigError, match="does not exist"):
        parse_config([str(tmp_path / "missing.json")], ModelArgs)


def test_unknown_keys_are_listed_with_suggestions(tmp_path):
    config = write_config(tmp_path, {"model_name_or_path": "m", "max_lenght": 3, "frobnicate": 1})
    with pytest.raises(ConfigError) as error:
        parse_config([config], ModelArgs, DataArgs)
    message = str(error.value)
    assert "'max_lenght' (did you mean 'max_length'?)" in message and "'frobnicate'" in message
    assert "ModelArgs, DataArgs" in message
    with pytest.raises(ConfigError, match="'scor_dim'"):
        parse_config(["--model_name_or_path", "m", "--scor_dim", "2"], ModelArgs)


def test_bad_values_and_missing_required_keys(tmp_path):
    with pytest.raises(ConfigError, match="score_dim.*invalid int value"):
        parse_config([write_config(tmp_path, {"model_name_or_path": "m", "score_dim": "two"})], ModelArgs)
    with pytest.raises(ConfigError, match="required.*model_name_or_path"):
        parse_config([write_config(tmp_path, {"score_dim": 2})], ModelArgs)
    with pytest.raises(ConfigError, match=r"required arguments \['model_name_or_path'\] are null"):
        parse_config([write_config(tmp_path, {"model_name_or_path": None})], ModelArgs)


def reward_config(tmp_path, **overrides):
    values = {
        "model_name_or_path": "some/model",
        "output_dir": str(tmp_path / "out"),
        "train_datasets": "PKU-SafeRLHF/train",
        "do_train": True,
        "report_to": "none",
    }
    values.update(overrides)
    return write_config(tmp_path, values, "rm.json")


def test_reward_arguments_defaults_and_validation(tmp_path):
    (args,) = parse_config([reward_config(tmp_path)], RewardArguments)
    assert (args.loss_type, args.regularization, args.normalizer_type) == ("sequence-wise", 0.001, None)
    assert args.normalize_score_during_training is False and args.normalizer_momentum == 0.9
    assert args.do_eval is False  # no eval_datasets: no evaluation

    with pytest.raises(ValueError, match=r"loss_type 'pairwise'; allowed: \['sequence-wise', 'token-wise'\]"):
        parse_config([reward_config(tmp_path, loss_type="pairwise")], RewardArguments)
    with pytest.raises(ValueError, match=r"normalizer_type 'MinMax'; allowed: .*RunningMeanStd.*None"):
        parse_config([reward_config(tmp_path, normalizer_type="MinMax")], RewardArguments)
    with pytest.raises(ValueError, match="normalize_score_during_training needs normalizer_type"):
        parse_config([reward_config(tmp_path, normalize_score_during_training=True)], RewardArguments)
    with pytest.raises(ValueError, match="normalizer_momentum"):
        config = reward_config(tmp_path, normalizer_type="RunningMeanStd", normalizer_momentum=1.5)
        parse_config([config], RewardArguments)
    with pytest.raises(ValueError, match="model_name_or_path is required"):
        parse_config([reward_config(tmp_path, model_name_or_path=None)], RewardArguments)
    (args,) = parse_config([reward_config(tmp_path, normalizer_type="None")], RewardArguments)
    assert args.normalizer_type is None


def test_repository_configs_parse_and_use_the_repository_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (args,) = parse_config([os.path.join(REPO_ROOT, "config", "llama", "rm_argument.json")], RewardArguments)
    assert os.getcwd() == os.path.realpath(REPO_ROOT)
    assert args.model_name_or_path == "PKU-Alignment/alpaca-7b-reproduced"
    assert args.train_datasets == "PKU-SafeRLHF-30K/train" and args.bf16
    assert (args.loss_type, args.regularization) == ("sequence-wise", 0.001)
    assert args.normalizer_type == "ExponentialMovingAverage"

    monkeypatch.chdir(os.path.join(REPO_ROOT, "rm"))
    (args,) = parse_config(["../config/tiny/rm_argument.json"], RewardArguments)
    assert os.getcwd() == os.path.realpath(REPO_ROOT) and args.model_name_or_path == "output/tiny/sft"
    (args,) = parse_config([os.path.join(REPO_ROOT, "config", "tiny", "sft_argument.json")], SftArguments)
    assert args.model_name_or_path == "output/tiny/base" and args.output_dir == "output/tiny/sft"


def test_configs_outside_the_repository_keep_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = write_config(tmp_path, {"output_dir": "relative/out", "report_to": "none"})
    (args,) = parse_config([config], TrainingArguments)
    assert os.getcwd() == str(tmp_path) and args.output_dir == "relative/out"
