"""Image-score study of one trained OneNIP or DiAD, with every choice judged leave-one-category-out.

    python tests/benchmarks/detection.py --checkpoint quality/runs/onenip/onenip.ckpt \\
        --root ../shared/data/real_ad --categories bottle juice_bottle kolektor magnetic_tile transistor \\
        --baselines quality/quality.json --output detection

No retraining: the trained model runs once over every normal training image and every test image of each
category (with the category's prompt), and the study keeps its maps (OneNIP: the reconstruction map ``R`` and the
scaled refiner map ``kappa_c * S``; DiAD: its feature-distance map) and its frozen backbone's features. From them
it builds candidate image scores:

- **map rules** on ``A = lambda * R + (1 - lambda) * kappa_c * S`` (OneNIP, ``lambda`` in 0 .. 1) or DiAD's map,
  optionally standardised per position by the category's normal training maps (mean / std, or median / MAD):
  the maximum after an average pooling whose window is a fraction of the input size, the mean of the top
  ``k`` % of pixels, the maximum after a Gaussian smoothing;
- **backbone evidence** from the model's own frozen backbone: the distance of the image's global feature to its
  nearest normal training image of the category (``global``), and the PatchCore-style nearest-neighbour
  distance of its patch features to a random memory of the category's normal training patches, maximised over
  the image (``patch_knn``: the model's stride-16 features, or the last two taps at the finer stride, each
  3 x 3 averaged, ``patch_knn_fine``);
- **combinations** of a map rule with evidence: a weighted sum of the scores (with one patch evidence, or the
  equal-weight sum with a patch evidence and the global one), each standardised per category by
  the mean and standard deviation of its normal *training* images (a training image is scored against a memory
  without its own patches and a global set without itself).

No test label builds any score. Every candidate is measured per category (image AUROC and F1Max). The choice is
made **leave one category out**: for each category, the candidate with the best mean image AUROC over the other
categories is evaluated on it; the mean of those is the headline. The same protocol runs within families of
candidates (map rules only, evidence only, ...), one of which is what the models' ``patch_score_weight`` option
expresses: the model's own image score, the ``patch_knn_fine`` evidence, or their weighted sum. Writes
``detection.json``, ``candidates.json``, ``detection.md`` and ``detection.png`` to ``--output``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from anomalib.data.transforms.utils import extract_transforms_by_type
from anomalib.models.components import GaussianBlur2d
from torch.nn import functional as F  # noqa: N812
from torchmetrics.functional.classification import binary_auroc, binary_precision_recall_curve
from torchvision.transforms.v2 import Resize

from anomalib_multiclass import MultiClassAD
from anomalib_multiclass.multiclass_module import training_images_in_order
from anomalib_multiclass.patch_memory import leave_own_image_out_scores, nearest_distances, patch_descriptors

POOL_FRACTIONS = (1 / 64, 1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2)
TOP_FRACTIONS = (0.001, 0.01, 0.05)
SMOOTH_FRACTIONS = (1 / 64, 1 / 32)
POSITION_STANDARDISATIONS = ("none", "position_z", "position_robust")
COMBINATION_WEIGHTS = (0.25, 0.5, 0.75)
MEMORY_SIZES = (1024, 4096, 16384)


@dataclass
class CategoryOutputs:
    """Everything the study keeps of one category: per image, maps ``[n, H, W]`` and backbone features."""

    maps: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    global_features: list[torch.Tensor] = field(default_factory=list)
    patches: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    labels: list[torch.Tensor] = field(default_factory=list)
    model_scores: list[torch.Tensor] = field(default_factory=list)

    def add(self, maps: dict[str, torch.Tensor], global_features: torch.Tensor, patches: dict[str, torch.Tensor],
            labels: torch.Tensor, model_scores: torch.Tensor) -> None:
        for name, value in maps.items():
            self.maps.setdefault(name, []).append(value.cpu().half())
        for name, value in patches.items():
            self.patches.setdefault(name, []).append(value.cpu())
        self.global_features.append(global_features.cpu())
        self.labels.append(labels.cpu())
        self.model_scores.append(model_scores.cpu())

    def stacked(self) -> dict[str, Any]:
        return {
            "maps": {name: torch.cat(values).float() for name, values in self.maps.items()},
            "global": torch.cat(self.global_features),
            "patches": {name: torch.cat(values) for name, values in self.patches.items()},
            "labels": torch.cat(self.labels),
            "model_scores": torch.cat(self.model_scores),
        }


def onenip_outputs(checkpoint: str, device: torch.device) -> tuple[Any, Callable[[torch.Tensor, list[str]], dict]]:
    """Load a OneNIP checkpoint; return it and a function of pre-processed images and categories -> outputs."""
    from anomalib_onenip import OneNIP

    model = OneNIP.load_from_checkpoint(checkpoint, map_location=device).eval()
    torch_model = model.model

    def run(images: torch.Tensor, categories: list[str]) -> dict[str, Any]:
        index = torch.tensor([model.category_names.index(name) for name in categories], device=device)
        taps = list(torch_model.feature_extractor(images).values())
        features = torch.cat([F.interpolate(tap, size=torch_model.feature_size, mode="bilinear", align_corners=True)
                              for tap in taps], dim=1)
        encoded_prompt, prompt_category = torch_model.prompt_bank.select(torch_model.global_features(features), index)
        reconstruction = torch_model.reconstruct(features, encoded_prompt)
        reconstruction_map, refiner_map = torch_model.residual_maps(reconstruction, features)
        kappa = torch_model.refiner_scale[prompt_category].view(-1, 1, 1, 1)
        fused = torch_model.prompted_map(features, encoded_prompt, prompt_category)
        return {
            "maps": {"R": reconstruction_map[:, 0], "kS": (kappa * refiner_map)[:, 0]},
            "global": features.mean(dim=(2, 3)),
            "patches": {"patch_knn": torch_model.to_tokens(features),
                        "patch_knn_fine": patch_descriptors(taps)},
            "model_score": torch_model.image_score(fused),
        }

    return model, run


def diad_outputs(checkpoint: str, device: torch.device) -> tuple[Any, Callable[[torch.Tensor, list[str]], dict]]:
    """Load a DiAD checkpoint; return it and a function of pre-processed images and categories -> outputs."""
    from anomalib_diad import DiAD

    model = DiAD.load_from_checkpoint(checkpoint, map_location=device).eval()
    torch_model = model.model

    def run(images: torch.Tensor, categories: list[str]) -> dict[str, Any]:
        del categories
        anomaly_map = torch_model.raw_anomaly_map(images)
        taps = list(torch_model.anomaly_map.feature_extractor(images).values())
        coarse_size = tuple(taps[-1].shape[-2:])
        features = torch.cat([F.interpolate(tap, size=coarse_size, mode="bilinear", align_corners=True)
                              for tap in taps], dim=1)
        return {
            "maps": {"A": anomaly_map[:, 0]},
            "global": features.mean(dim=(2, 3)),
            "patches": {"patch_knn": features.flatten(2).transpose(1, 2),
                        "patch_knn_fine": patch_descriptors(taps)},
            "model_score": torch_model.anomaly_map.image_score(anomaly_map),
        }

    return model, run


@torch.no_grad()
def collect(model: Any, run: Callable, datamodule: MultiClassAD) -> dict[str, dict[str, dict[str, Any]]]:
    """Outputs per split (``train``: normal training images; ``test``) and category."""
    outputs: dict[str, dict[str, CategoryOutputs]] = {"train": {}, "test": {}}
    loaders = {"train": training_images_in_order(datamodule), "test": datamodule.test_dataloader()}
    for split, loader in loaders.items():
        start = time.perf_counter()
        for step, batch in enumerate(loader):
            images = model.pre_processor.transform(batch.image.to(model.device))
            result = run(images, list(batch.category))
            labels = batch.gt_label if batch.gt_label is not None else torch.zeros(len(images))
            for row, category in enumerate(batch.category):
                entry = outputs[split].setdefault(category, CategoryOutputs())
                entry.add({name: value[row : row + 1] for name, value in result["maps"].items()},
                          result["global"][row : row + 1],
                          {name: value[row : row + 1] for name, value in result["patches"].items()},
                          labels[row : row + 1].int(), result["model_score"][row : row + 1])
            if step % 10 == 0:
                print(f"{split}: batch {step + 1}/{len(loader)} ({time.perf_counter() - start:.0f} s)", flush=True)
    return {split: {category: entry.stacked() for category, entry in entries.items()}
            for split, entries in outputs.items()}


# ------------------------------------------------------------------------------------------- candidate scores
def map_rules(maps: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    """Image scores ``[n]`` of maps ``[n, H, W]`` under each rule."""
    size = min(maps.shape[-2:])
    batch = maps.unsqueeze(1)
    for fraction in POOL_FRACTIONS:
        window = max(1, round(fraction * size))
        pooled = F.avg_pool2d(F.avg_pool2d(batch, (window, 1), stride=1), (1, window), stride=1)
        yield f"pool {fraction:.3g}", pooled.amax(dim=(1, 2, 3))
    yield "mean", maps.mean(dim=(1, 2))
    flat = maps.flatten(1)
    for fraction in TOP_FRACTIONS:
        count = max(1, round(fraction * flat.shape[1]))
        yield f"top {100 * fraction:g}%", flat.topk(count, dim=1).values.mean(dim=1)
    for fraction in SMOOTH_FRACTIONS:
        sigma = fraction * size
        yield f"gauss {fraction:.3g}", GaussianBlur2d(sigma=sigma, channels=1)(batch).amax(dim=(1, 2, 3))


def position_standardised(maps: torch.Tensor, normal: torch.Tensor, kind: str) -> torch.Tensor:
    """Maps ``[n, H, W]`` standardised per position by normal training maps ``[m, H, W]``."""
    if kind == "none":
        return maps
    if kind == "position_z":
        return (maps - normal.mean(dim=0)) / normal.std(dim=0).clamp_min(1e-6)
    median = normal.median(dim=0).values
    mad = (normal - median).abs().median(dim=0).values * 1.4826
    return (maps - median) / mad.clamp_min(1e-6)


def fused_maps(maps: dict[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """OneNIP: ``lambda * R + (1 - lambda) * kappa_c S`` for several ``lambda``; DiAD: its one map."""
    if "A" in maps:
        yield "A", maps["A"]
        return
    for weight in (0.0, 0.25, 0.5, 0.75, 1.0):
        yield f"lambda={weight:g}", weight * maps["R"] + (1 - weight) * maps["kS"]


def knn_scores(queries: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
    """Distance of each image's farthest patch ``[n, P, C]`` to its nearest row of ``memory [M, C]``: ``[n]``."""
    return torch.stack([nearest_distances(query[None], memory[None]).amax().sqrt() for query in queries])


def evidence_scores(train: dict[str, Any], test: dict[str, Any], seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Backbone evidence ``name -> (training scores [n_train], test scores [n_test])`` of one category."""
    result = {}
    train_global, test_global = train["global"], test["global"]
    train_distance = torch.cdist(train_global, train_global).fill_diagonal_(float("inf"))
    result["global"] = (train_distance.min(dim=1).values, torch.cdist(test_global, train_global).min(dim=1).values)
    generator = torch.Generator().manual_seed(seed)
    for name, train_patches in train["patches"].items():
        count, patches, channels = train_patches.shape
        owner = torch.arange(count).repeat_interleave(patches)
        flat = train_patches.reshape(-1, channels)
        for size in MEMORY_SIZES:
            chosen = torch.randperm(len(flat), generator=generator)[:size]
            memory, memory_owner = flat[chosen], owner[chosen]
            result[f"{name} {size}"] = (leave_own_image_out_scores(train_patches, torch.arange(count), memory, memory_owner),
                                        knn_scores(test["patches"][name], memory))
    return result


def candidate_scores(outputs: dict[str, dict[str, dict[str, Any]]], seed: int) -> dict[str, dict[str, Any]]:
    """Per category, ``family -> candidate -> (train scores, test scores)`` and the test labels."""
    per_category = {}
    for category, test in outputs["test"].items():
        train = outputs["train"][category]
        maps: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for map_name, train_map in fused_maps(train["maps"]):
            test_map = dict(fused_maps(test["maps"]))[map_name]
            for kind in POSITION_STANDARDISATIONS:
                standardised_train = position_standardised(train_map, train_map, kind)
                standardised_test = position_standardised(test_map, train_map, kind)
                for (rule, train_score), (_, test_score) in zip(map_rules(standardised_train),
                                                                map_rules(standardised_test), strict=True):
                    maps[f"{map_name}, {kind}, {rule}"] = (train_score, test_score)
        evidence = evidence_scores(train, test, seed)
        per_category[category] = {"maps": maps, "evidence": evidence, "labels": test["labels"],
                                  "model": (train["model_scores"], test["model_scores"])}
        print(f"{category}: {len(maps)} map rules, {len(evidence)} evidence scores", flush=True)
    return per_category


def standardised(train: torch.Tensor, test: torch.Tensor) -> torch.Tensor:
    """Test scores standardised by the category's normal training scores."""
    return (test - train.mean()) / train.std().clamp_min(1e-8)


def unit_interval(scores: torch.Tensor) -> torch.Tensor:
    """Scores mapped monotonically onto ``[0, 1]``: torchmetrics applies a sigmoid to scores outside it, which
    saturates large scores (``sigmoid(75) == 1`` in float32) and ties them."""
    scores = scores.double()
    return (scores - scores.min()) / (scores.max() - scores.min()).clamp_min(1e-30)


def image_auroc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    return float(binary_auroc(unit_interval(scores), labels))


def f1_max(scores: torch.Tensor, labels: torch.Tensor) -> float:
    precision, recall, _ = binary_precision_recall_curve(unit_interval(scores), labels)
    return float((2 * precision * recall / (precision + recall).clamp_min(1e-12)).max())


def evaluate(per_category: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Image AUROC ``candidate -> category -> value`` of every candidate, and the family of each candidate."""
    table: dict[str, dict[str, float]] = {}
    for category, data in per_category.items():
        labels = data["labels"]
        z_maps = {name: standardised(*scores) for name, scores in data["maps"].items()}
        z_evidence = {name: standardised(*scores) for name, scores in data["evidence"].items()}
        candidates = {"model default": data["model"][1], **{f"map: {n}": s for n, s in z_maps.items()},
                      **{f"evidence: {n}": s for n, s in z_evidence.items()}}
        z_model = standardised(*data["model"])
        for (evidence_name, evidence_score), weight in itertools.product(z_evidence.items(), COMBINATION_WEIGHTS):
            # the image score a model option gives: its own score and the evidence, each standardised per category
            candidates[f"combination: {weight:g} x [model default] + {1 - weight:g} x [{evidence_name}]"] = (
                weight * z_model + (1 - weight) * evidence_score)
        for (map_name, map_score), (evidence_name, evidence_score) in itertools.product(z_maps.items(), z_evidence.items()):
            for weight in COMBINATION_WEIGHTS:
                candidates[f"combination: {weight:g} x [{map_name}] + {1 - weight:g} x [{evidence_name}]"] = (
                    weight * map_score + (1 - weight) * evidence_score)
            if evidence_name != "global":
                candidates[f"combination: equal [{map_name}] + [{evidence_name}] + [global]"] = (
                    map_score + evidence_score + z_evidence["global"]) / 3
        for name, score in candidates.items():
            table.setdefault(name, {})[category] = image_auroc(score, labels)
        data["candidates"] = candidates
    return table


def family(candidate: str) -> str:
    return candidate.split(":", 1)[0]


def leave_one_out(table: dict[str, dict[str, float]], categories: list[str],
                  allowed: Callable[[str], bool]) -> dict[str, tuple[str, float]]:
    """For each category: the candidate with the best mean AUROC over the others, and its AUROC on it."""
    chosen = {}
    names = [name for name in table if allowed(name)]
    for held_out in categories:
        others = [category for category in categories if category != held_out]
        best = max(names, key=lambda name: sum(table[name][category] for category in others))
        chosen[held_out] = (best, table[best][held_out])
    return chosen


def model_option(candidate: str) -> bool:
    """What the models' ``patch_score_weight`` expresses: their own score, the patch evidence, or a weighted sum."""
    return candidate == "model default" or (
        "patch_knn_fine" in candidate
        and (family(candidate) == "evidence" or candidate.startswith("combination: ") and "[model default]" in candidate))


FAMILIES: dict[str, Callable[[str], bool]] = {
    "all candidates": lambda name: True,
    "model option: own score + patch_knn_fine": model_option,
    "map rules only": lambda name: family(name) == "map",
    "map rules, no position standardisation": lambda name: family(name) == "map" and ", none," in name,
    "backbone evidence only": lambda name: family(name) == "evidence",
    "map + evidence combinations": lambda name: family(name) == "combination",
}


def report(per_category: dict[str, dict[str, Any]], table: dict[str, dict[str, float]], categories: list[str],
           fixed: list[str]) -> dict[str, Any]:
    """In-sample best, leave-one-out per family, and the fixed candidates, with AUROC and F1Max per category."""
    def f1(name: str, category: str) -> float:
        data = per_category[category]
        return f1_max(data["candidates"][name], data["labels"])

    def mean(values: dict[str, float]) -> float:
        return sum(values.values()) / len(values)

    result: dict[str, Any] = {"leave_one_out": {}, "in_sample": {}, "fixed": {}}
    for name, allowed in FAMILIES.items():
        chosen = leave_one_out(table, categories, allowed)
        result["leave_one_out"][name] = {
            category: {"chosen": best, "image_AUROC": auroc, "image_F1Max": f1(best, category)}
            for category, (best, auroc) in chosen.items()}
        best = max((candidate for candidate in table if allowed(candidate)), key=lambda c: mean(table[c]))
        result["in_sample"][name] = {"chosen": best, "image_AUROC": table[best],
                                     "image_F1Max": {category: f1(best, category) for category in categories}}
    for name in ["model default", *fixed]:
        if name in table:
            result["fixed"][name] = {"image_AUROC": table[name],
                                     "image_F1Max": {category: f1(name, category) for category in categories}}
    ranked = sorted(table, key=lambda name: -mean(table[name]))
    result["top_in_sample"] = [{"candidate": name, "mean_image_AUROC": mean(table[name]), **table[name]}
                               for name in ranked[:25]]
    result["family_best"] = {}
    for name in table:
        key = family(name)
        if key not in result["family_best"] or mean(table[name]) > result["family_best"][key]["mean_image_AUROC"]:
            result["family_best"][key] = {"candidate": name, "mean_image_AUROC": mean(table[name])}
    return result


def markdown(study: dict[str, Any], categories: list[str], baselines: dict[str, Any]) -> str:
    header = "| rule | " + " | ".join(categories) + " | mean |"
    rule = "|---|" + "---|" * (len(categories) + 1)
    lines = [f"Machine: {study['machine']}. Checkpoint: {study['settings']['checkpoint']}", "",
             "Leave-one-category-out (chosen on the other categories; image AUROC / F1Max on the held-out one)", "",
             header, rule]

    def cells(values: dict[str, float], f1: dict[str, float] | None = None) -> str:
        mean = sum(values[c] for c in categories) / len(categories)
        parts = [f"{100 * values[c]:.1f}" + (f" / {100 * f1[c]:.1f}" if f1 else "") for c in categories]
        mean_f1 = f" / {100 * sum(f1[c] for c in categories) / len(categories):.1f}" if f1 else ""
        return " | ".join(parts) + f" | {100 * mean:.2f}{mean_f1} |"

    for name, chosen in study["leave_one_out"].items():
        auroc = {c: chosen[c]["image_AUROC"] for c in categories}
        f1 = {c: chosen[c]["image_F1Max"] for c in categories}
        lines.append(f"| LOO: {name} | " + cells(auroc, f1))
    for name, entry in study["fixed"].items():
        lines.append(f"| fixed: {name} | " + cells(entry["image_AUROC"], entry["image_F1Max"]))
    for model, entry in baselines.get("models", {}).items():
        if model in {"PatchCore", "PaDiM"} or model.startswith("DiAD stage-1"):
            values = entry["per_category"]
            if all(c in values for c in categories):
                lines.append(f"| {model} (quality.json) | " + cells({c: values[c]["image_AUROC"] for c in categories},
                                                                      {c: values[c]["image_F1Max"] for c in categories}))
    lines += ["", "In-sample best per family (chosen on all categories)", "", header, rule]
    for name, entry in study["in_sample"].items():
        lines.append(f"| {name}: {entry['chosen']} | " + cells(entry["image_AUROC"], entry["image_F1Max"]))
    lines += ["", "Choices of the leave-one-out protocol (all candidates)", "", "| held out | chosen on the others |",
              "|---|---|"]
    lines += [f"| {c} | {study['leave_one_out']['all candidates'][c]['chosen']} |" for c in categories]
    lines += ["", "Top candidates in-sample", "", "| candidate | " + " | ".join(categories) + " | mean |", rule]
    for entry in study["top_in_sample"]:
        lines.append(f"| {entry['candidate']} | " + cells({c: entry[c] for c in categories}))
    return "\n".join(lines) + "\n"


def plot(study: dict[str, Any], categories: list[str], baselines: dict[str, Any], path: Path) -> None:
    import matplotlib as mpl

    mpl.use("Agg")
    import matplotlib.pyplot as plt

    bars = {"model default": study["fixed"]["model default"]["image_AUROC"],
            "LOO, map rules": {c: v["image_AUROC"] for c, v in study["leave_one_out"]["map rules only"].items()},
            "LOO, all": {c: v["image_AUROC"] for c, v in study["leave_one_out"]["all candidates"].items()}}
    for model in ("PatchCore", "PaDiM"):
        entry = baselines.get("models", {}).get(model)
        if entry is not None and all(c in entry["per_category"] for c in categories):
            bars[model] = {c: entry["per_category"][c]["image_AUROC"] for c in categories}
    labels = [*categories, "mean"]
    width = 0.8 / len(bars)
    figure, axis = plt.subplots(figsize=(2 + 1.6 * len(labels), 4))
    for offset, (name, values) in enumerate(bars.items()):
        heights = [values[c] for c in categories]
        heights.append(sum(heights) / len(heights))
        axis.bar([i + offset * width for i in range(len(labels))], heights, width, label=name)
    axis.set_xticks([i + 0.4 - width / 2 for i in range(len(labels))], labels, rotation=20)
    axis.set_ylim(0.4, 1.0)
    axis.set_ylabel("image AUROC")
    axis.legend(loc="lower left", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a trained OneNIP or DiAD checkpoint (quality.py saves both)")
    parser.add_argument("--model", choices=["OneNIP", "DiAD"], default="OneNIP")
    parser.add_argument("--root", required=True, help="dataset root in MVTec layout (one folder per category)")
    parser.add_argument("--categories", nargs="+", required=True)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--fixed", nargs="*", default=[], help="candidates reported as they are (e.g. a config's rule)")
    parser.add_argument("--baselines", default=None, help="quality.json with PatchCore and PaDiM rows to compare")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random patch memories")
    parser.add_argument("--output", default="detection")
    args = parser.parse_args()
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, run = (onenip_outputs if args.model == "OneNIP" else diad_outputs)(args.checkpoint, device)
    # the model's resize runs in the dataset, as in anomalib's training, so that categories of different sizes collate
    resizes = extract_transforms_by_type(model.pre_processor.transform, Resize)
    datamodule = MultiClassAD(root=args.root, categories=args.categories, eval_batch_size=args.batch_size,
                              num_workers=0, augmentations=resizes[0] if resizes else None)
    datamodule.setup()
    start = time.perf_counter()
    outputs = collect(model, run, datamodule)
    inference_s = time.perf_counter() - start
    per_category = candidate_scores(outputs, args.seed)
    table = evaluate(per_category)
    categories = sorted(per_category)
    study = {"machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
                        f"{torch.get_num_threads()} threads, {device.type}",
             "settings": vars(args), "inference_s": inference_s, "study_s": time.perf_counter() - start - inference_s,
             **report(per_category, table, categories, args.fixed)}
    baselines = json.loads(Path(args.baselines).read_text()) if args.baselines else {}
    (output / "detection.json").write_text(json.dumps(study, indent=2))
    (output / "candidates.json").write_text(json.dumps(table))
    text = markdown(study, categories, baselines)
    (output / "detection.md").write_text(text)
    plot(study, categories, baselines, output / "detection.png")
    print(text)


if __name__ == "__main__":
    main()
