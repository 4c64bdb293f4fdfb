"""Per-category metrics: correct values per category and as the mean, written as JSON, CSV and PNG."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from types import SimpleNamespace

import torch

from anomalib_multiclass import CategoryImageBatch, PerCategoryEvaluator


def _batch(category: str, scores: list[float], labels: list[int]) -> CategoryImageBatch:
    size = len(scores)
    maps = torch.stack([torch.full((8, 8), score) for score in scores])
    masks = torch.stack([torch.full((8, 8), bool(label)) for label in labels])
    return CategoryImageBatch(
        image=torch.zeros(size, 3, 8, 8),
        gt_label=torch.tensor(labels, dtype=torch.bool),
        gt_mask=masks,
        pred_score=torch.tensor(scores),
        anomaly_map=maps,
        category=[category] * size,
    )


def test_metrics_per_category_and_mean(tmp_path: Path) -> None:
    evaluator = PerCategoryEvaluator()
    logged = {}
    evaluator.log = lambda name, value, **_: logged.__setitem__(name, value)  # as Lightning does for model callbacks
    module = SimpleNamespace()
    trainer = SimpleNamespace(default_root_dir=str(tmp_path), is_global_zero=True, barebones=True,
                              callback_metrics={}, logged_metrics={})
    evaluator.on_test_start(trainer, module)
    # "good" separates normal from anomalous perfectly, "bad" ranks them the wrong way round
    mixed = _batch("good", [0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1])
    mixed = CategoryImageBatch.collate([*mixed.items, *_batch("bad", [0.9, 0.8, 0.2, 0.1], [0, 0, 1, 1]).items])
    evaluator.on_test_batch_end(trainer, module, None, mixed, 0)
    evaluator.on_test_epoch_end(trainer, module)

    results = evaluator.results
    assert results["good"]["image_AUROC"] == 1.0
    assert results["bad"]["image_AUROC"] == 0.0
    assert results["mean"]["image_AUROC"] == 0.5
    assert results["good"]["pixel_AUROC"] == 1.0
    assert set(results["good"]) == {"image_AUROC", "image_F1Max", "pixel_AUROC", "pixel_AUPR", "pixel_AUPRO"}
    assert logged["good/image_AUROC"] == 1.0 and logged["mean/image_AUROC"] == 0.5

    assert json.loads((tmp_path / "metrics_per_category.json").read_text()) == results
    rows = list(csv.DictReader((tmp_path / "metrics_per_category.csv").open()))
    assert [row["category"] for row in rows] == ["bad", "good", "mean"]
    assert float(rows[1]["image_AUROC"]) == 1.0
    assert (tmp_path / "metrics_per_category.png").stat().st_size > 1000
