"""Installed into someone's anomalib environment, this package changes nothing for anomalib's own models.

Each test runs anomalib's CLI in fresh interpreters (``tests/anomalib_session.py``): with the package's
start-up hook active and with it disabled, and with a simulated anomalib release that renamed the CLI
method the hook wraps.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tests.tiny_models import TINY_ONENIP, cli_args

pytestmark = pytest.mark.slow

SESSION = Path(__file__).with_name("anomalib_session.py")
PADIM = ["--model", "Padim", "--model.backbone", "resnet18", "--model.pre_trained", "false",
         "--model.layers", "[layer1, layer2]", "--model.n_features", "20",
         "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false", "--trainer.logger", "false"]
CHECKPOINT = "results/Padim/MVTecAD/brick/v0/weights/lightning/model.ckpt"


def _session(commands: list[list[str]], cwd: Path, hook: bool, *extra: str) -> tuple[list[dict], str]:
    """Run ``commands`` in one fresh interpreter in ``cwd``; their results and the interpreter's stderr."""
    cwd.mkdir(parents=True, exist_ok=True)
    (cwd / "commands.json").write_text(json.dumps(commands))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "ANOMALIB_MULTICLASS_MODELS_AUTOLOAD": "1" if hook else "0"}
    result = subprocess.run([sys.executable, str(SESSION), "commands.json", *extra], cwd=cwd, capture_output=True,
                            text=True, timeout=900, check=False, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    outcomes = [json.loads(line[len("RESULT "):]) for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    assert len(outcomes) == len(commands), result.stdout[-3000:] + result.stderr[-3000:]
    return outcomes, result.stderr


def _padim_commands(data: Path, images: Path) -> list[list[str]]:
    data_args = ["--data", "anomalib.data.MVTecAD", "--data.root", str(data), "--data.category", "brick",
                 "--data.num_workers", "0"]
    return [
        ["train", *PADIM, *data_args, "--seed_everything", "5"],  # seeding: anomalib ignores the integer seed
        ["test", *PADIM, *data_args, "--ckpt_path", CHECKPOINT],
        ["predict", *PADIM, "--data", str(images), "--ckpt_path", CHECKPOINT],
        ["test", *PADIM, *data_args, "--ckpt_path", "s3://bucket/model.ckpt"],  # a remote path is not refused by us
        ["test", *PADIM, *data_args, "--ckpt_path", "missing.ckpt"],
        ["train", *PADIM, *data_args, "--ckpt_path", CHECKPOINT],  # anomalib tests the checkpoint it resumed from
    ]


def test_padim_behaves_identically_with_and_without_the_hook(tiny_dataset: Path, tmp_path: Path) -> None:
    """Train, test, predict, remote and missing ``--ckpt_path``, resume: the same outputs and the same errors."""
    images = tiny_dataset / "brick" / "test" / "hole"
    commands = _padim_commands(tiny_dataset, images)
    with_hook, _ = _session(commands, tmp_path / "with_hook", hook=True)
    without_hook, _ = _session(commands, tmp_path / "without_hook", hook=False)
    assert with_hook == without_hook
    trained, tested, predicted, remote, missing, resumed = with_hook
    assert trained["digest"] and trained["metrics"] and tested["metrics"] and resumed["metrics"]
    assert len(predicted["scores"]) == len(list(images.iterdir()))
    assert "error" in remote and "error" in missing
    assert "anomalib-multiclass-models" not in remote["error"] + missing["error"]


def test_renamed_cli_method_leaves_anomalib_working(tiny_dataset: Path, tmp_path: Path) -> None:
    """An anomalib release without ``before_instantiate_classes``: one warning, ``anomalib --help`` and PaDiM work."""
    data_args = ["--data", "anomalib.data.MVTecAD", "--data.root", str(tiny_dataset), "--data.category", "brick",
                 "--data.num_workers", "0"]
    commands = [["--help"], ["train", *PADIM, *data_args]]
    outcomes, stderr = _session(commands, tmp_path, True, "--rename-cli-method", "before_instantiate_classes",
                                "prepare_instantiation")
    help_run, padim_run = outcomes
    assert help_run == {"exit": 0}
    assert padim_run["digest"], "PaDiM trained and saved its checkpoint"
    assert {"image_AUROC", "pixel_AUROC"} <= set(padim_run["metrics"]), "and anomalib tested it"
    assert all(0 <= value <= 1 for value in padim_run["metrics"].values()), padim_run["metrics"]
    assert stderr.count("has no before_instantiate_classes(self)") == 1, stderr[-3000:]


def test_onenip_by_class_path_without_the_hook(tiny_dataset: Path, tmp_path: Path) -> None:
    """The documented primary interface needs no start-up hook; the seed fix still applies to OneNIP."""
    onenip = ["--model", "anomalib_onenip.OneNIP", *cli_args(TINY_ONENIP), "--trainer.max_epochs", "1",
              "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false", "--trainer.logger", "false",
              "--data", "anomalib_multiclass.MultiClassAD", "--data.root", str(tiny_dataset),
              "--data.categories", "[brick]", "--data.num_workers", "0", "--data.train_batch_size", "4"]
    first, second = _session([["train", *onenip, "--seed_everything", "11"],
                              ["train", *onenip, "--seed_everything", "11"]], tmp_path, hook=False)[0]
    assert first["digest"] == second["digest"], "--seed_everything is applied to OneNIP without the hook"
    assert first["metrics"] == second["metrics"] and "brick/image_AUROC" in first["metrics"]
