"""Model shapes the benchmarks run at, and how a randomly initialised Llama is built from them.

`default` and `large` are the TRL peer's toy shapes (../shared/peer/trl); `smollm2` is the
SmolLM2-135M-Instruct architecture (the peer's `build_assets.py --shapes smollm2`), random weights:
the arithmetic of a real small model, for timing only.

Every entry holds `LlamaConfig` fields. The core ones go through `ppo.tiny.tiny_config_kwargs`
(which also fixes the special-token ids the tiny tokenizer uses); the rest (`ARCHITECTURE_EXTRAS`)
override its defaults, since it sets untied embeddings and knows nothing of RoPE base or norm eps.
"""

from __future__ import annotations

SHAPES = {
    "default": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512, vocab_size=1000),
    "large": dict(hidden_size=1024, num_hidden_layers=8, num_attention_heads=16, intermediate_size=2816, vocab_size=1000),
    "smollm2": dict(
        hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, intermediate_size=1536,
        vocab_size=49152, tie_word_embeddings=True, rope_theta=100000.0, rms_norm_eps=1e-5,
    ),
}
ARCHITECTURE_EXTRAS = ("tie_word_embeddings", "rope_theta", "rms_norm_eps")


def llama_config_kwargs(shapes: dict, max_position_embeddings: int) -> dict:
    """`LlamaConfig` keyword arguments for one `SHAPES` entry (importing `ppo.tiny` imports Paddle:
    call it after `setup_process`)."""
    from ppo.tiny import tiny_config_kwargs

    core = {key: value for key, value in shapes.items() if key not in ARCHITECTURE_EXTRAS}
    extras = {key: value for key, value in shapes.items() if key in ARCHITECTURE_EXTRAS}
    return {**tiny_config_kwargs(max_position_embeddings=max_position_embeddings, **core), **extras}


def llama_config(shapes: dict, max_position_embeddings: int):
    from paddlenlp.transformers import LlamaConfig

    config = LlamaConfig(**llama_config_kwargs(shapes, max_position_embeddings))
    config.dtype = "float32"
    return config


def build_causal_lm(shapes: dict, max_position_embeddings: int, seed: int = 0):
    """A randomly initialised fp32 `LlamaForCausalLM` (with tied embeddings the LM head is the
    embedding matrix, read transposed)."""
    import paddle
    from paddlenlp.transformers import LlamaForCausalLM

    config = llama_config(shapes, max_position_embeddings)
    paddle.seed(seed)
    return LlamaForCausalLM(config)
