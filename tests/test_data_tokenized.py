"""Tokenised datasets and their collators, with the tiny tokenizer and the shipped data files."""

import json

import paddle
import pytest

from ppo.data import (
    IGNORE_INDEX,
    PROMPT_INPUT,
    DataWarning,
    PreferenceDataset,
    PromptOnlyDataset,
    RawDataset,
    RawSample,
    RawSampleError,
    SafetyPreferenceDataset,
    SupervisedDataset,
    format_prompt,
)

PKU_TRAIN = "PKU-Alignment/PKU-SafeRLHF/train.jsonl"


@pytest.fixture()
def alpaca(test_data_dir):
    return {"alpaca": (1.0, str(test_data_dir / "alpaca.jsonl"))}


@pytest.fixture()
def pku(test_data_dir):
    return f"PKU-SafeRLHF/train:1:{test_data_dir / 'PKU-Alignment/PKU-SafeRLHF'}"


@pytest.fixture()
def pku_rows(test_data_dir):
    with open(test_data_dir / PKU_TRAIN, encoding="utf-8") as file:
        return [json.loads(line) for line in file]


def encode(tokenizer, text, special=False):
    return tokenizer(text, add_special_tokens=special)["input_ids"]


def prompt_ids(tokenizer, text):
    """The prompt as the brief defines it: PROMPT_INPUT.format(input=...), tokenised with BOS."""
    return encode(tokenizer, PROMPT_INPUT.format(input=text), special=True)


def as_numpy(batch):
    assert all(isinstance(value, paddle.Tensor) and value.dtype == paddle.int64 for value in batch.values())
    return {key: value.numpy() for key, value in batch.items()}


# ---- supervised ----------------------------------------------------------------------------------


def test_supervised_items_mask_the_prompt_and_end_with_eos(alpaca, tiny_tokenizer, test_data_dir):
    dataset = SupervisedDataset(alpaca, tiny_tokenizer)
    assert dataset.max_length == tiny_tokenizer.model_max_length and len(dataset) == 12
    raw = RawDataset.load("alpaca", str(test_data_dir / "alpaca.jsonl"))
    for index in (0, 2):
        prompt = prompt_ids(tiny_tokenizer, raw[index]["input"])
        answer = encode(tiny_tokenizer, raw[index]["answer"]) + [tiny_tokenizer.eos_token_id]
        assert dataset[index]["input_ids"] == prompt + answer
        assert dataset[index]["labels"] == [IGNORE_INDEX] * len(prompt) + answer
    # The pieces are tokenised apart, which for this tokenizer equals tokenising the whole text.
    text = PROMPT_INPUT.format(input=raw[2]["input"]) + " " + raw[2]["answer"]
    assert dataset[2]["input_ids"] == encode(tiny_tokenizer, text, special=True) + [tiny_tokenizer.eos_token_id]


def test_supervised_collator_pads_right_with_length_masks(alpaca, tiny_tokenizer):
    dataset = SupervisedDataset(alpaca, tiny_tokenizer)
    items = [dataset[0], dataset[7], dataset[2]]
    batch = as_numpy(dataset.get_collator()(items))
    lengths = [len(item["input_ids"]) for item in items]
    width = max(lengths)
    assert {key: value.shape for key, value in batch.items()} == {key: (3, width) for key in ("input_ids", "attention_mask", "labels")}
    for row, (item, length) in enumerate(zip(items, lengths)):
        assert batch["input_ids"][row, :length].tolist() == item["input_ids"]
        assert (batch["input_ids"][row, length:] == tiny_tokenizer.pad_token_id).all()
        assert batch["labels"][row, :length].tolist() == item["labels"]
        assert (batch["labels"][row, length:] == IGNORE_INDEX).all()
        assert batch["attention_mask"][row].tolist() == [1] * length + [0] * (width - length)


def test_supervised_dialogue_labels_every_assistant_turn(in_memory, tiny_tokenizer):
    eos = tiny_tokenizer.eos_token_id
    name = in_memory("test-chat", [RawSample(dialogue=["hello", "hi there", "how are you", "very well"])])
    item = SupervisedDataset(name, tiny_tokenizer)[0]
    first_user = prompt_ids(tiny_tokenizer, "hello")
    second_user = encode(tiny_tokenizer, "USER: how are you ASSISTANT:")
    first_answer = encode(tiny_tokenizer, "hi there") + [eos]
    second_answer = encode(tiny_tokenizer, "very well") + [eos]
    assert item["input_ids"] == first_user + first_answer + second_user + second_answer
    masked = [IGNORE_INDEX]
    assert item["labels"] == masked * len(first_user) + first_answer + masked * len(second_user) + second_answer


def test_dialogue_prompts_put_eos_after_assistant_turns(in_memory, tiny_tokenizer):
    turns = ["hello", "hi there", "how are you"]
    name = in_memory("test-chat-prompt", [RawSample(input=turns, answer="very well")])
    item = SupervisedDataset(name, tiny_tokenizer)[0]
    prompt = encode(tiny_tokenizer, format_prompt(turns, tiny_tokenizer.eos_token), special=True)
    assert prompt.count(tiny_tokenizer.eos_token_id) == 1  # the EOS string became the EOS token
    answer = encode(tiny_tokenizer, "very well") + [tiny_tokenizer.eos_token_id]
    assert item["input_ids"] == prompt + answer
    assert item["labels"] == [IGNORE_INDEX] * len(prompt) + answer  # only the final answer is trained on


def test_truncation_and_counted_skips(alpaca, tiny_tokenizer, test_data_dir):
    raw = RawDataset.load("alpaca", str(test_data_dir / "alpaca.jsonl"))
    prompt_lengths = [len(prompt_ids(tiny_tokenizer, raw[i]["input"])) for i in range(len(raw))]
    max_length = sorted(prompt_lengths)[-3]  # the two longest prompts cannot fit an answer token
    too_long = [i for i, length in enumerate(prompt_lengths) if length >= max_length]
    with pytest.warns(DataWarning) as record:
        dataset = SupervisedDataset(alpaca, tiny_tokenizer, max_length=max_length)
    messages = [str(w.message) for w in record if issubclass(w.category, DataWarning)]
    assert messages == [
        f"SupervisedDataset: skipped {len(too_long)} of 12 samples: {len(too_long)} × prompt fills "
        f"max_length={max_length} with no room for an answer token (first: dataset 'alpaca' row {too_long[0]})"
    ]
    assert len(dataset) == 12 - len(too_long)
    assert all(len(item["input_ids"]) <= max_length for item in dataset)
    assert all(any(label != IGNORE_INDEX for label in item["labels"]) for item in dataset)
    assert max(len(item["input_ids"]) for item in dataset) == max_length  # long answers were cut
    with pytest.raises(ValueError, match=r"SupervisedDataset: all 12 samples were skipped: 12 × prompt fills max_length=4"):
        SupervisedDataset(alpaca, tiny_tokenizer, max_length=4)


def test_max_length_defaults_to_the_tokenizer_and_is_validated(alpaca, tiny_tokenizer):
    tiny_tokenizer.model_max_length = 40
    dataset = SupervisedDataset(alpaca, tiny_tokenizer)
    assert dataset.max_length == 40 and max(len(item["input_ids"]) for item in dataset) == 40
    for bad in (0, 1, -5, 2.5, True, "64"):
        with pytest.raises(ValueError, match="max_length must be an integer >= 2"):
            SupervisedDataset(alpaca, tiny_tokenizer, max_length=bad)


# ---- pad == eos ----------------------------------------------------------------------------------


def test_tokenizer_without_pad_token_pads_with_eos_and_keeps_eos_in_masks(alpaca, pku, tiny_tokenizer):
    tiny_tokenizer.pad_token = None
    eos = tiny_tokenizer.eos_token_id
    sft = SupervisedDataset(alpaca, tiny_tokenizer)
    assert sft.pad_token_id == eos
    items = [sft[0], sft[1]]
    batch = as_numpy(sft.get_collator()(items))
    for row, item in enumerate(items):
        length = len(item["input_ids"])
        assert batch["attention_mask"][row].sum() == length
        assert batch["input_ids"][row, length - 1] == eos and batch["attention_mask"][row, length - 1] == 1
        assert batch["labels"][row, length - 1] == eos
    preference = PreferenceDataset(pku, tiny_tokenizer)
    pairs = as_numpy(preference.get_collator()([preference[0], preference[3]]))
    for row, item in enumerate([preference[0], preference[3]]):
        for side in ("better", "worse"):
            length = len(item[f"{side}_input_ids"])
            assert pairs[f"{side}_attention_mask"][row].sum() == length
            assert pairs[f"{side}_input_ids"][row, length - 1] == eos
    prompts = PromptOnlyDataset(pku, tiny_tokenizer)
    left = as_numpy(prompts.get_collator()([prompts[0], prompts[1]]))
    assert [left["attention_mask"][row].sum() for row in range(2)] == [len(prompts[0]["input_ids"]), len(prompts[1]["input_ids"])]


def test_tokenizer_that_appends_eos_still_gives_the_same_prompts(alpaca, tiny_tokenizer_dir, tiny_tokenizer):
    from paddlenlp.transformers import AutoTokenizer

    appending = AutoTokenizer.from_pretrained(tiny_tokenizer_dir, add_eos_token=True)
    assert appending("a")["input_ids"][-1] == appending.eos_token_id
    assert SupervisedDataset(alpaca, appending).items == SupervisedDataset(alpaca, tiny_tokenizer).items


# ---- preference ----------------------------------------------------------------------------------


def test_preference_pairs_follow_the_better_flag(pku, pku_rows, tiny_tokenizer):
    dataset = PreferenceDataset(pku, tiny_tokenizer)
    eos = tiny_tokenizer.eos_token_id
    assert len(dataset) == 12
    for index, row in enumerate(pku_rows):
        better_id = row["better_response_id"]
        prompt = prompt_ids(tiny_tokenizer, row["prompt"])
        better = encode(tiny_tokenizer, row[f"response_{better_id}"]) + [eos]
        worse = encode(tiny_tokenizer, row[f"response_{1 - better_id}"]) + [eos]
        assert dataset[index] == {"better_input_ids": prompt + better, "worse_input_ids": prompt + worse}


def test_preference_collator_pads_both_sides_to_one_length(pku, tiny_tokenizer):
    dataset = PreferenceDataset(pku, tiny_tokenizer)
    items = [dataset[0], dataset[1], dataset[2]]
    batch = as_numpy(dataset.get_collator()(items))
    assert set(batch) == {"better_input_ids", "better_attention_mask", "worse_input_ids", "worse_attention_mask"}
    width = max(len(item[key]) for item in items for key in ("better_input_ids", "worse_input_ids"))
    assert all(value.shape == (3, width) for value in batch.values())
    for row, item in enumerate(items):
        for side in ("better", "worse"):
            ids = item[f"{side}_input_ids"]
            assert batch[f"{side}_input_ids"][row].tolist() == ids + [tiny_tokenizer.pad_token_id] * (width - len(ids))
            assert batch[f"{side}_attention_mask"][row].tolist() == [1] * len(ids) + [0] * (width - len(ids))


def test_preference_needs_answer_pairs(alpaca, tiny_tokenizer):
    with pytest.raises(RawSampleError, match=r"dataset 'alpaca' row 0: field 'other_answer' is missing; this dataset type needs \(input, answer, other_answer, better\)"):
        PreferenceDataset(alpaca, tiny_tokenizer)


def test_preference_skips_pairs_that_truncate_to_the_same_ids(in_memory, tiny_tokenizer):
    name = in_memory(
        "test-pairs",
        [
            RawSample(input="why", answer="the sky is blue", other_answer="the sky is red", better=True),
            RawSample(input="why", answer="the cat sat down", other_answer="the dog ran off", better=False),
        ],
    )
    prompt_length = len(prompt_ids(tiny_tokenizer, "why"))
    with pytest.warns(DataWarning, match=r"skipped 1 of 2 samples: 1 × both answers give identical token ids \(after truncation\) \(first: dataset 'test-pairs' row 0\)"):
        dataset = PreferenceDataset(name, tiny_tokenizer, max_length=prompt_length + 3)  # "the sky is" is shared
    assert len(dataset) == 1 and dataset.sources[0].index == 1
    assert dataset[0]["better_input_ids"][-3:] == encode(tiny_tokenizer, "the dog ran off")[:3]


def test_better_flag_must_be_boolean(in_memory, tiny_tokenizer):
    name = in_memory("test-scores", [RawSample(input="q", answer="a", other_answer="b", better=True)] * 3 + [RawSample(input="q", answer="a", other_answer="b", better=2)])
    with pytest.raises(RawSampleError, match=r"dataset 'test-scores' row 3: field 'better' must be a bool, got int: 2"):
        PreferenceDataset(name, tiny_tokenizer)


# ---- safety preference ---------------------------------------------------------------------------


def test_safety_pairs_follow_safer_and_carry_signs(pku, pku_rows, tiny_tokenizer):
    dataset = SafetyPreferenceDataset(pku, tiny_tokenizer)
    eos = tiny_tokenizer.eos_token_id
    for index, row in enumerate(pku_rows):
        safer_id = row["safer_response_id"]
        prompt = prompt_ids(tiny_tokenizer, row["prompt"])
        assert dataset[index] == {
            "safer_input_ids": prompt + encode(tiny_tokenizer, row[f"response_{safer_id}"]) + [eos],
            "safer_sign": 1 if row[f"is_response_{safer_id}_safe"] else -1,
            "unsafer_input_ids": prompt + encode(tiny_tokenizer, row[f"response_{1 - safer_id}"]) + [eos],
            "unsafer_sign": 1 if row[f"is_response_{1 - safer_id}_safe"] else -1,
        }
    items = [dataset[i] for i in range(4)]
    batch = as_numpy(dataset.get_collator()(items))
    assert batch["safer_safety_sign"].tolist() == [item["safer_sign"] for item in items]
    assert batch["unsafer_safety_sign"].tolist() == [item["unsafer_sign"] for item in items]
    assert -1 in batch["unsafer_safety_sign"].tolist()
    assert batch["safer_input_ids"].shape == batch["unsafer_input_ids"].shape == batch["unsafer_attention_mask"].shape
    assert batch["safer_attention_mask"].sum(axis=1).tolist() == [len(item["safer_input_ids"]) for item in items]


def test_contradictory_safety_labels_are_an_error(in_memory, tiny_tokenizer):
    name = in_memory(
        "test-safety",
        [
            RawSample(input="q", answer="a", other_answer="b", safer=True, is_safe=True, is_other_safe=False),
            RawSample(input="q", answer="a", other_answer="b", safer=False, is_safe=True, is_other_safe=False),
        ],
    )
    with pytest.raises(RawSampleError, match=r"dataset 'test-safety' row 1: field 'safer' is False, but that answer is labelled unsafe while the other answer is labelled safe"):
        SafetyPreferenceDataset(name, tiny_tokenizer)


# ---- prompt only ---------------------------------------------------------------------------------


def test_prompts_are_deduplicated_and_left_padded(pku, pku_rows, tiny_tokenizer):
    tiny_tokenizer.padding_side = "right"  # the collator left-pads regardless
    dataset = PromptOnlyDataset(pku, tiny_tokenizer)
    unique = list(dict.fromkeys(row["prompt"] for row in pku_rows))
    assert len(dataset) == len(unique) == 9 and dataset.num_duplicates == 3
    assert [item["input_ids"] for item in dataset] == [prompt_ids(tiny_tokenizer, prompt) for prompt in unique]
    items = [dataset[0], dataset[5], dataset[7]]
    batch = as_numpy(dataset.get_collator()(items))
    assert set(batch) == {"input_ids", "attention_mask"}
    width = max(len(item["input_ids"]) for item in items)
    for row, item in enumerate(items):
        pad = width - len(item["input_ids"])
        assert batch["input_ids"][row].tolist() == [tiny_tokenizer.pad_token_id] * pad + item["input_ids"]
        assert batch["attention_mask"][row].tolist() == [0] * pad + [1] * len(item["input_ids"])
    assert any(len(item["input_ids"]) < width for item in items)


def test_repeats_from_proportions_are_kept_but_duplicates_across_rows_are_not(pku, tiny_tokenizer):
    twice = PromptOnlyDataset(pku.replace(":1:", ":2:"), tiny_tokenizer)
    assert len(twice) == 18 and twice.num_duplicates == 6


def test_long_prompts_are_dropped_with_one_warning(pku, pku_rows, tiny_tokenizer):
    lengths = [len(prompt_ids(tiny_tokenizer, row["prompt"])) for row in pku_rows]
    max_length = sorted(set(lengths))[-2]
    first_rows = {row["prompt"]: i for i, row in reversed(list(enumerate(pku_rows)))}  # duplicates go first
    too_long = sorted(i for i in first_rows.values() if lengths[i] > max_length)
    with pytest.warns(DataWarning) as record:
        dataset = PromptOnlyDataset(pku, tiny_tokenizer, max_length=max_length)
    messages = [str(w.message) for w in record if issubclass(w.category, DataWarning)]
    assert len(messages) == 1
    assert messages[0].startswith(f"PromptOnlyDataset: dropped {len(too_long)} of 9 samples: ")
    assert f"prompt longer than max_length={max_length} tokens (first: dataset 'PKU-SafeRLHF/train' row {too_long[0]})" in messages[0]
    assert len(dataset) == 9 - len(too_long) and all(len(item["input_ids"]) <= max_length for item in dataset)
    with pytest.raises(ValueError, match=r"PromptOnlyDataset: all 9 samples were dropped: 9 × prompt longer than max_length=5"):
        PromptOnlyDataset(pku, tiny_tokenizer, max_length=5)


def test_prompt_only_accepts_any_dataset_with_inputs(alpaca, tiny_tokenizer, in_memory):
    assert len(PromptOnlyDataset(alpaca, tiny_tokenizer)) == 12
    name = in_memory("test-no-input", [RawSample(answer="a")])
    with pytest.raises(RawSampleError, match=r"dataset 'test-no-input' row 0: field 'input' is missing"):
        PromptOnlyDataset(name, tiny_tokenizer)


# ---- trainer compatibility and splitting ---------------------------------------------------------


def test_collated_batches_feed_the_paddlenlp_trainer_and_model(alpaca, tiny_tokenizer, tiny_llama_dir, tmp_path):
    from paddlenlp.trainer import Trainer, TrainingArguments
    from paddlenlp.transformers import AutoModelForCausalLM

    dataset = SupervisedDataset(alpaca, tiny_tokenizer, max_length=48)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, report_to=["none"])
    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=dataset.get_collator())
    batch = next(iter(trainer.get_train_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "labels"} and batch["input_ids"].shape[0] == 4
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], return_dict=True).logits
    assert logits.shape[:2] == batch["input_ids"].shape and bool(paddle.isfinite(logits).all())


def test_split_train_test_never_empties_train(alpaca, tiny_tokenizer):
    dataset = SupervisedDataset(alpaca, tiny_tokenizer)
    train, test = dataset.split_train_test(0.25, seed=0)
    assert (len(train), len(test)) == (9, 3)
    assert type(train) is SupervisedDataset and train.get_collator() == dataset.get_collator()
    assert sorted(map(str, train.sources + test.sources)) == sorted(map(str, dataset.sources))
    assert dataset.split_train_test(0.25, seed=0)[1].sources == test.sources
    assert len(dataset.split_train_test(0.01)[1]) == 1  # a positive ratio always gives a test sample
    with pytest.raises(ValueError, match="test_ratio 0.99 of 12 samples leaves no training sample"):
        dataset.split_train_test(0.99)
    for bad in (0, 1, -0.1, 1.5, True):
        with pytest.raises(ValueError, match="strictly between 0 and 1"):
            dataset.split_train_test(bad)
    single = dataset.select([0])
    with pytest.raises(ValueError, match="leaves no training sample"):
        single.split_train_test(0.5)
