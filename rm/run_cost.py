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
from paddlenlp.utils.log import logger  # noqa: E402

from ppo.cli import parse_config  # noqa: E402
from ppo.data import SafetyPreferenceDataset  # noqa: E402
from ppo.model_io import load_tokenizer  # noqa: E402
from ppo.model_import import resolve_model_path  # noqa: E402
from ppo.models import AutoModelForScore  # noqa: E402
from ppo.models.freezing import train_top_layers_only  # noqa: E402
from ppo.stage import build_stage_trainer, model_placement, run_stage  # noqa: E402
from rm.cost_trainer import CostArguments, CostTrainer  # noqa: E402


def build_trainer(args: CostArguments) -> CostTrainer:
    model_path = resolve_model_path(args.model_name_or_path, role="model_name_or_path")  # HF dir / GGUF → Paddle dir
    tokenizer = load_tokenizer(model_path, padding_side="right")
    model = AutoModelForScore.from_pretrained(
        model_path,
        **model_placement(args),
        score_type="cost",  # its normaliser scales without shifting, so the sign survives
        do_normalize=args.normalize_score_during_training,
        normalizer_type=args.normalizer_type,
        momentum=args.normalizer_momentum,
    )
    trainable = train_top_layers_only(model, args.train_top_layers)
    if trainable is not None:
        logger.info(f"cost model: {trainable.describe()} (train_top_layers={args.train_top_layers})")
    return build_stage_trainer(CostTrainer, args, model, tokenizer, SafetyPreferenceDataset)


def main(argv=None) -> dict:
    (args,) = parse_config(sys.argv[1:] if argv is None else argv, CostArguments)
    set_seed(args.seed)
    return run_stage(build_trainer(args), args, "cost model training")


if __name__ == "__main__":
    main()
