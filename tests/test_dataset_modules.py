"""`dataset_modules`: a config names user code that registers a RawDataset, and the NAME then works in
the dataset keys — in every process of `paddle.distributed.launch`, for SFT, RM and PPO arguments —
and an entry that fails to import says which entry, which key and what went wrong."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ppo.cli import parse_config
from ppo.data import DatasetModuleError, RawDataset, import_dataset_modules

REPO_ROOT = Path(__file__).resolve().parents[1]

# A user's dataset file: pairs made up in code, and a marker per process that imported it.
DATASET_MODULE = '''
import os
from ppo.data import RawDataset, RawSample

MARKER_DIR = {marker_dir!r}
with open(os.path.join(MARKER_DIR, "imported.rank" + os.environ.get("PADDLE_TRAINER_ID", "single")), "w") as f:
    f.write(str(os.getpid()))

WORDS = "red blue green cat dog bird tree water fish sun".split()


class ColourPairs(RawDataset):
    NAME = "{name}"

    def __init__(self, path=None):
        self.rows = [("what is word %d" % i, WORDS[i % 10], WORDS[(i + 3) % 10]) for i in range(16)]

    def __getitem__(self, index):
        prompt, good, bad = self.rows[index]
        return RawSample(input=prompt, answer=good, other_answer=bad, better=True)

    def __len__(self):
        return len(self.rows)
'''


def write_module(directory: Path, name: str, file_name: str = "my_datasets.py") -> Path:
    path = directory / file_name
    path.write_text(textwrap.dedent(DATASET_MODULE.format(marker_dir=str(directory), name=name)))
    return path


def test_a_py_file_and_a_module_name_register_their_datasets(tmp_path, monkeypatch, dataset_registry):
    write_module(tmp_path, "test-pairs-file")
    package = tmp_path / "site" / "user_pkg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    write_module(package, "test-pairs-module", "data.py")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.chdir(tmp_path)  # relative .py paths are taken from the current directory
    modules = import_dataset_modules("my_datasets.py, user_pkg.data")
    assert [module.ColourPairs.NAME for module in modules] == ["test-pairs-file", "test-pairs-module"]
    assert len(RawDataset.load("test-pairs-file")) == 16 and RawDataset.resolve("test-pairs-module")
    # Listing a file again (or parsing the config twice) does not run it twice.
    assert import_dataset_modules(["my_datasets.py"])[0] is modules[0]


def test_every_stage_imports_the_key_while_parsing_its_config(tmp_path, monkeypatch, dataset_registry):
    from ppo.arguments import PPODataArguments
    from rm.run_reward import RewardArguments

    write_module(tmp_path, "test-pairs-config")
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "rm.json"
    config.write_text(json.dumps({"model_name_or_path": "m", "output_dir": str(tmp_path / "out"), "report_to": ["none"],
                                  "train_datasets": "test-pairs-config", "dataset_modules": ["my_datasets.py"]}))
    (args,) = parse_config([str(config)], RewardArguments)
    assert args.dataset_modules == ["my_datasets.py"] and RawDataset.resolve("test-pairs-config")
    data = PPODataArguments(train_datasets="test-pairs-config", dataset_modules="my_datasets.py")
    assert data.dataset_modules == "my_datasets.py"


def test_entries_that_fail_to_import_name_the_entry_the_key_and_the_error(tmp_path, monkeypatch):
    from sft.run_sft import SftArguments

    monkeypatch.chdir(tmp_path)
    (tmp_path / "broken.py").write_text("import json\n\nraise RuntimeError('no data here')\n")
    (tmp_path / "typo.py").write_text("class (:\n")
    cases = [
        ("broken.py", r"dataset_modules entry 'broken.py' failed to import: RuntimeError: no data here "
                      rf"\(raised at {tmp_path}/broken.py line 3\)"),
        ("typo.py", r"dataset_modules entry 'typo.py' failed to import: SyntaxError: invalid syntax"),
        ("missing.py", rf"dataset_modules entry 'missing.py': no such file '{tmp_path}/missing.py' \(relative paths are "
                       rf"taken from '{tmp_path}'\)"),
        ("no_such_pkg.datasets", r"dataset_modules entry 'no_such_pkg.datasets' failed to import: ModuleNotFoundError: "
                                 r"No module named 'no_such_pkg' \(Module names are imported from sys.path"),
    ]
    for entry, message in cases:
        with pytest.raises(DatasetModuleError, match=message):
            SftArguments(model_name_or_path="m", output_dir=str(tmp_path / "out"), report_to=["none"], dataset_modules=[entry])
    with pytest.raises(DatasetModuleError, match=r"entries must be module names or .py paths, got 3"):
        import_dataset_modules([3])


@pytest.mark.distributed
def test_a_custom_dataset_name_trains_under_distributed_launch_on_every_rank(tmp_path, tiny_llama_dir):
    """`python -m paddle.distributed.launch --nproc_per_node 2 rm/run_reward.py config.json`, with the
    dataset defined only in a file the config names: both workers import it and train on it."""
    write_module(tmp_path, "launch-colour-pairs")
    output = tmp_path / "rm"
    config = {
        "model_name_or_path": tiny_llama_dir,
        "dataset_modules": ["my_datasets.py"],  # relative: the config lies outside the repository
        "train_datasets": "launch-colour-pairs",
        "eval_datasets": "launch-colour-pairs:#8",
        "output_dir": str(output),
        "max_length": 32,
        "per_device_train_batch_size": 4,
        "per_device_eval_batch_size": 4,
        "max_steps": 2,
        "learning_rate": 1e-3,
        "logging_steps": 1,
        "save_strategy": "no",
        "evaluation_strategy": "no",
        "do_train": True,
        "report_to": ["none"],
        "disable_tqdm": True,
    }
    (tmp_path / "rm.json").write_text(json.dumps(config))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("PADDLE_TRAINERS_NUM", None)
    result = subprocess.run(
        [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "2", "--log_dir", str(tmp_path / "logs"),
         str(REPO_ROOT / "rm" / "run_reward.py"), "rm.json"],
        cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=900,
    )
    logs = "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted((tmp_path / "logs").glob("workerlog.*")))
    assert result.returncode == 0, logs or result.stderr[-3000:]
    markers = sorted(path.name for path in tmp_path.glob("imported.rank*"))
    assert markers == ["imported.rank0", "imported.rank1"]
    assert json.loads((output / "train_results.json").read_text())["train_loss"] > 0
    assert "eval_accuracy" in json.loads((output / "eval_results.json").read_text())
