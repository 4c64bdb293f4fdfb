"""Fixes to anomalib 2.7 traps that seeded and resumed training, GPU checkpoints and clear errors need.

- ``anomalib train --seed_everything N`` (or the top-level config key) is parsed but never applied:
  two runs of one config start from different weights and draw different random numbers. The fix
  seeds Lightning's generators with an integer seed before the model, datamodule and engine are
  built, as Lightning's own CLI does; ``True`` (anomalib's default) keeps anomalib's behaviour.
- ``anomalib train --ckpt_path CKPT`` resumes training from ``CKPT`` and then *tests ``CKPT``*
  (``Engine.train`` passes the path on to ``Trainer.test``), so the metrics it reports are those of
  the checkpoint it started from, not of the model it trained. The fix tests the trained model.
- ``--ckpt_path`` of a missing or truncated file fails deep in ``torch.load`` with a message that
  does not name the file, and a checkpoint of another model fails without naming it either. The fix
  checks the file first and adds its path to the plugins' :class:`IncompatibleCheckpointError`.

- A checkpoint saved on a GPU does not load on a CPU-only machine (``anomalib predict/test --ckpt_path``,
  ``Engine.predict(ckpt_path=...)``): anomalib's checkpoint IO passes ``map_location=None`` to
  ``torch.load``, so tensors saved on ``cuda:0`` are restored there. The fix loads them on the CPU
  when no location is given, as Lightning's own checkpoint IO does; Lightning then moves the model
  to the accelerator of the run.

The start-up hook (``anomalib_plugins_autoload``) calls :func:`apply_anomalib_cli_fixes` once
``anomalib.cli.cli`` is imported and :func:`apply_checkpoint_io_fix` once
``anomalib.engine.plugins.checkpoint_io`` is.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from lightning.pytorch import Trainer, seed_everything


def apply_anomalib_cli_fixes() -> None:
    """Wrap ``AnomalibCLI.before_instantiate_classes`` (seed) and ``_run_subcommand`` (resumed train), once."""
    from anomalib.cli.cli import AnomalibCLI

    from anomalib_multiclass.components import IncompatibleCheckpointError, check_checkpoint_file

    original_before = AnomalibCLI.before_instantiate_classes
    if getattr(original_before, "multiclass_fixes", False):
        return
    original_run = AnomalibCLI._run_subcommand  # noqa: SLF001

    @functools.wraps(original_before)
    def before_instantiate_classes(self: Any) -> None:  # noqa: ANN401
        seed = self._get(self.config, "seed_everything")  # noqa: SLF001
        if isinstance(seed, int) and not isinstance(seed, bool):
            seed_everything(seed, workers=True)
        original_before(self)

    @functools.wraps(original_run)
    def run_subcommand(self: Any) -> None:  # noqa: ANN401
        ckpt_path = self._get(self.config, "ckpt_path")  # noqa: SLF001
        if not ckpt_path:
            return original_run(self)
        if not _lightning_checkpoint_alias(ckpt_path):
            check_checkpoint_file(ckpt_path)
        try:
            if self.subcommand == "train":
                with _test_the_trained_model():
                    return original_run(self)
            return original_run(self)
        except IncompatibleCheckpointError as error:
            if str(ckpt_path) in str(error):
                raise
            msg = f"'{ckpt_path}': {error}"
            raise IncompatibleCheckpointError(msg) from None

    before_instantiate_classes.multiclass_fixes = True
    AnomalibCLI.before_instantiate_classes = before_instantiate_classes
    AnomalibCLI._run_subcommand = run_subcommand  # noqa: SLF001


def _lightning_checkpoint_alias(ckpt_path: Any) -> bool:  # noqa: ANN401
    """``best``, ``last``, ``hpc`` and ``registry[:...]`` name checkpoints that Lightning finds itself."""
    name = str(ckpt_path)
    return name in {"best", "last", "hpc", "registry"} or name.startswith("registry:")


@contextmanager
def _test_the_trained_model() -> Iterator[None]:
    """Inside, ``Trainer.test`` ignores ``ckpt_path``: it tests the model in memory (the one just trained)."""
    original_test = Trainer.test

    @functools.wraps(original_test)
    def test(self: Trainer, *args: Any, ckpt_path: Any = None, **kwargs: Any) -> Any:  # noqa: ANN401
        del ckpt_path
        return original_test(self, *args, **kwargs)

    Trainer.test = test
    try:
        yield
    finally:
        Trainer.test = original_test


def apply_checkpoint_io_fix() -> None:
    """Make ``AnomalibCheckpointIO.load_checkpoint`` load on the CPU when given no ``map_location`` (once)."""
    from anomalib.engine.plugins.checkpoint_io import AnomalibCheckpointIO

    original_load = AnomalibCheckpointIO.load_checkpoint
    if getattr(original_load, "multiclass_fixes", False):
        return

    @functools.wraps(original_load)
    def load_checkpoint(self: Any, path: Any, map_location: Any = None, **kwargs: Any) -> Any:  # noqa: ANN401
        if map_location is None:
            map_location = _keep_on_cpu
        return original_load(self, path, map_location=map_location, **kwargs)

    load_checkpoint.multiclass_fixes = True
    AnomalibCheckpointIO.load_checkpoint = load_checkpoint


def _keep_on_cpu(storage: Any, location: str) -> Any:  # noqa: ANN401
    """``torch.load`` location function: every storage stays where it was read, on the CPU."""
    del location
    return storage
