"""Same answer twice: seeded training is deterministic on the CPU; a prompt bank of 100 categories works end to end."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from anomalib.engine import Engine
from lightning.pytorch import seed_everything

from anomalib_multiclass import MultiClassAD
from anomalib_onenip import OneNIP
from tests.tiny_models import TINY_ONENIP
from tests.export_parity import assert_parity, run_exported, torch_outputs


def _train_onenip(root: Path, work: Path, seed: int) -> tuple[OneNIP, dict]:
    seed_everything(seed)
    datamodule = MultiClassAD(root=root, train_batch_size=4, eval_batch_size=8, num_workers=0)
    model = OneNIP(**TINY_ONENIP, lr=1e-3)
    engine = Engine(max_epochs=2, accelerator="cpu", default_root_dir=work, enable_progress_bar=False, logger=False)
    engine.fit(model=model, datamodule=datamodule)
    return model, engine.test(model=model, datamodule=datamodule)[0]


def test_two_seeded_onenip_runs_are_identical(tiny_dataset: Path, tmp_path: Path) -> None:
    """Random prompts, synthetic anomalies, jitter and dropout all draw from Lightning's seeded generators."""
    first_model, first = _train_onenip(tiny_dataset, tmp_path / "first", seed=11)
    second_model, second = _train_onenip(tiny_dataset, tmp_path / "second", seed=11)
    assert first == second
    for (name, value), other in zip(first_model.state_dict().items(), second_model.state_dict().values(), strict=True):
        assert torch.equal(value, other), name
    _, third = _train_onenip(tiny_dataset, tmp_path / "third", seed=12)
    assert third != first, "another seed gives another model (the comparison above can fail)"


def test_two_seeded_diad_runs_are_identical(tiny_dataset: Path, tmp_path: Path) -> None:
    pytest.importorskip("diffusers")
    from anomalib_diad import DiAD

    scores = []
    for run in ("first", "second"):
        seed_everything(5)
        datamodule = MultiClassAD(root=tiny_dataset, categories=["brick"], train_batch_size=8, num_workers=0)
        model = DiAD(architecture="tiny", input_size=(128, 128), diffusion_weights=None, pre_trained=False,
                     backbone="resnet18", ddim_steps=1, calibration_images_per_category=2, visualizer=False)
        engine = Engine(max_epochs=1, accelerator="cpu", default_root_dir=tmp_path / run, enable_progress_bar=False,
                        logger=False)
        engine.fit(model=model, datamodule=datamodule)
        image = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(0))
        scores.append(torch_outputs(model, image.numpy())["pred_score"])
        scores.append(torch_outputs(model, image.numpy())["pred_score"])  # the same image twice
    assert scores[0] == scores[1] == scores[2] == scores[3]


@pytest.fixture(scope="module")
def hundred_category_onenip() -> OneNIP:
    """A tiny OneNIP whose prompt bank and calibration come from 100 categories of cached features."""
    torch.manual_seed(0)
    model = OneNIP(**TINY_ONENIP).eval()
    channels = sum(model.model.feature_extractor.out_dims)
    height, width = model.model.feature_size
    model.prompt_pool.features = {  # what on_train_start caches from the training images
        f"category_{index:03d}": torch.randn(3, channels, height, width) + index / 10 for index in range(100)
    }
    model.category_names = sorted(model.prompt_pool.features)
    model.build_prompt_bank()
    post_processor = model.post_processor
    for name, value in (("_image_threshold", 1.0), ("_pixel_threshold", 1.0), ("image_min", -3.0),
                        ("image_max", 3.0), ("pixel_min", -3.0), ("pixel_max", 3.0)):
        getattr(post_processor, name).fill_(value)
    return model


def test_prompt_bank_of_100_categories(hundred_category_onenip: OneNIP) -> None:
    model = hundred_category_onenip
    bank = model.model.prompt_bank
    assert bank.tokens.shape[0] == 100 and model.model.score_statistics.mean.shape == (100,)
    images = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        features = model.model.extract_features(model._pre_process(images))  # noqa: SLF001
        chosen = bank.select(model.model.global_features(features), torch.tensor([0, 42, 99, 7]))[1]
    assert chosen.tolist() == [0, 42, 99, 7]


@pytest.mark.slow
@pytest.mark.long
def test_prompt_bank_of_100_categories_exports(hundred_category_onenip: OneNIP, tmp_path: Path) -> None:
    path = hundred_category_onenip.to_onnx(tmp_path, input_size=None)
    images = np.random.default_rng(2).random((3, 3, 80, 96), dtype=np.float32)
    assert_parity(torch_outputs(hundred_category_onenip, images), run_exported(path, images), map_tolerance=1e-3)
