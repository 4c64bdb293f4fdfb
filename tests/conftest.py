"""Shared fixtures: offline hub, tiny texture datasets, a tiny trained OneNIP, the real_ad data root."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.tiny_models import TINY_ONENIP

# Tests never touch the network: hub look-ups fail at once instead of retrying.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REAL_AD_ENV = "REAL_AD_ROOT"



def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--real-ad-root",
        default=os.environ.get(REAL_AD_ENV),
        help=f"folder of the real_ad categories in MVTec layout (default: ${REAL_AD_ENV})",
    )


@pytest.fixture(scope="session")
def real_ad_root(request: pytest.FixtureRequest) -> Path:
    root = request.config.getoption("--real-ad-root")
    if not root:
        pytest.skip(f"real_ad data not given: pass --real-ad-root or set {REAL_AD_ENV}")
    root = Path(root)
    missing = [name for name in ("bottle", "juice_bottle", "kolektor") if not (root / name / "train").is_dir()]
    if missing:
        pytest.skip(f"real_ad data at '{root}' lacks categories {missing}")
    return root


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three texture categories (brick, grass, gravel), 64 px, in MVTec layout."""
    from anomalib_multiclass.quickstart_data import build_quickstart_dataset

    root = tmp_path_factory.mktemp("tiny") / "textures"
    return build_quickstart_dataset(root, num_train=8, num_test_good=3, num_test_per_defect=2, crop_size=64)


@pytest.fixture(scope="session")
def trained_onenip(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    """A tiny OneNIP (Lite0 ImageNet backbone) trained 3 epochs on the tiny dataset, with datamodule, engine, results."""
    from anomalib.engine import Engine
    from lightning.pytorch import seed_everything

    from anomalib_multiclass import MultiClassAD
    from anomalib_onenip import OneNIP

    seed_everything(7)
    datamodule = MultiClassAD(root=tiny_dataset, train_batch_size=4, eval_batch_size=8, num_workers=0)
    model = OneNIP(**{**TINY_ONENIP, "pre_trained": True}, lr=1e-3)  # offline ImageNet Lite0 weights
    root = tmp_path_factory.mktemp("trained")
    engine = Engine(max_epochs=3, accelerator="cpu", default_root_dir=root, enable_progress_bar=False)
    engine.fit(model=model, datamodule=datamodule)
    results = engine.test(model=model, datamodule=datamodule)
    return model, datamodule, engine, results[0]
