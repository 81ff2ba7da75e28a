"""Conversation templates: how a dialogue becomes token ids, the same way in every stage.

A template is registered by `NAME` (the `prompt_template` key of every stage):

- "safe-rlhf" (default): `BEGINNING OF CONVERSATION: USER: {input} ASSISTANT:`, EOS after every
  answer; the layout safe-rlhf and PaddleNLP's RLHF example train on.
- "chat": the tokenizer's own chat template (`chat_template` in tokenizer_config.json or
  `chat_template.jinja`), rendered with jinja2 the way transformers' `apply_chat_template` does;
  an answer ends with the template's end-of-turn token (ChatML `<|im_end|>`).

Every template encodes a conversation piece by piece — template text, answer, template text,
answer, ... — and concatenates the ids, so the boundary between a prompt and its answer is exact
(no merge across it): a PPO prompt is exactly the ids SFT puts before the answer, and generated
tokens continue it. For ChatML the pieces meet at special tokens and newlines, where byte-level
BPE never merges, so the ids equal tokenising the whole rendered text (tested).
"""

from __future__ import annotations

import abc
import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any, ClassVar, Optional, Sequence, Union

from ppo.data.base import PROMPT_ASSISTANT, PROMPT_BEGIN, PROMPT_USER, format_prompt
from ppo.tokenizer_io import chat_template_of, special_token_ids

DEFAULT_TEMPLATE = "safe-rlhf"
Turns = Union[str, Sequence[str]]  # one user input, or alternating user/assistant turns


class ChatTemplateError(ValueError):
    """A conversation template cannot be built or rendered for this tokenizer."""


@dataclass(frozen=True)
class EncodedTurns:
    """Ids of a conversation and, per id, which assistant answer it belongs to."""

    input_ids: list[int]  # [L]
    answer_index: list[int]  # [L]  k for tokens of the k-th answer (its end-of-turn token included), -1 elsewhere

    @property
    def is_answer(self) -> list[bool]:  # [L]
        return [index >= 0 for index in self.answer_index]


class PromptTemplate(abc.ABC):
    """Turns user/assistant turns into ids for one tokenizer. Subclasses set `NAME` and implement
    `encode_turns`, `prompt_text` and `stop_token_ids`.

    `system` (every method): a row's own system message, replacing `system_prompt` for that
    conversation; templates without a system turn (`HAS_SYSTEM_TURN` False) ignore it."""

    NAME: ClassVar[str]
    HAS_SYSTEM_TURN: ClassVar[bool] = False  # whether `system_prompt` means anything to it
    # Whether decoding its ids to text (special tokens dropped) and encoding that text with another
    # tokenizer keeps the conversation's layout.
    IS_PLAIN_TEXT: ClassVar[bool] = False
    _registry: ClassVar[dict[str, type["PromptTemplate"]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "NAME" in cls.__dict__:
            PromptTemplate._registry[cls.NAME] = cls

    def __init__(self, tokenizer: Any, system_prompt: Optional[str] = None) -> None:
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt

    @classmethod
    def names(cls) -> list[str]:
        return sorted(PromptTemplate._registry)

    @abc.abstractmethod
    def encode_turns(self, turns: Turns, system: Optional[str] = None) -> EncodedTurns:
        """Ids of a conversation: user, assistant, user, ... A conversation ending with a user turn
        is a prompt (ends where the answer starts); one ending with an answer ends with the
        answer's end-of-turn token."""

    @abc.abstractmethod
    def prompt_text(self, turns: Turns, system: Optional[str] = None) -> str:
        """The rendered text of a prompt (identical texts are identical prompts)."""

    @property
    @abc.abstractmethod
    def stop_token_ids(self) -> tuple[int, ...]:
        """Tokens that end a generated answer; the first is the one the template writes."""

    def encode_prompt(self, turns: Turns, system: Optional[str] = None) -> list[int]:
        return self.encode_turns(turns, system).input_ids

    def encode_text(self, text: str) -> list[int]:
        """Ids of plain text without special tokens (how every piece of a conversation is encoded)."""
        return self._encode_text(text)

    def _encode_text(self, text: str) -> list[int]:
        if not text:
            return []
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])


def check_template_arguments(prompt_template: str, system_prompt: Optional[str]) -> type[PromptTemplate]:
    """The template class for the `prompt_template` / `system_prompt` keys, or a clear error.
    Argument dataclasses call it so a typo fails before any model loads; whether the tokenizer's
    own chat template renders is checked when the datasets are built."""
    template_class = PromptTemplate._registry.get(prompt_template) if isinstance(prompt_template, str) else None
    if template_class is None:
        raise ChatTemplateError(f"unknown prompt_template {prompt_template!r}; available: {', '.join(PromptTemplate.names())}")
    if system_prompt is not None and (not isinstance(system_prompt, str) or not system_prompt.strip()):
        raise ChatTemplateError(f"system_prompt must be a non-empty string or null, got {system_prompt!r}")
    if system_prompt is not None and not template_class.HAS_SYSTEM_TURN:
        with_system = " or ".join(repr(name) for name, cls in sorted(PromptTemplate._registry.items()) if cls.HAS_SYSTEM_TURN)
        raise ChatTemplateError(
            f"system_prompt needs prompt_template {with_system}: the {prompt_template} template has no system turn"
        )
    return template_class


def build_template(name: str, tokenizer: Any, system_prompt: Optional[str] = None) -> PromptTemplate:
    """The template registered as `name` for `tokenizer`; an unknown name lists the valid ones."""
    return check_template_arguments(name, system_prompt)(tokenizer, system_prompt)


def as_turns(turns: Turns) -> list[str]:
    return [turns] if isinstance(turns, str) else list(turns)


# ---- safe-rlhf ------------------------------------------------------------------------------


def special_prefix_ids(tokenizer: Any) -> list[int]:
    """The ids the tokenizer puts before the text when adding special tokens (BOS for Llama, none for
    Qwen2). Suffix tokens some tokenizers append (an EOS) are deliberately not used: prompts must
    end with the assistant tag."""
    probe = "a"
    with_special = list(tokenizer(probe, add_special_tokens=True)["input_ids"])
    without = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
    for start in range(len(with_special) - len(without) + 1):
        if with_special[start : start + len(without)] == without:
            return with_special[:start]
    return []


class SafeRlhfTemplate(PromptTemplate):
    """[special prefix, e.g. BOS] "BEGINNING OF CONVERSATION: USER: {u1} ASSISTANT:" {a1} EOS
    "USER: {u2} ASSISTANT:" ... {answer} EOS. For tokenizers that parse the EOS string as the EOS
    token this equals tokenising `format_prompt(...)` text."""

    NAME = "safe-rlhf"
    IS_PLAIN_TEXT = True

    def __init__(self, tokenizer: Any, system_prompt: Optional[str] = None) -> None:
        super().__init__(tokenizer, system_prompt)
        eos = getattr(tokenizer, "eos_token_id", None)
        if eos is None:
            raise ChatTemplateError(f"{type(tokenizer).__name__} has no EOS token; every answer must end with one")
        self.eos_token_id = int(eos)
        self._prefix_ids = special_prefix_ids(tokenizer)

    @property
    def stop_token_ids(self) -> tuple[int, ...]:
        return (self.eos_token_id,)

    def encode_turns(self, turns: Turns, system: Optional[str] = None) -> EncodedTurns:
        ids: list[int] = list(self._prefix_ids)
        answer_index: list[int] = [-1] * len(ids)
        for position, turn in enumerate(as_turns(turns)):
            if position % 2 == 0:
                text = PROMPT_USER.format(input=turn) + " " + PROMPT_ASSISTANT
                if position == 0:
                    text = PROMPT_BEGIN + " " + text
                piece, index = self._encode_text(text), -1
            else:
                piece, index = self._encode_text(turn) + [self.eos_token_id], position // 2
            ids += piece
            answer_index += [index] * len(piece)
        return EncodedTurns(ids, answer_index)

    def prompt_text(self, turns: Turns, system: Optional[str] = None) -> str:
        return format_prompt(turns, self.tokenizer.eos_token)


# ---- the tokenizer's chat template ----------------------------------------------------------


def compile_chat_template(text: str):
    """A jinja template compiled like transformers' `apply_chat_template` does: sandboxed,
    `trim_blocks` + `lstrip_blocks`, loop controls, `raise_exception`, `strftime_now`, a `tojson`
    that keeps non-ASCII and `<>&` as they are, and the `{% generation %}` tag. (PaddleNLP's own
    environment lacks the last four and keeps trailing newlines, so it renders some HF templates
    differently or not at all.)"""
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` marks assistant text for transformers'
        assistant masks; we find answers by rendering prefixes, so it just renders its body."""

        tags = {"generation"}

        def parse(self, parser):
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, jinja2.ext.loopcontrols]
    )
    environment.filters["tojson"] = tojson
    environment.globals["raise_exception"] = raise_exception
    environment.globals["strftime_now"] = lambda format: datetime.now().strftime(format)
    return environment.from_string(text)


class ChatTemplate(PromptTemplate):
    """The tokenizer's jinja chat template. Answer k spans from where the template opens the
    assistant turn (`render(turns[:k], add_generation_prompt=True)`) to the end-of-turn token
    after it (`render(turns[:k + 1])`); text the template puts after that token (ChatML's `\\n`)
    belongs to the next prompt piece, and a conversation that ends with an answer ends with the
    token, as with EOS in safe-rlhf."""

    NAME = "chat"
    HAS_SYSTEM_TURN = True
    KEY = "prompt_template 'chat'"  # how errors name the setting
    _PROBE = ("Hi", "Hello")  # a user turn and its answer, rendered to find the end-of-turn token

    def __init__(self, tokenizer: Any, system_prompt: Optional[str] = None) -> None:
        import jinja2

        super().__init__(tokenizer, system_prompt)
        source = chat_template_of(tokenizer)
        if source is None:
            where = tokenizer.init_kwargs.get("name_or_path") or type(tokenizer).__name__
            raise ChatTemplateError(
                f"{self.KEY} needs the tokenizer's chat template, but {where} has none (no 'chat_template' in "
                "tokenizer_config.json and no chat_template.jinja); add one or use prompt_template 'safe-rlhf'"
            )
        self.origin = source.origin
        try:
            self._jinja = compile_chat_template(source.text())
        except jinja2.TemplateSyntaxError as error:
            raise ChatTemplateError(f"{self.KEY}: the chat template in {self.origin} does not compile: {error} (line {error.lineno})") from None
        except ValueError as error:
            raise ChatTemplateError(f"{self.KEY}: {error}") from None
        # The special tokens transformers passes to the template (`bos_token`, `eos_token`, ...).
        self._variables = {key: str(value) if not isinstance(value, list) else [str(v) for v in value]
                           for key, value in tokenizer.special_tokens_map.items()}
        self._special_ids = special_token_ids(tokenizer)
        self.end_of_turn_text = self._find_end_of_turn()
        self._stop_ids = self._stop_ids_for(self.end_of_turn_text)

    @property
    def stop_token_ids(self) -> tuple[int, ...]:
        return self._stop_ids

    def render(self, turns: Turns, add_generation_prompt: bool, system: Optional[str] = None) -> str:
        """The template's text of `turns` (after the row's `system` message, else `system_prompt`)."""
        import jinja2

        system = system if system is not None else self.system_prompt
        messages = [{"role": "system", "content": system}] if system is not None else []
        messages += [{"role": "user" if i % 2 == 0 else "assistant", "content": turn} for i, turn in enumerate(as_turns(turns))]
        try:
            return self._jinja.render(
                messages=messages, add_generation_prompt=add_generation_prompt, tools=None, documents=None, **self._variables
            )
        except jinja2.TemplateError as error:
            raise ChatTemplateError(f"{self.KEY}: the chat template in {self.origin} fails to render: {error}") from None

    def prompt_text(self, turns: Turns, system: Optional[str] = None) -> str:
        return self.render(turns, add_generation_prompt=True, system=system)

    def encode_turns(self, turns: Turns, system: Optional[str] = None) -> EncodedTurns:
        turns = as_turns(turns)
        pieces: list[tuple[str, int]] = []  # (text, answer index or -1)
        covered = ""  # the rendered text the pieces so far spell
        for position in range(1, len(turns), 2):
            opened = self._extend(covered, self.render(turns[:position], True, system), turns, position)
            closed = self.render(turns[: position + 1], False, system)
            end = closed.rfind(self.end_of_turn_text, len(opened))
            if not closed.startswith(opened) or end < 0:
                raise ChatTemplateError(
                    f"{self.KEY}: the chat template in {self.origin} does not write answer {position // 2} as "
                    f"<generation prompt> answer {self.end_of_turn_text!r}; cannot tell the answer from the prompt"
                )
            end += len(self.end_of_turn_text)
            pieces += [(opened[len(covered) :], -1), (closed[len(opened) : end], position // 2)]
            covered = closed[:end]
        if len(turns) % 2 == 1:  # a prompt: up to where the template opens the assistant turn
            opened = self._extend(covered, self.render(turns, True, system), turns, len(turns))
            pieces.append((opened[len(covered) :], -1))
        ids: list[int] = []
        answer_index: list[int] = []
        for text, index in pieces:
            piece = self._encode_text(text)
            ids += piece
            answer_index += [index] * len(piece)
        return EncodedTurns(ids, answer_index)

    def _extend(self, covered: str, rendered: str, turns: Sequence[str], position: int) -> str:
        if not rendered.startswith(covered):
            raise ChatTemplateError(
                f"{self.KEY}: the chat template in {self.origin} renders the first {position} turns differently once "
                f"later turns follow (turns {list(turns)!r:.200}); it cannot be split into prompt and answer pieces"
            )
        return rendered

    def _find_end_of_turn(self) -> str:
        """The special token the template writes right after an answer (ChatML `<|im_end|>`,
        Llama 3 `<|eot_id|>`, `eos_token` in many others)."""
        user, answer = self._PROBE
        opened = self.render([user], add_generation_prompt=True)
        closed = self.render([user, answer], add_generation_prompt=False)
        start = closed.find(answer, len(opened)) if closed.startswith(opened) else -1
        if start < 0:
            raise ChatTemplateError(
                f"{self.KEY}: the chat template in {self.origin} does not continue its generation prompt {opened!r} "
                f"with the answer (a conversation ({user!r}, {answer!r}) renders as {closed!r})"
            )
        after = closed[start + len(answer) :]
        for token_id in self._encode_text(after):
            if token_id in self._special_ids:
                return self.tokenizer.convert_ids_to_tokens(token_id)
        raise ChatTemplateError(
            f"{self.KEY}: the chat template in {self.origin} ends an answer with {after!r}, which holds no special "
            "token of the tokenizer; generation could not tell where an answer ends"
        )

    def _stop_ids_for(self, end_of_turn_text: str) -> tuple[int, ...]:
        """The end-of-turn token, then EOS (a chat model may also end with EOS, as HF generation
        configs list both)."""
        stops = [int(self.tokenizer.convert_tokens_to_ids(end_of_turn_text))]
        eos = getattr(self.tokenizer, "eos_token_id", None)
        if eos is not None and int(eos) not in stops:
            stops.append(int(eos))
        return tuple(stops)
