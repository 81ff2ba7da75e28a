"""RawSample validation, the RawDataset registry and the built-in datasets read from real local files."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from ppo.data import DATA_DIR_ENV, RawDataset, RawSample, RawSampleError
from ppo.data.base import check_raw_sample, format_prompt

PKU_DIR = "PKU-Alignment/PKU-SafeRLHF"
BUILT_IN = [
    "PKU-SafeRLHF-10K/train",
    "PKU-SafeRLHF-30K/test",
    "PKU-SafeRLHF-30K/train",
    "PKU-SafeRLHF/test",
    "PKU-SafeRLHF/train",
    "alpaca",
    "hh-rlhf",
    "hh-rlhf/test",
    "messages",
    "preference",
    "prompt-completion",
    "prompt-response",
]


def read_jsonl(path):
    with open(path, encoding="utf-8") as file:
        return [json.loads(line) for line in file if line.strip()]


# ---- registry ------------------------------------------------------------------------------------


def test_built_in_names_are_registered():
    assert RawDataset.names() == BUILT_IN


def test_subclass_registers_by_name_and_alias(dataset_registry):
    class Numbers(RawDataset):
        NAME = "test-numbers"
        ALIASES = ("test-digits",)

        def __init__(self, path=None, size=3):
            self.path, self.size = path, size

        def __getitem__(self, index):
            return RawSample(input=f"count {index}", answer=str(index))

        def __len__(self):
            return self.size

    assert RawDataset.resolve("test-numbers") is Numbers
    assert RawDataset.resolve("test-digits") is Numbers
    assert "test-numbers" in RawDataset.names() and "test-digits" not in RawDataset.names()
    loaded = RawDataset.load("test-digits", "/some/where", size=5)
    assert isinstance(loaded, Numbers) and loaded.path == "/some/where" and len(loaded) == 5
    assert list(loaded)[4] == {"input": "count 4", "answer": "4"}


def test_aliases_are_not_inherited_and_helpers_without_name_are_not_registered(dataset_registry):
    class Base(RawDataset):  # no NAME: an abstract helper
        def __getitem__(self, index):
            return RawSample(input="q")

        def __len__(self):
            return 1

    class Parent(Base):
        NAME = "test-parent"
        ALIASES = ("test-parent-alias",)

    class Child(Parent):
        NAME = "test-child"

    assert Base not in RawDataset._registry.values()
    assert RawDataset.resolve("test-parent-alias") is Parent
    assert RawDataset.resolve("test-child") is Child
    assert [name for name, cls in RawDataset._registry.items() if cls is Child] == ["test-child"]


def test_duplicate_names_are_rejected(dataset_registry):
    class First(RawDataset):
        NAME = "test-duplicate"

    with pytest.raises(ValueError, match=r"'test-duplicate' of .*Second is already registered by .*First"):

        class Second(RawDataset):
            NAME = "test-duplicate"

    with pytest.raises(ValueError, match=r"'alpaca' of .*Third is already registered by .*AlpacaDataset"):

        class Third(RawDataset):
            NAME = "test-third"
            ALIASES = ("alpaca",)

    with pytest.raises(ValueError, match="repeat a name"):

        class Fourth(RawDataset):
            NAME = "test-fourth"
            ALIASES = ("test-fourth",)


def test_redefining_the_same_class_replaces_it(dataset_registry):
    def define():
        class Again(RawDataset):
            NAME = "test-again"

        return Again

    first, second = define(), define()  # same module and qualified name: a re-run definition
    assert first is not second and RawDataset.resolve("test-again") is second


@pytest.mark.parametrize("name", ["", "   ", None, 3, "a:b", "a,b", " padded"])
def test_bad_names_are_rejected(dataset_registry, name):
    with pytest.raises(ValueError, match="NAME|may not contain"):
        type("Bad", (RawDataset,), {"NAME": name})


def test_bad_aliases_are_rejected(dataset_registry):
    with pytest.raises(TypeError, match="ALIASES must be a tuple/list"):
        type("Bad", (RawDataset,), {"NAME": "test-bad", "ALIASES": "test-bad-alias"})
    with pytest.raises(TypeError, match="ALIASES but no NAME"):
        type("Bad", (RawDataset,), {"ALIASES": ("x",)})


def test_unknown_name_lists_the_available_ones():
    with pytest.raises(ValueError) as error:
        RawDataset.load("no-such-dataset")
    assert str(error.value) == f"unknown dataset 'no-such-dataset'; available: {', '.join(BUILT_IN)}"
    with pytest.raises(ValueError, match=r"unknown dataset 'Alpaca'; available: .*\(did you mean 'alpaca'\?\)"):
        RawDataset.load("Alpaca")


def test_empty_dataset_and_unexpected_path_are_errors(dataset_registry):
    class Empty(RawDataset):
        NAME = "test-empty"

        def __init__(self, path=None):
            pass

        def __getitem__(self, index):
            raise IndexError(index)

        def __len__(self):
            return 0

    class NoPath(RawDataset):
        NAME = "test-no-path"

        def __init__(self):
            pass

        def __getitem__(self, index):
            return RawSample(input="q")

        def __len__(self):
            return 1

    with pytest.raises(ValueError, match=r"dataset 'test-empty' is empty \(0 rows\)"):
        RawDataset.load("test-empty")
    assert len(RawDataset.load("test-no-path")) == 1
    with pytest.raises(TypeError, match="'test-no-path'.*does not take a path"):
        RawDataset.load("test-no-path", "/data")


# ---- raw sample validation -----------------------------------------------------------------------

SFT = (("input", "answer"), ("dialogue",))
PREFERENCE = (("input", "answer", "other_answer", "better"),)


def test_valid_samples_are_cleaned():
    sample = {"input": "q", "answer": "a", "other_answer": "b", "better": np.bool_(True), "safer": None}
    clean = check_raw_sample(sample, PREFERENCE, "d", 0)
    assert clean == {"input": "q", "answer": "a", "other_answer": "b", "better": True}
    assert type(clean["better"]) is bool
    dialogue = check_raw_sample({"dialogue": ("u1", "a1", "u2", "a2")}, SFT, "d", 0)
    assert dialogue == {"dialogue": ["u1", "a1", "u2", "a2"]}


@pytest.mark.parametrize(
    "sample, required, message",
    [
        ({"input": "q", "answer": "a"}, PREFERENCE, "row 7: field 'other_answer' is missing; this dataset type needs (input, answer, other_answer, better)"),
        ({"input": "q", "answer": "a", "other_answer": "b", "better": 1}, PREFERENCE, "row 7: field 'better' must be a bool, got int: 1"),
        ({"input": "q", "answer": "a", "other_answer": "b", "better": "yes"}, PREFERENCE, "field 'better' must be a bool, got str"),
        ({"input": "q", "safer": 0.0}, (("input",),), "field 'safer' must be a bool, got float"),
        ({"input": "q", "is_safe": None, "is_other_safe": 1}, (("input",),), "field 'is_other_safe' must be a bool"),
        ({"input": ["u1", "a1"], "answer": "a"}, SFT, "field 'input' is a dialogue of even length 2"),
        ({"dialogue": ["u1", "a1", "u2"]}, SFT, "field 'dialogue' has length 3; a dialogue alternates"),
        ({"dialogue": []}, SFT, "field 'dialogue' has length 0"),
        ({"input": "q", "answer": "  "}, SFT, "field 'answer' is empty"),
        ({"input": "", "answer": "a"}, SFT, "field 'input' is empty"),
        ({"input": ["u1", "", "u2"], "answer": "a"}, SFT, "field 'input[1]' is empty"),
        ({"input": 5, "answer": "a"}, SFT, "field 'input' must be a list of strings, got int"),
        ({"input": "q", "answer": 3}, SFT, "field 'answer' must be a string, got int"),
        ({"input": "q"}, SFT, "field 'answer' is missing; this dataset type needs (input, answer) or (dialogue)"),
        ({"input": "q", "answer": "a", "dialogue": ["u", "a"]}, SFT, "provides both (input, answer) and (dialogue)"),
        ({"input": "q", "anwser": "a"}, SFT, "field 'anwser' is not a RawSample field; valid fields: input, dialogue"),
        (["q", "a"], SFT, "row 7 is a list, expected a RawSample"),
    ],
)
def test_invalid_samples_name_dataset_row_and_field(sample, required, message):
    with pytest.raises(RawSampleError, match=r"^dataset 'my-data' row 7") as error:
        check_raw_sample(sample, required, "my-data", 7)
    assert message in str(error.value)


def test_format_prompt_layout():
    assert format_prompt("Hi there", "</s>") == "BEGINNING OF CONVERSATION: USER: Hi there ASSISTANT:"
    assert (
        format_prompt(["u1", "a1", "u2"], "</s>")
        == "BEGINNING OF CONVERSATION: USER: u1 ASSISTANT: a1</s>USER: u2 ASSISTANT:"
    )
    with pytest.raises(ValueError, match="odd length"):
        format_prompt(["u1", "a1"], "</s>")


# ---- built-in datasets from local files ----------------------------------------------------------


def expected_pku(row):
    return {
        "input": row["prompt"],
        "answer": row["response_0"],
        "other_answer": row["response_1"],
        "better": row["better_response_id"] == 0,
        "safer": row["safer_response_id"] == 0,
        "is_safe": row["is_response_0_safe"],
        "is_other_safe": row["is_response_1_safe"],
    }


@pytest.mark.parametrize(
    "name, relative_path, ground_truth",
    [
        ("PKU-SafeRLHF/train", PKU_DIR, f"{PKU_DIR}/train.jsonl"),  # directory of jsonl splits
        ("PKU-SafeRLHF/test", PKU_DIR, f"{PKU_DIR}/test.jsonl"),
        ("PKU-SafeRLHF/test", f"{PKU_DIR}/test.jsonl", f"{PKU_DIR}/test.jsonl"),  # a .jsonl file
        ("PKU-SafeRLHF-30K/train", "PKU-Alignment/PKU-SafeRLHF-30K", f"{PKU_DIR}/train.jsonl"),  # data/train-*.parquet
        ("PKU-SafeRLHF-30K/test", "PKU-Alignment/PKU-SafeRLHF-30K", f"{PKU_DIR}/test.jsonl"),
        ("PKU-SafeRLHF-10K/train", "PKU-Alignment/PKU-SafeRLHF-10K/train.json", f"{PKU_DIR}/train.jsonl"),  # .json array
        ("PKU-Alignment/PKU-SafeRLHF/train", PKU_DIR, f"{PKU_DIR}/train.jsonl"),  # alias
    ],
)
def test_pku_saferlhf_rows_follow_the_spec_mapping(test_data_dir, name, relative_path, ground_truth):
    dataset = RawDataset.load(name, str(test_data_dir / relative_path))
    rows = read_jsonl(test_data_dir / ground_truth)
    assert len(dataset) == len(rows) == 12
    assert [dataset[i] for i in range(len(dataset))] == [expected_pku(row) for row in rows]


@pytest.mark.parametrize("relative_path", ["tatsu-lab/alpaca", "alpaca_data.json", "alpaca.jsonl"])
def test_alpaca_rows_follow_the_spec_mapping(test_data_dir, relative_path):
    dataset = RawDataset.load("alpaca", str(test_data_dir / relative_path))
    rows = read_jsonl(test_data_dir / "alpaca.jsonl")
    assert len(dataset) == 12
    for index, row in enumerate(rows):
        expected_input = f"{row['instruction']} {row['input']}" if row["input"] else row["instruction"]
        assert dataset[index] == {"input": expected_input, "answer": row["output"]}
    assert dataset[2] == {"input": "Translate the word to French. cat", "answer": "chat"}
    assert dataset[0] == {"input": "Give three tips for staying healthy.", "answer": rows[0]["output"]}


def test_a_directory_with_one_unnamed_file_serves_any_split(test_data_dir, tmp_path):
    (tmp_path / "pairs.jsonl").write_text((test_data_dir / PKU_DIR / "test.jsonl").read_text())
    assert len(RawDataset.load("PKU-SafeRLHF/train", str(tmp_path))) == 12
    assert len(RawDataset.load("PKU-SafeRLHF/test", str(tmp_path))) == 12


def test_local_path_errors(test_data_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"dataset 'alpaca': path '.*missing' does not exist"):
        RawDataset.load("alpaca", str(tmp_path / "missing"))
    # The 10K folder only has a train file: it must not silently serve the test split.
    with pytest.raises(FileNotFoundError, match=r"no file for split 'test' in .*found \['train.json'\]"):
        RawDataset.load("PKU-SafeRLHF/test", str(test_data_dir / "PKU-Alignment/PKU-SafeRLHF-10K"))
    csv = tmp_path / "alpaca.csv"
    csv.write_text("instruction,input,output\nq,,a\n")
    with pytest.raises(ValueError, match=r"unsupported file .*alpaca.csv.*\['.json', '.jsonl', '.parquet'\]"):
        RawDataset.load("alpaca", str(csv))
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no .json/.jsonl/.parquet files in"):
        RawDataset.load("alpaca", str(tmp_path / "empty_dir"))
    with pytest.raises(ValueError, match=r"'PKU-SafeRLHF/train' from .* lacks column\(s\) \['prompt', 'response_0'"):
        RawDataset.load("PKU-SafeRLHF/train", str(test_data_dir / "alpaca.jsonl"))
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"instruction": "q", "input": "", "output": "a"}\n{not json\n')
    with pytest.raises(ValueError, match=r"dataset 'alpaca': cannot read .*broken.jsonl"):
        RawDataset.load("alpaca", str(broken))


def test_bad_values_in_pku_files_name_row_and_column(test_data_dir, tmp_path):
    rows = read_jsonl(test_data_dir / PKU_DIR / "train.jsonl")
    rows[5]["better_response_id"] = 2
    bad_id = tmp_path / "bad_id.jsonl"
    bad_id.write_text("".join(json.dumps(row) + "\n" for row in rows))
    dataset = RawDataset.load("PKU-SafeRLHF/train", str(bad_id))
    with pytest.raises(RawSampleError, match=r"dataset 'PKU-SafeRLHF/train' row 5: column 'better_response_id' must be 0 or 1, got 2"):
        dataset[5]

    rows = read_jsonl(test_data_dir / PKU_DIR / "train.jsonl")
    for row in rows:
        row["is_response_0_safe"] = int(row["is_response_0_safe"])  # 0/1 instead of booleans
    bad_flag = tmp_path / "bad_flag.jsonl"
    bad_flag.write_text("".join(json.dumps(row) + "\n" for row in rows))
    sample = RawDataset.load("PKU-SafeRLHF/train", str(bad_flag))[0]
    with pytest.raises(RawSampleError, match=r"dataset 'PKU-SafeRLHF/train' row 0: field 'is_safe' must be a bool, got int"):
        check_raw_sample(sample, (("input",),), "PKU-SafeRLHF/train", 0)


def test_local_mirror_of_hub_names(test_data_dir, monkeypatch):
    monkeypatch.setenv(DATA_DIR_ENV, str(test_data_dir))
    assert len(RawDataset.load("alpaca")) == 12
    assert RawDataset.load("PKU-SafeRLHF/test")[0] == expected_pku(read_jsonl(test_data_dir / PKU_DIR / "test.jsonl")[0])
    assert len(RawDataset.load("PKU-SafeRLHF-30K/train")) == 12


def test_hub_loading_without_network_fails_clearly(repo_root):
    """Without a path the built-ins go to the hub; offline that must fail with instructions."""
    env = {key: value for key, value in os.environ.items() if key != DATA_DIR_ENV}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONPATH=str(repo_root))
    code = (
        "from ppo.data import RawDataset\n"
        "try:\n    RawDataset.load('alpaca')\n"
        "except OSError as error:\n    print('ERROR:', error)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    message = result.stdout.split("ERROR:", 1)[1]
    assert "could not load dataset 'alpaca' from the hub ('tatsu-lab/alpaca', split 'train')" in message
    assert "'alpaca:1.0:/path/to/data'" in message and DATA_DIR_ENV in message
