"""Judge the SFT model, the PPO policy and the PPO-Lagrangian policy of the safe demo by the rules.

    python -m ppo.demo.safe_evaluate --sft output/tiny/sft --ppo output/tiny/ppo_safe/policy \\
        --ppo-lag output/tiny/ppo_lag/policy --reward-model output/tiny/rm_safe \\
        --cost-model output/tiny/cost \\
        --prompts PKU-SafeRLHF/test:1:output/tiny/data/prompts/test.jsonl \\
        --output output/quickstart-safe/evaluation.json [--samples-per-prompt 8 --seed 0]

The three policies answer every held-out prompt `samples_per_prompt` times with the same
sampling settings and seed (and once greedily). Every answer is judged by the rules of
`ppo.demo.task`, never by a trained model:

* unsafe: it ends with a rude closing (`not task.is_safe`), the rule that labelled the safety data;
* helpfulness: 0.5 for the right colour + 0.5 for any closing (`task.helpfulness`), what the
  safe variant's helpfulness labels, and so its reward model, pay for;
* the default demo judge (`task.judge`: right colour + a *polite* closing) and its parts.

The reward model's and the cost model's scores and the KL to the SFT model are side numbers: a
policy can fool a model, not the rules.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence

from ppo.runtime import prepare_process

prepare_process()  # before Paddle loads (run as `python -m ppo.demo.safe_evaluate`)

from ppo.demo import task  # noqa: E402
from ppo.demo.evaluate import (  # noqa: E402
    PromptSet,
    SamplingSettings,
    check_finite,
    generate_and_score,
    load_causal_lm,
    load_reward_model,
)
from ppo.model_io import load_tokenizer  # noqa: E402

POLICIES = ("sft", "ppo", "ppo_lag")


@dataclass(frozen=True)
class RuleVerdict:
    """What the task's rules say about one answer."""

    unsafe: bool
    helpfulness: float  # in {0, 0.5, 1}
    judge: float  # the default demo judge, in {0, 0.5, 1}
    correct_colour: bool
    closing: bool  # any closing, polite or rude
    polite: bool
    well_formed: bool


def rule_verdict(prompt: str, response: str) -> RuleVerdict:
    return RuleVerdict(
        unsafe=not task.is_safe(response),
        helpfulness=task.helpfulness(prompt, response),
        judge=task.judge(prompt, response),
        correct_colour=task.is_correct(prompt, response),
        closing=task.is_emphatic(response),
        polite=task.is_polite(response),
        well_formed=task.is_well_formed(response),
    )


@dataclass
class SafeAnswer:
    """One answer with its verdict and the models' side numbers."""

    policy: str
    decoding: str
    prompt: str
    response: str
    verdict: RuleVerdict
    finished: bool
    length: int
    reward: float
    cost: Optional[float]  # cost-model end score (sampled answers only)
    kl_to_reference: Optional[float]


# Aggregate name -> RuleVerdict field averaged into it.
RULE_MEANS = {
    "unsafe_share": "unsafe",
    "helpfulness": "helpfulness",
    "judge_score": "judge",
    "colour_accuracy": "correct_colour",
    "closing_rate": "closing",
    "politeness_rate": "polite",
    "well_formed_rate": "well_formed",
}


def aggregate_answers(answers: Sequence[SafeAnswer]) -> Dict[str, float]:
    """Means over answers of every rule and side number."""
    if not answers:
        raise ValueError("aggregate_answers needs at least one answer")
    count = len(answers)
    summary = {name: sum(float(getattr(a.verdict, field)) for a in answers) / count for name, field in RULE_MEANS.items()}
    summary["finished_rate"] = sum(a.finished for a in answers) / count
    summary["reward"] = sum(a.reward for a in answers) / count
    summary["mean_length"] = sum(a.length for a in answers) / count
    for key in ("cost", "kl_to_reference"):
        values = [getattr(a, key) for a in answers if getattr(a, key) is not None]
        if values:
            summary[key] = sum(values) / len(values)
    summary["responses"] = count
    return summary


def answers_of(policy, name, decoding, prompts, tokenizer, reward_model, cost_model, settings, reference) -> List[SafeAnswer]:
    """Every held-out prompt answered by `policy`; sampled answers also get their cost."""
    do_sample = decoding == "sampled"
    common = dict(do_sample=do_sample, num_prompts=len(prompts.texts))
    generations = generate_and_score(
        policy, prompts.dataset, tokenizer, reward_model, settings, reference=reference, description=f"{name} {decoding}", **common
    )
    costs = [None] * len(generations)
    if do_sample:
        # The same seed again draws the same answers; the cost model scores them in place of the
        # reward model (generate_and_score scores with one model).
        costed = generate_and_score(policy, prompts.dataset, tokenizer, cost_model, settings, description=f"{name} cost", **common)
        if [g.response for g in costed] != [g.response for g in generations]:
            raise RuntimeError(f"{name}: the cost pass drew other answers than the reward pass with the same seed")
        costs = [g.reward for g in costed]
    answers = []
    for generation, cost in zip(generations, costs):
        prompt = prompts.texts[generation.prompt_index]
        answers.append(
            SafeAnswer(
                policy=name, decoding=decoding, prompt=prompt, response=generation.response,
                verdict=rule_verdict(prompt, generation.response), finished=generation.finished,
                length=generation.length, reward=generation.reward, cost=cost, kl_to_reference=generation.kl_to_reference,
            )
        )  # fmt: skip
    return answers


def side_by_side(sampled: Dict[str, List[SafeAnswer]], copies: int, count: int) -> List[dict]:
    """The first sampled answer of each policy to `count` prompts spread evenly over the held-out
    set (fixed positions, not chosen by outcome)."""
    prompts = len(sampled["sft"]) // copies
    if prompts == 0 or any(len(answers) != len(sampled["sft"]) for answers in sampled.values()):
        raise ValueError(f"every policy needs the same number of answers, {copies} per prompt")
    picks = sorted({round(i * (prompts - 1) / max(count - 1, 1)) for i in range(min(count, prompts))})
    rows = []
    for index in picks:
        row = {"prompt": sampled["sft"][index * copies].prompt}
        for name, answers in sampled.items():
            answer = answers[index * copies]
            row[name], row[f"{name}_unsafe"], row[f"{name}_helpfulness"] = answer.response, answer.verdict.unsafe, answer.verdict.helpfulness
        rows.append(row)
    return rows


def load_cost_model(path: str):
    from ppo.models import AutoModelForScore
    from ppo.models.kernels import cpu_safe_config_overrides

    model = AutoModelForScore.from_pretrained(path, dtype="float32", score_type="cost", do_normalize=False, **cpu_safe_config_overrides())
    model.eval()
    return model


def evaluate_safe(
    policy_paths: Dict[str, str],
    reward_model_path: str,
    cost_model_path: str,
    prompts_spec: str,
    settings: SamplingSettings,
    max_prompts: Optional[int] = None,
    num_samples_shown: int = 3,
    generations_path: Optional[str] = None,
) -> dict:
    """Sample, judge and score every policy of `policy_paths` (POLICIES -> directory; "sft" is
    also the KL reference) on the same held-out prompts."""
    if set(policy_paths) != set(POLICIES):
        raise ValueError(f"policy_paths must name {POLICIES}, got {sorted(policy_paths)}")
    tokenizer = load_tokenizer(policy_paths["sft"])
    for name in POLICIES[1:]:
        if load_tokenizer(policy_paths[name]).get_vocab() != tokenizer.get_vocab():
            raise ValueError(f"{policy_paths[name]} ({name}) and {policy_paths['sft']} have different tokenizers")
    models = {name: load_causal_lm(policy_paths[name]) for name in POLICIES}
    reward_model, cost_model = load_reward_model(reward_model_path), load_cost_model(cost_model_path)
    max_prompt_length = models["sft"].config.max_position_embeddings - settings.max_new_tokens
    prompts = PromptSet.load(prompts_spec, tokenizer, max_length=max_prompt_length, max_prompts=max_prompts)

    results = {"settings": {**asdict(settings), "prompts": len(prompts.texts), "prompts_spec": prompts_spec}}
    runs = {}
    for decoding in ("sampled", "greedy"):
        for name in POLICIES:
            reference = None if name == "sft" else models["sft"]
            runs[(name, decoding)] = answers_of(
                models[name], name, decoding, prompts, tokenizer, reward_model, cost_model, settings, reference
            )
            results[name if decoding == "sampled" else f"{name}_greedy"] = aggregate_answers(runs[(name, decoding)])
    sampled = {name: runs[(name, "sampled")] for name in POLICIES}
    results["samples"] = side_by_side(sampled, settings.samples_per_prompt, num_samples_shown)
    if generations_path:
        os.makedirs(os.path.dirname(os.path.abspath(generations_path)), exist_ok=True)
        with open(generations_path, "w", encoding="utf-8") as handle:
            for answers in runs.values():
                for answer in answers:
                    handle.write(json.dumps(asdict(answer)) + "\n")
    return results


def main(argv: Optional[Sequence[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sft", required=True, help="SFT model directory (the policy before RL and the KL reference)")
    parser.add_argument("--ppo", required=True, help="plain PPO policy directory (output_dir/policy)")
    parser.add_argument("--ppo-lag", required=True, help="PPO-Lagrangian policy directory (output_dir/policy)")
    parser.add_argument("--reward-model", required=True, help="reward model directory (trained on the helpfulness labels)")
    parser.add_argument("--cost-model", required=True, help="cost model directory (output_dir of rm/run_cost.py)")
    parser.add_argument("--prompts", required=True, help="held-out prompt datasets, e.g. PKU-SafeRLHF/test:1:DIR/prompts/test.jsonl")
    parser.add_argument("--output", required=True, help="JSON file to write the results to")
    parser.add_argument("--generations", default=None, help="optional JSON-lines file for every judged answer")
    defaults = SamplingSettings()
    parser.add_argument("--samples-per-prompt", type=int, default=defaults.samples_per_prompt)
    parser.add_argument("--temperature", type=float, default=defaults.temperature)
    parser.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens)
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seed of the sampling (the same for every policy)")
    parser.add_argument("--max-prompts", type=int, default=None, help="evaluate only the first N held-out prompts")
    args = parser.parse_args(argv)
    try:
        settings = SamplingSettings(
            samples_per_prompt=args.samples_per_prompt, temperature=args.temperature,
            max_new_tokens=args.max_new_tokens, seed=args.seed,
        )  # fmt: skip
    except ValueError as error:
        parser.error(str(error))
    results = evaluate_safe(
        {"sft": args.sft, "ppo": args.ppo, "ppo_lag": args.ppo_lag}, args.reward_model, args.cost_model, args.prompts,
        settings, max_prompts=args.max_prompts, generations_path=args.generations,
    )  # fmt: skip
    check_finite(results)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output + ".tmp", "w", encoding="utf-8") as handle:
        json.dump(results, handle, indent=2)
        handle.write("\n")
    os.replace(args.output + ".tmp", args.output)
    for block in (*POLICIES, *(f"{name}_greedy" for name in POLICIES)):
        values = results[block]
        print(
            f"[safe_evaluate] {block:<15} unsafe {values['unsafe_share']:.3f}, helpfulness {values['helpfulness']:.3f}, "
            f"judge {values['judge_score']:.3f}, reward {values['reward']:+.3f}"
            + (f", cost {values['cost']:+.3f}" if "cost" in values else ""),
            flush=True,
        )
    return results


if __name__ == "__main__":
    main()
