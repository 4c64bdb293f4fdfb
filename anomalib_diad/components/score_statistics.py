"""Per-category image-score statistics of normal training images, to standardise DiAD's output."""

from __future__ import annotations

import torch
from torch import nn


class ScoreStatistics(nn.Module):
    """Mean and standard deviation of the image score per category, plus a pooled row for unlabelled images.

    Buffers ``mean`` and ``std`` have ``K + 1`` rows: one per training category (in the order of
    the model's category names) and, last, all categories together. Before calibration they hold
    one row ``(0, 1)``, so standardising is the identity. They are part of the state dict, so
    checkpoints and exports keep them.
    """

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(1))
        self.register_buffer("std", torch.ones(1))

    @torch.no_grad()
    def store(self, scores: list[torch.Tensor]) -> None:
        """Store statistics of the per-category scores (a list of ``K`` tensors ``[n_k]``)."""
        rows = [*scores, torch.cat(scores)]
        mean = torch.stack([row.mean() for row in rows])
        std = torch.stack([row.std(unbiased=False) for row in rows])
        self.mean = mean.to(self.mean)
        self.std = std.clamp_min(1e-3 * mean.abs().clamp_min(1e-6)).to(self.std)

    def standardize(self, anomaly_map: torch.Tensor, category_index: torch.Tensor | None) -> torch.Tensor:
        """``(A - mean_c) / std_c`` for maps ``[B, 1, H, W]``; ``category_index`` ``[B]`` or None (pooled row)."""
        if category_index is None:
            return (anomaly_map - self.mean[-1]) / self.std[-1]
        mean = self.mean[category_index].view(-1, 1, 1, 1)
        return (anomaly_map - mean) / self.std[category_index].view(-1, 1, 1, 1)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        """Resize the buffers to the stored statistics before loading them."""
        for name in ("mean", "std"):
            stored = state_dict.get(prefix + name)
            if stored is not None:
                setattr(self, name, torch.empty_like(stored, device=getattr(self, name).device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
