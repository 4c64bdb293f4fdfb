"""OneNIP as an anomalib model: training, prompt bank, refiner scale, per-category metrics, checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from anomalib.engine import Engine
from lightning.pytorch import Callback

from anomalib_multiclass import CategoryImageBatch, MultiClassAD
from anomalib_onenip import OneNIP
from tests.tiny_models import TINY_ONENIP


def _test_batch(datamodule: MultiClassAD, model: OneNIP) -> CategoryImageBatch:
    batch = next(iter(datamodule.test_dataloader()))
    batch.image = model.pre_processor.transform(batch.image)
    return batch


def test_training_loss_decreases(tiny_dataset: Path, tmp_path: Path) -> None:
    class EpochLosses(Callback):
        def __init__(self) -> None:
            self.losses: list[float] = []

        def on_train_epoch_end(self, trainer, pl_module) -> None:  # noqa: ANN001
            self.losses.append(float(trainer.callback_metrics["train_loss_epoch"]))

    losses = EpochLosses()
    datamodule = MultiClassAD(root=tiny_dataset, train_batch_size=4, num_workers=0)
    model = OneNIP(**TINY_ONENIP, lr=1e-3)
    engine = Engine(max_epochs=6, accelerator="cpu", default_root_dir=tmp_path, callbacks=[losses],
                    enable_progress_bar=False, logger=False, limit_val_batches=0)
    engine.fit(model=model, datamodule=datamodule)
    assert losses.losses[-1] < 0.8 * losses.losses[0], losses.losses


def test_per_category_metrics_on_tiny_dataset(trained_onenip) -> None:  # noqa: ANN001
    model, _, engine, results = trained_onenip
    for category in ("brick", "grass", "gravel", "mean"):
        for metric in ("image_AUROC", "image_F1Max", "pixel_AUROC", "pixel_AUPR", "pixel_AUPRO"):
            assert 0.0 <= results[f"{category}/{metric}"] <= 1.0
    # 3 epochs on 64 px crops (test crops from rows no training crop covers) already localise the drawn defects
    # a little: 0.599 measured; chance is 0.5
    assert results["mean/pixel_AUROC"] > 0.55
    run_dir = Path(engine.trainer.default_root_dir)
    assert (run_dir / "metrics_per_category.json").is_file()
    assert (run_dir / "metrics_per_category.csv").is_file()
    assert model.category_names == ["brick", "grass", "gravel"]


def test_prompt_bank_holds_one_prompt_per_category(trained_onenip) -> None:  # noqa: ANN001
    model, *_ = trained_onenip
    bank = model.model.prompt_bank
    assert bank.categories.tolist() == [0, 1, 2]
    assert bank.tokens.shape == (3, 16, 32)


def _reconstruction_map_range(model: OneNIP, features: list[torch.Tensor], category: int) -> tuple[float, float]:
    """Minimum and maximum of the reconstruction map ``R`` the model outputs for ``features`` (chunks ``[b, C, h, w]``)
    of one category: its fused map with ``lambda = 1`` is ``R``."""
    onenip = model.model.eval()
    weight, onenip.reconstruction_weight = onenip.reconstruction_weight, 1.0
    try:
        with torch.no_grad():
            maps = [onenip.fused_map(chunk, torch.full((len(chunk),), category))[0] for chunk in features]
    finally:
        onenip.reconstruction_weight = weight
    return min(m.min().item() for m in maps), max(m.max().item() for m in maps)


def _calibration_features(model: OneNIP, name: str) -> list[torch.Tensor]:
    pool = model.prompt_pool.features[name]
    return [pool[model.prompt_pool.calibration_rows(len(pool))]]


def test_refiner_scale_comes_from_training_images(trained_onenip) -> None:  # noqa: ANN001
    model, *_ = trained_onenip
    ranges = [_reconstruction_map_range(model, _calibration_features(model, name), index)
              for index, name in enumerate(model.category_names)]
    low, high = min(low for low, _ in ranges), max(high for _, high in ranges)
    # one value of the paper's formula over all categories' calibration (training) images, for every category
    assert model.model.refiner_scale.tolist() == pytest.approx([(low + high) / 2] * 3, rel=1e-4)
    assert model.model.score_statistics.mean.shape == (3,)
    assert (model.model.score_statistics.std > 0).all()


def test_synthetic_refiner_scale_spans_the_twins_with_seeded_anomalies(trained_onenip) -> None:  # noqa: ANN001
    model, *_ = trained_onenip
    pool = model.prompt_pool
    normal_scale = model.model.refiner_scale.clone()
    pool.refiner_scale_calibration = "synthetic"
    try:
        torch.manual_seed(11)
        model.build_prompt_bank()
        synthetic_scale = model.model.refiner_scale.clone()
        after_calibration = torch.rand(4)
        torch.manual_seed(11)
        model.build_prompt_bank()
        assert torch.equal(model.model.refiner_scale, synthetic_scale), "fixed-seed anomalies: the same kappa every time"
        assert torch.equal(torch.rand(4), after_calibration), "the calibration leaves the training's random stream alone"
        ranges = []
        for index, name in enumerate(model.category_names):
            twins = pool.synthetic_twin_features(model.model, name, pool.image_paths[name])
            ranges.append((_reconstruction_map_range(model, _calibration_features(model, name), index),
                           _reconstruction_map_range(model, twins, index)))
    finally:
        pool.refiner_scale_calibration = "normal"
        model.build_prompt_bank()
    assert torch.equal(model.model.refiner_scale, normal_scale)
    assert all(twin != normal for normal, twin in ranges), "the twins are other images than the normal ones"
    # kappa = (max R + min R) / 2 over the normal calibration images and their synthetic twins together
    low = min(min(normal[0], twin[0]) for normal, twin in ranges)
    high = max(max(normal[1], twin[1]) for normal, twin in ranges)
    assert synthetic_scale.tolist() == pytest.approx([(low + high) / 2] * 3, rel=1e-5)


def test_category_prompt_and_nearest_prompt_paths(trained_onenip) -> None:  # noqa: ANN001
    model, datamodule, *_ = trained_onenip
    model.eval()
    batch = _test_batch(datamodule, model)
    with torch.no_grad():
        by_category = model.model(batch.image, category_index=model.category_index(batch))
        plain = model.model(batch.image)  # no category: the model picks the nearest prompt itself
    # the nearest prompt of these distinct textures is the one of the image's own category
    features = model.model.extract_features(batch.image)
    similarity = torch.nn.functional.normalize(model.model.global_features(features), dim=-1) @ model.model.prompt_bank.global_features.T
    chosen = [model.category_names[model.model.prompt_bank.categories[i]] for i in similarity.argmax(1)]
    assert chosen == list(batch.category)
    assert torch.allclose(by_category.anomaly_map, plain.anomaly_map)


def test_unknown_category_at_test_time_is_named(trained_onenip) -> None:  # noqa: ANN001
    model, datamodule, *_ = trained_onenip
    batch = _test_batch(datamodule, model)
    batch.category = ["marble"] * len(batch.image)
    with pytest.raises(ValueError, match=r"\['marble'\] were not in OneNIP's training data"):
        model.validation_step(batch)


def test_checkpoint_round_trip_gives_identical_outputs(trained_onenip, tmp_path: Path) -> None:  # noqa: ANN001
    model, datamodule, engine, _ = trained_onenip
    path = tmp_path / "model.ckpt"
    engine.trainer.save_checkpoint(path)
    restored = OneNIP.load_from_checkpoint(path, map_location="cpu")
    assert restored.category_names == model.category_names
    model.eval()
    restored.eval()
    batch = _test_batch(datamodule, model)
    with torch.no_grad():
        expected = model.model(batch.image)
        actual = restored.model(batch.image)
        exported_path = restored(batch.image * 0 + next(iter(datamodule.test_dataloader())).image)
    assert torch.equal(expected.anomaly_map, actual.anomaly_map)
    assert torch.equal(expected.pred_score, actual.pred_score)
    assert torch.equal(restored.model.refiner_scale, model.model.refiner_scale)
    assert exported_path.pred_label is not None, "the full forward (pre-process, model, post-process) runs"


def test_pretrained_backbone_offline_fails_fast_with_the_fix(tiny_dataset: Path, tmp_path: Path) -> None:
    datamodule = MultiClassAD(root=tiny_dataset, train_batch_size=4, num_workers=0)
    model = OneNIP(**{**TINY_ONENIP, "backbone": "tf_efficientnet_b4", "pre_trained": True})
    engine = Engine(max_epochs=1, accelerator="cpu", default_root_dir=tmp_path, enable_progress_bar=False)
    with pytest.raises(RuntimeError, match=r"--model.weights_path"):
        engine.fit(model=model, datamodule=datamodule)


def test_pretrained_lite0_backbone_loads_offline_at_fit_start(tiny_dataset: Path, tmp_path: Path) -> None:
    from anomalib_multiclass.backbone import offline_package_weights

    datamodule = MultiClassAD(root=tiny_dataset, categories=["brick"], train_batch_size=4, num_workers=0)
    model = OneNIP(**{**TINY_ONENIP, "pre_trained": True})
    assert not bool(model.backbone_weights_loaded)
    engine = Engine(max_epochs=1, accelerator="cpu", default_root_dir=tmp_path, enable_progress_bar=False, logger=False,
                    limit_val_batches=0)
    engine.fit(model=model, datamodule=datamodule)
    expected = offline_package_weights("tf_efficientnet_lite0")["conv_stem.weight"]
    assert torch.equal(model.model.feature_extractor.feature_extractor.conv_stem.weight, expected)
    assert bool(model.backbone_weights_loaded)


def _saved_checkpoint(trained_onenip, path: Path, **info) -> Path:  # noqa: ANN001, ANN003
    _, _, engine, _ = trained_onenip
    engine.trainer.save_checkpoint(path)
    if info:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        checkpoint["anomalib_multiclass"].update(info)
        torch.save(checkpoint, path)
    return path


@pytest.mark.parametrize(
    ("info", "message"),
    [
        ({"format": 99, "package_version": "9.0"}, "This OneNIP checkpoint has format 99 \\(saved by anomalib-multiclass-models 9.0\\)"),
        ({"model": "DiAD"}, "This is a DiAD checkpoint, not a OneNIP one: load it with DiAD"),
    ],
)
def test_checkpoint_of_another_format_or_model_is_refused(trained_onenip, tmp_path: Path, info: dict, message: str) -> None:  # noqa: ANN001
    from anomalib_multiclass.multiclass_module import IncompatibleCheckpointError

    path = _saved_checkpoint(trained_onenip, tmp_path / "model.ckpt", **info)
    with pytest.raises(IncompatibleCheckpointError, match=f"'{path}': {message}"):
        OneNIP.load_from_checkpoint(path)


def test_checkpoint_architecture_wins_over_the_command_line_defaults(trained_onenip, tmp_path: Path) -> None:  # noqa: ANN001
    """As `anomalib predict --model OneNIP --ckpt_path CKPT`: a paper-size model restores a tiny checkpoint."""
    model, datamodule, *_ = trained_onenip
    checkpoint = torch.load(_saved_checkpoint(trained_onenip, tmp_path / "model.ckpt"), map_location="cpu", weights_only=False)
    default = OneNIP(pre_trained=False, visualizer=False)
    default.on_load_checkpoint(checkpoint)  # what Lightning's checkpoint restore calls before loading the weights
    default.load_state_dict(checkpoint["state_dict"])
    batch = _test_batch(datamodule, model)
    model.eval()
    default.eval()
    with torch.no_grad():
        assert torch.equal(default.model(batch.image).anomaly_map, model.model(batch.image).anomaly_map)
    assert default.hparams.hidden_dim == TINY_ONENIP["hidden_dim"]


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_or_inf_in_the_input_is_named(trained_onenip, value: float) -> None:  # noqa: ANN001
    model, datamodule, *_ = trained_onenip
    batch = _test_batch(datamodule, model)
    batch.image[1, 0, 5, 5] = value
    with pytest.raises(ValueError, match=rf"Images \['{batch.image_path[1]}'\] contain NaN or Inf values"):
        model.predict_step(batch)


def test_training_step_with_cached_query_features_matches_the_backbone_pass(tiny_dataset: Path) -> None:
    """The normal images' features come from the training cache: the same loss as running the backbone on them."""
    datamodule = MultiClassAD(root=tiny_dataset, train_batch_size=4, num_workers=0)
    datamodule.setup()
    model = OneNIP(**{**TINY_ONENIP, "pre_trained": True}, dropout=0.0).train()
    model.cache_training_features(datamodule.train_dataloader())
    batch = next(iter(datamodule.train_dataloader()))
    batch = batch.update(image=model._pre_process(batch.image))  # noqa: SLF001  (what the pre-processor does)
    assert model.prompt_pool.cached_query_features(batch.image_path) is not None
    losses = []
    for reuse in (True, False):
        model.cache_training_features(datamodule.train_dataloader(), reuse_for_queries=reuse)
        torch.manual_seed(3)
        losses.append(model.training_step(batch)["loss"].item())
    assert model.prompt_pool.cached_query_features(batch.image_path) is None  # the second run computed them
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


@pytest.mark.parametrize(("augmentations", "backbone_images"), [(None, 4), ("flip", 8)])
def test_engine_training_reads_the_normal_features_from_the_cache(
    tiny_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, augmentations: str | None, backbone_images: int,
) -> None:
    """In anomalib's training loop (whose datamodule adds the model's resize to the dataset's transforms) a step's
    backbone sees only the 4 synthetic twins; with the user's random augmentations, the 4 normal images too."""
    from anomalib.engine import Engine
    from torchvision.transforms import v2

    model = OneNIP(**TINY_ONENIP)
    sizes: list[int] = []
    inside_step = [False]
    extract_features, training_forward = model.model.extract_features, model.model.training_forward

    def counted_extract(images: torch.Tensor) -> torch.Tensor:
        if inside_step[0]:
            sizes.append(len(images))
        return extract_features(images)

    def flagged_forward(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        inside_step[0] = True
        try:
            return training_forward(*args, **kwargs)
        finally:
            inside_step[0] = False

    monkeypatch.setattr(model.model, "extract_features", counted_extract)
    monkeypatch.setattr(model.model, "training_forward", flagged_forward)
    datamodule = MultiClassAD(root=tiny_dataset, train_batch_size=4, num_workers=0,
                              train_augmentations=v2.RandomHorizontalFlip() if augmentations else None)
    engine = Engine(max_steps=1, accelerator="cpu", default_root_dir=tmp_path, logger=False, enable_progress_bar=False,
                    limit_val_batches=0, num_sanity_val_steps=0)
    engine.fit(model=model, datamodule=datamodule)
    assert sizes == [backbone_images]
