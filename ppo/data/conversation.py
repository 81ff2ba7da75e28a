"""OpenAI-style message lists (`[{"role": "user", "content": "..."}, ...]`) as RawSample turns.

A conversation may open with one `system` message, then alternates `user` and `assistant`
messages starting with `user`. `content` is a string, or a list of text parts
(`[{"type": "text", "text": "..."}]`, joined). Anything else is refused with the dataset, row,
field and message index, since a silently re-ordered or merged conversation would train the
model on something the data does not say.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

from ppo.data.base import RawSampleError

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class RowLocation:
    """A row of a dataset file, for error messages: `dataset 'preference' (/data/x.jsonl) row 3`."""

    dataset: str
    index: int
    source: Optional[str] = None

    def error(self, field: str, problem: str) -> RawSampleError:
        where = f"dataset {self.dataset!r}" + (f" ({self.source})" if self.source else "")
        return RawSampleError(f"{where} row {self.index}: field {field} {problem}")


@dataclass(frozen=True)
class Conversation:
    """System message (or None) and the user/assistant turns, alternating, starting with a user turn."""

    system: Optional[str]
    turns: list[str]

    @property
    def ends_with_answer(self) -> bool:
        return len(self.turns) % 2 == 0


def message_items(value: Any, where: RowLocation, field: str) -> list[tuple[str, str]]:
    """(role, content) of each message of a message list; errors name the message index."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise where.error(field, f"must be a list of {{'role', 'content'}} messages, got {type(value).__name__}")
    items = []
    for position, message in enumerate(value):
        label = f"{field} message {position}"
        if not isinstance(message, Mapping):
            raise where.error(label, f"must be a {{'role', 'content'}} object, got {type(message).__name__}")
        role = message.get("role")
        if role not in ROLES:
            raise where.error(label, f"has role {role!r}; roles must be one of {', '.join(ROLES)}")
        items.append((role, _content_text(message.get("content"), where, label)))
    if not items:
        raise where.error(field, "is an empty message list")
    return items


def _content_text(content: Any, where: RowLocation, label: str) -> str:
    if isinstance(content, str):
        text = content
    elif isinstance(content, Sequence) and not isinstance(content, bytes):
        texts = []
        for part in content:
            if not isinstance(part, Mapping) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise where.error(label, f"has a content part that is not text: {part!r:.80}; only text parts are supported")
            texts.append(part["text"])
        text = "".join(texts)
    else:
        raise where.error(label, f"must have a string content, got {type(content).__name__}")
    if not text.strip():
        raise where.error(label, "has empty content")
    return text


def conversation_of(items: Sequence[tuple[str, str]], where: RowLocation, field: str) -> Conversation:
    """A conversation from (role, content) items: optional leading system, then user/assistant alternating."""
    system = None
    if items and items[0][0] == "system":
        system, items = items[0][1], items[1:]
    turns = []
    for position, (role, content) in enumerate(items):
        index = position + (system is not None)
        expected = "user" if position % 2 == 0 else "assistant"
        if role != expected:
            problem = (
                "is a system message; a system message may only open the conversation"
                if role == "system"
                else f"has role {role!r} where {expected!r} was expected; messages must alternate user/assistant, "
                "starting with user"
            )
            raise where.error(f"{field} message {index}", problem)
        turns.append(content)
    if not turns:
        raise where.error(field, "holds no user message")
    return Conversation(system, turns)


def parse_messages(value: Any, where: RowLocation, field: str) -> Conversation:
    return conversation_of(message_items(value, where, field), where, field)


def prompt_of(value: Any, where: RowLocation, field: str) -> Conversation:
    """A prompt: a string (one user turn) or a message list ending with a user message."""
    if isinstance(value, str):
        if not value.strip():
            raise where.error(field, "is empty")
        return Conversation(None, [value])
    conversation = parse_messages(value, where, field)
    if conversation.ends_with_answer:
        raise where.error(field, "must end with a user message (it is the prompt an answer replies to)")
    return conversation


def answer_of(value: Any, prompt: Conversation, where: RowLocation, field: str) -> str:
    """An answer to `prompt`: a string, or a message list whose last message is the assistant's
    answer and whose earlier messages, if any, repeat the prompt (both conventions are common)."""
    if isinstance(value, str):
        if not value.strip():
            raise where.error(field, "is empty")
        return value
    items = message_items(value, where, field)
    role, answer = items[-1]
    if role != "assistant":
        raise where.error(f"{field} message {len(items) - 1}", f"has role {role!r}; the answer must be an assistant message")
    if len(items) > 1:
        context = conversation_of(items[:-1], where, field)
        if context != prompt:
            raise where.error(
                field,
                "repeats a conversation before its answer that differs from the prompt; give only the assistant "
                "message, or the prompt's messages followed by it",
            )
    return answer
