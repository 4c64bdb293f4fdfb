"""Bad input, both models, through the anomalib CLI (in this process): each case is an error naming the file or
value, or is handled correctly. docs/operations.md (Reliability) lists the cases and their outcomes."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from anomalib.cli.cli import AnomalibCLI
from PIL import Image

from anomalib_multiclass.multiclass_module import IncompatibleCheckpointError
from tests.tiny_models import TINY_DIAD, TINY_ONENIP, cli_args

pytestmark = pytest.mark.slow

MODEL_ARGS = {
    "OneNIP": ["--model", "OneNIP", *cli_args(TINY_ONENIP)],
    "DiAD": ["--model", "DiAD", *cli_args({**TINY_DIAD, "stage": "diffusion"})],
}
MODELS = list(MODEL_ARGS)
TRAINER = ["--trainer.max_epochs", "1", "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
           "--trainer.logger", "false"]


def _cli(args: list[str], cwd: Path, monkeypatch: pytest.MonkeyPatch) -> AnomalibCLI:
    """Run ``anomalib ARGS`` in ``cwd`` in this process (the same parser, classes and engine as the console script)."""
    monkeypatch.chdir(cwd)
    return AnomalibCLI(args)


def _train_args(model: str, root: Path, categories: list[str]) -> list[str]:
    return ["train", *MODEL_ARGS[model], "--data", "MultiClassAD", "--data.root", str(root),
            "--data.categories", json.dumps(categories), "--data.num_workers", "0", "--data.train_batch_size", "4",
            *TRAINER]


def _brick_copy(tiny_dataset: Path, destination: Path) -> Path:
    """A writable copy of the tiny dataset's ``brick`` category: ``destination/brick``."""
    shutil.copytree(tiny_dataset / "brick", destination / "brick")
    return destination


def _odd_images(source: Path, folder: Path) -> dict[str, Path]:
    """Grayscale, RGBA, 16-bit, 16 px and 2048 px versions of ``source`` in ``folder``, plus a text file."""
    folder.mkdir(parents=True, exist_ok=True)
    image = Image.open(source).convert("RGB")
    gray = image.convert("L")
    paths = {name: folder / f"{name}.png" for name in ("gray8", "gray", "rgba", "deep", "small", "large")}
    gray.save(paths["gray8"])
    gray.save(paths["gray"])
    image.convert("RGBA").save(paths["rgba"])
    Image.fromarray(np.asarray(gray).astype(np.uint16) * 257).save(paths["deep"])
    image.resize((16, 16)).save(paths["small"])
    image.resize((2048, 2048)).save(paths["large"])
    (folder / "notes.txt").write_text("not an image; ignored")
    return paths


def _one_image_folder(source: Path, parent: Path) -> Path:
    folder = parent / "images"
    folder.mkdir()
    shutil.copy(source, folder)
    return folder


@pytest.fixture(scope="module")
def handled_runs(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """Per model: `anomalib train` on brick with the odd images among its normal training images, and its checkpoint."""
    runs = {}
    for model in MODELS:
        work = tmp_path_factory.mktemp(f"odd_{model}")
        root = _brick_copy(tiny_dataset, work / "data")
        source = next((root / "brick" / "train" / "good").glob("*.png"))
        _odd_images(source, root / "brick" / "train" / "good")
        with pytest.MonkeyPatch.context() as monkeypatch:
            cli = _cli(_train_args(model, root, ["brick"]), work, monkeypatch)
        checkpoint = next(work.glob("results/*/*/*/latest/weights/lightning/model.ckpt"))
        runs[model] = {"work": work, "checkpoint": checkpoint, "train_images": len(cli.datamodule.train_data),
                       "source": source}
    return runs


@pytest.mark.parametrize("model", MODELS)
def test_odd_training_images_are_read_and_the_text_file_ignored(handled_runs: dict, model: str) -> None:
    """Grayscale, RGBA, 16-bit, smaller and larger than the input: all train; notes.txt is not an image."""
    assert handled_runs[model]["checkpoint"].is_file()
    assert handled_runs[model]["train_images"] == 8 + 6


@pytest.mark.parametrize("model", MODELS)
def test_predict_reads_odd_images_like_their_8_bit_twins(
    handled_runs: dict, model: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`anomalib predict --data anomalib_multiclass.PredictImages`: a 16-bit image scores as its 8-bit twin."""
    paths = _odd_images(handled_runs[model]["source"], tmp_path / "incoming")
    cli = _cli(["predict", *MODEL_ARGS[model], "--ckpt_path", str(handled_runs[model]["checkpoint"]),
                "--data", "anomalib_multiclass.PredictImages", "--data.path", str(tmp_path / "incoming"),
                "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false"], tmp_path, monkeypatch)
    batches = cli.engine.trainer.predict_loop.predictions
    scores = {Path(path).stem: float(score) for batch in batches
              for path, score in zip(batch.image_path, batch.pred_score, strict=True)}
    assert set(scores) == set(paths), "every image, and only images, predicted"
    assert all(np.isfinite(list(scores.values())))
    assert scores["deep"] == pytest.approx(scores["gray8"], abs=1e-4)
    assert scores["gray"] == scores["gray8"]


def _zero_byte(root: Path) -> tuple[str, str]:
    (root / "brick" / "train" / "good" / "empty.png").write_bytes(b"")
    return "empty.png", r"Cannot read image '.*empty\.png'"


def _truncated(suffix: str):  # noqa: ANN202
    def make(root: Path) -> tuple[str, str]:
        good = root / "brick" / "train" / "good"
        image = Image.open(next(good.glob("*.png"))).convert("RGB").resize((256, 256))
        image.save(good / f"whole{suffix}")
        data = (good / f"whole{suffix}").read_bytes()
        (good / f"whole{suffix}").unlink()
        (good / f"cut{suffix}").write_bytes(data[: len(data) // 2])
        return f"cut{suffix}", rf"Cannot read image '.*cut\{suffix}'.*truncated"
    return make


def _text_named_png(root: Path) -> tuple[str, str]:
    (root / "brick" / "train" / "good" / "readme.png").write_text("this is not a picture")
    return "readme.png", r"Cannot read image '.*readme\.png'"


def _mask_of_another_size(root: Path) -> tuple[str, str]:
    mask = next((root / "brick" / "ground_truth").glob("*/*_mask.png"))
    Image.new("L", (32, 32)).save(mask)
    return mask.name, rf"Mask '.*{mask.name}' is \(32, 32\).*Save the mask at the image's size"


def _defect_without_mask(root: Path) -> tuple[str, str]:
    next((root / "brick" / "ground_truth").glob("*/*_mask.png")).unlink()
    return "mask", r"Category 'brick'.*exactly one mask ground_truth/<defect>/<name>_mask\.png"


def _mask_without_image(root: Path) -> tuple[str, str]:
    defect = next((root / "brick" / "ground_truth").iterdir())
    Image.new("L", (64, 64)).save(defect / "099_mask.png")
    return "099_mask.png", r"Category 'brick'.*exactly one mask"


def _no_training_images(root: Path) -> tuple[str, str]:
    for image in (root / "brick" / "train" / "good").iterdir():
        image.unlink()
    return "train", r"Category 'brick' has no training images.*Add normal images to train/good/"


BAD_DATA = {
    "zero-byte file": _zero_byte,
    "truncated PNG": _truncated(".png"),
    "truncated JPEG": _truncated(".jpg"),
    "text file named .png": _text_named_png,
    "mask of another size": _mask_of_another_size,
    "defect image without mask": _defect_without_mask,
    "mask without image": _mask_without_image,
    "category without training images": _no_training_images,
}


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("case", list(BAD_DATA))
def test_bad_training_data_is_named(
    tiny_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, model: str, case: str
) -> None:
    root = _brick_copy(tiny_dataset, tmp_path / "data")
    _, message = BAD_DATA[case](root)
    with pytest.raises(ValueError, match=message):
        _cli(_train_args(model, root, ["brick"]), tmp_path, monkeypatch)


@pytest.mark.parametrize("model", MODELS)
def test_missing_category_is_named(tiny_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                   model: str) -> None:
    with pytest.raises(FileNotFoundError, match=r"Category 'marble' not found.*Available: \['brick', 'grass', 'gravel'\]"):
        _cli(_train_args(model, tiny_dataset, ["brick", "marble"]), tmp_path, monkeypatch)


@pytest.mark.parametrize("model", MODELS)
def test_checkpoint_of_the_other_model_is_refused_with_its_path(
    handled_runs: dict, model: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    other = handled_runs[next(name for name in MODELS if name != model)]["checkpoint"]
    images = _one_image_folder(handled_runs[model]["source"], tmp_path)
    named = re.escape(str(Path(other).resolve()))  # anomalib's engine resolves --ckpt_path (latest -> v0)
    with pytest.raises(IncompatibleCheckpointError, match=rf"'{named}': This is a .* checkpoint, not a {model} one"):
        _cli(["predict", *MODEL_ARGS[model], "--ckpt_path", str(other), "--data", str(images),
              "--trainer.accelerator", "cpu"], tmp_path, monkeypatch)


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("subcommand", ["predict", "train"])
def test_corrupted_checkpoint_is_named(
    handled_runs: dict, model: str, subcommand: str, tiny_dataset: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A checkpoint cut short (an interrupted copy) is named before anything loads it, for resuming too."""
    data = handled_runs[model]["checkpoint"].read_bytes()
    broken = tmp_path / "broken.ckpt"
    broken.write_bytes(data[: len(data) // 3])
    images = _one_image_folder(handled_runs[model]["source"], tmp_path)
    args = (["predict", *MODEL_ARGS[model], "--data", str(images), "--trainer.accelerator", "cpu"]
            if subcommand == "predict" else _train_args(model, tiny_dataset, ["brick"]))
    with pytest.raises(ValueError, match=rf"Checkpoint '{broken}' is not a readable torch checkpoint"):
        _cli([*args, "--ckpt_path", str(broken)], tmp_path, monkeypatch)


@pytest.mark.parametrize("model", MODELS)
def test_backbone_weights_of_another_architecture_are_named(
    tiny_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, model: str
) -> None:
    """``--model.weights_path`` holding another network's weights: an error naming the file, before training."""
    import timm

    wrong = tmp_path / "resnet18_weights.pth"
    backbone = "tf_efficientnet_lite0" if model == "OneNIP" else "resnet18"
    other = "resnet18" if model == "OneNIP" else "tf_efficientnet_lite0"
    torch.save(timm.create_model(other, pretrained=False).state_dict(), wrong)
    args = _train_args(model, tiny_dataset, ["brick"])
    args[args.index("--model.pre_trained") + 1] = "true"
    if model == "DiAD":
        args[args.index("--model.stage") + 1] = "autoencoder"
    with pytest.raises(ValueError, match=rf"'{wrong}'.*{backbone}"):
        _cli([*args, "--model.weights_path", str(wrong)], tmp_path, monkeypatch)


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_or_inf_in_the_input_tensor_is_named(handled_runs: dict, model: str, value: float) -> None:
    """A tensor that holds NaN or Inf (a broken upstream step) is refused, naming its image, not scored."""
    from anomalib.data import ImageBatch

    from anomalib_diad import DiAD
    from anomalib_onenip import OneNIP

    model_class = {"OneNIP": OneNIP, "DiAD": DiAD}[model]
    network = model_class.load_from_checkpoint(handled_runs[model]["checkpoint"], pre_trained=False).eval()
    size = network.hparams.input_size
    images = torch.rand(2, 3, *size)
    images[1, 0, 3, 3] = value
    batch = ImageBatch(image=images, image_path=["ok.png", "broken.png"])
    with torch.no_grad(), pytest.raises(ValueError, match=r"Images \['broken.png'\] contain NaN or Inf values"):
        network.predict_step(batch, 0)


@pytest.mark.parametrize("model", MODELS)
def test_checkpoint_saved_on_a_gpu_predicts_on_the_cpu(
    handled_runs: dict, model: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every tensor tagged ``cuda:0`` (as a GPU run saves them, with CUDA random states): the same scores on the CPU."""
    from unittest import mock

    checkpoint = torch.load(handled_runs[model]["checkpoint"], map_location="cpu", weights_only=False)
    checkpoint["random_states"]["torch.cuda"] = [torch.zeros(16, dtype=torch.uint8)]
    gpu_checkpoint = tmp_path / "gpu.ckpt"
    with mock.patch.object(torch.serialization, "location_tag", lambda storage: "cuda:0"):
        torch.save(checkpoint, gpu_checkpoint)
    with pytest.raises(RuntimeError, match="CUDA"):
        torch.load(gpu_checkpoint, weights_only=False)  # really GPU-tagged
    images = _one_image_folder(handled_runs[model]["source"], tmp_path)
    scores = []
    for path in (handled_runs[model]["checkpoint"], gpu_checkpoint):
        cli = _cli(["predict", *MODEL_ARGS[model], "--ckpt_path", str(path), "--data", str(images),
                    "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false"], tmp_path, monkeypatch)
        scores.append(float(cli.engine.trainer.predict_loop.predictions[0].pred_score[0]))
    assert scores[0] == scores[1]
