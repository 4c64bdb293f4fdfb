"""DiAD's anomaly map and image score: feature-space distance between an image and its reconstruction."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from anomalib.models.components import GaussianBlur2d
from torch import nn
from torch.nn import functional as F

from anomalib_multiclass.backbone import build_feature_extractor


# The paper's map constants hold at 256 px; other sizes scale them with the shorter side.
PAPER_INPUT_SIZE = 256
PAPER_SIGMA = 5.0
PAPER_SCORE_POOL_SIZE = 8


def scaled_map_constants(input_size: Sequence[int]) -> tuple[float, int]:
    """Gaussian sigma and score pooling size for an input ``(H, W)``: the paper's 5 and 8 at 256 px, scaled linearly.

    Example: 128 px gives ``(2.5, 4)``, 512 px ``(10.0, 16)``.
    """
    ratio = min(int(size) for size in input_size) / PAPER_INPUT_SIZE
    return PAPER_SIGMA * ratio, max(1, round(PAPER_SCORE_POOL_SIZE * ratio))


class FeatureDistanceAnomalyMap(nn.Module):
    """``A = blur_sigma(sum_l up(1 - cos(phi_l(x), phi_l(x_hat))))``, score = max after repeated average pooling.

    Args:
        backbone: frozen timm CNN ``phi`` (paper: ``resnet50``, timm's default weights).
        layers: its feature levels (paper: layer1, layer2, layer3).
        input_size: image size ``(H, W)`` of the map.
        sigma: Gaussian smoothing (paper code: 5 at 256 px, a 41x41 kernel); None scales the paper's
            value with the input size (:func:`scaled_map_constants`); 0 disables it.
        score_pool_size, score_pool_repeats: the image score is the maximum of the map after
            ``score_pool_repeats`` successive ``score_pool_size`` average poolings, stride 1 (paper: 8, 8
            at 256 px); a None size scales the paper's 8 with the input size.
    """

    def __init__(
        self,
        backbone: str = "resnet50",
        layers: Sequence[int | str] = ("layer1", "layer2", "layer3"),
        input_size: tuple[int, int] = (256, 256),
        sigma: float | None = None,
        score_pool_size: int | None = None,
        score_pool_repeats: int = 8,
    ) -> None:
        super().__init__()
        self.feature_extractor = build_feature_extractor(backbone, layers).requires_grad_(False)
        self.input_size = tuple(input_size)
        scaled_sigma, scaled_pool_size = scaled_map_constants(self.input_size)
        sigma = scaled_sigma if sigma is None else sigma
        score_pool_size = scaled_pool_size if score_pool_size is None else score_pool_size
        self.sigma = sigma
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
