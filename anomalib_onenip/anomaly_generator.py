"""Synthetic anomalies for OneNIP's restoration branch and refiner: CutPaste, CutPaste-Scar, Perlin.

Every training image gets a synthetic twin with its mask (``[B, 1, H, W]``, 0/1): with probability
``cutpaste_probability`` (paper: 0.5) a CutPaste anomaly, half of them plain and half scars, else a
Perlin-noise anomaly filled with a texture (anomalib's :class:`PerlinAnomalyGenerator`, set up as
the paper: texture weight in (0.2, 1.0], rotation within +/-5 degrees). Images are in ``[0, 1]``.

The Perlin textures come from a folder (``anomaly_source_path``, DTD in the paper), else from Perlin
noise (grey blobs).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from anomalib.data.utils.generators import PerlinAnomalyGenerator
from torch import nn
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF  # noqa: N812


def _uniform(low: float, high: float) -> float:
    return low + (high - low) * torch.rand(()).item()


def _randint(low: int, high: int) -> int:
    """Integer in ``[low, high]``."""
    return int(torch.randint(low, high + 1, ()).item())


class CutPaste(nn.Module):
    """CutPaste (Li et al. 2021), plain and scar variants, on one image ``[3, H, W]`` in ``[0, 1]``.

    - plain: a rectangle of U(0.02, 0.15) of the image area, aspect ratio from U(0.3, 1) or
      U(1, 3.3), colour-jittered and pasted elsewhere; the mask is the rectangle.
    - scar: a thin patch (width U(2, 16) px, length U(10, 25) px), colour-jittered, rotated by
      U(-45, 45) degrees and pasted through its rotated outline; the mask is that outline.
    """

    def __init__(
        self,
        area_ratio: tuple[float, float] = (0.02, 0.15),
        aspect_ratio: float = 0.3,
        scar_width: tuple[float, float] = (2, 16),
        scar_length: tuple[float, float] = (10, 25),
        scar_rotation: tuple[float, float] = (-45, 45),
    ) -> None:
        super().__init__()
        self.area_ratio = area_ratio
        self.aspect_ratio = aspect_ratio
        self.scar_width = scar_width
        self.scar_length = scar_length
        self.scar_rotation = scar_rotation
        self.color_jitter = v2.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1)

    def forward(self, image: torch.Tensor, scar: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the augmented image ``[3, H, W]`` and its mask ``[1, H, W]``."""
        return self.scar(image) if scar else self.plain(image)

    def _crop(self, image: torch.Tensor, height: int, width: int) -> torch.Tensor:
        _, image_height, image_width = image.shape
        top, left = _randint(0, image_height - height), _randint(0, image_width - width)
        return self.color_jitter(image[:, top : top + height, left : left + width])

    def plain(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rectangular CutPaste."""
        _, height, width = image.shape
        area = _uniform(*self.area_ratio) * height * width
        aspect = _uniform(self.aspect_ratio, 1.0) if torch.rand(()) < 0.5 else _uniform(1.0, 1 / self.aspect_ratio)
        patch_width = min(width - 1, max(1, round(math.sqrt(area * aspect))))
        patch_height = min(height - 1, max(1, round(math.sqrt(area / aspect))))
        patch = self._crop(image, patch_height, patch_width)
        alpha = torch.ones(1, patch_height, patch_width, dtype=image.dtype, device=image.device)
        return self._paste(image, patch, alpha)

    def scar(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Thin rotated CutPaste-Scar."""
        _, height, width = image.shape
        patch_width = min(width - 1, max(1, round(_uniform(*self.scar_width))))
        patch_height = min(height - 1, max(1, round(_uniform(*self.scar_length))))
        patch = self._crop(image, patch_height, patch_width)
        angle = _uniform(*self.scar_rotation)
        with_alpha = torch.cat([patch, torch.ones_like(patch[:1])], dim=0)
        rotated = TF.rotate(with_alpha, angle, interpolation=v2.InterpolationMode.BILINEAR, expand=True, fill=0.0)
        rotated = rotated[:, : height - 1, : width - 1]
        return self._paste(image, rotated[:3], (rotated[3:] > 0.5).to(image.dtype))

    @staticmethod
    def _paste(image: torch.Tensor, patch: torch.Tensor, alpha: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _, height, width = image.shape
        patch_height, patch_width = patch.shape[-2:]
        top, left = _randint(0, height - patch_height), _randint(0, width - patch_width)
        mask = torch.zeros(1, height, width, dtype=image.dtype, device=image.device)
        mask[:, top : top + patch_height, left : left + patch_width] = alpha
        pasted = image.clone()
        region = pasted[:, top : top + patch_height, left : left + patch_width]
        pasted[:, top : top + patch_height, left : left + patch_width] = alpha * patch + (1 - alpha) * region
        return pasted, mask


class OneNIPAnomalyGenerator(nn.Module):
    """OneNIP's synthetic anomalies for a batch ``[B, 3, H, W]`` in ``[0, 1]``.

    Args:
        anomaly_source_path: folder of texture images (DTD in the paper) for the Perlin anomalies;
            None uses anomalib's Perlin-noise textures, so it works without any download.
        cutpaste_probability: share of CutPaste anomalies (the rest are Perlin); paper 0.5.
        scar_probability: share of scars among the CutPaste anomalies; paper 0.5.
    """

    def __init__(
        self,
        anomaly_source_path: str | Path | None = None,
        cutpaste_probability: float = 0.5,
        scar_probability: float = 0.5,
    ) -> None:
        super().__init__()
        if anomaly_source_path is not None and not Path(anomaly_source_path).is_dir():
            msg = f"Anomaly source folder '{anomaly_source_path}' does not exist. Give a folder of texture images or None."
            raise FileNotFoundError(msg)
        self.anomaly_source_path = anomaly_source_path
        self.cutpaste_probability = cutpaste_probability
        self.scar_probability = scar_probability
        self.cutpaste = CutPaste()
        self.perlin = PerlinAnomalyGenerator(
            anomaly_source_path=anomaly_source_path,
            probability=1.0,
            blend_factor=(0.2, 1.0),
            rotation_range=(-5, 5),
        )

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return augmented images ``[B, 3, H, W]`` and masks ``[B, 1, H, W]`` (1 = anomalous)."""
        augmented = images.clone()
        masks = torch.zeros_like(images[:, :1])
        use_cutpaste = torch.rand(images.shape[0]) < self.cutpaste_probability
        for index in torch.nonzero(use_cutpaste).flatten().tolist():
            scar = bool(torch.rand(()) < self.scar_probability)
            augmented[index], masks[index] = self.cutpaste(images[index], scar=scar)
        perlin_index = torch.nonzero(~use_cutpaste).flatten().to(images.device)
        if not perlin_index.numel():
            return augmented, masks
        perlin_images, perlin_masks = self.perlin(images[perlin_index])
        augmented[perlin_index] = perlin_images.to(images.dtype)
        masks[perlin_index] = perlin_masks.to(images.dtype)
        return augmented, masks
