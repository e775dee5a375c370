"""A shuffling sampler whose order depends only on ``(seed, epoch)``, so that a training run
resumed from a checkpoint sees exactly the batches the uninterrupted run would have seen.

``DataLoader(shuffle=True, generator=torch.Generator().manual_seed(seed))`` draws each epoch's
permutation from the generator's running state; a process restarted after a crash starts that
state over and would visit the images in another order. :class:`EpochSeededSampler` instead
derives epoch ``e``'s permutation from ``(seed, e)`` alone.
"""

from __future__ import annotations

from typing import Iterator, Sized

import numpy as np
import torch
from torch.utils.data import Sampler

__all__ = ["EpochSeededSampler", "epoch_permutation"]


def epoch_permutation(n: int, seed: int, epoch: int) -> list[int]:
    """The permutation of ``range(n)`` for ``epoch`` under ``seed`` (a pure function of the three).

    ``(seed, epoch)`` is mixed with NumPy's ``SeedSequence``, so nearby pairs (seed 0 epoch 1,
    seed 1 epoch 0) give unrelated orders."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(epoch) & 0xFFFFFFFF]).generate_state(2, np.uint32)
    g = torch.Generator()
    g.manual_seed(int(state[0]) << 31 | int(state[1]) >> 1)
    return torch.randperm(n, generator=g).tolist()


class EpochSeededSampler(Sampler[int]):
    """Random order per epoch, reproducible from ``(seed, epoch)``; no hidden state besides ``epoch``.

    Call :meth:`set_epoch` before each epoch (ignite: :meth:`attach` the sampler to the trainer, or
    let :class:`~monai_skipts.handlers.SkipTSCheckpointHandler` do it, which the bundles wire);
    ``epoch`` counts from 1 as ignite's ``engine.state.epoch`` does.

    Args:
        data_source: the dataset (only its length is used).
        seed: the run's seed.
        shuffle: ``False`` gives ``0..n-1`` every epoch.
    """

    def __init__(self, data_source: Sized, seed: int = 0, shuffle: bool = True):
        self.data_source = data_source
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.epoch = 1

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.data_source)

    def __iter__(self) -> Iterator[int]:
        n = len(self.data_source)
        return iter(epoch_permutation(n, self.seed, self.epoch) if self.shuffle else range(n))

    def attach(self, engine) -> None:
        """Set the epoch from ``engine.state.epoch`` at every ignite ``EPOCH_STARTED``."""
        from ignite.engine import Events

        engine.add_event_handler(Events.EPOCH_STARTED, lambda e: self.set_epoch(e.state.epoch))
