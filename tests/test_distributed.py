"""Lightning DDP with gloo on 2 CPU processes: it works, fits what one process fits, scores each image once.

The multi-process runs go through anomalib's CLI (``--trainer.strategy ddp --trainer.devices 2``), with
``tests.distributed_support.RecordFittedState`` recording each rank's fitted constants and scored images.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from anomalib_multiclass import MultiClassAD
from anomalib_multiclass.resumable import EpochShuffleSampler
from tests.cli import run_anomalib
from tests.distributed_support import largest_difference, refit_in_one_process, run_checkpoint, run_config, run_metrics
from tests.tiny_models import TINY_DIAD, TINY_ONENIP, yaml_init_args

REPO = Path(__file__).resolve().parents[1]
CATEGORIES = ["brick", "grass"]
BATCH = 4  # per rank
ONENIP = f"  class_path: anomalib_onenip.OneNIP\n  init_args:\n{yaml_init_args(TINY_ONENIP)}"
DIAD = (
    "  class_path: anomalib_diad.DiAD\n  init_args:\n"
    + yaml_init_args({**TINY_DIAD, "calibration_images_per_category": 4, "accumulate_grad_batches": 1})
    + "    stage: {stage}\n{extra}"
)


# ------------------------------------------------------------------------------------ samplers
@pytest.mark.parametrize("num_samples", [10, 9])
def test_training_shards_split_the_one_process_order(num_samples: int) -> None:
    """Rank r takes every other position of the one-process order (padded by its start when odd), resumable."""
    one_process = list(EpochShuffleSampler(num_samples, seed=3))
    assert sorted(one_process) == list(range(num_samples))
    shards = [list(EpochShuffleSampler(num_samples, seed=3, num_replicas=2, rank=rank)) for rank in (0, 1)]
    padded = one_process + one_process[: len(shards[0]) * 2 - num_samples]
    assert shards == [padded[0::2], padded[1::2]]
    assert len(shards[0]) == len(shards[1]) == len(EpochShuffleSampler(num_samples, 3, num_replicas=2, rank=1))
    resumed = EpochShuffleSampler(num_samples, seed=3, num_replicas=2, rank=1)
    resumed.resume_at(0, 2)
    assert list(resumed) == shards[1][2:]


def test_evaluation_loaders_give_each_image_to_one_rank_once(tiny_dataset: Path) -> None:
    datamodule = MultiClassAD(root=tiny_dataset, categories=CATEGORIES, num_workers=0)
    datamodule.setup()
    shares = []
    for rank in (0, 1):
        datamodule.trainer = SimpleNamespace(world_size=2, global_rank=rank)
        shares.append(list(datamodule.test_dataloader().sampler))
    assert sorted(shares[0] + shares[1]) == list(range(len(datamodule.test_data)))
    datamodule.trainer = None
    assert list(datamodule.test_dataloader().sampler) == list(range(len(datamodule.test_data)))


# --------------------------------------------------------------------------------- DDP runs
def _run_ddp(config: Path, cwd: Path) -> None:
    cwd.mkdir(parents=True, exist_ok=True)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    run_anomalib(["train", "-c", str(config)], cwd)


@pytest.fixture(scope="module")
def onenip_ddp_run(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("onenip_ddp")
    _run_ddp(run_config(run / "config.yaml", ONENIP, tiny_dataset, CATEGORIES, 2, BATCH, devices=2), run)
    return run


@pytest.fixture(scope="module")
def diad_ddp_runs(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    pytest.importorskip("diffusers")
    stage1 = tmp_path_factory.mktemp("diad_stage1_ddp")
    model = DIAD.format(stage="autoencoder", extra="")
    _run_ddp(run_config(stage1 / "config.yaml", model, tiny_dataset, CATEGORIES, 1, BATCH, devices=2), stage1)
    stage2 = tmp_path_factory.mktemp("diad_stage2_ddp")
    model = DIAD.format(stage="diffusion", extra=f"    autoencoder_checkpoint: {run_checkpoint(stage1)}\n")
    _run_ddp(run_config(stage2 / "config.yaml", model, tiny_dataset, CATEGORIES, 1, BATCH, devices=2), stage2)
    return {"autoencoder": stage1, "diffusion": stage2}


def _same_on_every_rank(run: Path) -> dict[str, torch.Tensor]:
    ranks = [torch.load(run / f"fitted_rank{rank}.pt", weights_only=True) for rank in (0, 1)]
    assert ranks[0].keys() == ranks[1].keys()
    for name, value in ranks[0].items():
        assert torch.equal(value, ranks[1][name]), f"{name} differs between the ranks"
    return ranks[0]


def _each_test_image_once(run: Path, data_root: Path) -> None:
    scored = [path for rank in (0, 1) for path in json.loads((run / f"tested_rank{rank}.json").read_text())]
    expected = [str(path) for category in CATEGORIES for path in (data_root / category / "test").rglob("*.png")]
    assert sorted(scored) == sorted(expected), "every test image scored once, on one rank"


def _one_process_matches(model_class: type, run: Path, data_root: Path, ddp_state: dict[str, torch.Tensor],
                         directory: Path) -> None:
    """From the DDP run's weights, one process fits the same constants and measures the same test metrics.

    The constants agree within 1e-5 of their magnitude: the backbone's float32 results may differ in the last
    bits between the DDP run's batches and this process's.
    """
    one_process, results = refit_in_one_process(model_class, run_checkpoint(run), data_root, CATEGORIES, BATCH,
                                                directory)
    assert one_process.keys() == ddp_state.keys()
    for name, value in ddp_state.items():
        difference, scale = largest_difference(one_process[name], value)
        assert difference <= 1e-5 * max(scale, 1.0), name
    for category, metrics in run_metrics(run).items():
        for metric, value in metrics.items():
            assert results[f"{category}/{metric}"] == pytest.approx(value, abs=1e-5), f"{category}/{metric}"


@pytest.mark.slow
def test_onenip_trains_tests_and_exports_under_ddp(onenip_ddp_run: Path, tmp_path: Path) -> None:
    checkpoint = run_checkpoint(onenip_ddp_run)
    assert set(run_metrics(onenip_ddp_run)) == {*CATEGORIES, "mean"}
    run_anomalib(["export", "--model", "anomalib_onenip.OneNIP", "--model.pre_trained", "false",
                  "--ckpt_path", str(checkpoint), "--export_type", "torch", "--export_root", str(tmp_path)], tmp_path)
    assert next(tmp_path.rglob("model.pt")).stat().st_size > 0


@pytest.mark.slow
def test_onenip_ddp_fits_what_one_process_fits(onenip_ddp_run: Path, tiny_dataset: Path, tmp_path: Path) -> None:
    from anomalib_onenip import OneNIP

    state = _same_on_every_rank(onenip_ddp_run)
    _each_test_image_once(onenip_ddp_run, tiny_dataset)
    _one_process_matches(OneNIP, onenip_ddp_run, tiny_dataset, state, tmp_path)


@pytest.mark.slow
@pytest.mark.long
def test_diad_stages_train_under_ddp_fit_what_one_process_fits_and_export(
    diad_ddp_runs: dict[str, Path], tiny_dataset: Path, tmp_path: Path
) -> None:
    from anomalib_diad import DiAD

    for stage, run in diad_ddp_runs.items():
        state = _same_on_every_rank(run)
        _each_test_image_once(run, tiny_dataset)
        _one_process_matches(DiAD, run, tiny_dataset, state, tmp_path / stage)
        export_root = tmp_path / stage / "export"
        run_anomalib(["export", "--model", "anomalib_diad.DiAD", "--model.architecture", "tiny",
                      "--model.input_size", "[128,128]", "--model.diffusion_weights", "null", "--model.pre_trained",
                      "false", "--model.backbone", "resnet18", "--model.stage", stage, "--ckpt_path",
                      str(run_checkpoint(run)), "--export_type", "torch", "--export_root", str(export_root)], tmp_path)
        assert next(export_root.rglob("model.pt")).stat().st_size > 0
