#!/usr/bin/env bash
# Build the offline tiny assets the tiny configs and the quickstart start from:
#   ROOT/data       demo-task data (alpaca SFT file, PKU-SafeRLHF preference and prompt files)
#   ROOT/tokenizer  sentencepiece BPE tokenizer (vocab 512) trained on ROOT/data/corpus.txt
#   ROOT/base       randomly initialised Llama (hidden 128, 2 layers, 4 heads) + that tokenizer;
#                   the sizes and why they were chosen are in ppo/demo/prepare_tiny.py
#
# Usage: bash scripts/prepare_tiny.sh [--output-root DIR] [--seed N] [--force]
# ROOT is --output-root, else $TINY_OUTPUT_ROOT, else output/tiny under the repo root.
# Re-running skips what exists; --force rebuilds everything (identically for the same seed).
set -euo pipefail

usage() { sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; }

output_root="${TINY_OUTPUT_ROOT:-}"
extra_args=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --output-root)
            [[ $# -ge 2 ]] || { echo "prepare_tiny.sh: --output-root needs a directory" >&2; exit 2; }
            output_root="$2"; shift 2 ;;
        --seed)
            [[ $# -ge 2 ]] || { echo "prepare_tiny.sh: --seed needs a number" >&2; exit 2; }
            extra_args+=(--seed "$2"); shift 2 ;;
        --force) extra_args+=(--force); shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "prepare_tiny.sh: unknown argument '$1' (valid: --output-root DIR, --seed N, --force)" >&2; exit 2 ;;
    esac
done

# A relative output root means relative to where the command was run, so resolve it before
# moving to the repo root (which `python -m ppo...` needs).
if [[ -n "$output_root" && "$output_root" != /* ]]; then
    output_root="$PWD/$output_root"
fi
cd "$(dirname "${BASH_SOURCE[0]}")/.."
output_root="${output_root:-output/tiny}"

export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec "${PYTHON:-python}" -m ppo.demo.prepare_tiny --output-root "$output_root" "${extra_args[@]}"
