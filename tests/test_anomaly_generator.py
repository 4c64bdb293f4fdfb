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
