"""DiAD's pretrained parts from a local Stable Diffusion folder in diffusers layout (a tiny random stand-in)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from anomalib_diad import DiAD
from anomalib_diad.components.diffusers_models import (
    build_autoencoder,
    build_unet,
    load_pretrained_autoencoder,
    load_pretrained_unet,
)
from anomalib_diad.weights import UNET_ENCODER_PARTS
from tests.tiny_models import TINY_DIAD_MODEL

TINY = {**TINY_DIAD_MODEL, "backbone": "tf_efficientnet_lite0", "layers": [1, 2, 3]}


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``unet/``, ``vae/``, ``tokenizer/`` and ``text_encoder/`` of the tiny architecture, random weights."""
    root = tmp_path_factory.mktemp("fake_sd15")
    torch.manual_seed(1)
    build_unet("tiny").save_pretrained(root / "unet")
    build_autoencoder("tiny").save_pretrained(root / "vae")
    tokenizer_dir = root / "tokenizer"
    tokenizer_dir.mkdir()
    (tokenizer_dir / "vocab.json").write_text(json.dumps({"<|startoftext|>": 0, "<|endoftext|>": 1, "!": 2}))
    (tokenizer_dir / "merges.txt").write_text("#version: 0.2\n")
    vocab, merges = str(tokenizer_dir / "vocab.json"), str(tokenizer_dir / "merges.txt")
    transformers.CLIPTokenizer(vocab, merges, model_max_length=8).save_pretrained(tokenizer_dir)
    text_config = transformers.CLIPTextConfig(
        vocab_size=3, hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4,
        max_position_embeddings=8, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )  # fmt: skip
    transformers.CLIPTextModel(text_config).save_pretrained(root / "text_encoder")
    return root


def _same(module: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(value, state_dict[key]) for key, value in module.state_dict().items())


def test_stage_two_loads_unet_autoencoder_context_and_copies_the_encoder(sd_folder: Path) -> None:
    model = DiAD(**TINY, diffusion_weights=str(sd_folder))
    context_before = model.model.context.clone()
    model.on_fit_start()
    unet = load_pretrained_unet(str(sd_folder))
    assert _same(model.model.unet, unet.state_dict())
    assert _same(model.model.autoencoder, load_pretrained_autoencoder(str(sd_folder)).state_dict())
    controlnet = model.model.sg_network.controlnet
    for part in UNET_ENCODER_PARTS:
        assert _same(getattr(controlnet, part), getattr(unet, part).state_dict()), part
    assert model.model.context.shape == (1, 8, 32) and not torch.equal(model.model.context, context_before)
    assert bool(model.initial_weights_loaded)


def test_stage_one_loads_only_the_autoencoder(sd_folder: Path) -> None:
    model = DiAD(**TINY, stage="autoencoder", diffusion_weights=str(sd_folder))
    unet_before = {key: value.clone() for key, value in model.model.unet.state_dict().items()}
    model.on_fit_start()
    assert _same(model.model.autoencoder, load_pretrained_autoencoder(str(sd_folder)).state_dict())
    assert _same(model.model.unet, unet_before)


def test_weights_of_another_architecture_are_named(sd_folder: Path) -> None:
    model = DiAD(**{**TINY, "architecture": "small"}, diffusion_weights=str(sd_folder), stage="autoencoder")
    with pytest.raises(ValueError, match="do not fit this DiAD architecture"):
        model.on_fit_start()
