"""The base class of the unified models: default components, category handling, fitted state, checkpointing."""

from __future__ import annotations

import inspect
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable
from enum import Enum
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
from anomalib.data import Batch, InferenceBatch
from anomalib.engine.plugins import AnomalibCheckpointIO
from anomalib.metrics import Evaluator
from anomalib.models import AnomalibModule
from anomalib.pre_processing import PreProcessor
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.types import STEP_OUTPUT
from torch.utils.data import DataLoader
from torchvision.transforms import v2

from anomalib_multiclass.backbone import backbone_normalization
from anomalib_multiclass.checkpoint_io import MultiClassCheckpointIO, check_checkpoint_file
from anomalib_multiclass.evaluator import PerCategoryEvaluator
from anomalib_multiclass.post_processing import RankPreservingPostProcessor
from anomalib_multiclass.resumable import (
    RANDOM_STATES_KEY,
    gather_random_states,
    random_states_of_rank,
    restore_random_states,
)

logger = logging.getLogger(__name__)

PACKAGE = "anomalib-multiclass-models"
# The checkpoint layout this code reads and writes; bump it when a change makes older checkpoints unreadable.
CHECKPOINT_FORMAT = 1
CHECKPOINT_INFO_KEY = "anomalib_multiclass"


def package_version() -> str:
    """Installed version of this package (``"unknown"`` when run from a source tree that is not installed)."""
    try:
        return version(PACKAGE)
    except PackageNotFoundError:
        return "unknown"


def training_images_in_order(datamodule: Any) -> DataLoader:  # noqa: ANN401
    """Every training image of ``datamodule`` once, in dataset order, unsharded, with the training set's transforms.

    What the models calibrate on: under DDP every rank reads the whole training set here, so the
    constants computed from it (prompt pool, score statistics) are the same on every rank and the same
    as in one process, whatever the training shuffle. The loader has its own generator: reading the images
    leaves the global random state, and so training's later draws, as they were.
    """
    dataset = datamodule.train_data
    return DataLoader(
        dataset=dataset,
        batch_size=datamodule.eval_batch_size,
        num_workers=datamodule.num_workers,
        collate_fn=getattr(datamodule, "external_collate_fn", None) or dataset.collate_fn,
        generator=torch.Generator(),
    )


def random_training_augmentations(datamodule: Any, dataset: Any) -> bool:  # noqa: ANN401
    """Whether training images may change between epochs, so that what a frozen network computed from them once
    (features, latents) cannot stand in for their current version.

    True when the user gave training augmentations (the datamodule's ``train_augmentations``, which anomalib fills
    from ``augmentations`` too). The resize that anomalib's datamodules add to the dataset's ``augmentations`` from
    the model's pre-processor is deterministic and does not count; without a datamodule, any dataset
    ``augmentations`` count.
    """
    if datamodule is not None and hasattr(datamodule, "train_augmentations"):
        return datamodule.train_augmentations is not None
    return getattr(dataset, "augmentations", None) is not None


class InferenceCompile(str, Enum):
    """How validation, test and predict run the torch model (``compile_inference``); exports always trace it plainly.

    Anything but ``eager`` runs it through :func:`torch.compile` in that mode (``reduce-overhead`` captures CUDA graphs
    on a GPU, removing the launch overhead of small batches); on CUDA the model's weights are also put in
    channels-last layout, which the GPU's convolution kernels prefer. The first batch of each shape compiles.
    """

    EAGER = "eager"
    DEFAULT = "default"
    REDUCE_OVERHEAD = "reduce-overhead"
    MAX_AUTOTUNE = "max-autotune"


class IncompatibleCheckpointError(ValueError):
    """A checkpoint that this model class or this version of the package cannot load."""


class NotFittedError(RuntimeError):
    """The model lacks state that training creates (prompt bank, statistics, thresholds)."""


class MultiClassModule(ABC):
    """Base of an anomalib module that serves several categories with one model.

    Listed before :class:`~anomalib.models.AnomalibModule` in a model's bases
    (``class OneNIP(MultiClassModule, AnomalibModule)``): anomalib finds models by name among the *direct*
    subclasses of ``AnomalibModule`` (``get_model``, ``list_models``, ``anomalib train --model``), so a model
    must name it itself, and this base, which is no model, stays out of that list.

    - pre-processing: resize, then normalise with the mean and std the backbone was trained with;
    - post-processing: :class:`RankPreservingPostProcessor`;
    - evaluation: :class:`PerCategoryEvaluator`;
    - validation, test and predict steps that pass each sample's category index (:meth:`category_index`)
      to the torch model, after :meth:`refresh_fitted_state` has made the fitted state match the weights;
    - ``category_names``, the training categories in index order, saved in and restored from checkpoints;
    - checkpoints that name their model class and format version, and refuse to load into another
      model class or a plugin version with another format (:class:`IncompatibleCheckpointError`);
    - checkpoints that hold the random states (every rank's under DDP), so that a resumed run draws what the
      uninterrupted one did;
    - inference through :func:`torch.compile` with ``compile_inference`` (:class:`InferenceCompile`);
    - exports (torch, ONNX, OpenVINO) that refuse a model that was never fitted (:class:`NotFittedError`,
      naming what :meth:`missing_fitted_state` reports).

    Subclasses define :meth:`missing_fitted_state` and :meth:`refresh_fitted_state`, and ``UNKNOWN_CATEGORY_ADVICE``:
    what a user can do about a category the model does not know.
    """

    CATEGORIES_KEY = "category_names"
    ONNX_OPTIMIZE = True
    DEFAULT_CATEGORY = "default"
    UNKNOWN_CATEGORY_ADVICE = "Train the model with them, or predict on plain images (without categories)."
    category_names: list[str]
    compile_inference: InferenceCompile = InferenceCompile.EAGER
    _compiled_forward: Callable[..., Any] | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:  # noqa: ANN401
        """Refuse a model built on this base that anomalib's lookup by name would not find."""
        super().__init_subclass__(**kwargs)
        if MultiClassModule in cls.__bases__ and AnomalibModule not in cls.__bases__:
            msg = (
                f"{cls.__name__} must list AnomalibModule among its own bases, after MultiClassModule "
                f"(class {cls.__name__}(MultiClassModule, AnomalibModule)): anomalib finds models by name among "
                "AnomalibModule's direct subclasses only."
            )
            raise TypeError(msg)

    @abstractmethod
    def missing_fitted_state(self) -> str | None:
        """What training creates and this model lacks (e.g. ``"prompt bank"``), or None when it is fitted."""

    @abstractmethod
    def refresh_fitted_state(self) -> None:
        """Recompute the state derived from the weights (prompt bank, score statistics) if the weights changed."""

    def on_validation_start(self) -> None:
        """Validate with fitted state that matches the current weights."""
        self.refresh_fitted_state()
        self._prepare_inference()

    def on_test_start(self) -> None:
        """Test with fitted state that matches the current weights."""
        self.refresh_fitted_state()
        self._prepare_inference()

    def on_predict_start(self) -> None:
        """Predict with fitted state that matches the current weights."""
        self.refresh_fitted_state()
        self._prepare_inference()

    def _prepare_inference(self) -> None:
        """With ``compile_inference``: channels-last weights on CUDA, and the compiled forward (cached by torch)."""
        if self.compile_inference is InferenceCompile.EAGER:
            self._compiled_forward = None
            return
        if self.device.type == "cuda":
            self.model.to(memory_format=torch.channels_last)
        self._compiled_forward = torch.compile(self.model.forward, mode=self.compile_inference.value, dynamic=False)

    def inference_forward(self, images: torch.Tensor, category_index: torch.Tensor | None) -> InferenceBatch:
        """The torch model's ``InferenceBatch`` for images ``[B, 3, H, W]`` (compiled with ``compile_inference``).

        The compiled outputs are copied: CUDA graphs reuse their output memory on the next call, and the steps'
        outputs live on (predict returns every batch).
        """
        if self._compiled_forward is None:
            return self.model(images, category_index=category_index)
        torch.compiler.cudagraph_mark_step_begin()
        predictions = self._compiled_forward(images, category_index=category_index)
        return type(predictions)(*(value.clone() if torch.is_tensor(value) else value for value in predictions))

    def category_index(self, batch: Batch) -> torch.Tensor | None:
        """Index ``[B]`` of each sample's category in ``category_names``, or None when the batch carries no categories
        (or the model keeps no per-category state): the model then serves the image without a category.

        Raises:
            ValueError: a category the model was not trained on. Its per-category state (prompt, calibration)
                does not exist, and another category's would give scores on the wrong scale without a
                warning in the results; an image without a category tag is served as such instead.
        """
        categories = getattr(batch, "category", None)
        if categories is None or not self.category_names:
            return None
        unknown = sorted(set(categories) - set(self.category_names))
        if unknown:
            msg = (
                f"Categories {unknown} were not in {type(self).__name__}'s training data (known: {self.category_names}). "
                f"{self.UNKNOWN_CATEGORY_ADVICE}"
            )
            raise ValueError(msg)
        return torch.tensor([self.category_names.index(name) for name in categories], device=batch.image.device)

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
        """Predict with each sample's category when the batch carries categories (see :meth:`category_index`).

        Raises:
            ValueError: naming the images that hold NaN or Inf values.
        """
        del args, kwargs
        finite = torch.isfinite(batch.image.flatten(1)).all(dim=1)
        if not bool(finite.all()):
            paths = getattr(batch, "image_path", None) or [f"#{index}" for index in range(len(finite))]
            bad = [str(path) for path, ok in zip(paths, finite.tolist(), strict=True) if not ok]
            msg = f"Images {bad} contain NaN or Inf values: check how they were produced or loaded, and replace them."
            raise ValueError(msg)
        predictions = self.inference_forward(batch.image, self.category_index(batch))
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

    # ----------------------------------------------------------------------------- checkpoints
    def setup(self, stage: str) -> None:
        """Install :class:`MultiClassCheckpointIO` on this model's trainer in place of anomalib's plain one.

        Lightning calls ``setup`` before it reads a ``ckpt_path``, so the checkpoint of this run is read
        with it: on the CPU by default (GPU checkpoints load on CPU-only machines) and with a clear error
        for a missing or truncated local file. A checkpoint IO the user configured is kept.
        """
        super().setup(stage)
        strategy = self.trainer.strategy
        io = strategy.checkpoint_io
        if type(io) is AnomalibCheckpointIO:
            strategy.checkpoint_io = MultiClassCheckpointIO(extra_safe_globals=io.extra_safe_globals)
        if self.trainer.world_size > 1:
            self._share_run_directory()

    def _share_run_directory(self) -> None:
        """Under DDP, write every rank's outputs to rank 0's run directory, and point ``latest`` at it.

        anomalib's engine creates a new versioned run directory (``v0``, ``v1``, ...) in every process
        it starts, so the DDP ranks that Lightning launches each make their own, and the last one
        takes the ``latest`` link: heatmaps would be split and ``latest`` would name a directory without
        the checkpoint or the metrics. Here rank 0's directory is broadcast; another rank adopts it as its
        trainer's root (``Trainer._default_root_dir``, set only where that attribute exists; otherwise one
        warning), removes the empty directory it made, and points ``latest`` back at rank 0's.
        """
        trainer = self.trainer
        shared = trainer.strategy.broadcast(str(trainer.default_root_dir), src=0)
        own = Path(trainer.default_root_dir)
        if trainer.is_global_zero or shared == str(own):
            return
        if not hasattr(trainer, "_default_root_dir"):
            logger.warning("Rank %d writes to its own run directory '%s' (rank 0: '%s').", trainer.global_rank, own, shared)
            return
        trainer._default_root_dir = shared  # noqa: SLF001 - no public setter; guarded above
        if own.is_dir() and not any(own.iterdir()):
            own.rmdir()
        latest = own.parent / "latest"
        if latest.is_symlink() and Path(shared).parent == own.parent:
            latest.unlink()
            latest.symlink_to(Path(shared).name, target_is_directory=True)

    def on_fit_end(self) -> None:
        """Remember the checkpoint this fit resumed from (see :meth:`on_load_checkpoint`)."""
        super().on_fit_end()
        resumed_from = self.trainer.ckpt_path
        self._resumed_from_checkpoint = str(resumed_from) if resumed_from else None

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store the model class, the checkpoint format and the category names of the per-category state.

        Mode arguments given as ``(str, Enum)`` members are saved as their strings, so that checkpoints load
        with torch's ``weights_only``.
        """
        super().on_save_checkpoint(checkpoint)
        if "hyper_parameters" in checkpoint:
            checkpoint["hyper_parameters"] = {
                key: value.value if isinstance(value, Enum) else value
                for key, value in checkpoint["hyper_parameters"].items()
            }
        checkpoint[CHECKPOINT_INFO_KEY] = {
            "model": type(self).__name__,
            "format": CHECKPOINT_FORMAT,
            "package_version": package_version(),
        }
        checkpoint[self.CATEGORIES_KEY] = list(self.category_names)
        checkpoint[RANDOM_STATES_KEY] = gather_random_states()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint of another model or format; adopt its architecture; restore the category names.

        ``anomalib train --ckpt_path CKPT`` (``Engine.train``) resumes from ``CKPT`` and then asks the
        trainer to test ``CKPT`` again, which would report the metrics of the checkpoint it started from.
        When the test loads the very checkpoint that this model's last fit resumed from, the checkpoint's
        state is replaced by the trained model's own (its callbacks' and datamodule's states are not
        loaded either), so the trained model is tested.

        Raises:
            IncompatibleCheckpointError: naming the checkpoint file when the trainer loads it.
        """
        trainer = self._trainer
        loading = str(trainer.ckpt_path) if trainer is not None and trainer.ckpt_path else None
        resumed_from = getattr(self, "_resumed_from_checkpoint", None)
        if loading is not None and loading == resumed_from and trainer.state.fn == TrainerFn.TESTING:
            logger.info("Testing the model trained in this run, not the checkpoint '%s' it resumed from.", loading)
            self._resumed_from_checkpoint = None
            checkpoint["state_dict"] = self.state_dict()
            checkpoint[self.CATEGORIES_KEY] = list(self.category_names)
            # the callbacks (post-processor thresholds, evaluator) and the datamodule keep their trained state too
            checkpoint.pop("callbacks", None)
            datamodule = getattr(trainer, "datamodule", None)
            if datamodule is not None:
                checkpoint.pop(type(datamodule).__qualname__, None)
            return
        try:
            self._check_checkpoint_info(checkpoint)
        except IncompatibleCheckpointError as error:
            if loading is None:
                raise
            msg = f"'{loading}': {error}"
            raise IncompatibleCheckpointError(msg) from None
        self._adopt_checkpoint_architecture(checkpoint.get("hyper_parameters") or {})
        super().on_load_checkpoint(checkpoint)
        self.category_names = list(checkpoint.get(self.CATEGORIES_KEY, []))
        saved_states = checkpoint.get(RANDOM_STATES_KEY)
        if trainer is not None and saved_states is not None:  # a run resumed with --ckpt_path (not load_from_checkpoint)
            self._random_states_to_restore = random_states_of_rank(saved_states, trainer.global_rank)

    def on_train_epoch_start(self) -> None:
        """A resumed run continues the random draws of the run it resumes (see :mod:`anomalib_multiclass.resumable`)."""
        self._restore_checkpoint_random_states()
        super().on_train_epoch_start()

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> int | None:  # noqa: ANN401
        """Same as :meth:`on_train_epoch_start`, for a run resumed mid-epoch (which skips that hook)."""
        self._restore_checkpoint_random_states()
        return super().on_train_batch_start(batch, batch_idx)

    def _restore_checkpoint_random_states(self) -> None:
        states = getattr(self, "_random_states_to_restore", None)
        if states is not None:
            self._random_states_to_restore = None
            restore_random_states(states)

    def _adopt_checkpoint_architecture(self, saved: dict[str, Any]) -> None:
        """Rebuild the torch model from the checkpoint's arguments where they differ from this instance's.

        ``anomalib predict/test --model OneNIP --ckpt_path CKPT`` builds the model from the command
        line's arguments (defaults: the paper's sizes) and then loads the checkpoint's weights into it;
        a checkpoint of another size would not fit. Its saved arguments say what it is, so they win.
        """
        def plain(value: Any) -> Any:  # noqa: ANN401
            return list(value) if isinstance(value, tuple) else value

        components = {"pre_processor", "post_processor", "evaluator", "visualizer"}
        parameters = set(inspect.signature(type(self).__init__).parameters) - components - {"self"}
        arguments = {key: value for key, value in saved.items() if key in parameters}
        # Only the torch model's own arguments matter here (not e.g. pre_trained or the learning rate).
        model_parameters = set(inspect.signature(type(self.model).__init__).parameters)
        differing = sorted(
            key
            for key, value in arguments.items()
            if key in model_parameters and plain(self.hparams.get(key)) != plain(value)
        )
        if not differing:
            return
        logger.info("%s: using the checkpoint's %s.", type(self).__name__, ", ".join(differing))
        rebuilt = type(self)(**arguments, pre_processor=False, post_processor=False, evaluator=False, visualizer=False)
        self.model = rebuilt.model.to(self.device)
        self.hparams.update(arguments)

    def _check_checkpoint_info(self, checkpoint: dict[str, Any]) -> None:
        name = type(self).__name__
        info = checkpoint.get(CHECKPOINT_INFO_KEY)
        if not isinstance(info, dict):
            msg = (
                f"This is not a {name} checkpoint of {PACKAGE} (it lacks the '{CHECKPOINT_INFO_KEY}' entry that "
                f"{name} writes; it may be another anomalib model's): load it with the model class that saved it."
            )
            raise IncompatibleCheckpointError(msg)
        if info.get("model") != name:
            msg = f"This is a {info.get('model')} checkpoint, not a {name} one: load it with {info.get('model')}."
            raise IncompatibleCheckpointError(msg)
        if info.get("format") != CHECKPOINT_FORMAT:
            msg = (
                f"This {name} checkpoint has format {info.get('format')} (saved by {PACKAGE} "
                f"{info.get('package_version')}); {PACKAGE} {package_version()} reads format {CHECKPOINT_FORMAT}. "
                f"Load it with the {PACKAGE} version that saved it, or retrain."
            )
            raise IncompatibleCheckpointError(msg)

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: str | Path, *args: Any, **kwargs: Any) -> Any:  # noqa: ANN401
        """Lightning's ``load_from_checkpoint``, with errors that name the file and what to do."""
        path = check_checkpoint_file(checkpoint_path)
        try:
            return super().load_from_checkpoint(path, *args, **kwargs)
        except IncompatibleCheckpointError as error:
            msg = f"'{path}': {error}"
            raise IncompatibleCheckpointError(msg) from None

    # ---------------------------------------------------------------------------------- export
    def _check_fitted(self) -> None:
        """Raise :class:`NotFittedError` naming what is missing (the model's state, or the post-processor's thresholds)."""
        missing = self.missing_fitted_state()
        if missing is None:
            post_processor = self.post_processor
            needs_thresholds = getattr(post_processor, "enable_thresholding", False)
            if needs_thresholds and not getattr(post_processor, "has_thresholds", True):
                missing = "thresholds (the post-processor learns them on the validation set)"
        if missing is not None:
            msg = (
                f"{type(self).__name__} has no {missing}: it was never fitted. Train it with `anomalib train` "
                "(with validation) and export its checkpoint (--ckpt_path)."
            )
            raise NotFittedError(msg)

    def to_torch(self, *args: Any, **kwargs: Any) -> Path:
        """anomalib's torch export, for a fitted model only."""
        self._check_fitted()
        return super().to_torch(*args, **kwargs)

    def to_onnx(self, *args: Any, **kwargs: Any) -> Path:
        """anomalib's ONNX export (one image batch in, anomalib's outputs out), for a fitted model only.

        The opset defaults to 18, the one torch's exporter writes (anomalib's default of 14 makes it
        try a down-conversion that fails with a long, harmless traceback). ``ONNX_OPTIMIZE`` sets
        whether torch's exporter runs its graph optimiser (pass ``optimize`` to override).
        """
        self._check_fitted()
        kwargs.setdefault("opset_version", 18)
        kwargs.setdefault("optimize", self.ONNX_OPTIMIZE)
        return super().to_onnx(*args, **kwargs)

    def to_openvino(self, *args: Any, **kwargs: Any) -> Path:
        """anomalib's OpenVINO export, for a fitted model only."""
        self._check_fitted()
        return super().to_openvino(*args, **kwargs)
