"""Kill training runs with SIGKILL at random moments (during checkpoint saves included), or
preempt them with SIGTERM / SIGINT, resume them with `resume_from_checkpoint: true`, and check
that nothing was lost.

    python scripts/fault_injection.py --stage sft --runs 20 --seed 0
    python scripts/fault_injection.py --stage rm  --runs 20 --seed 0
    python scripts/fault_injection.py --stage ppo --runs 20 --seed 0
    python scripts/fault_injection.py --stage ppo --runs 10 --signal TERM

For a stage (tiny assets built in --workdir) it first runs the training once uninterrupted (the
reference), then for every trial: starts the same run, SIGKILLs it either at a random time of
its training or while a chosen checkpoint is being written (it polls for the staging
directory), looks at what the kill left (every `checkpoint-N` must pass its manifest), resumes
with `resume_from_checkpoint true` and checks that

- the resume starts from the newest complete checkpoint,
- every metric the resumed run logs after that step equals the reference's at the same step,
- the final weights equal the reference's, bit for bit.

With `--signal TERM` (or INT) every trial sends that signal at a random time of training
instead; a run that was training must then stop with exit status 128 + signal after saving the
checkpoint of the step it was in ("stopped on SIGTERM at step N"), and resume from exactly it.

Prints one line per trial and the counts; the exit status is 1 when any trial lost something.
`--summary FILE` also writes the counts as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

STAGES = ("sft", "rm", "ppo")
# Logged values that measure time, not training.
TIMING = re.compile(r"runtime|per_second|_time|timer|elapsed|speed")
# PaddleNLP's Trainer logs "loss: 6.24411726, learning_rate: 0.001833, global_step: 1, ...".
TRAINER_LOG = re.compile(r"(?:^|\s-\s)((?:[\w/]+: [-+.\w]+, )*global_step: \d+(?:, [\w/]+: [-+.\w]+)*)")
RESUMED_FROM = re.compile(r"resuming from \S*checkpoint-(\d+)")


@dataclass
class StageRun:
    """How to run one stage: the command, and where its metrics and final weights are."""

    stage: str
    command: List[str]
    weights: str  # relative to output_dir

    def metrics(self, output_dir: str, log_text: str) -> Dict[int, dict]:
        if self.stage == "ppo":
            path = os.path.join(output_dir, "ppo_metrics.jsonl")
            records = {}
            if os.path.exists(path):
                with open(path, encoding="utf-8") as f:
                    for line in f:
                        record = json.loads(line)
                        records.setdefault(record["step"], {}).update(
                            {k: v for k, v in record.items() if k != "step" and not TIMING.search(k)}
                        )
            return records
        records = {}
        for match in TRAINER_LOG.finditer(log_text):
            pairs = dict(item.split(": ", 1) for item in match.group(1).split(", "))
            step = int(pairs.pop("global_step"))
            records.setdefault(step, {}).update({k: v for k, v in pairs.items() if not TIMING.search(k)})
        return records


def build_assets(workdir: str, seed: int) -> dict:
    """Tiny demo-task data, tokenizer and base Llama (`ppo.demo.prepare_tiny`) and a reward model
    initialised from the base."""
    from ppo.demo.prepare_tiny import prepare_tiny

    paths = prepare_tiny(os.path.join(workdir, "assets"), seed=seed, log=lambda message: None)
    print(f"assets in {os.path.join(workdir, 'assets')}", flush=True)
    reward = os.path.join(workdir, "assets", "reward")
    if not os.path.isdir(reward):
        import paddle
        from paddlenlp.transformers import AutoTokenizer

        from ppo.models import AutoModelForScore

        paddle.seed(seed)
        staging = reward + ".partial"
        AutoModelForScore.from_pretrained(paths["base"], score_type="reward").save_pretrained(staging)
        AutoTokenizer.from_pretrained(paths["base"]).save_pretrained(staging)
        os.rename(staging, reward)
    return {"data": paths["data"], "base": paths["base"], "reward": reward}


def stage_run(stage: str, assets: dict, workdir: str, max_steps: int, save_steps: int) -> StageRun:
    data = assets["data"]
    common = {
        "max_steps": max_steps, "logging_steps": 1, "save_strategy": "steps", "save_steps": save_steps,
        "save_total_limit": 2, "do_train": True, "report_to": "none", "seed": 1, "disable_tqdm": True,
    }  # fmt: skip
    if stage == "sft":
        config = {
            **common, "model_name_or_path": assets["base"], "train_datasets": f"alpaca:1:{data}/sft.jsonl",
            "max_length": 96, "per_device_train_batch_size": 8, "learning_rate": 2e-3,
        }  # fmt: skip
        script, weights = "sft/run_sft.py", "model_state.pdparams"
    elif stage == "rm":
        config = {
            **common, "model_name_or_path": assets["base"],
            "train_datasets": f"PKU-SafeRLHF/train:1:{data}/preference/train.jsonl",
            "max_length": 96, "per_device_train_batch_size": 8, "learning_rate": 1e-3,
        }  # fmt: skip
        script, weights = "rm/run_reward.py", "model_state.pdparams"
    elif stage == "ppo":
        config = {
            **common, "actor_model_name_or_path": assets["base"], "reward_model_name_or_path": assets["reward"],
            "train_datasets": f"PKU-SafeRLHF/train:1:{data}/prompts/train.jsonl",
            "ptx_datasets": f"alpaca:1:{data}/sft.jsonl", "ptx_coeff": 0.1,
            "max_length": 48, "per_device_prompt_batch_size": 4, "per_device_train_batch_size": 2,
            "update_iters": 1, "learning_rate": 1e-3, "critic_learning_rate": 1e-3, "critic_warmup_ratio": 0.0,
            "evaluation_strategy": "no", "top_p": 1.0,
        }  # fmt: skip
        script, weights = "ppo/run_ppo.py", os.path.join("policy", "model_state.pdparams")
    else:
        raise ValueError(f"unknown stage {stage!r}: one of {STAGES}")
    path = os.path.join(workdir, f"{stage}_argument.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    return StageRun(stage, [sys.executable, os.path.join(REPO_ROOT, script), path], weights)


def launch(run: StageRun, output_dir: str, log_path: str, resume: bool) -> subprocess.Popen:
    command = run.command + ["--output_dir", output_dir] + (["--resume_from_checkpoint", "true"] if resume else [])
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    log = open(log_path, "w", encoding="utf-8")
    process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    log.close()
    return process


def finish(process: subprocess.Popen, log_path: str, what: str) -> str:
    process.wait()
    with open(log_path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    if process.returncode != 0:
        raise RuntimeError(f"{what} exited with {process.returncode}; last lines of {log_path}:\n" + "\n".join(text.splitlines()[-15:]))
    return text


def staging_dirs(output_dir: str) -> List[str]:
    try:
        return [name for name in os.listdir(output_dir) if name.endswith(".staging")]
    except FileNotFoundError:
        return []


def complete_checkpoints(output_dir: str, stage: str) -> Dict[int, str]:
    """checkpoint-N → "" when it passes its manifest (or, for PPO checkpoints written without
    one, has its state file), else the reason it does not."""
    from ppo.checkpoint import PPO_POLICY
    from ppo.checkpoint_files import CheckpointError, checkpoint_dirs, checkpoint_step
    from ppo.stage_checkpoints import STAGE_POLICY

    policy = PPO_POLICY if stage == "ppo" else STAGE_POLICY
    result = {}
    for path in checkpoint_dirs(output_dir):
        try:
            policy.check(path)
            result[checkpoint_step(path)] = ""
        except CheckpointError as error:
            result[checkpoint_step(path)] = str(error)
    return result


def same_weights(path_a: str, path_b: str) -> bool:
    import numpy as np
    import paddle

    a, b = paddle.load(path_a), paddle.load(path_b)
    return sorted(a) == sorted(b) and all(np.array_equal(np.asarray(a[k]), np.asarray(b[k])) for k in a)


@dataclass
class Counts:
    stage: str
    runs: int = 0
    killed_during_save: int = 0
    killed_elsewhere: int = 0
    not_killed: int = 0
    killed_before_first_checkpoint: int = 0
    resumed_from_newest_complete: int = 0
    half_written_checkpoints_left: int = 0
    metrics_equal: int = 0
    weights_equal: int = 0
    lost_something: int = 0
    preempted_cleanly: int = 0
    resumed_from_steps: List[int] = field(default_factory=list)


def run_trial(
    index: int, rng: random.Random, run: StageRun, reference: dict, workdir: str, save_steps: int, max_steps: int,
    counts: Counts, signal_number: int = signal.SIGKILL,
) -> str:
    output_dir = os.path.join(workdir, f"trial{index}")
    shutil.rmtree(output_dir, ignore_errors=True)
    log_path = os.path.join(workdir, f"trial{index}.log")
    process = launch(run, output_dir, log_path, resume=False)
    during_save = index % 2 == 0 and signal_number == signal.SIGKILL
    if during_save:
        # Kill while checkpoint-`step` is being written: poll for its staging directory.
        step = rng.choice(range(save_steps, max_steps, save_steps))  # not the last: leave steps to compare
        target = os.path.join(output_dir, f".checkpoint-{step}.staging")
        while process.poll() is None and not os.path.exists(target):
            time.sleep(0.002)
        time.sleep(rng.uniform(0.0, 0.5 * reference["save_seconds"]))
        plan = f"during the save of checkpoint-{step}"
    else:
        # Kill at a random moment of training (after start-up, which loses nothing to test).
        while process.poll() is None and not _training_started(log_path, output_dir):
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, reference["train_seconds"]))
        plan = "at a random time"
    staging_at_kill = staging_dirs(output_dir)
    stopped_at = None
    if process.poll() is None:
        os.kill(process.pid, signal_number)
        process.wait()
        if staging_at_kill:
            counts.killed_during_save += 1
        else:
            counts.killed_elsewhere += 1
        killed = True
        if signal_number != signal.SIGKILL:
            # Preemption: a clean stop reports the step it checkpointed (a signal that came before the
            # handlers were installed, or after training, ends the process the default way).
            match = re.search(r"stopped on SIG\w+ at step (\d+)", _read(log_path))
            if process.returncode == 128 + signal_number and match:
                stopped_at = int(match.group(1))
                counts.preempted_cleanly += 1
            elif process.returncode not in (-signal_number, 128 + signal_number):
                raise RuntimeError(f"trial {index}: exit status {process.returncode} after {signal.Signals(signal_number).name}; see {log_path}")
            plan = f"with {signal.Signals(signal_number).name} at a random time"
    else:
        counts.not_killed += 1
        killed = False
    state = complete_checkpoints(output_dir, run.stage)
    half_written = {step: why for step, why in state.items() if why}
    counts.half_written_checkpoints_left += len(half_written)
    complete = [step for step, why in state.items() if not why]
    newest = max(complete) if complete else None

    resumed_log = os.path.join(workdir, f"trial{index}.resumed.log")
    if not killed:
        text, resumed_from = _read(log_path), 0
    else:
        process = launch(run, output_dir, resumed_log, resume=newest is not None)
        text = finish(process, resumed_log, f"trial {index} resumed")
        if newest is None:
            counts.killed_before_first_checkpoint += 1
            resumed_from = 0
        else:
            match = RESUMED_FROM.search(text)
            if run.stage == "ppo":
                match = match or re.search(r"resuming at step \d+ from \S*checkpoint-(\d+)", text)
            resumed_from = int(match.group(1)) if match else -1
    if newest is None or resumed_from == newest:
        counts.resumed_from_newest_complete += 1
    counts.resumed_from_steps.append(resumed_from)
    metrics = run.metrics(output_dir, text)
    expected = {step: record for step, record in reference["metrics"].items() if step > resumed_from}
    compared = {step: record for step, record in metrics.items() if step > resumed_from}
    metrics_ok = compared == expected  # nothing to compare when the kill came after the last checkpoint
    weights_ok = same_weights(os.path.join(output_dir, run.weights), reference["weights"])
    counts.metrics_equal += metrics_ok
    counts.weights_equal += weights_ok
    ok = metrics_ok and weights_ok and not half_written and (newest is None or resumed_from == newest)
    ok = ok and (stopped_at is None or stopped_at == newest)  # a clean stop checkpoints the step it stopped at
    counts.lost_something += not ok
    counts.runs += 1
    shown_staging = f" (staging {staging_at_kill[0]} present)" if staging_at_kill else ""
    if stopped_at is not None:
        shown_staging += f", stopped cleanly at step {stopped_at}"
    outcome = "ok" if ok else f"LOST: metrics_equal={metrics_ok} weights_equal={weights_ok} half_written={half_written}"
    if ok:
        shutil.rmtree(output_dir, ignore_errors=True)
    return (
        f"trial {index}: killed {plan}{shown_staging if killed else ' — finished before the kill'}; complete checkpoints "
        f"{sorted(complete)}; resumed from step {resumed_from} (newest complete: {newest}); "
        f"{len(expected)} steps compared: {outcome}"
    )


def _training_started(log_path: str, output_dir: str) -> bool:
    return "global_step: 1," in _read(log_path) or os.path.exists(os.path.join(output_dir, "ppo_metrics.jsonl"))


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except FileNotFoundError:
        return ""


def _published(output_dir: str, step: int) -> bool:
    return os.path.isdir(os.path.join(output_dir, f"checkpoint-{step}"))


def reference_run(run: StageRun, workdir: str, max_steps: int) -> dict:
    output_dir = os.path.join(workdir, "reference")
    shutil.rmtree(output_dir, ignore_errors=True)
    log_path = os.path.join(workdir, "reference.log")
    started = time.time()
    process = launch(run, output_dir, log_path, resume=False)
    first_step, last_step, save_started, save_seconds = None, None, None, []
    while process.poll() is None:
        if first_step is None and _training_started(log_path, output_dir):
            first_step = time.time()
        elif first_step is not None and last_step is None and _published(output_dir, max_steps):
            last_step = time.time()
        # How long a staging directory exists: the window the during-save kills aim into.
        saving = bool(staging_dirs(output_dir))
        if saving and save_started is None:
            save_started = time.time()
        elif not saving and save_started is not None:
            save_seconds.append(time.time() - save_started)
            save_started = None
        time.sleep(0.002)
    text = finish(process, log_path, "the reference run")
    metrics = run.metrics(output_dir, text)
    if not metrics:
        raise RuntimeError(f"the reference run logged no metrics (see {log_path})")
    return {
        "metrics": metrics,
        "weights": os.path.join(output_dir, run.weights),
        # Random kills aim at training and saving: from the first step to the last checkpoint.
        "train_seconds": (last_step or time.time()) - (first_step or started),
        "save_seconds": max(save_seconds) if save_seconds else 0.05,
    }


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", choices=STAGES, required=True)
    parser.add_argument("--runs", type=int, default=20, help="Trials (each one killed run + its resume).")
    parser.add_argument("--seed", type=int, default=0, help="Seeds the kill times and the assets.")
    parser.add_argument("--max-steps", type=int, default=12)
    parser.add_argument("--save-steps", type=int, default=3)
    parser.add_argument("--workdir", default=None, help="Where assets and runs go (default: output/fault_injection/STAGE).")
    parser.add_argument("--summary", default=None, help="Also write the counts as JSON to this file.")
    parser.add_argument(
        "--signal", choices=("KILL", "TERM", "INT"), default="KILL",
        help="KILL: half the trials during a checkpoint save, half at random times; TERM/INT: preemption at random times.",
    )  # fmt: skip
    options = parser.parse_args(argv)
    if options.runs < 1 or options.save_steps < 1 or options.max_steps <= options.save_steps:
        parser.error("need --runs >= 1 and --max-steps > --save-steps >= 1")
    workdir = os.path.abspath(options.workdir or os.path.join(REPO_ROOT, "output", "fault_injection", options.stage))
    os.makedirs(workdir, exist_ok=True)
    assets = build_assets(workdir, options.seed)
    run = stage_run(options.stage, assets, workdir, options.max_steps, options.save_steps)
    started = time.time()
    reference = reference_run(run, workdir, options.max_steps)
    print(
        f"reference: {len(reference['metrics'])} steps in {reference['train_seconds']:.1f} s of training and saving; "
        f"a save takes up to {reference['save_seconds']:.2f} s",
        flush=True,
    )
    counts = Counts(options.stage)
    signal_number = getattr(signal, "SIG" + options.signal)
    rng = random.Random(options.seed)
    for index in range(options.runs):
        print(run_trial(index, rng, run, reference, workdir, options.save_steps, options.max_steps, counts, signal_number), flush=True)
    summary = asdict(counts)
    summary["signal"] = options.signal
    summary["seconds"] = round(time.time() - started, 1)
    print(json.dumps({k: v for k, v in summary.items() if k != "resumed_from_steps"}))
    if options.summary:
        with open(options.summary, "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2)
    return 1 if counts.lost_something else 0


if __name__ == "__main__":
    sys.exit(main())
