"""Dataset specs: dict / string / list forms, proportions, counts, seeded sampling, bad specs."""

from collections import Counter

import numpy as np
import pytest

from ppo.data import DatasetSpec, SupervisedDataset, parse_dataset_specs
from ppo.data.specs import sample_indices


def test_all_forms_parse_to_the_same_specs():
    expected = [DatasetSpec("alpaca", 0.75), DatasetSpec("my-dataset", 0.5)]
    assert parse_dataset_specs({"alpaca": 0.75, "my-dataset": 0.5}) == expected
    assert parse_dataset_specs("alpaca:0.75,my-dataset:0.5") == expected
    assert parse_dataset_specs(" alpaca:0.75 , my-dataset:.5 ") == expected
    assert parse_dataset_specs(["alpaca:0.75", "my-dataset:0.5"]) == expected
    assert parse_dataset_specs(["alpaca:0.75", DatasetSpec("my-dataset", 0.5)]) == expected
    assert parse_dataset_specs(DatasetSpec("alpaca")) == [DatasetSpec("alpaca", 1.0)]


def test_paths_counts_and_defaults():
    assert parse_dataset_specs("alpaca") == [DatasetSpec("alpaca", 1.0)]
    assert parse_dataset_specs("alpaca:2") == [DatasetSpec("alpaca", 2.0)]
    assert parse_dataset_specs("alpaca::/data/alpaca") == [DatasetSpec("alpaca", 1.0, path="/data/alpaca")]
    # The path is everything after the second colon, so it may hold colons itself.
    assert parse_dataset_specs("PKU-SafeRLHF/train:0.5:C:/data/pku") == [
        DatasetSpec("PKU-SafeRLHF/train", 0.5, path="C:/data/pku")
    ]
    assert parse_dataset_specs("alpaca:#100") == [DatasetSpec("alpaca", count=100)]
    assert parse_dataset_specs({"alpaca": "#7", "b": (0.5, "/b"), "c": ("#3", "/c"), "d": None, "e": "0.25"}) == [
        DatasetSpec("alpaca", count=7),
        DatasetSpec("b", 0.5, path="/b"),
        DatasetSpec("c", count=3, path="/c"),
        DatasetSpec("d", 1.0),
        DatasetSpec("e", 0.25),
    ]
    assert parse_dataset_specs({"alpaca": np.float32(0.5)}) == [DatasetSpec("alpaca", 0.5)]
    assert str(DatasetSpec("alpaca", 0.75, path="/x")) == "alpaca:0.75:/x"
    assert str(DatasetSpec("alpaca", count=9)) == "alpaca:#9"
    assert parse_dataset_specs(str(DatasetSpec("a", 2.5, path="/p:q"))) == [DatasetSpec("a", 2.5, path="/p:q")]


@pytest.mark.parametrize(
    "specs, error, message",
    [
        ("alpaca:abc", ValueError, "proportion 'abc' is not a number; use a fraction such as 0.5"),
        ({"alpaca": "lots"}, ValueError, "proportion 'lots' is not a number"),
        ({"alpaca": True}, ValueError, "proportion True is not a number"),
        ({"alpaca": [0.5]}, ValueError, "a tuple value must be (proportion, path)"),
        ("alpaca:-0.5", ValueError, "dataset 'alpaca': proportion must be a positive number, got -0.5"),
        ({"alpaca": -1}, ValueError, "proportion must be a positive number, got -1.0"),
        ("alpaca:0", ValueError, "proportion must be a positive number, got 0.0"),
        ("alpaca:nan", ValueError, "proportion must be a positive number, got nan"),
        ("alpaca:inf", ValueError, "proportion must be a positive number, got inf"),
        ("alpaca:#0", ValueError, "sample count must be a positive integer, got 0"),
        ("alpaca:#x", ValueError, "sample count '#x' must be '#' followed by digits"),
        ("alpaca:#-3", ValueError, "must be '#' followed by digits"),
        ("alpaca,,b", ValueError, "has an empty entry (stray comma?)"),
        (":0.5", ValueError, "dataset spec needs a non-empty name"),
        ("", ValueError, "no datasets given"),
        ({}, ValueError, "no datasets given"),
        ([], ValueError, "no datasets given"),
        (None, TypeError, "datasets must be a dict"),
        (0.5, TypeError, "datasets must be a dict"),
        ([0.5], TypeError, "list items must be strings or DatasetSpec"),
        ({1: 0.5}, TypeError, "dataset names (dict keys) must be strings"),
        ({"alpaca": (0.5, "")}, ValueError, "path must be a non-empty string"),
    ],
)
def test_bad_specs_are_explained(specs, error, message):
    with pytest.raises(error) as raised:
        parse_dataset_specs(specs)
    assert message in str(raised.value)


def test_count_and_proportion_are_exclusive():
    with pytest.raises(ValueError, match="give a proportion or a sample count, not both"):
        DatasetSpec("alpaca", 0.5, count=3)


def test_fractions_sample_seeded_subsets_without_replacement():
    spec = DatasetSpec("d", 0.29)
    first = sample_indices(100, spec, np.random.default_rng(0))
    assert len(first) == 29 and len(set(first)) == 29 and first == sorted(first)
    assert first == sample_indices(100, spec, np.random.default_rng(0))
    assert first != sample_indices(100, spec, np.random.default_rng(1))
    assert sample_indices(10, DatasetSpec("d", 0.75), np.random.default_rng(0)).__len__() == 7


def test_proportions_above_one_repeat_the_dataset():
    indices = sample_indices(10, DatasetSpec("d", 2.5), np.random.default_rng(0))
    counts = Counter(indices)
    assert len(indices) == 25 and set(counts) == set(range(10))
    assert sorted(counts.values()) == [2] * 5 + [3] * 5
    assert sample_indices(4, DatasetSpec("d", 1.0), np.random.default_rng(0)) == [0, 1, 2, 3]


def test_exact_counts_sample_or_repeat():
    assert len(set(sample_indices(10, DatasetSpec("d", count=4), np.random.default_rng(0)))) == 4
    indices = sample_indices(3, DatasetSpec("d", count=7), np.random.default_rng(0))
    assert len(indices) == 7 and indices[:6] == [0, 1, 2, 0, 1, 2]


def test_a_proportion_that_selects_nothing_is_an_error():
    with pytest.raises(ValueError, match=r"dataset 'd': proportion 0.01 of 10 rows selects no sample"):
        sample_indices(10, DatasetSpec("d", 0.01), np.random.default_rng(0))


# ---- specs through a tokenised dataset, on real files ---------------------------------------------


def test_dataset_mixing_is_seeded_and_reproducible(test_data_dir, tiny_tokenizer):
    specs = {"alpaca": (0.5, str(test_data_dir / "alpaca.jsonl"))}
    first = SupervisedDataset(specs, tiny_tokenizer, seed=1)
    again = SupervisedDataset(specs, tiny_tokenizer, seed=1)
    other = [SupervisedDataset(specs, tiny_tokenizer, seed=seed).sources for seed in (2, 3, 4)]
    assert len(first) == 6
    assert first.sources == again.sources and first.items == again.items
    assert any(sources != first.sources for sources in other)


def test_aliases_work_for_proportions_and_paths(test_data_dir, tiny_tokenizer):
    path = str(test_data_dir / "tatsu-lab/alpaca")
    by_alias = SupervisedDataset(f"stanford-alpaca:0.5:{path}", tiny_tokenizer, seed=3)
    by_name = SupervisedDataset(f"alpaca:0.5:{path}", tiny_tokenizer, seed=3)
    assert len(by_alias) == 6 and by_alias.items == by_name.items
    assert {source.dataset for source in by_alias.sources} == {"stanford-alpaca"}


def test_mixed_datasets_with_repeats_and_counts(test_data_dir, tiny_tokenizer):
    dataset = SupervisedDataset(
        [f"alpaca:2:{test_data_dir / 'alpaca.jsonl'}", f"PKU-SafeRLHF/test:#5:{test_data_dir / 'PKU-Alignment/PKU-SafeRLHF'}"],
        tiny_tokenizer,
    )
    per_dataset = Counter(source.dataset for source in dataset.sources)
    assert per_dataset == {"alpaca": 24, "PKU-SafeRLHF/test": 5}


def test_listing_the_same_dataset_twice_is_an_error(test_data_dir, tiny_tokenizer):
    path = str(test_data_dir / "alpaca.jsonl")
    with pytest.raises(ValueError, match="'stanford-alpaca' is listed twice .*proportion above 1"):
        SupervisedDataset(f"alpaca:0.5:{path},stanford-alpaca:0.5:{path}", tiny_tokenizer)


def test_unknown_name_in_a_spec_fails_before_loading_anything(tiny_tokenizer):
    with pytest.raises(ValueError, match="unknown dataset 'alpacca'; available: .*did you mean 'alpaca'"):
        SupervisedDataset("alpaca:1:/does/not/exist,alpacca", tiny_tokenizer)


def test_field_mappings_ride_on_the_name_in_every_form():
    mapped = DatasetSpec("preference", 0.5, path="/d/p.jsonl.gz", fields=(("prompt", "question"), ("chosen", "good")))
    assert parse_dataset_specs("preference?prompt=question&chosen=good:0.5:/d/p.jsonl.gz") == [mapped]
    assert parse_dataset_specs({"preference?prompt=question&chosen=good": (0.5, "/d/p.jsonl.gz")}) == [mapped]
    assert parse_dataset_specs(str(mapped)) == [mapped]
    assert str(mapped) == "preference?prompt=question&chosen=good:0.5:/d/p.jsonl.gz"
    assert parse_dataset_specs("preference?prompt=q:#3,alpaca")[0] == DatasetSpec("preference", count=3, fields={"prompt": "q"})
    with pytest.raises(ValueError, match="the field mapping names field 'prompt' twice"):
        parse_dataset_specs("preference?prompt=a&prompt=b")
    with pytest.raises(ValueError, match=r"field mapping entry 'chosen=' must read 'field=column'"):
        parse_dataset_specs("preference?chosen=")


def test_dataset_names_cannot_hold_the_field_mapping_marker(dataset_registry):
    from ppo.data import RawDataset

    with pytest.raises(ValueError, match=r"may not contain ':' or ',' or '\?'"):
        type("Odd", (RawDataset,), {"NAME": "what?", "__getitem__": None, "__len__": None})
