"""PKU-SafeRLHF preference datasets (helpfulness and harmlessness labels) from PKU-Alignment."""

from __future__ import annotations

from typing import Any, ClassVar, Optional

from ppo.data.base import RawDataset, RawSample, RawSampleError
from ppo.data.loading import load_table

COLUMNS = (
    "prompt",
    "response_0",
    "response_1",
    "is_response_0_safe",
    "is_response_1_safe",
    "better_response_id",
    "safer_response_id",
)


class SafeRLHFDataset(RawDataset):
    """One split of a PKU-SafeRLHF hub dataset (abstract: subclasses set NAME, HUB_NAME, SPLIT).

    Row mapping: input = prompt, answer = response_0, other_answer = response_1,
    better = (better_response_id == 0), safer = (safer_response_id == 0),
    is_safe = is_response_0_safe, is_other_safe = is_response_1_safe.
    """

    HUB_NAME: ClassVar[str]
    SPLIT: ClassVar[str]

    def __init__(self, path: Optional[str] = None) -> None:
        self.data = load_table(self.NAME, self.HUB_NAME, self.SPLIT, path, required_columns=COLUMNS)

    def __getitem__(self, index: int) -> RawSample:
        row = self.data[index]
        return RawSample(
            input=row["prompt"],
            answer=row["response_0"],
            other_answer=row["response_1"],
            better=self._response_id(row, "better_response_id", index) == 0,
            safer=self._response_id(row, "safer_response_id", index) == 0,
            is_safe=row["is_response_0_safe"],
            is_other_safe=row["is_response_1_safe"],
        )

    def __len__(self) -> int:
        return len(self.data)

    def _response_id(self, row: dict[str, Any], column: str, index: int) -> int:
        value = row[column]
        if isinstance(value, bool) or value not in (0, 1):
            raise RawSampleError(f"dataset {self.NAME!r} row {index}: column {column!r} must be 0 or 1, got {value!r}")
        return int(value)


class SafeRLHFTrainDataset(SafeRLHFDataset):
    NAME = "PKU-SafeRLHF/train"
    ALIASES = ("PKU-Alignment/PKU-SafeRLHF/train",)
    HUB_NAME = "PKU-Alignment/PKU-SafeRLHF"
    SPLIT = "train"


class SafeRLHFTestDataset(SafeRLHFDataset):
    NAME = "PKU-SafeRLHF/test"
    ALIASES = ("PKU-Alignment/PKU-SafeRLHF/test",)
    HUB_NAME = "PKU-Alignment/PKU-SafeRLHF"
    SPLIT = "test"


class SafeRLHF30KTrainDataset(SafeRLHFDataset):
    NAME = "PKU-SafeRLHF-30K/train"
    ALIASES = ("PKU-Alignment/PKU-SafeRLHF-30K/train",)
    HUB_NAME = "PKU-Alignment/PKU-SafeRLHF-30K"
    SPLIT = "train"


class SafeRLHF30KTestDataset(SafeRLHFDataset):
    NAME = "PKU-SafeRLHF-30K/test"
    ALIASES = ("PKU-Alignment/PKU-SafeRLHF-30K/test",)
    HUB_NAME = "PKU-Alignment/PKU-SafeRLHF-30K"
    SPLIT = "test"


class SafeRLHF10KTrainDataset(SafeRLHFDataset):
    NAME = "PKU-SafeRLHF-10K/train"
    ALIASES = ("PKU-Alignment/PKU-SafeRLHF-10K/train",)
    HUB_NAME = "PKU-Alignment/PKU-SafeRLHF-10K"
    SPLIT = "train"
