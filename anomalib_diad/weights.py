"""DiAD's initial weights: Stable Diffusion 1.5 parts in diffusers layout, and stage 1's autoencoder.

Loaded when training starts (``DiAD.on_fit_start``), never at construction, so loading a checkpoint or
exporting needs no network.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from anomalib_diad.components.diffusers_models import (
    empty_prompt_embedding,
    load_pretrained_autoencoder,
    load_pretrained_unet,
)
from anomalib_diad.torch_model import DiADModel

logger = logging.getLogger(__name__)

# the UNet parts that the SG network starts from (a ControlNet copy of the UNet encoder)
UNET_ENCODER_PARTS = ("conv_in", "time_proj", "time_embedding", "down_blocks", "mid_block")


def load_diffusion_weights(model: DiADModel, source: str, with_autoencoder: bool, with_unet: bool) -> None:
    """Load parts of Stable Diffusion ``source`` (a hub id or a folder in diffusers layout) into ``model``.

    Args:
        model: the DiAD torch model.
        source: Stable Diffusion 1.5 in diffusers layout (``unet``, ``vae``, ``tokenizer``, ``text_encoder``).
        with_autoencoder: load its autoencoder and latent scale (stage 1, or stage 2 without stage 1's).
        with_unet: load its UNet, copy the UNet encoder into the SG network, and store the empty-prompt
            text embedding (stage 2).

    Raises:
        ValueError: weights that do not fit the model's architecture, naming the source.
    """
    if with_autoencoder:
        logger.info("DiAD: loading the autoencoder of '%s'.", source)
        autoencoder = load_pretrained_autoencoder(source)
        _load_part(model.autoencoder, autoencoder.state_dict(), f"the autoencoder of '{source}'")
        model.latent_scale.fill_(float(autoencoder.config.scaling_factor))
    if not with_unet:
        return
    logger.info("DiAD: loading the UNet and the empty-prompt embedding of '%s'.", source)
    unet = load_pretrained_unet(source)
    _load_part(model.unet, unet.state_dict(), f"the UNet of '{source}'")
    controlnet = model.sg_network.controlnet
    for part in UNET_ENCODER_PARTS:
        getattr(controlnet, part).load_state_dict(getattr(model.unet, part).state_dict())
    context = empty_prompt_embedding(source)
    if context.shape[-1] != model.context.shape[-1]:
        msg = f"The text embedding of '{source}' has width {context.shape[-1]}, the UNet expects {model.context.shape[-1]}."
        raise ValueError(msg)
    model.context = context.to(model.context)


def load_stage1_autoencoder(model: DiADModel, source: str) -> None:
    """Stage 1's autoencoder and latent scale into ``model``: a DiAD checkpoint (``model.ckpt``) or a diffusers
    ``AutoencoderKL`` folder (with its ``scaling_factor``).

    Raises:
        FileNotFoundError: ``source`` does not exist.
        ValueError: a file that is not a checkpoint, holds no DiAD autoencoder, or does not fit the architecture.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        autoencoder = load_pretrained_autoencoder(str(path.parent), subfolder=path.name)
        state_dict, latent_scale = autoencoder.state_dict(), float(autoencoder.config.scaling_factor)
    elif path.is_file():
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:
            msg = f"Cannot read autoencoder_checkpoint '{path}': {error}. Give stage 1's model.ckpt."
            raise ValueError(msg) from error
        prefix = "model.autoencoder."
        state_dict = {
            key.removeprefix(prefix): value
            for key, value in checkpoint.get("state_dict", {}).items()
            if key.startswith(prefix)
        }
        if not state_dict:
            msg = f"'{path}' holds no DiAD autoencoder (no '{prefix}*' weights): give stage 1's model.ckpt."
            raise ValueError(msg)
        latent_scale = float(checkpoint["state_dict"].get("model.latent_scale", model.latent_scale))
    else:
        msg = (
            f"autoencoder_checkpoint '{path}' does not exist. Give stage 1's checkpoint "
            "(results/DiAD/<dataset>/<categories>/latest/weights/lightning/model.ckpt) or an AutoencoderKL folder."
        )
        raise FileNotFoundError(msg)
    logger.info("DiAD: autoencoder loaded from '%s' (latent scale %.5f).", path, latent_scale)
    _load_part(model.autoencoder, state_dict, f"the autoencoder of '{path}'")
    model.latent_scale.fill_(latent_scale)


def _load_part(module: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    try:
        module.load_state_dict(state_dict)
    except RuntimeError as error:
        msg = f"Weights of {source} do not fit this DiAD architecture (set `architecture` to match them): {error}"
        raise ValueError(msg) from error
