"""Add a category to a trained OneNIP checkpoint from normal images: ``onenip-add-category``.

Two modes:

- **no training** (default): :meth:`OneNIP.add_category` encodes the new category's prompts and
  calibrates it from its images; the weights and the other categories stay exactly as they were.
- **short adaptation** (``--adapt_epochs N``): :func:`adapt_to_new_category` then fine-tunes the
  whole model for ``N`` epochs on the new category's images together with the training images of
  the categories it already knows (the replay set), so that it learns the new one without forgetting
  the others; the prompt bank and calibration of every category are rebuilt at the end, as after
  training.

The written checkpoint is the input checkpoint with the new weights and state, so ``anomalib test``,
``anomalib predict`` and ``anomalib export`` take it like one from ``anomalib train``.

    onenip-add-category --ckpt_path model.ckpt --category capsule --images capsule/train/good
    onenip-add-category --ckpt_path model.ckpt --category capsule --images capsule/train/good \\
        --adapt_epochs 2 --replay_root datasets/MVTecAD
"""

from __future__ import annotations

import argparse
import logging
import math
import tempfile
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import torch
from anomalib.data.transforms.utils import extract_transforms_by_type
from anomalib.data.utils import LabelName, Split
from lightning.pytorch import Trainer, seed_everything
from torch.utils.data import DataLoader
from torchvision.transforms.v2 import Resize

from anomalib_multiclass.checkpoint_io import check_checkpoint_file
from anomalib_multiclass.datamodule import MultiClassAD, MultiClassDataset, list_normal_images
from anomalib_onenip.lightning_model import OneNIP

logger = logging.getLogger(__name__)


def adapt_to_new_category(
    model: OneNIP,
    name: str,
    images: str | Path | Sequence[str | Path],
    replay: MultiClassAD,
    epochs: int = 2,
    accelerator: str = "auto",
) -> None:
    """Fine-tune a trained ``model`` on a new category's normal images while replaying the known categories.

    The training set is the replay datamodule's training images (every category the model knows,
    except ``name``) plus the new category's images, repeated so that the new category has about as
    many samples as an average replayed one. Training is the model's own (same loss, synthetic
    anomalies, optimiser, learning rate and gradient clipping), from the model's weights, for
    ``epochs`` epochs; its prompt pool, prompt bank and calibration then cover every category.
    The post-processor's thresholds (on the standardised scale) are kept.

    Raises:
        ValueError: ``epochs`` below 1, or the replay set lacks categories that the model knows
            (naming them: they would be forgotten).
    """
    if epochs < 1:
        msg = f"epochs must be at least 1 for the adaptation, got {epochs}."
        raise ValueError(msg)
    known = [category for category in model.category_names if category != name]
    missing = sorted(set(known) - set(replay.categories))
    if missing:
        msg = (
            f"The replay data lacks the model's categories {missing} (it has {replay.categories}); without their "
            "images the adaptation would forget them. Give a replay root and categories that hold all of them."
        )
        raise ValueError(msg)
    replay.setup("fit")
    replayed = replay.train_data.samples
    paths = list_normal_images(images)
    repeats = max(1, math.ceil(len(replayed) / max(len(known), 1) / len(paths)))
    new_samples = pd.DataFrame({
        "image_path": [str(path) for path in paths] * repeats,
        "mask_path": "",
        "split": Split.TRAIN.value,
        "label_index": int(LabelName.NORMAL),
        "category": name,
    })
    # as anomalib's datamodules do in training: the model's resize runs in the dataset, so that images of
    # categories of different sizes collate into one batch
    resizes = extract_transforms_by_type(getattr(model.pre_processor, "transform", None), Resize)
    dataset = MultiClassDataset(pd.concat([replayed, new_samples], ignore_index=True),
                                augmentations=resizes[0] if resizes else None)
    logger.info(
        "OneNIP adaptation: %d epochs on %d replayed images of %s and %d images of '%s' (%d files x %d).",
        epochs, len(replayed), known, len(new_samples), name, len(paths), repeats,
    )
    loader = DataLoader(dataset, batch_size=replay.train_batch_size, shuffle=True, num_workers=replay.num_workers,
                        collate_fn=dataset.collate_fn)
    with tempfile.TemporaryDirectory() as work:
        trainer = Trainer(max_epochs=epochs, accelerator=accelerator, devices=1, logger=False,
                          enable_checkpointing=False, default_root_dir=work, **model.trainer_arguments)
        trainer.fit(model, train_dataloaders=loader)
    model.eval()


def save_with_model_state(model: OneNIP, source: str | Path, output: str | Path) -> Path:
    """Write ``source``'s checkpoint with ``model``'s state (weights, prompt bank, calibration, categories) to ``output``.

    Everything else (hyper-parameters, anomalib's component configs, the training run's loop state)
    is kept, so the file loads wherever ``source`` does.
    """
    checkpoint = torch.load(source, map_location="cpu", weights_only=False)
    checkpoint["state_dict"] = {key: value.detach().cpu() for key, value in model.state_dict().items()}
    checkpoint[model.CATEGORIES_KEY] = list(model.category_names)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, output)
    return output


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="onenip-add-category",
        description="Add a category to a trained OneNIP checkpoint from a folder of its normal images.",
    )
    parser.add_argument("--ckpt_path", required=True, help="trained OneNIP checkpoint (from anomalib train)")
    parser.add_argument("--category", required=True, help="name of the new category")
    parser.add_argument("--images", required=True, help="folder of the new category's normal images (one size)")
    parser.add_argument("--output", help="checkpoint to write (default: <ckpt_path stem>+<category>.ckpt beside it)")
    parser.add_argument("--replace", action="store_true", help="replace a category of that name")
    parser.add_argument("--adapt_epochs", type=int, default=0,
                        help="fine-tune for this many epochs with replay (default 0: no training)")
    parser.add_argument("--replay_root", help="dataset root of the known categories (MVTec layout), for --adapt_epochs")
    parser.add_argument("--replay_categories", nargs="+", help="known categories to replay (default: all the model's)")
    parser.add_argument("--replay_dataset", default="folder", help="MultiClassAD dataset of --replay_root")
    parser.add_argument("--batch_size", type=int, default=8, help="training batch size of the adaptation")
    parser.add_argument("--num_workers", type=int, default=0, help="data-loading workers of the adaptation")
    parser.add_argument("--accelerator", default="auto", help="Lightning accelerator of the adaptation")
    parser.add_argument("--seed", type=int, help="seed of the adaptation (synthetic anomalies, order)")
    return parser


def add_category_to_checkpoint(args: argparse.Namespace) -> Path:
    """Load ``args.ckpt_path``, add (and with ``args.adapt_epochs`` adapt to) the category, write; the written path."""
    source = Path(check_checkpoint_file(args.ckpt_path))
    if args.adapt_epochs and not args.replay_root:
        msg = "--adapt_epochs needs --replay_root: the adaptation replays the known categories' training images."
        raise ValueError(msg)
    output = Path(args.output) if args.output else source.with_name(f"{source.stem}+{args.category}.ckpt")
    if output.resolve() == source.resolve():
        msg = f"--output '{output}' is the input checkpoint: write the new model to another file."
        raise ValueError(msg)
    model = OneNIP.load_from_checkpoint(source, map_location="cpu")
    model.add_category(args.category, args.images, replace=args.replace)
    if args.adapt_epochs:
        if args.seed is not None:
            seed_everything(args.seed)
        categories = args.replay_categories or [name for name in model.category_names if name != args.category]
        replay = MultiClassAD(root=args.replay_root, categories=categories, dataset=args.replay_dataset,
                              train_batch_size=args.batch_size, num_workers=args.num_workers)
        adapt_to_new_category(model, args.category, args.images, replay, epochs=args.adapt_epochs,
                              accelerator=args.accelerator)
    written = save_with_model_state(model, source, output)
    logger.info("OneNIP categories in '%s': %s.", written, model.category_names)
    return written


def main(argv: Sequence[str] | None = None) -> None:
    """``onenip-add-category``: bad input ends with exit status 2 and one line that names the problem and the fix."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        written = add_category_to_checkpoint(args)
    except (FileNotFoundError, ValueError, RuntimeError) as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    print(f"Wrote {written}.")  # noqa: T201
