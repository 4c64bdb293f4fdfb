"""What this package changes in a user's process: only its own models' behaviour, nothing global."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from jsonargparse import Namespace

import anomalib_onenip  # noqa: F401 - the seed fix recognises imported model classes
from anomalib_multiclass.anomalib_fixes import apply_seed_fix
from anomalib_multiclass.checkpoint_io import check_checkpoint_file
from anomalib_multiclass.checkpoint_io import MultiClassCheckpointIO
from anomalib_multiclass.score_statistics import CategoryScoreStatistics


# ----------------------------------------------------------------------------------------- seed fix
class _CLI:
    """The part of ``AnomalibCLI`` the seed fix reads: ``config``, ``subcommand``, ``before_instantiate_classes``."""

    def __init__(self, class_path: str, seed: int | bool) -> None:
        self.subcommand = "train"
        self.config = Namespace(train=Namespace(model=Namespace(class_path=class_path), seed_everything=seed))
        self.before_instantiate_classes()

    def before_instantiate_classes(self) -> None:
        self.draw = torch.rand(1).item()


def test_seed_fix_seeds_this_packages_models_only() -> None:
    class CLI(_CLI):
        pass

    assert apply_seed_fix(CLI)
    assert apply_seed_fix(CLI), "applying twice keeps one wrapper"
    torch.manual_seed(123)
    first = CLI("anomalib_onenip.lightning_model.OneNIP", 9).draw
    torch.manual_seed(456)
    assert CLI("anomalib_onenip.lightning_model.OneNIP", 9).draw == first, "OneNIP: --seed_everything 9 applied"
    draws = []
    for start in (123, 456):
        torch.manual_seed(start)
        draws.append(CLI("anomalib.models.image.padim.lightning_model.Padim", 9).draw)
    assert draws[0] != draws[1], "PaDiM: anomalib's behaviour, the integer seed is not applied by this package"
    torch.manual_seed(123)
    unseeded = torch.rand(1).item()
    torch.manual_seed(123)
    assert CLI("anomalib_onenip.lightning_model.OneNIP", True).draw == unseeded, "True (anomalib's default): no seeding"


def test_seed_fix_on_a_cli_without_the_method_warns_once_and_patches_nothing(caplog: pytest.LogCaptureFixture) -> None:
    class RenamedCLI:
        def prepare_instantiation(self) -> None:
            pass

    class ChangedSignatureCLI:
        def before_instantiate_classes(self, config: Namespace) -> None:
            pass

    with caplog.at_level(logging.WARNING, logger="anomalib_multiclass.anomalib_fixes"):
        assert not apply_seed_fix(RenamedCLI)
    assert len(caplog.records) == 1 and "before_instantiate_classes" in caplog.records[0].getMessage()
    assert not hasattr(RenamedCLI, "before_instantiate_classes")
    original = ChangedSignatureCLI.before_instantiate_classes
    assert not apply_seed_fix(ChangedSignatureCLI)
    assert ChangedSignatureCLI.before_instantiate_classes is original


# ------------------------------------------------------------------------------------- checkpoints
def test_checkpoint_check_names_local_files_and_leaves_remote_urls_to_lightning(tmp_path: Path) -> None:
    assert check_checkpoint_file("s3://bucket/model.ckpt") == "s3://bucket/model.ckpt"
    with pytest.raises(FileNotFoundError, match=r"Checkpoint '.*missing.ckpt' does not exist"):
        check_checkpoint_file(tmp_path / "missing.ckpt")
    with pytest.raises(FileNotFoundError, match="missing.ckpt"):
        check_checkpoint_file(f"file://{tmp_path}/missing.ckpt")
    (tmp_path / "text.ckpt").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="text.ckpt' is not a readable torch checkpoint"):
        check_checkpoint_file(f"file://{tmp_path}/text.ckpt")
    torch.save({"state_dict": {}}, tmp_path / "model.ckpt")
    assert check_checkpoint_file(f"file://{tmp_path}/model.ckpt") == f"file://{tmp_path}/model.ckpt"


@pytest.mark.parametrize("user_io", [False, True])
def test_setup_installs_the_checkpoint_io_only_over_anomalibs_plain_one(user_io: bool) -> None:
    """The plugin's IO replaces a plain ``AnomalibCheckpointIO`` on its own trainer; a user's IO is kept."""
    from anomalib.engine.plugins import AnomalibCheckpointIO

    from anomalib_onenip import OneNIP
    from tests.tiny_models import TINY_ONENIP

    class UserIO(AnomalibCheckpointIO):
        pass

    model = OneNIP(**TINY_ONENIP)
    original = UserIO() if user_io else AnomalibCheckpointIO(extra_safe_globals=[int])
    strategy = SimpleNamespace(checkpoint_io=original)
    model._trainer = SimpleNamespace(strategy=strategy, world_size=1)  # noqa: SLF001 - the part of a Trainer setup reads
    model.setup("fit")
    if user_io:
        assert strategy.checkpoint_io is original
    else:
        assert type(strategy.checkpoint_io) is MultiClassCheckpointIO
        assert strategy.checkpoint_io.extra_safe_globals == [int]


# ------------------------------------------------------------------------------ shared statistics
def test_category_score_statistics_match_the_former_formulas() -> None:
    """The shared standardisation gives what OneNIP's prompt bank and DiAD's statistics computed before."""
    scores = [torch.tensor([1.0, 2.0, 4.0]), torch.tensor([5.0, 5.0, 5.0])]
    per_category = CategoryScoreStatistics()
    per_category.store(scores)
    mean = torch.stack([values.mean() for values in scores])
    std = torch.stack([values.std(unbiased=False) for values in scores]).clamp_min(1e-3 * mean.abs().clamp_min(1e-6))
    assert torch.equal(per_category.mean, mean) and torch.equal(per_category.std, std)
    assert per_category.std[1] == pytest.approx(5e-3), "a constant category is floored, not divided by zero"
    pooled = CategoryScoreStatistics(pooled_row=True)
    pooled.store(scores)
    assert pooled.num_rows == 3 and pooled.mean[-1] == torch.cat(scores).mean()
    maps = torch.full((2, 1, 2, 2), 3.0)
    expected = (maps - mean.view(-1, 1, 1, 1)) / std.view(-1, 1, 1, 1)
    assert torch.equal(per_category.standardize(maps, torch.tensor([0, 1])), expected)
    assert torch.equal(pooled.standardize(maps, None), (maps - pooled.mean[-1]) / pooled.std[-1])
    # a category added later gets the same formula; the others keep their exact values
    per_category.set_row(2, torch.tensor([0.0, 0.0]))
    assert torch.equal(per_category.mean[:2], mean) and torch.equal(per_category.std[:2], std)
    assert per_category.mean[2] == 0 and per_category.std[2] == pytest.approx(1e-9)
    with pytest.raises(ValueError, match="pooled row"):
        pooled.set_row(0, scores[0])


def test_onenip_reads_statistics_saved_in_the_prompt_bank() -> None:
    """Checkpoints written before the statistics were shared (``prompt_bank.score_mean``) or kappa per category still load."""
    from anomalib_onenip.torch_model import OneNIPModel
    from tests.tiny_models import TINY_ONENIP_MODEL

    model = OneNIPModel(**TINY_ONENIP_MODEL)
    state_dict = model.state_dict()
    del state_dict["score_statistics.mean"], state_dict["score_statistics.std"]
    state_dict["prompt_bank.score_mean"] = torch.tensor([1.0, 2.0])
    state_dict["prompt_bank.score_std"] = torch.tensor([0.5, 0.25])
    # and kept one refiner scale for all categories
    state_dict["refiner_scale"] = torch.tensor(2.5)
    state_dict["prompt_bank.tokens"] = torch.zeros(3, 16, 32)
    state_dict["prompt_bank.global_features"] = torch.zeros(3, 192)
    state_dict["prompt_bank.categories"] = torch.tensor([0, 1, 1])
    model.load_state_dict(state_dict)
    assert torch.equal(model.score_statistics.mean, torch.tensor([1.0, 2.0]))
    assert torch.equal(model.score_statistics.std, torch.tensor([0.5, 0.25]))
    assert torch.equal(model.refiner_scale, torch.tensor([2.5, 2.5]))


# ------------------------------------------------------------------------------------------ plots
def test_saving_results_leaves_the_matplotlib_backend_alone(tmp_path: Path) -> None:
    import matplotlib as mpl

    from anomalib_multiclass.evaluator import save_results

    before = mpl.get_backend()
    mpl.use("svg")
    try:
        paths = save_results({"brick": {"image_AUROC": 0.9}, "mean": {"image_AUROC": 0.9}}, tmp_path)
        assert mpl.get_backend() == "svg"
    finally:
        mpl.use(before)
    assert paths[-1].read_bytes()[:4] == b"\x89PNG"
