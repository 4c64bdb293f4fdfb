"""Evaluation-side ablations of a trained DiAD: DDIM start and steps, posterior, map constants, on one test set.

    python tests/benchmarks/diad_ablation.py --checkpoint quality/runs/diad_stage2/.../model.ckpt \\
        --root ../shared/data/real_ad --categories bottle juice_bottle kolektor \\
        --variants '{"name": "t_s=500", "noise_timestep": 500}' '{"name": "paper sigma", "sigma": 5.0}'

Each variant changes only how the trained model reconstructs and scores (``noise_timestep``,
``ddim_steps``, ``ddim_schedule``, ``set_alpha_to_one``, ``posterior``, ``sigma``, ``score_pool_size``),
never its weights, and is tested with anomalib's metrics per category (a model trained with
``train_timesteps="sampler"`` saw only its own sampler's timesteps: other steps or starts test it
off its training). The per-category score statistics are kept: standardising is monotone per
category, so per-category metrics do not depend on them. Prints a table of the mean image and
pixel AUROC and writes ``ablation.json`` to ``--output``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from anomalib.engine import Engine
from anomalib.models.components import GaussianBlur2d

from anomalib_diad import DiAD
from anomalib_diad.components import DDIMSampler
from anomalib_multiclass import MultiClassAD

SAMPLER_KEYS = ("ddim_steps", "noise_timestep", "ddim_schedule", "set_alpha_to_one")


def apply_variant(model: DiAD, variant: dict) -> None:
    """Set a variant's evaluation settings on the loaded model (unchanged settings keep the model's)."""
    torch_model = model.model
    sampler = torch_model.sampler
    if any(key in variant for key in SAMPLER_KEYS):
        torch_model.sampler = DDIMSampler(
            variant.get("ddim_steps", sampler.num_steps),
            variant.get("noise_timestep", sampler.noise_timestep),
            variant.get("ddim_schedule", sampler.schedule),
            variant.get("set_alpha_to_one", sampler.set_alpha_to_one),
        ).to(model.device)
    if "posterior" in variant:
        torch_model.posterior = variant["posterior"]
    if "sigma" in variant:
        torch_model.anomaly_map.blur = GaussianBlur2d(sigma=variant["sigma"], channels=1)
    if "score_pool_size" in variant:
        torch_model.anomaly_map.score_pool_size = variant["score_pool_size"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a trained DiAD stage-2 checkpoint")
    parser.add_argument("--root", required=True)
    parser.add_argument("--categories", nargs="+", required=True)
    parser.add_argument("--variants", nargs="+", default=['{"name": "as trained"}'],
                        help="JSON objects, one per variant")
    parser.add_argument("--output", default="diad_ablation")
    args = parser.parse_args()
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    datamodule = MultiClassAD(root=args.root, categories=args.categories, eval_batch_size=16, num_workers=1)
    report = {}
    for variant in map(json.loads, args.variants):
        model = DiAD.load_from_checkpoint(args.checkpoint, pre_trained=False)
        apply_variant(model, variant)
        engine = Engine(default_root_dir=output / "runs", logger=False, enable_progress_bar=False)
        start = time.perf_counter()
        results = engine.test(model=model, datamodule=datamodule, verbose=False)[0]
        report[variant["name"]] = {
            "variant": variant,
            "test_s": time.perf_counter() - start,
            **{f"{category}/{metric}": float(results[f"{category}/{metric}"])
               for category in [*args.categories, "mean"] for metric in ("image_AUROC", "pixel_AUROC")},
        }
        (output / "ablation.json").write_text(json.dumps(report, indent=2))
    print("| variant | " + " | ".join(f"{c} image / pixel AUROC" for c in [*args.categories, "mean"]) + " | test s |")
    print("|---|" + "---|" * (len(args.categories) + 2))
    for name, entry in report.items():
        cells = [f"{100 * entry[f'{c}/image_AUROC']:.1f} / {100 * entry[f'{c}/pixel_AUROC']:.1f}"
                 for c in [*args.categories, "mean"]]
        print(f"| {name} | " + " | ".join(cells) + f" | {entry['test_s']:.0f} |")


if __name__ == "__main__":
    main()
