"""anomalib post-processing for unified models: rank-preserving normalisation, thresholds from normal images."""

from __future__ import annotations

import logging
from enum import Enum
from typing import Any

import torch
from anomalib.data import Batch
from anomalib.post_processing import PostProcessor
from lightning import LightningModule, Trainer
from torchmetrics.utilities.distributed import gather_all_tensors

from anomalib_multiclass.options import parse_option

logger = logging.getLogger(__name__)


class ThresholdSource(str, Enum):
    """The images the thresholds are learned on: the normal validation images' quantile, or anomalib's F1 optimum."""

    NORMAL = "normal"
    F1_ADAPTIVE = "f1_adaptive"


class RankPreservingPostProcessor(PostProcessor):
    """anomalib's :class:`PostProcessor` with a normalisation that never ties two scores, and normal-image thresholds.

    **Normalisation.** anomalib normalises a score ``x`` to ``(x - threshold) / (max - min) + 0.5``
    and clamps it to ``[0, 1]``, with ``min``, ``max`` and ``threshold`` learned on the validation
    set. Every score beyond the clamp becomes 0 or 1: with one model for many categories, whose
    score ranges differ, whole categories can end up tied at 0 or 1, and threshold-free metrics
    (AUROC, AUPR, AUPRO) computed on the normalised values lose their meaning. This post-processor
    maps ``x`` to ``0.5 + 0.5 * z / (1 + |z|)`` with ``z = 2 * (x - threshold) / (max - min)``
    instead: 0.5 at the threshold, anomalib's slope there, strictly increasing everywhere, inside
    ``(0, 1)``. Unlike a logistic sigmoid, which reaches 1.0 in float32 a few ranges above the
    threshold, it keeps scores a million ranges away apart. Labels and masks are
    ``x > threshold`` (at the default sensitivity of 0.5); a NaN score or map value (the result of
    NaN or Inf in the input) is labelled anomalous, so a broken input is never passed as normal.

    **Thresholds.** ``threshold_source="normal"`` (default) learns everything from the *normal*
    validation images only (``gt_label == 0``; all images when the batch carries no labels), as a
    deployment without defect examples must: the image threshold is the ``normal_quantile``
    quantile of their image scores, the pixel threshold the same quantile of their per-image
    maximum map value, and ``min``/``max`` their score and map ranges. Under DDP the values of every
    rank are gathered first, so every rank and the checkpoint hold the constants of the whole
    validation set. ``"f1_adaptive"`` is
    anomalib's: the F1-optimal thresholds on a validation set with anomalies.

    The plugins' torch models standardise scores and maps per category (with statistics of each
    category's normal training images) before this step, so one threshold on that common scale is
    a per-category threshold in the raw units. Every constant is a buffer: checkpoints and
    exported graphs (ONNX, OpenVINO) carry it.

    Args:
        threshold_source: ``"normal"`` or ``"f1_adaptive"`` (see above).
        normal_quantile: quantile of the normal validation images used by ``"normal"``, in (0, 1].
        **kwargs: anomalib :class:`PostProcessor` arguments (sensitivities, enable flags).
    """

    def __init__(self, threshold_source: str = "normal", normal_quantile: float = 0.99, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        threshold_source = parse_option(ThresholdSource, threshold_source, "threshold_source").value  # a string in checkpoints
        if not 0 < normal_quantile <= 1:
            msg = f"normal_quantile must be in (0, 1], got {normal_quantile}."
            raise ValueError(msg)
        self.threshold_source = threshold_source
        self.normal_quantile = normal_quantile
        self._normal_scores: list[torch.Tensor] = []
        self._normal_map_maxima: list[torch.Tensor] = []
        self._normal_map_minima: list[torch.Tensor] = []

    @property
    def _checkpoint_config_keys(self) -> tuple[str, ...]:
        """anomalib's configuration plus the threshold source and quantile."""
        return (*super()._checkpoint_config_keys, "threshold_source", "normal_quantile")

    @property
    def has_thresholds(self) -> bool:
        """True once validation set the image threshold (a model without it labels nothing)."""
        return not bool(torch.isnan(self._image_threshold))

    def on_validation_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Batch,
        *args: Any,
        **kwargs: Any,
    ) -> None:
        """Collect the scores and map extremes of the batch's normal images (or defer to anomalib's F1 thresholds)."""
        if self.threshold_source == "f1_adaptive":
            super().on_validation_batch_end(trainer, pl_module, outputs, *args, **kwargs)
            return
        scores = outputs.pred_score.detach().flatten()
        normal = torch.ones_like(scores, dtype=torch.bool)
        if outputs.gt_label is not None:
            normal = outputs.gt_label.flatten().to(scores.device) == 0
        self._normal_scores.append(scores[normal].float().cpu())
        if outputs.anomaly_map is not None:
            maps = outputs.anomaly_map.detach()[normal].flatten(1)
            self._normal_map_maxima.append(maps.amax(dim=1).float().cpu())
            self._normal_map_minima.append(maps.amin(dim=1).float().cpu())

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Set thresholds and ranges from the collected normal images (or anomalib's F1 thresholds)."""
        if self.threshold_source == "f1_adaptive":
            super().on_validation_epoch_end(trainer, pl_module)
            return
        scores, map_maxima, map_minima = (
            _all_ranks(torch.cat(values) if values else torch.zeros(0))
            for values in (self._normal_scores, self._normal_map_maxima, self._normal_map_minima)
        )
        self._normal_scores, self._normal_map_maxima, self._normal_map_minima = [], [], []
        if scores.numel() == 0:
            logger.warning(
                "The validation set has no normal images: thresholds not updated. Give a validation set with normal "
                "images (e.g. val_split_mode 'same_as_test' or 'from_train'), or threshold_source 'f1_adaptive'."
            )
            return
        if self.enable_thresholding:
            self._image_threshold.copy_(torch.quantile(scores, self.normal_quantile))
            if map_maxima.numel():
                self._pixel_threshold.copy_(torch.quantile(map_maxima, self.normal_quantile))
        if self.enable_normalization:
            self.image_min.copy_(scores.min())
            self.image_max.copy_(scores.max())
            if map_maxima.numel():
                self.pixel_min.copy_(map_minima.min())
                self.pixel_max.copy_(map_maxima.max())

    @staticmethod
    def _apply_threshold(preds: torch.Tensor | None, threshold: torch.Tensor) -> torch.Tensor | None:
        """``preds > threshold``; a NaN prediction (from NaN or Inf input) is labelled anomalous, never normal."""
        if preds is None:
            return preds
        return (preds > threshold) | torch.isnan(preds)

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
        distance = 2 * (preds - threshold) / safe_range
        normalized = 0.5 + 0.5 * distance / (1 + distance.abs())
        has_range = ~torch.isnan(norm_min) & ~torch.isnan(norm_max)
        return torch.where(has_range, normalized, preds)


def _all_ranks(values: torch.Tensor) -> torch.Tensor:
    """``values`` ``[n]`` of every rank, concatenated in rank order (this rank's alone outside DDP).

    The ranks may hold different numbers of values (torchmetrics' gather pads and trims them).
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return values
    if torch.distributed.get_world_size() == 1:
        return values
    return torch.cat(gather_all_tensors(values))
