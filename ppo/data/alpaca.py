"""Stanford Alpaca instruction-following data (tatsu-lab/alpaca)."""

from __future__ import annotations

from typing import Optional

from ppo.data.base import RawDataset, RawSample
from ppo.data.loading import load_table

COLUMNS = ("instruction", "input", "output")


class AlpacaDataset(RawDataset):
    """Row mapping: input = instruction + " " + input (just instruction when input is empty),
    answer = output."""

    NAME = "alpaca"
    ALIASES = ("stanford-alpaca", "tatsu-lab/alpaca")
    HUB_NAME = "tatsu-lab/alpaca"
    SPLIT = "train"

    def __init__(self, path: Optional[str] = None) -> None:
        self.data = load_table(self.NAME, self.HUB_NAME, self.SPLIT, path, required_columns=COLUMNS)

    def __getitem__(self, index: int) -> RawSample:
        row = self.data[index]
        instruction, extra = row["instruction"], row["input"]
        has_extra = isinstance(extra, str) and extra.strip()
        return RawSample(input=f"{instruction} {extra}" if has_extra else instruction, answer=row["output"])

    def __len__(self) -> int:
        return len(self.data)
