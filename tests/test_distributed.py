"""Distributed training on 2 CPU processes (`paddle.distributed.launch --nproc_per_node 2`, gloo).

Data parallel and sharding stage 1: one launch per mode runs the three real entry points in turn
(SFT `main`, reward `main`, PPO's `build_trainer` + `train`) with 2 processes x per-device batch
B; the single-process references run in this process with batch B and twice the
gradient_accumulation_steps, so that every optimizer step averages the same micro-batches (the
losses are per-micro-batch token means, so one batch of 2B would be a different objective). A
third launch resumes PPO from a 2-process checkpoint.

Rollout sampling cannot match draw for draw: each replica samples its responses from its own RNG
stream with its own batch shape, and one process draws for all prompts at once. The PPO runs
therefore sample with `top_p` = 1e-6 (only the most likely token survives the nucleus), which
keeps the whole sampling path — temperature, top-p filter, multinomial draw — while making the
responses a function of the weights alone; then the rollouts, the experience and every update
are comparable between 1 and 2 processes.

Sampler note: PaddleNLP shuffles with `paddle.io.BatchSampler` in one process but with
`DistributedBatchSampler` (seeded by the epoch) in several, so the single-process SFT/RM
references use a one-replica `DistributedBatchSampler`: same global order, same batches.

Pipeline parallel 2 (default suite) and tensor parallel 2 (slow): the PPO trainer is built and
run up to the update, whose pipeline schedule (p2p send/recv) and tensor-parallel layers need
collectives gloo does not have; rollouts, rollout-copy sync, saving/merging and checkpoint
reloading run for real. The rest of the file tests, in one process, the pieces of the parallel
wiring that need no second process.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

PROCESSES = 2
NUM_PROMPTS = 16  # PPO: 4 rollouts of 2 x 2 prompts (one epoch)
NUM_EVAL_PROMPTS = 6
NUM_SFT_ROWS = 32  # 4 optimizer steps of 2 x 4 rows
NUM_PAIRS = 32  # 4 optimizer steps of 2 x 4 pairs
NUM_EVAL_ROWS = 16
PPO_STEPS = 4
MODES = ("dp", "stage1")
WORDS = "red blue green cat dog bird tree water fish sun moon good bad happy small big".split()


# =============================================================================================
# Assets and configurations
# =============================================================================================


def _write_jsonl(path, rows) -> str:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    return str(path)


def _phrase(rng, low, high):
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))


def _pku_row(prompt, first, second, better):
    return {
        "prompt": prompt, "response_0": first, "response_1": second,
        "is_response_0_safe": True, "is_response_1_safe": True,
        "better_response_id": better, "safer_response_id": better,
    }


def write_assets(root: Path, base_model_dir: str) -> dict:
    """A reward model initialised from the tiny Llama, and small data files in the alpaca and
    PKU-SafeRLHF schemas (distinct prompts so that per-rank prompt sets can be told apart)."""
    import paddle
    from paddlenlp.transformers import AutoTokenizer

    from ppo.models import AutoModelForScore

    rng = random.Random(0)
    paddle.seed(7)
    reward_dir = str(root / "reward")
    AutoModelForScore.from_pretrained(base_model_dir, score_type="reward").save_pretrained(reward_dir)
    AutoTokenizer.from_pretrained(base_model_dir).save_pretrained(reward_dir)
    prompts = [f"question {i}: {_phrase(rng, 2, 6)}?" for i in range(NUM_PROMPTS + NUM_EVAL_PROMPTS)]
    sft_rows = []
    for i in range(NUM_SFT_ROWS + NUM_EVAL_ROWS):
        words = _phrase(rng, 2, 6)
        sft_rows.append({"instruction": f"repeat {i}: {words}", "input": "", "output": words})
    pairs = [_pku_row(_phrase(rng, 2, 6), _phrase(rng, 1, 6), _phrase(rng, 1, 6), rng.randint(0, 1))
             for _ in range(NUM_PAIRS + NUM_EVAL_ROWS)]
    return {
        "base": base_model_dir,
        "reward": reward_dir,
        "prompts": _write_jsonl(root / "prompts.jsonl", [_pku_row(p, "yes", "no", 0) for p in prompts[:NUM_PROMPTS]]),
        "eval_prompts": _write_jsonl(root / "eval_prompts.jsonl", [_pku_row(p, "yes", "no", 0) for p in prompts[NUM_PROMPTS:]]),
        "sft": _write_jsonl(root / "sft.jsonl", sft_rows[:NUM_SFT_ROWS]),
        "sft_eval": _write_jsonl(root / "sft_eval.jsonl", sft_rows[NUM_SFT_ROWS:]),
        "pairs": _write_jsonl(root / "pairs.jsonl", pairs[:NUM_PAIRS]),
        "pairs_eval": _write_jsonl(root / "pairs_eval.jsonl", pairs[NUM_PAIRS:]),
    }


def _parallel_settings(mode: str, processes: int) -> dict:
    """Per-device batch sizes stay fixed; one process accumulates `PROCESSES` micro-batches."""
    settings = {"gradient_accumulation_steps": PROCESSES // processes}
    if mode == "stage1" and processes > 1:
        settings.update(sharding="stage1", sharding_parallel_degree=processes)
    return settings


def _stage_config(output_dir, mode, processes, **keys) -> dict:
    """Settings shared by the SFT and RM runs; `keys` add or override."""
    return {
        "output_dir": str(output_dir),
        "max_length": 48,
        "per_device_train_batch_size": 4,
        "per_device_eval_batch_size": 8,
        "num_train_epochs": 1,
        "learning_rate": 3e-3,
        "max_grad_norm": 1.0,
        "logging_steps": 1,
        "save_strategy": "no",
        "evaluation_strategy": "no",
        "do_train": True,
        "report_to": ["none"],
        "disable_tqdm": True,
        **keys,
        **_parallel_settings(mode, processes),
    }


def sft_config(assets, output_dir, mode, processes) -> dict:
    return _stage_config(
        output_dir,
        mode,
        processes,
        model_name_or_path=assets["base"],
        train_datasets=f"alpaca:1:{assets['sft']}",
        eval_datasets=f"alpaca:1:{assets['sft_eval']}",
        lr_scheduler_type="linear",
        warmup_steps=1,
        seed=11,
    )


def rm_config(assets, output_dir, mode, processes) -> dict:
    return _stage_config(
        output_dir,
        mode,
        processes,
        model_name_or_path=assets["base"],
        train_datasets=f"PKU-SafeRLHF/train:1:{assets['pairs']}",
        eval_datasets=f"PKU-SafeRLHF/test:1:{assets['pairs_eval']}",
        seed=12,
        # Statistics are tracked from the all-gathered end scores; training uses raw scores so that
        # the loss does not depend on how many processes updated the statistics before it.
        normalizer_type="RunningMeanStd",
        loss_type="sequence-wise",
    )


def ppo_config(assets, output_dir, mode, processes) -> dict:
    config = {
        "actor_model_name_or_path": assets["base"],
        "reward_model_name_or_path": assets["reward"],
        "train_datasets": f"PKU-SafeRLHF/train:1:{assets['prompts']}",
        "eval_datasets": f"PKU-SafeRLHF/test:1:{assets['eval_prompts']}",
        "ptx_datasets": f"alpaca:1:{assets['sft']}",
        "output_dir": str(output_dir),
        "max_length": 56,
        "max_steps": PPO_STEPS,
        "per_device_prompt_batch_size": 2 * PROCESSES // processes,
        "per_device_train_batch_size": 1,
        "per_device_eval_batch_size": 4,
        "learning_rate": 2e-3,
        "critic_learning_rate": 2e-3,
        "critic_warmup_ratio": 0.0,
        "lr_scheduler_type": "linear",
        "max_grad_norm": 1.0,
        "ptx_coeff": 0.5,
        "whiten_advantages": True,  # over the global batch (all replicas)
        "top_p": 1e-6,  # see the module docstring
        "logging_steps": 1,
        "evaluation_strategy": "steps",
        "eval_steps": PPO_STEPS,
        "save_strategy": "steps",
        "save_steps": 2,
        "offload_level": "freeze_model optimizer",
        "report_to": ["none"],
        "seed": 13,
        "disable_tqdm": True,
        **_parallel_settings(mode, processes),
    }
    # Two micro-batches per rank and step: the data-parallel all-reduce is skipped (no_sync) for
    # the first; with recompute (critic) it is skipped for both and done by hand after the second.
    config["gradient_accumulation_steps"] *= 2
    if mode == "dp" and processes > 1:
        config["critic_recompute"] = True
    return config


# =============================================================================================
# Jobs (shared by the launched workers and the in-process references)
# =============================================================================================


def _rank() -> int:
    import paddle.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0


def record_rollouts(trainer, path: str) -> None:
    """Write every rollout this rank trains on (prompt and full token ids, padding removed).
    Observation only: the experience passes through unchanged."""
    start_rollout = trainer.start_rollout

    def recording(prompt_batch):
        work = start_rollout(prompt_batch)
        experience = work.experience  # its token ids and masks are final even while values are pending
        rows = []
        for ids, mask in zip(experience.input_ids.tolist(), experience.attention_mask.tolist()):
            tokens = [token for token, keep in zip(ids, mask) if keep]
            prompt = [t for t, keep in zip(ids[: experience.prompt_length], mask[: experience.prompt_length]) if keep]
            rows.append({"prompt": prompt, "sequence": tokens})
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"rollout": trainer.state.rollouts_done, "rows": rows}) + "\n")
        return work

    trainer.start_rollout = recording


def parameter_digest(model) -> dict:
    return {name: float(np.abs(p.numpy().astype(np.float64)).sum()) for name, p in model.named_parameters()}


def run_ppo_job(config_path: str, record_dir: str, tag: str) -> dict:
    """PPO through `ppo.run_ppo.build_trainer` + `train`, recording rollouts; returns facts about
    this rank that the files do not show."""
    from ppo.arguments import PPODataArguments, PPOModelArguments, PPOTrainingArguments
    from ppo.cli import parse_config
    from ppo.run_ppo import build_trainer

    model_args, data_args, training_args = parse_config(
        [config_path], PPOModelArguments, PPODataArguments, PPOTrainingArguments
    )
    trainer = build_trainer(model_args, data_args, training_args)
    frozen_before = {"reference": parameter_digest(trainer.reference_model), "reward": parameter_digest(trainer.reward_model)}
    record_rollouts(trainer, os.path.join(record_dir, f"rollouts.{tag}.jsonl"))
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    frozen_after = {"reference": parameter_digest(trainer.reference_model), "reward": parameter_digest(trainer.reward_model)}
    return {
        "frozen_unchanged": frozen_before == frozen_after,
        "frozen_wrapped": [name for name, model in (("reference", trainer.reference_model), ("reward", trainer.reward_model))
                           if any(model is wrapped for wrapped in trainer._wrapped.values())],
        "offload_events": trainer.offload.events,
        "latest_rollout_metrics": trainer.state.latest_rollout_metrics,
    }


def _state_arrays(model) -> dict:
    return {name: value.numpy() for name, value in model.state_dict().items()}


def run_model_parallel_job(config_path: str) -> dict:
    """Tensor or pipeline parallel 2 on CPU: the PPO trainer's wiring up to the update (whose
    pipeline schedule or tensor-parallel layers need GPU collectives). Returns facts to compare
    across ranks and with the checkpoints."""
    import paddle

    from ppo.arguments import PPODataArguments, PPOModelArguments, PPOTrainingArguments
    from ppo.cli import parse_config
    from ppo.experience import PromptBatch
    from ppo.run_ppo import build_trainer

    # CPU builds of Paddle never set ParallelEnv._device_id, which PipelineLayer reads once and
    # only stores; a class-level default lets the Pipe layers be built on CPU.
    if not hasattr(paddle.distributed.ParallelEnv(), "_device_id"):
        paddle.distributed.ParallelEnv._device_id = 0
    model_args, data_args, args = parse_config([config_path], PPOModelArguments, PPODataArguments, PPOTrainingArguments)
    trainer = build_trainer(model_args, data_args, args)
    facts = {
        "classes": {role: type(model).__name__ for role, model in (
            ("actor", trainer.actor_model), ("critic", trainer.critic_model), ("reference", trainer.reference_model),
            ("reward", trainer.reward_model), ("actor_rollout", trainer.rollout_model("actor")), ("critic_rollout", trainer.rollout_model("critic")))},
    }
    trainer.actor_trainer.create_optimizer_and_scheduler(num_training_steps=2)
    trainer.critic_trainer.create_optimizer_and_scheduler(num_training_steps=2)
    actor_model = trainer._wrap_for_training("actor", trainer.actor_trainer)
    critic_model = trainer._wrap_for_training("critic", trainer.critic_trainer)
    facts["wrapped"] = [type(actor_model).__name__, type(critic_model).__name__]
    trainer.offload = trainer._build_offload_manager()
    if args.pipeline_parallel_degree > 1:
        experience = trainer.make_experience(PromptBatch.from_collated(next(trainer.prompt_batches)))
        facts["experience"] = {name: getattr(experience, name).astype("float32").numpy().tolist()
                               for name in ("input_ids", "old_log_probs", "reference_log_probs", "old_values", "advantages")}
        facts["refreshes"] = {role: copy.refreshes for role, copy in trainer.rollout_copies.items()}
        facts["rollout_copies"] = {role: {k: v.tolist() for k, v in _state_arrays(copy.model).items()}
                                   for role, copy in trainer.rollout_copies.items()}
        try:
            trainer._enter("train")
            trainer._update(experience.split(args.per_device_train_batch_size), {"actor": actor_model, "critic": critic_model})
            facts["update"] = "ran"
        except NotImplementedError as error:
            facts["update"] = str(error)
    trainer.save_final_models()
    trainer.save_checkpoint(None)
    before = _state_arrays(trainer.actor_model)
    for parameter in trainer.actor_model.parameters():
        parameter.set_value(paddle.zeros_like(parameter))
    trainer.load_checkpoint(os.path.join(args.output_dir, "checkpoint-0"))
    after = _state_arrays(trainer.actor_model)
    facts["checkpoint_restores_weights"] = sorted(before) == sorted(after) and all(
        np.array_equal(before[name], after[name]) for name in before)
    facts["stage_parameters"] = sorted(before)
    return facts


def run_build_job(job: str, config_path: str) -> dict:
    """Build the SFT or reward trainer (no training): the model's parameter shapes."""
    from ppo.cli import parse_config

    if job == "sft-build":
        from sft.run_sft import SftArguments as Arguments
        from sft.run_sft import build_trainer
    else:
        from rm.run_reward import RewardArguments as Arguments
        from rm.run_reward import build_trainer
    (args,) = parse_config([config_path], Arguments)
    model = build_trainer(args).model
    return {"shapes": {name: list(p.shape) for name, p in model.named_parameters()}}


def _worker(work_dir: str, plan_name: str) -> None:
    """Run the jobs of `plan_name` under paddle.distributed.launch; facts per rank go to JSON."""
    with open(os.path.join(work_dir, f"{plan_name}.plan.json"), encoding="utf-8") as f:
        plan = json.load(f)
    facts = {}
    for job, config_path in plan:
        started = time.time()
        if job == "sft":
            from sft.run_sft import main as sft_main

            sft_main([config_path])
        elif job == "rm":
            from rm.run_reward import main as reward_main

            reward_main([config_path])
        elif job == "ppo-model-parallel":
            facts[job] = run_model_parallel_job(config_path)
        elif job in ("sft-build", "rm-build"):
            facts[job] = run_build_job(job, config_path)
        else:
            facts[job] = run_ppo_job(config_path, work_dir, f"{plan_name}.rank{_rank()}")
        print(f"JOB {job} took {time.time() - started:.1f}s", flush=True)
    with open(os.path.join(work_dir, f"{plan_name}.rank{_rank()}.facts.json"), "w", encoding="utf-8") as f:
        json.dump(facts, f)
    # As the entry points do: no native teardown in a multi-process CPU run (ppo/process_exit.py).
    from ppo.process_exit import finish_process

    finish_process()


# =============================================================================================
# Fixtures: the launches and the single-process references
# =============================================================================================


def _write_config(path: Path, config: dict) -> str:
    path.write_text(json.dumps(config, indent=2))
    return str(path)


def launch(work_dir: Path, plan_name: str, plan) -> dict:
    """Run this file's worker for `plan` ([(job, config path)]) on 2 processes; returns the
    worker logs by name. Fails with the end of every worker log."""
    (work_dir / f"{plan_name}.plan.json").write_text(json.dumps(plan))
    log_dir = work_dir / f"{plan_name}.logs"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT))
    env.pop("PADDLE_TRAINERS_NUM", None)
    command = [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", str(PROCESSES),
               "--log_dir", str(log_dir), __file__, str(work_dir), plan_name]
    started = time.time()
    result = subprocess.run(command, cwd=str(work_dir), env=env, capture_output=True, text=True, timeout=900)
    logs = {path.name: path.read_text(errors="replace") for path in sorted(log_dir.glob("workerlog.*"))}
    assert result.returncode == 0, "\n".join(f"--- {name}\n{text[-3000:]}" for name, text in logs.items()) or result.stderr[-3000:]
    print(f"launch {plan_name}: {time.time() - started:.1f}s")
    return logs


def _same_order_sampler(trainer):
    """PaddleNLP's multi-process sampler with one replica: the global batch order of a launch."""
    from paddle.io import DistributedBatchSampler

    args = trainer.args
    return DistributedBatchSampler(
        trainer.train_dataset, batch_size=args.per_device_train_batch_size, shuffle=True,
        num_replicas=1, rank=0, drop_last=args.dataloader_drop_last,
    )


def run_single_process(job: str, config_path: str, work_dir: Path) -> dict:
    """The reference run of `job` in this process (same steps as the entry points' `main`)."""
    from ppo.cli import parse_config

    if job == "ppo":
        return run_ppo_job(config_path, str(work_dir), "single")
    if job == "sft":
        from sft.run_sft import SftArguments as Arguments
        from sft.run_sft import build_trainer
    else:
        from rm.run_reward import RewardArguments as Arguments
        from rm.run_reward import build_trainer
    from paddlenlp.trainer import set_seed

    (args,) = parse_config([config_path], Arguments)
    set_seed(args.seed)
    trainer = build_trainer(args)
    trainer._get_train_sampler = types.MethodType(_same_order_sampler, trainer)
    train_metrics = trainer.train().metrics
    trainer.save_model()
    trainer.save_metrics("train", train_metrics)
    trainer.save_metrics("eval", trainer.evaluate())
    return {}


@pytest.fixture(scope="module")
def assets(tmp_path_factory, tiny_llama_dir):
    return write_assets(tmp_path_factory.mktemp("distributed_assets"), tiny_llama_dir)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, assets):
    """Both 2-process launches and their single-process references; output dirs by (job, run)."""
    root = tmp_path_factory.mktemp("distributed")
    builders = {"sft": sft_config, "rm": rm_config, "ppo": ppo_config}
    timings, outputs, logs = {}, {}, {}
    for mode in MODES:
        plan = []
        for job, builder in builders.items():
            outputs[job, mode] = root / f"{job}_{mode}"
            plan.append((job, _write_config(root / f"{job}_{mode}.json", builder(assets, outputs[job, mode], mode, PROCESSES))))
        started = time.time()
        logs[mode] = launch(root, mode, plan)
        timings[mode] = time.time() - started
    started = time.time()
    for job, builder in builders.items():
        outputs[job, "single"] = root / f"{job}_single"
        config_path = _write_config(root / f"{job}_single.json", builder(assets, outputs[job, "single"], "dp", 1))
        facts = run_single_process(job, config_path, root)
        if job == "ppo":
            (root / "single.rank0.facts.json").write_text(json.dumps({"ppo": facts}))
    timings["single"] = time.time() - started
    print(f"timings: {timings}")
    return types.SimpleNamespace(root=root, assets=assets, outputs=outputs, logs=logs, builders=builders)


# =============================================================================================
# Helpers for the comparisons
# =============================================================================================


def read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def model_state(directory) -> dict:
    import paddle

    state = paddle.load(os.path.join(str(directory), "model_state.pdparams"))
    return {name: value.numpy() for name, value in state.items()}


def assert_same_weights(actual_dir, expected_dir, rtol=2e-4, atol=2e-5, stray_share=1e-3, stray_factor=5.0):
    """Every tensor within (rtol, atol) of the one-process run, except at most `stray_share` of its
    elements (at least one), which must still be within `stray_factor` x the tolerance. Adam divides
    each element's gradient by its own running scale, so an element whose gradient is near zero
    turns the summation-order differences of 1 vs 2 processes (and of MKL's kernels, which differ
    between CPUs) into visible weight differences: seen on an AMD EPYC, 1 of 4096 elements at
    3.8e-5 after an RM run. A wrong split or reduction moves most elements, not a stray few."""
    actual, expected = model_state(actual_dir), model_state(expected_dir)
    assert sorted(actual) == sorted(expected)
    for name in expected:
        a, e = actual[name].astype(np.float64), expected[name].astype(np.float64)
        assert a.shape == e.shape, name
        allowed = atol + rtol * np.abs(e)
        excess = np.abs(a - e) / allowed
        strays = int((excess > 1.0).sum())
        budget = max(1, int(stray_share * e.size))
        assert strays <= budget and float(excess.max(initial=0.0)) <= stray_factor, (
            f"{name}: {strays} of {e.size} elements outside rtol={rtol}, atol={atol} (at most {budget} allowed), "
            f"worst {float(excess.max(initial=0.0)):.2f}x the tolerance (at most {stray_factor}x)"
        )


def assert_weights_moved(trained_dir, initial_dir):
    trained, initial = model_state(trained_dir), model_state(initial_dir)
    shared = [name for name in trained if name in initial]
    assert any(not np.allclose(trained[name], initial[name]) for name in shared), "training did not change the weights"


def assert_close_records(actual: dict, expected: dict, names, rtol=2e-4, atol=2e-5):
    for name in names:
        assert actual[name] == pytest.approx(expected[name], rel=rtol, abs=atol), name


def facts(runs, plan_name, rank=0) -> dict:
    return read_json(runs.root / f"{plan_name}.rank{rank}.facts.json")


# =============================================================================================
# SFT and RM
# =============================================================================================


@pytest.mark.distributed
@pytest.mark.parametrize("mode", MODES)
def test_sft_matches_one_process_on_the_same_global_batch(runs, mode):
    distributed, single = runs.outputs["sft", mode], runs.outputs["sft", "single"]
    assert_weights_moved(distributed, runs.assets["base"])
    assert_same_weights(distributed, single)
    train, reference = read_json(distributed / "train_results.json"), read_json(single / "train_results.json")
    assert reference["train_loss"] > 0
    assert_close_records(train, reference, ["train_loss"])
    assert_close_records(read_json(distributed / "eval_results.json"), read_json(single / "eval_results.json"), ["eval_loss"])


@pytest.mark.distributed
@pytest.mark.parametrize("mode", MODES)
def test_reward_model_matches_one_process_and_gathers_normalizer_statistics(runs, mode):
    distributed, single = runs.outputs["rm", mode], runs.outputs["rm", "single"]
    assert_weights_moved(distributed, runs.assets["base"])
    assert_same_weights(distributed, single)
    assert_close_records(read_json(distributed / "train_results.json"), read_json(single / "train_results.json"), ["train_loss"])
    eval_names = ["eval_loss", "eval_accuracy", "eval_rewards_mean", "eval_rewards_std"]
    assert_close_records(read_json(distributed / "eval_results.json"), read_json(single / "eval_results.json"), eval_names)
    # Each process scored half of every global batch; the statistics saw every end score once.
    config, reference = read_json(distributed / "config.json"), read_json(single / "config.json")
    assert config["count"] == reference["count"] == 2 * NUM_PAIRS
    np.testing.assert_allclose(config["mean"], reference["mean"], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(config["var"], reference["var"], rtol=1e-4, atol=1e-6)


# =============================================================================================
# PPO
# =============================================================================================

COMPARED_METRICS = (
    "train/actor_loss", "train/reward_critic_loss", "train/ptx_loss", "train/reward", "train/reward_with_kl_penalty",
    "train/kl_divergence", "train/mean_generated_length", "train/max_generated_length", "train/values",
    "train/returns", "train/explained_variance", "train/approx_kl", "train/clipfrac", "train/entropy",
    "train/actor_lr", "train/critic_lr",
)


def rollouts_by_rank(runs, plan_name):
    return [read_jsonl(runs.root / f"rollouts.{plan_name}.rank{rank}.jsonl") for rank in range(PROCESSES)]


@pytest.mark.distributed
@pytest.mark.parametrize("mode", MODES)
def test_ppo_ranks_take_disjoint_prompts_and_roll_out_what_one_process_rolls_out(runs, mode):
    ranks = rollouts_by_rank(runs, mode)
    single = read_jsonl(runs.root / "rollouts.single.jsonl")
    assert [len(records) for records in ranks] == [PPO_STEPS] * PROCESSES and len(single) == PPO_STEPS
    all_prompts = []
    for step in range(PPO_STEPS):
        per_rank = [[row["prompt"] for row in records[step]["rows"]] for records in ranks]
        assert all(len(prompts) == 2 for prompts in per_rank)
        assert not {tuple(p) for p in per_rank[0]} & {tuple(p) for p in per_rank[1]}, "ranks share prompts"
        # Rank r holds slice r of the global batch: rank 0's rows, then rank 1's, are the single run's.
        union = [row for records in ranks for row in records[step]["rows"]]
        assert union == single[step]["rows"]
        all_prompts.extend(tuple(p) for prompts in per_rank for p in prompts)
    assert len(set(all_prompts)) == NUM_PROMPTS  # one epoch: every prompt exactly once
    # Responses were generated, and they differ (the rollout does not collapse to one string).
    responses = {tuple(row["sequence"][len(row["prompt"]):]) for records in ranks for row in records[0]["rows"]}
    assert len(responses) > 1 and all(len(response) > 0 for response in responses)


@pytest.mark.distributed
@pytest.mark.parametrize("mode", MODES)
def test_ppo_matches_one_process_on_the_same_global_batch(runs, mode):
    distributed, single = runs.outputs["ppo", mode], runs.outputs["ppo", "single"]
    records = read_jsonl(distributed / "ppo_metrics.jsonl")
    reference = read_jsonl(single / "ppo_metrics.jsonl")
    train = [r for r in records if "train/actor_loss" in r]
    expected = [r for r in reference if "train/actor_loss" in r]
    assert [r["step"] for r in train] == [r["step"] for r in expected] == list(range(1, PPO_STEPS + 1))
    for actual, wanted in zip(train, expected):
        assert_close_records(actual, wanted, COMPARED_METRICS, rtol=1e-3, atol=1e-4)
    evals = [r for r in records if "eval/reward" in r]
    assert len(evals) == 1
    assert_close_records(evals[0], [r for r in reference if "eval/reward" in r][0], ["eval/reward", "eval/mean_generated_length"])
    for name in ("policy", "value"):
        assert_same_weights(distributed / name, single / name, rtol=1e-3, atol=1e-4)
    assert_weights_moved(distributed / "policy", runs.assets["base"])


@pytest.mark.distributed
@pytest.mark.parametrize("mode", MODES)
def test_ppo_rank0_alone_logs_and_writes_and_frozen_models_stay_untouched(runs, mode):
    logs = runs.logs[mode]
    assert sorted(logs) == ["workerlog.0", "workerlog.1"]
    # PaddleNLP logs every file it writes; the PPO trainer logs every metrics line.
    for marker in ("Model weights saved in", "step 1: ", "saved checkpoint"):
        assert marker in logs["workerlog.0"], marker
        assert marker not in logs["workerlog.1"], marker
    checkpoint = runs.outputs["ppo", mode] / "checkpoint-2"
    per_rank = {f"{kind}.rank{r}{ext}" for r in range(PROCESSES) for kind, ext in (
        ("actor_optimizer", ".pdopt"), ("critic_optimizer", ".pdopt"), ("rng_state", ".pkl"),
        ("rollout_rng_state", ".pkl"), ("pending_experience.pdparams", ""), ("model_parallel_rng_tracker", ".pkl"))}
    shared = {"ppo_state.json", "checkpoint_manifest.json", "policy", "value", "actor_scheduler.pdparams", "critic_scheduler.pdparams"}
    assert set(os.listdir(checkpoint)) == per_rank | shared
    leftovers = [name for name in os.listdir(runs.outputs["ppo", mode]) if name.startswith(".")]
    assert not leftovers, leftovers
    for rank in range(PROCESSES):
        rank_facts = facts(runs, mode, rank)["ppo"]
        assert rank_facts["frozen_unchanged"] and not rank_facts["frozen_wrapped"]
    # Every rank holds the same (global) rollout metrics, and they are those of the single run.
    rank0, rank1 = (facts(runs, mode, rank)["ppo"]["latest_rollout_metrics"] for rank in range(PROCESSES))
    assert rank0 == rank1
    single = facts(runs, "single")["ppo"]["latest_rollout_metrics"]
    assert_close_records(rank0, single, sorted(single), rtol=1e-3, atol=1e-4)


@pytest.mark.distributed
def test_ppo_resumes_on_two_processes_exactly(runs):
    """A copy of the stage-1 run's checkpoint-2, resumed by a new 2-process launch, continues like
    the uninterrupted run: same metrics at steps 3-4, same final weights."""
    uninterrupted = runs.outputs["ppo", "stage1"]
    resumed = runs.root / "ppo_resumed"
    resumed.mkdir()
    shutil.copytree(uninterrupted / "checkpoint-2", resumed / "checkpoint-2")
    config = ppo_config(runs.assets, resumed, "stage1", PROCESSES)
    config["resume_from_checkpoint"] = str(resumed / "checkpoint-2")
    launch(runs.root, "resume", [("ppo", _write_config(runs.root / "ppo_resume.json", config))])
    expected = [r for r in read_jsonl(uninterrupted / "ppo_metrics.jsonl") if r["step"] > 2]
    records = read_jsonl(resumed / "ppo_metrics.jsonl")
    assert [r["step"] for r in records if "train/actor_loss" in r] == [3, 4]
    assert [sorted(r) for r in records] == [sorted(r) for r in expected]
    for record, wanted in zip(records, expected):
        assert_close_records(record, wanted, [k for k in record if k != "step"], rtol=1e-5, atol=1e-6)
    for name in ("policy", "value"):
        assert_same_weights(resumed / name, uninterrupted / name, rtol=1e-5, atol=1e-6)


# =============================================================================================
# One process: the pieces of the parallel wiring that need no second process
# =============================================================================================


def test_offload_leaves_to_paddle_what_group_sharded_offload_already_moves():
    from ppo.comm_utils import managed_offload_objects

    everything = ["freeze_model", "optimizer", "train_model"]
    assert managed_offload_objects(everything) == [
        "reference_model", "reward_model", "cost_model", "actor_optimizer", "critic_optimizer", "cost_critic_optimizer",
        "actor_model", "critic_model", "cost_critic_model", "actor_rollout_model", "critic_rollout_model",
        "cost_critic_rollout_model",
    ]
    # stage2 offload: the sharded optimizer keeps its states on the host; moving them again would
    # be a second offload of the same tensors.
    assert "actor_optimizer" not in managed_offload_objects(everything, sharding="stage2 offload")
    assert "actor_model" in managed_offload_objects(everything, sharding="stage2 offload")
    # stage3 offload: parameter shards too; the plain rollout copies are still ours to move.
    stage3 = managed_offload_objects(everything, sharding=["stage3", "offload"])
    assert stage3 == [
        "reference_model", "reward_model", "cost_model", "actor_rollout_model", "critic_rollout_model",
        "cost_critic_rollout_model",
    ]
    with pytest.raises(ValueError, match="stage3 offload"):
        managed_offload_objects(["train_model"], sharding="stage3")
    # PaddleNLP's own optimizer-offload flag means the same as the 'optimizer' token, once.
    optimizers = ["actor_optimizer", "critic_optimizer", "cost_critic_optimizer"]
    assert managed_offload_objects(["optimizer"], offload_optim=True) == optimizers
    assert managed_offload_objects([], offload_optim=True) == optimizers


def _experience(seed: int, batch: int = 3, length: int = 9):
    import paddle

    from ppo.experience import Experience

    rng = np.random.default_rng(seed)
    prompt_length = 3
    lengths = rng.integers(1, length - prompt_length + 1, size=batch)
    mask = np.zeros([batch, length], dtype=bool)
    mask[:, :prompt_length] = True
    for row, n in enumerate(lengths):
        mask[row, prompt_length:prompt_length + n] = True

    def per_token(scale):
        return paddle.to_tensor(rng.normal(size=[batch, length - 1]).astype("float32") * scale)

    return Experience.build(
        paddle.to_tensor(rng.integers(4, 500, size=[batch, length])), paddle.to_tensor(mask), prompt_length,
        per_token(1.0), per_token(1.0), per_token(0.5), paddle.to_tensor(rng.normal(size=[batch]).astype("float32")),
        kl_coeff=0.1, clip_range_score=5.0, gamma=1.0, gae_lambda=0.95,
    )


def test_rollout_sums_add_up_across_ranks_to_the_metrics_of_the_whole_batch():
    from ppo.experience import Experience
    from ppo.models.ppo_model_utils import explained_variance, kl_divergence_per_token, masked_mean, masked_sum
    from ppo.metrics import rollout_metrics, rollout_sums

    parts = [_experience(1), _experience(2, batch=2)]  # two "ranks" with different shapes
    whole = Experience.concat(parts)
    sums = [rollout_sums(part, "k1") for part in parts]
    metrics = rollout_metrics({name: sums[0][name] + sums[1][name] for name in sums[0]})
    mask = whole.action_mask
    kl = kl_divergence_per_token(whole.old_log_probs, whole.reference_log_probs, "k1")
    expected = {
        "train/reward": float(whole.reward_scores.mean()),
        "train/reward_with_kl_penalty": float(masked_sum(whole.rewards, mask)) / whole.batch_size,
        "train/kl_divergence": float(masked_sum(kl, mask)) / whole.batch_size,
        "train/mean_generated_length": float(mask.astype("float32").sum()) / whole.batch_size,
        "train/values": float(masked_mean(whole.old_values, mask)),
        "train/returns": float(masked_mean(whole.returns, mask)),
        "train/explained_variance": float(explained_variance(whole.old_values, whole.returns, mask)),
    }
    assert sorted(metrics) == sorted(expected)
    for name, value in expected.items():
        assert metrics[name] == pytest.approx(value, rel=1e-5, abs=1e-6), name


def test_rollout_random_state_is_a_separate_resumable_stream():
    import paddle

    from ppo.sampling import RolloutRandomState

    paddle.seed(123)
    global_draws = paddle.rand([4]).numpy()
    paddle.seed(123)
    stream = RolloutRandomState(5)
    with stream.active():
        first = paddle.rand([4]).numpy()
    # The global generator did not move while the rollout stream drew.
    np.testing.assert_array_equal(paddle.rand([4]).numpy(), global_draws)
    saved = stream.state
    with stream.active():
        second = paddle.rand([4]).numpy()
    assert not np.array_equal(first, second)
    replica = RolloutRandomState(5)  # same seed (same data-parallel rank): same draws
    with replica.active():
        np.testing.assert_array_equal(paddle.rand([4]).numpy(), first)
    other = RolloutRandomState(6)  # another replica
    with other.active():
        assert not np.array_equal(paddle.rand([4]).numpy(), first)
    stream.state = saved  # what a resume restores
    with stream.active():
        np.testing.assert_array_equal(paddle.rand([4]).numpy(), second)


def test_parallel_mode_chooses_pipe_classes_and_rollout_copies():
    from paddlenlp.transformers import LlamaForCausalLM, Qwen2ForCausalLM

    from ppo.models import LlamaModelForScore
    from ppo.models.model_pp import LlamaPolicyPipe, LlamaValuePipe, Qwen2PolicyPipe, Qwen2ValuePipe
    from ppo.run_ppo import rollout_copy_mode, trained_model_classes

    def args(pipeline=1, sharding=(), eval_mode=None):
        return types.SimpleNamespace(pipeline_parallel_degree=pipeline, sharding=list(sharding), eval_mode=eval_mode)

    assert trained_model_classes("llama", args()) == (LlamaForCausalLM, LlamaModelForScore)
    assert trained_model_classes("llama", args(pipeline=2)) == (LlamaPolicyPipe, LlamaValuePipe)
    assert trained_model_classes("qwen2", args(pipeline=4)) == (Qwen2PolicyPipe, Qwen2ValuePipe)
    assert trained_model_classes("qwen2", args())[0] is Qwen2ForCausalLM
    assert rollout_copy_mode(args()) is None
    assert rollout_copy_mode(args(sharding=["stage1"])) is None
    assert rollout_copy_mode(args(sharding=["stage2"])) is None  # full parameters on every rank
    assert rollout_copy_mode(args(sharding=["stage3"])) == "gathered"
    assert rollout_copy_mode(args(pipeline=2, eval_mode="tensor_parallel")) == "pipeline"


def test_pipeline_and_stage3_runs_refuse_to_start_without_rollout_copies():
    from ppo.rollout_copies import check_rollout_copies

    pipeline = types.SimpleNamespace(pipeline_parallel_degree=2, sharding=[])
    with pytest.raises(ValueError, match="actor_rollout_model and critic_rollout_model"):
        check_rollout_copies(pipeline, {"actor": object()})
    stage3 = types.SimpleNamespace(pipeline_parallel_degree=1, sharding=["stage3"])
    with pytest.raises(ValueError, match="sharding stage3 PPO needs actor_rollout_model"):
        check_rollout_copies(stage3, {})
    check_rollout_copies(stage3, {"actor": object()})
    check_rollout_copies(types.SimpleNamespace(pipeline_parallel_degree=1, sharding=[]), {})


def _fake_stage_checkpoint(model, tokenizer_dir, directory: Path, pipe_class) -> dict:
    """What two pipeline stages write (`model_state.pp00/01.pdparams`, plain parameter names, the
    Pipe's config), built from a plain model with the Pipe class's offline layout."""
    import paddle
    from paddlenlp.transformers import AutoTokenizer

    plain = {name: value.numpy() for name, value in model.state_dict().items()}
    mapping = pipe_class.name_mapping_for(model.config, pp_degree=2)
    directory.mkdir()
    for stage, pipe_state in enumerate(mapping.split_by_stage(plain)):
        stage_state = {mapping.to_plain(name): paddle.to_tensor(value) for name, value in pipe_state.items()}
        paddle.save(stage_state, str(directory / f"model_state.pp{stage:02d}.pdparams"))
    config = model.config
    config.architectures = [pipe_class.__name__]
    config.save_pretrained(str(directory))
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(str(directory))
    return plain


def test_pipeline_stage_files_merge_into_plain_model_directories(tmp_path, assets):
    from paddlenlp.transformers import AutoModelForCausalLM, AutoTokenizer

    from ppo.model_io import load_model_weights, merge_stage_checkpoint
    from ppo.models import AutoModelForScore
    from ppo.models.model_pp import LlamaPolicyPipe, LlamaValuePipe

    for name, loader, pipe_class, source in (
        ("policy", AutoModelForCausalLM, LlamaPolicyPipe, assets["base"]),
        ("value", AutoModelForScore, LlamaValuePipe, assets["reward"]),
    ):
        model = loader.from_pretrained(source, dtype="float32")
        stages = tmp_path / f".{name}.stages"
        expected = _fake_stage_checkpoint(model, assets["base"], stages, pipe_class)
        merged = merge_stage_checkpoint(str(stages), str(tmp_path / name))
        assert not stages.exists()
        reloaded = loader.from_pretrained(merged, dtype="float32")
        assert type(reloaded).__name__ == type(model).__name__
        state = {key: value.numpy() for key, value in reloaded.state_dict().items()}
        assert sorted(state) == sorted(expected)
        for key, value in expected.items():
            np.testing.assert_array_equal(state[key], value, err_msg=key)
        assert AutoTokenizer.from_pretrained(merged).get_vocab() == AutoTokenizer.from_pretrained(assets["base"]).get_vocab()
        # load_model_weights reads the merged directory back into an existing model.
        fresh = type(model).from_config(model.config, dtype="float32")
        load_model_weights(fresh, merged)
        for key, value in fresh.state_dict().items():
            np.testing.assert_array_equal(value.numpy(), expected[key], err_msg=key)
    with pytest.raises(ValueError, match="does not fit"):
        load_model_weights(AutoModelForCausalLM.from_pretrained(assets["base"]), str(tmp_path / "value"))
    with pytest.raises(FileNotFoundError, match="no per-rank weight files"):
        merge_stage_checkpoint(str(tmp_path / "policy"), str(tmp_path / "again"))


def test_rollout_copies_refresh_once_per_use_after_a_step_and_respect_offload(tmp_path, assets):
    """A PPO run whose rollouts go through plain rollout copies (the refresh is a parameter copy
    here; under pipeline parallel / stage3 it is the collective sync): the copy is refreshed
    exactly when it is used after an optimizer step, holds the trained weights at every rollout,
    and with every offload level nothing is used while offloaded or moved twice the same way."""
    from paddlenlp.transformers import LlamaForCausalLM

    from ppo.arguments import PPODataArguments, PPOModelArguments, PPOTrainingArguments
    from ppo.cli import parse_config
    from ppo.models import LlamaModelForScore
    from ppo.ppo_trainer import PPOTrainer
    from ppo.run_ppo import build_trainer

    config = ppo_config(assets, tmp_path / "out", "dp", 1)
    config.update(max_steps=4, update_iters=2, per_device_prompt_batch_size=2, per_device_train_batch_size=2,
                  gradient_accumulation_steps=1,
                  eval_steps=2, save_strategy="no", offload_level="freeze_model optimizer train_model")
    parsed = parse_config([_write_config(tmp_path / "ppo.json", config)], PPOModelArguments, PPODataArguments, PPOTrainingArguments)
    plain = build_trainer(*parsed)
    copies = {
        "actor_rollout_model": LlamaForCausalLM.from_config(plain.actor_model.config, dtype="float32"),
        "critic_rollout_model": LlamaModelForScore.from_config(plain.critic_model.config, dtype="float32"),
    }
    trainer = PPOTrainer(
        args=parsed[2], actor_model=plain.actor_model, reference_model=plain.reference_model,
        reward_model=plain.reward_model, critic_model=plain.critic_model, tokenizer=plain.tokenizer,
        train_dataset=plain.train_dataset, eval_dataset=plain.eval_dataset, ptx_dataset=plain.ptx_dataset,
        max_length=plain.max_length, reward_tokenizer=plain.reward_scorer.model_scorer.score_tokenizer, **copies,
    )
    assert trainer.engine.model is copies["actor_rollout_model"]
    refreshed_at, rollouts = [], []
    for copy in trainer.rollout_copies.values():
        refresh = copy.refresh_weights
        copy.refresh_weights = lambda refresh=refresh: (refreshed_at.append(trainer.state.global_step), refresh())
    start_rollout = trainer.start_rollout

    def observed(prompt_batch):
        work = start_rollout(prompt_batch)
        for copy, trained in ((copies["actor_rollout_model"], trainer.actor_model), (copies["critic_rollout_model"], trainer.critic_model)):
            rollouts.append(all(np.array_equal(a.numpy(), b.numpy()) for a, b in zip(copy.parameters(), trained.parameters())))
        return work

    trainer.start_rollout = observed
    trainer.train()
    # 2 optimizer steps per rollout, evaluation after steps 2 and 4: the copies are refreshed
    # before the first rollout and before each evaluation; the rollout after the step-2
    # evaluation finds them fresh.
    assert refreshed_at == [0, 0, 2, 2, 4, 4]
    assert rollouts == [True] * 4
    events = trainer.offload.events
    for name in {n for _, _, n in events}:
        actions = [action for _, action, n in events if n == name]
        assert all(a != b for a, b in zip(actions, actions[1:])), (name, actions)
    reloads = {(phase, name) for phase, action, name in events if action == "reload"}
    assert {phase for phase, name in reloads if name == "actor_rollout_model"} <= {"rollout", "score", "eval", "refresh"}
    assert {phase for phase, name in reloads if name == "actor_model"} <= {"train", "save", "refresh"}
    assert ("train", "actor_rollout_model") not in reloads
    assert ("rollout", "offload", "actor_model") in events and ("train", "offload", "actor_rollout_model") in events


# =============================================================================================
# Pipeline and tensor parallel on 2 CPU processes: the trainer's wiring up to the update
# =============================================================================================


def model_parallel_config(assets, output_dir, kind: str) -> dict:
    config = ppo_config(assets, output_dir, "dp", PROCESSES)
    config.update(per_device_prompt_batch_size=2, per_device_train_batch_size=2, gradient_accumulation_steps=1, save_strategy="no")
    if kind == "pipeline":
        config.update(pipeline_parallel_degree=2, eval_mode="single", pipeline_parallel_config="disable_p2p_cache_shape")
    else:
        config.update(tensor_parallel_degree=2)
    for key in ("recompute", "critic_recompute"):
        config.pop(key, None)
    return config


def launch_model_parallel(tmp_path, assets, kind, extra_jobs=()):
    output_dir = tmp_path / f"ppo_{kind}"
    config_path = _write_config(tmp_path / f"ppo_{kind}.json", model_parallel_config(assets, output_dir, kind))
    launch(tmp_path, kind, [("ppo-model-parallel", config_path), *extra_jobs])
    ranks = [read_json(tmp_path / f"{kind}.rank{rank}.facts.json") for rank in range(PROCESSES)]
    return output_dir, ranks


def assert_checkpoint_dir_equals(directory, expected_state: dict):
    state = model_state(directory)
    assert sorted(state) == sorted(expected_state)
    for name, value in expected_state.items():
        np.testing.assert_array_equal(state[name], value, err_msg=name)


@pytest.mark.distributed
def test_pipeline_parallel_ppo_rolls_out_on_synced_copies_and_saves_plain_models(tmp_path, assets):
    """pipeline_parallel_degree 2: Pipe actor/critic with plain rollout copies synced from the
    stages; both stages build the same experience; the update enters Paddle's pipeline schedule
    (whose p2p send/recv gloo lacks, so it stops there on CPU); final models and checkpoints are
    merged into plain model directories and load back into each stage."""
    from paddlenlp.transformers import AutoModelForCausalLM

    from ppo.models import AutoModelForScore

    output_dir, ranks = launch_model_parallel(tmp_path, assets, "pipeline")
    ranks = [facts_of_rank["ppo-model-parallel"] for facts_of_rank in ranks]
    base = AutoModelForCausalLM.from_pretrained(assets["base"], dtype="float32")
    reward = AutoModelForScore.from_pretrained(assets["reward"], dtype="float32")
    base_state, reward_state = _state_arrays(base), _state_arrays(reward)
    for facts_of_rank in ranks:
        assert facts_of_rank["classes"] == {
            "actor": "LlamaPolicyPipe", "critic": "LlamaValuePipe", "reference": "LlamaForCausalLM",
            "reward": "LlamaModelForScore", "actor_rollout": "LlamaForCausalLM", "critic_rollout": "LlamaModelForScore",
        }
        assert facts_of_rank["wrapped"] == ["PipelineParallel", "PipelineParallel"]
        assert facts_of_rank["refreshes"] == {"actor": 1, "critic": 1}
        # eval_mode "single": every stage's rollout copies hold the whole trained models.
        for role, expected in (("actor", base_state), ("critic", reward_state)):
            copy = facts_of_rank["rollout_copies"][role]
            assert sorted(copy) == sorted(expected)
            for name, value in expected.items():
                np.testing.assert_array_equal(np.asarray(copy[name], dtype=value.dtype), value, err_msg=f"{role} {name}")
        assert "send" in facts_of_rank["update"] or "recv" in facts_of_rank["update"], facts_of_rank["update"]
        assert facts_of_rank["checkpoint_restores_weights"]
    # Same prompts and the same sampling stream on both stages: one experience.
    assert ranks[0]["experience"] == ranks[1]["experience"]
    # Each rank trains its own stage: the two stages' parameters are disjoint.
    assert not set(ranks[0]["stage_parameters"]) & set(ranks[1]["stage_parameters"])
    assert_checkpoint_dir_equals(output_dir / "policy", base_state)
    assert_checkpoint_dir_equals(output_dir / "value", reward_state)
    assert_checkpoint_dir_equals(output_dir / "checkpoint-0" / "policy", base_state)
    assert read_json(output_dir / "value" / "config.json")["architectures"] == ["LlamaModelForScore"]
    assert not [name for name in os.listdir(output_dir) if name.startswith(".")]


@pytest.mark.slow
@pytest.mark.distributed
def test_tensor_parallel_ppo_models_save_merged_and_load_back_their_shards(tmp_path, assets):
    """tensor_parallel_degree 2: TP actor/critic/reference/reward built from single checkpoints;
    final models and checkpoints merge into plain directories; a checkpoint loads back into the
    TP shards. (Forward passes need TP kernels and collectives this CPU build lacks.)"""
    from paddlenlp.transformers import AutoModelForCausalLM

    from ppo.models import AutoModelForScore

    builds = []
    for job, builder in (("sft-build", sft_config), ("rm-build", rm_config)):
        config = builder(assets, tmp_path / job, "dp", PROCESSES)
        config.update(tensor_parallel_degree=2, gradient_accumulation_steps=1)
        builds.append((job, _write_config(tmp_path / f"{job}.json", config)))
    output_dir, all_facts = launch_model_parallel(tmp_path, assets, "tensor", builds)
    # SFT and reward models are split too: each rank holds half of every attention/MLP projection.
    for facts_of_rank in all_facts:
        for job in ("sft-build", "rm-build"):
            shapes = facts_of_rank[job]["shapes"]
            assert shapes["llama.layers.0.self_attn.q_proj.weight"] == [64, 32], job
            assert shapes["llama.layers.0.mlp.down_proj.weight"] == [64, 64], job
    ranks = [facts_of_rank["ppo-model-parallel"] for facts_of_rank in all_facts]
    for facts_of_rank in ranks:
        assert facts_of_rank["classes"]["actor"] == "LlamaForCausalLM"
        assert facts_of_rank["classes"]["actor_rollout"] == "LlamaForCausalLM"  # the trained model itself
        assert facts_of_rank["checkpoint_restores_weights"]
    assert ranks[0]["stage_parameters"] == ranks[1]["stage_parameters"]
    base = _state_arrays(AutoModelForCausalLM.from_pretrained(assets["base"], dtype="float32"))
    reward = _state_arrays(AutoModelForScore.from_pretrained(assets["reward"], dtype="float32"))
    assert_checkpoint_dir_equals(output_dir / "policy", base)
    assert_checkpoint_dir_equals(output_dir / "value", reward)
    assert_checkpoint_dir_equals(output_dir / "checkpoint-0" / "policy", base)


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])
