"""Multi-class (unified) data: one datamodule for several categories, every sample tagged.

anomalib's datamodules take one ``category``. :class:`MultiClassAD` takes a list of categories
(or ``"all"``) of a dataset in MVTec layout, concatenates their samples into one
:class:`MultiClassDataset`, and tags every item with its category name
(:class:`~anomalib_multiclass.batch.CategoryImageItem`). Downloads, where the dataset has
one, go through anomalib's own per-category datamodule (``MVTecAD``, ``Visa``, ``BTech``).
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from anomalib import TaskType
from anomalib.data import (
    AnomalibDataModule,
    AnomalibDataset,
    BTech,
    BTechDataset,
    ImageItem,
    MVTecAD,
    MVTecADDataset,
    PredictDataset,
    Visa,
    VisaDataset,
)
from anomalib.data.datasets.image.mvtecad import make_mvtec_ad_dataset
from anomalib.data.utils import LabelName, Split, TestSplitMode, ValSplitMode, read_mask
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from lightning.pytorch.trainer.states import TrainerFn
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.transforms.v2 import Transform
from torchvision.tv_tensors import Mask

from anomalib_multiclass.batch import CategoryImageBatch, CategoryImageItem
from anomalib_multiclass.resumable import EpochShuffleSampler

logger = logging.getLogger(__name__)

# dataset name -> (anomalib datamodule, anomalib dataset), both anomalib's public classes: the datamodule
# downloads and prepares one category, the dataset class lists its samples. The "folder" dataset lists
# samples with anomalib's MVTec listing function, the one that accepts any image extension.
ANOMALIB_SOURCES: dict[str, tuple[type[AnomalibDataModule], type[AnomalibDataset]]] = {
    "mvtec_ad": (MVTecAD, MVTecADDataset),
    "visa": (Visa, VisaDataset),
    "btech": (BTech, BTechDataset),
}
DATASETS = ("folder", *ANOMALIB_SOURCES)
FOLDER_EXTENSIONS = tuple(sorted({*IMG_EXTENSIONS, *(ext.upper() for ext in IMG_EXTENSIONS)}))


def read_rgb_image(path: str) -> torch.Tensor:
    """Read an image file as a float RGB tensor ``[3, H, W]`` in ``[0, 1]``.

    Grayscale and palette images are expanded to RGB, the alpha channel of RGBA images is dropped,
    and 16-bit images are scaled by their full range (PIL's plain RGB conversion would clip them).

    Raises:
        FileNotFoundError: naming the file when it does not exist.
        ValueError: naming the file when it is empty, truncated or not an image.
    """
    if not Path(path).is_file():
        msg = f"Image '{path}' does not exist: check the path, or remove the file from the dataset's listing."
        raise FileNotFoundError(msg)
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode in {"I;16", "I;16B", "I;16L", "I"}:
                array = np.asarray(image, dtype=np.float32)
                scale = 65535.0 if image.mode.startswith("I;16") else max(float(array.max()), 1.0)
                gray = torch.from_numpy(array / scale).clamp(0, 1)
                return gray.unsqueeze(0).expand(3, -1, -1).contiguous()
            rgb = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        msg = (
            f"Cannot read image '{path}': {error}. The file is empty, truncated or not an image; "
            "replace it with a valid image or remove it from the dataset folder."
        )
        raise ValueError(msg) from error
    return torch.from_numpy(rgb).permute(2, 0, 1).contiguous()


def list_normal_images(source: str | Path | Sequence[str | Path], aspect_tolerance: float = 0.1) -> list[Path]:
    """The image files of a folder (sorted; sub-folders are not read) or a list of files, checked to be one shape.

    The images of one category should come from one camera setup: the pre-processor stretches every
    image to the model's input size, so images of different aspect ratios would be distorted
    differently. Sizes may vary a little (KolektorSDD's crops are 100 to 104 px wide): an image whose
    aspect ratio (W / H) is more than ``aspect_tolerance`` (relative) from the median image's is
    refused. Only the file headers are read here.

    Raises:
        FileNotFoundError: naming a folder or file that does not exist.
        ValueError: naming an empty folder (and the extensions looked for), an unreadable file, or an
            image of another shape.
    """
    if isinstance(source, (str, Path)):
        folder = Path(source)
        if not folder.is_dir():
            msg = f"Image folder '{folder}' does not exist. Give the folder that holds the category's normal images."
            raise FileNotFoundError(msg)
        paths = sorted(path for path in folder.iterdir() if path.is_file() and path.suffix in FOLDER_EXTENSIONS)
        if not paths:
            msg = (
                f"Image folder '{folder}' holds no images (looked for {', '.join(sorted(set(IMG_EXTENSIONS)))}; "
                "sub-folders are not read). Put the category's normal images directly in it."
            )
            raise ValueError(msg)
    else:
        paths = [Path(path) for path in source]
        if not paths:
            msg = "The list of images is empty: give at least one normal image."
            raise ValueError(msg)
    sizes = {}
    for path in paths:
        if not path.is_file():
            msg = f"Image '{path}' does not exist."
            raise FileNotFoundError(msg)
        try:
            with Image.open(path) as image:
                sizes[path] = image.size[::-1]
        except (UnidentifiedImageError, OSError) as error:
            msg = f"Cannot read image '{path}': {error}. Replace it with a valid image or remove it."
            raise ValueError(msg) from error
    by_aspect = sorted(paths, key=lambda path: sizes[path][1] / sizes[path][0])
    median = by_aspect[len(by_aspect) // 2]
    median_aspect = sizes[median][1] / sizes[median][0]
    for path in paths:
        aspect = sizes[path][1] / sizes[path][0]
        if abs(aspect / median_aspect - 1) > aspect_tolerance:
            msg = (
                f"Image '{path}' is {sizes[path]} (H, W), another shape than the category's other images (e.g. "
                f"'{median}', {sizes[median]}): one category's images come from one camera setup. Resize or crop "
                "them to one size, or remove the odd ones."
            )
            raise ValueError(msg)
    return paths


def read_binary_mask(path: str) -> torch.Tensor:
    """anomalib's ``read_mask``: a uint8 ``[H, W]`` mask of 0/1 (any non-zero pixel is anomalous), naming a bad file.

    Raises:
        FileNotFoundError: naming the file when it does not exist.
        ValueError: naming the file when it is empty, truncated or not an image.
    """
    if not Path(path).is_file():
        msg = f"Image '{path}' does not exist: check the path, or remove the file from the dataset's listing."
        raise FileNotFoundError(msg)
    try:
        return read_mask(path, as_tensor=True)
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        msg = f"Cannot read mask '{path}': {error}. Replace it with a valid single-channel PNG mask."
        raise ValueError(msg) from error


def _check_mask_sizes(samples: pd.DataFrame) -> None:
    """Fail before training when a mask's size differs from its image's (reads the file headers only)."""
    for image_path, mask_path in zip(samples.image_path, samples.mask_path, strict=True):
        if not isinstance(mask_path, str) or not mask_path:
            continue
        try:
            with Image.open(image_path) as image, Image.open(mask_path) as mask:
                image_size, mask_size = image.size, mask.size
        except (UnidentifiedImageError, OSError) as error:
            msg = f"Cannot read '{image_path}' or its mask '{mask_path}': {error}. Replace the unreadable file."
            raise ValueError(msg) from error
        if image_size != mask_size:
            msg = (
                f"Mask '{mask_path}' is {mask_size[::-1]} (H, W) but its image '{image_path}' is {image_size[::-1]}. "
                "Save the mask at the image's size."
            )
            raise ValueError(msg)


class PredictImages(PredictDataset):
    """anomalib's :class:`~anomalib.data.PredictDataset` (an image file or a folder) read with :func:`read_rgb_image`.

    anomalib's own reader clips 16-bit images to white and does not name a truncated JPEG; this one
    reads 16-bit, grayscale and RGBA images correctly and names any file it cannot read. Use it with
    ``anomalib predict --data anomalib_multiclass.PredictImages --data.path PATH``. Files without an
    image extension in the folder are ignored, as in anomalib. ``path`` may also be a list of image files.
    """

    def __init__(
        self,
        path: str | Path | Sequence[str | Path],
        transform: Transform | None = None,
        image_size: int | tuple[int, int] = (256, 256),
    ) -> None:
        files = [path] if isinstance(path, (str, Path)) else [Path(file) for file in path]
        if not files:
            msg = "PredictImages got an empty list of image files: give a folder, an image file or a non-empty list."
            raise ValueError(msg)
        super().__init__(files[0], transform=transform, image_size=image_size)
        if len(files) > 1 or not isinstance(path, (str, Path)):
            self.image_filenames = files

    def __getitem__(self, index: int) -> ImageItem:
        """Image ``[3, H, W]`` in ``[0, 1]`` (after ``transform``) and its path."""
        path = str(self.image_filenames[index])
        image = read_rgb_image(path)
        if self.transform:
            image = self.transform(image)
        return ImageItem(image=image, image_path=path)


class MultiClassDataset(AnomalibDataset):
    """Samples of several categories; ``samples`` has a ``category`` column and items carry it.

    Args:
        samples: anomalib samples table (``image_path``, ``mask_path``, ``split``, ``label_index``)
            with an extra ``category`` column.
        augmentations: transforms applied to image and mask, as in anomalib's datasets.
    """

    def __init__(self, samples: pd.DataFrame, augmentations: Transform | None = None) -> None:
        super().__init__(augmentations=augmentations)
        self.samples = samples
        self.category = "+".join(self.categories)

    @property
    def task(self) -> TaskType:
        """Segmentation when any sample has a mask, else classification (kept valid across concatenation)."""
        has_masks = self.samples["mask_path"].fillna("").astype(bool).any()
        return TaskType.SEGMENTATION if has_masks else TaskType.CLASSIFICATION

    @property
    def categories(self) -> list[str]:
        """Sorted category names present in this dataset."""
        return sorted(self.samples["category"].unique())

    def __getitem__(self, index: int) -> CategoryImageItem:
        """Read one sample: image ``[3, H, W]`` in ``[0, 1]``, mask ``[H, W]``, label and category."""
        row = self.samples.iloc[index]
        image = read_rgb_image(row.image_path)
        gt_mask = None
        if self.task == TaskType.SEGMENTATION and row.label_index == LabelName.NORMAL:
            gt_mask = Mask(torch.zeros(image.shape[-2:], dtype=torch.uint8))
        elif self.task == TaskType.SEGMENTATION:
            gt_mask = read_binary_mask(row.mask_path)  # its size was checked by MultiClassAD's setup
        if self.augmentations:
            if gt_mask is None:
                image = self.augmentations(image)
            else:
                image, gt_mask = self.augmentations(image, gt_mask)
        return CategoryImageItem(
            image=image,
            gt_mask=gt_mask,
            gt_label=torch.tensor(row.label_index),
            image_path=row.image_path,
            mask_path=row.mask_path,
            category=row.category,
        )

    @property
    def collate_fn(self):  # noqa: ANN201
        """Collate items into a :class:`CategoryImageBatch`."""
        return CategoryImageBatch.collate


ROOT_PLACEHOLDER = "GIVE_--data.root"
"""The data root of configs that ship without a dataset location: the user passes ``--data.root``."""


class MultiClassAD(AnomalibDataModule):
    """Unified datamodule: several categories of an MVTec-layout dataset in one train and test set.

    Every category is read from ``root/<category>/{train/good, test/<defect>,
    ground_truth/<defect>/<name>_mask.png}`` (MVTec AD, BTAD, VisA after anomalib's split, or any
    folder in that layout) and every item is tagged with its category.

    Args:
        root: dataset root that holds one folder per category (:data:`ROOT_PLACEHOLDER` in a config
            stops with a message that asks for ``--data.root``).
        categories: category names, or ``"all"`` (every known category of ``dataset``; for
            ``"folder"``, every sub-folder of ``root`` with a ``train`` folder).
        dataset: ``"folder"`` (plain MVTec layout, any image extension, never downloads),
            ``"mvtec_ad"``, ``"visa"`` or ``"btech"`` (downloaded and prepared by anomalib's own
            datamodule when missing).
        train_batch_size, eval_batch_size, num_workers, *_augmentations, test_split_mode,
        test_split_ratio, val_split_mode, val_split_ratio, seed: as in anomalib's datamodules.

    Example:
        >>> datamodule = MultiClassAD(root="datasets/MVTecAD", categories=["bottle", "cable"], dataset="mvtec_ad")
    """

    def __init__(
        self,
        root: str | Path,
        categories: Sequence[str] | str = "all",
        dataset: str = "folder",
        train_batch_size: int = 8,
        eval_batch_size: int = 8,
        num_workers: int = 4,
        train_augmentations: Transform | None = None,
        val_augmentations: Transform | None = None,
        test_augmentations: Transform | None = None,
        augmentations: Transform | None = None,
        test_split_mode: TestSplitMode | str = TestSplitMode.FROM_DIR,
        test_split_ratio: float = 0.2,
        val_split_mode: ValSplitMode | str = ValSplitMode.SAME_AS_TEST,
        val_split_ratio: float = 0.5,
        seed: int | None = None,
    ) -> None:
        super().__init__(
            train_batch_size=train_batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            train_augmentations=train_augmentations,
            val_augmentations=val_augmentations,
            test_augmentations=test_augmentations,
            augmentations=augmentations,
            test_split_mode=test_split_mode,
            test_split_ratio=test_split_ratio,
            val_split_mode=val_split_mode,
            val_split_ratio=val_split_ratio,
            seed=seed,
        )
        if dataset not in DATASETS:
            msg = f"Unknown dataset '{dataset}'. Choose one of {list(DATASETS)}."
            raise ValueError(msg)
        if str(root) == ROOT_PLACEHOLDER:
            msg = (
                "This config has no dataset location: pass the folder that holds one sub-folder per category, "
                "e.g. `anomalib train -c CONFIG --data.root /path/to/data` (or set data.init_args.root in the config)."
            )
            raise ValueError(msg)
        self.root = Path(root)
        self.dataset = dataset
        self.categories = self._resolve_categories(categories)
        self.category = "all" if categories == "all" else "+".join(self.categories)
        self._shuffle_seed: int | None = None
        self._resume_position: tuple[int, int] | None = None

    @property
    def name(self) -> str:
        """The dataset folder's name: results go to ``results/<Model>/<root name>/<categories>/``.

        anomalib's visualizer keeps the image path below the folder of this name, so heatmaps are
        saved as ``images/<category>/test/<defect>/<file>`` and categories do not overwrite each other.
        """
        return self.root.resolve().name

    def _resolve_categories(self, categories: Sequence[str] | str) -> list[str]:
        if isinstance(categories, str) and categories != "all":
            categories = [categories]
        if categories != "all":
            if not categories:
                msg = "`categories` is empty: give a list of category names or 'all'."
                raise ValueError(msg)
            return list(dict.fromkeys(categories))
        if self.dataset in ANOMALIB_SOURCES:
            dataset_class = ANOMALIB_SOURCES[self.dataset][1]
            return list(importlib.import_module(dataset_class.__module__).CATEGORIES)
        if not self.root.is_dir():
            msg = f"Dataset root '{self.root}' does not exist. Give the folder that holds one sub-folder per category."
            raise FileNotFoundError(msg)
        found = sorted(path.name for path in self.root.iterdir() if (path / "train").is_dir())
        if not found:
            msg = f"No category folder with a 'train' sub-folder under '{self.root}'. Expected ROOT/<category>/train/good/."
            raise FileNotFoundError(msg)
        return found

    def prepare_data(self) -> None:
        """Download and prepare every category with anomalib's own datamodule (not for ``"folder"``)."""
        if self.dataset not in ANOMALIB_SOURCES:
            return
        datamodule_class = ANOMALIB_SOURCES[self.dataset][0]
        for category in self.categories:
            datamodule_class(root=self.root, category=category).prepare_data()

    def _category_samples(self, category: str) -> pd.DataFrame:
        """List one category's samples (all splits) with a ``category`` column."""
        if self.dataset == "folder":
            category_root = self.root / category
            if not category_root.is_dir():
                available = sorted(path.name for path in self.root.iterdir() if path.is_dir()) if self.root.is_dir() else []
                msg = f"Category '{category}' not found: there is no folder '{category_root}'. Available: {available}."
                raise FileNotFoundError(msg)
            make_samples = lambda: make_mvtec_ad_dataset(category_root, extensions=FOLDER_EXTENSIONS)  # noqa: E731
        else:
            datamodule_class, dataset_class = ANOMALIB_SOURCES[self.dataset]
            datamodule = datamodule_class(root=self.root, category=category)
            dataset_root = getattr(datamodule, "split_root", datamodule.root)
            make_samples = lambda: dataset_class(root=dataset_root, category=category).samples  # noqa: E731
        try:
            samples = make_samples()
        except (RuntimeError, ValueError) as error:
            msg = (
                f"Category '{category}' under '{self.root}' could not be listed: {error}. Check that every "
                f"defect image in test/<defect>/ has exactly one mask ground_truth/<defect>/<name>_mask.png."
            )
            raise ValueError(msg) from error
        if not (samples["split"] == Split.TRAIN.value).any():
            msg = (
                f"Category '{category}' has no training images under '{self.root / category / 'train'}'. "
                "Add normal images to train/good/ or remove the category from `categories`."
            )
            raise ValueError(msg)
        return samples.assign(category=category)

    def _setup(self, _stage: str | None = None) -> None:
        samples = pd.concat([self._category_samples(category) for category in self.categories], ignore_index=True)
        _check_mask_sizes(samples)
        self.train_data = MultiClassDataset(samples[samples["split"] == Split.TRAIN.value].reset_index(drop=True))
        self.test_data = MultiClassDataset(samples[samples["split"] == Split.TEST.value].reset_index(drop=True))

    # ---------------------------------------------------------------------------- resumable training
    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches in an order that a resumed run continues exactly (mid-epoch included).

        Each epoch's order comes from ``(shuffle seed, epoch)``; the shuffle seed is ``seed`` when given,
        else drawn once from torch's generator (seeded by ``--seed_everything``) and kept in checkpoints.
        Under DDP every rank takes its own share of that order (see :class:`EpochShuffleSampler`).
        """
        if self._shuffle_seed is None:
            self._shuffle_seed = self.seed if self.seed is not None else int(torch.randint(2**31 - 1, ()).item())
        world_size, rank = self._distribution()
        sampler = EpochShuffleSampler(len(self.train_data), self._shuffle_seed, num_replicas=world_size, rank=rank)
        if self._resume_position is not None:
            sampler.resume_at(*self._resume_position)
            self._resume_position = None
        return DataLoader(
            dataset=self.train_data,
            sampler=sampler,
            batch_size=self.train_batch_size,
            num_workers=self.num_workers,
            collate_fn=self.external_collate_fn or self.train_data.collate_fn,
        )

    def val_dataloader(self) -> DataLoader:
        """anomalib's validation loader; under DDP each rank reads its share of the images, each image once."""
        return self._evaluation_loader(self.val_data)

    def test_dataloader(self) -> DataLoader:
        """anomalib's test loader; under DDP each rank reads its share of the images, each image once."""
        return self._evaluation_loader(self.test_data)

    def _evaluation_loader(self, dataset: AnomalibDataset) -> DataLoader:
        """In order; under DDP with Lightning's unpadded sampler, so no image is counted twice in the metrics.

        Lightning's default for evaluation under DDP is a padded ``DistributedSampler``, which repeats
        images so that every rank gets as many; the metrics would count those images twice.
        """
        world_size, rank = self._distribution()
        sampler = None
        if world_size > 1:
            sampler = UnrepeatedDistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=False)
        return DataLoader(
            dataset=dataset,
            sampler=sampler,
            batch_size=self.eval_batch_size,
            num_workers=self.num_workers,
            collate_fn=self.external_collate_fn or dataset.collate_fn,
        )

    def _distribution(self) -> tuple[int, int]:
        """``(world size, global rank)`` of the trainer this datamodule serves (``(1, 0)`` without one)."""
        trainer = self.trainer
        if trainer is None:
            return 1, 0
        return trainer.world_size, trainer.global_rank

    def state_dict(self) -> dict[str, Any]:
        """The shuffle seed and, during fitting, where the next training sample of the current epoch is."""
        state: dict[str, Any] = {"shuffle_seed": self._shuffle_seed}
        trainer = self.trainer
        if trainer is not None and trainer.state.fn == TrainerFn.FITTING:
            epoch = trainer.current_epoch
            batches_done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
            if batches_done >= trainer.num_training_batches:  # saved at the epoch's end: the next one starts
                epoch, batches_done = epoch + 1, 0
            state["resume_epoch"] = epoch
            state["resume_sample"] = batches_done * self.train_batch_size
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue the checkpoint's shuffle, from the first training sample that its run had not used."""
        self._shuffle_seed = state_dict.get("shuffle_seed")
        if "resume_epoch" in state_dict:
            self._resume_position = (state_dict["resume_epoch"], state_dict["resume_sample"])
