"""Training that resumes exactly: a shuffle that can start part-way through an epoch, and saved random states.

A run killed mid-epoch and resumed from its last checkpoint (``anomalib train ... --ckpt_path``) must
finish with the weights and metrics of a run that was never interrupted. Lightning restores the
weights, optimiser, schedulers and loop counters; two things are missing, and live here:

- which training images of the interrupted epoch were already used: :class:`EpochShuffleSampler`
  draws each epoch's order from ``(seed, epoch)`` alone and can start that order at a given batch,
  which :class:`~anomalib_multiclass.MultiClassAD` sets from its checkpoint state;
- the global random generators (torch, CUDA, numpy, Python) that the synthetic anomalies, prompt
  choices, diffusion noise and dropout draw from: the models save them with each checkpoint
  (:func:`gather_random_states`: every rank's under DDP) and set them again
  (:func:`restore_random_states`) when the resumed run reaches its first training epoch or batch,
  so that whatever ran in between (setup, caching, the loader's prefetch) changes nothing.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from lightning.fabric.utilities.seed import _collect_rng_states, _set_rng_states
from torch.utils.data import DistributedSampler


class EpochShuffleSampler(DistributedSampler):
    """A random order of ``num_samples`` indices that depends only on ``(seed, epoch)``, sharded over ranks.

    Each epoch's order is ``randperm(num_samples)`` drawn from ``seed + epoch`` (as torch's
    :class:`~torch.utils.data.DistributedSampler` draws it), padded by repeating its start to a
    multiple of ``num_replicas``; rank ``r`` takes positions ``r, r + num_replicas, ...``. With one
    process this is the whole order, unpadded. Being a ``DistributedSampler``, Lightning leaves it in
    place under DDP instead of wrapping it.

    Lightning calls :meth:`set_epoch` before each epoch. :meth:`resume_at` makes the next iteration
    yield this rank's share of a given epoch from a given position on (the samples of the batches that
    the interrupted run had finished are skipped, not read).

    Args:
        num_samples: size of the dataset.
        seed: seed of the orders; the same seed gives the same order for every epoch.
        num_replicas: number of processes (DDP world size).
        rank: this process's global rank.
    """

    def __init__(self, num_samples: int, seed: int, num_replicas: int = 1, rank: int = 0) -> None:
        super().__init__(range(num_samples), num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self._resume: tuple[int, int] | None = None

    def resume_at(self, epoch: int, start: int) -> None:
        """Make the next iteration yield ``epoch``'s order (this rank's share) from position ``start`` on."""
        self._resume = (epoch, start)

    def __iter__(self) -> Iterator[int]:
        epoch, start = self._resume or (self.epoch, 0)
        self._resume = None
        generator = torch.Generator().manual_seed(self.seed + epoch)
        order = torch.randperm(len(self.dataset), generator=generator).tolist()
        padding = self.total_size - len(order)
        order += (order * (padding // max(len(order), 1) + 1))[:padding]
        yield from order[self.rank : self.total_size : self.num_replicas][start:]

    def __len__(self) -> int:
        """This rank's full epoch: Lightning counts a resumed epoch's batches from where it stopped."""
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


def gather_random_states() -> dict[str, Any] | list[dict[str, Any]]:
    """This process's random states (:func:`collect_random_states`); under DDP every rank's, as a list in rank order.

    Every rank draws its own synthetic anomalies, prompts and noise, so a resumed multi-process run
    needs each rank's states, not only those of rank 0 (which writes the checkpoint). Lightning builds
    the checkpoint on every rank, so this collective runs on all of them.
    """
    states = collect_random_states()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        world_size = torch.distributed.get_world_size()
        if world_size > 1:
            gathered: list[Any] = [None] * world_size
            torch.distributed.all_gather_object(gathered, states)
            return gathered
    return states


def random_states_of_rank(saved: dict[str, Any] | list[dict[str, Any]], rank: int) -> dict[str, Any]:
    """The saved states for ``rank``: its own from a multi-process checkpoint, else the single saved set."""
    if isinstance(saved, list):
        return saved[rank % len(saved)]
    return saved
