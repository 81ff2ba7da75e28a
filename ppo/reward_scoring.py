"""Scores of whole rollout sequences: a frozen score model's end score (reward or cost model),
re-tokenised when its vocabulary differs from the actor's, and the total reward of the reward
model and the rule-based reward functions (`ppo.rewards`).

Rollout sequences are [B, P+T]: a left-padded prompt of P columns, then the response. The
prompt's ids identify its conversation in the prompt datasets, which is how a prompt is
re-rendered from its raw turns for another tokenizer and how reward functions get the raw sample.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import paddle
from paddlenlp.utils.log import logger

from ppo.data.templates import build_template, special_prefix_ids
from ppo.models.ppo_model_utils import make_position_ids
from ppo.rewards import combine_scores, load_reward_functions, score_responses
from ppo.tokenizer_io import decode


def prompt_items(*prompt_datasets):
    """Every item of the given prompt datasets (None entries skipped)."""
    for dataset in prompt_datasets:
        for index in range(len(dataset) if dataset is not None else 0):
            yield dataset[index]


def real_tokens(ids: Sequence[int], mask: Sequence) -> List[int]:
    return [token for token, keep in zip(ids, mask) if keep]


def model_max_length(model) -> Optional[int]:
    """The longest sequence a model's position embeddings take (None when it does not say)."""
    config = getattr(model, "config", None)
    length = getattr(config, "max_position_embeddings", None)
    return int(length) if length else None


@paddle.no_grad()
def exclude_nonfinite_rewards(
    scores: paddle.Tensor,  # [B] total rewards, prompt-major groups of `group_size`
    attention_mask: paddle.Tensor,  # [B, P+T] bool
    prompt_length: int,
    group_size: int = 1,
) -> Tuple[paddle.Tensor, paddle.Tensor, int]:
    """(scores, attention_mask, count): responses whose reward is NaN/inf lose their response
    tokens from the mask, so they have no action token and add nothing to advantages, whitening
    or losses; their score becomes the mean of the finite scores of their group (0 when none), so
    a group estimator's baseline of the other responses is unchanged. count: how many."""
    finite = paddle.isfinite(scores)
    count = int((~finite).astype("int64").sum())
    if count == 0:
        return scores, attention_mask, 0
    zeros = paddle.zeros_like(scores)
    finite_scores = paddle.where(finite, scores, zeros).reshape([-1, group_size])
    finite_counts = finite.astype("float32").reshape([-1, group_size]).sum(axis=1, keepdim=True)
    group_means = finite_scores.sum(axis=1, keepdim=True) / paddle.clip(finite_counts, min=1.0)
    replaced = paddle.where(finite, scores, group_means.expand([-1, group_size]).reshape([-1]))
    keep_response = paddle.concat(
        [paddle.ones([scores.shape[0], prompt_length], dtype="bool"),
         finite.unsqueeze(-1).expand([scores.shape[0], attention_mask.shape[1] - prompt_length])],
        axis=1,
    )  # fmt: skip
    return replaced, attention_mask.astype("bool") & keep_response, count


class SequenceScorer:
    """End scores [B] of a frozen score model on rollout sequences.

    With its own tokenizer (`score_tokenizer`, None when it matches the actor's) it reads each
    conversation as it was trained on: the prompt datasets' template rendered by its tokenizer
    from the prompt's raw turns, plus the decoded response; without a known prompt, a plain-text
    template (safe-rlhf) is decoded and re-encoded turn by turn, keeping the end-of-turn token
    between turns and adding exactly one where the actor's response ended. Re-tokenised
    sequences longer than the model's position embeddings keep their last tokens (the end score
    reads the end), counted and warned once.
    """

    def __init__(
        self,
        model,
        tokenizer,
        score_tokenizer=None,
        template=None,
        stop_token_ids: Sequence[int] = (),
        prompt_datasets: Sequence = (),
        autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
        before_use: Callable[[], None] = lambda: None,
        name: str = "reward model",
    ):
        self.model, self.tokenizer, self.score_tokenizer = model, tokenizer, score_tokenizer
        self.template, self.stop_token_ids = template, tuple(stop_token_ids)
        self.autocast, self.before_use, self.name = autocast, before_use, name
        self.max_length = model_max_length(model)
        self.truncated = 0  # re-tokenised sequences cut to max_length
        self.score_template, self.prompt_turns = None, {}
        if score_tokenizer is not None and template is not None:
            # The same template rendered by the score model's tokenizer, and each known prompt's turns.
            self.score_template = build_template(template.NAME, score_tokenizer, template.system_prompt)
            for item in prompt_items(*prompt_datasets):
                if "turns" in item:
                    self.prompt_turns[tuple(item["input_ids"])] = (item["turns"], item.get("system"))

    @paddle.no_grad()
    def __call__(self, input_ids, attention_mask, prompt_length: Optional[int] = None) -> paddle.Tensor:  # [B]
        self.before_use()
        if self.score_tokenizer is not None:
            input_ids, attention_mask = self.retokenize(input_ids, attention_mask, prompt_length)
        with self.autocast():
            output = self.model(
                input_ids=input_ids,
                attention_mask=attention_mask.astype("int64"),
                position_ids=make_position_ids(attention_mask),
            )
        return output.end_scores[:, 0].astype("float32")

    def retokenize(self, input_ids, attention_mask, prompt_length: Optional[int] = None):
        """The sequences in the score model's tokenizer: (ids [B, L'], bool mask [B, L']), right-padded."""
        rows = []
        for ids, mask in zip(input_ids.tolist(), attention_mask.tolist()):
            real = real_tokens(ids, mask)
            prompt = None if prompt_length is None else real_tokens(ids[:prompt_length], mask[:prompt_length])
            conversation = None if prompt is None else self.prompt_turns.get(tuple(prompt))
            if conversation is not None:
                rows.append(self._rerender(*conversation, real[len(prompt) :]))
            elif self.template is not None and not self.template.IS_PLAIN_TEXT:
                raise ValueError(
                    f"cannot re-tokenise for the {self.name} a {self.template.NAME!r}-template sequence whose prompt is "
                    "not one of the prompt datasets' (its raw turns are needed to render it with the other tokenizer)"
                )
            else:
                rows.append(self._reencode_plain_text(real))
        rows = [self._fit(row) for row in rows]
        eos = self.score_tokenizer.eos_token_id
        pad = self.score_tokenizer.pad_token_id if self.score_tokenizer.pad_token_id is not None else eos
        width = max(len(row) for row in rows)
        ids = paddle.to_tensor([row + [pad] * (width - len(row)) for row in rows], dtype="int64")
        mask = paddle.to_tensor([[True] * len(row) + [False] * (width - len(row)) for row in rows])
        return ids, mask

    def _rerender(self, turns, system: Optional[str], response: List[int]) -> List[int]:
        """Prompt turns + the decoded response in the score tokenizer's template, ending with its
        end-of-turn token when the actor's response ended (not when it hit the length limit)."""
        ended = bool(response) and response[-1] in self.stop_token_ids
        answer = decode(self.tokenizer, response[:-1] if ended else response, skip_special_tokens=True)
        ids = self.score_template.encode_turns(list(turns) + [answer], system).input_ids
        return ids if ended else ids[:-1]  # the template closes every answer with its end-of-turn token

    def _reencode_plain_text(self, real: List[int]) -> List[int]:
        """Each piece between the actor's end-of-turn tokens decoded and encoded alone, joined by the
        score tokenizer's EOS, after its special prefix (BOS): no special token is lost or doubled."""
        pieces, current = [], []
        for token in real:
            if token in self.stop_token_ids:
                pieces.append((current, True))
                current = []
            else:
                current.append(token)
        if current:
            pieces.append((current, False))
        eos = self.score_tokenizer.eos_token_id
        ids = list(special_prefix_ids(self.score_tokenizer))
        for piece, ended in pieces:
            text = decode(self.tokenizer, piece, skip_special_tokens=True)
            if text:
                ids += self.score_tokenizer(text, add_special_tokens=False)["input_ids"]
            if ended:
                ids.append(eos)
        return ids

    def _fit(self, row: List[int]) -> List[int]:
        if self.max_length is None or len(row) <= self.max_length:
            return row
        if self.truncated == 0:
            logger.warning(
                f"a re-tokenised sequence has {len(row)} tokens, more than the {self.name}'s {self.max_length} "
                "positions: its last tokens are scored (further cases are counted, not logged)"
            )
        self.truncated += 1
        return row[-self.max_length :]


class RewardScorer:
    """The reward of whole sequences: the reward model's end score, or with `reward_functions`
    reward_model_weight x that score + the weighted function scores (see `ppo.rewards`)."""

    def __init__(
        self,
        model_scorer: Optional[SequenceScorer],
        tokenizer,
        stop_token_ids: Sequence[int],
        reward_functions: Sequence[str] = (),
        reward_function_weights=None,
        reward_model_weight: float = 1.0,
        prompt_datasets: Sequence = (),
    ):
        self.model_scorer, self.tokenizer, self.stop_token_ids = model_scorer, tokenizer, tuple(stop_token_ids)
        self.functions = load_reward_functions(reward_functions, reward_function_weights)
        self.reward_model_weight = reward_model_weight
        if model_scorer is None and (not self.functions or reward_model_weight != 0):
            raise ValueError(
                "no reward model: give reward_model_name_or_path, or reward_functions with reward_model_weight 0"
            )
        # prompt ids -> (the user turn answered, the raw sample), for the reward functions.
        self.prompt_samples: Dict[Tuple[int, ...], tuple] = {}
        if self.functions:
            for item in prompt_items(*prompt_datasets):
                self.prompt_samples[tuple(item["input_ids"])] = (item["turns"][-1], item.get("sample", {}))

    @paddle.no_grad()
    def __call__(
        self,
        input_ids: paddle.Tensor,  # [B, P+T] left-padded prompt, response
        attention_mask: paddle.Tensor,  # [B, P+T]
        prompt_length: Optional[int] = None,  # P; lets a prompt be re-rendered for another tokenizer
        breakdown: Optional[Dict[str, List[float]]] = None,  # filled with each reward function's scores
    ) -> paddle.Tensor:  # [B]
        if not self.functions:
            return self.model_scorer(input_ids, attention_mask, prompt_length)
        model_scores = None
        if self.model_scorer is not None and self.reward_model_weight != 0:
            model_scores = self.model_scorer(input_ids, attention_mask, prompt_length).tolist()
        prompts, responses, samples = self._texts(input_ids, attention_mask, prompt_length)
        scores = score_responses(self.functions, prompts, responses, samples)
        if breakdown is not None:
            for name, values in scores.items():
                breakdown.setdefault(name, []).extend(values)
        totals = combine_scores(self.functions, scores, model_scores, self.reward_model_weight)
        return paddle.to_tensor(totals, dtype="float32")

    def _texts(self, input_ids, attention_mask, prompt_length: int):
        prompts, responses, samples = [], [], []
        for ids, mask in zip(input_ids.tolist(), attention_mask.tolist()):
            prompt = tuple(real_tokens(ids[:prompt_length], mask[:prompt_length]))
            if prompt not in self.prompt_samples:
                raise ValueError("reward_functions need the prompt's raw sample, but a prompt is not one of the prompt datasets'")
            response = real_tokens(ids[prompt_length:], mask[prompt_length:])
            if response and response[-1] in self.stop_token_ids:
                response = response[:-1]
            prompt_text, sample = self.prompt_samples[prompt]
            prompts.append(prompt_text)
            responses.append(decode(self.tokenizer, response, skip_special_tokens=True))
            samples.append(sample)
        return prompts, responses, samples
