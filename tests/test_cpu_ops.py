"""The CPU formulations of `ppo/models/cpu_ops.py` against PaddleNLP's own functions: same outputs and
same gradients, for multi-head and grouped-query shapes, Llama and Qwen2; and a whole model's
forward and backward with them against one without."""

from __future__ import annotations

import numpy as np
import paddle
import pytest
from paddlenlp.transformers.llama import modeling as llama_modeling
from paddlenlp.transformers.qwen2 import modeling as qwen2_modeling

from ppo.models import cpu_extension, cpu_ops, kernels
from ppo.models.cpu_ops import _PADDLENLP_FUNCTIONS
from ppo.tiny import build_tiny_causal_lm


@pytest.fixture(autouse=True)
def eager_formulations(monkeypatch):
    """These tests are about the eager formulations: the C++ ops that replace some of them where
    the CPU extension is available have their own tests (tests/test_cpu_fused.py)."""
    monkeypatch.setenv(cpu_extension.SWITCH_ENV, "0")


def leaf(array):
    tensor = paddle.to_tensor(array)
    tensor.stop_gradient = False
    return tensor


def tables(max_positions, dim, base=10000.0):
    inverse = 1.0 / base ** (np.arange(0, dim, 2, dtype=np.float32) / dim)
    angles = np.outer(np.arange(max_positions, dtype=np.float32), inverse)
    angles = np.concatenate([angles, angles], axis=-1)
    return (paddle.to_tensor(np.cos(angles)[None, :, None, :]), paddle.to_tensor(np.sin(angles)[None, :, None, :]))


def grads_of(outputs, inputs, seed=1):
    rng = np.random.default_rng(seed)
    cotangents = [paddle.to_tensor(rng.standard_normal(o.shape).astype("float32")) for o in outputs]
    return paddle.grad(outputs, inputs, grad_outputs=cotangents)


def test_install_swaps_the_module_functions_and_turns_strided_views_off():
    kernels.install_plain_cpu_kernels()  # idempotent
    assert llama_modeling.apply_rotary_pos_emb is cpu_ops.apply_rotary_pos_emb
    assert llama_modeling.scaled_dot_product_attention is cpu_ops.llama_scaled_dot_product_attention
    assert qwen2_modeling.scaled_dot_product_attention is cpu_ops.qwen2_scaled_dot_product_attention
    assert llama_modeling.repeat_kv is cpu_ops.repeat_kv and qwen2_modeling.repeat_kv is cpu_ops.repeat_kv
    assert paddle.get_flags(["FLAGS_use_stride_kernel"])["FLAGS_use_stride_kernel"] is False


@pytest.mark.parametrize("kv_heads", [4, 2])
@pytest.mark.parametrize("with_positions", [True, False])
def test_rotary_embedding_matches_paddlenlp(kv_heads, with_positions):
    rng = np.random.default_rng(0)
    q = leaf(rng.standard_normal([3, 7, 4, 8]).astype("float32"))
    k = leaf(rng.standard_normal([3, 7, kv_heads, 8]).astype("float32"))
    cos, sin = tables(16, 8)
    # Left-padded rows start their positions later, as the rollouts' position ids do.
    positions = paddle.to_tensor(np.maximum(np.arange(7)[None, :] - np.array([[0], [2], [5]]), 0)) if with_positions else None
    ours = cpu_ops.apply_rotary_pos_emb(q, k, cos, sin, positions)
    theirs = _PADDLENLP_FUNCTIONS[("llama", "apply_rotary_pos_emb")](q, k, cos, sin, positions)
    for a, b in zip(ours, theirs):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6, atol=1e-6)
    for a, b in zip(grads_of(ours, [q, k]), grads_of(theirs, [q, k])):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6)


def additive_causal_mask(rows, length, pad_left):
    mask = np.tril(np.ones([length, length], bool))[None].repeat(rows, 0)
    for row, pads in enumerate(pad_left):
        mask[row, :, :pads] = False
    return paddle.to_tensor(np.where(mask, 0.0, np.finfo(np.float32).min).astype("float32")[:, None])


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("output_attentions", [False, True])
@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_attention_matches_paddlenlp(family, output_attentions, kv_heads):
    """Grouped-query keys and values go in unrepeated; PaddleNLP's attention gets them repeated."""
    rng = np.random.default_rng(0)
    q = leaf(rng.standard_normal([3, 6, 4, 8]).astype("float32"))
    k, v = (leaf(rng.standard_normal([3, 6, kv_heads, 8]).astype("float32")) for _ in range(2))
    mask = additive_causal_mask(3, 6, [0, 1, 3])
    config = build_tiny_causal_lm(family, seed=0).config
    config.attention_dropout = 0.0
    ours_fn = cpu_ops.llama_scaled_dot_product_attention if family == "llama" else cpu_ops.qwen2_scaled_dot_product_attention
    theirs_fn = _PADDLENLP_FUNCTIONS[(family, "scaled_dot_product_attention")]
    assert cpu_ops.repeat_kv(k, 4 // kv_heads) is k
    repeat = _PADDLENLP_FUNCTIONS[(family, "repeat_kv")]
    ours = ours_fn(q, config, k, v, mask, output_attentions)
    theirs = theirs_fn(q, config, repeat(k, 4 // kv_heads), repeat(v, 4 // kv_heads), mask, output_attentions)
    ours, theirs = (list(x) if output_attentions else [x] for x in (ours, theirs))
    for a, b in zip(ours, theirs):
        assert a.shape == b.shape
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6)
    for a, b in zip(grads_of(ours[:1], [q, k, v]), grads_of(theirs[:1], [q, k, v])):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=1e-6)


def test_attention_falls_back_to_paddlenlp_without_a_mask():
    """The fallback repeats grouped keys and values itself."""
    rng = np.random.default_rng(0)
    q = paddle.to_tensor(rng.standard_normal([2, 5, 4, 8]).astype("float32"))
    k, v = (paddle.to_tensor(rng.standard_normal([2, 5, 2, 8]).astype("float32")) for _ in range(2))
    config = build_tiny_causal_lm("llama", seed=0).config
    ours = cpu_ops.llama_scaled_dot_product_attention(q, config, k, v, None, False)
    repeat = _PADDLENLP_FUNCTIONS[("llama", "repeat_kv")]
    theirs = _PADDLENLP_FUNCTIONS[("llama", "scaled_dot_product_attention")](q, config, repeat(k, 2), repeat(v, 2), None, False)
    np.testing.assert_array_equal(ours.numpy(), theirs.numpy())


@pytest.mark.parametrize("kv_heads", [None, 2])
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_whole_model_forward_and_backward_match_paddlenlp_functions(family, kv_heads, monkeypatch):
    """A tiny model's loss and every parameter gradient with the CPU functions, and with
    PaddleNLP's own functions and RMSNorm forward put back (multi-head and grouped-query)."""
    ids = paddle.to_tensor(np.random.default_rng(0).integers(4, 100, size=[2, 9]), dtype="int64")
    mask = paddle.to_tensor(np.array([[0, 0, 1, 1, 1, 1, 1, 1, 1], [1] * 9]), dtype="int64")

    def loss_and_grads():
        model = build_tiny_causal_lm(family, seed=0, num_key_value_heads=kv_heads)
        model.config.attention_dropout = 0.0
        logits = model(input_ids=ids, attention_mask=mask, return_dict=True).logits
        loss = (logits * logits).mean()
        loss.backward()
        return float(loss), {n: p.grad.numpy() for n, p in model.named_parameters() if p.grad is not None}

    ours_loss, ours_grads = loss_and_grads()
    module = llama_modeling if family == "llama" else qwen2_modeling
    monkeypatch.setattr(module, "apply_rotary_pos_emb", _PADDLENLP_FUNCTIONS[(family, "apply_rotary_pos_emb")])
    for name in ("scaled_dot_product_attention", "repeat_kv"):
        monkeypatch.setattr(module, name, _PADDLENLP_FUNCTIONS[(family, name)])
    norm = llama_modeling.LlamaRMSNorm if family == "llama" else qwen2_modeling.Qwen2RMSNorm
    monkeypatch.setattr(norm, "forward", kernels._PADDLENLP_RMS_NORM_FORWARD[norm])
    theirs_loss, theirs_grads = loss_and_grads()
    assert ours_loss == pytest.approx(theirs_loss, rel=1e-5)
    assert ours_grads.keys() == theirs_grads.keys()
    for name in ours_grads:
        np.testing.assert_allclose(ours_grads[name], theirs_grads[name], rtol=2e-4, atol=1e-6, err_msg=name)
