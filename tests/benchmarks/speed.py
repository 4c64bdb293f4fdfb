"""Inference speed of OneNIP and DiAD against the official-style paths and the backbone floor, in one run.

    python tests/benchmarks/speed.py --json speed.json --plot speed.png

For every device (the CPU always, CUDA when available), precision (fp32, and bf16 or fp16 autocast:
``--precisions``; by default fp32 and bf16 on the CPU, all three on CUDA) and batch size, it times:

- ``onenip_backbone``: OneNIP's frozen backbone alone, the floor of any OneNIP inference;
- ``onenip_official``: OneNIP as the official code runs it, the prompt image through the backbone and
  the encoder for every query;
- ``onenip_bank``: OneNIP as this package runs it, prompts encoded once into the prompt bank;
- ``diad_official``: DiAD as the official code runs it, classifier-free guidance at scale 1 (an
  unconditional and a conditional UNet pass per DDIM step, whose mix is the conditional one), fp32;
- ``diad``: DiAD as this package runs it (one UNet pass per step; channels-last on CUDA);
- with ``--compile MODE``, also ``onenip_bank_compiled`` and ``diad_compiled``: the same models through
  :func:`torch.compile` in that mode, as ``compile_inference`` runs them (``reduce-overhead``: CUDA graphs).

It prints latency (ms/image), throughput (images/s), peak memory (CUDA: allocated; CPU: process RSS
during the run) and the ratios the targets name, checks that the maps agree with the official-style
fp32 maps, and measures how OneNIP's cost grows with the prompt bank (``--growth-categories``) and
the input size (``--growth-sizes``). Weights are random: timing does not depend on them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from timing import median_seconds
from torch.nn import functional as F  # noqa: N812

from anomalib_diad.torch_model import DiADModel
from anomalib_onenip.torch_model import OneNIPModel

AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


class OfficialStyleDiAD(DiADModel):
    """DiAD with the official code's guidance at scale 1: both UNet passes run, the mix equals the conditional."""

    def predict_noise(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        batch_size = noisy_latents.shape[0]
        doubled = super().predict_noise(noisy_latents.repeat(2, 1, 1, 1), timesteps.repeat(2), images.repeat(2, 1, 1, 1))
        unconditional, conditional = doubled[:batch_size], doubled[batch_size:]
        return unconditional + 1.0 * (conditional - unconditional)


def onenip_official(model: OneNIPModel, images: torch.Tensor, prompt_images: torch.Tensor,
                    category_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The official inference: each query's prompt image ``[B, 3, H, W]`` through backbone and encoder.

    Returns the map ``[B, 1, H, W]`` and the image score ``[B]`` (the official square box filter).
    """
    features = model.extract_features(images)
    encoded_prompt = model.encode_prompts(model.extract_features(prompt_images))
    anomaly_map = model.standardized(model.prompted_map(features, encoded_prompt, category_index), category_index)
    pool_size = min(model.score_pool_size, *model.input_size)
    return anomaly_map, F.avg_pool2d(anomaly_map, pool_size, stride=1).amax(dim=(1, 2, 3))


def build_onenip(backbone: str, input_size: int, categories: int, device: str) -> tuple[OneNIPModel, torch.Tensor]:
    """A OneNIP whose prompt bank, score statistics and refiner scales hold one random entry per category.

    Returns the model and its prompt images.
    """
    model = OneNIPModel(backbone=backbone, input_size=(input_size, input_size)).eval().to(device)
    prompt_images = torch.rand(categories, 3, input_size, input_size, device=device)
    with torch.no_grad():
        features = model.extract_features(prompt_images)
        model.prompt_bank.store(model.encode_prompts(features), model.global_features(features),
                                torch.arange(categories, device=device))
        model.score_statistics.mean = torch.rand(categories, device=device)
        model.score_statistics.std = 1 + torch.rand(categories, device=device)
        model.refiner_scale = 1 + torch.rand(categories, device=device)
    return model, prompt_images


class PeakMemory:
    """Peak memory while the block runs: CUDA allocated bytes, or the process's RSS sampled every 2 ms."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.peak_mb = 0.0

    @contextlib.contextmanager
    def measure(self) -> Iterator[None]:
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            yield
            self.peak_mb = torch.cuda.max_memory_allocated() / 2**20
            return
        import psutil  # the CPU's resident memory only (a GPU machine may lack it)

        process, done, peak = psutil.Process(), threading.Event(), [0]

        def sample() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], process.memory_info().rss)
                time.sleep(0.002)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            yield
        finally:
            done.set()
            sampler.join()
            self.peak_mb = peak[0] / 2**20


def precision_context(device: str, precision: str) -> contextlib.AbstractContextManager:
    """``fp32``: nothing; ``bf16`` or ``fp16``: autocast to that type."""
    return torch.autocast(device, dtype=AUTOCAST[precision]) if precision in AUTOCAST else contextlib.nullcontext()


def compiled(function: Callable[..., torch.Tensor], mode: str) -> Callable[..., torch.Tensor]:
    """``function`` through :func:`torch.compile` in ``mode``, each call a new CUDA-graph step, its output copied
    (as ``compile_inference`` runs the models in Lightning).

    Dynamo's caches are emptied first: each timed configuration (path, shape, precision) compiles alone, as a user's
    one configuration does. Without that, the benchmark's lambdas (one code object each, whatever the model, shape or
    autocast) gather a compiled variant per configuration until dynamo's recompile limit (8) and then silently run
    the rest eagerly.
    """
    torch._dynamo.reset()
    compiled_function = torch.compile(function, mode=mode, dynamic=False)

    def call(*args: object, **kwargs: object) -> torch.Tensor:
        torch.compiler.cudagraph_mark_step_begin()
        return compiled_function(*args, **kwargs).clone()

    return call


def timed(function: Callable[[], torch.Tensor], device: str, precision: str, repeats: int) -> dict[str, float]:
    """Median seconds per call and peak memory of ``function`` under ``precision`` (``fp32``, ``bf16``, ``fp16``);
    the first three calls (compilation, CUDA graph capture, cuDNN's choice of kernels) are not timed."""

    def call() -> torch.Tensor:
        with torch.inference_mode(), precision_context(device, precision):
            output = function()
        if device == "cuda":
            torch.cuda.synchronize()
        return output

    memory = PeakMemory(device)
    with memory.measure():
        seconds = median_seconds(call, repeats, warmup=3)
    return {"seconds": seconds, "peak_mb": memory.peak_mb}


def relative_difference(maps: torch.Tensor, reference: torch.Tensor) -> float:
    """Largest absolute difference divided by the reference map's range."""
    reference = reference.float()
    return float((maps.float() - reference).abs().max() / (reference.max() - reference.min()).clamp_min(1e-12))


def measure(path: str, function: Callable[[], torch.Tensor], device: str, precision: str, batch_size: int,
            reference: torch.Tensor | None, repeats: int) -> dict:
    """One table row: timing, peak memory and, given the official-style fp32 maps, the maps' difference to them."""
    row = {"device": device, "precision": precision, "batch_size": batch_size, "path": path,
           **timed(function, device, precision, repeats)}
    if reference is not None:
        with torch.inference_mode(), precision_context(device, precision):
            row["map_difference"] = relative_difference(function(), reference)
    return row


def run_onenip(args: argparse.Namespace, device: str, precisions: list[str]) -> list[dict]:
    model, prompt_images = build_onenip(args.backbone, args.input_size, args.categories, device)
    rows = []
    for batch_size in args.batch_sizes:
        images = torch.rand(batch_size, 3, args.input_size, args.input_size, device=device)
        category_index = torch.arange(batch_size, device=device) % args.categories
        prompts = prompt_images[category_index]
        with torch.inference_mode():
            reference = onenip_official(model, images, prompts, category_index)[0]
        paths = {
            "onenip_backbone": lambda images=images: model.extract_features(images),
            "onenip_official": lambda images=images, prompts=prompts, index=category_index: onenip_official(
                model, images, prompts, index)[0],
            "onenip_bank": lambda images=images, index=category_index: model.predict(images, index).anomaly_map,
        }
        for precision in precisions:
            compiled_path = {}
            if args.compile and precision in (args.compile_precisions or precisions):
                predict_map = compiled(lambda images, index: model.predict(images, index).anomaly_map, args.compile)
                compiled_path["onenip_bank_compiled"] = lambda images=images, index=category_index, run=predict_map: run(
                    images, index)
            rows += [
                measure(path, function, device, precision, batch_size,
                        None if path == "onenip_backbone" else reference, args.repeats)
                for path, function in {**paths, **compiled_path}.items()
            ]
    return rows


def run_diad(args: argparse.Namespace, device: str, precisions: list[str]) -> list[dict]:
    """DiAD's official-style and own paths for each ``--ddim-steps`` and ``--diad-batch-sizes``."""
    rows = []
    for steps in args.ddim_steps:
        rows += _diad_rows(args, device, precisions, steps)
    return rows


def _diad_rows(args: argparse.Namespace, device: str, precisions: list[str], steps: int) -> list[dict]:
    size = (args.diad_input_size, args.diad_input_size)
    settings = {"architecture": args.diad_architecture, "input_size": size, "backbone": args.diad_backbone,
                "layers": args.diad_layers, "ddim_steps": steps}
    ours = DiADModel(**settings).eval().to(device)
    official = OfficialStyleDiAD(**settings).eval().to(device)
    official.load_state_dict(ours.state_dict())
    if device == "cuda":
        ours = ours.to(memory_format=torch.channels_last)
    rows = []
    for batch_size in args.diad_batch_sizes:
        images = torch.rand(batch_size, 3, *size, device=device)
        with torch.inference_mode():
            reference = official(images).anomaly_map
        runs = [("diad_official", official, "fp32")] + [("diad", ours, precision) for precision in precisions]
        if args.compile:
            runs += [("diad_compiled", None, precision) for precision in args.compile_precisions or precisions]
        for path, model, precision in runs:
            if model is None:  # compiled for this precision and shape only, when its turn comes
                model = compiled(lambda images: ours(images).anomaly_map, args.compile)
            rows.append({**measure(path, lambda model=model, images=images: _anomaly_map(model(images)), device,
                                   precision, batch_size, reference, args.repeats),
                         "architecture": args.diad_architecture, "ddim_steps": steps})
    return rows


def _anomaly_map(output: object) -> torch.Tensor:
    """The map of a model's ``InferenceBatch``, or the map a compiled path already returns."""
    return output if isinstance(output, torch.Tensor) else output.anomaly_map


def run_growth(args: argparse.Namespace, device: str) -> list[dict]:
    """OneNIP (prompt bank, fp32) against the number of categories and the input size, at the largest batch."""
    batch_size = max(args.batch_sizes)
    settings = [(categories, args.input_size) for categories in args.growth_categories]
    settings += [(args.categories, size) for size in args.growth_sizes if size != args.input_size]
    rows = []
    for categories, size in settings:
        model, _ = build_onenip(args.backbone, size, categories, device)
        images = torch.rand(batch_size, 3, size, size, device=device)
        result = timed(lambda model=model, images=images: model.predict(images).anomaly_map, device, "fp32", args.repeats)
        rows.append({"device": device, "categories": categories, "input_size": size, "batch_size": batch_size,
                     **result})
    return rows


def add_ratios(rows: list[dict]) -> None:
    """Speed-up over the official-style path and cost over the backbone floor, for the same device, batch and steps."""
    def key(row: dict, precision: str, path: str) -> tuple:
        return row["device"], precision, row["batch_size"], row.get("ddim_steps"), path

    index = {key(row, row["precision"], row["path"]): row for row in rows}
    for row in rows:
        family = "onenip" if row["path"].startswith("onenip") else "diad"
        official = index.get(key(row, "fp32", f"{family}_official"))
        if official and row["path"] not in {f"{family}_official", "onenip_backbone"}:
            row["speedup_over_official_fp32"] = official["seconds"] / row["seconds"]
        floor = index.get(key(row, row["precision"], "onenip_backbone"))
        if family == "onenip" and floor and row["path"] != "onenip_backbone":
            row["over_backbone"] = row["seconds"] / floor["seconds"]


def print_tables(rows: list[dict], growth: list[dict], machine: str) -> None:
    print(f"Machine: {machine}")
    print("| device | precision | batch | path | ms/image | images/s | peak MB | x official fp32 | x backbone | map diff |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        path = f"{row['path']} ({row['ddim_steps']} steps)" if "ddim_steps" in row else row["path"]
        print(f"| {row['device']} | {row['precision']} | {row['batch_size']} | {path} | "
              f"{1000 * row['seconds'] / row['batch_size']:.1f} | {row['batch_size'] / row['seconds']:.1f} | "
              f"{row['peak_mb']:.0f} | {row.get('speedup_over_official_fp32', float('nan')):.2f} | "
              f"{row.get('over_backbone', float('nan')):.2f} | {row.get('map_difference', float('nan')):.1e} |")
    print("\nOneNIP (prompt bank, fp32) cost growth")
    print("| device | categories | input size | batch | ms/image | peak MB |")
    print("|---|---|---|---|---|---|")
    for row in growth:
        print(f"| {row['device']} | {row['categories']} | {row['input_size']} | {row['batch_size']} | "
              f"{1000 * row['seconds'] / row['batch_size']:.1f} | {row['peak_mb']:.0f} |")


def plot(rows: list[dict], growth: list[dict], path: str) -> None:
    import matplotlib as mpl

    mpl.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    def line(row: dict) -> tuple:
        return row["device"], row["precision"], row["path"], row.get("ddim_steps", 0)

    for device, precision, name, steps in sorted({line(row) for row in rows}):
        points = sorted((row["batch_size"], row["batch_size"] / row["seconds"]) for row in rows
                        if line(row) == (device, precision, name, steps))
        axis = axes[0] if name.startswith("onenip") else axes[1]
        label = f"{name} {device} {precision}" + (f" {steps} steps" if steps else "")
        axis.plot(*zip(*points, strict=True), marker="o", label=label)
    for axis, title in zip(axes[:2], ("OneNIP", "DiAD"), strict=True):
        axis.set(xscale="log", xlabel="batch size", ylabel="images / s", title=f"{title}: throughput")
        axis.legend(fontsize=7)
    for device in sorted({row["device"] for row in growth}):
        points = sorted((row["categories"], 1000 * row["seconds"] / row["batch_size"]) for row in growth
                        if row["device"] == device and row["input_size"] == growth[0]["input_size"])
        axes[2].plot(*zip(*points, strict=True), marker="o", label=f"{device}, {growth[0]['input_size']} px")
    axes[2].set(xscale="log", xlabel="categories in the prompt bank", ylabel="ms / image",
                title="OneNIP: cost against categories")
    axes[2].set_ylim(bottom=0)
    axes[2].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="tf_efficientnet_b4", help="OneNIP's backbone (the paper's: B4)")
    parser.add_argument("--input-size", type=int, default=256)
    parser.add_argument("--categories", type=int, default=15)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--diad-architecture", default="small")
    parser.add_argument("--diad-backbone", default="tf_efficientnet_lite0", help="DiAD's scoring CNN")
    parser.add_argument("--diad-input-size", type=int, default=256)
    parser.add_argument("--diad-layers", type=int, nargs="+", default=[1, 2, 3], help="scoring backbone taps")
    parser.add_argument("--diad-batch-sizes", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--ddim-steps", type=int, nargs="+", default=[10])
    parser.add_argument("--growth-categories", type=int, nargs="+", default=[1, 15, 100])
    parser.add_argument("--growth-sizes", type=int, nargs="+", default=[224, 256, 320])
    parser.add_argument("--devices", nargs="+", default=["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    parser.add_argument("--precisions", nargs="+", choices=["fp32", "bf16", "fp16"],
                        help="default: fp32 bf16 on the CPU, fp32 fp16 bf16 on CUDA")
    parser.add_argument("--compile", choices=["default", "reduce-overhead", "max-autotune"],
                        help="also time the compiled prompt-bank and DiAD paths in this torch.compile mode")
    parser.add_argument("--compile-precisions", nargs="+", choices=["fp32", "bf16", "fp16"],
                        help="the precisions of the compiled paths (each compiles anew; default: --precisions)")
    parser.add_argument("--skip-diad", action="store_true")
    parser.add_argument("--skip-onenip", action="store_true", help="DiAD only (no OneNIP paths, no growth)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="write every measurement to this file")
    parser.add_argument("--plot", help="save the throughput and growth plot to this file (PNG)")
    args = parser.parse_args()
    torch.manual_seed(0)
    machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
               f"{torch.get_num_threads()} torch threads, torch {torch.__version__}")
    if torch.cuda.is_available():
        machine += f", {torch.cuda.get_device_name()}"
    rows, growth = [], []
    for device in args.devices:
        precisions = args.precisions or (["fp32", "fp16", "bf16"] if device == "cuda" else ["fp32", "bf16"])
        if not args.skip_onenip:
            rows += run_onenip(args, device, precisions)
            growth += run_growth(args, device)
        if not args.skip_diad:
            rows += run_diad(args, device, precisions)
    add_ratios(rows)
    print_tables(rows, growth, machine)
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine, "arguments": vars(args), "rows": rows,
                                               "growth": growth}, indent=2))
    if args.plot:
        plot(rows, growth, args.plot)


if __name__ == "__main__":
    main()
