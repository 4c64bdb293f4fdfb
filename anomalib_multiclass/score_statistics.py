"""Per-category statistics of normal images' scores: one shared scale for a unified model's categories."""

from __future__ import annotations

import torch
from torch import nn


class CategoryScoreStatistics(nn.Module):
    """Mean and standard deviation of the image score per category, to standardise maps and scores.

    Buffers ``mean`` and ``std`` hold one row per category (in the order of the model's category
    names) and, with ``pooled_row``, a last row of all categories together, for images without a
    category. Before :meth:`store` they hold one row ``(0, 1)``, so standardising is the identity.
    They are part of the state dict, so checkpoints and exports keep them, whatever their length.

    Args:
        pooled_row: add the all-categories row used when no category index is given.
    """

    def __init__(self, pooled_row: bool = False) -> None:
        super().__init__()
        self.pooled_row = pooled_row
        self.register_buffer("mean", torch.zeros(1))
        self.register_buffer("std", torch.ones(1))

    @property
    def num_rows(self) -> int:
        """Number of stored rows (categories, plus the pooled row when there is one)."""
        return self.mean.shape[0]

    @torch.no_grad()
    def store(self, scores: list[torch.Tensor]) -> None:
        """Store statistics of the per-category scores (a list of ``M`` tensors ``[n_m]``).

        The standard deviation is the population one, floored at ``1e-3 * |mean|`` so that a category
        whose normal images all score alike is not divided by zero.
        """
        rows = [*scores, torch.cat(scores)] if self.pooled_row else list(scores)
        statistics = [_row_statistics(row) for row in rows]
        self.mean = torch.stack([mean for mean, _ in statistics]).to(self.mean)
        self.std = torch.stack([std for _, std in statistics]).to(self.std)

    @torch.no_grad()
    def set_row(self, index: int, scores: torch.Tensor) -> None:
        """Store one category's statistics of ``scores [n]`` in row ``index`` (``num_rows`` appends a row).

        The other rows keep their exact values, so adding a category changes nothing for the others.

        Raises:
            ValueError: with ``pooled_row`` (its all-categories row would need every category's scores),
                or for an ``index`` beyond ``num_rows``.
        """
        if self.pooled_row:
            msg = "set_row cannot update statistics with a pooled row: call store with every category's scores."
            raise ValueError(msg)
        if not 0 <= index <= self.num_rows:
            msg = f"Row {index} is out of range: the statistics hold {self.num_rows} rows (that index appends one)."
            raise ValueError(msg)
        mean, std = _row_statistics(scores)
        if index == self.num_rows:
            self.mean = torch.cat([self.mean, mean.view(1).to(self.mean)])
            self.std = torch.cat([self.std, std.view(1).to(self.std)])
        else:
            self.mean[index] = mean
            self.std[index] = std

    def standardize(self, anomaly_map: torch.Tensor, category_index: torch.Tensor | None) -> torch.Tensor:
        """``(A - mean_c) / std_c`` for maps ``[B, 1, H, W]``; ``category_index`` ``[B]``, or None for the last row."""
        if category_index is None:
            return (anomaly_map - self.mean[-1]) / self.std[-1]
        mean = self.mean[category_index].view(-1, 1, 1, 1)
        return (anomaly_map - mean) / self.std[category_index].view(-1, 1, 1, 1)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # noqa: ANN001, ANN002, ANN003
        """Resize the buffers to the stored statistics before loading them."""
        for name in ("mean", "std"):
            stored = state_dict.get(prefix + name)
            if stored is not None:
                setattr(self, name, torch.empty_like(stored, device=getattr(self, name).device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def _row_statistics(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and population standard deviation of ``scores [n]``, the latter floored at ``1e-3 * |mean|``."""
    mean = scores.mean()
    return mean, scores.std(unbiased=False).clamp_min(1e-3 * mean.abs().clamp_min(1e-6))
