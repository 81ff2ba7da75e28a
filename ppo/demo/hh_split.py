"""Split an HH-RLHF transcript file into a training file and a held-out file, by conversation.

    python -m ppo.demo.hh_split SOURCE.jsonl.gz OUT_DIR --heldout-rows 400 [--seed 0]

Both outputs keep the source's rows verbatim (`{"chosen": ..., "rejected": ...}` per line, gzip),
so the `hh-rlhf` reader parses them as it parses the source. Rows are grouped by their first
human turn (case and spacing ignored) before the split: HH-RLHF repeats opening questions in
different rows, and a held-out conversation whose opening was trained on would not be held out.
Groups are shuffled with `seed` and dealt to the held-out side until it has `heldout_rows` rows;
every other group goes to training. The same source and seed always give the same two files.

Training rows keep the source order. Held-out rows are written shortest first: evaluation reads
its rows in file order (a seeded subset, `hh-rlhf:#N:...`, keeps that order too), so each batch
then holds pairs of similar length and pads little — a third less compute on a CPU than batches
of random lengths. Which rows are held out does not depend on it.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np

TRAIN_FILE = "train.jsonl.gz"
HELDOUT_FILE = "heldout.jsonl.gz"
_FIRST_ASSISTANT = "\n\nAssistant:"
_HUMAN = "\n\nHuman:"


@dataclass(frozen=True)
class SplitResult:
    """What `split_file` wrote."""

    train_path: str
    heldout_path: str
    train_rows: int
    heldout_rows: int
    groups: int  # distinct first human turns in the source
    seed: int


def opening_key(chosen: str, where: str) -> str:
    """The first human turn of a transcript, lower-cased with spacing normalised."""
    if not isinstance(chosen, str) or not chosen.startswith(_HUMAN):
        raise ValueError(f"{where}: field 'chosen' is not an HH-RLHF transcript (must start with '\\n\\nHuman:')")
    first_turn = chosen[len(_HUMAN) :].split(_FIRST_ASSISTANT, 1)[0]
    return " ".join(first_turn.split()).lower()


def read_lines(path: str) -> List[str]:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as handle:
        return [line.rstrip("\n") for line in handle if line.strip()]


def write_lines(path: str, lines: Sequence[str]) -> None:
    # Written under a temporary name and renamed: a crash never leaves a truncated split behind.
    # mtime=0 makes the gzip bytes depend on the rows only, so a rerun writes identical files.
    with open(path + ".tmp", "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as handle:
        handle.write("".join(line + "\n" for line in lines).encode("utf-8"))
    os.replace(path + ".tmp", path)


def group_rows(lines: Sequence[str], source: str = "source") -> Dict[str, List[int]]:
    """Row indices by opening (first human turn), in order of first appearance."""
    groups: Dict[str, List[int]] = {}
    for index, line in enumerate(lines):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{source} line {index + 1} is not JSON: {error.msg}") from None
        chosen = row.get("chosen") if isinstance(row, dict) else None
        groups.setdefault(opening_key(chosen, f"{source} row {index}"), []).append(index)
    return groups


def split_rows(groups: Dict[str, List[int]], heldout_rows: int, seed: int) -> tuple[List[int], List[int]]:
    """(train row indices, held-out row indices), each in source order; see the module doc."""
    total = sum(len(rows) for rows in groups.values())
    if not 0 < heldout_rows < total:
        raise ValueError(f"heldout_rows must be between 1 and {total - 1} (there are {total} rows), got {heldout_rows}")
    keys = list(groups)  # first-appearance order: deterministic before the seeded shuffle
    heldout: List[int] = []
    for position in np.random.default_rng(seed).permutation(len(keys)):
        if len(heldout) >= heldout_rows:
            break
        heldout.extend(groups[keys[position]])
    if len(heldout) >= total:
        raise ValueError(f"heldout_rows={heldout_rows} leaves no conversation for training")
    taken = set(heldout)
    return [i for i in range(total) if i not in taken], sorted(heldout)


def by_length(lines: Sequence[str], indices: Sequence[int]) -> List[int]:
    """`indices` ordered by the length of the longer transcript of each row (stable)."""
    def length(index):
        row = json.loads(lines[index])
        return max(len(row.get("chosen") or ""), len(row.get("rejected") or ""))

    return sorted(indices, key=length)


def split_file(source: str, out_dir: str, heldout_rows: int, seed: int = 0) -> SplitResult:
    lines = read_lines(source)
    groups = group_rows(lines, source)
    train, heldout = split_rows(groups, heldout_rows, seed)
    os.makedirs(out_dir, exist_ok=True)
    result = SplitResult(
        train_path=os.path.join(out_dir, TRAIN_FILE),
        heldout_path=os.path.join(out_dir, HELDOUT_FILE),
        train_rows=len(train),
        heldout_rows=len(heldout),
        groups=len(groups),
        seed=seed,
    )
    write_lines(result.train_path, [lines[i] for i in train])
    write_lines(result.heldout_path, [lines[i] for i in by_length(lines, heldout)])
    return result


def main(argv: Optional[Sequence[str]] = None) -> SplitResult:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="HH-RLHF jsonl or jsonl.gz file")
    parser.add_argument("out_dir", help=f"directory for {TRAIN_FILE} and {HELDOUT_FILE}")
    parser.add_argument("--heldout-rows", type=int, required=True, help="rows (at least) on the held-out side")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        result = split_file(args.source, args.out_dir, args.heldout_rows, args.seed)
    except (OSError, ValueError) as error:
        raise SystemExit(f"hh_split: {error}") from None
    print(json.dumps(asdict(result)))
    return result


if __name__ == "__main__":
    main()
