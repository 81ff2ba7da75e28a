"""Bring models from outside into a directory PaddleNLP's `from_pretrained` loads directly.

    path = resolve_model_path(args.model_name_or_path, role="model_name_or_path")

| input | result |
|---|---|
| PaddleNLP directory (`model_state.pdparams`, Paddle-named safetensors) | returned unchanged |
| Hugging Face directory (torch `model.safetensors` / `pytorch_model.bin`, sharded or not) | converted once into the cache |
| `.gguf` file, or a directory holding exactly one (llama.cpp) | dequantised once into the cache |
| anything that is not a local path (a hub name) | returned unchanged: PaddleNLP downloads it |

The cache lives in `$PADDLE_RLHF_CACHE/converted` (default `~/.cache/paddle-rlhf/converted`),
one directory per source, named `<source name>-<hash>`: the hash covers the absolute path, the
size and mtime of the files read and the converter version, so an edited source is converted
again and an unchanged one never is. A conversion is written into a private staging directory
and renamed into place when complete, so a crash never leaves a half cache and concurrent
ranks (`paddle.distributed.launch`) agree on one result (`ppo.shared_cache`).

We do not use PaddleNLP's `convert_from_torch=True`: it writes `model_state.pdparams` into the
user's Hugging Face directory (racy across ranks, fails on read-only hub caches) and knows
causal LMs only. The name/layout rules it encodes are the same as `ppo.hf_layout` (tested).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from typing import Dict, List, Tuple

import numpy as np

from ppo.hf_layout import (
    ARCHITECTURES,
    HF_BACKBONE_PREFIX,
    SCORE,
    SCORE_CONFIG_KEY,
    SHARED_TOKENIZER_FILES,
    check_hf_config,
    head_kind,
    hf_to_paddle_state,
)
from ppo.shared_cache import cache_base, directory_lock, publish_directory, staging_directory

# Bump when the files a conversion writes change: every cached conversion is then redone.
CONVERTER_VERSION = "1"

PADDLE_WEIGHT_FILE = "model_state.pdparams"
# What PaddleNLP looks for, in its own order of preference (model_utils._resolve_model_file_path).
SAFE_INDEX, PADDLE_INDEX = "model.safetensors.index.json", "model_state.pdparams.index.json"
SAFE_FILE, TORCH_INDEX, TORCH_FILE = "model.safetensors", "pytorch_model.bin.index.json", "pytorch_model.bin"
EXPECTED_WEIGHT_FILES = (SAFE_INDEX, PADDLE_INDEX, SAFE_FILE, PADDLE_WEIGHT_FILE, TORCH_INDEX, TORCH_FILE, "<one>.gguf")

# Copied unchanged from a Hugging Face directory; tokenizer.model is also written under the
# name PaddleNLP's LlamaTokenizer reads.
TOKENIZER_FILES = SHARED_TOKENIZER_FILES + ("vocab.txt", "tokenizer.model", "generation_config.json")
SENTENCEPIECE_ALIASES = {"tokenizer.model": "sentencepiece.bpe.model"}

PADDLE, HF, GGUF, HUB = "paddle", "hf", "gguf", "hub"


@dataclass(frozen=True)
class ModelSource:
    """What `name_or_path` points at."""

    kind: str  # PADDLE, HF, GGUF or HUB
    path: str  # the directory (PADDLE, HF), the .gguf file (GGUF) or the name (HUB)
    files: Tuple[str, ...] = ()  # files a conversion reads: they key the cache


def resolve_model_path(name_or_path: str, role: str = "model") -> str:
    """A directory (or hub name) that PaddleNLP's `from_pretrained` loads without options.

    `role` names the argument in messages (e.g. "actor_model_name_or_path").
    """
    source = detect_source(name_or_path, role)
    if source.kind in (PADDLE, HUB):
        return name_or_path  # exactly as given: PaddleNLP loads it
    return _cached_conversion(source, role)


def resolve_model_fields(arguments, *field_names: str):
    """A copy of an argument dataclass whose model fields went through `resolve_model_path`
    (the original keeps the user's values for logs and saved arguments)."""
    resolved = {name: resolve_model_path(getattr(arguments, name), role=name) for name in field_names}
    return dataclasses.replace(arguments, **resolved)


# --------------------------------------------------------------------------- detection
def _looks_like_path(name: str) -> bool:
    return os.path.isabs(name) or name.startswith((".", "~")) or name.endswith(".gguf")


def detect_source(name_or_path: str, role: str = "model") -> ModelSource:
    if not isinstance(name_or_path, str) or not name_or_path:
        raise ValueError(f"{role} must be a model directory, a .gguf file or a hub name, got {name_or_path!r}")
    path = os.path.expanduser(name_or_path)
    if not os.path.exists(path):
        if _looks_like_path(name_or_path):
            raise FileNotFoundError(f"{role}={name_or_path!r}: no such file or directory")
        return ModelSource(HUB, name_or_path)
    if os.path.isfile(path):
        if path.endswith(".gguf"):
            return ModelSource(GGUF, os.path.abspath(path), (os.path.abspath(path),))
        raise ValueError(
            f"{role}={name_or_path!r} is a file; give a model directory or a .gguf file"
        )
    return _detect_directory(os.path.abspath(path), role)


def _detect_directory(directory: str, role: str) -> ModelSource:
    names = set(os.listdir(directory))

    def full(*files):
        return tuple(os.path.join(directory, name) for name in files)

    if SAFE_INDEX in names:
        shards = _index_shards(directory, SAFE_INDEX)
        return ModelSource(_safetensors_kind(full(*shards)), directory, full(SAFE_INDEX, *shards))
    if PADDLE_INDEX in names or PADDLE_WEIGHT_FILE in names:
        return ModelSource(PADDLE, directory)
    if SAFE_FILE in names:
        return ModelSource(_safetensors_kind(full(SAFE_FILE)), directory, full(SAFE_FILE))
    if any(name.startswith("model_state") and name.endswith(".pdparams") for name in names):
        return ModelSource(PADDLE, directory)  # per-rank variants (model_state.tp00_pp00.pdparams)
    if TORCH_INDEX in names:
        shards = _index_shards(directory, TORCH_INDEX)
        return ModelSource(HF, directory, full(TORCH_INDEX, *shards))
    if TORCH_FILE in names:
        return ModelSource(HF, directory, full(TORCH_FILE))
    gguf_files = sorted(name for name in names if name.endswith(".gguf"))
    if len(gguf_files) == 1:
        return ModelSource(GGUF, os.path.join(directory, gguf_files[0]), full(gguf_files[0]))
    if len(gguf_files) > 1:
        raise ValueError(f"{role}={directory!r} holds several .gguf files {gguf_files}; pass the one to use")
    raise FileNotFoundError(
        f"{role}={directory!r} holds no model weights: expected one of {list(EXPECTED_WEIGHT_FILES)}, "
        f"found {sorted(names)}"
    )


def _index_shards(directory: str, index_name: str) -> List[str]:
    with open(os.path.join(directory, index_name), encoding="utf-8") as f:
        weight_map = json.load(f).get("weight_map") or {}
    shards = sorted(set(weight_map.values()))
    missing = [shard for shard in shards if not os.path.isfile(os.path.join(directory, shard))]
    if not shards or missing:
        raise FileNotFoundError(f"{os.path.join(directory, index_name)} lists shards {missing or shards} that are missing")
    return shards


def _safetensors_kind(files) -> str:
    """Torch and Paddle both write `model.safetensors`; the tensor names tell them apart
    (HF `model.layers...`, PaddleNLP `llama.layers...`), the metadata where names cannot."""
    from safetensors import safe_open

    paddle_prefixes = tuple(arch.paddle_prefix + "." for arch in ARCHITECTURES.values())
    with safe_open(files[0], framework="np") as f:
        keys, metadata = list(f.keys()), f.metadata() or {}
    if any(key.startswith(HF_BACKBONE_PREFIX) for key in keys):
        return HF
    if metadata.get("format") in ("pd", "np") or any(key.startswith(paddle_prefixes) for key in keys):
        return PADDLE
    return HF if metadata.get("format") == "pt" else PADDLE


# --------------------------------------------------------------------------- cache
def cache_root() -> str:
    return os.path.join(cache_base(), "converted")


def cache_dir_for(source: ModelSource) -> str:
    digest = hashlib.sha256(f"v{CONVERTER_VERSION}\0{source.kind}\0{source.path}".encode())
    # The config and tokenizer files are copied or read too: editing one is a new conversion.
    directory = source.path if os.path.isdir(source.path) else os.path.dirname(source.path)
    companions = [os.path.join(directory, name) for name in ("config.json",) + TOKENIZER_FILES]
    for file in list(source.files) + [file for file in companions if os.path.isfile(file)]:
        stat = os.stat(file)
        digest.update(f"\0{file}\0{stat.st_size}\0{stat.st_mtime_ns}".encode())
    name = os.path.basename(os.path.normpath(source.path))
    if name.endswith(".gguf"):
        name = name[: -len(".gguf")]
    return os.path.join(cache_root(), f"{name}-{digest.hexdigest()[:16]}")


def _cached_conversion(source: ModelSource, role: str) -> str:
    from paddlenlp.utils.log import logger

    final_dir = cache_dir_for(source)
    if os.path.isdir(final_dir):
        return final_dir
    os.makedirs(os.path.dirname(final_dir), exist_ok=True)
    with directory_lock(final_dir):
        if os.path.isdir(final_dir):  # converted by another rank while we waited
            return final_dir
        staging = staging_directory(final_dir)
        started = time.time()
        try:
            summary = convert_hf_directory(source.path, staging) if source.kind == HF else convert_gguf_file(source.path, staging)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        if publish_directory(staging, final_dir):
            logger.info(
                f"{role}: converted {summary} from {source.path} into {final_dir} "
                f"in {time.time() - started:.1f}s (reused until the source changes)"
            )
    return final_dir


# --------------------------------------------------------------------------- conversion
def tensor_to_numpy(value) -> Tuple[np.ndarray, str]:
    """(array, dtype name to store). bfloat16 travels as float32 (exact) and is cast back on save."""
    import paddle

    if isinstance(value, paddle.Tensor):
        if value.dtype == paddle.bfloat16:
            return value.astype("float32").numpy(), "bfloat16"
        value = value.numpy()
    array = np.asarray(value)
    return array, str(array.dtype)


def read_hf_weights(directory: str) -> Tuple[Dict[str, np.ndarray], str]:
    """All tensors of an HF directory (one file or shards, safetensors or torch pickles, no torch
    needed: PaddleNLP's reader) and the floating dtype they are stored in."""
    from paddlenlp.utils.serialization import load_torch

    source = _detect_directory(directory, "directory")
    weight_files = [file for file in source.files if not file.endswith(".json")]
    state, dtypes = {}, set()
    for file in weight_files:
        for name, value in load_torch(file).items():
            array, dtype = tensor_to_numpy(value)
            state[name] = array
            if np.issubdtype(array.dtype, np.floating):
                dtypes.add(dtype)
    if len(dtypes) > 1:  # mixed precision checkpoints are unusual; store the widest exactly
        dtypes = {"float32"}
    return state, (dtypes.pop() if dtypes else "float32")


def paddle_config_from_hf(hf_config: dict, kind: str, state: Dict[str, np.ndarray], dtype: str, source: str):
    """The PaddleNLP config (LlamaConfig / Qwen2Config) of an HF config.json, with our class names."""
    import paddlenlp.transformers

    arch = check_hf_config(hf_config, source)
    fields = {key: value for key, value in hf_config.items() if key not in ("architectures", "torch_dtype", SCORE_CONFIG_KEY)}
    for key in ("id2label", "label2id", "num_labels"):
        fields.pop(key, None)  # PaddleNLP would reinterpret them; the score head shape is the truth
    # PaddleNLP's config classes carry the HF names (LlamaConfig, Qwen2Config) and fields.
    config = getattr(paddlenlp.transformers, arch.hf_config_class)(**fields)
    config.dtype = dtype
    if kind == SCORE:
        config.architectures = [arch.score_model]
        extras = dict(hf_config.get(SCORE_CONFIG_KEY) or {})
        score_dim = int(state["score_head.weight"].shape[1])
        extras.update(score_dim=score_dim, score_bias="score_head.bias" in state)
        extras.setdefault("score_type", "reward")
        for key, value in extras.items():
            setattr(config, key, value)
    else:
        config.architectures = [arch.causal_lm]
    return config, arch


def write_paddle_model(
    hf_config: dict, hf_state: Dict[str, np.ndarray], dtype: str, output_dir: str, source: str
) -> str:
    """Write an HF-layout model (config dict + tensors) as a PaddleNLP model directory."""
    import paddle

    kind = head_kind(hf_config.get("architectures"))
    arch = check_hf_config(hf_config, source)
    tied = bool(hf_config.get("tie_word_embeddings", False))
    state = hf_to_paddle_state(hf_state, arch, hf_config["num_hidden_layers"], kind, tied, source)
    config, arch = paddle_config_from_hf(hf_config, kind, state, dtype, source)
    tensors = {}
    for name, array in state.items():
        tensor = paddle.to_tensor(array)
        tensors[name] = tensor.astype(dtype) if np.issubdtype(array.dtype, np.floating) and str(array.dtype) != dtype else tensor
    paddle.save(tensors, os.path.join(output_dir, PADDLE_WEIGHT_FILE))
    config.save_pretrained(output_dir)
    return f"{config.architectures[0]} ({len(tensors)} tensors, {dtype})"


def copy_tokenizer_files(source_dir: str, output_dir: str) -> List[str]:
    copied = []
    for name in TOKENIZER_FILES:
        path = os.path.join(source_dir, name)
        if os.path.isfile(path):
            # generation_config.json may have been written by config.save_pretrained; the source wins.
            shutil.copyfile(path, os.path.join(output_dir, name))
            copied.append(name)
            if name in SENTENCEPIECE_ALIASES and not os.path.exists(os.path.join(source_dir, SENTENCEPIECE_ALIASES[name])):
                shutil.copyfile(path, os.path.join(output_dir, SENTENCEPIECE_ALIASES[name]))
    return copied


def convert_hf_directory(source_dir: str, output_dir: str) -> str:
    """Hugging Face directory → PaddleNLP directory in `output_dir` (which must exist)."""
    config_file = os.path.join(source_dir, "config.json")
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"{source_dir} has Hugging Face weights but no config.json")
    with open(config_file, encoding="utf-8") as f:
        hf_config = json.load(f)
    check_hf_config(hf_config, config_file)  # fail before reading gigabytes of weights
    state, dtype = read_hf_weights(source_dir)
    summary = write_paddle_model(hf_config, state, dtype, output_dir, source_dir)
    copy_tokenizer_files(source_dir, output_dir)
    return f"Hugging Face {summary}"


def convert_gguf_file(gguf_path: str, output_dir: str) -> str:
    """llama.cpp GGUF file → PaddleNLP directory (dequantised float32 weights + tokenizer)."""
    from ppo.gguf_import import read_gguf

    model = read_gguf(gguf_path)
    summary = write_paddle_model(model.hf_config, model.state, "float32", output_dir, gguf_path)
    for name, content in model.tokenizer_files.items():
        with open(os.path.join(output_dir, name), "wb") as f:
            f.write(content)
    if not model.tokenizer_files:
        copied = copy_tokenizer_files(os.path.dirname(gguf_path), output_dir)
        if not any(name in copied for name in ("tokenizer.json", "tokenizer.model", "vocab.json")):
            raise ValueError(model.tokenizer_problem)
    return f"GGUF {summary}, dequantised from {model.tensor_types}"
