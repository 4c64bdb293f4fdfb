"""Start-up hook of ``anomalib-multiclass-models``: short model names for anomalib, and nothing else.

anomalib has no plugin entry points: ``anomalib train --model OneNIP`` and ``get_model("OneNIP")``
only find a class that is already imported when the name is looked up. The
``anomalib_multiclass_models_autoload.pth`` file installed next to this module imports it at
interpreter start-up; it installs a meta-path finder and imports nothing else, so start-up stays
free of torch and anomalib. The finder acts on two imports only:

- right after ``anomalib.models``: it imports this distribution's models, ``anomalib_onenip`` and
  ``anomalib_diad`` (no other plugin's);
- right after ``anomalib.cli.cli``: it applies the ``--seed_everything`` fix, which acts for
  OneNIP and DiAD only (:func:`anomalib_multiclass.anomalib_fixes.apply_seed_fix`).

A failure in either step prints one message and leaves anomalib working. Set the environment
variable ``ANOMALIB_MULTICLASS_MODELS_AUTOLOAD=0`` to disable the hook; class paths
(``--model anomalib_onenip.OneNIP``) work without it.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import os
import sys
import traceback

DISABLE_VARIABLE = "ANOMALIB_MULTICLASS_MODELS_AUTOLOAD"
MODEL_PACKAGES = ("anomalib_onenip", "anomalib_diad")


def import_models() -> None:
    """Import this distribution's model packages (each attaches its model to ``anomalib.models``).

    A package that is being imported right now (the user imported it first, which imported
    ``anomalib.models``) is skipped: it finishes its own import. A failure is reported on stderr
    and skipped, so that it never breaks anomalib itself.
    """
    for package in MODEL_PACKAGES:
        if package in sys.modules:
            continue
        try:
            importlib.import_module(package)
        except Exception:  # noqa: BLE001 - report any failure without breaking anomalib
            print(f"anomalib-multiclass-models: '{package}' failed to load; its model is unavailable:", file=sys.stderr)
            traceback.print_exc()


def apply_seed_fix() -> None:
    """Apply the ``--seed_everything`` fix for OneNIP and DiAD (skipped if the package is gone or fails)."""
    try:
        fixes = importlib.import_module("anomalib_multiclass.anomalib_fixes")
        fixes.apply_seed_fix()
    except Exception as error:  # noqa: BLE001 - never break anomalib's CLI over the fix
        print(f"anomalib-multiclass-models: --seed_everything fix not applied ({error!r}).", file=sys.stderr)


# module -> what runs right after that module is first imported
_AFTER_IMPORT = {
    "anomalib.models": import_models,
    "anomalib.cli.cli": apply_seed_fix,
}


class MultiClassModelsFinder(importlib.abc.MetaPathFinder):
    """Wraps the loaders of the modules in ``_AFTER_IMPORT`` so that their step runs right after them."""

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


def enabled() -> bool:
    """False when ``ANOMALIB_MULTICLASS_MODELS_AUTOLOAD`` is ``0``, ``false``, ``no`` or ``off``."""
    return os.environ.get(DISABLE_VARIABLE, "1").strip().lower() not in {"0", "false", "no", "off"}


if enabled() and not any(isinstance(finder, MultiClassModelsFinder) for finder in sys.meta_path):
    sys.meta_path.insert(0, MultiClassModelsFinder())
