"""DiAD inference and training-step speed on this machine (random weights; timing does not depend on them).

    python tests/benchmarks/diad_speed.py --architecture small --input-size 256 --batch-sizes 1 8

Prints ms/image of the full evaluation path (encode, noise, ``--ddim-steps`` SG+UNet steps, decode,
feature distance, blur, score) per batch size, and the time of one stage-2 training step.
"""

from __future__ import annotations

import argparse
import json
import platform

import torch
from timing import median_seconds

from anomalib_diad.loss import DiffusionLoss
from anomalib_diad.torch_model import DiADModel


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
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
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
    print(f"stage-2 training step, batch {args.train_batch_size}: {seconds:.2f} s")
    if args.json:
        with open(args.json, "w") as file:
            json.dump(results, file, indent=2)


if __name__ == "__main__":
    main()
