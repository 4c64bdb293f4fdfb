"""DiAD torch model: pixel-space autoencoder, SG-guided latent diffusion reconstruction, feature-space anomaly map.

Shapes: images ``[B, 3, H, W]`` (normalised with the backbone's mean and std, as the paper's
ImageNet normalisation); latents ``[B, 4, H/8, W/8]``; text context ``[B, L, D]`` (SD-1.5:
``L = 77``, ``D = 768``); anomaly maps ``[B, 1, H, W]``; scores ``[B]``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from enum import Enum
from typing import NamedTuple

import torch
from anomalib.data import InferenceBatch
from torch import nn

from anomalib_diad.components import DDIMSampler, FeatureDistanceAnomalyMap, SemanticGuidedNetwork
from anomalib_diad.components.diffusers_models import (
    NUM_TRAIN_TIMESTEPS,
    architecture_config,
    build_autoencoder,
    build_unet,
)
from anomalib_multiclass.options import parse_option
from anomalib_multiclass.patch_memory import PatchMemory, check_patch_score_weight, patch_descriptors
from anomalib_multiclass.score_statistics import CategoryScoreStatistics


class Stage(str, Enum):
    """DiAD's training stages."""

    AUTOENCODER = "autoencoder"  # stage 1: fine-tune the autoencoder
    DIFFUSION = "diffusion"  # stage 2: the SG network and the UNet


class Posterior(str, Enum):
    """The latent of an image at evaluation: a sample of the autoencoder's posterior (paper) or its mode."""

    SAMPLE = "sample"
    MODE = "mode"


class TrainTimesteps(str, Enum):
    """Stage 2's training timesteps: ``t ~ U{0..max_train_timestep}`` (paper) or the sampler's own timesteps."""

    UNIFORM = "uniform"
    SAMPLER = "sampler"
LATENT_STRIDE = 8
MIN_INPUT_SIZE = 128
INPUT_MULTIPLE = 64  # the autoencoder's x8 times the UNet's three x2 downsamplings


def noise_prediction(model: DiADModel, noisy_latents: torch.Tensor, timesteps: torch.Tensor,
                     images: torch.Tensor) -> torch.Tensor:
    """``model.predict_noise``: the DDIM loop's step, as a function that :data:`SHARED_NOISE_PREDICTION` can mark."""
    return model.predict_noise(noisy_latents, timesteps, images)


# The DDIM step as a region that torch.compile compiles once and reuses at every unrolled step
# (torch.compiler.nested_compile_region; None in a torch without it), instead of compiling the UNet again for each
# step: 10 steps of the tiny UNet compile in 98 s instead of 574 s on 2 CPU cores, run as fast, same maps
# (tests/benchmarks/diad_speed.py --compile).
# Marked once here: marking while compiling would break the graph.
SHARED_NOISE_PREDICTION = (
    torch.compiler.nested_compile_region(noise_prediction) if hasattr(torch.compiler, "nested_compile_region") else None
)


class AutoencoderOutput(NamedTuple):
    """Stage-1 training output for ``B`` images.

    Attributes:
        reconstruction: decoded posterior sample ``[B, 3, H, W]``.
        kl: KL divergence of each posterior to N(0, I), summed over latent elements ``[B]``.
        perceptual: mean feature distance between images and reconstructions (a scalar), or None.
    """

    reconstruction: torch.Tensor
    kl: torch.Tensor
    perceptual: torch.Tensor | None


class DiffusionOutput(NamedTuple):
    """Stage-2 training output: predicted and true noise, both ``[B, 4, H/8, W/8]``."""

    noise_prediction: torch.Tensor
    noise: torch.Tensor


class DiADModel(nn.Module):
    """DiAD: reconstruct an image through SG-guided latent diffusion and compare features.

    Args:
        architecture: ``"sd15"`` (paper), ``"small"`` or ``"tiny"`` (see
            :mod:`anomalib_diad.components.diffusers_models`); weights are random until loaded.
        input_size: image size ``(H, W)``, multiples of 64, at least 128 (paper: 256).
        stage: ``"autoencoder"`` (stage 1: the autoencoder trains; evaluation scores its plain
            reconstruction) or ``"diffusion"`` (stage 2: the SG network and UNet decoder train;
            evaluation runs the DDIM reconstruction).
        backbone, layers: frozen timm CNN of the anomaly map (paper: resnet50, layer1-3).
        sff_init, use_sff, inject_levels: see :class:`SemanticGuidedNetwork`.
        train_unet_decoder: train the UNet's up blocks and output layers (paper: True).
        train_unet_encoder: also train the UNet's time embedding, ``conv_in``, down blocks and middle
            block (paper: False, they keep Stable Diffusion's weights; True from scratch, where they
            would otherwise stay random).
        ddim_steps, noise_timestep, ddim_schedule, set_alpha_to_one: see :class:`DDIMSampler` (paper: 10, 999,
            "official", False).
        max_train_timestep: with ``train_timesteps="uniform"``, stage-2 training draws
            ``t ~ U{0, ..., max_train_timestep}`` (paper: 999).
        train_timesteps: ``"uniform"`` (paper: ``t ~ U{0, ..., max_train_timestep}``) or ``"sampler"``
            (``t`` drawn from the sampler's own DDIM timesteps, the only ones inference evaluates).
        posterior: latent of an image at evaluation: ``"sample"`` (paper) or ``"mode"`` of the autoencoder
            posterior; training always draws a sample (as the paper).
        sigma, score_pool_size, score_pool_repeats: see :class:`FeatureDistanceAnomalyMap` (None: the
            paper's 5 and 8 at 256 px, scaled with the input size).
        normalize_per_category: standardise map and score with the score statistics of each
            category's normal training images (:class:`~anomalib_multiclass.score_statistics.CategoryScoreStatistics`); False returns the raw map.
        patch_score_weight: weight ``w`` of the patch nearest-neighbour evidence of the scoring backbone's input
            features in the image score, ``(1 - w) * map score + w * patch score``, both standardised per category
            (0: the paper's map score alone; needs ``normalize_per_category``). The anomaly map is unchanged.
        patch_memory_size: normal patch descriptors kept per category (see
            :class:`~anomalib_multiclass.patch_memory.PatchMemory`).
        seed: seed of the fixed evaluation noise (posterior sample and ``x_T``), so an image
            always gets the same score, and of the random text context of the small architectures.
    """

    def __init__(
        self,
        architecture: str = "sd15",
        input_size: Sequence[int] = (256, 256),
        stage: str = "diffusion",
        backbone: str = "resnet50",
        layers: Sequence[int | str] = ("layer1", "layer2", "layer3"),
        sff_init: str = "default",
        use_sff: bool = True,
        inject_levels: str = "deepest",
        train_unet_decoder: bool = True,
        train_unet_encoder: bool = False,
        ddim_steps: int = 10,
        noise_timestep: int = 999,
        ddim_schedule: str = "official",
        set_alpha_to_one: bool = False,
        max_train_timestep: int = NUM_TRAIN_TIMESTEPS - 1,
        train_timesteps: str = "uniform",
        posterior: str = "sample",
        sigma: float | None = None,
        score_pool_size: int | None = None,
        score_pool_repeats: int = 8,
        normalize_per_category: bool = True,
        patch_score_weight: float = 0.0,
        patch_memory_size: int = 16384,
        seed: int = 0,
    ) -> None:
        super().__init__()
        height, width = (int(size) for size in input_size)
        if height % INPUT_MULTIPLE or width % INPUT_MULTIPLE or min(height, width) < MIN_INPUT_SIZE:
            msg = (
                f"input_size {tuple(input_size)} does not fit DiAD: height and width must be multiples of "
                f"{INPUT_MULTIPLE} and at least {MIN_INPUT_SIZE} (e.g. 128 or 256)."
            )
            raise ValueError(msg)
        stage = parse_option(Stage, stage, "stage")
        if not 0 <= max_train_timestep < NUM_TRAIN_TIMESTEPS:
            msg = f"max_train_timestep must be in [0, {NUM_TRAIN_TIMESTEPS - 1}], got {max_train_timestep}."
            raise ValueError(msg)
        train_timesteps = parse_option(TrainTimesteps, train_timesteps, "train_timesteps")
        posterior = parse_option(Posterior, posterior, "posterior")
        check_patch_score_weight(patch_score_weight, normalize_per_category)
        config = architecture_config(architecture)
        self.input_size = (height, width)
        self.stage = stage
        self.autoencoder = build_autoencoder(architecture)
        self.unet = build_unet(architecture)
        self.sg_network = SemanticGuidedNetwork(
            self.unet,
            config["hint_channels"],
            sff_init=sff_init,
            use_sff=use_sff,
            inject_levels=inject_levels,
        )
        self.sampler = DDIMSampler(ddim_steps, noise_timestep, ddim_schedule, set_alpha_to_one)
        self.anomaly_map = FeatureDistanceAnomalyMap(
            backbone, layers, self.input_size, sigma, score_pool_size, score_pool_repeats
        )
        self.score_statistics = CategoryScoreStatistics(pooled_row=True)
        self.patch_score_weight = patch_score_weight
        self.patch_memory = PatchMemory(patch_memory_size, pooled_row=True)
        generator = torch.Generator().manual_seed(seed)
        context_shape = (1, config["context_length"], config["unet"]["cross_attention_dim"])
        # The empty-prompt embedding: random for the small architectures, CLIP's for pretrained SD-1.5 (set once).
        self.register_buffer("context", torch.randn(context_shape, generator=generator))
        latent_shape = (2, self.autoencoder.config.latent_channels, height // LATENT_STRIDE, width // LATENT_STRIDE)
        self.register_buffer("evaluation_noise", torch.randn(latent_shape, generator=generator), persistent=False)
        # Latent scaling factor: SD's 0.18215 until stage 1 measures it (``1 / std`` of the training latents).
        self.register_buffer("latent_scale", torch.tensor(float(self.autoencoder.config.scaling_factor)))
        self.train_unet_decoder = train_unet_decoder
        self.train_unet_encoder = train_unet_encoder
        self.max_train_timestep = max_train_timestep
        self.train_timesteps = train_timesteps
        self.posterior = posterior
        self.normalize_per_category = normalize_per_category
        self.set_stage(stage)

    def set_stage(self, stage: str) -> None:
        """Freeze everything but the stage's trained parts: the autoencoder (stage 1) or SG network + UNet parts."""
        self.stage = stage
        self.requires_grad_(False)
        if stage == "autoencoder":
            self.autoencoder.requires_grad_(True)
            return
        self.sg_network.requires_grad_(True)
        for unused in self.sg_network.unused_residual_outputs():
            unused.requires_grad_(False)
        if self.train_unet_decoder:
            for part in (self.unet.up_blocks, self.unet.conv_norm_out, self.unet.conv_out):
                part.requires_grad_(True)
        if self.train_unet_encoder:
            for part in (self.unet.conv_in, self.unet.time_embedding, self.unet.down_blocks, self.unet.mid_block):
                part.requires_grad_(True)

    def train(self, mode: bool = True) -> DiADModel:
        """Set the training mode; the scoring backbone always stays in eval mode (frozen batch norm)."""
        super().train(mode)
        self.anomaly_map.eval()
        return self

    def check_images(self, images: torch.Tensor) -> None:
        """Raise a ValueError naming the expected shape if ``images`` is not ``[B, 3, H, W]`` at ``input_size``."""
        if images.ndim != 4 or images.shape[1] != 3 or tuple(images.shape[-2:]) != self.input_size:
            msg = (
                f"DiAD expects normalised RGB images [B, 3, {self.input_size[0]}, {self.input_size[1]}], got "
                f"{tuple(images.shape)}; resize to the model's input_size first (the pre-processor does)."
            )
            raise ValueError(msg)

    def encode(self, images: torch.Tensor, noise: torch.Tensor | None = None, mode: bool = False) -> torch.Tensor:
        """Scaled latents ``z_0`` ``[B, 4, h, w]``: the posterior mode, or a sample with ``noise`` (random if None)."""
        return self.unscaled_latents(images, noise, mode) * self.latent_scale

    @torch.no_grad()
    def latent_posterior(self, images: torch.Tensor) -> torch.Tensor:
        """The frozen autoencoder's posterior of ``images`` ``[B, 3, H, W]``: mean and std stacked, ``[B, 8, h, w]``.

        What stage 2 samples its training latents from; a training run computes it once per image
        (:class:`~anomalib_diad.lightning_model.DiAD`) instead of at every step.
        """
        distribution = self.autoencoder.encode(images).latent_dist
        return torch.cat([distribution.mean, distribution.std], dim=1)

    def unscaled_latents(
        self,
        images: torch.Tensor,
        noise: torch.Tensor | None = None,
        mode: bool = False,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Autoencoder latents ``[B, 4, h, w]`` before scaling: the posterior mode, or a sample with ``noise``.

        Without ``noise`` the sample's noise is drawn from ``generator`` (a CPU generator), or the global state.
        """
        distribution = self.autoencoder.encode(images).latent_dist
        if mode:
            return distribution.mean
        if noise is None and generator is not None:
            noise = torch.randn(distribution.mean.shape, generator=generator).to(distribution.mean)
        noise = torch.randn_like(distribution.mean) if noise is None else noise
        return distribution.mean + distribution.std * noise

    @torch.no_grad()
    def set_latent_scale_from(self, images: Iterable[torch.Tensor], seed: int = 0) -> float:
        """Set ``latent_scale`` to ``1 / std`` of the latents of ``images`` (batches ``[B, 3, H, W]``): ``scale_by_std``.

        The latents are posterior samples, as stage 2 trains on, drawn from a generator seeded with
        ``seed`` (the same on every DDP rank, the global random state untouched); the scaled latents
        then have unit variance, the scale the noise schedule assumes. Returns the new scale.
        """
        generator = torch.Generator().manual_seed(seed)
        latents = torch.cat([self.unscaled_latents(batch, generator=generator).flatten() for batch in images])
        if latents.numel() < 2 or not torch.isfinite(latents).all():
            msg = f"Cannot compute the latent scale from {latents.numel()} latent values: give normal training images."
            raise ValueError(msg)
        self.latent_scale.fill_(1.0 / latents.std().item())
        return float(self.latent_scale)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images ``[B, 3, H, W]`` from scaled latents ``[B, 4, h, w]``."""
        return self.autoencoder.decode(latents / self.latent_scale).sample

    def predict_noise(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """``eps_theta(z_t, t, c, x)`` ``[B, 4, h, w]``: the UNet with the SG residuals of the hint ``images``.

        The official code's classifier-free guidance (scale 9) mixes two branches with the same empty prompt and
        the same hint, ``u + s (c - u) = u``: a no-op that doubles the compute, so it is not run.
        """
        context = self.context.expand(noisy_latents.shape[0], -1, -1)
        down_residuals, mid_residual = self.sg_network(noisy_latents, timesteps, context, images)
        return self.unet(
            noisy_latents,
            timesteps,
            encoder_hidden_states=context,
            down_block_additional_residuals=down_residuals,
            mid_block_additional_residual=mid_residual,
        ).sample

    def forward(
        self,
        images: torch.Tensor,
        category_index: torch.Tensor | None = None,
        compute_perceptual: bool = False,
        posterior: torch.Tensor | None = None,
    ) -> AutoencoderOutput | DiffusionOutput | InferenceBatch:
        """Training: the stage's :class:`AutoencoderOutput` or :class:`DiffusionOutput`; eval: :class:`InferenceBatch`.

        Args:
            images: normalised images ``[B, 3, H, W]``.
            category_index: (inference) category of each image ``[B]`` for the score statistics,
                or None to use the statistics of all categories.
            compute_perceptual: (stage-1 training) also return the feature distance.
            posterior: (stage-2 training) :meth:`latent_posterior` of ``images`` ``[B, 8, h, w]`` when already known,
                or None to encode them.
        """
        self.check_images(images)
        if not self.training:
            return self.predict(images, category_index)
        if self.stage == "autoencoder":
            return self.autoencoder_training_forward(images, compute_perceptual)
        return self.diffusion_training_forward(images, posterior)

    def autoencoder_training_forward(self, images: torch.Tensor, compute_perceptual: bool) -> AutoencoderOutput:
        """Encode (posterior sample) and decode ``images``."""
        distribution = self.autoencoder.encode(images).latent_dist
        reconstruction = self.autoencoder.decode(distribution.sample()).sample
        perceptual = self.anomaly_map.distance_map(images, reconstruction).mean() if compute_perceptual else None
        return AutoencoderOutput(reconstruction, distribution.kl(), perceptual)

    def diffusion_training_forward(self, images: torch.Tensor, posterior: torch.Tensor | None = None) -> DiffusionOutput:
        """Noise the latents (posterior samples) of ``images`` to ``t`` (see ``train_timesteps``); predict the noise.

        ``posterior`` ``[B, 8, h, w]`` (:meth:`latent_posterior`) spares the autoencoder's encoder; the sample draws the
        same random numbers either way.
        """
        if posterior is None:
            posterior = self.latent_posterior(images)
        mean, std = posterior.chunk(2, dim=1)
        latents = (mean + std * torch.randn_like(mean)) * self.latent_scale
        noise = torch.randn_like(latents)
        if self.train_timesteps == "sampler":
            steps = torch.randint(0, self.sampler.num_steps, (latents.shape[0],), device=latents.device)
            timesteps = self.sampler.timesteps[steps]
        else:
            timesteps = torch.randint(0, self.max_train_timestep + 1, (latents.shape[0],), device=latents.device)
        noisy_latents = self.sampler.add_noise(latents, noise, timesteps)
        return DiffusionOutput(self.predict_noise(noisy_latents, timesteps, images), noise)

    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        """Reconstruction ``[B, 3, H, W]`` with the fixed evaluation noise.

        Stage 2: ``x_hat = D(DDIM(noise(E(x), t_s), hint x))``; stage 1: ``x_hat = D(E(x))``.
        """
        batch_size = images.shape[0]
        posterior_noise, start_noise = (noise.expand(batch_size, -1, -1, -1) for noise in self.evaluation_noise)
        latents = self.encode(images, posterior_noise, mode=self.posterior == "mode")
        if self.stage == "autoencoder":
            return self.decode(latents)
        start = self.sampler.noise_to_start(latents, start_noise)
        predict_noise = noise_prediction
        if SHARED_NOISE_PREDICTION is not None and torch.compiler.is_compiling() and not torch.compiler.is_exporting():
            predict_noise = SHARED_NOISE_PREDICTION  # compiling (not exporting): one compiled step for all
        denoised = self.sampler.sample(start, lambda noisy, timesteps: predict_noise(self, noisy, timesteps, images))
        return self.decode(denoised)

    def raw_anomaly_map(self, images: torch.Tensor) -> torch.Tensor:
        """The paper's anomaly map ``[B, 1, H, W]`` (not standardised)."""
        return self.anomaly_map(images, self.reconstruct(images))

    def predict(self, images: torch.Tensor, category_index: torch.Tensor | None = None) -> InferenceBatch:
        """Anomaly map ``[B, 1, H, W]`` and image score ``[B]``.

        With ``normalize_per_category`` the map is standardised with the image-score statistics
        of the category's normal training images, ``(A - mean_c) / std_c``: monotone per
        category (per-category metrics are those of the raw map), and comparable across categories. With
        ``patch_score_weight = w > 0`` the image score is ``(1 - w) * map score + w * patch score`` (the
        patch memory of the category, or of all categories without one).
        """
        anomaly_map = self.raw_anomaly_map(images)
        if self.normalize_per_category:
            anomaly_map = self.score_statistics.standardize(anomaly_map, category_index)
        score = self.anomaly_map.image_score(anomaly_map)
        if self.patch_score_weight > 0:
            patches = self.patch_descriptors(images)
            score = self.patch_memory.weighted_score(score, patches, category_index, self.patch_score_weight)
        return InferenceBatch(pred_score=score, anomaly_map=anomaly_map)

    def patch_descriptors(self, images: torch.Tensor) -> torch.Tensor:
        """Patch descriptors ``[B, P, C']`` of images ``[B, 3, H, W]`` from the scoring backbone's last two taps."""
        return patch_descriptors(list(self.anomaly_map.feature_extractor(images).values()))
