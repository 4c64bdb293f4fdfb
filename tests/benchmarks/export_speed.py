"""Exported OneNIP or DiAD: parity with PyTorch, CPU latency (PyTorch eager, ONNX Runtime, OpenVINO) and file sizes.

    python tests/benchmarks/export_speed.py --checkpoint results/.../weights/lightning/model.ckpt
    python tests/benchmarks/export_speed.py --model OneNIP --backbone tf_efficientnet_lite0 --input-size 256

With ``--checkpoint`` the trained model is exported; without it a model of the given size gets a
stand-in fitted state (prompt bank and calibration from random images, thresholds set by hand), so
speed and numerical parity can be measured without training (they do not depend on the weights).
Exports go through anomalib (``Engine.export``) with a dynamic image size. Latency is the median
over ``--repeats`` runs of one ``[1, 3, S, S]`` image, all runtimes in the same process and threads.
OpenVINO is timed in f32 (the parity setting) and at the device's default precision (bf16 on
CPUs with AMX/AVX-512 BF16).
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime
import openvino
import torch
from anomalib.deploy import ExportType
from anomalib.engine import Engine
from timing import median_seconds

from anomalib_multiclass.multiclass_module import CHECKPOINT_INFO_KEY


def load_model(args: argparse.Namespace) -> torch.nn.Module:
    """The checkpoint's model, or a model of the given size with a stand-in fitted state."""
    if args.checkpoint:
        name = torch.load(args.checkpoint, map_location="cpu", weights_only=False)[CHECKPOINT_INFO_KEY]["model"]
        model_class = _model_class(name)
        return model_class.load_from_checkpoint(args.checkpoint, pre_trained=False).eval()
    size = (args.input_size, args.input_size)
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(4, 3, *size, generator=generator)
    if args.model == "OneNIP":
        model = _model_class("OneNIP")(backbone=args.backbone, input_size=size, pre_trained=False, visualizer=False)
        model.eval()
        with torch.no_grad():
            model.prompt_pool.features = {"stand_in": model.model.extract_features(model._pre_process(images))}  # noqa: SLF001
        model.category_names = ["stand_in"]
        model.build_prompt_bank()
    else:
        model = _model_class("DiAD")(
            architecture=args.architecture, input_size=size, diffusion_weights=None, pre_trained=False,
            backbone=args.backbone, layers=[1, 2, 3], visualizer=False,
        ).eval()
        with torch.no_grad():
            scores = model.model.anomaly_map.image_score(model.model.raw_anomaly_map(model._pre_process(images)))  # noqa: SLF001
        model.model.score_statistics.store([scores])
        model.initial_weights_loaded.fill_(True)
        model.calibration_step.fill_(0)
    post_processor = model.post_processor
    for name, value in (("_image_threshold", 1.0), ("_pixel_threshold", 1.0), ("image_min", -3.0),
                        ("image_max", 3.0), ("pixel_min", -3.0), ("pixel_max", 3.0)):
        getattr(post_processor, name).fill_(value)
    return model


def _model_class(name: str) -> type:
    if name == "OneNIP":
        from anomalib_onenip import OneNIP

        return OneNIP
    from anomalib_diad import DiAD

    return DiAD


def folder_size_mb(paths: list[Path]) -> float:
    return round(sum(path.stat().st_size for path in paths if path.is_file()) / 2**20, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, help="a model.ckpt written by `anomalib train`")
    parser.add_argument("--model", choices=["OneNIP", "DiAD"], default="OneNIP")
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--architecture", default="small", help="DiAD architecture")
    parser.add_argument("--input-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--output", type=Path, help="folder for the exports (default: a temporary one)")
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    args = parser.parse_args()

    model = load_model(args)
    size = model.model.input_size
    output = args.output or Path(tempfile.mkdtemp(prefix="export_speed_"))
    engine = Engine(accelerator="cpu", default_root_dir=output, enable_progress_bar=False)
    paths, export_s = {}, {}
    for name in ("torch", "onnx", "openvino"):
        start = time.perf_counter()
        paths[name] = engine.export(model, ExportType(name), export_root=output / name)
        export_s[name] = round(time.perf_counter() - start, 1)
    print(f"export seconds: {export_s}")
    sizes = {
        "torch": folder_size_mb([paths["torch"]]),
        "onnx": folder_size_mb(list(paths["onnx"].parent.iterdir())),
        "openvino": folder_size_mb([paths["openvino"], paths["openvino"].with_suffix(".bin")]),
    }

    image = torch.rand(1, 3, *size, generator=torch.Generator().manual_seed(1))
    session = onnxruntime.InferenceSession(str(paths["onnx"]), providers=["CPUExecutionProvider"])
    core = openvino.Core()
    compiled = {
        "openvino_f32": core.compile_model(str(paths["openvino"]), "CPU", {"INFERENCE_PRECISION_HINT": "f32"}),
        "openvino_default": core.compile_model(str(paths["openvino"]), "CPU"),
    }
    runners = {
        "pytorch": lambda: model(image),
        "onnxruntime": lambda: dict(zip([o.name for o in session.get_outputs()], session.run(None, {"input": image.numpy()}), strict=True)),
        **{name: (lambda c=c: {o.get_any_name(): v for o, v in c(image.numpy()).items()}) for name, c in compiled.items()},
    }
    with torch.inference_mode():
        reference = model(image)
        latency = {name: 1000 * median_seconds(run, args.repeats) for name, run in runners.items()}
    map_range = float(reference.anomaly_map.max() - reference.anomaly_map.min())
    parity = {}
    for name in ("onnxruntime", "openvino_f32", "openvino_default"):
        with torch.inference_mode():
            outputs = runners[name]()
        parity[name] = {
            "map_max_abs_error_over_range": float(np.abs(outputs["anomaly_map"] - reference.anomaly_map.numpy()).max()) / map_range,
            "score_max_abs_error": float(np.abs(outputs["pred_score"] - reference.pred_score.numpy()).max()),
            "labels_equal": bool((outputs["pred_label"] == reference.pred_label.numpy()).all()),
        }
    results = {
        "model": type(model).__name__,
        "input_size": list(size),
        "checkpoint": str(args.checkpoint) if args.checkpoint else None,
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads",
        "openvino_default_precision": str(compiled["openvino_default"].get_property("INFERENCE_PRECISION_HINT")),
        "size_mb": sizes,
        "export_s": export_s,
        "latency_ms_batch1": {name: round(value, 1) for name, value in latency.items()},
        "speedup_vs_pytorch": {name: round(latency["pytorch"] / value, 2) for name, value in latency.items()},
        "parity": parity,
    }
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
