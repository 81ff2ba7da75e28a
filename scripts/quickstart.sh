#!/usr/bin/env bash
# One command, CPU only, no model hub: SFT -> reward model -> PPO on the built-in demo task, then
# the independent judge scores the model before and after PPO on held-out prompts.
#
# Usage: bash scripts/quickstart.sh [--seed N | --seeds 0,1,2,3,4] [--output-root DIR] [--fast]
#                                   [--algorithm ppo|grpo|rloo|reinforce_plus_plus] [--reward model|judge|both] [--safe]
#   --seed N           seed of the data, model initialisation, every stage and the evaluation (0)
#   --seeds LIST       the pipeline once per seed (DIR/seed-N), then each number's mean/min/max
#   --output-root DIR  where tiny/ (assets, sft, rm, ppo) and quickstart/ (results) go;
#                      default $QUICKSTART_OUTPUT_ROOT, else output/ in the repository
#   --fast             a few steps per stage: checks the wiring, proves nothing (QUICKSTART_FAST=1)
#   --algorithm NAME   rl_algorithm of the PPO stage (ppo)
#   --reward SOURCE    reward model (model), the demo judge as a reward function (judge), or both
#   --safe             Safe-RLHF demo: reward + cost model, plain PPO vs PPO-Lagrangian (DIR/quickstart-safe)
# Results: DIR/quickstart/summary.json, curves.png, evaluation.json, generations.jsonl, logs/.
# Every run starts fresh (assets rebuilt, stage outputs replaced). Details: ppo/demo/quickstart.py
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
for arg in "$@"; do
    if [[ "$arg" == "-h" || "$arg" == "--help" ]]; then
        sed -n '2,16p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
        exit 0
    fi
done

# Relative paths stay relative to where the command was run: the package is found through
# PYTHONPATH instead of changing directory.
export PYTHONPATH="$repo_root${PYTHONPATH:+:$PYTHONPATH}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec "${PYTHON:-python}" -u -m ppo.demo.quickstart "$@"
