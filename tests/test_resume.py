"""Interrupted training loses nothing: SIGKILL mid-epoch, resume with --ckpt_path, end as if never interrupted."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from tests.cli import anomalib_command, run_anomalib

pytestmark = pytest.mark.slow

SEED = 3
EPOCHS = 2


def _config(path: Path, model: str, data_root: Path, categories: list[str], batch_size: int, devices: int = 1) -> Path:
    """A YAML run with the README's checkpoint callback, saving every step (``epoch=E-step=S.ckpt`` and ``last.ckpt``).

    ``devices=2`` trains with Lightning's DDP on two CPU processes (gloo).
    """
    distributed = f"  devices: {devices}\n  strategy: ddp\n" if devices > 1 else ""
    path.write_text(
        f"seed_everything: {SEED}\n"
        f"model:\n{model}"
        f"data:\n  class_path: anomalib_multiclass.MultiClassAD\n  init_args:\n    root: {data_root}\n"
        f"    categories: {json.dumps(categories)}\n    num_workers: 0\n    train_batch_size: {batch_size}\n"
        f"trainer:\n  max_epochs: {EPOCHS}\n  accelerator: cpu\n{distributed}  enable_progress_bar: false\n  callbacks:\n"
        "    - class_path: lightning.pytorch.callbacks.ModelCheckpoint\n      init_args:\n"
        "        dirpath: checkpoints\n        filename: '{epoch}-{step}'\n        every_n_train_steps: 1\n"
        "        save_top_k: -1\n        save_last: true\n"
    )
    return path


def _step_checkpoints(run_dir: Path) -> list[Path]:
    return list((run_dir / "checkpoints").glob("epoch=*.ckpt"))


def _step(checkpoint: Path) -> int:
    return int(re.search(r"step=(\d+)", checkpoint.name).group(1))


def _global_step(checkpoint: Path) -> int | None:
    """The training step a checkpoint was saved at; None for a file the kill cut short."""
    try:
        return torch.load(checkpoint, map_location="cpu", weights_only=True)["global_step"]
    except Exception:  # noqa: BLE001  (any failure to read means the write was interrupted)
        return None


def _final_state(run_dir: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Weights of the run's last checkpoint and its per-category test metrics."""
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    metrics = json.loads(next(run_dir.glob("results/*/*/*/latest/metrics_per_category.json")).read_text())
    return state, metrics


def _interrupted_then_resumed(config: Path, run_dir: Path, steps_per_epoch: int) -> int:
    """Train, SIGKILL the run (all its processes) once it is inside the second epoch, resume as the README says.

    The resumed run starts from ``last.ckpt``; only if the kill cut that file short (or it was written at
    an epoch's end) from the newest complete mid-epoch step checkpoint. Returns the step it started from.
    """
    run_dir.mkdir()
    kill_after = steps_per_epoch + steps_per_epoch // 2  # inside the second epoch
    process = subprocess.Popen(  # noqa: S603
        [*anomalib_command(), "train", "-c", str(config)],
        cwd=run_dir,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        start_new_session=True,  # its own process group: the DDP workers are killed with it
    )
    deadline = time.monotonic() + 600
    while process.poll() is None and time.monotonic() < deadline:
        if any(_step(path) >= kill_after for path in _step_checkpoints(run_dir)):
            os.killpg(process.pid, signal.SIGKILL)
            break
        time.sleep(0.02)
    assert process.wait() == -signal.SIGKILL, "the run ended before it could be killed mid-epoch"
    steps = {path: _global_step(path) for path in [run_dir / "checkpoints" / "last.ckpt", *_step_checkpoints(run_dir)]}
    mid_epoch = [path for path, step in steps.items() if step is not None and step % steps_per_epoch != 0]
    last = run_dir / "checkpoints" / "last.ckpt"
    resume_from = last if last in mid_epoch else max(mid_epoch, key=steps.get)
    run_anomalib(["train", "-c", str(config), "--ckpt_path", str(resume_from)], run_dir)
    return steps[resume_from]


def _assert_same_end(uninterrupted: Path, resumed: Path) -> None:
    expected_state, expected_metrics = _final_state(uninterrupted)
    state, metrics = _final_state(resumed)
    assert state.keys() == expected_state.keys()
    for name, value in expected_state.items():
        assert torch.equal(state[name], value), f"{name} differs after resuming"
    assert metrics == expected_metrics


def _resume_check(tmp_path: Path, model: str, data_root: Path, categories: list[str], batch_size: int,
                  steps_per_epoch: int, devices: int = 1) -> None:
    config = _config(tmp_path / "config.yaml", model, data_root, categories, batch_size, devices)
    uninterrupted = tmp_path / "uninterrupted"
    uninterrupted.mkdir()
    run_anomalib(["train", "-c", str(config)], uninterrupted)
    assert max(map(_step, _step_checkpoints(uninterrupted))) == EPOCHS * steps_per_epoch
    resumed_at = _interrupted_then_resumed(config, tmp_path / "resumed", steps_per_epoch)
    assert steps_per_epoch < resumed_at < EPOCHS * steps_per_epoch
    _assert_same_end(uninterrupted, tmp_path / "resumed")


ONENIP = (
    "  class_path: anomalib_onenip.OneNIP\n  init_args:\n    backbone: tf_efficientnet_lite0\n"
    "    pre_trained: false\n    input_size: [64, 64]\n    hidden_dim: 32\n    num_heads: 2\n"
    "    num_encoder_layers: 1\n    num_decoder_layers: 1\n    dim_feedforward: 64\n    visualizer: false\n"
)


def test_onenip_killed_mid_epoch_resumes_to_the_same_model_and_metrics(tiny_dataset: Path, tmp_path: Path) -> None:
    """Random prompts, synthetic anomalies and the shuffle continue where the killed run stopped."""
    _resume_check(tmp_path, ONENIP, tiny_dataset, ["brick", "grass", "gravel"], batch_size=4, steps_per_epoch=6)


@pytest.mark.long
def test_two_process_ddp_onenip_killed_mid_epoch_resumes_to_the_same_model(tiny_dataset: Path, tmp_path: Path) -> None:
    """DDP on 2 CPU processes: each rank's shard position and random states continue where the killed run stopped."""
    _resume_check(tmp_path, ONENIP, tiny_dataset, ["brick", "grass", "gravel"], batch_size=4, steps_per_epoch=3,
                  devices=2)


@pytest.mark.long
def test_diad_stage_two_killed_mid_epoch_resumes_to_the_same_model_and_metrics(
    tiny_dataset: Path, tmp_path: Path
) -> None:
    """Diffusion noise, timesteps and the shuffle continue where the killed run stopped."""
    pytest.importorskip("diffusers")
    model = (
        "  class_path: anomalib_diad.DiAD\n  init_args:\n    architecture: tiny\n    input_size: [128, 128]\n"
        "    diffusion_weights: null\n    pre_trained: false\n    backbone: resnet18\n    stage: diffusion\n"
        "    ddim_steps: 1\n    calibration_images_per_category: 2\n    accumulate_grad_batches: 1\n"
        "    visualizer: false\n"
    )
    _resume_check(tmp_path, model, tiny_dataset, ["brick"], batch_size=2, steps_per_epoch=4)
