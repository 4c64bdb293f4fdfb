"""DiAD's Semantic-Guided (SG) network: a ControlNet copy of the UNet encoder fed the input image, plus SFF."""

from __future__ import annotations

from collections.abc import Sequence
from enum import Enum

import torch
from torch import nn

from anomalib_diad.components.diffusers_models import build_controlnet
from anomalib_diad.components.sff import SpatialFeatureFusion
from anomalib_multiclass.options import parse_option


class InjectLevels(str, Enum):
    """Where the SG network's residuals enter the UNet: the middle block and the three deepest skips (faithful), or all."""

    DEEPEST = "deepest"
    ALL = "all"
NUM_RESIDUALS = 12
SFF_SOURCES = slice(6, 9)
SFF_TARGETS = slice(9, 12)


class SemanticGuidedNetwork(nn.Module):
    """SG network: 12 encoder residuals and a middle residual that steer the denoising UNet.

    A diffusers ``ControlNetModel`` copied from the UNet (its own time embedding, ``conv_in``,
    down blocks and middle block; an RGB hint encoder whose output is added after ``conv_in``;
    zero-initialised 1x1 output convs) computes residuals ``r_0 ... r_11`` and ``r_mid``; SFF
    fuses ``r_6 ... r_8`` into ``r_9 ... r_11``.

    Args:
        unet: the denoising ``UNet2DConditionModel`` to copy (four levels of two layers).
        hint_channels: channels of the hint encoder (SD-1.5 ControlNet: 16, 32, 96, 256).
        sff_init: ``"default"`` (SFF learns) or ``"zero"`` (the official, inert initialisation).
        use_sff: False leaves ``r_9 ... r_11`` unfused (identical to ``sff_init="zero"``).
        inject_levels: ``"deepest"`` (the official ``only_mid_control``): only ``r_mid`` and the
            three deepest skips ``r_9 ... r_11`` reach the UNet, the other nine are zero;
            ``"all"``: every residual, as a standard ControlNet.
    """

    def __init__(
        self,
        unet: nn.Module,
        hint_channels: Sequence[int],
        sff_init: str = "default",
        use_sff: bool = True,
        inject_levels: str = "deepest",
    ) -> None:
        super().__init__()
        channels = tuple(unet.config.block_out_channels)
        if len(channels) != 4 or unet.config.layers_per_block != 2:
            msg = (
                "DiAD's SG network needs a UNet of four levels with layers_per_block=2 (12 skip connections), got "
                f"block_out_channels={channels}, layers_per_block={unet.config.layers_per_block}."
            )
            raise ValueError(msg)
        inject_levels = parse_option(InjectLevels, inject_levels, "inject_levels")
        self.controlnet = build_controlnet(unet, hint_channels)
        self.sff = (
            SpatialFeatureFusion((channels[1], channels[2], channels[2]), channels[3], sff_init) if use_sff else None
        )
        self.inject_levels = inject_levels

    def forward(
        self,
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor,
        hint: torch.Tensor,
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Residuals for the UNet's skips (12 tensors ``[B, C_k, h_k, w_k]``) and middle block ``[B, C_3, h/8, w/8]``.

        Args:
            noisy_latents: ``z_t`` ``[B, 4, h, w]``.
            timesteps: ``t`` ``[B]``.
            context: text embedding ``[B, L, D]``.
            hint: the normalised input image ``[B, 3, 8h, 8w]``.
        """
        down_residuals, mid_residual = self.controlnet(
            noisy_latents,
            timesteps,
            encoder_hidden_states=context,
            controlnet_cond=hint,
            return_dict=False,
        )
        residuals = list(down_residuals)
        if self.sff is not None:
            residuals[SFF_TARGETS] = self.sff(residuals[SFF_SOURCES], residuals[SFF_TARGETS])
        if self.inject_levels == "deepest":
            residuals[: SFF_TARGETS.start] = [torch.zeros_like(residual) for residual in residuals[: SFF_TARGETS.start]]
        return residuals, mid_residual

    def unused_residual_outputs(self) -> list[nn.Module]:
        """The output convs of the residuals that never reach the UNet (replaced by zeros and not fused by SFF).

        With ``inject_levels="deepest"`` they get no gradient; they are frozen so that DDP, which requires
        every trained parameter to take part in the loss, accepts the model (training is unchanged: an
        optimiser skips parameters without gradients).
        """
        if self.inject_levels != "deepest":
            return []
        first_used = SFF_SOURCES.start if self.sff is not None else SFF_TARGETS.start
        return list(self.controlnet.controlnet_down_blocks[:first_used])
