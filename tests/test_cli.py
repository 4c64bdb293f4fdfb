"""The anomalib CLI in a subprocess, with the short name, the class path and a YAML config."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.cli import run_anomalib
from tests.tiny_models import TINY_ONENIP, cli_args, yaml_init_args

pytestmark = pytest.mark.slow

TINY_ARGS = [
    *cli_args(TINY_ONENIP), "--trainer.max_epochs", "1", "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
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
        f"model:\n  class_path: anomalib_onenip.OneNIP\n  init_args:\n{yaml_init_args(TINY_ONENIP)}"
        f"data:\n  class_path: anomalib_multiclass.MultiClassAD\n  init_args:\n    root: {tiny_dataset}\n"
        "    categories: [brick, gravel]\n    num_workers: 0\n"
        "trainer:\n  max_epochs: 1\n  accelerator: cpu\n  enable_progress_bar: false\n"
    )
    run_anomalib(["train", "-c", str(config)], tmp_path, hook=False)
    metrics = tmp_path / "results" / "OneNIP" / tiny_dataset.name / "brick+gravel" / "latest" / "metrics_per_category.json"
    assert '"brick"' in metrics.read_text() and '"gravel"' in metrics.read_text()
