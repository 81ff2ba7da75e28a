"""Stage 2: train a reward model on preference pairs.

    python -u -m paddle.distributed.launch rm/run_reward.py config/llama/rm_argument.json
    cd rm && python -u -m paddle.distributed.launch run_reward.py ../config/llama/rm_argument.json

Writes the reward model (a normal PaddleNLP model directory that `AutoModelForScore` loads, with
the tokenizer and the score normaliser statistics in its config) to `output_dir`, plus
`train_results.json`, `eval_results.json` (`eval_accuracy`, `eval_rewards_mean`, ...) and
`all_results.json`. Relative paths in a repository config are relative to the repository root
(see `ppo/cli.py`).
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
from ppo.data import PreferenceDataset  # noqa: E402
from ppo.model_io import load_tokenizer  # noqa: E402
from ppo.process_exit import finish_process  # noqa: E402
from ppo.model_import import resolve_model_path  # noqa: E402
from ppo.models import AutoModelForScore  # noqa: E402
from ppo.models.freezing import train_top_layers_only  # noqa: E402
from ppo.stage import build_stage_trainer, model_placement, run_stage  # noqa: E402
from rm.reward_trainer import RewardArguments, RewardTrainer  # noqa: E402


def build_score_trainer(args: RewardArguments, trainer_class, dataset_class, score_type: str):
    """A score model (reward or cost) from `model_name_or_path` and its stage Trainer."""
    model_path = resolve_model_path(args.model_name_or_path, role="model_name_or_path")  # HF dir / GGUF → Paddle dir
    tokenizer = load_tokenizer(model_path, padding_side="right")  # fast tokenizer when tokenizer.json exists
    model = AutoModelForScore.from_pretrained(
        model_path,
        **model_placement(args),  # under tensor parallel the score head is replicated
        score_type=score_type,
        do_normalize=args.normalize_score_during_training,
        normalizer_type=args.normalizer_type,
        momentum=args.normalizer_momentum,
    )
    trainable = train_top_layers_only(model, args.train_top_layers)
    if trainable is not None:
        logger.info(f"{score_type} model: {trainable.describe()} (train_top_layers={args.train_top_layers})")
    return build_stage_trainer(trainer_class, args, model, tokenizer, dataset_class)


def build_trainer(args: RewardArguments) -> RewardTrainer:
    return build_score_trainer(args, RewardTrainer, PreferenceDataset, "reward")


def main(argv=None) -> dict:
    (args,) = parse_config(sys.argv[1:] if argv is None else argv, RewardArguments)
    set_seed(args.seed)
    return run_stage(build_trainer(args), args, "reward model training")


if __name__ == "__main__":
    main()
    finish_process()
