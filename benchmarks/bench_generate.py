"""Rollout throughput: PaddleNLP `generate` (KV cache on) vs our rollout engine, and the per-token
compute floor, on a randomly initialised Llama.

Default shapes are the TRL peer's (../shared/peer/trl): hidden 256, 4 layers, 4 heads,
intermediate 512, vocab 1000; `--shapes smollm2` is the SmolLM2-135M-Instruct architecture
(benchmarks/shapes.py). 8 prompts x 32 random token ids; 64 new tokens, every row exactly 64 (the
EOS id is set outside the vocabulary, so no row stops early); sampling at temperature 1, top_p 1;
fp32; 1 thread; OMP_WAIT_POLICY=PASSIVE.

Compute floor: the wall time of the decode-step weight matmuls alone — per layer [B, hidden] x
q|k, v, o, gate|up and down, plus the LM head, on the model's weights in this process, with the
kernels the engine's decode step uses (the streaming kernels on 32-column panels where the CPU
has AVX-512, else paddle.matmul / MKL; `PADDLE_RLHF_STREAMING_GEMM`) — for all new tokens. It leaves out attention, norms, sampling and the prompt pass, so no
decoder built from these matmuls can beat it.

Prints progress lines, then one line of JSON (the last line). Usage, from anywhere:
    python benchmarks/bench_generate.py [--shapes default|large|smollm2] [--reps 10] [--mkl-avx2] [--json out.json]
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchutil import PEER_REFERENCE, decode_weight_matmuls, describe_mkl, emit_result, peak_rss_mib, setup_process, time_repeats  # noqa: E402
from shapes import SHAPES, build_causal_lm  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", choices=sorted(SHAPES), default="default")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--reps", type=int, default=10, help="timed repetitions per backend (medians reported)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--mkl-avx2", action="store_true", help="set MKL_DEBUG_CPU_TYPE=5 (AMD CPUs: use MKL's AVX2 GEMM)")
    parser.add_argument("--skip-paddlenlp", action="store_true", help="time only the engine and the floor")
    parser.add_argument("--json", default=None, help="also write the result here")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    environment = setup_process(args.threads, args.mkl_avx2)
    print(describe_mkl(environment), flush=True)

    import paddle

    from ppo.infer_utils import RolloutEngine, generate_with_paddlenlp, GenerationSettings

    shapes = SHAPES[args.shapes]
    model = build_causal_lm(shapes, args.prompt_len + args.new_tokens, seed=args.seed)
    model.eval()
    vocab = shapes["vocab_size"]
    paddle.seed(args.seed)
    # Random ids anywhere in the model's vocabulary above the special ids (nothing decodes them).
    input_ids = paddle.randint(4, vocab, [args.batch, args.prompt_len], dtype="int64")
    attention_mask = paddle.ones([args.batch, args.prompt_len], dtype="int64")
    unreachable_eos, pad = vocab, 0  # no row can stop early
    new_tokens = args.batch * args.new_tokens

    engine = RolloutEngine(model, eos_token_id=unreachable_eos, pad_token_id=pad)
    settings = GenerationSettings(max_new_tokens=args.new_tokens, do_sample=True, temperature=1.0, top_p=1.0)

    def run_engine():
        out = engine.generate(input_ids, attention_mask, max_new_tokens=args.new_tokens, do_sample=True)
        assert out.sequences.shape[1] == args.prompt_len + args.new_tokens

    def run_paddlenlp():
        with paddle.no_grad():
            out = generate_with_paddlenlp(model, unreachable_eos, pad, input_ids, attention_mask, settings)
        assert out.sequences.shape[1] == args.prompt_len + args.new_tokens

    decode_step_matmuls = decode_weight_matmuls(model, args.batch)

    def run_floor():
        for _ in range(args.new_tokens):
            decode_step_matmuls()

    # Greedy decoding must agree before speed means anything.
    greedy = dict(max_new_tokens=args.new_tokens, do_sample=False)
    engine_greedy = engine.generate(input_ids, attention_mask, **greedy).sequences.numpy()
    reference = RolloutEngine(model, unreachable_eos, pad, backend="generate").generate(input_ids, attention_mask, **greedy)
    greedy_match = bool((engine_greedy == reference.sequences.numpy()).all())
    print(f"greedy tokens identical (engine vs PaddleNLP generate): {greedy_match}", flush=True)

    timings = {}
    runs = [("engine", run_engine), ("compute_floor", run_floor)]
    if not args.skip_paddlenlp:
        runs.insert(0, ("paddlenlp_generate", run_paddlenlp))
    for name, fn in runs:
        timing = time_repeats(fn, args.reps, args.warmup)
        timing["tokens_per_second"] = new_tokens / timing["s_median"]
        timings[name] = timing
        print(
            f"{name:20s} median {timing['s_median'] * 1000:8.1f} ms -> {timing['tokens_per_second']:8.1f} new tokens/s "
            f"(min {timing['s_min'] * 1000:.1f} max {timing['s_max'] * 1000:.1f} ms; own CPU {timing['own_cpu_s_median'] * 1000:.1f} ms; "
            f"other processes {timing['foreign_cores_avg']} cores)",
            flush=True,
        )

    tokens_per_second = {name: round(t["tokens_per_second"], 1) for name, t in timings.items() if name != "compute_floor"}
    engine_tps = timings["engine"]["tokens_per_second"]
    peer_tps = PEER_REFERENCE.get(args.shapes, {}).get("hf_generate_tokens_per_second")
    ratios = {"engine_vs_compute_floor": round(engine_tps / timings["compute_floor"]["tokens_per_second"], 2)}
    if peer_tps:
        ratios["engine_vs_hf_generate_peer"] = round(engine_tps / peer_tps, 2)
    if "paddlenlp_generate" in timings:
        ratios["engine_vs_paddlenlp_generate"] = round(engine_tps / timings["paddlenlp_generate"]["tokens_per_second"], 2)
    result = {
        "bench": "generate",
        "tokens_per_second": tokens_per_second,
        "compute_floor_tokens_per_second": round(timings["compute_floor"]["tokens_per_second"], 1),
        "ratios": ratios,
        "hf_generate_peer_tokens_per_second": peer_tps,
        "engine_backend": engine.backend,
        "greedy_tokens_match_paddlenlp": greedy_match,
        "timings": {name: {k: round(v, 4) if isinstance(v, float) else v for k, v in t.items()} for name, t in timings.items()},
        "peak_rss_mib": round(peak_rss_mib(), 1),
        "config": {"shapes": args.shapes, **shapes, "batch": args.batch, "prompt_len": args.prompt_len,
                   "new_tokens": args.new_tokens, "reps": args.reps, "warmup": args.warmup, "dtype": "float32"},
        "environment": {**environment, "paddle": paddle.__version__, "cpu_count": os.cpu_count()},
    }
    emit_result(result, args.json)


if __name__ == "__main__":
    main()
