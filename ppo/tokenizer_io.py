"""Loading tokenizers that give the same ids as transformers, for every stage.

PaddleNLP's `AutoTokenizer.from_pretrained(path)` picks the class named by `tokenizer_config.json`
and builds the *slow* tokenizer. For Hugging Face directories that goes wrong in two ways:

- class names PaddleNLP lacks (`GPT2Tokenizer`, transformers 5's `TokenizersBackend`,
  `PreTrainedTokenizerFast`, ...) raise "Tokenizer class ... does not exist";
- the slow byte-level BPE (`Qwen2Tokenizer`) drops the whitespace around special tokens, so a
  ChatML prompt loses the `\\n` after `<|im_end|>` and gets other ids than transformers.

Whenever the directory has a `tokenizer.json`, `load_tokenizer` therefore builds a *fast*
tokenizer from it (the class is passed explicitly; the user's files are never edited) and checks
its ids against the `tokenizers` library reading the same file. Without `tokenizer.json` (the
sentencepiece tiny tokenizer of `ppo/tiny.py`, PaddleNLP-native directories) it loads exactly as
PaddleNLP always did.

The chat template is kept out of PaddleNLP's hands: PaddleNLP compiles it at load time in its own
jinja environment, which rejects valid HF templates (`{% break %}`, `strftime_now`) and fails the
whole load. `load_tokenizer` loads without it and keeps the template text in `init_kwargs`, so
`save_pretrained` writes it into the output directory's `tokenizer_config.json`;
`ppo.data.templates` renders it the way transformers does.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from paddlenlp.utils.log import logger

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"  # transformers >= 4.43 writes the template here
PADDING_SIDES = ("left", "right")

# HF class names whose Python side adds nothing to tokenizer.json: the file is the whole tokenizer,
# so PaddleNLP's generic fast class reproduces them.
GENERIC_FAST_CLASS_NAMES = (
    "PreTrainedTokenizerFast",
    "PretrainedTokenizerFast",
    "TokenizersBackend",
    "GPT2Tokenizer",
    "GPT2TokenizerFast",
)
# Special tokens an HF class assumes when the config does not name them (transformers' class
# defaults); applied only to keys the config leaves out, as transformers does.
HF_SPECIAL_TOKEN_DEFAULTS = {
    "GPT2Tokenizer": {"unk_token": "<|endoftext|>", "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"},
    "GPT2TokenizerFast": {"unk_token": "<|endoftext|>", "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"},
}


class TokenizerLoadError(ValueError):
    """A tokenizer directory cannot be loaded so that it gives transformers' ids."""


def load_tokenizer(path: str, padding_side: str = "left"):
    """The tokenizer of a model directory (or PaddleNLP model name).

    `padding_side`: "left" for generation (PPO, evaluation), "right" for SFT and reward-model
    training (our collators pad explicitly; this only decides what the tokenizer itself does and
    records). A tokenizer without a pad token pads with EOS: masks are built from lengths
    everywhere, so pad == eos is safe.
    """
    if padding_side not in PADDING_SIDES:
        raise ValueError(f"padding_side must be one of {PADDING_SIDES}, got {padding_side!r}")
    if os.path.isdir(path):
        config = _read_config(path)
        chat_template = read_chat_template(path)
        # chat_template=None: PaddleNLP must not compile it (see the module docstring).
        kwargs = dict(padding_side=padding_side, chat_template=None)
        if os.path.isfile(os.path.join(path, TOKENIZER_FILE)):
            tokenizer = _load_fast(path, config, kwargs)
        else:
            tokenizer = _load_slow(path, config, kwargs)
        if chat_template is not None:
            tokenizer.init_kwargs["chat_template"] = chat_template.raw
            _offer_template_to_paddlenlp(tokenizer, chat_template)
        else:
            tokenizer.init_kwargs.pop("chat_template", None)  # not a `null` in configs we save
    else:
        from paddlenlp.transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path, padding_side=padding_side)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def fast_tokenizer_class(class_name: Optional[str]):
    """The PaddleNLP fast class that reads a `tokenizer.json` saved under HF's `class_name`:
    PaddleNLP's own fast variant when it has one (`Qwen2Tokenizer` -> `Qwen2TokenizerFast`,
    `LlamaTokenizerFast`, ...), else the generic fast tokenizer."""
    from paddlenlp.transformers.auto.tokenizer import tokenizer_class_from_name
    from paddlenlp.transformers.tokenizer_utils_fast import PretrainedTokenizerFast

    if not class_name or class_name in GENERIC_FAST_CLASS_NAMES:
        return PretrainedTokenizerFast
    stem = class_name[: -len("Fast")] if class_name.endswith("Fast") else class_name
    own = tokenizer_class_from_name(stem + "Fast")
    if own is not None:
        return own
    logger.warning(
        f"tokenizer_class {class_name!r} has no PaddleNLP counterpart; reading tokenizer.json with the generic fast "
        "tokenizer (its ids are checked against the tokenizers library)"
    )
    return PretrainedTokenizerFast


def _read_config(path: str) -> dict:
    config_file = os.path.join(path, TOKENIZER_CONFIG_FILE)
    if not os.path.isfile(config_file):
        return {}
    try:
        with open(config_file, encoding="utf-8") as handle:
            return json.load(handle)
    except json.JSONDecodeError as error:
        raise TokenizerLoadError(f"{config_file} is not valid JSON: {error}") from None


def _load_fast(path: str, config: dict, kwargs: dict):
    tokenizer_file = os.path.join(path, TOKENIZER_FILE)
    class_name = config.get("tokenizer_class")
    tokenizer_class = fast_tokenizer_class(class_name)
    for key, value in HF_SPECIAL_TOKEN_DEFAULTS.get(class_name, {}).items():
        if key not in config:
            kwargs[key] = value
    try:
        tokenizer = tokenizer_class.from_pretrained(path, **kwargs)
    except Exception as error:  # the tokenizers library or PaddleNLP's init: both mean "cannot read it"
        raise TokenizerLoadError(
            f"cannot build a {tokenizer_class.__name__} from {tokenizer_file} (tokenizer_class "
            f"{class_name!r} in {os.path.join(path, TOKENIZER_CONFIG_FILE)}): {type(error).__name__}: {error}"
        ) from error
    check_matches_tokenizer_file(tokenizer, tokenizer_file)
    return tokenizer


def _load_slow(path: str, config: dict, kwargs: dict):
    from paddlenlp.transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, **kwargs)
    except ValueError as error:
        if "does not exist" not in str(error):
            raise
        raise TokenizerLoadError(
            f"{os.path.join(path, TOKENIZER_CONFIG_FILE)} names tokenizer_class {config.get('tokenizer_class')!r}, "
            f"which PaddleNLP does not have, and {path} has no {TOKENIZER_FILE} to build a fast tokenizer from; "
            "save the tokenizer with transformers (`AutoTokenizer.from_pretrained(...).save_pretrained(dir)` writes "
            "tokenizer.json) or convert the model directory with ppo/export_hf.py"
        ) from None


def _probe_text(special_tokens: Sequence[str]) -> str:
    """Text that exercises what tokenizers get wrong: whitespace and newlines next to special
    tokens, runs of spaces, non-ASCII."""
    parts = ["Hello world,  how are\tyou?\n\n"]
    for token in special_tokens:
        parts.append(f"{token}user\nhi there {token}\n {token}  x\n\n")
    parts.append("naïve café — 世界 🙂 end")
    return "".join(parts)


def check_matches_tokenizer_file(tokenizer, tokenizer_file: str) -> None:
    """Raise unless `tokenizer` encodes a probe text exactly as the tokenizers library does from
    `tokenizer_file` (what transformers' fast tokenizers return)."""
    from tokenizers import Tokenizer

    reference = Tokenizer.from_file(tokenizer_file)
    special = sorted(token.content for token in reference.get_added_tokens_decoder().values() if token.special)
    probe = _probe_text(special[:16])
    expected = reference.encode(probe, add_special_tokens=False).ids
    got = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
    if got != expected:
        first = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), min(len(got), len(expected)))
        raise TokenizerLoadError(
            f"{type(tokenizer).__name__} built from {tokenizer_file} does not reproduce the file's ids (first "
            f"difference at token {first}: {got[first:first + 5]} vs {expected[first:first + 5]}); this tokenizer "
            "cannot be used faithfully with PaddleNLP"
        )


# ---- chat templates -------------------------------------------------------------------------


@dataclass(frozen=True)
class ChatTemplateSource:
    """A tokenizer's chat template as stored: `raw` is the stored value (a jinja string, or HF's
    list of named templates), `origin` the file it was read from (for error messages)."""

    raw: Any
    origin: str

    def text(self, name: str = "default") -> str:
        """The jinja text; for a list of named templates, the one called `name`."""
        if isinstance(self.raw, str):
            return self.raw
        if isinstance(self.raw, list):
            named = {entry.get("name"): entry.get("template") for entry in self.raw if isinstance(entry, dict)}
            if isinstance(named.get(name), str):
                return named[name]
            raise ValueError(f"chat_template in {self.origin} has no template named {name!r}; it has {sorted(named)}")
        raise ValueError(f"chat_template in {self.origin} must be a string or a list of named templates, got {type(self.raw).__name__}")


def read_chat_template(path: str) -> Optional[ChatTemplateSource]:
    """The chat template of a tokenizer directory: `chat_template.jinja` if present (it wins over
    the config, as in transformers), else `chat_template` in tokenizer_config.json, else None."""
    jinja_file = os.path.join(path, CHAT_TEMPLATE_FILE)
    if os.path.isfile(jinja_file):
        with open(jinja_file, encoding="utf-8") as handle:
            return ChatTemplateSource(handle.read(), jinja_file)
    raw = _read_config(path).get("chat_template")
    if raw is None:
        return None
    return ChatTemplateSource(raw, os.path.join(path, TOKENIZER_CONFIG_FILE))


def chat_template_of(tokenizer) -> Optional[ChatTemplateSource]:
    """The chat template a loaded tokenizer carries: from its directory's files when it was loaded
    from one, else from its `init_kwargs` (a tokenizer built in memory)."""
    directory = tokenizer.init_kwargs.get("name_or_path")  # set by from_pretrained
    if isinstance(directory, str) and os.path.isdir(directory):
        found = read_chat_template(directory)
        if found is not None:
            return found
    raw = tokenizer.init_kwargs.get("chat_template")
    if raw is None:
        return None
    where = f"{directory}/{TOKENIZER_CONFIG_FILE}" if isinstance(directory, str) and directory else "the tokenizer's init_kwargs"
    return ChatTemplateSource(raw, where)


def _offer_template_to_paddlenlp(tokenizer, source: ChatTemplateSource) -> None:
    """Keep PaddleNLP's own `tokenizer.apply_chat_template` usable where its environment can
    compile the template; our stages never use it (`ppo.data.templates` renders instead)."""
    try:
        tokenizer.init_chat_template(source.text())
    except Exception:  # noqa: BLE001  PaddleNLP's jinja set-up rejects some valid HF templates
        tokenizer.chat_template = None


# ---- decoding -------------------------------------------------------------------------------


def decode(tokenizer, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
    """Text of `ids`. For fast tokenizers this follows transformers: the tokenizer's own
    `clean_up_tokenization_spaces` setting decides (PaddleNLP's `decode` defaults it to True and
    turns "a , b" into "a, b"); slow tokenizers keep PaddleNLP's behaviour."""
    if getattr(tokenizer, "is_fast", False):
        return tokenizer.decode(
            list(ids),
            skip_special_tokens=skip_special_tokens,
            clean_up_tokenization_spaces=bool(getattr(tokenizer, "clean_up_tokenization_spaces", False)),
        )
    return tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)


def special_token_ids(tokenizer) -> set[int]:
    """Ids of every special token: the named ones (bos, eos, pad, ...) and added tokens marked
    special (ChatML's `<|im_start|>`/`<|im_end|>` are usually only the latter)."""
    ids = {int(i) for i in tokenizer.all_special_ids if i is not None}
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    ids.update(int(index) for index, token in decoder.items() if getattr(token, "special", False))
    return ids
