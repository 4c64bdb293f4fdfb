"""OneNIP's prompt pool on its own: caching, prompt draws, the prompt bank and its calibration, image files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from anomalib_multiclass.backbone import backbone_normalization
from anomalib_onenip import OneNIP
from anomalib_onenip.components.prompt_pool import PromptPool, medoid_index, normalization
from tests.tiny_models import TINY_ONENIP


@pytest.fixture(scope="module")
def model() -> OneNIP:
    torch.manual_seed(0)
    return OneNIP(**TINY_ONENIP).eval()


def _batches(model: OneNIP, images_per_category: dict[str, torch.Tensor]):  # noqa: ANN202
    for name, images in images_per_category.items():
        yield model._pre_process(images), [name] * len(images), [f"{name}/{i}.png" for i in range(len(images))]  # noqa: SLF001


def test_cache_groups_by_category_and_serves_prompts_and_queries(model: OneNIP) -> None:
    torch.manual_seed(1)
    images = {"b": torch.rand(3, 3, 64, 64), "a": torch.rand(2, 3, 64, 64)}
    pool = model.prompt_pool
    pool.cache(model.model, _batches(model, images))
    assert list(pool.features) == ["a", "b"] and [len(f) for f in pool.features.values()] == [2, 3]
    expected = model.model.extract_features(model._pre_process(images["b"]))  # noqa: SLF001
    torch.testing.assert_close(pool.features["b"], expected)
    prompts = pool.random_prompts(["a", "b", "b"])
    assert any(torch.equal(prompts[0], row) for row in pool.features["a"])
    assert all(any(torch.equal(prompt, row) for row in pool.features["b"]) for prompt in prompts[1:])
    torch.testing.assert_close(pool.cached_query_features(["b/2.png", "a/0.png"]),
                               torch.stack([pool.features["b"][2], pool.features["a"][0]]))
    assert pool.cached_query_features(["b/2.png", "elsewhere.png"]) is None
    with pytest.raises(ValueError, match="training set is empty"):
        pool.cache(model.model, iter(()))


def test_prompt_bank_and_calibration_come_from_the_pool(model: OneNIP) -> None:
    torch.manual_seed(2)
    pool = model.prompt_pool
    pool.cache(model.model, _batches(model, {"a": torch.rand(4, 3, 64, 64), "b": torch.rand(4, 3, 64, 64) * 0.2}))
    pool.build_prompt_bank(model.model, ["a", "b"])
    bank = model.model.prompt_bank
    assert bank.categories.tolist() == [0, 1]
    medoid = medoid_index(model.model.global_features(pool.features["b"]))
    torch.testing.assert_close(bank.tokens[1], model.model.encode_prompts(pool.features["b"][medoid : medoid + 1])[0])
    assert model.model.refiner_scale.shape == (2,) and model.model.refiner_scale[0] == model.model.refiner_scale[1]
    assert model.model.score_statistics.mean.shape == (2,)
    with pytest.raises(RuntimeError, match="No cached training features"):
        PromptPool(None, model.anomaly_generator).build_prompt_bank(model.model, ["a"])


def test_the_prompt_is_the_image_nearest_the_categorys_mean_direction() -> None:
    features = torch.tensor([[1.0, 0.2], [1.0, 0.0], [1.0, -0.2], [-1.0, 0.0]])  # mean direction: the second
    assert medoid_index(features) == 1
    assert medoid_index(features[2:3]) == 0


def test_image_files_are_read_as_one_image_at_a_time_was(model: OneNIP, tiny_dataset: Path) -> None:
    """The DataLoader over PredictImages gives the features of resizing and normalising each file on its own."""
    from anomalib_multiclass.datamodule import read_rgb_image

    paths = sorted((tiny_dataset / "brick" / "train" / "good").iterdir())[:5]
    features, descriptors = model.prompt_pool.read_features(model.model, paths, with_patches=True)
    one_by_one = torch.cat([model._pre_process(read_rgb_image(str(path)).unsqueeze(0)) for path in paths])  # noqa: SLF001
    assert torch.equal(features, model.model.extract_features(one_by_one))
    assert descriptors.shape[0] == 5
    # the backbone's own normalisation, found in the pre-processor by anomalib's extract_transforms_by_type
    mean, std = normalization(model.pre_processor.transform, torch.device("cpu"))
    expected_mean, expected_std = backbone_normalization(TINY_ONENIP["backbone"])
    assert mean.flatten().tolist() == pytest.approx(expected_mean) and std.flatten().tolist() == pytest.approx(expected_std)
    assert normalization(None, torch.device("cpu"))[1].flatten().tolist() == [1.0, 1.0, 1.0]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        model.prompt_pool.read_features(model.model, [tiny_dataset / "missing.png"])
