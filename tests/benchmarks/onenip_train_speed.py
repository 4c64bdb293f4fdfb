"""OneNIP training throughput, split into its phases, to see where a training step spends its time.

    python tests/benchmarks/onenip_train_speed.py --root ../shared/data/real_ad --categories bottle --steps 10

Runs ``--steps`` training steps of the anomalib module (``--backbone``, 256 px, a transformer of
half the paper's size; random weights: timing does not depend on them) on batches of the real
training images, and reports images/s with the time of each phase: loading a batch, pre-processing,
the training step (synthetic anomalies, prompt draw, forward, loss), and backward with the optimiser
step. ``--profile`` also prints torch.profiler's top operators.
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
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--input-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--reuse-cached-query-features", type=int, choices=[0, 1], default=1,
                        help="1: normal images' features from the cache (default); 0: the backbone runs on them")
    parser.add_argument("--bf16", action="store_true",
                        help="bfloat16 autocast for the step's forward and loss (what Lightning's bf16-mixed does on a CPU)")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.manual_seed(0)
    datamodule = MultiClassAD(root=args.root, categories=args.categories, train_batch_size=args.batch_size,
                              num_workers=args.num_workers)
    datamodule.setup()
    model = OneNIP(backbone=args.backbone, pre_trained=False, input_size=(args.input_size,) * 2,
                   hidden_dim=128, num_encoder_layers=2, num_decoder_layers=2, dim_feedforward=512, visualizer=False)
    loader = datamodule.train_dataloader()
    model.cache_training_features(loader, reuse_for_queries=args.reuse_cached_query_features)  # as on_train_start
    optimizer = model.configure_optimizers()["optimizer"]
    model.train()
    model.model.feature_extractor.eval()  # as on_train_start leaves it
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
            batch = batch.update(image=model._pre_process(batch.image))  # noqa: SLF001
            start = clock("pre-process", start)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
                loss = model.training_step(batch)["loss"]
            start = clock("training step (anomalies, prompts, forward, loss)", start)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            clock("backward + step", start)
            images_seen += len(batch.image)
            step += 1
    total = time.perf_counter() - total_start
    if profiler:
        profiler.stop()
        print(profiler.key_averages().table(sort_by="cpu_time_total", row_limit=25))
    print(f"OneNIP training, {args.input_size} px, batch {args.batch_size}, {args.steps} steps, "
          f"{'bf16 autocast' if args.bf16 else 'float32'}, "
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
