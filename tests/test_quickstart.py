"""The README's main job, shortened to one epoch: build the offline data, train, test, save heatmaps."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_quickstart_builds_data_trains_and_reports(tmp_path: Path) -> None:
    executable = Path(sys.executable).with_name("onenip-quickstart")
    command = [str(executable)] if executable.exists() else [shutil.which("onenip-quickstart") or "onenip-quickstart"]
    result = subprocess.run(
        [*command, "--trainer.max_epochs", "1", "--trainer.check_val_every_n_epoch", "1"],
        cwd=tmp_path, capture_output=True, text=True, timeout=900, check=False,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:])
    assert "Per-category test metrics" in result.stdout

    data = tmp_path / "datasets" / "onenip_quickstart"
    assert sorted(path.name for path in data.iterdir() if path.is_dir()) == ["brick", "grass", "gravel"]
    assert len(list((data / "brick" / "ground_truth" / "scratch").glob("*_mask.png"))) == 8

    run = tmp_path / "results" / "OneNIP" / "onenip_quickstart" / "all" / "latest"
    metrics = json.loads((run / "metrics_per_category.json").read_text())
    assert set(metrics) == {"brick", "grass", "gravel", "mean"}
    for category in ("brick", "grass", "gravel"):
        heatmaps = list((run / "images" / category / "test").glob("*/*.png"))
        assert len(heatmaps) == 12 + 3 * 8, f"one heatmap per test image of {category}"
    assert (run / "weights" / "lightning" / "model.ckpt").is_file()
