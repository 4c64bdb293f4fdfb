"""One command for a machine with a GPU: inference speed, training throughput and a short quality run, one report.

    python tests/benchmarks/gpu.py --root real_ad --categories bottle juice_bottle transistor --output gpu_report

Runs, in this order, as long as ``--budget-s`` (default 450 s) allows (what the budget leaves out is listed as
skipped in the report, never silently dropped):

1. **inference** (``speed.py`` on ``--device``): OneNIP (``--backbone``, 256 px, 15 categories) as the backbone-alone
   floor, the official-style path, the prompt bank and the prompt bank compiled (``--compile``, ``reduce-overhead``:
   CUDA graphs); then the first of ``--diad-architectures`` (``small``; random weights) official-style, ours and
   compiled, at the configuration issue 23's target names (the most ``--ddim-steps``, batch
   ``--diad-target-batch``). Precisions fp32, fp16 and bf16 autocast (fp32 and bf16 on a CPU); compiled in
   ``--compile-precisions`` only (each configuration compiles anew); batch sizes ``--batch-sizes``.
2. **training**: images/s of anomalib's training loop (``Engine.fit`` on ``MultiClassAD`` over ``--root``, the
   loader with ``--num-workers`` workers, synthetic anomalies included) at ``--input-size`` for OneNIP with each of
   ``--train-backbones`` and for DiAD ``--train-diad-architecture`` (``small``) from scratch (stage 2), per
   ``--train-batch-sizes``: Lightning's ``ThroughputMonitor`` over ``--train-steps`` steps after ``--warmup-steps``.
3. **quality**: ``quality.py``'s OneNIP (the model of ``configs/onenip/real_ad_lite0.yaml``) on ``--root`` for
   ``--quality-epochs`` epochs at ``--input-size``.
4. **inference_grid**: the other DiAD architectures (``sd15``: the longest compilation) at the targets' configuration,
   then every architecture's other ``--ddim-steps`` and ``--diad-batch-sizes``.

A script run (speed.py, quality.py) still going when the budget ends is stopped there and listed as such; what
every finished step measured is in the report.

Writes ``gpu.json`` (every measurement, the machine, the arguments, each section's wall time) and ``gpu.md`` (the
tables, and the ratios that issue 23's targets name) to ``--output``; each step's log is in ``--output/logs``.
On a machine without a registry, ``../shared/tools/device-prep.sh`` prepares the wheels, a compact copy of the data
and the Lite0 weights (see docs/results.md, "GPU").
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

BENCHMARKS = Path(__file__).resolve().parent
SAMPLES_PER_S = "train/device/samples_per_sec"


class Budget:
    """Wall-clock budget of the whole command: each step runs only if time is left when it starts, and a script run
    is stopped when the budget ends."""

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds
        self.skipped: list[str] = []

    def remaining(self) -> float:
        return max(0.0, self.end - time.monotonic())

    def allows(self, step: str) -> bool:
        if self.remaining() > 0:
            print(f"[gpu.py] {step}", flush=True)
            return True
        self.skipped.append(step)
        print(f"[gpu.py] skipped, over budget: {step}", flush=True)
        return False

    def run_script(self, step: str, command: list[str], log: Path) -> bool:
        """Run ``command`` with its output in ``log`` until the budget ends; False (the log's tail printed, a stop at
        the budget listed as skipped) when it fails or is stopped."""
        with log.open("w") as file:
            try:
                result = subprocess.run(command, stdout=file, stderr=subprocess.STDOUT, check=False,
                                        timeout=self.remaining())
            except subprocess.TimeoutExpired:
                self.skipped.append(f"{step} (stopped at the budget's end)")
                print(f"[gpu.py] stopped at the budget's end: {step}", flush=True)
                return False
        if result.returncode != 0:
            print(f"[gpu.py] failed ({result.returncode}): {' '.join(command)}\n{log.read_text()[-2000:]}", flush=True)
        return result.returncode == 0


def speed_runs(args: argparse.Namespace, grid: bool) -> list[tuple[str, str, list[str]]]:
    """speed.py runs as (log name, run label, arguments), cheapest first of what the targets need: OneNIP and the first
    DiAD architecture at the targets' configuration (the most ``--ddim-steps``, batch ``--diad-target-batch``); or
    (``grid``) the other architectures at that configuration, then every architecture's other steps and batches."""
    target_steps, target_batch = max(args.ddim_steps), args.diad_target_batch

    def diad_run(architecture: str, steps: int, batches: list[int]) -> tuple[str, str, list[str]]:
        return (f"diad_{architecture}_{steps}_steps_batch_{'_'.join(map(str, batches))}", f"diad_{architecture}",
                ["--skip-onenip", "--diad-architecture", architecture, "--diad-input-size", str(args.diad_input_size),
                 "--diad-backbone", args.diad_backbone, "--diad-batch-sizes", *map(str, batches),
                 "--ddim-steps", str(steps)])

    first, *others = args.diad_architectures
    if not grid:
        onenip = ["--skip-diad", "--backbone", args.backbone, "--input-size", str(args.onenip_input_size),
                  "--categories", str(args.prompt_categories), "--batch-sizes", *map(str, args.batch_sizes),
                  "--growth-categories", "1", str(args.prompt_categories), "100",
                  "--growth-sizes", str(args.onenip_input_size)]
        return [("onenip", "onenip", onenip), diad_run(first, target_steps, [target_batch])]
    rest = [diad_run(architecture, steps, batches) for architecture in args.diad_architectures
            for steps in sorted(args.ddim_steps)
            if (batches := [batch for batch in args.diad_batch_sizes if (steps, batch) != (target_steps, target_batch)])]
    return [diad_run(architecture, target_steps, [target_batch]) for architecture in others] + rest


def inference(args: argparse.Namespace, output: Path, budget: Budget, grid: bool = False) -> list[dict]:
    """speed.py for each of :func:`speed_runs`; the rows of every run that finished."""
    common = ["--devices", args.device, "--repeats", str(args.repeats), "--precisions", *args.precisions]
    if args.compile != "none":
        common += ["--compile", args.compile, "--compile-precisions", *args.compile_precisions]
    rows = []
    for name, run, arguments in speed_runs(args, grid):
        step = f"inference: {name}"
        if not budget.allows(step):
            continue
        report = output / "logs" / f"speed_{name}.json"
        command = [sys.executable, str(BENCHMARKS / "speed.py"), *common, *arguments, "--json", str(report)]
        if budget.run_script(step, command, output / "logs" / f"speed_{name}.log"):
            measured = json.loads(report.read_text())
            rows += [{**row, "run": run} for row in measured["rows"]]
            rows += [{**row, "run": run, "path": "onenip_bank_growth", "precision": "fp32"}
                     for row in measured["growth"]]
    return rows


def inference_grid(args: argparse.Namespace, output: Path, budget: Budget) -> list[dict]:
    return inference(args, output, budget, grid=True)


def training_model(args: argparse.Namespace, name: str, backbone: str) -> Any:  # noqa: ANN401
    """OneNIP as in configs/onenip/real_ad_lite0.yaml, or DiAD (``--train-diad-architecture``) stage 2 from scratch,
    both with random weights, at ``--input-size``."""
    size = (args.input_size, args.input_size)
    if name == "OneNIP":
        from anomalib_onenip import OneNIP

        return OneNIP(backbone=backbone, pre_trained=False, input_size=size, hidden_dim=128, num_encoder_layers=2,
                      num_decoder_layers=2, dim_feedforward=512, refiner_pixel_weight=1.0, refiner_focal_gamma=2.0,
                      lr_schedule="warmup_step", visualizer=False)
    from anomalib_diad import DiAD

    return DiAD(architecture=args.train_diad_architecture, input_size=size, diffusion_weights=None, pre_trained=False,
                backbone=backbone, layers=[1, 2, 3], visualizer=False)


def training_throughput(args: argparse.Namespace, name: str, backbone: str, batch_size: int, work: Path) -> dict:
    """Images/s of ``Engine.fit`` over ``--train-steps`` steps after ``--warmup-steps`` (ThroughputMonitor)."""
    from anomalib.engine import Engine
    from lightning.pytorch.callbacks import ThroughputMonitor
    from lightning.pytorch.loggers import CSVLogger

    from anomalib_multiclass import MultiClassAD

    datamodule = MultiClassAD(root=args.root, categories=args.categories, train_batch_size=batch_size,
                              eval_batch_size=batch_size, num_workers=args.num_workers)
    model = training_model(args, name, backbone)
    logger = CSVLogger(work, name=f"{name}_{backbone}_{batch_size}")
    monitor = ThroughputMonitor(batch_size_fn=lambda batch: len(batch.image), window_size=args.train_steps + 1)
    engine = Engine(accelerator=args.device, devices=1, max_steps=args.warmup_steps + args.train_steps + 1,
                    limit_val_batches=0, num_sanity_val_steps=0, logger=logger, log_every_n_steps=1,
                    callbacks=[monitor], enable_progress_bar=False,
                    precision=args.train_precision, default_root_dir=work)
    start = time.perf_counter()
    engine.fit(model=model, datamodule=datamodule)
    wall = time.perf_counter() - start
    with (Path(logger.log_dir) / "metrics.csv").open() as file:
        values = [float(row[SAMPLES_PER_S]) for row in csv.DictReader(file) if row.get(SAMPLES_PER_S)]
    del model, engine
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return {"model": name, "backbone": backbone, "batch_size": batch_size, "input_size": args.input_size,
            "precision": args.train_precision, "num_workers": args.num_workers,
            "images_per_s": values[-1] if values else float("nan"), "fit_wall_s": wall}


def training(args: argparse.Namespace, output: Path, budget: Budget) -> list[dict]:
    runs = [("OneNIP", backbone) for backbone in args.train_backbones] + [("DiAD", args.diad_backbone)]
    rows = []
    for name, backbone in runs:
        for batch_size in args.train_batch_sizes:
            if budget.allows(f"training: {name} {backbone} batch {batch_size}"):
                rows.append(training_throughput(args, name, backbone, batch_size, output / "logs" / "training"))
    return rows


def quality(args: argparse.Namespace, output: Path, budget: Budget) -> dict:
    if not budget.allows(f"quality: OneNIP {args.quality_epochs} epochs"):
        return {}
    target = output / "quality"
    command = [sys.executable, str(BENCHMARKS / "quality.py"), "--root", args.root, "--categories", *args.categories,
               "--input-size", str(args.input_size), "--onenip-epochs", str(args.quality_epochs), "--models", "OneNIP",
               "--num-workers", str(args.num_workers), "--output", str(target)]
    if args.quality_options:
        command += ["--onenip-options", args.quality_options]
    if args.weights_path:
        command += ["--weights-path", args.weights_path]
    if not budget.run_script("quality", command, output / "logs" / "quality.log"):
        return {}
    return json.loads((target / "quality.json").read_text())["models"]["OneNIP"]


def targets(rows: list[dict]) -> list[str]:
    """Issue 23's target ratios from the inference rows (the fastest precision of each path)."""

    def seconds(path: str, batch: int, precision: str | None = None, steps: int | None = None,
                run: str | None = None) -> float | None:
        found = [row["seconds"] / row["batch_size"] for row in rows
                 if row["path"] == path and row["batch_size"] == batch and precision in (None, row["precision"])
                 and row.get("ddim_steps") == steps and run in (None, row["run"])]
        return min(found) if found else None

    lines = []
    largest = max((row["batch_size"] for row in rows if row["path"] == "onenip_bank"), default=None)
    official = floor = bank = None
    if largest is not None:
        official = seconds("onenip_official", largest, "fp32")
        floor = seconds("onenip_backbone", largest, "fp32")
        bank = min(filter(None, [seconds("onenip_bank", largest), seconds("onenip_bank_compiled", largest)]),
                   default=None)
    if largest is not None and official and floor and bank:
        lines.append(f"OneNIP batch {largest}: prompt bank (fastest of eager/compiled, any precision) is "
                     f"{official / bank:.2f}x the official-style fp32 path (target >= 2) and "
                     f"{bank / floor:.2f}x the backbone-alone fp32 floor (target <= 1.2)")
    single = min(filter(None, [seconds("onenip_bank", 1), seconds("onenip_bank_compiled", 1)]), default=None)
    if single is not None:
        lines.append(f"OneNIP batch 1: {1000 * single:.2f} ms/image (target <= 7.7, half of 15.4 ms)")
    for run in sorted({row["run"] for row in rows if row["run"].startswith("diad")}):
        for steps in sorted({row["ddim_steps"] for row in rows if row["run"] == run}):
            for batch in sorted({row["batch_size"] for row in rows if row["run"] == run}):
                official = seconds("diad_official", batch, "fp32", steps, run)
                ours = min(filter(None, [seconds("diad", batch, None, steps, run),
                                         seconds("diad_compiled", batch, None, steps, run)]), default=None)
                if official and ours:
                    lines.append(f"{run}, {steps} steps, batch {batch}: ours (fastest) {1000 * ours:.2f} ms/image, "
                                 f"{official / ours:.2f}x the official-style fp32 path (target >= 3 at batch 16)")
    return lines


def markdown(report: dict) -> str:
    lines = [f"# GPU benchmark\n\nMachine: {report['machine']}. Wall time {report['wall_s']:.0f} s.\n"]
    if report["skipped"]:
        budget = report["arguments"]["budget_s"]
        lines.append(f"Skipped (over the {budget:.0f} s budget): {', '.join(report['skipped'])}\n")
    lines += ["## Targets\n", *[f"- {line}" for line in report["targets"]], "",
              "## Inference (random weights)\n",
              "| run | path | steps | precision | batch | ms/image | images/s | peak MB | x official fp32 | x backbone "
              "| map diff |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in report["inference"]:
        if row["path"] == "onenip_bank_growth":
            continue
        lines.append(f"| {row['run']} | {row['path']} | {row.get('ddim_steps', '')} | {row['precision']} | "
                     f"{row['batch_size']} | {1000 * row['seconds'] / row['batch_size']:.2f} | "
                     f"{row['batch_size'] / row['seconds']:.0f} | {row['peak_mb']:.0f} | "
                     f"{row.get('speedup_over_official_fp32', float('nan')):.2f} | "
                     f"{row.get('over_backbone', float('nan')):.2f} | {row.get('map_difference', float('nan')):.1e} |")
    lines += ["", "## Training throughput (data loading on)\n",
              "| model | backbone | input | batch | precision | loader workers | images/s | fit wall s |",
              "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {row['model']} | {row['backbone']} | {row['input_size']} | {row['batch_size']} | "
              f"{row['precision']} | {row['num_workers']} | {row['images_per_s']:.1f} | {row['fit_wall_s']:.0f} |"
              for row in report["training"]]
    quality_rows = report["quality"].get("per_category", {})
    if quality_rows:
        metrics = list(next(iter(quality_rows.values())))
        lines += ["", f"## Quality: OneNIP, {report['arguments']['quality_epochs']} epochs "
                      f"(wall {report['quality'].get('wall_s', float('nan')):.0f} s)\n",
                  "| category | " + " | ".join(metrics) + " |", "|---|" + "---|" * len(metrics)]
        lines += [f"| {category} | " + " | ".join(f"{100 * values[metric]:.1f}" for metric in metrics) + " |"
                  for category, values in quality_rows.items()]
    return "\n".join(lines) + "\n"


SECTIONS = {"inference": inference, "training": training, "quality": quality, "inference_grid": inference_grid}


def main() -> None:
    gpu = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", required=True, help="data root in MVTec layout")
    parser.add_argument("--categories", nargs="+", required=True)
    parser.add_argument("--output", default="gpu_report")
    parser.add_argument("--device", default="cuda" if gpu else "cpu", choices=["cuda", "cpu"])
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=list(SECTIONS))
    parser.add_argument("--budget-s", type=float, default=450.0, help="skip the steps that would start after this")
    parser.add_argument("--backbone", default="tf_efficientnet_b4", help="OneNIP's backbone for inference")
    parser.add_argument("--onenip-input-size", type=int, default=256)
    parser.add_argument("--prompt-categories", type=int, default=15, help="categories in the inference prompt bank")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--precisions", nargs="+", default=["fp32", "fp16", "bf16"] if gpu else ["fp32", "bf16"])
    parser.add_argument("--compile", default="reduce-overhead" if gpu else "none",
                        choices=["none", "default", "reduce-overhead", "max-autotune"])
    parser.add_argument("--compile-precisions", nargs="+", default=["fp32", "bf16"],
                        help="precisions of the compiled paths (fp32: the equality check; each one compiles anew)")
    parser.add_argument("--diad-architectures", nargs="+", default=["small", "sd15"])
    parser.add_argument("--diad-input-size", type=int, default=256)
    parser.add_argument("--diad-backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--diad-batch-sizes", type=int, nargs="+", default=[1, 16, 32])
    parser.add_argument("--ddim-steps", type=int, nargs="+", default=[1, 2, 10])
    parser.add_argument("--diad-target-batch", type=int, default=16, help="DiAD's batch in the inference section")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--input-size", type=int, default=256, help="training and quality input size")
    parser.add_argument("--train-backbones", nargs="+", default=["tf_efficientnet_lite0", "tf_efficientnet_b4"])
    parser.add_argument("--train-diad-architecture", default="small")
    parser.add_argument("--train-batch-sizes", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--train-steps", type=int, default=20)
    parser.add_argument("--warmup-steps", type=int, default=5)
    parser.add_argument("--train-precision", default="32-true", help="Lightning precision, e.g. bf16-mixed")
    parser.add_argument("--num-workers", type=int, default=min(8, os.cpu_count() or 1))
    parser.add_argument("--quality-epochs", type=int, default=3)
    parser.add_argument("--weights-path", default=None, help="local Lite0 weights for the quality run (offline)")
    parser.add_argument("--quality-options", default=None, help="--onenip-options for the quality run (JSON)")
    args = parser.parse_args()
    output = Path(args.output)
    (output / "logs").mkdir(parents=True, exist_ok=True)
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}"
    if gpu:
        machine += f", {torch.cuda.get_device_name()}, CUDA {torch.version.cuda}"
    start = time.perf_counter()
    budget = Budget(args.budget_s)
    report: dict[str, Any] = {"machine": machine, "arguments": vars(args), "wall_s_by_section": {}}
    for section, function in SECTIONS.items():
        section_start = time.perf_counter()
        if section not in args.sections:
            report[section] = {} if section == "quality" else []
            continue
        report[section] = function(args, output, budget)
        report["wall_s_by_section"][section] = time.perf_counter() - section_start
        (output / "gpu.json").write_text(json.dumps(report, indent=2))  # what finished survives an interruption
    report["inference"] += report.pop("inference_grid")
    report.update(targets=targets(report["inference"]), skipped=budget.skipped, wall_s=time.perf_counter() - start)
    (output / "gpu.json").write_text(json.dumps(report, indent=2))
    (output / "gpu.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
