"""Where rollout prompts and their randomness come from: a resumable, rank-aware epoch sampler
over a dataset, and an RNG stream reserved for rollout sampling."""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, List

import numpy as np
import paddle

from ppo.checkpoint import SamplerState


class EpochSampler:
    """Deterministic batches of dataset indices: a fresh seeded permutation per epoch, this
    rank's share of each global batch, and a position that can be saved and restored.

    A global batch is `batch_size * num_replicas` indices; rank r takes slice r of it, so the
    ranks together see each sample exactly once per epoch. The last incomplete global batch is
    dropped (every rank must take the same number of steps).
    """

    def __init__(self, dataset_size: int, batch_size: int, seed: int, rank: int = 0, num_replicas: int = 1, shuffle: bool = True):
        if dataset_size < batch_size * num_replicas:
            raise ValueError(
                f"the dataset has {dataset_size} samples, fewer than one global batch of "
                f"{batch_size} x {num_replicas} ranks"
            )
        self.dataset_size, self.batch_size, self.seed = dataset_size, batch_size, seed
        self.rank, self.num_replicas, self.shuffle = rank, num_replicas, shuffle
        self.state = SamplerState()

    @property
    def batches_per_epoch(self) -> int:
        return self.dataset_size // (self.batch_size * self.num_replicas)

    def _order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.dataset_size)
        return np.random.default_rng(self.seed + epoch).permutation(self.dataset_size)

    def next_batch(self) -> List[int]:
        if self.state.batch_index >= self.batches_per_epoch:
            self.state = SamplerState(epoch=self.state.epoch + 1, batch_index=0)
        global_size = self.batch_size * self.num_replicas
        start = self.state.batch_index * global_size + self.rank * self.batch_size
        indices = self._order(self.state.epoch)[start : start + self.batch_size].tolist()
        self.state = SamplerState(self.state.epoch, self.state.batch_index + 1)
        return indices


def batch_iterator(dataset, sampler: EpochSampler, collate: Callable) -> Iterator[dict]:
    while True:
        yield collate([dataset[i] for i in sampler.next_batch()])


class RolloutRandomState:
    """A paddle RNG stream reserved for rollout sampling, seeded per data-parallel replica.

    PaddleNLP seeds the global generator per rank in a way that suits dropout, not rollout: in
    plain data parallel every rank gets the same seed (so all ranks would draw the same noise for
    their different prompts), and under pipeline parallel each stage gets another one (so the
    stages, which all generate the same rollout, would sample different responses). This stream
    depends only on `seed` and the data-parallel rank: the same on all tensor/pipeline ranks of
    one replica, different between replicas. Outside `active()` the global generator is untouched.
    """

    def __init__(self, seed: int):
        saved = paddle.get_rng_state()
        paddle.seed(seed)
        self.state = paddle.get_rng_state()
        paddle.set_rng_state(saved)

    @contextlib.contextmanager
    def active(self):
        saved = paddle.get_rng_state()
        paddle.set_rng_state(self.state)
        try:
            yield
        finally:
            self.state = paddle.get_rng_state()
            paddle.set_rng_state(saved)
