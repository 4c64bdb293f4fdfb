"""An offline multi-category dataset in MVTec layout, built from texture photos that ship with scikit-image.

Categories are the CC0 texture photos ``brick``, ``grass`` and ``gravel`` (512x512, in the
scikit-image wheel). Normal images are random crops; every training crop lies inside the top
``train_fraction`` of each photo's rows and every test crop inside the rows below, so no test pixel
was seen in training. ``crops.csv`` in the dataset root records each image's crop box in its photo.
Defects are drawn in ways unlike the plugins' training-time synthesis (CutPaste, Perlin
textures): curved scratches, dark stains and holes, each with its mask.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

logger = logging.getLogger(__name__)

CATEGORIES = ("brick", "grass", "gravel")
DEFECTS = ("scratch", "stain", "hole")
README = "Built by anomalib_multiclass.quickstart_data from scikit-image's CC0 texture photos.\n"


def _texture(name: str) -> np.ndarray:
    from skimage import data

    return np.asarray(getattr(data, name)(), dtype=np.uint8)


def _crop(
    texture: np.ndarray,
    rng: np.random.Generator,
    rows: tuple[int, int],
    size: int,
) -> tuple[np.ndarray, tuple[int, int]]:
    """A random ``size x size`` crop that lies inside ``rows = [first, end)``, and its ``(top, left)``."""
    top = int(rng.integers(rows[0], rows[1] - size + 1))
    left = int(rng.integers(0, texture.shape[1] - size + 1))
    return texture[top : top + size, left : left + size].astype(np.float32), (top, left)


def _scratch(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    size = image.shape[0]
    start = rng.uniform(0.15, 0.85, 2) * size
    angle = rng.uniform(0, np.pi)
    length = rng.uniform(0.3, 0.6) * size
    bend = rng.uniform(-0.3, 0.3) * size
    t = np.linspace(0, 1, 32)[:, None]
    direction = np.array([np.cos(angle), np.sin(angle)])
    normal = np.array([-direction[1], direction[0]])
    points = start + t * length * direction + (4 * t * (1 - t)) * bend * normal
    mask = Image.new("L", (size, size))
    ImageDraw.Draw(mask).line([tuple(p) for p in points], fill=255, width=int(rng.integers(3, 6)))
    mask_array = np.asarray(mask, dtype=np.float32) / 255
    value = 235.0 if rng.random() < 0.5 else 15.0
    return image * (1 - mask_array) + value * mask_array, mask_array > 0.5


def _stain(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    size = image.shape[0]
    center = rng.uniform(0.25, 0.75, 2) * size
    radii = rng.uniform(0.06, 0.14, 2) * size
    mask = Image.new("L", (size, size))
    ImageDraw.Draw(mask).ellipse([*(center - radii), *(center + radii)], fill=255)
    soft = np.asarray(mask.filter(ImageFilter.GaussianBlur(radius=float(radii.min()) / 3)), dtype=np.float32) / 255
    darkened = image * (1 - 0.6 * soft) + 40.0 * 0.6 * soft
    return darkened, soft > 0.5


def _hole(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    size = image.shape[0]
    center = rng.uniform(0.25, 0.75, 2) * size
    radius = rng.uniform(0.04, 0.08) * size
    mask, rim = Image.new("L", (size, size)), Image.new("L", (size, size))
    ImageDraw.Draw(rim).ellipse([*(center - radius * 1.3), *(center + radius * 1.3)], fill=255)
    ImageDraw.Draw(mask).ellipse([*(center - radius), *(center + radius)], fill=255)
    rim_array = np.asarray(rim, dtype=np.float32) / 255
    hole_array = np.asarray(mask, dtype=np.float32) / 255
    result = image * (1 - rim_array) + 200.0 * rim_array
    result = result * (1 - hole_array) + 10.0 * hole_array
    return result, rim_array > 0.5


_DEFECT_MAKERS = {"scratch": _scratch, "stain": _stain, "hole": _hole}


def _save(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    gray = np.clip(array, 0, 255).astype(np.uint8)
    Image.fromarray(np.stack([gray] * 3, axis=-1)).save(path)


def build_quickstart_dataset(
    root: str | Path,
    categories: tuple[str, ...] = CATEGORIES,
    num_train: int = 60,
    num_test_good: int = 12,
    num_test_per_defect: int = 8,
    crop_size: int = 192,
    train_fraction: float = 0.6,
    seed: int = 0,
) -> Path:
    """Write the dataset to ``root`` (MVTec layout) unless it is already complete; return ``root``.

    Training crops lie in the rows ``[0, split)`` of each photo and test crops in ``[split, height)``, with
    ``split = int(height * train_fraction)``; both regions must hold a whole crop.

    Raises:
        ValueError: ``crop_size`` does not fit into one of the two regions.
    """
    root = Path(root)
    if (root / "README.txt").is_file():
        return root
    rng = np.random.default_rng(seed)
    boxes = ["path,top,left,size"]

    def save(image: np.ndarray, box: tuple[int, int], relative: str) -> None:
        _save(image, root / relative)
        boxes.append(f"{relative},{box[0]},{box[1]},{crop_size}")

    for category in categories:
        texture = _texture(category)
        split_row = int(texture.shape[0] * train_fraction)
        if crop_size > min(split_row, texture.shape[0] - split_row) or crop_size > texture.shape[1]:
            msg = (
                f"crop_size {crop_size} does not fit into the training rows [0, {split_row}) and the test rows "
                f"[{split_row}, {texture.shape[0]}) of '{category}' ({texture.shape[0]}x{texture.shape[1]}): "
                "choose a smaller crop_size or another train_fraction."
            )
            raise ValueError(msg)
        train_rows, test_rows = (0, split_row), (split_row, texture.shape[0])
        for index in range(num_train):
            crop, box = _crop(texture, rng, train_rows, crop_size)
            save(crop, box, f"{category}/train/good/{index:03d}.png")
        for index in range(num_test_good):
            crop, box = _crop(texture, rng, test_rows, crop_size)
            save(crop, box, f"{category}/test/good/{index:03d}.png")
        for defect in DEFECTS:
            for index in range(num_test_per_defect):
                crop, box = _crop(texture, rng, test_rows, crop_size)
                defective, mask = _DEFECT_MAKERS[defect](crop, rng)
                save(defective, box, f"{category}/test/{defect}/{index:03d}.png")
                mask_path = root / category / "ground_truth" / defect / f"{index:03d}_mask.png"
                mask_path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(mask.astype(np.uint8) * 255).save(mask_path)
    (root / "crops.csv").write_text("\n".join(boxes) + "\n")
    (root / "README.txt").write_text(README)
    logger.info("Quickstart dataset written to %s", root)
    return root
