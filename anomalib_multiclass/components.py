"""What the unified models share as anomalib modules: default components, category handling, checkpointing."""

from __future__ import annotations

from typing import Any

import torch
from anomalib.data import Batch
from anomalib.metrics import Evaluator
from anomalib.pre_processing import PreProcessor
from lightning.pytorch.utilities.types import STEP_OUTPUT
from torchvision.transforms import v2

from anomalib_multiclass.backbone import backbone_normalization
from anomalib_multiclass.evaluator import PerCategoryEvaluator
from anomalib_multiclass.post_processing import RankPreservingPostProcessor


class UnifiedModelComponents:
    """Mixin for an ``AnomalibModule`` of a unified model (list it before ``AnomalibModule`` in the bases).

    - pre-processing: resize, then normalise with the mean and std the backbone was trained with;
    - post-processing: :class:`RankPreservingPostProcessor`;
    - evaluation: :class:`PerCategoryEvaluator`;
    - validation, test and predict steps that pass each sample's category index to the torch model
      (the model class defines ``_category_index(batch) -> Tensor [B] | None``);
    - ``category_names``, the training categories in index order, saved in and restored from checkpoints.
    """

    CATEGORIES_KEY = "category_names"
    DEFAULT_CATEGORY = "default"
    category_names: list[str]

    @classmethod
    def configure_pre_processor(
        cls,
        image_size: tuple[int, int] | None = None,
        backbone: str = "resnet50",
    ) -> PreProcessor:
        """Resize to ``image_size`` (default 256x256) and normalise with ``backbone``'s mean and std."""
        mean, std = backbone_normalization(backbone)
        transform = v2.Compose([v2.Resize(image_size or (256, 256), antialias=True), v2.Normalize(mean=mean, std=std)])
        return PreProcessor(transform=transform)

    def configure_post_processor(self) -> RankPreservingPostProcessor:
        """anomalib's normalisation and thresholds, without ties (see :class:`RankPreservingPostProcessor`)."""
        return RankPreservingPostProcessor()

    @staticmethod
    def configure_evaluator() -> Evaluator:
        """Dataset-wide and per-category image AUROC/F1Max and pixel AUROC/AUPR/AUPRO."""
        return PerCategoryEvaluator()

    def validation_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """Predict with each sample's category when the batch carries categories (see ``_category_index``)."""
        del args, kwargs
        predictions = self.model(batch.image, category_index=self._category_index(batch))
        return batch.update(**predictions._asdict())

    def test_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """Same as :meth:`validation_step`."""
        return self.validation_step(batch, *args, **kwargs)

    def predict_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """Same as :meth:`validation_step`."""
        return self.validation_step(batch, *args, **kwargs)

    def _batch_categories(self, batch: Batch) -> list[str]:
        """Category name of each sample: the batch's tags, else the datamodule's category, else ``"default"``."""
        categories = getattr(batch, "category", None)
        if categories is not None:
            return list(categories)
        datamodule = getattr(self.trainer, "datamodule", None)
        return [getattr(datamodule, "category", None) or self.DEFAULT_CATEGORY] * len(batch.image)

    def _pre_process(self, images: torch.Tensor) -> torch.Tensor:
        """Apply the pre-processor's transform (outside the Lightning loops, where its callbacks do it)."""
        transform = getattr(self.pre_processor, "transform", None)
        return transform(images) if transform is not None else images

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store the category names that index the model's per-category state."""
        super().on_save_checkpoint(checkpoint)
        checkpoint[self.CATEGORIES_KEY] = list(self.category_names)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore the category names that index the model's per-category state."""
        super().on_load_checkpoint(checkpoint)
        self.category_names = list(checkpoint.get(self.CATEGORIES_KEY, []))
