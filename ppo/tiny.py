"""Tiny, offline assets: a sentencepiece tokenizer and randomly initialised small models.

They let every stage run on a laptop CPU without a model hub: the tests, the tiny configs
(`scripts/prepare_tiny.sh`), the quickstart and the benchmarks all build from here.
"""

from __future__ import annotations

import io
import os
import tempfile
from typing import Iterable, Optional

from ppo.data.base import PROMPT_ASSISTANT, PROMPT_BEGIN, PROMPT_USER

# Special token ids fixed for every tiny tokenizer (sentencepiece meta pieces).
UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3

_DEFAULT_WORDS = (
    "the a an and or but if then because so of to in on at by for with from about as is are was were be "
    "been have has had do does did can could will would should may might must not no yes please thank "
    "you thanks sorry hello hi good bad great fine well very much more less many few one two three four "
    "five six seven eight nine ten what which who whom whose when where why how this that these those "
    "i me my we our he she it they them their his her your its question answer help tell explain give "
    "make take say know think want like need use find work call try ask feel leave put mean keep let "
    "begin seem show hear play run move live believe hold bring happen write provide sit stand lose pay "
    "meet include continue set learn change lead understand watch follow stop create speak read spend "
    "grow open walk win offer remember love consider appear buy wait serve die send expect build stay "
    "fall cut reach kill remain suggest raise pass sell require report decide pull safe unsafe harmful "
    "helpful honest kind rude polite red blue green yellow black white cat dog fox bird fish tree water "
    "food time day year people way man woman child world life hand part place case week company system "
    "program number group problem fact"
).split()


def default_corpus() -> list[str]:
    """Deterministic text that covers the conversation template and common English words."""
    words = _DEFAULT_WORDS
    user, assistant = PROMPT_USER.split("{input}")[0].strip(), PROMPT_ASSISTANT
    lines = []
    for start in range(len(words)):
        question = " ".join(words[(start + 7 * k) % len(words)] for k in range(8))
        answer = " ".join(words[(start + 11 * k) % len(words)] for k in range(10))
        lines.append(f"{PROMPT_BEGIN} {user} {question}? {assistant} {answer}.")
    lines.extend(str(n) for n in range(100))
    return lines


def build_tokenizer(
    output_dir: str,
    texts: Optional[Iterable[str]] = None,
    vocab_size: int = 512,
):
    """Train a byte-fallback BPE sentencepiece model on `texts` and save a PaddleNLP
    `LlamaTokenizer` to `output_dir` (reloadable with `AutoTokenizer.from_pretrained`).

    Ids: unk 0, bos 1, eos 2, pad 3 — pad differs from eos so tests can exercise both cases.
    """
    import sentencepiece as spm
    from paddlenlp.transformers import LlamaTokenizer

    lines = [line for line in (texts if texts is not None else default_corpus()) if line.strip()]
    if not lines:
        raise ValueError("build_tokenizer needs at least one non-empty line of text")
    os.makedirs(output_dir, exist_ok=True)
    # Train in memory: a file prefix would be recorded inside the model and make rebuilds differ.
    model_bytes = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model_bytes,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        pad_id=PAD_ID,
        pad_piece="<pad>",
        # Tiny corpora cannot fill a large vocabulary; do not fail, use what is learnable.
        hard_vocab_limit=False,
        num_threads=1,
        minloglevel=2,
    )
    with tempfile.TemporaryDirectory() as work_dir:
        model_file = os.path.join(work_dir, "sp.model")
        with open(model_file, "wb") as f:
            f.write(model_bytes.getvalue())
        tokenizer = LlamaTokenizer(vocab_file=model_file, pad_token="<pad>")
        tokenizer.save_pretrained(output_dir)
    return tokenizer


def tiny_config_kwargs(
    vocab_size: int = 512,
    hidden_size: int = 64,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: Optional[int] = None,
    intermediate_size: Optional[int] = None,
    max_position_embeddings: int = 512,
) -> dict:
    return dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads or num_attention_heads,
        intermediate_size=intermediate_size or 2 * hidden_size,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        tie_word_embeddings=False,
    )


def build_tiny_causal_lm(architecture: str = "llama", seed: int = 0, **config_overrides):
    """A randomly initialised small causal LM (`llama` or `qwen2`) in fp32."""
    import paddle
    from paddlenlp.transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    classes = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}
    if architecture not in classes:
        raise ValueError(f"unknown tiny architecture {architecture!r}; available: {sorted(classes)}")
    config_class, model_class = classes[architecture]
    config = config_class(**tiny_config_kwargs(**config_overrides))
    config.dtype = "float32"
    paddle.seed(seed)
    return model_class(config)


def save_tiny_causal_lm(output_dir: str, architecture: str = "llama", seed: int = 0, tokenizer_dir=None, **config_overrides):
    """Build a tiny causal LM and save it (with the tokenizer, if given) as a PaddleNLP model dir."""
    model = build_tiny_causal_lm(architecture, seed=seed, **config_overrides)
    model.save_pretrained(output_dir)
    if tokenizer_dir is not None:
        from paddlenlp.transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(output_dir)
    return model


# ChatML, as Qwen2 chat models write it: every message is `<|im_start|>{role}\n{content}<|im_end|>\n`.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CHATML_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def build_chatml_tokenizer(
    output_dir: str,
    tokenizer_class: str = "GPT2Tokenizer",
    texts: Optional[Iterable[str]] = None,
    vocab_size: int = 400,
    chat_template: Optional[str] = CHATML_TEMPLATE,
) -> str:
    """Train a byte-level BPE (the GPT-2 / Qwen2 kind) with the `tokenizers` library and save it as
    a Hugging Face directory holds it: `tokenizer.json` plus a `tokenizer_config.json` naming
    `tokenizer_class`, EOS and pad `<|endoftext|>`, the ChatML special tokens and `chat_template`
    (None: no template). PaddleNLP is not involved. Returns `output_dir`."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if texts is None:  # the template's own words too, so that roles get merges of their own
        texts = default_corpus() + [f"<|im_start|>{role}\n{line}<|im_end|>\n" for line in default_corpus()[:40]
                                    for role in ("system", "user", "assistant")]
    lines = [line for line in texts if line.strip()]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(CHATML_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(lines, trainer)
    os.makedirs(output_dir, exist_ok=True)
    tokenizer.save(os.path.join(output_dir, "tokenizer.json"))
    config = {
        "tokenizer_class": tokenizer_class,
        "bos_token": None,
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "model_max_length": 512,
        "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": {
            str(tokenizer.token_to_id(token)): {
                "content": token, "lstrip": False, "rstrip": False, "normalized": False, "single_word": False, "special": True,
            }
            for token in CHATML_SPECIAL_TOKENS
        },
    }  # fmt: skip
    if chat_template is not None:
        config["chat_template"] = chat_template
    with open(os.path.join(output_dir, "tokenizer_config.json"), "w", encoding="utf-8") as handle:
        json.dump(config, handle, indent=2)
    return output_dir
