"""PPO-Lagrangian's math (safe-rlhf's `ppo_lag`), free of trainer state.

The constrained objective max_θ J_r(θ) s.t. J_c(θ) ≤ d becomes the saddle point
min_{λ≥0} max_θ J_r(θ) − λ·(J_c(θ) − d):

- the actor ascends on `lagrangian_advantages` = (A_r − λ·A_c) / (1 + λ); dividing by 1 + λ
  keeps the advantage scale (and so the effective step size) the same whatever λ is;
- λ takes a gradient-ascent step on J_c − d, where J_c is the mean episode cost over the last
  `episode_cost_window_size` episodes (`LagrangeMultiplier`).

λ lives in log space, λ = exp(log λ), which keeps it positive without a projection. safe-rlhf
minimises `−(J_c − d)·exp(log λ)` with plain SGD on log λ; the step that gives,
log λ ← log λ + lambda_lr · (J_c − d) · λ, is computed here in closed form (no autograd, no
optimizer object), followed by the clamp log λ ≤ log(lambda_max).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Iterable, Optional

import paddle


@dataclass(kw_only=True)
class LagrangianArguments:
    """The multiplier's keys, with safe-rlhf's names and defaults. Meant to be mixed into the
    PPO arguments: their `__post_init__` should call `check_lagrangian_arguments()`."""

    threshold: float = field(
        default=0.0,
        metadata={"help": "Cost limit d on the mean episode cost. A cost model trained with the sign term gives safe "
                          "answers negative and unsafe ones positive costs, so 0 means 'safe on average'."},
    )  # fmt: skip
    lambda_init: float = field(default=1.0, metadata={"help": "Initial Lagrange multiplier λ (> 0; it is kept in log space)."})
    lambda_lr: float = field(
        default=0.1, metadata={"help": "Learning rate of the gradient-ascent step on log λ (SGD, no momentum)."}
    )
    lambda_max: Optional[float] = field(
        default=None, metadata={"help": "Upper bound on λ (None: unbounded). Keeps one costly phase from freezing the actor."}
    )
    lambda_update_delay_steps: int = field(
        default=0, metadata={"help": "Global steps before λ starts to move (λ stays lambda_init until then)."}
    )
    episode_cost_window_size: int = field(
        default=128, metadata={"help": "Number of most recent episode costs whose mean drives the λ update."}
    )

    def check_lagrangian_arguments(self) -> None:
        if not (isinstance(self.lambda_init, (int, float)) and self.lambda_init > 0 and math.isfinite(self.lambda_init)):
            raise ValueError(f"lambda_init must be a finite number > 0 (λ is kept as log λ), got {self.lambda_init!r}")
        if not self.lambda_lr >= 0:
            raise ValueError(f"lambda_lr must be >= 0, got {self.lambda_lr!r}")
        if self.lambda_max is not None and not self.lambda_max >= self.lambda_init:
            raise ValueError(
                f"lambda_max must be None or >= lambda_init = {self.lambda_init}, got {self.lambda_max!r}"
            )
        if not math.isfinite(self.threshold):
            raise ValueError(f"threshold must be a finite number, got {self.threshold!r}")
        delay = self.lambda_update_delay_steps
        if isinstance(delay, bool) or not isinstance(delay, int) or delay < 0:
            raise ValueError(f"lambda_update_delay_steps must be an integer >= 0, got {delay!r}")
        window = self.episode_cost_window_size
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"episode_cost_window_size must be an integer >= 1, got {window!r}")

    def __post_init__(self):
        self.check_lagrangian_arguments()


def lagrangian_advantages(
    reward_advantages: paddle.Tensor,  # [B, T]
    cost_advantages: paddle.Tensor,  # [B, T]
    multiplier: float,
) -> paddle.Tensor:  # [B, T]
    """(A_r − λ·A_c) / (1 + λ): the advantage the PPO-Lagrangian actor maximises. λ is a plain
    number (the multiplier is not trained through the actor loss)."""
    if not multiplier >= 0 or not math.isfinite(multiplier):
        raise ValueError(f"the Lagrange multiplier must be a finite number >= 0, got {multiplier!r}")
    if reward_advantages.shape != cost_advantages.shape:
        raise ValueError(
            f"reward and cost advantages must have one shape, got {reward_advantages.shape} and {cost_advantages.shape}"
        )
    return (reward_advantages - multiplier * cost_advantages) / (1.0 + multiplier)


class LagrangeMultiplier:
    """λ = exp(log λ), moved by gradient ascent on (mean episode cost − threshold).

    Feed each rollout's episode costs with `add_episode_costs`; call `update(global_step)` once
    per step. Under data parallelism, average `mean_episode_cost()` across processes and pass
    it to `update` so every process takes the same step (safe-rlhf averages the per-process
    window means, then updates on one process and broadcasts).
    """

    def __init__(self, args: LagrangianArguments):
        args.check_lagrangian_arguments()
        self.threshold = float(args.threshold)
        self.lambda_lr = float(args.lambda_lr)
        self.log_lambda = math.log(args.lambda_init)
        self.log_lambda_max = None if args.lambda_max is None else math.log(args.lambda_max)
        self.update_delay_steps = int(args.lambda_update_delay_steps)
        self.episode_costs: deque = deque(maxlen=int(args.episode_cost_window_size))
        self.num_updates = 0

    @property
    def value(self) -> float:
        """The current λ (≥ 0)."""
        return math.exp(self.log_lambda)

    def add_episode_costs(self, costs: Iterable[float]) -> None:
        """Append episode costs (one per response, e.g. the cost model's end scores); the window
        keeps the latest `episode_cost_window_size`."""
        values = [float(cost) for cost in (costs.tolist() if hasattr(costs, "tolist") else costs)]
        if not all(math.isfinite(value) for value in values):
            raise ValueError(f"episode costs must be finite, got {values}")
        self.episode_costs.extend(values)

    def mean_episode_cost(self) -> float:
        if not self.episode_costs:
            raise ValueError("no episode costs yet: call add_episode_costs with a rollout's costs before updating λ")
        return sum(self.episode_costs) / len(self.episode_costs)

    def update(self, global_step: int, mean_episode_cost: Optional[float] = None) -> bool:
        """One ascent step on log λ with J_c = `mean_episode_cost` (default: this window's mean),
        unless `global_step` < lambda_update_delay_steps. Returns whether λ was updated."""
        if global_step < self.update_delay_steps:
            return False
        episode_cost = self.mean_episode_cost() if mean_episode_cost is None else float(mean_episode_cost)
        # d/d(log λ) of the ascent objective (J_c − d)·λ is (J_c − d)·λ.
        self.log_lambda += self.lambda_lr * (episode_cost - self.threshold) * self.value
        if self.log_lambda_max is not None:
            self.log_lambda = min(self.log_lambda, self.log_lambda_max)
        self.num_updates += 1
        return True

    def state_dict(self) -> dict:
        """Everything an exact resume needs: log λ, the optimizer's state (plain SGD keeps only
        its learning rate; the update count is kept for logging) and the cost window."""
        return {
            "log_lambda": self.log_lambda,
            "optimizer": {"lambda_lr": self.lambda_lr, "num_updates": self.num_updates},
            "episode_costs": list(self.episode_costs),
            "episode_cost_window_size": self.episode_costs.maxlen,
        }

    def load_state_dict(self, state: dict) -> None:
        missing = {"log_lambda", "optimizer", "episode_costs", "episode_cost_window_size"} - set(state)
        if missing:
            raise KeyError(f"Lagrange multiplier state is missing {sorted(missing)}")
        if state["episode_cost_window_size"] != self.episode_costs.maxlen:
            raise ValueError(
                f"the saved cost window holds {state['episode_cost_window_size']} episodes but "
                f"episode_cost_window_size is {self.episode_costs.maxlen}: resume with the same value"
            )
        log_lambda = float(state["log_lambda"])
        if self.log_lambda_max is not None and log_lambda > self.log_lambda_max + 1e-12:
            raise ValueError(f"the saved λ = {math.exp(log_lambda)} is above lambda_max = {math.exp(self.log_lambda_max)}")
        self.log_lambda = log_lambda
        # The configured learning rate wins, as for the other optimizers on resume; only the
        # step count is restored.
        self.num_updates = int(state["optimizer"]["num_updates"])
        self.episode_costs.clear()
        self.episode_costs.extend(float(cost) for cost in state["episode_costs"])
