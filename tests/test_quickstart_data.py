"""The quickstart's texture dataset: no test pixel lies in the part of a photo that training crops come from."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anomalib_multiclass.quickstart_data import _texture, build_quickstart_dataset


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_quickstart_dataset(tmp_path_factory.mktemp("textures"), num_train=6, num_test_good=3, num_test_per_defect=2)


def _boxes(root: Path) -> list[dict[str, str]]:
    with (root / "crops.csv").open() as file:
        return list(csv.DictReader(file))


def test_every_image_has_its_crop_box_and_the_box_is_true(dataset: Path) -> None:
    boxes = _boxes(dataset)
    written = {str(path.relative_to(dataset)) for path in dataset.glob("*/*/*/*.png") if "ground_truth" not in path.parts}
    assert {box["path"] for box in boxes} == written
    for box in boxes:
        if "/good/" not in box["path"]:
            continue  # defect images are drawn on: their normal pixels are checked through the good ones
        texture = _texture(box["path"].split("/")[0])
        top, left, size = int(box["top"]), int(box["left"]), int(box["size"])
        image = np.asarray(Image.open(dataset / box["path"]))[..., 0]
        np.testing.assert_array_equal(image, texture[top : top + size, left : left + size])


def test_test_crops_and_training_crops_share_no_row_of_a_photo(dataset: Path) -> None:
    rows: dict[tuple[str, str], set[int]] = {}
    for box in _boxes(dataset):
        category, split = box["path"].split("/")[:2]
        top, size = int(box["top"]), int(box["size"])
        rows.setdefault((category, split), set()).update(range(top, top + size))
    for category in ("brick", "grass", "gravel"):
        assert rows[(category, "train")], category
        assert rows[(category, "test")], category
        assert not rows[(category, "train")] & rows[(category, "test")], f"{category}: test rows seen in training"


def test_a_crop_that_does_not_fit_both_regions_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="crop_size 256 does not fit"):
        build_quickstart_dataset(tmp_path, crop_size=256)
