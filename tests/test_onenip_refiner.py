"""OneNIP's supervised refiner: it learns in short runs with the pixel term; the per-step learning-rate schedule."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from anomalib.engine import Engine
from lightning.pytorch import seed_everything
from torchmetrics.functional.classification import binary_auroc

from anomalib_multiclass import MultiClassAD
from anomalib_onenip import OneNIP
from anomalib_onenip.loss import OneNIPLoss
from tests.tiny_models import TINY_ONENIP


@torch.no_grad()
def _refiner_on_synthetic_anomalies(model: OneNIP, datamodule: MultiClassAD) -> tuple[torch.Tensor, torch.Tensor]:
    """The refiner's map ``S`` and the masks, ``[2N, H, W]`` each, of the training images and fresh synthetic twins."""
    model.eval()
    maps, masks = [], []
    for batch in datamodule.train_dataloader():
        anomalous, anomaly_masks = model.anomaly_generator(batch.image)
        images = model._pre_process(torch.cat([batch.image, anomalous]))  # noqa: SLF001
        features = model.model.extract_features(images)
        category_index = model.category_index(batch).repeat(2)
        prompt, _ = model.model.prompt_bank.select(model.model.global_features(features), category_index)
        _, refiner_map = model.model.residual_maps(model.model.reconstruct(features, prompt), features)
        maps.append(refiner_map[:, 0])
        masks.append(torch.cat([torch.zeros_like(anomaly_masks), anomaly_masks])[:, 0])
    return torch.cat(maps), torch.cat(masks)


def _focal_loss_as_before(logits: torch.Tensor, masks: torch.Tensor, gamma: float) -> torch.Tensor:
    """The hand-written pixel term that torchvision's ``sigmoid_focal_loss`` replaced: ``(1 - e^-BCE)^gamma BCE``."""
    cross_entropy = torch.nn.functional.binary_cross_entropy_with_logits(logits, masks, reduction="none")
    return ((1 - torch.exp(-cross_entropy)).pow(gamma) * cross_entropy).mean()


@pytest.mark.parametrize("gamma", [0.0, 2.0])
def test_pixel_term_is_the_focal_loss_it_was(gamma: float) -> None:
    torch.manual_seed(0)
    logits = torch.randn(4, 1, 16, 16) * 6
    masks = (torch.rand(4, 1, 16, 16) > 0.8).float()
    reconstruction = torch.zeros(4, 8, 2, 2)
    losses = OneNIPLoss(pixel_weight=1.0, focal_gamma=gamma)(reconstruction, reconstruction, logits, masks)
    assert losses["pixel_loss"].item() == pytest.approx(_focal_loss_as_before(logits, masks, gamma).item(), rel=1e-5)
    logits.requires_grad_(True)
    new_gradient, = torch.autograd.grad(OneNIPLoss(pixel_weight=1.0, focal_gamma=gamma)(
        reconstruction, reconstruction, logits, masks)["pixel_loss"], logits)
    old_gradient, = torch.autograd.grad(_focal_loss_as_before(logits, masks, gamma), logits)
    torch.testing.assert_close(new_gradient, old_gradient, rtol=1e-4, atol=1e-9)


def test_focal_term_spares_easy_pixels_and_joins_the_loss() -> None:
    logits = torch.tensor([[-4.0, 0.0, 4.0, -4.0]]).view(1, 1, 2, 2)
    masks = torch.tensor([[0.0, 1.0, 1.0, 1.0]]).view(1, 1, 2, 2)
    reconstruction = torch.zeros(1, 4, 2, 2)
    assert "pixel_loss" not in OneNIPLoss()(reconstruction, reconstruction, logits, masks)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, masks)
    plain = OneNIPLoss(pixel_weight=1.0)(reconstruction, reconstruction, logits, masks)["pixel_loss"]
    assert plain.item() == pytest.approx(bce.item())
    # gamma 2: the wrong pixel (logit -4, mask 1) keeps 0.96 of its 4.018, the unsure one (logit 0) 0.25 of its
    # 0.693, the two easy ones (0.018 each) almost nothing
    losses = OneNIPLoss(pixel_weight=2.0, focal_gamma=2.0)(reconstruction, reconstruction, logits, masks)
    assert losses["pixel_loss"].item() == pytest.approx((3.8749 + 0.1733) / 4, rel=1e-3)
    assert losses["loss"] == pytest.approx((0.5 * losses["dice_loss"] + 2.0 * losses["pixel_loss"]).item())


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


def _warmup_step_factor_as_before(step: int, total: int, warmup: float, decay: float, gamma: float) -> float:
    """The hand-written factor that torch's LinearLR, MultiStepLR and SequentialLR replaced."""
    progress = step / total
    if progress < warmup:
        return (step + 1) / (warmup * total + 1)
    return 1.0 if progress < decay else gamma


def _factors(model: OneNIP, total_steps: int) -> list[float]:
    """The learning-rate factor at every optimizer step of a run of ``total_steps`` (the scheduler stepped as Lightning does)."""
    model.trainer = type("Trainer", (), {"estimated_stepping_batches": total_steps})()
    configured = model.configure_optimizers()
    optimizer, scheduler = configured["optimizer"], configured["lr_scheduler"]["scheduler"]
    factors = []
    for _ in range(total_steps):
        factors.append(optimizer.param_groups[0]["lr"] / model.hparams.lr)
        optimizer.step()
        scheduler.step()
    return factors


@pytest.mark.parametrize("total_steps", [200, 3560])
def test_warmup_step_schedule_is_the_one_it_was(total_steps: int) -> None:
    """The same factors as before at every step when the warm-up is a whole number of steps (5 % of 20 epochs)."""
    model = OneNIP(**TINY_ONENIP, lr_schedule="warmup_step", lr_warmup_fraction=0.05, lr_decay_fraction=0.8, lr_gamma=0.1)
    factors = _factors(model, total_steps)
    before = [_warmup_step_factor_as_before(step, total_steps, 0.05, 0.8, 0.1) for step in range(total_steps)]
    assert factors == pytest.approx(before, rel=1e-6)
    assert factors[int(0.8 * total_steps) - 1] == pytest.approx(1.0) and factors[-1] == pytest.approx(0.1)


def test_per_step_schedule_ends_with_the_run(tiny_dataset: Path, tmp_path: Path) -> None:
    """Two epochs of 6 steps: the schedule spans the trainer's 12 steps and ends at ``lr * lr_gamma``."""
    datamodule = MultiClassAD(root=tiny_dataset, train_batch_size=4, num_workers=0)
    model = OneNIP(**TINY_ONENIP, lr=1e-3, lr_schedule="warmup_step", lr_gamma=0.1)
    engine = Engine(max_epochs=2, accelerator="cpu", default_root_dir=tmp_path, enable_progress_bar=False,
                    logger=False, limit_val_batches=0)
    engine.fit(model=model, datamodule=datamodule)
    assert engine.trainer.global_step == 12
    assert engine.trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(1e-4)


@pytest.mark.parametrize(("option", "value"), [("lr_schedule", "cosine"), ("refiner_scale_calibration", "test_set")])
def test_unknown_mode_is_refused_with_the_choices(option: str, value: str) -> None:
    with pytest.raises(ValueError, match=rf"Unknown {option} '{value}'. Choose one of"):
        OneNIP(**TINY_ONENIP, **{option: value})
