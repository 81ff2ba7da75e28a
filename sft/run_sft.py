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
from dataclasses import dataclass

# Run as a script from the repo root or from sft/: imports always go through the packages.
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path[0] = _REPO_ROOT
elif _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

from ppo.runtime import prepare_process  # noqa: E402

prepare_process()  # before Paddle loads: CPU floor check, MKL's AVX2 kernels on AMD

import paddle  # noqa: E402
from paddlenlp.trainer import Trainer, set_seed  # noqa: E402
from paddlenlp.transformers import AutoModelForCausalLM  # noqa: E402

from ppo.cli import parse_config  # noqa: E402
from ppo.data import SupervisedDataset  # noqa: E402
from ppo.grad_clip import SkipClipWithinNormMixin  # noqa: E402
from ppo.model_io import load_tokenizer  # noqa: E402
from ppo.process_exit import finish_process  # noqa: E402
from ppo.model_import import resolve_model_path  # noqa: E402
from ppo.models.ppo_model_utils import make_position_ids, supervised_lm_loss  # noqa: E402
from ppo.stage import StageArguments, build_stage_trainer, model_placement, run_stage  # noqa: E402


@dataclass
class SftArguments(StageArguments):
    """Arguments of `sft/run_sft.py`: PaddleNLP's TrainingArguments plus model_name_or_path,
    train_datasets, eval_datasets (supervised dataset specs) and max_length."""

    MODEL_ROLE = "the causal LM to fine-tune"
    DATA_KIND = "supervised datasets"


class SupervisedTrainer(SkipClipWithinNormMixin, Trainer):
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


def build_trainer(args: SftArguments) -> SupervisedTrainer:
    model_path = resolve_model_path(args.model_name_or_path, role="model_name_or_path")  # HF dir / GGUF → Paddle dir
    tokenizer = load_tokenizer(model_path, padding_side="right")  # fast tokenizer when tokenizer.json exists
    model = AutoModelForCausalLM.from_pretrained(
        model_path,
        **model_placement(args),
        tensor_parallel_output=False,  # the loss needs full-vocabulary logits on every rank
    )
    return build_stage_trainer(SupervisedTrainer, args, model, tokenizer, SupervisedDataset)


def add_perplexity(eval_metrics: dict) -> None:
    eval_metrics["eval_ppl"] = math.exp(min(eval_metrics["eval_loss"], 50.0))


def main(argv=None) -> dict:
    (args,) = parse_config(sys.argv[1:] if argv is None else argv, SftArguments)
    set_seed(args.seed)
    return run_stage(build_trainer(args), args, "SFT", add_eval_metrics=add_perplexity)


if __name__ == "__main__":
    main()
    finish_process()
