"""Two-process DDP (gloo, CPU) against one process: fitted constants from given weights, and training runs.

    python tests/benchmarks/ddp_equality.py --root DATA --categories brick grass --output ddp_equality

Trains OneNIP (the tiny test size, 64 px, random backbone weights unless ``--pre-trained``) on
``--categories`` under 2-process DDP (``--batch-size`` per rank) and in one process (twice that batch:
the same global batch), both through ``anomalib train``. Then, from the 2-process run's weights:

- each fitted constant (prompt pool, prompt bank, ``kappa``, per-category score statistics, thresholds
  and normalisation) as every rank held it, against the same constant computed again in one process;
- the per-category test metrics of the 2-process run against one process testing the same weights.

Writes ``ddp_equality.md`` and ``ddp_equality.json`` to ``--output``. Without ``--root`` it builds the
quickstart's texture data (64 px) first.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tests.distributed_support import (  # noqa: E402
    largest_difference,
    refit_in_one_process,
    run_checkpoint,
    run_config,
    run_metrics,
)

ONENIP = (
    "  class_path: anomalib_onenip.OneNIP\n  init_args:\n    backbone: tf_efficientnet_lite0\n    pre_trained: {pre}\n"
    "    input_size: [64, 64]\n    hidden_dim: 32\n    num_heads: 2\n    num_encoder_layers: 1\n"
    "    num_decoder_layers: 1\n    dim_feedforward: 64\n    visualizer: false\n"
)


def _train(config: Path, cwd: Path) -> float:
    """``anomalib train -c config`` in ``cwd``; its wall time in seconds."""
    cwd.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    anomalib = Path(sys.executable).with_name("anomalib")
    start = time.perf_counter()
    subprocess.run([str(anomalib), "train", "-c", str(config)], cwd=cwd, env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    """Run both trainings, refit from the DDP weights, write the tables."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, help="MVTec-layout data (default: build the quickstart textures)")
    parser.add_argument("--categories", nargs="+", default=["brick", "grass"])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4, help="per rank; one process trains with twice this")
    parser.add_argument("--pre-trained", action="store_true", help="Lite0 ImageNet weights (offline package)")
    parser.add_argument("--output", type=Path, default=Path("ddp_equality"))
    parser.add_argument("--reuse-runs", action="store_true", help="keep the trained runs already in --output")
    args = parser.parse_args()
    output = args.output.resolve()
    output.mkdir(parents=True, exist_ok=True)
    root = args.root.resolve() if args.root else None
    if root is None:
        from anomalib_multiclass.quickstart_data import build_quickstart_dataset

        root = build_quickstart_dataset(output / "textures", num_train=8, num_test_good=3, num_test_per_defect=2,
                                        crop_size=64)
    model = ONENIP.format(pre=str(args.pre_trained).lower())
    times = json.loads((output / "wall_times.json").read_text()) if args.reuse_runs else {}
    two, one = output / "two_processes", output / "one_process"
    if not times:
        times["two_processes"] = _train(
            run_config(two / "config.yaml", model, root, args.categories, args.epochs, args.batch_size, 2), two)
        times["one_process"] = _train(
            run_config(one / "config.yaml", model, root, args.categories, args.epochs, 2 * args.batch_size, 1), one)
        (output / "wall_times.json").write_text(json.dumps(times))
    two_time, one_time = times["two_processes"], times["one_process"]

    from anomalib_onenip import OneNIP

    ranks = [torch.load(two / f"fitted_rank{rank}.pt", weights_only=True) for rank in (0, 1)]
    refit, tested = refit_in_one_process(OneNIP, run_checkpoint(two), root, args.categories, args.batch_size,
                                         output / "refit")
    constants = []
    for name, value in ranks[0].items():
        difference, scale = largest_difference(refit[name], value)
        constants.append({"constant": name, "shape": list(value.shape), "ranks_identical": torch.equal(value, ranks[1][name]),
                          "max_abs_difference": difference, "max_abs_value": scale})
    ddp_metrics, single_metrics = run_metrics(two), run_metrics(one)
    metrics = [{"category": category, "metric": metric, "two_processes": value,
                "one_process_same_weights": float(tested[f"{category}/{metric}"]),
                "one_process_trained": single_metrics[category][metric]}
               for category, values in ddp_metrics.items() for metric, value in values.items()]
    report = {"root": str(root), "categories": args.categories, "epochs": args.epochs,
              "batch_per_rank": args.batch_size, "wall_time_s": {"two_processes": two_time, "one_process": one_time},
              "constants": constants, "metrics": metrics}
    (output / "ddp_equality.json").write_text(json.dumps(report, indent=2))
    lines = ["| constant | shape | ranks identical | max abs difference, 1 process vs 2 | max abs value |",
             "|---|---|---|---|---|"]
    lines += [f"| {row['constant']} | {row['shape']} | {'yes' if row['ranks_identical'] else 'NO'} | "
              f"{row['max_abs_difference']:.1e} | {row['max_abs_value']:.3g} |" for row in constants]
    lines += ["", "| category / metric (%) | 2 processes | 1 process, same weights | 1 process, own training (same global batch) |",
              "|---|---|---|---|"]
    lines += [f"| {row['category']} / {row['metric']} | {100 * row['two_processes']:.2f} | "
              f"{100 * row['one_process_same_weights']:.2f} | {100 * row['one_process_trained']:.2f} |" for row in metrics]
    lines += ["", f"Training wall time: 2 processes {two_time:.0f} s, 1 process {one_time:.0f} s."]
    (output / "ddp_equality.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
