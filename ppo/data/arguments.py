"""The data keys every stage shares (SFT, RM and PPO): custom dataset modules, the conversation
template and the prompt-length policy. One mixin, so a key means the same in every config."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from ppo.data.modules import import_dataset_modules
from ppo.data.templates import DEFAULT_TEMPLATE, check_template_arguments
from ppo.data.truncation import DEFAULT_PROMPT_TRUNCATION, check_prompt_truncation


# kw_only: the mixin's defaulted fields may then sit before a base's required ones (PaddleNLP's
# `output_dir`, PPO's `train_datasets`) without breaking the dataclass field order.
@dataclass(kw_only=True)
class ConversationDataArguments:
    dataset_modules: Optional[List[str]] = field(
        default=None,
        metadata={"help": "Module names or .py files imported before the datasets are built, to register custom "
                          "RawDataset NAMEs (a list or a comma-separated string)."},
    )  # fmt: skip
    prompt_template: str = field(
        default=DEFAULT_TEMPLATE,
        metadata={"help": "Conversation layout: 'safe-rlhf' (BEGINNING OF CONVERSATION: USER: ... ASSISTANT:) or "
                          "'chat' (the tokenizer's own chat template). Use the same one in every stage; rollout "
                          "stops at its end-of-turn token."},
    )  # fmt: skip
    system_prompt: Optional[str] = field(
        default=None, metadata={"help": "System message that opens every conversation (prompt_template 'chat' only)."}
    )
    max_prompt_length: Optional[int] = field(
        default=None,
        metadata={"help": "Maximum prompt tokens; longer prompts are shortened or left out by prompt_truncation. "
                          "Default: max_length - 1 (PPO: max_length - max_new_tokens when that is set)."},
    )  # fmt: skip
    prompt_truncation: str = field(
        default=DEFAULT_PROMPT_TRUNCATION,
        metadata={"help": "Prompts over max_prompt_length: 'left_turns' (drop the oldest turns, then cut tokens from "
                          "the left), 'left_tokens' (cut tokens from the left) or 'drop' (skip the sample)."},
    )  # fmt: skip

    def check_conversation_data(self) -> None:
        """Import the dataset modules (first: nothing else should run if one fails), then check the
        template, max_length and the truncation policy. Each stage checks max_prompt_length
        against its own budget (`check_max_prompt_length`)."""
        import_dataset_modules(self.dataset_modules)
        check_template_arguments(self.prompt_template, self.system_prompt)
        if self.max_length < 2:
            raise ValueError(f"max_length must be at least 2 (one prompt and one response token), got {self.max_length}")
        check_prompt_truncation(self.prompt_truncation)
