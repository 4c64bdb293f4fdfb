"""DiAD's training losses: stage 1 (autoencoder reconstruction) and stage 2 (epsilon prediction)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class AutoencoderLoss(nn.Module):
    """``L1(x, x_hat) + perceptual_weight * P(x, x_hat) + kl_weight * KL / (3 H W)``.

    The official stage 1 uses ldm's L1 + LPIPS + 1e-6 KL (sums per image) without its discriminator.
    Here the L1 is a mean, so the per-image KL sum is divided by the number of pixel values to keep
    the official KL-to-L1 ratio. LPIPS has no offline weights; ``P`` is the anomaly map's own
    feature distance (mean ``1 - cos`` of the frozen backbone's features), used only when the
    backbone holds pretrained weights.

    Args:
        kl_weight: weight of the KL term (official: 1e-6).
        perceptual_weight: weight of ``P`` (0 disables it).
    """

    def __init__(self, kl_weight: float = 1e-6, perceptual_weight: float = 0.0) -> None:
        super().__init__()
        self.kl_weight = kl_weight
        self.perceptual_weight = perceptual_weight

    def forward(
        self,
        images: torch.Tensor,
        reconstructions: torch.Tensor,
        kl: torch.Tensor,
        perceptual: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Loss terms for images and reconstructions ``[B, 3, H, W]``, KL per image ``[B]`` and ``P`` (scalar or None).

        Returns:
            ``{"loss": total, "l1_loss": ..., "kl_loss": ...}`` plus ``"perceptual_loss"`` when given.
        """
        l1_loss = F.l1_loss(reconstructions, images)
        kl_loss = kl.mean() / images[0].numel()
        losses = {"l1_loss": l1_loss, "kl_loss": kl_loss}
        total = l1_loss + self.kl_weight * kl_loss
        if perceptual is not None:
            losses["perceptual_loss"] = perceptual
            total = total + self.perceptual_weight * perceptual
        return {"loss": total, **losses}


class DiffusionLoss(nn.Module):
    """Unweighted epsilon-prediction MSE (ldm's ``l_simple``, ``loss_type="l2"``)."""

    def forward(self, noise_prediction: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Mean squared error of predicted and true noise ``[B, 4, h, w]``."""
        return F.mse_loss(noise_prediction, noise)
