"""DiAD end to end: both stages through the anomalib CLI in subprocesses, then the checkpoint in Python."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.cli import run_anomalib
from tests.tiny_models import TINY_DIAD, cli_args, yaml_init_args

pytest.importorskip("diffusers")

pytestmark = pytest.mark.slow

CATEGORIES = ["brick", "gravel"]
TRAINER_ARGS = ["--trainer.max_epochs", "1", "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false"]


def _flag(value: object) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _data_args(root: Path) -> list[str]:
    return [
        "--data",
        "MultiClassAD",
        "--data.root",
        str(root),
        "--data.categories",
        _flag(CATEGORIES),
        "--data.num_workers",
        "0",
        "--data.train_batch_size",
        "8",
        "--data.eval_batch_size",
        "16",
    ]


@pytest.fixture(scope="module")
def two_stage_run(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Stage 1 with the short name and flags, stage 2 from a YAML ``class_path`` loading stage 1's autoencoder."""
    work = tmp_path_factory.mktemp("diad_cli")
    model_flags = cli_args(TINY_DIAD)
    stage1 = run_anomalib(
        [
            "train",
            "--model",
            "DiAD",
            *model_flags,
            "--model.stage",
            "autoencoder",
            *_data_args(tiny_dataset),
            *TRAINER_ARGS,
            "--default_root_dir",
            "stage1",
        ],
        work,
    )
    stage1_run = work / "stage1" / "DiAD" / tiny_dataset.name / "+".join(CATEGORIES) / "latest"
    stage1_checkpoint = stage1_run / "weights" / "lightning" / "model.ckpt"
    init_args = yaml_init_args(TINY_DIAD)
    config = work / "stage2.yaml"
    config.write_text(
        f"model:\n  class_path: anomalib_diad.DiAD\n  init_args:\n{init_args}"
        f"    stage: diffusion\n    autoencoder_checkpoint: {stage1_checkpoint}\n"
        f"data:\n  class_path: anomalib_multiclass.MultiClassAD\n  init_args:\n    root: {tiny_dataset}\n"
        f"    categories: {json.dumps(CATEGORIES)}\n    num_workers: 0\n"
        "    train_batch_size: 8\n    eval_batch_size: 16\n"
        "trainer:\n  max_epochs: 1\n  accelerator: cpu\n  enable_progress_bar: false\ndefault_root_dir: stage2\n"
    )
    stage2 = run_anomalib(["train", "-c", str(config)], work)
    stage2_run = work / "stage2" / "DiAD" / tiny_dataset.name / "+".join(CATEGORIES) / "latest"
    return {
        "stage1": stage1_run,
        "stage2": stage2_run,
        "stage1_stdout": stage1.stdout,
        "stage2_stdout": stage2.stdout,
        "data": tiny_dataset,
    }


def test_both_stages_train_and_report_per_category_metrics(two_stage_run: dict) -> None:
    for stage in ("stage1", "stage2"):
        run = two_stage_run[stage]
        assert (run / "weights" / "lightning" / "model.ckpt").is_file()
        assert "anomalib_diad.DiAD" in (run / "config.yaml").read_text()
        metrics = json.loads((run / "metrics_per_category.json").read_text())
        assert set(metrics) == {*CATEGORIES, "mean"}
        assert all(0.0 <= value <= 1.0 for value in metrics["mean"].values())
        assert "Per-category test metrics" in two_stage_run[f"{stage}_stdout"]


def test_stage_two_uses_and_keeps_stage_one_autoencoder(two_stage_run: dict) -> None:
    stage1 = torch.load(two_stage_run["stage1"] / "weights/lightning/model.ckpt", map_location="cpu", weights_only=True)
    stage2 = torch.load(two_stage_run["stage2"] / "weights/lightning/model.ckpt", map_location="cpu", weights_only=True)
    autoencoder_keys = [key for key in stage1["state_dict"] if key.startswith("model.autoencoder.")]
    assert autoencoder_keys
    for key in autoencoder_keys:
        torch.testing.assert_close(stage2["state_dict"][key], stage1["state_dict"][key], rtol=0, atol=0)
    assert stage2["hyper_parameters"]["stage"] == "diffusion"
    assert stage2["category_names"] == CATEGORIES
    assert stage2["state_dict"]["model.score_statistics.mean"].shape == (len(CATEGORIES) + 1,)


def test_checkpoint_round_trip_gives_identical_scores(two_stage_run: dict, tmp_path: Path) -> None:
    """The reloaded model reproduces the CLI run's metrics exactly; saving and reloading again keeps every score."""
    from anomalib.engine import Engine

    from anomalib_diad import DiAD
    from anomalib_multiclass import MultiClassAD

    checkpoint = two_stage_run["stage2"] / "weights" / "lightning" / "model.ckpt"
    model = DiAD.load_from_checkpoint(checkpoint, pre_trained=False)
    assert model.category_names == CATEGORIES
    datamodule = MultiClassAD(root=two_stage_run["data"], categories=CATEGORIES, num_workers=0, eval_batch_size=16)
    engine = Engine(accelerator="cpu", default_root_dir=tmp_path, enable_progress_bar=False)
    results = engine.test(model=model, datamodule=datamodule)[0]
    expected = json.loads((two_stage_run["stage2"] / "metrics_per_category.json").read_text())
    for category, values in expected.items():
        for name, value in values.items():
            assert results[f"{category}/{name}"] == pytest.approx(value, abs=1e-6), (category, name)

    images = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    category_index = torch.tensor([0, 1])
    model.model.eval()
    with torch.no_grad():
        before = model.model(images, category_index=category_index)
    engine.trainer.save_checkpoint(tmp_path / "again.ckpt")
    reloaded = DiAD.load_from_checkpoint(tmp_path / "again.ckpt", pre_trained=False).model.eval()
    with torch.no_grad():
        after = reloaded(images, category_index=category_index)
    torch.testing.assert_close(after.pred_score, before.pred_score, rtol=0, atol=0)
    torch.testing.assert_close(after.anomaly_map, before.anomaly_map, rtol=0, atol=0)
    assert not torch.equal(before.pred_score[0], before.pred_score[1])


# ------------------------------------------------------------------------------------------- export
@pytest.fixture(scope="module")
def diad_exports(two_stage_run: dict) -> dict:
    """Stage 2's checkpoint through `anomalib export` to OpenVINO (any input size), and in Python to ONNX and torch."""
    from anomalib.deploy import ExportType
    from anomalib.engine import Engine

    from anomalib_diad import DiAD

    checkpoint = two_stage_run["stage2"] / "weights" / "lightning" / "model.ckpt"
    root = checkpoint.parents[5]
    run_anomalib(
        ["export", "--model", "DiAD", "--model.pre_trained", "false", "--model.architecture", "tiny",
         "--model.diffusion_weights", "null", "--ckpt_path", str(checkpoint), "--export_type", "openvino",
         "--export_root", str(root / "export_openvino")],
        root,
    )
    model = DiAD.load_from_checkpoint(checkpoint, pre_trained=False).eval()
    engine = Engine(accelerator="cpu", default_root_dir=root, enable_progress_bar=False)
    return {
        "model": model,
        "openvino": root / "export_openvino" / "weights" / "openvino" / "model.xml",
        "onnx": engine.export(model, ExportType.ONNX, export_root=root / "export_onnx", input_size=(128, 128)),
        "torch": engine.export(model, ExportType.TORCH, export_root=root / "export_torch"),
    }


@pytest.mark.parametrize("export_type", ["onnx", "openvino"])
def test_exported_diad_matches_pytorch(export_type: str, diad_exports: dict, two_stage_run: dict) -> None:
    from tests.export_parity import assert_parity, load_images, run_exported, torch_outputs

    paths = sorted(two_stage_run["data"].glob("*/test/*/*.png"))[::4]
    images = np.concatenate(load_images(paths))
    images = torch.nn.functional.interpolate(torch.from_numpy(images), size=(128, 128)).numpy()
    first = run_exported(diad_exports[export_type], images)
    assert_parity(torch_outputs(diad_exports["model"], images), first, map_tolerance=1e-3)
    np.testing.assert_array_equal(run_exported(diad_exports[export_type], images)["pred_score"], first["pred_score"])


def test_exported_diad_matches_pytorch_on_real_images(diad_exports: dict, real_ad_root: Path) -> None:
    from tests.export_parity import assert_parity, real_ad_images, run_exported, torch_outputs

    for image in real_ad_images(real_ad_root, per_category=1):
        expected = torch_outputs(diad_exports["model"], image)
        assert_parity(expected, run_exported(diad_exports["openvino"], image), map_tolerance=1e-3)


def test_onnx_export_holds_each_weight_once(diad_exports: dict) -> None:
    """The unrolled DDIM loop reuses the weights: ONNX holds them once, and no per-node debug strings."""
    import onnx

    model = onnx.load(str(diad_exports["onnx"]), load_external_data=False)
    assert not any(node.metadata_props for node in model.graph.node)
    weights = diad_exports["model"].state_dict()
    weight_bytes = sum(value.numel() * value.element_size() for value in weights.values())
    onnx_bytes = sum(path.stat().st_size for path in diad_exports["onnx"].parent.iterdir())
    assert onnx_bytes < 1.2 * weight_bytes, (onnx_bytes, weight_bytes)
    assert len(model.graph.initializer) <= len(weights) + 16  # + the pre- and post-processing constants


def test_torch_export_of_diad_holds_the_whole_model(diad_exports: dict) -> None:
    exported = torch.load(diad_exports["torch"], map_location="cpu", weights_only=False)["model"].eval()
    images = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected, actual = diad_exports["model"](images), exported(images)
    torch.testing.assert_close(actual.anomaly_map, expected.anomaly_map, rtol=0, atol=0)


def test_exporting_an_unfitted_diad_is_refused(tmp_path: Path) -> None:
    from anomalib_diad import DiAD
    from anomalib_multiclass.multiclass_module import NotFittedError

    model = DiAD(**{key: value for key, value in TINY_DIAD.items() if key != "visualizer"})
    with pytest.raises(NotFittedError, match="DiAD has no trained weights: it was never fitted"):
        model.to_openvino(tmp_path, input_size=(128, 128))
