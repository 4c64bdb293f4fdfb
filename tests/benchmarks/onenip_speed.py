"""OneNIP inference speed against its backbone alone (the floor), on this machine.

    python tests/benchmarks/onenip_speed.py --backbone tf_efficientnet_lite0 --input-size 256 --batch-sizes 1 32

Weights are random (timing does not depend on them); the prompt bank holds ``--categories`` prompts.
Prints ms/image and images/s per batch size and the ratio to the backbone, and writes JSON with ``--json``.
"""

from __future__ import annotations

import argparse
import json
import platform

import torch
from timing import median_seconds

from anomalib_onenip.torch_model import OneNIPModel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--input-size", type=int, default=256)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--categories", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    size = (args.input_size, args.input_size)
    model = OneNIPModel(backbone=args.backbone, input_size=size).eval()
    with torch.no_grad():
        prompt_features = model.extract_features(torch.rand(args.categories, 3, *size))
        model.prompt_bank.store(
            model.encode_prompts(prompt_features), model.global_features(prompt_features), torch.arange(args.categories)
        )
        model.prompt_bank.store_score_statistics(torch.zeros(args.categories), torch.ones(args.categories))

    rows = []
    for batch_size in args.batch_sizes:
        images = torch.rand(batch_size, 3, *size)
        with torch.inference_mode():
            backbone = median_seconds(lambda: model.extract_features(images), args.repeats)  # noqa: B023
            onenip = median_seconds(lambda: model(images), args.repeats)  # noqa: B023
        rows.append({
            "batch_size": batch_size,
            "backbone_ms_per_image": 1000 * backbone / batch_size,
            "onenip_ms_per_image": 1000 * onenip / batch_size,
            "onenip_images_per_s": batch_size / onenip,
            "onenip_over_backbone": onenip / backbone,
        })
    machine = f"{platform.processor() or platform.machine()}, {args.threads} threads, torch {torch.__version__}"
    print(f"OneNIP inference, {args.backbone}, {args.input_size} px, {args.categories} prompts, CPU ({machine})")
    print("| batch | backbone ms/img | OneNIP ms/img | OneNIP img/s | OneNIP / backbone |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['batch_size']} | {row['backbone_ms_per_image']:.1f} | {row['onenip_ms_per_image']:.1f} | "
              f"{row['onenip_images_per_s']:.1f} | {row['onenip_over_backbone']:.2f} |")
    if args.json:
        with open(args.json, "w") as file:
            json.dump({"machine": machine, "backbone": args.backbone, "input_size": args.input_size, "rows": rows}, file, indent=2)


if __name__ == "__main__":
    main()
