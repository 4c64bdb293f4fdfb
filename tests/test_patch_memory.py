"""OneNIP's patch nearest-neighbour evidence: the memory, its leave-own-image-out statistics, the image score, export."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from anomalib_multiclass.patch_memory import (
    PatchMemory,
    leave_own_image_out_scores,
    nearest_distances,
    patch_descriptors,
)
from anomalib_onenip import OneNIP
from anomalib_onenip.torch_model import OneNIPModel
from tests.tiny_models import TINY_ONENIP, TINY_ONENIP_MODEL
from tests.export_parity import assert_parity, load_images, run_exported, torch_outputs


def test_nearest_distances_equal_cdist() -> None:
    generator = torch.Generator().manual_seed(0)
    queries, memory = torch.randn(3, 20, 8, generator=generator), torch.randn(3, 50, 8, generator=generator)
    expected = torch.cdist(queries, memory).pow(2).amin(dim=-1)
    torch.testing.assert_close(nearest_distances(queries, memory), expected, atol=1e-4, rtol=1e-4)


def test_patch_descriptors_average_the_last_two_taps_at_the_finer_resolution() -> None:
    taps = [torch.randn(2, 4, 16, 16), torch.randn(2, 5, 8, 8), torch.randn(2, 6, 4, 4)]
    descriptors = patch_descriptors(taps)
    assert descriptors.shape == (2, 64, 11)
    # a constant tap stays constant after the 3 x 3 average away from the (zero-padded) border
    constant = patch_descriptors([torch.ones(1, 1, 8, 8), torch.ones(1, 1, 4, 4)])[0].view(8, 8, 2)
    torch.testing.assert_close(constant[1:-1, 1:-1, 0], torch.ones(6, 6))


def test_an_image_is_scored_without_its_own_patches() -> None:
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(3, 4, 2, generator=generator)
    memory, owners = images.reshape(-1, 2), torch.arange(3).repeat_interleave(4)
    scores = leave_own_image_out_scores(images, torch.arange(3), memory, owners)
    for image in range(3):
        others = memory[owners != image]
        expected = torch.cdist(images[image], others).amin(dim=1).amax()
        torch.testing.assert_close(scores[image], expected)
    assert (scores > 0).all()
    # a category of a single image keeps its own patches rather than scoring against nothing
    assert torch.isfinite(leave_own_image_out_scores(images[:1], torch.tensor([0]), images[0], torch.zeros(4))).all()


def test_memory_sample_is_seeded_and_repeats_rows_when_there_are_fewer() -> None:
    memory = PatchMemory(size=10)
    patches, owners = torch.randn(4, 3), torch.arange(4)
    rows, row_owners = memory.sample(patches, owners)
    assert rows.shape == (10, 3)
    assert set(row_owners.tolist()) == {0, 1, 2, 3}
    torch.testing.assert_close(rows, patches[row_owners])
    torch.testing.assert_close(memory.sample(patches, owners)[0], rows)


def test_standardised_score_uses_each_images_category_and_survives_a_state_dict_round_trip() -> None:
    memory = PatchMemory(size=4)
    memory.set_category(0, torch.zeros(4, 2), torch.tensor([1.0, 3.0]))
    memory.set_category(1, torch.full((4, 2), 10.0), torch.tensor([0.0, 2.0]))
    patches = torch.tensor([[[3.0, 4.0]], [[10.0, 10.0]]])  # distances 5 (to category 0) and 0 (to category 1)
    torch.testing.assert_close(memory(patches, torch.tensor([0, 1])), torch.tensor([(5.0 - 2.0) / 1.0, (0.0 - 1.0) / 1.0]))
    loaded = PatchMemory(size=4)
    loaded.load_state_dict(memory.state_dict())
    torch.testing.assert_close(loaded(patches, torch.tensor([0, 1])), memory(patches, torch.tensor([0, 1])))


def test_checkpoints_without_a_patch_memory_load_with_an_empty_one() -> None:
    old = OneNIPModel(**TINY_ONENIP_MODEL)
    state = {key: value for key, value in old.state_dict().items() if not key.startswith("patch_memory.")}
    model = OneNIPModel(**TINY_ONENIP_MODEL, patch_score_weight=0.5)
    model.load_state_dict(state)
    assert model.patch_memory.is_empty


@pytest.mark.parametrize(("options", "message"), [
    ({"patch_score_weight": 1.5}, "patch_score_weight must lie in"),
    ({"patch_score_weight": 0.5, "normalize_per_category": False}, "needs normalize_per_category"),
    ({"patch_memory_size": 0}, "at least one patch"),
])
def test_bad_patch_options_are_refused(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        OneNIPModel(**TINY_ONENIP_MODEL, **options)


@pytest.fixture(scope="module")
def patch_onenip(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[OneNIP, object]:
    """A tiny OneNIP with patch evidence, trained 1 epoch on brick and grass, validated (thresholds)."""
    from anomalib.engine import Engine
    from lightning.pytorch import seed_everything

    from anomalib_multiclass import MultiClassAD

    seed_everything(3)
    datamodule = MultiClassAD(root=tiny_dataset, categories=["brick", "grass"], train_batch_size=4, eval_batch_size=8,
                              num_workers=0)
    model = OneNIP(**{**TINY_ONENIP, "pre_trained": True}, lr=1e-3, patch_score_weight=0.75, patch_memory_size=256)
    engine = Engine(max_epochs=1, accelerator="cpu", default_root_dir=tmp_path_factory.mktemp("patch"),
                    enable_progress_bar=False, logger=False)
    engine.fit(model=model, datamodule=datamodule)
    return model.eval(), engine


def test_training_builds_a_memory_per_category_with_finite_statistics(patch_onenip: tuple) -> None:
    model, _ = patch_onenip
    memory = model.model.patch_memory
    assert memory.memory.shape == (2, 256, 40 + 112)  # Lite0's last two taps at layers (0, 1, 2, 3)
    assert torch.isfinite(memory.statistics.mean).all()
    assert (memory.statistics.std > 0).all()


def test_image_score_is_the_weighted_sum_of_the_two_standardised_scores(patch_onenip: tuple, tiny_dataset: Path) -> None:
    model, _ = patch_onenip
    images = torch.from_numpy(np.concatenate(load_images(sorted(tiny_dataset.glob("brick/test/*/*.png"))[:4])))
    images = model.pre_processor.transform(images)
    category = torch.zeros(len(images), dtype=torch.long)
    torch_model = model.model
    with torch.no_grad():
        output = torch_model(images, category)
        taps = torch_model.backbone_taps(images)
        anomaly_map, _ = torch_model.fused_map(torch_model.combine_taps(taps), category)
        map_score = torch_model.image_score(torch_model.standardized(anomaly_map, category))
        patch_score = torch_model.patch_memory(patch_descriptors(taps), category)
    torch.testing.assert_close(output.pred_score, 0.25 * map_score + 0.75 * patch_score)
    torch.testing.assert_close(output.anomaly_map, torch_model.standardized(anomaly_map, category))


def test_adding_a_category_appends_its_memory_and_keeps_the_others(patch_onenip: tuple, tiny_dataset: Path) -> None:
    model, _ = patch_onenip
    state = {key: value.clone() for key, value in model.model.patch_memory.state_dict().items()}
    added = OneNIP(**{**TINY_ONENIP, "pre_trained": True}, patch_score_weight=0.75, patch_memory_size=256)
    added.load_state_dict(model.state_dict())
    added.category_names = list(model.category_names)
    added.add_category("gravel", tiny_dataset / "gravel" / "train" / "good")
    memory = added.model.patch_memory
    assert memory.memory.shape[0] == 3
    torch.testing.assert_close(memory.memory[:2], state["memory"])
    torch.testing.assert_close(memory.statistics.mean[:2], state["statistics.mean"])
    assert torch.isfinite(memory.statistics.mean[2])


def test_openvino_export_keeps_the_patch_score(patch_onenip: tuple, tiny_dataset: Path, tmp_path: Path) -> None:
    from anomalib.deploy import ExportType

    model, engine = patch_onenip
    engine.export(model=model, export_type=ExportType.OPENVINO, export_root=tmp_path)
    images = np.concatenate(load_images(sorted(tiny_dataset.glob("*/test/*/*.png"))[::4]))
    exported = run_exported(tmp_path / "weights" / "openvino" / "model.xml", images)
    assert_parity(torch_outputs(model, images), exported, map_tolerance=1e-3)


def test_without_a_category_every_memory_and_the_pooled_statistics_are_used() -> None:
    memory = PatchMemory(size=4, pooled_row=True)
    memory.store([torch.zeros(4, 2), torch.full((4, 2), 10.0)], [torch.tensor([1.0, 3.0]), torch.tensor([5.0, 7.0])])
    patches = torch.tensor([[[10.0, 10.0]], [[3.0, 4.0]]])  # nearest: category 1 (distance 0), category 0 (5)
    pooled_mean, pooled_std = torch.tensor([1.0, 3.0, 5.0, 7.0]).mean(), torch.tensor([1.0, 3.0, 5.0, 7.0]).std(correction=0)
    torch.testing.assert_close(memory(patches, None), (torch.tensor([0.0, 5.0]) - pooled_mean) / pooled_std)


def test_diad_builds_its_memory_with_the_score_statistics_and_adds_the_patch_score(tiny_dataset: Path) -> None:
    from torchvision.transforms.v2 import Resize

    from anomalib_diad import DiAD
    from anomalib_multiclass import MultiClassAD
    from anomalib_multiclass.multiclass_module import training_images_in_order

    model = DiAD(architecture="tiny", input_size=(128, 128), backbone="tf_efficientnet_lite0", layers=[1, 2, 3],
                 diffusion_weights=None, pre_trained=False, ddim_steps=1, patch_score_weight=0.5, patch_memory_size=64,
                 calibration_images_per_category=3, visualizer=False)
    datamodule = MultiClassAD(root=tiny_dataset, categories=["brick", "grass"], eval_batch_size=8, num_workers=0,
                              augmentations=Resize((128, 128)))
    datamodule.setup()
    model.compute_score_statistics(training_images_in_order(datamodule))
    memory = model.model.patch_memory
    assert memory.memory.shape == (2, 64, 40 + 112)
    assert memory.statistics.mean.shape == (3,)  # two categories and the pooled row
    images = model.pre_processor.transform(next(iter(datamodule.test_dataloader())).image)
    category = torch.zeros(len(images), dtype=torch.long)
    torch_model = model.model.eval()
    with torch.no_grad():
        output = torch_model(images, category)
        map_score = torch_model.anomaly_map.image_score(output.anomaly_map)
        patch_score = memory(torch_model.patch_descriptors(images), category)
    torch.testing.assert_close(output.pred_score, 0.5 * map_score + 0.5 * patch_score)
