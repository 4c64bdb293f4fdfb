"""anomalib batch dataclasses that carry the category of every sample.

A unified (multi-class) model is trained on several categories at once. Every item produced by
:class:`~anomalib_multiclass.datamodule.MultiClassAD` is tagged with its category name, so that a
model can pick a same-category prompt and the evaluator can report metrics per category. The
classes add one field, ``category``, to anomalib's image dataclasses and behave like them
everywhere else (collation, iteration, ``to_numpy``).
"""

from dataclasses import dataclass
from typing import ClassVar

from anomalib.data import ImageBatch, ImageItem, NumpyImageBatch, NumpyImageItem


@dataclass
class NumpyCategoryImageItem(NumpyImageItem):
    """:class:`NumpyImageItem` with the sample's category name."""

    category: str | None = None


@dataclass
class NumpyCategoryImageBatch(NumpyImageBatch):
    """:class:`NumpyImageBatch` with one category name per sample."""

    category: list[str] | None = None
    item_class: ClassVar[type[NumpyImageItem]] = NumpyCategoryImageItem


@dataclass
class CategoryImageItem(ImageItem):
    """:class:`ImageItem` with the sample's category name."""

    category: str | None = None
    numpy_class: ClassVar[type[NumpyImageItem]] = NumpyCategoryImageItem


@dataclass
class CategoryImageBatch(ImageBatch):
    """:class:`ImageBatch` with one category name per sample (``list[str]`` of length ``B``)."""

    category: list[str] | None = None
    item_class: ClassVar[type[ImageItem]] = CategoryImageItem
    numpy_class: ClassVar[type[NumpyImageBatch]] = NumpyCategoryImageBatch
