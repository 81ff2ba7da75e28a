"""Write the demo task's data files in the upstream schemas.

    python -m ppo.demo.make_data --output-dir DIR --seed 0 [--sizes sft=2000 preference_test=500]

writes, deterministically (same seed and sizes -> byte-identical files)::

    DIR/sft.jsonl                  alpaca rows on train prompts            -> alpaca:1:DIR/sft.jsonl
    DIR/preference/train.jsonl     PKU-SafeRLHF rows on train prompts      -> PKU-SafeRLHF/train:1:DIR/preference/train.jsonl
    DIR/preference/test.jsonl      PKU-SafeRLHF rows on held-out prompts
    DIR/prompts/train.jsonl        PKU-SafeRLHF rows, one per distinct train prompt
    DIR/prompts/test.jsonl         PKU-SafeRLHF rows, one per distinct held-out prompt
    DIR/corpus.txt                 every prompt and response in the conversation template
                                   (text for training the tokenizer)
"""

from __future__ import annotations

import argparse
import json
import os
import random
from typing import Optional, Sequence

from ppo.demo import task

DEFAULT_SIZES = {
    "sft": 2000,
    "preference_train": 2000,
    "preference_test": 500,
    # None = every distinct prompt of the split.
    "prompts_train": None,
    "prompts_test": None,
}


def parse_sizes(items: Sequence[str]) -> dict:
    """`["sft=100", "prompts_test=all"]` -> DEFAULT_SIZES updated with those counts."""
    sizes = dict(DEFAULT_SIZES)
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in DEFAULT_SIZES:
            raise ValueError(f"bad size {item!r}: expected KEY=N with KEY one of {sorted(DEFAULT_SIZES)}")
        if value == "all" and key.startswith("prompts_"):
            sizes[key] = None
            continue
        if not value.isdigit() or int(value) <= 0:
            raise ValueError(f"bad size {item!r}: N must be a positive integer" + (" or 'all'" if key.startswith("prompts_") else ""))
        sizes[key] = int(value)
    return sizes


def _write_atomically(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    staging = path + ".tmp"
    with open(staging, "w", encoding="utf-8", newline="\n") as handle:
        handle.write(text)
    os.replace(staging, path)


def _jsonl(rows) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def build_rows(seed: int, sizes: Optional[dict] = None) -> dict:
    """All generated rows by file name (relative path), deterministic in `seed` and `sizes`."""
    sizes = {**DEFAULT_SIZES, **(sizes or {})}
    train_prompts, test_prompts = task.split_prompts(seed)
    # One random stream per file, so changing one size leaves the other files unchanged.
    def stream(name):
        return random.Random(f"demo-{name}-{seed}")

    return {
        "sft.jsonl": task.sft_rows(stream("sft"), train_prompts, sizes["sft"]),
        "preference/train.jsonl": task.preference_rows(stream("preference-train"), train_prompts, sizes["preference_train"]),
        "preference/test.jsonl": task.preference_rows(stream("preference-test"), test_prompts, sizes["preference_test"]),
        "prompts/train.jsonl": task.prompt_rows(stream("prompts-train"), train_prompts, sizes["prompts_train"]),
        "prompts/test.jsonl": task.prompt_rows(stream("prompts-test"), test_prompts, sizes["prompts_test"]),
    }


def make_data(output_dir: str, seed: int = 0, sizes: Optional[dict] = None) -> dict:
    """Write every file under `output_dir`; returns {relative path: number of lines}."""
    rows_by_file = build_rows(seed, sizes)
    counts = {}
    corpus_lines = []
    for name, rows in rows_by_file.items():
        _write_atomically(os.path.join(output_dir, name), _jsonl(rows))
        counts[name] = len(rows)
        corpus_lines.extend(task.conversation_lines(rows))
    # Distinct lines in first-seen order: the tokenizer needs coverage, not repetition counts.
    corpus = list(dict.fromkeys(corpus_lines))
    _write_atomically(os.path.join(output_dir, "corpus.txt"), "".join(line + "\n" for line in corpus))
    counts["corpus.txt"] = len(corpus)
    return counts


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", required=True, help="directory to write the files into")
    parser.add_argument("--seed", type=int, default=0, help="seed of the prompt split and of every sample")
    parser.add_argument(
        "--sizes",
        nargs="*",
        default=[],
        metavar="KEY=N",
        help=f"row counts to override; keys: {', '.join(DEFAULT_SIZES)} (prompts_* also accept 'all'); defaults: {DEFAULT_SIZES}",
    )
    args = parser.parse_args(argv)
    try:
        sizes = parse_sizes(args.sizes)
        counts = make_data(args.output_dir, args.seed, sizes)
    except ValueError as error:
        parser.error(str(error))
    summary = ", ".join(f"{name} {count}" for name, count in counts.items())
    print(f"demo data (seed {args.seed}) in {args.output_dir}: {summary}")


if __name__ == "__main__":
    main()
