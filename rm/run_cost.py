"""Stage 2 (Safe RLHF): train a cost model on safety preference pairs.

    python -u -m paddle.distributed.launch rm/run_cost.py config/llama/cost_argument.json
    python -u rm/run_cost.py config/tiny/cost_argument.json          # CPU, the demo's safe data

Writes the cost model (a PaddleNLP model directory that `AutoModelForScore` loads with
`score_type="cost"`, with the tokenizer and the normaliser statistics in its config) to
`output_dir`, plus `train_results.json`, `eval_results.json` (`eval_accuracy`,
`eval_accuracy_sign`, `eval_cost_mean`, `eval_cost_std`, ...) and `all_results.json`. Relative
paths in a repository config are relative to the repository root (see `ppo/cli.py`).
"""

import os
import sys

# Run as a script from the repo root or from rm/: imports always go through the packages.
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path[0] = _REPO_ROOT
elif _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

from ppo.runtime import prepare_process  # noqa: E402

prepare_process()  # before Paddle loads: CPU floor check, MKL's AVX2 kernels on AMD

from paddlenlp.trainer import set_seed  # noqa: E402

from ppo.cli import parse_config  # noqa: E402
from ppo.data import SafetyPreferenceDataset  # noqa: E402
from ppo.process_exit import finish_process  # noqa: E402
from ppo.stage import run_stage  # noqa: E402
from rm.cost_trainer import CostArguments, CostTrainer  # noqa: E402
from rm.run_reward import build_score_trainer  # noqa: E402


def build_trainer(args: CostArguments) -> CostTrainer:
    # score_type cost: its normaliser scales without shifting, so the sign survives.
    return build_score_trainer(args, CostTrainer, SafetyPreferenceDataset, "cost")


def main(argv=None) -> dict:
    (args,) = parse_config(sys.argv[1:] if argv is None else argv, CostArguments)
    set_seed(args.seed)
    return run_stage(build_trainer(args), args, "cost model training")


if __name__ == "__main__":
    main()
    finish_process()
