"""Judge a policy before and after PPO on the demo task's held-out prompts.

    python -m ppo.demo.evaluate --sft output/tiny/sft --policy output/tiny/ppo/policy \\
        --reward-model output/tiny/rm \\
        --prompts PKU-SafeRLHF/test:1:output/tiny/data/prompts/test.jsonl \\
        --output output/quickstart/evaluation.json [--samples-per-prompt 4 --seed 0]

Both policies answer every held-out prompt `samples_per_prompt` times with the same sampling
settings and the same seed. Each response gets:

* the independent judge's score (`ppo.demo.task.judge`) and its two components (right colour,
  polite closing), plus a fluency check (`is_well_formed`) that the judge does not reward;
* the reward model's end score of the whole conversation;
* for the PPO policy, the sampled estimate of its KL divergence from the SFT model:
  `sum_t log p_policy(y_t | ...) - log p_sft(y_t | ...)` over the response tokens (EOS included),
  with both distributions at the sampling temperature. Its mean over responses is
  KL(policy || SFT) per response, the quantity PPO's KL penalty keeps small.

A greedy pass (one deterministic answer per prompt) is reported too, since a user running the
model usually decodes greedily.

The output JSON holds the settings, one block of aggregates per (policy, decoding) and a few
side-by-side samples; `--generations` additionally writes every scored response as JSON lines.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import asdict, dataclass
from typing import List, Optional, Sequence

from ppo.runtime import prepare_process

prepare_process()  # before Paddle loads (run as `python -m ppo.demo.evaluate`)

import paddle  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from ppo.data.templates import DEFAULT_TEMPLATE  # noqa: E402
from ppo.demo import task  # noqa: E402
from ppo.model_import import resolve_model_path  # noqa: E402
from ppo.model_io import load_tokenizer  # noqa: E402
from ppo.tokenizer_io import decode  # noqa: E402
from ppo.models.kernels import cpu_safe_config_overrides  # noqa: E402

# Room for the longest answer of the demo task (opener + answer + closing is at most ~15 pieces
# with the demo tokenizer) with slack to see whether a policy rambles.
DEFAULT_MAX_NEW_TOKENS = 32


@dataclass(frozen=True)
class SamplingSettings:
    """How responses are drawn; the same settings serve both policies."""

    samples_per_prompt: int = 4
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    prompts_per_batch: int = 64
    seed: int = 0

    def __post_init__(self):
        for name in ("samples_per_prompt", "max_new_tokens", "prompts_per_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass
class ScoredResponse:
    """One response to one held-out prompt, with everything measured on it."""

    prompt: str  # the user's text (without the conversation template)
    response: str  # decoded response, special tokens removed
    judge: float  # in {0, 0.5, 1}
    correct_colour: bool
    polite: bool
    well_formed: bool
    finished: bool  # ended with EOS within max_new_tokens
    length: int  # response tokens, EOS included
    reward: float  # reward-model end score of prompt + response
    kl_to_reference: Optional[float]  # sum over response tokens of log p_policy - log p_reference


@dataclass
class PromptSet:
    """Held-out prompts: the raw texts (for the judge) and their tokenised, left-padded form."""

    texts: List[str]
    dataset: "object"  # ppo.data.PromptOnlyDataset

    @classmethod
    def load(
        cls,
        spec: str,
        tokenizer,
        max_length: int,
        max_prompts: Optional[int] = None,
        prompt_template: str = DEFAULT_TEMPLATE,
        system_prompt: Optional[str] = None,
    ) -> "PromptSet":
        """`prompt_template` / `system_prompt`: the conversation template the policies were trained
        with (see `ppo.data.templates`)."""
        from ppo.data import PromptOnlyDataset, RawDataset

        dataset = PromptOnlyDataset(
            spec, tokenizer, max_length=max_length, seed=0, prompt_template=prompt_template, system_prompt=system_prompt
        )
        names = [one.name for one in dataset.specs]
        if len(set(names)) != len(names):
            # Rows are traced back to their raw text by dataset name and row index.
            raise ValueError(f"each prompt dataset name may appear once in {spec!r}, got {names}")
        raw = {one.name: RawDataset.load(one.name, one.path) for one in dataset.specs}
        texts = []
        for ref in dataset.sources:
            text = raw[ref.dataset][ref.index]["input"]
            if not isinstance(text, str):
                raise ValueError(f"{ref}: the demo task has single-turn prompts, got a dialogue {text!r}")
            task.prompt_colour(text)  # fails early, naming the prompt, if it is not a demo-task prompt
            texts.append(text)
        if max_prompts is not None:
            if max_prompts < 1:
                raise ValueError(f"max_prompts must be >= 1, got {max_prompts}")
            texts = texts[:max_prompts]
        return cls(texts=texts, dataset=dataset)


def load_causal_lm(path: str):
    from paddlenlp.transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype="float32", **cpu_safe_config_overrides())
    model.eval()
    return model


def load_reward_model(path: str):
    from ppo.models import AutoModelForScore

    model = AutoModelForScore.from_pretrained(
        path, dtype="float32", score_type="reward", do_normalize=False, **cpu_safe_config_overrides()
    )
    model.eval()
    return model


@paddle.no_grad()
def response_log_probs(
    model,
    sequences: paddle.Tensor,  # [N, P+T] left-padded prompt, response, pad
    attention_mask: paddle.Tensor,  # [N, P+T] bool, real tokens incl. EOS
    prompt_length: int,
    temperature: float,
) -> paddle.Tensor:  # [N] float32
    """Sum over each response's tokens (EOS included) of log softmax(logits / temperature)."""
    from ppo.models.ppo_model_utils import action_mask_from, gather_log_probs, make_position_ids, masked_sum

    logits = model(
        input_ids=sequences,
        attention_mask=attention_mask.astype("int64"),
        position_ids=make_position_ids(attention_mask),
        return_dict=True,
    ).logits  # [N, P+T, V]
    token_log_probs = gather_log_probs(logits[:, :-1].astype("float32") / temperature, sequences[:, 1:])  # [N, P+T-1]
    return masked_sum(token_log_probs, action_mask_from(attention_mask, prompt_length), axis=-1)


@paddle.no_grad()
def reward_scores(reward_model, sequences: paddle.Tensor, attention_mask: paddle.Tensor) -> paddle.Tensor:  # [N]
    from ppo.models.ppo_model_utils import make_position_ids

    output = reward_model(
        input_ids=sequences, attention_mask=attention_mask.astype("int64"), position_ids=make_position_ids(attention_mask)
    )
    return output.end_scores[:, 0].astype("float32")


@dataclass
class Generation:
    """One response to one prompt of a prompt dataset, with what every evaluation measures."""

    prompt_index: int  # item of the prompt dataset
    response: str  # decoded, special tokens removed
    finished: bool  # ended with a stop token within max_new_tokens
    length: int  # response tokens, stop token included
    reward: float  # reward-model end score of prompt + response
    kl_to_reference: Optional[float]  # sum over response tokens of log p_policy - log p_reference


def generate_and_score(
    policy,
    dataset,
    tokenizer,
    reward_model,
    settings: SamplingSettings,
    do_sample: bool = True,
    reference=None,
    description: str = "generate",
    num_prompts: Optional[int] = None,
) -> List[Generation]:
    """The first `num_prompts` (default: all) prompts of `dataset` (a `PromptOnlyDataset`, in
    the policy's template) answered `samples_per_prompt` times (once when greedy); each answer
    scored by the reward model (which must share the policy's tokenizer) and, with `reference`,
    given its KL estimate against it."""
    from ppo.infer_utils import RolloutEngine

    # No fused (GPU) backend: both policies go through the same dynamic-graph sampler.
    # Responses end at the template's end-of-turn token (EOS for safe-rlhf), as in PPO rollouts.
    stop_token_ids = dataset.stop_token_ids
    engine = RolloutEngine(policy, eos_token_id=stop_token_ids, pad_token_id=tokenizer.pad_token_id, use_fusemt=False)
    copies = settings.samples_per_prompt if do_sample else 1
    num_prompts = len(dataset) if num_prompts is None else num_prompts
    collate = dataset.get_collator()
    # The same seed before each policy: both draw from the same random stream.
    paddle.seed(settings.seed)
    generations = []
    progress = tqdm(total=num_prompts * copies, desc=description, unit="answer", dynamic_ncols=True)
    for start in range(0, num_prompts, settings.prompts_per_batch):
        batch = collate([dataset[i] for i in range(start, min(start + settings.prompts_per_batch, num_prompts))])
        rollout = engine.generate(
            batch["input_ids"],
            batch["attention_mask"],
            max_new_tokens=settings.max_new_tokens,
            num_return_sequences=copies,
            do_sample=do_sample,
            temperature=settings.temperature,
            top_p=settings.top_p,
        )
        rewards = reward_scores(reward_model, rollout.sequences, rollout.attention_mask).tolist()
        kls = [None] * len(rewards)
        if reference is not None:
            # Greedy decoding has no sampling distribution; the KL of its tokens is still the log
            # ratio of the two models at the temperature used, so it is computed the same way.
            policy_lp = response_log_probs(policy, rollout.sequences, rollout.attention_mask, rollout.prompt_length, settings.temperature)
            reference_lp = response_log_probs(reference, rollout.sequences, rollout.attention_mask, rollout.prompt_length, settings.temperature)
            kls = (policy_lp - reference_lp).tolist()
        lengths = rollout.response_lengths.tolist()
        sequences = rollout.sequences[:, rollout.prompt_length :].tolist()
        for row, (tokens, length, reward, kl) in enumerate(zip(sequences, lengths, rewards, kls)):
            response_tokens = tokens[:length]
            generations.append(
                Generation(
                    prompt_index=start + row // copies,
                    response=decode(tokenizer, response_tokens, skip_special_tokens=True).strip(),
                    finished=bool(response_tokens) and response_tokens[-1] in stop_token_ids,
                    length=int(length),
                    reward=float(reward),
                    kl_to_reference=None if kl is None else float(kl),
                )
            )
        progress.update(len(lengths))
    progress.close()
    return generations


def sample_and_score(
    policy,
    prompts: PromptSet,
    tokenizer,
    reward_model,
    settings: SamplingSettings,
    do_sample: bool = True,
    reference=None,
    description: str = "generate",
) -> List[ScoredResponse]:
    """Every prompt answered `samples_per_prompt` times (once when greedy), each answer scored
    and judged. `reference` given: each answer also gets its KL estimate against it."""
    generations = generate_and_score(
        policy, prompts.dataset, tokenizer, reward_model, settings, do_sample=do_sample,
        reference=reference, description=description, num_prompts=len(prompts.texts),
    )  # fmt: skip
    scored = []
    for generation in generations:
        prompt, response = prompts.texts[generation.prompt_index], generation.response
        scored.append(
            ScoredResponse(
                prompt=prompt,
                response=response,
                judge=task.judge(prompt, response),
                correct_colour=task.is_correct(prompt, response),
                polite=task.is_polite(response),
                well_formed=task.is_well_formed(response),
                finished=generation.finished,
                length=generation.length,
                reward=generation.reward,
                kl_to_reference=generation.kl_to_reference,
            )
        )
    return scored


def aggregate(responses: Sequence[ScoredResponse]) -> dict:
    """Means over responses: judge score and its components, fluency, reward, length, KL."""
    if not responses:
        raise ValueError("aggregate needs at least one scored response")
    count = len(responses)

    def mean(values):
        return sum(values) / count

    summary = {
        "judge_score": mean([r.judge for r in responses]),
        "colour_accuracy": mean([r.correct_colour for r in responses]),
        "politeness_rate": mean([r.polite for r in responses]),
        "well_formed_rate": mean([r.well_formed for r in responses]),
        "finished_rate": mean([r.finished for r in responses]),
        "reward": mean([r.reward for r in responses]),
        "mean_length": mean([r.length for r in responses]),
        "responses": count,
    }
    kls = [r.kl_to_reference for r in responses if r.kl_to_reference is not None]
    if kls:
        summary["kl_to_reference"] = sum(kls) / len(kls)
    return summary


def side_by_side(runs: dict, copies: int, count: int) -> List[dict]:
    """Answers of both policies to `count` prompts spread evenly over the held-out set (fixed
    positions, not chosen by outcome): the first sampled answer and the greedy answer of each.
    `runs` maps (policy, decoding) to its scored responses, `copies` sampled answers per prompt."""
    sampled_sft, sampled_ppo = runs[("sft", "sampled")], runs[("ppo", "sampled")]
    prompts = len(sampled_sft) // copies
    if prompts == 0 or len(sampled_ppo) != len(sampled_sft):
        raise ValueError(f"expected as many PPO answers as SFT answers ({len(sampled_ppo)} vs {len(sampled_sft)}), {copies} per prompt")
    picks = sorted({round(i * (prompts - 1) / max(count - 1, 1)) for i in range(min(count, prompts))})
    rows = []
    for index in picks:
        row = {"prompt": sampled_sft[index * copies].prompt}
        for name in ("sft", "ppo"):
            for decoding, position in (("sampled", index * copies), ("greedy", index)):
                answer = runs[(name, decoding)][position]
                key = name if decoding == "sampled" else f"{name}_greedy"
                row[key], row[f"{key}_judge"] = answer.response, answer.judge
        rows.append(row)
    return rows


def evaluate(
    sft_path: str,
    policy_path: str,
    reward_model_path: str,
    prompts_spec: str,
    settings: SamplingSettings,
    max_prompts: Optional[int] = None,
    num_samples_shown: int = 3,
    generations_path: Optional[str] = None,
    prompt_template: str = DEFAULT_TEMPLATE,
    system_prompt: Optional[str] = None,
) -> dict:
    """Sample, judge and score the SFT model and the PPO policy on the same held-out prompts."""
    # Hugging Face directories and GGUF files → cached Paddle directories.
    sft_path = resolve_model_path(sft_path, role="sft")
    policy_path = resolve_model_path(policy_path, role="policy")
    reward_model_path = resolve_model_path(reward_model_path, role="reward_model")
    tokenizer = load_tokenizer(sft_path)
    policy_tokenizer = load_tokenizer(policy_path)
    if policy_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise ValueError(f"{policy_path} and {sft_path} have different tokenizers; the policy must come from that SFT model")
    sft, policy = load_causal_lm(sft_path), load_causal_lm(policy_path)
    reward_model = load_reward_model(reward_model_path)
    max_prompt_length = sft.config.max_position_embeddings - settings.max_new_tokens
    prompts = PromptSet.load(
        prompts_spec, tokenizer, max_length=max_prompt_length, max_prompts=max_prompts,
        prompt_template=prompt_template, system_prompt=system_prompt,
    )  # fmt: skip

    results = {"settings": {**asdict(settings), "prompts": len(prompts.texts), "prompts_spec": prompts_spec}}
    runs = {}
    for decoding, do_sample in (("sampled", True), ("greedy", False)):
        for name, model, reference in (("sft", sft, None), ("ppo", policy, sft)):
            runs[(name, decoding)] = sample_and_score(
                model, prompts, tokenizer, reward_model, settings, do_sample=do_sample,
                reference=reference, description=f"{name} {decoding}",
            )  # fmt: skip
            key = name if decoding == "sampled" else f"{name}_greedy"
            results[key] = aggregate(runs[(name, decoding)])
    results["samples"] = side_by_side(runs, settings.samples_per_prompt, num_samples_shown)
    if generations_path:
        os.makedirs(os.path.dirname(os.path.abspath(generations_path)), exist_ok=True)
        with open(generations_path, "w", encoding="utf-8") as handle:
            for (name, decoding), responses in runs.items():
                for response in responses:
                    handle.write(json.dumps({"policy": name, "decoding": decoding, **asdict(response)}) + "\n")
    return results


def check_finite(results: dict) -> None:
    """Every aggregate must be a finite number: a NaN here would silently poison the summary."""
    for block, values in results.items():
        if isinstance(values, dict) and block != "settings":
            bad = {k: v for k, v in values.items() if isinstance(v, float) and not math.isfinite(v)}
            if bad:
                raise FloatingPointError(f"non-finite evaluation results in {block}: {bad}")


def main(argv: Optional[Sequence[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sft", required=True, help="SFT model directory (the policy before PPO and the KL reference)")
    parser.add_argument("--policy", required=True, help="PPO policy directory (output_dir/policy of run_ppo.py)")
    parser.add_argument("--reward-model", required=True, help="reward model directory (output_dir of run_reward.py)")
    parser.add_argument("--prompts", required=True, help="held-out prompt datasets, e.g. PKU-SafeRLHF/test:1:DIR/prompts/test.jsonl")
    parser.add_argument("--output", required=True, help="JSON file to write the results to")
    parser.add_argument("--generations", default=None, help="optional JSON-lines file for every scored response")
    defaults = SamplingSettings()
    parser.add_argument("--samples-per-prompt", type=int, default=defaults.samples_per_prompt)
    parser.add_argument("--temperature", type=float, default=defaults.temperature)
    parser.add_argument("--top-p", type=float, default=defaults.top_p)
    parser.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens)
    parser.add_argument("--prompts-per-batch", type=int, default=defaults.prompts_per_batch)
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seed of the sampling (the same for both policies)")
    parser.add_argument("--max-prompts", type=int, default=None, help="evaluate only the first N held-out prompts")
    parser.add_argument("--num-samples-shown", type=int, default=3, help="side-by-side samples kept in the output")
    parser.add_argument("--prompt-template", default=DEFAULT_TEMPLATE, help="conversation template of the policies: safe-rlhf or chat")
    parser.add_argument("--system-prompt", default=None, help="system message of every conversation (chat template only)")
    args = parser.parse_args(argv)
    try:
        settings = SamplingSettings(
            samples_per_prompt=args.samples_per_prompt,
            temperature=args.temperature,
            top_p=args.top_p,
            max_new_tokens=args.max_new_tokens,
            prompts_per_batch=args.prompts_per_batch,
            seed=args.seed,
        )
    except ValueError as error:
        parser.error(str(error))
    results = evaluate(
        args.sft, args.policy, args.reward_model, args.prompts, settings,
        max_prompts=args.max_prompts, num_samples_shown=args.num_samples_shown, generations_path=args.generations,
        prompt_template=args.prompt_template, system_prompt=args.system_prompt,
    )  # fmt: skip
    check_finite(results)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output + ".tmp", "w", encoding="utf-8") as handle:
        json.dump(results, handle, indent=2)
        handle.write("\n")
    os.replace(args.output + ".tmp", args.output)
    for block in ("sft", "ppo", "sft_greedy", "ppo_greedy"):
        values = results[block]
        print(
            f"[evaluate] {block:<10} judge {values['judge_score']:.3f} (colour {values['colour_accuracy']:.3f}, "
            f"polite {values['politeness_rate']:.3f}), reward {values['reward']:+.3f}"
            + (f", KL {values['kl_to_reference']:.3f}" if "kl_to_reference" in values else ""),
            flush=True,
        )
    return results


if __name__ == "__main__":
    main()
