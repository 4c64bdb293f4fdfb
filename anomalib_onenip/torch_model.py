"""OneNIP torch model: frozen multi-scale CNN features, prompt-guided reconstruction, refiner.

Shapes: images ``[B, 3, H, W]``; features ``[B, C, h, w]`` with ``h = H / 16`` (the deepest tap's
stride) and ``C`` the sum of the tapped channels (272 for EfficientNet-B4, 192 for Lite0); tokens
``[B, N, C]`` with ``N = h * w``; encoded tokens ``[B, N, D]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from anomalib.data import InferenceBatch
from torch import nn
from torch.nn import functional as F  # noqa: N812

from anomalib_multiclass.backbone import build_feature_extractor
from anomalib_multiclass.patch_memory import PatchMemory, check_patch_score_weight, patch_descriptors
from anomalib_multiclass.score_statistics import CategoryScoreStatistics
from anomalib_onenip.components import PromptBank, PromptGuidedTransformer, Refiner


class TrainingOutput(NamedTuple):
    """What the loss needs from one training step over ``B`` normal and ``B`` synthetic images.

    Attributes:
        reconstruction: reconstructed features ``[2B, C, h, w]`` (normal stream, then synthetic).
        target: clean features of the normal images, twice ``[2B, C, h, w]``.
        refiner_logits: refiner logits ``[2B, 1, H, W]``.
    """

    reconstruction: torch.Tensor
    target: torch.Tensor
    refiner_logits: torch.Tensor


class OneNIPModel(nn.Module):
    """OneNIP: one normal image prompt guides the reconstruction of a query's normal features.

    Args:
        backbone: timm CNN name (paper: ``tf_efficientnet_b4``).
        layers: feature levels to tap (paper: 0, 1, 2, 3, strides 2 to 16).
        input_size: image size ``(H, W)``; both must be multiples of the deepest tap's stride.
        hidden_dim, num_heads, num_encoder_layers, num_decoder_layers, dim_feedforward, dropout:
            transformer sizes (paper: 256, 8, 4, 4, 1024, 0.1).
        use_neighbor_mask: UniAD's neighbour masking in the encoder and decoder.
        feature_jitter_scale, feature_jitter_prob: training feature jitter (paper: 20, 1.0).
        refiner_channels: refiner width (paper: 128).
        reconstruction_weight: ``lambda`` in ``A = lambda * R + (1 - lambda) * kappa_c * S`` (paper: 0.5),
            with ``kappa_c`` the refiner scale of the prompt's category (``refiner_scale [M]``).
        score_pool_size: average-pooling window of the image score (paper: 16).
        normalize_per_category: standardise map and score with the chosen prompt's category
            statistics (see :meth:`predict`); False returns the paper's raw fused map.
        patch_score_weight: weight ``w`` of the patch nearest-neighbour evidence in the image score,
            ``(1 - w) * map score + w * patch score``, both standardised per category (0: the paper's map score
            alone; needs ``normalize_per_category``). The anomaly map is the fused map either way.
        patch_memory_size: normal patch descriptors kept per category for that evidence (see :class:`PatchMemory`).
    """

    # state-dict keys of the per-category statistics before they moved out of the prompt bank
    LEGACY_STATISTICS_KEYS = {"prompt_bank.score_mean": "score_statistics.mean", "prompt_bank.score_std": "score_statistics.std"}

    def __init__(
        self,
        backbone: str = "tf_efficientnet_b4",
        layers: Sequence[int | str] = (0, 1, 2, 3),
        input_size: tuple[int, int] = (256, 256),
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
    ) -> None:
        super().__init__()
        self.feature_extractor = build_feature_extractor(backbone, layers).requires_grad_(False)
        stride = max(self.feature_extractor.feature_extractor.feature_info.reduction())
        height, width = input_size
        if height % stride or width % stride or height < stride or width < stride:
            msg = (
                f"input_size {tuple(input_size)} does not fit backbone '{backbone}': height and width must be positive "
                f"multiples of its feature stride {stride} (e.g. 224, 256 or 320)."
            )
            raise ValueError(msg)
        self.input_size = (height, width)
        self.feature_size = (height // stride, width // stride)
        channels = sum(self.feature_extractor.out_dims)
        self.transformer = PromptGuidedTransformer(
            in_channels=channels,
            feature_size=self.feature_size,
            hidden_dim=hidden_dim,
            num_heads=num_heads,
            num_encoder_layers=num_encoder_layers,
            num_decoder_layers=num_decoder_layers,
            dim_feedforward=dim_feedforward,
            dropout=dropout,
            use_neighbor_mask=use_neighbor_mask,
        )
        self.refiner = Refiner(channels, refiner_channels)
        self.prompt_bank = PromptBank(self.feature_size[0] * self.feature_size[1], hidden_dim, channels)
        self.score_statistics = CategoryScoreStatistics()
        # kappa per category [M]: training sets every entry to the one value of the paper's formula; a category
        # added later (OneNIP.add_category) gets its own (it grows to the size of whatever is loaded)
        self.register_buffer("refiner_scale", torch.ones(1))
        self.feature_jitter_scale = feature_jitter_scale
        self.feature_jitter_prob = feature_jitter_prob
        self.reconstruction_weight = reconstruction_weight
        self.score_pool_size = score_pool_size
        self.normalize_per_category = normalize_per_category
        check_patch_score_weight(patch_score_weight, normalize_per_category)
        self.patch_score_weight = patch_score_weight
        self.patch_memory = PatchMemory(patch_memory_size)

    def extract_features(self, images: torch.Tensor) -> torch.Tensor:
        """Frozen backbone taps resized (bilinear, ``align_corners=True``) to ``(h, w)`` and concatenated: ``[B, C, h, w]``."""
        return self.combine_taps(self.backbone_taps(images))

    def combine_taps(self, taps: list[torch.Tensor]) -> torch.Tensor:
        """Backbone taps ``[B, C_i, h_i, w_i]`` resized to ``(h, w)`` and concatenated: ``[B, C, h, w]``."""
        resized = [F.interpolate(tap, size=self.feature_size, mode="bilinear", align_corners=True) for tap in taps]
        return torch.cat(resized, dim=1)

    def backbone_taps(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The frozen backbone's taps ``[B, C_i, h_i, w_i]`` of normalised images ``[B, 3, H, W]``."""
        if images.ndim != 4 or images.shape[1] != 3 or tuple(images.shape[-2:]) != self.input_size:
            msg = (
                f"OneNIP expects normalised RGB images [B, 3, {self.input_size[0]}, {self.input_size[1]}], got "
                f"{tuple(images.shape)}; convert to RGB and resize to the model's input_size first (the "
                "pre-processor resizes)."
            )
            raise ValueError(msg)
        return list(self.feature_extractor(images).values())

    @staticmethod
    def global_features(features: torch.Tensor) -> torch.Tensor:
        """Spatial mean of the features ``[B, C, h, w]`` -> ``[B, C]`` (used to choose prompts)."""
        return features.mean(dim=(2, 3))

    @staticmethod
    def to_tokens(features: torch.Tensor) -> torch.Tensor:
        """``[B, C, h, w]`` -> row-major tokens ``[B, N, C]``."""
        return features.flatten(2).transpose(1, 2)

    def to_features(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens ``[B, N, C]`` -> ``[B, C, h, w]``."""
        return tokens.transpose(1, 2).unflatten(2, self.feature_size)

    def jitter(self, tokens: torch.Tensor) -> torch.Tensor:
        """UniAD feature jitter: with probability ``feature_jitter_prob``, ``f + eps * scale * |f| / C``, eps ~ N(0, I)."""
        if self.feature_jitter_scale <= 0 or torch.rand(()) >= self.feature_jitter_prob:
            return tokens
        norms = tokens.norm(dim=-1, keepdim=True)
        return tokens + torch.randn_like(tokens) * (self.feature_jitter_scale * norms / tokens.shape[-1])

    def encode_prompts(self, features: torch.Tensor) -> torch.Tensor:
        """Encode prompt features ``[K, C, h, w]`` for the prompt bank: ``[K, N, D]``."""
        return self.transformer.encode(self.to_tokens(features))

    def reconstruct(self, features: torch.Tensor, encoded_prompt: torch.Tensor) -> torch.Tensor:
        """Reconstruct the normal version of query features ``[B, C, h, w]`` from an encoded prompt ``[B, N, D]``."""
        encoded_query = self.transformer.encode(self.to_tokens(features))
        return self.to_features(self.transformer.decode(encoded_prompt, encoded_query))

    def residual_maps(self, reconstruction: torch.Tensor, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Reconstruction map ``R`` and refiner map ``S``, both ``[B, 1, H, W]``.

        ``R`` is the channel-wise L2 norm of ``F_hat - F`` upsampled bilinearly; ``S`` is the
        refiner's sigmoid output for ``|F_hat - F|``.
        """
        residual = reconstruction - features
        distance = residual.norm(dim=1, keepdim=True)
        reconstruction_map = F.interpolate(distance, size=self.input_size, mode="bilinear", align_corners=True)
        refiner_map = torch.sigmoid(self.refiner(residual.abs(), self.input_size))
        return reconstruction_map, refiner_map

    def forward(
        self,
        images: torch.Tensor,
        anomalous_images: torch.Tensor | None = None,
        prompt_features: torch.Tensor | None = None,
        category_index: torch.Tensor | None = None,
        query_features: torch.Tensor | None = None,
    ) -> TrainingOutput | InferenceBatch:
        """Training: :class:`TrainingOutput`; inference: :class:`InferenceBatch`.

        Args:
            images: normalised images ``[B, 3, H, W]``.
            anomalous_images: (training) synthetic-anomaly twins of ``images`` ``[B, 3, H, W]``.
            prompt_features: (training) backbone features of one normal prompt per image ``[B, C, h, w]``.
            category_index: (inference) category of each image ``[B]`` for the prompt choice, or
                None to let the model choose the nearest prompt of any category.
            query_features: (training) the backbone features of ``images`` ``[B, C, h, w]`` when they
                are already known (cached), or None to compute them.
        """
        if self.training:
            if anomalous_images is None or prompt_features is None:
                msg = "OneNIP training needs `anomalous_images` and `prompt_features`."
                raise ValueError(msg)
            return self.training_forward(images, anomalous_images, prompt_features, query_features)
        return self.predict(images, category_index)

    def training_forward(
        self,
        images: torch.Tensor,
        anomalous_images: torch.Tensor,
        prompt_features: torch.Tensor,
        query_features: torch.Tensor | None = None,
    ) -> TrainingOutput:
        """Reconstruction (normal query) and restoration (synthetic anomaly, same prompt) branches."""
        batch_size = images.shape[0]
        if query_features is None:
            features = self.extract_features(torch.cat([images, anomalous_images]))
            query_features = features[:batch_size]
        else:
            features = torch.cat([query_features, self.extract_features(anomalous_images)])
        tokens = self.jitter(self.to_tokens(torch.cat([features, prompt_features])))
        encoded = self.transformer.encode(tokens)
        encoded_queries, encoded_prompts = encoded[: 2 * batch_size], encoded[2 * batch_size :]
        decoded = self.transformer.decode(encoded_prompts.repeat(2, 1, 1), encoded_queries)
        reconstruction = self.to_features(decoded)
        refiner_logits = self.refiner((reconstruction - features).abs(), self.input_size)
        return TrainingOutput(reconstruction, query_features.repeat(2, 1, 1, 1), refiner_logits)

    def fused_map(
        self,
        features: torch.Tensor,
        category_index: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The paper's anomaly map ``A = lambda * R + (1 - lambda) * kappa_c * S`` ``[B, 1, H, W]``.

        Args:
            features: query features ``[B, C, h, w]``.
            category_index: query categories ``[B]`` for the prompt choice, or None (nearest prompt).

        Returns:
            ``A`` and the category index of the prompt used for each query ``[B]``.
        """
        encoded_prompt, prompt_category = self.prompt_bank.select(self.global_features(features), category_index)
        return self.prompted_map(features, encoded_prompt, prompt_category), prompt_category

    def prompted_map(
        self,
        features: torch.Tensor,
        encoded_prompt: torch.Tensor,
        prompt_category: torch.Tensor,
    ) -> torch.Tensor:
        """``A [B, 1, H, W]`` for query features ``[B, C, h, w]``, one encoded prompt per query ``[B, N, D]`` and its category ``[B]``."""
        reconstruction_map, refiner_map = self.residual_maps(self.reconstruct(features, encoded_prompt), features)
        weight = self.reconstruction_weight
        refiner_scale = self.refiner_scale[prompt_category].view(-1, 1, 1, 1)
        return weight * reconstruction_map + (1 - weight) * refiner_scale * refiner_map

    def standardized(self, anomaly_map: torch.Tensor, prompt_category: torch.Tensor) -> torch.Tensor:
        """With ``normalize_per_category``: ``(A - mean_c) / std_c`` for each map's prompt category ``[B]``."""
        if not self.normalize_per_category:
            return anomaly_map
        return self.score_statistics.standardize(anomaly_map, prompt_category)

    def image_score(self, anomaly_map: torch.Tensor) -> torch.Tensor:
        """Maximum of the map after a ``score_pool_size`` average pooling (stride 1): ``[B]``.

        The square box filter runs as a vertical then a horizontal one (the same mean, ``2k`` instead of
        ``k^2`` additions per pixel).
        """
        pool_size = min(self.score_pool_size, *self.input_size)
        pooled = F.avg_pool2d(F.avg_pool2d(anomaly_map, (pool_size, 1), stride=1), (1, pool_size), stride=1)
        return pooled.amax(dim=(1, 2, 3))

    def predict(self, images: torch.Tensor, category_index: torch.Tensor | None = None) -> InferenceBatch:
        """Anomaly map ``[B, 1, H, W]`` and image score ``[B]``.

        With ``normalize_per_category`` the fused map ``A`` is standardised with the image-score
        mean and standard deviation of the chosen prompt's category on normal training images,
        ``(A - mean_c) / std_c``: one monotone map per category, so per-category metrics equal
        those of the raw map, while scores of different categories become comparable for one
        shared threshold. With ``patch_score_weight = w > 0`` the image score is
        ``(1 - w) * map score + w * patch score`` (:class:`PatchMemory`, the prompt's category).
        """
        if self.prompt_bank.is_empty:
            msg = "OneNIP has no prompt bank yet: train the model (or load a trained checkpoint) before inference."
            raise RuntimeError(msg)
        taps = self.backbone_taps(images)
        anomaly_map, prompt_category = self.fused_map(self.combine_taps(taps), category_index)
        anomaly_map = self.standardized(anomaly_map, prompt_category)
        score = self.image_score(anomaly_map)
        if self.patch_score_weight > 0:
            patches = patch_descriptors(taps)
            score = self.patch_memory.weighted_score(score, patches, prompt_category, self.patch_score_weight)
        return InferenceBatch(pred_score=score, anomaly_map=anomaly_map)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # noqa: ANN001, ANN002, ANN003
        """Resize ``refiner_scale`` to the stored one; read checkpoints of earlier layouts.

        Earlier checkpoints kept the score statistics in the prompt bank (``prompt_bank.score_mean/std``)
        and one refiner scale for all categories (a scalar, here repeated once per category).
        """
        for legacy, current in self.LEGACY_STATISTICS_KEYS.items():
            if prefix + legacy in state_dict and prefix + current not in state_dict:
                state_dict[prefix + current] = state_dict.pop(prefix + legacy)
        refiner_scale = state_dict.get(prefix + "refiner_scale")
        if refiner_scale is not None:
            if refiner_scale.ndim == 0:
                categories = state_dict.get(prefix + "prompt_bank.categories")
                count = int(categories.max()) + 1 if categories is not None and categories.numel() else 1
                refiner_scale = state_dict[prefix + "refiner_scale"] = refiner_scale.repeat(count)
            self.refiner_scale = torch.empty_like(refiner_scale, device=self.refiner_scale.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
