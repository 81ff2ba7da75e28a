"""Our tokenizer loader gives the ids transformers gives: the `tokenizers` library reading the
directory's `tokenizer.json` is the reference, for HF class names PaddleNLP lacks too."""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import pytest

from ppo.model_io import load_tokenizer
from ppo.tiny import CHATML_TEMPLATE, build_chatml_tokenizer
from ppo.tokenizer_io import TokenizerLoadError, check_matches_tokenizer_file, decode

# Multi-turn ChatML with what slow byte-level BPE gets wrong: the "\n" after <|im_end|>, spaces next
# to special tokens, runs of whitespace, punctuation spacing and non-ASCII.
CHATML_TEXT = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\nhello there , what is  the red bird?<|im_end|>\n"
    "<|im_start|>assistant\n The red bird is a cardinal ' s friend.<|im_end|>\n"
    "<|im_start|>user\n\nand the blue   one? naïve café 🙂<|im_end|>\n"
    "<|im_start|>assistant\n"
)


def reference_ids(directory, text):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(os.path.join(directory, "tokenizer.json")).encode(text, add_special_tokens=False).ids


def directory_digest(directory):
    digest = hashlib.sha256()
    for name in sorted(os.listdir(directory)):
        with open(os.path.join(directory, name), "rb") as handle:
            digest.update(name.encode() + handle.read())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def chatml_dirs(tmp_path_factory):
    """One byte-level BPE saved under several HF tokenizer class names."""
    root = tmp_path_factory.mktemp("chatml_tokenizers")
    first = build_chatml_tokenizer(str(root / "GPT2Tokenizer"), tokenizer_class="GPT2Tokenizer")
    dirs = {"GPT2Tokenizer": first}
    for name in ("TokenizersBackend", "PreTrainedTokenizerFast", "GPT2TokenizerFast", "Qwen2Tokenizer"):
        dirs[name] = str(root / name)
        shutil.copytree(first, dirs[name])
        config_file = os.path.join(dirs[name], "tokenizer_config.json")
        with open(config_file, encoding="utf-8") as handle:
            config = json.load(handle)
        config["tokenizer_class"] = name
        with open(config_file, "w", encoding="utf-8") as handle:
            json.dump(config, handle)
    return dirs


@pytest.mark.parametrize("class_name", ["GPT2Tokenizer", "TokenizersBackend", "PreTrainedTokenizerFast", "GPT2TokenizerFast", "Qwen2Tokenizer"])
def test_ids_equal_the_tokenizers_library(chatml_dirs, class_name):
    directory = chatml_dirs[class_name]
    before = directory_digest(directory)
    tokenizer = load_tokenizer(directory)
    assert tokenizer.is_fast
    ids = tokenizer(CHATML_TEXT, add_special_tokens=False)["input_ids"]
    assert ids == reference_ids(directory, CHATML_TEXT)
    newline = tokenizer.convert_tokens_to_ids("\u010a")  # byte-level BPE's "\n"
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert [ids[i + 1] for i, token in enumerate(ids[:-1]) if token == im_end] == [newline] * 4
    # Decoding gives the text back exactly (no whitespace "clean-up" the config does not ask for).
    assert decode(tokenizer, ids, skip_special_tokens=False) == CHATML_TEXT
    assert decode(tokenizer, ids, skip_special_tokens=True).startswith("system\nYou are a helpful assistant.\nuser\n")
    # Batches encode each text the same way.
    texts = [CHATML_TEXT, "<|im_start|>user\nhi<|im_end|>\n"]
    assert tokenizer(texts, add_special_tokens=False)["input_ids"] == [reference_ids(directory, text) for text in texts]
    assert directory_digest(directory) == before  # the user's files are never edited


def test_paddlenlp_alone_cannot_load_these_directories(chatml_dirs):
    """Why the loader exists: PaddleNLP's AutoTokenizer has no class for these HF names."""
    from paddlenlp.transformers import AutoTokenizer

    for class_name in ("GPT2Tokenizer", "TokenizersBackend"):
        with pytest.raises(ValueError, match=f"Tokenizer class {class_name} does not exist"):
            AutoTokenizer.from_pretrained(chatml_dirs[class_name])


def test_special_tokens_padding_side_and_chat_template(chatml_dirs):
    directory = chatml_dirs["GPT2Tokenizer"]
    left = load_tokenizer(directory)
    right = load_tokenizer(directory, padding_side="right")
    assert (left.padding_side, right.padding_side) == ("left", "right")
    assert left.eos_token == left.pad_token == "<|endoftext|>" and left.bos_token is None
    assert left.init_kwargs["chat_template"] == CHATML_TEMPLATE
    batch = left(["hi", "hello there"], padding=True)["input_ids"]
    assert batch[0][0] == left.pad_token_id  # padded on the left
    with pytest.raises(ValueError, match="padding_side"):
        load_tokenizer(directory, padding_side="middle")


def test_pad_falls_back_to_eos(tmp_path):
    directory = build_chatml_tokenizer(str(tmp_path / "no_pad"))
    config_file = os.path.join(directory, "tokenizer_config.json")
    with open(config_file, encoding="utf-8") as handle:
        config = json.load(handle)
    config.pop("pad_token")
    config["eos_token"] = "<|im_end|>"
    with open(config_file, "w", encoding="utf-8") as handle:
        json.dump(config, handle)
    tokenizer = load_tokenizer(directory)
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_saved_directory_reloads_with_the_same_ids_and_template(chatml_dirs, tmp_path):
    """SFT and RM save the tokenizer with their model; the next stage must read the same ids and
    chat template, also when the template came from chat_template.jinja."""
    source = str(tmp_path / "jinja_source")
    shutil.copytree(chatml_dirs["TokenizersBackend"], source)
    config_file = os.path.join(source, "tokenizer_config.json")
    with open(config_file, encoding="utf-8") as handle:
        config = json.load(handle)
    config["chat_template"] = "{{ 'overridden by the .jinja file' }}"
    with open(config_file, "w", encoding="utf-8") as handle:
        json.dump(config, handle)
    with open(os.path.join(source, "chat_template.jinja"), "w", encoding="utf-8") as handle:
        handle.write(CHATML_TEMPLATE)

    tokenizer = load_tokenizer(source)
    assert tokenizer.init_kwargs["chat_template"] == CHATML_TEMPLATE  # the .jinja file wins, as in transformers
    saved = str(tmp_path / "saved")
    tokenizer.save_pretrained(saved)
    with open(os.path.join(saved, "tokenizer_config.json"), encoding="utf-8") as handle:
        assert json.load(handle)["chat_template"] == CHATML_TEMPLATE
    again = load_tokenizer(saved)
    assert type(again) is type(tokenizer)
    assert again(CHATML_TEXT, add_special_tokens=False)["input_ids"] == reference_ids(source, CHATML_TEXT)
    assert again.init_kwargs["chat_template"] == CHATML_TEMPLATE


def test_sentencepiece_tiny_tokenizer_loads_as_before(tiny_tokenizer_dir):
    from paddlenlp.transformers import AutoTokenizer

    ours = load_tokenizer(tiny_tokenizer_dir, padding_side="right")
    plain = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    assert type(ours) is type(plain) and not ours.is_fast
    text = "BEGINNING OF CONVERSATION: USER: hello ASSISTANT: thank you</s>"
    assert ours(text)["input_ids"] == plain(text)["input_ids"]
    assert (ours.pad_token_id, ours.eos_token_id) == (plain.pad_token_id, plain.eos_token_id)


def test_unknown_class_without_tokenizer_json_names_the_file(chatml_dirs, tmp_path):
    directory = str(tmp_path / "slow_only")
    os.makedirs(directory)
    shutil.copy(os.path.join(chatml_dirs["GPT2Tokenizer"], "tokenizer_config.json"), directory)
    with pytest.raises(TokenizerLoadError, match=r"slow_only/tokenizer_config.json names tokenizer_class 'GPT2Tokenizer'.*tokenizer\.json"):
        load_tokenizer(directory)


def test_unreadable_tokenizer_json_names_the_file(chatml_dirs, tmp_path):
    directory = str(tmp_path / "broken")
    shutil.copytree(chatml_dirs["GPT2Tokenizer"], directory)
    with open(os.path.join(directory, "tokenizer.json"), "w", encoding="utf-8") as handle:
        handle.write('{"version": "1.0", "model": {"type": "NoSuchModel"}}')
    with pytest.raises(TokenizerLoadError, match=r"broken/tokenizer.json"):
        load_tokenizer(directory)


def test_a_tokenizer_that_differs_from_the_file_is_refused(chatml_dirs, tmp_path):
    """The check every fast load runs: a tokenizer whose ids differ from tokenizer.json's."""
    other = build_chatml_tokenizer(str(tmp_path / "other"), texts=["completely different corpus"] * 5, vocab_size=300)
    tokenizer = load_tokenizer(chatml_dirs["GPT2Tokenizer"])
    check_matches_tokenizer_file(tokenizer, os.path.join(chatml_dirs["GPT2Tokenizer"], "tokenizer.json"))
    with pytest.raises(TokenizerLoadError, match=r"other/tokenizer.json does not reproduce the file's ids"):
        check_matches_tokenizer_file(tokenizer, os.path.join(other, "tokenizer.json"))
