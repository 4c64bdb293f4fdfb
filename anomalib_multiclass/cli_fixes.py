"""Fixes to anomalib 2.7's CLI that seeded and resumed training, and clear checkpoint errors, need.

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

The start-up hook (``anomalib_plugins_autoload``) calls :func:`apply_anomalib_cli_fixes` once
``anomalib.cli.cli`` is imported.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from lightning.pytorch import Trainer, seed_everything

from anomalib_multiclass.components import IncompatibleCheckpointError, check_checkpoint_file


def apply_anomalib_cli_fixes() -> None:
    """Wrap ``AnomalibCLI.before_instantiate_classes`` (seed) and ``_run_subcommand`` (resumed train), once."""
    from anomalib.cli.cli import AnomalibCLI

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
