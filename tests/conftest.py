"""Fixtures shared by the whole suite: a tiny offline tokenizer and tiny models, built once."""

import os
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
TEST_DATA_DIR = REPO_ROOT / "tests" / "data"
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

# One thread per process: the suite runs on 2 shared cores and spin-waiting threads slow it down.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def test_data_dir() -> Path:
    """Small files the repo ships, in the PKU-SafeRLHF and alpaca schemas."""
    return TEST_DATA_DIR


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> str:
    from ppo.tiny import build_tokenizer

    path = str(tmp_path_factory.mktemp("tiny_tokenizer"))
    build_tokenizer(path)
    return path


@pytest.fixture()
def tiny_tokenizer(tiny_tokenizer_dir):
    """A fresh tokenizer per test (tests may change padding_side or pad token)."""
    from paddlenlp.transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


def _save_model_dir(tmp_path_factory, tokenizer_dir, architecture):
    from ppo.tiny import save_tiny_causal_lm

    path = str(tmp_path_factory.mktemp(f"tiny_{architecture}"))
    save_tiny_causal_lm(path, architecture=architecture, tokenizer_dir=tokenizer_dir)
    return path


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tiny_tokenizer_dir) -> str:
    """A saved randomly initialised 2-layer Llama (hidden 64) with the tiny tokenizer."""
    return _save_model_dir(tmp_path_factory, tiny_tokenizer_dir, "llama")


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory, tiny_tokenizer_dir) -> str:
    """A saved randomly initialised 2-layer Qwen2 (hidden 64) with the tiny tokenizer."""
    return _save_model_dir(tmp_path_factory, tiny_tokenizer_dir, "qwen2")


@pytest.fixture()
def dataset_registry():
    """Lets a test register `RawDataset` subclasses without leaking them into other tests."""
    from ppo.data import RawDataset

    saved = dict(RawDataset._registry)
    yield RawDataset
    RawDataset._registry.clear()
    RawDataset._registry.update(saved)


@pytest.fixture()
def in_memory(dataset_registry):
    """Register a dataset holding the given RawSamples under `name`."""

    def register(name, samples):
        from ppo.data import RawDataset

        class InMemory(RawDataset):
            NAME = name

            def __init__(self, path=None):
                self.samples = samples

            def __getitem__(self, index):
                return self.samples[index]

            def __len__(self):
                return len(self.samples)

        InMemory.__qualname__ = f"InMemory[{name}]"
        return name

    return register
