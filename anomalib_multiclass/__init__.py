"""Shared pieces of the multi-class anomalib plugins: unified datamodule, per-category evaluation, backbones."""

from anomalib_multiclass.batch import CategoryImageBatch, CategoryImageItem
from anomalib_multiclass.datamodule import MultiClassAD, MultiClassDataset, PredictImages
from anomalib_multiclass.evaluator import PerCategoryEvaluator
from anomalib_multiclass.post_processing import RankPreservingPostProcessor

__all__ = [
    "CategoryImageBatch",
    "CategoryImageItem",
    "MultiClassAD",
    "MultiClassDataset",
    "PerCategoryEvaluator",
    "PredictImages",
    "RankPreservingPostProcessor",
]
