"""Shared pieces of the multi-class anomalib plugins: unified datamodule, per-category evaluation, backbones."""

# anomalib.models first: with this distribution's start-up hook, importing it imports the two model packages,
# which import this package's modules. Done here, before any of them starts, none is half-imported then,
# whichever public module a program imports first.
import anomalib.models  # noqa: F401
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
