"""Register this distribution's models with anomalib as soon as ``anomalib.models`` is imported.

anomalib has no plugin entry points: ``anomalib train --model OneNIP`` only resolves the short name
if the class is already imported when the CLI parses its arguments. The ``.pth`` file shipped next
to this module imports it at interpreter start-up; it installs a meta-path finder and nothing else,
so start-up stays free of torch. When ``anomalib.models`` is first imported, the finder loads
every model declared in the ``anomalib.models`` entry-point group; each plugin package attaches
its model to ``anomalib.models`` when imported, so ``get_model("OneNIP")`` and the CLI find it.
When ``anomalib.cli.cli`` and anomalib's checkpoint IO are imported, it fixes traps of anomalib 2.7:
``--seed_everything N`` parsed but ignored, ``train --ckpt_path`` testing the checkpoint it resumed
from instead of the model it trained, unclear checkpoint errors, and GPU checkpoints that do not load
on a CPU (see :mod:`anomalib_multiclass.anomalib_fixes`).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import traceback

ENTRY_POINT_GROUP = "anomalib.models"


def import_entry_point_models() -> None:
    """Import the module of every model in the entry-point group.

    A module that is being imported right now (the user imported the plugin first, which imported
    ``anomalib.models``) is skipped: it finishes its own import. A plugin that fails to import is
    reported on stderr and skipped, so a broken plugin never breaks anomalib itself.
    """
    from importlib.metadata import entry_points

    for entry_point in entry_points(group=ENTRY_POINT_GROUP):
        if entry_point.module in sys.modules:
            continue
        try:
            importlib.import_module(entry_point.module)
        except Exception:  # noqa: BLE001 - report any plugin failure without breaking anomalib
            print(f"anomalib plugin '{entry_point.value}' failed to load:", file=sys.stderr)
            traceback.print_exc()


def _apply_fix(name: str):  # noqa: ANN202
    """A hook that runs ``anomalib_multiclass.anomalib_fixes.<name>`` (skipped if the package was removed)."""

    def apply() -> None:
        try:
            fixes = importlib.import_module("anomalib_multiclass.anomalib_fixes")
        except ImportError:
            return
        getattr(fixes, name)()

    return apply


# module -> what runs right after that module is first imported
_AFTER_IMPORT = {
    "anomalib.models": import_entry_point_models,
    "anomalib.cli.cli": _apply_fix("apply_anomalib_cli_fixes"),
    "anomalib.engine.plugins.checkpoint_io": _apply_fix("apply_checkpoint_io_fix"),
}


class _AnomalibModelsFinder(importlib.abc.MetaPathFinder):
    """Wraps the loaders of the modules in ``_AFTER_IMPORT`` so that their hook runs right after them."""

    def __init__(self) -> None:
        self.pending = dict(_AFTER_IMPORT)

    def find_spec(self, fullname, path, target=None):  # noqa: ANN001, ANN201
        if fullname not in self.pending:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path, target)
        if spec is None or spec.loader is None:
            return spec
        original_exec_module = spec.loader.exec_module
        after_import = self.pending.pop(fullname)
        if not self.pending:
            sys.meta_path[:] = [finder for finder in sys.meta_path if finder is not self]

        def exec_module(module):  # noqa: ANN001, ANN202
            original_exec_module(module)
            after_import()

        spec.loader.exec_module = exec_module
        return spec


if not any(isinstance(finder, _AnomalibModelsFinder) for finder in sys.meta_path):
    sys.meta_path.insert(0, _AnomalibModelsFinder())
