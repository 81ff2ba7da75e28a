"""Hugging Face ↔ PaddleNLP checkpoint layout for the decoder architectures we support.

Both libraries name a decoder's tensors the same way below the backbone prefix
(`layers.N.self_attn.q_proj.weight`, ...). They differ in three places, which is all this
module translates:

- the backbone prefix: HF `model.`, PaddleNLP `llama.` / `qwen2.`;
- Linear weights: torch stores [out, in], Paddle [in, out] (embeddings are [vocab, hidden] in both);
- heads: HF `lm_head.weight` / `score.weight` ↔ PaddleNLP `lm_head.weight` / `score_head.weight`.

PaddleNLP can also fuse q|k|v and gate|up into one Linear (`fuse_attention_qkv`,
`fuse_attention_ffn`); `unfuse_paddle_state` splits them so that every export sees one layout.
Arrays here are numpy; callers convert from/to framework tensors at the edges.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional

import numpy as np

HF_BACKBONE_PREFIX = "model."

# Tensors that some HF checkpoints carry but that are recomputed from the config (rotary tables).
DERIVED_HF_TENSOR_SUFFIXES = ("rotary_emb.inv_freq",)

# Where our score models keep the PaddleNLP-only score settings in an exported HF config.json.
SCORE_CONFIG_KEY = "paddle_rlhf_score"

# Tokenizer files both libraries read unchanged, carried over on import and on export.
SHARED_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.json",
    "chat_template.jinja",
)


@dataclass(frozen=True)
class Architecture:
    """One supported decoder family, by its `model_type`."""

    model_type: str
    paddle_prefix: str  # PaddleNLP's base_model_prefix
    attention_bias: bool  # q/k/v projections carry biases (Qwen2)
    causal_lm: str  # class name, identical in HF and PaddleNLP
    sequence_classification: str  # HF class of a score model export
    score_model: str  # our PaddleNLP score model class (ppo.models.score_model)
    hf_config_class: str


ARCHITECTURES: Dict[str, Architecture] = {
    "llama": Architecture(
        "llama", "llama", False, "LlamaForCausalLM", "LlamaForSequenceClassification", "LlamaModelForScore", "LlamaConfig"
    ),
    "qwen2": Architecture(
        "qwen2", "qwen2", True, "Qwen2ForCausalLM", "Qwen2ForSequenceClassification", "Qwen2ModelForScore", "Qwen2Config"
    ),
}


def architecture_for(model_type: Optional[str], source: str, architectures=None) -> Architecture:
    """The supported family of `model_type`, or a ValueError naming it, the file and the supported ones."""
    if model_type not in ARCHITECTURES:
        named = f"model_type {model_type!r}" + (f" (architectures {list(architectures)})" if architectures else "")
        raise ValueError(f"{source}: unsupported architecture {named}; supported model types: {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[model_type]


# --------------------------------------------------------------------------- model head kinds
CAUSAL_LM, SCORE = "causal_lm", "score"


def head_kind(architectures) -> str:
    """`score` for sequence-classification / score-model checkpoints, else `causal_lm`."""
    names = list(architectures or [])
    if any(name.endswith("ForSequenceClassification") or name.endswith("ForScore") for name in names):
        return SCORE
    return CAUSAL_LM


# --------------------------------------------------------------------------- tensor names
def layer_tensor_names(arch: Architecture, num_layers: int) -> List[str]:
    """Names below the backbone prefix, identical in both libraries (unfused layout)."""
    per_layer = [
        "self_attn.q_proj.weight",
        "self_attn.k_proj.weight",
        "self_attn.v_proj.weight",
        "self_attn.o_proj.weight",
        "mlp.gate_proj.weight",
        "mlp.up_proj.weight",
        "mlp.down_proj.weight",
        "input_layernorm.weight",
        "post_attention_layernorm.weight",
    ]
    if arch.attention_bias:
        per_layer += ["self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"]
    names = ["embed_tokens.weight", "norm.weight"]
    for index in range(num_layers):
        names += [f"layers.{index}.{suffix}" for suffix in per_layer]
    return names


def _is_transposed(name: str, array: np.ndarray) -> bool:
    """Linear weights are stored transposed between the libraries; embeddings and norms are not."""
    return array.ndim == 2 and not name.endswith("embed_tokens.weight")


def expected_hf_names(arch: Architecture, num_layers: int, kind: str, tie_word_embeddings: bool, score_bias: bool = False):
    names = [HF_BACKBONE_PREFIX + name for name in layer_tensor_names(arch, num_layers)]
    if kind == SCORE:
        names.append("score.weight")
        if score_bias:
            names.append("score.bias")
    elif not tie_word_embeddings:
        names.append("lm_head.weight")
    return names


def _check_names(found, expected, source: str) -> None:
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{source}: tensors do not match the config: missing {missing[:8]}{' ...' if len(missing) > 8 else ''}, "
            f"unexpected {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}"
        )


def hf_to_paddle_state(
    state: Mapping[str, np.ndarray],
    arch: Architecture,
    num_layers: int,
    kind: str,
    tie_word_embeddings: bool,
    source: str,
) -> Dict[str, np.ndarray]:
    """An HF-layout state dict → PaddleNLP names and layouts, checked against the config.

    A tied causal LM gets an explicit `lm_head.weight` (the embedding, [vocab, hidden]) because
    PaddleNLP's tied head keeps the embedding under that name too.
    """
    state = {k: v for k, v in state.items() if not k.endswith(DERIVED_HF_TENSOR_SUFFIXES)}
    if kind == CAUSAL_LM and tie_word_embeddings:
        state.pop("lm_head.weight", None)  # some tied checkpoints store the copy anyway
    score_bias = "score.bias" in state
    _check_names(state, expected_hf_names(arch, num_layers, kind, tie_word_embeddings, score_bias), source)
    paddle_prefix = arch.paddle_prefix + "."
    converted = {}
    for name, array in state.items():
        if name.startswith(HF_BACKBONE_PREFIX):
            target = paddle_prefix + name[len(HF_BACKBONE_PREFIX):]
        elif name.startswith("score."):
            target = "score_head." + name[len("score."):]
        else:
            target = name  # lm_head.weight
        converted[target] = np.ascontiguousarray(array.T) if _is_transposed(name, array) else array
    if kind == CAUSAL_LM and tie_word_embeddings:
        converted["lm_head.weight"] = converted[paddle_prefix + "embed_tokens.weight"]
    return converted


def unfuse_paddle_state(state: Mapping[str, np.ndarray], config) -> Dict[str, np.ndarray]:
    """Split PaddleNLP's fused `qkv_proj` and `gate_up_fused_proj` (Paddle layout, [in, out]).

    Fused q|k|v columns are grouped per key/value head: [kv heads, (q per kv + 2), head_dim]
    (see PaddleNLP's LlamaAttention.forward), so the split is a reshape, not three slices.
    gate|up is a plain concatenation [gate | up] (PaddleNLP's swiglu chunks it in two).
    """
    num_heads = config.num_attention_heads
    num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
    head_dim = config.hidden_size // num_heads
    groups = num_heads // num_kv_heads
    result = {}
    for name, array in state.items():
        if ".self_attn.qkv_proj." in name:
            stem = name.split(".self_attn.qkv_proj.")[0] + ".self_attn."
            leaf = name.rsplit(".", 1)[1]  # weight or bias
            grouped = array.reshape(array.shape[:-1] + (num_kv_heads, groups + 2, head_dim))
            parts = {
                "q_proj": grouped[..., :groups, :].reshape(array.shape[:-1] + (num_heads * head_dim,)),
                "k_proj": grouped[..., groups, :].reshape(array.shape[:-1] + (num_kv_heads * head_dim,)),
                "v_proj": grouped[..., groups + 1, :].reshape(array.shape[:-1] + (num_kv_heads * head_dim,)),
            }
            for part, value in parts.items():
                result[f"{stem}{part}.{leaf}"] = np.ascontiguousarray(value)
        elif ".mlp.gate_up_fused_proj." in name:
            stem = name.split(".mlp.gate_up_fused_proj.")[0] + ".mlp."
            gate, up = np.split(array, 2, axis=-1)
            result[stem + "gate_proj.weight"] = np.ascontiguousarray(gate)
            result[stem + "up_proj.weight"] = np.ascontiguousarray(up)
        else:
            result[name] = array
    return result


def paddle_to_hf_state(
    state: Mapping[str, np.ndarray], arch: Architecture, config, kind: str, source: str
) -> Dict[str, np.ndarray]:
    """A PaddleNLP state dict (fused or not) → HF names and torch layouts, checked against the config."""
    state = unfuse_paddle_state(state, config)
    paddle_prefix = arch.paddle_prefix + "."
    tied = bool(getattr(config, "tie_word_embeddings", False))
    converted = {}
    for name, array in state.items():
        if name.startswith(paddle_prefix):
            target = HF_BACKBONE_PREFIX + name[len(paddle_prefix):]
        elif name.startswith("score_head."):
            target = "score." + name[len("score_head."):]
        elif name == "lm_head.weight":
            if kind == SCORE:
                continue  # a score model built from a causal LM never has one; be lenient
            if tied:
                continue  # HF ties it to model.embed_tokens.weight
            target = name
        else:
            target = name  # reported as unexpected below
        converted[target] = np.ascontiguousarray(array.T) if _is_transposed(target, array) else array
    score_bias = "score.bias" in converted
    _check_names(converted, expected_hf_names(arch, config.num_hidden_layers, kind, tied, score_bias), source)
    return converted


# --------------------------------------------------------------------------- configs
# HF config fields that PaddleNLP's Llama/Qwen2 implementations cannot honour. A value other
# than the default would silently change the model, so conversion refuses it.
_UNSUPPORTED_HF_FEATURES = {
    "rope_scaling": None,
    "attention_bias": False,  # Llama option; Qwen2 always has q/k/v biases and no o bias
    "mlp_bias": False,
    "use_sliding_window": False,
}


def check_hf_config(hf_config: dict, source: str) -> Architecture:
    """Refuse HF configs whose architecture or features PaddleNLP's classes do not implement."""
    arch = architecture_for(hf_config.get("model_type"), source, hf_config.get("architectures"))
    for key, default in _UNSUPPORTED_HF_FEATURES.items():
        value = hf_config.get(key, default)
        if value not in (default, None) and not (key == "attention_bias" and arch.attention_bias):
            raise ValueError(f"{source}: {key}={value!r} is not supported by PaddleNLP's {arch.causal_lm}")
    heads = hf_config.get("num_attention_heads")
    head_dim = hf_config.get("head_dim")
    if head_dim is not None and heads and head_dim * heads != hf_config.get("hidden_size"):
        raise ValueError(
            f"{source}: head_dim={head_dim} differs from hidden_size / num_attention_heads "
            f"({hf_config.get('hidden_size')} / {heads}); PaddleNLP's {arch.causal_lm} derives it from them"
        )
    if hf_config.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{source}: hidden_act={hf_config['hidden_act']!r}; PaddleNLP's {arch.causal_lm} uses silu")
    return arch


def paddle_config_to_hf(config, arch: Architecture, kind: str, torch_dtype: str) -> dict:
    """The HF config.json of a PaddleNLP model config (LlamaConfig / Qwen2Config fields)."""
    # PaddleNLP-only features without an HF equivalent would make the export compute something else.
    if getattr(config, "alibi", False):
        raise ValueError("cannot export a model with alibi=True: HF Llama/Qwen2 use rotary embeddings only")
    if getattr(config, "rope_scaling_type", None) or getattr(config, "use_long_sequence_strategies", False):
        raise ValueError(
            f"cannot export rope scaling (rope_scaling_type={getattr(config, 'rope_scaling_type', None)!r}, "
            f"use_long_sequence_strategies={getattr(config, 'use_long_sequence_strategies', False)}): not translated"
        )
    num_heads = config.num_attention_heads
    hf = {
        "architectures": [arch.sequence_classification if kind == SCORE else arch.causal_lm],
        "model_type": arch.model_type,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": getattr(config, "num_key_value_heads", None) or num_heads,
        "head_dim": config.hidden_size // num_heads,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": float(getattr(config, "rope_theta", 10000.0)),
        "rope_scaling": None,
        "vocab_size": config.vocab_size,
        "tie_word_embeddings": bool(getattr(config, "tie_word_embeddings", False)),
        "initializer_range": getattr(config, "initializer_range", 0.02),
        "bos_token_id": getattr(config, "bos_token_id", None),
        "eos_token_id": getattr(config, "eos_token_id", None),
        "pad_token_id": getattr(config, "pad_token_id", None),
        "torch_dtype": torch_dtype,
        "use_cache": True,
        "attention_dropout": 0.0,
    }
    if arch.model_type == "llama":
        hf.update(attention_bias=False, mlp_bias=False, pretraining_tp=1)
    else:
        hf.update(use_sliding_window=False, sliding_window=None, max_window_layers=config.num_hidden_layers)
    return hf
