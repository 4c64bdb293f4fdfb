"""Every shipped config builds its model and datamodule."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import yaml

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs" / "onenip").glob("*.yaml"))


def _build(spec: dict, **overrides):  # noqa: ANN003, ANN202
    module_name, _, class_name = spec["class_path"].rpartition(".")
    return getattr(importlib.import_module(module_name), class_name)(**{**spec.get("init_args", {}), **overrides})


def test_the_paper_setups_and_the_quickstart_are_there() -> None:
    names = {path.stem for path in CONFIGS}
    expected = {f"{data}_{size}" for data in ("mvtec_ad", "visa", "btad") for size in (224, 256, 320)}
    assert expected | {"quickstart", "real_ad_lite0"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda path: path.stem)
def test_config_builds(path: Path, tiny_dataset: Path) -> None:
    config = yaml.safe_load(path.read_text())
    model = _build(config["model"])
    assert model.model.input_size == tuple(config["model"]["init_args"]["input_size"])
    data_args = config["data"]["init_args"]
    overrides = {"root": tiny_dataset} if data_args["dataset"] == "folder" and data_args["categories"] == "all" else {}
    datamodule = _build(config["data"], **overrides)
    if data_args["categories"] == "all" and data_args["dataset"] == "mvtec_ad":
        assert len(datamodule.categories) == 15
    if data_args["categories"] == "all" and data_args["dataset"] == "visa":
        assert len(datamodule.categories) == 12
    if data_args["categories"] == "all" and data_args["dataset"] == "btech":
        assert len(datamodule.categories) == 3
