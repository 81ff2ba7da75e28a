"""The C++ decode step (`ppo.models.cpu_decode`) against the eager `decode_step`, the engine with
and without it, and the extension's fallbacks (disabled, no compiler, a failing build)."""

import numpy as np
import paddle
import pytest

from ppo.infer_utils import DecoderRollout, GenerationSettings
from ppo.models import cpu_extension
from ppo.models import cpu_decode
from ppo.models.cpu_decode import fused_decode_step, unsupported_reason
from ppo.models.infer_model_utils import build_rope_tables, collect_decoder_weights, decode_step, prefill
from ppo.models.ppo_model_utils import make_position_ids
from test_rollout_engine import MODELS, PAD, left_padded


@pytest.fixture(scope="module")
def extension():
    module = cpu_extension.load_extension()
    if module is None and cpu_extension._compiler() is None:
        pytest.skip(f"CPU extension unavailable: {cpu_extension.unavailable_reason()}")
    assert module is not None, cpu_extension.unavailable_reason()  # a compiler is here: it must build
    return module


def _prefilled(model, lengths, width, steps, seed):
    weights = collect_decoder_weights(model)
    rope = build_rope_tables(weights)
    ids, mask = left_padded(lengths, width, PAD, seed=seed)
    positions = make_position_ids(mask)
    caches = [prefill(weights, rope, ids, mask, positions, capacity=width + steps) for _ in range(2)]
    return weights, rope, caches, positions[:, -1] + 1


# The projection kernels: MKL on the plain weights, the AVX2 and AVX-512 streaming kernels.
LEVELS = {"mkl": 0, "avx2": 1, "avx512": 2}


def _require_level(level: int) -> None:
    if cpu_decode.cpu_vector_level() < level:
        pytest.skip(f"this CPU runs streaming level {cpu_decode.cpu_vector_level()}, not {level}")


@pytest.mark.parametrize("level_name", sorted(LEVELS))
@pytest.mark.parametrize("model_name", sorted(MODELS))
@paddle.no_grad()
def test_fused_step_matches_eager_step_and_writes_the_same_cache(extension, model_name, level_name):
    _require_level(LEVELS[level_name])
    model = MODELS[model_name]()
    width, steps = 9, 7
    weights, rope, ((logits, eager_cache), (_, fused_cache)), positions = _prefilled(model, [5, 9, 2, 7], width, steps, seed=4)
    fused = fused_decode_step(weights, rope, level=LEVELS[level_name])
    assert fused is not None
    tokens = paddle.argmax(logits, axis=-1)
    for step in range(steps):
        if step == 3:  # drop a row from both caches, as the engine does for finished rows
            keep = paddle.to_tensor([0, 2, 3], dtype="int64")
            eager_cache, fused_cache = eager_cache.select_rows(keep), fused_cache.select_rows(keep)
            tokens, positions = paddle.index_select(tokens, keep), paddle.index_select(positions, keep)
        expected = decode_step(weights, rope, eager_cache, tokens, positions, slot=width + step)
        got = fused(fused_cache, tokens, positions, width + step)
        assert got.dtype == paddle.float32 and got.shape == expected.shape
        np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=0, atol=2e-6 * max(1.0, float(expected.abs().max())))
        np.testing.assert_array_equal(got.argmax(-1).numpy(), expected.argmax(-1).numpy())
        for eager_tensor, fused_tensor in zip(eager_cache.keys + eager_cache.values, fused_cache.keys + fused_cache.values):
            np.testing.assert_allclose(fused_tensor.numpy(), eager_tensor.numpy(), rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(fused_cache.attention_bias.numpy(), eager_cache.attention_bias.numpy())
        tokens, positions = paddle.argmax(expected, axis=-1), positions + 1


@pytest.mark.parametrize("model_name", ["llama", "qwen2_bias"])
def test_engine_with_and_without_the_extension_agree(extension, model_name):
    model = MODELS[model_name]()
    ids, mask = left_padded([4, 7, 2], width=7, pad_id=PAD, seed=9)
    settings = GenerationSettings(max_new_tokens=12, num_return_sequences=2, do_sample=True, temperature=0.7, top_p=0.9, return_log_probs=True)
    outputs = []
    for use_cpu_extension in (True, False):
        paddle.seed(3)
        rollout = DecoderRollout(model, stop_token_ids=(2,), pad_token_id=PAD, use_cpu_extension=use_cpu_extension)
        outputs.append(rollout.run(ids.astype("int64"), mask.astype("int64"), settings))
    fused, eager = outputs
    np.testing.assert_array_equal(fused.sequences.numpy(), eager.sequences.numpy())
    np.testing.assert_allclose(fused.log_probs.numpy(), eager.log_probs.numpy(), atol=1e-5)


def test_unsupported_weights_keep_the_eager_step(extension):
    model = MODELS["llama"]()
    weights = collect_decoder_weights(model)
    weights.final_norm = weights.final_norm.astype("bfloat16")
    rope = build_rope_tables(collect_decoder_weights(model))
    assert unsupported_reason(weights, rope) == "weights are not float32"
    assert fused_decode_step(weights, rope) is None


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv(cpu_extension.SWITCH_ENV, "0")
    monkeypatch.setattr(cpu_extension, "_unavailable_reason", None)
    assert cpu_extension.load_extension.__wrapped__() is None
    assert "PADDLE_RLHF_CPU_EXTENSION=0" in cpu_extension.unavailable_reason()


def test_no_compiler_is_a_warning_not_an_error(monkeypatch):
    monkeypatch.setattr(cpu_extension, "_compiler", lambda: None)
    monkeypatch.setattr(cpu_extension, "_unavailable_reason", None)
    assert cpu_extension.load_extension.__wrapped__() is None
    assert "no C++ compiler" in cpu_extension.unavailable_reason()


def test_a_failing_build_leaves_no_cache_entry(monkeypatch, tmp_path):
    if cpu_extension._compiler() is None:
        pytest.skip("no C++ compiler")
    source_dir = tmp_path / "csrc"
    source_dir.mkdir()
    for name in cpu_extension.SOURCES:
        (source_dir / name).write_text('#include "paddle/extension.h"\nthis is not C++;\n')
    monkeypatch.setattr(cpu_extension, "SOURCE_DIR", str(source_dir))
    monkeypatch.setattr(cpu_extension, "_unavailable_reason", None)
    monkeypatch.setenv("PADDLE_RLHF_CACHE", str(tmp_path / "cache"))
    assert cpu_extension.load_extension.__wrapped__() is None
    assert "build or load failed" in cpu_extension.unavailable_reason()
    extensions = tmp_path / "cache" / "extensions"
    assert not [entry for entry in extensions.iterdir() if not entry.name.endswith(".lock")]


@pytest.mark.parametrize("level", [1, 2])
@pytest.mark.parametrize("rows, inner, columns", [(1, 576, 960), (8, 64, 96), (13, 17, 45), (3, 100, 33), (20, 8, 7)])
def test_streaming_products_match_float64(extension, level, rows, inner, columns):
    """Every row count (full groups and remainders), column tails inside a panel and inner sizes
    that are not a multiple of the vector width."""
    _require_level(level)
    rng = np.random.default_rng(rows * 1000 + columns)
    x = rng.standard_normal((rows, inner)).astype("float32")
    weight = rng.standard_normal((inner, columns)).astype("float32")
    expected = x.astype(np.float64) @ weight.astype(np.float64)
    tolerance = 2e-6 * np.sqrt(inner) * max(1.0, np.abs(expected).max())
    got = cpu_decode.panel_product(paddle.to_tensor(x), paddle.to_tensor(weight), level).numpy()
    np.testing.assert_allclose(got, expected, rtol=0, atol=tolerance)
    head = np.ascontiguousarray(weight.T)  # [columns, inner], as a tied LM head is stored
    got_head = cpu_decode.panel_product(paddle.to_tensor(x), paddle.to_tensor(head), level, head=True).numpy()
    np.testing.assert_allclose(got_head, expected, rtol=0, atol=tolerance)


def test_panels_hold_32_columns_of_every_row_zero_padded(extension):
    weight = paddle.arange(3 * 40, dtype="float32").reshape([3, 40])
    panels = cpu_decode.to_panels(weight).numpy()
    assert panels.shape == (2, 3, 32)
    np.testing.assert_array_equal(panels[0], weight.numpy()[:, :32])
    np.testing.assert_array_equal(panels[1, :, :8], weight.numpy()[:, 32:])
    assert not panels[1, :, 8:].any()


def test_streaming_level_follows_the_environment_and_the_cpu(extension, monkeypatch):
    available = cpu_decode.cpu_vector_level()
    monkeypatch.setenv(cpu_decode.STREAMING_ENV, "mkl")
    assert cpu_decode.streaming_level() == 0
    monkeypatch.setenv(cpu_decode.STREAMING_ENV, "avx512")
    assert cpu_decode.streaming_level() == min(2, available)  # never beyond what the CPU runs
    monkeypatch.setenv(cpu_decode.STREAMING_ENV, "sse")
    with pytest.raises(ValueError, match="avx2"):
        cpu_decode.streaming_level()
    monkeypatch.delenv(cpu_decode.STREAMING_ENV)
    assert cpu_decode.streaming_level() == (2 if available == 2 else 0)


def test_the_kernels_refuse_a_level_beyond_the_cpu(extension):
    x, weight = paddle.ones([2, 4]), paddle.ones([4, 4])
    with pytest.raises(Exception, match="beyond this CPU|not in"):
        extension.rlhf_cpu_panel_product(x, cpu_decode.to_panels(weight), 4, False, cpu_decode.cpu_vector_level() + 1)
