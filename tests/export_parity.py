"""Compare an exported model (ONNX Runtime, OpenVINO) with the PyTorch model it came from."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from anomalib_multiclass.datamodule import read_rgb_image

# OpenVINO's CPU plugin runs bf16 by default where the CPU supports it; parity is checked in f32.
OPENVINO_F32 = {"INFERENCE_PRECISION_HINT": "f32"}
OUTPUTS = ("pred_score", "pred_label", "anomaly_map", "pred_mask")


def run_exported(path: Path, images: np.ndarray) -> dict[str, np.ndarray]:
    """Outputs of ``model.onnx`` (ONNX Runtime) or ``model.xml`` (OpenVINO, f32) for images ``[B, 3, H, W]`` in [0, 1]."""
    if path.suffix == ".onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        names = [output.name for output in session.get_outputs()]
        return dict(zip(names, session.run(None, {session.get_inputs()[0].name: images}), strict=True))
    import openvino

    compiled = openvino.Core().compile_model(str(path), "CPU", OPENVINO_F32)
    return {output.get_any_name(): value for output, value in compiled(images).items()}


def torch_outputs(model: torch.nn.Module, images: np.ndarray) -> dict[str, np.ndarray]:
    """The anomalib module's full forward (pre-processing, model, post-processing) in eval mode."""
    model.eval()
    with torch.no_grad():
        batch = model(torch.from_numpy(images))
    return {name: getattr(batch, name).numpy() for name in OUTPUTS}


def assert_parity(expected: dict[str, np.ndarray], actual: dict[str, np.ndarray], map_tolerance: float) -> dict:
    """Maps within ``map_tolerance`` of the map's range, scores within it too, identical labels; masks identical
    except where the expected map is within the tolerance of the threshold (0.5). Returns the measured errors."""
    assert set(actual) == set(OUTPUTS), sorted(actual)
    expected_map, actual_map = expected["anomaly_map"], actual["anomaly_map"]
    assert actual_map.shape == expected_map.shape
    map_range = float(expected_map.max() - expected_map.min())
    map_error = float(np.abs(actual_map - expected_map).max())
    score_error = float(np.abs(actual["pred_score"] - expected["pred_score"]).max())
    assert map_error <= map_tolerance * map_range, (map_error, map_range)
    assert score_error <= map_tolerance, score_error
    np.testing.assert_array_equal(actual["pred_label"], expected["pred_label"])
    mask_differs = actual["pred_mask"] != expected["pred_mask"]
    near_threshold = np.abs(expected_map - 0.5) <= map_tolerance * map_range
    assert not (mask_differs & ~near_threshold).any()
    return {"map_error": map_error, "map_range": map_range, "score_error": score_error}


def load_images(paths: list[Path]) -> list[np.ndarray]:
    """Each image as ``[1, 3, H, W]`` float32 in [0, 1] at its own size, read as the datamodule reads it."""
    return [read_rgb_image(str(path)).unsqueeze(0).numpy() for path in paths]


def real_ad_images(root: Path, per_category: int = 2) -> list[np.ndarray]:
    """``per_category`` normal and ``per_category`` defective test images of each real_ad category (own sizes)."""
    paths = []
    for category in ("bottle", "juice_bottle", "kolektor"):
        test = root / category / "test"
        good = sorted((test / "good").glob("*.png"))[:per_category]
        defects = sorted(path for path in test.glob("*/*.png") if path.parent.name != "good")[:per_category]
        paths += good + defects
    return load_images(paths)
