"""Learning-rate schedules of OneNIP, built from :mod:`torch.optim.lr_scheduler`."""

from __future__ import annotations

import math
from enum import Enum

from torch.optim import Optimizer, lr_scheduler


class LRSchedule(str, Enum):
    """Learning-rate schedules of :class:`~anomalib_onenip.OneNIP`."""

    STEP = "step"  # the paper's: StepLR per epoch
    WARMUP_STEP = "warmup_step"  # linear warm-up, then one step decay, as fractions of the run


def warmup_step_scheduler(
    optimizer: Optimizer,
    total_steps: int,
    warmup_fraction: float,
    decay_fraction: float,
    gamma: float,
) -> lr_scheduler.LRScheduler:
    """A linear warm-up over ``warmup_fraction`` of ``total_steps``, then ``lr`` until ``decay_fraction`` of them.

    After that the rate is ``lr * gamma``; the scheduler steps once per optimizer step, so that a run of any length
    gets the whole schedule (the paper's decay at epoch 800 of 1000 is ``decay_fraction=0.8``).
    """
    total_steps = max(int(total_steps), 1)
    warmup_steps = math.ceil(warmup_fraction * total_steps)
    decay_step = max(math.ceil(decay_fraction * total_steps), warmup_steps)
    if warmup_steps == 0:
        return lr_scheduler.MultiStepLR(optimizer, milestones=[decay_step], gamma=gamma)
    warmup = lr_scheduler.LinearLR(optimizer, start_factor=1 / (warmup_steps + 1), total_iters=warmup_steps)
    decay = lr_scheduler.MultiStepLR(optimizer, milestones=[decay_step - warmup_steps], gamma=gamma)
    return lr_scheduler.SequentialLR(optimizer, [warmup, decay], milestones=[warmup_steps])
