"""Built-in generic formats (`preference`, `messages`, `prompt-response`, `prompt-completion`,
`hh-rlhf`) read from real files — gzip-compressed jsonl and parquet — through the same specs,
proportions, counts and tokenised datasets as the built-in datasets; field mappings; bad input."""

from __future__ import annotations

import gzip
import json
import warnings
from pathlib import Path

import pytest

from ppo.data import (
    DataWarning,
    PreferenceDataset,
    PromptOnlyDataset,
    RawDataset,
    RawSampleError,
    SupervisedDataset,
    parse_dataset_specs,
)

HH_RLHF = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh-rlhf" / "harmless-base-test-first2000.jsonl.gz"
FORMATS = ("jsonl.gz", "parquet")


def write_table(directory: Path, name: str, rows: list, kind: str) -> str:
    """`rows` as `name.jsonl.gz` (one JSON object a line, gzip) or `name.parquet` (via HF datasets)."""
    path = directory / f"{name}.{kind}"
    if kind == "jsonl.gz":
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
    else:
        import datasets

        datasets.Dataset.from_list(rows).to_parquet(str(path))
    return str(path)


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def system(text):
    return {"role": "system", "content": text}


def load_all(spec_name: str, path: str, **fields):
    return list(RawDataset.load(spec_name, path, fields=fields or None))


# ---- preference ------------------------------------------------------------------------------

PAIRS_TEXT = [
    {"prompt": "what colour is the sky", "chosen": "it is blue", "rejected": "it is green"},
    {"prompt": "name a fish", "chosen": "a trout", "rejected": "a tree"},
    {"prompt": "say thanks", "chosen": "thank you", "rejected": "no"},
]
PAIRS_MESSAGES = [
    # TRL's conversational layout: the answers are assistant messages only.
    {"prompt": [system("be brief"), user("hi")], "chosen": [assistant("hello")], "rejected": [assistant("go away")]},
    # OpenRLHF's: the answers repeat the prompt's messages before the assistant's.
    {
        "prompt": [system("be brief"), user("hi"), assistant("hello"), user("how are you")],
        "chosen": [system("be brief"), user("hi"), assistant("hello"), user("how are you"), assistant("fine, thanks")],
        "rejected": [assistant("whatever")],
    },
]


@pytest.mark.parametrize("kind", FORMATS)
def test_preference_pairs_from_strings_and_message_lists(tmp_path, kind):
    texts = load_all("preference", write_table(tmp_path, "text", PAIRS_TEXT, kind))
    assert texts[0] == {"input": "what colour is the sky", "answer": "it is blue", "other_answer": "it is green", "better": True}
    messages = load_all("preference", write_table(tmp_path, "messages", PAIRS_MESSAGES, kind))
    assert messages[0] == {"input": "hi", "answer": "hello", "other_answer": "go away", "better": True, "system": "be brief"}
    assert messages[1]["input"] == ["hi", "hello", "how are you"]
    assert (messages[1]["answer"], messages[1]["other_answer"]) == ("fine, thanks", "whatever")


@pytest.mark.parametrize("kind", FORMATS)
def test_generic_formats_take_proportions_counts_and_seeds_like_built_ins(tmp_path, tiny_tokenizer, kind):
    path = write_table(tmp_path, "pairs", PAIRS_TEXT, kind)
    assert len(PreferenceDataset(f"preference:#5:{path}", tiny_tokenizer, max_length=64)) == 5
    assert len(PreferenceDataset(f"preference:2:{path}", tiny_tokenizer, max_length=64)) == 6
    first = PreferenceDataset(f"preference:0.67:{path}", tiny_tokenizer, max_length=64, seed=1)
    again = PreferenceDataset({"preference": (0.67, path)}, tiny_tokenizer, max_length=64, seed=1)
    assert first.sources == again.sources and len(first) == 2
    # The same file serves PPO prompts (input only) and is mixed with a built-in dataset.
    prompts = PromptOnlyDataset(f"preference:1:{path},prompt-response:1:{write_table(tmp_path, 'p', PAIRS_TEXT, kind)}",
                                tiny_tokenizer, max_length=64)
    assert len(prompts) == 3 and prompts.num_duplicates == 3


# ---- messages --------------------------------------------------------------------------------

CONVERSATIONS = [
    {"messages": [user("hello"), assistant("hi there")]},
    {"messages": [system("you are terse"), user("a"), assistant("b"), user("c"), assistant("d")]},
    {"messages": [user("only a question")]},
]


@pytest.mark.parametrize("kind", FORMATS)
def test_messages_give_dialogues_for_sft_and_prompts_without_the_last_answer(tmp_path, tiny_tokenizer, kind):
    path = write_table(tmp_path, "chats", CONVERSATIONS, kind)
    samples = load_all("messages", path)
    assert samples[0] == {"dialogue": ["hello", "hi there"], "input": "hello"}
    assert samples[1] == {"dialogue": ["a", "b", "c", "d"], "input": ["a", "b", "c"], "system": "you are terse"}
    assert samples[2] == {"input": "only a question"}

    prompts = PromptOnlyDataset(f"messages:1:{path}", tiny_tokenizer, max_length=64)
    assert [item["turns"] for item in prompts] == [["hello"], ["a", "b", "c"], ["only a question"]]
    with pytest.warns(DataWarning, match="dropped the system message"):
        sft = SupervisedDataset(f"messages:1:{write_table(tmp_path, 'answered', CONVERSATIONS[:2], kind)}",
                                tiny_tokenizer, max_length=64)
    # Every assistant turn is trained on (a dialogue), not only the last one.
    answers = [sft.tokenizer.decode([t for t in item["labels"] if t >= 0]).split() for item in sft]
    assert answers == [["hi", "there</s>"], ["b</s>", "d</s>"]]
    with pytest.raises(RawSampleError, match=r"dataset 'messages' row 2: field 'answer' is missing"):
        SupervisedDataset(f"messages:1:{path}", tiny_tokenizer, max_length=64)


def test_a_rows_system_message_replaces_system_prompt_in_chat_templates(tmp_path, tiny_tokenizer):
    from ppo.model_io import load_tokenizer
    from ppo.tiny import build_chatml_tokenizer

    chatml = load_tokenizer(build_chatml_tokenizer(str(tmp_path / "chatml"), tokenizer_class="GPT2Tokenizer"))
    path = write_table(tmp_path, "chats", CONVERSATIONS, "jsonl.gz")
    prompts = PromptOnlyDataset(f"messages:1:{path}", chatml, max_length=128, prompt_template="chat",
                                system_prompt="default system")
    texts = [chatml.decode(item["input_ids"]) for item in prompts]
    assert "default system" in texts[0] and "you are terse" in texts[1] and "default system" not in texts[1]
    assert prompts[1]["system"] == "you are terse"
    # The safe-rlhf layout has no system turn: the message is dropped, and said so once.
    with pytest.warns(DataWarning, match=r"dropped the system message of 1 of 3 samples: 1 × prompt_template "
                                         r"'safe-rlhf' has no system turn \(first: dataset 'messages' row 1\)"):
        PromptOnlyDataset(f"messages:1:{path}", tiny_tokenizer, max_length=64)


# ---- prompt-response / prompt-completion and field mappings -----------------------------------


@pytest.mark.parametrize("kind", FORMATS)
def test_field_mapping_renames_columns_in_every_spec_form(tmp_path, tiny_tokenizer, kind):
    rows = [{"question": "q one", "reply": "a one", "id": 1}, {"question": "q two", "reply": "a two", "id": 2}]
    path = write_table(tmp_path, "qa", rows, kind)
    spec = f"prompt-response?prompt=question&response=reply:1:{path}"
    assert parse_dataset_specs(spec)[0].field_map == {"prompt": "question", "response": "reply"}
    as_string = SupervisedDataset(spec, tiny_tokenizer, max_length=64)
    as_dict = SupervisedDataset({"prompt-response?prompt=question&response=reply": (1, path)}, tiny_tokenizer, max_length=64)
    assert [item["input_ids"] for item in as_string] == [item["input_ids"] for item in as_dict]
    assert load_all("prompt-response", path, prompt="question", response="reply")[1] == {"input": "q two", "answer": "a two"}
    # Without its response column the format still gives PPO prompts.
    assert load_all("prompt-response", path, prompt="question") == [{"input": "q one"}, {"input": "q two"}]
    # TRL's prompt/completion names are a format of their own.
    completions = write_table(tmp_path, "pc", [{"prompt": "p", "completion": [assistant("c")]}], kind)
    assert load_all("prompt-completion", completions) == [{"input": "p", "answer": "c"}]


def test_bad_field_mappings_name_the_dataset_column_and_columns_found(tmp_path):
    path = write_table(tmp_path, "qa", [{"question": "q", "reply": "a"}], "jsonl.gz")
    with pytest.raises(ValueError, match=r"column 'answer', mapped to field 'response' in the spec, is not in the file; "
                                         r"its columns are \['question', 'reply'\]"):
        RawDataset.load("prompt-response", path, fields={"prompt": "question", "response": "answer"})
    with pytest.raises(ValueError, match=r"has no column 'prompt' for field 'prompt'.*'prompt-response\?prompt=<column>'"):
        RawDataset.load("prompt-response", path)
    with pytest.raises(ValueError, match=r"'preference' has no field 'question' to map; its fields are prompt, chosen, rejected"):
        RawDataset.load("preference", path, fields={"question": "q"})
    with pytest.raises(TypeError, match=r"dataset 'alpaca' .* takes no field mapping \('alpaca\?input=question'\)"):
        RawDataset.load("alpaca", path, fields={"input": "question"})
    with pytest.raises(ValueError, match=r"'preference' reads a local file: give its path"):
        RawDataset.load("preference")
    with pytest.raises(ValueError, match=r"field mapping entry 'prompt' must read 'field=column'"):
        parse_dataset_specs("preference?prompt:1:/x")


@pytest.mark.parametrize(
    "row, message",
    [
        ({"prompt": [user("a"), user("b")], "chosen": "x", "rejected": "y"},
         r"row 0: field 'prompt' message 1 has role 'user' where 'assistant' was expected"),
        ({"prompt": [user("a"), assistant("b")], "chosen": "x", "rejected": "y"},
         r"row 0: field 'prompt' must end with a user message"),
        ({"prompt": [user("a"), system("late")], "chosen": "x", "rejected": "y"},
         r"row 0: field 'prompt' message 1 is a system message; a system message may only open the conversation"),
        ({"prompt": [{"role": "robot", "content": "a"}], "chosen": "x", "rejected": "y"},
         r"row 0: field 'prompt' message 0 has role 'robot'; roles must be one of system, user, assistant"),
        ({"prompt": "a", "chosen": [user("b"), assistant("x")], "rejected": "y"}, r"row 0: field 'chosen' repeats a "
         r"conversation before its answer that differs from the prompt"),
        ({"prompt": "a", "chosen": [user("x")], "rejected": "y"},
         r"row 0: field 'chosen' message 0 has role 'user'; the answer must be an assistant message"),
        ({"prompt": "a", "chosen": "x", "rejected": ""}, r"row 0: field 'rejected' is empty"),
        ({"prompt": None, "chosen": "x", "rejected": "y"}, r"row 0: field 'prompt' is null"),
    ],
)
def test_malformed_rows_name_dataset_file_row_and_field(tmp_path, row, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(RawSampleError, match=rf"dataset 'preference' \({path}\) {message}"):
        RawDataset.load("preference", str(path))[0]


# ---- HH-RLHF -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hh_rlhf():
    if not HH_RLHF.exists():
        pytest.skip(f"the HH-RLHF sample is not at {HH_RLHF}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dataset = RawDataset.load("hh-rlhf", str(HH_RLHF))
    return dataset, [str(w.message) for w in caught if issubclass(w.category, DataWarning)]


def test_hh_rlhf_transcripts_parse_into_a_shared_dialogue_prompt_and_two_replies(hh_rlhf):
    dataset, _ = hh_rlhf
    first = dataset[0]
    assert first["input"][0] == "what are some pranks with a pen i can do?"
    assert first["input"][1] == "Are you looking for practical joke ideas?"
    assert first["input"][-1] == "okay some of these do not have anything to do with pens"
    assert len(first["input"]) == 5 and first["better"] is True
    assert first["answer"].startswith("No, sorry!  All of these involve a pen")
    assert first["other_answer"].startswith("There are lots of funny things you can do with pens")
    for index in range(12):  # every prompt alternates and ends with the human's turn
        sample = dataset[index]
        turns = sample["input"] if isinstance(sample["input"], list) else [sample["input"]]
        assert len(turns) % 2 == 1 and all(turn == turn.strip() and turn for turn in turns)


def test_hh_rlhf_leaves_out_empty_replies_with_one_counted_warning_and_keeps_row_numbers(hh_rlhf):
    dataset, messages = hh_rlhf
    assert len(dataset) == 1996
    assert messages == [f"dataset 'hh-rlhf' ({HH_RLHF}): left out 4 of 2000 rows: 4 × empty last reply "
                        "(first: row 86, field 'chosen')"]
    assert dataset.source_index(85) == 85 and dataset.source_index(86) == 87
    # Row 763 has two assistant turns in a row: they are joined into one turn.
    joined = dataset[[i for i in range(len(dataset)) if dataset.source_index(i) == 763][0]]
    assert len(joined["input"]) == 3 and "\n\n" in joined["input"][1]


def test_hh_rlhf_feeds_reward_and_prompt_datasets_with_counts(tiny_tokenizer):
    if not HH_RLHF.exists():
        pytest.skip(f"the HH-RLHF sample is not at {HH_RLHF}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        pairs = PreferenceDataset(f"hh-rlhf:#8:{HH_RLHF}", tiny_tokenizer, max_length=1024, seed=3)
        prompts = PromptOnlyDataset(f"Anthropic/hh-rlhf:#8:{HH_RLHF}", tiny_tokenizer, max_length=1024, seed=3)
    assert len(pairs) == 8 and len(prompts) == 8
    assert [ref.index for ref in pairs.sources] == [ref.index for ref in prompts.sources]


def test_a_transcript_that_does_not_parse_names_row_and_field(tmp_path):
    rows = [
        {"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: go"},
        {"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "Human: hi Assistant: go"},
    ]
    path = write_table(tmp_path, "hh", rows, "jsonl.gz")
    with pytest.raises(RawSampleError, match=r"dataset 'hh-rlhf' \(.*hh.jsonl.gz\) row 1: field 'rejected' does not "
                                             r"parse as an HH-RLHF transcript: it must start with '\\n\\nHuman:'"):
        RawDataset.load("hh-rlhf", path)
    rows[1]["rejected"] = "\n\nHuman: hi\n\nAssistant: go\n\nHuman: and?"
    path = write_table(tmp_path, "hh2", rows, "jsonl.gz")
    with pytest.raises(RawSampleError, match=r"row 1: field 'rejected' .* must end with an '\\n\\nAssistant:' reply"):
        RawDataset.load("hh-rlhf", path)
    # Renamed columns are named as the file names them.
    renamed = write_table(tmp_path, "hh3", [{"good": rows[1]["rejected"], "bad": rows[0]["rejected"]}], "parquet")
    with pytest.raises(RawSampleError, match=r"row 0: field 'good' \(mapped to chosen\) does not parse"):
        RawDataset.load("hh-rlhf", renamed, fields={"chosen": "good", "rejected": "bad"})
