"""OneNIP's supervised refiner: it learns in short runs with the pixel term; per-step learning-rate schedules."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from anomalib.engine import Engine
from lightning.pytorch import seed_everything
from torchmetrics.functional.classification import binary_auroc

from anomalib_multiclass import MultiClassAD
from anomalib_onenip import OneNIP
from anomalib_onenip.components import Refiner
from anomalib_onenip.loss import OneNIPLoss, focal_loss
from tests.conftest import TINY_ONENIP


@torch.no_grad()
def _refiner_on_synthetic_anomalies(model: OneNIP, datamodule: MultiClassAD) -> tuple[torch.Tensor, torch.Tensor]:
    """The refiner's map ``S`` and the masks, ``[2N, H, W]`` each, of the training images and fresh synthetic twins."""
    model.eval()
    maps, masks = [], []
    for batch in datamodule.train_dataloader():
        anomalous, anomaly_masks = model.anomaly_generator(batch.image)
        images = model._pre_process(torch.cat([batch.image, anomalous]))  # noqa: SLF001
        features = model.model.extract_features(images)
        category_index = model._category_index(batch).repeat(2)  # noqa: SLF001
        prompt, _ = model.model.prompt_bank.select(model.model.global_features(features), category_index)
        _, refiner_map = model.model.residual_maps(model.model.reconstruct(features, prompt), features)
        maps.append(refiner_map[:, 0])
        masks.append(torch.cat([torch.zeros_like(anomaly_masks), anomaly_masks])[:, 0])
    return torch.cat(maps), torch.cat(masks)


def test_focal_term_is_bce_at_gamma_zero_and_spares_easy_pixels() -> None:
    logits = torch.tensor([[-4.0, 0.0, 4.0, -4.0]]).view(1, 1, 2, 2)
    masks = torch.tensor([[0.0, 1.0, 1.0, 1.0]]).view(1, 1, 2, 2)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, masks)
    assert focal_loss(logits, masks, gamma=0.0) == pytest.approx(bce.item())
    # gamma 2: the wrong pixel (logit -4, mask 1) keeps 0.96 of its 4.018, the unsure one (logit 0) 0.25 of its
    # 0.693, the two easy ones (0.018 each) almost nothing
    assert focal_loss(logits, masks, gamma=2.0) == pytest.approx((3.8749 + 0.1733) / 4, rel=1e-3)
    reconstruction = torch.zeros(1, 4, 2, 2)
    assert "pixel_loss" not in OneNIPLoss()(reconstruction, reconstruction, logits, masks)
    losses = OneNIPLoss(pixel_weight=2.0)(reconstruction, reconstruction, logits, masks)
    assert losses["loss"] == pytest.approx((0.5 * losses["dice_loss"] + 2.0 * losses["pixel_loss"]).item())


def test_refiner_prior_sets_the_initial_probability() -> None:
    refiner = Refiner(8, 16)
    refiner.set_prior(0.01)
    assert torch.sigmoid(refiner.predictor.bias).item() == pytest.approx(0.01)
    with pytest.raises(ValueError, match="prior must be in"):
        refiner.set_prior(1.0)


@pytest.fixture(scope="module")
def textures_128(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three texture categories (brick, grass, gravel), 128 px, 8 training images each."""
    from anomalib_multiclass.quickstart_data import build_quickstart_dataset

    root = tmp_path_factory.mktemp("textures_128") / "textures"
    return build_quickstart_dataset(root, num_train=8, num_test_good=1, num_test_per_defect=1, crop_size=128)


@pytest.mark.parametrize(
    ("options", "learns"),
    [({}, False), ({"refiner_pixel_weight": 1.0}, True)],
    ids=["paper_dice_only_collapses", "pixel_term_learns"],
)
def test_refiner_separates_synthetic_anomalies_only_with_the_pixel_term(
    textures_128: Path, tmp_path: Path, options: dict, learns: bool,
) -> None:
    """60 steps at 128 px with the paper's refiner width: Dice alone saturates the refiner to ``S ~ 0`` everywhere."""
    seed_everything(7)
    datamodule = MultiClassAD(root=textures_128, train_batch_size=4, num_workers=0)
    model = OneNIP(**{**TINY_ONENIP, "pre_trained": True, "input_size": (128, 128), "refiner_channels": 128},
                   lr=1e-3, **options)
    engine = Engine(max_steps=60, accelerator="cpu", default_root_dir=tmp_path, enable_progress_bar=False,
                    logger=False, limit_val_batches=0)
    engine.fit(model=model, datamodule=datamodule)
    model.build_prompt_bank()
    refiner_map, masks = _refiner_on_synthetic_anomalies(model, datamodule)
    auroc = binary_auroc(refiner_map.flatten(), masks.flatten().int()).item()
    inside, outside = refiner_map[masks > 0].mean().item(), refiner_map[masks == 0].mean().item()
    if learns:
        assert auroc > 0.7, auroc
        assert inside > 0.05, inside
        assert inside > 3 * outside, (inside, outside)
    else:
        assert refiner_map.max().item() < 1e-2, refiner_map.max().item()


@pytest.mark.parametrize("schedule", ["warmup_cosine", "warmup_step"])
def test_per_step_schedule_is_a_fraction_of_the_run(schedule: str) -> None:
    model = OneNIP(**TINY_ONENIP, lr_schedule=schedule, lr_warmup_fraction=0.1, lr_decay_fraction=0.8, lr_gamma=0.1)
    factors = [model._lr_factor(step, 200) for step in range(201)]  # noqa: SLF001
    assert factors[0] < 0.1
    assert factors[:20] == sorted(factors[:20])  # linear warm-up over the first 10 %
    assert max(factors) == pytest.approx(1.0, abs=0.01)
    assert factors[20:] == sorted(factors[20:], reverse=True)
    assert factors[-1] == pytest.approx(0.1)
    if schedule == "warmup_step":
        assert factors[159] == 1.0
        assert factors[160] == pytest.approx(0.1)


def test_per_step_schedule_ends_with_the_run(tiny_dataset: Path, tmp_path: Path) -> None:
    """Two epochs of 6 steps: the schedule spans the trainer's 12 steps and ends at ``lr * lr_gamma``, refiner too."""
    datamodule = MultiClassAD(root=tiny_dataset, train_batch_size=4, num_workers=0)
    model = OneNIP(**TINY_ONENIP, lr=1e-3, refiner_lr=2e-3, lr_schedule="warmup_cosine", lr_gamma=0.1)
    engine = Engine(max_epochs=2, accelerator="cpu", default_root_dir=tmp_path, enable_progress_bar=False,
                    logger=False, limit_val_batches=0)
    engine.fit(model=model, datamodule=datamodule)
    transformer_group, refiner_group = engine.trainer.optimizers[0].param_groups
    assert engine.trainer.global_step == 12
    assert transformer_group["lr"] == pytest.approx(1e-4)
    assert refiner_group["lr"] == pytest.approx(2e-4)


def test_unknown_schedule_is_refused() -> None:
    with pytest.raises(ValueError, match="lr_schedule must be one of"):
        OneNIP(**TINY_ONENIP, lr_schedule="cosine")
