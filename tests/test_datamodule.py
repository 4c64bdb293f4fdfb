"""Multi-class datamodule: category tags, category resolution, and clear errors on bad data."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from anomalib_multiclass import CategoryImageBatch, MultiClassAD
from anomalib_multiclass.datamodule import PredictImages, read_rgb_image


def _setup(root: Path, **kwargs) -> MultiClassAD:  # noqa: ANN003
    datamodule = MultiClassAD(root=root, train_batch_size=4, eval_batch_size=4, num_workers=0, **kwargs)
    datamodule.setup()
    return datamodule


@pytest.fixture
def dataset_copy(tiny_dataset: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_dataset, tmp_path / "textures"))


def test_all_categories_are_found_and_every_sample_is_tagged(tiny_dataset: Path) -> None:
    datamodule = _setup(tiny_dataset)
    assert datamodule.categories == ["brick", "grass", "gravel"]
    samples = datamodule.train_data.samples
    assert samples.groupby("category").size().to_dict() == {"brick": 8, "grass": 8, "gravel": 8}
    for path, category in zip(samples.image_path, samples.category, strict=True):
        assert Path(path).parts[-4] == category
    batch = next(iter(datamodule.test_dataloader()))
    assert isinstance(batch, CategoryImageBatch)
    assert len(batch.category) == len(batch.image)
    assert batch.gt_mask.shape == (4, 64, 64)
    assert datamodule.name == "textures", "results go under the dataset folder's name"


def test_category_subset(tiny_dataset: Path) -> None:
    datamodule = _setup(tiny_dataset, categories=["gravel", "brick"])
    assert set(datamodule.train_data.samples.category) == {"brick", "gravel"}
    assert set(datamodule.test_data.samples.category) == {"brick", "gravel"}
    assert datamodule.category == "gravel+brick"


def test_missing_category_is_named(tiny_dataset: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"Category 'marble' not found.*Available: \['brick', 'grass', 'gravel'\]"):
        _setup(tiny_dataset, categories=["brick", "marble"])


def test_unknown_dataset_kind_is_refused(tiny_dataset: Path) -> None:
    with pytest.raises(ValueError, match="Unknown dataset 'mvtec'"):
        MultiClassAD(root=tiny_dataset, dataset="mvtec")


def test_category_without_training_images(dataset_copy: Path) -> None:
    for image in (dataset_copy / "grass" / "train" / "good").iterdir():
        image.unlink()
    with pytest.raises(ValueError, match=r"Category 'grass' has no training images"):
        _setup(dataset_copy)


def test_defect_image_without_mask(dataset_copy: Path) -> None:
    (dataset_copy / "brick" / "ground_truth" / "hole" / "001_mask.png").unlink()
    with pytest.raises(ValueError, match=r"Category 'brick'.*exactly one mask"):
        _setup(dataset_copy)


def test_mask_of_another_size_is_named_at_setup(dataset_copy: Path) -> None:
    mask_path = dataset_copy / "brick" / "ground_truth" / "hole" / "000_mask.png"
    Image.new("L", (32, 32)).save(mask_path)
    with pytest.raises(ValueError, match=r"000_mask.png' is \(32, 32\).*is \(64, 64\)"):
        _setup(dataset_copy, categories=["brick"])  # before training, from the file headers


@pytest.mark.parametrize("content", [b"", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00", b"just text"])
def test_corrupt_image_is_named(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "broken.png"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=r"Cannot read image '.*broken.png'"):
        read_rgb_image(str(path))


def test_missing_image_is_named_as_missing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"Image '.*gone.png' does not exist"):
        read_rgb_image(str(tmp_path / "gone.png"))


def test_predict_images_takes_a_list_of_files_in_order(tiny_dataset: Path) -> None:
    files = sorted((tiny_dataset / "brick" / "train" / "good").iterdir())[:3][::-1]
    dataset = PredictImages(files)
    assert [Path(dataset[index].image_path) for index in range(3)] == files
    assert torch.equal(dataset[0].image, read_rgb_image(str(files[0])))
    with pytest.raises(ValueError, match="empty list of image files"):
        PredictImages([])


def test_truncated_image_is_named(tiny_dataset: Path, tmp_path: Path) -> None:
    source = next((tiny_dataset / "brick" / "train" / "good").iterdir()).read_bytes()
    path = tmp_path / "truncated.png"
    path.write_bytes(source[: len(source) // 2])
    with pytest.raises(ValueError, match="truncated.png"):
        read_rgb_image(str(path))


def test_grayscale_rgba_and_16_bit_images_are_read_as_rgb(tmp_path: Path) -> None:
    gray = np.tile(np.arange(0, 256, 16, dtype=np.uint8), (16, 1))
    Image.fromarray(gray, mode="L").save(tmp_path / "gray.png")
    rgba = np.dstack([gray, gray, gray, np.full_like(gray, 7)])
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(gray.astype(np.uint16) * 257).save(tmp_path / "deep.png")
    expected = torch.from_numpy(gray / 255.0).float().expand(3, -1, -1)
    for name in ("gray.png", "rgba.png", "deep.png"):
        image = read_rgb_image(str(tmp_path / name))
        assert image.shape == (3, 16, 16), name
        assert torch.allclose(image, expected, atol=1e-4), name


def test_epoch_shuffle_depends_only_on_seed_and_epoch_and_resumes_part_way() -> None:
    from anomalib_multiclass.resumable import EpochShuffleSampler

    sampler = EpochShuffleSampler(10, seed=4)
    first = list(sampler)
    assert sorted(first) == list(range(10))
    assert list(EpochShuffleSampler(10, seed=4)) == first, "the same seed gives the same order"
    sampler.set_epoch(1)
    second = list(sampler)
    assert second != first, "each epoch has its own order"
    sampler.resume_at(1, 6)
    assert list(sampler) == second[6:], "a resumed epoch continues its order where it stopped"
    assert list(sampler) == second, "only once"


def test_training_order_survives_a_checkpoint(tiny_dataset: Path) -> None:
    """The shuffle seed and the resume position go through ``state_dict``/``load_state_dict`` (Lightning's hooks)."""
    datamodule = _setup(tiny_dataset)
    order = [path for batch in datamodule.train_dataloader() for path in batch.image_path]
    restored = _setup(tiny_dataset)
    restored.load_state_dict({**datamodule.state_dict(), "resume_epoch": 0, "resume_sample": 8})
    assert [path for batch in restored.train_dataloader() for path in batch.image_path] == order[8:]


def test_masks_read_by_anomalibs_read_mask_as_before(tmp_path: Path) -> None:
    """anomalib's ``read_mask`` gives the 0/1 mask of the former reader (any non-zero pixel anomalous); bad files named."""
    import numpy as np
    from PIL import Image

    from anomalib_multiclass.datamodule import read_binary_mask

    values = np.array([[0, 1, 128], [255, 0, 7]], dtype=np.uint8)
    Image.fromarray(values).save(tmp_path / "mask.png")
    mask = read_binary_mask(str(tmp_path / "mask.png"))
    assert mask.dtype == torch.uint8
    assert torch.equal(mask, torch.from_numpy((values > 0).astype(np.uint8)))
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="broken.png"):
        read_binary_mask(str(tmp_path / "broken.png"))


def test_anomalib_sources_are_anomalibs_public_classes() -> None:
    """The public ``anomalib.data`` names are the classes of anomalib's internal modules that were used before."""
    from anomalib.data.datamodules.image import btech, mvtecad, visa
    from anomalib.data.datasets.image import btech as btech_dataset
    from anomalib.data.datasets.image import mvtecad as mvtec_dataset
    from anomalib.data.datasets.image import visa as visa_dataset

    from anomalib_multiclass.datamodule import ANOMALIB_SOURCES

    assert ANOMALIB_SOURCES == {
        "mvtec_ad": (mvtecad.MVTecAD, mvtec_dataset.MVTecADDataset),
        "visa": (visa.Visa, visa_dataset.VisaDataset),
        "btech": (btech.BTech, btech_dataset.BTechDataset),
    }
    assert MultiClassAD(root="unused", dataset="visa").categories == list(visa_dataset.CATEGORIES)
