"""Which kernels run where: fused kernels on GPU, plain Paddle ops on CPU.

Paddle's CPU wheel ships some fused kernels that execute AVX-512 instructions whatever the CPU
(`fused_rms_norm` dies with SIGILL on an AVX2-only AMD EPYC). A CPU run must therefore never reach
a `paddle.incubate` fused kernel, whichever model config it loads. Three places could reach one:

* this project's rollout decoder (`infer_model_utils`): it calls `rms_norm` / `swiglu` below,
  which dispatch on the tensor's place;
* PaddleNLP's Llama/Qwen2 MLP, which always calls `paddle.incubate.nn.functional.swiglu`:
  `install_plain_cpu_kernels` swaps PaddleNLP's module-level `swiglu` for the dispatching one
  below (same math, the fused kernel still runs on GPU tensors);
* model-config flags that select fused paths (`use_fused_rms_norm`, `use_fused_rope`,
  `use_flash_attention`, ...), which a checkpoint trained on GPU may carry:
  `cpu_safe_config_overrides` turns them off whenever the run is on CPU.

`tests/test_cpu_kernels.py` runs the decoder, SFT, RM and PPO steps with every fused kernel
replaced by one that raises.
"""

from __future__ import annotations

from typing import Optional

import paddle
import paddle.nn.functional as F

from . import cpu_fused, cpu_ops

# Config flags that route PaddleNLP models through fused kernels (or GPU-only attention). All are
# fields of PaddleNLP's base `PretrainedConfig`, so every architecture accepts them as
# `from_pretrained` keywords (an unknown keyword would reach the model's __init__ and fail).
FUSED_KERNEL_CONFIG_FLAGS = (
    "use_fused_rms_norm",
    "use_fused_rope",
    "use_flash_attention",
    "use_fused_linear",
    "use_fused_dropout_add",
    "use_fused_linear_cross_entropy",
)
# Model-specific flags, only set on loaded config objects (Llama's generation path).
FUSED_KERNEL_MODEL_FLAGS = ("use_flash_attention_for_generation",)


def runs_on_cpu() -> bool:
    """True when this process computes on the CPU (the CPU wheel, or a GPU wheel set to CPU)."""
    return paddle.get_device().startswith("cpu")


def _on_gpu(tensor: paddle.Tensor) -> bool:
    place = tensor.place
    # Under `paddle.jit.to_static` a traced tensor has no place: the program runs on the
    # process's device.
    return not runs_on_cpu() if place is None else place.is_gpu_place()


def rms_norm(hidden: paddle.Tensor, weight: paddle.Tensor, eps: float) -> paddle.Tensor:
    """RMSNorm over the last axis, `x * rsqrt(mean(x^2) + eps) * w`: PaddleNLP's math (float32
    statistics, result cast back to the input dtype before the weight multiplies it)."""
    if _on_gpu(hidden):
        from paddle.incubate.nn.functional import fused_rms_norm

        return fused_rms_norm(hidden, weight, None, eps, len(hidden.shape) - 1)[0]
    if cpu_fused.applicable(hidden, weight):
        return cpu_fused.rms_norm(hidden, weight, eps)
    statistics = _as_dtype(hidden, paddle.float32)
    # square, not pow(2): Paddle's CPU pow kernel is 25-100x slower for the same values.
    variance = paddle.square(statistics).mean(-1, keepdim=True)
    normed = cpu_ops.rms_norm_scale(statistics, variance, eps)
    return cpu_ops.scale_by_weight(_as_dtype(normed, weight.dtype), weight)


def _as_dtype(tensor: paddle.Tensor, dtype) -> paddle.Tensor:
    # `astype` to the same dtype still dispatches an op: ~10 us each, 9 per decode step per layer.
    return tensor if tensor.dtype == dtype else tensor.astype(dtype)


def swiglu(x: paddle.Tensor, y: Optional[paddle.Tensor] = None) -> paddle.Tensor:
    """silu(x) * y; with `y` None, `x` holds gate then up halves on its last axis (PaddleNLP's
    `swiglu` signature)."""
    if _on_gpu(x):
        from paddle.incubate.nn.functional import swiglu as fused_swiglu

        return fused_swiglu(x, y)
    if cpu_fused.applicable(x) and (y is None or (cpu_fused.applicable(y) and x.shape == y.shape)):
        return cpu_fused.swiglu(x, y)
    if y is None:
        x, y = paddle.chunk(x, chunks=2, axis=-1)
    return F.silu(x) * y


_PADDLENLP_RMS_NORM_FORWARD = {}  # RMSNorm class -> PaddleNLP's own forward


def _rms_norm_forward(self, hidden_states):
    """PaddleNLP's Llama/Qwen2 RMSNorm forward, step for step, with `paddle.square` for `pow(2)`
    on CPU tensors in dynamic mode (elsewhere PaddleNLP's own forward runs)."""
    original = _PADDLENLP_RMS_NORM_FORWARD[type(self)]
    if self.config.use_fused_rms_norm or _on_gpu(hidden_states) or not paddle.in_dynamic_mode():
        return original(self, hidden_states)
    if cpu_fused.applicable(hidden_states, self.weight):
        return cpu_fused.rms_norm(hidden_states, self.weight, self.variance_epsilon)
    with paddle.amp.auto_cast(False):
        variance = paddle.square(_as_dtype(hidden_states, paddle.float32)).mean(-1, keepdim=True)
        hidden_states = cpu_ops.rms_norm_scale(hidden_states, variance, self.variance_epsilon)
    if self.weight.dtype in (paddle.float16, paddle.bfloat16):
        hidden_states = paddle.cast(hidden_states, self.weight.dtype)
    return cpu_ops.scale_by_weight(hidden_states, self.weight)


def install_plain_cpu_kernels() -> None:
    """Point PaddleNLP's Llama/Qwen2 `swiglu` at the place-dispatching one above, their RMSNorm
    at `_rms_norm_forward`, their attention and rotary embedding at `cpu_ops`, and, on CPU, turn
    Paddle's strided-view kernels off. Idempotent; must run before models are built (Qwen2's MLP
    and every attention layer bind their functions in `__init__`)."""
    from paddlenlp.transformers.llama import fusion_ops as llama_fusion_ops
    from paddlenlp.transformers.llama import modeling as llama_modeling
    from paddlenlp.transformers.qwen2 import modeling as qwen2_modeling

    for module in (llama_modeling, llama_fusion_ops):
        if getattr(module, "swiglu", None) is not swiglu:
            module.swiglu = swiglu
    for norm_class in (llama_modeling.LlamaRMSNorm, qwen2_modeling.Qwen2RMSNorm):
        if norm_class not in _PADDLENLP_RMS_NORM_FORWARD:
            _PADDLENLP_RMS_NORM_FORWARD[norm_class] = norm_class.forward
            norm_class.forward = _rms_norm_forward
    cpu_ops.install()
    if runs_on_cpu():
        # Strided views make every later `reshape` of a transposed tensor a generic strided copy
        # (2.8 ms against 0.06 ms for a [8, 96, 4, 64] transpose + reshape on one thread).
        paddle.set_flags({"FLAGS_use_stride_kernel": False})


def cpu_safe_config_overrides() -> dict:
    """Config keywords for `from_pretrained` / `AutoConfig` that switch fused paths off on CPU
    (empty on GPU, where the checkpoint's own choices stand)."""
    return {flag: False for flag in FUSED_KERNEL_CONFIG_FLAGS} if runs_on_cpu() else {}


def make_config_cpu_safe(config) -> None:
    """Switch the fused paths of a loaded config off in place when the run is on CPU."""
    if not runs_on_cpu():
        return
    for flag in FUSED_KERNEL_CONFIG_FLAGS + FUSED_KERNEL_MODEL_FLAGS:
        setattr(config, flag, False)
