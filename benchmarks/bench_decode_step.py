"""Options for the per-token decode step, timed one step at a time (own CPU time, so other load on
the machine matters less): what `ppo/models/infer_model_utils.py` was chosen from.

  cpu_extension_step the step in one C++ call (`ppo/models/cpu_decode.py`; what the engine runs
                     on CPU when the extension is available)
  eager_decoder      `decode_step`: our eager step on the training model's parameters
  to_static_step     the same math as a pure function compiled with paddle.jit.to_static
                     (parameters and caches passed as inputs so they stay shared; the new key /
                     value written into the cache eagerly afterwards)
  paddlenlp_forward  one token through the PaddleNLP model with its KV cache (what generate runs)
  weight_matmuls     the step's weight matmuls alone (the floor of any decoder built from them)

Each variant's logits are checked against the eager step. Prints one line of JSON (last line).
Usage: python benchmarks/bench_decode_step.py [--shapes default|large|smollm2] [--steps 200] [--mkl-avx2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchutil import setup_process  # noqa: E402
from shapes import SHAPES, build_causal_lm  # noqa: E402


def per_call_ms(fn, calls: int, rounds: int = 5) -> float:
    """Median over rounds of the mean own-CPU milliseconds per call."""
    fn()
    results = []
    for _ in range(rounds):
        start = time.process_time()
        for _ in range(calls):
            fn()
        results.append((time.process_time() - start) / calls * 1000)
    return round(statistics.median(results), 3)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", choices=sorted(SHAPES), default="default")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--steps", type=int, default=200, help="calls per timing round")
    parser.add_argument("--mkl-avx2", action="store_true")
    args = parser.parse_args(argv)
    environment = setup_process(1, args.mkl_avx2)

    import paddle
    import paddle.nn.functional as F

    from ppo.models.cpu_decode import fused_decode_step
    from ppo.models.infer_model_utils import (
        build_rope_tables,
        collect_decoder_weights,
        decode_step,
        prefill,
        rms_norm,
    )
    from ppo.models.ppo_model_utils import make_position_ids

    shapes = SHAPES[args.shapes]
    model = build_causal_lm(shapes, args.prompt_len + 64, seed=0)
    model.eval()
    batch, prompt_len = args.batch, args.prompt_len
    paddle.seed(0)
    input_ids = paddle.randint(4, shapes["vocab_size"], [batch, prompt_len], dtype="int64")
    attention_mask = paddle.ones([batch, prompt_len], dtype="int64")
    slot = prompt_len  # the first generated token's cache slot

    with paddle.no_grad():
        weights = collect_decoder_weights(model)
        rope = build_rope_tables(weights)
        position_ids = make_position_ids(attention_mask)
        logits, cache = prefill(weights, rope, input_ids, attention_mask, position_ids, capacity=prompt_len + 64)
        tokens = paddle.argmax(logits, axis=-1)
        positions = position_ids[:, -1] + 1
        heads, kv_heads, head_dim = weights.num_heads, weights.num_kv_heads, weights.head_dim
        groups = heads // kv_heads
        masked = float(paddle.finfo(paddle.float32).min)

        def hide_slot():
            cache.attention_bias[:, :, :, slot] = masked

        def eager_step():
            return decode_step(weights, rope, cache, tokens, positions, slot)

        hide_slot()
        reference_logits = eager_step()
        extension_step_fn = fused_decode_step(weights, rope)

        def extension_step():
            return extension_step_fn(cache, tokens, positions, slot)

        hide_slot()
        extension_logits = extension_step() if extension_step_fn is not None else None

        def pure_step(token_ids, position_ids_now, bias, cos_table, sin_table, embed, final_norm, lm_head, flat):
            """No in-place writes (a static graph must not mutate its inputs): the current token
            attends to the cache plus itself, and its key/value are returned for writing back."""
            hidden = paddle.gather(embed, token_ids)
            cos, sin = paddle.gather(cos_table, position_ids_now), paddle.gather(sin_table, position_ids_now)
            new_keys, new_values = [], []
            for index in range(len(flat) // 9):
                input_norm, query_key_w, value_w, o_w, post_norm, gate_up_w, down_w, key_cache, value_cache = flat[index * 9 : (index + 1) * 9]
                normed = rms_norm(hidden, input_norm, weights.rms_norm_eps)
                query_key = paddle.matmul(normed, query_key_w)
                value = paddle.matmul(normed, value_w)
                rolled = paddle.roll(query_key.reshape([batch, -1, head_dim]), head_dim // 2, axis=-1).reshape([batch, -1])
                query, key = paddle.split(query_key * cos + rolled * sin, [heads * head_dim, kv_heads * head_dim], axis=-1)
                query = (query * (1.0 / head_dim**0.5)).reshape([batch, kv_heads, groups, head_dim])
                cached_scores = paddle.matmul(query, key_cache, transpose_y=True) + bias
                own_score = paddle.matmul(query, key.reshape([batch, kv_heads, head_dim, 1]))
                probs = F.softmax(paddle.concat([cached_scores, own_score], axis=-1), axis=-1)
                cached_probs, own_prob = paddle.split(probs, [key_cache.shape[2], 1], axis=-1)
                attended = paddle.matmul(cached_probs, value_cache) + paddle.matmul(own_prob, value.reshape([batch, kv_heads, 1, head_dim]))
                hidden = hidden + paddle.matmul(attended.reshape([batch, heads * head_dim]), o_w)
                normed = rms_norm(hidden, post_norm, weights.rms_norm_eps)
                hidden = hidden + paddle.matmul(F.swiglu(paddle.matmul(normed, gate_up_w)), down_w)
                new_keys.append(key)
                new_values.append(value)
            normed = rms_norm(hidden, final_norm, weights.rms_norm_eps)
            return paddle.matmul(normed, lm_head, transpose_y=weights.lm_head_transposed), new_keys, new_values

        compiled = paddle.jit.to_static(pure_step, full_graph=True)
        flat = []
        for layer, key_cache, value_cache in zip(weights.layers, cache.keys, cache.values):
            flat += [layer.input_norm, layer.query_key, layer.value, layer.o_proj, layer.post_norm, layer.gate_up,
                     layer.down_proj, key_cache, value_cache]

        def static_step():
            out, new_keys, new_values = compiled(tokens, positions, cache.attention_bias, rope.cos, rope.sin_signed,
                                                 weights.embed_tokens, weights.final_norm, weights.lm_head, flat)
            for key_cache, value_cache, key, value in zip(cache.keys, cache.values, new_keys, new_values):
                key_cache[:, :, slot] = key.reshape([batch, kv_heads, head_dim])
                value_cache[:, :, slot] = value.reshape([batch, kv_heads, head_dim])
            return out

        hide_slot()
        static_logits = static_step()
        cache.reveal_slot(slot)

        # PaddleNLP's own forward for one token with its (concatenated) KV cache.
        full_mask = attention_mask
        outputs = model(input_ids=input_ids, attention_mask=full_mask, position_ids=position_ids, use_cache=True, return_dict=True)
        past = outputs.past_key_values
        step_mask = paddle.ones([batch, prompt_len + 1], dtype="int64")

        def paddlenlp_step():
            return model(input_ids=tokens.unsqueeze(-1), attention_mask=step_mask, position_ids=positions.unsqueeze(-1),
                         past_key_values=past, use_cache=True, return_dict=True).logits[:, -1]

        paddlenlp_logits = paddlenlp_step()

        matmuls = [(layer.query_key, layer.value, layer.o_proj, layer.gate_up, layer.down_proj) for layer in weights.layers]
        hidden_in = paddle.randn([batch, shapes["hidden_size"]])
        intermediate_in = paddle.randn([batch, shapes["intermediate_size"]])

        def weight_matmuls():
            for query_key, value, o_proj, gate_up, down in matmuls:
                for weight in (query_key, value, o_proj, gate_up):
                    paddle.matmul(hidden_in, weight)
                paddle.matmul(intermediate_in, down)
            paddle.matmul(hidden_in, weights.lm_head, transpose_y=weights.lm_head_transposed)

        def max_diff(other):
            return float((other.astype("float32") - reference_logits).abs().max())

        result = {
            "bench": "decode_step",
            "ms_per_step_own_cpu": {
                **({"cpu_extension_step": per_call_ms(extension_step, args.steps)} if extension_step_fn else {}),
                "eager_decoder": per_call_ms(eager_step, args.steps),
                "to_static_step": per_call_ms(static_step, args.steps),
                "paddlenlp_forward": per_call_ms(paddlenlp_step, args.steps),
                "weight_matmuls": per_call_ms(weight_matmuls, args.steps),
            },
            "max_abs_logit_diff_vs_eager": {
                **({"cpu_extension_step": max_diff(extension_logits)} if extension_step_fn else {}),
                "to_static_step": max_diff(static_logits),
                "paddlenlp_forward": max_diff(paddlenlp_logits),
            },
            "config": {"shapes": args.shapes, **shapes, "batch": batch, "prompt_len": prompt_len},
            "environment": {**environment, "paddle": paddle.__version__},
        }
    for name, value in result["ms_per_step_own_cpu"].items():
        print(f"{name:18s} {value:8.3f} ms per step")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
