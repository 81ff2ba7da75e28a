"""Stage 1: supervised fine-tuning of a causal LM on (prompt, answer) data.

    python -u -m paddle.distributed.launch sft/run_sft.py config/tiny/sft_argument.json
    cd sft && python -u -m paddle.distributed.launch run_sft.py ../config/tiny/sft_argument.json

The loss is next-token cross-entropy on the answer tokens only (the prompt is masked with
IGNORE_INDEX by `SupervisedDataset`). The result in `output_dir` is a normal PaddleNLP model
directory with the tokenizer (`AutoModelForCausalLM.from_pretrained(output_dir)`), plus
`train_results.json`, `eval_results.json` (`eval_loss`, `eval_ppl`) and `all_results.json`.
Relative paths in a repository config are relative to the repository root (see `ppo/cli.py`).
"""

import math
import os
import sys
from dataclasses import dataclass, field
from typing import Optional

# Run as a script from the repo root or from sft/: imports always go through the packages.
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path[0] = _REPO_ROOT
elif _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

import paddle  # noqa: E402
from paddlenlp.trainer import Trainer, TrainingArguments, set_seed  # noqa: E402
from paddlenlp.transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from paddlenlp.utils.log import logger  # noqa: E402

from ppo.cli import parse_config  # noqa: E402
from ppo.data import SupervisedDataset  # noqa: E402
from ppo.models.ppo_model_utils import make_position_ids, supervised_lm_loss  # noqa: E402


@dataclass
class SftArguments(TrainingArguments):
    """Arguments of `sft/run_sft.py`: PaddleNLP's TrainingArguments plus the keys below."""

    model_name_or_path: Optional[str] = field(
        default=None, metadata={"help": "Pretrained causal LM (name or directory) to fine-tune. Required."}
    )
    train_datasets: Optional[str] = field(
        default=None,
        metadata={"help": "Supervised datasets: 'name[:proportion[:path]]' (comma separated) or a dict."},
    )
    eval_datasets: Optional[str] = field(
        default=None, metadata={"help": "Supervised datasets to evaluate on; no evaluation when absent."}
    )
    max_length: int = field(default=512, metadata={"help": "Maximum tokens of prompt + answer; longer is truncated."})

    def __post_init__(self):
        if not self.model_name_or_path:
            raise ValueError("model_name_or_path is required: the causal LM to fine-tune")
        if self.max_length < 2:
            raise ValueError(f"max_length must be at least 2, got {self.max_length}")
        if self.do_train and not self.train_datasets:
            raise ValueError("do_train is set but train_datasets is empty: name the supervised datasets to train on")
        evaluates = self.do_eval or str(self.evaluation_strategy) not in ("no", "IntervalStrategy.NO")
        if not self.eval_datasets and evaluates:
            logger.warning(
                f"no eval_datasets given: evaluation is off (do_eval={self.do_eval} and "
                f"evaluation_strategy={self.evaluation_strategy} are ignored)"
            )
            self.do_eval, self.evaluation_strategy = False, "no"
        super().__post_init__()


class SupervisedTrainer(Trainer):
    """PaddleNLP causal LMs do not shift labels themselves; `supervised_lm_loss` does (logits at t
    predict the label at t + 1), and averages over supervised tokens only."""

    def compute_loss(self, model, inputs, return_outputs=False):
        attention_mask = inputs["attention_mask"]  # [B, L]
        outputs = model(
            input_ids=inputs["input_ids"],
            attention_mask=attention_mask,
            position_ids=make_position_ids(attention_mask),
            return_dict=True,
        )
        loss = supervised_lm_loss(outputs.logits, inputs["labels"])
        if not bool(paddle.isfinite(loss)):
            raise FloatingPointError(
                f"SFT loss is {float(loss)} at step {self.state.global_step}; lower learning_rate or use fp32/bf16"
            )
        return (loss, outputs) if return_outputs else loss


def model_dtype(args: SftArguments) -> str:
    return "bfloat16" if args.bf16 else "float16" if args.fp16 else "float32"


def build_trainer(args: SftArguments) -> SupervisedTrainer:
    tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
    model = AutoModelForCausalLM.from_pretrained(
        args.model_name_or_path,
        dtype=model_dtype(args),
        # Under tensor parallel each rank builds its slice; the loss needs full-vocabulary logits.
        tensor_parallel_degree=args.tensor_parallel_degree,
        tensor_parallel_rank=args.tensor_parallel_rank,
        tensor_parallel_output=False,
    )
    train_dataset = (
        SupervisedDataset(args.train_datasets, tokenizer, max_length=args.max_length, seed=args.seed)
        if args.do_train
        else None
    )
    eval_dataset = (
        SupervisedDataset(args.eval_datasets, tokenizer, max_length=args.max_length, seed=args.seed)
        if args.eval_datasets
        else None
    )
    collator_source = train_dataset if train_dataset is not None else eval_dataset
    return SupervisedTrainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        tokenizer=tokenizer,
        data_collator=collator_source.get_collator() if collator_source is not None else None,
    )


def main(argv=None) -> dict:
    (args,) = parse_config(sys.argv[1:] if argv is None else argv, SftArguments)
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
        eval_metrics["eval_ppl"] = math.exp(min(eval_metrics["eval_loss"], 50.0))
        trainer.log_metrics("eval", eval_metrics)
        trainer.save_metrics("eval", eval_metrics)
        results.update(eval_metrics)
    logger.info(f"SFT finished: {results}")
    return results


if __name__ == "__main__":
    main()
