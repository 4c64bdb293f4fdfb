"""OneNIP torch model: feature channels from the backbone, shapes, inference, input checks."""

from __future__ import annotations

import re

import pytest
import torch
from anomalib.data import InferenceBatch

from anomalib_onenip.torch_model import OneNIPModel
from tests.tiny_models import TINY_ONENIP_MODEL

SMALL = {key: value for key, value in TINY_ONENIP_MODEL.items() if key not in ("backbone", "input_size")}


@pytest.mark.parametrize(
    ("backbone", "layers", "channels"),
    [("tf_efficientnet_b4", (0, 1, 2, 3), 272), ("tf_efficientnet_lite0", (0, 1, 2, 3), 192), ("resnet18", ("layer1", "layer2", "layer3"), 448)],
)
def test_channel_count_is_derived_from_the_backbone(backbone: str, layers: tuple, channels: int) -> None:
    model = OneNIPModel(backbone=backbone, layers=layers, input_size=(64, 64), **SMALL)
    assert model.transformer.input_proj.in_features == channels
    assert model.extract_features(torch.rand(1, 3, 64, 64)).shape == (1, channels, 4, 4)


def test_training_output_shapes() -> None:
    model = OneNIPModel(backbone="tf_efficientnet_lite0", input_size=(64, 64), **SMALL).train()
    images = torch.rand(2, 3, 64, 64)
    prompts = model.extract_features(torch.rand(2, 3, 64, 64))
    output = model(images, anomalous_images=images.flip(-1), prompt_features=prompts)
    assert output.reconstruction.shape == (4, 192, 4, 4)
    assert output.target.shape == (4, 192, 4, 4)
    assert torch.equal(output.target[:2], output.target[2:]), "both branches regress the clean features"
    assert output.refiner_logits.shape == (4, 1, 64, 64)
    assert not model.feature_extractor.feature_extractor.training, "the frozen backbone stays in eval mode"


def test_inference_returns_scores_and_maps() -> None:
    torch.manual_seed(0)
    model = OneNIPModel(backbone="tf_efficientnet_lite0", input_size=(64, 64), **SMALL).eval()
    features = model.extract_features(torch.rand(3, 3, 64, 64))
    model.prompt_bank.store(model.encode_prompts(features), model.global_features(features), torch.tensor([0, 1, 2]))
    model.score_statistics.mean, model.score_statistics.std = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.5, 1.0, 2.0])
    model.refiner_scale = torch.tensor([1.0, 2.0, 0.5])
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        output = model(images)
        query = model.extract_features(images)
        raw_map, category = model.fused_map(query)
        prompt, _ = model.prompt_bank.select(model.global_features(query))
        reconstruction_map, refiner_map = model.residual_maps(model.reconstruct(query, prompt), query)
    # A = lambda * R + (1 - lambda) * kappa_c * S with the chosen prompt's category's kappa
    kappa = model.refiner_scale[category].view(-1, 1, 1, 1)
    assert torch.allclose(raw_map, 0.5 * reconstruction_map + 0.5 * kappa * refiner_map, atol=1e-6)
    assert isinstance(output, InferenceBatch)
    assert output.anomaly_map.shape == (2, 1, 64, 64)
    assert output.pred_score.shape == (2,)
    expected = torch.nn.functional.avg_pool2d(output.anomaly_map, 16, stride=1).amax(dim=(1, 2, 3))
    assert torch.allclose(output.pred_score, expected)
    # per-category standardisation with the chosen prompt's category statistics
    mean, std = torch.tensor([1.0, 2.0, 3.0])[category], torch.tensor([0.5, 1.0, 2.0])[category]
    assert torch.allclose(output.anomaly_map, (raw_map - mean.view(-1, 1, 1, 1)) / std.view(-1, 1, 1, 1), atol=1e-5)
    model.normalize_per_category = False
    with torch.no_grad():
        assert torch.allclose(model(images).anomaly_map, raw_map)


def test_inference_without_prompt_bank_is_refused() -> None:
    model = OneNIPModel(backbone="tf_efficientnet_lite0", input_size=(64, 64), **SMALL).eval()
    with pytest.raises(RuntimeError, match="no prompt bank"):
        model(torch.rand(1, 3, 64, 64))


def test_training_without_prompts_is_refused() -> None:
    model = OneNIPModel(backbone="tf_efficientnet_lite0", input_size=(64, 64), **SMALL).train()
    with pytest.raises(ValueError, match="prompt_features"):
        model(torch.rand(1, 3, 64, 64))


@pytest.mark.parametrize("size", [(100, 100), (8, 8), (64, 72)])
def test_input_size_the_backbone_cannot_take_is_refused(size: tuple[int, int]) -> None:
    with pytest.raises(ValueError, match="multiples of its feature stride 16"):
        OneNIPModel(backbone="tf_efficientnet_lite0", input_size=size, **SMALL)


@pytest.mark.parametrize("shape", [(1, 3, 96, 96), (1, 1, 64, 64), (1, 4, 64, 64), (3, 64, 64)])
def test_image_of_another_size_or_channel_count_is_refused(shape: tuple[int, ...]) -> None:
    model = OneNIPModel(backbone="tf_efficientnet_lite0", input_size=(64, 64), **SMALL)
    with pytest.raises(ValueError, match=rf"expects normalised RGB images \[B, 3, 64, 64\], got {re.escape(str(shape))}"):
        model.extract_features(torch.rand(shape))
