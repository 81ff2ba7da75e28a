"""PPO step throughput of `ppo.ppo_trainer.PPOTrainer` with the TRL peer's shapes and settings.

Per step: 8 prompts x 32 random token ids, 64 sampled new tokens per prompt (temperature 1, top_p
1, no stop token: every response is exactly 64 tokens), scoring by the actor, the reference, the
reward model and the critic, then 1 PPO update over 1 micro-batch of 8 (actor and critic
forward/backward + AdamW step). Policy/reference: Llama hidden 256, 4 layers, 4 heads,
intermediate 512, vocab 1000 (`--shapes smollm2`: the SmolLM2-135M-Instruct architecture, see
benchmarks/shapes.py); reward/critic: the same backbone with a 1-output score head. fp32, 1
thread, OMP_WAIT_POLICY=PASSIVE. The first `--warmup` steps are not counted; the trainer's final
model save is skipped (it is not part of a step).

Phase times are measured around the trainer's own calls (nothing is re-implemented):
  generation = the rollout engine's generate; scoring = the rest of `start_rollout` (the rollout
  and every scoring forward); actor / critic = their `training_step` (forward + backward) plus
  their optimizer's step (with old values from the critic's update, its one forward is there).

Floor: the step's matmul FLOPs per phase (benchmarks/flops.py, counted from the shapes) divided by
the GEMM rate of an fp32 matmul probe run in this process after training; the share of the floor
is floor / measured time (1.0: every FLOP at the probe's rate). Decoding 8 rows streams every
weight from memory per token, so generation has a second, memory-bound floor: the prompt pass at
the GEMM rate plus the measured time of the decode steps' weight matmuls alone; the "streaming"
floor puts generation at the larger of the two.

Prints progress lines, then one line of JSON (the last line). Usage, from anywhere:
    python benchmarks/bench_ppo.py [--steps 11] [--warmup 1] [--shapes default|large|smollm2] [--mkl-avx2] [--json out.json]
    python benchmarks/bench_ppo.py --algorithm grpo   # or rloo: 4 prompts x 2 completions, no critic

`--algorithm grpo|rloo` matches the peer's bench_trl_grpo_rloo.py: 8 completions per step = 4
prompts x 2 (num_return_sequences), KL coefficient 0.05 against the reference (GRPO: k3 KL loss
term, RLOO: in the reward, as TRL does), no critic. `--old-log-probs` picks where the actor's old
log-probs come from: auto (the trainer's rule: the rollout engine's when fp32 without AMP),
rollout, or recompute (an actor scoring forward). `--old-values` likewise for the critic's old
values: auto (from its first training forward whenever a rollout is one optimizer step, as here),
update, or score (a critic scoring forward).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections import defaultdict

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchutil import PEER_REFERENCE, PEER_REFERENCE_BY_ALGORITHM, Window, decode_matmul_seconds, describe_mkl, emit_result, gemm_probe, peak_rss_mib, setup_process  # noqa: E402
from flops import Decoder, by_bench_phase, floor_report, ppo_step_flops, prompt_pass_flops  # noqa: E402
from shapes import SHAPES, build_causal_lm, llama_config  # noqa: E402

PHASES = ("generation", "scoring", "actor", "critic")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", choices=sorted(SHAPES), default="default")
    parser.add_argument("--steps", type=int, default=11, help="PPO steps run, warm-up included")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--algorithm", choices=("ppo", "grpo", "rloo"), default="ppo")
    parser.add_argument("--batch", type=int, default=None, help="prompts per step (default 8 for ppo, 4 for grpo/rloo)")
    parser.add_argument("--completions-per-prompt", type=int, default=None, help="default 1 for ppo, 2 for grpo/rloo")
    parser.add_argument("--kl", type=float, default=0.05, help="grpo/rloo: KL coefficient (the peer's beta)")
    parser.add_argument("--old-log-probs", choices=("auto", "rollout", "recompute"), default="auto")
    parser.add_argument("--old-values", choices=("auto", "update", "score"), default="auto")
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
    group = args.algorithm != "ppo"
    args.batch = args.batch if args.batch is not None else (4 if group else 8)
    args.completions_per_prompt = args.completions_per_prompt if args.completions_per_prompt is not None else (2 if group else 1)
    if group and args.completions_per_prompt < 2:
        parser.error(f"--algorithm {args.algorithm} needs --completions-per-prompt >= 2")
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
    print(describe_mkl(environment), flush=True)

    import paddle
    from paddlenlp.transformers import AutoTokenizer

    from ppo.arguments import PPOTrainingArguments
    from ppo.infer_utils import RolloutEngine
    from ppo.models import AutoModelForScore
    from ppo.ppo_trainer import PPOTrainer
    from ppo.tiny import build_tokenizer

    shapes = SHAPES[args.shapes]
    max_length = args.prompt_len + args.new_tokens
    work_dir = tempfile.mkdtemp(prefix="bench_ppo_")
    # The tiny tokenizer (512 pieces) serves only for its pad id here: prompts are random ids,
    # the EOS is replaced below and nothing is decoded, so it works with any model vocabulary.
    build_tokenizer(os.path.join(work_dir, "tokenizer"))
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(work_dir, "tokenizer"), padding_side="left")

    # Actor and reference start equal, as do reward model and critic (the peer loads each twice).
    actor = build_causal_lm(shapes, max_length, seed=args.seed)
    reference = build_causal_lm(shapes, max_length, seed=args.seed)
    score_config = llama_config(shapes, max_length)
    paddle.seed(args.seed + 1)
    reward_model = AutoModelForScore.from_config(score_config, score_type="reward", do_normalize=False)
    critic = None
    if args.algorithm == "ppo":
        critic = AutoModelForScore.from_config(score_config, score_type="critic", do_normalize=False)
        critic.set_state_dict(reward_model.state_dict())

    paddle.seed(args.seed)
    vocab = shapes["vocab_size"]
    # Ids in [4, vocab): any token of the model above the special ids 0-3.
    prompt_ids = paddle.randint(4, vocab, [args.batch * args.steps, args.prompt_len], dtype="int64").numpy().tolist()
    dataset = FixedLengthPrompts(prompt_ids, tokenizer.pad_token_id)

    rows = args.batch * args.completions_per_prompt
    algorithm = {"ppo": {}, "grpo": dict(kl_coeff=0.0, kl_loss_coeff=args.kl), "rloo": dict(kl_coeff=args.kl)}[args.algorithm]
    training_args = PPOTrainingArguments(
        output_dir=os.path.join(work_dir, "ppo"),
        rl_algorithm=args.algorithm,
        num_return_sequences=args.completions_per_prompt,
        **algorithm,
        per_device_prompt_batch_size=args.batch,
        per_device_train_batch_size=rows,
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
        ptx_coeff=0.0,
        logging_steps=args.steps,
        save_strategy="no",
        evaluation_strategy="no",
        report_to=["none"],
        disable_tqdm=True,
        seed=args.seed,
        offload_level="",
        # Gradients freed after each optimizer step, as config/llama/ppo_argument.json ships and
        # as TRL (`zero_grad(set_to_none=True)`) does: PaddleNLP's default zeroes and keeps them.
        release_grads=True,
        # Read by RLTrainer.values_from_update, decided when the trainer is built.
        old_values_from_update={"auto": None, "update": True, "score": False}[args.old_values],
    )
    trainer = PPOTrainer(
        args=training_args, actor_model=actor, reference_model=reference, reward_model=reward_model,
        critic_model=critic, tokenizer=tokenizer, train_dataset=dataset, max_length=max_length,
    )
    # Read by RLTrainer.old_log_probs_from_rollout (None: its automatic rule).
    training_args.old_log_probs_from_rollout = {"auto": None, "rollout": True, "recompute": False}[args.old_log_probs]
    # No stop token, like the peer (stop_token=None): an EOS id outside the vocabulary.
    trainer.engine = RolloutEngine(actor, eos_token_id=vocab, pad_token_id=tokenizer.pad_token_id, backend=args.backend)

    clock = PhaseClock()
    clock.wrap(trainer, "start_rollout", "rollout", starts_step=True)
    clock.wrap(trainer.engine, "generate", "generation")
    clock.wrap(trainer.actor_trainer, "training_step", "actor")
    roles = list(trainer.trainers)  # "actor", and "critic" for ppo
    if "critic" in roles:
        clock.wrap(trainer.trainers["critic"], "training_step", "critic")
    for role in roles:
        role_trainer = trainer.trainers[role]
        create = role_trainer.create_optimizer_and_scheduler

        def create_and_time(*a, _create=create, _trainer=role_trainer, _role=role, **k):
            result = _create(*a, **k)
            clock.wrap(_trainer.optimizer, "step", _role)
            return result

        role_trainer.create_optimizer_and_scheduler = create_and_time

    # The trainer saves both models once the loop ends (~1 GB at smollm2 shapes): not part of a
    # step, so skip it and take the moment it would start as the end of the last step.
    loop_end = {}

    def skip_final_save():
        loop_end.update(wall=time.perf_counter(), cpu=time.process_time())

    trainer.save_final_models = skip_final_save

    with Window() as window:
        trainer.train()
    rss = peak_rss_mib()
    shutil.rmtree(work_dir, ignore_errors=True)

    starts = [step["start"] for step in clock.steps] + [loop_end["wall"]]
    step_seconds = [starts[i + 1] - starts[i] for i in range(len(clock.steps))]
    cpu_starts = [step["cpu_start"] for step in clock.steps] + [loop_end["cpu"]]
    step_cpu_seconds = [cpu_starts[i + 1] - cpu_starts[i] for i in range(len(clock.steps))]
    measured = list(range(args.warmup, len(clock.steps)))
    phases = {}
    for phase in PHASES:
        if phase == "critic" and "critic" not in roles:
            continue
        if phase == "scoring":
            values = [clock.steps[i]["rollout"] - clock.steps[i]["generation"] for i in measured]
        else:
            values = [clock.steps[i][phase] for i in measured]
        phases[phase] = round(statistics.median(values), 4)
    step_median = statistics.median(step_seconds[i] for i in measured)
    new_tokens = rows * args.new_tokens
    generation_tps = new_tokens / phases["generation"]

    # After training, in this process: the same MKL kernels, threads and (shared) machine.
    from_rollout = trainer.old_log_probs_from_rollout
    passes = ppo_step_flops(
        Decoder.from_shapes(shapes), rows, args.prompt_len, args.new_tokens,
        with_critic="critic" in roles, with_actor_scoring=not from_rollout,
        with_critic_scoring=not trainer.values_from_update,
    )  # fmt: skip
    probe = gemm_probe()
    # Generation bound by memory instead: the prompt pass at the GEMM rate, then every new token
    # but the last fed back through the weights (the weight matmuls alone, measured here).
    decode_seconds = decode_matmul_seconds(actor, rows, args.new_tokens - 1)
    prompt_seconds = prompt_pass_flops(Decoder.from_shapes(shapes), rows, args.prompt_len) / (probe["gflops_per_second"] * 1e9)
    floor = floor_report(passes, probe["gflops_per_second"], phases, step_median, streaming_generation_seconds=prompt_seconds + decode_seconds)
    floor_result = {
        "tflop_per_step": round(sum(passes.values()) / 1e12, 4),
        "gflop_by_pass": {name: round(flops / 1e9, 2) for name, flops in passes.items()},
        "gflop_by_phase": {name: round(flops / 1e9, 2) for name, flops in by_bench_phase(passes).items()},
        "gemm_probe": {key: round(value, 2) if isinstance(value, float) else value for key, value in probe.items()},
        "floor_seconds": round(floor["floor_seconds"], 4),
        "floor_seconds_without_optional_scoring_forwards": round(floor["floor_seconds_without_optional_passes"], 4),
        "share_of_floor": round(floor["share_of_floor"], 3),
        "phase_floor_seconds": {name: round(value, 4) for name, value in floor["phase_floor_seconds"].items()},
        "phase_share_of_floor": {name: round(value, 3) for name, value in floor["phase_share_of_floor"].items()},
        "decode_matmul_seconds": round(decode_seconds, 4),
        "streaming_floor_seconds": round(floor["streaming_floor_seconds"], 4),
        "share_of_streaming_floor": round(floor["share_of_streaming_floor"], 3),
        "generation_share_of_streaming_floor": round(floor["generation_share_of_streaming_floor"], 3),
    }
    peer = dict(PEER_REFERENCE.get(args.shapes, {}))
    if args.algorithm != "ppo":  # the peer's GRPO/RLOO step; its PPO memory is not comparable
        peer = {"trl_ppo_step_seconds": PEER_REFERENCE_BY_ALGORITHM[args.algorithm][args.shapes]} if args.shapes in PEER_REFERENCE_BY_ALGORITHM[args.algorithm] else {}
    ratios = {}
    if "trl_ppo_step_seconds" in peer:
        ratios["step_throughput_vs_trl_peer"] = round(peer["trl_ppo_step_seconds"] / step_median, 2)
    if "trl_ppo_peak_rss_mib" in peer:
        ratios["peak_rss_vs_trl_peer"] = round(rss / peer["trl_ppo_peak_rss_mib"], 2)
    result = {
        "bench": "ppo" if args.algorithm == "ppo" else args.algorithm,
        "algorithm": args.algorithm,
        "old_log_probs_from_rollout": from_rollout,
        "old_values_from_update": trainer.values_from_update,
        "ppo_step_seconds": round(step_median, 4),
        "generated_tokens_per_second": round(new_tokens / step_median, 1),
        "generation_phase_tokens_per_second": round(generation_tps, 1),
        "phases": phases,
        "peak_rss_mib": round(rss, 1),
        "step_own_cpu_seconds_median": round(statistics.median(step_cpu_seconds[i] for i in measured), 4),
        "step_seconds_all": [round(s, 4) for s in step_seconds],
        "measured_steps": len(measured),
        "rollout_backend": trainer.engine.backend,
        "floor": floor_result,
        "peer_trl": {"ppo_step_seconds": peer.get("trl_ppo_step_seconds"), "peak_rss_mib": peer.get("trl_ppo_peak_rss_mib")},
        "ratios": ratios,
        "other_processes_cores_avg": round(window.foreign_cores, 2),
        "config": {"shapes": args.shapes, **shapes, "batch": args.batch, "prompt_len": args.prompt_len,
                   "completions_per_prompt": args.completions_per_prompt, "rows": rows,
                   "new_tokens": args.new_tokens, "steps": args.steps, "warmup": args.warmup, "lr": args.lr,
                   "update_iters": 1, "micro_batches": 1, "dtype": "float32", "release_grads": True},
        "environment": {**environment, "paddle": paddle.__version__, "cpu_count": os.cpu_count()},
    }
    if ratios.get("step_throughput_vs_trl_peer"):
        print(f"step throughput vs the peer's TRL {args.algorithm.upper()} step ({peer['trl_ppo_step_seconds']} s, its README): "
              f"{ratios['step_throughput_vs_trl_peer']:.2f}x", flush=True)
    print(f"{args.algorithm.upper()} step median {step_median:.3f} s over {len(measured)} steps -> {new_tokens / step_median:.1f} generated tokens/s "
          f"end to end; phases (s): {phases}; peak RSS {rss:.0f} MiB", flush=True)
    by_phase = ", ".join(f"{name} {value / 1e3:.3f}" for name, value in floor_result["gflop_by_phase"].items())
    print(f"step arithmetic {floor_result['tflop_per_step']:.3f} TFLOP ({by_phase}); GEMM probe {probe['shape']} fp32, "
          f"{args.threads} thread(s): {probe['gflops_per_second']:.1f} GFLOP/s (median {probe['gflops_per_second_median']:.1f}) "
          f"-> floor {floor['floor_seconds']:.2f} s per step ({floor['floor_seconds_without_optional_passes']:.2f} s without "
          f"the actor's and critic's scoring forwards)", flush=True)
    shares = ", ".join(f"{name} {value:.0%}" for name, value in floor["phase_share_of_floor"].items())
    print(f"this run reaches {floor['share_of_floor']:.1%} of the floor ({step_median:.2f} s per step); per phase: {shares}; "
          f"{describe_mkl(environment)}", flush=True)
    print(f"with generation bound by memory (prompt pass {prompt_seconds:.2f} s at the probe's rate + the decode steps' weight "
          f"matmuls {decode_seconds:.2f} s, measured): streaming floor {floor['streaming_floor_seconds']:.2f} s per step; this run "
          f"reaches {floor['share_of_streaming_floor']:.1%} of the streaming floor (generation {floor['generation_share_of_streaming_floor']:.0%})", flush=True)
    emit_result(result, args.json)


if __name__ == "__main__":
    main()
