"""The rollout engine against the plain model: greedy tokens, EOS handling, the sampling
distribution, log-probs, parameter sharing, reproducibility, and the fused-weight packing."""

import numpy as np
import paddle
import paddle.nn.functional as F
import pytest
from scipy import stats

from ppo.infer_utils import BACKENDS, RolloutEngine, check_prompts, paddlenlp_ops_available
from ppo.models.infer_model_utils import (
    UnsupportedModelError,
    apply_repetition_penalty,
    collect_decoder_weights,
    left_to_right_padding,
    pack_qkv_for_fused_inference,
    split_interleaved_qkv,
    top_p_filter,
)
from ppo.models.ppo_model_utils import make_position_ids
from ppo.tiny import build_tiny_causal_lm, tiny_config_kwargs

PAD = 3
VOCAB = 512
NEVER = 10**6  # an EOS id no model can emit: every row runs to max_new_tokens


def sharpen_attention(model, factor=8.0):
    """Randomly initialised tiny models attend almost uniformly, so their greedy tokens barely
    depend on positions or on which keys are visible. Scaling q and k makes attention peaked,
    so a wrong position, mask or cache slot changes the tokens."""
    for layer in getattr(model, model.base_model_prefix).layers:
        attention = layer.self_attn
        if getattr(attention, "fuse_attention_qkv", False):
            projections = [attention.qkv_proj]
        else:
            projections = [attention.q_proj, attention.k_proj]
        for projection in projections:
            projection.weight.set_value(projection.weight * factor)
    model.eval()
    return model


def llama(**overrides):
    return sharpen_attention(build_tiny_causal_lm("llama", seed=0, **overrides))


def qwen2_with_biases():
    """Qwen2 with non-zero q/k/v biases (they initialise to zero, which would not test them)."""
    model = build_tiny_causal_lm("qwen2", seed=1)
    paddle.seed(11)
    for layer in model.qwen2.layers:
        for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
            proj.bias.set_value(paddle.randn(proj.bias.shape) * 0.5)
    return sharpen_attention(model)


def llama_gqa_fused():
    """GQA (4 query heads over 2 key/value heads) with PaddleNLP's fused qkv and gate|up weights."""
    from paddlenlp.transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**tiny_config_kwargs(num_key_value_heads=2), fuse_attention_qkv=True, fuse_attention_ffn=True)
    config.dtype = "float32"
    paddle.seed(2)
    return sharpen_attention(LlamaForCausalLM(config))


MODELS = {"llama": llama, "qwen2_bias": qwen2_with_biases, "llama_gqa_fused": llama_gqa_fused}


def left_padded(lengths, width, pad_id, seed=0):
    """[B, width] prompts with `lengths[i]` real tokens each, padding on the left."""
    rng = np.random.RandomState(seed)
    ids = np.full([len(lengths), width], pad_id, dtype="int64")
    mask = np.zeros([len(lengths), width], dtype="int64")
    for row, length in enumerate(lengths):
        ids[row, width - length :] = rng.randint(4, VOCAB, size=length)
        mask[row, width - length :] = 1
    return paddle.to_tensor(ids), paddle.to_tensor(mask)


@paddle.no_grad()
def reference_greedy(model, ids, mask, max_new_tokens, eos, pad):
    """No cache: a full forward over the whole sequence for every new token."""
    ids, mask = ids.clone(), mask.clone()
    finished = np.zeros(ids.shape[0], dtype=bool)
    out = []
    for _ in range(max_new_tokens):
        logits = model(input_ids=ids, attention_mask=mask, position_ids=make_position_ids(mask), return_dict=True).logits
        tokens = np.where(finished, pad, logits[:, -1].argmax(-1).numpy())
        out.append(tokens)
        finished |= tokens == eos
        ids = paddle.concat([ids, paddle.to_tensor(tokens[:, None])], axis=1)
        mask = paddle.concat([mask, paddle.ones([ids.shape[0], 1], "int64")], axis=1)
        if finished.all():
            break
    return np.stack(out, axis=1)


def response_part(output):
    return output.sequences[:, output.prompt_length :].numpy(), output.attention_mask[:, output.prompt_length :].numpy()


@pytest.mark.parametrize("pad_equals_eos", [False, True], ids=["pad!=eos", "pad==eos"])
@pytest.mark.parametrize("model_name", sorted(MODELS))
def test_greedy_matches_reference_loop_and_paddlenlp_generate(model_name, pad_equals_eos):
    model = MODELS[model_name]()
    ids, mask = left_padded([3, 7, 5], width=7, pad_id=PAD)
    # Pick an EOS the model actually emits (row 0's third token) so stopping is exercised.
    eos = int(reference_greedy(model, ids, mask, 3, eos=NEVER, pad=PAD)[0, 2])
    pad = eos if pad_equals_eos else PAD
    ids = paddle.where(mask.astype("bool"), ids, paddle.full_like(ids, pad))
    steps = 10
    expected = reference_greedy(model, ids, mask, steps, eos=eos, pad=pad)

    engines = {
        "decoder": RolloutEngine(model, eos_token_id=eos, pad_token_id=pad, backend="decoder"),
        "decoder, finished rows kept": RolloutEngine(
            model, eos_token_id=eos, pad_token_id=pad, backend="decoder", compact_finished_rows=False
        ),
        "paddlenlp generate": RolloutEngine(model, eos_token_id=eos, pad_token_id=pad, backend="generate"),
    }
    for name, engine in engines.items():
        out = engine.generate(ids, mask, max_new_tokens=steps, num_return_sequences=2, do_sample=False)
        tokens, response_mask = response_part(out)
        np.testing.assert_array_equal(tokens, np.repeat(expected, 2, axis=0), err_msg=name)
        np.testing.assert_array_equal(out.sequences[:, :7].numpy(), np.repeat(ids.numpy(), 2, axis=0))
        np.testing.assert_array_equal(out.attention_mask[:, :7].numpy(), np.repeat(mask.numpy(), 2, axis=0) == 1)
        # The mask covers each response up to and including its first EOS, never by comparing to pad.
        for row, mask_row in zip(tokens, response_mask):
            stop = int(np.argmax(row == eos)) + 1 if (row == eos).any() else len(row)
            assert mask_row.tolist() == [True] * stop + [False] * (len(row) - stop)
            assert (row[stop:] == pad).all()
    assert (expected[0] == eos).any(), "the test should exercise a row that stops"


def test_raw_paddlenlp_generate_agrees_with_engine():
    """The engine's 'generate' backend is a thin wrapper; check the decoder against the PaddleNLP call itself."""
    model = llama()
    ids, mask = left_padded([4, 6], width=6, pad_id=PAD, seed=3)
    with paddle.no_grad():
        raw, _ = model.generate(
            input_ids=ids, attention_mask=mask, position_ids=make_position_ids(mask), max_new_tokens=6,
            decode_strategy="greedy_search", eos_token_id=NEVER, pad_token_id=PAD,
        )
    out = RolloutEngine(model, NEVER, PAD, backend="decoder").generate(ids, mask, max_new_tokens=6, do_sample=False)
    np.testing.assert_array_equal(response_part(out)[0], raw.numpy())


def test_eos_stops_rows_pads_after_and_trims_width():
    model = llama()
    ids, mask = left_padded([5, 5, 2, 6], width=6, pad_id=PAD, seed=4)
    free_run = reference_greedy(model, ids, mask, 12, eos=NEVER, pad=PAD)
    eos = int(free_run[1, 1])  # row 1 emits it at step 1 (maybe others do too)
    out = RolloutEngine(model, eos, PAD, backend="decoder").generate(ids, mask, max_new_tokens=12, do_sample=False)
    tokens, response_mask = response_part(out)
    lengths = out.response_lengths.numpy()
    for row in range(4):
        hits = np.flatnonzero(free_run[row] == eos)
        expected_length = hits[0] + 1 if len(hits) else 12
        assert lengths[row] == expected_length
        np.testing.assert_array_equal(tokens[row, :expected_length], free_run[row, :expected_length])
        assert (tokens[row, expected_length:] == PAD).all()
        assert response_mask[row].sum() == expected_length and response_mask[row, expected_length - 1]
    # T is trimmed to the longest response: every column is used by at least one row.
    assert tokens.shape[1] == lengths.max()


def test_all_rows_finishing_ends_generation_early():
    model = llama()
    ids, mask = left_padded([4, 4], width=4, pad_id=PAD, seed=5)
    free_run = reference_greedy(model, ids, mask, 20, eos=NEVER, pad=PAD)
    eos = int(free_run[0, 0])  # row 0 stops at once; row 1 when (if) it emits the same token
    out = RolloutEngine(model, eos, PAD, backend="decoder").generate(ids, mask, max_new_tokens=20, do_sample=False)
    expected = reference_greedy(model, ids, mask, 20, eos=eos, pad=PAD)
    tokens, _ = response_part(out)
    np.testing.assert_array_equal(tokens, expected[:, : tokens.shape[1]])
    assert (expected[:, tokens.shape[1] :] == PAD).all()


def test_dropping_finished_rows_does_not_change_tokens():
    model = llama()
    ids, mask = left_padded([6, 3, 5, 6, 2, 4, 6, 5], width=6, pad_id=PAD, seed=6)
    free_run = reference_greedy(model, ids, mask, 4, eos=NEVER, pad=PAD)
    eos = int(free_run[2, 1])
    outputs = [
        RolloutEngine(model, eos, PAD, backend="decoder", compact_finished_rows=compact).generate(
            ids, mask, max_new_tokens=16, num_return_sequences=2, do_sample=False, repetition_penalty=1.3
        )
        for compact in (True, False)
    ]
    np.testing.assert_array_equal(outputs[0].sequences.numpy(), outputs[1].sequences.numpy())
    np.testing.assert_array_equal(outputs[0].attention_mask.numpy(), outputs[1].attention_mask.numpy())


def test_repetition_penalty_matches_paddlenlp():
    from paddlenlp.generation.logits_process import RepetitionPenaltyLogitsProcessor

    paddle.seed(0)
    logits = paddle.randn([3, 50])
    seen_ids = paddle.to_tensor([[1, 5, 5, 9], [0, 2, 3, 4], [49, 48, 1, 1]], dtype="int64")
    seen = paddle.zeros([3, 50]).put_along_axis(seen_ids, paddle.ones([3, 4]), axis=-1) > 0
    ours = apply_repetition_penalty(logits, seen, 1.7)
    theirs = RepetitionPenaltyLogitsProcessor(1.7)(seen_ids, logits)
    np.testing.assert_array_equal(ours.numpy(), theirs.numpy())

    # End to end on unpadded prompts (PaddleNLP also counts padding as seen; we do not).
    model = llama()
    ids, mask = left_padded([6, 6], width=6, pad_id=PAD, seed=1)
    results = [
        RolloutEngine(model, NEVER, PAD, backend=backend).generate(
            ids, mask, max_new_tokens=10, do_sample=False, repetition_penalty=1.5
        )
        for backend in ("decoder", "generate")
    ]
    np.testing.assert_array_equal(results[0].sequences.numpy(), results[1].sequences.numpy())
    plain = RolloutEngine(model, NEVER, PAD, backend="decoder").generate(ids, mask, max_new_tokens=10, do_sample=False)
    assert not np.array_equal(plain.sequences.numpy(), results[0].sequences.numpy()), "the penalty should matter here"


def test_top_p_filter_matches_paddlenlp():
    from paddlenlp.generation.logits_process import TopPProcess

    paddle.seed(1)
    probs = F.softmax(paddle.randn([4, 30]) * 2, axis=-1)
    for top_p in (0.1, 0.5, 0.9):
        np.testing.assert_allclose(top_p_filter(probs, top_p).numpy(), TopPProcess(probs, top_p, 1).numpy())


def peaked_llama():
    """A tiny Llama whose next-token distribution is far from uniform (scaled LM head)."""
    model = llama()
    model.lm_head.weight.set_value(model.lm_head.weight * 12.0)
    return model


@paddle.no_grad()
def first_token_probs(model, ids, mask, temperature):
    logits = model(input_ids=ids, attention_mask=mask, position_ids=make_position_ids(mask), return_dict=True).logits
    return F.softmax(logits[:, -1] / temperature, axis=-1).numpy()


def chi_square_p_value(samples, probs, min_expected=5.0):
    """Goodness of fit of integer samples to `probs`; bins with small expectation are pooled."""
    counts = np.bincount(samples, minlength=len(probs)).astype(float)
    expected = probs * len(samples)
    big = expected >= min_expected
    observed = np.append(counts[big], counts[~big].sum())
    expected = np.append(expected[big], expected[~big].sum())
    if expected[-1] < min_expected:  # pooled tail too small to be its own bin
        observed, expected = observed[:-1], expected[:-1]
        observed[-1] += counts[~big].sum()
        expected[-1] += probs[~big].sum() * len(samples)
    statistic = ((observed - expected) ** 2 / expected).sum()
    return stats.chi2.sf(statistic, df=len(observed) - 1), int(big.sum())


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.6, 1.0), (1.3, 0.7)])
def test_first_token_distribution_matches_softmax(temperature, top_p):
    model = peaked_llama()
    ids, mask = left_padded([5, 3], width=5, pad_id=PAD, seed=8)
    probs = first_token_probs(model, ids, mask, temperature)
    if top_p < 1.0:
        from paddlenlp.generation.logits_process import TopPProcess

        probs = TopPProcess(paddle.to_tensor(probs), top_p, 1).numpy()
        probs = probs / probs.sum(axis=-1, keepdims=True)
    paddle.seed(123)
    samples = 3000
    out = RolloutEngine(model, NEVER, PAD, backend="decoder").generate(
        ids, mask, max_new_tokens=1, num_return_sequences=samples, temperature=temperature, top_p=top_p
    )
    first = out.sequences[:, -1].numpy().reshape(2, samples)
    for row in range(2):
        assert probs[row][first[row]].min() > 0, "sampled a token outside the nucleus"
        p_value, bins = chi_square_p_value(first[row], probs[row])
        assert bins >= 5, "the test distribution should have several likely tokens"
        assert p_value > 1e-3, f"row {row}: sample frequencies do not follow softmax (p={p_value:.2g})"


def test_temperature_changes_the_distribution():
    """The chi-square test above must be able to fail: samples at T=1 do not fit softmax(logits/0.6)."""
    model = peaked_llama()
    ids, mask = left_padded([5], width=5, pad_id=PAD, seed=8)
    paddle.seed(5)
    out = RolloutEngine(model, NEVER, PAD, backend="decoder").generate(ids, mask, max_new_tokens=1, num_return_sequences=3000)
    p_value, _ = chi_square_p_value(out.sequences[:, -1].numpy(), first_token_probs(model, ids, mask, 0.6)[0])
    assert p_value < 1e-6


@pytest.mark.parametrize("model_name", ["llama", "qwen2_bias"])
def test_log_probs_match_full_forward_recomputation(model_name):
    model = MODELS[model_name]()
    ids, mask = left_padded([4, 7, 2], width=7, pad_id=PAD, seed=9)
    temperature = 0.7
    paddle.seed(7)
    out = RolloutEngine(model, eos_token_id=2, pad_token_id=PAD, backend="decoder").generate(
        ids, mask, max_new_tokens=12, num_return_sequences=2, temperature=temperature, top_p=0.9,
        repetition_penalty=1.2, return_log_probs=True,
    )
    attention_mask = out.attention_mask.astype("int64")
    with paddle.no_grad():
        logits = model(input_ids=out.sequences, attention_mask=attention_mask,
                       position_ids=make_position_ids(attention_mask), return_dict=True).logits
    log_probs = F.log_softmax(logits[:, :-1] / temperature, axis=-1)
    targets = out.sequences[:, 1:]
    recomputed = paddle.take_along_axis(log_probs, targets.unsqueeze(-1), axis=-1).squeeze(-1)
    recomputed = recomputed[:, out.prompt_length - 1 :].numpy()
    response_mask = out.attention_mask[:, out.prompt_length :].numpy()
    np.testing.assert_allclose(out.log_probs.numpy()[response_mask], recomputed[response_mask], atol=2e-4)
    assert (out.log_probs.numpy()[~response_mask] == 0).all()


def test_parameters_are_shared_with_the_training_model():
    model = llama()
    weights = collect_decoder_weights(model)
    assert weights.embed_tokens is model.llama.embed_tokens.weight
    assert weights.layers[0].o_proj is model.llama.layers[0].self_attn.o_proj.weight
    assert weights.lm_head is model.lm_head.weight

    ids, mask = left_padded([5, 3], width=5, pad_id=PAD, seed=10)
    engine = RolloutEngine(model, NEVER, PAD, backend="decoder")
    before = engine.generate(ids, mask, max_new_tokens=6, do_sample=False).sequences.numpy()
    # An in-place update, as an optimizer step does; no call tells the engine about it.
    for param in (model.llama.layers[0].self_attn.q_proj.weight, model.llama.layers[1].mlp.up_proj.weight, model.lm_head.weight):
        paddle.assign(param * -1.5, output=param)
    after = engine.generate(ids, mask, max_new_tokens=6, do_sample=False).sequences.numpy()
    assert not np.array_equal(before, after)
    np.testing.assert_array_equal(after[:, 5:], reference_greedy(model, ids, mask, 6, eos=NEVER, pad=PAD))


def test_sampling_is_reproducible_from_paddle_rng():
    model = llama()
    ids, mask = left_padded([5, 3], width=5, pad_id=PAD, seed=11)
    engine = RolloutEngine(model, eos_token_id=2, pad_token_id=PAD, backend="decoder")

    def sample():
        return engine.generate(ids, mask, max_new_tokens=8, num_return_sequences=3, top_p=0.9).sequences.numpy()

    paddle.seed(42)
    first = sample()
    state = paddle.get_rng_state()
    second = sample()
    paddle.seed(42)
    np.testing.assert_array_equal(sample(), first)
    paddle.set_rng_state(state)
    np.testing.assert_array_equal(sample(), second)
    assert not np.array_equal(first, second)


def test_split_interleaved_qkv_inverts_paddlenlp_fusion():
    from paddlenlp.transformers.conversion_utils import fuse_param_func

    heads, kv_heads, head_dim, hidden = 6, 2, 4, 10
    paddle.seed(3)
    q = paddle.randn([hidden, heads * head_dim])
    k = paddle.randn([hidden, kv_heads * head_dim])
    v = paddle.randn([hidden, kv_heads * head_dim])
    fused = fuse_param_func()([q, k, v], is_qkv=True, num_heads=heads, num_key_value_heads=kv_heads)
    for ours, original in zip(split_interleaved_qkv(fused, heads, kv_heads, head_dim), (q, k, v)):
        np.testing.assert_array_equal(ours.numpy(), original.numpy())
    with pytest.raises(ValueError, match="columns"):
        split_interleaved_qkv(fused, heads, 3, head_dim)


def test_pack_qkv_for_fused_inference_layout():
    """Rows: all query heads, then the (fewer, under GQA) key heads, then the value heads;
    each row is one output feature's input weights, as the fused kernel's transposed GEMM reads them."""
    heads, kv_heads, head_dim, hidden = 4, 1, 3, 5
    q = paddle.arange(hidden * heads * head_dim, dtype="float32").reshape([hidden, heads * head_dim])
    k = -paddle.arange(hidden * kv_heads * head_dim, dtype="float32").reshape([hidden, kv_heads * head_dim]) - 1
    v = k - 1000
    packed = pack_qkv_for_fused_inference(q, k, v)
    assert packed.shape == [(heads + 2 * kv_heads) * head_dim, hidden]
    x = paddle.randn([2, hidden])
    projected = paddle.matmul(x, packed, transpose_y=True)  # what the fused kernel computes
    np.testing.assert_allclose(projected[:, : heads * head_dim].numpy(), (x @ q).numpy(), rtol=1e-6)
    np.testing.assert_allclose(projected[:, heads * head_dim : (heads + kv_heads) * head_dim].numpy(), (x @ k).numpy(), rtol=1e-6)
    np.testing.assert_allclose(projected[:, (heads + kv_heads) * head_dim :].numpy(), (x @ v).numpy(), rtol=1e-6)
    with pytest.raises(ValueError, match="same shape"):
        pack_qkv_for_fused_inference(q, k, paddle.zeros([hidden, 2 * head_dim]))


def test_left_to_right_padding_keeps_tokens():
    ids = paddle.to_tensor([[9, 9, 5, 6], [7, 8, 1, 2], [9, 9, 9, 4]])
    mask = paddle.to_tensor([[0, 0, 1, 1], [1, 1, 1, 1], [0, 0, 0, 1]])
    right, lengths = left_to_right_padding(ids, mask, pad_token_id=0)
    assert right.numpy().tolist() == [[5, 6, 0, 0], [7, 8, 1, 2], [4, 0, 0, 0]]
    assert lengths.numpy().tolist() == [2, 4, 1]


def test_backend_selection_and_argument_errors():
    model = llama()
    assert RolloutEngine(model, 2, PAD, use_fusemt=False).backend == "decoder"
    if paddlenlp_ops_available():  # a GPU machine with PaddleNLP's custom operators
        assert RolloutEngine(model, 2, PAD).backend == "fused"
    else:
        assert RolloutEngine(model, 2, PAD).backend == "decoder"
        with pytest.raises(RuntimeError, match="paddlenlp_ops"):
            RolloutEngine(model, 2, PAD, backend="fused")
    with pytest.raises(ValueError, match="choose one of"):
        RolloutEngine(model, 2, PAD, backend="fast")
    assert set(BACKENDS) >= {"decoder", "generate", "fused", "auto"}

    sliding = build_tiny_causal_lm("qwen2")
    sliding.config.use_sliding_window = True  # a Qwen2 feature the decoder does not implement
    with pytest.raises(UnsupportedModelError, match="sliding-window"):
        RolloutEngine(sliding, 2, PAD, backend="decoder")
    assert RolloutEngine(sliding, 2, PAD).backend == "generate"

    # Any other architecture falls back to PaddleNLP's generate, with the same output layout.
    from paddlenlp.transformers import GPTConfig, GPTForCausalLM

    paddle.seed(0)
    gpt = GPTForCausalLM(GPTConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                   intermediate_size=64, max_position_embeddings=64))
    gpt.eval()
    with pytest.raises(UnsupportedModelError, match="GPTForCausalLM"):
        RolloutEngine(gpt, 2, PAD, backend="decoder")
    engine = RolloutEngine(gpt, NEVER, PAD)
    assert engine.backend == "generate"
    ids, mask = left_padded([3, 2], width=3, pad_id=PAD)
    out = engine.generate(ids, mask, max_new_tokens=4, num_return_sequences=2)
    assert out.sequences.shape == [4, 7] and out.attention_mask[:, 3:].numpy().all()

    engine = RolloutEngine(llama(), 2, PAD)
    ids, mask = left_padded([3, 2], width=3, pad_id=PAD)
    for bad in (dict(temperature=0.0), dict(top_p=0.0), dict(top_p=1.5), dict(repetition_penalty=0.0),
                dict(num_return_sequences=0), dict(max_new_tokens=0)):
        kwargs = dict(max_new_tokens=2, **bad) if "max_new_tokens" not in bad else bad
        with pytest.raises(ValueError, match=next(iter(bad))):
            engine.generate(ids, mask, **kwargs)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        engine.generate(ids, mask, max_new_tokens=600)


def test_prompt_checks():
    ids, mask = left_padded([3, 2], width=3, pad_id=PAD)
    check_prompts(ids, mask)
    with pytest.raises(ValueError, match="LEFT-padded"):
        check_prompts(ids, paddle.to_tensor([[1, 1, 1], [1, 1, 0]]))
    with pytest.raises(ValueError, match="all padding"):
        check_prompts(ids, paddle.to_tensor([[1, 1, 1], [0, 0, 0]]))
    with pytest.raises(ValueError, match="shape"):
        check_prompts(ids, mask[:, :2])
