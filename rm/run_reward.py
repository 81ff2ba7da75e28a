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

from paddlenlp.trainer import set_seed  # noqa: E402
from paddlenlp.transformers import AutoTokenizer  # noqa: E402
from paddlenlp.utils.log import logger  # noqa: E402

from ppo.cli import parse_config  # noqa: E402
from ppo.data import PreferenceDataset  # noqa: E402
from ppo.models import AutoModelForScore  # noqa: E402
from rm.reward_trainer import RewardArguments, RewardTrainer  # noqa: E402


def model_dtype(args: RewardArguments) -> str:
    return "bfloat16" if args.bf16 else "float16" if args.fp16 else "float32"


def build_trainer(args: RewardArguments) -> RewardTrainer:
    tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
    model = AutoModelForScore.from_pretrained(
        args.model_name_or_path,
        dtype=model_dtype(args),
        # Under tensor parallel each rank builds its slice (the score head is replicated).
        tensor_parallel_degree=args.tensor_parallel_degree,
        tensor_parallel_rank=args.tensor_parallel_rank,
        score_type="reward",
        do_normalize=args.normalize_score_during_training,
        normalizer_type=args.normalizer_type,
        momentum=args.normalizer_momentum,
    )
    train_dataset = (
        PreferenceDataset(args.train_datasets, tokenizer, max_length=args.max_length, seed=args.seed)
        if args.do_train
        else None
    )
    eval_dataset = (
        PreferenceDataset(args.eval_datasets, tokenizer, max_length=args.max_length, seed=args.seed)
        if args.eval_datasets
        else None
    )
    collator_source = train_dataset if train_dataset is not None else eval_dataset
    return RewardTrainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        tokenizer=tokenizer,
        data_collator=collator_source.get_collator() if collator_source is not None else None,
    )


def main(argv=None) -> dict:
    (args,) = parse_config(sys.argv[1:] if argv is None else argv, RewardArguments)
    set_seed(args.seed)
    if not args.do_train and not args.eval_datasets:
        raise ValueError("nothing to do: set do_train (with train_datasets) and/or give eval_datasets")
    trainer = build_trainer(args)
    results = {}
    if args.do_train:
        train_result = trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
        trainer.save_model()
        trainer.log_metrics("train", train_result.metrics)
        trainer.save_metrics("train", train_result.metrics)
        trainer.save_state()
        results.update(train_result.metrics)
    if trainer.eval_dataset is not None:
        eval_metrics = trainer.evaluate()
        trainer.log_metrics("eval", eval_metrics)
        trainer.save_metrics("eval", eval_metrics)
        results.update(eval_metrics)
    logger.info(f"reward model training finished: {results}")
    return results


if __name__ == "__main__":
    main()
