"""Score a policy before and after PPO with the reward model, on held-out prompts of real data.

    python -m ppo.demo.reward_eval --before MODEL.gguf --after output/smollm2/ppo/policy \\
        --reward-model output/smollm2/rm --prompts hh-rlhf:#24:output/smollm2/data/heldout.jsonl.gz \\
        --prompt-template chat --max-prompt-length 128 --prompt-truncation left_turns \\
        --max-new-tokens 64 --output output/smollm2/example/evaluation.json

There is no independent judge for open-ended conversations, so unlike `ppo.demo.evaluate` (the
quickstart's task) the measure is the reward model's own end score: it tells whether PPO moved
the policy the way the reward model wanted on prompts neither stage trained on, not whether the
answers are better to a human. The RM's held-out pair accuracy says how far to trust it.

Both models answer the same prompts with the same sampling seed, once sampled and once greedy
(`ppo.demo.evaluate.generate_and_score`). Reported per (model, decoding): mean reward with its
standard error, share of answers that ended within `max_new_tokens`, mean length, and the
per-prompt reward difference after - before (paired, so most of the prompt-to-prompt spread
cancels); for the PPO policy's sampled answers also KL(after || before) per response (sum over
response tokens of the log-ratio at the sampling temperature). `--samples` writes a few prompts
with all four answers.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence

from ppo.runtime import prepare_process

prepare_process()  # before Paddle loads (run as `python -m ppo.demo.reward_eval`)

from ppo.data.templates import DEFAULT_TEMPLATE  # noqa: E402
from ppo.data.truncation import DEFAULT_PROMPT_TRUNCATION  # noqa: E402
from ppo.demo.evaluate import (  # noqa: E402
    Generation,
    SamplingSettings,
    check_finite,
    generate_and_score,
    load_causal_lm,
    load_reward_model,
)
from ppo.model_import import resolve_model_path  # noqa: E402
from ppo.model_io import load_tokenizer, tokenizers_match  # noqa: E402

MODELS = ("before", "after")
DECODINGS = ("sampled", "greedy")


@dataclass(frozen=True)
class PromptSettings:
    """How held-out prompts are rendered and fitted: the values the PPO run used."""

    prompt_template: str = DEFAULT_TEMPLATE
    system_prompt: Optional[str] = None
    max_prompt_length: Optional[int] = None
    prompt_truncation: str = DEFAULT_PROMPT_TRUNCATION
    max_prompts: Optional[int] = None


def mean_and_error(values: Sequence[float]) -> tuple[float, float]:
    """Mean and its standard error (sample standard deviation / sqrt(n); 0 for one value)."""
    count = len(values)
    if count == 0:
        raise ValueError("no values to average")
    mean = sum(values) / count
    if count == 1:
        return mean, 0.0
    variance = sum((value - mean) ** 2 for value in values) / (count - 1)
    return mean, math.sqrt(variance / count)


def aggregate(generations: Sequence[Generation]) -> dict:
    reward, reward_error = mean_and_error([g.reward for g in generations])
    summary = {
        "reward": reward,
        "reward_stderr": reward_error,
        "finished_rate": sum(g.finished for g in generations) / len(generations),
        "mean_length": sum(g.length for g in generations) / len(generations),
        "responses": len(generations),
    }
    kls = [g.kl_to_reference for g in generations if g.kl_to_reference is not None]
    if kls:
        summary["kl_to_reference"], summary["kl_to_reference_stderr"] = mean_and_error(kls)
    return summary


def paired_gain(before: Sequence[Generation], after: Sequence[Generation]) -> dict:
    """Per-prompt reward after - before (answers to one prompt averaged first), its mean, standard
    error and the share of prompts where the PPO policy scored higher."""
    def per_prompt(generations):
        rewards: Dict[int, List[float]] = {}
        for g in generations:
            rewards.setdefault(g.prompt_index, []).append(g.reward)
        return {index: sum(values) / len(values) for index, values in rewards.items()}

    first, second = per_prompt(before), per_prompt(after)
    if first.keys() != second.keys():
        raise ValueError("before and after answered different prompts")
    differences = [second[index] - first[index] for index in sorted(first)]
    gain, error = mean_and_error(differences)
    return {"reward_gain": gain, "reward_gain_stderr": error, "win_rate": sum(d > 0 for d in differences) / len(differences)}


def prompt_text(item: dict) -> str:
    """What a reader needs to see of a prompt: its last user turn (and how many turns led to it)."""
    turns = item["turns"]
    earlier = len(turns) - 1
    return turns[-1] + (f"  [after {earlier} earlier turns]" if earlier else "")


def side_by_side(prompts, runs: Dict[tuple, List[Generation]], copies: int, count: int) -> List[dict]:
    """All four answers to `count` prompts spread evenly over the set (fixed positions, not
    chosen by outcome): the first sampled answer and the greedy answer of each model."""
    total = len(runs[("before", "greedy")])
    picks = sorted({round(i * (total - 1) / max(count - 1, 1)) for i in range(min(count, total))})
    rows = []
    for index in picks:
        row = {"prompt": prompt_text(prompts[index])}
        for model in MODELS:
            for decoding, position in (("sampled", index * copies), ("greedy", index)):
                answer = runs[(model, decoding)][position]
                row[f"{model}_{decoding}"], row[f"{model}_{decoding}_reward"] = answer.response, answer.reward
        rows.append(row)
    return rows


def build_prompts(spec: str, tokenizer, settings: SamplingSettings, prompts: PromptSettings, context_length: int):
    """The held-out prompts, fitted as PPO fitted its prompts; without `max_prompt_length` they
    may fill the model's context (`context_length`) up to the response budget."""
    from ppo.data import PromptOnlyDataset

    # The response budget is max_new_tokens whatever the prompt, as in the PPO rollouts.
    max_prompt_length = prompts.max_prompt_length
    if max_prompt_length is None:
        max_prompt_length = context_length - settings.max_new_tokens
    return PromptOnlyDataset(
        spec, tokenizer, max_length=max_prompt_length + settings.max_new_tokens, seed=settings.seed,
        response_room=settings.max_new_tokens, prompt_template=prompts.prompt_template,
        system_prompt=prompts.system_prompt, max_prompt_length=max_prompt_length,
        prompt_truncation=prompts.prompt_truncation,
    )  # fmt: skip


def evaluate(
    before_path: str,
    after_path: str,
    reward_model_path: str,
    prompts_spec: str,
    settings: SamplingSettings,
    prompts: PromptSettings = PromptSettings(),
    num_samples_shown: int = 3,
    generations_path: Optional[str] = None,
) -> dict:
    before_path = resolve_model_path(before_path, role="before")  # a GGUF file or HF directory works too
    after_path = resolve_model_path(after_path, role="after")
    reward_model_path = resolve_model_path(reward_model_path, role="reward_model")
    tokenizer = load_tokenizer(before_path)
    for path, what in ((after_path, "the PPO policy"), (reward_model_path, "the reward model")):
        # Answers are scored as token ids: the reward model must read the policy's vocabulary.
        if not tokenizers_match(tokenizer, load_tokenizer(path)):
            raise ValueError(f"{what} ({path}) has another tokenizer than {before_path}; this evaluation needs one vocabulary")
    if prompts.max_prompts is not None and prompts.max_prompts < 1:
        raise ValueError(f"max_prompts must be >= 1, got {prompts.max_prompts}")
    before, after = load_causal_lm(before_path), load_causal_lm(after_path)
    reward_model = load_reward_model(reward_model_path)
    dataset = build_prompts(prompts_spec, tokenizer, settings, prompts, before.config.max_position_embeddings)
    num_prompts = len(dataset) if prompts.max_prompts is None else min(prompts.max_prompts, len(dataset))

    results = {"settings": {**asdict(settings), **asdict(prompts), "prompts": num_prompts, "prompts_spec": prompts_spec}}
    runs = {}
    for decoding in DECODINGS:
        sampled = decoding == "sampled"
        for name, model in (("before", before), ("after", after)):
            # KL on sampled answers only: they are draws from the policy, so the mean log-ratio
            # estimates KL(after || before); greedy answers are not, and would cost two more passes.
            reference = before if name == "after" and sampled else None
            runs[(name, decoding)] = generate_and_score(
                model, dataset, tokenizer, reward_model, settings, do_sample=sampled,
                reference=reference, description=f"{name} {decoding}", num_prompts=num_prompts,
            )  # fmt: skip
            results[f"{name}_{decoding}"] = aggregate(runs[(name, decoding)])
        results[f"gain_{decoding}"] = paired_gain(runs[("before", decoding)], runs[("after", decoding)])
    results["samples"] = side_by_side(dataset, runs, settings.samples_per_prompt, num_samples_shown)
    if generations_path:
        os.makedirs(os.path.dirname(os.path.abspath(generations_path)), exist_ok=True)
        with open(generations_path, "w", encoding="utf-8") as handle:
            for (name, decoding), generations in runs.items():
                for generation in generations:
                    record = {"model": name, "decoding": decoding, "prompt": prompt_text(dataset[generation.prompt_index])}
                    handle.write(json.dumps({**record, **asdict(generation)}) + "\n")
    return results


def write_json(path: str, value) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w", encoding="utf-8") as handle:
        json.dump(value, handle, indent=2)
        handle.write("\n")
    os.replace(path + ".tmp", path)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", required=True, help="the policy before PPO (also the KL reference): directory or .gguf")
    parser.add_argument("--after", required=True, help="the PPO policy (output_dir/policy of run_ppo.py)")
    parser.add_argument("--reward-model", required=True, help="reward model directory (output_dir of run_reward.py)")
    parser.add_argument("--prompts", required=True, help="held-out prompt datasets, e.g. hh-rlhf:#32:DIR/heldout.jsonl.gz")
    parser.add_argument("--output", required=True, help="JSON file for the results")
    parser.add_argument("--samples", default=None, help="optional JSON-lines file for the side-by-side samples")
    parser.add_argument("--generations", default=None, help="optional JSON-lines file for every scored answer")
    defaults, prompt_defaults = SamplingSettings(samples_per_prompt=1, max_new_tokens=64), PromptSettings()
    parser.add_argument("--samples-per-prompt", type=int, default=defaults.samples_per_prompt)
    parser.add_argument("--temperature", type=float, default=defaults.temperature)
    parser.add_argument("--top-p", type=float, default=defaults.top_p)
    parser.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens)
    parser.add_argument("--prompts-per-batch", type=int, default=16)
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seed of the prompt sample and of the sampling")
    parser.add_argument("--max-prompts", type=int, default=None, help="evaluate only the first N prompts")
    parser.add_argument("--num-samples-shown", type=int, default=3, help="prompts in the side-by-side samples")
    parser.add_argument("--prompt-template", default=prompt_defaults.prompt_template, help="safe-rlhf or chat, as in training")
    parser.add_argument("--system-prompt", default=None, help="system message of every conversation (chat only)")
    parser.add_argument("--max-prompt-length", type=int, default=None, help="prompt token budget, as in PPO")
    parser.add_argument("--prompt-truncation", default=prompt_defaults.prompt_truncation, help="left_turns, left_tokens or drop")
    args = parser.parse_args(argv)
    try:
        settings = SamplingSettings(
            samples_per_prompt=args.samples_per_prompt, temperature=args.temperature, top_p=args.top_p,
            max_new_tokens=args.max_new_tokens, prompts_per_batch=args.prompts_per_batch, seed=args.seed,
        )  # fmt: skip
    except ValueError as error:
        parser.error(str(error))
    prompts = PromptSettings(
        prompt_template=args.prompt_template, system_prompt=args.system_prompt, max_prompt_length=args.max_prompt_length,
        prompt_truncation=args.prompt_truncation, max_prompts=args.max_prompts,
    )  # fmt: skip
    results = evaluate(
        args.before, args.after, args.reward_model, args.prompts, settings, prompts,
        num_samples_shown=args.num_samples_shown, generations_path=args.generations,
    )  # fmt: skip
    check_finite(results)
    write_json(args.output, results)
    if args.samples:
        with open(args.samples, "w", encoding="utf-8") as handle:
            for row in results["samples"]:
                handle.write(json.dumps(row) + "\n")
    for decoding in DECODINGS:
        before, after, gain = results[f"before_{decoding}"], results[f"after_{decoding}"], results[f"gain_{decoding}"]
        kl = f", KL(after || before) {after['kl_to_reference']:.3f} nats" if "kl_to_reference" in after else ""
        print(
            f"[reward_eval] {decoding:<7} reward before {before['reward']:+.3f} ± {before['reward_stderr']:.3f}, "
            f"after {after['reward']:+.3f} ± {after['reward_stderr']:.3f} (paired gain {gain['reward_gain']:+.3f} ± "
            f"{gain['reward_gain_stderr']:.3f}, PPO higher on {gain['win_rate']:.0%} of prompts){kl}",
            flush=True,
        )
    return results


if __name__ == "__main__":
    main()
