"""Length control: `max_prompt_length` / `prompt_truncation` in every stage's datasets (earlier turns
dropped first, then tokens from the left, or the sample dropped; counted with the first row), and
PPO's `max_new_tokens`: one response budget for every rollout and evaluation batch, whatever
prompts share the batch or the eval set."""

from __future__ import annotations

import json
import warnings

import pytest

from ppo.data import DataWarning, PreferenceDataset, PromptOnlyDataset, SupervisedDataset
from ppo.data.templates import build_template

LONG_TURN = " ".join(["the red bird sat in the tall green tree by the water"] * 4)
# With the tiny tokenizer: 141 prompt tokens; 41 without the first exchange, 88 in LONG_TURN alone.
DIALOGUE = [LONG_TURN, "i see a bird", "is it small", "it is small and red", "what colour is the bird"]


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def messages_of(turns):
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": turn} for i, turn in enumerate(turns)]


@pytest.fixture()
def pair_file(tmp_path):
    """One short and one long multi-turn preference pair."""
    return write_jsonl(tmp_path / "pairs.jsonl", [
        # One column holds one type (arrow): both prompts are message lists.
        {"prompt": messages_of(["what colour is the sky"]), "chosen": "blue", "rejected": "green"},
        {"prompt": messages_of(DIALOGUE), "chosen": "red", "rejected": "blue"},
    ])  # fmt: skip


def prompt_tokens(dataset, turns):
    return len(build_template("safe-rlhf", dataset.tokenizer).encode_prompt(turns))


def test_without_the_new_keys_long_prompts_are_skipped_as_before(pair_file, tiny_tokenizer):
    with pytest.warns(DataWarning, match=r"skipped 1 of 2 samples: 1 × prompt fills max_length=48 with no room for an "
                                         r"answer token \(first: dataset 'preference' row 1\)"):
        dataset = PreferenceDataset(f"preference:1:{pair_file}", tiny_tokenizer, max_length=48)
    assert len(dataset) == 1


def test_left_turns_keeps_the_last_turns_of_a_long_prompt_and_counts_it(pair_file, tiny_tokenizer):
    with pytest.warns(DataWarning, match=r"PreferenceDataset: shortened 1 of 2 prompts to 48 tokens \(max_prompt_length=48\): "
                                         r"1 × earlier turns dropped \(first: dataset 'preference' row 1\)"):
        dataset = PreferenceDataset(f"preference:1:{pair_file}", tiny_tokenizer, max_length=64, max_prompt_length=48,
                                    prompt_truncation="left_turns")
    assert len(dataset) == 2
    kept = dataset.encode_turns(DIALOGUE[2:] + ["red"]).input_ids  # the last exchange and the question, whole
    assert dataset[1]["better_input_ids"] == kept
    # The same in SFT, where the same prompt used to cost the sample.
    with pytest.warns(DataWarning, match="1 × earlier turns dropped"):
        sft = SupervisedDataset(f"prompt-response?response=chosen:1:{pair_file}", tiny_tokenizer, max_length=64,
                                max_prompt_length=48, prompt_truncation="left_turns")
    assert len(sft) == 2 and sft[1]["input_ids"] == kept


def test_left_tokens_cuts_from_the_start_and_keeps_the_template_framing(pair_file, tiny_tokenizer):
    with pytest.warns(DataWarning, match=r"1 × tokens cut from the left"):
        prompts = PromptOnlyDataset(f"preference:1:{pair_file}", tiny_tokenizer, max_length=128, max_prompt_length=100,
                                    prompt_truncation="left_tokens")
    item = prompts[1]
    assert len(item["input_ids"]) <= 100
    # Only the start of the first turn went; the kept turns re-render to exactly the prompt's ids,
    # so a reward model with another tokenizer sees the same shortened conversation.
    assert item["turns"][1:] == DIALOGUE[1:] and LONG_TURN.endswith(item["turns"][0])
    assert 0 < len(item["turns"][0]) < len(LONG_TURN) / 2 + 10
    assert prompts.encode_prompt(item["turns"]) == item["input_ids"]
    assert tiny_tokenizer.decode(item["input_ids"], skip_special_tokens=True).startswith("BEGINNING OF CONVERSATION: USER: the water")


def test_a_long_single_turn_prompt_is_cut_by_tokens_under_left_turns(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": LONG_TURN, "response": "ok"}, {"prompt": "hi", "response": "ok"}])
    with pytest.warns(DataWarning, match="1 × tokens cut from the left"):
        sft = SupervisedDataset(f"prompt-response:1:{path}", tiny_tokenizer, max_length=32, max_prompt_length=24,
                                prompt_truncation="left_turns")
    prompt_length = sum(1 for label in sft[0]["labels"] if label < 0)
    assert prompt_length <= 24 and tiny_tokenizer.decode(sft[0]["input_ids"]).rstrip().endswith("ok</s>")


def test_drop_and_prompts_that_cannot_fit_are_counted_with_their_reason(pair_file, tiny_tokenizer, tmp_path):
    with pytest.warns(DataWarning, match=r"dropped 1 of 2 samples: 1 × prompt longer than max_prompt_length=40 tokens"):
        PromptOnlyDataset(f"preference:1:{pair_file}", tiny_tokenizer, max_length=64, max_prompt_length=40)
    # The framing alone ("BEGINNING OF CONVERSATION: USER: ... ASSISTANT:") is longer than 4 tokens.
    with pytest.raises(ValueError, match=r"all 2 samples were dropped: 2 × prompt cannot fit in 4 tokens even after "
                                         r"truncation \(the template's framing alone takes about \d+\)"):
        PromptOnlyDataset(f"preference:1:{pair_file}", tiny_tokenizer, max_length=64, max_prompt_length=4,
                          prompt_truncation="left_turns")


def test_bad_length_settings_are_refused(pair_file, tiny_tokenizer, tmp_path):
    from ppo.arguments import PPODataArguments
    from sft.run_sft import SftArguments

    with pytest.raises(ValueError, match=r"prompt_truncation must be one of 'left_turns', 'left_tokens', 'drop', got 'left'"):
        PreferenceDataset(f"preference:1:{pair_file}", tiny_tokenizer, max_length=48, prompt_truncation="left")
    with pytest.raises(ValueError, match=r"max_prompt_length=48 is too large: PreferenceDataset needs prompts to leave 1"):
        PreferenceDataset(f"preference:1:{pair_file}", tiny_tokenizer, max_length=48, max_prompt_length=48)
    stage = dict(model_name_or_path="m", output_dir=str(tmp_path), report_to=["none"], max_length=48)
    with pytest.raises(ValueError, match=r"max_prompt_length=48 is too large: at most max_length - 1 = 47"):
        SftArguments(**stage, max_prompt_length=48)
    with pytest.raises(ValueError, match="prompt_truncation must be one of"):
        SftArguments(**stage, prompt_truncation="right")
    with pytest.raises(ValueError, match=r"max_new_tokens must be an integer from 1 to max_length - 1 = 47"):
        PPODataArguments(train_datasets="x", max_length=48, max_new_tokens=48)
    with pytest.raises(ValueError, match=r"max_prompt_length \+ max_new_tokens = 56 exceeds max_length = 48"):
        PPODataArguments(train_datasets="x", max_length=48, max_new_tokens=16, max_prompt_length=40)
    assert PPODataArguments(train_datasets="x", max_length=48, max_new_tokens=16).response_room == 16


# ---- PPO: the response budget ----------------------------------------------------------------

SHORT_PROMPTS = ["what is red", "name a bird", "say hello"]
MEDIUM_TURN = " ".join(["the red bird sat in the tall green tree by the water"] * 2)  # a ~53-token prompt


@pytest.fixture(scope="module")
def ppo_models(tmp_path_factory, tiny_llama_dir):
    from paddlenlp.transformers import AutoTokenizer

    from ppo.models import AutoModelForScore

    root = tmp_path_factory.mktemp("length_ppo")
    reward_dir = str(root / "reward")
    AutoModelForScore.from_pretrained(tiny_llama_dir, score_type="reward").save_pretrained(reward_dir)
    AutoTokenizer.from_pretrained(tiny_llama_dir).save_pretrained(reward_dir)
    # The long prompt is last, so that batches of 2 put it with a short prompt.
    rows = [{"prompt": prompt} for prompt in SHORT_PROMPTS[:3]] + [{"prompt": MEDIUM_TURN}]
    prompts = write_jsonl(root / "prompts.jsonl", rows)
    return {"actor": tiny_llama_dir, "reward": reward_dir, "prompts": prompts}


def build_ppo(models, output_dir, **data):
    from ppo.arguments import PPODataArguments, PPOModelArguments, PPOTrainingArguments
    from ppo.run_ppo import build_trainer

    spec = f"prompt-response:1:{models['prompts']}"
    return build_trainer(
        PPOModelArguments(actor_model_name_or_path=models["actor"], reward_model_name_or_path=models["reward"]),
        PPODataArguments(train_datasets=spec, eval_datasets=spec, max_length=64, **data),
        PPOTrainingArguments(
            output_dir=str(output_dir), max_steps=1, per_device_prompt_batch_size=2, per_device_train_batch_size=2,
            per_device_eval_batch_size=2, report_to=["none"], seed=5, disable_tqdm=True, num_eval_samples_to_save=0,
        ),
    )


def record_budgets(trainer) -> list:
    """The `max_new_tokens` of every generation call (observation only: generation runs as usual)."""
    budgets, generate = [], trainer.engine.generate

    def recording(*args, **kwargs):
        budgets.append(kwargs["max_new_tokens"])
        output = generate(*args, **kwargs)
        assert output.sequences.shape[1] - output.prompt_length <= kwargs["max_new_tokens"]
        return output

    trainer.engine.generate = recording
    return budgets


def prompt_batch(trainer, indices):
    from ppo.experience import PromptBatch

    dataset = trainer.train_dataset
    return PromptBatch.from_collated(dataset.get_collator()([dataset[i] for i in indices]))


def test_max_new_tokens_fixes_the_budget_whatever_shares_the_batch_or_the_eval_set(ppo_models, tmp_path):
    trainer = build_ppo(ppo_models, tmp_path, max_new_tokens=8)
    long_index = max(range(len(trainer.train_dataset)), key=lambda i: len(trainer.train_dataset[i]["input_ids"]))
    assert len(trainer.train_dataset[long_index]["input_ids"]) > 40  # it would leave < 24 tokens otherwise
    budgets = record_budgets(trainer)
    alone = trainer.make_experience(prompt_batch(trainer, [0, 1]))
    with_long = trainer.make_experience(prompt_batch(trainer, [0, long_index]))
    trainer.evaluate()
    assert budgets == [8, 8, 8, 8]  # two rollouts, then two eval batches (one holds the long prompt)
    assert alone.input_ids.shape[1] - alone.prompt_length <= 8 and with_long.input_ids.shape[1] <= 64


def test_without_max_new_tokens_the_longest_prompt_still_sets_the_budget(ppo_models, tmp_path):
    trainer = build_ppo(ppo_models, tmp_path)  # today's behaviour, kept as the default
    lengths = [len(item["input_ids"]) for item in trainer.train_dataset]
    long_index = lengths.index(max(lengths))
    budgets = record_budgets(trainer)
    trainer.make_experience(prompt_batch(trainer, [0, 1]))
    trainer.make_experience(prompt_batch(trainer, [0, long_index]))
    trainer.evaluate()
    longest = max(lengths)
    assert budgets == [64 - max(lengths[0], lengths[1]), 64 - longest, 64 - longest, 64 - longest]


def test_ppo_prompts_are_fitted_to_leave_max_new_tokens_and_counted(ppo_models, tmp_path):
    with pytest.warns(DataWarning, match=r"PromptOnlyDataset: shortened 1 of 4 prompts to 32 tokens "
                                         r"\(max_length=64 minus 32 for the response\): 1 × tokens cut from the left"):
        trainer = build_ppo(ppo_models, tmp_path, max_new_tokens=32, prompt_truncation="left_turns")
    assert max(len(item["input_ids"]) for item in trainer.train_dataset) <= 32
    with pytest.warns(DataWarning, match=r"dropped 1 of 4 samples: 1 × prompt longer than 32 tokens "
                                         r"\(max_length=64 minus 32 for the response\)"):
        trainer = build_ppo(ppo_models, tmp_path, max_new_tokens=32)
    assert len(trainer.train_dataset) == 3
