"""Training that resumes exactly: a shuffle that can start part-way through an epoch, and saved random states.

A run killed mid-epoch and resumed from its last checkpoint (``anomalib train ... --ckpt_path``) must
finish with the weights and metrics of a run that was never interrupted. Lightning restores the
weights, optimiser, schedulers and loop counters; two things are missing, and live here:

- which training images of the interrupted epoch were already used: :class:`EpochShuffleSampler`
  draws each epoch's order from ``(seed, epoch)`` alone and can start that order at a given batch,
  which :class:`~anomalib_multiclass.MultiClassAD` sets from its checkpoint state;
- the global random generators (torch, CUDA, numpy, Python) that the synthetic anomalies, prompt
  choices, diffusion noise and dropout draw from: the models save them with each checkpoint
  (:func:`collect_random_states`) and set them again (:func:`restore_random_states`) when the
  resumed run reaches its first training epoch or batch, so that whatever ran in between (setup,
  caching, the loader's prefetch) changes nothing.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from lightning.fabric.utilities.seed import _collect_rng_states, _set_rng_states
from torch.utils.data import Sampler


class EpochShuffleSampler(Sampler[int]):
    """A random order of ``num_samples`` indices that depends only on ``(seed, epoch)``.

    Lightning calls :meth:`set_epoch` before each epoch. :meth:`resume_at` makes the next iteration
    yield the order of a given epoch from a given position on (the samples of the batches that the
    interrupted run had finished are skipped, not read).

    Args:
        num_samples: size of the dataset.
        seed: seed of the orders; the same seed gives the same order for every epoch.
    """

    def __init__(self, num_samples: int, seed: int) -> None:
        super().__init__()
        self.num_samples = num_samples
        self.seed = seed
        self.epoch = 0
        self._resume: tuple[int, int] | None = None

    def set_epoch(self, epoch: int) -> None:
        """Use the order of ``epoch`` from the next iteration on."""
        self.epoch = epoch

    def resume_at(self, epoch: int, start: int) -> None:
        """Make the next iteration yield ``epoch``'s order from position ``start`` on."""
        self._resume = (epoch, start)

    def __iter__(self) -> Iterator[int]:
        epoch, start = self._resume or (self.epoch, 0)
        self._resume = None
        generator = torch.Generator().manual_seed(self.seed + epoch)
        yield from torch.randperm(self.num_samples, generator=generator)[start:].tolist()

    def __len__(self) -> int:
        """The full epoch: Lightning counts a resumed epoch's batches from where it stopped."""
        return self.num_samples


RANDOM_STATES_KEY = "random_states"


def collect_random_states() -> dict[str, Any]:
    """The global torch, CUDA (when present), numpy and Python random states, as checkpoint-safe values.

    numpy's state is stored as a tensor and plain numbers, so that the checkpoint still loads with
    ``torch.load(weights_only=True)`` (which Lightning uses to resume).
    """
    states = _collect_rng_states(include_cuda=torch.cuda.is_available())
    algorithm, keys, position, has_gauss, cached_gaussian = states["numpy"]
    states["numpy"] = [algorithm, torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss),
                       float(cached_gaussian)]
    return states


def restore_random_states(states: dict[str, Any]) -> None:
    """Set the global random states saved by :func:`collect_random_states` (CUDA's only where CUDA is)."""
    states = dict(states)
    algorithm, keys, position, has_gauss, cached_gaussian = states["numpy"]
    states["numpy"] = (algorithm, keys.numpy().astype(np.uint32), position, has_gauss, cached_gaussian)
    if not torch.cuda.is_available():
        states.pop("torch.cuda", None)
    _set_rng_states(states)
