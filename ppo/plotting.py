"""Training curves as a PNG, from the JSON-lines metrics every stage writes."""

from __future__ import annotations

import json
from typing import Optional, Sequence

DEFAULT_PANELS = (
    ("reward", ("train/reward", "eval/reward")),
    ("KL to reference", ("train/kl_divergence",)),
    ("actor loss", ("train/actor_loss",)),
    ("critic loss", ("train/reward_critic_loss",)),
    ("ptx loss", ("train/ptx_loss",)),
    ("response length", ("train/mean_generated_length",)),
)


def read_metrics(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_training_curves(metrics_path: str, png_path: str, panels: Optional[Sequence] = None, title: str = "PPO") -> str:
    """One panel per metric group, x = optimizer step; panels with no data are left out."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    panels = [
        (label, keys)
        for label, keys in (panels or DEFAULT_PANELS)
        if any(key in record for record in records for key in keys)
    ]
    if not panels:
        raise ValueError(f"{metrics_path} has none of the metrics to plot")
    columns = min(3, len(panels))
    rows = (len(panels) + columns - 1) // columns
    figure, axes = plt.subplots(rows, columns, figsize=(4.5 * columns, 3.2 * rows), squeeze=False)
    for axis, (label, keys) in zip(axes.flat, panels):
        for key in keys:
            points = [(r["step"], r[key]) for r in records if key in r]
            if points:
                steps, values = zip(*points)
                axis.plot(steps, values, marker="." if len(points) < 30 else None, label=key)
        axis.set_title(label)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    for axis in list(axes.flat)[len(panels):]:
        axis.set_visible(False)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(png_path, dpi=110)
    plt.close(figure)
    return png_path
