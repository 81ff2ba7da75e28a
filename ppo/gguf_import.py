"""Read a llama.cpp GGUF file as a Hugging Face-layout model: config, float32 tensors, tokenizer.

`ppo.model_import` then writes it as a PaddleNLP directory like any HF checkpoint, so the two
paths share one name/layout translation (`ppo.hf_layout`). What is GGUF-specific lives here:

- tensor names (`blk.N.attn_q.weight` → `model.layers.N.self_attn.q_proj.weight`);
- dequantisation (`gguf.quants.dequantize`; GGUF stores a [out, in] matrix with ne = [in, out],
  which the reader already hands over as rows × columns = torch layout);
- llama.cpp's rotary layout: for `llama` it permutes the rows of q and k so that rotary pairs
  are adjacent (`convert_hf_to_gguf.py`, `LlamaModel.permute`); we undo it to get the HF
  weights back. `qwen2` is stored unpermuted (NEOX rope);
- the config from `<arch>.*` metadata and the tokenizer from `tokenizer.ggml.*`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np

SUPPORTED_ARCHITECTURES = ("llama", "qwen2")

# GGUF per-block tensor → HF name below `model.layers.N.`
_BLOCK_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAME = re.compile(r"blk\.(\d+)\.(.+)")

# GGUF token types (llama.cpp llama_token_type; the same numbers as sentencepiece's).
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6

# llama.cpp's `tokenizer.ggml.pre` → how HF `tokenizers` splits text before BPE (llama-vocab.cpp
# lists the regexes per pre-tokenizer). Each family below is expressed with HF's own
# pre-tokenizers so the tokenizer.json is what an HF conversion of the same model would hold.
_GPT2_FAMILY = ("gpt2", "mpt", "olmo", "jais")
_DIGITS_THEN_GPT2_FAMILY = ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva")
_QWEN2_REGEX = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_LLAMA3_REGEX = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_SPLIT_FAMILIES = {"qwen2": _QWEN2_REGEX, "stablelm2": _QWEN2_REGEX, "llama-bpe": _LLAMA3_REGEX, "llama3": _LLAMA3_REGEX}
SUPPORTED_PRE_TOKENIZERS = tuple(sorted(_GPT2_FAMILY + _DIGITS_THEN_GPT2_FAMILY + tuple(_SPLIT_FAMILIES)))


@dataclass
class GGUFModel:
    hf_config: dict  # HF config.json fields
    state: Dict[str, np.ndarray]  # HF names, torch layout, float32
    tokenizer_files: Dict[str, bytes] = field(default_factory=dict)  # file name → content; empty if unsupported
    tokenizer_problem: str = ""  # why tokenizer_files is empty
    tensor_types: str = ""  # e.g. "Q4_1 ×210, F32 ×61"


class _Metadata:
    """Typed access to GGUF key/values with errors that name the file and the key."""

    def __init__(self, reader, path: str):
        self.reader, self.path = reader, path

    def get(self, key: str, default=None):
        field_ = self.reader.get_field(key)
        return default if field_ is None else field_.contents()

    def require(self, key: str):
        value = self.get(key)
        if value is None:
            raise ValueError(f"{self.path}: GGUF metadata has no {key!r}, needed to build the model config")
        return value


def read_gguf(path: str) -> GGUFModel:
    import gguf

    reader = gguf.GGUFReader(path)
    meta = _Metadata(reader, path)
    architecture = meta.require("general.architecture")
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"{path}: unsupported architecture general.architecture={architecture!r}; "
            f"supported: {list(SUPPORTED_ARCHITECTURES)}"
        )
    tensor_names = {tensor.name for tensor in reader.tensors}
    hf_config = _hf_config(meta, architecture, tensor_names)
    state = _hf_state(reader, path, hf_config, architecture)
    counts: Dict[str, int] = {}
    for tensor in reader.tensors:
        counts[tensor.tensor_type.name] = counts.get(tensor.tensor_type.name, 0) + 1
    model = GGUFModel(hf_config, state, tensor_types=", ".join(f"{k} ×{v}" for k, v in sorted(counts.items())))
    tokenizer_model = meta.get("tokenizer.ggml.model")
    if tokenizer_model == "gpt2":
        model.tokenizer_files = _byte_level_bpe_files(meta, hf_config)
    else:
        model.tokenizer_problem = (
            f"{path}: tokenizer.ggml.model={tokenizer_model!r} is not supported (only 'gpt2' byte-level BPE); "
            "put the model's original tokenizer files (tokenizer.model or tokenizer.json, tokenizer_config.json) "
            "next to the .gguf file, in a directory holding only that .gguf, and pass the directory"
        )
    return model


# --------------------------------------------------------------------------- config
def _hf_config(meta: _Metadata, arch: str, tensor_names) -> dict:
    hidden = int(meta.require(f"{arch}.embedding_length"))
    heads = meta.require(f"{arch}.attention.head_count")
    kv_heads = meta.get(f"{arch}.attention.head_count_kv", heads)
    if isinstance(heads, list) or isinstance(kv_heads, list):
        raise ValueError(f"{meta.path}: per-layer head counts are not supported")
    heads, kv_heads = int(heads), int(kv_heads)
    head_dim = hidden // heads
    rope_dims = meta.get(f"{arch}.rope.dimension_count", head_dim)
    if int(rope_dims) != head_dim:
        raise ValueError(f"{meta.path}: {arch}.rope.dimension_count={rope_dims} (partial rotary) is not supported")
    scaling = meta.get(f"{arch}.rope.scaling.type")
    if scaling not in (None, "none"):
        raise ValueError(f"{meta.path}: {arch}.rope.scaling.type={scaling!r} is not supported")
    tokens = meta.get("tokenizer.ggml.tokens") or []
    vocab_size = int(meta.get(f"{arch}.vocab_size") or len(tokens) or 0)
    if not vocab_size:
        raise ValueError(f"{meta.path}: neither {arch}.vocab_size nor tokenizer.ggml.tokens gives the vocabulary size")
    causal_lm = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[arch]
    config = {
        "architectures": [causal_lm],
        "model_type": arch,
        "hidden_size": hidden,
        "intermediate_size": int(meta.require(f"{arch}.feed_forward_length")),
        "num_hidden_layers": int(meta.require(f"{arch}.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "hidden_act": "silu",
        "max_position_embeddings": int(meta.get(f"{arch}.context_length", 2048)),
        "rms_norm_eps": _from_float32(meta.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": _from_float32(meta.get(f"{arch}.rope.freq_base", 10000.0)),
        "vocab_size": vocab_size,
        # llama.cpp drops output.weight when the head is tied to the embedding.
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
        "torch_dtype": "float32",
    }
    return config


def _from_float32(value) -> float:
    """GGUF stores these as float32: 1e-5 reads back as 9.999999747e-06. Seven significant
    digits recover the value the model was configured with."""
    return float(f"{float(value):.7g}")


# --------------------------------------------------------------------------- tensors
def undo_rope_permutation(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's q/k row permutation: rows [head, half, pair] → [head, pair, half].

    weight: [heads * head_dim, ...] (a q/k weight in torch layout, or its bias)
    """
    rows = weight.shape[0]
    return weight.reshape(num_heads, rows // num_heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _dequantize(tensor, path: str) -> np.ndarray:
    import gguf

    try:
        array = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError as error:
        raise ValueError(
            f"{path}: tensor {tensor.name!r} has type {tensor.tensor_type.name}, which gguf "
            f"{getattr(gguf, '__version__', '')} cannot dequantise ({error})"
        ) from error
    # GGML lists dimensions innermost first; numpy wants them outermost first.
    shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
    return np.ascontiguousarray(np.asarray(array, dtype=np.float32).reshape(shape))


def _hf_state(reader, path: str, config: dict, arch: str) -> Dict[str, np.ndarray]:
    state, unknown = {}, []
    for tensor in reader.tensors:
        if tensor.name in _GLOBAL_TENSORS:
            name = _GLOBAL_TENSORS[tensor.name]
        else:
            match = _BLOCK_NAME.fullmatch(tensor.name)
            if match is None or match.group(2) not in _BLOCK_TENSORS:
                unknown.append(tensor.name)
                continue
            name = f"model.layers.{match.group(1)}.{_BLOCK_TENSORS[match.group(2)]}"
        array = _dequantize(tensor, path)
        if arch == "llama" and (".q_proj." in name or ".k_proj." in name):
            heads = config["num_attention_heads"] if ".q_proj." in name else config["num_key_value_heads"]
            array = undo_rope_permutation(array, heads)
        state[name] = array
    if unknown:
        raise ValueError(f"{path}: tensors {unknown[:8]} have no {arch} equivalent in PaddleNLP")
    return state


# --------------------------------------------------------------------------- tokenizer
def _pre_tokenizer(pre: Optional[str], path: str):
    from tokenizers import Regex, pre_tokenizers

    pre = pre or "gpt2"  # GGUFs written before tokenizer.ggml.pre existed are GPT-2 style
    if pre in _GPT2_FAMILY:
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _DIGITS_THEN_GPT2_FAMILY:
        return pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
        )
    if pre in _SPLIT_FAMILIES:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_SPLIT_FAMILIES[pre]), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    raise ValueError(
        f"{path}: tokenizer.ggml.pre={pre!r} is not supported; supported pre-tokenizers: {list(SUPPORTED_PRE_TOKENIZERS)}"
    )


def build_byte_level_bpe(
    tokens: List[str],
    merges: List[str],
    token_types: Optional[List[int]],
    pre: Optional[str],
    bos_id: Optional[int] = None,
    eos_id: Optional[int] = None,
    add_bos: bool = False,
    add_eos: bool = False,
    path: str = "<gguf>",
):
    """An HF `tokenizers.Tokenizer` (byte-level BPE) from GGUF vocabulary, merges and token types."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors

    vocab = {token: index for index, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError(f"{path}: tokenizer.ggml.tokens holds duplicate tokens; cannot build a BPE vocabulary")
    pairs = [tuple(merge.split(" ", 1)) for merge in merges]
    tokenizer = Tokenizer(
        models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False, ignore_merges=pre in ("llama-bpe", "llama3"))
    )
    tokenizer.pre_tokenizer = _pre_tokenizer(pre, path)
    tokenizer.decoder = decoders.ByteLevel()
    types = token_types or [TOKEN_NORMAL] * len(tokens)
    special = [AddedToken(tokens[i], special=True, normalized=False) for i, kind in enumerate(types) if kind == TOKEN_CONTROL]
    user = [AddedToken(tokens[i], special=False, normalized=False) for i, kind in enumerate(types) if kind == TOKEN_USER_DEFINED]
    if special:
        tokenizer.add_special_tokens(special)
    if user:
        tokenizer.add_tokens(user)
    bos = tokens[bos_id] if add_bos and bos_id is not None else None
    eos = tokens[eos_id] if add_eos and eos_id is not None else None
    if bos is not None or eos is not None:

        def sequence(piece: str, type_id: int) -> List[str]:
            return [f"{t}:{type_id}" for t in (bos, piece, eos) if t is not None]

        tokenizer.post_processor = processors.TemplateProcessing(
            single=sequence("$A", 0),
            pair=sequence("$A", 0) + sequence("$B", 1),
            special_tokens=[(t, vocab[t]) for t in dict.fromkeys((bos, eos)) if t is not None],
        )
    else:
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    return tokenizer


def _byte_level_bpe_files(meta: _Metadata, hf_config: dict) -> Dict[str, bytes]:
    tokens = meta.require("tokenizer.ggml.tokens")
    merges = meta.get("tokenizer.ggml.merges") or []
    token_types = meta.get("tokenizer.ggml.token_type")
    bos_id, eos_id = meta.get("tokenizer.ggml.bos_token_id"), meta.get("tokenizer.ggml.eos_token_id")
    pad_id, unk_id = meta.get("tokenizer.ggml.padding_token_id"), meta.get("tokenizer.ggml.unknown_token_id")
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False))
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    tokenizer = build_byte_level_bpe(
        tokens, merges, token_types, meta.get("tokenizer.ggml.pre"), bos_id, eos_id, add_bos, add_eos, meta.path
    )

    def token(index):
        return tokens[index] if index is not None and 0 <= index < len(tokens) else None

    types = token_types or [TOKEN_NORMAL] * len(tokens)
    added = {
        str(i): {"content": tokens[i], "lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": kind == TOKEN_CONTROL}
        for i, kind in enumerate(types)
        if kind in (TOKEN_CONTROL, TOKEN_USER_DEFINED)
    }
    special_map = {
        key: token(index)
        for key, index in (("bos_token", bos_id), ("eos_token", eos_id), ("pad_token", pad_id), ("unk_token", unk_id))
        if token(index) is not None
    }
    tokenizer_config = {
        # PaddleNLP's class for GPT-2-style byte-level BPE (vocab.json + merges.txt, or tokenizer.json).
        "tokenizer_class": "Qwen2Tokenizer",
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "add_prefix_space": False,
        "errors": "replace",
        "model_max_length": hf_config["max_position_embeddings"],
        "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": added,
        **special_map,
    }
    chat_template = meta.get("tokenizer.chat_template")
    if chat_template:
        tokenizer_config["chat_template"] = chat_template
    vocab = {t: i for i, t in enumerate(tokens)}

    def dump(value) -> bytes:
        return (json.dumps(value, ensure_ascii=False, indent=2) + "\n").encode("utf-8")

    return {
        "tokenizer.json": tokenizer.to_str(pretty=True).encode("utf-8"),
        "tokenizer_config.json": dump(tokenizer_config),
        "special_tokens_map.json": dump(special_map),
        # For PaddleNLP's slow Qwen2Tokenizer; tokenizer.json (use_fast=True) is authoritative
        # because its pre-tokenizer follows tokenizer.ggml.pre exactly.
        "vocab.json": dump(vocab),
        "merges.txt": ("#version: 0.2\n" + "\n".join(merges) + "\n").encode("utf-8"),
    }
