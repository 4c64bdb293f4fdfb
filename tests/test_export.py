"""OneNIP deployment: `anomalib train`, then `anomalib export` to OpenVINO, ONNX and torch; parity, inference, errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import venv
from pathlib import Path

import numpy as np
import pytest
import torch

from anomalib_onenip import OneNIP
from tests.cli import run_anomalib
from tests.export_parity import (
    OPENVINO_F32,
    assert_parity,
    load_images,
    real_ad_images,
    run_exported,
    torch_outputs,
)
from tests.tiny_models import TINY_ONENIP, cli_args

pytestmark = pytest.mark.slow

MAP_TOLERANCE = 1e-3  # of the anomaly map's range
EXAMPLE = Path(__file__).parents[1] / "examples" / "openvino_predict.py"
TINY_ARGS = [
    *cli_args(TINY_ONENIP), "--trainer.max_epochs", "2", "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
]


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("onenip_export")


@pytest.fixture(scope="module")
def train_run(tiny_dataset: Path, work: Path) -> dict:
    """`anomalib train` of a tiny OneNIP on the three texture categories, by class path, with MultiClassAD."""
    result = run_anomalib(
        ["train", "--model", "anomalib_onenip.OneNIP", *TINY_ARGS, "--data", "MultiClassAD",
         "--data.root", str(tiny_dataset), "--data.num_workers", "0", "--default_root_dir", "runs"],
        work,
    )
    run = work / "runs" / "OneNIP" / tiny_dataset.name / "all" / "latest"
    return {"run": run, "checkpoint": run / "weights" / "lightning" / "model.ckpt", "stdout": result.stdout}


@pytest.fixture(scope="module")
def exports(train_run: dict, work: Path) -> dict[str, Path]:
    """`anomalib export` of the checkpoint: OpenVINO with any input size, ONNX at 64 px, torch."""
    paths = {}
    for export_type, extra in (("openvino", []), ("onnx", ["--input_size", "[64,64]"]), ("torch", [])):
        run_anomalib(
            ["export", "--model", "OneNIP", "--model.pre_trained", "false", "--ckpt_path", str(train_run["checkpoint"]),
             "--export_type", export_type, "--export_root", str(work / f"export_{export_type}"), *extra],
            work,
        )
        suffix = {"openvino": "xml", "onnx": "onnx", "torch": "pt"}[export_type]
        paths[export_type] = work / f"export_{export_type}" / "weights" / export_type / f"model.{suffix}"
    return paths


@pytest.fixture(scope="module")
def model(train_run: dict) -> OneNIP:
    return OneNIP.load_from_checkpoint(train_run["checkpoint"], pre_trained=False).eval()


def _texture_images(root: Path) -> np.ndarray:
    paths = sorted(root.glob("*/test/*/*.png"))[::3]
    return np.concatenate(load_images(paths))


def test_training_reports_per_category_metrics(train_run: dict) -> None:
    assert "Per-category test metrics" in train_run["stdout"]
    assert (train_run["run"] / "metrics_per_category.csv").read_text().splitlines()[0].startswith("category,image_AUROC")
    assert "anomalib_onenip.OneNIP" in (train_run["run"] / "config.yaml").read_text()


def test_cli_writes_every_format_with_one_image_input(exports: dict[str, Path]) -> None:
    import onnxruntime
    import openvino

    for path in exports.values():
        assert path.is_file(), path
    assert exports["openvino"].with_suffix(".bin").is_file()
    session = onnxruntime.InferenceSession(str(exports["onnx"]))
    assert [(item.name, item.shape) for item in session.get_inputs()] == [("input", ["batch_size", 3, 64, 64])]
    assert [item.name for item in session.get_outputs()] == ["pred_score", "pred_label", "anomaly_map", "pred_mask"]
    ov_model = openvino.Core().read_model(exports["openvino"])
    assert [str(item.get_partial_shape()) for item in ov_model.inputs] == ["[?,3,?,?]"]  # any batch and image size


@pytest.mark.parametrize("export_type", ["onnx", "openvino"])
def test_exported_graph_matches_pytorch_on_generated_images(
    export_type: str, exports: dict[str, Path], model: OneNIP, tiny_dataset: Path
) -> None:
    images = _texture_images(tiny_dataset)
    noise = np.random.default_rng(0).random((2, 3, 64, 64), dtype=np.float32)
    for batch in (images, noise):
        assert_parity(torch_outputs(model, batch), run_exported(exports[export_type], batch), MAP_TOLERANCE)


def test_openvino_graph_takes_any_image_size_and_matches_on_real_images(
    exports: dict[str, Path], model: OneNIP, real_ad_root: Path
) -> None:
    for image in real_ad_images(real_ad_root):
        expected = torch_outputs(model, image)
        assert_parity(expected, run_exported(exports["openvino"], image), MAP_TOLERANCE)
        assert expected["anomaly_map"].shape == (1, 1, 64, 64)


def test_post_processing_survives_export(exports: dict[str, Path], model: OneNIP, tiny_dataset: Path) -> None:
    """Thresholds learned from normal validation images, in the graph: labels are 'score above threshold'."""
    post_processor = model.post_processor
    assert post_processor.threshold_source == "normal" and post_processor.has_thresholds
    images = _texture_images(tiny_dataset)
    with torch.no_grad():
        raw = model.model(model.pre_processor.transform(torch.from_numpy(images)))
    exported = run_exported(exports["openvino"], images)
    expected_labels = (raw.pred_score > post_processor.image_threshold).numpy()
    np.testing.assert_array_equal(exported["pred_label"], expected_labels)
    assert ((exported["pred_score"] > 0) & (exported["pred_score"] < 1)).all()
    np.testing.assert_array_equal(exported["pred_score"] > 0.5, expected_labels)


def test_openvino_inferencer_on_a_folder(
    exports: dict[str, Path], model: OneNIP, tiny_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from anomalib.deploy import OpenVINOInferencer

    monkeypatch.chdir(tmp_path)  # the inferencer writes an openvino_cache folder in the working directory
    inferencer = OpenVINOInferencer(exports["openvino"], device="CPU", config=OPENVINO_F32)
    folder = tiny_dataset / "gravel" / "test" / "hole"
    paths = sorted(folder.glob("*.png"))
    for path, image in zip(paths, load_images(paths), strict=True):
        prediction = inferencer.predict(path)
        expected = torch_outputs(model, image)
        assert prediction.pred_score == pytest.approx(expected["pred_score"], abs=MAP_TOLERANCE)
        assert bool(prediction.pred_label[0]) == bool(expected["pred_label"][0])


def test_torch_export_loads_in_torch_inferencer(exports: dict[str, Path], model: OneNIP, tiny_dataset: Path) -> None:
    from anomalib.deploy import TorchInferencer

    os.environ["TRUST_REMOTE_CODE"] = "1"
    inferencer = TorchInferencer(exports["torch"], device="cpu")
    path = sorted(tiny_dataset.glob("brick/test/stain/*.png"))[0]
    prediction = inferencer.predict(path)
    expected = torch_outputs(model, load_images([path])[0])
    # Same weights and graph; only float32 summation order may differ between the two loads (measured 1.1e-6).
    assert prediction.pred_score.item() == pytest.approx(float(expected["pred_score"][0]), abs=1e-5)


def test_anomalib_predict_on_a_folder(train_run: dict, tiny_dataset: Path, work: Path) -> None:
    folder = tiny_dataset / "brick" / "test" / "scratch"
    run_anomalib(
        ["predict", "--model", "OneNIP", "--model.pre_trained", "false", "--model.visualizer", "true",
         "--ckpt_path", str(train_run["checkpoint"]), "--data", str(folder), "--default_root_dir", "predictions",
         "--trainer.enable_progress_bar", "false"],
        work,
    )
    written = sorted((work / "predictions").rglob("*.png"))
    assert len(written) == len(list(folder.glob("*.png"))), written


def test_same_image_twice_gives_the_same_exported_score(exports: dict[str, Path], tiny_dataset: Path) -> None:
    images = _texture_images(tiny_dataset)
    first, second = run_exported(exports["openvino"], images), run_exported(exports["openvino"], images)
    np.testing.assert_array_equal(first["pred_score"], second["pred_score"])


def test_example_runs_without_torch(exports: dict[str, Path], model: OneNIP, tiny_dataset: Path, work: Path) -> None:
    """The README's OpenVINO example in a fresh environment with only openvino, numpy and pillow.

    An unreadable file in the folder is named and skipped; the others are still predicted.
    """
    environment = work / "no_torch_env"
    venv.create(environment, with_pip=True)
    python = environment / "bin" / "python"
    clean = {key: value for key, value in os.environ.items() if not key.startswith(("PYTHON", "VIRTUAL_ENV"))}
    subprocess.run([str(python), "-m", "pip", "install", "-q", "openvino", "numpy", "pillow"], check=True, timeout=900,
                   env=clean)
    has_torch = subprocess.run([str(python), "-c", "import torch"], capture_output=True, check=False, env=clean,
                               cwd=environment)
    assert has_torch.returncode != 0, "the environment must not have torch"
    folder = work / "example_images"
    shutil.copytree(tiny_dataset / "grass" / "test" / "scratch", folder)
    paths = sorted(folder.glob("*.png"))
    (folder / "zz_broken.png").write_bytes(b"not a png")
    result = subprocess.run(
        [str(python), str(EXAMPLE), str(exports["openvino"]), str(folder), "--heatmaps", str(work / "heatmaps")],
        capture_output=True, text=True, check=False, timeout=300, env=clean, cwd=environment,
    )
    assert result.returncode == 1, result.stderr[-3000:]
    assert f"Cannot read image '{folder / 'zz_broken.png'}'" in result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [Path(line["image"]).name for line in lines] == [path.name for path in paths]
    for line, image in zip(lines, load_images(paths), strict=True):
        expected = torch_outputs(model, image)
        assert line["pred_score"] == pytest.approx(float(expected["pred_score"][0]), abs=MAP_TOLERANCE)
        assert line["pred_label"] == bool(expected["pred_label"][0])
    assert len(list((work / "heatmaps").glob("*.png"))) == len(paths)


# ------------------------------------------------------------------------------------------- errors
def test_exporting_a_model_that_was_never_fitted_is_refused(tmp_path: Path) -> None:
    from anomalib_multiclass.multiclass_module import NotFittedError
    from tests.tiny_models import TINY_ONENIP

    with pytest.raises(NotFittedError, match="OneNIP has no prompt bank: it was never fitted"):
        OneNIP(**TINY_ONENIP).to_onnx(tmp_path, input_size=(64, 64))


def test_exporting_without_thresholds_is_refused(train_run: dict, tmp_path: Path) -> None:
    from anomalib_multiclass.multiclass_module import NotFittedError

    model = OneNIP.load_from_checkpoint(train_run["checkpoint"], pre_trained=False)
    model.post_processor._image_threshold.fill_(float("nan"))  # noqa: SLF001  (as before any validation)
    with pytest.raises(NotFittedError, match="has no thresholds"):
        model.to_torch(tmp_path)


def test_checkpoint_of_another_model_is_refused_by_the_cli(tiny_dataset: Path, work: Path) -> None:
    from anomalib.engine import Engine
    from anomalib.models import Padim

    padim = Padim(backbone="resnet18", layers=["layer1"], n_features=32, pre_trained=False, visualizer=False)
    engine = Engine(max_epochs=1, accelerator="cpu", default_root_dir=work / "padim", enable_progress_bar=False)
    from anomalib_multiclass import MultiClassAD

    engine.fit(padim, datamodule=MultiClassAD(root=tiny_dataset, categories=["brick"], num_workers=0))
    checkpoint = work / "padim.ckpt"
    engine.trainer.save_checkpoint(checkpoint)
    result = run_anomalib(
        ["export", "--model", "OneNIP", "--model.pre_trained", "false", "--ckpt_path", str(checkpoint),
         "--export_type", "onnx", "--export_root", str(work / "wrong")],
        work,
        expect_success=False,
    )
    assert f"'{checkpoint}': This is not a OneNIP checkpoint" in result.stderr


def test_corrupted_checkpoint_is_named(train_run: dict, tmp_path: Path) -> None:
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(train_run["checkpoint"].read_bytes()[:5000])
    with pytest.raises(ValueError, match=f"Checkpoint '{truncated}' is not a readable torch checkpoint"):
        OneNIP.load_from_checkpoint(truncated)


def test_unsupported_export_type_is_refused(train_run: dict, work: Path) -> None:
    result = run_anomalib(
        ["export", "--model", "OneNIP", "--ckpt_path", str(train_run["checkpoint"]), "--export_type", "tensorrt"],
        work,
        expect_success=False,
    )
    assert "ValueError: 'tensorrt' is not a valid ExportType" in result.stderr  # anomalib's own check


@pytest.mark.parametrize("channels", [1, 4])
def test_image_with_the_wrong_channel_count_is_refused(
    exports: dict[str, Path], channels: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from anomalib.deploy import OpenVINOInferencer

    monkeypatch.chdir(tmp_path)
    inferencer = OpenVINOInferencer(exports["openvino"], device="CPU")
    with pytest.raises(RuntimeError, match=r"model input \(shape=\[\?,3,\?,\?\]\) and the tensor .* are incompatible"):
        inferencer.predict(np.random.default_rng(0).random((64, 64, channels), dtype=np.float32))
