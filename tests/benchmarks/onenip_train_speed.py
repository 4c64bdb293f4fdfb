"""OneNIP training throughput, split into its phases, to see where a training step spends its time.

    python tests/benchmarks/onenip_train_speed.py --root ../shared/data/real_ad --categories bottle --steps 10

Runs ``--steps`` training steps of the anomalib module (Lite0 backbone, 256 px, a transformer of
half the paper's size; random weights: timing does not depend on them) on batches of the real
training images, and reports images/s with the time of each phase: loading a batch, pre-processing,
synthetic anomalies, the prompt draw, forward with loss, and backward with the optimiser step.
``--profile`` also prints torch.profiler's top operators.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

import torch

from anomalib_multiclass import MultiClassAD
from anomalib_onenip import OneNIP


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", required=True)
    parser.add_argument("--categories", nargs="+", required=True)
    parser.add_argument("--input-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.manual_seed(0)
    datamodule = MultiClassAD(root=args.root, categories=args.categories, train_batch_size=args.batch_size,
                              num_workers=args.num_workers)
    datamodule.setup()
    model = OneNIP(backbone="tf_efficientnet_lite0", pre_trained=False, input_size=(args.input_size,) * 2,
                   hidden_dim=128, num_encoder_layers=2, num_decoder_layers=2, dim_feedforward=512, visualizer=False)
    loader = datamodule.train_dataloader()
    model._prompt_features = model._cache_prompt_features(loader)  # noqa: SLF001  (what on_train_start does)
    optimizer = model.configure_optimizers()["optimizer"]
    model.train()
    mean, std = model._normalization()  # noqa: SLF001
    phases: dict[str, float] = defaultdict(float)

    def clock(name: str, start: float) -> float:
        now = time.perf_counter()
        phases[name] += now - start
        return now

    profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) if args.profile else None
    if profiler:
        profiler.start()
    images_seen, step = 0, 0
    total_start = time.perf_counter()
    while step < args.steps:
        iterator = iter(loader)
        while step < args.steps:
            start = time.perf_counter()
            try:
                batch = next(iterator)
            except StopIteration:
                break
            start = clock("load batch", start)
            images = model._pre_process(batch.image)  # noqa: SLF001
            start = clock("pre-process", start)
            anomalous, masks = model.anomaly_generator(images * std + mean)
            anomalous = (anomalous - mean) / std
            start = clock("synthetic anomalies", start)
            prompts = model._random_prompt_features(list(batch.category))  # noqa: SLF001
            start = clock("prompt draw", start)
            output = model.model(images, anomalous_images=anomalous, prompt_features=prompts)
            losses = model.loss(output.reconstruction, output.target, output.refiner_logits,
                                torch.cat([torch.zeros_like(masks), masks]))
            start = clock("forward + loss", start)
            optimizer.zero_grad()
            losses["loss"].backward()
            optimizer.step()
            clock("backward + step", start)
            images_seen += len(images)
            step += 1
    total = time.perf_counter() - total_start
    if profiler:
        profiler.stop()
        print(profiler.key_averages().table(sort_by="cpu_time_total", row_limit=25))
    print(f"OneNIP training, {args.input_size} px, batch {args.batch_size}, {args.steps} steps, "
          f"{torch.get_num_threads()} threads: {images_seen / total:.2f} images/s")
    print("| phase | s per step | share |")
    print("|---|---|---|")
    for name, seconds in phases.items():
        print(f"| {name} | {seconds / args.steps:.3f} | {100 * seconds / total:.0f}% |")
    if args.json:
        Path(args.json).write_text(json.dumps({"images_per_s": images_seen / total, "phases_s": dict(phases),
                                               "steps": args.steps, "batch_size": args.batch_size}, indent=2))


if __name__ == "__main__":
    main()
