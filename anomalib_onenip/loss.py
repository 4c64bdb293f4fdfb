"""OneNIP's training loss: feature reconstruction MSE plus Dice on the refiner's map (plus an optional pixel term)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812
from torchvision.ops import sigmoid_focal_loss


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
    """``MSE(F_hat, F_clean) + dice_weight * Dice(sigmoid(logits), mask) + pixel_weight * Focal(logits, mask)``.

    Args:
        dice_weight: weight of the Dice term (paper: 0.5).
        pixel_weight: weight of the pixel-wise focal/BCE term on the refiner's logits (paper: 0, no such term).
            Computed on the logits, so a saturated sigmoid still gets a gradient of about 1 on a wrong pixel
            (Dice's gradient through the sigmoid vanishes there).
        focal_gamma: focusing exponent of that term (0: binary cross-entropy); larger values down-weight the
            (many, easy) well-classified pixels.
    """

    def __init__(self, dice_weight: float = 0.5, pixel_weight: float = 0.0, focal_gamma: float = 0.0) -> None:
        super().__init__()
        self.dice_weight = dice_weight
        self.pixel_weight = pixel_weight
        self.focal_gamma = focal_gamma

    def forward(
        self,
        reconstruction: torch.Tensor,
        target: torch.Tensor,
        refiner_logits: torch.Tensor,
        masks: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """Loss terms for ``reconstruction, target [2B, C, h, w]``, ``refiner_logits, masks [2B, 1, H, W]``.

        Returns:
            ``{"loss": total, "feature_loss": MSE, "dice_loss": Dice, "pixel_loss": focal/BCE}``
            (``pixel_loss`` only with ``pixel_weight > 0``).
        """
        feature_loss = F.mse_loss(reconstruction, target)
        refiner_loss = dice_loss(torch.sigmoid(refiner_logits), masks)
        losses = {"feature_loss": feature_loss, "dice_loss": refiner_loss}
        total = feature_loss + self.dice_weight * refiner_loss
        if self.pixel_weight > 0:
            # torchvision's focal loss without its class weighting (alpha < 0); gamma 0 is the plain BCE
            losses["pixel_loss"] = sigmoid_focal_loss(refiner_logits, masks, alpha=-1, gamma=self.focal_gamma, reduction="mean")
            total = total + self.pixel_weight * losses["pixel_loss"]
        return {"loss": total, **losses}
