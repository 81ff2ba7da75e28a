"""The built-in demo task: its judge, the generated files (and the safety variant's) and
scripts/prepare_tiny.sh."""

import hashlib
import json
import os
import random
import subprocess
import sys

import pytest

from ppo.data.safe_rlhf import COLUMNS as SAFE_RLHF_COLUMNS
from ppo.demo import task
from ppo.demo.make_data import SAFE_SIZES, make_data, parse_sizes
from ppo.demo.prepare_tiny import BASE_MODEL, TOKENIZER_VOCAB_SIZE

PKU_COLUMNS = list(SAFE_RLHF_COLUMNS)  # what the PKU-SafeRLHF loader reads
DATA_FILES = ["sft.jsonl", "preference/train.jsonl", "preference/test.jsonl", "prompts/train.jsonl", "prompts/test.jsonl", "corpus.txt"]
SMALL_SIZES = {"sft": 300, "preference_train": 300, "preference_test": 100}


def read_jsonl(path):
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("demo_data"))
    make_data(path, seed=0, sizes=SMALL_SIZES)
    return path


# ---------------------------------------------------------------- judge

PROMPT = "i have a red kite. what colour is my kite?"


@pytest.mark.parametrize(
    "response, expected",
    [
        ("sure, your kite is red. hope this helps.", 1.0),
        ("red. thank you!", 1.0),
        ("  The kite is RED.   Have a nice   day. ", 1.0),  # case and spacing do not matter
        ("the kite is red.", 0.5),  # no closing
        ("the kite is red. go away.", 0.5),  # rude closing
        ("thank you! the kite is red.", 0.5),  # polite words, but not at the end
        ("the kite is blue. happy to help.", 0.5),  # wrong colour
        ("the kite is red or blue. happy to help.", 0.5),  # a second colour is not an answer
        ("the kite is blue.", 0.0),
        ("", 0.0),
        ("kite kite kite", 0.0),
    ],
)
def test_judge_on_hand_written_answers(response, expected):
    assert task.judge(PROMPT, response) == expected


def test_judge_reads_the_colour_from_a_templated_prompt():
    from ppo.data.base import PROMPT_INPUT

    templated = PROMPT_INPUT.format(input="what colour is the orange fox?")
    assert task.judge(templated, "it is orange. thank you!") == 1.0
    assert task.judge(templated, "it is red. thank you!") == 0.5


@pytest.mark.parametrize("prompt", ["what colour is the fox?", "is the red fox blue?"])
def test_judge_rejects_prompts_that_are_not_from_the_task(prompt):
    with pytest.raises(ValueError, match="exactly one colour"):
        task.judge(prompt, "it is red.")


def test_well_formed_is_a_fluency_check_separate_from_the_judge():
    assert task.is_well_formed("okay, i see an orange box. stop asking.")  # wrong or rude still fluent
    assert task.is_well_formed("it is red.")
    assert not task.is_well_formed("i see a orange box.")
    assert not task.is_well_formed("well, the9 is white. hope this helps.")
    assert not task.is_well_formed("it is red. thank you! thank you!")


def test_mean_judge_score_checks_its_inputs():
    assert task.mean_judge_score([PROMPT, PROMPT], ["red. thank you!", "blue."]) == 0.5
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        task.mean_judge_score([PROMPT, PROMPT], ["red."])


def test_tied_pair_is_not_a_preference():
    with pytest.raises(ValueError, match="neither is better"):
        task.pku_row(PROMPT, "it is red.", "it is blue. thank you!")


def test_answer_style_rejects_bad_probabilities():
    with pytest.raises(ValueError, match="valid kinds"):
        task.AnswerStyle(0.5, {"polite": 0.5, "shouty": 0.5})
    with pytest.raises(ValueError, match="sum to 1"):
        task.AnswerStyle(0.5, {"polite": 0.5, "none": 0.2})


def test_generated_answers_follow_the_requested_rules():
    rng = random.Random(0)
    for prompt in task.all_prompts()[::37]:
        for correct in (True, False):
            for kind in task.CLOSING_KINDS:
                answer = task.make_response(rng, prompt, correct, kind)
                assert task.is_well_formed(answer), answer
                assert task.is_correct(prompt.text, answer) == correct
                assert task.is_polite(answer) == (kind == "polite")
                assert task.is_safe(answer) == (kind != "rude")


# ---------------------------------------------------------------- generated files


def test_minimal_pairs_differ_in_exactly_one_rule():
    rng = random.Random(3)
    prompts, _ = task.split_prompts(0)
    kinds = set()
    for _ in range(400):
        prompt = rng.choice(prompts)
        first, second = task.minimal_pair(rng, prompt)
        colour_differs = task.is_correct(prompt.text, first) != task.is_correct(prompt.text, second)
        closing_differs = task.is_polite(first) != task.is_polite(second)
        assert colour_differs != closing_differs, (first, second)  # one rule, never both or neither
        assert task.judge(prompt.text, first) != task.judge(prompt.text, second)
        words_first, words_second = first.split(), second.split()
        if colour_differs:  # the same words but the colour (and its article)
            assert len(words_first) == len(words_second)
            assert sum(a != b for a, b in zip(words_first, words_second)) <= 2
        else:  # the same answer sentence, then another closing
            assert first.split(".")[0] == second.split(".")[0]
        kinds.add("colour" if colour_differs else "closing")
        assert task.is_well_formed(first) and task.is_well_formed(second)
    assert kinds == {"colour", "closing"}


def test_preference_rows_mix_minimal_and_independent_pairs():
    rows = task.preference_rows(random.Random(0), task.split_prompts(0)[0], 1000)
    same_wording = sum(row["response_0"].split(".")[0].split()[:2] == row["response_1"].split(".")[0].split()[:2] for row in rows)
    # About MINIMAL_PAIR_SHARE of the pairs share their wording (independent draws rarely do).
    assert task.MINIMAL_PAIR_SHARE * 1000 * 0.9 < same_wording < task.MINIMAL_PAIR_SHARE * 1000 + 300


def test_files_are_deterministic_per_seed(data_dir, tmp_path):
    again, other_seed = tmp_path / "again", tmp_path / "seed1"
    make_data(str(again), seed=0, sizes=SMALL_SIZES)
    make_data(str(other_seed), seed=1, sizes=SMALL_SIZES)
    for name in DATA_FILES:
        with open(os.path.join(data_dir, name), "rb") as first, open(again / name, "rb") as second:
            assert first.read() == second.read(), name
    assert (other_seed / "sft.jsonl").read_bytes() != (again / "sft.jsonl").read_bytes()


def test_rows_use_the_upstream_schemas(data_dir):
    sft = read_jsonl(os.path.join(data_dir, "sft.jsonl"))
    assert len(sft) == SMALL_SIZES["sft"]
    assert all(list(row) == ["instruction", "input", "output"] and row["input"] == "" for row in sft)
    for name in ("preference/train.jsonl", "preference/test.jsonl", "prompts/train.jsonl", "prompts/test.jsonl"):
        for row in read_jsonl(os.path.join(data_dir, name)):
            assert list(row) == PKU_COLUMNS, name
            assert isinstance(row["is_response_0_safe"], bool) and isinstance(row["is_response_1_safe"], bool)
            assert row["better_response_id"] in (0, 1) and row["safer_response_id"] in (0, 1)


def test_sft_data_is_a_mix_of_good_and_bad_answers(data_dir):
    rows = read_jsonl(os.path.join(data_dir, "sft.jsonl"))
    score = task.mean_judge_score([r["instruction"] for r in rows], [r["output"] for r in rows])
    assert 0.3 <= score <= 0.5  # SFT_STYLE expects 0.4: imitation alone leaves room for PPO


def test_every_preference_label_agrees_with_the_judge(data_dir):
    for name in ("preference/train.jsonl", "preference/test.jsonl", "prompts/train.jsonl", "prompts/test.jsonl"):
        for row in read_jsonl(os.path.join(data_dir, name)):
            scores = [task.judge(row["prompt"], row[f"response_{i}"]) for i in (0, 1)]
            assert scores[row["better_response_id"]] > scores[1 - row["better_response_id"]], row
            safe = [row["is_response_0_safe"], row["is_response_1_safe"]]
            assert safe == [task.is_safe(row["response_0"]), task.is_safe(row["response_1"])]
            expected_safer = row["better_response_id"] if safe[0] == safe[1] else safe.index(True)
            assert row["safer_response_id"] == expected_safer


def test_prompt_files_hold_distinct_prompts_with_a_perfect_first_answer(data_dir):
    for name in ("prompts/train.jsonl", "prompts/test.jsonl"):
        rows = read_jsonl(os.path.join(data_dir, name))
        assert len({row["prompt"] for row in rows}) == len(rows)
        assert all(task.judge(row["prompt"], row["response_0"]) == 1.0 for row in rows)


def test_held_out_prompts_are_disjoint_from_training_prompts(data_dir):
    train_prompts, test_prompts = task.split_prompts(seed=0)
    assert {p.text for p in train_prompts}.isdisjoint(p.text for p in test_prompts)
    assert len(train_prompts) + len(test_prompts) == len(task.all_prompts())
    used_in_training = {row["instruction"] for row in read_jsonl(os.path.join(data_dir, "sft.jsonl"))}
    for name in ("preference/train.jsonl", "prompts/train.jsonl"):
        used_in_training |= {row["prompt"] for row in read_jsonl(os.path.join(data_dir, name))}
    for name in ("preference/test.jsonl", "prompts/test.jsonl"):
        held_out = {row["prompt"] for row in read_jsonl(os.path.join(data_dir, name))}
        assert held_out and held_out.isdisjoint(used_in_training), name
    # Held out by (colour, object): training never shows a test object in its test colour.
    train_pairs = {(p.colour, p.thing) for p in train_prompts}
    assert all((p.colour, p.thing) not in train_pairs for p in test_prompts)


def test_corpus_renders_every_answer_in_the_conversation_template(data_dir):
    from ppo.data.base import PROMPT_INPUT

    with open(os.path.join(data_dir, "corpus.txt"), encoding="utf-8") as handle:
        corpus = set(handle.read().splitlines())
    row = read_jsonl(os.path.join(data_dir, "preference/test.jsonl"))[0]
    for response in (row["response_0"], row["response_1"]):
        assert PROMPT_INPUT.format(input=row["prompt"]) + " " + response in corpus


def test_files_load_through_the_dataset_registry(data_dir):
    from ppo.data import RawDataset

    sft = RawDataset.load("alpaca", os.path.join(data_dir, "sft.jsonl"))
    first = read_jsonl(os.path.join(data_dir, "sft.jsonl"))[0]
    assert len(sft) == SMALL_SIZES["sft"] and sft[0]["input"] == first["instruction"] and sft[0]["answer"] == first["output"]
    # A directory resolves train.jsonl / test.jsonl by split.
    test_pairs = RawDataset.load("PKU-SafeRLHF/test", os.path.join(data_dir, "preference"))
    assert len(test_pairs) == SMALL_SIZES["preference_test"]
    sample = test_pairs[0]
    better, worse = (sample["answer"], sample["other_answer"]) if sample["better"] else (sample["other_answer"], sample["answer"])
    assert task.judge(sample["input"], better) > task.judge(sample["input"], worse)


def test_sizes_are_validated(tmp_path):
    assert parse_sizes(["sft=7", "prompts_test=all"])["sft"] == 7
    with pytest.raises(ValueError, match="KEY one of"):
        parse_sizes(["rows=5"])
    with pytest.raises(ValueError, match="positive integer"):
        parse_sizes(["sft=-1"])
    with pytest.raises(ValueError, match="only 96 are available"):
        make_data(str(tmp_path), seed=0, sizes={"prompts_test": 97})


# SHA-256 of the default files at SMALL_SIZES, seed 0, recorded before the safety variant existed:
# adding it (and the labelling rules it brought) must not change a byte of the default demo.
DEFAULT_DATA_SHA256 = {
    "corpus.txt": "ba1602c30ba498787fc5d0893c75adcabf3166f011a5c73685c40a97eec15b47",
    "preference/test.jsonl": "da3954fef8d1774134724d2760d6c482488793e27d24852a8b1aa3baf853f307",
    "preference/train.jsonl": "7a7495440eea21ee6ad899e092d0dbbc37b5f975603315c4c530d8535a790767",
    "prompts/test.jsonl": "cb72ac35eb194c02f2eae90a3407b360786dfb36b0006aae357c9848bc0bcd72",
    "prompts/train.jsonl": "885daaf43382d45ff99004bb398fe72c0fff066a61a27d3e80beae62e9274b73",
    "sft.jsonl": "5d4f824b08774a118c48d96bea110cf6ed8b15c8c10cf5e50a837adeb6275191",
}


def test_default_files_are_unchanged(data_dir):
    for name, digest in DEFAULT_DATA_SHA256.items():
        with open(os.path.join(data_dir, name), "rb") as handle:
            assert hashlib.sha256(handle.read()).hexdigest() == digest, name


# ---------------------------------------------------------------- the safety variant

SAFE_SMALL_SIZES = {"preference_train": 400, "preference_test": 100}


@pytest.fixture(scope="module")
def safe_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("demo_safe_data"))
    make_data(path, seed=0, sizes=SAFE_SMALL_SIZES, variant="safe")
    return path


@pytest.mark.parametrize(
    "response, expected",
    [
        ("sure, your kite is red. hope this helps.", 1.0),
        ("the kite is red. go away.", 1.0),  # rude is as helpful as polite here: only safety differs
        ("the kite is red.", 0.5),
        ("the kite is blue. stop asking.", 0.5),
        ("go away. the kite is red.", 0.5),  # the closing must come last
        ("the kite is blue.", 0.0),
    ],
)
def test_helpfulness_pays_any_closing(response, expected):
    assert task.helpfulness(PROMPT, response) == expected


def test_safe_variant_writes_only_its_preference_files(safe_dir, tmp_path):
    written = sorted(os.path.relpath(os.path.join(folder, name), safe_dir) for folder, _, names in os.walk(safe_dir) for name in names)
    assert written == ["preference/test.jsonl", "preference/train.jsonl"]
    make_data(str(tmp_path), seed=0, sizes=SAFE_SMALL_SIZES, variant="safe")
    for name in written:
        assert (tmp_path / name).read_bytes() == open(os.path.join(safe_dir, name), "rb").read(), name
    assert parse_sizes(["preference_test=7"], "safe") == {**SAFE_SIZES, "preference_test": 7}
    with pytest.raises(ValueError, match=r"KEY one of \['preference_test', 'preference_train'\]"):
        parse_sizes(["sft=5"], "safe")
    with pytest.raises(ValueError, match="valid variants"):
        make_data(str(tmp_path), variant="unsafe")


def test_safe_variant_labels_follow_helpfulness_and_safety(safe_dir):
    conflicts = 0
    for name in ("preference/train.jsonl", "preference/test.jsonl"):
        for row in read_jsonl(os.path.join(safe_dir, name)):
            assert list(row) == PKU_COLUMNS
            responses = [row["response_0"], row["response_1"]]
            assert all(task.is_well_formed(response) for response in responses)  # the default tokenizer's words
            scores = [task.helpfulness(row["prompt"], response) for response in responses]
            better = row["better_response_id"]
            assert scores[better] > scores[1 - better], row
            safe = [row["is_response_0_safe"], row["is_response_1_safe"]]
            assert safe == [task.is_safe(response) for response in responses]
            assert row["safer_response_id"] == (better if safe[0] == safe[1] else safe.index(True))
            conflicts += row["safer_response_id"] != better
    # The pairs where the more helpful answer is the rude one (about a quarter) are what a
    # reward model alone learns the wrong lesson from, and what the cost model corrects.
    assert conflicts > 0.15 * sum(SAFE_SMALL_SIZES.values())


def test_safe_variant_rewards_rude_closings_over_none(safe_dir):
    """What makes plain PPO drift towards rude answers: among pairs that differ only in the
    closing, a rude closing always wins over none, and rude never loses to anything on its
    closing alone."""
    rude_over_none = 0
    for row in read_jsonl(os.path.join(safe_dir, "preference/train.jsonl")):
        better, worse = row[f"response_{row['better_response_id']}"], row[f"response_{1 - row['better_response_id']}"]
        if better.split(".")[0] == worse.split(".")[0] and better != worse:  # a closing-only pair
            assert task.is_emphatic(better) and not task.is_emphatic(worse)
            rude_over_none += not task.is_safe(better)
    assert rude_over_none > 0.05 * SAFE_SMALL_SIZES["preference_train"]


def test_safe_variant_holds_out_the_default_test_prompts(safe_dir):
    train_prompts = {p.text for p in task.split_prompts(0)[0]}
    for name, inside in (("preference/train.jsonl", True), ("preference/test.jsonl", False)):
        prompts = {row["prompt"] for row in read_jsonl(os.path.join(safe_dir, name))}
        assert (prompts <= train_prompts) if inside else prompts.isdisjoint(train_prompts), name


# ---------------------------------------------------------------- scripts/prepare_tiny.sh


def run_prepare(repo_root, *args, cwd=None, env_root=None):
    env = dict(os.environ, PYTHON=sys.executable)
    if env_root is not None:
        env["TINY_OUTPUT_ROOT"] = str(env_root)
    return subprocess.run(
        ["bash", str(repo_root / "scripts" / "prepare_tiny.sh"), *args],
        cwd=cwd or repo_root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def snapshot(root):
    """{relative path: (size, mtime_ns)} of every file under root."""
    files = {}
    for folder, _, names in os.walk(root):
        for name in names:
            stat = os.stat(os.path.join(folder, name))
            files[os.path.relpath(os.path.join(folder, name), root)] = (stat.st_size, stat.st_mtime_ns)
    return files


def test_prepare_tiny_builds_loadable_assets_once(repo_root, tmp_path):
    from paddlenlp.transformers import AutoModelForCausalLM, AutoTokenizer

    # A relative --output-root is relative to where the command runs, not to the repo root.
    first = run_prepare(repo_root, "--output-root", "tiny", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    root = tmp_path / "tiny"
    for stage in ("data", "tokenizer", "base"):
        assert f"[prepare_tiny] {stage}: {root / stage} (" in first.stdout
    assert sorted(os.listdir(root)) == ["base", "data", "prepare_tiny.json", "tokenizer"]
    assert all((root / "data" / name).is_file() for name in DATA_FILES)

    tokenizer = AutoTokenizer.from_pretrained(str(root / "tokenizer"))
    model = AutoModelForCausalLM.from_pretrained(str(root / "base"))
    assert len(tokenizer) == TOKENIZER_VOCAB_SIZE == model.config.vocab_size
    assert {k: getattr(model.config, k) for k in BASE_MODEL} == BASE_MODEL
    assert len(AutoTokenizer.from_pretrained(str(root / "base"))) == len(tokenizer)
    # Every word of the task is one piece, so whole conversations stay short.
    with open(root / "data" / "corpus.txt", encoding="utf-8") as handle:
        lines = handle.read().splitlines()
    assert max(len(tokenizer(line)["input_ids"]) for line in lines) <= 40

    # Re-running (here from the repo root, root given by the environment) touches nothing.
    before = snapshot(root)
    second = run_prepare(repo_root, env_root=root)
    assert second.returncode == 0, second.stderr
    assert second.stdout.count("exists, skipped") == 3
    assert snapshot(root) == before

    # Other settings on an existing root are refused instead of silently mixed.
    other_seed = run_prepare(repo_root, "--output-root", str(root), "--seed", "1")
    assert other_seed.returncode != 0 and "--force" in other_seed.stderr
    assert snapshot(root) == before

    bad = run_prepare(repo_root, "--outptu-root", str(root))
    assert bad.returncode == 2 and "valid: --output-root DIR" in bad.stderr
