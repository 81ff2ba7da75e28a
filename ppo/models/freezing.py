"""Train only the top of a model: freeze the embeddings and the lower decoder layers.

On a CPU the backward pass is what makes a training step expensive (about twice the forward).
Frozen lower layers need no backward at all (nothing below them asks for a gradient), so training
the top few layers of a 30-layer model costs little more than a forward pass. It is also the
usual choice when a reward head is fitted on a few hundred pairs: the pretrained features stay
intact and the few trained parameters are less prone to overfitting.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class TrainableParameters:
    """What `train_top_layers_only` left trainable."""

    trainable_layers: int
    total_layers: int
    trainable: int  # parameters (elements) still trained
    total: int

    def describe(self) -> str:
        share = self.trainable / max(self.total, 1)
        return (
            f"training the top {self.trainable_layers} of {self.total_layers} decoder layers, the final norm and the "
            f"head: {self.trainable:,} of {self.total:,} parameters ({share:.1%})"
        )


def _count(parameters) -> int:
    return sum(int(parameter.size) for parameter in parameters)


def train_top_layers_only(model, top_layers: Optional[int], key: str = "train_top_layers") -> Optional[TrainableParameters]:
    """Freeze (`stop_gradient = True`) every backbone parameter outside its top `top_layers`
    decoder layers and its final norm; parameters outside the backbone (a score or LM head) stay
    trainable. None: nothing is frozen, None is returned. `key` names the setting in errors."""
    if top_layers is None:
        return None
    backbone = getattr(model, "base_model", None)
    layers = getattr(backbone, "layers", None)
    if backbone is None or backbone is model or layers is None:
        raise ValueError(f"{key} needs a model whose backbone has decoder `layers` (Llama, Qwen2); got {type(model).__name__}")
    if isinstance(top_layers, bool) or not isinstance(top_layers, int) or not 0 <= top_layers <= len(layers):
        raise ValueError(f"{key} must be an integer from 0 to {len(layers)} (the model's decoder layers), got {top_layers!r}")
    kept = {id(parameter) for layer in list(layers)[len(layers) - top_layers :] for parameter in layer.parameters()}
    norm = getattr(backbone, "norm", None)
    if norm is not None:
        kept.update(id(parameter) for parameter in norm.parameters())
    for parameter in backbone.parameters():
        if id(parameter) not in kept:
            parameter.stop_gradient = True
    parameters = list(model.parameters())
    return TrainableParameters(
        trainable_layers=top_layers,
        total_layers=len(layers),
        trainable=_count(p for p in parameters if not p.stop_gradient),
        total=_count(parameters),
    )
