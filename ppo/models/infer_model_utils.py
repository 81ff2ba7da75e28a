"""Inference building blocks for rollout: a KV-cached decoder that reads the training model's
own parameters, the sampling step, and the weight packing used by PaddleNLP's fused inference
models.

Everything here is a function of tensors (no engine state). `ppo/infer_utils.py` drives the
generation loop with them.

Why a separate decoder instead of `model.generate` on CPU: at rollout sizes the PaddleNLP
forward pays for work a single decode step does not need (4-D masks rebuilt every step, cache
concatenation, middle-axis broadcasts, which are slow on Paddle's CPU kernels). The decoder below
keeps one pre-allocated cache, only same-shape or last-axis elementwise ops, `rms_norm` /
`swiglu` that are fused kernels on GPU and plain ops on CPU (`ppo.models.kernels`), and reads
the very same `Parameter` objects the optimizer updates
(no copy of the weights survives a `generate` call, so nothing needs syncing). Per decode step
(`benchmarks/bench_decode_step.py`, Llama hidden 256 x 4 layers, batch 8): 4.6 ms, against 11.5 ms
for the PaddleNLP forward with its cache and 9.0 ms for the same math compiled with
`paddle.jit.to_static`; the weight matmuls alone take 3.2 ms of it. On CPU the engine runs the same
step as one C++ call when the extension is available (`ppo/models/cpu_decode.py`: 1.35 ms at
those shapes); `decode_step` here stays the reference it is tested against and the fallback.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Tuple

import paddle
import paddle.nn.functional as F

from ppo.models.kernels import rms_norm, swiglu
from ppo.models.ppo_model_utils import as_float32


class UnsupportedModelError(ValueError):
    """The model (or one of its config options) is outside what the fast decoder implements."""


# Architectures the decoder implements, by model class name -> attribute holding the base model.
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
}


# ----------------------------------------------------------------------------------------------
# Weights


@dataclass
class DecoderLayerWeights:
    """One transformer block. Tensors are the model's own parameters, or (for `query_key` and
    `gate_up`) a concatenation of them made at the start of a `generate` call."""

    input_norm: paddle.Tensor  # [hidden]
    # q and k share one matmul (RoPE then rotates both in one pass); v gets its own so that no
    # output needs slicing (strided views cost a copy in the next op).
    query_key: paddle.Tensor  # [hidden, (H + Hkv) * D]: q heads, then k heads
    query_key_bias: Optional[paddle.Tensor]  # [(H + Hkv) * D] (Qwen2) or None (Llama)
    value: paddle.Tensor  # [hidden, Hkv * D]
    value_bias: Optional[paddle.Tensor]  # [Hkv * D] or None
    o_proj: paddle.Tensor  # [H * D, hidden]
    post_norm: paddle.Tensor  # [hidden]
    gate_up: paddle.Tensor  # [hidden, 2 * intermediate]: gate columns, then up columns
    down_proj: paddle.Tensor  # [intermediate, hidden]


@dataclass
class DecoderWeights:
    architecture: str
    embed_tokens: paddle.Tensor  # [V, hidden]
    layers: List[DecoderLayerWeights]
    final_norm: paddle.Tensor  # [hidden]
    lm_head: paddle.Tensor  # [hidden, V], or [V, hidden] when lm_head_transposed
    lm_head_transposed: bool
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_cos: paddle.Tensor  # [max_positions, D] the model's own RoPE table
    rope_sin: paddle.Tensor  # [max_positions, D]
    # Llama multiplies q by 1/sqrt(D), Qwen2 divides q by sqrt(D); mirrored for identical rounding.
    divide_query_by_sqrt_dim: bool

    @property
    def max_positions(self) -> int:
        return self.rope_cos.shape[0]

    @property
    def dtype(self):
        return self.embed_tokens.dtype


def split_interleaved_qkv(
    qkv_weight: paddle.Tensor,  # [hidden, Hkv * (G + 2) * D] PaddleNLP's fused `qkv_proj` layout
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
) -> Tuple[paddle.Tensor, paddle.Tensor, paddle.Tensor]:
    """Undo PaddleNLP's `fuse_attention_qkv` layout into separate q/k/v weights.

    The fused projection groups its output columns per key/value head: for each of the Hkv heads,
    G = H / Hkv query heads, then that head's key, then its value. Returns q [hidden, H*D],
    k [hidden, Hkv*D], v [hidden, Hkv*D] (works for bias vectors too: pass [1, N] and squeeze).
    """
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads={num_heads} is not a multiple of num_kv_heads={num_kv_heads}")
    groups = num_heads // num_kv_heads
    rows = qkv_weight.shape[0]
    expected = num_kv_heads * (groups + 2) * head_dim
    if qkv_weight.shape[-1] != expected:
        raise ValueError(f"fused qkv has {qkv_weight.shape[-1]} columns, expected {expected} for "
                         f"{num_heads} heads / {num_kv_heads} kv heads / head_dim {head_dim}")
    grouped = qkv_weight.reshape([rows, num_kv_heads, groups + 2, head_dim])
    q = grouped[:, :, :groups].reshape([rows, num_heads * head_dim])
    k = grouped[:, :, groups].reshape([rows, num_kv_heads * head_dim])
    v = grouped[:, :, groups + 1].reshape([rows, num_kv_heads * head_dim])
    return q, k, v


def pack_qkv_for_fused_inference(
    q_weight: paddle.Tensor,  # [hidden, H*D]
    k_weight: paddle.Tensor,  # [hidden, Hkv*D]
    v_weight: paddle.Tensor,  # [hidden, Hkv*D]
) -> paddle.Tensor:  # [(H + 2*Hkv) * D, hidden]
    """The `qkv_weights[i]` layout of PaddleNLP's fused inference transformer (trans_qkvw=True):
    all query heads, then all key heads, then all value heads, as rows. With GQA the key/value
    blocks are Hkv heads wide, not H."""
    if not (q_weight.shape[0] == k_weight.shape[0] == v_weight.shape[0]):
        raise ValueError("q, k and v weights must share their input (hidden) dimension")
    if k_weight.shape != v_weight.shape:
        raise ValueError(f"k {k_weight.shape} and v {v_weight.shape} weights must have the same shape")
    return paddle.concat([q_weight, k_weight, v_weight], axis=-1).transpose([1, 0])


def _attention_projections(attention, config):
    """(query_key weight, query_key bias, value weight, value bias) of one attention layer."""
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    head_dim = config.hidden_size // heads
    if getattr(attention, "fuse_attention_qkv", False):
        q, k, v = split_interleaved_qkv(attention.qkv_proj.weight, heads, kv_heads, head_dim)
        biases = [None, None, None]
        if attention.qkv_proj.bias is not None:
            biases = [b.squeeze(0) for b in split_interleaved_qkv(attention.qkv_proj.bias.unsqueeze(0), heads, kv_heads, head_dim)]
    else:
        q, k, v = attention.q_proj.weight, attention.k_proj.weight, attention.v_proj.weight
        biases = [attention.q_proj.bias, attention.k_proj.bias, attention.v_proj.bias]
    if any(b is None for b in biases) and not all(b is None for b in biases):
        raise UnsupportedModelError("q/k/v projections with a bias on some but not all of them")
    query_key = paddle.concat([q, k], axis=-1)
    query_key_bias = None if biases[0] is None else paddle.concat(biases[:2], axis=-1)
    return query_key, query_key_bias, v, biases[2]


def _mlp_gate_up(mlp) -> paddle.Tensor:
    if getattr(mlp, "fuse_attention_ffn", False):
        return mlp.gate_up_fused_proj.weight  # already [gate | up]
    return paddle.concat([mlp.gate_proj.weight, mlp.up_proj.weight], axis=-1)


def check_decoder_support(model) -> str:
    """Return the architecture name, or raise `UnsupportedModelError` saying what is unsupported."""
    name = type(model).__name__
    if name not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(
            f"the fast decoder supports {sorted(SUPPORTED_ARCHITECTURES)}, not {name}; "
            "use backend='generate' for other architectures"
        )
    config = model.config
    problems = []
    if getattr(config, "tensor_parallel_degree", 1) > 1:
        problems.append("tensor parallel (sharded weights)")
    if getattr(config, "sequence_parallel", False):
        problems.append("sequence parallel")
    if getattr(config, "alibi", False):
        problems.append("alibi position bias")
    if getattr(config, "use_long_sequence_strategies", False):
        problems.append("long sequence strategies")
    if getattr(config, "rope_scaling_type", None) == "dynamic_ntk":
        problems.append("dynamic NTK RoPE scaling (its table depends on the sequence length)")
    # PaddleNLP's Llama MLP is always SwiGLU; Qwen2's follows `hidden_act`.
    if name == "Qwen2ForCausalLM" and getattr(config, "hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={config.hidden_act!r} (SwiGLU with silu only)")
    if getattr(config, "use_sliding_window", False):
        problems.append("sliding-window attention")
    if getattr(config, "rope", True) is False:
        problems.append("models without RoPE")
    if problems:
        raise UnsupportedModelError(f"{name} config not supported by the fast decoder: " + ", ".join(problems))
    return SUPPORTED_ARCHITECTURES[name]


@paddle.no_grad()
def collect_decoder_weights(model) -> DecoderWeights:
    """Read the decoder weights from a PaddleNLP Llama/Qwen2 causal LM.

    Norms, embeddings, o/down projections and the LM head are the model's parameters
    themselves; q|k|v and gate|up are concatenated here (a fresh copy per call, so in-place
    updates of the parameters are always seen by the next call).
    """
    prefix = check_decoder_support(model)
    base = getattr(model, prefix)
    config = model.config
    layers = []
    for layer in base.layers:
        attention, mlp = layer.self_attn, layer.mlp
        query_key, query_key_bias, value, value_bias = _attention_projections(attention, config)
        layers.append(
            DecoderLayerWeights(
                input_norm=layer.input_layernorm.weight,
                query_key=query_key,
                query_key_bias=query_key_bias,
                value=value,
                value_bias=value_bias,
                o_proj=attention.o_proj.weight,
                post_norm=layer.post_attention_layernorm.weight,
                gate_up=_mlp_gate_up(mlp),
                down_proj=mlp.down_proj.weight,
            )
        )
    rotary = base.layers[0].self_attn.rotary_emb
    return DecoderWeights(
        architecture=prefix,
        embed_tokens=base.embed_tokens.weight,
        layers=layers,
        final_norm=base.norm.weight,
        lm_head=model.lm_head.weight,
        lm_head_transposed=bool(getattr(model.lm_head, "transpose_y", False)),
        num_heads=config.num_attention_heads,
        num_kv_heads=config.num_key_value_heads or config.num_attention_heads,
        head_dim=config.hidden_size // config.num_attention_heads,
        rms_norm_eps=config.rms_norm_eps,
        rope_cos=rotary.cos_cached[0, :, 0, :],
        rope_sin=rotary.sin_cached[0, :, 0, :],
        divide_query_by_sqrt_dim=(prefix == "qwen2"),
    )


# ----------------------------------------------------------------------------------------------
# Decoder math


@dataclass
class RopeTables:
    """RoPE cos/sin pre-expanded over the q and k heads, so applying them is a same-shape multiply
    (Paddle's CPU kernels are slow when broadcasting over a middle axis).

    `sin_signed` folds the sign of `rotate_half` in: rotate_half(x) * sin == roll(x, D/2) * sin_signed,
    bit for bit, since negation is exact.
    """

    cos: paddle.Tensor  # [max_positions, (H + Hkv) * D]
    sin_signed: paddle.Tensor  # [max_positions, (H + Hkv) * D]
    num_rotated_heads: int  # H + Hkv
    head_dim: int


def build_rope_tables(weights: DecoderWeights) -> RopeTables:
    half = weights.head_dim // 2
    # Cast like PaddleNLP's rotary embedding does, so half-precision q/k are rotated in their dtype.
    cos, sin = weights.rope_cos.astype(weights.dtype), weights.rope_sin.astype(weights.dtype)
    sin_signed = paddle.concat([-sin[:, :half], sin[:, half:]], axis=-1)
    heads = weights.num_heads + weights.num_kv_heads
    return RopeTables(
        cos=paddle.tile(cos, [1, heads]),
        sin_signed=paddle.tile(sin_signed, [1, heads]),
        num_rotated_heads=heads,
        head_dim=weights.head_dim,
    )


def apply_rope(
    query_key: paddle.Tensor,  # [N, (H + Hkv) * D] q heads then k heads of N tokens
    cos: paddle.Tensor,  # [N, (H + Hkv) * D] rows of RopeTables.cos at the tokens' positions
    sin_signed: paddle.Tensor,  # [N, (H + Hkv) * D]
    head_dim: int,
) -> paddle.Tensor:  # [N, (H + Hkv) * D]
    rows = query_key.shape[0]
    rolled = paddle.roll(query_key.reshape([rows, -1, head_dim]), head_dim // 2, axis=-1).reshape([rows, -1])
    return query_key * cos + rolled * sin_signed


def _scale_query(query: paddle.Tensor, weights: DecoderWeights) -> paddle.Tensor:
    if weights.divide_query_by_sqrt_dim:
        return query / math.sqrt(weights.head_dim)
    return query * (1.0 / math.sqrt(weights.head_dim))


@dataclass
class KVCache:
    """Pre-allocated keys/values of every layer, plus the additive attention bias over the cache
    slots (0 = visible, dtype min = masked), laid out for the per-step attention matmul."""

    keys: List[paddle.Tensor]  # per layer [B, Hkv, L, D]
    values: List[paddle.Tensor]  # per layer [B, Hkv, L, D]
    attention_bias: paddle.Tensor  # [B, Hkv, G, L] float

    @property
    def batch_size(self) -> int:
        return self.attention_bias.shape[0]

    @property
    def capacity(self) -> int:
        return self.attention_bias.shape[-1]

    def select_rows(self, rows: paddle.Tensor) -> "KVCache":  # rows: [B'] int64
        """A cache holding only (or repeating) the given rows, e.g. to drop finished sequences."""
        return KVCache(
            keys=[paddle.index_select(k, rows, axis=0) for k in self.keys],
            values=[paddle.index_select(v, rows, axis=0) for v in self.values],
            attention_bias=paddle.index_select(self.attention_bias, rows, axis=0),
        )

    def reveal_slot(self, slot: int) -> None:
        """Make cache slot `slot` visible to every row (the token just written there)."""
        self.attention_bias[:, :, :, slot] = 0.0


def masked_bias_value(dtype) -> float:
    # The same "masked" value PaddleNLP's attention adds, so softmax rounds identically.
    return float(paddle.finfo(dtype).min)


def _decoder_layer(
    hidden: paddle.Tensor,  # [N, hidden] N = B*S tokens
    layer: DecoderLayerWeights,
    weights: DecoderWeights,
    cos: paddle.Tensor,  # [N, (H+Hkv)*D]
    sin_signed: paddle.Tensor,  # [N, (H+Hkv)*D]
    attend,
) -> paddle.Tensor:  # [N, hidden]
    heads, kv_heads, head_dim = weights.num_heads, weights.num_kv_heads, weights.head_dim
    normed = rms_norm(hidden, layer.input_norm, weights.rms_norm_eps)
    # matmul (+ add) rather than F.linear: F.linear reads a global flag through Python on every call.
    query_key = paddle.matmul(normed, layer.query_key)
    value = paddle.matmul(normed, layer.value)
    if layer.query_key_bias is not None:
        query_key = query_key + layer.query_key_bias
        value = value + layer.value_bias
    query, key = paddle.split(apply_rope(query_key, cos, sin_signed, head_dim), [heads * head_dim, kv_heads * head_dim], axis=-1)
    attended = attend(_scale_query(query, weights), key, value)  # [N, H*D]
    hidden = hidden + paddle.matmul(attended, layer.o_proj)
    normed = rms_norm(hidden, layer.post_norm, weights.rms_norm_eps)
    return hidden + paddle.matmul(swiglu(paddle.matmul(normed, layer.gate_up)), layer.down_proj)


def _lm_logits(hidden: paddle.Tensor, weights: DecoderWeights) -> paddle.Tensor:  # [N, hidden] -> [N, V]
    normed = rms_norm(hidden, weights.final_norm, weights.rms_norm_eps)
    return paddle.matmul(normed, weights.lm_head, transpose_y=weights.lm_head_transposed)


def prefill(
    weights: DecoderWeights,
    rope: RopeTables,
    input_ids: paddle.Tensor,  # [B, P] left-padded
    attention_mask: paddle.Tensor,  # [B, P] 1 = real token
    position_ids: paddle.Tensor,  # [B, P]
    capacity: int,
) -> Tuple[paddle.Tensor, KVCache]:  # logits of the last prompt token [B, V] (float32), cache
    """Run the prompts through the model, filling cache slots [0, P) and masking pad slots."""
    batch, prompt_len = input_ids.shape
    heads, kv_heads, head_dim = weights.num_heads, weights.num_kv_heads, weights.head_dim
    groups = heads // kv_heads
    dtype = weights.dtype
    masked = masked_bias_value(dtype)

    # Causal + key-padding bias, as PaddleNLP builds it: [B, Hkv, G*P, P]
    causal = paddle.tril(paddle.ones([prompt_len, prompt_len], dtype="bool"))
    visible = causal.unsqueeze(0) & attention_mask.astype("bool").unsqueeze(1)  # [B, P(query), P(key)]
    bias = paddle.where(visible, paddle.zeros([], dtype), paddle.full([], masked, dtype))
    bias = bias.unsqueeze([1, 2]).expand([batch, kv_heads, groups, prompt_len, prompt_len])
    bias = bias.reshape([batch, kv_heads, groups * prompt_len, prompt_len])

    keys, values = [], []
    flat_positions = position_ids.reshape([-1])
    cos = paddle.gather(rope.cos, flat_positions)
    sin_signed = paddle.gather(rope.sin_signed, flat_positions)

    def attend(query, key, value):  # [B*P, H*D], [B*P, Hkv*D], [B*P, Hkv*D]
        # [B, P, Hkv, G, D] -> [B, Hkv, G*P, D]
        q = query.reshape([batch, prompt_len, kv_heads, groups, head_dim]).transpose([0, 2, 3, 1, 4])
        q = q.reshape([batch, kv_heads, groups * prompt_len, head_dim])
        k = key.reshape([batch, prompt_len, kv_heads, head_dim]).transpose([0, 2, 1, 3])
        v = value.reshape([batch, prompt_len, kv_heads, head_dim]).transpose([0, 2, 1, 3])
        key_cache = paddle.zeros([batch, kv_heads, capacity, head_dim], dtype)
        value_cache = paddle.zeros([batch, kv_heads, capacity, head_dim], dtype)
        key_cache[:, :, :prompt_len] = k
        value_cache[:, :, :prompt_len] = v
        keys.append(key_cache)
        values.append(value_cache)
        scores = paddle.matmul(q, k, transpose_y=True) + bias
        probs = F.softmax(scores.astype("float32"), axis=-1).astype(dtype)
        out = paddle.matmul(probs, v)  # [B, Hkv, G*P, D]
        out = out.reshape([batch, kv_heads, groups, prompt_len, head_dim]).transpose([0, 3, 1, 2, 4])
        return out.reshape([batch * prompt_len, heads * head_dim])

    hidden = paddle.gather(weights.embed_tokens, input_ids.reshape([-1]))
    for layer in weights.layers:
        hidden = _decoder_layer(hidden, layer, weights, cos, sin_signed, attend)
    last_hidden = hidden.reshape([batch, prompt_len, -1])[:, -1]
    logits = as_float32(_lm_logits(last_hidden, weights))

    # Decode-time bias: real prompt slots visible, pad and not-yet-written slots masked.
    slot_bias = paddle.full([batch, capacity], masked, dtype)
    slot_bias[:, :prompt_len] = paddle.where(
        attention_mask.astype("bool"), paddle.zeros([], dtype), paddle.full([], masked, dtype)
    )
    attention_bias = slot_bias.reshape([batch, 1, 1, capacity]).expand([batch, kv_heads, groups, capacity]).clone()
    return logits, KVCache(keys=keys, values=values, attention_bias=attention_bias)


def decode_step(
    weights: DecoderWeights,
    rope: RopeTables,
    cache: KVCache,
    token_ids: paddle.Tensor,  # [B] the tokens sampled at the previous step
    position_ids: paddle.Tensor,  # [B] their positions
    slot: int,  # the cache slot these tokens go to (the same for every row)
) -> paddle.Tensor:  # [B, V] float32 logits for the next token
    """One token per row through every layer, writing its key/value to cache `slot`."""
    batch = token_ids.shape[0]
    heads, kv_heads, head_dim = weights.num_heads, weights.num_kv_heads, weights.head_dim
    groups = heads // kv_heads
    cache.reveal_slot(slot)
    cos = paddle.gather(rope.cos, position_ids)
    sin_signed = paddle.gather(rope.sin_signed, position_ids)
    layer_index = [0]

    def attend(query, key, value):  # [B, H*D], [B, Hkv*D], [B, Hkv*D]
        index = layer_index[0]
        layer_index[0] += 1
        key_cache, value_cache = cache.keys[index], cache.values[index]
        key_cache[:, :, slot] = key.reshape([batch, kv_heads, head_dim])
        value_cache[:, :, slot] = value.reshape([batch, kv_heads, head_dim])
        scores = paddle.matmul(query.reshape([batch, kv_heads, groups, head_dim]), key_cache, transpose_y=True)
        scores = scores + cache.attention_bias
        if scores.dtype != paddle.float32:
            scores = scores.astype("float32")
        probs = F.softmax(scores, axis=-1)
        if probs.dtype != value_cache.dtype:
            probs = probs.astype(value_cache.dtype)
        return paddle.matmul(probs, value_cache).reshape([batch, heads * head_dim])

    hidden = paddle.gather(weights.embed_tokens, token_ids)
    for layer in weights.layers:
        hidden = _decoder_layer(hidden, layer, weights, cos, sin_signed, attend)
    return as_float32(_lm_logits(hidden, weights))


# ----------------------------------------------------------------------------------------------
# Sampling


def apply_repetition_penalty(
    logits: paddle.Tensor,  # [B, V]
    seen: paddle.Tensor,  # [B, V] bool: token already in the row's prompt or response
    penalty: float,
) -> paddle.Tensor:  # [B, V]
    """CTRL / HF / PaddleNLP semantics: a seen token's logit is divided by `penalty` when positive
    and multiplied by it when negative."""
    penalised = paddle.where(logits < 0, logits * penalty, logits / penalty)
    return paddle.where(seen, penalised, logits)


def top_p_filter(probs: paddle.Tensor, top_p: float) -> paddle.Tensor:  # [B, V] -> [B, V]
    """Zero every token outside the nucleus, PaddleNLP's rule: walking tokens by decreasing
    probability, keep a token while the mass of the tokens before it is <= top_p (so the most
    likely token always stays). Not renormalised: `multinomial` normalises."""
    sorted_probs, sorted_indices = paddle.sort(probs, axis=-1, descending=True), paddle.argsort(probs, axis=-1, descending=True)
    mass_before = paddle.cumsum(sorted_probs, axis=-1) - sorted_probs
    keep_sorted = (mass_before <= top_p).astype(probs.dtype)
    keep = paddle.put_along_axis(paddle.zeros_like(probs), sorted_indices, keep_sorted, axis=-1)
    return probs * keep


def sampling_probs(
    logits: paddle.Tensor,  # [B, V] float32, repetition penalty already applied
    temperature: float,
    top_p: float,
) -> paddle.Tensor:  # [B, V]
    if temperature != 1.0:
        logits = logits / temperature
    probs = F.softmax(logits, axis=-1)
    if top_p < 1.0:
        probs = top_p_filter(probs, top_p)
    return probs


def chosen_log_probs(
    logits: paddle.Tensor,  # [B, V] float32 raw model logits
    tokens: paddle.Tensor,  # [B] int64
    temperature: float,
) -> paddle.Tensor:  # [B]
    """log softmax(logits / temperature) at the chosen tokens: the policy distribution the
    trainer recomputes (before repetition penalty and top-p, which only shape sampling)."""
    if temperature != 1.0:
        logits = logits / temperature
    # log(softmax) instead of log_softmax: Paddle's CPU log_softmax is ~50x slower at [8, 1000].
    # Only the chosen entries go through log, so precision matches log_softmax unless the chosen
    # probability underflows float32, which a sampled token cannot do.
    probs = F.softmax(logits, axis=-1)
    return paddle.log(paddle.index_sample(probs, tokens.unsqueeze(-1)).squeeze(-1))


# ----------------------------------------------------------------------------------------------
# Inputs of PaddleNLP's fused inference models


def left_to_right_padding(
    input_ids: paddle.Tensor,  # [B, P] left-padded
    attention_mask: paddle.Tensor,  # [B, P] 1 = real token
    pad_token_id: int,
) -> Tuple[paddle.Tensor, paddle.Tensor]:  # [B, P] right-padded ids, [B] int64 prompt lengths
    """Move each row's real tokens to the front, as PaddleNLP's fused inference models expect,
    without leaving token space (no decode / re-encode round trip that could change tokens)."""
    width = input_ids.shape[1]
    lengths = attention_mask.astype("int64").sum(axis=-1)  # [B]
    columns = paddle.arange(width, dtype="int64").unsqueeze(0)  # [1, P]
    source = columns + (width - lengths).unsqueeze(-1)  # row b reads its column j from j + pad_b
    is_real = columns < lengths.unsqueeze(-1)
    gathered = paddle.take_along_axis(input_ids, paddle.where(is_real, source, paddle.zeros_like(source)), axis=1)
    return paddle.where(is_real, gathered, paddle.full_like(gathered, pad_token_id)), lengths
