"""Every shipped DiAD config builds its model (on the tiny architecture: SD-1.5 is 1.3 B parameters) and datamodule."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import yaml

pytest.importorskip("diffusers")

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs" / "diad").glob("*.yaml"))


def _class(spec: dict) -> type:
    module_name, _, class_name = spec["class_path"].rpartition(".")
    return getattr(importlib.import_module(module_name), class_name)


def test_every_setup_has_both_stages() -> None:
    names = {path.stem for path in CONFIGS}
    for setup in ("mvtec_ad_256", "visa_256", "small", "real_ad_small"):
        assert {setup, f"{setup}_autoencoder"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda path: path.stem)
def test_config_builds(path: Path, tiny_dataset: Path) -> None:
    config = yaml.safe_load(path.read_text())
    init_args = config["model"]["init_args"]
    assert init_args["stage"] == ("autoencoder" if path.stem.endswith("_autoencoder") else "diffusion")
    if init_args["architecture"] == "sd15":
        assert init_args["diffusion_weights"] == "stable-diffusion-v1-5/stable-diffusion-v1-5"
        assert init_args["input_size"] == [256, 256]
    model = _class(config["model"])(**{**init_args, "architecture": "tiny", "pre_trained": False})
    assert model.model.input_size == tuple(init_args["input_size"])
    sampler = model.model.sampler
    if init_args["architecture"] == "sd15":  # the official schedule and frozen UNet encoder
        assert (sampler.noise_timestep, sampler.timesteps.tolist()) == (999, [901 - 100 * k for k in range(10)])
        assert model.model.max_train_timestep == 999 and model.model.train_timesteps == "uniform"
        assert not model.model.train_unet_encoder and not model.scale_by_std and not sampler.set_alpha_to_one
    else:  # from scratch: the truncated schedule, trained on the timesteps it visits, the whole UNet trains
        assert sampler.timesteps.tolist() == [300] and model.model.train_timesteps == "sampler"
        assert model.model.train_unet_encoder and model.scale_by_std and sampler.set_alpha_to_one
    data_args = config["data"]["init_args"]
    overrides = {"root": tiny_dataset, "categories": "all"} if data_args["dataset"] == "folder" else {}
    datamodule = _class(config["data"])(**{**data_args, **overrides})
    if data_args["categories"] == "all" and data_args["dataset"] in ("mvtec_ad", "visa"):
        assert len(datamodule.categories) == {"mvtec_ad": 15, "visa": 12}[data_args["dataset"]]
