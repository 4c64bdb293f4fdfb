"""Make a plugin model visible where anomalib looks for models."""

from __future__ import annotations

import importlib

from anomalib_multiclass.anomalib_fixes import apply_seed_fix


def expose_in_anomalib_models(model_class: type) -> None:
    """Set ``anomalib.models.<Name>`` so that ``from anomalib.models import Name`` and name lookups work.

    The CLI's short name (``--model OneNIP``) and ``get_model("OneNIP")`` only need the class to
    be imported (it subclasses ``AnomalibModule`` directly); this adds the module attribute too.
    The module is taken from ``sys.modules`` through ``import_module``: when the start-up hook runs,
    ``anomalib.models`` is loaded but not yet an attribute of the ``anomalib`` package.

    When anomalib's CLI is already imported (``anomalib train --model anomalib_onenip.OneNIP`` imports
    the model while parsing, with or without the start-up hook), the ``--seed_everything`` fix for this
    package's models is applied here, before the CLI builds the model.
    """
    models = importlib.import_module("anomalib.models")
    if not hasattr(models, model_class.__name__):
        setattr(models, model_class.__name__, model_class)
    apply_seed_fix()
