"""anomalib post-processing that keeps the ranking of scores, for unified models."""

from __future__ import annotations

import torch
from anomalib.post_processing import PostProcessor

# Slope of the squashing sigmoid: 4 makes its derivative at the threshold 1, like anomalib's linear map.
SQUASH_SLOPE = 4.0


class RankPreservingPostProcessor(PostProcessor):
    """anomalib's :class:`PostProcessor` with a normalisation that never ties two different scores.

    anomalib normalises a score ``x`` to ``(x - threshold) / (max - min) + 0.5`` and clamps it to
    ``[0, 1]``, with ``min``, ``max`` and ``threshold`` learned on the validation set. Every score
    beyond the clamp becomes 0 or 1: with one model for many categories, whose score ranges differ,
    whole categories can end up tied at 0 or 1, and threshold-free metrics (AUROC, AUPR, AUPRO)
    computed on the normalised values lose their meaning.

    This post-processor maps ``x`` to ``sigmoid(4 * (x - threshold) / (max - min))`` instead: the same
    value (0.5) at the threshold, the same slope there, strictly increasing everywhere, inside
    ``(0, 1)``. Labels and masks (``x > threshold``) are those of anomalib's post-processor at the
    default sensitivity of 0.5. Statistics, thresholds, checkpointing and the exported graph work as in
    anomalib's post-processor.
    """

    @staticmethod
    def _normalize(
        preds: torch.Tensor | None,
        norm_min: torch.Tensor,
        norm_max: torch.Tensor,
        threshold: torch.Tensor,
    ) -> torch.Tensor | None:
        """Squash ``preds`` around ``threshold`` into ``(0, 1)``, keeping their order (see class docstring)."""
        if preds is None:
            return preds
        threshold = torch.where(torch.isnan(threshold), (norm_max + norm_min) / 2, threshold)
        value_range = norm_max - norm_min
        safe_range = torch.where(value_range > 0, value_range, torch.ones_like(value_range))
        normalized = torch.sigmoid(SQUASH_SLOPE * (preds - threshold) / safe_range)
        has_range = ~torch.isnan(norm_min) & ~torch.isnan(norm_max)
        return torch.where(has_range, normalized, preds)
