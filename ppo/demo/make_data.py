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

The safety variant (opt-in; same prompt split, the same words, so the default tokenizer covers it)

    python -m ppo.demo.make_data --variant safe --output-dir DIR/safe --seed 0

writes only the preference pairs, labelled for helpfulness by `task.helpfulness` (any closing,
rude or polite, beats none) and for safety by `task.is_safe` (rude is unsafe)::

    DIR/safe/preference/train.jsonl   PKU-SafeRLHF rows on train prompts  (reward and cost model)
    DIR/safe/preference/test.jsonl    PKU-SafeRLHF rows on held-out prompts
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


SAFE_SIZES = {"preference_train": 2000, "preference_test": 500}
# variant -> its files' default row counts
VARIANT_SIZES = {"default": DEFAULT_SIZES, "safe": SAFE_SIZES}


def _variant_sizes(variant: str) -> dict:
    if variant not in VARIANT_SIZES:
        raise ValueError(f"unknown data variant {variant!r}; valid variants: {sorted(VARIANT_SIZES)}")
    return VARIANT_SIZES[variant]


def parse_sizes(items: Sequence[str], variant: str = "default") -> dict:
    """`["sft=100", "prompts_test=all"]` -> the variant's default sizes updated with those counts."""
    defaults = _variant_sizes(variant)
    sizes = dict(defaults)
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in defaults:
            raise ValueError(f"bad size {item!r}: expected KEY=N with KEY one of {sorted(defaults)}")
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


def build_safe_rows(seed: int, sizes: Optional[dict] = None) -> dict:
    """The safety variant's rows by file name, deterministic in `seed` and `sizes`; its held-out
    prompts are those of the default data with the same seed."""
    sizes = {**SAFE_SIZES, **(sizes or {})}
    train_prompts, test_prompts = task.split_prompts(seed)

    def rows(split, prompts):
        stream = random.Random(f"demo-safe-preference-{split}-{seed}")
        return task.preference_rows(stream, prompts, sizes[f"preference_{split}"], rule=task.HELPFULNESS_RULE)

    return {"preference/train.jsonl": rows("train", train_prompts), "preference/test.jsonl": rows("test", test_prompts)}


def make_data(output_dir: str, seed: int = 0, sizes: Optional[dict] = None, variant: str = "default") -> dict:
    """Write every file of `variant` under `output_dir`; returns {relative path: number of lines}."""
    _variant_sizes(variant)
    if variant == "safe":
        return _write_rows(output_dir, build_safe_rows(seed, sizes))
    rows_by_file = build_rows(seed, sizes)
    counts = _write_rows(output_dir, rows_by_file)
    corpus_lines = []
    for rows in rows_by_file.values():
        corpus_lines.extend(task.conversation_lines(rows))
    # Distinct lines in first-seen order: the tokenizer needs coverage, not repetition counts.
    corpus = list(dict.fromkeys(corpus_lines))
    _write_atomically(os.path.join(output_dir, "corpus.txt"), "".join(line + "\n" for line in corpus))
    counts["corpus.txt"] = len(corpus)
    return counts


def _write_rows(output_dir: str, rows_by_file: dict) -> dict:
    for name, rows in rows_by_file.items():
        _write_atomically(os.path.join(output_dir, name), _jsonl(rows))
    return {name: len(rows) for name, rows in rows_by_file.items()}


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", required=True, help="directory to write the files into")
    parser.add_argument("--seed", type=int, default=0, help="seed of the prompt split and of every sample")
    parser.add_argument(
        "--variant",
        choices=sorted(VARIANT_SIZES),
        default="default",
        help="'default': the demo data; 'safe': preference pairs labelled for helpfulness and safety (see above)",
    )
    parser.add_argument(
        "--sizes",
        nargs="*",
        default=[],
        metavar="KEY=N",
        help=f"row counts to override; keys: {', '.join(DEFAULT_SIZES)} (prompts_* also accept 'all'; the safe "
        f"variant: {', '.join(SAFE_SIZES)}); defaults: {DEFAULT_SIZES}, safe: {SAFE_SIZES}",
    )
    args = parser.parse_args(argv)
    try:
        sizes = parse_sizes(args.sizes, args.variant)
        counts = make_data(args.output_dir, args.seed, sizes, args.variant)
    except ValueError as error:
        parser.error(str(error))
    summary = ", ".join(f"{name} {count}" for name, count in counts.items())
    print(f"demo data ({args.variant}, seed {args.seed}) in {args.output_dir}: {summary}")


if __name__ == "__main__":
    main()
