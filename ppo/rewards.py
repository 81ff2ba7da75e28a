"""Rule-based reward functions (`reward_functions`): user code that scores a response.

Each entry is ``module:function``; the module part is imported like a `dataset_modules` entry
(a module name on `sys.path`, or a path to a ``.py`` file), then ``function`` is looked up in it.
A reward function is called once per response as

    function(prompt: str, response: str, sample: RawSample) -> float

- ``prompt``: the user turn the response answers (as shortened to fit the prompt budget);
- ``response``: the decoded response, without its end-of-turn/EOS token;
- ``sample``: the prompt's raw sample (``sample["input"]`` holds the whole conversation).

The rollout's reward is ``reward_model_weight × RM score + Σ_i reward_function_weights[i] × f_i``
(see `combine_scores`); `clip_range_score` then clips that total. A NaN/inf from a function stops
the run with an error naming the function and the response.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

from ppo.data.modules import DatasetModuleError, import_dataset_modules

KEY = "reward_functions"


class RewardFunctionError(ValueError):
    """A `reward_functions` entry that cannot be loaded, or a score that is not a finite number."""


@dataclass(frozen=True)
class RewardFunction:
    entry: str  # "module:function" as configured
    function: Callable[[str, str, dict], float]
    weight: float

    @property
    def name(self) -> str:
        """The function's name: its metrics are logged as train/reward_fn/<name>."""
        return self.entry.rsplit(":", 1)[1]


def load_reward_functions(entries: Optional[Sequence[str]], weights: Optional[Sequence[float]] = None) -> List[RewardFunction]:
    """Import every entry; `weights` default to 1.0 each and must match the entries one to one."""
    entries = list(entries or [])
    weights = [1.0] * len(entries) if weights is None else [float(weight) for weight in weights]
    if len(weights) != len(entries):
        raise RewardFunctionError(
            f"reward_function_weights has {len(weights)} values for {len(entries)} reward_functions; give one weight "
            "per function (or none: 1.0 each)"
        )
    functions = []
    for entry, weight in zip(entries, weights):
        module_name, separator, function_name = str(entry).rpartition(":")
        if not separator or not module_name or not function_name.isidentifier():
            raise RewardFunctionError(f"{KEY} entry {entry!r} must read 'module:function' (or 'path/to/file.py:function')")
        try:
            (module,) = import_dataset_modules([module_name])
        except DatasetModuleError as error:
            raise RewardFunctionError(f"{KEY} entry {entry!r}: {error}") from error
        function = getattr(module, function_name, None)
        if not callable(function):
            raise RewardFunctionError(
                f"{KEY} entry {entry!r}: module {module.__name__!r} has no callable {function_name!r}"
            )
        functions.append(RewardFunction(entry, function, weight))
    names = [function.name for function in functions]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise RewardFunctionError(f"{KEY} lists functions named {duplicates} more than once; their metrics would clash")
    return functions


def score_responses(
    functions: Sequence[RewardFunction], prompts: Sequence[str], responses: Sequence[str], samples: Sequence[dict]
) -> Dict[str, List[float]]:
    """name -> one float per response, in order (NaN/inf passed through, see the trainer)."""
    scores: Dict[str, List[float]] = {}
    for reward_function in functions:
        values = []
        for prompt, response, sample in zip(prompts, responses, samples):
            value = reward_function.function(prompt, response, sample)
            try:
                value = float(value)
            except (TypeError, ValueError):
                raise RewardFunctionError(
                    f"reward function {reward_function.entry!r} returned {value!r}, not a number, for response {response!r}"
                ) from None
            # NaN/inf is kept: the trainer leaves such responses out of the update and counts them
            # (train/nonfinite_rewards) instead of stopping the run.
            values.append(value)
        scores[reward_function.name] = values
    return scores


def combine_scores(
    functions: Sequence[RewardFunction],
    function_scores: Dict[str, List[float]],
    model_scores: Optional[Sequence[float]],
    model_weight: float,
) -> List[float]:
    """reward_model_weight × RM score (when there is a reward model) + Σ weight_i × f_i, per response."""
    count = len(model_scores) if model_scores is not None else len(next(iter(function_scores.values())))
    totals = [model_weight * float(score) for score in model_scores] if model_scores is not None else [0.0] * count
    for reward_function in functions:
        for row, value in enumerate(function_scores[reward_function.name]):
            totals[row] += reward_function.weight * value
    return totals
