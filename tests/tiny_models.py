"""The tests' tiny models, defined once: keyword arguments, and the same as CLI arguments and YAML ``init_args``."""

from __future__ import annotations

import json
from typing import Any

# OneNIP(**TINY_ONENIP): Lite0 (random weights unless a test asks for the offline ImageNet ones), 64 px
TINY_ONENIP: dict[str, Any] = {
    "backbone": "tf_efficientnet_lite0",
    "pre_trained": False,
    "input_size": (64, 64),
    "hidden_dim": 32,
    "num_heads": 2,
    "num_encoder_layers": 1,
    "num_decoder_layers": 1,
    "dim_feedforward": 64,
    "refiner_channels": 16,
    "visualizer": False,
}
# OneNIPModel(**TINY_ONENIP_MODEL): the torch model of TINY_ONENIP
TINY_ONENIP_MODEL = {key: value for key, value in TINY_ONENIP.items() if key not in ("pre_trained", "visualizer")}

# DiADModel(**TINY_DIAD_MODEL): the tiny diffusers architecture at DiAD's smallest input size
TINY_DIAD_MODEL: dict[str, Any] = {"architecture": "tiny", "input_size": (128, 128), "backbone": "resnet18"}
# DiAD(**TINY_DIAD): trained from scratch, one DDIM step, statistics from two images per category
TINY_DIAD: dict[str, Any] = {
    **TINY_DIAD_MODEL,
    "diffusion_weights": None,
    "pre_trained": False,
    "ddim_steps": 1,
    "calibration_images_per_category": 2,
    "visualizer": False,
}


def _text(value: Any) -> str:  # noqa: ANN401
    return value if isinstance(value, str) else json.dumps(list(value) if isinstance(value, tuple) else value)


def cli_args(settings: dict[str, Any]) -> list[str]:
    """``--model.KEY VALUE`` for every setting (JSON values, as anomalib's CLI parses them)."""
    return [item for key, value in settings.items() for item in (f"--model.{key}", _text(value))]


def yaml_init_args(settings: dict[str, Any], indent: int = 4) -> str:
    """The settings as YAML lines of a config's ``init_args``."""
    return "".join(f"{' ' * indent}{key}: {_text(value)}\n" for key, value in settings.items())
