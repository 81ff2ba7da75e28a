"""PPO step throughput of `ppo.ppo_trainer.PPOTrainer` with the TRL peer's shapes and settings.

Per step: 8 prompts x 32 tokens, 64 sampled new tokens per prompt (temperature 1, top_p 1, no stop
token: every response is exactly 64 tokens), scoring by the actor, the reference, the reward model
and the critic, then 1 PPO update over 1 micro-batch of 8 (actor and critic forward/backward +
AdamW step). Policy/reference: Llama hidden 256, 4 layers, 4 heads, intermediate 512, vocab 1000;
reward/critic: the same backbone with a 1-output score head. fp32, 1 thread,
OMP_WAIT_POLICY=PASSIVE. The first `--warmup` steps are not counted.

Phase times are measured around the trainer's own calls (nothing is re-implemented):
  generation = the rollout engine's generate; scoring = the rest of `make_experience`;
  actor / critic = their `training_step` (forward + backward) plus their optimizer's step.

Prints progress lines, then one line of JSON (the last line). Usage, from anywhere:
    python benchmarks/bench_ppo.py [--steps 11] [--warmup 1] [--shapes default|large] [--mkl-avx2] [--json out.json]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchutil import (  # noqa: E402
    PEER_TRL_PPO_PEAK_RSS_MIB,
    PEER_TRL_PPO_STEP_SECONDS,
    Window,
    emit_result,
    peak_rss_mib,
    setup_process,
)
from bench_generate import SHAPES  # noqa: E402

PHASES = ("generation", "scoring", "actor", "critic")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", choices=sorted(SHAPES), default="default")
    parser.add_argument("--steps", type=int, default=11, help="PPO steps run, warm-up included")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--batch", type=int, default=8, help="prompts per PPO step")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--backend", default="auto", help="rollout backend: auto, decoder or generate")
    parser.add_argument("--mkl-avx2", action="store_true", help="set MKL_DEBUG_CPU_TYPE=5 (AMD CPUs: use MKL's AVX2 GEMM)")
    parser.add_argument("--json", default=None, help="also write the result here")
    args = parser.parse_args(argv)
    if args.steps <= args.warmup:
        parser.error("--steps must be larger than --warmup")
    return args


class FixedLengthPrompts:
    """Prompts of exactly `prompt_len` token ids (no padding), with the trainer's prompt collator."""

    def __init__(self, rows, pad_token_id: int):
        self.rows, self.pad_token_id = rows, pad_token_id

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, index):
        return {"input_ids": self.rows[index]}

    def get_collator(self):
        from ppo.data.prompt_only import PromptOnlyCollator

        return PromptOnlyCollator(pad_token_id=self.pad_token_id)


class PhaseClock:
    """Accumulates wall time per phase and per PPO step by wrapping methods of single objects
    (instance attributes; the classes are untouched)."""

    def __init__(self):
        self.steps = []  # per step: {"start": t, phase: seconds}

    def wrap(self, owner, name: str, phase: str, starts_step: bool = False) -> None:
        original = getattr(owner, name)

        def timed(*args, **kwargs):
            if starts_step:
                self.steps.append(defaultdict(float, start=time.perf_counter(), cpu_start=time.process_time()))
            begin = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.steps[-1][phase] += time.perf_counter() - begin

        setattr(owner, name, timed)


def main(argv=None):
    args = parse_args(argv)
    environment = setup_process(args.threads, args.mkl_avx2)

    import paddle
    from paddlenlp.transformers import AutoTokenizer, LlamaConfig

    from ppo.arguments import PPOTrainingArguments
    from ppo.infer_utils import RolloutEngine
    from ppo.models import AutoModelForScore
    from ppo.ppo_trainer import PPOTrainer
    from ppo.tiny import build_tiny_causal_lm, build_tokenizer, tiny_config_kwargs

    shapes = SHAPES[args.shapes]
    max_length = args.prompt_len + args.new_tokens
    model_kwargs = dict(shapes, max_position_embeddings=max_length)
    work_dir = tempfile.mkdtemp(prefix="bench_ppo_")
    build_tokenizer(os.path.join(work_dir, "tokenizer"))
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(work_dir, "tokenizer"), padding_side="left")

    # Actor and reference start equal, as do reward model and critic (the peer loads each twice).
    actor = build_tiny_causal_lm("llama", seed=args.seed, **model_kwargs)
    reference = build_tiny_causal_lm("llama", seed=args.seed, **model_kwargs)
    score_config = LlamaConfig(**tiny_config_kwargs(**model_kwargs))
    paddle.seed(args.seed + 1)
    reward_model = AutoModelForScore.from_config(score_config, score_type="reward", do_normalize=False)
    critic = AutoModelForScore.from_config(score_config, score_type="critic", do_normalize=False)
    critic.set_state_dict(reward_model.state_dict())

    paddle.seed(args.seed)
    vocab = shapes["vocab_size"]
    prompt_ids = paddle.randint(4, vocab, [args.batch * args.steps, args.prompt_len], dtype="int64").numpy().tolist()
    dataset = FixedLengthPrompts(prompt_ids, tokenizer.pad_token_id)

    training_args = PPOTrainingArguments(
        output_dir=os.path.join(work_dir, "ppo"),
        per_device_prompt_batch_size=args.batch,
        per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=1,
        update_iters=1,
        max_steps=args.steps,
        learning_rate=args.lr,
        critic_learning_rate=args.lr,
        lr_scheduler_type="constant",
        critic_lr_scheduler_type="constant",
        warmup_ratio=0.0,
        critic_warmup_ratio=0.0,
        temperature=1.0,
        top_p=1.0,
        num_return_sequences=1,
        ptx_coeff=0.0,
        logging_steps=args.steps,
        save_strategy="no",
        evaluation_strategy="no",
        report_to=["none"],
        disable_tqdm=True,
        seed=args.seed,
        offload_level="",
    )
    trainer = PPOTrainer(
        args=training_args, actor_model=actor, reference_model=reference, reward_model=reward_model,
        critic_model=critic, tokenizer=tokenizer, train_dataset=dataset, max_length=max_length,
    )
    # No stop token, like the peer (stop_token=None): an EOS id outside the vocabulary.
    trainer.engine = RolloutEngine(actor, eos_token_id=vocab, pad_token_id=tokenizer.pad_token_id, backend=args.backend)

    clock = PhaseClock()
    clock.wrap(trainer, "make_experience", "make_experience", starts_step=True)
    clock.wrap(trainer.engine, "generate", "generation")
    clock.wrap(trainer.actor_trainer, "training_step", "actor")
    clock.wrap(trainer.critic_trainer, "training_step", "critic")
    for role in ("actor", "critic"):
        role_trainer = getattr(trainer, f"{role}_trainer")
        create = role_trainer.create_optimizer_and_scheduler

        def create_and_time(*a, _create=create, _trainer=role_trainer, _role=role, **k):
            result = _create(*a, **k)
            clock.wrap(_trainer.optimizer, "step", _role)
            return result

        role_trainer.create_optimizer_and_scheduler = create_and_time

    with Window() as window:
        trainer.train()
        train_end, train_end_cpu = time.perf_counter(), time.process_time()
    rss = peak_rss_mib()

    starts = [step["start"] for step in clock.steps] + [train_end]
    step_seconds = [starts[i + 1] - starts[i] for i in range(len(clock.steps))]
    cpu_starts = [step["cpu_start"] for step in clock.steps] + [train_end_cpu]
    step_cpu_seconds = [cpu_starts[i + 1] - cpu_starts[i] for i in range(len(clock.steps))]
    # The last step's interval also holds the final model save; count it only if it is all we have.
    measured = list(range(args.warmup, len(clock.steps) - 1)) or [len(clock.steps) - 1]
    phases = {}
    for phase in PHASES:
        if phase == "scoring":
            values = [clock.steps[i]["make_experience"] - clock.steps[i]["generation"] for i in measured]
        else:
            values = [clock.steps[i][phase] for i in measured]
        phases[phase] = round(statistics.median(values), 4)
    step_median = statistics.median(step_seconds[i] for i in measured)
    new_tokens = args.batch * args.new_tokens
    generation_tps = new_tokens / phases["generation"]
    result = {
        "bench": "ppo",
        "ppo_step_seconds": round(step_median, 4),
        "generated_tokens_per_second": round(new_tokens / step_median, 1),
        "generation_phase_tokens_per_second": round(generation_tps, 1),
        "phases": phases,
        "peak_rss_mib": round(rss, 1),
        "step_own_cpu_seconds_median": round(statistics.median(step_cpu_seconds[i] for i in measured), 4),
        "step_seconds_all": [round(s, 4) for s in step_seconds],
        "measured_steps": len(measured),
        "rollout_backend": trainer.engine.backend,
        "peer_trl": {"ppo_step_seconds": PEER_TRL_PPO_STEP_SECONDS, "peak_rss_mib": PEER_TRL_PPO_PEAK_RSS_MIB},
        "ratios": {"step_throughput_vs_trl_peer": round(PEER_TRL_PPO_STEP_SECONDS / step_median, 2),
                   "peak_rss_vs_trl_peer": round(rss / PEER_TRL_PPO_PEAK_RSS_MIB, 2)},
        "other_processes_cores_avg": round(window.foreign_cores, 2),
        "config": {"shapes": args.shapes, **shapes, "batch": args.batch, "prompt_len": args.prompt_len,
                   "new_tokens": args.new_tokens, "steps": args.steps, "warmup": args.warmup, "lr": args.lr,
                   "update_iters": 1, "micro_batches": 1, "dtype": "float32"},
        "environment": {**environment, "paddle": paddle.__version__, "cpu_count": os.cpu_count()},
    }
    print(f"PPO step median {step_median:.3f} s over {len(measured)} steps -> {new_tokens / step_median:.1f} generated tokens/s "
          f"end to end; phases (s): {phases}; peak RSS {rss:.0f} MiB", flush=True)
    emit_result(result, args.json)


if __name__ == "__main__":
    main()
