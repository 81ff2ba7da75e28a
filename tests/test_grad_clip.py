"""Global-norm clipping with `auto_skip_clip` (ppo/grad_clip.py): the same gradients as Paddle's
default clip whether or not the norm exceeds the bound, and every Trainer of the project uses it."""

import numpy as np
import paddle
import pytest
from paddlenlp.trainer import Trainer, TrainingArguments

from ppo.grad_clip import SkipClipWithinNormMixin, skip_clip_within_norm
from ppo.tiny import build_tiny_causal_lm


def clipped(grads, clip_norm, auto_skip_clip):
    params = [paddle.create_parameter(g.shape, "float32") for g in grads]
    clip = paddle.nn.ClipGradByGlobalNorm(clip_norm, auto_skip_clip=auto_skip_clip)
    return [g.numpy() for _, g in clip(list(zip(params, [paddle.to_tensor(g.numpy()) for g in grads])))]


@pytest.mark.parametrize("clip_norm", [1e-3, 1e3])  # the norm above the bound, then within it
def test_skipping_the_unit_multiply_gives_the_same_gradients(clip_norm):
    rng = np.random.default_rng(0)
    grads = [paddle.to_tensor(rng.standard_normal(shape).astype("float32")) for shape in ([7, 5], [5], [3, 2, 4])]
    default, skipping = clipped(grads, clip_norm, False), clipped(grads, clip_norm, True)
    for a, b, original in zip(default, skipping, grads):
        np.testing.assert_array_equal(a, b)  # bit for bit
        if clip_norm > 1:
            np.testing.assert_array_equal(b, original.numpy())
    if clip_norm < 1:
        total = np.sqrt(sum(float((g.astype(np.float64) ** 2).sum()) for g in skipping))
        assert total == pytest.approx(clip_norm, rel=1e-5)


def test_project_trainers_create_a_skipping_clip(tmp_path):
    from rm.reward_trainer import RewardTrainer
    from sft.run_sft import SupervisedTrainer
    from ppo.trainer_utils import PolicyTrainer, ValueTrainer

    for trainer_class in (SupervisedTrainer, RewardTrainer, PolicyTrainer, ValueTrainer):
        assert issubclass(trainer_class, SkipClipWithinNormMixin), trainer_class

    class Probe(SkipClipWithinNormMixin, Trainer):
        pass

    args = TrainingArguments(output_dir=str(tmp_path), max_grad_norm=1.0, report_to=["none"])
    trainer = Probe(model=build_tiny_causal_lm(), args=args)
    trainer.create_optimizer_and_scheduler(num_training_steps=1)
    assert trainer.optimizer._grad_clip.auto_skip_clip is True
    # No clip configured: nothing to change.
    optimizer = paddle.optimizer.AdamW(parameters=build_tiny_causal_lm().parameters())
    skip_clip_within_norm(optimizer)
    assert optimizer._grad_clip is None
