"""The C++ RMSNorm, rotary embedding and SwiGLU (`ppo.models.cpu_fused`) against their eager
formulas: outputs and gradients, odd shapes, grouped-query heads; where the fused path is taken
and where it is not; a whole model's loss and gradients with the extension on and off; the
C++ token entropy against a float64 reference and the eager formula."""

import numpy as np
import paddle
import paddle.nn.functional as F
import pytest

from ppo.models import cpu_extension, cpu_fused, kernels
from ppo.models.cpu_ops import _PADDLENLP_FUNCTIONS
from ppo.tiny import build_tiny_causal_lm, tiny_config_kwargs
from test_cpu_ops import grads_of, leaf, tables


@pytest.fixture(scope="module", autouse=True)
def extension():
    if cpu_extension.load_extension() is None:
        if cpu_extension._compiler() is None:
            pytest.skip(f"CPU extension unavailable: {cpu_extension.unavailable_reason()}")
        pytest.fail(cpu_extension.unavailable_reason())  # a compiler is here: it must build


def eager_rms_norm(x, w, eps):
    variance = paddle.square(x).mean(-1, keepdim=True)
    return x * paddle.rsqrt(variance + eps) * w


@pytest.mark.parametrize("shape", [[3, 5, 64], [7, 13], [1, 1, 576]])
def test_rms_norm_matches_the_eager_formula(shape):
    rng = np.random.default_rng(0)
    x = leaf((rng.standard_normal(shape) * 3).astype("float32"))
    w = leaf(rng.standard_normal(shape[-1]).astype("float32"))
    ours, theirs = cpu_fused.rms_norm(x, w, 1e-5), eager_rms_norm(x, w, 1e-5)
    np.testing.assert_allclose(ours.numpy(), theirs.numpy(), rtol=1e-5, atol=1e-6)
    for a, b in zip(grads_of([ours], [x, w]), grads_of([theirs], [x, w])):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kv_heads", [4, 1])
@pytest.mark.parametrize("with_positions", [True, False])
def test_rotary_matches_paddlenlp(kv_heads, with_positions):
    rng = np.random.default_rng(1)
    q = leaf(rng.standard_normal([3, 7, 4, 16]).astype("float32"))
    k = leaf(rng.standard_normal([3, 7, kv_heads, 16]).astype("float32"))
    cos, sin = tables(20, 16)
    positions = paddle.to_tensor(np.arange(7)[None, :] + np.array([[0], [3], [9]])) if with_positions else None
    ours = cpu_fused.rotary(q, k, cos.reshape([-1, 16]), sin.reshape([-1, 16]), positions)
    theirs = _PADDLENLP_FUNCTIONS[("llama", "apply_rotary_pos_emb")](q, k, cos, sin, positions)
    for a, b in zip(ours, theirs):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6, atol=1e-6)
    for a, b in zip(grads_of(ours, [q, k]), grads_of(theirs, [q, k])):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6)


def test_rotary_rejects_a_position_outside_the_table():
    q = paddle.zeros([1, 2, 1, 4])
    cos, sin = tables(3, 4)
    with pytest.raises(Exception, match="outside the rotary table"):
        cpu_fused.rotary(q, q, cos.reshape([-1, 4]), sin.reshape([-1, 4]), paddle.to_tensor([[0, 3]]))


@pytest.mark.parametrize("packed", [False, True])
def test_swiglu_matches_silu_times_up(packed):
    rng = np.random.default_rng(2)
    gate = leaf((rng.standard_normal([2, 5, 24]) * 4).astype("float32"))
    up = leaf(rng.standard_normal([2, 5, 24]).astype("float32"))
    if packed:
        gate_up = leaf(np.concatenate([gate.numpy(), up.numpy()], axis=-1))
        ours, inputs = cpu_fused.swiglu(gate_up), [gate_up]
        g, u = paddle.chunk(gate_up, 2, axis=-1)
        theirs = F.silu(g) * u
    else:
        ours, inputs = cpu_fused.swiglu(gate, up), [gate, up]
        theirs = F.silu(gate) * up
    np.testing.assert_allclose(ours.numpy(), theirs.numpy(), rtol=1e-5, atol=1e-6)
    for a, b in zip(grads_of([ours], inputs), grads_of([theirs], inputs)):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6)


def float64_entropy(z):
    z = z.astype(np.float64)
    shifted = z - z.max(axis=-1, keepdims=True)
    p = np.exp(shifted) / np.exp(shifted).sum(axis=-1, keepdims=True)
    return -(p * np.log(np.clip(p, 1e-300, None))).sum(axis=-1)


@pytest.mark.parametrize("scale", [0.1, 3.0, 30.0])  # near-uniform to nearly one-hot rows
def test_token_entropy_matches_float64_and_the_eager_formula(scale, monkeypatch):
    from ppo.models.ppo_model_utils import token_entropy

    rng = np.random.default_rng(11)
    z = (rng.standard_normal([3, 5, 49152]) * scale).astype("float32")
    z[0, 0, :] = 0.0  # exactly uniform: log V
    z[1, 1, 7] = 1e4  # one token takes all the mass: 0
    with paddle.no_grad():
        fused = cpu_fused.token_entropy(paddle.to_tensor(z)).numpy()
        np.testing.assert_allclose(token_entropy(paddle.to_tensor(z)).numpy(), fused, rtol=0, atol=0)  # takes the C++ op
        monkeypatch.setenv(cpu_extension.SWITCH_ENV, "0")
        eager = token_entropy(paddle.to_tensor(z)).numpy()
    assert fused.shape == (3, 5)
    reference = float64_entropy(z)
    np.testing.assert_allclose(fused, reference, rtol=1e-5, atol=1e-5)
    # The eager formula sums 49152 float32 terms in float32: within 3e-4 relative, and never closer.
    np.testing.assert_allclose(eager, reference, rtol=3e-4, atol=1e-4)
    assert np.abs(fused - reference).max() <= np.abs(eager - reference).max() + 1e-6
    assert abs(fused[0, 0] - np.log(49152)) < 1e-5 and abs(fused[1, 1]) < 1e-6


def test_token_entropy_with_gradient_keeps_the_eager_graph():
    from ppo.models.ppo_model_utils import token_entropy

    logits = leaf(np.random.default_rng(12).standard_normal([2, 3, 17]).astype("float32"))
    entropy = token_entropy(logits)
    entropy.sum().backward()
    assert logits.grad is not None and float(paddle.abs(logits.grad).sum()) > 0


def test_the_fused_path_is_taken_only_where_it_applies(monkeypatch):
    x = paddle.ones([2, 8])
    assert cpu_fused.applicable(x, paddle.ones([8]))
    assert not cpu_fused.applicable(x.astype("bfloat16"))
    assert not cpu_fused.applicable(x, x.astype("float64"))
    monkeypatch.setenv(cpu_extension.SWITCH_ENV, "0")
    assert not cpu_fused.applicable(x)
    # With the extension switched off the callers run their eager formulas.
    rng = np.random.default_rng(3)
    h, w = paddle.to_tensor(rng.standard_normal([4, 8]).astype("float32")), paddle.to_tensor(rng.standard_normal(8).astype("float32"))
    np.testing.assert_allclose(kernels.rms_norm(h, w, 1e-6).numpy(), eager_rms_norm(h, w, 1e-6).numpy(), rtol=1e-6)


@pytest.mark.parametrize("fuse_ffn", [False, True])
def test_a_model_forward_takes_every_fused_op(monkeypatch, fuse_ffn):
    calls = {"rms_norm": 0, "rotary": 0, "swiglu": 0}

    def counted(name, function):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return function(*args, **kwargs)
        return wrapper

    for name in calls:
        monkeypatch.setattr(cpu_fused, name, counted(name, getattr(cpu_fused, name)))
    from paddlenlp.transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(**tiny_config_kwargs(), fuse_attention_ffn=fuse_ffn))
    layers = model.config.num_hidden_layers
    model(input_ids=paddle.to_tensor([[5, 6, 7]]), attention_mask=paddle.to_tensor([[0, 1, 1]]), return_dict=True)
    assert calls == {"rms_norm": 2 * layers + 1, "rotary": layers, "swiglu": layers}


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_whole_model_with_and_without_the_extension(family, monkeypatch):
    ids = paddle.to_tensor(np.random.default_rng(0).integers(4, 100, size=[2, 9]), dtype="int64")
    mask = paddle.to_tensor(np.array([[0, 0, 1, 1, 1, 1, 1, 1, 1], [1] * 9]), dtype="int64")

    def loss_and_grads():
        model = build_tiny_causal_lm(family, seed=0, num_key_value_heads=2)
        model.config.attention_dropout = 0.0
        logits = model(input_ids=ids, attention_mask=mask, return_dict=True).logits
        loss = (logits * logits).mean()
        loss.backward()
        return float(loss), {n: p.grad.numpy() for n, p in model.named_parameters() if p.grad is not None}

    fused_loss, fused_grads = loss_and_grads()
    monkeypatch.setenv(cpu_extension.SWITCH_ENV, "0")
    eager_loss, eager_grads = loss_and_grads()
    assert fused_loss == pytest.approx(eager_loss, rel=1e-5)
    assert fused_grads.keys() == eager_grads.keys()
    for name in fused_grads:
        np.testing.assert_allclose(fused_grads[name], eager_grads[name], rtol=2e-4, atol=1e-6, err_msg=name)
