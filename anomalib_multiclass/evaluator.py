"""Per-category evaluation of a unified model with anomalib's metrics.

:class:`PerCategoryEvaluator` is an anomalib :class:`~anomalib.metrics.Evaluator`: it computes and
logs the usual dataset-wide test metrics, and the same metrics for every category found in the
batches' ``category`` field (see :mod:`anomalib_multiclass.batch`). Under DDP the metrics (torchmetrics)
gather every rank's images before computing, so each category's metrics cover its whole test set. At the end of testing it
logs ``<category>/<metric>`` and ``mean/<metric>``, prints a table, and writes
``metrics_per_category.json``, ``metrics_per_category.csv`` and ``metrics_per_category.png`` to
the run directory (``trainer.default_root_dir``, where anomalib saves checkpoints and images).
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from types import SimpleNamespace

import torch
from anomalib.metrics import AUPR, AUPRO, AUROC, AnomalibMetric, Evaluator, F1Max
from lightning.pytorch import LightningModule, Trainer
from rich.console import Console
from rich.table import Table

logger = logging.getLogger(__name__)

METRIC_FIELDS = ("pred_score", "pred_label", "anomaly_map", "pred_mask", "gt_label", "gt_mask")


def default_metrics() -> list[AnomalibMetric]:
    """Image AUROC and F1Max, pixel AUROC, AUPR and AUPRO (the unified-AD benchmark set)."""
    return [
        AUROC(fields=["pred_score", "gt_label"], prefix="image_"),
        F1Max(fields=["pred_score", "gt_label"], prefix="image_"),
        AUROC(fields=["anomaly_map", "gt_mask"], prefix="pixel_", strict=False),
        AUPR(fields=["anomaly_map", "gt_mask"], prefix="pixel_", strict=False),
        AUPRO(fields=["anomaly_map", "gt_mask"], prefix="pixel_", strict=False),
    ]


class PerCategoryEvaluator(Evaluator):
    """anomalib evaluator that also reports every test metric per category and as the category mean.

    Args:
        test_metrics: metrics over the whole test set; also cloned for each category.
            Defaults to :func:`default_metrics`.
        val_metrics: validation metrics (dataset-wide only), as in anomalib's ``Evaluator``.
        compute_on_cpu: as in anomalib's ``Evaluator``.
    """

    def __init__(
        self,
        test_metrics: AnomalibMetric | Sequence[AnomalibMetric] | None = None,
        val_metrics: AnomalibMetric | Sequence[AnomalibMetric] | None = None,
        compute_on_cpu: bool = True,
    ) -> None:
        test_metrics = default_metrics() if test_metrics is None else test_metrics
        super().__init__(val_metrics=val_metrics, test_metrics=test_metrics, compute_on_cpu=compute_on_cpu)
        self._templates = [metric.clone() for metric in self.test_metrics]
        self._category_metrics: dict[str, list[AnomalibMetric]] = {}
        self.results: dict[str, dict[str, float]] = {}

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Start every test run with empty metrics for each category of the test set.

        Under DDP every rank must hold (and so synchronise, in the same order) the metrics of every
        category, also of one whose images all went to another rank: they are created here from the
        test set's categories, which every rank knows.
        """
        del pl_module
        self._category_metrics = {}
        self.results = {}
        test_data = getattr(getattr(trainer, "datamodule", None), "test_data", None)
        for category in getattr(test_data, "categories", []):
            self._category_metrics[category] = self._new_metrics()

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:  # noqa: ANN001
        """Update the dataset-wide metrics, then each category's metrics with its part of the batch."""
        super().on_test_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)
        categories = getattr(batch, "category", None)
        if categories is None:
            return
        for category in sorted(set(categories)):
            index = torch.tensor([name == category for name in categories])
            part = SimpleNamespace(**{field: _select(getattr(batch, field, None), index) for field in METRIC_FIELDS})
            metrics = self._category_metrics.setdefault(category, self._new_metrics())
            for metric in metrics:
                metric.update(part)

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Log dataset-wide and per-category metrics; print and save the per-category table."""
        super().on_test_epoch_end(trainer, pl_module)
        if not self._category_metrics:
            return
        self.results = {
            category: {metric.name: _compute(metric, category) for metric in metrics}
            for category, metrics in sorted(self._category_metrics.items())
        }
        names = list(dict.fromkeys(name for values in self.results.values() for name in values))
        self.results["mean"] = {
            name: float(torch.tensor([values.get(name, float("nan")) for values in self.results.values()]).nanmean())
            for name in names
        }
        for category, values in self.results.items():
            for name, value in values.items():
                self.log(f"{category}/{name}", value)
        if trainer.is_global_zero:
            print_table(self.results)
            save_results(self.results, Path(trainer.default_root_dir))

    def _new_metrics(self) -> list[AnomalibMetric]:
        metrics = [metric.clone() for metric in self._templates]
        for metric in metrics:
            metric.compute_on_cpu = self.compute_on_cpu
        return metrics


def _compute(metric: AnomalibMetric, category: str) -> float:
    """Compute a metric; NaN (with a warning) when the category's test data cannot define it."""
    try:
        return float(metric.compute())
    except (RuntimeError, ValueError) as error:
        logger.warning("%s is undefined for category '%s' (%s); reported as NaN.", metric.name, category, error)
        return float("nan")


def _select(value: torch.Tensor | None, index: torch.Tensor) -> torch.Tensor | None:
    return value[index.to(value.device)] if isinstance(value, torch.Tensor) else None


def print_table(results: dict[str, dict[str, float]], print_fn: Callable[[Table], None] | None = None) -> None:
    """Print the per-category results as a rich table (percent, one row per category, then the mean)."""
    names = list(dict.fromkeys(name for values in results.values() for name in values))
    table = Table(title="Per-category test metrics (%)")
    table.add_column("category")
    for name in names:
        table.add_column(name, justify="right")
    for category, values in results.items():
        cells = [f"{100 * values[name]:.1f}" if name in values else "-" for name in names]
        table.add_row(category, *cells, style="bold" if category == "mean" else None)
    (print_fn or Console().print)(table)


def save_results(results: dict[str, dict[str, float]], directory: Path) -> list[Path]:
    """Write the per-category results as JSON, CSV and a bar chart (PNG) into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    names = list(dict.fromkeys(name for values in results.values() for name in values))
    json_path = directory / "metrics_per_category.json"
    json_path.write_text(json.dumps(results, indent=2))
    csv_path = directory / "metrics_per_category.csv"
    with csv_path.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["category", *names])
        for category, values in results.items():
            writer.writerow([category, *(f"{values[name]:.6f}" if name in values else "" for name in names)])
    plot_path = directory / "metrics_per_category.png"
    plot_results(results, names, plot_path)
    logger.info("Per-category metrics saved to %s, %s and %s", json_path, csv_path, plot_path)
    return [json_path, csv_path, plot_path]


def plot_results(results: dict[str, dict[str, float]], names: list[str], path: Path) -> None:
    """Grouped bar chart: one group per category (and the mean), one bar per metric.

    Drawn on a matplotlib :class:`~matplotlib.figure.Figure` of its own (no pyplot, no global backend
    switch), so the plot changes nothing in the user's matplotlib state.
    """
    from matplotlib.figure import Figure

    categories = list(results)
    width = 0.8 / max(len(names), 1)
    figure = Figure(figsize=(max(6.0, 1.2 * len(categories) * max(len(names), 1) * 0.4), 4.0))
    axis = figure.subplots()
    for offset, name in enumerate(names):
        positions = [index + offset * width for index in range(len(categories))]
        axis.bar(positions, [100 * results[category].get(name, float("nan")) for category in categories], width, label=name)
    axis.set_xticks([index + width * (len(names) - 1) / 2 for index in range(len(categories))], categories, rotation=30)
    axis.set_ylabel("%")
    axis.set_ylim(0, 100)
    axis.legend(fontsize="small", loc="lower right")
    axis.set_title("Per-category test metrics")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
