"""`decode_step` in one C++ call on CPU (the extension's `rlhf_cpu_decode_step`).

Same inputs, outputs and cache effects as `infer_model_utils.decode_step`: the new token's key
and value are written to cache `slot` of every layer, the slot is revealed in the attention
bias, and float32 logits of the next token come back. The math is the eager decoder's, in
float32; only summation orders differ (tests/test_cpu_decode.py bounds the difference and checks
greedy tokens are identical). Used for float32 models on CPU when the extension is available;
`fused_decode_step` returns None otherwise and the caller keeps the eager step.

The step's projections read every weight once per token for a few rows: memory-bound work that
MKL's sgemm does at ~7 GB/s (it re-packs each weight on every call). Where the CPU has AVX2+FMA
or AVX-512 the step can instead take the weights as 32-column panels, repacked once per rollout
(`to_panels`, ~0.14 s at SmolLM2-135M), and stream each panel once (`csrc/panel_gemm.h`). On a
2-core AMD EPYC (AVX-512), SmolLM2-135M shapes, 8 rows, one thread: the step's weight products
~70 -> ~31 ms, the whole engine step 62-72 -> 35-36 ms. The AVX2 kernels, run on the same CPU,
made the engine step 65-71 ms, no better than MKL's, so by default the panels are used where the
CPU has AVX-512 and MKL elsewhere. `PADDLE_RLHF_STREAMING_GEMM` = `mkl`, `avx2` or `avx512`
picks the kernels (capped at what the CPU runs).
"""

from __future__ import annotations

import functools
import os
from typing import Callable, List, Optional

import paddle

from ppo.models.cpu_extension import load_extension
from ppo.models.infer_model_utils import DecoderWeights, KVCache, RopeTables

DecodeFn = Callable[[KVCache, paddle.Tensor, paddle.Tensor, int], paddle.Tensor]

STREAMING_ENV = "PADDLE_RLHF_STREAMING_GEMM"
VECTOR_LEVELS = {"mkl": 0, "avx2": 1, "avx512": 2}
PANEL_WIDTH = 32  # csrc/panel_gemm.h kPanelWidth

_PROJECTIONS = ("query_key", "value", "o_proj", "gate_up", "down_proj")


@functools.lru_cache(maxsize=None)
def cpu_vector_level() -> int:
    """What this CPU runs of the streaming kernels: 2 AVX-512F, 1 AVX2+FMA, 0 neither (or no
    extension)."""
    extension = load_extension()
    if extension is None:
        return 0
    return int(extension.rlhf_cpu_vector_level(paddle.zeros([1], dtype="float32")).numpy()[0])


def streaming_level() -> int:
    """The kernels the decode step uses: `PADDLE_RLHF_STREAMING_GEMM` when set (capped at what the
    CPU runs), else AVX-512 where the CPU has it and MKL (0, the plain weights) elsewhere."""
    setting = os.environ.get(STREAMING_ENV, "").strip().lower()
    if setting and setting not in VECTOR_LEVELS:
        raise ValueError(f"{STREAMING_ENV}={setting!r}: expected one of {sorted(VECTOR_LEVELS)}")
    available = cpu_vector_level()
    if setting:
        return min(VECTOR_LEVELS[setting], available)
    return VECTOR_LEVELS["avx512"] if available >= VECTOR_LEVELS["avx512"] else VECTOR_LEVELS["mkl"]


def to_panels(weight: paddle.Tensor) -> paddle.Tensor:
    """[k, n] -> [ceil(n/32), k, 32]: 32 consecutive columns of every row, the last panel zero
    padded (the layout `csrc/panel_gemm.h` streams)."""
    k, n = weight.shape
    pad = (-n) % PANEL_WIDTH
    if pad:
        weight = paddle.concat([weight, paddle.zeros([k, pad], dtype=weight.dtype)], axis=1)
    return weight.reshape([k, -1, PANEL_WIDTH]).transpose([1, 0, 2]).contiguous()


def panel_product(
    x: paddle.Tensor, weight: paddle.Tensor, level: int, head: bool = False, panel_columns: Optional[int] = None
) -> paddle.Tensor:
    """x [m, k] · weight [k, n] through the streaming kernels at `level`; head: weight [n, k],
    x · weightᵀ; `panel_columns`: weight is already `to_panels(w)` of a w with that many columns.
    For tests and benchmarks."""
    extension = load_extension()
    if head:
        return extension.rlhf_cpu_panel_product(x, weight, weight.shape[0], True, level)
    if panel_columns is not None:
        return extension.rlhf_cpu_panel_product(x, weight, panel_columns, False, level)
    return extension.rlhf_cpu_panel_product(x, to_panels(weight), weight.shape[1], False, level)


def _flat_layer_weights(weights: DecoderWeights, panels: bool = False) -> List[paddle.Tensor]:
    """The order `csrc/cpu_decode.cc` reads: 7 tensors per layer, 9 with q|k and v biases; with
    `panels` the five projections as `to_panels` copies."""
    flat = []
    for layer in weights.layers:
        projection = {name: getattr(layer, name) for name in _PROJECTIONS}
        if panels:
            projection = {name: to_panels(value) for name, value in projection.items()}
        flat += [layer.input_norm, projection["query_key"], projection["value"], projection["o_proj"], layer.post_norm,
                 projection["gate_up"], projection["down_proj"]]  # fmt: skip
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


def fused_decode_step(weights: DecoderWeights, rope: RopeTables, level: Optional[int] = None) -> Optional[DecodeFn]:
    """A `decode_step(cache, token_ids, positions, slot)` running in the extension, or None when
    the extension is unavailable or the model is outside what it computes. `level`: the
    projection kernels (see `streaming_level`, the default); above 0 the step holds a panel copy
    of the projection weights (and a [V, hidden] copy of an untied head) while it lives."""
    if unsupported_reason(weights, rope) is not None:
        return None
    extension = load_extension()
    if extension is None:
        return None
    level = streaming_level() if level is None else level
    layer_weights = _flat_layer_weights(weights, panels=level > 0)
    lm_head, lm_head_transposed = weights.lm_head, weights.lm_head_transposed
    if level > 0 and not lm_head_transposed:
        lm_head, lm_head_transposed = lm_head.transpose([1, 0]).contiguous(), True
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
            lm_head,
            slot,
            float(weights.rms_norm_eps),
            weights.num_heads,
            weights.num_kv_heads,
            has_bias,
            lm_head_transposed,
            weights.divide_query_by_sqrt_dim,
            level,
        )

    return step
