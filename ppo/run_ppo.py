"""Stage 3, RLHF with PPO.

    python -u -m paddle.distributed.launch ppo/run_ppo.py config/llama/ppo_argument.json
    cd ppo && python -u -m paddle.distributed.launch run_ppo.py ../config/llama/ppo_argument.json
"""

from __future__ import annotations

import copy
import json
import os
import sys
from dataclasses import dataclass
from typing import Optional

# Run as a script from the repo root or from ppo/: import through the package, never through
# top-level `data`/`models` modules next to this file.
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path[0] = _REPO_ROOT
elif _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

from ppo.runtime import prepare_process  # noqa: E402

prepare_process()  # before Paddle loads: CPU floor check, MKL's AVX2 kernels on AMD

import paddle  # noqa: E402
from paddlenlp.transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402
from paddlenlp.utils.log import logger  # noqa: E402

from ppo.arguments import PPODataArguments, PPOModelArguments, PPOTrainingArguments  # noqa: E402
from ppo.cli import parse_config  # noqa: E402
from ppo.data import PromptOnlyDataset, SupervisedDataset  # noqa: E402
from ppo.model_import import resolve_model_fields  # noqa: E402
from ppo.model_io import load_tokenizer, tokenizers_match  # noqa: E402
from ppo.models import AutoModelForScore  # noqa: E402
from ppo.models.kernels import make_config_cpu_safe  # noqa: E402
from ppo.models.model_pp import PolicyLossConfig, ValueLossConfig, pipe_model_class  # noqa: E402
from ppo.models.parallel_utils import (  # noqa: E402
    causal_lm_class_for,
    check_pipeline_ppo_arguments,
    eval_model_config,
)
from ppo.ppo_lag_trainer import PPOLagTrainer  # noqa: E402
from ppo.ppo_trainer import PPOTrainer  # noqa: E402
from ppo.process_exit import finish_process  # noqa: E402
from ppo.preflight import check_training_output_dir  # noqa: E402
from ppo.stage import model_dtype  # noqa: E402


def model_config(path: str, args: PPOTrainingArguments, recompute: bool = False):
    """The checkpoint's config with this run's dtype, recompute and tensor-parallel placement."""
    config = AutoConfig.from_pretrained(path)
    config.dtype = model_dtype(args)
    config.recompute = recompute
    config.tensor_parallel_degree = args.tensor_parallel_degree
    config.tensor_parallel_rank = args.tensor_parallel_rank
    # Log-probabilities need the full vocabulary on every rank, not this rank's slice of the logits.
    config.tensor_parallel_output = False
    make_config_cpu_safe(config)
    return config


def require_score_model(path: str, role: str) -> None:
    config = AutoConfig.from_pretrained(path)
    architectures = getattr(config, "architectures", None) or []
    if not any(name.endswith("ForScore") for name in architectures):
        raise ValueError(
            f"{role} {path!r} is not a score model (its config lists architectures {architectures}); "
            "train one with rm/run_reward.py, or pass a score model directory"
        )


def rollout_copy_mode(args: PPOTrainingArguments) -> Optional[str]:
    """How the rollout copies of the actor/critic are built, or None when the trained models
    generate and score themselves:

    - "pipeline": each rank holds one pipeline stage; non-pipeline copies laid out by `eval_mode`
      ("single": full model on every rank, "tensor_parallel": this rank's TP shard) generate and
      score, synced from the stages;
    - "gathered": sharding stage3 shards the actor's parameters; a plain full copy, gathered once
      per rollout, generates (the critic's values go through its stage3 hooks like any forward).
    """
    if args.pipeline_parallel_degree > 1:
        return "pipeline"
    if any(str(getattr(option, "value", option)) == "stage3" for option in (args.sharding or ())):
        return "gathered"
    if args.eval_mode is not None:
        logger.warning(f"eval_mode={args.eval_mode!r} only applies under pipeline parallel; ignored")
    return None


def trained_model_classes(model_type: str, args: PPOTrainingArguments):
    """(policy class, value class) of the actor and critic: PaddleNLP Pipe variants with the PPO
    losses in the last stage under pipeline parallel, the plain models otherwise."""
    if args.pipeline_parallel_degree > 1:
        return pipe_model_class(model_type, "policy"), pipe_model_class(model_type, "value")
    return causal_lm_class_for(model_type), AutoModelForScore.model_class_for(model_type)


@dataclass
class PPOModels:
    """The models of a run; None for those the algorithm does not use (no critic for critic-free
    algorithms, no reference without a KL term, see `PPOTrainingArguments.uses_*`)."""

    actor: object
    reference: Optional[object]
    reward: Optional[object]
    critic: Optional[object]
    actor_rollout: Optional[object] = None
    critic_rollout: Optional[object] = None
    cost: Optional[object] = None  # ppo_lag: frozen cost model
    cost_critic: Optional[object] = None  # ppo_lag: trained cost critic


def build_models(model_args: PPOModelArguments, args: PPOTrainingArguments) -> PPOModels:
    """The models the algorithm uses (+ rollout copies, see `rollout_copy_mode`): the actor; the
    critic only for algorithms that need one; the frozen reference only with a KL term; the frozen
    reward model only when it is given. Reference and reward models are always plain models
    (tensor parallel when training is)."""
    check_pipeline_ppo_arguments(args)
    actor_path, critic_path = model_args.actor_model_name_or_path, model_args.reward_critic_model_name_or_path
    actor_config = model_config(actor_path, args, recompute=args.recompute)
    policy_class, _ = trained_model_classes(actor_config.model_type, args)
    if args.pipeline_parallel_degree > 1:
        actor = policy_class.from_pretrained(actor_path, config=actor_config, loss_config=PolicyLossConfig.from_args(args))
    else:
        actor = policy_class.from_pretrained(actor_path, config=actor_config)
    critic = None
    if args.uses_critic:
        critic_config = model_config(critic_path, args, recompute=args.critic_recompute)
        _, value_class = trained_model_classes(critic_config.model_type, args)
        score_kwargs = dict(score_type="critic", do_normalize=False)
        if args.pipeline_parallel_degree > 1:
            critic = value_class.from_pretrained(
                critic_path, config=critic_config, loss_config=ValueLossConfig.from_args(args), **score_kwargs
            )
        else:
            critic = value_class.from_pretrained(critic_path, config=critic_config, **score_kwargs)
    reference = (
        AutoModelForCausalLM.from_pretrained(actor_path, config=model_config(actor_path, args)) if args.uses_reference else None
    )
    reward_path = model_args.reward_model_name_or_path
    reward = None
    if reward_path is not None and args.reward_model_weight != 0:  # weight 0: the reward functions alone score
        reward = AutoModelForScore.from_pretrained(
            reward_path, config=model_config(reward_path, args), score_type="reward", do_normalize=args.normalize_reward
        )
    models = PPOModels(actor, reference, reward, critic)
    if args.uses_cost_model:
        cost_path, cost_critic_path = model_args.cost_model_name_or_path, model_args.cost_critic_model_name_or_path
        models.cost = AutoModelForScore.from_pretrained(
            cost_path, config=model_config(cost_path, args), score_type="cost", do_normalize=False
        )
        models.cost_critic = AutoModelForScore.from_pretrained(
            cost_critic_path, config=model_config(cost_critic_path, args, recompute=args.critic_recompute),
            score_type="critic", do_normalize=False,
        )  # fmt: skip

    mode = rollout_copy_mode(args)
    if mode == "pipeline":
        # Built with random weights; the trainer syncs them from the stages before the first rollout.
        models.actor_rollout = _empty_model(causal_lm_class_for(actor.config.model_type), eval_model_config(actor.config, args.eval_mode))
        if critic is not None:
            models.critic_rollout = _empty_model(
                AutoModelForScore.model_class_for(critic.config.model_type), eval_model_config(critic.config, args.eval_mode)
            )
    elif mode == "gathered":
        models.actor_rollout = _empty_model(type(actor), copy.deepcopy(actor.config))
    return models


def _empty_model(model_class, config):
    return model_class.from_config(config, dtype=config.dtype)


def check_cost_models(model_args: PPOModelArguments, args: PPOTrainingArguments, tokenizer):
    """ppo_lag: the cost model must be a score model (its own tokenizer is allowed, it is
    re-tokenised for); the cost critic must share the actor's tokenizer. Returns the cost
    model's tokenizer (None without ppo_lag)."""
    if not args.uses_cost_model:
        return None
    if model_args.cost_model_name_or_path is None:
        raise ValueError("rl_algorithm ppo_lag needs cost_model_name_or_path (a cost model, e.g. from rm/run_cost.py)")
    require_score_model(model_args.cost_model_name_or_path, "cost_model_name_or_path")
    if not tokenizers_match(tokenizer, load_tokenizer(model_args.cost_critic_model_name_or_path)):
        raise ValueError(
            f"the cost critic ({model_args.cost_critic_model_name_or_path}) must share the actor's tokenizer because it "
            "scores every actor token; set cost_critic_model_name_or_path to a score model with the actor's vocabulary"
        )
    return load_tokenizer(model_args.cost_model_name_or_path)


def check_ppo_output_dir(model_args: PPOModelArguments, training_args: PPOTrainingArguments) -> None:
    """An unwritable or too full output_dir is refused before any model is converted or loaded."""
    trained = [model_args.actor_model_name_or_path]
    if training_args.uses_critic:
        trained.append(model_args.reward_critic_model_name_or_path or model_args.reward_model_name_or_path)
    if training_args.uses_cost_model:
        trained.append(model_args.cost_critic_model_name_or_path or model_args.cost_model_name_or_path)
    saves = str(getattr(training_args.save_strategy, "value", training_args.save_strategy)) != "no"
    check_training_output_dir(training_args.output_dir, [path for path in trained if path], model_dtype(training_args), saves)


def build_trainer(model_args: PPOModelArguments, data_args: PPODataArguments, training_args: PPOTrainingArguments):
    check_ppo_output_dir(model_args, training_args)
    paddle.seed(training_args.seed)
    # Hugging Face directories and GGUF files → cached Paddle directories (every rank may call this).
    model_fields = (
        "actor_model_name_or_path", "reward_model_name_or_path", "reward_critic_model_name_or_path",
        "cost_model_name_or_path", "cost_critic_model_name_or_path",
    )  # fmt: skip
    model_args = resolve_model_fields(model_args, *(name for name in model_fields if getattr(model_args, name) is not None))
    tokenizer = load_tokenizer(model_args.actor_model_name_or_path)
    if training_args.uses_critic and model_args.reward_critic_model_name_or_path is None:
        raise ValueError(
            f"rl_algorithm={training_args.rl_algorithm!r} trains a critic, initialised from "
            "reward_critic_model_name_or_path or the reward model; set one of them (or use a critic-free algorithm: "
            "grpo, rloo, reinforce_plus_plus)"
        )
    reward_tokenizer = None
    if model_args.reward_model_name_or_path is not None and training_args.reward_model_weight != 0:
        require_score_model(model_args.reward_model_name_or_path, "reward_model_name_or_path")
        reward_tokenizer = load_tokenizer(model_args.reward_model_name_or_path)
    critic_tokenizer = load_tokenizer(model_args.reward_critic_model_name_or_path) if training_args.uses_critic else tokenizer
    if not tokenizers_match(tokenizer, critic_tokenizer):
        raise ValueError(
            f"the critic ({model_args.reward_critic_model_name_or_path}) must share the actor's tokenizer because it "
            "scores every actor token; pass reward_critic_model_name_or_path pointing to a model with the actor's "
            "vocabulary (e.g. a score model initialised from the SFT model)"
        )
    cost_tokenizer = check_cost_models(model_args, training_args, tokenizer)
    models = build_models(model_args, training_args)

    # Every dataset renders conversations with the same template (the one SFT and RM trained on).
    template = dict(prompt_template=data_args.prompt_template, system_prompt=data_args.system_prompt)
    # Rollout prompts leave room for the response: max_new_tokens tokens, or at least one.
    prompts = dict(
        max_length=data_args.max_length, max_prompt_length=data_args.max_prompt_length,
        response_room=data_args.response_room, prompt_truncation=data_args.prompt_truncation,
        seed=training_args.seed, **template,
    )  # fmt: skip
    train_dataset = PromptOnlyDataset(data_args.train_datasets, tokenizer, **prompts)
    eval_dataset = PromptOnlyDataset(data_args.eval_datasets, tokenizer, **prompts) if data_args.eval_datasets else None
    ptx_dataset = (
        SupervisedDataset(
            data_args.ptx_datasets, tokenizer, max_length=data_args.max_length, seed=training_args.seed,
            max_prompt_length=data_args.max_prompt_length, prompt_truncation=data_args.prompt_truncation, **template,
        )  # fmt: skip
        if data_args.ptx_datasets
        else None
    )
    trainer_class, extra = PPOTrainer, {}
    if training_args.uses_cost_model:
        trainer_class = PPOLagTrainer
        extra = dict(cost_model=models.cost, cost_critic_model=models.cost_critic, cost_tokenizer=cost_tokenizer)
    return trainer_class(
        **extra,
        args=training_args,
        actor_model=models.actor,
        reference_model=models.reference,
        reward_model=models.reward,
        critic_model=models.critic,
        actor_rollout_model=models.actor_rollout,
        critic_rollout_model=models.critic_rollout,
        tokenizer=tokenizer,
        reward_tokenizer=reward_tokenizer,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        ptx_dataset=ptx_dataset,
        max_length=data_args.max_length,
        max_new_tokens=data_args.max_new_tokens,
    )


def main(argv=None) -> dict:
    model_args, data_args, training_args = parse_config(
        sys.argv[1:] if argv is None else argv, PPOModelArguments, PPODataArguments, PPOTrainingArguments
    )
    trainer = build_trainer(model_args, data_args, training_args)
    results = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    if trainer.eval_dataset is not None and training_args.do_eval:
        results.update(trainer.evaluate())
    if trainer.is_main_process:
        with open(os.path.join(training_args.output_dir, "all_results.json"), "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
    logger.info(f"PPO finished: {results}")
    return results


if __name__ == "__main__":
    main()
    finish_process()
