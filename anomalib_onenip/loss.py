"""OneNIP's training loss: feature reconstruction MSE plus Dice on the refiner's map."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812


def dice_loss(probabilities: torch.Tensor, masks: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """Mean over samples of ``1 - (sum(S*G) + smooth) / (sum(S^2) + sum(G^2) + smooth)``.

    Args:
        probabilities: refiner probabilities ``S`` ``[B, 1, H, W]``.
        masks: ground-truth masks ``G`` ``[B, 1, H, W]`` in {0, 1}.
        smooth: smoothing constant (official code: 1).
    """
    probabilities, masks = probabilities.flatten(1), masks.flatten(1)
    numerator = (probabilities * masks).sum(dim=1) + smooth
    denominator = probabilities.pow(2).sum(dim=1) + masks.pow(2).sum(dim=1) + smooth
    return (1 - numerator / denominator).mean()


class OneNIPLoss(nn.Module):
    """``MSE(F_hat, F_clean) + dice_weight * Dice(sigmoid(refiner logits), mask)``.

    Args:
        dice_weight: weight of the Dice term (paper: 0.5).
    """

    def __init__(self, dice_weight: float = 0.5) -> None:
        super().__init__()
        self.dice_weight = dice_weight

    def forward(
        self,
        reconstruction: torch.Tensor,
        target: torch.Tensor,
        refiner_logits: torch.Tensor,
        masks: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """Loss terms for ``reconstruction, target [2B, C, h, w]``, ``refiner_logits, masks [2B, 1, H, W]``.

        Returns:
            ``{"loss": total, "feature_loss": MSE, "dice_loss": Dice}``.
        """
        feature_loss = F.mse_loss(reconstruction, target)
        refiner_loss = dice_loss(torch.sigmoid(refiner_logits), masks)
        return {
            "loss": feature_loss + self.dice_weight * refiner_loss,
            "feature_loss": feature_loss,
            "dice_loss": refiner_loss,
        }
