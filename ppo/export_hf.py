"""Export a PaddleNLP model directory (SFT/PPO policy, reward model or critic) to Hugging Face format.

    python -m ppo.export_hf output/tiny/ppo/policy exported/policy
    python -m ppo.export_hf output/tiny/rm exported/reward-model

The result loads in `transformers` without conversion:

- `model.safetensors`: HF tensor names (`model.layers.N.self_attn.q_proj.weight`, ...,
  `lm_head.weight` unless tied) in torch layout (Linear weights [out, in]); PaddleNLP's fused
  q|k|v and gate|up weights are split; grouped-query attention is kept as is. bfloat16 weights
  are written as float32 (numpy has no bfloat16; the values are exact).
- `config.json` (`LlamaConfig`/`Qwen2Config` fields, `architectures`, `torch_dtype`,
  `tie_word_embeddings`) and `generation_config.json` (bos/eos/pad ids).
- tokenizer files: a `tokenizer.json` tokenizer is copied; a sentencepiece one becomes
  `tokenizer.model` + a `tokenizer_config.json` naming `LlamaTokenizer`.

Causal LMs export as `LlamaForCausalLM` / `Qwen2ForCausalLM`. Score models
(`LlamaModelForScore`, ...) export as `LlamaForSequenceClassification` / `Qwen2For...`:
`score.weight` [score_dim, hidden], `num_labels = score_dim`; our score-model settings and
normaliser statistics (score_type, do_normalize, normalizer_type, momentum, mean, var, count)
go under config.json's `paddle_rlhf_score` key, which transformers ignores and our importer
reads back. HF's classification head has no bias, so a score head with a bias is refused.
HF scores the last non-pad token found through `pad_token_id`; ours uses the attention mask —
the same token for right-padded inputs.

The input may also be a Hugging Face or GGUF model (`ppo.model_import` converts it first).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

# Run as `python ppo/export_hf.py` too: import through the package.
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

from ppo.runtime import prepare_process  # noqa: E402

prepare_process()  # before Paddle loads

from ppo.hf_layout import (  # noqa: E402
    SCORE,
    SCORE_CONFIG_KEY,
    SHARED_TOKENIZER_FILES,
    architecture_for,
    head_kind,
    paddle_config_to_hf,
    paddle_to_hf_state,
)

# Score-model fields of a PaddleNLP config that travel under SCORE_CONFIG_KEY.
SCORE_EXTRA_KEYS = ("score_type", "do_normalize", "normalizer_type", "momentum", "mean", "var", "count")
SENTENCEPIECE_FILES = ("sentencepiece.bpe.model", "tokenizer.model")
COPIED_TOKENIZER_FILES = SHARED_TOKENIZER_FILES
# Keys of a PaddleNLP tokenizer_config.json that describe where it was loaded from, not the tokenizer.
_PADDLE_ONLY_TOKENIZER_KEYS = ("name_or_path", "special_tokens_map_file", "_from_auto", "from_slow", "tokenizer_file")


def _read_paddle_weights(model_dir: str) -> Tuple[Dict[str, np.ndarray], str]:
    from paddlenlp.transformers.model_utils import load_sharded_checkpoint_as_one

    from ppo.model_import import tensor_to_numpy

    state, dtypes = {}, set()
    for name, value in load_sharded_checkpoint_as_one(model_dir).items():
        array, dtype = tensor_to_numpy(value)
        state[name] = array
        if np.issubdtype(array.dtype, np.floating):
            dtypes.add(str(array.dtype))
    # float16 stays float16; float32 and bfloat16 (read as float32) are written as float32.
    return state, ("float16" if dtypes == {"float16"} else "float32")


def hf_config_for(config, kind: str, torch_dtype: str) -> dict:
    arch = architecture_for(getattr(config, "model_type", None), "config.json", getattr(config, "architectures", None))
    hf = paddle_config_to_hf(config, arch, kind, torch_dtype)
    if kind == SCORE:
        if getattr(config, "score_bias", False):
            raise ValueError(
                "this score model's head has a bias; HF's *ForSequenceClassification head has none, so the export "
                "would score differently. Retrain with score_bias=False or fold the bias in after export."
            )
        num_labels = int(getattr(config, "score_dim", 1) or 1)
        hf["num_labels"] = num_labels
        hf["id2label"] = {str(i): f"LABEL_{i}" for i in range(num_labels)}
        hf["label2id"] = {f"LABEL_{i}": i for i in range(num_labels)}
        hf[SCORE_CONFIG_KEY] = {key: _plain(getattr(config, key, None)) for key in SCORE_EXTRA_KEYS}
    return hf


def _plain(value):
    """JSON-friendly config values (normaliser statistics may be numpy)."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def export_tokenizer(model_dir: str, output_dir: str) -> List[str]:
    """Write tokenizer files transformers reads; returns their names."""
    names = set(os.listdir(model_dir))
    written = []
    if "tokenizer.json" in names:
        for name in COPIED_TOKENIZER_FILES:
            if name in names:
                shutil.copyfile(os.path.join(model_dir, name), os.path.join(output_dir, name))
                written.append(name)
        return written
    sentencepiece = next((name for name in SENTENCEPIECE_FILES if name in names), None)
    if sentencepiece is None:
        for name in COPIED_TOKENIZER_FILES:  # e.g. vocab.json + merges.txt
            if name in names:
                shutil.copyfile(os.path.join(model_dir, name), os.path.join(output_dir, name))
                written.append(name)
        return written
    shutil.copyfile(os.path.join(model_dir, sentencepiece), os.path.join(output_dir, "tokenizer.model"))
    written.append("tokenizer.model")
    tokenizer_config = {}
    if "tokenizer_config.json" in names:
        with open(os.path.join(model_dir, "tokenizer_config.json"), encoding="utf-8") as f:
            tokenizer_config = json.load(f)
    for key in _PADDLE_ONLY_TOKENIZER_KEYS:
        tokenizer_config.pop(key, None)
    tokenizer_config["tokenizer_class"] = "LlamaTokenizer"
    # PaddleNLP's LlamaTokenizer encodes like plain sentencepiece; that is transformers' legacy mode.
    tokenizer_config.setdefault("legacy", True)
    if tokenizer_config.get("sp_model_kwargs") is None:
        tokenizer_config["sp_model_kwargs"] = {}
    with open(os.path.join(output_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(tokenizer_config, f, indent=2, ensure_ascii=False)
    written.append("tokenizer_config.json")
    for name in ("special_tokens_map.json", "added_tokens.json", "chat_template.jinja", "chat_template.json"):
        if name in names:
            shutil.copyfile(os.path.join(model_dir, name), os.path.join(output_dir, name))
            written.append(name)
    return written


def export_to_hf(model_dir: str, output_dir: str, overwrite: bool = False) -> str:
    """Write the HF-format copy of `model_dir` to `output_dir` (atomically); returns output_dir."""
    from paddlenlp.transformers import AutoConfig
    from paddlenlp.utils.log import logger
    from safetensors.numpy import save_file

    from ppo.checkpoint import atomic_directory
    from ppo.model_import import resolve_model_path

    model_dir = resolve_model_path(model_dir, role="model_dir")
    if not os.path.isdir(model_dir):
        raise FileNotFoundError(f"{model_dir} is not a local model directory")
    if os.path.exists(output_dir) and os.listdir(output_dir) and not overwrite:
        raise FileExistsError(f"{output_dir} exists and is not empty; pass --overwrite to replace it")
    config = AutoConfig.from_pretrained(model_dir)
    kind = head_kind(getattr(config, "architectures", None))
    arch = architecture_for(getattr(config, "model_type", None), os.path.join(model_dir, "config.json"), config.architectures)
    state, torch_dtype = _read_paddle_weights(model_dir)
    hf_state = paddle_to_hf_state(state, arch, config, kind, model_dir)
    hf_state = {name: array.astype(torch_dtype) if np.issubdtype(array.dtype, np.floating) else array for name, array in hf_state.items()}
    hf_config = hf_config_for(config, kind, torch_dtype)
    generation_config = {
        key: hf_config[key] for key in ("bos_token_id", "eos_token_id", "pad_token_id") if hf_config.get(key) is not None
    }
    generation_config["_from_model_config"] = True
    with atomic_directory(output_dir) as staging:
        save_file(hf_state, os.path.join(staging, "model.safetensors"), metadata={"format": "pt"})
        for name, content in (("config.json", hf_config), ("generation_config.json", generation_config)):
            with open(os.path.join(staging, name), "w", encoding="utf-8") as f:
                json.dump(content, f, indent=2)
        tokenizer_files = export_tokenizer(model_dir, staging)
    logger.info(
        f"exported {model_dir} as {hf_config['architectures'][0]} ({len(hf_state)} tensors, {torch_dtype}; "
        f"tokenizer: {tokenizer_files or 'none found'}) to {output_dir}"
    )
    return output_dir


def main(argv: Optional[Sequence[str]] = None) -> str:
    parser = argparse.ArgumentParser(prog="python -m ppo.export_hf", description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", help="PaddleNLP model directory (or an HF directory / .gguf file)")
    parser.add_argument("output_dir", help="where to write the Hugging Face directory")
    parser.add_argument("--overwrite", action="store_true", help="replace output_dir if it exists")
    args = parser.parse_args(argv)
    return export_to_hf(args.model_dir, args.output_dir, overwrite=args.overwrite)


if __name__ == "__main__":
    main()
