"""`prompt_template: "chat"`: the tokenizer's own chat template in every stage (SFT labels, RM pairs,
PPO prompts, rollout stopping, reward re-rendering), checked against the `tokenizers` library on
the fully rendered text, i.e. what transformers' `apply_chat_template(..., tokenize=True)` gives."""

from __future__ import annotations

import json
import os

import numpy as np
import paddle
import pytest

from ppo.data import (
    IGNORE_INDEX,
    ChatTemplateError,
    PreferenceDataset,
    PromptOnlyDataset,
    RawSample,
    SafetyPreferenceDataset,
    SupervisedDataset,
    build_template,
)
from ppo.data.templates import compile_chat_template
from ppo.infer_utils import RolloutEngine
from ppo.model_io import load_tokenizer
from ppo.tiny import build_chatml_tokenizer

SYSTEM = "You answer in one short sentence."


@pytest.fixture(scope="module")
def chatml_dir(tmp_path_factory):
    return build_chatml_tokenizer(str(tmp_path_factory.mktemp("chatml")), tokenizer_class="GPT2Tokenizer")


@pytest.fixture()
def tokenizer(chatml_dir):
    return load_tokenizer(chatml_dir, padding_side="right")


def reference(chatml_dir, text):
    """Ids of the whole text from the tokenizers library (what transformers gives)."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(os.path.join(chatml_dir, "tokenizer.json")).encode(text, add_special_tokens=False).ids


def chatml(*turns, system=None, open_answer=False):
    """ChatML text written out by hand."""
    messages = [("system", system)] if system else []
    messages += [("user" if i % 2 == 0 else "assistant", turn) for i, turn in enumerate(turns)]
    text = "".join(f"<|im_start|>{role}\n{content}<|im_end|>\n" for role, content in messages)
    return text + ("<|im_start|>assistant\n" if open_answer else "")


def ids_of(tokenizer, token):
    return tokenizer.convert_tokens_to_ids(token)


# ---- rendering ---------------------------------------------------------------------------------


def test_template_renders_like_transformers_and_finds_the_end_of_turn(tokenizer):
    template = build_template("chat", tokenizer, system_prompt=SYSTEM)
    turns = ["hello", "hi there", "what colour is the sky"]
    assert template.render(turns, add_generation_prompt=True) == chatml(*turns, system=SYSTEM, open_answer=True)
    assert template.render(turns[:2], add_generation_prompt=False) == chatml(*turns[:2], system=SYSTEM)
    # The end-of-turn token is found by rendering, not assumed: EOS here is <|endoftext|>.
    assert template.end_of_turn_text == "<|im_end|>"
    assert template.stop_token_ids == (ids_of(tokenizer, "<|im_end|>"), tokenizer.eos_token_id)
    assert tokenizer.eos_token == "<|endoftext|>"


def test_hf_template_features_paddlenlp_rejects_render():
    """transformers' environment: loop controls, strftime_now, a tojson that keeps <>& and
    non-ASCII, the {% generation %} tag (PaddleNLP's own environment fails on the first two)."""
    template = compile_chat_template(
        "{% for m in messages %}{% generation %}{{ m.content | tojson }}{% endgeneration %}{% break %}{% endfor %}"
        "{{ strftime_now('%Y')[:0] }}"
    )
    assert template.render(messages=[{"content": "a <b> & café"}, {"content": "never"}]) == '"a <b> & café"'


# ---- SFT -----------------------------------------------------------------------------------------


def test_sft_labels_the_answer_and_its_end_of_turn_token(in_memory, tokenizer, chatml_dir):
    name = in_memory("chat-sft", [RawSample(input="what colour is the sky", answer="the sky is blue")])
    item = SupervisedDataset(name, tokenizer, prompt_template="chat")[0]
    prompt = reference(chatml_dir, chatml("what colour is the sky", open_answer=True))
    answer = reference(chatml_dir, "the sky is blue<|im_end|>")
    # Equal to tokenising the whole conversation (up to its final <|im_end|>).
    assert item["input_ids"] == reference(chatml_dir, chatml("what colour is the sky", "the sky is blue").rstrip("\n"))
    assert item["input_ids"] == prompt + answer
    assert item["labels"] == [IGNORE_INDEX] * len(prompt) + answer
    assert item["labels"][-1] == ids_of(tokenizer, "<|im_end|>")


def test_sft_multi_turn_dialogue_labels_every_answer(in_memory, tokenizer, chatml_dir):
    turns = ["hello", "hi there", "how are you", "very well"]
    name = in_memory("chat-dialogue", [RawSample(dialogue=turns)])
    item = SupervisedDataset(name, tokenizer, prompt_template="chat", system_prompt=SYSTEM)[0]
    assert item["input_ids"] == reference(chatml_dir, chatml(*turns, system=SYSTEM).rstrip("\n"))
    first_prompt = reference(chatml_dir, chatml("hello", system=SYSTEM, open_answer=True))
    first_answer = reference(chatml_dir, "hi there<|im_end|>")
    between = reference(chatml_dir, "\n<|im_start|>user\nhow are you<|im_end|>\n<|im_start|>assistant\n")
    second_answer = reference(chatml_dir, "very well<|im_end|>")
    assert item["input_ids"] == first_prompt + first_answer + between + second_answer
    masked = [IGNORE_INDEX]
    assert item["labels"] == masked * len(first_prompt) + first_answer + masked * len(between) + second_answer


def test_sft_dialogue_input_trains_only_the_final_answer(in_memory, tokenizer, chatml_dir):
    turns = ["hello", "hi there", "how are you"]
    name = in_memory("chat-dialogue-input", [RawSample(input=turns, answer="very well")])
    item = SupervisedDataset(name, tokenizer, prompt_template="chat")[0]
    prompt = reference(chatml_dir, chatml(*turns, open_answer=True))
    answer = reference(chatml_dir, "very well<|im_end|>")
    assert item["input_ids"] == prompt + answer
    assert item["labels"] == [IGNORE_INDEX] * len(prompt) + answer


def test_system_prompt_opens_the_conversation(in_memory, tokenizer, chatml_dir):
    name = in_memory("chat-system", [RawSample(input="hello", answer="hi")])
    item = SupervisedDataset(name, tokenizer, prompt_template="chat", system_prompt=SYSTEM)[0]
    system = reference(chatml_dir, f"<|im_start|>system\n{SYSTEM}<|im_end|>\n")
    assert item["input_ids"][: len(system)] == system
    assert set(item["labels"][: len(system)]) == {IGNORE_INDEX}


# ---- reward model ----------------------------------------------------------------------------------


def test_preference_pairs_end_with_the_end_of_turn_token(in_memory, tokenizer, chatml_dir):
    name = in_memory("chat-pairs", [RawSample(input="is the fish blue", answer="yes it is", other_answer="no", better=False)])
    item = PreferenceDataset(name, tokenizer, prompt_template="chat")[0]
    prompt = reference(chatml_dir, chatml("is the fish blue", open_answer=True))
    assert item["better_input_ids"] == prompt + reference(chatml_dir, "no<|im_end|>")
    assert item["worse_input_ids"] == prompt + reference(chatml_dir, "yes it is<|im_end|>")

    safety = in_memory(
        "chat-safety",
        [RawSample(input="is the fish blue", answer="yes", other_answer="no", safer=True, is_safe=True, is_other_safe=False)],
    )
    pair = SafetyPreferenceDataset(safety, tokenizer, prompt_template="chat")[0]
    im_end = ids_of(tokenizer, "<|im_end|>")
    assert pair["safer_input_ids"][-1] == pair["unsafer_input_ids"][-1] == im_end
    assert pair["safer_input_ids"] == prompt + reference(chatml_dir, "yes<|im_end|>")


# ---- PPO prompts -----------------------------------------------------------------------------------


def test_ppo_prompts_end_where_the_assistant_turn_opens(in_memory, chatml_dir):
    tokenizer = load_tokenizer(chatml_dir)  # left padding, for generation
    turns = ["hello", "hi there", "how are you"]
    name = in_memory("chat-prompts", [RawSample(input="tell me about the dog"), RawSample(input=turns)])
    dataset = PromptOnlyDataset(name, tokenizer, prompt_template="chat", system_prompt=SYSTEM)
    opening = reference(chatml_dir, "<|im_start|>assistant\n")
    for item, prompt in zip(dataset, ["tell me about the dog", turns]):
        prompt_turns = [prompt] if isinstance(prompt, str) else prompt
        expected = reference(chatml_dir, chatml(*prompt_turns, system=SYSTEM, open_answer=True))
        assert item["input_ids"] == expected and item["input_ids"][-len(opening) :] == opening
        assert item["turns"] == prompt_turns
    assert dataset.stop_token_ids == (ids_of(tokenizer, "<|im_end|>"), tokenizer.eos_token_id)
    # The same prompt text in SFT data gives the same ids in front of its answer.
    sft = in_memory("chat-prompt-sft", [RawSample(input="tell me about the dog", answer="it is good")])
    sft_item = SupervisedDataset(sft, tokenizer, prompt_template="chat", system_prompt=SYSTEM)[0]
    assert sft_item["input_ids"][: len(dataset[0]["input_ids"])] == dataset[0]["input_ids"]


def test_safe_rlhf_stays_the_default(in_memory, tiny_tokenizer):
    name = in_memory("plain", [RawSample(input="hello", answer="hi"), RawSample(dialogue=["a", "b", "c", "d"])])
    default = SupervisedDataset(name, tiny_tokenizer)
    explicit = SupervisedDataset(name, tiny_tokenizer, prompt_template="safe-rlhf")
    assert default.items == explicit.items and default.stop_token_ids == (tiny_tokenizer.eos_token_id,)
    assert default[0]["input_ids"][-1] == tiny_tokenizer.eos_token_id


# ---- generation stops at the end-of-turn token ----------------------------------------------------


def model_that_ends_turns_at_step(tokenizer, step, prompt_ids):
    """A tiny Qwen2 whose greedy answer to `prompt_ids` puts <|im_end|> at response position
    `step`: <|im_end|>'s output column becomes a copy of the column of the token greedy decoding
    picks there, and the tie goes to the lower id, <|im_end|>."""
    from ppo.tiny import build_tiny_causal_lm

    model = build_tiny_causal_lm("qwen2", seed=3, vocab_size=len(tokenizer))
    model.eval()
    ids = paddle.to_tensor([prompt_ids])
    mask = paddle.ones_like(ids)
    plain = RolloutEngine(model, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, backend="decoder")
    tokens = plain.generate(ids, mask, max_new_tokens=step + 1, do_sample=False).sequences[0, len(prompt_ids) :].tolist()
    im_end = ids_of(tokenizer, "<|im_end|>")
    assert im_end < tokens[step], "the tie-break needs <|im_end|> to have the lower id"
    weight = model.lm_head.weight  # [hidden, vocab]
    updated = weight.numpy().copy()
    updated[:, im_end] = updated[:, tokens[step]]
    weight.set_value(paddle.to_tensor(updated))
    return model


@pytest.mark.parametrize("backend", ["decoder", "generate"])
def test_generation_stops_at_the_end_of_turn_token(chatml_dir, backend):
    tokenizer = load_tokenizer(chatml_dir)
    template = build_template("chat", tokenizer)
    prompt = template.encode_prompt("tell me about the dog")
    model = model_that_ends_turns_at_step(tokenizer, 2, prompt)
    ids, mask = paddle.to_tensor([prompt]), paddle.ones([1, len(prompt)], dtype="int64")
    im_end = ids_of(tokenizer, "<|im_end|>")

    def run(stops):
        engine = RolloutEngine(model, eos_token_id=stops, pad_token_id=tokenizer.pad_token_id, backend=backend)
        return engine.generate(ids, mask, max_new_tokens=8, do_sample=False)

    stopped = run(template.stop_token_ids)
    response = stopped.sequences[0, len(prompt) :].tolist()
    first = response.index(im_end)
    assert first <= 2 and int(stopped.response_lengths[0]) == first + 1
    assert stopped.attention_mask[0, len(prompt) :].tolist() == [True] * (first + 1) + [False] * (len(response) - first - 1)
    # With EOS alone (the template's token ignored), the same model talks past <|im_end|>.
    unstopped = run((tokenizer.eos_token_id,))
    assert unstopped.sequences[0, len(prompt) + first].item() == im_end
    assert int(unstopped.response_lengths[0]) > first + 1


def test_stop_token_masks(chatml_dir):
    from ppo.infer_utils import response_lengths_from_tokens
    from ppo.models.ppo_model_utils import generated_tokens_mask

    tokens = np.array([[5, 7, 2, 9], [5, 0, 2, 9], [5, 6, 6, 6]])  # 2 = <|im_end|>, 0 = EOS
    assert response_lengths_from_tokens(tokens, (2, 0)).tolist() == [3, 2, 4]
    mask = generated_tokens_mask(paddle.to_tensor(tokens), [2, 0]).numpy()
    assert mask.sum(axis=1).tolist() == [3, 2, 4]
    with pytest.raises(ValueError, match="stop token ids"):
        RolloutEngine(object(), eos_token_id=[], pad_token_id=0)


# ---- PPO: the reward model with another vocabulary reads its own template --------------------------


def _write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")


def _save_chat_model(directory, tokenizer_dir, seed, score=False):
    from ppo.models import AutoModelForScore
    from ppo.tiny import save_tiny_causal_lm

    tokenizer = load_tokenizer(tokenizer_dir, padding_side="right")
    base = directory + "_base"
    save_tiny_causal_lm(base, architecture="qwen2", seed=seed, vocab_size=len(tokenizer))
    if score:
        AutoModelForScore.from_pretrained(base, score_type="reward").save_pretrained(directory)
    else:
        os.rename(base, directory)
    tokenizer.save_pretrained(directory)
    return directory


def test_ppo_rerenders_conversations_for_a_reward_model_with_another_tokenizer(chatml_dir, tmp_path):
    from ppo.arguments import PPODataArguments, PPOModelArguments, PPOTrainingArguments
    from ppo.run_ppo import build_trainer

    other_tokenizer = build_chatml_tokenizer(str(tmp_path / "other_tokenizer"), texts=["a different corpus"] * 20, vocab_size=300)
    actor = _save_chat_model(str(tmp_path / "actor"), chatml_dir, seed=1)
    critic = _save_chat_model(str(tmp_path / "critic"), chatml_dir, seed=2, score=True)
    reward = _save_chat_model(str(tmp_path / "reward"), other_tokenizer, seed=3, score=True)
    prompts = str(tmp_path / "prompts.jsonl")
    _write_jsonl(prompts, [
        {"prompt": text, "response_0": "yes", "response_1": "no", "is_response_0_safe": True,
         "is_response_1_safe": True, "better_response_id": 0, "safer_response_id": 0}
        for text in ("tell me about the dog", "why is the fish blue")
    ])  # fmt: skip
    trainer = build_trainer(
        PPOModelArguments(actor_model_name_or_path=actor, reward_model_name_or_path=reward, reward_critic_model_name_or_path=critic),
        PPODataArguments(train_datasets=f"PKU-SafeRLHF/train:1:{prompts}", max_length=128, prompt_template="chat", system_prompt=SYSTEM),
        PPOTrainingArguments(
            output_dir=str(tmp_path / "out"), max_steps=1, per_device_prompt_batch_size=2, per_device_train_batch_size=2,
            report_to=["none"], save_strategy="no", disable_tqdm=True,
        ),
    )  # fmt: skip
    actor_tokenizer = trainer.tokenizer
    im_end = ids_of(actor_tokenizer, "<|im_end|>")
    assert trainer.engine.stop_token_ids == (im_end, actor_tokenizer.eos_token_id)
    assert trainer.reward_scorer.model_scorer.score_tokenizer is not None

    item = trainer.train_dataset[0]
    prompt, turns = item["input_ids"], item["turns"]
    answer = actor_tokenizer("it is good", add_special_tokens=False)["input_ids"]
    text = chatml(*turns, "it is good", system=SYSTEM).rstrip("\n")
    for response, expected_text in ((answer + [im_end], text), (answer, text[: -len("<|im_end|>")])):
        sequence = paddle.to_tensor([[actor_tokenizer.pad_token_id] + prompt + response])
        mask = paddle.to_tensor([[False] + [True] * (len(prompt) + len(response))])
        score = trainer.reward_scores(sequence, mask, prompt_length=len(prompt) + 1)
        expected_ids = reference(other_tokenizer, expected_text)
        expected = trainer.reward_model(
            paddle.to_tensor([expected_ids]), attention_mask=paddle.ones([1, len(expected_ids)], dtype="int64")
        ).end_scores[:, 0]
        np.testing.assert_allclose(score.numpy(), expected.numpy(), rtol=1e-5)


# ---- bad input -----------------------------------------------------------------------------------


def test_unknown_template_lists_the_valid_ones(tokenizer):
    with pytest.raises(ChatTemplateError, match=r"unknown prompt_template 'chatml'; available: chat, safe-rlhf"):
        build_template("chatml", tokenizer)


def test_chat_without_a_template_names_the_key_and_directory(tmp_path):
    directory = build_chatml_tokenizer(str(tmp_path / "no_template"), chat_template=None)
    with pytest.raises(ChatTemplateError, match=r"prompt_template 'chat' needs the tokenizer's chat template, but .*no_template has none"):
        build_template("chat", load_tokenizer(directory))


@pytest.mark.parametrize(
    "template, message",
    [
        ("{% for m in messages %}{{ m.content }", r"does not compile"),
        ("{{ raise_exception('roles must alternate') }}", r"fails to render: roles must alternate"),
        ("{% for m in messages %}{{ m.content }}\n\n{% endfor %}", r"holds no special token"),
    ],
)
def test_broken_templates_name_the_key_and_file(tmp_path, template, message):
    directory = build_chatml_tokenizer(str(tmp_path / "broken"), chat_template=template)
    with pytest.raises(ChatTemplateError, match=rf"prompt_template 'chat'.*broken/tokenizer_config.json.*{message}"):
        build_template("chat", load_tokenizer(directory))


def test_system_prompt_needs_the_chat_template_and_arguments_check_early(tiny_tokenizer, tmp_path):
    from ppo.arguments import PPODataArguments
    from sft.run_sft import SftArguments

    with pytest.raises(ChatTemplateError, match="system_prompt needs prompt_template 'chat'"):
        build_template("safe-rlhf", tiny_tokenizer, system_prompt=SYSTEM)
    with pytest.raises(ChatTemplateError, match="unknown prompt_template 'Chat'"):
        PPODataArguments(train_datasets="x", prompt_template="Chat")
    with pytest.raises(ChatTemplateError, match="system_prompt needs prompt_template 'chat'"):
        SftArguments(output_dir=str(tmp_path), model_name_or_path="m", train_datasets="x", do_train=True, system_prompt=SYSTEM)
    arguments = SftArguments(output_dir=str(tmp_path), model_name_or_path="m", train_datasets="x", do_train=True, prompt_template="chat")
    assert (arguments.prompt_template, arguments.system_prompt) == ("chat", None)

