"""`decode_step` in one C++ call on CPU (the extension's `rlhf_cpu_decode_step`).

Same inputs, outputs and cache effects as `infer_model_utils.decode_step`: the new token's key
and value are written to cache `slot` of every layer, the slot is revealed in the attention
bias, and float32 logits of the next token come back. The math is the eager decoder's, in
float32; only summation orders differ (tests/test_cpu_decode.py bounds the difference and checks
greedy tokens are identical). Used for float32 models on CPU when the extension is available;
`fused_decode_step` returns None otherwise and the caller keeps the eager step.
"""

from __future__ import annotations

from typing import Callable, List, Optional

import paddle

from ppo.models.cpu_extension import load_extension
from ppo.models.infer_model_utils import DecoderWeights, KVCache, RopeTables

DecodeFn = Callable[[KVCache, paddle.Tensor, paddle.Tensor, int], paddle.Tensor]


def _flat_layer_weights(weights: DecoderWeights) -> List[paddle.Tensor]:
    """The order `csrc/cpu_decode.cc` reads: 7 tensors per layer, 9 with q|k and v biases."""
    flat = []
    for layer in weights.layers:
        flat += [layer.input_norm, layer.query_key, layer.value, layer.o_proj, layer.post_norm, layer.gate_up, layer.down_proj]
        if layer.query_key_bias is not None:
            flat += [layer.query_key_bias, layer.value_bias]
    return flat


def unsupported_reason(weights: DecoderWeights, rope: RopeTables) -> Optional[str]:
    tensors = _flat_layer_weights(weights) + [weights.embed_tokens, weights.final_norm, weights.lm_head, rope.cos, rope.sin_signed]
    if any(t.dtype != paddle.float32 for t in tensors):
        return "weights are not float32"
    if any(not t.place.is_cpu_place() for t in tensors):
        return "weights are not on the CPU"
    if any(not t.is_contiguous() for t in tensors):
        return "non-contiguous weights"
    if weights.head_dim % 2 or weights.num_heads % weights.num_kv_heads:
        return f"head_dim {weights.head_dim} / heads {weights.num_heads} / kv heads {weights.num_kv_heads}"
    return None


def fused_decode_step(weights: DecoderWeights, rope: RopeTables) -> Optional[DecodeFn]:
    """A `decode_step(cache, token_ids, positions, slot)` running in the extension, or None when
    the extension is unavailable or the model is outside what it computes."""
    if unsupported_reason(weights, rope) is not None:
        return None
    extension = load_extension()
    if extension is None:
        return None
    layer_weights = _flat_layer_weights(weights)
    has_bias = weights.layers[0].query_key_bias is not None

    def step(cache: KVCache, token_ids: paddle.Tensor, positions: paddle.Tensor, slot: int) -> paddle.Tensor:
        return extension.rlhf_cpu_decode_step(
            token_ids if token_ids.dtype == paddle.int64 else token_ids.astype("int64"),
            positions if positions.dtype == paddle.int64 else positions.astype("int64"),
            weights.embed_tokens,
            rope.cos,
            rope.sin_signed,
            layer_weights,
            cache.keys,
            cache.values,
            cache.attention_bias,
            weights.final_norm,
            weights.lm_head,
            slot,
            float(weights.rms_norm_eps),
            weights.num_heads,
            weights.num_kv_heads,
            has_bias,
            weights.lm_head_transposed,
            weights.divide_query_by_sqrt_dim,
        )

    return step
