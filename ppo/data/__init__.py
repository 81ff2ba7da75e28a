"""Datasets for every stage: raw samples and their registry, dataset specs, tokenised datasets and
their collators. Importing the package registers the built-in datasets."""

from ppo.data.base import (
    IGNORE_INDEX,
    PROMPT_ASSISTANT,
    PROMPT_BEGIN,
    PROMPT_INPUT,
    PROMPT_USER,
    RawDataset,
    RawSample,
    RawSampleError,
    format_prompt,
)
from ppo.data.loading import DATA_DIR_ENV
from ppo.data.modules import DatasetModuleError, import_dataset_modules
from ppo.data.specs import DatasetSpec, DatasetSpecs, parse_dataset_specs
from ppo.data.templates import ChatTemplateError, EncodedTurns, PromptTemplate, build_template
from ppo.data.truncation import PromptTruncation
from ppo.data.tokenized import DataWarning, TokenizedDataset, resolve_pad_token_id
from ppo.data.supervised import SupervisedBatch, SupervisedCollator, SupervisedDataset, SupervisedSample
from ppo.data.preference import PreferenceBatch, PreferenceCollator, PreferenceDataset, PreferenceSample
from ppo.data.safety_preference import (
    SafetyPreferenceBatch,
    SafetyPreferenceCollator,
    SafetyPreferenceDataset,
    SafetyPreferenceSample,
)
from ppo.data.prompt_only import PromptOnlyBatch, PromptOnlyCollator, PromptOnlyDataset, PromptOnlySample

# Built-in raw datasets register themselves on import.
from ppo.data import alpaca, generic, hh_rlhf, safe_rlhf  # noqa: E402,F401  isort: skip

__all__ = [
    "IGNORE_INDEX",
    "PROMPT_ASSISTANT",
    "PROMPT_BEGIN",
    "PROMPT_INPUT",
    "PROMPT_USER",
    "ChatTemplateError",
    "DATA_DIR_ENV",
    "DataWarning",
    "DatasetModuleError",
    "DatasetSpec",
    "DatasetSpecs",
    "EncodedTurns",
    "PreferenceBatch",
    "PreferenceCollator",
    "PreferenceDataset",
    "PreferenceSample",
    "PromptOnlyBatch",
    "PromptOnlyCollator",
    "PromptOnlyDataset",
    "PromptOnlySample",
    "PromptTemplate",
    "PromptTruncation",
    "RawDataset",
    "RawSample",
    "RawSampleError",
    "SafetyPreferenceBatch",
    "SafetyPreferenceCollator",
    "SafetyPreferenceDataset",
    "SafetyPreferenceSample",
    "SupervisedBatch",
    "SupervisedCollator",
    "SupervisedDataset",
    "SupervisedSample",
    "TokenizedDataset",
    "build_template",
    "format_prompt",
    "import_dataset_modules",
    "parse_dataset_specs",
    "resolve_pad_token_id",
]
