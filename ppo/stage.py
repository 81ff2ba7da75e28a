"""What the two supervised-style stages (SFT and reward model) share: their common arguments
(checked, output_dir included, before any model is loaded), the datasets, the Trainer with
atomic checkpoints and preemption handling (`ppo.stage_checkpoints`), and the train → save →
evaluate sequence that writes PaddleNLP's usual `train_results.json` / `eval_results.json` /
`all_results.json`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Optional

from paddlenlp.trainer import Trainer, TrainingArguments
from paddlenlp.utils.log import logger

from ppo.data.arguments import ConversationDataArguments
from ppo.data.truncation import check_max_prompt_length
from ppo.preflight import check_output_dir, check_training_output_dir
from ppo.stage_checkpoints import with_fault_tolerance


@dataclass
class StageArguments(TrainingArguments, ConversationDataArguments):
    """PaddleNLP's TrainingArguments plus the model and datasets of one stage (and the data keys
    every stage shares, `ConversationDataArguments`)."""

    # Words for error messages, set by each stage.
    MODEL_ROLE = "the model to train"
    DATA_KIND = "datasets"

    model_name_or_path: Optional[str] = field(
        default=None, metadata={"help": "Model (name or directory) the stage starts from. Required."}
    )
    train_datasets: Optional[str] = field(
        default=None,
        metadata={"help": "Datasets to train on: 'name[:proportion[:path]]' (comma separated) or a dict."},
    )
    eval_datasets: Optional[str] = field(
        default=None, metadata={"help": "Datasets to evaluate on; no evaluation when absent."}
    )
    max_length: int = field(default=512, metadata={"help": "Maximum tokens of prompt + answer; longer is truncated."})

    def __post_init__(self):
        self.check_conversation_data()
        if not self.model_name_or_path:
            raise ValueError(f"model_name_or_path is required: {self.MODEL_ROLE}")
        check_max_prompt_length(
            self.max_prompt_length, self.max_length - 1, f"at most max_length - 1 = {self.max_length - 1} leaves room for an answer"
        )
        if self.do_train and not self.train_datasets:
            raise ValueError(f"do_train is set but train_datasets is empty: name the {self.DATA_KIND} to train on")
        evaluates = self.do_eval or str(self.evaluation_strategy) not in ("no", "IntervalStrategy.NO")
        if not self.eval_datasets and evaluates:
            # Evaluation is optional: without eval data there is nothing to evaluate on.
            logger.warning(
                f"no eval_datasets given: evaluation is off (do_eval={self.do_eval} and "
                f"evaluation_strategy={self.evaluation_strategy} are ignored)"
            )
            self.do_eval, self.evaluation_strategy = False, "no"
        super().__post_init__()
        self.check_output_dir()

    def check_output_dir(self) -> None:
        """Refuse an output_dir that cannot be written or lacks the space for a checkpoint and the
        final model (estimated from model_name_or_path's weight files when it is a local directory)."""
        if not self.do_train:
            check_output_dir(self.output_dir, what="evaluation")
            return
        saves = str(getattr(self.save_strategy, "value", self.save_strategy)) != "no"
        check_training_output_dir(self.output_dir, [self.model_name_or_path], model_dtype(self), saves)


def model_dtype(args: TrainingArguments) -> str:
    return "bfloat16" if args.bf16 else "float16" if args.fp16 else "float32"


def model_placement(args: TrainingArguments) -> dict:
    """`from_pretrained` keywords for this run: dtype, under tensor parallel this rank's slice, and
    on CPU the config flags of fused kernels switched off (`ppo.models.kernels`)."""
    from ppo.models.kernels import cpu_safe_config_overrides

    return dict(
        dtype=model_dtype(args),
        tensor_parallel_degree=args.tensor_parallel_degree,
        tensor_parallel_rank=args.tensor_parallel_rank,
        **cpu_safe_config_overrides(),
    )


def build_stage_trainer(trainer_class, args: StageArguments, model, tokenizer, dataset_class) -> Trainer:
    """The stage's Trainer (`trainer_class` with atomic checkpoints and preemption handling) on
    `dataset_class` built from the train/eval dataset specs."""

    def dataset(specs):
        return dataset_class(
            specs, tokenizer, max_length=args.max_length, seed=args.seed,
            prompt_template=args.prompt_template, system_prompt=args.system_prompt,
            max_prompt_length=args.max_prompt_length, prompt_truncation=args.prompt_truncation,
        )  # fmt: skip

    train_dataset = dataset(args.train_datasets) if args.do_train else None
    eval_dataset = dataset(args.eval_datasets) if args.eval_datasets else None
    collator_source = train_dataset if train_dataset is not None else eval_dataset
    return with_fault_tolerance(trainer_class)(
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        tokenizer=tokenizer,
        data_collator=collator_source.get_collator() if collator_source is not None else None,
    )


def run_stage(trainer: Trainer, args: StageArguments, name: str, add_eval_metrics: Optional[Callable[[Dict], None]] = None) -> Dict:
    """Train (then save the model and trainer state), evaluate, and write the metrics files.

    Stopped by SIGTERM/SIGINT: the step's checkpoint is saved, the resume instructions logged, and
    the process exits with 128 + the signal number (no final model, no evaluation)."""
    if not args.do_train and not args.eval_datasets:
        raise ValueError("nothing to do: set do_train (with train_datasets) and/or give eval_datasets")
    results = {}
    if args.do_train:
        train_result = trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
        if trainer.preempted:
            checkpoint = trainer.checkpoint_current_step()
            logger.warning(f"{name} " + trainer.preemption_guard.resume_message(trainer.state.global_step, checkpoint))
            raise SystemExit(trainer.preemption_guard.exit_code)
        trainer.save_model()
        trainer.log_metrics("train", train_result.metrics)
        trainer.save_metrics("train", train_result.metrics)
        trainer.save_state()
        results.update(train_result.metrics)
    if trainer.eval_dataset is not None:
        eval_metrics = trainer.evaluate()
        if add_eval_metrics is not None:
            add_eval_metrics(eval_metrics)
        trainer.log_metrics("eval", eval_metrics)
        trainer.save_metrics("eval", eval_metrics)
        results.update(eval_metrics)
    logger.info(f"{name} finished: {results}")
    return results
