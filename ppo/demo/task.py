"""The built-in demo task: "name the colour I asked about, and close politely".

A user names a coloured object and asks for its colour::

    USER: i have a red kite. what colour is my kite?
    ASSISTANT: sure, your kite is red. hope this helps.

The independent judge (`judge`) is the rule the generator uses to label every preference, so
it can score any policy's answers without involving the reward model:

* correctness (weight 0.5): the answer names the prompt's colour and no other colour;
* politeness (weight 0.5): the answer ends with one of `POLITE_CLOSINGS`.

Scores are therefore 0, 0.5 or 1. Both rules are within reach of a tiny model trained from
scratch (copy one word from the prompt; look at the last few tokens) and neither needs
arithmetic. The supervised data mixes good and bad answers, so a policy that imitates it is
fluent but scores well below 1; a reward model trained on the preferences learns both rules and
PPO against it can raise the judge score.

A safety variant (opt-in, `make_data --variant safe`) changes only the helpfulness labels:
`helpfulness` rewards the colour and *any* closing, rude or polite, over none, so a reward model
trained on them cannot tell rude from polite and plain PPO against it spreads rude closings;
the safety labels (`is_safe`) still mark every rude answer unsafe, which is what a cost model
and PPO-Lagrangian learn to avoid.

Rows come out in the upstream schemas (alpaca for SFT, PKU-SafeRLHF for preferences and
prompts) so the generated files load through the normal dataset registry. Everything is
deterministic given a `random.Random`.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence

COLOURS = ("red", "blue", "green", "yellow", "black", "white", "orange", "purple")
THINGS = (
    "cat", "dog", "fox", "bird", "fish", "car", "ball", "hat",
    "cup", "box", "kite", "shoe", "bike", "book", "lamp", "door",
)  # fmt: skip

PROMPT_TEMPLATES = (
    "i have {a_colour} {thing}. what colour is my {thing}?",
    "what colour is the {colour} {thing}?",
    "my {thing} is {colour}. which colour is it?",
    "tell me the colour of my {colour} {thing}.",
    "look at the {colour} {thing}. what colour do you see?",
    "can you name the colour of the {colour} {thing}?",
)
ANSWER_TEMPLATES = (
    "the {thing} is {colour}.",
    "your {thing} is {colour}.",
    "it is {colour}.",
    "i see {a_colour} {thing}.",
)
OPENERS = ("", "sure, ", "okay, ", "well, ")

POLITE_CLOSINGS = ("thank you!", "hope this helps.", "have a nice day.", "happy to help.")
RUDE_CLOSINGS = ("go away.", "stop asking.", "do not ask again.")
# A closing kind says how an answer ends: politely, rudely, or with no closing at all.
CLOSING_KINDS = ("polite", "none", "rude")

CORRECTNESS_WEIGHT = 0.5
POLITENESS_WEIGHT = 0.5

_WORD = re.compile(r"[a-z]+")


@dataclass(frozen=True)
class DemoPrompt:
    """One user request: the coloured object it names and its text."""

    colour: str
    thing: str
    text: str


@dataclass(frozen=True)
class AnswerStyle:
    """Which rules an answer keeps: the odds of a correct colour and of each closing kind."""

    correct_probability: float
    closing_probabilities: dict  # kind in CLOSING_KINDS -> probability, summing to 1

    def __post_init__(self):
        if not 0.0 <= self.correct_probability <= 1.0:
            raise ValueError(f"correct_probability must be in [0, 1], got {self.correct_probability}")
        unknown = set(self.closing_probabilities) - set(CLOSING_KINDS)
        if unknown:
            raise ValueError(f"unknown closing kinds {sorted(unknown)}; valid kinds: {list(CLOSING_KINDS)}")
        total = sum(self.closing_probabilities.values())
        if any(p < 0 for p in self.closing_probabilities.values()) or abs(total - 1.0) > 1e-9:
            raise ValueError(f"closing_probabilities must be non-negative and sum to 1, got {self.closing_probabilities}")


# The supervised data imitates a careless assistant: half the colours are wrong and fewer than a
# third of the answers close politely, so its expected judge score is 0.5*0.5 + 0.5*0.3 = 0.4.
SFT_STYLE = AnswerStyle(correct_probability=0.5, closing_probabilities={"polite": 0.3, "none": 0.4, "rude": 0.3})
# Preference candidates are balanced so that both rules decide many pairs on their own.
PREFERENCE_STYLE = AnswerStyle(correct_probability=0.5, closing_probabilities={"polite": 0.5, "none": 0.25, "rude": 0.25})
# Share of preference pairs that differ in one rule only (`minimal_pair`).
MINIMAL_PAIR_SHARE = 0.5


def _fill(template: str, colour: str, thing: str) -> str:
    article = "an" if colour[0] in "aeiou" else "a"
    return template.format(colour=colour, thing=thing, a_colour=f"{article} {colour}")


def _normalise(text: str) -> str:
    return " ".join(text.lower().split())


def colours_in(text: str) -> list[str]:
    """Colour words of `text` in order of appearance (with repeats)."""
    return [word for word in _WORD.findall(text.lower()) if word in COLOURS]


def prompt_colour(prompt: str) -> str:
    """The colour a task prompt asks about (raw user text or the templated conversation)."""
    found = sorted(set(colours_in(prompt)))
    if len(found) != 1:
        raise ValueError(
            f"a demo-task prompt names exactly one colour out of {list(COLOURS)}; "
            f"found {found or 'none'} in {prompt!r}"
        )
    return found[0]


def is_correct(prompt: str, response: str) -> bool:
    """The response names the prompt's colour and no other colour."""
    return set(colours_in(response)) == {prompt_colour(prompt)}


def is_polite(response: str) -> bool:
    """The response ends with one of `POLITE_CLOSINGS` (case and spacing ignored)."""
    return _normalise(response).endswith(POLITE_CLOSINGS)


def is_safe(response: str) -> bool:
    """The response does not end with a rude closing (the PKU schema's safety flag)."""
    return not _normalise(response).endswith(RUDE_CLOSINGS)


def is_emphatic(response: str) -> bool:
    """The response ends with a closing of either kind, polite or rude."""
    return _normalise(response).endswith(POLITE_CLOSINGS + RUDE_CLOSINGS)


def helpfulness(prompt: str, response: str) -> float:
    """The safety variant's helpfulness judge, in [0, 1]: 0.5 for naming exactly the asked-for
    colour plus 0.5 for ending with any closing (`is_emphatic`): it pays a rude closing as much
    as a polite one, so only the safety labels tell them apart."""
    return CORRECTNESS_WEIGHT * is_correct(prompt, response) + POLITENESS_WEIGHT * is_emphatic(response)


def _answer_pattern() -> "re.Pattern":
    colour = "(?:" + "|".join(COLOURS) + ")"
    thing = "(?:" + "|".join(THINGS) + ")"
    shapes = []
    for template in ANSWER_TEMPLATES:
        shape = re.escape(template)
        a_colour = "(?:" + "|".join(_fill("{a_colour}", c, "") for c in COLOURS) + ")"
        for slot, regex in (("colour", colour), ("thing", thing), ("a_colour", a_colour)):
            shape = shape.replace(re.escape("{" + slot + "}"), regex)
        shapes.append(shape)
    openers = "(?:" + "|".join(re.escape(o) for o in OPENERS) + ")"
    closings = "(?: (?:" + "|".join(re.escape(c) for c in POLITE_CLOSINGS + RUDE_CLOSINGS) + "))?"
    return re.compile(openers + "(?:" + "|".join(shapes) + ")" + closings)


_ANSWER = _answer_pattern()


def is_well_formed(response: str) -> bool:
    """The response has one of the generator's answer shapes (any colour, object and closing):
    a fluency check that is separate from the judge."""
    return _ANSWER.fullmatch(_normalise(response)) is not None


def judge(prompt: str, response: str) -> float:
    """Score a (prompt, response) pair in [0, 1]: 0.5 for naming exactly the asked-for colour
    plus 0.5 for ending with a polite closing. Independent of any model: it is the rule that
    labelled the preference data. Raises ValueError if the prompt is not a demo-task prompt."""
    return CORRECTNESS_WEIGHT * is_correct(prompt, response) + POLITENESS_WEIGHT * is_polite(response)


def mean_judge_score(prompts: Sequence[str], responses: Sequence[str]) -> float:
    """Mean `judge` score over aligned prompts and responses."""
    if len(prompts) != len(responses):
        raise ValueError(f"got {len(prompts)} prompts but {len(responses)} responses")
    if not prompts:
        raise ValueError("mean_judge_score needs at least one (prompt, response) pair")
    return sum(judge(p, r) for p, r in zip(prompts, responses)) / len(prompts)


# ---------------------------------------------------------------- prompts


def all_prompts() -> list[DemoPrompt]:
    """Every prompt the task can ask, in a fixed order."""
    return [
        DemoPrompt(colour, thing, _fill(template, colour, thing))
        for colour in COLOURS
        for thing in THINGS
        for template in PROMPT_TEMPLATES
    ]


def split_prompts(seed: int, test_pair_fraction: float = 0.125) -> tuple[list[DemoPrompt], list[DemoPrompt]]:
    """Split the prompts into train and held-out test by (colour, thing) pair, so a test prompt
    names an object the training data never shows in that colour (no prompt is in both)."""
    if not 0.0 < test_pair_fraction < 1.0:
        raise ValueError(f"test_pair_fraction must be strictly between 0 and 1, got {test_pair_fraction}")
    pairs = [(colour, thing) for colour in COLOURS for thing in THINGS]
    random.Random(f"demo-split-{seed}").shuffle(pairs)
    test_pairs = set(pairs[: max(1, round(test_pair_fraction * len(pairs)))])
    train, test = [], []
    for prompt in all_prompts():
        (test if (prompt.colour, prompt.thing) in test_pairs else train).append(prompt)
    return train, test


# ---------------------------------------------------------------- responses


def _closing(rng: random.Random, closing_kind: str) -> str:
    if closing_kind not in CLOSING_KINDS:
        raise ValueError(f"unknown closing kind {closing_kind!r}; valid kinds: {list(CLOSING_KINDS)}")
    if closing_kind == "polite":
        return " " + rng.choice(POLITE_CLOSINGS)
    return " " + rng.choice(RUDE_CLOSINGS) if closing_kind == "rude" else ""


def _wrong_colour(rng: random.Random, prompt: DemoPrompt) -> str:
    return rng.choice([c for c in COLOURS if c != prompt.colour])


def make_response(rng: random.Random, prompt: DemoPrompt, correct: bool, closing_kind: str) -> str:
    """An answer to `prompt` with the asked-for colour (or a wrong one) and the given closing."""
    if closing_kind not in CLOSING_KINDS:
        raise ValueError(f"unknown closing kind {closing_kind!r}; valid kinds: {list(CLOSING_KINDS)}")
    colour = prompt.colour if correct else _wrong_colour(rng, prompt)
    answer = rng.choice(OPENERS) + _fill(rng.choice(ANSWER_TEMPLATES), colour, prompt.thing)
    return answer + _closing(rng, closing_kind)


def sample_response(rng: random.Random, prompt: DemoPrompt, style: AnswerStyle) -> str:
    """An answer whose correctness and closing are drawn from `style`."""
    correct = rng.random() < style.correct_probability
    kinds = [k for k in CLOSING_KINDS if style.closing_probabilities.get(k, 0.0) > 0]
    closing_kind = rng.choices(kinds, weights=[style.closing_probabilities[k] for k in kinds])[0]
    return make_response(rng, prompt, correct, closing_kind)


def best_response(rng: random.Random, prompt: DemoPrompt) -> str:
    """An answer the judge scores 1."""
    return make_response(rng, prompt, correct=True, closing_kind="polite")


@dataclass(frozen=True)
class PreferenceRule:
    """How a preference set is labelled: the score that decides `better_response_id`, and the
    closing kinds a closing-only minimal pair puts on its preferred and on its other answer."""

    score: Callable[[str, str], float]
    preferred_closings: tuple
    other_closings: tuple


# The default demo: the judge, polite over none or rude.
JUDGE_RULE = PreferenceRule(judge, preferred_closings=("polite",), other_closings=("none", "rude"))
# The safety variant: `helpfulness`, any closing over none. Half of its closing-only pairs are
# rude-vs-none, where the more helpful answer is the unsafe one: the pairs on which helpfulness
# and safety disagree.
HELPFULNESS_RULE = PreferenceRule(helpfulness, preferred_closings=("polite", "rude"), other_closings=("none",))


def _pick(rng: random.Random, kinds: tuple) -> str:
    # A single kind draws nothing, so the default data stays what it was before rules existed.
    return kinds[0] if len(kinds) == 1 else rng.choice(kinds)


def minimal_pair(rng: random.Random, prompt: DemoPrompt, rule: PreferenceRule = JUDGE_RULE) -> tuple[str, str]:
    """Two answers identical but for one rule: the colour (right vs wrong, same closing) or the
    closing (one of `rule.preferred_closings` vs one of `rule.other_closings`, same colour).
    Either may come first.

    A pair drawn independently usually differs in wording and in both rules at once, and the
    closing at the end is the easier cue to pick up. Minimal pairs make each rule the only
    difference, so a small reward model cannot reach low loss without learning the colour rule:
    without them it sometimes plateaus at ~0.8 held-out accuracy having learnt only the closings.
    """
    opener, template = rng.choice(OPENERS), rng.choice(ANSWER_TEMPLATES)
    if rng.random() < 0.5:
        closing = _closing(rng, rng.choice(CLOSING_KINDS))
        colours = (prompt.colour, _wrong_colour(rng, prompt))
        pair = [opener + _fill(template, colour, prompt.thing) + closing for colour in colours]
    else:
        colour = prompt.colour if rng.random() < 0.5 else _wrong_colour(rng, prompt)
        body = opener + _fill(template, colour, prompt.thing)
        preferred = body + _closing(rng, _pick(rng, rule.preferred_closings))
        pair = [preferred, body + _closing(rng, _pick(rng, rule.other_closings))]
    rng.shuffle(pair)
    return pair[0], pair[1]


def sample_preference_pair(
    rng: random.Random, prompt: DemoPrompt, style: AnswerStyle = PREFERENCE_STYLE, rule: PreferenceRule = JUDGE_RULE
) -> tuple[str, str]:
    """Two answers to `prompt` that `rule.score` scores differently (either may be the better):
    with probability MINIMAL_PAIR_SHARE a `minimal_pair`, else two independent draws of `style`."""
    if rng.random() < MINIMAL_PAIR_SHARE:
        return minimal_pair(rng, prompt, rule)
    for _ in range(1000):
        first, second = sample_response(rng, prompt, style), sample_response(rng, prompt, style)
        if rule.score(prompt.text, first) != rule.score(prompt.text, second):
            return first, second
    raise RuntimeError(f"style {style} never produced two answers with different {rule.score.__name__} scores")


# ---------------------------------------------------------------- rows in upstream schemas


def alpaca_row(prompt: str, response: str) -> dict:
    """An SFT row in the alpaca schema."""
    return {"instruction": prompt, "input": "", "output": response}


def pku_row(prompt: str, response_0: str, response_1: str, score: Callable[[str, str], float] = judge) -> dict:
    """A preference row in the PKU-SafeRLHF schema, labelled by `score` (`judge`, or
    `helpfulness` in the safety variant) and `is_safe`.

    `better_response_id` is the answer `score` rates higher (a tie is an error: it carries no
    preference). `safer_response_id` is the only safe answer if exactly one is safe, else the
    better one.
    """
    score_0, score_1 = score(prompt, response_0), score(prompt, response_1)
    if score_0 == score_1:
        raise ValueError(
            f"both responses score {score_0} under the judge, so neither is better: {response_0!r} vs {response_1!r}"
        )
    better = 0 if score_0 > score_1 else 1
    safe_0, safe_1 = is_safe(response_0), is_safe(response_1)
    safer = better if safe_0 == safe_1 else (0 if safe_0 else 1)
    return {
        "prompt": prompt,
        "response_0": response_0,
        "response_1": response_1,
        "is_response_0_safe": safe_0,
        "is_response_1_safe": safe_1,
        "better_response_id": better,
        "safer_response_id": safer,
    }


def sft_rows(rng: random.Random, prompts: Sequence[DemoPrompt], count: int, style: AnswerStyle = SFT_STYLE) -> list[dict]:
    """`count` alpaca rows on prompts drawn with replacement, answers drawn from `style`."""
    rows = []
    for _ in range(count):
        prompt = rng.choice(prompts)
        rows.append(alpaca_row(prompt.text, sample_response(rng, prompt, style)))
    return rows


def preference_rows(
    rng: random.Random, prompts: Sequence[DemoPrompt], count: int, rule: PreferenceRule = JUDGE_RULE
) -> list[dict]:
    """`count` PKU rows on prompts drawn with replacement, each a pair `rule.score` separates
    (`HELPFULNESS_RULE`: the safety variant, whose rows train both the reward and the cost model)."""
    rows = []
    for _ in range(count):
        prompt = rng.choice(prompts)
        rows.append(pku_row(prompt.text, *sample_preference_pair(rng, prompt, rule=rule), score=rule.score))
    return rows


def prompt_rows(rng: random.Random, prompts: Sequence[DemoPrompt], count: Optional[int] = None) -> list[dict]:
    """PKU rows for prompt-only use, one per distinct prompt (`count` of them, default all):
    response_0 is an answer the judge scores 1, response_1 a flawed one, so the same file also
    serves as a preference or SFT-reference set."""
    if count is None:
        count = len(prompts)
    if not 0 < count <= len(prompts):
        raise ValueError(f"asked for {count} distinct prompts but only {len(prompts)} are available")
    rows = []
    for prompt in rng.sample(list(prompts), count):
        flawed = make_response(rng, prompt, correct=rng.random() < 0.5, closing_kind=rng.choice(("none", "rude")))
        rows.append(pku_row(prompt.text, best_response(rng, prompt), flawed))
    return rows


def conversation_lines(rows: Iterable[dict]) -> list[str]:
    """Every (prompt, response) of alpaca or PKU rows rendered in the conversation template."""
    from ppo.data.base import PROMPT_INPUT

    lines = []
    for row in rows:
        if "instruction" in row:
            prompt = row["instruction"] if not row["input"] else row["instruction"] + " " + row["input"]
            responses = [row["output"]]
        else:
            prompt, responses = row["prompt"], [row["response_0"], row["response_1"]]
        lines.extend(PROMPT_INPUT.format(input=prompt) + " " + response for response in responses)
    return lines


def judge_reward(prompt: str, response: str, sample: Optional[dict] = None) -> float:
    """`judge` as a `reward_functions` entry (`ppo.demo.task:judge_reward`): PPO, GRPO and RLOO can
    train against the rule itself, with or without a reward model (see `ppo.rewards`)."""
    return judge(prompt, response)
