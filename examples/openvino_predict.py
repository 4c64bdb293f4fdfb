"""Run an exported OneNIP or DiAD model with OpenVINO only: no torch, no anomalib.

Needs ``pip install openvino numpy pillow``. The exported graph holds the whole model (resize,
normalisation, prompt bank or fixed noise, per-category calibration and thresholds), so an image
goes in as RGB values in [0, 1] at any size and anomalib's outputs come out.

    python examples/openvino_predict.py results/.../weights/openvino/model.xml IMAGE_OR_FOLDER [--heatmaps DIR]

Prints one JSON line per image: its path, ``pred_score`` (0.5 at the learned threshold),
``pred_label`` and the share of pixels in ``pred_mask``. An unreadable file is named on stderr and
skipped; the exit status is then 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import openvino as ov
from PIL import Image

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}


def load_image(path: Path) -> np.ndarray:
    """``[1, 3, H, W]`` float32 RGB in [0, 1], read as the plugins' datamodule reads training images.

    Grayscale and palette images become RGB, RGBA loses its alpha, 16-bit images are scaled by 65535.
    """
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode in {"I;16", "I;16B", "I;16L", "I"}:
                array = np.asarray(image, dtype=np.float32)
                scale = 65535.0 if image.mode.startswith("I;16") else max(float(array.max()), 1.0)
                array = np.repeat(np.clip(array / scale, 0, 1)[..., None], 3, axis=2)
            else:
                array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    except (OSError, SyntaxError) as error:
        msg = f"Cannot read image '{path}': {error}. Replace it with a valid image or remove it."
        raise ValueError(msg) from None
    return np.ascontiguousarray(array.transpose(2, 0, 1)[None])


def image_paths(source: Path) -> list[Path]:
    """The image itself, or the images of a folder (sorted)."""
    if source.is_dir():
        return sorted(path for path in source.iterdir() if path.suffix.lower() in IMAGE_SUFFIXES)
    if not source.is_file():
        raise SystemExit(f"'{source}' is neither an image nor a folder.")
    return [source]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="model.xml written by `anomalib export --export_type openvino`")
    parser.add_argument("source", type=Path, help="an image or a folder of images")
    parser.add_argument("--device", default="CPU", help="OpenVINO device (CPU, GPU, AUTO)")
    parser.add_argument(
        "--precision",
        default="f32",
        help="inference precision: f32 (the PyTorch results) or the device's faster default (bf16/f16): 'default'",
    )
    parser.add_argument("--heatmaps", type=Path, help="folder for anomaly-map PNGs")
    args = parser.parse_args()

    config = {} if args.precision == "default" else {"INFERENCE_PRECISION_HINT": args.precision}
    model = ov.Core().compile_model(str(args.model), args.device, config)
    if args.heatmaps:
        args.heatmaps.mkdir(parents=True, exist_ok=True)
    failed = 0
    for path in image_paths(args.source):
        try:
            image = load_image(path)
        except ValueError as error:  # report the file, go on with the others, exit with 1 at the end
            print(error, file=sys.stderr)
            failed += 1
            continue
        outputs = model(image)
        result = {output.get_any_name(): value for output, value in outputs.items()}
        print(json.dumps({
            "image": str(path),
            "pred_score": float(result["pred_score"][0]),
            "pred_label": bool(result["pred_label"][0]),
            "anomalous_pixels": float(result["pred_mask"][0].mean()),
        }))
        if args.heatmaps:
            heatmap = (np.clip(result["anomaly_map"][0, 0], 0, 1) * 255).astype(np.uint8)
            Image.fromarray(heatmap).save(args.heatmaps / f"{path.stem}.png")
    if failed:
        raise SystemExit(f"{failed} image(s) could not be read (named above).")


if __name__ == "__main__":
    main()
