"""Adding a category to a trained OneNIP, leave-one-category-out, against the alternatives, in one run.

    python tests/benchmarks/new_category.py --root ../shared/data/real_ad \\
        --categories bottle juice_bottle kolektor --output bench_out/new_category

For each held-out category ``c`` of ``--categories``: one unified OneNIP is trained on the others
(``quality.py``'s OneNIP: Lite0, 128 px, ``--epochs``), then ``c`` is added to it

- without training (:meth:`OneNIP.add_category`) from 1, 5, 20 and all of ``c``'s normal training
  images (evenly spaced in the sorted list), and
- with the short adaptation (:func:`adapt_to_new_category`, ``--adapt-epochs``) from all of them,
  replaying the other categories; the other categories' metrics before and after it show what is forgotten.

On ``c``'s test set these are compared with a unified OneNIP trained on all categories from the start,
and with anomalib's PatchCore and PaDiM trained on ``c`` alone (``quality.py``'s settings; ``--baselines``
takes all three from a ``quality.json`` of the same categories instead of training them again). Every entry
records its wall time (training, or adding). Writes ``new_category.json``, ``new_category.md`` and
``new_category.png`` (image AUROC and pixel AUPRO against the number of images) to ``--output``; a rerun
with the same settings keeps what ``new_category.json`` holds and measures the rest.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import seed_everything

sys.path.insert(0, str(Path(__file__).parent))
from quality import (  # noqa: E402
    _datamodule,
    _fit_and_test,
    _per_category,
    add_data_and_backbone_arguments,
    onenip_model,
    run_per_category,
)

from anomalib_onenip import OneNIP  # noqa: E402
from anomalib_onenip.new_category import adapt_to_new_category  # noqa: E402


def _test(model: OneNIP, args: argparse.Namespace, categories: list[str], work: Path) -> dict[str, dict[str, float]]:
    """Per-category metrics of ``model`` on the test sets of ``categories`` (each sample with its category)."""
    from anomalib.engine import Engine

    engine = Engine(default_root_dir=work, logger=False)
    return _per_category(engine.test(model=model, datamodule=_datamodule(args, categories))[0], categories)


def _subset(paths: list[Path], count: int) -> list[Path]:
    """``count`` of ``paths``, evenly spaced (all of them when ``count`` is at least their number)."""
    if count >= len(paths):
        return paths
    step = len(paths) / count
    return [paths[int(index * step)] for index in range(count)]


def held_out(args: argparse.Namespace, category: str, work: Path) -> dict[str, Any]:
    """Train without ``category``, add it (no training, per image count; then with adaptation), evaluate."""
    others = [name for name in args.categories if name != category]
    seed_everything(args.seed)
    start = time.perf_counter()
    results, engine = _fit_and_test(onenip_model(args), _datamodule(args, others), args.epochs, work / "base")
    entry: dict[str, Any] = {"train_without_s": time.perf_counter() - start, "added": {}}
    entry["others_before"] = _per_category(results, others)
    checkpoint = work / "without.ckpt"
    engine.trainer.save_checkpoint(checkpoint)
    images = sorted((Path(args.root) / category / "train" / "good").iterdir())
    for count in [*args.image_counts, len(images)]:
        if count > len(images) or str(count) in entry["added"]:
            continue
        model = OneNIP.load_from_checkpoint(checkpoint, map_location="cpu")
        start = time.perf_counter()
        model.add_category(category, _subset(images, count))
        add_s = time.perf_counter() - start
        entry["added"][str(count)] = {"wall_s": add_s, **_test(model, args, [category], work / "test")[category]}
        print(f"{category}: added from {count} images: {entry['added'][str(count)]}", flush=True)
    model = OneNIP.load_from_checkpoint(checkpoint, map_location="cpu")
    model.add_category(category, images)
    seed_everything(args.seed)
    start = time.perf_counter()
    replay = _datamodule(args, others)
    adapt_to_new_category(model, category, images, replay, epochs=args.adapt_epochs, accelerator="cpu")
    entry["adapt_s"] = time.perf_counter() - start
    adapted = _test(model, args, args.categories, work / "test")
    entry["adapted"] = adapted[category]
    entry["others_after"] = {name: adapted[name] for name in others}
    print(f"{category}: adapted: {entry['adapted']}", flush=True)
    return entry


def baselines(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """The unified OneNIP trained on every category, and PatchCore and PaDiM per category, with wall times."""
    seed_everything(args.seed)
    start = time.perf_counter()
    results, _ = _fit_and_test(onenip_model(args), _datamodule(args, args.categories), args.epochs, work / "unified")
    report = {"unified": {"wall_s": time.perf_counter() - start, "per_category": _per_category(results, args.categories)}}
    for name, runner in (("PatchCore", "patchcore"), ("PaDiM", "padim")):
        seed_everything(args.seed)
        start = time.perf_counter()
        report[name] = {"per_category": run_per_category(args, work, runner)}
        report[name]["wall_s_per_category"] = (time.perf_counter() - start) / len(args.categories)
    return report


def stored_baselines(path: Path, categories: list[str]) -> dict[str, Any]:
    """The unified OneNIP, PatchCore and PaDiM rows of a ``quality.py`` report of ``categories``."""
    models = json.loads(path.read_text())["models"]
    report = {}
    for name, key in (("unified", "OneNIP"), ("PatchCore", "PatchCore"), ("PaDiM", "PaDiM")):
        per_category = models[key]["per_category"]
        missing = sorted(set(categories) - set(per_category))
        if missing:
            msg = f"{path} has no {key} results for {missing}: run quality.py on every category of --categories."
            raise ValueError(msg)
        report[name] = {"per_category": {category: per_category[category] for category in categories}}
        if name == "unified":
            report[name]["wall_s"] = models[key]["wall_s"]
        else:
            report[name]["wall_s_per_category"] = models[key]["wall_s"] / len(per_category)
    return report


def markdown(report: dict[str, Any]) -> str:
    columns = ["image_AUROC", "pixel_AUROC", "pixel_AUPR", "pixel_AUPRO"]
    lines = [f"Machine: {report['machine']}. Settings: {json.dumps(report['settings'])}", "",
             "| held-out category | model | " + " | ".join(columns) + " | wall s |", "|---|---|" + "---|" * (len(columns) + 1)]
    base = report["baselines"]
    for category, entry in report["held_out"].items():
        rows = [(f"added, no training, {count} images", values, values["wall_s"]) for count, values in entry["added"].items()]
        rows.append((f"added, {report['settings']['adapt_epochs']} epochs adaptation", entry["adapted"], entry["adapt_s"]))
        rows.append(("unified, trained with it", base["unified"]["per_category"][category], base["unified"]["wall_s"]))
        rows += [(f"{name} on it alone", base[name]["per_category"][category], base[name]["wall_s_per_category"])
                 for name in ("PatchCore", "PaDiM")]
        for label, values, wall in rows:
            cells = [f"{100 * values[metric]:.1f}" for metric in columns]
            lines.append(f"| {category} | {label} | " + " | ".join(cells) + f" | {wall:.0f} |")
    lines += ["", "Forgetting: the other categories' metrics before and after the adaptation (image AUROC / pixel AUPRO).",
              "", "| held-out | other category | before | after |", "|---|---|---|---|"]
    for category, entry in report["held_out"].items():
        for name, before in entry["others_before"].items():
            after = entry["others_after"][name]
            lines.append(f"| {category} | {name} | {100 * before['image_AUROC']:.1f} / {100 * before['pixel_AUPRO']:.1f} "
                         f"| {100 * after['image_AUROC']:.1f} / {100 * after['pixel_AUPRO']:.1f} |")
    lines += ["", "Training without the held-out category took (s): "
              + ", ".join(f"{category} {entry['train_without_s']:.0f}" for category, entry in report["held_out"].items())]
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib as mpl

    mpl.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    labels = [*map(str, report["settings"]["image_counts"]), "all"]
    for axis, metric in zip(axes, ("image_AUROC", "pixel_AUPRO"), strict=True):
        for index, (category, entry) in enumerate(report["held_out"].items()):
            values = list(entry["added"].values())  # the image counts in order, "all" last
            color = f"C{index}"
            axis.plot(range(len(values)), [value[metric] for value in values], "o-", color=color,
                      label=f"{category}: added, no training")
            axis.plot([len(labels) - 1], [entry["adapted"][metric]], "*", markersize=12, color=color,
                      label=f"{category}: added, {report['settings']['adapt_epochs']} epochs adaptation")
            axis.axhline(report["baselines"]["unified"]["per_category"][category][metric], color=color, linestyle="--",
                         label=f"{category}: unified, trained with it")
            axis.axhline(report["baselines"]["PatchCore"]["per_category"][category][metric], color=color, linestyle=":",
                         label=f"{category}: PatchCore on it alone")
        axis.set_xticks(range(len(labels)), labels)
        axis.set_xlabel("normal images of the new category")
        axis.set_title(metric)
        axis.set_ylim(0, 1)
    axes[0].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_and_backbone_arguments(parser)
    parser.add_argument("--epochs", type=int, default=3, help="OneNIP training epochs")
    parser.add_argument("--adapt-epochs", type=int, default=2)
    parser.add_argument("--image-counts", type=int, nargs="+", default=[1, 5, 20])
    parser.add_argument("--onenip-options", default="{}", help="further OneNIP arguments as JSON")
    parser.add_argument("--held-out", nargs="+", default=None, help="categories to hold out (default: each of them)")
    parser.add_argument("--baselines", default=None,
                        help="quality.json of --categories: its OneNIP, PatchCore and PaDiM rows instead of new runs")
    parser.add_argument("--num-workers", type=int, default=1)
    parser.add_argument("--seed", type=int, default=133)
    parser.add_argument("--output", default="new_category", help="folder for new_category.json, .md and .png")
    args = parser.parse_args()
    args.onenip_options = json.dumps({"visualizer": False, **json.loads(args.onenip_options)})
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
                   f"{torch.get_num_threads()} threads",
        "settings": {key: value for key, value in vars(args).items() if key != "output"},
        "held_out": {},
    }
    previous = output / "new_category.json"
    if previous.is_file() and json.loads(previous.read_text()).get("settings") == report["settings"]:
        # an interrupted run with the same settings: keep what it measured
        stored = json.loads(previous.read_text())
        report["baselines"], report["held_out"] = stored["baselines"], stored["held_out"]
    else:
        report["baselines"] = (stored_baselines(Path(args.baselines), args.categories) if args.baselines
                               else baselines(args, output / "runs"))
        previous.write_text(json.dumps(report, indent=2))
    for category in args.held_out or args.categories:
        if category in report["held_out"]:
            continue
        report["held_out"][category] = held_out(args, category, output / "runs" / category)
        (output / "new_category.json").write_text(json.dumps(report, indent=2))
    (output / "new_category.md").write_text(markdown(report))
    print(markdown(report))
    plot(report, output / "new_category.png")


if __name__ == "__main__":
    main()
