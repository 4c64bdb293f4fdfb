"""DiAD's Spatial-aware Feature Fusion (SFF): the 8x8-level SG residuals refine the 4x4-level ones."""

from __future__ import annotations

from collections.abc import Sequence
from enum import Enum

import torch
from torch import nn

from anomalib_multiclass.options import parse_option


class SFFInit(str, Enum):
    """Initialisation of the SFF block: PyTorch's (it learns) or the official zeros (it never learns)."""

    DEFAULT = "default"
    ZERO = "zero"


class SpatialFeatureFusion(nn.Module):
    """``r~_j = SiLU(r_j + sum_i SiLU(IN(Conv3x3_stride2_ij(s_i))))`` for 3 targets ``r_j`` and 3 sources ``s_i``.

    The sources are the SG residuals 6, 7 and 8 (``[B, C_i, 2h, 2w]``, the second-deepest level),
    the targets the residuals 9, 10 and 11 (``[B, C, h, w]``, the deepest level). Every one of the
    9 branches is a bias-free 3x3 stride-2 convolution, a non-affine InstanceNorm and a SiLU.

    Args:
        source_channels: channels of the three sources (SD-1.5: 640, 1280, 1280).
        target_channels: channels of the targets (SD-1.5: 1280).
        init: ``"zero"`` zero-initialises the convolutions as the official code; since the
            sources come from zero-initialised ControlNet convs, every gradient of the block is
            then exactly zero and it never learns (an identity up to the SiLU). ``"default"``
            keeps PyTorch's Kaiming initialisation: the block still outputs exactly the zero-conv
            result at step 0 (its sources are zero) but gradients reach it and the zero convs 6-8.
    """

    def __init__(self, source_channels: Sequence[int], target_channels: int, init: str = "default") -> None:
        super().__init__()
        init = parse_option(SFFInit, init, "sff_init")
        self.branches = nn.ModuleList(
            nn.ModuleList(
                nn.Sequential(
                    nn.Conv2d(channels, target_channels, kernel_size=3, stride=2, padding=1, bias=False),
                    nn.InstanceNorm2d(target_channels, affine=False, track_running_stats=False),
                    nn.SiLU(),
                )
                for channels in source_channels
            )
            for _ in range(3)
        )
        if init == "zero":
            for target_branches in self.branches:
                for branch in target_branches:
                    nn.init.zeros_(branch[0].weight)

    def forward(self, sources: Sequence[torch.Tensor], targets: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Fuse the three sources ``[B, C_i, 2h, 2w]`` into each of the three targets ``[B, C, h, w]``."""
        return [
            torch.nn.functional.silu(
                target + sum(branch(source) for branch, source in zip(branches, sources, strict=True))
            )
            for branches, target in zip(self.branches, targets, strict=True)
        ]
