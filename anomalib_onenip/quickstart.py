"""Offline quickstart: build a small texture dataset, train one OneNIP model on all its categories, test it.

Usage: ``onenip-quickstart [--root DATA] [anomalib train options...]``. The data is written on the
first run (see :mod:`anomalib_multiclass.quickstart_data`); training uses ``quickstart.yaml`` next
to this module (also ``configs/onenip/quickstart.yaml`` in the repository). Extra options are passed
to ``anomalib train``, e.g. ``--trainer.max_epochs 2``. Results, the per-category table (JSON, CSV,
PNG), heatmaps and the checkpoint land under ``results/OneNIP/<data folder name>/all/latest``.
"""

from __future__ import annotations

import argparse
from importlib import resources
from pathlib import Path

from anomalib_multiclass.quickstart_data import build_quickstart_dataset

DEFAULT_ROOT = Path("datasets/onenip_quickstart")


def main(argv: list[str] | None = None) -> None:
    """Build the quickstart data if needed and run ``anomalib train`` with the quickstart config."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="where the dataset is (or will be) written")
    args, anomalib_args = parser.parse_known_args(argv)
    print(f"Quickstart data: {build_quickstart_dataset(args.root)}")

    from anomalib.cli import AnomalibCLI

    config = resources.files("anomalib_onenip") / "quickstart.yaml"
    AnomalibCLI(["train", "--config", str(config), "--data.root", str(args.root), *anomalib_args])
    print(f"Heatmaps, per-category metrics and the checkpoint: results/OneNIP/{args.root.resolve().name}/all/latest/")


if __name__ == "__main__":
    main()
