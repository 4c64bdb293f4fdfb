"""DiAD's anomaly map and image score: feature-space distance between an image and its reconstruction."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from anomalib.models.components import GaussianBlur2d
from torch import nn
from torch.nn import functional as F

from anomalib_multiclass.backbone import build_feature_extractor


class FeatureDistanceAnomalyMap(nn.Module):
    """``A = blur_sigma(sum_l up(1 - cos(phi_l(x), phi_l(x_hat))))``, score = max after repeated average pooling.

    Args:
        backbone: frozen timm CNN ``phi`` (paper: ``resnet50``, timm's default weights).
        layers: its feature levels (paper: layer1, layer2, layer3).
        input_size: image size ``(H, W)`` of the map.
        sigma: Gaussian smoothing (paper code: 5, a 41x41 kernel).
        score_pool_size, score_pool_repeats: the image score is the maximum of the map after
            ``score_pool_repeats`` successive ``score_pool_size`` average poolings, stride 1 (paper: 8, 8).
    """

    def __init__(
        self,
        backbone: str = "resnet50",
        layers: Sequence[int | str] = ("layer1", "layer2", "layer3"),
        input_size: tuple[int, int] = (256, 256),
        sigma: float = 5.0,
        score_pool_size: int = 8,
        score_pool_repeats: int = 8,
    ) -> None:
        super().__init__()
        self.feature_extractor = build_feature_extractor(backbone, layers).requires_grad_(False)
        self.input_size = tuple(input_size)
        self.blur = GaussianBlur2d(sigma=sigma, channels=1) if sigma > 0 else nn.Identity()
        if score_pool_repeats * (score_pool_size - 1) >= min(self.input_size):
            msg = (
                f"score pooling ({score_pool_repeats} x {score_pool_size}x{score_pool_size}) leaves nothing of an "
                f"input of {self.input_size}: use fewer repeats or a larger input_size."
            )
            raise ValueError(msg)
        self.score_pool_size = score_pool_size
        self.score_pool_repeats = score_pool_repeats

    def distance_map(self, images: torch.Tensor, reconstructions: torch.Tensor) -> torch.Tensor:
        """Unsmoothed ``sum_l up(1 - cos)`` ``[B, 1, H, W]`` for images and reconstructions ``[B, 3, H, W]``."""
        batch_size = images.shape[0]
        features = self.feature_extractor(torch.cat([images, reconstructions]))
        distance = 0
        for feature in features.values():
            # Slices, not chunk(2): chunk would pin the batch size of an exported graph.
            original, reconstructed = feature[:batch_size], feature[batch_size:]
            layer_distance = 1 - F.cosine_similarity(original, reconstructed, dim=1).unsqueeze(1)
            distance = distance + F.interpolate(
                layer_distance, size=self.input_size, mode="bilinear", align_corners=True
            )
        return distance

    def forward(self, images: torch.Tensor, reconstructions: torch.Tensor) -> torch.Tensor:
        """Smoothed anomaly map ``[B, 1, H, W]``."""
        return self.blur(self.distance_map(images, reconstructions))

    def image_score(self, anomaly_map: torch.Tensor) -> torch.Tensor:
        """Maximum of ``anomaly_map`` ``[B, 1, H, W]`` after the repeated average pooling: ``[B]``."""
        pooled = anomaly_map
        for _ in range(self.score_pool_repeats):
            pooled = F.avg_pool2d(pooled, self.score_pool_size, stride=1)
        return pooled.amax(dim=(1, 2, 3))
