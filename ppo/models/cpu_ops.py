"""Faster CPU formulations of PaddleNLP's Llama/Qwen2 attention, rotary embedding and RMSNorm.

Same math, fewer slow kernels. Measured on Paddle 3.3.1's CPU wheel, one thread, at the
training shapes of a small model ([8, 96, 4, 64] activations):

* a broadcasting elementwise op (`q * cos` with `cos` of shape [1, S, 1, D], `scores + mask`
  over heads) takes Paddle's generic broadcast path, forward and backward: 3.9 ms for `q * cos`
  forward + backward, against 0.55 ms for `expand` + the same-shape op. Such products are made
  same-shape first (`expand` is a cheap copy, and its backward a sum over the expanded axes);
  RMSNorm's [rows, 1] factor and weight are expanded only when a gradient will flow (forward
  only, the broadcast is as fast), and the hidden states go on the left of the product (the
  other way round is 12x slower);
* grouped-query attention runs without repeating the keys and values (`repeat_kv` is a no-op on
  CPU tensors; the attention stacks each key head's group of query heads instead);
* the rotary tables are gathered at the position ids with `index_select` (advanced indexing
  takes a slower path), and rotate_half(x) · sin becomes roll(x) · (sin with its first half
  negated): one op instead of two slices, a negation and a concat (1.4 against 2.2 ms);
* `transpose_y` replaces an explicit transpose of the keys, and float32 scores are not cast to
  float32 again.

A tiny Llama's forward over [8, 96] tokens went from 0.217 to 0.063 s, forward + backward from
0.55 to 0.17 s (torch 2.13 with transformers: 0.063 and 0.19 s), together with the strided-view
kernels turned off (`kernels.install_plain_cpu_kernels`).

`install` swaps these in for PaddleNLP's module-level `apply_rotary_pos_emb`, `repeat_kv` and
`scaled_dot_product_attention` (Llama and Qwen2); every call on a GPU tensor, under `to_static`,
or with an option these do not cover (flash attention, alibi, sequence/context parallel
resharding, float16's pre-divided scores, no mask) runs PaddleNLP's own function, on keys and
values repeated as it expects. `tests/test_cpu_ops.py` checks outputs and gradients against
PaddleNLP's functions.
"""

from __future__ import annotations

import math

import paddle
import paddle.nn.functional as F

from ppo.models import cpu_fused

_PADDLENLP_FUNCTIONS = {}  # (module name, function name) -> PaddleNLP's own function


def _plain_cpu(*tensors) -> bool:
    """True in dynamic mode when every tensor lives on the CPU."""
    if not paddle.in_dynamic_mode():
        return False
    return all(t.place.is_cpu_place() for t in tensors)


def _gather_rotary(cos, sin, position_ids, seq_len):
    """The [1, max_pos, 1, dim] tables at each row's positions, [rows, seq, 1, dim]; the sine with
    its first half negated, so that rotate_half(x) * sin == roll(x, dim / 2) * sin_signed."""
    with paddle.no_grad():
        if position_ids is None:
            cos, sin = cos[:, :seq_len, :, :], sin[:, :seq_len, :, :]
        else:
            rows, dim = position_ids.shape[0], cos.shape[-1]
            flat = position_ids.reshape([-1])
            cos = paddle.index_select(cos.reshape([-1, dim]), flat).reshape([rows, seq_len, 1, dim])
            sin = paddle.index_select(sin.reshape([-1, dim]), flat).reshape([rows, seq_len, 1, dim])
        half = sin.shape[-1] // 2
        return cos, paddle.concat([-sin[..., :half], sin[..., half:]], axis=-1)


def apply_rotary_pos_emb(q, k, cos, sin, position_ids):
    """PaddleNLP's `apply_rotary_pos_emb` (q, k: [bs, seq, heads, dim]) with the tables gathered
    once and expanded to each operand's shape (once when q and k have the same heads). Llama's
    and Qwen2's are the same code; either serves as fallback."""
    if not (cos.stop_gradient and sin.stop_gradient) or not _plain_cpu(q, k, cos):
        return _PADDLENLP_FUNCTIONS[("llama", "apply_rotary_pos_emb")](q, k, cos, sin, position_ids)
    if cpu_fused.applicable(q, k, cos, sin):
        dim = cos.shape[-1]
        return cpu_fused.rotary(q, k, cos.reshape([-1, dim]), sin.reshape([-1, dim]), position_ids)
    cos, sin_signed = _gather_rotary(cos, sin, position_ids, q.shape[1])
    expanded = {}

    def rotate(x):  # x · cos + rotate_half(x) · sin
        shape = tuple(x.shape)
        if shape not in expanded:
            expanded[shape] = (cos.expand(list(shape)), sin_signed.expand(list(shape)))
        cos_x, sin_x = expanded[shape]
        return x * cos_x + paddle.roll(x, shape[-1] // 2, axis=-1) * sin_x

    return rotate(q), rotate(k)


def repeat_kv(hidden_states: paddle.Tensor, n_rep: int) -> paddle.Tensor:
    """PaddleNLP's `repeat_kv`, except on plain CPU tensors: there the keys and values stay
    [bs, seq, kv_heads, dim] and the attention below groups the query heads instead (a tiled copy
    of the keys and values and its backward cost 8.7 ms per tensor at SmolLM2's [8, 96, 3, 64];
    30 layers, two tensors, four passes per PPO step)."""
    if n_rep == 1 or _plain_cpu(hidden_states):
        return hidden_states
    return _PADDLENLP_FUNCTIONS[("llama", "repeat_kv")](hidden_states, n_rep)


def _attention(query, key, value, attention_mask, output_attentions, sequence_parallel,
               dropout=0.0, training=False):
    """softmax(q kᵀ / √d + mask) v for [bs, seq, heads, dim] inputs, PaddleNLP's layout and
    output shape ([bs, seq, heads·dim], or [bs·seq, heads·dim] under sequence parallel).

    Keys and values may have fewer heads than the query (grouped-query attention, not repeated):
    query head h attends with key head h // groups, as after PaddleNLP's `repeat_kv`. The groups
    of query heads are stacked along the sequence axis, so one batched matmul serves each key
    head: [bs, kv_heads, groups·seq, dim] x [bs, kv_heads, dim, kv_seq]."""
    bsz, q_len, num_heads, head_dim = query.shape
    kv_len, kv_heads = key.shape[1], key.shape[2]
    groups = num_heads // kv_heads
    query = paddle.transpose(query, [0, 2, 1, 3]).reshape([bsz, kv_heads, groups * q_len, head_dim])
    key = paddle.transpose(key, [0, 2, 1, 3])
    value = paddle.transpose(value, [0, 2, 1, 3])
    scores = paddle.matmul(query * (1.0 / math.sqrt(head_dim)), key, transpose_y=True)
    mask = attention_mask.reshape([bsz, 1, q_len, kv_len]).expand([bsz, num_heads, q_len, kv_len])
    scores = scores + mask.reshape([bsz, kv_heads, groups * q_len, kv_len])
    with paddle.amp.auto_cast(False):
        if scores.dtype != paddle.float32:
            scores = scores.astype("float32")
        weights = F.softmax(scores, axis=-1)
        if weights.dtype != query.dtype:
            weights = weights.astype(query.dtype)
    if dropout:
        weights = F.dropout(weights, p=dropout, training=training)
    output = paddle.matmul(weights, value).reshape([bsz, num_heads, q_len, head_dim]).transpose([0, 2, 1, 3])
    rows = bsz * q_len if sequence_parallel else None
    output = output.reshape([rows, head_dim * num_heads] if rows else [bsz, q_len, head_dim * num_heads])
    if output_attentions:
        return output, weights.reshape([bsz, num_heads, q_len, kv_len])
    return output


def _repeated(query, key, value):
    """Keys and values repeated to the query's heads, for PaddleNLP's own attention."""
    groups = query.shape[2] // key.shape[2]
    if groups == 1:
        return key, value
    original = _PADDLENLP_FUNCTIONS[("llama", "repeat_kv")]
    return original(key, groups), original(value, groups)


def _covered(query, key, value, attention_mask, config) -> bool:
    return (
        _plain_cpu(query, key, value)
        and attention_mask is not None
        and attention_mask.dtype == query.dtype
        and query.dtype != paddle.float16
        and not config.use_flash_attention
        and getattr(config, "context_parallel_degree", 1) <= 1
    )


def llama_scaled_dot_product_attention(query_states, config, key_states, value_states, attention_mask,
                                       output_attentions, alibi=None, attn_mask_startend_row_indices=None,
                                       sequence_parallel=False, reshard_layer=None, npu_is_casual=False,
                                       skip_recompute=False):
    """PaddleNLP Llama's `scaled_dot_product_attention`, same signature."""
    if (alibi is not None or reshard_layer is not None or attn_mask_startend_row_indices is not None
            or not _covered(query_states, key_states, value_states, attention_mask, config)):
        key_states, value_states = _repeated(query_states, key_states, value_states)
        return _PADDLENLP_FUNCTIONS[("llama", "scaled_dot_product_attention")](
            query_states, config, key_states, value_states, attention_mask, output_attentions, alibi=alibi,
            attn_mask_startend_row_indices=attn_mask_startend_row_indices, sequence_parallel=sequence_parallel,
            reshard_layer=reshard_layer, npu_is_casual=npu_is_casual, skip_recompute=skip_recompute)
    return _attention(query_states, key_states, value_states, attention_mask, output_attentions, sequence_parallel)


def qwen2_scaled_dot_product_attention(query_states, config, key_states, value_states, attention_mask,
                                       output_attentions, attn_mask_startend_row_indices=None, training=True,
                                       sequence_parallel=False, skip_recompute=False):
    """PaddleNLP Qwen2's `scaled_dot_product_attention`, same signature (with its attention dropout)."""
    if attn_mask_startend_row_indices is not None or not _covered(
            query_states, key_states, value_states, attention_mask, config):
        key_states, value_states = _repeated(query_states, key_states, value_states)
        return _PADDLENLP_FUNCTIONS[("qwen2", "scaled_dot_product_attention")](
            query_states, config, key_states, value_states, attention_mask, output_attentions,
            attn_mask_startend_row_indices=attn_mask_startend_row_indices, training=training,
            sequence_parallel=sequence_parallel, skip_recompute=skip_recompute)
    return _attention(query_states, key_states, value_states, attention_mask, output_attentions, sequence_parallel,
                      dropout=config.attention_dropout, training=training)


def _expand_for_backward(*tensors) -> bool:
    """Expand a row/column factor before multiplying only when a gradient will flow: the broadcast
    kernel's backward (a reduction) is the slow part. Forward only, the broadcast is as fast or
    faster (3.5 against 7.6 us at [8, 256], 1.4 against 2.2 ms at [3072, 256])."""
    return paddle.is_grad_enabled() and not all(t.stop_gradient for t in tensors) and _plain_cpu(*tensors)


def rms_norm_scale(hidden: paddle.Tensor, variance: paddle.Tensor, eps: float) -> paddle.Tensor:
    """`rsqrt(variance + eps) * hidden` for a [..., 1] variance."""
    factor = paddle.rsqrt(variance + eps)
    if _expand_for_backward(hidden):
        factor = factor.expand(hidden.shape)
    # hidden first: with the broadcast operand on the left Paddle's CPU kernel is ~12x slower
    # (2.3 against 0.19 ms at [8, 96, 1] x [8, 96, 256]).
    return hidden * factor


def scale_by_weight(hidden: paddle.Tensor, weight: paddle.Tensor) -> paddle.Tensor:
    """`hidden * weight` for a weight over the last axis."""
    if _expand_for_backward(hidden, weight) and list(weight.shape) != list(hidden.shape):
        return hidden * weight.expand(hidden.shape)
    return hidden * weight


def install() -> None:
    """Swap the functions above in for PaddleNLP's (idempotent). Must run before models are built:
    the attention layers bind `scaled_dot_product_attention` in `__init__`."""
    from paddlenlp.transformers.llama import modeling as llama_modeling
    from paddlenlp.transformers.qwen2 import modeling as qwen2_modeling

    replacements = {
        "llama": (llama_modeling, {"apply_rotary_pos_emb": apply_rotary_pos_emb, "repeat_kv": repeat_kv,
                                   "scaled_dot_product_attention": llama_scaled_dot_product_attention}),
        "qwen2": (qwen2_modeling, {"apply_rotary_pos_emb": apply_rotary_pos_emb, "repeat_kv": repeat_kv,
                                   "scaled_dot_product_attention": qwen2_scaled_dot_product_attention}),
    }
    for name, (module, functions) in replacements.items():
        for function_name, replacement in functions.items():
            if getattr(module, function_name) is not replacement:
                _PADDLENLP_FUNCTIONS[(name, function_name)] = getattr(module, function_name)
                setattr(module, function_name, replacement)
