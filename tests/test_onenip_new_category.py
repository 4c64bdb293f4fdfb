"""Adding a category to a trained OneNIP from normal images (``OneNIP.add_category``, ``onenip-add-category``)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from anomalib.deploy import ExportType
from anomalib.engine import Engine
from lightning.pytorch import seed_everything
from PIL import Image

from anomalib_multiclass import MultiClassAD
from anomalib_multiclass.multiclass_module import NotFittedError
from anomalib_multiclass.datamodule import read_rgb_image
from anomalib_onenip import OneNIP
from anomalib_onenip.new_category import main as add_category_cli
from tests.tiny_models import TINY_ONENIP
from tests.export_parity import assert_parity, run_exported, torch_outputs

KNOWN = ["brick", "grass"]
NEW = "gravel"


@pytest.fixture(scope="module")
def two_category_checkpoint(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny OneNIP trained (with validation thresholds) on brick and grass only."""
    seed_everything(3)
    datamodule = MultiClassAD(root=tiny_dataset, categories=KNOWN, train_batch_size=4, eval_batch_size=8, num_workers=0)
    model = OneNIP(**{**TINY_ONENIP, "pre_trained": True}, lr=1e-3)
    engine = Engine(max_epochs=2, accelerator="cpu", default_root_dir=tmp_path_factory.mktemp("known"),
                    enable_progress_bar=False, logger=False)
    engine.fit(model=model, datamodule=datamodule)
    return Path(engine.trainer.checkpoint_callback.best_model_path)


@pytest.fixture(scope="module")
def added_checkpoint(two_category_checkpoint: Path, tiny_dataset: Path) -> Path:
    output = two_category_checkpoint.with_name("with_gravel.ckpt")
    add_category_cli(["--ckpt_path", str(two_category_checkpoint), "--category", NEW,
                      "--images", str(tiny_dataset / NEW / "train" / "good"), "--output", str(output)])
    return output


def _test_images(tiny_dataset: Path, category: str) -> tuple[torch.Tensor, list[Path]]:
    paths = sorted((tiny_dataset / category / "test").rglob("*.png"))
    return torch.stack([read_rgb_image(str(path)) for path in paths]), paths


@torch.no_grad()
def _predict(model: OneNIP, images: torch.Tensor, category: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    model.eval()
    index = None if category is None else torch.full((len(images),), model.category_names.index(category))
    output = model.model.predict(model.pre_processor.transform(images), index)
    return output.pred_score, output.anomaly_map


def test_known_categories_are_unchanged_and_the_new_one_is_calibrated(
    two_category_checkpoint: Path,
    added_checkpoint: Path,
    tiny_dataset: Path,
) -> None:
    before = OneNIP.load_from_checkpoint(two_category_checkpoint, map_location="cpu")
    after = OneNIP.load_from_checkpoint(added_checkpoint, map_location="cpu")
    assert after.category_names == [*KNOWN, NEW]
    for category in KNOWN:
        images, _ = _test_images(tiny_dataset, category)
        for expected, actual in zip(_predict(before, images, category), _predict(after, images, category), strict=True):
            assert torch.equal(expected, actual)
    bank = after.model.prompt_bank
    assert bank.categories.tolist() == [0, 1, 2]
    assert torch.equal(bank.tokens[:2], before.model.prompt_bank.tokens)
    assert torch.equal(after.model.score_statistics.mean[:2], before.model.score_statistics.mean)
    assert torch.equal(after.model.refiner_scale[:2], before.model.refiner_scale)

    # the new category's constants come from its training images as training computes them for the others
    features, _ = after.prompt_pool.read_features(after.model, sorted((tiny_dataset / NEW / "train" / "good").iterdir()))
    index = torch.full((len(features),), 2)
    with torch.no_grad():
        prompt, chosen = bank.select(after.model.global_features(features), index)
        reconstruction_map, _ = after.model.residual_maps(after.model.reconstruct(features, prompt), features)
        assert after.model.refiner_scale[2].item() == pytest.approx(
            (reconstruction_map.max().item() + reconstruction_map.min().item()) / 2, rel=1e-5)
        scores = after.model.image_score(after.model.fused_map(features, index)[0])
    assert chosen.tolist() == [2] * len(features)
    assert after.model.score_statistics.mean[2].item() == pytest.approx(scores.mean().item(), rel=1e-5)
    assert after.model.score_statistics.std[2].item() == pytest.approx(scores.std(unbiased=False).item(), rel=1e-4)


def test_nearest_prompt_serves_the_new_category_and_export_keeps_it(
    added_checkpoint: Path,
    tiny_dataset: Path,
    tmp_path: Path,
) -> None:
    model = OneNIP.load_from_checkpoint(added_checkpoint, map_location="cpu")
    images, _ = _test_images(tiny_dataset, NEW)
    with torch.no_grad():
        features = model.model.extract_features(model.pre_processor.transform(images))
        _, chosen = model.model.prompt_bank.select(model.model.global_features(features))
    assert (chosen == 2).float().mean() >= 0.8, chosen.tolist()  # gravel's own prompt is the nearest
    labelled, unlabelled = _predict(model, images, NEW), _predict(model, images, None)
    agree = chosen == 2
    assert torch.allclose(labelled[0][agree], unlabelled[0][agree])

    exported = Engine(default_root_dir=tmp_path, logger=False).export(
        model=model, export_type=ExportType.OPENVINO, export_root=tmp_path)
    inputs = images.numpy()
    assert_parity(torch_outputs(model, inputs), run_exported(Path(exported), inputs), map_tolerance=1e-3)


def test_one_image_is_enough_and_replace_is_explicit(two_category_checkpoint: Path, tiny_dataset: Path,
                                                     tmp_path: Path) -> None:
    model = OneNIP.load_from_checkpoint(two_category_checkpoint, map_location="cpu")
    one = sorted((tiny_dataset / NEW / "train" / "good").iterdir())[:1]
    model.add_category(NEW, one)
    images, _ = _test_images(tiny_dataset, NEW)
    scores, _ = _predict(model, images, NEW)
    assert torch.isfinite(scores).all()
    with pytest.raises(ValueError, match="already exists.*replace=True"):
        model.add_category(NEW, one)
    narrower = tmp_path / "narrower.png"  # crops of slightly varying width (as KolektorSDD's) are accepted
    Image.open(one[0]).resize((62, 64)).save(narrower)
    model.add_category(NEW, [one[0], narrower], replace=True)
    assert model.model.prompt_bank.categories.tolist() == [0, 1, 2]
    tokens = model.model.prompt_bank.tokens.clone()
    model.add_category(NEW, tiny_dataset / NEW / "train" / "good", replace=True)
    assert model.category_names == [*KNOWN, NEW]
    assert len(model.model.prompt_bank.tokens) == 3
    assert torch.equal(model.model.prompt_bank.tokens[:2], tokens[:2])
    assert not torch.equal(model.model.prompt_bank.tokens[2], tokens[2])  # the medoid of all 8, not the first image


def test_short_adaptation_replays_the_known_categories(two_category_checkpoint: Path, tiny_dataset: Path,
                                                       tmp_path: Path) -> None:
    output = tmp_path / "adapted.ckpt"
    larger = tmp_path / "larger"  # another camera: batches mix 72 px new images with 64 px replayed ones
    larger.mkdir()
    for path in sorted((tiny_dataset / NEW / "train" / "good").iterdir()):
        Image.open(path).resize((72, 72)).save(larger / path.name)
    add_category_cli(["--ckpt_path", str(two_category_checkpoint), "--category", NEW,
                      "--images", str(larger), "--output", str(output),
                      "--adapt_epochs", "1", "--replay_root", str(tiny_dataset), "--batch_size", "4",
                      "--accelerator", "cpu", "--seed", "1"])
    before = OneNIP.load_from_checkpoint(two_category_checkpoint, map_location="cpu")
    adapted = OneNIP.load_from_checkpoint(output, map_location="cpu")
    assert sorted(adapted.category_names) == sorted([*KNOWN, NEW])
    assert adapted.model.prompt_bank.categories.tolist() == [0, 1, 2]
    changed = [not torch.equal(a, b) for a, b in zip(adapted.model.transformer.parameters(),
                                                      before.model.transformer.parameters(), strict=True)]
    assert all(changed)  # every transformer weight was trained
    for category in [*KNOWN, NEW]:
        scores, _ = _predict(adapted, _test_images(tiny_dataset, category)[0], category)
        assert torch.isfinite(scores).all()


def _cli_error(capsys: pytest.CaptureFixture, *argv: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        add_category_cli(list(argv))
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_bad_input_is_named(two_category_checkpoint: Path, tiny_dataset: Path, tmp_path: Path,
                            capsys: pytest.CaptureFixture) -> None:
    ckpt = str(two_category_checkpoint)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert f"'{empty}' holds no images" in _cli_error(capsys, "--ckpt_path", ckpt, "--category", "x", "--images", str(empty))
    assert "does not exist" in _cli_error(capsys, "--ckpt_path", ckpt, "--category", "x", "--images", str(tmp_path / "no"))

    broken = tmp_path / "broken"
    shutil.copytree(tiny_dataset / NEW / "train" / "good", broken)
    (broken / "zz_truncated.png").write_bytes(b"\x89PNG\r\n")
    assert "zz_truncated.png" in _cli_error(capsys, "--ckpt_path", ckpt, "--category", "x", "--images", str(broken))

    mixed = tmp_path / "mixed"
    shutil.copytree(tiny_dataset / NEW / "train" / "good", mixed)
    Image.fromarray(np.zeros((80, 64, 3), dtype=np.uint8)).save(mixed / "zz_taller.png")
    error = _cli_error(capsys, "--ckpt_path", ckpt, "--category", "x", "--images", str(mixed))
    assert "zz_taller.png' is (80, 64) (H, W), another shape" in error
    assert "Resize or crop them to one size" in error

    error = _cli_error(capsys, "--ckpt_path", ckpt, "--category", "brick", "--images", str(tiny_dataset / NEW / "train" / "good"))
    assert "'brick' already exists" in error
    assert "--replace" in error

    not_a_checkpoint = tmp_path / "model.ckpt"
    not_a_checkpoint.write_bytes(b"not a checkpoint")
    assert "not a readable torch checkpoint" in _cli_error(
        capsys, "--ckpt_path", str(not_a_checkpoint), "--category", "x", "--images", str(empty))

    other = torch.load(two_category_checkpoint, weights_only=False)
    other.pop("anomalib_multiclass")
    torch.save(other, tmp_path / "other.ckpt")
    assert "not a OneNIP checkpoint" in _cli_error(
        capsys, "--ckpt_path", str(tmp_path / "other.ckpt"), "--category", "x", "--images", str(empty))

    with pytest.raises(NotFittedError, match="train it first"):
        OneNIP(**TINY_ONENIP).add_category("x", tiny_dataset / NEW / "train" / "good")
