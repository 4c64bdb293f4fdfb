"""OneNIP's supervised refiner (the official "MaskHead")."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812


def _upsample_block(in_channels: int, channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, channels, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(channels),
        nn.ReLU(inplace=True),
        nn.ConvTranspose2d(channels, channels, kernel_size=2, stride=2),
    )


class Refiner(nn.Module):
    """Predict anomaly logits from the reconstruction residual ``|F_hat - F_in|``.

    Two blocks of (conv 3x3, BN, ReLU, transposed conv 2x2 stride 2) take the stride-16 residual
    ``[B, C, h, w]`` to stride 4, a 1x1 conv predicts one logit per location, and the logits are
    upsampled bilinearly (``align_corners=True``) to the image size.

    Args:
        in_channels: residual channels ``C``.
        channels: width of the two blocks (paper: 128).
    """

    def __init__(self, in_channels: int, channels: int = 128) -> None:
        super().__init__()
        self.blocks = nn.Sequential(_upsample_block(in_channels, channels), _upsample_block(channels, channels))
        self.predictor = nn.Conv2d(channels, 1, kernel_size=1)
        for module in self.modules():
            if isinstance(module, nn.Conv2d | nn.ConvTranspose2d):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward(self, residual: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        """``residual [B, C, h, w]`` -> logits ``[B, 1, H, W]`` at ``image_size``."""
        logits = self.predictor(self.blocks(residual))
        return F.interpolate(logits, size=image_size, mode="bilinear", align_corners=True)
