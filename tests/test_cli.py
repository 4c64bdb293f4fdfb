"""The anomalib CLI in a subprocess, with the short name, the class path and a YAML config."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.cli import run_anomalib

pytestmark = pytest.mark.slow

TINY_ARGS = [
    "--model.backbone", "tf_efficientnet_lite0", "--model.pre_trained", "false", "--model.input_size", "[64,64]",
    "--model.hidden_dim", "32", "--model.num_heads", "2", "--model.num_encoder_layers", "1",
    "--model.num_decoder_layers", "1", "--model.dim_feedforward", "64", "--model.visualizer", "false",
    "--trainer.max_epochs", "1", "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
]


def test_train_short_name_on_anomalib_mvtec_datamodule(tiny_dataset: Path, tmp_path: Path) -> None:
    run_anomalib(["train", "--model", "OneNIP", *TINY_ARGS, "--data", "anomalib.data.MVTecAD",
               "--data.root", str(tiny_dataset), "--data.category", "brick", "--data.num_workers", "0"], tmp_path)
    run = tmp_path / "results" / "OneNIP" / "MVTecAD" / "brick" / "latest"
    assert (run / "weights" / "lightning" / "model.ckpt").is_file()
    assert "anomalib_onenip.OneNIP" in (run / "config.yaml").read_text()


def test_train_from_yaml_config_without_the_start_up_hook(tiny_dataset: Path, tmp_path: Path) -> None:
    """YAML ``class_path`` entries are the primary interface: they need no start-up hook."""
    config = tmp_path / "onenip.yaml"
    config.write_text(
        "model:\n  class_path: anomalib_onenip.OneNIP\n  init_args:\n    backbone: tf_efficientnet_lite0\n"
        "    pre_trained: false\n    input_size: [64, 64]\n    hidden_dim: 32\n    num_heads: 2\n"
        "    num_encoder_layers: 1\n    num_decoder_layers: 1\n    visualizer: false\n"
        f"data:\n  class_path: anomalib_multiclass.MultiClassAD\n  init_args:\n    root: {tiny_dataset}\n"
        "    categories: [brick, gravel]\n    num_workers: 0\n"
        "trainer:\n  max_epochs: 1\n  accelerator: cpu\n  enable_progress_bar: false\n"
    )
    run_anomalib(["train", "-c", str(config)], tmp_path, hook=False)
    metrics = tmp_path / "results" / "OneNIP" / tiny_dataset.name / "brick+gravel" / "latest" / "metrics_per_category.json"
    assert '"brick"' in metrics.read_text() and '"gravel"' in metrics.read_text()
