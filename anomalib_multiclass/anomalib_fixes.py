"""Fixes to anomalib 2.7 traps, applied to this package's models only (OneNIP, DiAD).

Other anomalib models behave exactly as without this package: every fix below either lives in
this package's own classes (Lightning hooks and a checkpoint IO that only these models install),
or, for the one fix that needs anomalib's CLI, passes through unchanged unless the model being
built is one of this package's.

- **Seed.** ``anomalib train --seed_everything N`` (or the top-level config key) is parsed but never
  applied: two runs of one config start from different weights. For this package's models the
  integer seed is applied before the model, datamodule and engine are built, as Lightning's own
  CLI does (:func:`apply_seed_fix`, a guarded wrapper of ``AnomalibCLI.before_instantiate_classes``;
  ``True``, anomalib's default, keeps anomalib's behaviour).
- **Checkpoint loading** (:class:`~anomalib_multiclass.checkpoint_io.MultiClassCheckpointIO`, which
  these models install on their trainer in ``setup``): a checkpoint saved on a GPU loads on a CPU-only
  machine (anomalib's IO passes ``map_location=None``; Lightning's own IO keeps storages on the CPU),
  and a missing or truncated
  local ``--ckpt_path`` is named with the fix instead of failing deep inside ``torch.load``. Remote
  paths (``s3://``, other fsspec URLs) are left to Lightning.
- **Test after resume.** ``anomalib train --ckpt_path CKPT`` resumes from ``CKPT`` and then tests
  ``CKPT``, not the model it trained; these models test the trained model (see
  ``MultiClassModule.on_load_checkpoint``).
"""

from __future__ import annotations

import functools
import inspect
import logging
import sys
from typing import Any

from anomalib_multiclass.multiclass_module import MultiClassModule

logger = logging.getLogger(__name__)

FIXED_MARKER = "anomalib_multiclass_seed_fix"


def _builds_multiclass_model(cli: Any) -> bool:  # noqa: ANN401
    """Whether the parsed config of ``cli`` (an ``AnomalibCLI``) builds a model of this package."""
    subcommand_config = cli.config.get(str(cli.subcommand)) or cli.config
    model = subcommand_config.get("model")
    class_path = model.get("class_path") if hasattr(model, "get") else None
    if not isinstance(class_path, str):
        return False
    module_name, _, class_name = class_path.rpartition(".")
    model_class = getattr(sys.modules.get(module_name), class_name, None)
    return isinstance(model_class, type) and issubclass(model_class, MultiClassModule)


def _seed_fix_applicable(cli_class: type) -> bool:
    """Feature check: ``cli_class.before_instantiate_classes(self)`` exists, with ``config``/``subcommand`` set first."""
    method = getattr(cli_class, "before_instantiate_classes", None)
    if not callable(method):
        return False
    try:
        parameters = list(inspect.signature(method).parameters)
    except (TypeError, ValueError):
        return False
    return parameters == ["self"]


def apply_seed_fix(cli_class: type | None = None) -> bool:
    """Apply ``--seed_everything N`` before this package's models are built by ``AnomalibCLI`` (once).

    A guarded wrapper of ``AnomalibCLI.before_instantiate_classes``: for any other model it calls
    anomalib's method and does nothing else. When anomalib's CLI no longer has that method (a
    future release renamed it), nothing is patched and one warning is logged; anomalib keeps working.

    Args:
        cli_class: the class to patch; ``anomalib.cli.cli.AnomalibCLI`` when None (it must be imported already).

    Returns:
        True when the wrapper is in place (now or from an earlier call).
    """
    if cli_class is None:
        cli_class = getattr(sys.modules.get("anomalib.cli.cli"), "AnomalibCLI", None)
        if cli_class is None:
            return False
    original = getattr(cli_class, "before_instantiate_classes", None)
    if getattr(original, FIXED_MARKER, False):
        return True
    if not _seed_fix_applicable(cli_class):
        logger.warning(
            "anomalib-multiclass-models: this anomalib's CLI has no before_instantiate_classes(self); "
            "--seed_everything is not applied to OneNIP/DiAD (seed in Python with lightning.seed_everything). "
            "Everything else works."
        )
        return False

    @functools.wraps(original)
    def before_instantiate_classes(self: Any) -> None:  # noqa: ANN401
        try:
            seed = (self.config.get(str(self.subcommand)) or self.config).get("seed_everything")
            ours = _builds_multiclass_model(self)
        except Exception:  # noqa: BLE001 - never break anomalib's CLI over the seed
            seed, ours = None, False
        if ours and isinstance(seed, int) and not isinstance(seed, bool):
            from lightning.pytorch import seed_everything

            seed_everything(seed, workers=True)
        original(self)

    setattr(before_instantiate_classes, FIXED_MARKER, True)
    cli_class.before_instantiate_classes = before_instantiate_classes
    return True

