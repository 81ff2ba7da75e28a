"""RMSNorm, rotary embedding and SwiGLU as single C++ ops with their own backward on CPU
(`csrc/cpu_train_ops.cc`, part of the CPU extension), and the per-token entropy of the logits
(forward only: the logged metric).

Each replaces 5-9 eager elementwise ops, each a full pass over the activation, by one forward
and one backward sweep. Same math as PaddleNLP's Llama/Qwen2 layers in float32; only the
summation order of the norm's statistics differs (tests/test_cpu_fused.py compares outputs and
gradients with the eager formulas). `applicable(...)` says whether a call can take this path:
float32 CPU tensors, contiguous, in dynamic mode, with the extension available; otherwise the
callers (`kernels.py`, `cpu_ops.py`) run their eager formulation.
"""

from __future__ import annotations

from typing import Optional, Tuple

import paddle

from ppo.models.cpu_extension import disabled_by_environment, load_extension


def applicable(*tensors: paddle.Tensor) -> bool:
    if disabled_by_environment() or not paddle.in_dynamic_mode():
        return False
    for tensor in tensors:
        if tensor.dtype != paddle.float32 or not tensor.place.is_cpu_place() or not tensor.is_contiguous():
            return False
    return load_extension() is not None


def rms_norm(hidden: paddle.Tensor, weight: paddle.Tensor, eps: float) -> paddle.Tensor:
    """x * rsqrt(mean(x^2) + eps) * w over the last axis."""
    out, _ = load_extension().rlhf_rms_norm(hidden, weight, float(eps))
    return out


def rotary(
    q: paddle.Tensor,  # [bs, seq, heads, dim]
    k: paddle.Tensor,  # [bs, seq, kv_heads, dim]
    cos: paddle.Tensor,  # [max_positions, dim]
    sin: paddle.Tensor,  # [max_positions, dim]
    position_ids: Optional[paddle.Tensor],  # [bs, seq], or None for 0..seq-1 in every row
) -> Tuple[paddle.Tensor, paddle.Tensor]:
    """(q, k) rotated: x * cos + rotate_half(x) * sin at each token's position."""
    if position_ids is None:
        batch, seq = q.shape[0], q.shape[1]
        position_ids = paddle.arange(seq, dtype="int64").unsqueeze(0).expand([batch, seq])
    elif position_ids.dtype != paddle.int64:
        position_ids = position_ids.astype("int64")
    if not position_ids.is_contiguous():
        position_ids = position_ids.contiguous()
    return load_extension().rlhf_rope(q, k, cos, sin, position_ids)


def swiglu(gate: paddle.Tensor, up: Optional[paddle.Tensor] = None) -> paddle.Tensor:
    """silu(gate) * up; with `up` None, `gate` holds gate then up halves on its last axis."""
    extension = load_extension()
    if up is None:
        return extension.rlhf_swiglu_packed(gate)
    return extension.rlhf_swiglu(gate, up)


def token_entropy(logits: paddle.Tensor) -> paddle.Tensor:  # [..., V] float32 -> [...]
    """logsumexp(z) - sum softmax(z) * z over the last axis; no gradient."""
    return load_extension().rlhf_token_entropy(logits)
