"""The diffusers pieces of DiAD: lazy import, architectures, scheduler, pretrained weights.

diffusers is an optional dependency (``pip install "anomalib-multiclass-models[diad]"``): it is
imported only here, when a DiAD model is built, so ``import anomalib_diad`` works without it.

Architectures (``ARCHITECTURES``):

* ``"sd15"``: the paper's Stable Diffusion 1.5 UNet (859.5 M parameters, context ``[1, 77, 768]``)
  and KL-f8 autoencoder (83.7 M), for weights in diffusers layout.
* ``"small"``: a four-level UNet of 8.6 M parameters (SG network 3.8 M) and a 1.3 M autoencoder,
  trained from scratch (offline).
* ``"tiny"``: the 2.4 M UNet and 0.26 M autoencoder of the tests.

All autoencoders downsample by 8 and all UNets have four levels of two layers, so the SG network
yields 12 encoder residuals (DiAD's SFF indices 6 to 11).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from anomalib_multiclass.backbone import hub_reachable

INSTALL_HINT = 'pip install "anomalib-multiclass-models[diad]"'
SD15_SCALING_FACTOR = 0.18215
NUM_TRAIN_TIMESTEPS = 1000

_DOWN_BLOCKS = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
_UP_BLOCKS = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
_VAE_DOWN = ("DownEncoderBlock2D",) * 4
_VAE_UP = ("UpDecoderBlock2D",) * 4

ARCHITECTURES: dict[str, dict[str, Any]] = {
    "sd15": {
        "unet": {
            "block_out_channels": (320, 640, 1280, 1280),
            "layers_per_block": 2,
            "down_block_types": _DOWN_BLOCKS,
            "up_block_types": _UP_BLOCKS,
            "cross_attention_dim": 768,
            "attention_head_dim": 8,
            "norm_num_groups": 32,
            "sample_size": 64,
        },
        "vae": {
            "block_out_channels": (128, 256, 512, 512),
            "down_block_types": _VAE_DOWN,
            "up_block_types": _VAE_UP,
            "layers_per_block": 2,
            "latent_channels": 4,
            "norm_num_groups": 32,
            "sample_size": 512,
            "scaling_factor": SD15_SCALING_FACTOR,
        },
        "hint_channels": (16, 32, 96, 256),
        "context_length": 77,
    },
    "small": {
        "unet": {
            "block_out_channels": (32, 64, 128, 128),
            "layers_per_block": 2,
            "down_block_types": _DOWN_BLOCKS,
            "up_block_types": _UP_BLOCKS,
            "cross_attention_dim": 64,
            "attention_head_dim": 8,
            "norm_num_groups": 32,
            "sample_size": 32,
        },
        "vae": {
            "block_out_channels": (32, 64, 64, 64),
            "down_block_types": _VAE_DOWN,
            "up_block_types": _VAE_UP,
            "layers_per_block": 1,
            "latent_channels": 4,
            "norm_num_groups": 32,
            "sample_size": 256,
            "scaling_factor": SD15_SCALING_FACTOR,
        },
        "hint_channels": (16, 32, 64, 128),
        "context_length": 8,
    },
    "tiny": {
        "unet": {
            "block_out_channels": (32, 32, 64, 64),
            "layers_per_block": 2,
            "down_block_types": _DOWN_BLOCKS,
            "up_block_types": _UP_BLOCKS,
            "cross_attention_dim": 32,
            "attention_head_dim": 8,
            "norm_num_groups": 8,
            "sample_size": 16,
        },
        "vae": {
            "block_out_channels": (16, 16, 32, 32),
            "down_block_types": _VAE_DOWN,
            "up_block_types": _VAE_UP,
            "layers_per_block": 1,
            "latent_channels": 4,
            "norm_num_groups": 8,
            "sample_size": 128,
            "scaling_factor": SD15_SCALING_FACTOR,
        },
        "hint_channels": (8, 16, 32, 32),
        "context_length": 8,
    },
}


def import_diffusers() -> ModuleType:
    """The ``diffusers`` module, or an ImportError that says how to install DiAD's extra."""
    try:
        return importlib.import_module("diffusers")
    except ImportError as error:
        msg = f"DiAD needs diffusers, which is not installed: run `{INSTALL_HINT}` (or `pip install '.[diad]'`)."
        raise ImportError(msg) from error


def architecture_config(name: str) -> dict[str, Any]:
    """The configuration of a named architecture (see ``ARCHITECTURES``)."""
    if name not in ARCHITECTURES:
        msg = f"Unknown DiAD architecture '{name}'. Choose one of {list(ARCHITECTURES)}."
        raise ValueError(msg)
    return ARCHITECTURES[name]


def build_unet(name: str) -> torch.nn.Module:
    """A ``UNet2DConditionModel`` of the architecture ``name``, random weights."""
    return import_diffusers().UNet2DConditionModel(**architecture_config(name)["unet"])


def build_autoencoder(name: str) -> torch.nn.Module:
    """An ``AutoencoderKL`` (downsampling x8, 4 latent channels) of the architecture ``name``, random weights."""
    return import_diffusers().AutoencoderKL(**architecture_config(name)["vae"])


def build_controlnet(unet: torch.nn.Module, hint_channels: tuple[int, ...]) -> torch.nn.Module:
    """DiAD's SG encoder: ``ControlNetModel.from_unet`` (encoder and middle block copies, zero convs, RGB hint)."""
    diffusers = import_diffusers()
    return diffusers.ControlNetModel.from_unet(
        unet,
        conditioning_embedding_out_channels=tuple(hint_channels),
        conditioning_channels=3,
    )


def build_ddim_scheduler(set_alpha_to_one: bool = False) -> Any:
    """DiAD's DDIM schedule (ldm's scaled-linear betas, 'leading' spacing with offset 1: 10 steps are 901, ..., 1).

    ``set_alpha_to_one``: the last update ends at the clean latent (alpha product 1) instead of ldm's and
    Stable Diffusion's ``alpha_cumprod[0]``.
    """
    return import_diffusers().DDIMScheduler(
        num_train_timesteps=NUM_TRAIN_TIMESTEPS,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
        set_alpha_to_one=set_alpha_to_one,
        clip_sample=False,
    )


def _load_part(model_class: type, source: str, subfolder: str, **kwargs: Any) -> Any:
    """``model_class.from_pretrained(source, subfolder=...)`` from a local folder, the hub cache or the hub.

    Raises:
        FileNotFoundError: a local folder without the part.
        RuntimeError: a hub id that is neither cached nor reachable, with the fix.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / subfolder).is_dir():
            msg = f"'{path}' has no '{subfolder}' folder: give a Stable Diffusion 1.5 folder in diffusers layout."
            raise FileNotFoundError(msg)
        return model_class.from_pretrained(str(path), subfolder=subfolder, **kwargs)
    try:
        return model_class.from_pretrained(source, subfolder=subfolder, local_files_only=True, **kwargs)
    except (OSError, ValueError):
        pass
    if not hub_reachable():
        msg = (
            f"Cannot get '{subfolder}' of '{source}': it is not a local folder, not in the Hugging Face cache, and the "
            "hub is unreachable (offline, or HF_HUB_OFFLINE is set). Download Stable Diffusion 1.5 in diffusers "
            "layout and give its folder with --model.diffusion_weights /path/to/stable-diffusion-v1-5, or train "
            "the small architecture from scratch (--model.architecture small --model.diffusion_weights null)."
        )
        raise RuntimeError(msg)
    return model_class.from_pretrained(source, subfolder=subfolder, **kwargs)


def load_pretrained_unet(source: str) -> torch.nn.Module:
    """The UNet of a diffusers-layout pipeline (hub id or folder), subfolder ``unet``."""
    return _load_part(import_diffusers().UNet2DConditionModel, source, "unet")


def load_pretrained_autoencoder(source: str, subfolder: str = "vae") -> torch.nn.Module:
    """The autoencoder of a diffusers-layout pipeline (hub id or folder), subfolder ``vae``."""
    return _load_part(import_diffusers().AutoencoderKL, source, subfolder)


@torch.no_grad()
def empty_prompt_embedding(source: str) -> torch.Tensor:
    """CLIP text-encoder last hidden state of the empty prompt, ``[1, 77, 768]`` for SD-1.5 (computed once).

    Needs ``transformers`` (part of the ``diad`` extra) and the ``tokenizer`` and ``text_encoder``
    folders of the pipeline.
    """
    try:
        transformers = importlib.import_module("transformers")
    except ImportError as error:
        msg = f"Computing the empty-prompt embedding needs transformers: run `{INSTALL_HINT}`."
        raise ImportError(msg) from error
    tokenizer = _load_part(transformers.CLIPTokenizer, source, "tokenizer")
    text_encoder = _load_part(transformers.CLIPTextModel, source, "text_encoder").eval()
    tokens = tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt")
    return text_encoder(tokens.input_ids).last_hidden_state
