"""Every shipped OneNIP config builds its model and datamodule, and says what it claims to say."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import yaml

from anomalib_multiclass.datamodule import ROOT_PLACEHOLDER

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs" / "onenip").glob("*.yaml"))
PAPER_CONFIGS = [path for path in CONFIGS if path.stem.split("_")[-1] in ("224", "256", "320")]


def _build(spec: dict, **overrides):  # noqa: ANN003, ANN202
    module_name, _, class_name = spec["class_path"].rpartition(".")
    return getattr(importlib.import_module(module_name), class_name)(**{**spec.get("init_args", {}), **overrides})


def test_the_paper_setups_are_all_there() -> None:
    names = {path.stem for path in PAPER_CONFIGS}
    assert names == {f"{data}_{size}" for data in ("mvtec_ad", "visa", "btad") for size in (224, 256, 320)}


@pytest.mark.parametrize("path", PAPER_CONFIGS, ids=lambda path: path.stem)
def test_paper_configs_build_the_papers_model(path: Path) -> None:
    """The paper's B4, transformer, optimiser, schedule and image score (no CPU-budget option)."""
    config = yaml.safe_load(path.read_text())
    model = _build(config["model"])
    size = int(path.stem.split("_")[-1])
    assert model.model.input_size == (size, size)
    assert model.hparams.backbone == "tf_efficientnet_b4" and list(model.hparams.layers) == [0, 1, 2, 3]
    assert (model.hparams.hidden_dim, model.hparams.num_encoder_layers, model.hparams.num_decoder_layers) == (256, 4, 4)
    assert (model.hparams.lr, model.hparams.weight_decay, model.hparams.gradient_clip_val) == (1e-4, 1e-4, 0.1)
    assert (model.hparams.lr_schedule, model.hparams.lr_step_epochs, model.hparams.lr_gamma) == ("step", 800, 0.1)
    assert model.hparams.refiner_pixel_weight == 0 and model.hparams.dice_weight == 0.5
    assert model.model.patch_score_weight == 0 and model.hparams.score_pool_size == 16
    assert config["trainer"]["max_epochs"] == 1000 and config["data"]["init_args"]["train_batch_size"] == 8
    datamodule = _build(config["data"])
    expected = {"mvtec_ad": 15, "visa": 12, "btad": 3}[path.stem.rsplit("_", 1)[0]]
    assert len(datamodule.categories) == expected


@pytest.mark.parametrize(("name", "input_size", "epochs"), [("quickstart", 128, 15), ("real_ad_lite0", 160, 13)])
def test_cpu_configs_build_on_a_dataset(name: str, input_size: int, epochs: int, tiny_dataset: Path) -> None:
    """The CPU configs' backbone, size and epochs (real_ad_lite0: 160 px for 13 epochs, chosen leave one category out)."""
    config = yaml.safe_load((CONFIGS[0].parent / f"{name}.yaml").read_text())
    model = _build(config["model"])
    assert model.hparams.backbone == "tf_efficientnet_lite0" and model.model.input_size == (input_size, input_size)
    assert config["trainer"]["max_epochs"] == epochs
    assert model.hparams.refiner_pixel_weight == 1.0  # the focal refiner term that short runs need
    datamodule = _build(config["data"], root=tiny_dataset, categories="all")
    assert datamodule.categories == ["brick", "grass", "gravel"]


def test_the_packaged_quickstart_config_is_the_repositorys() -> None:
    packaged = Path(importlib.import_module("anomalib_onenip").__file__).with_name("quickstart.yaml")
    assert packaged.read_text() == (CONFIGS[0].parent / "quickstart.yaml").read_text()


def test_a_config_without_a_data_location_asks_for_it() -> None:
    config = yaml.safe_load((CONFIGS[0].parent / "real_ad_lite0.yaml").read_text())
    assert config["data"]["init_args"]["root"] == ROOT_PLACEHOLDER
    with pytest.raises(ValueError, match=r"--data.root /path/to/data"):
        _build(config["data"])
