"""DiAD inference and training-step speed on this machine (random weights; timing does not depend on them).

    python tests/benchmarks/diad_speed.py --architecture small --input-size 256 --batch-sizes 1 8

Prints ms/image of the full evaluation path (encode, noise, ``--ddim-steps`` SG+UNet steps, decode,
feature distance, blur, score) per batch size, and the time of one stage-2 training step, split into the forward
passes of the frozen autoencoder's encoder, the SG network and the UNet (forward hooks), and the rest (noise, loss,
backward, optimiser step).

With ``--compile MODE`` also the compiled evaluation path (as ``compile_inference``): the first call's seconds
(compilation), ms/image and the largest map difference to eager over the map's range. The DDIM steps share one
compiled noise predictor (``SHARED_NOISE_PREDICTION``); ``--compile-each-step`` compiles every unrolled step on its own
instead (the ablation: compilation time grows with the steps).

    python tests/benchmarks/diad_speed.py --architecture tiny --input-size 128 --backbone resnet18 --batch-sizes 1 \
        --compile default [--compile-each-step]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections import defaultdict
from collections.abc import Callable

import torch
from speed import relative_difference
from timing import median_seconds

from anomalib_diad import torch_model as diad_torch_model
from anomalib_diad.loss import DiffusionLoss
from anomalib_diad.torch_model import DiADModel


def forward_times(parts: dict[str, torch.nn.Module], step: Callable[[], None], repeats: int) -> dict[str, float]:
    """Mean seconds per ``step()`` spent in each module's forward (hooks; CPU timing, so synchronous)."""
    totals: dict[str, float] = defaultdict(float)
    handles = []
    for name, module in parts.items():
        starts: list[float] = []
        handles.append(module.register_forward_pre_hook(lambda *_, starts=starts: starts.append(time.perf_counter())))
        handles.append(module.register_forward_hook(
            lambda *_, name=name, starts=starts: totals.__setitem__(name, totals[name] + time.perf_counter() - starts.pop())))
    for _ in range(repeats):
        step()
    for handle in handles:
        handle.remove()
    return {name: totals[name] / repeats for name in parts}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--architecture", default="small")
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--layers", nargs="+", default=["1", "2", "3"])
    parser.add_argument("--input-size", type=int, default=256)
    parser.add_argument("--ddim-steps", type=int, default=10)
    parser.add_argument("--train-unet-encoder", action="store_true",
                        help="train the whole UNet (the from-scratch setting) instead of its decoder only")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--train-batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile", choices=["default", "reduce-overhead", "max-autotune"],
                        help="also time the evaluation path through torch.compile in this mode")
    parser.add_argument("--compile-each-step", action="store_true",
                        help="compile each DDIM step on its own (without the shared compiled noise predictor)")
    parser.add_argument("--skip-training", action="store_true", help="time the evaluation path only")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    if args.compile_each_step:
        diad_torch_model.SHARED_NOISE_PREDICTION = None
    layers = [int(layer) if layer.isdigit() else layer for layer in args.layers]
    model = DiADModel(
        architecture=args.architecture,
        input_size=(args.input_size, args.input_size),
        backbone=args.backbone,
        layers=layers,
        ddim_steps=args.ddim_steps,
        train_unet_encoder=args.train_unet_encoder,
    )
    results = {
        "architecture": args.architecture,
        "input_size": args.input_size,
        "ddim_steps": args.ddim_steps,
        "train_unet_encoder": args.train_unet_encoder,
        "torch_threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "inference_ms_per_image": {},
    }
    model.eval()
    for batch_size in args.batch_sizes:
        images = torch.randn(batch_size, 3, args.input_size, args.input_size)
        with torch.inference_mode():
            seconds = median_seconds(lambda images=images: model(images), args.repeats)
        results["inference_ms_per_image"][batch_size] = round(1000 * seconds / batch_size, 1)
        print(f"inference batch {batch_size}: {1000 * seconds / batch_size:.1f} ms/image")
    if args.compile:
        results["compiled"] = compiled_inference(model, args)
    if args.skip_training:
        write(results, args.json)
        return
    model.train()
    loss_function = DiffusionLoss()
    optimizer = torch.optim.AdamW([parameter for parameter in model.parameters() if parameter.requires_grad], lr=1e-5)
    images = torch.randn(args.train_batch_size, 3, args.input_size, args.input_size)

    def train_step() -> None:
        optimizer.zero_grad()
        loss_function(*model(images)).backward()
        optimizer.step()

    seconds = median_seconds(train_step, args.repeats)
    results["train_step_s"] = round(seconds, 3)
    results["train_images_per_s"] = round(args.train_batch_size / seconds, 2)
    print(f"stage-2 training step, batch {args.train_batch_size}: {seconds:.2f} s "
          f"({args.train_batch_size / seconds:.2f} images/s)")
    parts = {"autoencoder encoder (frozen)": model.autoencoder.encoder, "SG network": model.sg_network,
             "UNet": model.unet}
    forward_seconds = forward_times(parts, train_step, args.repeats)
    results["train_step_share"] = {name: round(value / seconds, 3) for name, value in forward_seconds.items()}
    results["train_step_share"]["rest (noise, loss, backward, optimiser)"] = round(
        1 - sum(forward_seconds.values()) / seconds, 3)
    for name, share in results["train_step_share"].items():
        print(f"  {name}: {100 * share:.0f} %")
    write(results, args.json)


def compiled_inference(model: DiADModel, args: argparse.Namespace) -> dict:
    """Compilation seconds (the first call), ms/image per batch size and the map difference to eager."""
    forward = torch.compile(model.forward, mode=args.compile, dynamic=False)
    report = {"mode": args.compile, "each_step_compiled": args.compile_each_step, "ms_per_image": {}}
    for batch_size in args.batch_sizes:
        images = torch.randn(batch_size, 3, args.input_size, args.input_size)
        with torch.inference_mode():
            start = time.perf_counter()
            maps = forward(images).anomaly_map
            report.setdefault("compile_s", round(time.perf_counter() - start, 1))
            report["map_difference"] = max(report.get("map_difference", 0.0),
                                           relative_difference(maps, model(images).anomaly_map))
            seconds = median_seconds(lambda images=images: forward(images), args.repeats)
        report["ms_per_image"][batch_size] = round(1000 * seconds / batch_size, 1)
        print(f"compiled ({args.compile}{', each step' if args.compile_each_step else ''}) batch {batch_size}: "
              f"{1000 * seconds / batch_size:.1f} ms/image")
    print(f"compilation (first call): {report['compile_s']} s; map difference to eager {report['map_difference']:.1e}")
    return report


def write(results: dict, path: str | None) -> None:
    if path:
        with open(path, "w") as file:
            json.dump(results, file, indent=2)


if __name__ == "__main__":
    main()
