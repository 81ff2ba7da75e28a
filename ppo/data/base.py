"""Raw samples, the dataset registry and the conversation template."""

PROMPT_BEGIN = "BEGINNING OF CONVERSATION:"
PROMPT_USER = "USER: {input}"
PROMPT_ASSISTANT = "ASSISTANT:"
PROMPT_INPUT = PROMPT_BEGIN + " " + PROMPT_USER + " " + PROMPT_ASSISTANT
IGNORE_INDEX = -100
