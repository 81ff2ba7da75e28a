"""The README's custom-dataset example, run verbatim (hub names resolve to tests/data offline)."""

import re

import pytest

from ppo.data import DATA_DIR_ENV, PROMPT_INPUT

TOKENIZER_NAME = "'facebook/llama-7b'"


def example_text(repo_root):
    readme = (repo_root / "README.md").read_text(encoding="utf-8")
    blocks = [block for block in re.findall(r"```python\n(.*?)```", readme, flags=re.S) if "class MyRawDataset" in block]
    assert len(blocks) == 1, "README.md should show the custom-dataset example exactly once"
    return blocks[0]


def test_readme_custom_dataset_example_runs_verbatim(repo_root, test_data_dir, tiny_tokenizer_dir, dataset_registry, monkeypatch):
    text = example_text(repo_root)
    assert text.count(TOKENIZER_NAME) == 1
    # The only substitution: the hub tokenizer becomes the tiny offline one.
    text = text.replace(TOKENIZER_NAME, repr(tiny_tokenizer_dir))
    monkeypatch.setenv(DATA_DIR_ENV, str(test_data_dir))
    namespace = {"__name__": "readme_example"}
    exec(compile(text, "README.md example", "exec"), namespace)

    sft, preference = namespace["sft_dataset"], namespace["preference_dataset"]
    tokenizer = namespace["tokenizer"]
    sft_sources = [source.dataset for source in sft.sources]
    assert sft_sources.count("alpaca") == 9 and sft_sources.count("my-dataset-name") == 5  # 0.75 × 12, 0.5 × 10
    preference_sources = [source.dataset for source in preference.sources]
    assert preference_sources.count("PKU-SafeRLHF-30K/train") == 12 and preference_sources.count("my-dataset-name") == 5
    # col4 (1) < col5 (2): answer2 is the better one.
    custom = preference[preference_sources.index("my-dataset-name")]
    prompt = tokenizer(PROMPT_INPUT.format(input="question"))["input_ids"]
    eos = [tokenizer.eos_token_id]
    assert custom["better_input_ids"] == prompt + tokenizer("answer2", add_special_tokens=False)["input_ids"] + eos
    assert custom["worse_input_ids"] == prompt + tokenizer("answer1", add_special_tokens=False)["input_ids"] + eos
    batch = preference.get_collator()([preference[0], custom])
    assert batch["better_input_ids"].shape == batch["worse_input_ids"].shape


def test_alpaca_cannot_make_preference_pairs(test_data_dir, tiny_tokenizer, monkeypatch):
    from ppo.data import PreferenceDataset, RawSampleError

    monkeypatch.setenv(DATA_DIR_ENV, str(test_data_dir))
    with pytest.raises(RawSampleError, match="dataset 'alpaca' row 0: field 'other_answer' is missing"):
        PreferenceDataset({"alpaca": 0.75}, tiny_tokenizer)
