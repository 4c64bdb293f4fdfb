"""Synthetic anomalies: CutPaste, CutPaste-Scar and Perlin, with masks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from anomalib_onenip.anomaly_generator import CutPaste, OneNIPAnomalyGenerator


def _images(batch: int = 8, size: int = 64) -> torch.Tensor:
    torch.manual_seed(0)
    ramp = torch.linspace(0, 1, size)
    return (0.5 * ramp.view(1, 1, 1, -1) + 0.5 * ramp.view(1, 1, -1, 1)).expand(batch, 3, size, size).clone()


def test_cutpaste_plain_mask_is_a_rectangle_of_the_paper_area() -> None:
    torch.manual_seed(1)
    image = _images(1, 100)[0]
    for _ in range(20):
        augmented, mask = CutPaste().plain(image)
        area = mask.sum().item() / 100**2
        assert 0.015 <= area <= 0.16
        rows, cols = torch.nonzero(mask[0], as_tuple=True)
        assert mask[0, rows.min() : rows.max() + 1, cols.min() : cols.max() + 1].all(), "plain CutPaste pastes a rectangle"
        assert torch.equal(augmented[:, mask[0] == 0], image[:, mask[0] == 0]), "pixels outside the mask are untouched"


def test_cutpaste_scar_is_thin_and_small() -> None:
    torch.manual_seed(2)
    image = _images(1, 128)[0]
    for _ in range(20):
        augmented, mask = CutPaste().scar(image)
        assert 0 < mask.sum() <= 16 * 25 + 64  # width <= 16, length <= 25 px, plus rotation rounding
        assert torch.equal(augmented[:, mask[0] == 0], image[:, mask[0] == 0])


@pytest.mark.parametrize("with_textures", [False, True])
def test_generator_gives_binary_masks_and_changes_only_masked_pixels(tmp_path, with_textures: bool) -> None:  # noqa: ANN001
    source = None
    if with_textures:
        source = tmp_path / "textures"
        source.mkdir()
        rng = np.random.default_rng(0)
        for index in range(3):
            Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(source / f"{index}.png")
    torch.manual_seed(3)
    images = _images(16)
    augmented, masks = OneNIPAnomalyGenerator(anomaly_source_path=source)(images)
    assert augmented.shape == images.shape
    assert masks.shape == (16, 1, 64, 64)
    assert set(masks.unique().tolist()) <= {0.0, 1.0}
    assert (masks.flatten(1).sum(1) > 0).float().mean() >= 0.9, "nearly every sample gets an anomaly"
    outside = (masks == 0).expand_as(images)
    assert torch.allclose(augmented[outside], images[outside], atol=1e-6)
    assert augmented.min() >= 0 and augmented.max() <= 1


def test_generator_mixes_cutpaste_and_perlin_half_and_half() -> None:
    generator = OneNIPAnomalyGenerator()
    calls = {"cutpaste": 0}
    original = generator.cutpaste.forward

    def counting(image: torch.Tensor, scar: bool) -> tuple[torch.Tensor, torch.Tensor]:
        calls["cutpaste"] += 1
        return original(image, scar)

    generator.cutpaste.forward = counting
    torch.manual_seed(4)
    generator(_images(200, 32))
    assert 70 <= calls["cutpaste"] <= 130


def test_generator_rejects_missing_texture_folder(tmp_path) -> None:  # noqa: ANN001
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        OneNIPAnomalyGenerator(anomaly_source_path=tmp_path / "does-not-exist")


def test_perlin_textures_come_from_the_other_categories(tmp_path) -> None:  # noqa: ANN001
    rng = np.random.default_rng(0)
    pixels = {"grey": np.full((64, 64, 3), 128, dtype=np.uint8),
              "colour": rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)}  # every pixel its own colour
    files = {}
    for name, array in pixels.items():
        Image.fromarray(array).save(tmp_path / f"{name}.png")
        files[name] = [tmp_path / f"{name}.png"]
    generator = OneNIPAnomalyGenerator(cutpaste_probability=0.0)
    generator.use_category_textures(files)
    assert generator.textures_by_category == {"grey": files["colour"], "colour": files["grey"]}
    torch.manual_seed(3)
    black = torch.zeros(16, 3, 64, 64)
    for category, coloured in [("grey", True), ("colour", False)]:
        augmented, masks = generator(black, [category] * len(black))
        inside = masks.expand_as(augmented) > 0
        assert inside.any()
        assert torch.equal(augmented[~inside], black[~inside])
        pasted = augmented.permute(1, 0, 2, 3)[inside.permute(1, 0, 2, 3)].view(3, -1)
        # grey textures stay grey under anomalib's augmentations (equal channels); coloured ones do not
        channel_spread = (pasted.max(dim=0).values - pasted.min(dim=0).values).mean().item()
        assert (channel_spread > 0.1) if coloured else (channel_spread < 0.02), (category, channel_spread)


def test_category_textures_need_another_category_and_yield_to_a_texture_folder(tmp_path) -> None:  # noqa: ANN001
    alone = OneNIPAnomalyGenerator(cutpaste_probability=0.0)
    alone.use_category_textures({"only": [tmp_path / "a.png"]})
    assert alone.textures_by_category == {"only": []}, "a category trained alone keeps Perlin-noise textures"
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(tmp_path / "texture.png")
    with_folder = OneNIPAnomalyGenerator(anomaly_source_path=tmp_path, cutpaste_probability=0.0)
    with_folder.use_category_textures({"a": [tmp_path / "a.png"], "b": [tmp_path / "b.png"]})
    assert with_folder.textures_by_category == {}
