"""Every shipped config names only fields its entry point knows, with valid choices."""

import glob
import os

import pytest

from ppo.arguments import EVAL_MODES, OFFLOAD_TOKENS, PPODataArguments, PPOModelArguments, PPOTrainingArguments
from ppo.cli import check_unknown_keys, load_json_config
from rm.cost_trainer import CostArguments
from rm.reward_trainer import RewardArguments
from sft.run_sft import SftArguments

ENTRY_POINT_ARGUMENTS = {
    "sft_argument.json": [SftArguments],
    "rm_argument.json": [RewardArguments],
    "ppo_argument.json": [PPOModelArguments, PPODataArguments, PPOTrainingArguments],
    "ppo_lag_argument.json": [PPOModelArguments, PPODataArguments, PPOTrainingArguments],
    "cost_argument.json": [CostArguments],
}


def shipped_configs(repo_root):
    return sorted(glob.glob(str(repo_root / "config" / "*" / "*.json")))


def test_every_config_is_checked(repo_root):
    names = {os.path.basename(path) for path in shipped_configs(repo_root)}
    assert names <= set(ENTRY_POINT_ARGUMENTS), f"configs without a known entry point: {names - set(ENTRY_POINT_ARGUMENTS)}"
    assert len(shipped_configs(repo_root)) >= 6


@pytest.mark.parametrize("kind", sorted(ENTRY_POINT_ARGUMENTS))
def test_configs_use_known_keys(repo_root, kind):
    for path in glob.glob(str(repo_root / "config" / "*" / kind)):
        config = load_json_config(path)
        check_unknown_keys(config, ENTRY_POINT_ARGUMENTS[kind], path)
        if kind == "ppo_argument.json":
            assert config.get("eval_mode") in EVAL_MODES + ("",)
            assert set(config.get("offload_level", "").split()) <= set(OFFLOAD_TOKENS)
