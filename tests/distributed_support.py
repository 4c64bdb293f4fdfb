"""Multi-process (DDP) runs and what they fitted: shared by ``tests/test_distributed.py`` and
``tests/benchmarks/ddp_equality.py``.

:class:`RecordFittedState` records, on every rank, what a run fitted and which test images each rank
scored (it is named in the YAML config of the runs, with the repository root on ``PYTHONPATH``);
:func:`refit_in_one_process` computes the same constants from a checkpoint's weights in one process.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torchvision.transforms import v2

POST_PROCESSOR_CONSTANTS = ("_image_threshold", "_pixel_threshold", "image_min", "image_max", "pixel_min", "pixel_max")


def fitted_state(pl_module: LightningModule) -> dict[str, torch.Tensor]:
    """Every constant a OneNIP or DiAD fit computes from data, besides the trained weights."""
    state: dict[str, torch.Tensor] = {}
    model = pl_module.model
    for name, buffer in model.score_statistics.named_buffers():
        state[f"score_statistics.{name}"] = buffer.detach().cpu().clone()
    if hasattr(model, "prompt_bank"):
        for name, buffer in model.prompt_bank.named_buffers():
            state[f"prompt_bank.{name}"] = buffer.detach().cpu().clone()
        state["refiner_scale"] = model.refiner_scale.detach().cpu().clone()
        for category, features in pl_module.prompt_pool.features.items():
            state[f"prompt_pool.{category}"] = features.detach().cpu().clone()
    for name in POST_PROCESSOR_CONSTANTS:
        state[f"post_processor.{name}"] = getattr(pl_module.post_processor, name).detach().cpu().clone()
    return state


class RecordFittedState(Callback):
    """Writes ``fitted_rank<R>.pt`` after every validation and ``tested_rank<R>.json`` (image paths) after testing.

    Args:
        directory: where to write (default: the working directory).
    """

    def __init__(self, directory: str = ".") -> None:
        self.directory = Path(directory)
        self._tested: list[str] = []

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """The fitted constants after the post-processor set its thresholds."""
        torch.save(fitted_state(pl_module), self.directory / f"fitted_rank{trainer.global_rank}.pt")

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Start a new list of scored images."""
        del trainer, pl_module
        self._tested = []

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:  # noqa: ANN001
        """Remember the images this rank scored."""
        del trainer, pl_module, outputs, batch_idx, dataloader_idx
        self._tested.extend(str(path) for path in batch.image_path)

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Write this rank's scored images."""
        del pl_module
        (self.directory / f"tested_rank{trainer.global_rank}.json").write_text(json.dumps(self._tested))


def run_config(path: Path, model: str, data_root: Path, categories: list[str], epochs: int, batch_size: int,
               devices: int) -> Path:
    """A YAML ``anomalib train`` config: ``model`` (YAML lines), ``MultiClassAD``, CPU, DDP when ``devices > 1``."""
    distributed = f"  devices: {devices}\n  strategy: ddp\n" if devices > 1 else ""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        f"seed_everything: 3\nmodel:\n{model}"
        f"data:\n  class_path: anomalib_multiclass.MultiClassAD\n  init_args:\n    root: {data_root}\n"
        f"    categories: {json.dumps(categories)}\n    num_workers: 0\n    train_batch_size: {batch_size}\n"
        f"trainer:\n  max_epochs: {epochs}\n  accelerator: cpu\n{distributed}"
        "  enable_progress_bar: false\n  callbacks:\n    - class_path: tests.distributed_support.RecordFittedState\n"
    )
    return path


def run_checkpoint(run: Path) -> Path:
    """The ``model.ckpt`` of the run in ``run`` (its ``latest`` directory)."""
    return next(run.glob("results/*/*/*/latest/weights/lightning/model.ckpt"))


def run_metrics(run: Path) -> dict[str, dict[str, float]]:
    """The per-category test metrics of the run in ``run``."""
    return json.loads(next(run.glob("results/*/*/*/latest/metrics_per_category.json")).read_text())


def refit_in_one_process(model_class: type, checkpoint: Path, data_root: Path, categories: list[str],
                         batch_size: int, directory: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """From ``checkpoint``'s weights, fit every constant in this process, then test: ``(constants, test results)``.

    The prompt pool and bank (OneNIP) or the score statistics (DiAD) come from the training images, the
    thresholds and normalisation from a validation run, as in training. ``batch_size`` should be the
    run's training batch size: the backbone's float32 results differ in the last bits with the batch.
    """
    from anomalib.engine import Engine

    from anomalib_multiclass import MultiClassAD
    from anomalib_multiclass.multiclass_module import training_images_in_order

    directory.mkdir(parents=True, exist_ok=True)
    model = model_class.load_from_checkpoint(checkpoint, pre_trained=False)
    # the model's resize, which a trainer would add to the datasets (images of different sizes must be resized)
    resize = next(step for step in model.pre_processor.transform.transforms if isinstance(step, v2.Resize))
    datamodule = MultiClassAD(root=data_root, categories=categories, num_workers=0, train_batch_size=batch_size,
                              eval_batch_size=batch_size, augmentations=resize)
    datamodule.setup()
    if hasattr(model.model, "prompt_bank"):
        model.cache_training_features(training_images_in_order(datamodule))
        model.build_prompt_bank()
    else:
        model.compute_score_statistics(training_images_in_order(datamodule))
    engine = Engine(accelerator="cpu", devices=1, default_root_dir=directory, logger=False,
                    enable_progress_bar=False, callbacks=[RecordFittedState(str(directory))])
    engine.validate(model=model, datamodule=datamodule)
    constants = torch.load(directory / "fitted_rank0.pt", weights_only=True)
    return constants, engine.test(model=model, datamodule=datamodule)[0]


def largest_difference(first: torch.Tensor, second: torch.Tensor) -> tuple[float, float]:
    """``(max |first - second|, max |second|)``, in float64 (0 for empty tensors)."""
    if second.numel() == 0:
        return 0.0, 0.0
    return (first.double() - second.double()).abs().max().item(), second.double().abs().max().item()
